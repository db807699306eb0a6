//! Relay counters and gauges: plain atomics, read on demand by the control plane.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Whether a metric only grows or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Counter,
    Gauge,
}

macro_rules! metrics {
    ($($name:ident: $kind:ident, $help:literal;)*) => {
        /// Every counter and gauge the relay keeps.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// One metric as the control plane sees it.
        #[derive(Debug, Clone, serde::Serialize)]
        pub struct MetricValue {
            pub name: &'static str,
            pub kind: MetricKind,
            pub help: &'static str,
            pub value: u64,
        }

        impl Metrics {
            pub fn snapshot(&self) -> Vec<MetricValue> {
                vec![$(MetricValue { name: stringify!($name), kind: MetricKind::$kind, help: $help, value: self.$name.load(Relaxed) },)*]
            }
        }
    };
}

metrics! {
    accepts: Counter, "Connections handed to the relay.";
    connections: Gauge, "Connections currently open (handshaken or not).";
    clients: Gauge, "Distinct client keys currently connected.";
    home_connections: Gauge, "Connections whose client said this is its preferred (home) relay.";
    mesh_connections: Gauge, "Connections authenticated with the mesh key.";
    watchers: Gauge, "Connections subscribed with WatchConns.";
    duplicate_client_connections: Counter, "Connections for a key that already had one (last writer is active).";
    handshake_failures: Counter, "Connections closed during the handshake (see the handshake_failure_* counters).";
    handshake_failure_timeout: Counter, "Handshake: no ClientInfo within 10 s.";
    handshake_failure_io: Counter, "Handshake: connection closed or broken.";
    handshake_failure_bad_first_frame: Counter, "Handshake: first frame was not ClientInfo.";
    handshake_failure_bad_size: Counter, "Handshake: ClientInfo length outside 56 B..256 KiB.";
    handshake_failure_zero_key: Counter, "Handshake: all-zero client key.";
    handshake_failure_box_open: Counter, "Handshake: ClientInfo box did not open.";
    handshake_failure_bad_json: Counter, "Handshake: ClientInfo JSON malformed.";
    protocol_errors: Counter, "Connections closed for a malformed frame after the handshake.";
    permission_denied: Counter, "Connections closed for a mesh-only frame without the mesh key.";
    write_timeouts: Counter, "Connections closed because a write stalled past the write deadline.";
    unknown_frames: Counter, "Frames of unknown or unexpected type skipped.";
    packets_received: Counter, "Packets received from clients and mesh peers.";
    bytes_received: Counter, "Packet payload bytes received.";
    packets_sent: Counter, "Packets queued to a local client.";
    bytes_sent: Counter, "Packet payload bytes queued to a local client.";
    packets_forwarded_out: Counter, "Packets sent to a mesh peer as ForwardPacket.";
    packets_forwarded_in: Counter, "ForwardPacket frames received from mesh peers.";
    packets_dropped_unknown_dest: Counter, "Packets dropped: destination unknown here and on every mesh peer.";
    packets_dropped_unknown_dest_on_fwd: Counter, "Forwarded packets dropped: destination not local.";
    packets_dropped_queue_full: Counter, "Packets dropped (oldest first) because a receiver's queue was full.";
    packets_dropped_gone: Counter, "Packets dropped because the receiving connection closed.";
    peer_gone_disconnected_sent: Counter, "PeerGone(disconnected) frames sent.";
    peer_gone_not_here_sent: Counter, "PeerGone(not here) frames sent in answer to disco packets.";
    rate_limited_frames: Counter, "Frames from rate-limited clients that waited for tokens before being read.";
    rate_limit_wait_micros: Counter, "Time rate-limited clients were made to wait, in microseconds.";
    pings_received: Counter, "Ping frames answered with Pong.";
    keepalives_sent: Counter, "KeepAlive frames sent.";
    restarting_sent: Counter, "Restarting frames sent on graceful shutdown.";
    mesh_links: Gauge, "Outgoing mesh links currently connected to peer relays.";
    forwarders: Gauge, "Client keys reachable through a mesh peer.";
    upgrades_fast_start: Counter, "DERP upgrades with Derp-Fast-Start: 1 (no 101; a Go client does so when it saw the meta certificate).";
    front_connections: Counter, "Raw TCP connections taken over before HTTP (TLS in the core, or plain).";
    tls_handshakes: Counter, "TLS handshakes completed by the core.";
    tls_handshake_errors: Counter, "Connections closed for a failed TLS handshake (not TLS, truncated, refused).";
    tls_handshake_timeouts: Counter, "Connections closed because the TLS handshake did not complete in 10 s.";
    http_head_timeouts: Counter, "Connections closed by the core because a request head did not complete in 10 s.";
    http_bad_requests: Counter, "Connections closed by the core for a malformed or oversized request head (400).";
    http_requests_answered: Counter, "Requests the core answered itself (probes, /generate_204, refused upgrades).";
    connections_handed_to_node: Counter, "Connections handed to Node's HTTP server as a decrypted stream (operator API, metrics, ...).";
    http_handoff_failures: Counter, "Connections closed because no socket pair could be made to hand them to Node.";
    accepted_open: Gauge, "Connections taken by the core and open now, under the accept limits (the per-relay cap counts these).";
    accepts_refused: Counter, "Connections closed as they were accepted, over an accept limit (see the accepts_refused_* counters).";
    accepts_refused_rate_limit: Counter, "Accept refused: over the accept rate (token bucket empty).";
    accepts_refused_max_connections: Counter, "Accept refused: the relay had its maximum of connections open.";
    accepts_refused_max_connections_per_ip: Counter, "Accept refused: the source address had its maximum of connections open.";
    admission_checks: Counter, "Client handshakes checked against the admission URL (mesh peers never are).";
    admission_cache_hits: Counter, "Admission checks answered from the decision cache.";
    admission_requests: Counter, "Requests sent to the admission URL.";
    admission_in_flight: Gauge, "Requests to the admission URL awaiting their answer.";
    admission_endpoint_errors: Counter, "Admission requests without a usable answer: unreachable, timed out, 1xx/3xx/5xx, or not {\"Allow\": bool}.";
    admission_allowed: Counter, "Clients the admission URL allowed (cached answers included).";
    admission_admitted_fail_open: Counter, "Clients admitted without an answer because the admission URL was unavailable or busy (fail-open).";
    admission_rejected_denied: Counter, "Clients refused: the admission URL answered Allow: false (cached answers included).";
    admission_rejected_status: Counter, "Clients refused: the admission URL answered 4xx.";
    admission_rejected_endpoint_error: Counter, "Clients refused because the admission URL was unreachable or answered unusably (fail-closed).";
    admission_rejected_timeout: Counter, "Clients refused because the admission URL did not answer in time (fail-closed).";
    admission_rejected_busy: Counter, "Clients refused because every admission request slot stayed taken (fail-closed).";
}

