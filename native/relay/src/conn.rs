//! One client connection: the handshake, then a reader loop (this task) and a writer task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

use crate::frame::{
    self, FrameType, HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE, PEER_GONE_NOT_HERE, PEER_PRESENT_MESH_PEER,
    PEER_PRESENT_PROBER, PEER_PRESENT_REGULAR, PING_LEN, PING_MAX,
};
use crate::handshake::{self, HandshakeError};
use crate::io::{self, FrameReader};
use crate::keys::Key;
use crate::metrics::Metrics;
use crate::outbox::{run_writer, Enqueued, OutFrame, Outbox, WriterExit};
use crate::relay::{RateLimit, Relay, Route};
use crate::upgrade::{self, Transport, Upgrade};

pub struct Conn {
    pub id: u64,
    pub key: Key,
    pub remote: SocketAddr,
    /// Presented the mesh key: may watch, close peers and forward packets.
    pub can_mesh: bool,
    pub is_prober: bool,
    pub outbox: Outbox,
    closed: watch::Sender<bool>,
    /// Another connection with the same key exists (last writer is active).
    duplicate: AtomicBool,
    /// Packets for this key come here: mirrors the relay's `active` map, written under its registry
    /// lock, read without it on every frame.
    active: AtomicBool,
    preferred: AtomicBool,
}

impl Conn {
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub(crate) fn set_duplicate(&self, dup: bool) {
        self.duplicate.store(dup, Relaxed);
    }

    pub(crate) fn set_active(&self, active: bool) {
        self.active.store(active, Relaxed);
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    pub(crate) fn peer_present_frame(&self) -> Bytes {
        let (ip, port) = Relay::peer_addr_flags(&self.remote);
        let flags = match (self.can_mesh as u8 * PEER_PRESENT_MESH_PEER) | (self.is_prober as u8 * PEER_PRESENT_PROBER)
        {
            0 => PEER_PRESENT_REGULAR,
            special => special,
        };
        frame::peer_present(&self.key, &ip, port, flags)
    }
}

/// Why a connection ended after its handshake, for metrics and tests.
#[derive(Debug, PartialEq, Eq)]
enum ReadExit {
    Eof,
    Closed,
    ProtocolError,
    PermissionDenied,
}

/// Serves one upgraded connection to its end. `head` holds bytes already read past the request.
pub async fn serve(relay: Arc<Relay>, transport: Transport, mut head: Bytes, upgrade: Upgrade, remote: SocketAddr) {
    Metrics::inc(&relay.metrics.accepts);
    Metrics::inc(&relay.metrics.connections);
    if upgrade == (Upgrade::Derp { fast_start: true }) {
        Metrics::inc(&relay.metrics.upgrades_fast_start);
    }
    let _open = ConnectionGauge(&relay.metrics);
    let upgraded_at = std::time::Instant::now();
    if relay.is_closing() {
        return;
    }
    let Ok((reader, mut writer)) = upgrade::open(transport, &upgrade, &mut head).await else {
        return;
    };

    let mut preamble = BytesMut::new();
    if upgrade == (Upgrade::Derp { fast_start: false }) {
        preamble.put_slice(upgrade::derp_switching_protocols(relay.public_key()).as_bytes());
    }
    preamble.put_slice(&frame::server_key(relay.public_key()));
    let mut reader = FrameReader::new(reader, &head);
    drop(head);
    let handshake = async {
        io::write_all(&mut writer, &preamble)
            .await
            .map_err(|_| HandshakeError::Io)?;
        handshake::read_client_info(&mut reader, relay.key()).await
    };
    let (key, info, shared) = match handshake.await {
        Ok(v) => v,
        Err(e) => {
            count_handshake_failure(&relay.metrics, e);
            return;
        }
    };
    let can_mesh = info.mesh_key.as_deref().is_some_and(|k| relay.is_mesh_key(k));
    // Admission (the verify URL), as derper orders it: once ClientInfo told the key, before the
    // client is registered or sent ServerInfo. Mesh peers are not asked about. Refused: closed.
    // Boxed: the check's future (an HTTP exchange) is large, and inline it would enlarge the
    // state every connection's task keeps for its whole life.
    if !can_mesh
        && relay.admission.is_enabled()
        && Box::pin(relay.admission.check(&relay.metrics, &key, remote.ip()))
            .await
            .is_err()
    {
        return;
    }
    let (closed_tx, closed_rx) = watch::channel(false);
    let conn = Arc::new(Conn {
        id: relay.next_id(),
        key,
        remote,
        can_mesh,
        is_prober: info.is_prober,
        outbox: Outbox::new(relay.config.queue_depth, relay.config.disco_queue_depth).sampling_queue_wait(),
        closed: closed_tx,
        duplicate: AtomicBool::new(false),
        active: AtomicBool::new(false),
        preferred: AtomicBool::new(false),
    });
    // Registered before ServerInfo goes out: a client may send to a peer the moment its peer's
    // handshake completes. Packets queued meanwhile are written after ServerInfo by the writer.
    relay.register(&conn);
    let mut hello = handshake::server_info_frame(&shared, relay.rate_limit()).to_vec();
    let health = relay.health();
    if !health.is_empty() {
        hello.extend_from_slice(&frame::health(&health));
    }
    if tokio::time::timeout(relay.config.write_timeout, io::write_all(&mut writer, &hello))
        .await
        .map_or(true, |r| r.is_err())
    {
        relay.unregister(&conn);
        count_handshake_failure(&relay.metrics, HandshakeError::Io);
        return;
    }
    relay.histograms.handshake.record(upgraded_at.elapsed());
    if can_mesh {
        Metrics::inc(&relay.metrics.mesh_connections);
        reader.set_bulk(true);
    }

    let writer_task = {
        let relay = relay.clone();
        let conn = conn.clone();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            let exit = run_writer(
                &conn.outbox,
                writer,
                closed,
                &relay.writer_config,
                &relay.keepalive_frame,
                || Metrics::inc(&relay.metrics.keepalives_sent),
                Some(&relay.histograms.queue_wait),
            )
            .await;
            if exit == WriterExit::WriteTimeout {
                Metrics::inc(&relay.metrics.write_timeouts);
            }
            conn.close();
        })
    };

    let exit = read_loop(&relay, &conn, &mut reader, closed_rx).await;
    match exit {
        ReadExit::ProtocolError => Metrics::inc(&relay.metrics.protocol_errors),
        ReadExit::PermissionDenied => Metrics::inc(&relay.metrics.permission_denied),
        ReadExit::Eof | ReadExit::Closed => {}
    }
    relay.unregister(&conn);
    if conn.preferred.load(Relaxed) {
        Metrics::dec(&relay.metrics.home_connections);
    }
    if can_mesh {
        Metrics::dec(&relay.metrics.mesh_connections);
    }
    if exit == ReadExit::Closed {
        // Closed from our side (ClosePeer, shutdown, write failure): let the writer finish flushing.
        let _ = writer_task.await;
    } else {
        conn.close();
        let _ = writer_task.await;
    }
}

