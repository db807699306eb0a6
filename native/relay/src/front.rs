//! The front door for raw TCP connections Node accepted and handed over by descriptor: TLS (when a
//! certificate is set), then HTTP/1.1 request heads in a keep-alive loop.
//!
//! - `/derp` upgrades (DERP, fast start, WebSocket) are served here, by [`conn::serve`], with the
//!   bytes read past the request head;
//! - `/derp` without an upgrade, `/derp/probe`, `/derp/latency-check` and `/generate_204` are
//!   answered here, byte for byte as Node's `Relay.handleRequest` answers them (`src/relay.ts`);
//! - every other request (the operator API, `/metrics`, …) goes to Node as a decrypted stream: one
//!   end of a Unix socket pair, given to the [`HttpHandoff`] callback, the other end pumped to and
//!   from the client by this task, starting with the bytes already read.
//!
//! Nothing a client sends can panic this code; every way a connection ends early is counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::conn;
use crate::limits::Slot;
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::tls::{self, CertResolver, TlsError};
use crate::tlsio;
use crate::upgrade::{Stream, Transport, Upgrade};

/// A TLS handshake must complete within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head must be complete within this time of its first byte (of the connection, for
/// the first request): Node's head timeout (`src/http/server.ts`).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection may be idle this long between requests (Node's `keepAliveTimeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read here.
pub const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// Receives a connection for Node: one end of a Unix socket pair carrying the decrypted stream,
/// and the client's address.
#[cfg(unix)]
pub type HttpHandoff = Arc<dyn Fn(std::os::fd::OwnedFd, SocketAddr) + Send + Sync>;
#[cfg(not(unix))]
pub type HttpHandoff = Arc<dyn Fn(std::convert::Infallible, SocketAddr) + Send + Sync>;

struct TlsState {
    resolver: Arc<CertResolver>,
    config: Arc<rustls::ServerConfig>,
}

/// TLS settings and the hand-off to Node for one relay (held by [`crate::server::Server`]).
pub struct Front {
    relay: Arc<Relay>,
    /// Made with the first certificate (the meta certificate is generated then).
    tls: RwLock<Option<TlsState>>,
    handoff: RwLock<Option<HttpHandoff>>,
    /// How long a request head may take, in milliseconds ([`HEAD_TIMEOUT`] unless set).
    head_timeout_ms: AtomicU64,
}

impl Front {
    pub fn new(relay: Arc<Relay>) -> Front {
        Front {
            relay,
            tls: RwLock::new(None),
            handoff: RwLock::new(None),
            head_timeout_ms: AtomicU64::new(HEAD_TIMEOUT.as_millis() as u64),
        }
    }

    /// How long a request head may take on connections from now on (at least 1 ms).
    pub fn set_head_timeout(&self, timeout: Duration) {
        let ms = (timeout.as_millis() as u64).max(1);
        self.head_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Serves new connections with TLS and this pair (PEM chain, leaf first, and its key); live
    /// connections keep theirs. A pair that fails the checks is refused and the current one stays.
    pub fn set_certificate(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let mut tls = self.tls.write().unwrap_or_else(|p| p.into_inner());
        match &*tls {
            Some(state) => state.resolver.set(cert_pem, key_pem),
            None => {
                let resolver = Arc::new(CertResolver::new(self.relay.public_key())?);
                resolver.set(cert_pem, key_pem)?;
                let config = tls::server_config(resolver.clone())?;
                *tls = Some(TlsState { resolver, config });
                Ok(())
            }
        }
    }

    /// New connections are served without TLS.
    pub fn clear_certificate(&self) {
        if let Some(state) = &*self.tls.read().unwrap_or_else(|p| p.into_inner()) {
            state.resolver.clear();
        }
    }

    /// Whether new connections get TLS.
    pub fn has_certificate(&self) -> bool {
        self.tls_config().is_some()
    }

    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let tls = self.tls.read().unwrap_or_else(|p| p.into_inner());
        tls.as_ref().filter(|s| s.resolver.is_set()).map(|s| s.config.clone())
    }

    /// Where requests the core does not answer go; without one they get `404`.
    pub fn set_http_handoff(&self, handoff: Option<HttpHandoff>) {
        *self.handoff.write().unwrap_or_else(|p| p.into_inner()) = handoff;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.relay.metrics
    }

    /// Serves one raw TCP connection to its end.
    pub async fn serve(self: Arc<Front>, tcp: TcpStream, remote: SocketAddr) {
        self.serve_admitted(tcp, remote, None).await
    }

