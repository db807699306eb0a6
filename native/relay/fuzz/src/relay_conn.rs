//! The relay's side of one DERP connection, end to end (`conn::serve` over an in-memory stream):
//! the ServerKey, the ClientInfo it reads and opens, then the frame loop with routing to itself,
//! to a mesh forwarder and to nowhere, pings, preferences, watches and ClosePeer.
//!
//! Input: `flags ‖ client bytes`. Flags:
//! - bit 0 (`RAW`): the client bytes are the whole stream after the upgrade, ClientInfo included
//!   (a recorded client's ClientInfo opens: it was sealed to this relay's fixed key). Otherwise the
//!   harness sends a valid ClientInfo first and the bytes are the frames after it;
//! - bit 1: fast start (no 101); bit 2: the ClientInfo carries the mesh key; bit 3: a mesh
//!   forwarder for [`PEER`]; bit 4: a Health problem is set; bit 5: the client is a prober;
//! - bit 6: the first bytes arrive with the upgrade request (the `head` conn::serve is given);
//! - bit 7: per-client queue of 1 packet instead of 16.
//!
//! Invariants: the relay's output is its 101 (unless fast start), its ServerKey, ServerInfo and
//! then only well-formed relay-to-client frames; with the harness's ClientInfo the handshake
//! succeeds, every Ping is answered by one Pong with its data, in order (up to where the relay
//! closed the connection), packets to itself come back unchanged and in order (disco and other
//! packets each in their order; some may be dropped and are then counted), packets to the mesh
//! peer reach its forwarder as the exact ForwardPacket, PeerGone goes only to disco packets for
//! absent keys, a connection ends with a protocol error or a permission refusal exactly when the
//! client's frames call for it, and every gauge is back to zero once the connection is gone.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::conn;
use derpmesh_relay::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE, PING_LEN, PING_MAX};
use derpmesh_relay::outbox::{Enqueued, OutFrame};
use derpmesh_relay::relay::{Forwarder, Relay, RelayConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    block_on, check_server_stream, client_info, client_public, is_subsequence, remote, server_keys, MESH_KEY, PEER,
};

const RAW: u8 = 1;
const FAST_START: u8 = 2;
pub(crate) const MESH: u8 = 4;
pub(crate) const FORWARDER: u8 = 8;
const HEALTH: u8 = 16;
pub(crate) const PROBER: u8 = 32;
const IN_HEAD: u8 = 64;
const SMALL_QUEUE: u8 = 128;

pub const HEALTH_TEXT: &str = "fuzz: mesh link to a peer is down";

/// A mesh link that records what it is asked to forward.
#[derive(Default)]
pub(crate) struct Recorder(Mutex<Vec<Bytes>>);

impl Forwarder for Recorder {
    fn link_id(&self) -> u64 {
        7
    }

    fn forward(&self, f: OutFrame) -> Enqueued {
        let mut whole = f.head.to_vec();
        whole.extend_from_slice(&f.tail);
        self.0.lock().unwrap().push(whole.into());
        Enqueued::Queued
    }
}

pub fn run(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let fast_start = flags & FAST_START != 0;
    let relay = Relay::new(
        server_keys().clone(),
        RelayConfig {
            queue_depth: if flags & SMALL_QUEUE != 0 { 1 } else { 16 },
            disco_queue_depth: 2,
            ..RelayConfig::default()
        },
    );
    relay.set_mesh_key(Some(MESH_KEY.into()));
    if flags & HEALTH != 0 {
        relay.set_health(HEALTH_TEXT);
    }
    let recorder = Arc::new(Recorder::default());
    if flags & FORWARDER != 0 {
        relay.add_forwarder(PEER, recorder.clone());
    }
    let mut stream = Vec::with_capacity(input.len() + 200);
    if flags & RAW == 0 {
        stream.extend_from_slice(client_info(flags & MESH != 0, flags & PROBER != 0));
    }
    stream.extend_from_slice(input);
    let head_len = if flags & IN_HEAD != 0 { stream.len().min(64) } else { 0 };
    let out = exchange(&relay, &stream, head_len, Upgrade::Derp { fast_start });
    let seen = check_server_stream(&out, !fast_start);
    check_gauges(&relay);
    if flags & RAW != 0 {
        return;
    }
    assert!(seen.server_info, "the harness's ClientInfo was refused");
    let mut frames = &seen.frames[..];
    if flags & HEALTH != 0 {
        assert!(
            matches!(frames.first(), Some((0x14, p)) if p == HEALTH_TEXT.as_bytes()),
            "no Health frame after ServerInfo"
        );
        frames = &frames[1..];
    }
    check_frames(&relay, input, frames, &recorder, flags);
}

/// Checks what the relay sent after ServerInfo (and Health) against the client's frames after its
/// ClientInfo. `flags` as for this target (MESH, PROBER and FORWARDER are used).
pub(crate) fn check_frames(
    relay: &Relay,
    client_frames: &[u8],
    frames: &[(u8, Bytes)],
    recorder: &Recorder,
    flags: u8,
) {
    let m = model(client_frames, flags & MESH != 0, flags & FORWARDER != 0);
    check_against_model(relay, &m, frames, &recorder.0.lock().unwrap(), flags);
}