impl Metrics {
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    #[inline]
    pub fn dec(gauge: &AtomicU64) {
        gauge.fetch_sub(1, Relaxed);
    }
}

/// A fixed-bucket histogram of atomics: one counter per bucket (the last one unbounded), the count
/// and the sum in microseconds. Recording is a bucket search over a dozen bounds and three relaxed
/// adds; the control plane reads the buckets at scrape time.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive) in microseconds, ascending; a value above the last one goes to the
    /// extra, unbounded bucket.
    bounds_us: &'static [u64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// A histogram as the control plane sees it: per-bucket counts (not cumulative), the last one for
/// values above every bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramValue {
    pub name: &'static str,
    pub help: &'static str,
    pub bounds_us: Vec<u64>,
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_us: u64,
}

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        debug_assert!(bounds_us.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds_us,
            buckets: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn record(&self, elapsed: std::time::Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let i = self
            .bounds_us
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(self.bounds_us.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self, name: &'static str, help: &'static str) -> HistogramValue {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        HistogramValue {
            name,
            help,
            bounds_us: self.bounds_us.to_vec(),
            // The buckets' sum, not `count`: a snapshot whose count and buckets agree.
            count: buckets.iter().sum(),
            buckets,
            sum_us: self.sum_us.load(Relaxed),
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// Handshake bounds: 100 µs … 10 s.
const HANDSHAKE_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Queue-wait bounds: 10 µs … 1 s (the write deadline is 2 s by default).
const QUEUE_WAIT_BOUNDS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// One in this many packets queued to a client carries its enqueue instant (the first one included);
/// only those are timed into [`Histograms::queue_wait`].
pub const QUEUE_WAIT_SAMPLE_EVERY: u64 = 64;

/// The relay's histograms.
#[derive(Debug)]
pub struct Histograms {
    /// From the DERP upgrade (the connection given to the relay) to ServerInfo written: the
    /// ClientInfo exchange and the admission check.
    pub handshake: Histogram,
    /// Time a sampled packet waited in a client's send queue until its writer took it to write.
    pub queue_wait: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            handshake: Histogram::new(HANDSHAKE_BOUNDS_US),
            queue_wait: Histogram::new(QUEUE_WAIT_BOUNDS_US),
        }
    }
}

impl Histograms {
    pub fn snapshot(&self) -> Vec<HistogramValue> {
        vec![
            self.handshake.snapshot(
                "handshake_duration",
                "From the DERP upgrade to ServerInfo written (ClientInfo exchange and admission check).",
            ),
            self.queue_wait.snapshot(
                "queue_wait",
                "Time a packet waited in a client's send queue before its writer took it (every 64th packet queued is timed).",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_puts_values_in_their_bucket_and_sums_microseconds() {
        static BOUNDS: &[u64] = &[10, 100];
        let h = Histogram::new(BOUNDS);
        h.record(Duration::from_micros(10)); // bound inclusive
        h.record(Duration::from_micros(11));
        h.record(Duration::from_micros(100));
        h.record(Duration::from_secs(1));
        let s = h.snapshot("x", "y");
        assert_eq!(s.buckets, vec![1, 2, 1]);
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_us, 10 + 11 + 100 + 1_000_000);
        assert_eq!(h.count(), 4);
    }
}
