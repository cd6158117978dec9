//! Frames over tokio's byte streams: reading a frame (within a budget of held bytes) and
//! writing one. The framing itself is `frame`'s; this adds only the awaiting.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sync::frame::{decode_body, encode_frame, parse_header, FrameError, FRAME_HEADER_LEN};

/// Initial buffer for a body read from a stream; it grows only as bytes actually arrive.
const READ_CHUNK_LEN: usize = 64 << 10;

/// Accounting of the bytes a frame reader holds: the reader reserves each piece of a body
/// before reading it, so a peer can make it hold no more than the budget allows (a budget
/// that has no room makes the reader wait, which stops reading from the peer).
pub trait ReadBudget {
    /// Returns once `bytes` more may be held.
    fn reserve(&mut self, bytes: usize) -> impl std::future::Future<Output = ()> + Send;
}

/// A budget without bounds: only `frame_len_max` limits what one read holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unbounded;

impl ReadBudget for Unbounded {
    async fn reserve(&mut self, _bytes: usize) {}
}

/// Reads one frame from `r`.
///
/// Returns `Ok(None)` on end of stream at a frame boundary, [`FrameError::Truncated`] on
/// end of stream inside a frame. The body buffer grows with the bytes received, so a peer
/// announcing a large frame and then stalling holds little memory.
pub async fn read_frame<M, R>(r: &mut R, frame_len_max: usize) -> Result<Option<M>, FrameError>
where
    M: DeserializeOwned + Serialize,
    R: AsyncRead + Unpin,
{
    read_frame_within(r, frame_len_max, &mut Unbounded).await
}

