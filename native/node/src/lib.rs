//! napi-rs binding of the relay core: type conversion and lifetimes only.
//!
//! No policy lives here: options are converted with `TryFrom`/`From` into the core's config types
//! (their defaults are chosen by the TypeScript side: `relayDefaults` in `src/relay.ts`,
//! `loadDefaults` in `src/bench.ts`), and core errors are converted into
//! JavaScript errors whose `code` property names what failed ([`Code`]): napi-rs creates every
//! error it throws with `napi_create_error(code, message)`, the code being the error's status,
//! and a status may be any `AsRef<str>` type, so an `Error<Code>` carries ours. Promises are
//! rejected with the same kind of error ([`rejection`]). `fromNative` in `src/errors.ts` turns
//! these codes into `DerpmeshError`s with the operator's hint (settings are named there, never
//! here or in the core); a mesh link's `lastErrorCode` gets its hint in `src/relay.ts`.

use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::admission::{self, AdmissionSettings};
use derpmesh_relay::client::{ClientError, TlsOptions};
use derpmesh_relay::keys::{Key, KeyPair, SharedBox};
use derpmesh_relay::limits;
use derpmesh_relay::loadgen;
use derpmesh_relay::mesh::{self, LinkError, MeshError};
use derpmesh_relay::metrics;
use derpmesh_relay::relay::RelayConfig;
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::tls;
use derpmesh_relay::upgrade::{self, Upgrade, UpgradeError};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(Status::InvalidArg, msg.into())
}

fn key_from(buf: &[u8], what: &str) -> Result<Key> {
    buf.try_into()
        .map_err(|_| invalid(format!("{what} must be 32 bytes, got {}", buf.len())))
}

/// The `code` of every error the relay binding throws or rejects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// An argument has the wrong shape (e.g. a key that is not 32 bytes).
    InvalidArgument,
    /// The mesh TLS settings are unusable ([`MeshError::Tls`]), e.g. a CA PEM without a certificate.
    MeshTls,
    /// Called outside the runtime that runs the relay's tasks (a bug of the binding).
    NoRuntime,
    /// A socket descriptor could not be taken over ([`UpgradeError`]): the caller bridges instead.
    Descriptor,
    /// A TLS certificate or key is unusable (`tls::TlsError`): no certificate or key in the PEM,
    /// a key that does not belong to the certificate, a certificate that cannot be generated.
    Tls,
    /// The load generator's options are unusable ([`loadgen::OptionsError`]).
    LoadOptions,
    /// A load generator client could not connect.
    LoadDial,
    /// A load generator client failed during the run.
    LoadRun,
    /// A load generator client's TLS handshake failed (e.g. the relay's certificate is not signed
    /// by a trusted CA).
    LoadTls,
    /// An address could not be bound (in use, not local, not allowed).
    Listen,
    /// The admission settings are unusable (`admission::AdmissionError`): a URL that is not http(s),
    /// a CA PEM without a certificate.
    Admission,
}

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        match self {
            Code::InvalidArgument => "DERPMESH_ERR_INVALID_ARGUMENT",
            Code::MeshTls => "DERPMESH_ERR_MESH_TLS",
            Code::NoRuntime => "DERPMESH_ERR_NO_RUNTIME",
            Code::Descriptor => "DERPMESH_ERR_DESCRIPTOR",
            Code::Tls => "DERPMESH_ERR_TLS",
            Code::LoadOptions => "DERPMESH_ERR_LOAD_OPTIONS",
            Code::LoadDial => "DERPMESH_ERR_LOAD_DIAL",
            Code::LoadRun => "DERPMESH_ERR_LOAD_RUN",
            Code::LoadTls => "DERPMESH_ERR_LOAD_TLS",
            Code::Listen => "DERPMESH_ERR_LISTEN",
            Code::Admission => "DERPMESH_ERR_ADMISSION",
        }
    }
}

type Coded<T> = std::result::Result<T, Error<Code>>;

fn coded(code: Code, error: impl std::fmt::Display) -> Error<Code> {
    Error::new(code, error.to_string())
}

fn mesh_error(e: MeshError) -> Error<Code> {
    let code = match e {
        MeshError::NoRuntime => Code::NoRuntime,
        MeshError::Tls(_) => Code::MeshTls,
    };
    coded(code, e)
}

fn upgrade_error(e: UpgradeError) -> Error<Code> {
    let code = match e {
        UpgradeError::NoRuntime => Code::NoRuntime,
        UpgradeError::Duplicate { .. } | UpgradeError::NonBlocking(_) | UpgradeError::Unsupported => Code::Descriptor,
    };
    coded(code, e)
}

/// The code of a load generator client's failed dial.
fn dial_code(e: &ClientError) -> Code {
    match e {
        ClientError::Tls { .. } | ClientError::TlsConfig { .. } => Code::LoadTls,
        _ => Code::LoadDial,
    }
}

fn load_error(e: loadgen::LoadError) -> Error<Code> {
    let code = match &e {
        loadgen::LoadError::Options(_) => Code::LoadOptions,
        loadgen::LoadError::Dial { error, .. } => dial_code(error),
        loadgen::LoadError::Pair { .. } => Code::LoadRun,
    };
    coded(code, e)
}

