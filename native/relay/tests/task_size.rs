//! Every connection keeps its `conn::serve` task for its whole life, and an idle one costs little
//! besides that task's state (bench:memory: ≤ 10 KiB per idle client). A large future awaited
//! inline anywhere in `serve` (e.g. an HTTP exchange for admission) enlarges every connection's
//! state, so its size is bounded here: such futures are boxed where they are rare.

use derpmesh_relay::conn;
use derpmesh_relay::keys::KeyPair;
use derpmesh_relay::relay::{Relay, RelayConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};

#[tokio::test]
async fn a_connection_task_stays_small() {
    let relay = Relay::new(KeyPair::generate(), RelayConfig::default());
    let (stream, _peer) = tokio::io::duplex(64);
    let task = conn::serve(
        relay,
        Transport::Other(Box::new(stream)),
        bytes::Bytes::new(),
        Upgrade::Derp { fast_start: false },
        "127.0.0.1:1".parse().unwrap(),
    );
    let size = std::mem::size_of_val(&task);
    // 1 280 bytes with admission boxed; 4 256 with it inline.
    assert!(size <= 2048, "conn::serve's future is {size} bytes");
}
