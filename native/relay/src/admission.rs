//! Client admission: before a client is registered, an HTTP endpoint says whether its node key may
//! use this relay — derper's `--verify-client-url`.
//!
//! The relay POSTs Tailscale's `tailcfg.DERPAdmitClientRequest`, `{"NodePublic":"nodekey:<hex>",
//! "Source":"<client IP>"}`, and reads `tailcfg.DERPAdmitClientResponse`, `{"Allow":bool}` (field
//! names matched case-insensitively, as Go's decoder does), so Headscale's `/verify` and existing
//! derper admission services answer unchanged. Mesh peers are never asked about (the caller skips
//! them). Around the request: a decision cache per (key, IP), a bound on requests in flight (excess
//! waits [`AdmissionSettings::queue_wait`], then counts as the endpoint being unavailable), a
//! timeout, and fail-open or fail-closed when the endpoint is unavailable.
//!
//! What counts as what (derper's rules, except where noted):
//! - 2xx with `{"Allow": true}` admits, `{"Allow": false}` (or no `Allow`) rejects (`denied`);
//! - 4xx rejects (`status`): the endpoint answered, and refused;
//! - no connection, no answer in time, 1xx/3xx/5xx, or a 2xx body that is not such an object: the
//!   endpoint is unavailable and `fail_open` decides. (derper fails open only when the endpoint
//!   cannot be reached, and rejects on 5xx and bad JSON.) Redirects are not followed.
//!
//! The HTTP client is a small HTTP/1.1 one over tokio (TLS through [`crate::tlsio`]): one request per
//! connection at a time, idle connections kept briefly for the next request, response bodies read up
//! to 4 KiB (as derper).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::client::{split_http_url, TlsOptions, UrlProblem};
use crate::io::{Reader, Writer};
use crate::keys::Key;
use crate::metrics::Metrics;
use crate::tlsio;

/// derper's limit for one admission request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Response bodies are read up to this size (derper reads 4 KiB).
pub const MAX_BODY: usize = 4 << 10;
/// A response head larger than this is not an admission endpoint talking.
const MAX_HEAD: usize = 16 << 10;
/// Decisions kept at most; past it, expired ones go, then all.
const CACHE_CAPACITY: usize = 16_384;
/// Idle connections kept per endpoint, and for how long (under the 5 s idle timeout of Node's HTTP
/// server, so a kept connection is rarely one the server is closing).
const MAX_IDLE: usize = 16;
const IDLE_FOR: Duration = Duration::from_secs(4);
/// Log events: a burst, then one per interval; the rest are counted in the next event.
const EVENT_BURST: f64 = 5.0;
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// How admission works now. `url: None` turns it off.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// `http://` or `https://` URL the requests are POSTed to; `None` or empty: every client is admitted.
    pub url: Option<String>,
    /// Admit clients when the endpoint is unavailable (unreachable, timed out, broken answer, busy).
    pub fail_open: bool,
    /// Limit for one request: connecting, TLS, sending and the whole answer.
    pub timeout: Duration,
    /// How long an answer (allow or deny) is reused for the same key from the same IP; zero: never.
    pub cache_ttl: Duration,
    /// Requests in flight at most.
    pub max_concurrent: usize,
    /// How long a check waits for one of those when all are taken before the endpoint counts as
    /// unavailable.
    pub queue_wait: Duration,
    /// Trust for `https://` URLs.
    pub tls: TlsOptions,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings {
            url: None,
            fail_open: true,
            timeout: DEFAULT_TIMEOUT,
            cache_ttl: Duration::from_secs(5),
            max_concurrent: 32,
            queue_wait: Duration::from_secs(1),
            tls: TlsOptions::default(),
        }
    }
}

/// Settings the relay cannot use; the current ones stay.
#[derive(Debug)]
pub enum AdmissionError {
    InvalidUrl { url: String, reason: &'static str },
    Tls { reason: String },
}

impl AdmissionError {
    pub fn code(&self) -> &'static str {
        match self {
            AdmissionError::InvalidUrl { .. } => "invalid_url",
            AdmissionError::Tls { .. } => "tls",
        }
    }
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmissionError::InvalidUrl { url, reason } => write!(f, "admission URL {url:?}: {reason}"),
            AdmissionError::Tls { reason } => write!(f, "admission URL TLS settings: {reason}"),
        }
    }
}