/// A promise rejection carrying `error`'s code: the JS error object is made here, on the JS
/// thread, and the rejection reuses it.
fn rejection(env: &Env, error: Error<Code>) -> Error {
    Error::from(JsError::from(error).into_unknown(*env))
}

/// Options of a relay. The TypeScript side fills in every default (`src/relay.ts`).
#[napi(object)]
pub struct RelayOptions {
    /// 32-byte private key; a new one is generated when absent.
    pub private_key: Option<Buffer>,
    /// Shared secret that grants mesh privileges (WatchConns, ClosePeer, ForwardPacket).
    pub mesh_key: Option<String>,
    /// Packets queued per connection before the oldest is dropped.
    pub queue_depth: u32,
    /// Disco packets queued per connection.
    pub disco_queue_depth: u32,
    /// A write stalled longer than this closes the connection.
    pub write_timeout_ms: u32,
    /// KeepAlive period and its random extra.
    pub keepalive_ms: u32,
    pub keepalive_jitter_ms: u32,
    /// PEM of the private CA(s) that signed the peers' certificates, for `https://` mesh peers;
    /// trusted in addition to the public web PKI roots. Throws if it holds no usable certificate.
    pub mesh_ca_pem: Option<Buffer>,
    /// INSECURE: do not verify `https://` mesh peers' certificates at all (the links stay
    /// encrypted, but anyone on the path can pose as a peer). Prefer `meshCaPem`.
    pub mesh_tls_insecure: bool,
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(v.into())
}

impl TryFrom<RelayOptions> for ServerConfig {
    type Error = Error<Code>;

    fn try_from(o: RelayOptions) -> Coded<ServerConfig> {
        let private_key = match &o.private_key {
            Some(k) => Some(Key::try_from(&k[..]).map_err(|_| {
                coded(
                    Code::InvalidArgument,
                    format!("privateKey must be 32 bytes, got {}", k.len()),
                )
            })?),
            None => None,
        };
        Ok(ServerConfig {
            private_key,
            mesh_key: o.mesh_key,
            relay: RelayConfig {
                queue_depth: o.queue_depth as usize,
                disco_queue_depth: o.disco_queue_depth as usize,
                write_timeout: ms(o.write_timeout_ms),
                keepalive: ms(o.keepalive_ms),
                keepalive_jitter: ms(o.keepalive_jitter_ms),
            },
            mesh_tls: TlsOptions {
                ca_pem: o.mesh_ca_pem.map(|b| b.to_vec()),
                insecure_skip_verify: o.mesh_tls_insecure,
            },
        })
    }
}

#[napi(object)]
pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    pub help: String,
    pub value: f64,
}

/// A histogram of the relay core: per-bucket counts (not cumulative), `boundsUs[i]` the inclusive
/// upper bound of `buckets[i]` in microseconds; the last bucket (one more than the bounds) holds the
/// values above every bound.
#[napi(object)]
pub struct HistogramSnapshot {
    pub name: String,
    pub help: String,
    pub bounds_us: Vec<f64>,
    pub buckets: Vec<f64>,
    pub count: f64,
    pub sum_us: f64,
}

#[napi(string_enum = "lowercase")]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// Where a mesh link is (the core's `mesh::LinkState`).
#[napi(string_enum = "lowercase")]
pub enum LinkState {
    Connecting,
    Connected,
    Backoff,
    /// The URL points at this relay; not retried.
    #[napi(value = "self")]
    SelfLink,
    Stopped,
}

impl From<mesh::LinkState> for LinkState {
    fn from(s: mesh::LinkState) -> LinkState {
        match s {
            mesh::LinkState::Connecting => LinkState::Connecting,
            mesh::LinkState::Connected => LinkState::Connected,
            mesh::LinkState::Backoff => LinkState::Backoff,
            mesh::LinkState::SelfLink => LinkState::SelfLink,
            mesh::LinkState::Stopped => LinkState::Stopped,
        }
    }
}

/// What a mesh link's `lastError` is (the core's `mesh::LinkError`).
#[napi(string_enum = "kebab-case")]
pub enum LinkErrorCode {
    InvalidUrl,
    ShuttingDown,
    NoMeshKey,
    /// No trusted CA signed the peer's certificate: trust the CA that did (`meshCaPem`).
    UntrustedCertificate,
    Dial,
    DialTimeout,
    WriteStalled,
    WriteFailed,
    ControlOverflow,
    WriterStopped,
    ConnectionLost,
    WatchConnsRefused,
    Silent,
}

impl From<&LinkError> for LinkErrorCode {
    fn from(e: &LinkError) -> LinkErrorCode {
        match e {
            LinkError::InvalidUrl(_) => LinkErrorCode::InvalidUrl,
            LinkError::ShuttingDown => LinkErrorCode::ShuttingDown,
            LinkError::NoMeshKey => LinkErrorCode::NoMeshKey,
            LinkError::Dial { .. } if e.is_untrusted_certificate() => LinkErrorCode::UntrustedCertificate,
            LinkError::Dial { .. } => LinkErrorCode::Dial,
            LinkError::DialTimeout { .. } => LinkErrorCode::DialTimeout,
            LinkError::WriteStalled(_) => LinkErrorCode::WriteStalled,
            LinkError::WriteFailed => LinkErrorCode::WriteFailed,
            LinkError::ControlOverflow => LinkErrorCode::ControlOverflow,
            LinkError::WriterStopped => LinkErrorCode::WriterStopped,
            LinkError::ConnectionLost(_) => LinkErrorCode::ConnectionLost,
            LinkError::WatchConnsRefused(_) => LinkErrorCode::WatchConnsRefused,
            LinkError::Silent(_) => LinkErrorCode::Silent,
        }
    }
}