    /// [`Front::serve`], holding the connection's place under the accept limits until it ends (a
    /// DERP connection takes it along).
    pub async fn serve_admitted(self: Arc<Front>, tcp: TcpStream, remote: SocketAddr, slot: Option<Slot>) {
        Metrics::inc(&self.metrics().front_connections);
        let _ = tcp.set_nodelay(true);
        let Some(config) = self.tls_config() else {
            return self.serve_http(tcp, remote, slot).await;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tlsio::accept(tcp, config)).await {
            Err(_) => Metrics::inc(&self.metrics().tls_handshake_timeouts),
            Ok(Err(_)) => Metrics::inc(&self.metrics().tls_handshake_errors),
            Ok(Ok(stream)) => {
                Metrics::inc(&self.metrics().tls_handshakes);
                self.serve_http(stream, remote, slot).await
            }
        }
    }

    async fn serve_http<S: IntoTransport>(&self, mut stream: S, remote: SocketAddr, slot: Option<Slot>) {
        let m = self.metrics();
        let mut buf = BytesMut::with_capacity(4 << 10);
        let mut first = true;
        let head_timeout = Duration::from_millis(self.head_timeout_ms.load(Ordering::Relaxed));
        loop {
            let head = match read_head(&mut stream, &mut buf, first, head_timeout).await {
                Ok(head) => head,
                Err(HeadError::Closed) => return,
                Err(HeadError::Timeout) => return Metrics::inc(&m.http_head_timeouts),
                Err(HeadError::Malformed) => {
                    Metrics::inc(&m.http_bad_requests);
                    let _ = respond(&mut stream, BAD_REQUEST).await;
                    return;
                }
            };
            first = false;
            match self.route(&head) {
                Route::Derp(upgrade) => {
                    buf.advance(head.len);
                    let transport = stream.into_transport();
                    // A task of its own: this one (sized for the TLS handshake and the head reads)
                    // ends here instead of being held for the connection's life.
                    let relay = self.relay.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        conn::serve(relay, transport, buf.freeze(), upgrade, remote).await
                    });
                    return;
                }
                Route::Answer(response, keep_alive) => {
                    Metrics::inc(&m.http_requests_answered);
                    if respond(&mut stream, &response).await.is_err() || !keep_alive {
                        let _ = stream.shutdown().await;
                        return;
                    }
                    buf.advance(head.len);
                }
                Route::Node => return self.hand_to_node(stream, buf, remote, head.method == "HEAD").await,
            }
        }
    }

    /// What to do with a request, as Node's server and `Relay` would (`src/http/server.ts`,
    /// `src/relay.ts`).
    fn route(&self, head: &Head) -> Route {
        let path = head.path.split('?').next().unwrap_or("");
        let derp_path = path == "/derp" || path == "/derp/";
        if head.is_upgrade() {
            // Node's `upgrade` event: `Relay.handleUpgrade` for /derp, Node's 404 for other paths
            // (and whatever Node does with a CONNECT).
            if !derp_path || head.method == "CONNECT" {
                return Route::Node;
            }
            if self.relay.is_closing() {
                return Route::Answer(
                    raw_refusal(
                        "503 Service Unavailable",
                        "relay is shutting down",
                        head.method == "HEAD",
                    ),
                    false,
                );
            }
            return match head.derp_upgrade() {
                Some(upgrade) => Route::Derp(upgrade),
                None => Route::Answer(
                    raw_refusal(
                        "426 Upgrade Required",
                        "DERP requires connection upgrade",
                        head.method == "HEAD",
                    ),
                    false,
                ),
            };
        }
        // A body to skip: leave the request to Node, which reads it.
        if head.has_body {
            return Route::Node;
        }
        let keep_alive = head.keep_alive();
        let date = http_date(std::time::SystemTime::now());
        let response = |status: &str, headers: &[(&str, &str)], body: Option<&str>, keep_alive: bool| {
            node_response(&NodeResponse {
                status,
                headers,
                body,
                head_method: head.method == "HEAD",
                http10: head.minor == 0,
                keep_alive,
                date: &date,
            })
        };
        if derp_path {
            let headers = [("Content-Type", "text/plain"), ("Connection", "close")];
            return Route::Answer(
                response(
                    "426 Upgrade Required",
                    &headers,
                    Some("DERP requires connection upgrade"),
                    false,
                ),
                false,
            );
        }
        match path {
            "/derp/probe" | "/derp/latency-check" => {
                if head.method != "GET" && head.method != "HEAD" {
                    let headers = [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")];
                    // Node cannot chunk for HTTP/1.0: such a body ends with the connection.
                    let keep_alive = keep_alive && head.minor == 1;
                    let r = response(
                        "405 Method Not Allowed",
                        &headers,
                        Some("bogus probe method"),
                        keep_alive,
                    );
                    return Route::Answer(r, keep_alive);
                }
                let headers = [("Access-Control-Allow-Origin", "*"), ("Content-Length", "0")];
                Route::Answer(response("200 OK", &headers, None, keep_alive), keep_alive)
            }
            "/generate_204" => {
                let mut headers = vec![(
                    "Cache-Control",
                    "no-cache, no-store, must-revalidate, no-transform, max-age=0",
                )];
                let answer = head
                    .challenge
                    .as_deref()
                    .filter(|c| valid_challenge(c))
                    .map(|c| format!("response {c}"));
                if let Some(a) = &answer {
                    headers.push(("X-Tailscale-Response", a));
                }
                Route::Answer(response("204 No Content", &headers, None, keep_alive), keep_alive)
            }
            _ => Route::Node,
        }
    }

    /// Gives the rest of the connection to Node as a decrypted stream (see the module docs).
    #[cfg(unix)]
    async fn hand_to_node<S: Stream>(&self, stream: S, buffered: BytesMut, remote: SocketAddr, head_method: bool) {
        let m = self.metrics();
        let handoff = self.handoff.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut stream = stream;
        let Some(handoff) = handoff else {
            let _ = respond(&mut stream, not_found(head_method)).await;
            return;
        };
        let Ok((ours, theirs)) = std::os::unix::net::UnixStream::pair() else {
            return Metrics::inc(&m.http_handoff_failures);
        };
        let ours = match ours
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(ours))
        {
            Ok(s) => s,
            Err(_) => return Metrics::inc(&m.http_handoff_failures),
        };
        Metrics::inc(&m.connections_handed_to_node);
        handoff(theirs.into(), remote);
        let (mut node_r, mut node_w) = ours.into_split();
        let (mut client_r, mut client_w) = tokio::io::split(stream);
        let up = async {
            if node_w.write_all(&buffered).await.is_ok() {
                let _ = tokio::io::copy(&mut client_r, &mut node_w).await;
            }
            let _ = node_w.shutdown().await;
        };
        let down = async {
            let _ = tokio::io::copy(&mut node_r, &mut client_w).await;
            let _ = client_w.shutdown().await;
        };
        tokio::pin!(up, down);
        // Node closing its side ends the exchange; the client closing its side lets Node finish.
        tokio::select! {
            _ = &mut down => {}
            _ = &mut up => down.await,
        }
    }

    #[cfg(not(unix))]
    async fn hand_to_node<S: Stream>(
        &self,
        mut stream: S,
        _buffered: BytesMut,
        _remote: SocketAddr,
        head_method: bool,
    ) {
        let _ = respond(&mut stream, not_found(head_method)).await;
    }
}

