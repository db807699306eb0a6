//! DERP v2 framing: every protocol constant, named once, with its layout.
//!
//! A frame is `type(1) ‖ length(4, big-endian, excludes this 5-byte header) ‖ payload`.

use bytes::{BufMut, Bytes, BytesMut};

/// Sent in the ServerKey frame before the server's public key: "DERP🔑".
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
/// Protocol version spoken by this relay (ClientInfo/ServerInfo `version`, `Derp-Version` header).
pub const PROTOCOL_VERSION: u32 = 2;
/// type(1) ‖ length(4).
pub const HEADER_LEN: usize = 5;
/// Raw X25519 public key.
pub const KEY_LEN: usize = 32;
/// NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// Largest packet a client may send, counted after the key fields.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Clients treat any frame over this size as fatal.
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// Bounds on the ClientInfo payload: key(32) ‖ nonce(24) ‖ box; the box is at most 256 KiB.
pub const CLIENT_INFO_MIN: usize = KEY_LEN + NONCE_LEN;
pub const CLIENT_INFO_MAX: usize = 256 << 10;
/// Ping payloads: 8 bytes of data, larger pings are tolerated up to this size (only 8 are echoed).
pub const PING_LEN: usize = 8;
pub const PING_MAX: usize = 1000;
/// Restarting payload: reconnect-in ms (u32 BE) ‖ try-for ms (u32 BE).
pub const RESTARTING_LEN: usize = 8;
/// PeerPresent payload: key(32) ‖ ip(16, IPv4-mapped) ‖ port(2, BE) ‖ flags(1).
pub const PEER_PRESENT_LEN: usize = KEY_LEN + 16 + 2 + 1;
/// Disco packets start with "TS💬" and are at least this long; their loss is answered with PeerGone(not here).
pub const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
pub const DISCO_MIN_LEN: usize = 62;

/// Frame types. Direction and payload layout are in each comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// S→C: MAGIC(8) ‖ server public key(32). First frame on every connection.
    ServerKey = 0x01,
    /// C→S: client public key(32) ‖ nonce(24) ‖ box(JSON ClientInfo). Second frame.
    ClientInfo = 0x02,
    /// S→C: nonce(24) ‖ box(JSON ServerInfo). Third frame.
    ServerInfo = 0x03,
    /// C→S: destination key(32) ‖ packet.
    SendPacket = 0x04,
    /// S→C: source key(32) ‖ packet. Same length as SendPacket, so forwarding rewrites in place.
    RecvPacket = 0x05,
    /// S→C: empty. Sent at least every 60 s.
    KeepAlive = 0x06,
    /// C→S: 1 byte, 0 or 1: whether this is the client's home relay.
    NotePreferred = 0x07,
    /// S→C: key(32) ‖ reason(1). Reasons: [`PEER_GONE_DISCONNECTED`], [`PEER_GONE_NOT_HERE`].
    PeerGone = 0x08,
    /// S→watcher: key(32) ‖ ip(16) ‖ port(2) ‖ flags(1); older relays send 32 or 50 bytes.
    PeerPresent = 0x09,
    /// mesh→S: source key(32) ‖ destination key(32) ‖ packet. Never re-forwarded.
    ForwardPacket = 0x0a,
    /// mesh→S: empty. Subscribe to PeerPresent/PeerGone for every local client. Needs the mesh key.
    WatchConns = 0x10,
    /// mesh→S: key(32). Close every local connection of that key. Needs the mesh key.
    ClosePeer = 0x11,
    /// both: 8 bytes of data.
    Ping = 0x12,
    /// both: the 8 bytes of the Ping being answered.
    Pong = 0x13,
    /// S→C: UTF-8 problem text; empty means healthy again.
    Health = 0x14,
    /// S→C: reconnect-in ms (u32 BE) ‖ try-for ms (u32 BE). Sent on graceful shutdown.
    Restarting = 0x15,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0a => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// PeerGone reason: the peer's last connection to the region closed.
pub const PEER_GONE_DISCONNECTED: u8 = 0;
/// PeerGone reason: a packet (disco) was sent to a key this relay does not know.
pub const PEER_GONE_NOT_HERE: u8 = 1;

/// PeerPresent flags.
pub const PEER_PRESENT_REGULAR: u8 = 1;
pub const PEER_PRESENT_MESH_PEER: u8 = 2;
pub const PEER_PRESENT_PROBER: u8 = 4;
pub const PEER_PRESENT_NOT_IDEAL: u8 = 8;

/// Reads a frame header: (type byte, payload length). `None` if fewer than 5 bytes are available.
#[inline]
pub fn read_header(buf: &[u8]) -> Option<(u8, u32)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    Some((buf[0], u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]])))
}

#[inline]
pub fn put_header(out: &mut BytesMut, frame_type: FrameType, len: usize) {
    out.put_u8(frame_type as u8);
    out.put_u32(len as u32);
}

/// A whole frame with the given payload parts, in one allocation.
pub fn encode(frame_type: FrameType, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(HEADER_LEN + len);
    put_header(&mut out, frame_type, len);
    for p in parts {
        out.put_slice(p);
    }
    out.freeze()
}