impl std::error::Error for AdmissionError {}

/// Why a client was refused; `code` is the metric suffix and the log's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The endpoint answered `{"Allow": false}`.
    Denied,
    /// The endpoint answered 4xx.
    Status,
    /// Fail-closed: the endpoint could not be reached or answered something unusable.
    EndpointError,
    /// Fail-closed: no answer within the timeout.
    Timeout,
    /// Fail-closed: every request slot stayed taken for the queue wait.
    Busy,
}

impl Rejection {
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Denied => "denied",
            Rejection::Status => "status",
            Rejection::EndpointError => "endpoint_error",
            Rejection::Timeout => "timeout",
            Rejection::Busy => "busy",
        }
    }

    fn counter(self, m: &Metrics) -> &AtomicU64 {
        match self {
            Rejection::Denied => &m.admission_rejected_denied,
            Rejection::Status => &m.admission_rejected_status,
            Rejection::EndpointError => &m.admission_rejected_endpoint_error,
            Rejection::Timeout => &m.admission_rejected_timeout,
            Rejection::Busy => &m.admission_rejected_busy,
        }
    }
}

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Rejected,
    /// The endpoint was unavailable and `fail_open` admitted the client.
    AdmittedFailOpen,
}

/// One rejection or fail-open admission, for the operator's log. Rate-limited: `suppressed` counts
/// the events dropped since the previous one.
#[derive(Debug, Clone)]
pub struct AdmissionEvent {
    pub outcome: Outcome,
    /// The rejection's code; for a fail-open admission, the code the rejection would have had.
    pub reason: Rejection,
    /// The first 8 hex characters of the client's key (never the whole key).
    pub key_prefix: String,
    pub source: IpAddr,
    /// What the endpoint did, e.g. "HTTP 503" or "connection refused".
    pub detail: String,
    pub suppressed: u64,
}

pub type EventSink = Arc<dyn Fn(AdmissionEvent) + Send + Sync>;

/// The admission URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// As written, for the `Host` header.
    authority: String,
    /// Path and query, `/` when the URL has none.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, AdmissionError> {
        let invalid = |reason| AdmissionError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let parts = split_http_url(url).map_err(|problem| match problem {
            UrlProblem::NoScheme => invalid("expected http:// or https://"),
            UrlProblem::Scheme(_) => invalid("the scheme must be http or https"),
            UrlProblem::Invalid(reason) => invalid(reason),
        })?;
        let path = match parts.tail {
            "" => "/".to_string(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_string(),
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(invalid("the path must not contain spaces or control characters"));
        }
        Ok(Target {
            tls: parts.tls,
            host: parts.host.to_string(),
            port: parts.port,
            authority: parts.authority.to_string(),
            path,
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One HTTP/1.1 connection to the endpoint; `buf` holds bytes read past the last response.
struct HttpConn {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
}

/// The endpoint in force: its settings, its request slots and its idle connections.
struct Endpoint {
    target: Target,
    url: String,
    fail_open: bool,
    timeout: Duration,
    cache_ttl: Duration,
    queue_wait: Duration,
    max_concurrent: usize,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    slots: Semaphore,
    idle: Mutex<Vec<(HttpConn, Instant)>>,
    generation: u64,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    entries: HashMap<(Key, IpAddr), (bool, Instant)>,
}

struct EventLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// A relay's admission control. Off until [`Admission::set`] gives it a URL.
pub struct Admission {
    endpoint: RwLock<Option<Arc<Endpoint>>>,
    cache: Mutex<Cache>,
    generation: AtomicU64,
    events: RwLock<Option<EventSink>>,
    limiter: Mutex<EventLimiter>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            endpoint: RwLock::new(None),
            cache: Mutex::new(Cache::default()),
            generation: AtomicU64::new(0),
            events: RwLock::new(None),
            limiter: Mutex::new(EventLimiter {
                tokens: EVENT_BURST,
                last: Instant::now(),
                suppressed: 0,
            }),
        }
    }
}

/// Holds the in-flight gauge up while a request runs, however it ends.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        Metrics::inc(gauge);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        Metrics::dec(self.0);
    }
}

/// What the endpoint said.
enum Answer {
    Allow(bool),
    /// A 4xx status.
    Refused(u16),
}