/// A stream the relay can serve DERP on.
pub trait IntoTransport: Stream {
    fn into_transport(self) -> Transport;
}

impl IntoTransport for TcpStream {
    fn into_transport(self) -> Transport {
        Transport::Tcp(self)
    }
}

impl IntoTransport for tlsio::TlsStream {
    fn into_transport(self) -> Transport {
        Transport::Tls(Box::new(self))
    }
}

enum Route {
    Derp(Upgrade),
    /// A response, and whether the connection stays open for another request.
    Answer(Vec<u8>, bool),
    Node,
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const NOT_FOUND: &[u8] =
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n";

/// The 404 for a request nobody serves (no Node behind the front); a HEAD request gets its head
/// only (RFC 9110 §9.3.2: the Content-Length is that of the GET's body, which is not sent).
fn not_found(head_method: bool) -> &'static [u8] {
    if head_method {
        &NOT_FOUND[..NOT_FOUND.len() - b"not found\n".len()]
    } else {
        NOT_FOUND
    }
}

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) -> std::io::Result<()> {
    stream.write_all(response).await?;
    stream.flush().await
}

/// What `Relay.handleUpgrade` writes when it refuses an upgrade (`rawRefusal` in `src/relay.ts`: a
/// raw response, then close); to a HEAD request, the head only.
fn raw_refusal(status: &str, body: &str, head_method: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_method { "" } else { body }
    )
    .into_bytes()
}

struct NodeResponse<'a> {
    status: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Option<&'a str>,
    head_method: bool,
    http10: bool,
    keep_alive: bool,
    date: &'a str,
}

