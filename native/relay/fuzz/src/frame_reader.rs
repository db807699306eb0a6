//! `io::FrameReader` and the `frame` codec: any byte stream, delivered in any pieces, with part of
//! it already read (the bytes past an HTTP head), read with the reader's three ways of taking a
//! frame as the relay and the client call them.
//!
//! Input: `ctl ‖ stream`. `ctl` seeds the piece sizes, how much of the stream is passed as the
//! already-read head, and which call takes each frame.
//!
//! Invariants: every header is the stream's bytes at that offset; a frame taken is exactly the
//! stream's bytes (header and payload), and re-encoding its payload with `frame::encode` (and the
//! frame's own constructor where it has one) gives the same bytes; `skip_frame` consumes exactly
//! the frame, however long it claims to be, without buffering it; `read_frame` refuses a frame
//! over its limit; EOF comes exactly when the stream has fewer bytes than needed.

use std::io::ErrorKind;

use derpmesh_relay::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE, PING_LEN};
use derpmesh_relay::io::FrameReader;

use crate::common::{block_on, Chunked, Rng};

pub fn run(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let mut rng = Rng::new(u64::from(ctl));
    let head_len = if rng.chance(2) {
        0
    } else {
        rng.below(stream.len().min(300) + 1)
    };
    let (head, rest) = stream.split_at(head_len);
    let pieces = Rng::new(u64::from(ctl) ^ 0x5eed);
    block_on(async {
        let mut reader = FrameReader::new(Box::new(Chunked::new(rest, pieces)), head);
        let mut off = 0usize;
        loop {
            if rng.chance(8) {
                reader.set_bulk(rng.chance(2));
            }
            let left = stream.len() - off;
            let header = reader.next_header().await;
            if left < HEADER_LEN {
                let e = header.expect_err("a header from fewer than 5 bytes");
                assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
                return;
            }
            let (t, len) = header.expect("a header from 5 buffered bytes");
            assert_eq!(t, stream[off], "frame type at offset {off}");
            let want_len = u32::from_be_bytes([stream[off + 1], stream[off + 2], stream[off + 3], stream[off + 4]]);
            assert_eq!(len, want_len as usize, "frame length at offset {off}");
            assert!(reader.has_header());
            let whole = HEADER_LEN + len;
            let complete = left >= whole;
            match rng.below(3) {
                // read_frame with the limits its callers use.
                0 => {
                    let max = [0, PING_LEN, KEY_LEN + MAX_PACKET_SIZE, MAX_FRAME_SIZE][rng.below(4)];
                    let got = reader.read_frame(max).await;
                    if len > max {
                        let e = got.expect_err("a frame over the limit");
                        assert_eq!(e.kind(), ErrorKind::InvalidData);
                        return;
                    }
                    if !complete {
                        assert_eq!(got.expect_err("a cut frame").kind(), ErrorKind::UnexpectedEof);
                        return;
                    }
                    let (got_t, f) = got.expect("a whole frame within the limit");
                    assert_eq!(got_t, t);
                    check_frame(&f, &stream[off..off + whole]);
                }
                // take_frame after a bounds check, as conn.rs does for known types.
                1 if len <= MAX_FRAME_SIZE => {
                    let got = reader.take_frame(len).await;
                    if !complete {
                        assert_eq!(got.expect_err("a cut frame").kind(), ErrorKind::UnexpectedEof);
                        return;
                    }
                    check_frame(&got.expect("a whole frame"), &stream[off..off + whole]);
                }
                // skip_frame, as for unknown types: any length, never buffered.
                _ => {
                    let got = reader.skip_frame(len).await;
                    if !complete {
                        assert_eq!(got.expect_err("a cut frame").kind(), ErrorKind::UnexpectedEof);
                        return;
                    }
                    got.expect("a whole frame skipped");
                }
            }
            off += whole;
            if reader.has_header() {
                assert!(
                    stream.len() - off >= HEADER_LEN,
                    "has_header with {} bytes left",
                    stream.len() - off
                );
            }
        }
    });
}

/// A frame as taken from the reader: the stream's bytes, and what the codec makes of its payload.
fn check_frame(f: &[u8], want: &[u8]) {
    assert_eq!(f, want, "frame bytes differ from the stream");
    let (t, len) = frame::read_header(f).expect("a frame has a header");
    assert_eq!(len as usize, f.len() - HEADER_LEN);
    let p = &f[HEADER_LEN..];
    let Some(ft) = FrameType::from_u8(t) else {
        return;
    };
    assert_eq!(
        &frame::encode(ft, &[p])[..],
        f,
        "encode(type, payload) is not the frame"
    );
    let rebuilt = match ft {
        FrameType::ServerKey if p.len() == 8 + KEY_LEN && p[..8] == frame::MAGIC => {
            Some(frame::server_key(&frame::key_at(p, 8)))
        }
        FrameType::SendPacket if p.len() >= KEY_LEN => Some(frame::send_packet(&frame::key_at(p, 0), &p[KEY_LEN..])),
        FrameType::RecvPacket if p.len() >= KEY_LEN => Some(frame::recv_packet(&frame::key_at(p, 0), &p[KEY_LEN..])),
        FrameType::ForwardPacket if p.len() >= 2 * KEY_LEN => Some(frame::forward_packet(
            &frame::key_at(p, 0),
            &frame::key_at(p, KEY_LEN),
            &p[2 * KEY_LEN..],
        )),
        FrameType::KeepAlive if p.is_empty() => Some(frame::keep_alive()),
        FrameType::WatchConns if p.is_empty() => Some(frame::watch_conns()),
        FrameType::NotePreferred if p.len() == 1 && p[0] <= 1 => Some(frame::note_preferred(p[0] == 1)),
        FrameType::PeerGone if p.len() == KEY_LEN + 1 => Some(frame::peer_gone(&frame::key_at(p, 0), p[KEY_LEN])),
        FrameType::PeerPresent if p.len() == frame::PEER_PRESENT_LEN => {
            let ip: [u8; 16] = p[KEY_LEN..KEY_LEN + 16].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([p[KEY_LEN + 16], p[KEY_LEN + 17]]);
            Some(frame::peer_present(&frame::key_at(p, 0), &ip, port, p[KEY_LEN + 18]))
        }
        FrameType::ClosePeer if p.len() == KEY_LEN => Some(frame::close_peer(&frame::key_at(p, 0))),
        FrameType::Ping if p.len() == PING_LEN => Some(frame::ping(p.try_into().expect("8 bytes"))),
        FrameType::Pong if p.len() == PING_LEN => Some(frame::pong(p.try_into().expect("8 bytes"))),
        FrameType::Health => std::str::from_utf8(p).ok().map(frame::health),
        FrameType::Restarting if p.len() == frame::RESTARTING_LEN => Some(frame::restarting(
            u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        )),
        _ => None,
    };
    if let Some(r) = rebuilt {
        assert_eq!(&r[..], f, "the {ft:?} constructor does not rebuild the frame");
    }
    if ft == FrameType::SendPacket || ft == FrameType::RecvPacket {
        let packet = &p[KEY_LEN.min(p.len())..];
        let disco = frame::is_disco(packet);
        assert_eq!(
            disco,
            packet.len() >= frame::DISCO_MIN_LEN && packet.starts_with(&frame::DISCO_MAGIC)
        );
    }
}
