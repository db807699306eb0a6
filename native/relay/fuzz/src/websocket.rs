//! DERP over WebSocket (`conn::serve` with `Upgrade::WebSocket`: `upgrade.rs`'s 101 and message
//! pump over tokio-tungstenite), end to end over an in-memory stream.
//!
//! Input: `flags ‖ bytes`. Flags:
//! - bit 0 (`RAW`): `bytes` is the client's raw byte stream after its request head (WebSocket
//!   frames, masked or not, well-formed or not; a recorded client's ClientInfo opens, as in
//!   `relay_conn`). Bit 2: the first bytes arrive with the request head.
//! - otherwise a real WebSocket client (tungstenite) sends the harness's ClientInfo, then the
//!   messages `bytes` describes: a list of `op ‖ len ‖ len bytes`, op % 8 = 0–4 binary (DERP
//!   bytes), 5 ping, 6 text, 7 pong; then a Close. Bit 1: the ClientInfo carries the mesh key;
//!   bit 3: a mesh forwarder for the peer key.
//!
//! Invariants: the answer starts with the exact 101 (the accept value, the `derp` subprotocol);
//! the relay sends only unmasked binary messages (and control frames), none over 32 KiB (Go
//! clients' read limit); their concatenation is a valid relay-to-client DERP stream; with the real
//! client, the relay's frames answer the DERP bytes sent exactly as over TCP (`relay_conn`'s model).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::conn;
use derpmesh_relay::relay::{Relay, RelayConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::{block_on, check_server_stream, client_info, remote, server_keys, MESH_KEY, PEER};
use crate::relay_conn::{self, Recorder};

const RAW: u8 = 1;
const MESH: u8 = 2;
const IN_HEAD: u8 = 4;
const FORWARDER: u8 = 8;

/// `Sec-WebSocket-Accept` the relay is told to send (the value of RFC 6455's example key).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// upgrade.rs: the largest message a Go client reads.
const MAX_MESSAGE: usize = 32 << 10;

fn switching_protocols() -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
    )
}

fn upgrade() -> Upgrade {
    Upgrade::WebSocket { accept: ACCEPT.into() }
}

pub fn run(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let relay = Relay::new(
        server_keys().clone(),
        RelayConfig {
            queue_depth: 16,
            disco_queue_depth: 2,
            ..RelayConfig::default()
        },
    );
    relay.set_mesh_key(Some(MESH_KEY.into()));
    let recorder = Arc::new(Recorder::default());
    if flags & FORWARDER != 0 {
        relay.add_forwarder(PEER, recorder.clone());
    }
    if flags & RAW != 0 {
        let head_len = if flags & IN_HEAD != 0 { bytes.len().min(64) } else { 0 };
        let out = relay_conn::exchange(&relay, bytes, head_len, upgrade());
        let want = switching_protocols();
        assert!(out.starts_with(want.as_bytes()), "no 101 first");
        let derp = server_messages(&out[want.len()..]);
        check_server_stream(&derp, false);
        relay_conn::check_gauges(&relay);
        return;
    }
    let mesh = flags & MESH != 0;
    let (derp_sent, received) = client_exchange(&relay, client_info(mesh, false).clone(), bytes);
    let seen = check_server_stream(&received, false);
    relay_conn::check_gauges(&relay);
    assert!(seen.server_info, "the harness's ClientInfo was refused over WebSocket");
    let mut conn_flags = 0;
    if mesh {
        conn_flags |= relay_conn::MESH;
    }
    if flags & FORWARDER != 0 {
        conn_flags |= relay_conn::FORWARDER;
    }
    relay_conn::check_frames(&relay, &derp_sent, &seen.frames, &recorder, conn_flags);
}

