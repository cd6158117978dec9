//! Length-prefixed, checksummed postcard frames: the only place that knows the wire framing.
//! Sans-IO: bytes in, messages out; reading and writing frames over a stream is the
//! transport's (`net`).
//!
//! A frame is an 8-byte header followed by the body:
//!
//! | bytes | meaning                                                        |
//! |-------|----------------------------------------------------------------|
//! | 0..4  | body length in bytes, `u32` big-endian                         |
//! | 4..8  | checksum: the first 4 raw bytes of `blake3(body)`, in order    |
//! | 8..   | body: the postcard encoding of one message, nothing after it   |
//!
//! The checksum catches corruption (and framing bugs), not tampering: it is unkeyed.
//! Every length is checked against a caller-given `frame_len_max` before anything is
//! allocated or awaited, so a hostile peer cannot make us reserve memory it never sends.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default limit on a frame body, in bytes (16 MiB).
pub const FRAME_LEN_MAX_DEFAULT: usize = 16 << 20;

/// Bytes before the body: 4 of length, 4 of checksum.
pub const FRAME_HEADER_LEN: usize = 8;

/// What can go wrong encoding, decoding, reading or writing a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The body is longer than the limit (announced by a length prefix, or produced by encoding).
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Body length in bytes.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The body does not match the checksum in the header.
    #[error("frame checksum mismatch: the body was corrupted in transit")]
    Checksum,
    /// The body passed the checksum but is not exactly one postcard-encoded message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("frame I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (header and body).
