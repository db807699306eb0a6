//! The DERP handshake, both sides: the relay reading and opening ClientInfo, the ClientInfo JSON
//! itself, and the client reading ServerKey and ServerInfo.
//!
//! Input: `mode ‖ bytes`, `mode % 4`:
//! - 0: `bytes` is what a client sends after the relay's ServerKey; `read_client_info` on it;
//! - 1: `bytes` is ClientInfo JSON, sealed by the harness to the relay's key (so it opens) and
//!   read by `read_client_info`;
//! - 2: `bytes` is ClientInfo JSON for `ClientInfo::from_json` directly (fast: no key agreement);
//! - 3: `bytes` is what a relay sends to a client; `client_handshake` on it.
//!
//! Invariants: the relay's verdict follows from the bytes in the documented order (first frame
//! type, size bounds, zero key, box, JSON); an accepted ClientInfo has the frame's key and the
//! JSON's fields, and survives `to_json` → `from_json` unchanged; the JSON path agrees with
//! itself sealed or not; a client accepts only a ServerKey with the magic, whose key it returns,
//! followed by a ServerInfo that opens.

use derpmesh_relay::frame::{self, FrameType, CLIENT_INFO_MAX, CLIENT_INFO_MIN, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE};
use derpmesh_relay::handshake::{client_handshake, read_client_info, ClientInfo, HandshakeError};
use derpmesh_relay::io::{FrameReader, Writer};
use derpmesh_relay::keys::{is_zero, BOX_OVERHEAD};
use serde_json::Value;

use crate::common::{block_on, client_keys, client_public, server_keys, server_public, Chunked, Rng};

pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let rng = Rng::new(u64::from(mode >> 2));
    match mode % 4 {
        0 => relay_reads(bytes, rng),
        1 => sealed_json(bytes, rng),
        2 => json(bytes),
        _ => client_reads(bytes, rng),
    }
}

fn read(bytes: &[u8], rng: Rng) -> Result<([u8; KEY_LEN], ClientInfo), HandshakeError> {
    block_on(async {
        let mut reader = FrameReader::new(Box::new(Chunked::new(bytes, rng)), &[]);
        read_client_info(&mut reader, server_keys())
            .await
            .map(|(key, info, _)| (key, info))
    })
}

fn relay_reads(b: &[u8], rng: Rng) {
    let got = read(b, rng);
    let Some((t, len)) = frame::read_header(b) else {
        assert_eq!(got, Err(HandshakeError::Io), "fewer than 5 bytes");
        return;
    };
    let len = len as usize;
    let want = if t != FrameType::ClientInfo as u8 {
        Err(HandshakeError::BadFirstFrame)
    } else if !(CLIENT_INFO_MIN..=CLIENT_INFO_MAX).contains(&len) {
        Err(HandshakeError::BadSize)
    } else if b.len() < HEADER_LEN + len {
        Err(HandshakeError::Io)
    } else if is_zero(&frame::key_at(b, HEADER_LEN)) {
        Err(HandshakeError::ZeroKey)
    } else {
        // Only the box and the JSON are left: the relay's verdict on them is checked below.
        Ok(())
    };
    match (want, got) {
        (Err(w), got) => assert_eq!(got, Err(w)),
        (Ok(()), Err(HandshakeError::BoxOpen)) => {}
        (Ok(()), got) => {
            let key = frame::key_at(b, HEADER_LEN);
            let sealed = &b[HEADER_LEN + KEY_LEN..HEADER_LEN + len];
            let json = server_keys()
                .open(&key, sealed)
                .expect("the relay opened a box that does not open");
            assert_eq!(json.len() + 24 + BOX_OVERHEAD, sealed.len());
            match got {
                Ok((k, info)) => {
                    assert_eq!(k, key);
                    assert_eq!(ClientInfo::from_json(&json), Ok(info.clone()));
                    check_info(&json, &info);
                }
                Err(e) => assert_eq!(Err(e), ClientInfo::from_json(&json).map(|_| ())),
            }
        }
    }
}

fn sealed_json(json: &[u8], rng: Rng) {
    if KEY_LEN + 24 + BOX_OVERHEAD + json.len() > CLIENT_INFO_MAX {
        return;
    }
    let sealed = client_keys().seal(server_public(), json);
    let f = frame::encode(FrameType::ClientInfo, &[client_public(), &sealed]);
    let got = read(&f, rng);
    let direct = ClientInfo::from_json(json);
    match got {
        Ok((k, info)) => {
            assert_eq!(&k, client_public());
            assert_eq!(direct, Ok(info));
        }
        Err(e) => assert_eq!(direct, Err(e), "sealed and direct JSON disagree"),
    }
}

fn json(b: &[u8]) {
    if let Ok(info) = ClientInfo::from_json(b) {
        check_info(b, &info);
    }
}

/// An accepted ClientInfo: a JSON object whose fields (matched case-insensitively) it reflects,
/// and which its own encoding reproduces.
fn check_info(json: &[u8], info: &ClientInfo) {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(json) else {
        panic!("ClientInfo accepted from JSON that is not an object");
    };
    let values = |name: &str| -> Vec<&Value> {
        obj.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    };
    let version = values("version");
    match version.last() {
        None => assert_eq!(info.version, 0),
        Some(v) => assert_eq!(v.as_u64(), Some(u64::from(info.version))),
    }
    match &info.mesh_key {
        Some(k) => assert!(values("meshkey").contains(&&Value::String(k.clone()))),
        None => assert!(values("meshkey").iter().all(|v| v.is_null() || v.as_str() == Some(""))),
    }
    if info.can_ack_pings {
        assert!(values("canackpings").contains(&&Value::Bool(true)));
    }
    if info.is_prober {
        assert!(values("isprober").contains(&&Value::Bool(true)));
    }
    let again = info.to_json();
    assert_eq!(
        ClientInfo::from_json(&again).as_ref(),
        Ok(info),
        "to_json → from_json changed it"
    );
}

fn client_reads(b: &[u8], rng: Rng) {
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        mesh_key: None,
        can_ack_pings: true,
        is_prober: false,
    };
    let got = block_on(async {
        let mut reader = FrameReader::new(Box::new(Chunked::new(b, rng)), &[]);
        let mut writer: Writer = Box::new(tokio::io::sink());
        client_handshake(&mut reader, &mut writer, client_keys(), &info).await
    });
    let Ok(key) = got else {
        return;
    };
    let (t, len) = frame::read_header(b).expect("accepted without a ServerKey header");
    assert_eq!(t, FrameType::ServerKey as u8);
    let len = len as usize;
    assert!((8 + KEY_LEN..=MAX_FRAME_SIZE).contains(&len));
    assert_eq!(b[HEADER_LEN..HEADER_LEN + 8], frame::MAGIC);
    assert_eq!(key, frame::key_at(b, HEADER_LEN + 8));
    let rest = &b[HEADER_LEN + len..];
    let (t, len) = frame::read_header(rest).expect("accepted without a ServerInfo header");
    assert_eq!(t, FrameType::ServerInfo as u8);
    let sealed = &rest[HEADER_LEN..HEADER_LEN + len as usize];
    assert!(
        client_keys().open(&key, sealed).is_some(),
        "accepted a ServerInfo that does not open"
    );
}
