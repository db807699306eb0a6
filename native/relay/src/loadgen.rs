//! Load generator: N sender→receiver pairs of DERP clients through any relay, for a fixed time.
//!
//! Each sender blasts SendPacket frames to its receiver as fast as its socket takes them, optionally
//! paced (`rate_per_pair`) or flow-controlled (`window`), from one reused buffer of many frames: no
//! per-packet allocation, one write per batch. Every packet starts with a kind byte saying in which
//! phase it was sent (warmup, measured window), so loss is counted exactly for the packets sent in
//! the window. Every `probe_interval` a sender marks one packet as a
//! probe carrying its send time; the receiver echoes it back, and the sender's reader records the
//! round trip. Unpaced, RTT is latency *under saturation*: it includes the time spent in the sender's
//! socket buffer and the relay's full queues. Paced below the relay's capacity, it is the relay's own
//! forwarding delay.
//!
//! Sender and receiver of a pair may use different relay URLs, to measure the mesh path. `https://`
//! URLs are dialed over TLS ([`TlsOptions`]: the public roots plus a private CA), so a relay's TLS
//! termination is measured with the same load.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::client::{dial_tls, ClientError, DerpConn, DialOptions, TlsOptions};
use crate::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE, PING_LEN};
use crate::handshake::ClientInfo;
use crate::io::{FrameReader, Writer};
use crate::keys::{Key, KeyPair};

/// Phases, also the low bits of every packet's kind byte.
const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
/// Senders stop; receivers drain what is still in flight.
const PHASE_DRAIN: u8 = 2;
/// Kind-byte flag: a probe, `kind ‖ send time (u64 BE, ns since the run's start)`; echo it.
const KIND_PROBE: u8 = 0x80;
/// Kind-byte flag: a probe's echo, receiver → sender.
const KIND_ECHO: u8 = 0x40;
const PHASE_MASK: u8 = 0x0f;
/// kind(1) ‖ timestamp(8): the smallest packet the generator sends.
pub const MIN_PACKET_SIZE: usize = 9;

/// Bytes of frames a sender writes per syscall.
const BATCH_BYTES: usize = 128 << 10;
/// A write that makes no progress for this long means the relay is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Dials in flight at once while setting up.
const DIAL_CONCURRENCY: usize = 64;
/// With a flow-control window: how long a sender waits for arrivals before counting what it has in
/// flight as lost (a relay that drops packets would otherwise stall it).
const LOSS_TIMEOUT: Duration = Duration::from_millis(20);
/// After the window: how long receivers may keep draining, and the quiet time that ends it early.
const DRAIN_MAX: Duration = Duration::from_secs(2);
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Relay the senders connect to (`http://host:port[/derp]`).
    pub url: String,
    /// Relay the receivers connect to; `None` means `url`. A different node measures the mesh path.
    pub receiver_url: Option<String>,
    /// Sender/receiver pairs, each client with a fresh key.
    pub pairs: usize,
    /// Packet payload bytes (after the 32-byte key), [`MIN_PACKET_SIZE`]..=64 KiB.
    pub packet_size: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Sending before the window starts, not counted.
    pub warmup: Duration,
    /// How often each sender sends a latency probe.
    pub probe_interval: Duration,
    /// Packets per second each sender sends; `None` sends as fast as the socket takes them.
    /// Latency measured at a rate the relay keeps up with shows the relay's own delay rather than
    /// the time packets wait in full buffers.
    pub rate_per_pair: Option<f64>,
    /// Most packets each pair may have in flight (sent, not yet received); `None` for no limit.
    /// Unlimited senders overrun a relay's queues, so it spends its CPU reading packets it then
    /// drops; a window about the size of the relay's per-client queue measures its capacity instead.
    pub window: Option<usize>,
    /// Dial with `Derp-Fast-Start: 1`.
    pub fast_start: bool,
    /// TLS settings for `https://` URLs (a private CA that signed the relay's certificate);
    /// ignored for `http://`.
    pub tls: TlsOptions,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            url: String::new(),
            receiver_url: None,
            pairs: 10,
            packet_size: 1400,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            probe_interval: Duration::from_millis(5),
            rate_per_pair: None,
            window: None,
            fast_start: false,
            tls: TlsOptions::default(),
        }
    }
}