/// One outgoing mesh link to a peer relay.
#[napi(object)]
pub struct MeshLinkStatus {
    /// The peer URL, normalized.
    pub url: String,
    pub state: LinkState,
    /// The peer relay's public key (64 hex), once a handshake succeeded.
    pub peer_key: Option<String>,
    /// Why the last attempt failed; cleared when connected again.
    pub last_error: Option<String>,
    /// What `lastError` is, for the control plane's hint.
    pub last_error_code: Option<LinkErrorCode>,
    /// Client keys currently reachable through this link.
    pub forwarders: u32,
    /// When the current connection was established, ms since the Unix epoch.
    pub connected_since_ms: Option<f64>,
}

impl From<mesh::LinkStatus> for MeshLinkStatus {
    fn from(l: mesh::LinkStatus) -> MeshLinkStatus {
        MeshLinkStatus {
            url: l.url,
            state: l.state.into(),
            peer_key: l.peer_key.map(hex::encode),
            last_error_code: l.last_error.as_ref().map(LinkErrorCode::from),
            last_error: l.last_error.map(|e| e.to_string()),
            forwarders: l.forwarders as u32,
            connected_since_ms: l.connected_since_ms.map(|ms| ms as f64),
        }
    }
}

/// How a client asked to upgrade.
#[napi(string_enum = "kebab-case")]
pub enum UpgradeKind {
    /// `Upgrade: DERP`.
    Derp,
    /// `Upgrade: DERP` with `Derp-Fast-Start: 1`: no HTTP response at all.
    DerpFastStart,
    /// `Upgrade: websocket` with the `derp` subprotocol.
    Websocket,
}

/// The core's [`Upgrade`] from the kind and, for WebSocket, the Sec-WebSocket-Accept value.
fn upgrade_of(kind: UpgradeKind, ws_accept: Option<String>) -> Coded<Upgrade> {
    match (kind, ws_accept) {
        (UpgradeKind::Derp, _) => Ok(Upgrade::Derp { fast_start: false }),
        (UpgradeKind::DerpFastStart, _) => Ok(Upgrade::Derp { fast_start: true }),
        (UpgradeKind::Websocket, Some(accept)) => Ok(Upgrade::WebSocket { accept }),
        (UpgradeKind::Websocket, None) => Err(coded(
            Code::InvalidArgument,
            "websocket upgrade needs the Sec-WebSocket-Accept value",
        )),
    }
}

fn port(remote_port: u32) -> Coded<u16> {
    u16::try_from(remote_port)
        .map_err(|_| coded(Code::InvalidArgument, format!("port {remote_port} is not a TCP port")))
}

/// The relay and its mesh links: owns every DERP connection handed to it.
#[napi]
pub struct RelayCore {
    server: Server,
}

#[napi]
impl RelayCore {
    #[napi(constructor)]
    pub fn new(options: RelayOptions) -> Result<Self, Code> {
        let server = Server::new(options.try_into()?).map_err(mesh_error)?;
        Ok(RelayCore { server })
    }

    /// The relay's public key, 64 lower-case hex characters.
    #[napi(getter)]
    pub fn public_key(&self) -> String {
        hex::encode(self.server.public_key())
    }

    /// Takes over a connected TCP socket by descriptor. The descriptor is duplicated, so the caller
    /// destroys its own handle afterwards. `head` holds the bytes read past the request head.
    #[napi]
    pub fn accept_fd(
        &self,
        fd: i32,
        head: Buffer,
        upgrade: UpgradeKind,
        ws_accept: Option<String>,
        remote_address: String,
        remote_port: u32,
    ) -> Result<(), Code> {
        let upgrade = upgrade_of(upgrade, ws_accept)?;
        let remote = upgrade::remote_addr(&remote_address, port(remote_port)?);
        let head = Bytes::copy_from_slice(&head);
        within_runtime_if_available(|| self.server.accept_fd(fd, head, upgrade, remote)).map_err(upgrade_error)
    }

    /// Serves a connection whose bytes the caller carries (TLS terminated in Node, Windows): push
    /// what the socket reads into the bridge, write what `read()` yields to the socket.
    #[napi]
    pub fn open_bridge(
        &self,
        head: Buffer,
        upgrade: UpgradeKind,
        ws_accept: Option<String>,
        remote_address: String,
        remote_port: u32,
    ) -> Result<Bridge, Code> {
        let upgrade = upgrade_of(upgrade, ws_accept)?;
        let remote = upgrade::remote_addr(&remote_address, port(remote_port)?);
        let head = Bytes::copy_from_slice(&head);
        within_runtime_if_available(|| self.server.open_bridge(head, upgrade, remote))
            .map(Bridge)
            .map_err(upgrade_error)
    }

