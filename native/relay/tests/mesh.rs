//! Mesh links between in-process relays over real TCP on 127.0.0.1.
//!
//! Each relay sits behind a tiny accept loop that reads the HTTP request head and hands the socket
//! to `conn::serve`. The loop keeps a duplicate of every accepted socket so a test can kill all of a
//! relay's connections at once (`shutdown(Both)`), as a crashed peer would look from outside.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::client::{self, DerpConn, ServerFrame};
use derpmesh_relay::conn;
use derpmesh_relay::frame::{self, PEER_GONE_DISCONNECTED};
use derpmesh_relay::handshake::ClientInfo;
use derpmesh_relay::keys::{Key, KeyPair};
use derpmesh_relay::mesh::{LinkError, LinkState, LinkStatus};
use derpmesh_relay::relay::Relay;
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const MESH_KEY: &str = "5f1d3c8a9b7e6f4d2c1b0a99887766554433221100ffeeddccbbaa9988776655";
/// No single test may take longer than this.
const TEST_LIMIT: Duration = Duration::from_secs(20);
/// How long a condition may take to become true.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Harness

type Sockets = Arc<Mutex<HashMap<u64, std::net::TcpStream>>>;

/// A relay behind its own listener.
struct Node {
    server: Server,
    relay: Arc<Relay>,
    addr: SocketAddr,
    url: String,
    accept: Option<JoinHandle<()>>,
    sockets: Sockets,
}

impl Node {
    async fn start(mesh_key: Option<&str>) -> Node {
        let server = Server::new(ServerConfig {
            mesh_key: mesh_key.map(str::to_string),
            ..Default::default()
        })
        .unwrap();
        let relay = server.relay().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut node = Node {
            server,
            relay,
            addr,
            url: format!("http://{addr}"),
            accept: None,
            sockets: Arc::new(Mutex::new(HashMap::new())),
        };
        node.serve(listener);
        node
    }

    fn serve(&mut self, listener: TcpListener) {
        self.accept = Some(tokio::spawn(accept_loop(
            listener,
            self.relay.clone(),
            self.sockets.clone(),
        )));
    }

    fn key(&self) -> Key {
        *self.relay.public_key()
    }

    /// Stops listening and breaks every connection this relay accepted.
    fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for s in self.sockets.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same address.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn links(&self) -> Vec<LinkStatus> {
        self.server.mesh_links()
    }

    fn link(&self, url: &str) -> Option<LinkStatus> {
        self.links().into_iter().find(|l| l.url == url)
    }

    fn metric(&self, pick: impl Fn(&derpmesh_relay::metrics::Metrics) -> &AtomicU64) -> u64 {
        pick(&self.relay.metrics).load(Relaxed)
    }

    async fn client(&self) -> (Key, DerpConn) {
        let key = KeyPair::generate();
        (*key.public(), self.client_with(&key).await)
    }

    async fn client_with(&self, key: &KeyPair) -> DerpConn {
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        client::dial(&self.url, key, &info).await.unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.links().stop_all();
        self.kill();
    }
}

async fn accept_loop(listener: TcpListener, relay: Arc<Relay>, sockets: Sockets) {
    let next = AtomicU64::new(0);
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            return;
        };
        let id = next.fetch_add(1, Relaxed);
        let Ok(std_stream) = stream.into_std() else { continue };
        let Ok(dup) = std_stream.try_clone() else { continue };
        let Ok(stream) = TcpStream::from_std(std_stream) else {
            continue;
        };
        sockets.lock().unwrap().insert(id, dup);
        let (relay, sockets) = (relay.clone(), sockets.clone());
        tokio::spawn(async move {
            handle_http(relay, stream, addr).await;
            // Only now drop the duplicate, so the socket really closes when the relay is done with it.
            sockets.lock().unwrap().remove(&id);
        });
    }
}

/// Reads the request head (up to the blank line) and hands the rest of the stream to the relay.
async fn handle_http(relay: Arc<Relay>, mut stream: TcpStream, addr: SocketAddr) {
    let Some(rest) = common::read_request_head(&mut stream).await else {
        return;
    };
    conn::serve(
        relay,
        Transport::Tcp(stream),
        rest,
        Upgrade::Derp { fast_start: false },
        addr,
    )
    .await;
}

/// Runs a test body under [`TEST_LIMIT`].
async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test exceeded its time limit");
}

