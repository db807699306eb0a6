//! Mesh links: this relay's outgoing connections to its peer relays (PROTOCOL.md §5).
//!
//! For every peer URL the control plane passes to [`MeshLinks::set_peers`], a link task dials
//! `<url>/derp` with the relay's own key and the shared mesh key, sends WatchConns, and turns the
//! peer's PeerPresent/PeerGone stream into forwarders on the local [`Relay`]. While connected, the
//! link *is* the [`Forwarder`] for the keys it learned: `forward()` queues ForwardPacket frames in
//! the link's own bounded [`Outbox`], drained by [`run_writer`] onto the link's connection.
//!
//! Each connection attempt is a *session* with its own forwarder id, outbox and writer task; when
//! it ends, every forwarder it registered is removed (`Relay::remove_link`, which also sends
//! PeerGone(disconnected) to local clients that were talking to keys now unreachable), and the link
//! reconnects with exponential backoff (100 ms → 5 s, jittered, see [`Backoff`]). A link never
//! re-forwards: the server side delivers ForwardPacket to local clients only.
//!
//! Whether the peer accepted WatchConns is learned without guessing: WatchConns is followed by a
//! Ping in the same write. A relay that refuses WatchConns (wrong or missing mesh key) closes the
//! connection before it reaches the Ping; a relay that accepts it answers with its snapshot of
//! PeerPresent frames and then the Pong. The link counts as connected from that Pong.
//!
//! `https://` peers are dialed over TLS with the links' [`TlsOptions`] (see [`MeshLinks::set_tls`]):
//! the public web PKI roots, plus a private CA if one is given, or, as an explicitly insecure escape
//! hatch, no certificate verification at all.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::{random_u64, Backoff};
use crate::client::{self, ClientError, DerpConn, DialOptions, RelayUrl, ServerFrame, TlsOptions};
use crate::frame::{self, KEY_LEN, MAX_FRAME_SIZE, PEER_GONE_DISCONNECTED, PING_LEN};
use crate::handshake::ClientInfo;
use crate::keys::{Key, KeyPair};
use crate::metrics::Metrics;
use crate::outbox::{run_writer, Enqueued, OutFrame, Outbox, WriterConfig, WriterExit};
use crate::relay::{Forwarder, Relay};