    /// Takes over a raw accepted TCP socket by descriptor before anything was read from it (a
    /// `net` server with `pauseOnConnect`); the caller destroys its own handle afterwards. With a
    /// certificate set the core terminates TLS; it answers `/derp` and the probes itself and hands
    /// every other request to the `onHttpConnection` callback.
    #[napi]
    pub fn accept_connection(&self, fd: i32, remote_address: String, remote_port: u32) -> Result<(), Code> {
        let remote = upgrade::remote_addr(&remote_address, port(remote_port)?);
        within_runtime_if_available(|| self.server.accept_connection(fd, remote)).map_err(upgrade_error)
    }

    /// Accept limits for connections taken from now on (`acceptConnection`, `acceptFd`,
    /// `openBridge`); open ones stay. A connection over a limit is closed at once and counted.
    #[napi]
    pub fn set_accept_limits(&self, limits: AcceptLimits) -> Result<(), Code> {
        self.server.set_accept_limits(limits.try_into()?);
        Ok(())
    }

    /// Source addresses (IPv4 or IPv6 text) the per-address connection cap does not apply to;
    /// replaces the previous list.
    #[napi]
    pub fn set_accept_exempt(&self, addresses: Vec<String>) -> Result<(), Code> {
        let parsed = addresses
            .iter()
            .map(|a| {
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| coded(Code::InvalidArgument, format!("{a:?} is not an IP address")))
            })
            .collect::<Coded<Vec<_>>>()?;
        self.server.set_accept_exempt(parsed);
        Ok(())
    }

    /// Receives connections refused by an accept limit, at most one per reason every 10 s
    /// (`suppressed` counts the others). Does not keep Node running.
    #[napi(ts_args_type = "callback: (refusal: AcceptRefusal) => void")]
    pub fn on_accept_refused(&self, callback: AcceptRefusalCallback) {
        let callback = std::sync::Arc::new(callback);
        self.server
            .set_refusal_log(Some(std::sync::Arc::new(move |n: limits::RefusalNotice| {
                let refusal = AcceptRefusal {
                    reason: n.reason.code().to_string(),
                    remote_address: n.ip.to_string(),
                    suppressed: n.suppressed as f64,
                };
                let _ = callback.call(refusal, ThreadsafeFunctionCallMode::NonBlocking);
            })));
    }

    /// TLS for new `acceptConnection` sockets with this certificate chain (PEM, leaf first) and
    /// key; live connections keep theirs. Throws `DERPMESH_ERR_TLS` for an unusable pair (the
    /// current one stays).
    #[napi]
    pub fn set_certificate(&self, cert_pem: Buffer, key_pem: Buffer) -> Result<(), Code> {
        self.server
            .set_certificate(&cert_pem, &key_pem)
            .map_err(|e| coded(Code::Tls, e))
    }

    /// New `acceptConnection` sockets are served without TLS.
    #[napi]
    pub fn clear_certificate(&self) {
        self.server.clear_certificate();
    }

    /// How long `acceptConnection` sockets from now on may take to send a request head (default
    /// 10 s); slower ones are closed and counted (`http_head_timeouts`).
    #[napi]
    pub fn set_head_timeout(&self, ms: u32) {
        self.server
            .front()
            .set_head_timeout(std::time::Duration::from_millis(ms.into()));
    }

    /// Receives the requests the core does not answer (anything but `/derp` and the probes) as a
    /// connected stream socket carrying the decrypted bytes, from the request head on: its
    /// descriptor (the callee owns it) and the client's address. Does not keep Node running.
    #[napi(ts_args_type = "callback: (fd: number, remoteAddress: string, remotePort: number) => void")]
    pub fn on_http_connection(&self, callback: HttpConnectionCallback) {
        #[cfg(unix)]
        {
            use std::os::fd::IntoRawFd;
            let callback = std::sync::Arc::new(callback);
            self.server
                .set_http_handoff(Some(std::sync::Arc::new(move |fd, remote| {
                    let raw = fd.into_raw_fd();
                    let args = (raw, remote.ip().to_string(), u32::from(remote.port()));
                    if callback.call(args.into(), ThreadsafeFunctionCallMode::NonBlocking) != Status::Ok {
                        // Not queued (Node is exiting): the descriptor is still ours to close.
                        // SAFETY: `raw` came from `into_raw_fd` above and was given to no one.
                        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
                    }
                })));
        }
        #[cfg(not(unix))]
        drop(callback);
    }

    /// Client admission from now on (connections already admitted stay): with a `url`, every
    /// client but mesh peers is checked there during its handshake. Replaces the previous settings
    /// and empties the decision cache. Throws `DERPMESH_ERR_ADMISSION` for unusable settings (the
    /// current ones stay).
    #[napi]
    pub fn set_admission(&self, options: AdmissionOptions) -> Result<(), Code> {
        self.server
            .relay()
            .admission
            .set(options.into())
            .map_err(|e| coded(Code::Admission, e))
    }

    /// Receives rejected clients and fail-open admissions, rate-limited (a burst of 5, then one a
    /// second; `suppressed` counts the rest). Does not keep Node running.
    #[napi(ts_args_type = "callback: (event: AdmissionEvent) => void")]
    pub fn on_admission_event(&self, callback: AdmissionEventCallback) {
        let callback = std::sync::Arc::new(callback);
        self.server
            .relay()
            .admission
            .set_event_sink(Some(std::sync::Arc::new(move |e: admission::AdmissionEvent| {
                let event = AdmissionEvent {
                    outcome: match e.outcome {
                        admission::Outcome::Rejected => AdmissionOutcome::Rejected,
                        admission::Outcome::AdmittedFailOpen => AdmissionOutcome::AdmittedFailOpen,
                    },
                    reason: e.reason.code().to_string(),
                    key_prefix: e.key_prefix,
                    source: e.source.to_string(),
                    detail: e.detail,
                    suppressed: e.suppressed as f64,
                };
                let _ = callback.call(event, ThreadsafeFunctionCallMode::NonBlocking);
            })));
    }

    #[napi]
    pub fn set_mesh_key(&self, mesh_key: Option<String>) {
        self.server.set_mesh_key(mesh_key);
    }

    /// Sets every client connection's receive limit in bytes/s with a bucket of `burst` bytes
    /// (raised to one largest frame); 0 bytes/s removes it. Connected clients get it with their
    /// next frame; mesh peers are exempt. Returns the limit in force (burst after raising).
    #[napi]
    pub fn set_client_rate_limit(&self, bytes_per_sec: f64, burst: f64) -> Result<Vec<f64>, Code> {
        let valid = |v: f64| v.is_finite() && (0.0..=9_007_199_254_740_991.0).contains(&v);
        if !valid(bytes_per_sec) || !valid(burst) {
            return Err(coded(
                Code::InvalidArgument,
                format!("rate limit must be whole bytes >= 0, got {bytes_per_sec} bytes/s, burst {burst}"),
            ));
        }
        let limit = derpmesh_relay::relay::RateLimit::new(bytes_per_sec as u64, burst as u64);
        self.server.relay().set_rate_limit(limit);
        Ok(vec![limit.bytes_per_sec as f64, limit.burst as f64])
    }

    /// Sets the problem text sent to clients in a Health frame; "" means healthy.
    #[napi]
    pub fn set_health(&self, problem: String) {
        self.server.set_health(&problem);
    }

    /// Sets the peer relay URLs this relay meshes with; links are added and removed by difference.
    /// URLs are normalized (trailing slash and `/derp` optional); a URL that turns out to be this
    /// relay is marked `self` and not retried.
    #[napi]
    pub fn set_mesh_peers(&self, urls: Vec<String>) -> Result<(), Code> {
        within_runtime_if_available(|| self.server.set_mesh_peers(urls)).map_err(mesh_error)
    }

    /// The status of every mesh link, ordered by URL.
    #[napi]
    pub fn mesh_links(&self) -> Vec<MeshLinkStatus> {
        self.server.mesh_links().into_iter().map(MeshLinkStatus::from).collect()
    }

    #[napi]
    pub fn metrics(&self) -> Vec<Metric> {
        let mut out: Vec<Metric> = self
            .server
            .metrics()
            .snapshot()
            .into_iter()
            .map(|m| Metric {
                name: m.name.to_string(),
                kind: match m.kind {
                    metrics::MetricKind::Counter => MetricKind::Counter,
                    metrics::MetricKind::Gauge => MetricKind::Gauge,
                },
                help: m.help.to_string(),
                value: m.value as f64,
            })
            .collect();
        // Computed now from the client queues, not kept as counters.
        let (queued, deepest) = self.server.relay().queue_depths();
        let gauge = |name: &str, help: &str, value: u64| Metric {
            name: name.to_string(),
            kind: MetricKind::Gauge,
            help: help.to_string(),
            value: value as f64,
        };
        out.push(gauge("queued_packets", "Packets queued to local clients now.", queued));
        out.push(gauge(
            "queue_depth_max",
            "Packets queued to the client with the fullest queue now.",
            deepest,
        ));
        out
    }

    /// The core's histograms (handshake duration, queue wait), one consistent read each.
    #[napi]
    pub fn histograms(&self) -> Vec<HistogramSnapshot> {
        self.server
            .histograms()
            .snapshot()
            .into_iter()
            .map(|h| HistogramSnapshot {
                name: h.name.to_string(),
                help: h.help.to_string(),
                bounds_us: h.bounds_us.iter().map(|&b| b as f64).collect(),
                buckets: h.buckets.iter().map(|&b| b as f64).collect(),
                count: h.count as f64,
                sum_us: h.sum_us as f64,
            })
            .collect()
    }

    /// Graceful shutdown: mesh links stop, Restarting to every client, flush, close; resolves when
    /// all connections are gone or after `graceMs`.
    #[napi]
    pub async fn shutdown(&self, reconnect_in_ms: u32, try_for_ms: u32, grace_ms: u32) {
        self.server
            .shutdown(ms(reconnect_in_ms), ms(try_for_ms), ms(grace_ms))
            .await;
    }
}

