//! Fuzz targets for every parser of network bytes in the relay core (`derpmesh-relay`). Each
//! module is one target: `run(data)` feeds `data` through the real code path and asserts its
//! invariants (panics on a violation). The same functions back the libFuzzer binaries
//! (`fuzz_targets/`, `cargo fuzz run <target>`) and the stable harness (`tests/stable.rs`), which
//! replays the corpus and mutations of it. See README.md.

pub mod client;
pub mod common;
pub mod frame_reader;
pub mod handshake;
pub mod http_front;
pub mod mutate;
pub mod relay_conn;
pub mod stun;
pub mod tls_records;
pub mod websocket;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_reader", frame_reader::run),
    ("relay_conn", relay_conn::run),
    ("handshake", handshake::run),
    ("http_front", http_front::run),
    ("websocket", websocket::run),
    ("stun", stun::run),
    ("client", client::run),
    ("tls_records", tls_records::run),
];
