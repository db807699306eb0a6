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
    /// Whether a read that fills all the room it was given makes the next buffer a big one. Off for
    /// client connections: reading them in small pieces paces each sender to what the relay can
    /// write, where reading ahead only fills receivers' queues with packets that are then dropped
    /// (measured: 90 % loss with unpaced senders). On for mesh links, one stream carrying many
    /// senders' packets already paced by the peer relay: a full-size read takes ~40 packets at once.
    bulk: bool,
    /// The last read filled all the room it was given: more was probably waiting in the socket.
    busy: bool,
}

impl FrameReader {
    /// `head` is whatever was already read past the HTTP request or response (fast start).
    pub fn new(inner: Reader, head: &[u8]) -> FrameReader {
        let mut buf = BytesMut::with_capacity(IDLE_READ_BUF.max(head.len()));
        buf.extend_from_slice(head);
        FrameReader {
            inner,
            buf,
            bulk: false,
            busy: false,
        }
    }

    /// Reads ahead in big pieces while data keeps coming (see `bulk`): for mesh links.
    pub fn set_bulk(&mut self, bulk: bool) {
        self.bulk = bulk;
    }

    async fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.buf.len() < need {
            if self.buf.capacity() - self.buf.len() < 1024 || need > self.buf.capacity() {
                let target = if (self.bulk && self.busy) || self.buf.capacity() >= IDLE_READ_BUF {
                    BUSY_READ_BUF
                } else {
                    IDLE_READ_BUF
                };
                self.buf.reserve(target.max(need - self.buf.len()));
            }
            let room = self.buf.capacity() - self.buf.len();
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.busy = n == room;
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    /// A stream with everything already waiting (like a socket receive queue that a peer relay
    /// filled), counting the reads it serves.
    struct Waiting {
        data: Bytes,
        reads: Arc<AtomicUsize>,
    }

    impl AsyncRead for Waiting {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.reads.fetch_add(1, Relaxed);
            let n = buf.remaining().min(self.data.len());
            let chunk = self.data.split_to(n);
            buf.put_slice(&chunk);
            Poll::Ready(Ok(()))
        }
    }

    /// Reads 1 000 forwarded 1400-byte packets that are all waiting; returns the reads it took.
    async fn reads_for_waiting_packets(bulk: bool) -> usize {
        let packet = [7u8; 1400];
        let mut data = BytesMut::new();
        for _ in 0..1000 {
            data.extend_from_slice(&frame::forward_packet(&[1; 32], &[2; 32], &packet));
        }
        let reads = Arc::new(AtomicUsize::new(0));
        let stream = Waiting {
            data: data.freeze(),
            reads: reads.clone(),
        };
        let mut reader = FrameReader::new(Box::new(stream), &[]);
        reader.set_bulk(bulk);
        for _ in 0..1000 {
            let (_, f) = reader.read_frame(64 << 10).await.unwrap();
            assert_eq!(f.len(), HEADER_LEN + 64 + 1400);
        }
        reads.load(Relaxed)
    }

    #[tokio::test]
    async fn a_busy_mesh_link_is_read_in_big_pieces() {
        // ~1.47 MB waiting: 64 KiB reads take ~25 of them (one per ~44 packets).
        let bulk = reads_for_waiting_packets(true).await;
        assert!(bulk <= 40, "bulk reader took {bulk} reads for 1000 packets");
    }

    #[tokio::test]
    async fn a_client_connection_is_read_in_small_pieces() {
        // Client connections stay on small reads even when busy: that paces unpaced senders to what
        // the relay writes (reading ahead only overfills receivers' queues).
        let client = reads_for_waiting_packets(false).await;
        assert!(client >= 500, "client reader took only {client} reads for 1000 packets");
    }
}