/// Client admission settings (`setAdmission`). The TypeScript side fills in every default
/// (`admissionDefaults` in `src/relay.ts`).
#[napi(object)]
pub struct AdmissionOptions {
    /// `http://` or `https://` URL the requests are POSTed to; absent or empty: admission is off.
    pub url: Option<String>,
    /// Admit clients when the URL is unavailable (unreachable, timed out, unusable answer, busy).
    pub fail_open: bool,
    /// Limit for one request.
    pub timeout_ms: u32,
    /// How long an answer is reused for the same key from the same IP; 0: never.
    pub cache_ttl_ms: u32,
    /// Requests in flight at most; a check waits `queueWaitMs` for one, then the URL counts as
    /// unavailable.
    pub max_concurrent: u32,
    pub queue_wait_ms: u32,
    /// PEM CA certificate(s) trusted for an `https://` URL, besides the public roots.
    pub ca_pem: Option<Buffer>,
}

impl From<AdmissionOptions> for AdmissionSettings {
    fn from(o: AdmissionOptions) -> AdmissionSettings {
        AdmissionSettings {
            url: o.url,
            fail_open: o.fail_open,
            timeout: ms(o.timeout_ms),
            cache_ttl: ms(o.cache_ttl_ms),
            max_concurrent: o.max_concurrent as usize,
            queue_wait: ms(o.queue_wait_ms),
            tls: TlsOptions {
                ca_pem: o.ca_pem.map(|b| b.to_vec()),
                insecure_skip_verify: false,
            },
        }
    }
}

