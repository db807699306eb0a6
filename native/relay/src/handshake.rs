//! The DERP handshake: ServerKey, ClientInfo (boxed JSON), ServerInfo (boxed JSON).

use std::fmt;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::frame::{self, FrameType, CLIENT_INFO_MAX, CLIENT_INFO_MIN, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, NONCE_LEN};
use crate::io::{FrameReader, Writer};
use crate::keys::{is_zero, Key, KeyPair, SharedBox, BOX_OVERHEAD};

/// How long each side waits for the other's handshake frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client says about itself in ClientInfo. JSON field names match case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub version: u32,
    pub mesh_key: Option<String>,
    pub can_ack_pings: bool,
    pub is_prober: bool,
}

/// Why a handshake failed; `code` is the stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    Timeout,
    Io,
    BadFirstFrame,
    BadSize,
    ZeroKey,
    BoxOpen,
    BadJson,
    BadServerKey,
    BadServerInfo,
}

impl HandshakeError {
    pub fn code(self) -> &'static str {
        match self {
            HandshakeError::Timeout => "timeout",
            HandshakeError::Io => "io",
            HandshakeError::BadFirstFrame => "bad_first_frame",
            HandshakeError::BadSize => "bad_size",
            HandshakeError::ZeroKey => "zero_key",
            HandshakeError::BoxOpen => "box_open",
            HandshakeError::BadJson => "bad_json",
            HandshakeError::BadServerKey => "bad_server_key",
            HandshakeError::BadServerInfo => "bad_server_info",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DERP handshake failed: {}", self.code())
    }
}

impl std::error::Error for HandshakeError {}

impl ClientInfo {
    pub fn to_json(&self) -> Vec<u8> {
        let mut obj = serde_json::Map::new();
        obj.insert("version".into(), self.version.into());
        if let Some(k) = &self.mesh_key {
            obj.insert("meshKey".into(), k.clone().into());
        }
        obj.insert("CanAckPings".into(), self.can_ack_pings.into());
        if self.is_prober {
            obj.insert("IsProber".into(), true.into());
        }
        serde_json::to_vec(&Value::Object(obj)).expect("serializing a JSON map cannot fail")
    }

