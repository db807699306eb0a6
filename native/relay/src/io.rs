//! Byte-stream plumbing shared by the relay, the client and the load generator:
//! boxed transport halves, an incremental frame reader, and batched vectored writes.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, HEADER_LEN};

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Read buffer of an idle connection; it grows while a connection is busy and shrinks back when idle,
/// so thousands of idle clients cost little memory.
const IDLE_READ_BUF: usize = 2 << 10;
const BUSY_READ_BUF: usize = 64 << 10;

/// Reads DERP frames from a byte stream. Frames come out as `BytesMut` holding header and payload,
/// split off the read buffer without copying, so a forwarder can rewrite them in place.
pub struct FrameReader {
    inner: Reader,
    buf: BytesMut,
}

impl FrameReader {
    /// `head` is whatever was already read past the HTTP request or response (fast start).
    pub fn new(inner: Reader, head: &[u8]) -> FrameReader {
        let mut buf = BytesMut::with_capacity(IDLE_READ_BUF.max(head.len()));
        buf.extend_from_slice(head);
        FrameReader { inner, buf }
    }

    async fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.buf.len() < need {
            if self.buf.capacity() - self.buf.len() < 1024 || need > self.buf.capacity() {
                let target = if self.buf.capacity() >= IDLE_READ_BUF {
                    BUSY_READ_BUF
                } else {
                    IDLE_READ_BUF
                };
                self.buf.reserve(target.max(need - self.buf.len()));
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Whether a whole frame header is already buffered (no read needed to see the next frame).
    pub fn has_header(&self) -> bool {
        self.buf.len() >= HEADER_LEN
    }

    /// Waits for the next frame header and returns (type byte, payload length) without consuming it.
    pub async fn next_header(&mut self) -> io::Result<(u8, usize)> {
        if self.buf.is_empty() && self.buf.capacity() > BUSY_READ_BUF {
            // Idle again after a burst: hand the big buffer back.
            self.buf = BytesMut::with_capacity(IDLE_READ_BUF);
        }
        self.fill(HEADER_LEN).await?;
        let (t, len) = frame::read_header(&self.buf).expect("header is buffered");
        Ok((t, len as usize))
    }

    /// Takes the frame whose header `next_header` returned: header and payload together.
    pub async fn take_frame(&mut self, payload_len: usize) -> io::Result<BytesMut> {
        self.fill(HEADER_LEN + payload_len).await?;
        Ok(self.buf.split_to(HEADER_LEN + payload_len))
    }

    /// Discards a frame without buffering its payload (unknown types may be large).
    pub async fn skip_frame(&mut self, payload_len: usize) -> io::Result<()> {
        let mut left = HEADER_LEN + payload_len;
        loop {
            let n = left.min(self.buf.len());
            self.buf.advance(n);
            left -= n;
            if left == 0 {
                return Ok(());
            }
            self.fill(1).await?;
        }
    }

    /// Reads one whole frame whose payload must not exceed `max_payload`.
    pub async fn read_frame(&mut self, max_payload: usize) -> io::Result<(u8, BytesMut)> {
        let (t, len) = self.next_header().await?;
        if len > max_payload {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame type {t:#04x} of {len} bytes exceeds {max_payload}"),
            ));
        }
        Ok((t, self.take_frame(len).await?))
    }
}

/// Writes every buffer with as few syscalls as the transport allows.
pub async fn write_all_vectored(w: &mut Writer, bufs: &mut Vec<Bytes>) -> io::Result<()> {
    // Linux accepts up to 1024 (IOV_MAX); a mesh link drains hundreds of packets per wakeup.
    const MAX_SLICES: usize = 512;
    let mut first = 0;
    while first < bufs.len() {
        // The slice array lives only inside poll (on the stack), never in the future: an idle
        // connection's writer task stays small.
        let mut n = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slot, b) in slices.iter_mut().zip(&bufs[first..]) {
                *slot = IoSlice::new(b);
                count += 1;
            }
            std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = bufs[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bufs[first].advance(n);
                n = 0;
            }
        }
    }
    bufs.clear();
    w.flush().await
}

/// Writes one buffer fully.
pub async fn write_all(w: &mut Writer, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}