#[napi(string_enum = "kebab-case")]
pub enum AdmissionOutcome {
    /// The client was closed during its handshake.
    Rejected,
    /// The URL was unavailable and fail-open admitted the client.
    AdmittedFailOpen,
}

/// A rejected client or a fail-open admission, for the log.
#[napi(object)]
pub struct AdmissionEvent {
    pub outcome: AdmissionOutcome,
    /// `denied`, `status`, `endpoint_error`, `timeout` or `busy` (for a fail-open admission: what
    /// the rejection would have been).
    pub reason: String,
    /// The first 8 hex characters of the client's key.
    pub key_prefix: String,
    /// The client's IP address.
    pub source: String,
    /// What the URL did, e.g. `HTTP 503`.
    pub detail: String,
    /// Events dropped by the rate limit since the previous one.
    pub suppressed: f64,
}

/// Called without waiting and without keeping Node running.
type AdmissionEventCallback = ThreadsafeFunction<AdmissionEvent, (), AdmissionEvent, Status, false, true>;

type AcceptRefusalCallback = ThreadsafeFunction<AcceptRefusal, (), AcceptRefusal, Status, false, true>;

/// `(fd, remoteAddress, remotePort)`, called without waiting and without keeping Node running.
type HttpConnectionCallback =
    ThreadsafeFunction<FnArgs<(i32, String, u32)>, (), FnArgs<(i32, String, u32)>, Status, false, true>;

/// A self-signed certificate (ECDSA P-256) for `hosts` (DNS names or IP addresses; the first is
/// also its CN), for development and IP-only setups: clients must be told to trust it.
#[napi(object)]
pub struct SelfSignedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a `SelfSignedCertificate`. Throws `DERPMESH_ERR_TLS` without hosts or for a name
/// that cannot be in a certificate.
#[napi]
pub fn generate_self_signed(hosts: Vec<String>) -> Result<SelfSignedCertificate, Code> {
    let (cert_pem, key_pem) = tls::generate_self_signed(&hosts).map_err(|e| coded(Code::Tls, e))?;
    Ok(SelfSignedCertificate { cert_pem, key_pem })
}

/// Accept limits (`setAcceptLimits`): absent limits are none. The TypeScript side fills in the TCP
/// timings (`acceptDefaults` in `src/relay.ts`).
#[napi(object)]
pub struct AcceptLimits {
    /// Connections accepted per second on average (a token bucket).
    pub accept_connection_limit: Option<f64>,
    /// Connections accepted at once before the rate applies; absent: one second's worth of the
    /// limit (at least 1).
    pub accept_connection_burst: Option<u32>,
    /// Connections open at once on this relay.
    pub max_connections: Option<u32>,
    /// Connections open at once from one source address (except the exempt ones).
    pub max_connections_per_ip: Option<u32>,
    /// Idle time before TCP keepalive probes start; 0: the system's setting.
    pub tcp_keepalive_ms: u32,
    /// `TCP_USER_TIMEOUT` (Linux only): how long sent data may stay unacknowledged before the
    /// connection is dropped; 0: the system's setting.
    pub tcp_user_timeout_ms: u32,
}

impl TryFrom<AcceptLimits> for limits::AcceptLimits {
    type Error = Error<Code>;

    fn try_from(o: AcceptLimits) -> Coded<limits::AcceptLimits> {
        if let Some(rate) = o.accept_connection_limit.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(coded(
                Code::InvalidArgument,
                format!("acceptConnectionLimit must be a number of connections per second above 0 (absent: no limit), got {rate}"),
            ));
        }
        for (what, value) in [
            ("acceptConnectionBurst", o.accept_connection_burst),
            ("maxConnections", o.max_connections),
            ("maxConnectionsPerIp", o.max_connections_per_ip),
        ] {
            if value == Some(0) {
                return Err(coded(
                    Code::InvalidArgument,
                    format!("{what} must be at least 1 (absent: no limit), got 0"),
                ));
            }
        }
        let duration = |v: u32| (v > 0).then(|| ms(v));
        Ok(limits::AcceptLimits {
            rate: o.accept_connection_limit,
            burst: o.accept_connection_burst,
            max_connections: o.max_connections.map(u64::from),
            max_connections_per_ip: o.max_connections_per_ip.map(u64::from),
            tcp_keepalive: duration(o.tcp_keepalive_ms),
            tcp_user_timeout: duration(o.tcp_user_timeout_ms),
        })
    }
}

