//! A DERP client: HTTP upgrade over plain TCP or TLS, the handshake, and typed frames.
//!
//! Used by the load generator, by mesh links, by tests, and by anything else in the core that must
//! talk to a relay. `https://` URLs are dialed over TLS (rustls with the *ring* provider); the
//! server certificate is verified against the public web PKI roots plus any private CA given in
//! [`TlsOptions`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, PING_LEN, RESTARTING_LEN};
use crate::handshake::{client_handshake, ClientInfo, HandshakeError};
use crate::io::{FrameReader, Reader, Writer};
use crate::keys::{Key, KeyPair};
use crate::tlsio;

/// How long the TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS handshake (`https://` URLs) may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to send the whole HTTP response head.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// A response head larger than this is not a DERP server talking.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// The upgrade path used when the URL names none.
pub const DERP_PATH: &str = "/derp";

/// Why dialing a relay failed. `Display` says which step failed and with what value.
#[derive(Debug)]
pub enum ClientError {
    /// The URL could not be parsed.
    InvalidUrl { url: String, reason: &'static str },
    /// The URL scheme is not supported, e.g. `ws`.
    UnsupportedScheme { url: String, scheme: String },
    /// The TLS settings are unusable (e.g. the private CA PEM holds no certificate).
    TlsConfig { reason: String },
    /// The TCP connection could not be made.
    Connect { addr: String, source: io::Error },
    /// The TLS handshake failed; `source` wraps the [`rustls::Error`] when there is one
    /// (see [`ClientError::tls_error`]).
    Tls { addr: String, source: io::Error },
    /// A step did not finish in time.
    Timeout { addr: String, step: &'static str },
    /// Reading or writing the socket failed during a step.
    Io {
        addr: String,
        step: &'static str,
        source: io::Error,
    },
    /// The connection closed before the HTTP response head was complete.
    ClosedBeforeResponse { addr: String, received: usize },
    /// The HTTP response head exceeded [`MAX_RESPONSE_HEAD`].
    ResponseTooLarge { addr: String },
    /// The first line of the response is not `HTTP/1.x NNN ...`.
    BadStatusLine { line: String },
    /// The server answered with a status other than 101.
    BadStatus { status: u16, line: String },
    /// The DERP handshake (ServerKey, ClientInfo, ServerInfo) failed.
    Handshake(HandshakeError),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::InvalidUrl { url, reason } => {
                write!(f, "invalid relay URL {url:?}: {reason}")
            }
            ClientError::UnsupportedScheme { url, scheme } => write!(
                f,
                "relay URL {url:?}: scheme {scheme:?} is not supported (use http://host:port or https://host:port)"
            ),
            ClientError::TlsConfig { reason } => write!(f, "TLS settings: {reason}"),
            ClientError::Connect { addr, source } => write!(f, "connect to {addr} failed: {source}"),
            ClientError::Tls { addr, source } => {
                write!(f, "TLS handshake with {addr} failed: {source}")?;
                match self.tls_error().and_then(tls_hint) {
                    Some(hint) => write!(f, " — {hint}"),
                    None => Ok(()),
                }
            }
            ClientError::Timeout { addr, step } => write!(f, "{addr}: timed out {step}"),
            ClientError::Io { addr, step, source } => write!(f, "{addr}: {step} failed: {source}"),
            ClientError::ClosedBeforeResponse { addr, received } => write!(
                f,
                "{addr}: connection closed before the HTTP response head was complete ({received} bytes received)"
            ),
            ClientError::ResponseTooLarge { addr } => write!(
                f,
                "{addr}: HTTP response head exceeds {MAX_RESPONSE_HEAD} bytes; is this a DERP server?"
            ),
            ClientError::BadStatusLine { line } => write!(f, "bad HTTP status line {line:?}"),
            ClientError::BadStatus { status, line } => write!(
                f,
                "relay answered {line:?} (status {status}) instead of 101 Switching Protocols"
            ),
            ClientError::Handshake(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } | ClientError::Tls { source, .. } => {
                Some(source)
            }
            ClientError::Handshake(e) => Some(e),
            _ => None,
        }
    }
}

