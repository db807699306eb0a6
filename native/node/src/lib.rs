//! napi-rs binding of the relay core: type conversion and lifetimes only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::client::ClientError;
use derpmesh_relay::keys::{Key, KeyPair};
use derpmesh_relay::loadgen;
use derpmesh_relay::relay::{Relay, RelayConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(Status::InvalidArg, msg.into())
}

fn key_from(buf: &[u8], what: &str) -> Result<Key> {
    buf.try_into()
        .map_err(|_| invalid(format!("{what} must be 32 bytes, got {}", buf.len())))
}

/// The `code` of the errors the load generator rejects with. napi-rs creates every error it
/// throws with `napi_create_error(code, message)`, the code being the error's status, and a status
/// may be any `AsRef<str>` type, so an `Error<Code>` carries ours; promises are rejected with the
/// same kind of error ([`rejection`]). `src/errors.ts` turns these codes into `DerpmeshError`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The load generator's options are unusable ([`loadgen::OptionsError`]).
    LoadOptions,
    /// A load generator client could not connect.
    LoadDial,
    /// A load generator client failed during the run.
    LoadRun,
}

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        match self {
            Code::LoadOptions => "DERPMESH_ERR_LOAD_OPTIONS",
            Code::LoadDial => "DERPMESH_ERR_LOAD_DIAL",
            Code::LoadRun => "DERPMESH_ERR_LOAD_RUN",
        }
    }
}

fn coded(code: Code, error: impl std::fmt::Display) -> Error<Code> {
    Error::new(code, error.to_string())
}

fn load_error(e: loadgen::LoadError) -> Error<Code> {
    let code = match e {
        loadgen::LoadError::Options(_) => Code::LoadOptions,
        loadgen::LoadError::Dial { .. } => Code::LoadDial,
        loadgen::LoadError::Pair { .. } => Code::LoadRun,
    };
    coded(code, e)
}

/// A promise rejection carrying `error`'s code: the JS error object is made here, on the JS
/// thread, and the rejection reuses it.
fn rejection(env: &Env, error: Error<Code>) -> Error {
    Error::from(JsError::from(error).into_unknown(*env))
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(v.into())
}

/// Options of a relay; every field is optional.
#[napi(object)]
pub struct RelayOptions {
    /// 32-byte private key; a new one is generated when absent.
    pub private_key: Option<Buffer>,
    /// Shared secret that grants mesh privileges (WatchConns, ClosePeer, ForwardPacket).
    pub mesh_key: Option<String>,
    /// Packets queued per connection before the oldest is dropped (default 512).
    pub queue_depth: Option<u32>,
    /// Disco packets queued per connection (default 32).
    pub disco_queue_depth: Option<u32>,
    /// A write stalled longer than this closes the connection (default 2000 ms).
    pub write_timeout_ms: Option<u32>,
    /// KeepAlive period (default 60000 ms) and its random extra (default 5000 ms).
    pub keepalive_ms: Option<u32>,
    pub keepalive_jitter_ms: Option<u32>,
    /// PEM of the private CA(s) that signed the peers' certificates, for `https://` mesh peers;
    /// trusted in addition to the public web PKI roots. Throws if it holds no usable certificate.
    pub mesh_ca_pem: Option<Buffer>,
    /// INSECURE: do not verify `https://` mesh peers' certificates at all (the links stay
    /// encrypted, but anyone on the path can pose as a peer). Default false; prefer `meshCaPem`.
    pub mesh_tls_insecure: Option<bool>,
}

#[napi(object)]
pub struct Metric {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub value: f64,
}

/// One outgoing mesh link to a peer relay.
#[napi(object)]
pub struct MeshLinkStatus {
    /// The peer URL, normalized.
    pub url: String,
    /// "connecting" | "connected" | "backoff" | "self" | "stopped".
    pub state: String,
    /// The peer relay's public key (64 hex), once a handshake succeeded.
    pub peer_key: Option<String>,
    /// Why the last attempt failed; cleared when connected again.
    pub last_error: Option<String>,
    /// Client keys currently reachable through this link.
    pub forwarders: u32,
    /// When the current connection was established, ms since the Unix epoch.
    pub connected_since_ms: Option<f64>,
}

fn parse_upgrade(upgrade: &str, ws_accept: Option<String>) -> Result<Upgrade> {
    match (upgrade, ws_accept) {
        ("derp", _) => Ok(Upgrade::Derp { fast_start: false }),
        ("derp-fast-start", _) => Ok(Upgrade::Derp { fast_start: true }),
        ("websocket", Some(accept)) => Ok(Upgrade::WebSocket { accept }),
        ("websocket", None) => Err(invalid("websocket upgrade needs the Sec-WebSocket-Accept value")),
        (other, _) => Err(invalid(format!(
            "unknown upgrade kind {other:?}: expected derp, derp-fast-start or websocket"
        ))),
    }
}