/// A connection refused by an accept limit, for the log.
#[napi(object)]
pub struct AcceptRefusal {
    /// `rate-limit`, `max-connections` or `max-connections-per-ip`.
    pub reason: String,
    /// The source address.
    pub remote_address: String,
    /// Refusals of the same reason since the previous one reported, not reported themselves.
    pub suppressed: f64,
}

/// The process's soft limit on open files (`RLIMIT_NOFILE`, which Node raises to the hard limit at
/// start); `null` when unlimited or unknown.
#[napi]
pub fn open_file_limit() -> Option<f64> {
    limits::open_file_limit().map(|n| n as f64)
}

/// The caller's end of a bridged connection (the core's `upgrade::Bridge`).
#[napi]
pub struct Bridge(upgrade::Bridge);

#[napi]
impl Bridge {
    /// Bytes the client sent.
    #[napi]
    pub fn push(&self, data: Buffer) {
        self.0.push(Bytes::copy_from_slice(&data));
    }

    /// The client closed its side.
    #[napi]
    pub fn end(&self) {
        self.0.end();
    }

    /// Next bytes to send to the client; `null` once the relay closed the connection.
    #[napi]
    pub async fn read(&self) -> Option<Buffer> {
        self.0.read().await.map(|b| b.to_vec().into())
    }
}

// Buffers returned to JS are copied into V8 memory: an external buffer wrapping a Rust Vec costs a
// finalizer per buffer, several times the work of these small copies.

/// A new random X25519 private key (32 bytes).
#[napi]
pub fn generate_private_key(env: &Env) -> Result<BufferSlice<'_>> {
    BufferSlice::copy_from(env, KeyPair::generate().private_bytes())
}

/// The public key of a private key.
#[napi]
pub fn public_key_of<'env>(env: &'env Env, private_key: &[u8]) -> Result<BufferSlice<'env>> {
    BufferSlice::copy_from(
        env,
        KeyPair::from_private(key_from(private_key, "privateKey")?).public(),
    )
}

/// NaCl box of `message` from `privateKey` to `peerPublicKey`: nonce(24) ‖ tag(16) ‖ ciphertext.
#[napi]
pub fn box_seal<'env>(
    env: &'env Env,
    private_key: &[u8],
    peer_public_key: &[u8],
    message: &[u8],
) -> Result<BufferSlice<'env>> {
    let shared = SharedBox::between(
        &key_from(private_key, "privateKey")?,
        &key_from(peer_public_key, "peerPublicKey")?,
    );
    BufferSlice::copy_from(env, shared.seal(message))
}

/// The NaCl box between a private key and a peer's public key, agreed once (X25519): a client's
/// handshake seals ClientInfo and opens ServerInfo with the same one.
#[napi]
pub struct NaclBox {
    shared: SharedBox,
}

#[napi]
impl NaclBox {
    #[napi(constructor)]
    pub fn new(private_key: &[u8], peer_public_key: &[u8]) -> Result<Self> {
        Ok(NaclBox {
            shared: SharedBox::between(
                &key_from(private_key, "privateKey")?,
                &key_from(peer_public_key, "peerPublicKey")?,
            ),
        })
    }

    /// nonce(24) ‖ tag(16) ‖ ciphertext of `message`.
    #[napi]
    pub fn seal<'env>(&self, env: &'env Env, message: &[u8]) -> Result<BufferSlice<'env>> {
        BufferSlice::copy_from(env, self.shared.seal(message))
    }

    /// The plaintext of a box from the peer; `null` if it does not authenticate.
    #[napi]
    pub fn open<'env>(&self, env: &'env Env, sealed: &[u8]) -> Result<Option<BufferSlice<'env>>> {
        self.shared
            .open(sealed)
            .map(|m| BufferSlice::copy_from(env, m))
            .transpose()
    }
}

/// Opens a box sealed by `peerPublicKey` to `privateKey`; `null` if it does not authenticate.
#[napi]
pub fn box_open<'env>(
    env: &'env Env,
    private_key: &[u8],
    peer_public_key: &[u8],
    sealed: &[u8],
) -> Result<Option<BufferSlice<'env>>> {
    SharedBox::between(
        &key_from(private_key, "privateKey")?,
        &key_from(peer_public_key, "peerPublicKey")?,
    )
    .open(sealed)
    .map(|m| BufferSlice::copy_from(env, m))
    .transpose()
}

/// What `runLoad` runs: N sender→receiver pairs through a DERP relay. The TypeScript side fills in
/// every default (`src/bench.ts`).
#[napi(object)]
pub struct LoadOptions {
    /// Relay the senders dial, `http://host:port`.
    pub url: String,
    /// Relay the receivers dial (absent: `url`); another node measures the mesh path.
    pub receiver_url: Option<String>,
    pub pairs: u32,
    pub packet_size: u32,
    pub duration_ms: u32,
    pub warmup_ms: u32,
    /// Packets per second per sender; absent = as fast as the relay takes them.
    pub rate_per_pair: Option<f64>,
    /// Packets in flight per pair (sent, not yet received); absent = no cap.
    pub window: Option<u32>,
    /// PEM CA certificate(s) trusted for `https://` URLs besides the public roots.
    pub ca_pem: Option<Buffer>,
}