/// Why a run failed. `Display` says what and where.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The options are unusable (nothing was dialed).
    #[error("{0}")]
    Options(#[from] OptionsError),
    /// A client could not connect: `role` is "sender" or "receiver", `pair` its pair.
    #[error("dial {role} {pair}: {error}")]
    Dial {
        role: &'static str,
        pair: usize,
        #[source]
        error: ClientError,
    },
    /// A client failed during the run (the relay died, stalled or misbehaved).
    #[error("pair {pair} {role}: {error}")]
    Pair {
        pair: usize,
        role: &'static str,
        #[source]
        error: PairError,
    },
}

/// Which option is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionsError {
    #[error("pairs must be at least 1")]
    NoPairs,
    #[error("packet size {0} is out of range {MIN_PACKET_SIZE}..={MAX_PACKET_SIZE}")]
    PacketSize(usize),
    #[error("duration must be more than 0")]
    NoDuration,
    #[error("rate {0} must be a positive number of packets per second")]
    Rate(f64),
    #[error("window must be at least 1 packet")]
    NoWindow,
    #[error("probe interval must be more than 0")]
    NoProbeInterval,
    /// The TLS settings are unusable (e.g. the private CA PEM holds no certificate).
    #[error("{0}")]
    Tls(String),
}

/// What went wrong on one client's connection during a run.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("write to relay failed: {0}")]
    Write(#[source] std::io::Error),
    #[error("relay accepted no data for {} s", WRITE_TIMEOUT.as_secs())]
    WriteStalled,
    #[error("relay closed the connection")]
    Closed,
    #[error("read from relay failed: {0}")]
    Read(#[source] std::io::Error),
    #[error("relay sent a frame of type {frame_type:#04x} with {len} bytes (limit {MAX_FRAME_SIZE})")]
    FrameTooLarge { frame_type: u8, len: usize },
}

/// Result of a run. Rates count what receivers got during the window; loss compares the packets
/// sent during the window with those of them that arrived (after a short drain).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub pairs: usize,
    pub packet_size: usize,
    /// The run's pacing and flow control, so a report describes itself.
    pub rate_per_pair: Option<f64>,
    pub window: Option<usize>,
    /// Measured window, as timed.
    pub duration_secs: f64,
    /// Packets sent during the window.
    pub packets_sent: u64,
    /// Packets received during the window.
    pub packets_received: u64,
    pub packets_per_sec: f64,
    /// Received payload (packet bytes after the key) in Gbit/s.
    pub gbit_per_sec: f64,
    /// Share of the window's packets that never arrived.
    pub loss_ratio: f64,
    pub rtt_p50_us: Option<u64>,
    pub rtt_p90_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub rtt_samples: usize,
}

/// Shared by every task of a run.
struct RunState {
    start: Instant,
    phase: AtomicU8,
}

impl RunState {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn phase(&self) -> u8 {
        self.phase.load(Relaxed)
    }
}

/// Counters of one pair. Each counter is written by one task only; `wake_at`/`wake` connect the
/// pair's receiver to its sender.
struct PairStats {
    sent_in_window: AtomicU64,
    received_in_window: AtomicU64,
    received_bytes_in_window: AtomicU64,
    /// Packets sent during the window that arrived, whenever they arrived.
    window_packets_arrived: AtomicU64,
    /// Round trips of probes sent during the window, in ns.
    rtt_ns: Mutex<Vec<u64>>,
    /// Flow control (`window`): every data packet the receiver got, in any phase.
    arrived_total: AtomicU64,
    /// The `arrived_total` at which the receiver wakes a sender waiting for window space;
    /// `u64::MAX` while the sender is not waiting.
    wake_at: AtomicU64,
    wake: Notify,
}

impl Default for PairStats {
    fn default() -> PairStats {
        PairStats {
            sent_in_window: AtomicU64::new(0),
            received_in_window: AtomicU64::new(0),
            received_bytes_in_window: AtomicU64::new(0),
            window_packets_arrived: AtomicU64::new(0),
            rtt_ns: Mutex::default(),
            arrived_total: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
        }
    }
}