impl ClientError {
    /// The rustls error behind a failed TLS handshake, if that is what failed.
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            ClientError::Tls { source, .. } => source.get_ref()?.downcast_ref::<rustls::Error>(),
            _ => None,
        }
    }

    /// The TLS handshake failed because no trusted CA signed the peer's certificate.
    pub fn is_unknown_issuer(&self) -> bool {
        matches!(
            self.tls_error(),
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
        )
    }
}

/// What to do about a TLS failure, when something can be said.
fn tls_hint(e: &rustls::Error) -> Option<&'static str> {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            Some("the relay's certificate is not signed by a trusted CA; give the CA that signed it as a private CA")
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            Some("the URL's host is not among the certificate's names; dial a name the certificate covers")
        }
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => Some("check the certificate's validity period and this machine's clock"),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Some("the peer does not speak TLS here; if it serves plain HTTP, use an http:// URL")
        }
        _ => None,
    }
}

/// The parts of a relay URL the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// `https://`: the connection runs over TLS.
    pub tls: bool,
    /// Host name or IP address, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// The authority as written in the URL, for the `Host` header.
    pub authority: String,
    /// Request target: the URL's path (and query), or [`DERP_PATH`] when it has none.
    pub path: String,
}

/// An `http(s)://` URL taken apart: what [`RelayUrl`] and the admission URL share.
pub(crate) struct HttpUrlParts<'a> {
    pub tls: bool,
    /// Host name or IP address, IPv6 without brackets.
    pub host: &'a str,
    /// The given port, else 80 or 443.
    pub port: u16,
    /// The authority as written, for the `Host` header.
    pub authority: &'a str,
    /// Path and query as written (no fragment); empty when the URL has none.
    pub tail: &'a str,
}

