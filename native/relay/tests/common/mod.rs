//! Shared by the integration tests: the small HTTP front a test relay sits behind, and a relay
//! served by the core's own front (TLS with a certificate set) on a loopback port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::client::{DerpConn, ServerFrame};
use derpmesh_relay::keys::Key;
use derpmesh_relay::server::Server;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;

/// Reads an HTTP request head (up to the blank line) and returns the bytes after it, which belong
/// to the DERP stream; `None` if the head does not arrive within 5 s or exceeds 16 KiB.
#[allow(dead_code)] // the mesh tests' HTTP fronts use it, the core-front tests do not
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

/// Serves `server`'s front (TLS when it has a certificate) on a loopback port, every accepted
/// connection in a task of its own, for as long as the runtime runs; returns the address.
#[allow(dead_code)] // not every test file that includes this module serves a front
pub async fn serve_front(server: &Arc<Server>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front = server.front().clone();
    tokio::spawn(async move {
        while let Ok((tcp, remote)) = listener.accept().await {
            tokio::spawn(front.clone().serve(tcp, remote));
        }
    });
    addr
}

/// Sends `payload` from `a` to `b` (whose key is `b_key`) and waits up to 5 s for it to arrive.
#[allow(dead_code)] // the tests that exchange packets through a relay use it
pub async fn exchange(a: &mut DerpConn, b_key: &Key, b: &mut DerpConn, payload: &[u8]) {
    a.send_packet(b_key, payload).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ServerFrame::Packet { data, .. } => {
                assert_eq!(&data[..], payload);
                return;
            }
            _ => continue,
        }
    }
}