/// Runs the load and reports. Runs on the caller's tokio runtime (use a multi-thread one).
/// Every step is bounded: a relay that dies or stalls makes this fail with a message, not hang.
pub async fn run(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    validate(&opts)?;
    let receiver_url = opts.receiver_url.clone().unwrap_or_else(|| opts.url.clone());
    let (senders, receivers) = dial_pairs(&opts, &receiver_url).await?;

    let state = Arc::new(RunState {
        start: Instant::now(),
        phase: AtomicU8::new(PHASE_WARMUP),
    });
    let stats: Vec<Arc<PairStats>> = (0..opts.pairs).map(|_| Arc::default()).collect();
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<LoadError>();
    // Dropping a JoinSet aborts its tasks, so an early return (or a dropped `run`) closes everything.
    let mut readers = JoinSet::new();
    let mut blasters = JoinSet::new();

    for (i, ((sender_key, sender), (receiver_key, receiver))) in senders.into_iter().zip(receivers).enumerate() {
        let s = stats[i].clone();
        let (st, tx) = (state.clone(), err_tx.clone());
        readers.spawn(async move {
            if let Err(e) = receive(receiver, sender_key, &st, &s).await {
                if st.phase() < PHASE_DRAIN {
                    let _ = tx.send(LoadError::Pair {
                        pair: i,
                        role: "receiver",
                        error: e,
                    });
                }
            }
        });

        let DerpConn { reader, writer, .. } = sender;
        let (pong_tx, pong_rx) = mpsc::channel(16);
        let (s, st, tx) = (stats[i].clone(), state.clone(), err_tx.clone());
        readers.spawn(async move {
            if let Err(e) = read_echoes(reader, pong_tx, &st, &s).await {
                if st.phase() < PHASE_DRAIN {
                    let _ = tx.send(LoadError::Pair {
                        pair: i,
                        role: "sender",
                        error: e,
                    });
                }
            }
        });
        let (s, st, tx) = (stats[i].clone(), state.clone(), err_tx.clone());
        let plan = SendPlan {
            packet_size: opts.packet_size,
            probe_interval: opts.probe_interval,
            rate: opts.rate_per_pair,
            window: opts.window,
        };
        blasters.spawn(async move {
            match blast(writer, receiver_key, plan, pong_rx, &st, &s).await {
                Ok(writer) => Some(writer),
                Err(e) => {
                    let _ = tx.send(LoadError::Pair {
                        pair: i,
                        role: "sender",
                        error: e,
                    });
                    None
                }
            }
        });
    }
    drop(err_tx);

    wait(opts.warmup, &mut err_rx).await?;
    state.phase.store(PHASE_MEASURE, Relaxed);
    let window_start = Instant::now();
    wait(opts.duration, &mut err_rx).await?;
    state.phase.store(PHASE_DRAIN, Relaxed);
    let window = window_start.elapsed();

    // Let what was sent in the window arrive: stop once nothing came for DRAIN_QUIET.
    let arrived = || {
        stats
            .iter()
            .map(|s| s.window_packets_arrived.load(Relaxed))
            .sum::<u64>()
    };
    let drain_end = Instant::now() + DRAIN_MAX;
    let mut last = arrived();
    while Instant::now() < drain_end {
        wait(DRAIN_QUIET, &mut err_rx).await?;
        let now = arrived();
        if now == last {
            break;
        }
        last = now;
    }

    // Senders leave their loop at PHASE_DRAIN (each write is bounded by WRITE_TIMEOUT); close them.
    let mut writers = Vec::new();
    while let Some(done) = blasters.join_next().await {
        if let Ok(Some(w)) = done {
            writers.push(w);
        }
    }
    if let Ok(e) = err_rx.try_recv() {
        return Err(e);
    }
    for mut w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
    }
    readers.shutdown().await;

    Ok(report(&opts, window, &stats))
}

/// Sleeps for `d` unless a task reports an error first.
async fn wait(d: Duration, errors: &mut mpsc::UnboundedReceiver<LoadError>) -> Result<(), LoadError> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        Some(e) = errors.recv() => Err(e),
    }
}

