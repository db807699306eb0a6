//! Taking over an upgraded HTTP connection: the 101 response (or none, for fast start) and the
//! WebSocket transport, which carries the DERP byte stream in binary messages.

use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
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
    /// TLS terminated in the core (`tlsio`): its halves share no lock.
    Tls(Box<crate::tlsio::TlsStream>),
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

/// Why a connection could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// `dup` of the caller's descriptor failed (e.g. out of descriptors, or not a descriptor).
    #[error("cannot duplicate socket descriptor {fd}: {source}")]
    Duplicate { fd: i32, source: std::io::Error },
    #[error("cannot set descriptor non-blocking: {0}")]
    NonBlocking(std::io::Error),
    /// Descriptor hand-over needs Unix; elsewhere the caller uses a [`Bridge`].
    #[error("descriptor hand-over is not available on this platform; use a bridge")]
    Unsupported,
    /// Connections are served by tasks: the call must happen inside a tokio runtime.
    #[error("serving a connection needs a tokio runtime, and none is running on this thread")]
    NoRuntime,
}

/// The runtime of the calling thread, which serves the connections it hands over.
pub(crate) fn runtime() -> Result<Handle, UpgradeError> {
    Handle::try_current().map_err(|_| UpgradeError::NoRuntime)
}

/// The client's address as Node reports it (`1.2.3.4`, `::ffff:1.2.3.4`, `::1`); an address that
/// does not parse counts as unspecified (0.0.0.0): it is only reported to watchers.
pub fn remote_addr(address: &str, port: u16) -> SocketAddr {
    let ip = address
        .trim_start_matches("::ffff:")
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([0u8; 4]));
    SocketAddr::new(ip, port)
}

/// A TCP socket of its own for the caller's descriptor `fd` (duplicated, so the caller closes its
/// handle afterwards), non-blocking. Register it with the runtime inside the runtime
/// (`TcpStream::from_std`).
#[cfg(unix)]
pub fn dup_tcp_stream(fd: i32) -> Result<std::net::TcpStream, UpgradeError> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl only duplicates the descriptor; the copy is owned by the TcpStream below.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(UpgradeError::Duplicate {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `copy` is a fresh descriptor we own.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(copy) };
    stream.set_nonblocking(true).map_err(UpgradeError::NonBlocking)?;
    Ok(stream)
}

#[cfg(not(unix))]
pub fn dup_tcp_stream(_fd: i32) -> Result<std::net::TcpStream, UpgradeError> {
    Err(UpgradeError::Unsupported)
}

/// The caller's end of a connection whose bytes the caller carries (TLS terminated in Node,
/// Windows): [`Bridge::push`] what the socket reads, write to the socket what [`Bridge::read`]
/// yields. The relay's end is a [`Transport::Other`].
pub struct Bridge {
    input: std::sync::Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    output: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

impl Bridge {
    /// A bridge and the relay's end of it; the pumps between them run on `runtime`.
    pub fn open(runtime: &Handle) -> (Bridge, Transport) {
        let (relay_side, caller_side) = tokio::io::duplex(256 << 10);
        let (mut from_relay, mut to_relay) = tokio::io::split(caller_side);
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        runtime.spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if to_relay.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = to_relay.shutdown().await;
        });
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
        runtime.spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from_relay.read(&mut buf).await {
                if n == 0 || out_tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    break;
                }
            }
        });
        let bridge = Bridge {
            input: std::sync::Mutex::new(Some(tx)),
            output: tokio::sync::Mutex::new(out_rx),
        };
        (bridge, Transport::Other(Box::new(relay_side)))
    }

    /// Bytes the client sent.
    pub fn push(&self, data: Bytes) {
        if let Some(tx) = &*self.input.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(data);
        }
    }

    /// The client closed its side.
    pub fn end(&self) {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Next bytes to send to the client; `None` once the relay closed the connection.
    pub async fn read(&self) -> Option<Bytes> {
        self.output.lock().await.recv().await
    }
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
        (Transport::Tls(s), Upgrade::Derp { .. }) => {
            let (r, w) = (*s).into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        (Transport::Tls(mut s), Upgrade::WebSocket { accept }) => {
            s.write_all(websocket_switching_protocols(accept).as_bytes()).await?;
            Ok(websocket_pipe(s, std::mem::take(head)).await)
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

/// What tungstenite reads from a WebSocket connection at once.
const WEBSOCKET_READ_BUFFER: usize = 16 << 10;

/// Bridges WebSocket messages to a byte stream: incoming binary messages are concatenated, outgoing
/// bytes are sent as binary messages as they come (a frame may span messages, a message may hold
/// several frames).
async fn websocket_pipe<S: Stream>(stream: S, head: Bytes) -> (Reader, Writer) {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(4 * MAX_PACKET_SIZE);
    config.max_frame_size = Some(4 * MAX_PACKET_SIZE);
    // tungstenite's default (128 KiB) is a buffer per connection that it zero-fills up to its
    // capacity before every read: 16 KiB holds a TLS record's worth of messages.
    config.read_buffer_size = WEBSOCKET_READ_BUFFER;
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
            // Read straight into the message's buffer (not zero-filled, not copied again); once
            // tungstenite has written a message, its memory is reused for the next.
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(MAX_WEBSOCKET_MESSAGE);
                let mut chunk = (&mut from_relay).take(MAX_WEBSOCKET_MESSAGE as u64);
                match chunk.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if sink.send(Message::Binary(buf.split().freeze())).await.is_err() {
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
