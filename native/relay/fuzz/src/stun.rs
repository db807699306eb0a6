//! STUN (`stun.rs`): any datagram as a Binding Request the relay would answer, and as a Binding
//! Success a client would read.
//!
//! Input: the datagram.
//!
//! Invariants: an accepted request is a STUN Binding Request whose header length is the datagram's,
//! whose attributes end in a 4-byte FINGERPRINT, and whose transaction id is bytes 8..20; the
//! answer to it carries that id and the sender's (unmapped) address, byte for byte what
//! `Response::new` builds, and reads back through `parse_response`; `binding_request` of any id
//! reads back to that id; an accepted response carries its header's id and an address that
//! `Response::new` encodes and `parse_response` reads back unchanged.

use std::net::SocketAddr;

use derpmesh_relay::stun::{self, Response, TxId, HEADER_LEN, MAGIC_COOKIE, MAX_RESPONSE_LEN};

pub fn run(d: &[u8]) {
    let is_stun = stun::is_stun(d);
    assert_eq!(
        is_stun,
        d.len() >= HEADER_LEN && d[0] >> 6 == 0 && d[4..8] == MAGIC_COOKIE.to_be_bytes()
    );
    let tx: Option<TxId> = (d.len() >= HEADER_LEN).then(|| d[8..20].try_into().expect("12 bytes"));

    match stun::parse_binding_request(d) {
        Ok(got) => {
            assert!(is_stun);
            assert_eq!(d[..2], [0, 1], "not a Binding Request");
            assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - HEADER_LEN);
            assert_eq!(Some(got), tx);
            // SOFTWARE (4 + 8) and FINGERPRINT (4 + 4) at least, every attribute padded to 4.
            assert!(
                d.len() >= stun::REQUEST_LEN && d.len().is_multiple_of(4),
                "{} bytes",
                d.len()
            );
            let fp = &d[d.len() - 8..];
            assert_eq!(fp[..4], [0x80, 0x28, 0, 4], "not ending in a FINGERPRINT");
            for from in senders(d) {
                let answer = stun::respond(d, from).expect("an accepted request is answered");
                let expected = Response::new(&got, stun::unmap(from));
                assert_eq!(answer.as_bytes(), expected.as_bytes());
                assert!(answer.as_bytes().len() <= MAX_RESPONSE_LEN);
                assert_eq!(stun::parse_response(answer.as_bytes()), Ok((got, stun::unmap(from))));
            }
        }
        Err(e) => {
            for from in senders(d) {
                assert_eq!(stun::respond(d, from).map(|_| ()), Err(e));
            }
        }
    }

    if let Some(tx) = tx {
        let req = stun::binding_request(&tx);
        assert_eq!(stun::parse_binding_request(&req), Ok(tx));
    }

    if let Ok((got, addr)) = stun::parse_response(d) {
        assert!(is_stun);
        assert_eq!(d[..2], [1, 1], "not a Binding Success");
        assert_eq!(Some(got), tx);
        assert_eq!(stun::unmap(addr), addr, "a v4-mapped address was not unmapped");
        let again = Response::new(&got, addr);
        assert_eq!(stun::parse_response(again.as_bytes()), Ok((got, addr)));
    }
}

/// A few senders, some taken from the datagram's own bytes: IPv4, IPv6, and IPv4 seen through a
/// dual-stack socket.
fn senders(d: &[u8]) -> [SocketAddr; 3] {
    let mut b = [0u8; 18];
    for (i, x) in d.iter().rev().take(18).enumerate() {
        b[i] = *x;
    }
    let port = u16::from_be_bytes([b[0], b[1]]);
    let v4 = std::net::Ipv4Addr::new(b[2], b[3], b[4], b[5]);
    let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[2..18]).expect("16 bytes"));
    [
        SocketAddr::from((v4, port)),
        SocketAddr::from((v6, port)),
        SocketAddr::from((v4.to_ipv6_mapped(), port)),
    ]
}