fn validate(opts: &LoadOptions) -> Result<(), OptionsError> {
    if opts.pairs == 0 {
        return Err(OptionsError::NoPairs);
    }
    if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&opts.packet_size) {
        return Err(OptionsError::PacketSize(opts.packet_size));
    }
    if opts.duration.is_zero() {
        return Err(OptionsError::NoDuration);
    }
    if let Some(rate) = opts.rate_per_pair {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(OptionsError::Rate(rate));
        }
    }
    if opts.window == Some(0) {
        return Err(OptionsError::NoWindow);
    }
    if opts.probe_interval.is_zero() {
        return Err(OptionsError::NoProbeInterval);
    }
    if opts.tls.ca_pem.is_some() {
        // A bad CA file fails here, once, not in every dial.
        opts.tls.client_config().map_err(|e| OptionsError::Tls(e.to_string()))?;
    }
    Ok(())
}

type Dialed = Vec<(Key, DerpConn)>;

/// Dials every receiver and sender (receivers on `receiver_url`), a bounded number at a time.
async fn dial_pairs(opts: &LoadOptions, receiver_url: &str) -> Result<(Dialed, Dialed), LoadError> {
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        can_ack_pings: true,
        ..Default::default()
    };
    let dial_options = DialOptions {
        fast_start: opts.fast_start,
    };
    let jobs = (0..opts.pairs * 2).map(|n| {
        let (role, url) = if n < opts.pairs {
            ("receiver", receiver_url)
        } else {
            ("sender", opts.url.as_str())
        };
        let (info, dial_options) = (&info, &dial_options);
        async move {
            let key = KeyPair::generate();
            let conn = dial_tls(url, &key, info, dial_options, &opts.tls)
                .await
                .map_err(|error| LoadError::Dial {
                    role,
                    pair: n % opts.pairs,
                    error,
                })?;
            Ok::<_, LoadError>((n, *key.public(), conn))
        }
    });
    let mut conns: Vec<_> = stream::iter(jobs)
        .buffer_unordered(DIAL_CONCURRENCY)
        .try_collect()
        .await?;
    conns.sort_by_key(|(n, _, _)| *n);
    let mut senders: Dialed = conns.into_iter().map(|(_, key, conn)| (key, conn)).collect();
    let receivers = senders.drain(..opts.pairs).collect();
    Ok((senders, receivers))
}

/// What each sender does, from the options.
#[derive(Clone, Copy)]
struct SendPlan {
    packet_size: usize,
    probe_interval: Duration,
    rate: Option<f64>,
    window: Option<usize>,
}

