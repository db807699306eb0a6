//! The client's side of a relay's bytes, as a mesh link reads a peer relay (and the load
//! generator and tests read a relay): the HTTP upgrade response head (`client::parse_response_head`),
//! the handshake (`handshake::client_handshake`), then frames (`FrameReader::read_frame` and
//! `client::decode_server_frame`, what `DerpConn::recv` does).
//!
//! Input: `flags ‖ bytes the relay sends`. Bit 0: the response head is skipped, as with fast start
//! (a recorded ServerInfo opens: it was sealed to the fixed client key, see `capture/`).
//!
//! Invariants: a parsed response head has the status and headers its text has; a decoded frame is
//! the frame's bytes — the packet and its source, ping data, PeerGone reason (0 when absent),
//! PeerPresent address, port and flags, Health text, Restarting times, or the whole payload for
//! unknown and too short frames — and re-encodes to the same bytes where an encoder exists; only a
//! RecvPacket shorter than its key is an error.

use bytes::BytesMut;
use derpmesh_relay::client::{decode_server_frame, parse_response_head, ServerFrame};
use derpmesh_relay::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, PING_LEN};
use derpmesh_relay::handshake::{client_handshake, ClientInfo};
use derpmesh_relay::io::{FrameReader, Writer};

use crate::common::{block_on, client_keys, Chunked, Rng};

const NO_HEAD: u8 = 1;

pub fn run(data: &[u8]) {
    let Some((&flags, mut b)) = data.split_first() else {
        return;
    };
    if flags & NO_HEAD == 0 {
        let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
            // No complete head: the response-head parser still must not fail on any prefix.
            let _ = parse_response_head(b);
            return;
        };
        check_head(&b[..end + 4]);
        b = &b[end + 4..];
    }
    let rng = Rng::new(u64::from(flags >> 1));
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        mesh_key: None,
        can_ack_pings: true,
        is_prober: false,
    };
    block_on(async {
        let mut reader = FrameReader::new(Box::new(Chunked::new(b, rng)), &[]);
        let mut writer: Writer = Box::new(tokio::io::sink());
        // Without a ServerInfo that opens (a recorded one), the frames are read regardless, as
        // if the handshake had passed: only the frame path is then under test.
        let mut off = 0;
        if client_handshake(&mut reader, &mut writer, client_keys(), &info)
            .await
            .is_ok()
        {
            for _ in 0..2 {
                let (_, len) = frame::read_header(&b[off..]).expect("handshake frames");
                off += HEADER_LEN + len as usize;
            }
        } else {
            reader = FrameReader::new(Box::new(Chunked::new(b, Rng::new(u64::from(flags)))), &[]);
        }
        loop {
            let Ok((t, f)) = reader.read_frame(MAX_FRAME_SIZE).await else {
                return;
            };
            assert_eq!(&f[..], &b[off..off + f.len()], "frame bytes differ from the stream");
            off += f.len();
            check_decoded(t, f);
        }
    });
}

fn check_head(head: &[u8]) {
    let Ok(parsed) = parse_response_head(head) else {
        return;
    };
    let text = String::from_utf8_lossy(head);
    let line = text.split("\r\n").next().unwrap_or("");
    assert_eq!(parsed.status_line, line);
    assert!(line.starts_with("HTTP/1."));
    assert_eq!(
        line.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()),
        Some(parsed.status)
    );
    assert!((0..=999).contains(&parsed.status));
    for (name, value) in &parsed.headers {
        assert_eq!(name.trim(), name);
        assert_eq!(value.trim(), value);
        assert!(!name.contains("\r\n") && !value.contains("\r\n"));
        assert!(
            parsed.header(name).is_some(),
            "header {name:?} parsed but not found by name"
        );
    }
}