pub(crate) enum UrlProblem {
    /// No `scheme://`.
    NoScheme,
    /// A scheme other than http and https (lowercased).
    Scheme(String),
    Invalid(&'static str),
}

/// Splits `http://host[:port][/path][?query][#fragment]` (or https); user info is refused.
pub(crate) fn split_http_url(url: &str) -> Result<HttpUrlParts<'_>, UrlProblem> {
    let invalid = UrlProblem::Invalid;
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlProblem::NoScheme);
    };
    let tls = if scheme.eq_ignore_ascii_case("http") {
        false
    } else if scheme.eq_ignore_ascii_case("https") {
        true
    } else {
        return Err(UrlProblem::Scheme(scheme.to_ascii_lowercase()));
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let tail = tail.split('#').next().unwrap_or("");
    if authority.contains('@') {
        return Err(invalid("user info is not allowed"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(invalid("unterminated IPv6 address"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(invalid("unexpected text after IPv6 address")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| invalid("port is not a number from 0 to 65535"))?,
    };
    Ok(HttpUrlParts {
        tls,
        host,
        port,
        authority,
        tail,
    })
}

impl RelayUrl {
    /// Parses `http://host[:port][/path]` or `https://host[:port][/path]` (default ports 80 and 443).
    /// `ws` and `wss` are reported as unsupported.
    pub fn parse(url: &str) -> Result<RelayUrl, ClientError> {
        let parts = split_http_url(url).map_err(|problem| match problem {
            UrlProblem::NoScheme => ClientError::InvalidUrl {
                url: url.to_string(),
                reason: "expected http://host:port",
            },
            UrlProblem::Scheme(scheme) => ClientError::UnsupportedScheme {
                url: url.to_string(),
                scheme,
            },
            UrlProblem::Invalid(reason) => ClientError::InvalidUrl {
                url: url.to_string(),
                reason,
            },
        })?;
        let tail = parts.tail;
        let path = if tail.is_empty() || tail == "/" {
            DERP_PATH.to_string()
        } else if tail.starts_with('?') {
            format!("{DERP_PATH}{tail}")
        } else {
            tail.to_string()
        };
        Ok(RelayUrl {
            tls: parts.tls,
            host: parts.host.to_string(),
            port: parts.port,
            authority: parts.authority.to_string(),
            path,
        })
    }

    /// Parses the URL of a relay as a whole rather than of its upgrade endpoint (a mesh peer, a
    /// `--mesh-with` entry): surrounding whitespace, trailing slashes and a trailing `/derp` are
    /// optional, and the upgrade path is always `<prefix>/derp`. So `http://h:1`, `http://h:1/` and
    /// `http://h:1/derp` are one relay, whose [`RelayUrl::base`] is `http://h:1`.
    pub fn parse_relay(url: &str) -> Result<RelayUrl, ClientError> {
        let mut parsed = RelayUrl::parse(url.trim())?;
        parsed.path = format!("{}{DERP_PATH}", parsed.prefix());
        Ok(parsed)
    }

    /// The path before the upgrade endpoint: without query, trailing slashes and trailing `/derp`.
    fn prefix(&self) -> &str {
        let path = self.path.split('?').next().unwrap_or("").trim_end_matches('/');
        path.strip_suffix(DERP_PATH).unwrap_or(path).trim_end_matches('/')
    }

    /// The relay's identity: `scheme://authority[/prefix]`, scheme and authority lower-cased, the
    /// port as written, without the upgrade endpoint (see [`RelayUrl::parse_relay`]).
    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority.to_ascii_lowercase(), self.prefix())
    }

    /// `host:port` for messages and for connecting (IPv6 in brackets).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The upgrade request head.
    fn request(&self, fast_start: bool) -> String {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n",
            self.path, self.authority
        );
        if fast_start {
            req.push_str("Derp-Fast-Start: 1\r\n");
        }
        req.push_str("\r\n");
        req
    }
}

/// How to dial. `Default` is a normal (non fast-start) upgrade.
#[derive(Debug, Clone, Default)]
pub struct DialOptions {
    /// Send `Derp-Fast-Start: 1`: the server sends no HTTP response and the DERP stream starts at
    /// once. A server that answers with `101` anyway is handled too.
    pub fast_start: bool,
}

/// TLS settings for `https://` relay URLs. The default verifies the relay's certificate, for the
/// URL's host (which is also sent as SNI), against the public web PKI roots built in from
/// `webpki-roots` (Mozilla's list).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Extra trusted CA certificates in PEM (one or more `-----BEGIN CERTIFICATE-----` blocks), for
    /// relays whose certificates a private CA signed. Trusted in addition to the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// **Insecure escape hatch, off by default.** Accept any certificate for any name: the traffic
    /// is still encrypted, but anyone on the path can impersonate the relay (and so, for a mesh
    /// link, read and alter everything forwarded to it). For tests and first setup only; prefer
    /// `ca_pem`.
    pub insecure_skip_verify: bool,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

impl TlsOptions {
    /// Builds the rustls client configuration. Fails when `ca_pem` holds no usable certificate;
    /// callers that keep the options around call this once up front to report that early.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::TlsConfig { reason: e.to_string() })?;
        let roots = self.root_store()?;
        let mut config = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateVerification(provider)))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        // DERP is an HTTP/1.1 upgrade; never let a server pick h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // After the handshake the record layer is `tlsio`'s: rustls hands over the traffic keys.
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }

    /// The public roots plus the private CAs (checked even when verification is off).
    fn root_store(&self) -> Result<RootCertStore, ClientError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let Some(pem) = &self.ca_pem else {
            return Ok(roots);
        };
        let bad = |reason: String| ClientError::TlsConfig { reason };
        let mut added = 0;
        for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let cert = cert.map_err(|e| bad(format!("private CA PEM: certificate #{} is unreadable: {e}", i + 1)))?;
            roots.add(cert).map_err(|e| {
                bad(format!(
                    "private CA PEM: certificate #{} is not a usable CA certificate: {e}",
                    i + 1
                ))
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(
                "private CA PEM holds no \"-----BEGIN CERTIFICATE-----\" block".to_string()
            ));
        }
        Ok(roots)
    }
}

/// The verifier behind [`TlsOptions::insecure_skip_verify`]: any certificate, any name. Handshake
/// signatures are still checked, so the peer must at least hold the key of the certificate it sent.
#[derive(Debug)]
struct NoCertificateVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An established DERP connection, after the handshake. The fields are public so the halves can be
/// moved into separate tasks.
pub struct DerpConn {
    pub reader: FrameReader,
    pub writer: Writer,
    /// The relay's public key (from its ServerKey frame).
    pub server_key: Key,
}