/// A sender's writing side: rewrites the reused batch only when the phase changes or a probe is due.
/// Returns the writer when the window is over.
async fn blast(
    mut writer: Writer,
    dst: Key,
    plan: SendPlan,
    mut pongs: mpsc::Receiver<[u8; PING_LEN]>,
    state: &RunState,
    stats: &PairStats,
) -> Result<Writer, PairError> {
    let frame_len = HEADER_LEN + KEY_LEN + plan.packet_size;
    let frames = (BATCH_BYTES / frame_len).max(1);
    let mut batch = Vec::with_capacity(frames * frame_len);
    let template = frame::send_packet(&dst, &vec![0u8; plan.packet_size]);
    for _ in 0..frames {
        batch.extend_from_slice(&template);
    }
    // Offset of the kind byte in frame `n`.
    let kind_at = |n: usize| n * frame_len + HEADER_LEN + KEY_LEN;
    let mut phase = PHASE_WARMUP;
    let started = Instant::now();
    let mut next_probe = started;
    let mut sent_total: u64 = 0;
    // Packets given up as lost by the window logic (they may still arrive: then the window is
    // briefly exceeded, which is harmless).
    let mut written_off: u64 = 0;
    loop {
        let now_phase = state.phase();
        if now_phase >= PHASE_DRAIN {
            return Ok(writer);
        }
        if now_phase != phase {
            phase = now_phase;
            for n in 0..frames {
                batch[kind_at(n)] = phase;
            }
        }
        while let Ok(data) = pongs.try_recv() {
            write(&mut writer, &frame::pong(&data)).await?;
        }
        let count = match plan.rate {
            None => frames,
            Some(rate) => {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                if due <= sent_total {
                    let next = started + Duration::from_secs_f64((sent_total + 1) as f64 / rate);
                    tokio::time::sleep_until(next.into()).await;
                    continue;
                }
                (due - sent_total).min(frames as u64) as usize
            }
        };
        let count = match plan.window {
            None => count,
            Some(window) => {
                let arrived = stats.arrived_total.load(Relaxed) + written_off;
                let in_flight = sent_total.saturating_sub(arrived);
                let free = (window as u64).saturating_sub(in_flight);
                // Wait until half the window is free, so writes stay batched.
                if free < (window as u64).div_ceil(2) {
                    let target = sent_total - window as u64 / 2;
                    stats.wake_at.store(target.saturating_sub(written_off), SeqCst);
                    if stats.arrived_total.load(SeqCst) + written_off < target {
                        let woken = tokio::time::timeout(LOSS_TIMEOUT, stats.wake.notified()).await;
                        if woken.is_err() {
                            // Nothing arrived for a while: the relay dropped what is in flight.
                            written_off += sent_total.saturating_sub(stats.arrived_total.load(Relaxed) + written_off);
                        }
                    }
                    stats.wake_at.store(u64::MAX, Relaxed);
                    continue;
                }
                count.min(free as usize)
            }
        };
        let probe = Instant::now() >= next_probe;
        if probe {
            let at = kind_at(0);
            batch[at] = phase | KIND_PROBE;
            batch[at + 1..at + 9].copy_from_slice(&state.now_ns().to_be_bytes());
            next_probe = Instant::now() + plan.probe_interval;
        }
        write(&mut writer, &batch[..count * frame_len]).await?;
        if probe {
            batch[kind_at(0)] = phase;
        }
        sent_total += count as u64;
        if phase == PHASE_MEASURE {
            stats.sent_in_window.fetch_add(count as u64, Relaxed);
        }
    }
}

async fn write(writer: &mut Writer, data: &[u8]) -> Result<(), PairError> {
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PairError::Write(e)),
        Err(_) => Err(PairError::WriteStalled),
    }
}

/// A sender's reading side: records probe echoes, hands Pings to the writer, ignores the rest.
async fn read_echoes(
    mut reader: FrameReader,
    pongs: mpsc::Sender<[u8; PING_LEN]>,
    state: &RunState,
    stats: &PairStats,
) -> Result<(), PairError> {
    loop {
        let (t, len) = next_frame(&mut reader).await?;
        if t == FrameType::RecvPacket as u8 && len >= KEY_LEN + MIN_PACKET_SIZE {
            let f = reader.take_frame(len).await.map_err(read_error)?;
            let p = &f[HEADER_LEN + KEY_LEN..];
            if p[0] == KIND_ECHO | PHASE_MEASURE {
                let sent = u64::from_be_bytes(p[1..9].try_into().expect("8 bytes"));
                let rtt = state.now_ns().saturating_sub(sent);
                stats.rtt_ns.lock().expect("rtt lock").push(rtt);
            }
        } else if t == FrameType::Ping as u8 && len >= PING_LEN {
            let f = reader.take_frame(len).await.map_err(read_error)?;
            let mut data = [0u8; PING_LEN];
            data.copy_from_slice(&f[HEADER_LEN..HEADER_LEN + PING_LEN]);
            // A full queue means pongs are already pending; dropping one is harmless here.
            let _ = pongs.try_send(data);
        } else {
            reader.skip_frame(len).await.map_err(read_error)?;
        }
    }
}