/// Packets queued per mesh link before the oldest is dropped: a link carries many clients' traffic.
pub const MESH_QUEUE_DEPTH: usize = 4096;
/// Disco packets queued per mesh link (their own queue, so bulk traffic cannot starve them).
pub const MESH_DISCO_QUEUE_DEPTH: usize = 256;
/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_MAX`], then jittered to 50–100 %.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connect, HTTP upgrade and DERP handshake together must finish within this.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the Pong that confirms WatchConns was accepted. A peer that neither
/// closes nor answers by then is treated as connected (it did not refuse WatchConns).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// The link pings its peer at least this often, whatever the traffic, to notice a dead peer.
pub const MAX_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A session whose peer sends nothing (not even a Pong) for this many ping intervals is dead.
const IDLE_PING_INTERVALS: u32 = 3;
/// A session that stayed up this long resets the backoff; shorter ones keep growing it (flapping).
const STABLE_SESSION: Duration = Duration::from_secs(1);

/// Where a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing, handshaking, or waiting for the peer to accept WatchConns.
    Connecting,
    /// WatchConns accepted; forwarders are being learned and packets forwarded.
    Connected,
    /// The last attempt failed (see `last_error`); waiting to retry.
    Backoff,
    /// The URL points at this relay (the peer's server key is our own key); not retried.
    SelfLink,
    /// Not running: removed, the relay is gone or shutting down, or the URL cannot work (see `last_error`).
    Stopped,
}

impl LinkState {
    /// The name the control plane sees.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
            LinkState::SelfLink => "self",
            LinkState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A link as the control plane sees it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    /// The peer URL, normalized (see [`RelayUrl::base`]).
    pub url: String,
    pub state: LinkState,
    /// The peer's server key, once a handshake succeeded.
    pub peer_key: Option<Key>,
    /// Why the last attempt failed; cleared when the link is connected again.
    pub last_error: Option<LinkError>,
    /// Client keys currently reachable through this link.
    pub forwarders: usize,
    /// When the current session was confirmed, in ms since the Unix epoch.
    pub connected_since_ms: Option<u64>,
}

/// Why a link is not connected: the `last_error` of its status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The URL cannot be dialed (malformed, unsupported scheme); the link is not retried.
    #[error("{0}")]
    InvalidUrl(Arc<ClientError>),
    /// Links stop when the relay shuts down.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// Without a mesh key a peer refuses the link; retried (the key may be set later).
    #[error("this relay has no mesh key; a peer only accepts mesh links with the shared mesh key")]
    NoMeshKey,
    /// Dialing failed. `private_ca`: a private CA is configured, so an untrusted certificate means
    /// that CA did not sign the peer's (see [`LinkError::is_untrusted_certificate`]).
    #[error("{error}{}", private_ca_note(.error, *.private_ca))]
    Dial { error: Arc<ClientError>, private_ca: bool },
    /// Connect, upgrade and handshake took longer than [`DIAL_TIMEOUT`].
    #[error("dialing {url} timed out after {} s", DIAL_TIMEOUT.as_secs())]
    DialTimeout { url: String },
    /// The peer stopped taking data for longer than the write timeout.
    #[error("writing to the peer stalled for more than {} ms", .0.as_millis())]
    WriteStalled(Duration),
    #[error("writing to the peer failed (connection lost)")]
    WriteFailed,
    /// Control frames piled up: the peer does not read.
    #[error("the link's control queue overflowed (peer not reading)")]
    ControlOverflow,
    #[error("the link's writer stopped")]
    WriterStopped,
    /// The connection broke after the peer accepted WatchConns.
    #[error("connection to the peer lost: {0}")]
    ConnectionLost(Arc<io::Error>),
    /// The peer closed the connection before accepting WatchConns: it does not share the mesh key.
    #[error("permission denied: the peer closed the link right after WatchConns (mesh key mismatch?): {0}")]
    WatchConnsRefused(Arc<io::Error>),
    /// Nothing arrived, not even a Pong, for this long.
    #[error("the peer sent nothing for {} ms", .0.as_millis())]
    Silent(Duration),
}

fn private_ca_note(error: &ClientError, private_ca: bool) -> &'static str {
    if private_ca && error.is_unknown_issuer() {
        " (the configured mesh CA did not sign it)"
    } else {
        ""
    }
}

impl LinkError {
    /// The peer's certificate is signed by no CA this relay trusts: the fix is the private CA the
    /// links trust ([`TlsOptions::ca_pem`]).
    pub fn is_untrusted_certificate(&self) -> bool {
        matches!(self, LinkError::Dial { error, .. } if error.is_unknown_issuer())
    }
}

/// Why mesh peers (or the mesh TLS settings) could not be set.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Links are tasks: the call must happen inside a tokio runtime (the binding enters napi's).
    #[error("mesh links need a tokio runtime, and none is running on this thread")]
    NoRuntime,
    /// The TLS settings are unusable, e.g. the CA PEM holds no certificate (a
    /// [`ClientError::TlsConfig`], whose text starts with "TLS settings").
    #[error("mesh {0}")]
    Tls(#[source] ClientError),
}

// ---------------------------------------------------------------------------------------------
// The manager

/// A running link: its status and the means to stop it.
struct LinkHandle {
    shared: Arc<LinkShared>,
    stop: watch::Sender<bool>,
}

impl LinkHandle {
    /// Stops the link: its task ends at its next await point and cleans up after itself; the
    /// forwarders of its current session are removed right away.
    fn stop(&self, relay: Option<&Relay>) {
        self.stop.send_replace(true);
        let session = self.shared.session.load(Relaxed);
        if let (Some(relay), true) = (relay, session != 0) {
            relay.remove_link(session);
        }
    }
}

/// Status shared between a link task and the manager.
struct LinkShared {
    /// The link's identity: the normalized URL ([`RelayUrl::base`]), or the URL as given when it
    /// cannot be parsed.
    base: String,
    status: Mutex<StatusInner>,
    /// Keys learned by the current session.
    forwarders: AtomicUsize,
    /// Forwarder id of the current session, 0 when none.
    session: AtomicU64,
}

struct StatusInner {
    state: LinkState,
    peer_key: Option<Key>,
    last_error: Option<LinkError>,
    connected_since_ms: Option<u64>,
}

impl LinkShared {
    fn new(base: String) -> LinkShared {
        LinkShared {
            base,
            status: Mutex::new(StatusInner {
                state: LinkState::Connecting,
                peer_key: None,
                last_error: None,
                connected_since_ms: None,
            }),
            forwarders: AtomicUsize::new(0),
            session: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StatusInner> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, state: LinkState) {
        self.lock().state = state;
    }

    fn fail(&self, state: LinkState, error: LinkError) {
        let mut s = self.lock();
        s.state = state;
        s.last_error = Some(error);
        s.connected_since_ms = None;
    }

    fn status(&self) -> LinkStatus {
        let s = self.lock();
        LinkStatus {
            url: self.base.clone(),
            state: s.state,
            peer_key: s.peer_key,
            last_error: s.last_error.clone(),
            forwarders: self.forwarders.load(Relaxed),
            connected_since_ms: s.connected_since_ms,
        }
    }
}

/// The mesh links of one relay, keyed by normalized peer URL. Owned by the [`crate::server::Server`]
/// that runs the relay.
///
/// Link tasks hold only a weak reference to the relay: dropping the relay ends them. Dropping the
/// manager stops every link.
pub struct MeshLinks {
    relay: Weak<Relay>,
    links: Mutex<BTreeMap<String, LinkHandle>>,
    /// TLS settings for `https` peers, shared with the link tasks: read at every dial.
    tls: Arc<Mutex<TlsOptions>>,
}

impl MeshLinks {
    /// The links of `relay`, none yet, verifying `https` peers with `tls` (checked as by
    /// [`MeshLinks::set_tls`]).
    pub fn new(relay: &Arc<Relay>, tls: TlsOptions) -> Result<MeshLinks, MeshError> {
        tls.client_config().map_err(MeshError::Tls)?;
        Ok(MeshLinks {
            relay: Arc::downgrade(relay),
            links: Mutex::new(BTreeMap::new()),
            tls: Arc::new(Mutex::new(tls)),
        })
    }

    /// Sets how `https` peers are verified. The settings are checked here (a CA PEM without a
    /// usable certificate is an error, and nothing changes). Every link uses them from its next
    /// dial on (a failing link retries within [`BACKOFF_MAX`]); connected links are kept.
    pub fn set_tls(&self, tls: TlsOptions) -> Result<(), MeshError> {
        tls.client_config().map_err(MeshError::Tls)?;
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = tls;
        Ok(())
    }

    /// The current TLS settings for `https` peers.
    pub fn tls(&self) -> TlsOptions {
        self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn links(&self) -> MutexGuard<'_, BTreeMap<String, LinkHandle>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the set of links equal to `urls` (parsed with [`RelayUrl::parse_relay`] and
    /// de-duplicated by [`RelayUrl::base`]): new URLs get a link task, links whose URL is gone are
    /// stopped, the others are left alone. URLs that cannot work (malformed, unsupported scheme)
    /// get a stopped link whose `last_error` says why. Must be called inside a tokio runtime.
    pub fn set_peers(&self, urls: Vec<String>) -> Result<(), MeshError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MeshError::NoRuntime)?;
        let mut wanted: BTreeMap<String, Result<RelayUrl, ClientError>> = BTreeMap::new();
        for url in urls {
            match RelayUrl::parse_relay(&url) {
                Ok(p) => {
                    wanted.insert(p.base(), Ok(p));
                }
                Err(e) => {
                    wanted.insert(url.trim().to_string(), Err(e));
                }
            }
        }
        let relay = self.relay.upgrade();
        let mut links = self.links();
        let removed: Vec<String> = links.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for k in removed {
            if let Some(h) = links.remove(&k) {
                h.stop(relay.as_deref());
            }
        }
        for (k, parsed) in wanted {
            if links.contains_key(&k) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let shared = Arc::new(LinkShared::new(k.clone()));
            match parsed {
                Ok(url) => {
                    runtime.spawn(run_link(
                        self.relay.clone(),
                        shared.clone(),
                        url,
                        self.tls.clone(),
                        stop_rx,
                    ));
                }
                Err(e) => shared.fail(LinkState::Stopped, LinkError::InvalidUrl(Arc::new(e))),
            }
            links.insert(k, LinkHandle { shared, stop });
        }
        Ok(())
    }

    /// Every link's status, ordered by URL.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links().values().map(|h| h.shared.status()).collect()
    }

    /// Stops every link (as `set_peers(vec![])` would).
    pub fn stop_all(&self) {
        let relay = self.relay.upgrade();
        let links = std::mem::take(&mut *self.links());
        for h in links.values() {
            h.stop(relay.as_deref());
        }
    }
}

impl Drop for MeshLinks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

// ---------------------------------------------------------------------------------------------
// A link

/// One connection of a link to its peer: the forwarder registered for the keys it learns.
struct Session {
    id: u64,
    /// The watching connection's queue: control frames, and lane 0 of forwarded packets.
    outbox: Outbox,
    /// Queues of the extra data connections (lanes 1..).
    lanes: Vec<Outbox>,
}

/// Connections per link. The peer reads each connection in one task, so forwarded packets spread
/// over several connections are handled on several cores; every packet of one source takes the
/// same lane, which keeps its order. Only the first connection watches (WatchConns).
pub fn data_lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

impl Forwarder for Session {
    fn link_id(&self) -> u64 {
        self.id
    }

    fn forward(&self, frame: OutFrame) -> Enqueued {
        // head = header ‖ src(32); tail = dst(32) ‖ packet, as assembled by the sending connection.
        let disco = frame.tail.len() > KEY_LEN && frame::is_disco(&frame.tail[KEY_LEN..]);
        let lane = frame
            .head
            .get(frame::HEADER_LEN)
            .map_or(0, |&b| b as usize % (self.lanes.len() + 1));
        let outbox = if lane == 0 { &self.outbox } else { &self.lanes[lane - 1] };
        outbox.push_packet(frame, disco)
    }
}

/// Undoes a session however it ends (return, error, task abort): its forwarders are removed, its
/// writer is stopped, the gauge and the status are updated.
struct SessionGuard {
    relay: Weak<Relay>,
    shared: Arc<LinkShared>,
    session: Arc<Session>,
    closed: watch::Sender<bool>,
    /// Counted in `metrics.mesh_links`.
    up: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.session.outbox.finish(None);
        for lane in &self.session.lanes {
            lane.finish(None);
        }
        self.closed.send_replace(true);
        let _ = self
            .shared
            .session
            .compare_exchange(self.session.id, 0, Relaxed, Relaxed);
        if let Some(relay) = self.relay.upgrade() {
            relay.remove_link(self.session.id);
            if self.up {
                Metrics::dec(&relay.metrics.mesh_links);
            }
        }
        self.shared.forwarders.store(0, Relaxed);
        self.shared.lock().connected_since_ms = None;
    }
}

/// How a session ended.
enum SessionEnd {
    /// The link was stopped (or the relay is gone).
    Stopped,
    /// The peer is this relay.
    SelfLink(Key),
    /// Retry later. `up_for` is how long the session had been confirmed, if it was.
    Failed { error: LinkError, up_for: Option<Duration> },
    /// Retrying cannot help (the relay is shutting down).
    Permanent(LinkError),
}

/// Resolves once the flag is set, or once its sender is gone (which also means: stop).
async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The link task: sessions, one after the other, until stopped.
async fn run_link(
    relay: Weak<Relay>,
    shared: Arc<LinkShared>,
    url: RelayUrl,
    tls: Arc<Mutex<TlsOptions>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        if *stop.borrow() {
            break;
        }
        let end = match relay.upgrade() {
            None => SessionEnd::Stopped,
            Some(r) if r.is_closing() => SessionEnd::Permanent(LinkError::ShuttingDown),
            Some(r) => {
                let key = r.key().clone();
                let mesh_key = r.mesh_key();
                drop(r);
                match mesh_key {
                    None => SessionEnd::Failed {
                        error: LinkError::NoMeshKey,
                        up_for: None,
                    },
                    Some(mesh_key) => {
                        shared.set_state(LinkState::Connecting);
                        let tls = tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        run_session(&relay, &shared, &url, &key, mesh_key, &tls, &mut stop).await
                    }
                }
            }
        };
        match end {
            SessionEnd::Stopped => break,
            SessionEnd::SelfLink(key) => {
                let mut s = shared.lock();
                s.state = LinkState::SelfLink;
                s.peer_key = Some(key);
                s.last_error = None;
                return;
            }
            SessionEnd::Permanent(error) => {
                shared.fail(LinkState::Stopped, error);
                return;
            }
            SessionEnd::Failed { error, up_for } => {
                if up_for.is_some_and(|d| d >= STABLE_SESSION) {
                    backoff.reset();
                }
                shared.fail(LinkState::Backoff, error);
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signalled(&mut stop) => break,
                }
            }
        }
    }
    shared.set_state(LinkState::Stopped);
}

/// Dials the peer; `https` peers over TLS with `tls`.
async fn dial_peer(
    shared: &LinkShared,
    url: &RelayUrl,
    key: &KeyPair,
    info: &ClientInfo,
    tls: &TlsOptions,
) -> Result<DerpConn, SessionEnd> {
    let options = DialOptions::default();
    let dial = client::dial_url(url, key, info, &options, tls);
    let error = match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
        Ok(Ok(conn)) => return Ok(conn),
        Ok(Err(e)) => LinkError::Dial {
            error: Arc::new(e),
            private_ca: tls.ca_pem.is_some(),
        },
        Err(_) => LinkError::DialTimeout {
            url: format!("{}{}", shared.base, client::DERP_PATH),
        },
    };
    Err(SessionEnd::Failed { error, up_for: None })
}

/// One connection: dial, WatchConns, learn forwarders, carry ForwardPackets, until it ends.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    relay: &Weak<Relay>,
    shared: &Arc<LinkShared>,
    url: &RelayUrl,
    key: &KeyPair,
    mesh_key: String,
    tls: &TlsOptions,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        mesh_key: Some(mesh_key),
        can_ack_pings: true,
        is_prober: false,
    };
    let conn = tokio::select! {
        r = dial_peer(shared, url, key, &info, tls) => r,
        _ = signalled(stop) => return SessionEnd::Stopped,
    };
    let conn = match conn {
        Ok(c) => c,
        Err(end) => return end,
    };
    if conn.server_key == *key.public() {
        return SessionEnd::SelfLink(conn.server_key);
    }
    shared.lock().peer_key = Some(conn.server_key);

    let mut lane_conns = Vec::new();
    for _ in 1..data_lanes() {
        let lane = tokio::select! {
            r = dial_peer(shared, url, key, &info, tls) => r,
            _ = signalled(stop) => return SessionEnd::Stopped,
        };
        match lane {
            Ok(c) => lane_conns.push(c),
            Err(end) => return end,
        }
    }

    let Some(r) = relay.upgrade() else {
        return SessionEnd::Stopped;
    };
    let own_key = *r.public_key();
    let ping_interval = r.config.keepalive.clamp(Duration::from_millis(100), MAX_PING_INTERVAL);
    let write_timeout = r.config.write_timeout;
    let writer_config = WriterConfig {
        write_timeout,
        // The pinger below writes whatever the traffic; the writer's own keepalive is a fallback.
        keepalive: ping_interval * 4,
        keepalive_jitter: Duration::ZERO,
    };
    let session = Arc::new(Session {
        id: r.next_id(),
        outbox: Outbox::new(MESH_QUEUE_DEPTH, MESH_DISCO_QUEUE_DEPTH),
        lanes: lane_conns
            .iter()
            .map(|_| Outbox::new(MESH_QUEUE_DEPTH, MESH_DISCO_QUEUE_DEPTH))
            .collect(),
    });
    drop(r);
    let (closed_tx, closed_rx) = watch::channel(false);
    let mut guard = SessionGuard {
        relay: relay.clone(),
        shared: shared.clone(),
        session: session.clone(),
        closed: closed_tx.clone(),
        up: false,
    };
    shared.session.store(session.id, Relaxed);

    let confirm: [u8; PING_LEN] = random_u64().to_le_bytes();
    session.outbox.push_control(frame::watch_conns());
    session.outbox.push_control(frame::ping(&confirm));

    for (i, DerpConn { mut reader, writer, .. }) in lane_conns.into_iter().enumerate() {
        // A data lane: its writer drains the lane's queue; its reader answers pings and otherwise
        // only watches for the connection's end, which ends the whole session.
        let (session, closed_tx) = (session.clone(), closed_tx.clone());
        let writer_closed = closed_rx.clone();
        let writer_tx = closed_tx.clone();
        let keepalive = frame::ping(&[0; PING_LEN]);
        let lane_config = writer_config;
        let lane_session = session.clone();
        tokio::spawn(async move {
            run_writer(
                &lane_session.lanes[i],
                writer,
                writer_closed,
                &lane_config,
                &keepalive,
                || {},
                None,
            )
            .await;
            writer_tx.send_replace(true);
        });
        let mut reader_closed = closed_rx.clone();
        tokio::spawn(async move {
            loop {
                let f = tokio::select! {
                    f = reader.read_frame(MAX_FRAME_SIZE) => f,
                    _ = signalled(&mut reader_closed) => return,
                };
                match f.and_then(|(t, f)| client::decode_server_frame(t, f)) {
                    Ok(ServerFrame::Ping(data)) => session.lanes[i].push_control(frame::pong(&data)),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            closed_tx.send_replace(true);
        });
    }

    let DerpConn { mut reader, writer, .. } = conn;
    let writer_task = {
        let session = session.clone();
        let closed = closed_rx.clone();
        let keepalive = frame::ping(&[0; PING_LEN]);
        tokio::spawn(async move {
            let exit = run_writer(&session.outbox, writer, closed, &writer_config, &keepalive, || {}, None).await;
            closed_tx.send_replace(true);
            exit
        })
    };

    let mut closed = closed_rx;
    let mut present: HashSet<Key> = HashSet::new();
    let started = Instant::now();
    let mut confirmed_at: Option<Instant> = None;
    let mut last_rx = Instant::now();
    let idle_timeout = ping_interval * IDLE_PING_INTERVALS;
    let mut pinger = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    pinger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let failed = |error: LinkError, confirmed_at: Option<Instant>| SessionEnd::Failed {
        error,
        up_for: confirmed_at.map(|t| t.elapsed()),
    };
    loop {
        let mut confirm_now = false;
        tokio::select! {
            _ = signalled(stop) => return SessionEnd::Stopped,
            _ = signalled(&mut closed) => {
                let why = match writer_task.await {
                    Ok(WriterExit::WriteTimeout) => LinkError::WriteStalled(write_timeout),
                    Ok(WriterExit::WriteError) => LinkError::WriteFailed,
                    Ok(WriterExit::Finished) => LinkError::ControlOverflow,
                    Ok(WriterExit::Closed) | Err(_) => LinkError::WriterStopped,
                };
                return failed(why, confirmed_at);
            }
            f = reader.read_frame(MAX_FRAME_SIZE) => {
                let f = f.and_then(|(t, f)| client::decode_server_frame(t, f));
                let f = match f {
                    Ok(f) => f,
                    Err(e) => {
                        let error = if confirmed_at.is_some() {
                            LinkError::ConnectionLost(Arc::new(e))
                        } else {
                            LinkError::WatchConnsRefused(Arc::new(e))
                        };
                        return failed(error, confirmed_at);
                    }
                };
                last_rx = Instant::now();
                let Some(r) = relay.upgrade() else { return SessionEnd::Stopped };
                match f {
                    ServerFrame::PeerPresent { key, .. } => {
                        // Only a watcher gets PeerPresent: WatchConns was accepted.
                        confirm_now = true;
                        // The peer announces our own link's connection too; that key is us.
                        if key != own_key && present.insert(key) {
                            r.add_forwarder(key, session.clone());
                        }
                    }
                    ServerFrame::PeerGone { key, reason } => {
                        confirm_now = true;
                        // Not-here answers a forwarded disco packet; only "disconnected" means the key left.
                        if reason == PEER_GONE_DISCONNECTED && present.remove(&key) {
                            r.remove_forwarder(&key, session.id);
                        }
                    }
                    ServerFrame::Pong(data) => confirm_now = data == confirm,
                    ServerFrame::Ping(data) => session.outbox.push_control(frame::pong(&data)),
                    // KeepAlive only resets the idle timer; packets addressed to this relay's own key,
                    // Health, Restarting (the peer goes away; the EOF that follows is handled) and
                    // unknown frames are ignored.
                    _ => {}
                }
                shared.forwarders.store(present.len(), Relaxed);
            }
            _ = pinger.tick() => {
                session.outbox.push_control(frame::ping(&random_u64().to_le_bytes()));
            }
            _ = tokio::time::sleep_until(last_rx + idle_timeout) => {
                return failed(LinkError::Silent(idle_timeout), confirmed_at);
            }
            _ = tokio::time::sleep_until(started + CONFIRM_TIMEOUT), if confirmed_at.is_none() => confirm_now = true,
        }
        if confirm_now && confirmed_at.is_none() {
            confirmed_at = Some(Instant::now());
            if let Some(r) = relay.upgrade() {
                Metrics::inc(&r.metrics.mesh_links);
                guard.up = true;
            }
            let mut s = shared.lock();
            s.state = LinkState::Connected;
            s.last_error = None;
            s.connected_since_ms = Some(now_ms());
        }
    }
}
