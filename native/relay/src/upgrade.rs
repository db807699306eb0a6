//! Taking over an upgraded HTTP connection: the 101 response (or none, for fast start) and the
//! WebSocket transport, which carries the DERP byte stream in binary messages.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::frame::{MAX_PACKET_SIZE, PROTOCOL_VERSION};
use crate::io::{Reader, Writer};
use crate::keys::Key;

/// Any bidirectional byte stream (a bridged TLS socket, a test pipe).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The connection the relay takes over.
pub enum Transport {
    /// A TCP socket (taken from Node by file descriptor): the fast path.
    Tcp(TcpStream),
    /// Anything else, e.g. the stream bridge for TLS terminated in Node.
    Other(Box<dyn Stream>),
}

/// How the client asked to upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// `Upgrade: DERP`; `fast_start` = `Derp-Fast-Start: 1` (no HTTP response at all).
    Derp { fast_start: bool },
    /// `Upgrade: websocket` with the `derp` subprotocol; `accept` is the Sec-WebSocket-Accept value.
    WebSocket { accept: String },
}

pub fn derp_switching_protocols(server_key: &Key) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {PROTOCOL_VERSION}\r\nDerp-Public-Key: {}\r\n\r\n",
        hex::encode(server_key)
    )
}

fn websocket_switching_protocols(accept: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
    )
}

/// Splits the transport into halves for the reader and writer tasks. For WebSocket, writes the 101
/// and returns halves of a pipe pumped to and from WebSocket messages; `head` is consumed then.
pub async fn open(transport: Transport, upgrade: &Upgrade, head: &mut Bytes) -> std::io::Result<(Reader, Writer)> {
    match (transport, upgrade) {
        (Transport::Tcp(s), Upgrade::Derp { .. }) => {
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        (Transport::Other(s), Upgrade::Derp { .. }) => {
            let (r, w) = tokio::io::split(s);
            Ok((Box::new(r), Box::new(w)))
        }
        (Transport::Tcp(mut s), Upgrade::WebSocket { accept }) => {
            s.set_nodelay(true)?;
            s.write_all(websocket_switching_protocols(accept).as_bytes()).await?;
            Ok(websocket_pipe(s, std::mem::take(head)).await)
        }
        (Transport::Other(mut s), Upgrade::WebSocket { accept }) => {
            s.write_all(websocket_switching_protocols(accept).as_bytes()).await?;
            Ok(websocket_pipe(s, std::mem::take(head)).await)
        }
    }
}

/// Go clients (coder/websocket with its default read limit) reject messages over 32 KiB.
const MAX_WEBSOCKET_MESSAGE: usize = 32 << 10;

/// Bridges WebSocket messages to a byte stream: incoming binary messages are concatenated, outgoing
/// bytes are sent as binary messages as they come (a frame may span messages, a message may hold
/// several frames).
async fn websocket_pipe<S: Stream>(stream: S, head: Bytes) -> (Reader, Writer) {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(4 * MAX_PACKET_SIZE);
    config.max_frame_size = Some(4 * MAX_PACKET_SIZE);
    let ws = WebSocketStream::from_partially_read(stream, head.to_vec(), Role::Server, Some(config)).await;
    let (relay_side, ws_side) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        let (mut sink, mut source) = ws.split();
        let (mut from_relay, mut to_relay) = tokio::io::split(ws_side);
        let inbound = async {
            while let Some(Ok(msg)) = source.next().await {
                match msg {
                    Message::Binary(data) if to_relay.write_all(&data).await.is_err() => break,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = to_relay.shutdown().await;
        };
        let outbound = async {
            let mut buf = vec![0u8; MAX_WEBSOCKET_MESSAGE];
            loop {
                match from_relay.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink
                            .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        tokio::select! {
            _ = inbound => {}
            _ = outbound => {}
        }
    });
    let (r, w) = tokio::io::split(relay_side);
    (Box::new(r), Box::new(w))
}
