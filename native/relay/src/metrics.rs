//! Relay counters and gauges: plain atomics, read on demand by the control plane.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! metrics {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// Every counter (`kind` "counter") and gauge (`kind` "gauge") the relay keeps.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// One metric as the control plane sees it.
        #[derive(Debug, Clone, serde::Serialize)]
        pub struct MetricValue {
            pub name: &'static str,
            pub kind: &'static str,
            pub help: &'static str,
            pub value: u64,
        }

        impl Metrics {
            pub fn snapshot(&self) -> Vec<MetricValue> {
                vec![$(MetricValue { name: stringify!($name), kind: $kind, help: $help, value: self.$name.load(Relaxed) },)*]
            }
        }
    };
}

metrics! {
    accepts: "counter", "Connections handed to the relay.";
    connections: "gauge", "Connections currently open (handshaken or not).";
    clients: "gauge", "Distinct client keys currently connected.";
    home_connections: "gauge", "Connections whose client said this is its preferred (home) relay.";
    mesh_connections: "gauge", "Connections authenticated with the mesh key.";
    watchers: "gauge", "Connections subscribed with WatchConns.";
    duplicate_client_connections: "counter", "Connections for a key that already had one (last writer is active).";
    handshake_failures: "counter", "Connections closed during the handshake (see the handshake_failure_* counters).";
    handshake_failure_timeout: "counter", "Handshake: no ClientInfo within 10 s.";
    handshake_failure_io: "counter", "Handshake: connection closed or broken.";
    handshake_failure_bad_first_frame: "counter", "Handshake: first frame was not ClientInfo.";
    handshake_failure_bad_size: "counter", "Handshake: ClientInfo length outside 56 B..256 KiB.";
    handshake_failure_zero_key: "counter", "Handshake: all-zero client key.";
    handshake_failure_box_open: "counter", "Handshake: ClientInfo box did not open.";
    handshake_failure_bad_json: "counter", "Handshake: ClientInfo JSON malformed.";
    protocol_errors: "counter", "Connections closed for a malformed frame after the handshake.";
    permission_denied: "counter", "Connections closed for a mesh-only frame without the mesh key.";
    write_timeouts: "counter", "Connections closed because a write stalled past the write deadline.";
    unknown_frames: "counter", "Frames of unknown or unexpected type skipped.";
    packets_received: "counter", "Packets received from clients and mesh peers.";
    bytes_received: "counter", "Packet payload bytes received.";
    packets_sent: "counter", "Packets queued to a local client.";
    bytes_sent: "counter", "Packet payload bytes queued to a local client.";
    packets_forwarded_out: "counter", "Packets sent to a mesh peer as ForwardPacket.";
    packets_forwarded_in: "counter", "ForwardPacket frames received from mesh peers.";
    packets_dropped_unknown_dest: "counter", "Packets dropped: destination unknown here and on every mesh peer.";
    packets_dropped_unknown_dest_on_fwd: "counter", "Forwarded packets dropped: destination not local.";
    packets_dropped_queue_full: "counter", "Packets dropped (oldest first) because a receiver's queue was full.";
    packets_dropped_gone: "counter", "Packets dropped because the receiving connection closed.";
    peer_gone_disconnected_sent: "counter", "PeerGone(disconnected) frames sent.";
    peer_gone_not_here_sent: "counter", "PeerGone(not here) frames sent in answer to disco packets.";
    pings_received: "counter", "Ping frames answered with Pong.";
    keepalives_sent: "counter", "KeepAlive frames sent.";
    restarting_sent: "counter", "Restarting frames sent on graceful shutdown.";
    mesh_links: "gauge", "Outgoing mesh links currently connected to peer relays.";
    forwarders: "gauge", "Client keys reachable through a mesh peer.";
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