pub fn server_key(public_key: &[u8; KEY_LEN]) -> Bytes {
    encode(FrameType::ServerKey, &[&MAGIC, public_key])
}

pub fn keep_alive() -> Bytes {
    encode(FrameType::KeepAlive, &[])
}

pub fn peer_gone(key: &[u8; KEY_LEN], reason: u8) -> Bytes {
    encode(FrameType::PeerGone, &[key, &[reason]])
}

/// PeerPresent in its current 51-byte form. `ip` is IPv4-mapped for IPv4 peers.
pub fn peer_present(key: &[u8; KEY_LEN], ip: &[u8; 16], port: u16, flags: u8) -> Bytes {
    encode(FrameType::PeerPresent, &[key, ip, &port.to_be_bytes(), &[flags]])
}

pub fn pong(data: &[u8; PING_LEN]) -> Bytes {
    encode(FrameType::Pong, &[data])
}

pub fn ping(data: &[u8; PING_LEN]) -> Bytes {
    encode(FrameType::Ping, &[data])
}

pub fn health(problem: &str) -> Bytes {
    encode(FrameType::Health, &[problem.as_bytes()])
}

pub fn restarting(reconnect_in_ms: u32, try_for_ms: u32) -> Bytes {
    encode(
        FrameType::Restarting,
        &[&reconnect_in_ms.to_be_bytes(), &try_for_ms.to_be_bytes()],
    )
}

pub fn send_packet(dst: &[u8; KEY_LEN], packet: &[u8]) -> Bytes {
    encode(FrameType::SendPacket, &[dst, packet])
}

pub fn recv_packet(src: &[u8; KEY_LEN], packet: &[u8]) -> Bytes {
    encode(FrameType::RecvPacket, &[src, packet])
}

pub fn forward_packet(src: &[u8; KEY_LEN], dst: &[u8; KEY_LEN], packet: &[u8]) -> Bytes {
    encode(FrameType::ForwardPacket, &[src, dst, packet])
}

pub fn watch_conns() -> Bytes {
    encode(FrameType::WatchConns, &[])
}

pub fn close_peer(key: &[u8; KEY_LEN]) -> Bytes {
    encode(FrameType::ClosePeer, &[key])
}

pub fn note_preferred(preferred: bool) -> Bytes {
    encode(FrameType::NotePreferred, &[&[preferred as u8]])
}

/// Whether a packet payload is a disco message (its loss is reported to the sender).
#[inline]
pub fn is_disco(packet: &[u8]) -> bool {
    packet.len() >= DISCO_MIN_LEN && packet[..DISCO_MAGIC.len()] == DISCO_MAGIC
}

/// Copies a 32-byte key out of a slice that is known to be long enough.
#[inline]
pub fn key_at(buf: &[u8], offset: usize) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&buf[offset..offset + KEY_LEN]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let f = encode(FrameType::Ping, &[&[1, 2, 3, 4, 5, 6, 7, 8]]);
        assert_eq!(&f[..5], &[0x12, 0, 0, 0, 8]);
        assert_eq!(read_header(&f), Some((0x12, 8)));
        assert_eq!(read_header(&f[..4]), None);
    }

    #[test]
    fn magic_is_derp_key_emoji() {
        assert_eq!(&MAGIC[..4], b"DERP");
        assert_eq!(std::str::from_utf8(&MAGIC[4..]).unwrap(), "🔑");
        let f = server_key(&[7u8; 32]);
        assert_eq!(f.len(), 5 + 8 + 32);
        assert_eq!(&f[5..13], &MAGIC);
    }

    #[test]
    fn send_and_recv_packet_have_the_same_length() {
        let p = [9u8; 100];
        assert_eq!(send_packet(&[1; 32], &p).len(), recv_packet(&[2; 32], &p).len());
    }

    #[test]
    fn peer_present_is_51_bytes() {
        let f = peer_present(&[1; 32], &[0; 16], 443, PEER_PRESENT_REGULAR);
        assert_eq!(read_header(&f), Some((0x09, 51)));
        assert_eq!(&f[5 + 48..5 + 50], &443u16.to_be_bytes());
    }

    #[test]
    fn restarting_layout() {
        let f = restarting(1000, 30000);
        assert_eq!(&f[5..], &[0, 0, 3, 0xe8, 0, 0, 0x75, 0x30]);
    }

    #[test]
    fn disco_detection() {
        let mut p = vec![0u8; 62];
        p[..6].copy_from_slice(&DISCO_MAGIC);
        assert!(is_disco(&p));
        assert!(!is_disco(&p[..61]));
        p[0] = 0;
        assert!(!is_disco(&p));
    }

    #[test]
    fn frame_types_round_trip() {
        for b in 0u8..=0xff {
            if let Some(t) = FrameType::from_u8(b) {
                assert_eq!(t as u8, b);
            }
        }
        assert_eq!(FrameType::from_u8(0x0b), None);
    }
}
