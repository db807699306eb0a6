//! The frame test vectors shared with the TypeScript client (`test/vectors/frames.json`), run
//! through the core's client-side decoding: `io::FrameReader` reassembles the chunks, and
//! `client::decode_server_frame` turns each frame into a message.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use derpmesh_relay::client::{decode_server_frame, ServerFrame};
use derpmesh_relay::frame::{MAX_FRAME_SIZE, PEER_GONE_DISCONNECTED, PEER_GONE_NOT_HERE};
use derpmesh_relay::io::FrameReader;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, ReadBuf};

/// The vectors file, found from this crate's directory (`native/relay`).
fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/vectors/frames.json")
}

/// A stream that hands out the given chunks one read at a time (a chunk bigger than the reader's
/// room is served over several reads), then ends.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.0.front_mut() {
            let n = buf.remaining().min(chunk.len());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.0.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn from_hex(text: &str) -> Vec<u8> {
    hex::decode(text.replace(' ', "")).unwrap_or_else(|e| panic!("bad hex {text:?}: {e}"))
}

/// A 16-byte address as the TypeScript client writes it: dotted quad when IPv4-mapped.
fn ip_text(ip: [u8; 16]) -> String {
    let ip = Ipv6Addr::from(ip);
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => ip.to_string(),
    }
}

/// A decoded frame in the vectors' message form (the TypeScript client's `ServerMessage`).
fn message(frame: ServerFrame) -> Value {
    match frame {
        ServerFrame::Packet { src, data } => {
            json!({"type": "packet", "source": hex::encode(src), "data": hex::encode(data)})
        }
        ServerFrame::KeepAlive => json!({"type": "keepAlive"}),
        ServerFrame::Ping(data) => json!({"type": "ping", "data": hex::encode(data)}),
        ServerFrame::Pong(data) => json!({"type": "pong", "data": hex::encode(data)}),
        ServerFrame::PeerGone { key, reason } => {
            let reason = match reason {
                PEER_GONE_DISCONNECTED => json!("disconnected"),
                PEER_GONE_NOT_HERE => json!("notHere"),
                other => json!(other),
            };
            json!({"type": "peerGone", "key": hex::encode(key), "reason": reason})
        }
        ServerFrame::PeerPresent { key, ip, port, flags } => {
            let info = match ip {
                Some(ip) => json!({"ip": ip_text(ip), "port": port, "flags": flags}),
                None => json!({}),
            };
            json!({"type": "peerPresent", "key": hex::encode(key), "info": info})
        }
        ServerFrame::Health(problem) => json!({"type": "health", "problem": problem}),
        ServerFrame::Restarting {
            reconnect_in_ms,
            try_for_ms,
        } => json!({"type": "restarting", "reconnectInMs": reconnect_in_ms, "tryForMs": try_for_ms}),
        ServerFrame::Other { frame_type, .. } => json!({"type": "ignored", "frameType": frame_type}),
    }
}

/// The expected message, with what this decoder cannot tell apart made equal: it reports the
/// flags byte missing from a 50-byte PeerPresent as 0.
fn expected_message(mut expected: Value) -> Value {
    if let Some(info) = expected.get_mut("info").and_then(Value::as_object_mut) {
        if info.contains_key("ip") && !info.contains_key("flags") {
            info.insert("flags".into(), json!(0));
        }
    }
    expected
}

/// How a run ended: bytes left toward an incomplete frame, or an error class of the vectors.
#[derive(Debug, PartialEq)]
enum End {
    Pending(usize),
    Error(&'static str),
}

/// Reads every frame from `chunks` and decodes it, as `DerpConn::recv` does.
async fn run(chunks: Vec<Vec<u8>>) -> (Vec<Value>, End) {
    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut reader = FrameReader::new(Box::new(Chunks(chunks.into())), &[]);
    let mut messages = Vec::new();
    let mut consumed = 0;
    loop {
        let (frame_type, frame) = match reader.read_frame(MAX_FRAME_SIZE).await {
            Ok(read) => read,
            // The input ended: whatever was not taken as a frame is pending.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (messages, End::Pending(total - consumed)),
            Err(_) => return (messages, End::Error("frameTooLarge")),
        };
        consumed += frame.len();
        match decode_server_frame(frame_type, frame) {
            Ok(decoded) => messages.push(message(decoded)),
            Err(_) => return (messages, End::Error("recvPacketTooShort")),
        }
    }
}

#[tokio::test]
async fn frame_vectors_decode_as_the_typescript_client_does() {
    let text = std::fs::read_to_string(vectors_path()).expect("test/vectors/frames.json");
    let file: Value = serde_json::from_str(&text).expect("frames.json is JSON");
    let vectors = file["vectors"].as_array().expect("a vectors array");
    assert!(!vectors.is_empty());
    for vector in vectors {
        let name = vector["name"].as_str().expect("a name");
        let chunks: Vec<Vec<u8>> = vector["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| from_hex(c.as_str().expect("hex chunk")))
            .collect();
        let expected: Vec<Value> = vector["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .cloned()
            .map(expected_message)
            .collect();
        let expected_end = match vector.get("error") {
            Some(error) => {
                let class = error.as_str().expect("error class");
                End::Error(match class {
                    "frameTooLarge" => "frameTooLarge",
                    "recvPacketTooShort" => "recvPacketTooShort",
                    other => panic!("{name}: unknown error class {other}"),
                })
            }
            None => End::Pending(vector["pending"].as_u64().expect("pending") as usize),
        };
        // As given, then the same stream cut differently: in one chunk, and one byte per chunk.
        let stream = chunks.concat();
        let cuts = [
            ("as given", chunks),
            ("in one chunk", vec![stream.clone()]),
            ("one byte per chunk", stream.iter().map(|&b| vec![b]).collect()),
        ];
        for (cut, chunks) in cuts {
            let (messages, end) = run(chunks).await;
            assert_eq!(messages, expected, "{name}, {cut}: messages");
            assert_eq!(end, expected_end, "{name}, {cut}: end of stream");
        }
    }
}