/// A response laid out as Node's `res.writeHead(status, headers).end(body)` lays it out: the given
/// headers, `Date`, the connection headers unless given, then the body (chunked for HTTP/1.1 when
/// its length was not given).
fn node_response(r: &NodeResponse) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {}\r\n", r.status);
    let has = |name: &str| r.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    for (name, value) in r.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Date: {}\r\n", r.date));
    if !has("Connection") {
        if r.keep_alive {
            out.push_str(&format!(
                "Connection: keep-alive\r\nKeep-Alive: timeout={}\r\n",
                IDLE_TIMEOUT.as_secs()
            ));
        } else {
            out.push_str("Connection: close\r\n");
        }
    }
    let chunked = r.body.is_some() && !has("Content-Length") && !r.http10;
    if chunked {
        out.push_str("Transfer-Encoding: chunked\r\n");
    }
    out.push_str("\r\n");
    if let (Some(body), false) = (r.body, r.head_method) {
        if chunked {
            out.push_str(&format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()));
        } else {
            out.push_str(body);
        }
    }
    out.into_bytes()
}

/// `X-Tailscale-Challenge`: 1–64 characters from `[A-Za-z0-9._:-]`.
fn valid_challenge(c: &str) -> bool {
    (1..=64).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The parts of a request head the routing looks at.
#[derive(Debug, Default)]
struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    method: String,
    path: String,
    minor: u8,
    upgrade: Option<String>,
    /// `Connection` tokens, lower-cased.
    connection: Vec<String>,
    fast_start: Option<String>,
    websocket_key: Option<String>,
    websocket_protocols: Option<String>,
    challenge: Option<String>,
    has_body: bool,
}

impl Head {
    /// Whether Node would emit `upgrade` for it: an `Upgrade` header and `Connection: upgrade`
    /// (or a CONNECT, which is never ours).
    fn is_upgrade(&self) -> bool {
        self.method == "CONNECT" || (self.upgrade.is_some() && self.connection.iter().any(|t| t == "upgrade"))
    }

    fn keep_alive(&self) -> bool {
        let has = |token: &str| self.connection.iter().any(|t| t == token);
        if self.minor == 0 {
            has("keep-alive")
        } else {
            !has("close")
        }
    }

    /// `Relay.#classify`: DERP, fast start or WebSocket with the `derp` subprotocol; `None` for
    /// any other `Upgrade`.
    fn derp_upgrade(&self) -> Option<Upgrade> {
        let upgrade = self.upgrade.as_deref().unwrap_or("").to_ascii_lowercase();
        if upgrade == "websocket" {
            let derp = self
                .websocket_protocols
                .as_deref()
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim() == "derp");
            if let (true, Some(key)) = (derp, self.websocket_key.as_deref().filter(|k| !k.is_empty())) {
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                return Some(Upgrade::WebSocket { accept });
            }
        } else if upgrade != "derp" {
            return None;
        }
        Some(Upgrade::Derp {
            fast_start: self.fast_start.as_deref() == Some("1"),
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The connection ended (or idled out) between requests.
    Closed,
    Timeout,
    Malformed,
}

/// Reads until `buf` holds a whole request head (bytes past it stay in `buf`). The first head of a
/// connection must be complete within `head_timeout`; a later one may wait [`IDLE_TIMEOUT`] for
/// its first byte, then gets `head_timeout`.
async fn read_head<S: Stream>(
    stream: &mut S,
    buf: &mut BytesMut,
    first: bool,
    head_timeout: Duration,
) -> Result<Head, HeadError> {
    let mut deadline = (first || !buf.is_empty()).then(|| Instant::now() + head_timeout);
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(HeadError::Malformed);
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4 << 10);
        }
        let (until, on_expiry) = match deadline {
            Some(d) => (d, HeadError::Timeout),
            None => (Instant::now() + IDLE_TIMEOUT, HeadError::Closed),
        };
        let limit = MAX_HEAD - buf.len();
        let read = async {
            let mut chunk = (&mut *stream).take(limit as u64);
            chunk.read_buf(buf).await
        };
        match tokio::time::timeout_at(until, read).await {
            Err(_) => return Err(on_expiry),
            Ok(Ok(0)) if buf.is_empty() => return Err(HeadError::Closed),
            // A head cut short: nothing to answer.
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HeadError::Closed),
            Ok(Ok(_)) => {
                deadline.get_or_insert_with(|| Instant::now() + head_timeout);
            }
        }
    }
}

