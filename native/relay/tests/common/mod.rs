//! Shared by the integration tests: the small HTTP front a test relay sits behind.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads an HTTP request head (up to the blank line) and returns the bytes after it, which belong
/// to the DERP stream; `None` if the head does not arrive within 5 s or exceeds 16 KiB.
pub async fn read_request_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Bytes> {
    let mut buf = Vec::new();
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(Bytes::copy_from_slice(&buf[p + 4..]));
        }
        if buf.len() > 16 << 10 {
            return None;
        }
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}
