//! The relay: who is connected, where a packet goes, who is told when a peer leaves.
//!
//! Hot path (every packet) reads two concurrent maps, `active` and `forwarders`, without a global
//! lock. Membership changes (connect, disconnect, watch, forwarder add/remove) happen under the
//! `registry` mutex, which also keeps the maps consistent with each other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use subtle::ConstantTimeEq;

use crate::admission::Admission;
use crate::conn::Conn;
use crate::frame::{self, PEER_GONE_DISCONNECTED};
use crate::keys::{Key, KeyPair};
use crate::metrics::{Histograms, Metrics};
use crate::outbox::{Enqueued, OutFrame, WriterConfig};

/// Tunables of one relay. Defaults follow the reference (and Coder's deeper queue).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Packets queued per connection before the oldest is dropped.
    pub queue_depth: usize,
    /// Disco packets queued per connection (their own small queue, so bulk traffic cannot starve them).
    pub disco_queue_depth: usize,
    /// A write that stalls longer than this closes the connection.
    pub write_timeout: Duration,
    /// KeepAlive period when a connection is otherwise silent, plus up to `keepalive_jitter`.
    pub keepalive: Duration,
    pub keepalive_jitter: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            queue_depth: 512,
            disco_queue_depth: 32,
            write_timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
            keepalive_jitter: Duration::from_secs(5),
        }
    }
}

/// Something that carries packets to a mesh peer relay (an outgoing mesh link).
pub trait Forwarder: Send + Sync {
    /// Stable id of the link, used to remove its forwarders when it goes away.
    fn link_id(&self) -> u64;
    /// Queues a ForwardPacket frame (already assembled) to the peer relay.
    fn forward(&self, frame: OutFrame) -> Enqueued;
}

#[derive(Default)]
struct Registry {
    /// Every handshaken connection per key, least recently active first: the last one is the active
    /// one (connecting and sending frames are activity), the one packets for the key go to.
    clients: HashMap<Key, Vec<Arc<Conn>>>,
    conns: HashMap<u64, Arc<Conn>>,
    watchers: HashMap<u64, Arc<Conn>>,
    /// Keys reachable through mesh peers, one entry per link, in registration order; the first is used.
    /// (PeerPresent comes for every connection of a key, PeerGone once for the last: no counting.)
    forwarders: HashMap<Key, Vec<Arc<dyn Forwarder>>>,
    /// src → (dst → id of the dst connection that received from src): who to tell when src leaves.
    sent_to: HashMap<Key, HashMap<Key, u64>>,
}

/// A per-client receive limit: bytes/s and bucket depth (0 bytes/s = none). Mesh peers are exempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub burst: u64,
}

impl RateLimit {
    /// The smallest bucket: one frame of the largest packet must fit (as derper clamps it).
    pub const MIN_BURST: u64 = (frame::MAX_PACKET_SIZE + frame::KEY_LEN + frame::HEADER_LEN) as u64;

    /// `burst` raised to [`RateLimit::MIN_BURST`]; none when `bytes_per_sec` is 0.
    pub fn new(bytes_per_sec: u64, burst: u64) -> RateLimit {
        if bytes_per_sec == 0 {
            return RateLimit::default();
        }
        RateLimit {
            bytes_per_sec,
            burst: burst.max(Self::MIN_BURST),
        }
    }

    pub fn is_set(&self) -> bool {
        self.bytes_per_sec > 0
    }
}

pub struct Relay {
    key: KeyPair,
    pub(crate) config: RelayConfig,
    pub(crate) writer_config: WriterConfig,
    mesh_key: RwLock<Option<String>>,
    active: DashMap<Key, Arc<Conn>, ahash::RandomState>,
    forwarders: DashMap<Key, Arc<dyn Forwarder>, ahash::RandomState>,
    registry: Mutex<Registry>,
    health: RwLock<String>,
    closing: AtomicBool,
    next_id: AtomicU64,
    pub(crate) keepalive_frame: Bytes,
    pub metrics: Metrics,
    /// Handshake duration and queue wait, read at scrape time.
    pub histograms: Histograms,
    /// Client admission (the verify URL); off until set.
    pub admission: Admission,
    rate_limit: RwLock<RateLimit>,
    /// Bumped on every change of `rate_limit`: a reader compares it per frame (one relaxed load)
    /// and picks the new limit up without a lock.
    rate_generation: AtomicU64,
}

/// Where a packet for a destination key can go.
pub(crate) enum Route {
    Local(Arc<Conn>),
    Mesh(Arc<dyn Forwarder>),
    Unknown,
}

impl Relay {
    /// Packets queued to this relay's clients now, in total and in the fullest queue; read at
    /// scrape time (one short lock per connected client), never on the packet path.
    pub fn queue_depths(&self) -> (u64, u64) {
        let (mut total, mut max) = (0u64, 0u64);
        for conn in self.active.iter() {
            let n = conn.value().outbox.queued() as u64;
            total += n;
            max = max.max(n);
        }
        (total, max)
    }