/// As [`read_frame`], reserving every chunk of the body (at most 64 KiB) in `budget` before
/// reading it. The reservations stay with the caller's budget: the caller releases them once
/// the message is handled.
pub async fn read_frame_within<M, R, B>(
    r: &mut R,
    frame_len_max: usize,
    budget: &mut B,
) -> Result<Option<M>, FrameError>
where
    M: DeserializeOwned + Serialize,
    R: AsyncRead + Unpin,
    B: ReadBudget,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    // Not read_exact: EOF before the first byte is a clean close, not truncation.
    while filled < FRAME_HEADER_LEN {
        match r.read(&mut header[filled..]).await {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let (body_len, sum) = parse_header(&header, frame_len_max)?;
    let mut body = Vec::with_capacity(body_len.min(READ_CHUNK_LEN));
    while body.len() < body_len {
        let chunk = (body_len - body.len()).min(READ_CHUNK_LEN);
        budget.reserve(chunk).await;
        let before = body.len();
        // chunk <= READ_CHUNK_LEN, so the widening is lossless.
        r.take(chunk as u64).read_to_end(&mut body).await?;
        if body.len() - before < chunk {
            return Err(FrameError::Truncated);
        }
    }
    decode_body(&body, sum).map(Some)
}

/// Writes `msg` as one frame to `w` and flushes, so the peer can act on it at once.
pub async fn write_frame<M, W>(w: &mut W, msg: &M, frame_len_max: usize) -> Result<(), FrameError>
where
    M: Serialize,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg, frame_len_max)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::frame::tests::{hello, samples, TestMsg};
    use crate::sync::frame::FRAME_LEN_MAX_DEFAULT;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    #[tokio::test]
    async fn read_write_over_duplex_then_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for msg in samples() {
                write_frame(&mut a, &msg, FRAME_LEN_MAX_DEFAULT)
                    .await
                    .unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(m) = read_frame::<TestMsg, _>(&mut b, FRAME_LEN_MAX_DEFAULT)
            .await
            .unwrap()
        {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(got, samples());
    }

    #[tokio::test]
    async fn empty_stream_is_clean_eof() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        let r = read_frame::<TestMsg, _>(&mut b, FRAME_LEN_MAX_DEFAULT).await;
        assert!(matches!(r, Ok(None)), "{r:?}");
    }

    #[tokio::test]
    async fn eof_at_every_point_inside_a_frame_is_truncated() {
        let f = encode_frame(&hello(), FRAME_LEN_MAX_DEFAULT).unwrap();
        for cut in 1..f.len() {
            let mut r = &f[..cut];
            let got = read_frame::<TestMsg, _>(&mut r, FRAME_LEN_MAX_DEFAULT).await;
            assert!(
                matches!(got, Err(FrameError::Truncated)),
                "cut {cut}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn truncated_over_duplex() {
        let f = encode_frame(&hello(), FRAME_LEN_MAX_DEFAULT).unwrap();
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&f[..f.len() - 1]).await.unwrap();
        drop(a);
        let got = read_frame::<TestMsg, _>(&mut b, FRAME_LEN_MAX_DEFAULT).await;
        assert!(matches!(got, Err(FrameError::Truncated)), "{got:?}");
    }

    #[tokio::test]
    async fn oversized_prefix_fails_before_the_body_arrives() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // Header only, writer kept open: reading the body would hang, so this proves
        // the length is judged first.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        a.write_all(&[0; 4]).await.unwrap();
        let got = read_frame::<TestMsg, _>(&mut b, FRAME_LEN_MAX_DEFAULT).await;
        assert!(matches!(got, Err(FrameError::TooLarge { .. })), "{got:?}");
        drop(a);
    }

    #[tokio::test]
    async fn corrupt_body_in_stream_is_checksum() {
        let mut f = encode_frame(&hello(), FRAME_LEN_MAX_DEFAULT).unwrap();
        *f.last_mut().unwrap() ^= 1;
        let got = read_frame::<TestMsg, _>(&mut &f[..], FRAME_LEN_MAX_DEFAULT).await;
        assert!(matches!(got, Err(FrameError::Checksum)), "{got:?}");
    }

    #[tokio::test]
    async fn write_refuses_oversized_message_and_writes_nothing() {
        let mut out = Vec::new();
        let got = write_frame(&mut out, &TestMsg::Data(vec![0; 100]), 10).await;
        assert!(matches!(got, Err(FrameError::TooLarge { .. })), "{got:?}");
        assert!(out.is_empty());
    }

    /// A budget that records every reservation.
    #[derive(Default)]
    struct Recording(Vec<usize>);

    impl ReadBudget for Recording {
        async fn reserve(&mut self, bytes: usize) {
            self.0.push(bytes);
        }
    }

    #[tokio::test]
    async fn a_body_is_reserved_chunk_by_chunk_before_it_is_read() {
        let msg = TestMsg::Data(vec![5; 150_000]);
        let f = encode_frame(&msg, FRAME_LEN_MAX_DEFAULT).unwrap();
        let mut budget = Recording::default();
        let got =
            read_frame_within::<TestMsg, _, _>(&mut &f[..], FRAME_LEN_MAX_DEFAULT, &mut budget)
                .await
                .unwrap();
        assert_eq!(got, Some(msg));
        assert_eq!(budget.0.iter().sum::<usize>(), f.len() - FRAME_HEADER_LEN);
        assert!(
            budget.0.iter().all(|&n| n <= READ_CHUNK_LEN),
            "{:?}",
            budget.0
        );
        // A frame refused from its header reserves nothing.
        let mut budget = Recording::default();
        let got = read_frame_within::<TestMsg, _, _>(&mut &f[..], 1_000, &mut budget).await;
        assert!(matches!(got, Err(FrameError::TooLarge { .. })), "{got:?}");
        assert!(budget.0.is_empty());
    }

    struct FailingReader;

    impl AsyncRead for FailingReader {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::Error::other("boom")))
        }
    }

    #[tokio::test]
    async fn io_error_is_io() {
        let got = read_frame::<TestMsg, _>(&mut FailingReader, FRAME_LEN_MAX_DEFAULT).await;
        assert!(matches!(got, Err(FrameError::Io(_))), "{got:?}");
    }
}