fn socket_addr(address: &str, port: u32) -> SocketAddr {
    let ip = address
        .trim_start_matches("::ffff:")
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([0u8; 4]));
    SocketAddr::new(ip, port as u16)
}

/// The relay: owns every DERP connection handed to it.
#[napi]
pub struct RelayCore {
    relay: Arc<Relay>,
}

#[napi]
impl RelayCore {
    #[napi(constructor)]
    pub fn new(options: Option<RelayOptions>) -> Result<Self> {
        let o = options.unwrap_or(RelayOptions {
            private_key: None,
            mesh_key: None,
            queue_depth: None,
            disco_queue_depth: None,
            write_timeout_ms: None,
            keepalive_ms: None,
            keepalive_jitter_ms: None,
            mesh_ca_pem: None,
            mesh_tls_insecure: None,
        });
        let key = match &o.private_key {
            Some(k) => KeyPair::from_private(key_from(k, "privateKey")?),
            None => KeyPair::generate(),
        };
        let d = RelayConfig::default();
        let ms = |v: Option<u32>, default: Duration| v.map_or(default, |v| Duration::from_millis(v as u64));
        let config = RelayConfig {
            queue_depth: o.queue_depth.map_or(d.queue_depth, |v| v.max(1) as usize),
            disco_queue_depth: o.disco_queue_depth.map_or(d.disco_queue_depth, |v| v.max(1) as usize),
            write_timeout: ms(o.write_timeout_ms, d.write_timeout),
            keepalive: ms(o.keepalive_ms, d.keepalive),
            keepalive_jitter: ms(o.keepalive_jitter_ms, d.keepalive_jitter),
        };
        let relay = Relay::new(key, config);
        relay.set_mesh_key(o.mesh_key);
        let mesh_tls = derpmesh_relay::mesh::MeshTls {
            ca_pem: o.mesh_ca_pem.map(|b| b.to_vec()),
            insecure: o.mesh_tls_insecure.unwrap_or(false),
        };
        derpmesh_relay::mesh::set_mesh_tls(&relay, mesh_tls).map_err(|e| invalid(e.to_string()))?;
        Ok(RelayCore { relay })
    }

    /// The relay's public key, 64 lower-case hex characters.
    #[napi(getter)]
    pub fn public_key(&self) -> String {
        hex::encode(self.relay.public_key())
    }

    /// Takes over a connected TCP socket by descriptor. The descriptor is duplicated, so the caller
    /// destroys its own handle afterwards. `head` holds the bytes read past the request head.
    #[napi]
    pub fn accept_fd(
        &self,
        fd: i32,
        head: Buffer,
        upgrade: String,
        ws_accept: Option<String>,
        remote_address: String,
        remote_port: u32,
    ) -> Result<()> {
        let upgrade = parse_upgrade(&upgrade, ws_accept)?;
        let stream = dup_tcp_stream(fd)?;
        let relay = self.relay.clone();
        let head = Bytes::copy_from_slice(&head);
        let remote = socket_addr(&remote_address, remote_port);
        napi::bindgen_prelude::spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => derpmesh_relay::conn::serve(relay, Transport::Tcp(s), head, upgrade, remote).await,
                Err(_) => derpmesh_relay::metrics::Metrics::inc(&relay.metrics.handshake_failure_io),
            }
        });
        Ok(())
    }

    /// Serves a connection whose bytes the caller carries (TLS terminated in Node, Windows): push
    /// what the socket reads into the bridge, write what `read()` yields to the socket.
    #[napi]
    pub fn open_bridge(
        &self,
        head: Buffer,
        upgrade: String,
        ws_accept: Option<String>,
        remote_address: String,
        remote_port: u32,
    ) -> Result<Bridge> {
        let upgrade = parse_upgrade(&upgrade, ws_accept)?;
        let (relay_side, caller_side) = tokio::io::duplex(256 << 10);
        let (mut from_relay, mut to_relay) = tokio::io::split(caller_side);
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        napi::bindgen_prelude::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if to_relay.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = to_relay.shutdown().await;
        });
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
        napi::bindgen_prelude::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from_relay.read(&mut buf).await {
                if n == 0 || out_tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    break;
                }
            }
        });
        let relay = self.relay.clone();
        let head = Bytes::copy_from_slice(&head);
        let remote = socket_addr(&remote_address, remote_port);
        napi::bindgen_prelude::spawn(derpmesh_relay::conn::serve(
            relay,
            Transport::Other(Box::new(relay_side)),
            head,
            upgrade,
            remote,
        ));
        Ok(Bridge {
            input: std::sync::Mutex::new(Some(tx)),
            output: Mutex::new(out_rx),
        })
    }

    #[napi]
    pub fn set_mesh_key(&self, mesh_key: Option<String>) {
        self.relay.set_mesh_key(mesh_key);
    }

    /// Sets the problem text sent to clients in a Health frame; "" means healthy.
    #[napi]
    pub fn set_health(&self, problem: String) {
        self.relay.set_health(&problem);
    }

    /// Sets the peer relay URLs this relay meshes with; links are added and removed by difference.
    /// URLs are normalized (trailing slash and `/derp` optional); a URL that turns out to be this
    /// relay is marked `self` and not retried.
    #[napi]
    pub fn set_mesh_peers(&self, urls: Vec<String>) -> Result<()> {
        napi::bindgen_prelude::within_runtime_if_available(|| derpmesh_relay::mesh::set_mesh_peers(&self.relay, urls))
            .map_err(|e| Error::new(Status::GenericFailure, e.to_string()))
    }

    /// The status of every mesh link, ordered by URL.
    #[napi]
    pub fn mesh_links(&self) -> Vec<MeshLinkStatus> {
        derpmesh_relay::mesh::mesh_links(&self.relay)
            .into_iter()
            .map(|l| MeshLinkStatus {
                url: l.url,
                state: l.state.as_str().to_string(),
                peer_key: l.peer_key.map(hex::encode),
                last_error: l.last_error,
                forwarders: l.forwarders as u32,
                connected_since_ms: l.connected_since_ms.map(|ms| ms as f64),
            })
            .collect()
    }

    #[napi]
    pub fn metrics(&self) -> Vec<Metric> {
        self.relay
            .metrics
            .snapshot()
            .into_iter()
            .map(|m| Metric {
                name: m.name.to_string(),
                kind: m.kind.to_string(),
                help: m.help.to_string(),
                value: m.value as f64,
            })
            .collect()
    }

    /// Graceful shutdown: Restarting to every client, flush, close; resolves when all connections
    /// are gone or after `graceMs`.
    #[napi]
    pub async fn shutdown(&self, reconnect_in_ms: u32, try_for_ms: u32, grace_ms: u32) -> Result<()> {
        let relay = self.relay.clone();
        derpmesh_relay::mesh::links_of(&relay).stop_all();
        relay
            .shutdown(
                Duration::from_millis(reconnect_in_ms as u64),
                Duration::from_millis(try_for_ms as u64),
                Duration::from_millis(grace_ms as u64),
            )
            .await;
        Ok(())
    }
}