/// Why a request got no usable answer (the endpoint is unavailable).
struct Failure {
    detail: String,
    /// Nothing came back on a reused connection: the server may have closed it while idle, so the
    /// request is worth one more try on a new connection.
    retry: bool,
}

impl Failure {
    fn new(detail: impl Into<String>) -> Failure {
        Failure {
            detail: detail.into(),
            retry: false,
        }
    }
}

impl Admission {
    /// Replaces the settings; the decision cache and idle connections of the previous URL go.
    /// Checks in flight finish with the settings they started with. A bad URL or TLS setting is
    /// refused and the current settings stay.
    pub fn set(&self, settings: AdmissionSettings) -> Result<(), AdmissionError> {
        let url = settings.url.as_deref().map(str::trim).filter(|u| !u.is_empty());
        let endpoint = match url {
            None => None,
            Some(url) => {
                let target = Target::parse(url)?;
                let tls = if target.tls {
                    let config = settings
                        .tls
                        .client_config()
                        .map_err(|e| AdmissionError::Tls { reason: e.to_string() })?;
                    let name = ServerName::try_from(target.host.clone()).map_err(|_| AdmissionError::InvalidUrl {
                        url: url.to_string(),
                        reason: "the host is not a valid TLS server name",
                    })?;
                    Some((config, name))
                } else {
                    None
                };
                Some(Arc::new(Endpoint {
                    target,
                    url: url.to_string(),
                    fail_open: settings.fail_open,
                    timeout: settings.timeout,
                    cache_ttl: settings.cache_ttl,
                    queue_wait: settings.queue_wait,
                    max_concurrent: settings.max_concurrent.max(1),
                    tls,
                    slots: Semaphore::new(settings.max_concurrent.max(1)),
                    idle: Mutex::new(Vec::new()),
                    generation: self.generation.fetch_add(1, Relaxed) + 1,
                }))
            }
        };
        let mut cache = self.cache.lock().unwrap();
        cache.entries.clear();
        cache.generation = endpoint.as_ref().map_or(0, |e| e.generation);
        *self.endpoint.write().unwrap() = endpoint;
        Ok(())
    }

    /// The URL in force, if admission is on.
    pub fn url(&self) -> Option<String> {
        self.endpoint.read().unwrap().as_ref().map(|e| e.url.clone())
    }

    /// Where rejections and fail-open admissions are reported (rate-limited), for the log.
    pub fn set_event_sink(&self, sink: Option<EventSink>) {
        *self.events.write().unwrap() = sink;
    }