    pub fn from_json(json: &[u8]) -> Result<ClientInfo, HandshakeError> {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(json) else {
            return Err(HandshakeError::BadJson);
        };
        let mut info = ClientInfo::default();
        for (name, value) in obj {
            match (name.to_ascii_lowercase().as_str(), value) {
                ("version", Value::Number(n)) => {
                    info.version = n
                        .as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or(HandshakeError::BadJson)?
                }
                ("meshkey", Value::String(s)) if !s.is_empty() => info.mesh_key = Some(s),
                ("meshkey", Value::String(_) | Value::Null) => {}
                ("canackpings", Value::Bool(b)) => info.can_ack_pings = b,
                ("isprober", Value::Bool(b)) => info.is_prober = b,
                ("version" | "meshkey" | "canackpings" | "isprober", _) => return Err(HandshakeError::BadJson),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// The server's half of ServerInfo: `{"version":PROTOCOL_VERSION}` sealed to the client, with the
/// receive limit (derper's `tokenBucketBytesPerSecond` / `tokenBucketBytesBurst`) when one is set.
pub fn server_info_frame(shared: &SharedBox, limit: crate::relay::RateLimit) -> Bytes {
    let info = if limit.is_set() {
        serde_json::json!({
            "version": frame::PROTOCOL_VERSION,
            "tokenBucketBytesPerSecond": limit.bytes_per_sec,
            "tokenBucketBytesBurst": limit.burst,
        })
    } else {
        serde_json::json!({ "version": frame::PROTOCOL_VERSION })
    };
    let sealed = shared.seal(info.to_string().as_bytes());
    frame::encode(FrameType::ServerInfo, &[&sealed])
}

/// A ClientInfo frame: client public key ‖ box(JSON) sealed to the server.
pub fn client_info_frame(client: &KeyPair, server: &Key, info: &ClientInfo) -> Bytes {
    client_info_frame_with(client.public(), &client.shared(server), info)
}

fn client_info_frame_with(client: &Key, shared: &SharedBox, info: &ClientInfo) -> Bytes {
    let sealed = shared.seal(&info.to_json());
    let mut out = BytesMut::with_capacity(HEADER_LEN + KEY_LEN + sealed.len());
    frame::put_header(&mut out, FrameType::ClientInfo, KEY_LEN + sealed.len());
    out.put_slice(client);
    out.put_slice(&sealed);
    out.freeze()
}

/// Server side: reads and checks ClientInfo (the ServerKey frame has already been written).
/// Returns the client's key, its ClientInfo, and the box to seal ServerInfo with.
pub async fn read_client_info(
    reader: &mut FrameReader,
    server: &KeyPair,
) -> Result<(Key, ClientInfo, SharedBox), HandshakeError> {
    let read = async {
        let (t, len) = reader.next_header().await.map_err(|_| HandshakeError::Io)?;
        if t != FrameType::ClientInfo as u8 {
            return Err(HandshakeError::BadFirstFrame);
        }
        if !(CLIENT_INFO_MIN..=CLIENT_INFO_MAX).contains(&len) {
            return Err(HandshakeError::BadSize);
        }
        reader.take_frame(len).await.map_err(|_| HandshakeError::Io)
    };
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let payload = &frame[HEADER_LEN..];
    let client_key = frame::key_at(payload, 0);
    if is_zero(&client_key) {
        return Err(HandshakeError::ZeroKey);
    }
    let sealed = &payload[KEY_LEN..];
    if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
        return Err(HandshakeError::BoxOpen);
    }
    let shared = server.shared(&client_key);
    let json = shared.open(sealed).ok_or(HandshakeError::BoxOpen)?;
    Ok((client_key, ClientInfo::from_json(&json)?, shared))
}

/// Client side, after the HTTP upgrade: reads ServerKey, sends ClientInfo, reads ServerInfo.
/// Returns the server's public key.
pub async fn client_handshake(
    reader: &mut FrameReader,
    writer: &mut Writer,
    client: &KeyPair,
    info: &ClientInfo,
) -> Result<Key, HandshakeError> {
    let steps = async {
        let (t, f) = reader
            .read_frame(MAX_FRAME_SIZE)
            .await
            .map_err(|_| HandshakeError::Io)?;
        if t != FrameType::ServerKey as u8
            || f.len() < HEADER_LEN + 8 + KEY_LEN
            || f[HEADER_LEN..HEADER_LEN + 8] != frame::MAGIC
        {
            return Err(HandshakeError::BadServerKey);
        }
        let server_key = frame::key_at(&f, HEADER_LEN + 8);
        let shared = client.shared(&server_key);
        crate::io::write_all(writer, &client_info_frame_with(client.public(), &shared, info))
            .await
            .map_err(|_| HandshakeError::Io)?;
        let (t, f) = reader
            .read_frame(MAX_FRAME_SIZE)
            .await
            .map_err(|_| HandshakeError::Io)?;
        if t != FrameType::ServerInfo as u8 {
            return Err(HandshakeError::BadServerInfo);
        }
        shared.open(&f[HEADER_LEN..]).ok_or(HandshakeError::BadServerInfo)?;
        Ok(server_key)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, steps)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_fields_match_case_insensitively() {
        let info =
            ClientInfo::from_json(br#"{"VERSION":2,"MeshKey":"abc","canackpings":true,"isProber":true}"#).unwrap();
        assert_eq!(
            info,
            ClientInfo {
                version: 2,
                mesh_key: Some("abc".into()),
                can_ack_pings: true,
                is_prober: true
            }
        );
    }

    #[test]
    fn client_info_json_round_trip_and_omits_empty_mesh_key() {
        let info = ClientInfo {
            version: 2,
            mesh_key: None,
            can_ack_pings: true,
            is_prober: false,
        };
        let json = String::from_utf8(info.to_json()).unwrap();
        assert!(!json.to_lowercase().contains("meshkey"));
        assert_eq!(ClientInfo::from_json(json.as_bytes()).unwrap(), info);
    }

    #[test]
    fn client_info_rejects_bad_json() {
        assert_eq!(ClientInfo::from_json(b"not json"), Err(HandshakeError::BadJson));
        assert_eq!(ClientInfo::from_json(b"[1]"), Err(HandshakeError::BadJson));
        assert_eq!(ClientInfo::from_json(br#"{"meshKey":5}"#), Err(HandshakeError::BadJson));
        assert_eq!(
            ClientInfo::from_json(br#"{"version":-1}"#),
            Err(HandshakeError::BadJson)
        );
        assert!(ClientInfo::from_json(br#"{"unknown":{}}"#).is_ok());
    }

    #[tokio::test]
    async fn handshake_over_a_pipe() {
        let (c, s) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let server = KeyPair::generate();
        let client = KeyPair::generate();
        let server_pub = *server.public();
        let srv = tokio::spawn(async move {
            let mut w: Writer = Box::new(sw);
            let mut r = FrameReader::new(Box::new(sr), &[]);
            crate::io::write_all(&mut w, &frame::server_key(server.public()))
                .await
                .unwrap();
            let (key, info, shared) = read_client_info(&mut r, &server).await.unwrap();
            crate::io::write_all(&mut w, &server_info_frame(&shared, Default::default()))
                .await
                .unwrap();
            (key, info)
        });
        let mut r = FrameReader::new(Box::new(cr), &[]);
        let mut w: Writer = Box::new(cw);
        let info = ClientInfo {
            version: 2,
            mesh_key: Some("k".into()),
            can_ack_pings: true,
            is_prober: false,
        };
        let got_server = client_handshake(&mut r, &mut w, &client, &info).await.unwrap();
        assert_eq!(got_server, server_pub);
        let (key, seen) = srv.await.unwrap();
        assert_eq!(&key, client.public());
        assert_eq!(seen, info);
    }

    #[tokio::test]
    async fn wrong_first_frame_and_unopenable_box_are_rejected() {
        let server = KeyPair::generate();
        let ping = frame::ping(&[0; 8]);
        let mut r = FrameReader::new(Box::new(tokio::io::empty()), &ping);
        assert_eq!(
            read_client_info(&mut r, &server).await.err(),
            Some(HandshakeError::BadFirstFrame)
        );

        let stranger = KeyPair::generate();
        let bad = client_info_frame(&KeyPair::generate(), stranger.public(), &ClientInfo::default());
        let mut r = FrameReader::new(Box::new(tokio::io::empty()), &bad);
        assert_eq!(
            read_client_info(&mut r, &server).await.err(),
            Some(HandshakeError::BoxOpen)
        );

        let mut zero = bad.to_vec();
        zero[HEADER_LEN..HEADER_LEN + 32].fill(0);
        let mut r = FrameReader::new(Box::new(tokio::io::empty()), &zero);
        assert_eq!(
            read_client_info(&mut r, &server).await.err(),
            Some(HandshakeError::ZeroKey)
        );

        let tiny = frame::encode(FrameType::ClientInfo, &[&[1; 10]]);
        let mut r = FrameReader::new(Box::new(tokio::io::empty()), &tiny);
        assert_eq!(
            read_client_info(&mut r, &server).await.err(),
            Some(HandshakeError::BadSize)
        );
    }
}