#[cfg(unix)]
fn dup_tcp_stream(fd: i32) -> Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl only duplicates the descriptor; the copy is owned by the TcpStream below.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(invalid(format!(
            "cannot duplicate socket descriptor {fd}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `copy` is a fresh descriptor we own.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(copy) };
    stream
        .set_nonblocking(true)
        .map_err(|e| invalid(format!("cannot set descriptor non-blocking: {e}")))?;
    Ok(stream)
}

#[cfg(not(unix))]
fn dup_tcp_stream(_fd: i32) -> Result<std::net::TcpStream> {
    Err(Error::new(
        Status::GenericFailure,
        "descriptor hand-over is not available on this platform; use openBridge",
    ))
}

/// The caller's end of a bridged connection.
#[napi]
pub struct Bridge {
    input: std::sync::Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    output: Mutex<mpsc::Receiver<Bytes>>,
}

#[napi]
impl Bridge {
    /// Bytes the client sent.
    #[napi]
    pub fn push(&self, data: Buffer) {
        if let Some(tx) = &*self.input.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(Bytes::copy_from_slice(&data));
        }
    }

    /// The client closed its side.
    #[napi]
    pub fn end(&self) {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Next bytes to send to the client; `null` once the relay closed the connection.
    #[napi]
    pub async fn read(&self) -> Option<Buffer> {
        self.output.lock().await.recv().await.map(|b| b.to_vec().into())
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
    let pair = KeyPair::from_private(key_from(private_key, "privateKey")?);
    BufferSlice::copy_from(env, pair.seal(&key_from(peer_public_key, "peerPublicKey")?, message))
}

/// Opens a box sealed by `peerPublicKey` to `privateKey`; `null` if it does not authenticate.
#[napi]
pub fn box_open<'env>(
    env: &'env Env,
    private_key: &[u8],
    peer_public_key: &[u8],
    sealed: &[u8],
) -> Result<Option<BufferSlice<'env>>> {
    let pair = KeyPair::from_private(key_from(private_key, "privateKey")?);
    pair.open(&key_from(peer_public_key, "peerPublicKey")?, sealed)
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

/// Connects `count` idle clients to `url` and keeps them connected for `holdMs` (memory benchmark).
/// Resolves with how many connected.
#[napi(ts_return_type = "Promise<number>")]
pub fn hold_clients(env: &Env, url: String, count: u32, hold_ms: u32) -> Result<PromiseRaw<'_, u32>> {
    let hold = async move { Ok(loadgen::hold_clients(&url, count as usize, ms(hold_ms)).await) };
    env.spawn_future_with_callback(hold, |env, r: std::result::Result<usize, ClientError>| {
        r.map(|n| n as u32)
            .map_err(|e| rejection(env, coded(Code::LoadDial, e)))
    })
}