/// A complete head at the start of `buf`, `None` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed),
    };
    let mut head = Head {
        len,
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        minor: req.version.unwrap_or(1),
        ..Head::default()
    };
    // Repeated headers are joined with ", ", as Node joins them.
    let join = |slot: &mut Option<String>, value: &str| match slot {
        Some(v) => {
            v.push_str(", ");
            v.push_str(value);
        }
        None => *slot = Some(value.to_string()),
    };
    for h in req.headers.iter() {
        // Node reads header values as Latin-1; none of the values looked at here needs more.
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            join(&mut head.upgrade, value);
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection
                .extend(value.split(',').map(|t| t.trim().to_ascii_lowercase()));
        } else if name.eq_ignore_ascii_case("derp-fast-start") {
            join(&mut head.fast_start, value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            join(&mut head.websocket_key, value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            join(&mut head.websocket_protocols, value);
        } else if name.eq_ignore_ascii_case("x-tailscale-challenge") {
            join(&mut head.challenge, value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.has_body = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            head.has_body |= value != "0";
        }
    }
    Ok(Some(head))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), as Node writes `Date`.
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Bytes of a request, for tests.
#[cfg(test)]
fn head_of(s: &str) -> Head {
    parse_head(s.as_bytes()).unwrap().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdates() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_910_400 + 3_723);
        assert_eq!(http_date(t), "Sun, 29 Nov 2026 01:02:03 GMT");
    }

    #[test]
    fn heads_parse_and_classify() {
        let h = head_of("GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\nxyz");
        assert!(h.is_upgrade());
        assert_eq!(h.derp_upgrade(), Some(Upgrade::Derp { fast_start: true }));
        assert_eq!(h.len, 78);
        let h = head_of("GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: x, derp\r\n\r\n");
        assert_eq!(
            h.derp_upgrade(),
            Some(Upgrade::WebSocket {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
            })
        );
        let h = head_of("GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        assert_eq!(h.derp_upgrade(), Some(Upgrade::Derp { fast_start: false }));
        let h = head_of("GET /derp HTTP/1.1\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n");
        assert_eq!(h.derp_upgrade(), None);
        let h = head_of("GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n");
        assert!(!h.is_upgrade(), "no Connection: upgrade, no upgrade (as in Node)");
        assert!(h.keep_alive());
        assert!(!head_of("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(head_of("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
        assert!(head_of("POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n").has_body);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().map(|h| h.len),
            None
        );
        assert_eq!(parse_head(b"GARBAGE\r\n\r\n").err(), Some(HeadError::Malformed));
        // Latin-1 in a header value (Node takes it): not a bad request.
        let latin1 = parse_head(b"GET /status HTTP/1.1\r\nCookie: caf\xe9\r\n\r\n").unwrap();
        assert!(latin1.is_some());
    }

    #[test]
    fn routes_follow_node() {
        let front = Front::new(Relay::new(crate::keys::KeyPair::generate(), Default::default()));
        let route = |req: &str| front.route(&head_of(req));
        assert!(matches!(route("CONNECT /derp HTTP/1.1\r\n\r\n"), Route::Node));
        assert!(matches!(route("GET /status HTTP/1.1\r\n\r\n"), Route::Node));
        assert!(matches!(route("GET /derp/probe/x HTTP/1.1\r\n\r\n"), Route::Node));
        assert!(matches!(
            route("POST /derp/probe HTTP/1.1\r\nContent-Length: 2\r\n\r\n"),
            Route::Node
        ));
        assert!(matches!(
            route("GET /api HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            Route::Node
        ));
        assert!(matches!(
            route("GET /derp/probe HTTP/1.1\r\n\r\n"),
            Route::Answer(_, true)
        ));
        assert!(matches!(route("GET /derp HTTP/1.1\r\n\r\n"), Route::Answer(_, false)));
        assert!(matches!(
            route("GET /derp/ HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"),
            Route::Derp(Upgrade::Derp { fast_start: false })
        ));
    }

    #[test]
    fn responses_are_laid_out_as_node_does() {
        let r = node_response(&NodeResponse {
            status: "405 Method Not Allowed",
            headers: &[("Allow", "GET, HEAD"), ("Content-Type", "text/plain")],
            body: Some("bogus probe method"),
            head_method: false,
            http10: false,
            keep_alive: true,
            date: "D",
        });
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain\r\nDate: D\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n12\r\nbogus probe method\r\n0\r\n\r\n"
        );
        let r = node_response(&NodeResponse {
            status: "426 Upgrade Required",
            headers: &[("Content-Type", "text/plain"), ("Connection", "close")],
            body: Some("DERP requires connection upgrade"),
            head_method: false,
            http10: false,
            keep_alive: false,
            date: "D",
        });
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\nConnection: close\r\nDate: D\r\nTransfer-Encoding: chunked\r\n\r\n20\r\nDERP requires connection upgrade\r\n0\r\n\r\n"
        );
        assert!(valid_challenge("abc:1.2-x_y"));
        assert!(!valid_challenge("a b"));
        assert!(!valid_challenge(""));
        assert!(!valid_challenge(&"a".repeat(65)));
    }
}