impl From<LoadOptions> for loadgen::LoadOptions {
    fn from(o: LoadOptions) -> loadgen::LoadOptions {
        loadgen::LoadOptions {
            url: o.url,
            receiver_url: o.receiver_url,
            pairs: o.pairs as usize,
            packet_size: o.packet_size as usize,
            duration: ms(o.duration_ms),
            warmup: ms(o.warmup_ms),
            rate_per_pair: o.rate_per_pair,
            window: o.window.map(|w| w as usize),
            tls: TlsOptions {
                ca_pem: o.ca_pem.map(|pem| pem.to_vec()),
                ..TlsOptions::default()
            },
            // Not exposed: the probe interval and fast start are the core's.
            ..loadgen::LoadOptions::default()
        }
    }
}

#[napi(object)]
pub struct LoadReport {
    pub pairs: u32,
    pub packet_size: u32,
    pub duration_secs: f64,
    pub packets_sent: f64,
    pub packets_received: f64,
    pub packets_per_sec: f64,
    pub gbit_per_sec: f64,
    pub loss_ratio: f64,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p90_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
    pub rtt_samples: u32,
}

impl From<loadgen::LoadReport> for LoadReport {
    fn from(r: loadgen::LoadReport) -> LoadReport {
        let us = |v: Option<u64>| v.map(|v| v as f64);
        LoadReport {
            pairs: r.pairs as u32,
            packet_size: r.packet_size as u32,
            duration_secs: r.duration_secs,
            packets_sent: r.packets_sent as f64,
            packets_received: r.packets_received as f64,
            packets_per_sec: r.packets_per_sec,
            gbit_per_sec: r.gbit_per_sec,
            loss_ratio: r.loss_ratio,
            rtt_p50_us: us(r.rtt_p50_us),
            rtt_p90_us: us(r.rtt_p90_us),
            rtt_p99_us: us(r.rtt_p99_us),
            rtt_samples: r.rtt_samples as u32,
        }
    }
}

/// Runs the load generator (in Rust, off the JS thread) and reports.
#[napi(ts_return_type = "Promise<LoadReport>")]
pub fn run_load(env: &Env, options: LoadOptions) -> Result<PromiseRaw<'_, LoadReport>> {
    let options = loadgen::LoadOptions::from(options);
    env.spawn_future_with_callback(async move { Ok(loadgen::run(options).await) }, |env, r| {
        r.map(LoadReport::from).map_err(|e| rejection(env, load_error(e)))
    })
}

/// Connects `count` idle clients to `url` and keeps them connected for `holdMs` (memory benchmark);
/// `caPem` is trusted for `https://` URLs besides the public roots. Resolves with how many connected.
#[napi(ts_return_type = "Promise<number>")]
pub fn hold_clients(
    env: &Env,
    url: String,
    count: u32,
    hold_ms: u32,
    ca_pem: Option<Buffer>,
) -> Result<PromiseRaw<'_, u32>> {
    let tls = TlsOptions {
        ca_pem: ca_pem.map(|pem| pem.to_vec()),
        ..TlsOptions::default()
    };
    let hold = async move { Ok(loadgen::hold_clients(&url, count as usize, ms(hold_ms), &tls).await) };
    env.spawn_future_with_callback(hold, |env, r: std::result::Result<usize, ClientError>| {
        r.map(|n| n as u32).map_err(|e| {
            let code = dial_code(&e);
            rejection(env, coded(code, e))
        })
    })
}

/// What a STUN listener did, for metrics.
#[napi(object)]
pub struct StunStats {
    pub answered: i64,
    pub malformed: i64,
    pub not_binding: i64,
    pub send_errors: i64,
    pub read_errors: i64,
}

/// A STUN listener (Binding requests from Tailscale clients) on one UDP address.
#[napi]
pub struct StunServer {
    listener: derpmesh_relay::stun::Listener,
}

#[napi]
impl StunServer {
    /// Binds `address` (`host:port`, IPv6 in brackets) and starts answering.
    #[napi(factory)]
    pub fn bind(address: String) -> std::result::Result<StunServer, Error<Code>> {
        let addr: std::net::SocketAddr = address.parse().map_err(|_| {
            Error::new(
                Code::InvalidArgument,
                format!("{address:?} is not a host:port socket address"),
            )
        })?;
        let listener = within_runtime_if_available(|| derpmesh_relay::stun::Listener::bind(addr))
            .map_err(|e| Error::new(Code::Listen, format!("cannot listen for STUN on udp {addr}: {e}")))?;
        Ok(StunServer { listener })
    }

    /// The bound port (the real one when 0 was asked for).
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        u32::from(self.listener.local_addr().port())
    }

    #[napi]
    pub fn stats(&self) -> StunStats {
        let s = self.listener.stats();
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        StunStats {
            answered: n(s.answered),
            malformed: n(s.malformed),
            not_binding: n(s.not_binding),
            send_errors: n(s.send_errors),
            read_errors: n(s.read_errors),
        }
    }

    #[napi]
    pub fn stop(&self) {
        self.listener.stop();
    }
}