/// Runs `conn::serve` over an in-memory stream, sends `stream` (its first `head_len` bytes as the
/// bytes read with the request), half-closes, and returns all the relay wrote.
pub fn exchange(relay: &Arc<Relay>, stream: &[u8], head_len: usize, upgrade: Upgrade) -> Vec<u8> {
    let (head, rest) = stream.split_at(head_len);
    let head = Bytes::copy_from_slice(head);
    block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let serve = tokio::spawn(conn::serve(
            relay.clone(),
            Transport::Other(Box::new(server)),
            head,
            upgrade,
            remote(),
        ));
        let (mut r, mut w) = tokio::io::split(client);
        let send = async {
            // The relay may close first (a refused handshake, a protocol error): then writes fail.
            let _ = w.write_all(rest).await;
            // On a paused clock this returns once everything else is idle: the relay has handled
            // all it could and written all it had queued. Then EOF.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = w.shutdown().await;
        };
        let recv = async {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(send, recv);
        drop((r, w));
        tokio::time::timeout(Duration::from_secs(120), serve)
            .await
            .expect("conn::serve still running after the client's EOF and 120 virtual seconds")
            .expect("conn::serve panicked");
        out
    })
}

/// Every gauge is back to zero once the connection is gone.
pub fn check_gauges(relay: &Relay) {
    let m = &relay.metrics;
    for (name, g) in [
        ("connections", &m.connections),
        ("clients", &m.clients),
        ("home_connections", &m.home_connections),
        ("mesh_connections", &m.mesh_connections),
        ("watchers", &m.watchers),
    ] {
        assert_eq!(g.load(Relaxed), 0, "gauge {name} after the connection ended");
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    Eof,
    ProtocolError,
    PermissionDenied,
    /// ClosePeer of the client's own key: the relay closes it, and may still handle the frames
    /// already buffered behind it.
    ClosedItself,
}

/// What the relay must do with the client's frames (frame.rs, conn.rs `handle_frame`).
#[derive(Debug)]
struct Model {
    end: End,
    pings: Vec<[u8; PING_LEN]>,
    /// RecvPacket payloads (source ‖ packet) for the client itself, in order.
    to_self: Vec<Vec<u8>>,
    /// ForwardPacket frames for the mesh forwarder, in order.
    to_peer: Vec<Vec<u8>>,
    /// Keys that disco packets went to with nowhere to go.
    not_here: Vec<[u8; KEY_LEN]>,
    packets_received: u64,
    forwarded_in: u64,
    watched: bool,
}

fn model(mut b: &[u8], mesh: bool, forwarder: bool) -> Model {
    let me = *client_public();
    let mut m = Model {
        end: End::Eof,
        pings: Vec::new(),
        to_self: Vec::new(),
        to_peer: Vec::new(),
        not_here: Vec::new(),
        packets_received: 0,
        forwarded_in: 0,
        watched: false,
    };
    let end = loop {
        let Some((t, len)) = frame::read_header(b) else {
            break End::Eof;
        };
        let len = len as usize;
        let bad_len = match FrameType::from_u8(t) {
            Some(FrameType::SendPacket) => !(KEY_LEN..=KEY_LEN + MAX_PACKET_SIZE).contains(&len),
            Some(FrameType::ForwardPacket) if !mesh => break End::PermissionDenied,
            Some(FrameType::ForwardPacket) => !(2 * KEY_LEN..=2 * KEY_LEN + MAX_PACKET_SIZE).contains(&len),
            Some(FrameType::Ping) => !(PING_LEN..=PING_MAX).contains(&len),
            Some(FrameType::NotePreferred) => len != 1,
            Some(FrameType::WatchConns | FrameType::ClosePeer) if !mesh => break End::PermissionDenied,
            Some(FrameType::WatchConns) => len != 0,
            Some(FrameType::ClosePeer) => len != KEY_LEN,
            _ => false,
        };
        if bad_len {
            break End::ProtocolError;
        }
        if b.len() < HEADER_LEN + len {
            break End::Eof;
        }
        let p = &b[HEADER_LEN..HEADER_LEN + len];
        b = &b[HEADER_LEN + len..];
        match FrameType::from_u8(t) {
            Some(FrameType::SendPacket) => {
                m.packets_received += 1;
                let (dst, packet) = p.split_at(KEY_LEN);
                if dst == me {
                    m.to_self.push([&me[..], packet].concat());
                } else if forwarder && dst == PEER {
                    m.to_peer.push(frame::forward_packet(&me, &PEER, packet).to_vec());
                } else if frame::is_disco(packet) {
                    m.not_here.push(dst.try_into().expect("32 bytes"));
                }
            }
            Some(FrameType::ForwardPacket) => {
                m.packets_received += 1;
                m.forwarded_in += 1;
                let (src, rest) = p.split_at(KEY_LEN);
                let (dst, packet) = rest.split_at(KEY_LEN);
                if dst == me {
                    m.to_self.push([src, packet].concat());
                } else if frame::is_disco(packet) {
                    m.not_here.push(dst.try_into().expect("32 bytes"));
                }
            }
            Some(FrameType::Ping) => m.pings.push(p[..PING_LEN].try_into().expect("8 bytes")),
            Some(FrameType::WatchConns) => m.watched = true,
            Some(FrameType::ClosePeer) if p == me => break End::ClosedItself,
            _ => {}
        }
    };
    m.end = end;
    m
}

fn check_against_model(relay: &Relay, m: &Model, frames: &[(u8, Bytes)], forwarded: &[Bytes], flags: u8) {
    let metrics = &relay.metrics;
    let exact = m.end != End::ClosedItself;
    let pongs: Vec<&[u8]> = frames.iter().filter(|(t, _)| *t == 0x13).map(|(_, p)| &p[..]).collect();
    let pings: Vec<&[u8]> = m.pings.iter().map(|p| &p[..]).collect();
    let received: Vec<&[u8]> = frames.iter().filter(|(t, _)| *t == 0x05).map(|(_, p)| &p[..]).collect();
    let to_self: Vec<&[u8]> = m.to_self.iter().map(|p| &p[..]).collect();
    let to_peer: Vec<&[u8]> = m.to_peer.iter().map(|p| &p[..]).collect();
    let forwarded: Vec<&[u8]> = forwarded.iter().map(|p| &p[..]).collect();
    // Control frames are written in order and never dropped, but those still queued when the
    // connection closes are not written: the Pongs are a prefix of the answers due.
    assert!(
        pings.starts_with(&pongs),
        "Pongs {pongs:?} do not answer Pings {pings:?}"
    );
    // Disco packets have their own queue, written before the others: the order holds within each.
    for disco in [false, true] {
        let class = |v: &[&[u8]]| -> Vec<Vec<u8>> {
            v.iter()
                .filter(|p| frame::is_disco(&p[KEY_LEN..]) == disco)
                .map(|p| p.to_vec())
                .collect()
        };
        assert!(
            is_subsequence(&class(&received), &class(&to_self)),
            "RecvPackets (disco: {disco}) are not the packets sent to self, in order"
        );
    }
    assert!(
        is_subsequence(&forwarded, &to_peer),
        "forwarded frames are not the packets sent to the peer"
    );
    let dropped = metrics.packets_dropped_queue_full.load(Relaxed) + metrics.packets_dropped_gone.load(Relaxed);
    assert!(received.len() as u64 + dropped <= to_self.len() as u64);
    for (t, p) in frames {
        match *t {
            0x08 => {
                assert_eq!(
                    p[KEY_LEN],
                    frame::PEER_GONE_NOT_HERE,
                    "PeerGone(disconnected) with no peer"
                );
                let key: [u8; KEY_LEN] = p[..KEY_LEN].try_into().expect("32 bytes");
                assert!(
                    m.not_here.contains(&key),
                    "PeerGone(not here) for a key no disco packet went to"
                );
            }
            0x09 => {
                assert!(m.watched, "PeerPresent without WatchConns");
                assert_eq!(&p[..KEY_LEN], client_public(), "PeerPresent for another key");
                let flag = match (flags & MESH != 0, flags & PROBER != 0) {
                    (false, false) => frame::PEER_PRESENT_REGULAR,
                    (mesh, prober) => {
                        (mesh as u8 * frame::PEER_PRESENT_MESH_PEER) | (prober as u8 * frame::PEER_PRESENT_PROBER)
                    }
                };
                assert_eq!(p[frame::PEER_PRESENT_LEN - 1], flag, "PeerPresent flags");
            }
            0x14 => panic!("a Health frame other than the first"),
            _ => {}
        }
    }
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    assert_eq!(count(&metrics.handshake_failures), 0);
    if m.end == End::Eof {
        // The client's EOF came after the relay had gone idle: everything due was written.
        assert_eq!(pongs, pings, "every Ping is answered, in order");
        assert_eq!(
            received.len() as u64 + dropped,
            to_self.len() as u64,
            "packets to self lost uncounted"
        );
    }
    if exact {
        assert_eq!(
            forwarded, to_peer,
            "every packet for the mesh peer is forwarded, in order"
        );
        assert_eq!(count(&metrics.pings_received), m.pings.len() as u64);
        assert_eq!(count(&metrics.packets_received), m.packets_received);
        assert_eq!(count(&metrics.packets_forwarded_in), m.forwarded_in);
        assert_eq!(count(&metrics.packets_forwarded_out), m.to_peer.len() as u64);
        assert_eq!(
            count(&metrics.protocol_errors),
            u64::from(m.end == End::ProtocolError),
            "protocol error expected: {:?}",
            m.end
        );
        assert_eq!(
            count(&metrics.permission_denied),
            u64::from(m.end == End::PermissionDenied),
            "permission refusal expected: {:?}",
            m.end
        );
        assert_eq!(
            count(&metrics.packets_sent),
            to_self.len() as u64 - count(&metrics.packets_dropped_gone),
        );
        assert!(
            m.not_here.len() as u64 >= count(&metrics.peer_gone_not_here_sent),
            "more PeerGone(not here) than disco packets to absent keys"
        );
    }
}