/// A frame received from a relay, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// RecvPacket: a packet from `src`.
    Packet {
        src: Key,
        data: Bytes,
    },
    KeepAlive,
    Ping([u8; PING_LEN]),
    Pong([u8; PING_LEN]),
    PeerGone {
        key: Key,
        reason: u8,
    },
    /// `ip`/`port`/`flags` are absent in the 32-byte form older relays send.
    PeerPresent {
        key: Key,
        ip: Option<[u8; 16]>,
        port: u16,
        flags: u8,
    },
    Health(String),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// Any other frame type, one a client does not expect, or a known frame too short to use
    /// (dropped: see [`decode_server_frame`]), with its payload.
    Other {
        frame_type: u8,
        payload: Bytes,
    },
}

/// Dials `url` (`http://host:port`, `https://host:port`, optionally with a path such as `/derp`),
/// upgrades and runs the handshake. `https` uses the default [`TlsOptions`] (public roots only).
pub async fn dial(url: &str, key: &KeyPair, info: &ClientInfo) -> Result<DerpConn, ClientError> {
    dial_with(url, key, info, &DialOptions::default()).await
}

/// [`dial`] with options.
pub async fn dial_with(
    url: &str,
    key: &KeyPair,
    info: &ClientInfo,
    options: &DialOptions,
) -> Result<DerpConn, ClientError> {
    dial_tls(url, key, info, options, &TlsOptions::default()).await
}

/// [`dial_with`] with TLS settings for `https://` URLs (ignored for `http://`).
pub async fn dial_tls(
    url: &str,
    key: &KeyPair,
    info: &ClientInfo,
    options: &DialOptions,
    tls: &TlsOptions,
) -> Result<DerpConn, ClientError> {
    dial_url(&RelayUrl::parse(url)?, key, info, options, tls).await
}