fn check_decoded(t: u8, f: BytesMut) {
    let whole = f.clone().freeze();
    let p = &whole[HEADER_LEN..];
    let known = FrameType::from_u8(t);
    let decoded = decode_server_frame(t, f);
    let Ok(decoded) = decoded else {
        assert!(
            known == Some(FrameType::RecvPacket) && p.len() < KEY_LEN,
            "an error decoding a frame of type {t:#04x} and {} bytes",
            p.len()
        );
        return;
    };
    let rebuilt = match decoded {
        ServerFrame::Packet { src, data } => {
            assert_eq!(known, Some(FrameType::RecvPacket));
            assert_eq!(src[..], p[..KEY_LEN]);
            assert_eq!(data[..], p[KEY_LEN..]);
            Some(frame::recv_packet(&src, &data))
        }
        ServerFrame::KeepAlive => {
            assert_eq!(known, Some(FrameType::KeepAlive));
            p.is_empty().then(frame::keep_alive)
        }
        ServerFrame::Ping(d) | ServerFrame::Pong(d) => {
            assert!(matches!(known, Some(FrameType::Ping | FrameType::Pong)));
            assert_eq!(d[..], p[..PING_LEN]);
            let is_ping = known == Some(FrameType::Ping);
            (p.len() == PING_LEN).then(|| if is_ping { frame::ping(&d) } else { frame::pong(&d) })
        }
        ServerFrame::PeerGone { key, reason } => {
            assert_eq!(known, Some(FrameType::PeerGone));
            assert_eq!(key[..], p[..KEY_LEN]);
            assert_eq!(reason, p.get(KEY_LEN).copied().unwrap_or(frame::PEER_GONE_DISCONNECTED));
            (p.len() == KEY_LEN + 1).then(|| frame::peer_gone(&key, reason))
        }
        ServerFrame::PeerPresent { key, ip, port, flags } => {
            assert_eq!(known, Some(FrameType::PeerPresent));
            assert_eq!(key[..], p[..KEY_LEN]);
            match ip {
                None => {
                    assert!(p.len() < KEY_LEN + 18);
                    assert_eq!((port, flags), (0, 0));
                    None
                }
                Some(ip) => {
                    assert_eq!(ip[..], p[KEY_LEN..KEY_LEN + 16]);
                    assert_eq!(port.to_be_bytes(), p[KEY_LEN + 16..KEY_LEN + 18]);
                    assert_eq!(flags, p.get(KEY_LEN + 18).copied().unwrap_or(0));
                    (p.len() == frame::PEER_PRESENT_LEN).then(|| frame::peer_present(&key, &ip, port, flags))
                }
            }
        }
        ServerFrame::Health(text) => {
            assert_eq!(known, Some(FrameType::Health));
            assert_eq!(text, String::from_utf8_lossy(p));
            std::str::from_utf8(p).is_ok().then(|| frame::health(&text))
        }
        ServerFrame::Restarting {
            reconnect_in_ms,
            try_for_ms,
        } => {
            assert_eq!(known, Some(FrameType::Restarting));
            assert_eq!(reconnect_in_ms.to_be_bytes(), p[..4]);
            assert_eq!(try_for_ms.to_be_bytes(), p[4..8]);
            (p.len() == frame::RESTARTING_LEN).then(|| frame::restarting(reconnect_in_ms, try_for_ms))
        }
        ServerFrame::Other { frame_type, payload } => {
            assert_eq!(frame_type, t);
            assert_eq!(payload[..], *p);
            let short = match known {
                Some(FrameType::PeerGone | FrameType::PeerPresent) => p.len() < KEY_LEN,
                Some(FrameType::Ping | FrameType::Pong) => p.len() < PING_LEN,
                Some(FrameType::Restarting) => p.len() < frame::RESTARTING_LEN,
                _ => false,
            };
            let unexpected = !matches!(
                known,
                Some(
                    FrameType::RecvPacket
                        | FrameType::KeepAlive
                        | FrameType::Ping
                        | FrameType::Pong
                        | FrameType::PeerGone
                        | FrameType::PeerPresent
                        | FrameType::Health
                        | FrameType::Restarting
                )
            );
            assert!(short || unexpected, "a usable frame of type {t:#04x} decoded as Other");
            None
        }
    };
    if let Some(r) = rebuilt {
        assert_eq!(r, whole, "re-encoding the decoded frame gives other bytes");
    }
}