/// Splits the relay's WebSocket byte stream into frames; returns the concatenated binary payloads.
fn server_messages(mut b: &[u8]) -> Vec<u8> {
    let mut derp = Vec::new();
    let mut continuing = false;
    let mut message = 0usize;
    while b.len() >= 2 {
        let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
        assert_eq!(b[0] & 0x70, 0, "reserved bits set");
        assert_eq!(b[1] & 0x80, 0, "a server frame is masked");
        let (len, at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
            126 | 127 => return derp,
            n => (usize::from(n), 2),
        };
        if b.len() < at + len {
            // Cut off by the end of the connection.
            return derp;
        }
        let payload = &b[at..at + len];
        b = &b[at + len..];
        match opcode {
            0 => assert!(continuing, "a continuation with no message"),
            2 => {
                assert!(!continuing, "a new message inside another");
                message = 0;
            }
            8..=10 => {
                assert!(fin && len <= 125, "a control frame fragmented or over 125 bytes");
                continue;
            }
            _ => panic!("the relay sent a WebSocket frame with opcode {opcode}"),
        }
        message += len;
        assert!(
            message <= MAX_MESSAGE,
            "a {message}-byte message (Go clients read at most 32 KiB)"
        );
        continuing = !fin;
        derp.extend_from_slice(payload);
    }
    derp
}

/// A tungstenite client: sends ClientInfo and the messages `program` describes, then Close.
/// Returns the DERP bytes it sent after ClientInfo and the DERP bytes it received.
fn client_exchange(relay: &Arc<Relay>, client_info: Bytes, mut program: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut messages = Vec::new();
    let mut derp_sent = Vec::new();
    while program.len() >= 2 {
        let (op, len) = (program[0], usize::from(program[1]) * 16 + usize::from(program[0] >> 3));
        let len = len.min(program.len() - 2);
        let body = &program[2..2 + len];
        program = &program[2 + len..];
        messages.push(match op % 8 {
            0..=4 => {
                derp_sent.extend_from_slice(body);
                Message::Binary(Bytes::copy_from_slice(body))
            }
            5 => Message::Ping(Bytes::copy_from_slice(&body[..body.len().min(125)])),
            6 => Message::text(String::from_utf8_lossy(body).into_owned()),
            _ => Message::Pong(Bytes::copy_from_slice(&body[..body.len().min(125)])),
        });
    }
    let received = block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let serve = tokio::spawn(conn::serve(
            relay.clone(),
            Transport::Other(Box::new(server)),
            Bytes::new(),
            upgrade(),
            remote(),
        ));
        let mut client = client;
        let mut head = Vec::new();
        let want = switching_protocols();
        while head.len() < want.len() {
            let mut chunk = [0u8; 512];
            let n = client.read(&mut chunk).await.expect("reading the 101");
            assert!(n > 0, "closed before the 101");
            head.extend_from_slice(&chunk[..n]);
        }
        assert!(head.starts_with(want.as_bytes()), "no 101 first");
        let leftover = head.split_off(want.len());
        // tungstenite zero-fills its read buffer up to its capacity before every read: its 128 KiB
        // default cost this harness more than the relay under test.
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = 16 << 10;
        let ws = WebSocketStream::from_partially_read(client, leftover, Role::Client, Some(config)).await;
        let (mut sink, mut source) = ws.split();
        let send = async move {
            if sink.send(Message::Binary(client_info)).await.is_err() {
                return;
            }
            for m in messages {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            // Close only once the relay is idle (paused clock): a relay that receives Close stops
            // sending, and what it still had to send is what is under test.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = sink.close().await;
        };
        let recv = async move {
            let mut got = Vec::new();
            while let Some(Ok(m)) = source.next().await {
                match m {
                    Message::Binary(b) => {
                        assert!(b.len() <= MAX_MESSAGE, "a {}-byte message", b.len());
                        got.extend_from_slice(&b);
                    }
                    Message::Text(_) => panic!("the relay sent a text message"),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        tokio::time::timeout(Duration::from_secs(120), serve)
            .await
            .expect("conn::serve still running 120 virtual seconds after the client closed")
            .expect("conn::serve panicked");
        got
    });
    (derp_sent, received)
}