/// Polls `cond` until it holds; panics with `what` after [`WAIT`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next frame `pick` accepts, skipping the others, within `within`.
async fn next_matching<T>(
    c: &mut DerpConn,
    within: Duration,
    mut pick: impl FnMut(ServerFrame) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => return None,
            Ok(Err(e)) => panic!("client connection failed: {e}"),
            Ok(Ok(f)) => {
                if let Some(v) = pick(f) {
                    return Some(v);
                }
            }
        }
    }
}

/// The next data packet (probes sent by [`connect_pair`] are skipped).
async fn next_packet(c: &mut DerpConn, within: Duration) -> Option<(Key, Bytes)> {
    next_matching(c, within, |f| match f {
        ServerFrame::Packet { src, data } if !data.starts_with(b"probe") => Some((src, data)),
        _ => None,
    })
    .await
}

async fn next_peer_gone(c: &mut DerpConn, within: Duration) -> Option<(Key, u8)> {
    next_matching(c, within, |f| match f {
        ServerFrame::PeerGone { key, reason } => Some((key, reason)),
        _ => None,
    })
    .await
}

/// Sends probes from `from` to `to_key` until `to` receives one: the route exists end to end.
async fn connect_pair(from: &mut DerpConn, from_key: Key, to: &mut DerpConn, to_key: Key) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.send_packet(&to_key, b"probe").await.unwrap();
        let got = next_matching(to, Duration::from_millis(50), |f| match f {
            ServerFrame::Packet { src, data } if src == from_key && data.starts_with(b"probe") => Some(()),
            _ => None,
        })
        .await;
        if got.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no route from {} to {}",
            hex::encode(from_key),
            hex::encode(to_key)
        );
    }
}

/// Sends `data` and asserts it arrives from `from_key`.
async fn deliver(from: &mut DerpConn, from_key: Key, to: &mut DerpConn, to_key: Key, data: &'static [u8]) {
    from.send_packet(&to_key, data).await.unwrap();
    let got = next_packet(to, WAIT).await.expect("packet did not arrive");
    assert_eq!(got, (from_key, Bytes::from_static(data)));
}

fn connected(links: &[LinkStatus]) -> usize {
    links.iter().filter(|l| l.state == LinkState::Connected).count()
}