    pub fn new(key: KeyPair, config: RelayConfig) -> Arc<Relay> {
        let writer_config = WriterConfig {
            write_timeout: config.write_timeout,
            keepalive: config.keepalive,
            keepalive_jitter: config.keepalive_jitter,
        };
        Arc::new(Relay {
            key,
            config,
            writer_config,
            mesh_key: RwLock::new(None),
            active: DashMap::with_hasher(ahash::RandomState::new()),
            forwarders: DashMap::with_hasher(ahash::RandomState::new()),
            registry: Mutex::new(Registry::default()),
            health: RwLock::new(String::new()),
            closing: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            keepalive_frame: frame::keep_alive(),
            admission: Admission::default(),
            rate_limit: RwLock::new(RateLimit::default()),
            rate_generation: AtomicU64::new(0),
            metrics: Metrics::default(),
            histograms: Histograms::default(),
        })
    }

    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    pub fn public_key(&self) -> &Key {
        self.key.public()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets (or clears) the mesh key. Clients presenting it may watch connections, close peers and
    /// forward packets.
    pub fn set_mesh_key(&self, mesh_key: Option<String>) {
        *self.mesh_key.write().unwrap_or_else(|p| p.into_inner()) = mesh_key.filter(|k| !k.is_empty());
    }

    pub fn mesh_key(&self) -> Option<String> {
        self.mesh_key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Constant-time comparison of a presented mesh key with ours.
    pub fn is_mesh_key(&self, presented: &str) -> bool {
        match &*self.mesh_key.read().unwrap_or_else(|p| p.into_inner()) {
            Some(ours) => ours.len() == presented.len() && bool::from(ours.as_bytes().ct_eq(presented.as_bytes())),
            None => false,
        }
    }

    /// Sets the receive limit of every client connection, connected ones included (they pick it
    /// up with their next frame); new clients see it in ServerInfo.
    pub fn set_rate_limit(&self, limit: RateLimit) {
        let mut current = self.rate_limit.write().unwrap_or_else(|p| p.into_inner());
        if *current != limit {
            *current = limit;
            self.rate_generation.fetch_add(1, Relaxed);
        }
    }

    pub fn rate_limit(&self) -> RateLimit {
        *self.rate_limit.read().unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    pub(crate) fn rate_generation(&self) -> u64 {
        self.rate_generation.load(Relaxed)
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    pub fn health(&self) -> String {
        self.health.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the health problem text ("" = healthy) and tells every connected client.
    pub fn set_health(&self, problem: &str) {
        {
            let mut h = self.health.write().unwrap_or_else(|p| p.into_inner());
            if *h == problem {
                return;
            }
            *h = problem.to_string();
        }
        let f = frame::health(problem);
        for c in self.registry().conns.values() {
            c.outbox.push_control(f.clone());
        }
    }

    #[inline]
    pub(crate) fn route(&self, dst: &Key) -> Route {
        if let Some(c) = self.active.get(dst) {
            return Route::Local(c.clone());
        }
        if let Some(f) = self.forwarders.get(dst) {
            return Route::Mesh(f.clone());
        }
        Route::Unknown
    }

    #[inline]
    pub(crate) fn local(&self, dst: &Key) -> Option<Arc<Conn>> {
        self.active.get(dst).map(|c| c.clone())
    }

    pub(crate) fn register(&self, conn: &Arc<Conn>) {
        let mut reg = self.registry();
        let list = reg.clients.entry(conn.key).or_default();
        if list.is_empty() {
            Metrics::inc(&self.metrics.clients);
        } else {
            Metrics::inc(&self.metrics.duplicate_client_connections);
            conn.set_duplicate(true);
            for c in list.iter() {
                c.set_duplicate(true);
            }
        }
        list.push(conn.clone());
        self.make_active(conn);
        reg.conns.insert(conn.id, conn.clone());
        let present = conn.peer_present_frame();
        for w in reg.watchers.values() {
            w.outbox.push_control(present.clone());
        }
    }

    pub(crate) fn unregister(&self, conn: &Arc<Conn>) {
        let mut reg = self.registry();
        if reg.conns.remove(&conn.id).is_none() {
            return;
        }
        if reg.watchers.remove(&conn.id).is_some() {
            Metrics::dec(&self.metrics.watchers);
        }
        let Some(list) = reg.clients.get_mut(&conn.key) else {
            return;
        };
        list.retain(|c| c.id != conn.id);
        if let Some(most_recent) = list.last().cloned() {
            if list.len() == 1 {
                most_recent.set_duplicate(false);
            }
            if !most_recent.is_active() {
                self.make_active(&most_recent);
            }
            return;
        }
        reg.clients.remove(&conn.key);
        self.active.remove(&conn.key);
        Metrics::dec(&self.metrics.clients);
        let gone = frame::peer_gone(&conn.key, PEER_GONE_DISCONNECTED);
        for w in reg.watchers.values() {
            w.outbox.push_control(gone.clone());
        }
        if !reg.forwarders.contains_key(&conn.key) {
            self.notify_peer_gone(&mut reg, &conn.key);
        }
    }

    /// `src` left the region: tell every connection that received packets from it.
    fn notify_peer_gone(&self, reg: &mut Registry, src: &Key) {
        let Some(receivers) = reg.sent_to.remove(src) else {
            return;
        };
        let gone = frame::peer_gone(src, PEER_GONE_DISCONNECTED);
        for conn_id in receivers.values() {
            if let Some(c) = reg.conns.get(conn_id) {
                c.outbox.push_control(gone.clone());
                Metrics::inc(&self.metrics.peer_gone_disconnected_sent);
            }
        }
    }

    /// Records that `dst_conn` received a packet from `src` (callers cache this to do it once per pair).
    pub(crate) fn note_sent(&self, src: &Key, dst_conn: &Conn) {
        self.registry()
            .sent_to
            .entry(*src)
            .or_default()
            .insert(dst_conn.key, dst_conn.id);
    }

    /// Last writer is active: a duplicate connection that sends any frame becomes the one packets
    /// for its key go to, and the most recently active of the others takes over when it leaves.
    pub(crate) fn note_activity(&self, conn: &Arc<Conn>) {
        let mut reg = self.registry();
        let Some(list) = reg.clients.get_mut(&conn.key) else {
            return;
        };
        let Some(i) = list.iter().position(|c| c.id == conn.id) else {
            return;
        };
        let conn = list.remove(i);
        list.push(conn.clone());
        self.make_active(&conn);
    }

    /// Routes `conn`'s key to `conn`. Called with the registry lock held.
    fn make_active(&self, conn: &Arc<Conn>) {
        if let Some(previous) = self.active.insert(conn.key, conn.clone()) {
            previous.set_active(false);
        }
        conn.set_active(true);
    }

    /// WatchConns: send the current clients, then stream changes.
    pub(crate) fn add_watcher(&self, conn: &Arc<Conn>) {
        let mut reg = self.registry();
        if !reg.conns.contains_key(&conn.id) || reg.watchers.contains_key(&conn.id) {
            return;
        }
        for list in reg.clients.values() {
            if let Some(c) = list.last() {
                conn.outbox.push_control(c.peer_present_frame());
            }
        }
        reg.watchers.insert(conn.id, conn.clone());
        Metrics::inc(&self.metrics.watchers);
    }

    /// ClosePeer: closes every local connection of `key`.
    pub(crate) fn close_peer(&self, key: &Key) {
        let reg = self.registry();
        for c in reg.clients.get(key).into_iter().flatten() {
            c.close();
        }
    }

    /// A mesh peer announced `key` (PeerPresent): packets for it may go through `forwarder`.
    pub fn add_forwarder(&self, key: Key, forwarder: Arc<dyn Forwarder>) {
        let mut reg = self.registry();
        let entries = reg.forwarders.entry(key).or_default();
        if entries.iter().any(|f| f.link_id() == forwarder.link_id()) {
            return;
        }
        if entries.is_empty() {
            self.forwarders.insert(key, forwarder.clone());
            Metrics::inc(&self.metrics.forwarders);
        }
        entries.push(forwarder);
    }

    /// A mesh peer said `key` left it (PeerGone), or the link to it went away.
    pub fn remove_forwarder(&self, key: &Key, link_id: u64) {
        let mut reg = self.registry();
        let Some(entries) = reg.forwarders.get_mut(key) else {
            return;
        };
        let Some(i) = entries.iter().position(|f| f.link_id() == link_id) else {
            return;
        };
        entries.remove(i);
        if let Some(next) = entries.first() {
            self.forwarders.insert(*key, next.clone());
            return;
        }
        reg.forwarders.remove(key);
        self.forwarders.remove(key);
        Metrics::dec(&self.metrics.forwarders);
        if !reg.clients.contains_key(key) {
            self.notify_peer_gone(&mut reg, key);
        }
    }

    /// Removes every forwarder learned through `link_id` (the mesh link is gone).
    pub fn remove_link(&self, link_id: u64) {
        let keys: Vec<Key> = {
            let reg = self.registry();
            reg.forwarders
                .iter()
                .filter(|(_, fs)| fs.iter().any(|f| f.link_id() == link_id))
                .map(|(k, _)| *k)
                .collect()
        };
        for k in keys {
            self.remove_forwarder(&k, link_id);
        }
    }

    /// Graceful shutdown: no new connections; every client gets Restarting and is closed once its
    /// queue is flushed. Resolves when all connections are gone or `grace` has passed.
    pub async fn shutdown(&self, reconnect_in: Duration, try_for: Duration, grace: Duration) {
        self.closing.store(true, Relaxed);
        let restarting = frame::restarting(reconnect_in.as_millis() as u32, try_for.as_millis() as u32);
        let conns: Vec<Arc<Conn>> = self.registry().conns.values().cloned().collect();
        for c in &conns {
            c.outbox.finish(Some(restarting.clone()));
            Metrics::inc(&self.metrics.restarting_sent);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.metrics.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for c in self.registry().conns.values() {
            c.close();
        }
    }

    pub(crate) fn peer_addr_flags(addr: &SocketAddr) -> ([u8; 16], u16) {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        (ip, addr.port())
    }
}