/// Decrements the open-connections gauge however `serve` returns.
struct ConnectionGauge<'a>(&'a Metrics);

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        Metrics::dec(&self.0.connections);
    }
}

fn count_handshake_failure(m: &Metrics, e: HandshakeError) {
    Metrics::inc(&m.handshake_failures);
    Metrics::inc(match e {
        HandshakeError::Timeout => &m.handshake_failure_timeout,
        HandshakeError::BadFirstFrame => &m.handshake_failure_bad_first_frame,
        HandshakeError::BadSize => &m.handshake_failure_bad_size,
        HandshakeError::ZeroKey => &m.handshake_failure_zero_key,
        HandshakeError::BoxOpen => &m.handshake_failure_box_open,
        HandshakeError::BadJson => &m.handshake_failure_bad_json,
        _ => &m.handshake_failure_io,
    });
}

/// A client's receive limit: tokens are bytes, refilled at the limit's rate up to its burst. A
/// frame takes its size even when that leaves the bucket in debt, and the reader then waits until
/// the debt is paid (`golang.org/x/time/rate`'s reservations, as derper uses them).
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: RateLimit) -> TokenBucket {
        TokenBucket {
            rate: limit.bytes_per_sec as f64,
            burst: limit.burst as f64,
            tokens: limit.burst as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` bytes (at most a burst); returns how long to wait before reading them.
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= (n as f64).min(self.burst);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Token bucket for PeerGone(not here) answers: 1 per second, burst 3.
struct NotHereLimiter {
    tokens: f64,
    last: Instant,
}

impl NotHereLimiter {
    const RATE_PER_SEC: f64 = 1.0;
    const BURST: f64 = 3.0;

    fn new() -> Self {
        NotHereLimiter {
            tokens: Self::BURST,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * Self::RATE_PER_SEC).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// ForwardPacket heads per arena allocation.
const HEAD_ARENA_FRAMES: usize = 256;

/// Per-reader state that avoids shared writes on the packet path.
struct ReaderState {
    /// (src, dst) → id of the dst connection already recorded as having received from src
    /// (src is this client for its own packets, the original sender for forwarded ones).
    recorded: ahash::AHashMap<(Key, Key), u64>,
    /// The last recorded pair: packets come in runs, so most checks end here without hashing.
    last_recorded: Option<(Key, Key, u64)>,
    not_here: NotHereLimiter,
    /// Where ForwardPacket heads (header ‖ source key) are written.
    head_arena: BytesMut,
    /// Packet counters, added to the shared atomics once per read batch instead of per packet
    /// (shared cache lines bouncing between cores cost more than the forwarding itself).
    counts: PacketCounts,
    /// A receiver's queue was full for a packet of this reader: it yields before reading on.
    congested: bool,
    /// The receive limit in force (none for mesh peers), and the relay's limit generation it
    /// was made from.
    bucket: Option<TokenBucket>,
    rate_generation: u64,
}

impl ReaderState {
    /// Records once per (src, dst connection) that `dst_conn` received from `src`, for PeerGone.
    #[inline]
    fn note_sent(&mut self, relay: &Relay, src: &Key, dst_conn: &Conn) {
        let entry = (*src, dst_conn.key, dst_conn.id);
        if self.last_recorded == Some(entry) {
            return;
        }
        self.last_recorded = Some(entry);
        if self.recorded.get(&(*src, dst_conn.key)) != Some(&dst_conn.id) {
            self.recorded.insert((*src, dst_conn.key), dst_conn.id);
            relay.note_sent(src, dst_conn);
        }
    }
}

#[derive(Default)]
struct PacketCounts {
    received: u64,
    received_bytes: u64,
    sent: u64,
    sent_bytes: u64,
    forwarded_out: u64,
    forwarded_in: u64,
}

impl PacketCounts {
    fn flush(&mut self, m: &Metrics) {
        if self.received == 0 && self.forwarded_in == 0 {
            return;
        }
        let c = std::mem::take(self);
        Metrics::add(&m.packets_received, c.received);
        Metrics::add(&m.bytes_received, c.received_bytes);
        Metrics::add(&m.packets_sent, c.sent);
        Metrics::add(&m.bytes_sent, c.sent_bytes);
        Metrics::add(&m.packets_forwarded_out, c.forwarded_out);
        Metrics::add(&m.packets_forwarded_in, c.forwarded_in);
    }
}

async fn read_loop(
    relay: &Arc<Relay>,
    conn: &Arc<Conn>,
    reader: &mut FrameReader,
    mut closed: watch::Receiver<bool>,
) -> ReadExit {
    let mut state = ReaderState {
        recorded: ahash::AHashMap::new(),
        not_here: NotHereLimiter::new(),
        last_recorded: None,
        head_arena: BytesMut::new(),
        counts: PacketCounts::default(),
        congested: false,
        bucket: None,
        rate_generation: u64::MAX,
    };
    let exit = loop {
        if !reader.has_header() {
            state.counts.flush(&relay.metrics);
        }
        // Biased: the frame is polled first, so the close signal costs nothing while data is buffered.
        let header = tokio::select! {
            biased;
            h = reader.next_header() => h,
            _ = closed.wait_for(|c| *c) => break ReadExit::Closed,
        };
        let Ok((t, len)) = header else { break ReadExit::Eof };
        if !conn.can_mesh {
            let generation = relay.rate_generation();
            if generation != state.rate_generation {
                state.rate_generation = generation;
                let limit = relay.rate_limit();
                state.bucket = limit.is_set().then(|| TokenBucket::new(limit));
            }
            if let Some(bucket) = &mut state.bucket {
                // Charged before the frame is read: while the client waits, its bytes stay in the
                // socket and TCP slows it down (nothing is dropped, other clients are not touched).
                let wait = bucket.take((HEADER_LEN + len) as u64);
                if !wait.is_zero() {
                    Metrics::inc(&relay.metrics.rate_limited_frames);
                    Metrics::add(&relay.metrics.rate_limit_wait_micros, wait.as_micros() as u64);
                    state.counts.flush(&relay.metrics);
                    tokio::select! {
                        biased;
                        _ = closed.wait_for(|c| *c) => break ReadExit::Closed,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let result = tokio::select! {
            biased;
            r = handle_frame(relay, conn, reader, &mut state, t, len) => r,
            _ = closed.wait_for(|c| *c) => break ReadExit::Closed,
        };
        if let Err(exit) = result {
            break exit;
        }
        if std::mem::take(&mut state.congested) {
            // A receiver is behind this sender: let its writer run before reading more, so an
            // unpaced sender is slowed by TCP instead of having its packets read, then dropped.
            tokio::task::yield_now().await;
        }
    };
    state.counts.flush(&relay.metrics);
    exit
}

async fn handle_frame(
    relay: &Arc<Relay>,
    conn: &Arc<Conn>,
    reader: &mut FrameReader,
    state: &mut ReaderState,
    t: u8,
    len: usize,
) -> Result<(), ReadExit> {
    let m = &relay.metrics;
    let eof = |_| ReadExit::Eof;
    // Last writer is active: any frame a client sends, whatever its type or validity, makes its
    // connection the one its key's packets go to (derper's noteClientActivity). Two relaxed loads
    // unless this connection has a duplicate and is not already the active one. Mesh connections are
    // left out: a mesh link's data lanes are duplicates of one relay key that all send, and nothing
    // is addressed to a relay's key, so tracking them would only take the registry lock per frame.
    if conn.duplicate.load(Relaxed) && !conn.is_active() && !conn.can_mesh {
        relay.note_activity(conn);
    }
    match FrameType::from_u8(t) {
        Some(FrameType::SendPacket) => {
            if !(KEY_LEN..=KEY_LEN + MAX_PACKET_SIZE).contains(&len) {
                return Err(ReadExit::ProtocolError);
            }
            let f = reader.take_frame(len).await.map_err(eof)?;
            send_packet(relay, conn, state, f);
        }
        Some(FrameType::ForwardPacket) => {
            if !conn.can_mesh {
                return Err(ReadExit::PermissionDenied);
            }
            if !(2 * KEY_LEN..=2 * KEY_LEN + MAX_PACKET_SIZE).contains(&len) {
                return Err(ReadExit::ProtocolError);
            }
            let f = reader.take_frame(len).await.map_err(eof)?;
            state.counts.forwarded_in += 1;
            deliver_forwarded(relay, conn, state, f);
        }
        Some(FrameType::Ping) => {
            if !(PING_LEN..=PING_MAX).contains(&len) {
                return Err(ReadExit::ProtocolError);
            }
            let f = reader.take_frame(len).await.map_err(eof)?;
            let mut data = [0u8; PING_LEN];
            data.copy_from_slice(&f[HEADER_LEN..HEADER_LEN + PING_LEN]);
            conn.outbox.push_control(frame::pong(&data));
            Metrics::inc(&m.pings_received);
        }
        Some(FrameType::NotePreferred) => {
            if len != 1 {
                return Err(ReadExit::ProtocolError);
            }
            let f = reader.take_frame(len).await.map_err(eof)?;
            let preferred = f[HEADER_LEN] != 0;
            if conn.preferred.swap(preferred, Relaxed) != preferred {
                if preferred {
                    Metrics::inc(&m.home_connections);
                } else {
                    Metrics::dec(&m.home_connections);
                }
            }
        }
        Some(FrameType::WatchConns) => {
            if !conn.can_mesh {
                return Err(ReadExit::PermissionDenied);
            }
            if len != 0 {
                return Err(ReadExit::ProtocolError);
            }
            reader.take_frame(0).await.map_err(eof)?;
            relay.add_watcher(conn);
        }
        Some(FrameType::ClosePeer) => {
            if !conn.can_mesh {
                return Err(ReadExit::PermissionDenied);
            }
            if len != KEY_LEN {
                return Err(ReadExit::ProtocolError);
            }
            let f = reader.take_frame(len).await.map_err(eof)?;
            relay.close_peer(&frame::key_at(&f, HEADER_LEN));
        }
        _ => {
            // Unknown types, and known ones a client has no reason to send (Pong, KeepAlive…): skip.
            reader.skip_frame(len).await.map_err(eof)?;
            if t != FrameType::Pong as u8 {
                Metrics::inc(&m.unknown_frames);
            }
        }
    }
    Ok(())
}

/// SendPacket `[04][len][dst][packet]` → RecvPacket `[05][len][src][packet]`, rewritten in place.
fn send_packet(relay: &Arc<Relay>, conn: &Arc<Conn>, state: &mut ReaderState, mut f: BytesMut) {
    let m = &relay.metrics;
    let dst = frame::key_at(&f, HEADER_LEN);
    let payload_len = (f.len() - HEADER_LEN - KEY_LEN) as u64;
    state.counts.received += 1;
    state.counts.received_bytes += payload_len;
    let disco = frame::is_disco(&f[HEADER_LEN + KEY_LEN..]);
    match relay.route(&dst) {
        Route::Local(dst_conn) => {
            f[0] = FrameType::RecvPacket as u8;
            f[HEADER_LEN..HEADER_LEN + KEY_LEN].copy_from_slice(&conn.key);
            enqueue_local(relay, state, &conn.key, &dst_conn, f.freeze(), disco, payload_len);
        }
        Route::Mesh(forwarder) => {
            // ForwardPacket = header ‖ src, then the client's dst ‖ packet, uncopied.
            let body = f.freeze().slice(HEADER_LEN..);
            // Heads are cut from a per-reader arena: one allocation per few hundred packets.
            if state.head_arena.capacity() < HEADER_LEN + KEY_LEN {
                state.head_arena = BytesMut::with_capacity((HEADER_LEN + KEY_LEN) * HEAD_ARENA_FRAMES);
            }
            frame::put_header(&mut state.head_arena, FrameType::ForwardPacket, KEY_LEN + body.len());
            state.head_arena.put_slice(&conn.key);
            let head = state.head_arena.split().freeze();
            if forwarder.forward(OutFrame { head, tail: body }) == Enqueued::DroppedOldest {
                Metrics::inc(&m.packets_dropped_queue_full);
                state.congested = true;
            }
            state.counts.forwarded_out += 1;
        }
        Route::Unknown => {
            Metrics::inc(&m.packets_dropped_unknown_dest);
            if disco {
                answer_not_here(m, conn, state, &dst);
            }
        }
    }
}

/// ForwardPacket `[0a][len][src][dst][packet]` → RecvPacket `[05][len-32][src][packet]` for a local
/// client only: forwarded packets are never forwarded again (one hop, no loops).
fn deliver_forwarded(relay: &Arc<Relay>, conn: &Arc<Conn>, state: &mut ReaderState, mut f: BytesMut) {
    let m = &relay.metrics;
    let src = frame::key_at(&f, HEADER_LEN);
    let dst = frame::key_at(&f, HEADER_LEN + KEY_LEN);
    let packet_start = HEADER_LEN + 2 * KEY_LEN;
    let payload_len = (f.len() - packet_start) as u64;
    state.counts.received += 1;
    state.counts.received_bytes += payload_len;
    let disco = frame::is_disco(&f[packet_start..]);
    let Some(dst_conn) = relay.local(&dst) else {
        Metrics::inc(&m.packets_dropped_unknown_dest_on_fwd);
        if disco {
            answer_not_here(m, conn, state, &dst);
        }
        return;
    };
    bytes::Buf::advance(&mut f, KEY_LEN);
    f[0] = FrameType::RecvPacket as u8;
    f[1..HEADER_LEN].copy_from_slice(&((KEY_LEN as u64 + payload_len) as u32).to_be_bytes());
    f[HEADER_LEN..HEADER_LEN + KEY_LEN].copy_from_slice(&src);
    enqueue_local(relay, state, &src, &dst_conn, f.freeze(), disco, payload_len);
}

/// A disco packet to a key that is not here: tell the sender, at most 1/s (burst 3).
fn answer_not_here(m: &Metrics, conn: &Conn, state: &mut ReaderState, dst: &Key) {
    if state.not_here.allow() {
        conn.outbox.push_control(frame::peer_gone(dst, PEER_GONE_NOT_HERE));
        Metrics::inc(&m.peer_gone_not_here_sent);
    }
}

/// Queues a RecvPacket frame from `src` to a local connection, counts it, and notes who sent to whom.
fn enqueue_local(
    relay: &Relay,
    state: &mut ReaderState,
    src: &Key,
    dst: &Conn,
    frame: Bytes,
    disco: bool,
    payload_len: u64,
) {
    let m = &relay.metrics;
    let queued = match dst.outbox.push_packet(OutFrame::whole(frame), disco) {
        Enqueued::Queued => true,
        Enqueued::DroppedOldest => {
            Metrics::inc(&m.packets_dropped_queue_full);
            state.congested = true;
            true
        }
        Enqueued::Closed => {
            Metrics::inc(&m.packets_dropped_gone);
            false
        }
    };
    if queued {
        state.counts.sent += 1;
        state.counts.sent_bytes += payload_len;
    }
    state.note_sent(relay, src, dst);
}