    /// Whether the client `key` connecting from `ip` may be registered. `Err` says why not; the
    /// counters and the event are taken care of.
    /// Whether a verify URL is set (clients are checked).
    pub fn is_enabled(&self) -> bool {
        self.endpoint.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub async fn check(&self, metrics: &Metrics, key: &Key, ip: IpAddr) -> Result<(), Rejection> {
        let Some(endpoint) = self.endpoint.read().unwrap().clone() else {
            return Ok(());
        };
        let ip = ip.to_canonical();
        Metrics::inc(&metrics.admission_checks);
        if let Some(allow) = self.cached(key, ip) {
            Metrics::inc(&metrics.admission_cache_hits);
            return self.decided(metrics, &endpoint, key, ip, allow, false);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(endpoint.queue_wait, endpoint.slots.acquire()).await else {
            let detail = format!(
                "all {} request slots stayed taken for {} ms",
                endpoint.max_concurrent,
                endpoint.queue_wait.as_millis()
            );
            return self.unavailable(metrics, &endpoint, key, ip, Rejection::Busy, detail);
        };
        // Another check of the same client may have been answered while this one waited.
        if let Some(allow) = self.cached(key, ip) {
            Metrics::inc(&metrics.admission_cache_hits);
            return self.decided(metrics, &endpoint, key, ip, allow, false);
        }
        Metrics::inc(&metrics.admission_requests);
        let in_flight = InFlight::new(&metrics.admission_in_flight);
        let answer = tokio::time::timeout(endpoint.timeout, endpoint.ask(key, ip)).await;
        drop(in_flight);
        match answer {
            Ok(Ok(Answer::Allow(allow))) => self.decided(metrics, &endpoint, key, ip, allow, true),
            Ok(Ok(Answer::Refused(status))) => {
                self.reject(metrics, Rejection::Status, key, ip, format!("HTTP {status}"))
            }
            Ok(Err(failure)) => {
                Metrics::inc(&metrics.admission_endpoint_errors);
                self.unavailable(metrics, &endpoint, key, ip, Rejection::EndpointError, failure.detail)
            }
            Err(_) => {
                Metrics::inc(&metrics.admission_endpoint_errors);
                let detail = format!("no answer within {} ms", endpoint.timeout.as_millis());
                self.unavailable(metrics, &endpoint, key, ip, Rejection::Timeout, detail)
            }
        }
    }

    fn cached(&self, key: &Key, ip: IpAddr) -> Option<bool> {
        let cache = self.cache.lock().unwrap();
        let (allow, expires) = cache.entries.get(&(*key, ip))?;
        (*expires > Instant::now()).then_some(*allow)
    }

    fn decided(
        &self,
        metrics: &Metrics,
        endpoint: &Endpoint,
        key: &Key,
        ip: IpAddr,
        allow: bool,
        fresh: bool,
    ) -> Result<(), Rejection> {
        if fresh && !endpoint.cache_ttl.is_zero() {
            let now = Instant::now();
            let mut cache = self.cache.lock().unwrap();
            // An answer from a URL that has since been replaced is not kept.
            if cache.generation == endpoint.generation {
                if cache.entries.len() >= CACHE_CAPACITY {
                    cache.entries.retain(|_, (_, expires)| *expires > now);
                    if cache.entries.len() >= CACHE_CAPACITY {
                        cache.entries.clear();
                    }
                }
                cache.entries.insert((*key, ip), (allow, now + endpoint.cache_ttl));
            }
        }
        if allow {
            Metrics::inc(&metrics.admission_allowed);
            Ok(())
        } else {
            let detail = if fresh {
                "the endpoint answered Allow: false"
            } else {
                "the endpoint answered Allow: false (cached)"
            };
            self.reject(metrics, Rejection::Denied, key, ip, detail.to_string())
        }
    }

    fn unavailable(
        &self,
        metrics: &Metrics,
        endpoint: &Endpoint,
        key: &Key,
        ip: IpAddr,
        reason: Rejection,
        detail: String,
    ) -> Result<(), Rejection> {
        if endpoint.fail_open {
            Metrics::inc(&metrics.admission_admitted_fail_open);
            self.report(Outcome::AdmittedFailOpen, reason, key, ip, detail);
            Ok(())
        } else {
            self.reject(metrics, reason, key, ip, detail)
        }
    }

    fn reject(
        &self,
        metrics: &Metrics,
        reason: Rejection,
        key: &Key,
        ip: IpAddr,
        detail: String,
    ) -> Result<(), Rejection> {
        Metrics::inc(reason.counter(metrics));
        self.report(Outcome::Rejected, reason, key, ip, detail);
        Err(reason)
    }

    fn report(&self, outcome: Outcome, reason: Rejection, key: &Key, ip: IpAddr, detail: String) {
        let Some(sink) = self.events.read().unwrap().clone() else {
            return;
        };
        let suppressed = {
            let mut l = self.limiter.lock().unwrap();
            let now = Instant::now();
            let refill = now.duration_since(l.last).as_secs_f64() / EVENT_INTERVAL.as_secs_f64();
            l.tokens = (l.tokens + refill).min(EVENT_BURST);
            l.last = now;
            if l.tokens < 1.0 {
                l.suppressed += 1;
                return;
            }
            l.tokens -= 1.0;
            std::mem::take(&mut l.suppressed)
        };
        sink(AdmissionEvent {
            outcome,
            reason,
            key_prefix: hex::encode(&key[..4]),
            source: ip,
            detail,
            suppressed,
        });
    }
}

/// The request body: Tailscale's `tailcfg.DERPAdmitClientRequest`.
pub fn request_body(key: &Key, ip: IpAddr) -> String {
    serde_json::json!({
        "NodePublic": format!("nodekey:{}", hex::encode(key)),
        "Source": ip.to_string(),
    })
    .to_string()
}

/// Reads `tailcfg.DERPAdmitClientResponse` from a 2xx body the way Go's decoder does: the first JSON
/// value, an object whose `Allow` (any case) is a boolean; absent or null means false.
pub fn parse_answer(body: &[u8]) -> Result<bool, String> {
    let first = serde_json::Deserializer::from_slice(body).into_iter::<Value>().next();
    let shown = || String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
    let Some(Ok(value)) = first else {
        return Err(format!("the answer is not JSON: {:?}", shown()));
    };
    let Value::Object(fields) = value else {
        return Err(format!("the answer is not a JSON object: {:?}", shown()));
    };
    let allow = fields.get("Allow").or_else(|| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("allow"))
            .map(|(_, v)| v)
    });
    match allow {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("\"Allow\" is not a boolean: {:?}", shown())),
    }
}