/// A receiver: counts packets, echoes probes to `sender`, answers Pings, ignores everything else.
async fn receive(conn: DerpConn, sender: Key, state: &RunState, stats: &PairStats) -> Result<(), PairError> {
    let DerpConn {
        mut reader, mut writer, ..
    } = conn;
    let mut echo = frame::send_packet(&sender, &[0u8; MIN_PACKET_SIZE]).to_vec();
    let echo_at = HEADER_LEN + KEY_LEN;
    loop {
        let (t, len) = next_frame(&mut reader).await?;
        if t == FrameType::RecvPacket as u8 && len > KEY_LEN {
            let f = reader.take_frame(len).await.map_err(read_error)?;
            let p = &f[HEADER_LEN + KEY_LEN..];
            if state.phase() == PHASE_MEASURE {
                stats.received_in_window.fetch_add(1, Relaxed);
                stats.received_bytes_in_window.fetch_add(p.len() as u64, Relaxed);
            }
            if p[0] & PHASE_MASK == PHASE_MEASURE {
                stats.window_packets_arrived.fetch_add(1, Relaxed);
            }
            // SeqCst here and in the sender's store-then-check: otherwise both could miss each other.
            let arrived = stats.arrived_total.fetch_add(1, SeqCst) + 1;
            if arrived >= stats.wake_at.load(SeqCst) {
                stats.wake_at.store(u64::MAX, Relaxed);
                stats.wake.notify_one();
            }
            if p[0] & KIND_PROBE != 0 && p.len() >= MIN_PACKET_SIZE {
                echo[echo_at] = KIND_ECHO | (p[0] & PHASE_MASK);
                echo[echo_at + 1..echo_at + 9].copy_from_slice(&p[1..9]);
                write(&mut writer, &echo).await?;
            }
        } else if t == FrameType::Ping as u8 && len >= PING_LEN {
            let f = reader.take_frame(len).await.map_err(read_error)?;
            let mut data = [0u8; PING_LEN];
            data.copy_from_slice(&f[HEADER_LEN..HEADER_LEN + PING_LEN]);
            write(&mut writer, &frame::pong(&data)).await?;
        } else {
            reader.skip_frame(len).await.map_err(read_error)?;
        }
    }
}

async fn next_frame(reader: &mut FrameReader) -> Result<(u8, usize), PairError> {
    let (t, len) = reader.next_header().await.map_err(read_error)?;
    if len > MAX_FRAME_SIZE {
        return Err(PairError::FrameTooLarge { frame_type: t, len });
    }
    Ok((t, len))
}

fn read_error(e: std::io::Error) -> PairError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        PairError::Closed
    } else {
        PairError::Read(e)
    }
}

/// Connects `count` idle clients to `url` (64 dials at a time; `tls` for `https://` URLs) and keeps
/// them connected for `hold` (the memory benchmark). Returns how many connected; fails with the
/// first failed dial.
pub async fn hold_clients(url: &str, count: usize, hold: Duration, tls: &TlsOptions) -> Result<usize, ClientError> {
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        can_ack_pings: true,
        ..Default::default()
    };
    let mut conns = Vec::with_capacity(count);
    while conns.len() < count {
        let dials = (conns.len()..count.min(conns.len() + DIAL_CONCURRENCY)).map(|_| {
            let info = &info;
            async move { dial_tls(url, &KeyPair::generate(), info, &DialOptions::default(), tls).await }
        });
        for conn in futures_util::future::join_all(dials).await {
            conns.push(conn?);
        }
    }
    tokio::time::sleep(hold).await;
    Ok(conns.len())
}

fn report(opts: &LoadOptions, window: Duration, stats: &[Arc<PairStats>]) -> LoadReport {
    let sum = |f: fn(&PairStats) -> &AtomicU64| stats.iter().map(|s| f(s).load(Relaxed)).sum::<u64>();
    let packets_sent = sum(|s| &s.sent_in_window);
    let packets_received = sum(|s| &s.received_in_window);
    let bytes = sum(|s| &s.received_bytes_in_window);
    let arrived = sum(|s| &s.window_packets_arrived);
    let mut rtt: Vec<u64> = stats
        .iter()
        .flat_map(|s| std::mem::take(&mut *s.rtt_ns.lock().expect("rtt lock")))
        .collect();
    rtt.sort_unstable();
    let secs = window.as_secs_f64();
    let us = |p: f64| percentile(&rtt, p).map(|ns| ns / 1000);
    LoadReport {
        pairs: opts.pairs,
        packet_size: opts.packet_size,
        rate_per_pair: opts.rate_per_pair,
        window: opts.window,
        duration_secs: secs,
        packets_sent,
        packets_received,
        packets_per_sec: packets_received as f64 / secs,
        gbit_per_sec: bytes as f64 * 8.0 / secs / 1e9,
        loss_ratio: loss_ratio(packets_sent, arrived),
        rtt_p50_us: us(50.0),
        rtt_p90_us: us(90.0),
        rtt_p99_us: us(99.0),
        rtt_samples: rtt.len(),
    }
}