///
/// Fails with [`FrameError::TooLarge`] if the body would exceed `frame_len_max` (or
/// `u32::MAX`); memory used stays bounded by the limit even for a huge message.
pub fn encode_frame<M: Serialize>(msg: &M, frame_len_max: usize) -> Result<Vec<u8>, FrameError> {
    // The length prefix is a u32, whatever the caller's limit says.
    let max = frame_len_max.min(u32::MAX as usize);
    let flavor = BoundedVec {
        buf: vec![0; FRAME_HEADER_LEN],
        body_len: 0,
        max,
    };
    let (mut buf, body_len) = postcard::serialize_with_flavor(msg, flavor)
        .map_err(|e| FrameError::Malformed(format!("cannot encode message: {e}")))?;
    if body_len > max {
        return Err(FrameError::TooLarge {
            len: body_len,
            max: frame_len_max,
        });
    }
    let len_prefix = u32::try_from(body_len).map_err(|_| FrameError::TooLarge {
        len: body_len,
        max: frame_len_max,
    })?;
    let sum = checksum(&buf[FRAME_HEADER_LEN..]);
    buf[0..4].copy_from_slice(&len_prefix.to_be_bytes());
    buf[4..8].copy_from_slice(&sum);
    Ok(buf)
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` if `buf` holds only part of a frame, or `Ok(Some((msg, consumed)))`
/// where `consumed` is the frame's length in bytes; bytes after it are left alone. An
/// oversized length prefix is refused as soon as the header is in, before the body.
pub fn decode_frame<M: DeserializeOwned + Serialize>(
    buf: &[u8],
    frame_len_max: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let (body_len, sum) = parse_header(header, frame_len_max)?;
    let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN.saturating_add(body_len)) else {
        return Ok(None);
    };
    let msg = decode_body(body, sum)?;
    Ok(Some((msg, FRAME_HEADER_LEN + body_len)))
}

/// The first 4 bytes of the body's blake3 hash.
fn checksum(body: &[u8]) -> [u8; 4] {
    let hash = blake3::hash(body);
    let mut sum = [0u8; 4];
    sum.copy_from_slice(&hash.as_bytes()[..4]);
    sum
}

/// Splits a header into (body length, checksum), refusing a length over the limit.
pub(crate) fn parse_header(
    header: &[u8],
    frame_len_max: usize,
) -> Result<(usize, [u8; 4]), FrameError> {
    let mut len_bytes = [0u8; 4];
    let mut sum = [0u8; 4];
    len_bytes.copy_from_slice(&header[0..4]);
    sum.copy_from_slice(&header[4..8]);
    // On a (hypothetical) target where usize is narrower than u32, saturate: still too large.
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
    if len > frame_len_max {
        return Err(FrameError::TooLarge {
            len,
            max: frame_len_max,
        });
    }
    Ok((len, sum))
}

/// Checks the body against its checksum, then decodes exactly one message from it.
pub(crate) fn decode_body<M: DeserializeOwned + Serialize>(
    body: &[u8],
    sum: [u8; 4],
) -> Result<M, FrameError> {
    if checksum(body) != sum {
        return Err(FrameError::Checksum);
    }
    let (msg, rest) = postcard::take_from_bytes::<M>(body)
        .map_err(|e| FrameError::Malformed(format!("{e} (body of {} bytes)", body.len())))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message at byte offset {}",
            rest.len(),
            body.len() - rest.len()
        )));
    }
    // One message, one encoding: a body postcard would not have written (an overlong
    // varint, say) is refused, so frames and their checksums are canonical.
    let canonical =
        postcard::to_allocvec(&msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if canonical != body {
        return Err(FrameError::Malformed("non-canonical encoding".into()));
    }
    Ok(msg)
}

/// A postcard output that stores at most `max` body bytes after the header, but keeps
/// counting past it so [`FrameError::TooLarge`] can report the real length.
struct BoundedVec {
    buf: Vec<u8>,
    body_len: usize,
    max: usize,
}

impl postcard::ser_flavors::Flavor for BoundedVec {
    type Output = (Vec<u8>, usize);

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.body_len = self.body_len.saturating_add(data.len());
        if self.body_len <= self.max {
            self.buf.extend_from_slice(data);
        } else if !self.buf.is_empty() {
            // Over the limit: the bytes are useless, give the memory back.
            self.buf = Vec::new();
        }
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(self) -> postcard::Result<Self::Output> {
        Ok((self.buf, self.body_len))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) enum TestMsg {
        Hello { version: u32, user: String },
        Data(Vec<u8>),
        Bye,
    }

    pub(crate) fn samples() -> Vec<TestMsg> {
        vec![
            TestMsg::Hello {
                version: 7,
                user: "ada — 🐕".into(),
            },
            TestMsg::Data((0..=255).collect()),
            TestMsg::Data(Vec::new()),
            TestMsg::Bye,
        ]
    }

    pub(crate) fn hello() -> TestMsg {
        TestMsg::Hello {
            version: 3,
            user: "grace".into(),
        }
    }

    /// A frame with the given raw body and a correct header.
    fn frame_with_body(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&checksum(body));
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn round_trip_each_variant_and_a_stream_of_them() {
        let mut stream = Vec::new();
        for msg in samples() {
            let f = encode_frame(&msg, FRAME_LEN_MAX_DEFAULT).unwrap();
            let (back, used) = decode_frame::<TestMsg>(&f, FRAME_LEN_MAX_DEFAULT)
                .unwrap()
                .unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, f.len());
            stream.extend_from_slice(&f);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, used)) =
            decode_frame::<TestMsg>(&stream[at..], FRAME_LEN_MAX_DEFAULT).unwrap()
        {
            got.push(m);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert_eq!(got, samples());
    }

    #[test]
    fn header_layout_is_as_documented() {
        let f = encode_frame(&TestMsg::Bye, FRAME_LEN_MAX_DEFAULT).unwrap();
        let body = postcard::to_allocvec(&TestMsg::Bye).unwrap();
        assert_eq!(f[0..4], (body.len() as u32).to_be_bytes());
        assert_eq!(f[4..8], blake3::hash(&body).as_bytes()[..4]);
        assert_eq!(f[8..], body[..]);
    }

    #[test]
    fn every_proper_prefix_needs_more_bytes() {
        for msg in samples() {
            let f = encode_frame(&msg, FRAME_LEN_MAX_DEFAULT).unwrap();
            for cut in 0..f.len() {
                assert!(
                    decode_frame::<TestMsg>(&f[..cut], FRAME_LEN_MAX_DEFAULT)
                        .unwrap()
                        .is_none(),
                    "prefix of {cut} bytes"
                );
            }
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let mut flips = 0;
        for msg in samples() {
            let f = encode_frame(&msg, FRAME_LEN_MAX_DEFAULT).unwrap();
            for bit in 0..f.len() * 8 {
                let mut bad = f.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let grew = bit < 32 && bad[..4] > f[..4];
                match decode_frame::<TestMsg>(&bad, FRAME_LEN_MAX_DEFAULT) {
                    Ok(Some((m, _))) => panic!("bit {bit} flipped, still decoded {m:?}"),
                    Ok(None) | Err(FrameError::TooLarge { .. }) => {
                        assert!(
                            grew,
                            "bit {bit}: only a larger length may wait or be too large"
                        )
                    }
                    Err(_) => {}
                }
                flips += 1;
            }
        }
        assert!(flips > 2000, "{flips} flips");
    }

    #[test]
    fn max_length_prefix_is_too_large_from_the_header_alone() {
        let mut header = u32::MAX.to_be_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        match decode_frame::<TestMsg>(&header, FRAME_LEN_MAX_DEFAULT) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, FRAME_LEN_MAX_DEFAULT);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn body_at_the_limit_passes_and_one_over_fails() {
        let f = encode_frame(&hello(), FRAME_LEN_MAX_DEFAULT).unwrap();
        let body_len = f.len() - FRAME_HEADER_LEN;
        assert!(encode_frame(&hello(), body_len).is_ok());
        assert!(decode_frame::<TestMsg>(&f, body_len).unwrap().is_some());
        assert!(matches!(
            encode_frame(&hello(), body_len - 1),
            Err(FrameError::TooLarge { len, max }) if len == body_len && max == body_len - 1
        ));
        assert!(matches!(
            decode_frame::<TestMsg>(&f, body_len - 1),
            Err(FrameError::TooLarge { len, .. }) if len == body_len
        ));
    }

    #[test]
    fn encode_reports_the_real_length_of_a_huge_message() {
        let msg = TestMsg::Data(vec![7; 100_000]);
        let real = postcard::to_allocvec(&msg).unwrap().len();
        match encode_frame(&msg, 1000) {
            Err(FrameError::TooLarge { len, max }) => assert_eq!((len, max), (real, 1000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trailing_bytes_in_the_body_are_malformed() {
        let mut body = postcard::to_allocvec(&TestMsg::Bye).unwrap();
        body.push(0);
        let f = frame_with_body(&body);
        match decode_frame::<TestMsg>(&f, FRAME_LEN_MAX_DEFAULT) {
            Err(FrameError::Malformed(why)) => assert!(why.contains("trailing"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn undecodable_body_with_good_checksum_is_malformed() {
        for body in [&[][..], &[9][..], &[1, 0xff][..]] {
            let f = frame_with_body(body);
            assert!(
                matches!(
                    decode_frame::<TestMsg>(&f, FRAME_LEN_MAX_DEFAULT),
                    Err(FrameError::Malformed(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn bytes_after_a_frame_are_left_for_the_next_call() {
        let mut f = encode_frame(&TestMsg::Bye, FRAME_LEN_MAX_DEFAULT).unwrap();
        let len = f.len();
        f.extend_from_slice(&[1, 2, 3]);
        let (m, used) = decode_frame::<TestMsg>(&f, FRAME_LEN_MAX_DEFAULT)
            .unwrap()
            .unwrap();
        assert_eq!((m, used), (TestMsg::Bye, len));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame::<TestMsg>(&bytes, FRAME_LEN_MAX_DEFAULT);
            let _ = decode_frame::<TestMsg>(&bytes, 4);
        }

        #[test]
        fn random_body_with_good_header_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let f = frame_with_body(&body);
            if let Ok(Some((m, used))) = decode_frame::<TestMsg>(&f, FRAME_LEN_MAX_DEFAULT) {
                // Whatever decodes must be exactly the body, re-encoded.
                prop_assert_eq!(used, f.len());
                prop_assert_eq!(postcard::to_allocvec(&m).unwrap(), body);
            }
        }
    }
}