impl Endpoint {
    /// One POST, retried once on a new connection when a reused one turned out to be closed.
    async fn ask(&self, key: &Key, ip: IpAddr) -> Result<Answer, Failure> {
        let body = request_body(key, ip);
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpmesh\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{}",
            self.target.path,
            self.target.authority,
            body.len(),
            body
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (conn, reused) = match self.take_idle() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match self.exchange(conn, request.as_bytes(), reused).await {
                Err(f) if f.retry && attempt == 1 => continue,
                other => return other,
            }
        }
    }

    fn take_idle(&self) -> Option<HttpConn> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE_FOR {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: HttpConn) {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|(_, since)| since.elapsed() < IDLE_FOR);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<HttpConn, Failure> {
        let addr = self.target.addr();
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| Failure::new(format!("cannot connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (reader, writer): (Reader, Writer) = match &self.tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Some((config, name)) => {
                let stream = tlsio::connect(tcp, config.clone(), name.clone()).await.map_err(|e| {
                    Failure::new(format!("TLS handshake with {addr} failed: {}", std::io::Error::from(e)))
                })?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        Ok(HttpConn {
            reader,
            writer,
            buf: BytesMut::with_capacity(1024),
        })
    }

    async fn exchange(&self, mut conn: HttpConn, request: &[u8], reused: bool) -> Result<Answer, Failure> {
        let nothing_back = |detail: String, received: bool| Failure {
            detail,
            retry: reused && !received,
        };
        if let Err(e) = crate::io::write_all(&mut conn.writer, request).await {
            return Err(nothing_back(format!("sending the request failed: {e}"), false));
        }
        let response = read_response(&mut conn)
            .await
            .map_err(|(detail, received)| nothing_back(detail, received))?;
        if response.reusable {
            self.put_idle(conn);
        }
        match response.status {
            200..=299 => parse_answer(&response.body)
                .map(Answer::Allow)
                .map_err(|e| Failure::new(format!("HTTP {}, but {e}", response.status))),
            400..=499 => Ok(Answer::Refused(response.status)),
            status => Err(Failure::new(format!("HTTP {status}"))),
        }
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
    /// Framed, fully read and not `Connection: close`: the connection can take another request.
    reusable: bool,
}

/// Reads more into `conn.buf`; `Ok(false)` at the end of the stream.
async fn fill(conn: &mut HttpConn) -> std::io::Result<bool> {
    conn.buf.reserve(2048);
    Ok(conn.reader.read_buf(&mut conn.buf).await? > 0)
}

/// Reads one response (interim 1xx ones skipped). The error says what went wrong and whether any
/// byte of a response had arrived.
async fn read_response(conn: &mut HttpConn) -> Result<Response, (String, bool)> {
    let mut received = false;
    loop {
        // The head.
        let (status, head_len, keep_alive, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&conn.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = parsed.code.unwrap_or(0);
                    let (keep_alive, framing) = framing_of(parsed.version == Some(1), status, parsed.headers)
                        .map_err(|e| (e.to_string(), true))?;
                    break (status, len, keep_alive, framing);
                }
                Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_HEAD => {}
                Ok(httparse::Status::Partial) => return Err(("the response head is too large".into(), true)),
                Err(e) => return Err((format!("malformed response: {e}"), true)),
            }
            match fill(conn).await {
                Ok(true) => received = true,
                Ok(false) if received => return Err(("the connection closed mid-response".into(), true)),
                Ok(false) => return Err(("the connection closed without a response".into(), false)),
                Err(e) => return Err((format!("reading the response failed: {e}"), received)),
            }
        };
        conn.buf.advance(head_len);
        if (100..200).contains(&status) {
            continue;
        }
        let (body, complete) = read_body(conn, framing)
            .await
            .map_err(|e| (format!("reading the response body failed: {e}"), true))?;
        return Ok(Response {
            status,
            body,
            reusable: keep_alive && complete && framing != Framing::UntilClose,
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The body's framing (RFC 9112 §6.3) and whether the connection stays open after it.
fn framing_of(http11: bool, status: u16, headers: &[httparse::Header<'_>]) -> Result<(bool, Framing), &'static str> {
    // Every comma-separated token of every header with this name, lower-cased.
    let values = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| {
                String::from_utf8_lossy(h.value)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let connection = values("connection");
    let keep_alive = if http11 {
        !connection.iter().any(|t| t == "close")
    } else {
        connection.iter().any(|t| t == "keep-alive")
    };
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok((keep_alive, Framing::Empty));
    }
    if let Some(last) = values("transfer-encoding").last() {
        return Ok(match last.as_str() {
            "chunked" => (keep_alive, Framing::Chunked),
            _ => (false, Framing::UntilClose),
        });
    }
    let mut length = None;
    for v in values("content-length") {
        let n: u64 = v.parse().map_err(|_| "the response has a malformed Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("the response has conflicting Content-Length headers");
        }
        length = Some(n);
    }
    Ok(match length {
        Some(n) => (keep_alive, Framing::Length(n)),
        None => (false, Framing::UntilClose),
    })
}

/// Reads the body, keeping at most [`MAX_BODY`] bytes; `complete` is false when it was cut short
/// there (the connection then cannot be reused).
async fn read_body(conn: &mut HttpConn, framing: Framing) -> std::io::Result<(Vec<u8>, bool)> {
    let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    let mut body = Vec::new();
    match framing {
        Framing::Empty => Ok((body, true)),
        Framing::Length(n) => {
            if n > MAX_BODY as u64 {
                while conn.buf.len() < MAX_BODY {
                    if !fill(conn).await? {
                        return Err(eof());
                    }
                }
                body.extend_from_slice(&conn.buf[..MAX_BODY]);
                return Ok((body, false));
            }
            let n = n as usize;
            while conn.buf.len() < n {
                if !fill(conn).await? {
                    return Err(eof());
                }
            }
            body.extend_from_slice(&conn.buf.split_to(n));
            Ok((body, true))
        }
        Framing::UntilClose => {
            while conn.buf.len() < MAX_BODY && fill(conn).await? {}
            let n = conn.buf.len().min(MAX_BODY);
            body.extend_from_slice(&conn.buf[..n]);
            Ok((body, false))
        }
        Framing::Chunked => loop {
            let line_end = loop {
                if let Some(p) = conn.buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                if conn.buf.len() > 1024 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "chunk size line too long",
                    ));
                }
                if !fill(conn).await? {
                    return Err(eof());
                }
            };
            let line = String::from_utf8_lossy(&conn.buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunk size"))?;
            conn.buf.advance(line_end + 2);
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    if let Some(p) = conn.buf.windows(2).position(|w| w == b"\r\n") {
                        conn.buf.advance(p + 2);
                        if p == 0 {
                            return Ok((body, true));
                        }
                        continue;
                    }
                    if conn.buf.len() > MAX_HEAD {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "trailers too large",
                        ));
                    }
                    if !fill(conn).await? {
                        return Err(eof());
                    }
                }
            }
            if body.len() + size > MAX_BODY {
                // Keep what fits and stop: the first JSON value is all that is read anyway.
                let want = MAX_BODY - body.len();
                while conn.buf.len() < want {
                    if !fill(conn).await? {
                        return Err(eof());
                    }
                }
                body.extend_from_slice(&conn.buf[..want]);
                return Ok((body, false));
            }
            while conn.buf.len() < size + 2 {
                if !fill(conn).await? {
                    return Err(eof());
                }
            }
            body.extend_from_slice(&conn.buf[..size]);
            if &conn.buf[size..size + 2] != b"\r\n" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
            conn.buf.advance(size + 2);
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn request_and_answer_match_tailcfg() {
        let key = [0xab; 32];
        let body = request_body(&key, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(
            body,
            format!(r#"{{"NodePublic":"nodekey:{}","Source":"192.0.2.7"}}"#, "ab".repeat(32))
        );
        assert_eq!(parse_answer(br#"{"Allow":true}"#), Ok(true));
        assert_eq!(parse_answer(b"{\"allow\": true}\n"), Ok(true));
        assert_eq!(parse_answer(br#"{"Allow":false,"extra":1}"#), Ok(false));
        assert_eq!(parse_answer(br#"{}"#), Ok(false));
        assert_eq!(parse_answer(br#"{"Allow":true} trailing"#), Ok(true));
        assert!(parse_answer(br#"{"Allow":"yes"}"#).is_err());
        assert!(parse_answer(b"true").is_err());
        assert!(parse_answer(b"<html>").is_err());
        assert!(parse_answer(b"").is_err());
    }

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/verify?x=1#frag").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 8080, "/verify?x=1")
        );
        let t = Target::parse("HTTPS://[::1]/").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str(), t.addr()),
            (true, "::1", 443, "/", "[::1]:443".to_string())
        );
        assert_eq!(Target::parse("http://h").unwrap().path, "/");
        for bad in [
            "ftp://h/",
            "h/verify",
            "http://u:p@h/",
            "http:///x",
            "http://h:99999/",
            "http://h/a b",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    /// An HTTP endpoint answering each request with `answer(n, body)` — a delay, then the reply
    /// bytes (`n` counts requests); it closes the connection after a reply with `Connection: close`.
    async fn endpoint(
        answer: impl Fn(usize, String) -> (Duration, String) + Send + Sync + 'static,
    ) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/verify", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (r, c) = (requests.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Relaxed);
                let (r, answer) = (r.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = s.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        assert!(head.starts_with("post /verify http/1.1\r\n"), "{head}");
                        assert!(head.contains("\r\ncontent-type: application/json"), "{head}");
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                        buf.drain(..end + 4 + len);
                        let (delay, reply) = answer(r.fetch_add(1, Relaxed), body);
                        tokio::time::sleep(delay).await;
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        if reply.to_ascii_lowercase().contains("connection: close") {
                            return;
                        }
                    }
                });
            }
        });
        (url, requests, connections)
    }

    fn ok(json: &str) -> (Duration, String) {
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        (Duration::ZERO, reply)
    }

    /// The first byte of the key a request asks about.
    fn first_key_byte(body: &str) -> u8 {
        let at = body.find("nodekey:").unwrap() + "nodekey:".len();
        u8::from_str_radix(&body[at..at + 2], 16).unwrap()
    }

    fn settings(url: &str, fail_open: bool) -> AdmissionSettings {
        AdmissionSettings {
            url: Some(url.to_string()),
            fail_open,
            timeout: Duration::from_millis(500),
            ..AdmissionSettings::default()
        }
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allow_deny_cache_and_keep_alive() {
        let allowed = [1u8; 32];
        let (url, requests, connections) =
            endpoint(|_, body| ok(&format!(r#"{{"Allow":{}}}"#, first_key_byte(&body) == 1))).await;
        let a = Admission::default();
        let m = Metrics::default();
        a.set(settings(&url, false)).unwrap();
        assert_eq!(a.url().as_deref(), Some(url.as_str()));
        assert_eq!(a.check(&m, &allowed, IP).await, Ok(()));
        assert_eq!(a.check(&m, &[2; 32], IP).await, Err(Rejection::Denied));
        // Cached: no new request, for allow and deny alike; another IP is another question.
        assert_eq!(a.check(&m, &allowed, IP).await, Ok(()));
        assert_eq!(a.check(&m, &[2; 32], IP).await, Err(Rejection::Denied));
        assert_eq!(requests.load(Relaxed), 2);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(a.check(&m, &allowed, v6).await, Ok(()));
        assert_eq!(requests.load(Relaxed), 3);
        // One connection carried every request.
        assert_eq!(connections.load(Relaxed), 1);
        assert_eq!(m.admission_cache_hits.load(Relaxed), 2);
        assert_eq!(m.admission_rejected_denied.load(Relaxed), 2);
        // A v4-mapped address is its IPv4 address.
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(a.check(&m, &allowed, mapped).await, Ok(()));
        assert_eq!(requests.load(Relaxed), 3);
        // New settings, empty cache.
        a.set(settings(&url, false)).unwrap();
        assert_eq!(a.check(&m, &allowed, IP).await, Ok(()));
        assert_eq!(requests.load(Relaxed), 4);
        // Off.
        a.set(AdmissionSettings::default()).unwrap();
        assert_eq!(a.url(), None);
        assert_eq!(a.check(&m, &[2; 32], IP).await, Ok(()));
        assert_eq!(requests.load(Relaxed), 4);
        assert!(a.set(settings("ftp://x/", true)).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unavailable_endpoints_fail_open_or_closed() {
        let m = Metrics::default();
        let a = Admission::default();
        // Nothing listens there.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/verify", l.local_addr().unwrap())
        };
        a.set(settings(&closed, true)).unwrap();
        assert_eq!(a.check(&m, &[3; 32], IP).await, Ok(()));
        a.set(settings(&closed, false)).unwrap();
        assert_eq!(a.check(&m, &[3; 32], IP).await, Err(Rejection::EndpointError));
        assert_eq!(m.admission_admitted_fail_open.load(Relaxed), 1);
        assert_eq!(m.admission_endpoint_errors.load(Relaxed), 2);

        // The key's first byte says how the endpoint answers.
        let (url, _, _) = endpoint(|_, body| match first_key_byte(&body) {
            0x50 => (
                Duration::ZERO,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".into(),
            ),
            0x51 => ok("<html>"),
            0x52 => (
                Duration::ZERO,
                "HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno".into(),
            ),
            0x53 => (
                Duration::ZERO,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"All\r\n9\r\now\":true}\r\n0\r\n\r\n"
                    .into(),
            ),
            0x54 => (
                Duration::ZERO,
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"Allow\":true}".into(),
            ),
            0x55 => (
                Duration::ZERO,
                "HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n".into(),
            ),
            _ => (Duration::from_millis(800), ok(r#"{"Allow":true}"#).1),
        })
        .await;
        use Rejection::*;
        for fail_open in [false, true] {
            a.set(AdmissionSettings {
                cache_ttl: Duration::ZERO,
                ..settings(&url, fail_open)
            })
            .unwrap();
            let unavailable = |r: Rejection| if fail_open { Ok(()) } else { Err(r) };
            for (byte, expected) in [
                (0x50, unavailable(EndpointError)),
                (0x51, unavailable(EndpointError)),
                (0x52, Err(Status)),
                (0x53, Ok(())),
                (0x54, Ok(())),
                (0x55, unavailable(EndpointError)),
                (0x56, unavailable(Timeout)),
            ] {
                assert_eq!(
                    a.check(&m, &[byte; 32], IP).await,
                    expected,
                    "key {byte:#x}, fail open {fail_open}"
                );
            }
        }
        assert_eq!(m.admission_rejected_endpoint_error.load(Relaxed), 1 + 3);
        assert_eq!(m.admission_rejected_status.load(Relaxed), 2);
        assert_eq!(m.admission_rejected_timeout.load(Relaxed), 1);
        assert_eq!(m.admission_admitted_fail_open.load(Relaxed), 1 + 4);
        assert_eq!(m.admission_endpoint_errors.load(Relaxed), 2 + 8);
        assert_eq!(m.admission_in_flight.load(Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_slots_count_as_unavailable_and_events_are_rate_limited() {
        let (url, _, _) = endpoint(|_, _| (Duration::from_millis(300), ok(r#"{"Allow":false}"#).1)).await;
        let a = Arc::new(Admission::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        a.set_event_sink(Some(Arc::new(move |e| sink.lock().unwrap().push(e))));
        a.set(AdmissionSettings {
            max_concurrent: 1,
            queue_wait: Duration::from_millis(50),
            ..settings(&url, false)
        })
        .unwrap();
        let m = Arc::new(Metrics::default());
        let mut checks = Vec::new();
        for i in 0..8u8 {
            let (a, m) = (a.clone(), m.clone());
            checks.push(tokio::spawn(async move { a.check(&m, &[0x10 + i; 32], IP).await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut results = Vec::new();
        for c in checks {
            results.push(c.await.unwrap());
        }
        assert_eq!(results[0], Err(Rejection::Denied));
        assert!(results[1..].iter().all(|r| *r == Err(Rejection::Busy)), "{results:?}");
        assert_eq!(m.admission_rejected_busy.load(Relaxed), 7);
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 5, "a burst of 5, the rest suppressed: {events:?}");
        assert!(events
            .iter()
            .all(|e| e.outcome == Outcome::Rejected && e.reason == Rejection::Busy));
        assert_eq!(events[0].key_prefix, "11111111");
        assert_eq!(events[0].source, IP);
    }
}