fn loss_ratio(sent: u64, arrived: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    (1.0 - arrived as f64 / sent as f64).clamp(0.0, 1.0)
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p`% of samples at or
/// below it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{read_client_info, server_info_frame};
    use std::collections::HashMap;
    use tokio::net::TcpListener;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
    }

    #[test]
    fn loss_is_clamped_and_zero_without_traffic() {
        assert_eq!(loss_ratio(0, 0), 0.0);
        assert_eq!(loss_ratio(100, 75), 0.25);
        assert_eq!(loss_ratio(100, 120), 0.0);
    }

    #[test]
    fn options_are_validated() {
        let ok = LoadOptions {
            url: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        assert!(validate(&LoadOptions { pairs: 0, ..ok.clone() })
            .unwrap_err()
            .to_string()
            .contains("pairs"));
        assert!(validate(&LoadOptions {
            packet_size: 8,
            ..ok.clone()
        })
        .unwrap_err()
        .to_string()
        .contains("packet size 8"));
        assert!(validate(&LoadOptions {
            packet_size: 65537,
            ..ok.clone()
        })
        .is_err());
        assert!(validate(&LoadOptions {
            duration: Duration::ZERO,
            ..ok.clone()
        })
        .is_err());
        let no_cert = validate(&LoadOptions {
            tls: TlsOptions {
                ca_pem: Some(b"not a certificate".to_vec()),
                ..Default::default()
            },
            ..ok
        })
        .unwrap_err();
        assert!(matches!(no_cert, OptionsError::Tls(_)), "{no_cert}");
        assert!(no_cert.to_string().contains("private CA PEM"), "{no_cert}");
    }

    #[test]
    fn report_serializes_with_stable_field_names() {
        let stats = vec![Arc::new(PairStats::default())];
        stats[0].sent_in_window.store(10, Relaxed);
        stats[0].received_in_window.store(8, Relaxed);
        stats[0].received_bytes_in_window.store(8 * 1000, Relaxed);
        stats[0].window_packets_arrived.store(9, Relaxed);
        stats[0].rtt_ns.lock().unwrap().extend([3000, 1000, 2000]);
        let opts = LoadOptions {
            pairs: 1,
            packet_size: 1000,
            ..Default::default()
        };
        let r = report(&opts, Duration::from_secs(2), &stats);
        assert_eq!(r.packets_per_sec, 4.0);
        assert_eq!(r.gbit_per_sec, 8.0 * 8000.0 / 2.0 / 1e9);
        assert!((r.loss_ratio - 0.1).abs() < 1e-9);
        assert_eq!((r.rtt_p50_us, r.rtt_p99_us, r.rtt_samples), (Some(2), Some(3), 3));
        let json = serde_json::to_value(&r).unwrap();
        for field in [
            "pairs",
            "packet_size",
            "duration_secs",
            "packets_sent",
            "packets_received",
            "packets_per_sec",
            "gbit_per_sec",
            "loss_ratio",
            "rtt_p50_us",
            "rtt_p90_us",
            "rtt_p99_us",
            "rtt_samples",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
    }

    /// A minimal relay for the tests: 101, handshake, SendPacket → RecvPacket to the named key.
    /// Bounded per-client queues with backpressure: it never drops.
    async fn tiny_relay() -> (String, tokio::task::JoinHandle<()>) {
        type Clients = Arc<Mutex<HashMap<Key, mpsc::Sender<bytes::Bytes>>>>;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/derp", listener.local_addr().unwrap());
        let server = KeyPair::generate();
        let clients: Clients = Arc::default();
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting `task` kills the whole relay.
            let mut conns = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (server, clients) = (server.clone(), clients.clone());
                conns.spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    let end = loop {
                        let n = tokio::io::AsyncReadExt::read(&mut r, &mut chunk).await.unwrap();
                        assert!(n > 0);
                        head.extend_from_slice(&chunk[..n]);
                        if let Some(p) = head.windows(4).position(|x| x == b"\r\n\r\n") {
                            break p + 4;
                        }
                    };
                    w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
                        .await
                        .unwrap();
                    let mut reader = FrameReader::new(Box::new(r), &head[end..]);
                    let mut writer: Writer = Box::new(w);
                    crate::io::write_all(&mut writer, &frame::server_key(server.public()))
                        .await
                        .unwrap();
                    let (key, _, shared) = read_client_info(&mut reader, &server).await.unwrap();
                    crate::io::write_all(&mut writer, &server_info_frame(&shared, Default::default()))
                        .await
                        .unwrap();
                    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(256);
                    clients.lock().unwrap().insert(key, tx);
                    let write_loop = async move {
                        let mut batch = Vec::new();
                        while rx.recv_many(&mut batch, 64).await > 0 {
                            if crate::io::write_all_vectored(&mut writer, &mut batch).await.is_err() {
                                return;
                            }
                        }
                    };
                    let read_loop = async move {
                        while let Ok((t, mut f)) = reader.read_frame(MAX_FRAME_SIZE).await {
                            if t != FrameType::SendPacket as u8 {
                                continue;
                            }
                            let dst = frame::key_at(&f, HEADER_LEN);
                            f[0] = FrameType::RecvPacket as u8;
                            f[HEADER_LEN..HEADER_LEN + KEY_LEN].copy_from_slice(&key);
                            let to = clients.lock().unwrap().get(&dst).cloned();
                            if let Some(to) = to {
                                let _ = to.send(f.freeze()).await;
                            }
                        }
                    };
                    tokio::select! {
                        _ = write_loop => {},
                        _ = read_loop => {},
                    }
                });
            }
        });
        (url, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_against_a_relay_and_measures_rtt() {
        let (url, relay) = tiny_relay().await;
        let opts = LoadOptions {
            url,
            pairs: 2,
            packet_size: 200,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            ..Default::default()
        };
        let r = run(opts).await.unwrap();
        relay.abort();
        assert_eq!((r.pairs, r.packet_size), (2, 200));
        assert!(r.packets_received > 0 && r.packets_sent > 0, "{r:?}");
        assert!(r.rtt_samples > 0 && r.rtt_p50_us.is_some(), "{r:?}");
        // The tiny relay never drops, and the drain waits for everything in flight.
        assert!(r.loss_ratio < 0.01, "{r:?}");
        assert!((r.duration_secs - 0.3).abs() < 0.1, "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paces_senders_at_the_given_rate() {
        let (url, relay) = tiny_relay().await;
        let opts = LoadOptions {
            url,
            pairs: 2,
            packet_size: 100,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            rate_per_pair: Some(2000.0),
            ..Default::default()
        };
        let r = run(opts).await.unwrap();
        relay.abort();
        // 2 pairs × 2000/s × 0.5 s.
        assert!((1800..=2200).contains(&r.packets_sent), "{r:?}");
        assert!(r.loss_ratio < 0.01, "{r:?}");
        assert!(r.rtt_samples > 100, "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn window_limits_packets_in_flight() {
        let (url, relay) = tiny_relay().await;
        let opts = LoadOptions {
            url,
            pairs: 2,
            packet_size: 1000,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            window: Some(64),
            ..Default::default()
        };
        let r = run(opts).await.unwrap();
        relay.abort();
        assert!(r.packets_received > 1000, "{r:?}");
        assert!(r.loss_ratio < 0.01, "{r:?}");
        assert!(r.rtt_samples > 0, "{r:?}");
    }

    #[tokio::test]
    async fn fails_clearly_when_the_relay_is_missing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = run(LoadOptions {
            url: format!("http://{addr}"),
            pairs: 1,
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("dial receiver 0") && err.contains("connect to"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fails_clearly_when_the_relay_dies_mid_run() {
        let (url, relay) = tiny_relay().await;
        let opts = LoadOptions {
            url,
            pairs: 1,
            packet_size: 100,
            duration: Duration::from_secs(5),
            warmup: Duration::from_millis(100),
            ..Default::default()
        };
        let run = tokio::spawn(run(opts));
        tokio::time::sleep(Duration::from_millis(200)).await;
        relay.abort();
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(8), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("pair 0"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(7));
    }
}
