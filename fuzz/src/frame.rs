//! `frame_decode`: bytes as wire frames of `ClientMsg` and `ServerMsg` (invariant 6).
//!
//! The bytes are read twice for each message type: as they are (a stream of frames), and
//! behind a valid header (length and checksum), so the body reaches postcard. What must hold:
//! - `decode_frame` returns, never panics; a refusal names a real fault (`TooLarge` only
//!   over the limit, `Checksum` only when the checksum is wrong);
//! - a decoded frame re-encodes to the same bytes (see [`NONCANONICAL_TOLERATED`]), and any
//!   shorter prefix of it decodes as "incomplete";
//! - the async `read_frame` agrees with `decode_frame` on the same bytes.

use std::fmt::Debug;

use fieldlog::sync::frame::{decode_frame, encode_frame, FrameError, FRAME_HEADER_LEN};
use fieldlog::sync::net::read_frame;
use fieldlog::sync::protocol::{ClientMsg, ServerMsg};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The frame limit the checks use (small, so `TooLarge` is reachable).
pub const LIMIT: usize = 1 << 16;

/// Set to `true` only while a known bug makes the decoder accept non-canonical postcard
/// (this target found one: over-long varints and unsorted or repeated map keys decoded, so
/// one message had many encodings; fixed, see `frame_noncanonical_varint_is_refused` in
/// `tests/fuzz_corpus.rs`): the check then tolerates a re-encoding that differs but decodes
/// to the same message.
pub const NONCANONICAL_TOLERATED: bool = false;

/// Runs every frame check on `data`.
pub fn check(data: &[u8]) {
    check_as::<ClientMsg>(data);
    check_as::<ServerMsg>(data);
    let framed = frame_around(data);
    check_as::<ClientMsg>(&framed);
    check_as::<ServerMsg>(&framed);
}

/// `body` behind a valid header.
pub fn frame_around(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&blake3::hash(body).as_bytes()[..4]);
    out.extend_from_slice(body);
    out
}

/// The outcome of decoding, comparable between the sync and async readers.
#[derive(Debug, PartialEq)]
enum Outcome<M> {
    Frame(M),
    Incomplete,
    TooLarge,
    Checksum,
    Malformed,
}

fn check_as<M>(data: &[u8])
where
    M: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut rest = data;
    // Each round consumes a whole frame, so this ends.
    loop {
        let got = decode_frame::<M>(rest, LIMIT);
        let outcome = match got {
            Ok(None) => {
                if rest.len() >= FRAME_HEADER_LEN {
                    let len = header_len(rest);
                    assert!(
                        len <= LIMIT,
                        "incomplete, but the length {len} is over the limit"
                    );
                    assert!(
                        rest.len() < FRAME_HEADER_LEN + len,
                        "a whole frame ({} of {} bytes) reported as incomplete",
                        rest.len(),
                        FRAME_HEADER_LEN + len
                    );
                }
                Outcome::Incomplete
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(max, LIMIT);
                assert!(len > LIMIT, "TooLarge for {len} bytes within the limit");
                assert_eq!(len, header_len(rest));
                Outcome::TooLarge
            }
            Err(FrameError::Checksum) => {
                let len = header_len(rest);
                let body = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
                assert_ne!(
                    &blake3::hash(body).as_bytes()[..4],
                    &rest[4..8],
                    "checksum refused although it matches"
                );
                Outcome::Checksum
            }
            Err(FrameError::Malformed(_)) => Outcome::Malformed,
            Err(e) => panic!("decode_frame on a buffer returned {e:?}"),
            Ok(Some((msg, used))) => {
                let len = header_len(rest);
                assert_eq!(used, FRAME_HEADER_LEN + len, "consumed length");
                let frame = &rest[..used];
                check_reencode(&msg, frame);
                // Every strict prefix is incomplete, never an error or another message.
                for cut in [used - 1, FRAME_HEADER_LEN, FRAME_HEADER_LEN - 1, 0] {
                    if cut < used {
                        assert!(
                            matches!(decode_frame::<M>(&frame[..cut], LIMIT), Ok(None)),
                            "a {cut}-byte prefix of a {used}-byte frame is not incomplete"
                        );
                    }
                }
                // A smaller limit refuses it before looking at the body.
                if len > 0 {
                    assert!(matches!(
                        decode_frame::<M>(frame, len - 1),
                        Err(FrameError::TooLarge { .. })
                    ));
                }
                Outcome::Frame(msg)
            }
        };
        let from_stream = read_one::<M>(rest);
        match (&outcome, &from_stream) {
            // At the end of the bytes the stream reader also sees a clean close or a cut.
            (Outcome::Incomplete, Outcome::Incomplete) => {}
            (a, b) => assert_eq!(a, b, "read_frame disagrees with decode_frame"),
        }
        match outcome {
            Outcome::Frame(_) => {
                let used = FRAME_HEADER_LEN + header_len(rest);
                rest = &rest[used..];
            }
            _ => return,
        }
    }
}

fn header_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// The message must encode back to the frame it came from.
fn check_reencode<M>(msg: &M, frame: &[u8])
where
    M: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let again = encode_frame(msg, LIMIT).expect("a decoded message re-encodes");
    if again == frame {
        return;
    }
    let back = decode_frame::<M>(&again, LIMIT)
        .expect("the re-encoding decodes")
        .map(|(m, _)| m);
    assert_eq!(
        back.as_ref(),
        Some(msg),
        "the re-encoding decodes to another message"
    );
    if !NONCANONICAL_TOLERATED {
        panic!(
            "decoded frame re-encodes to different bytes:\n in  {frame:02x?}\n out {again:02x?}"
        );
    }
}

/// Reads one frame with the async reader (on a current-thread runtime).
fn read_one<M: DeserializeOwned + Serialize>(bytes: &[u8]) -> Outcome<M> {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
    }
    RT.with(|rt| {
        let mut reader = bytes;
        match rt.block_on(read_frame::<M, _>(&mut reader, LIMIT)) {
            Ok(Some(m)) => Outcome::Frame(m),
            Ok(None) | Err(FrameError::Truncated) => Outcome::Incomplete,
            Err(FrameError::TooLarge { .. }) => Outcome::TooLarge,
            Err(FrameError::Checksum) => Outcome::Checksum,
            Err(FrameError::Malformed(_)) => Outcome::Malformed,
            Err(e) => panic!("read_frame on a buffer returned {e:?}"),
        }
    })
}