/// [`dial_tls`] with an already parsed URL.
pub async fn dial_url(
    url: &RelayUrl,
    key: &KeyPair,
    info: &ClientInfo,
    options: &DialOptions,
    tls: &TlsOptions,
) -> Result<DerpConn, ClientError> {
    let addr = url.addr();
    // Settings and name first: a bad CA file or host fails without touching the network.
    let tls = match url.tls {
        false => None,
        true => {
            let name = ServerName::try_from(url.host.clone()).map_err(|_| ClientError::InvalidUrl {
                url: format!("https://{}", url.authority),
                reason: "the host is not a valid TLS server name",
            })?;
            Some((tls.client_config()?, name))
        }
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((url.host.as_str(), url.port)))
        .await
        .map_err(|_| ClientError::Timeout {
            addr: addr.clone(),
            step: "connecting",
        })?
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    stream.set_nodelay(true).map_err(|source| ClientError::Io {
        addr: addr.clone(),
        step: "setting TCP_NODELAY",
        source,
    })?;
    let (mut reader, mut writer): (Reader, Writer) = match tls {
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        Some((config, name)) => {
            let stream = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tlsio::connect(stream, config, name))
                .await
                .map_err(|_| ClientError::Timeout {
                    addr: addr.clone(),
                    step: "during the TLS handshake",
                })?
                .map_err(|e| ClientError::Tls {
                    addr: addr.clone(),
                    source: e.into(),
                })?;
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    crate::io::write_all(&mut writer, url.request(options.fast_start).as_bytes())
        .await
        .map_err(|source| ClientError::Io {
            addr: addr.clone(),
            step: "sending the upgrade request",
            source,
        })?;

    let head = tokio::time::timeout(RESPONSE_TIMEOUT, read_upgrade(&mut reader, &addr, options.fast_start))
        .await
        .map_err(|_| ClientError::Timeout {
            addr: addr.clone(),
            step: "waiting for the HTTP upgrade response",
        })??;

    let mut reader = FrameReader::new(reader, &head);
    let server_key = client_handshake(&mut reader, &mut writer, key, info)
        .await
        .map_err(ClientError::Handshake)?;
    Ok(DerpConn {
        reader,
        writer,
        server_key,
    })
}

/// Reads the upgrade response and returns the bytes that followed it (the start of the DERP stream).
/// With fast start, the server normally sends no response: everything read is DERP stream, unless it
/// starts with `HTTP/`.
async fn read_upgrade<R: AsyncRead + Unpin>(r: &mut R, addr: &str, fast_start: bool) -> Result<Vec<u8>, ClientError> {
    let mut buf = Vec::with_capacity(1024);
    if fast_start {
        // A DERP frame header and "HTTP/" are both 5 bytes; a ServerKey frame starts with 0x01.
        while buf.len() < 5 {
            read_more(r, &mut buf, addr).await?;
        }
        if !buf.starts_with(b"HTTP/") {
            return Ok(buf);
        }
    }
    let head_len = loop {
        if let Some(len) = head_end(&buf) {
            break len;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::ResponseTooLarge { addr: addr.to_string() });
        }
        read_more(r, &mut buf, addr).await?;
    };
    let head = parse_response_head(&buf[..head_len])?;
    if head.status != 101 {
        return Err(ClientError::BadStatus {
            status: head.status,
            line: head.status_line,
        });
    }
    Ok(buf.split_off(head_len))
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, addr: &str) -> Result<(), ClientError> {
    let mut chunk = [0u8; 2048];
    let n = r.read(&mut chunk).await.map_err(|source| ClientError::Io {
        addr: addr.to_string(),
        step: "reading the HTTP upgrade response",
        source,
    })?;
    if n == 0 {
        return Err(ClientError::ClosedBeforeResponse {
            addr: addr.to_string(),
            received: buf.len(),
        });
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Length of the response head including its terminating blank line, once it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub status_line: String,
    /// Header names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `HTTP/1.x NNN reason` and the header lines that follow.
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, ClientError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("").to_string();
    let bad = || ClientError::BadStatusLine {
        line: status_line.clone(),
    };
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let status = code.parse().map_err(|_| bad())?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    Ok(ResponseHead {
        status,
        status_line,
        headers,
    })
}

impl DerpConn {
    /// Sends one packet to `dst` through the relay.
    pub async fn send_packet(&mut self, dst: &Key, packet: &[u8]) -> io::Result<()> {
        self.send_frame(&frame::send_packet(dst, packet)).await
    }

    pub async fn note_preferred(&mut self, preferred: bool) -> io::Result<()> {
        self.send_frame(&frame::note_preferred(preferred)).await
    }

    /// Subscribes to PeerPresent/PeerGone (needs the mesh key in ClientInfo).
    pub async fn watch_conns(&mut self) -> io::Result<()> {
        self.send_frame(&frame::watch_conns()).await
    }

    /// Asks the relay to close every connection of `key` (needs the mesh key).
    pub async fn close_peer(&mut self, key: &Key) -> io::Result<()> {
        self.send_frame(&frame::close_peer(key)).await
    }

    /// Writes an already encoded frame.
    pub async fn send_frame(&mut self, encoded: &[u8]) -> io::Result<()> {
        crate::io::write_all(&mut self.writer, encoded).await
    }

    /// Reads and decodes the next frame. Frames over [`MAX_FRAME_SIZE`] and malformed known frames
    /// are errors (the connection is then unusable).
    pub async fn recv(&mut self) -> io::Result<ServerFrame> {
        let (t, f) = self.reader.read_frame(MAX_FRAME_SIZE).await?;
        decode_server_frame(t, f)
    }

    /// Half-closes the connection (FIN) and drops it.
    pub async fn close(mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }
}

/// Decodes a whole frame (header included) as read by [`FrameReader`].
///
/// Short frames, as Tailscale's client treats them (`derp_client.go`, `recv`): a PeerGone or
/// PeerPresent without its key, or a Ping, Pong or Restarting under 8 bytes, is dropped — decoded
/// as [`ServerFrame::Other`], which readers ignore — and the connection goes on. A RecvPacket
/// without its source key stays an error, as in the TypeScript client; Tailscale's client drops
/// that one like the others. `test/vectors/frames.json` holds this rule for both codecs.
pub fn decode_server_frame(frame_type: u8, mut f: BytesMut) -> io::Result<ServerFrame> {
    let payload = f.split_off(HEADER_LEN).freeze();
    let key = |p: &Bytes| frame::key_at(p, 0);
    let known = FrameType::from_u8(frame_type);
    let minimum = match known {
        Some(FrameType::PeerGone | FrameType::PeerPresent) => KEY_LEN,
        Some(FrameType::Ping | FrameType::Pong) => PING_LEN,
        Some(FrameType::Restarting) => RESTARTING_LEN,
        _ => 0,
    };
    if payload.len() < minimum {
        return Ok(ServerFrame::Other { frame_type, payload });
    }
    Ok(match known {
        Some(FrameType::RecvPacket) => {
            if payload.len() < KEY_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "RecvPacket frame of {} bytes is shorter than its source key",
                        payload.len()
                    ),
                ));
            }
            ServerFrame::Packet {
                src: key(&payload),
                data: payload.slice(KEY_LEN..),
            }
        }
        Some(FrameType::KeepAlive) => ServerFrame::KeepAlive,
        Some(t @ (FrameType::Ping | FrameType::Pong)) => {
            let mut data = [0u8; PING_LEN];
            data.copy_from_slice(&payload[..PING_LEN]);
            if t == FrameType::Ping {
                ServerFrame::Ping(data)
            } else {
                ServerFrame::Pong(data)
            }
        }
        Some(FrameType::PeerGone) => {
            // Relays before the reason byte existed send only the key: that meant "disconnected".
            let reason = payload.get(KEY_LEN).copied().unwrap_or(frame::PEER_GONE_DISCONNECTED);
            ServerFrame::PeerGone {
                key: key(&payload),
                reason,
            }
        }
        Some(FrameType::PeerPresent) => {
            let mut present = ServerFrame::PeerPresent {
                key: key(&payload),
                ip: None,
                port: 0,
                flags: 0,
            };
            if payload.len() >= KEY_LEN + 18 {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&payload[KEY_LEN..KEY_LEN + 16]);
                let port = u16::from_be_bytes([payload[KEY_LEN + 16], payload[KEY_LEN + 17]]);
                let flags = payload.get(KEY_LEN + 18).copied().unwrap_or(0);
                present = ServerFrame::PeerPresent {
                    key: key(&payload),
                    ip: Some(ip),
                    port,
                    flags,
                };
            }
            present
        }
        Some(FrameType::Health) => ServerFrame::Health(String::from_utf8_lossy(&payload).into_owned()),
        Some(FrameType::Restarting) => ServerFrame::Restarting {
            reconnect_in_ms: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            try_for_ms: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
        },
        _ => ServerFrame::Other { frame_type, payload },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{read_client_info, server_info_frame};
    use tokio::net::TcpListener;

    #[test]
    fn url_forms() {
        let u = RelayUrl::parse("http://127.0.0.1:3340").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 3340, "/derp"));
        assert_eq!(u.authority, "127.0.0.1:3340");
        let u = RelayUrl::parse("http://relay.example/derp").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("relay.example", 80, "/derp")
        );
        assert_eq!(u.authority, "relay.example");
        let u = RelayUrl::parse("HTTP://[::1]:8080/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 8080, "/derp"));
        assert_eq!(u.addr(), "[::1]:8080");
        let u = RelayUrl::parse("http://h:1/prefix/derp?x=1#frag").unwrap();
        assert_eq!(u.path, "/prefix/derp?x=1");
        assert_eq!(RelayUrl::parse("http://h:1?x=1").unwrap().path, "/derp?x=1");
        assert!(!RelayUrl::parse("http://h").unwrap().tls);
        let u = RelayUrl::parse("HTTPS://relay.example").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.port, u.authority.as_str(), u.path.as_str()),
            (443, "relay.example", "/derp")
        );
        assert_eq!(RelayUrl::parse("https://h:8443/derp").unwrap().port, 8443);
    }

    #[test]
    fn relay_urls_have_one_identity() {
        for u in [
            "http://H:1",
            " http://h:1/ ",
            "HTTP://h:1/derp",
            "http://h:1/derp/",
            "http://h:1//",
        ] {
            let p = RelayUrl::parse_relay(u).unwrap();
            assert_eq!(p.base(), "http://h:1", "{u}");
            assert_eq!(p.path, "/derp", "{u}");
            assert!(!p.tls);
        }
        let p = RelayUrl::parse_relay("http://h:1/prefix/derp").unwrap();
        assert_eq!(
            (p.base().as_str(), p.path.as_str()),
            ("http://h:1/prefix", "/prefix/derp")
        );
        assert_eq!(
            RelayUrl::parse_relay("http://[::1]:80/").unwrap().base(),
            "http://[::1]:80"
        );
        assert!(RelayUrl::parse_relay("https://relay.example").unwrap().tls);
        for (bad, why) in [
            ("relay:80", "expected http"),
            ("ftp://h", "is not supported"),
            ("http://", "missing host"),
            ("http://u@h", "user info"),
        ] {
            let err = RelayUrl::parse_relay(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_options_check_the_private_ca() {
        assert!(TlsOptions::default().client_config().is_ok());
        let insecure = TlsOptions {
            insecure_skip_verify: true,
            ..Default::default()
        };
        assert!(insecure.client_config().is_ok());
        for (pem, why) in [
            (&b"not a pem"[..], "holds no"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "certificate #1",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                "certificate #1",
            ),
        ] {
            let tls = TlsOptions {
                ca_pem: Some(pem.to_vec()),
                insecure_skip_verify: false,
            };
            let err = tls.client_config().unwrap_err().to_string();
            assert!(err.starts_with("TLS settings: ") && err.contains(why), "{err}");
        }
        assert!(format!(
            "{:?}",
            TlsOptions {
                ca_pem: Some(vec![0; 3]),
                insecure_skip_verify: false
            }
        )
        .contains("3 bytes"));
    }

    #[tokio::test]
    async fn https_to_a_plain_http_server_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let key = KeyPair::generate();
        let err = dial(
            &format!("https://localhost:{}", addr.port()),
            &key,
            &ClientInfo::default(),
        )
        .await
        .err()
        .expect("a plain HTTP server cannot complete a TLS handshake");
        let msg = err.to_string();
        assert!(matches!(err, ClientError::Tls { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!("TLS handshake with localhost:{} failed: ", addr.port())),
            "{msg}"
        );
        assert!(msg.contains("use an http:// URL"), "{msg}");
    }

    #[test]
    fn bad_urls_say_why() {
        let err = RelayUrl::parse("wss://relay.example").unwrap_err().to_string();
        assert!(err.contains("\"wss\" is not supported"), "{err}");
        for (url, why) in [
            ("127.0.0.1:80", "expected http://host:port"),
            ("http://:80", "missing host"),
            ("http://h:99999", "port"),
            ("http://h:x", "port"),
            ("http://u@h:1", "user info"),
            ("http://[::1:1", "unterminated"),
        ] {
            let err = RelayUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn request_head() {
        let u = RelayUrl::parse("http://127.0.0.1:1/derp").unwrap();
        assert_eq!(
            u.request(false),
            "GET /derp HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        );
        assert!(u.request(true).ends_with("Derp-Fast-Start: 1\r\n\r\n"));
    }

    #[test]
    fn response_head_parsing() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nDerp-Version:  2 \r\n\r\n\x01\x00";
        let end = head_end(raw).unwrap();
        assert_eq!(&raw[end..], b"\x01\x00");
        let head = parse_response_head(&raw[..end]).unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.header("derp-version"), Some("2"));
        assert_eq!(head.header("upgrade"), Some("DERP"));
        assert_eq!(head_end(b"HTTP/1.1 101 OK\r\n"), None);

        let head = parse_response_head(b"HTTP/1.0 426 Upgrade Required\r\n\r\n").unwrap();
        assert_eq!(head.status, 426);
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 1O1 x\r\n\r\n",
            b"HTTP/2 101\r\n\r\n",
        ] {
            let err = parse_response_head(bad).unwrap_err();
            assert!(matches!(err, ClientError::BadStatusLine { .. }), "{err}");
        }
    }

    #[test]
    fn decodes_server_frames() {
        let decode = |b: Bytes| {
            let (t, _) = frame::read_header(&b).unwrap();
            decode_server_frame(t, BytesMut::from(&b[..]))
        };
        assert_eq!(
            decode(frame::recv_packet(&[3; 32], b"hi")).unwrap(),
            ServerFrame::Packet {
                src: [3; 32],
                data: Bytes::from_static(b"hi")
            }
        );
        assert_eq!(decode(frame::ping(&[7; 8])).unwrap(), ServerFrame::Ping([7; 8]));
        assert_eq!(
            decode(frame::peer_gone(&[1; 32], frame::PEER_GONE_NOT_HERE)).unwrap(),
            ServerFrame::PeerGone {
                key: [1; 32],
                reason: 1
            }
        );
        assert_eq!(
            decode(frame::peer_present(&[2; 32], &[9; 16], 443, 2)).unwrap(),
            ServerFrame::PeerPresent {
                key: [2; 32],
                ip: Some([9; 16]),
                port: 443,
                flags: 2
            }
        );
        assert_eq!(
            decode(frame::encode(FrameType::PeerPresent, &[&[2; 32]])).unwrap(),
            ServerFrame::PeerPresent {
                key: [2; 32],
                ip: None,
                port: 0,
                flags: 0
            }
        );
        assert_eq!(
            decode(frame::restarting(1, 2)).unwrap(),
            ServerFrame::Restarting {
                reconnect_in_ms: 1,
                try_for_ms: 2
            }
        );
        assert!(decode(frame::encode(FrameType::RecvPacket, &[&[0; 31]])).is_err());
    }

    /// A one-connection relay stand-in: optional 101, ServerKey, handshake, then echoes one packet
    /// back to its sender.
    async fn fake_server(fast_start_honoured: bool, status: &'static str) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let end = loop {
                read_more(&mut stream, &mut buf, "client").await.unwrap();
                if let Some(end) = head_end(&buf) {
                    break end;
                }
            };
            let request = String::from_utf8_lossy(&buf[..end]).to_string();
            assert!(request.starts_with("GET /derp HTTP/1.1\r\n"), "{request}");
            assert!(request.contains("\r\nUpgrade: DERP\r\n"));
            let fast = request.contains("Derp-Fast-Start: 1");
            let server = KeyPair::generate();
            let mut out = Vec::new();
            if !(fast && fast_start_honoured) {
                out.extend_from_slice(format!("HTTP/1.1 {status}\r\nUpgrade: DERP\r\n\r\n").as_bytes());
                if !status.starts_with("101") {
                    stream.write_all(&out).await.unwrap();
                    return;
                }
            }
            // The ServerKey frame goes out in the same write as the 101, as real relays do.
            out.extend_from_slice(&frame::server_key(server.public()));
            stream.write_all(&out).await.unwrap();
            let (r, w) = stream.into_split();
            let mut reader = FrameReader::new(Box::new(r), &buf[end..]);
            let mut writer: Writer = Box::new(w);
            let (client_key, _, shared) = read_client_info(&mut reader, &server).await.unwrap();
            crate::io::write_all(&mut writer, &server_info_frame(&shared, Default::default()))
                .await
                .unwrap();
            let (_, f) = reader.read_frame(MAX_FRAME_SIZE).await.unwrap();
            let packet = &f[HEADER_LEN + KEY_LEN..];
            crate::io::write_all(&mut writer, &frame::recv_packet(&client_key, packet))
                .await
                .unwrap();
        });
        (url, task)
    }

    async fn dial_and_echo(url: &str, fast_start: bool) {
        let key = KeyPair::generate();
        let info = ClientInfo {
            version: 2,
            ..Default::default()
        };
        let mut conn = dial_with(url, &key, &info, &DialOptions { fast_start }).await.unwrap();
        conn.send_packet(key.public(), b"hello").await.unwrap();
        assert_eq!(
            conn.recv().await.unwrap(),
            ServerFrame::Packet {
                src: *key.public(),
                data: Bytes::from_static(b"hello")
            }
        );
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn dials_with_101() {
        let (url, server) = fake_server(true, "101 Switching Protocols").await;
        dial_and_echo(&url, false).await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn dials_with_fast_start() {
        let (url, server) = fake_server(true, "101 Switching Protocols").await;
        dial_and_echo(&url, true).await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn fast_start_copes_with_a_server_that_sends_101_anyway() {
        let (url, server) = fake_server(false, "101 Switching Protocols").await;
        dial_and_echo(&url, true).await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn non_101_status_is_reported_with_its_line() {
        let (url, server) = fake_server(true, "426 Upgrade Required").await;
        let err = dial(&url, &KeyPair::generate(), &ClientInfo::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::BadStatus { status: 426, .. }), "{err}");
        assert!(err.to_string().contains("\"HTTP/1.1 426 Upgrade Required\""), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_connection_names_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = dial(&format!("http://{addr}"), &KeyPair::generate(), &ClientInfo::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!("connect to {addr} failed")),
            "{err}"
        );
    }
}