/// Meshes every node with every node (each list includes the node itself, as the control plane's does).
async fn full_mesh(nodes: &[&Node]) {
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    for n in nodes {
        n.server.set_mesh_peers(urls.clone()).unwrap();
    }
    for n in nodes {
        wait_for("every link connected and the self link recognised", || {
            let links = n.links();
            connected(&links) == nodes.len() - 1 && links.iter().any(|l| l.state == LinkState::SelfLink)
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_deliver_between_every_pair() {
    bounded(async {
        let nodes = [
            Node::start(Some(MESH_KEY)).await,
            Node::start(Some(MESH_KEY)).await,
            Node::start(Some(MESH_KEY)).await,
        ];
        full_mesh(&[&nodes[0], &nodes[1], &nodes[2]]).await;

        for (i, n) in nodes.iter().enumerate() {
            let links = n.links();
            assert_eq!(links.len(), 3, "{links:?}");
            for l in &links {
                if l.url == n.url {
                    assert_eq!(l.state, LinkState::SelfLink);
                    assert_eq!(l.peer_key, Some(n.key()));
                } else {
                    let peer = nodes.iter().find(|p| p.url == l.url).unwrap();
                    assert_eq!(l.state, LinkState::Connected, "node {i}: {l:?}");
                    assert_eq!(l.peer_key, Some(peer.key()));
                    assert!(l.connected_since_ms.is_some() && l.last_error.is_none(), "{l:?}");
                }
            }
            assert_eq!(n.metric(|m| &m.mesh_links), 2);
        }

        let mut clients = Vec::new();
        for n in &nodes {
            clients.push(n.client().await);
        }
        for i in 0..3 {
            for j in 0..3 {
                if i == j {
                    continue;
                }
                let (lo, hi) = clients.split_at_mut(i.max(j));
                let (a, b) = if i < j {
                    (&mut lo[i], &mut hi[0])
                } else {
                    (&mut hi[0], &mut lo[j])
                };
                connect_pair(&mut a.1, a.0, &mut b.1, b.0).await;
                deliver(&mut a.1, a.0, &mut b.1, b.0, b"across the mesh").await;
            }
        }
        for n in &nodes {
            assert!(n.metric(|m| &m.packets_forwarded_out) >= 2);
            assert!(n.metric(|m| &m.packets_forwarded_in) >= 2);
            assert_eq!(n.metric(|m| &m.packets_dropped_unknown_dest_on_fwd), 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_client_wins_over_forwarder_and_forwarder_takes_over() {
    bounded(async {
        let (a, b) = (Node::start(Some(MESH_KEY)).await, Node::start(Some(MESH_KEY)).await);
        full_mesh(&[&a, &b]).await;
        let (s_key, mut s) = a.client().await;
        let k = KeyPair::generate();
        let k_key = *k.public();
        let mut k_on_a = a.client_with(&k).await;
        let mut k_on_b = b.client_with(&k).await;
        // A learned k from B (A's own link connection on B is not a forwarder).
        wait_for("A knows k through B", || {
            a.link(&b.url).is_some_and(|l| l.forwarders == 1)
        })
        .await;

        let forwarded_before = a.metric(|m| &m.packets_forwarded_out);
        deliver(&mut s, s_key, &mut k_on_a, k_key, b"stay local").await;
        assert_eq!(
            next_packet(&mut k_on_b, QUIET).await,
            None,
            "the forwarder was used although k is local"
        );
        assert_eq!(a.metric(|m| &m.packets_forwarded_out), forwarded_before);

        // k leaves A but is still on B: the forwarder takes over, and s is not told k is gone.
        k_on_a.close().await.unwrap();
        connect_pair(&mut s, s_key, &mut k_on_b, k_key).await;
        deliver(&mut s, s_key, &mut k_on_b, k_key, b"via B").await;
        assert_eq!(next_peer_gone(&mut s, QUIET).await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_client_leaving_removes_forwarder_and_sends_peer_gone() {
    bounded(async {
        let (a, b) = (Node::start(Some(MESH_KEY)).await, Node::start(Some(MESH_KEY)).await);
        full_mesh(&[&a, &b]).await;
        let (sa_key, mut sa) = a.client().await;
        // Two connections for the same key on B: PeerPresent comes twice, PeerGone once.
        let kb = KeyPair::generate();
        let kb_key = *kb.public();
        let cb1 = b.client_with(&kb).await;
        let mut cb2 = b.client_with(&kb).await;
        wait_for("A knows kb", || a.link(&b.url).is_some_and(|l| l.forwarders == 1)).await;

        connect_pair(&mut cb2, kb_key, &mut sa, sa_key).await;
        deliver(&mut cb2, kb_key, &mut sa, sa_key, b"from B").await;
        deliver(&mut sa, sa_key, &mut cb2, kb_key, b"from A").await;

        // The older connection goes: kb is still on B, nothing changes.
        cb1.close().await.unwrap();
        assert_eq!(next_peer_gone(&mut sa, QUIET).await, None);
        assert_eq!(a.link(&b.url).unwrap().forwarders, 1);
        deliver(&mut sa, sa_key, &mut cb2, kb_key, b"still there").await;

        // The last one goes: A drops the forwarder and tells sa, which had received from kb.
        cb2.close().await.unwrap();
        let gone = next_peer_gone(&mut sa, WAIT).await;
        assert_eq!(gone, Some((kb_key, PEER_GONE_DISCONNECTED)));
        wait_for("A forgot kb", || a.link(&b.url).unwrap().forwarders == 0).await;
        assert_eq!(a.metric(|m| &m.forwarders), 0);
        let unknown_before = a.metric(|m| &m.packets_dropped_unknown_dest);
        sa.send_packet(&kb_key, b"nobody").await.unwrap();
        wait_for("A drops packets for kb", || {
            a.metric(|m| &m.packets_dropped_unknown_dest) == unknown_before + 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_peer_drops_its_forwarders_and_the_link_reconnects() {
    bounded(async {
        let a = Node::start(Some(MESH_KEY)).await;
        let mut b = Node::start(Some(MESH_KEY)).await;
        full_mesh(&[&a, &b]).await;
        let (sa_key, mut sa) = a.client().await;
        let (cb_key, mut cb) = b.client().await;
        connect_pair(&mut cb, cb_key, &mut sa, sa_key).await;
        connect_pair(&mut sa, sa_key, &mut cb, cb_key).await;
        let first_since = a.link(&b.url).unwrap().connected_since_ms;

        b.kill();
        let gone = next_peer_gone(&mut sa, WAIT).await;
        assert_eq!(gone, Some((cb_key, PEER_GONE_DISCONNECTED)));
        wait_for("A's link to B is down and retrying", || {
            a.link(&b.url).is_some_and(|l| {
                l.state == LinkState::Backoff
                    && l.last_error
                        .as_ref()
                        .is_some_and(|e| e.to_string().contains("connect to"))
            })
        })
        .await;
        let l = a.link(&b.url).unwrap();
        assert_eq!((l.forwarders, l.connected_since_ms), (0, None), "{l:?}");
        assert_eq!(a.metric(|m| &m.mesh_links), 0);
        assert_eq!(a.metric(|m| &m.forwarders), 0);

        b.restart().await;
        wait_for("A's link to B is back", || {
            a.link(&b.url).is_some_and(|l| l.state == LinkState::Connected)
        })
        .await;
        let l = a.link(&b.url).unwrap();
        assert!(l.last_error.is_none() && l.connected_since_ms > first_since, "{l:?}");
        assert_eq!(a.metric(|m| &m.mesh_links), 1);
        let (cb2_key, mut cb2) = b.client().await;
        connect_pair(&mut sa, sa_key, &mut cb2, cb2_key).await;
        deliver(&mut sa, sa_key, &mut cb2, cb2_key, b"after the restart").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_packets_are_never_forwarded_again() {
    bounded(async {
        let (a, b, c) = (
            Node::start(Some(MESH_KEY)).await,
            Node::start(Some(MESH_KEY)).await,
            Node::start(Some(MESH_KEY)).await,
        );
        full_mesh(&[&a, &b, &c]).await;
        let (ka, mut ca) = a.client().await;
        let (kb, mut cb) = b.client().await;
        let (kc, mut cc) = c.client().await;
        connect_pair(&mut ca, ka, &mut cc, kc).await;
        connect_pair(&mut cb, kb, &mut cc, kc).await; // B has a forwarder for kc too

        // One packet A → C crosses exactly one link and arrives once.
        let (a_out, b_in, b_out, c_in) = (
            a.metric(|m| &m.packets_forwarded_out),
            b.metric(|m| &m.packets_forwarded_in),
            b.metric(|m| &m.packets_forwarded_out),
            c.metric(|m| &m.packets_forwarded_in),
        );
        deliver(&mut ca, ka, &mut cc, kc, b"once").await;
        assert_eq!(next_packet(&mut cc, QUIET).await, None, "delivered twice");
        assert_eq!(a.metric(|m| &m.packets_forwarded_out), a_out + 1);
        assert_eq!(c.metric(|m| &m.packets_forwarded_in), c_in + 1);
        assert_eq!(b.metric(|m| &m.packets_forwarded_in), b_in);

        // A ForwardPacket reaching B for a key that lives on C is dropped at B, not sent on.
        let peer = KeyPair::generate();
        let info = ClientInfo {
            version: 2,
            mesh_key: Some(MESH_KEY.into()),
            ..Default::default()
        };
        let mut m = client::dial(&b.url, &peer, &info).await.unwrap();
        let dropped = b.metric(|m| &m.packets_dropped_unknown_dest_on_fwd);
        m.send_frame(&frame::forward_packet(&ka, &kc, b"loop?")).await.unwrap();
        wait_for("B dropped it", || {
            b.metric(|m| &m.packets_dropped_unknown_dest_on_fwd) == dropped + 1
        })
        .await;
        assert_eq!(b.metric(|m| &m.packets_forwarded_out), b_out);
        assert_eq!(
            next_packet(&mut cc, QUIET).await,
            None,
            "B re-forwarded a forwarded packet"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_or_missing_mesh_key_leaves_the_link_in_error() {
    bounded(async {
        let a = Node::start(Some(MESH_KEY)).await;
        let d = Node::start(Some("another-mesh-key-entirely-000000")).await;
        let _on_d = d.client().await;
        a.server.set_mesh_peers(vec![d.url.clone()]).unwrap();
        wait_for("the link reports the mesh key problem", || {
            a.link(&d.url).is_some_and(|l| {
                l.state == LinkState::Backoff
                    && l.last_error
                        .as_ref()
                        .is_some_and(|e| e.to_string().contains("mesh key"))
            })
        })
        .await;
        let l = a.link(&d.url).unwrap();
        assert_eq!(l.peer_key, Some(d.key()), "the handshake itself succeeded");
        assert_eq!(l.forwarders, 0);
        assert_eq!(a.metric(|m| &m.mesh_links), 0);
        assert_eq!(a.metric(|m| &m.forwarders), 0);
        assert!(d.metric(|m| &m.permission_denied) >= 1);
        assert!(matches!(l.last_error, Some(LinkError::WatchConnsRefused(_))), "{l:?}");
        assert!(l.last_error.unwrap().to_string().contains("permission denied"));

        // A relay without any mesh key cannot mesh at all, and says so without dialing.
        let e = Node::start(None).await;
        e.server.set_mesh_peers(vec![a.url.clone()]).unwrap();
        wait_for("the link reports the missing mesh key", || {
            e.link(&a.url)
                .is_some_and(|l| matches!(l.last_error, Some(LinkError::NoMeshKey)))
        })
        .await;
        assert_eq!(a.metric(|m| &m.accepts), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_url_tears_the_link_down() {
    bounded(async {
        let (a, b) = (Node::start(Some(MESH_KEY)).await, Node::start(Some(MESH_KEY)).await);
        full_mesh(&[&a, &b]).await;
        let (sa_key, mut sa) = a.client().await;
        let (cb_key, mut cb) = b.client().await;
        connect_pair(&mut cb, cb_key, &mut sa, sa_key).await;
        connect_pair(&mut sa, sa_key, &mut cb, cb_key).await;
        assert_eq!(
            b.metric(|m| &m.mesh_connections),
            derpmesh_relay::mesh::data_lanes() as u64
        );

        a.server.set_mesh_peers(vec![]).unwrap();
        assert!(a.links().is_empty());
        // Forwarders go at once; the task and its connection promptly after.
        assert_eq!(a.metric(|m| &m.forwarders), 0);
        assert_eq!(
            next_peer_gone(&mut sa, WAIT).await,
            Some((cb_key, PEER_GONE_DISCONNECTED))
        );
        wait_for("A's link gauge is zero", || a.metric(|m| &m.mesh_links) == 0).await;
        wait_for("B saw A's link close", || {
            b.metric(|m| &m.mesh_connections) == 0 && b.metric(|m| &m.watchers) == 0
        })
        .await;
        let unknown = a.metric(|m| &m.packets_dropped_unknown_dest);
        sa.send_packet(&cb_key, b"no route").await.unwrap();
        wait_for("A has no route to cb", || {
            a.metric(|m| &m.packets_dropped_unknown_dest) == unknown + 1
        })
        .await;
        // B's link to A is untouched.
        assert_eq!(connected(&b.links()), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn urls_are_normalized_self_is_detected_and_bad_urls_say_why() {
    bounded(async {
        let a = Node::start(Some(MESH_KEY)).await;
        let urls = vec![
            format!("{}/", a.url),
            format!("{}/derp", a.url),
            format!(" {} ", a.url),
            "wss://relay.example:443".to_string(),
            "relay.example:80".to_string(),
        ];
        a.server.set_mesh_peers(urls).unwrap();
        wait_for("the self link is recognised", || {
            a.link(&a.url).is_some_and(|l| l.state == LinkState::SelfLink)
        })
        .await;
        let links = a.links();
        assert_eq!(links.len(), 3, "{links:?}");
        assert_eq!(a.link(&a.url).unwrap().peer_key, Some(a.key()));
        let wss = a.link("wss://relay.example:443").unwrap();
        assert_eq!(wss.state, LinkState::Stopped);
        assert!(wss.last_error.unwrap().to_string().contains("\"wss\" is not supported"));
        let bad = a.link("relay.example:80").unwrap();
        assert_eq!(bad.state, LinkState::Stopped);
        let error = bad.last_error.unwrap();
        assert!(matches!(error, LinkError::InvalidUrl(_)), "{error:?}");
        assert!(error.to_string().contains("expected http://host:port"));
        assert_eq!(a.metric(|m| &m.mesh_links), 0);
        assert_eq!(a.metric(|m| &m.forwarders), 0);
        // The self connection was closed again.
        wait_for("no connection left", || a.metric(|m| &m.connections) == 0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_a_link_mid_dial_closes_its_connection() {
    bounded(async {
        let a = Node::start(Some(MESH_KEY)).await;
        // A "peer" that accepts and reads the request, then never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        a.server.set_mesh_peers(vec![url.clone()]).unwrap();
        let (mut sock, _) = silent.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        assert!(sock.read(&mut buf).await.unwrap() > 0);
        assert_eq!(a.link(&url).unwrap().state, LinkState::Connecting);

        a.server.set_mesh_peers(vec![]).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(1), sock.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "the link kept its connection: {n:?}"
        );
    })
    .await;
}
