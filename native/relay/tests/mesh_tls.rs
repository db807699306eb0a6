//! Mesh links to `https://` peers: relays behind a rustls acceptor whose certificate a private CA,
//! generated here with rcgen, signed.
//!
//! Each relay sits behind a tiny accept loop that finishes the TLS handshake, reads the HTTP request
//! head and hands the TLS stream to `conn::serve` (as `tests/mesh.rs` does with plain TCP).

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::client::{self, DerpConn, DialOptions, ServerFrame, TlsOptions};
use derpmesh_relay::conn;
use derpmesh_relay::handshake::ClientInfo;
use derpmesh_relay::keys::{Key, KeyPair};
use derpmesh_relay::mesh::{LinkState, LinkStatus, MeshError};
use derpmesh_relay::relay::Relay;
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::upgrade::{Transport, Upgrade};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const MESH_KEY: &str = "5f1d3c8a9b7e6f4d2c1b0a99887766554433221100ffeeddccbbaa9988776655";
/// No single test may take longer than this.
const TEST_LIMIT: Duration = Duration::from_secs(20);
/// How long a condition may take to become true.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// A private CA

/// A CA and a server certificate it signed for `localhost` (DNS name only: `127.0.0.1` is not in it).
struct Pki {
    ca_pem: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new(ca_name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

        let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Pki {
            ca_pem: ca_cert.pem().into_bytes(),
            server: Arc::new(server),
        }
    }

    fn trust(&self) -> TlsOptions {
        TlsOptions {
            ca_pem: Some(self.ca_pem.clone()),
            insecure_skip_verify: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

/// A relay behind its own TLS listener.
struct Node {
    server: Server,
    relay: Arc<Relay>,
    /// `https://localhost:PORT`
    url: String,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Node {
    async fn start(pki: &Pki) -> Node {
        let server = Server::new(ServerConfig {
            mesh_key: Some(MESH_KEY.to_string()),
            ..Default::default()
        })
        .unwrap();
        let relay = server.relay().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(pki.server.clone()),
            relay.clone(),
        ));
        Node {
            server,
            relay,
            url: format!("https://localhost:{}", addr.port()),
            addr,
            accept,
        }
    }

    fn key(&self) -> Key {
        *self.relay.public_key()
    }

    fn link(&self, url: &str) -> Option<LinkStatus> {
        self.server.mesh_links().into_iter().find(|l| l.url == url)
    }

    fn forwarders(&self) -> u64 {
        self.relay.metrics.forwarders.load(Relaxed)
    }

    /// A client of this relay, dialed over TLS trusting `pki`'s CA.
    async fn client(&self, pki: &Pki) -> (Key, DerpConn) {
        let key = KeyPair::generate();
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        let tls = TlsOptions {
            ca_pem: Some(pki.ca_pem.clone()),
            insecure_skip_verify: false,
        };
        let conn = client::dial_tls(&self.url, &key, &info, &DialOptions::default(), &tls)
            .await
            .unwrap();
        (*key.public(), conn)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.links().stop_all();
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, relay: Arc<Relay>) {
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            return;
        };
        let (acceptor, relay) = (acceptor.clone(), relay.clone());
        tokio::spawn(async move {
            // A client that rejects our certificate aborts the handshake: nothing to serve.
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await else {
                return;
            };
            handle_http(relay, tls, addr).await;
        });
    }
}

/// Reads the request head (up to the blank line) and hands the rest of the TLS stream to the relay.
async fn handle_http(
    relay: Arc<Relay>,
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
) {
    let Some(rest) = common::read_request_head(&mut stream).await else {
        return;
    };
    conn::serve(
        relay,
        Transport::Other(Box::new(stream)),
        rest,
        Upgrade::Derp { fast_start: false },
        addr,
    )
    .await;
}

async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test exceeded its time limit");
}

/// Polls `cond` until it holds; panics with `what` (and the last state) after [`WAIT`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool, state: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}; state: {}", state());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends probes from `from` to `to_key` until `to` receives one, then one real packet.
async fn deliver(from: &mut DerpConn, from_key: Key, to: &mut DerpConn, to_key: Key, data: &'static [u8]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.send_packet(&to_key, b"probe").await.unwrap();
        match tokio::time::timeout(Duration::from_millis(50), to.recv()).await {
            Ok(Ok(ServerFrame::Packet { src, data })) if src == from_key && data.starts_with(b"probe") => break,
            Ok(Err(e)) => panic!("client connection failed: {e}"),
            _ => assert!(tokio::time::Instant::now() < deadline, "no route across the https link"),
        }
    }
    from.send_packet(&to_key, data).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let f = tokio::time::timeout_at(deadline, to.recv())
            .await
            .expect("packet did not arrive")
            .unwrap();
        if let ServerFrame::Packet { src, data: got } = f {
            if !got.starts_with(b"probe") {
                assert_eq!((src, got), (from_key, Bytes::from_static(data)));
                return;
            }
        }
    }
}

fn connected(node: &Node, url: &str) -> bool {
    node.link(url)
        .is_some_and(|l| l.state == LinkState::Connected && l.forwarders > 0)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_links_with_the_private_ca_carry_packets_both_ways() {
    bounded(async {
        let pki = Pki::new("derpmesh test CA");
        let (a, b) = (Node::start(&pki).await, Node::start(&pki).await);
        let (ka, mut ca) = a.client(&pki).await;
        let (kb, mut cb) = b.client(&pki).await;
        for n in [&a, &b] {
            n.server.set_mesh_tls(pki.trust()).unwrap();
            n.server.set_mesh_peers(vec![a.url.clone(), b.url.clone()]).unwrap();
        }
        wait_for(
            "both https links connected",
            || connected(&a, &b.url) && connected(&b, &a.url),
            || format!("{:?} {:?}", a.link(&b.url), b.link(&a.url)),
        )
        .await;
        let link = a.link(&b.url).unwrap();
        assert_eq!(link.url, format!("https://localhost:{}", b.addr.port()));
        assert_eq!(link.peer_key, Some(b.key()));
        assert!(link.last_error.is_none(), "{link:?}");
        // The self link over https is recognised too.
        let self_link = || a.link(&a.url).is_some_and(|l| l.state == LinkState::SelfLink);
        wait_for("the self link recognised", self_link, || {
            format!("{:?}", a.link(&a.url))
        })
        .await;
        assert_eq!(a.link(&a.url).unwrap().peer_key, Some(a.key()));

        deliver(&mut ca, ka, &mut cb, kb, b"a to b over https").await;
        deliver(&mut cb, kb, &mut ca, ka, b"b to a over https").await;
        assert!(a.relay.metrics.packets_forwarded_out.load(Relaxed) >= 1);
        assert!(b.relay.metrics.packets_forwarded_in.load(Relaxed) >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ca_the_link_reports_unknown_issuer_until_the_ca_is_set() {
    bounded(async {
        let pki = Pki::new("derpmesh test CA");
        let (a, b) = (Node::start(&pki).await, Node::start(&pki).await);
        let (_kb, _cb) = b.client(&pki).await;
        a.server.set_mesh_peers(vec![b.url.clone()]).unwrap();
        let error = || {
            a.link(&b.url)
                .and_then(|l| l.last_error)
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        wait_for(
            "the link reports the untrusted certificate",
            || !error().is_empty(),
            error,
        )
        .await;
        let e = error();
        assert!(
            e.starts_with(&format!("TLS handshake with localhost:{} failed: ", b.addr.port())),
            "{e}"
        );
        assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
        // The fix (the private CA to trust) is typed; the operator's setting is named by the control plane.
        let last_error = a.link(&b.url).and_then(|l| l.last_error).unwrap();
        assert!(last_error.is_untrusted_certificate(), "{last_error:?}");
        assert!(!e.contains("DERPMESH_"), "{e}");
        assert!(!e.contains("did not sign it"), "{e}");
        tokio::time::sleep(QUIET).await;
        let link = a.link(&b.url).unwrap();
        assert_ne!(link.state, LinkState::Connected, "{link:?}");
        assert_eq!((link.forwarders, link.peer_key), (0, None), "{link:?}");
        assert_eq!(a.forwarders(), 0);
        assert_eq!(a.relay.metrics.mesh_links.load(Relaxed), 0);

        // Another private CA does not help, and the error says the configured one is wrong.
        let other = Pki::new("some other CA");
        a.server.set_mesh_tls(other.trust()).unwrap();
        wait_for(
            "the error names the configured CA",
            || error().contains("did not sign it"),
            error,
        )
        .await;
        assert_eq!(a.forwarders(), 0);

        // The right CA: the link connects on its next attempt.
        a.server.set_mesh_tls(pki.trust()).unwrap();
        wait_for("the link connects", || connected(&a, &b.url), error).await;
        assert!(a.link(&b.url).unwrap().last_error.is_none());
        assert_eq!(a.forwarders(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insecure_skip_verify_connects_without_the_ca() {
    bounded(async {
        let pki = Pki::new("derpmesh test CA");
        let (a, b) = (Node::start(&pki).await, Node::start(&pki).await);
        let (ka, mut ca) = a.client(&pki).await;
        let (kb, mut cb) = b.client(&pki).await;
        let insecure = TlsOptions {
            ca_pem: None,
            insecure_skip_verify: true,
        };
        a.server.set_mesh_tls(insecure.clone()).unwrap();
        assert_eq!(a.server.links().tls(), insecure);
        // 127.0.0.1 is not even a name in the certificate: nothing is checked.
        let url = format!("https://127.0.0.1:{}", b.addr.port());
        a.server.set_mesh_peers(vec![url.clone()]).unwrap();
        wait_for(
            "the insecure link connects",
            || connected(&a, &url),
            || format!("{:?}", a.link(&url)),
        )
        .await;
        deliver(&mut ca, ka, &mut cb, kb, b"unverified but encrypted").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_outside_the_certificate_is_refused_and_says_why() {
    bounded(async {
        let pki = Pki::new("derpmesh test CA");
        let (a, b) = (Node::start(&pki).await, Node::start(&pki).await);
        let (_kb, _cb) = b.client(&pki).await;
        a.server.set_mesh_tls(pki.trust()).unwrap();
        let url = format!("https://127.0.0.1:{}", b.addr.port());
        a.server.set_mesh_peers(vec![url.clone()]).unwrap();
        let error = || {
            a.link(&url)
                .and_then(|l| l.last_error)
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        wait_for("the link reports the name mismatch", || !error().is_empty(), error).await;
        let e = error();
        assert!(e.contains("certificate not valid for name \"127.0.0.1\""), "{e}");
        assert!(e.contains("is only valid for DnsName(\"localhost\")"), "{e}");
        assert!(e.contains("dial a name the certificate covers"), "{e}");
        assert_eq!(a.forwarders(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_ca_pem_is_refused_up_front_and_changes_nothing() {
    bounded(async {
        let pki = Pki::new("derpmesh test CA");
        let a = Node::start(&pki).await;
        a.server.set_mesh_tls(pki.trust()).unwrap();
        for (pem, why) in [
            (
                &b"/etc/derpmesh/ca.pem"[..],
                "holds no \"-----BEGIN CERTIFICATE-----\" block",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "certificate #1 is not a usable CA certificate",
            ),
        ] {
            let bad = TlsOptions {
                ca_pem: Some(pem.to_vec()),
                insecure_skip_verify: false,
            };
            match a.server.set_mesh_tls(bad) {
                Err(MeshError::Tls(e)) => assert!(e.to_string().contains(why), "{e}"),
                other => panic!("expected a TLS settings error, got {other:?}"),
            }
        }
        assert_eq!(a.server.links().tls(), pki.trust());
        // A server is not even made with such settings.
        let bad = ServerConfig {
            mesh_tls: TlsOptions {
                ca_pem: Some(b"/etc/derpmesh/ca.pem".to_vec()),
                insecure_skip_verify: false,
            },
            ..Default::default()
        };
        assert!(matches!(Server::new(bad), Err(MeshError::Tls(_))));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_peers_are_unaffected_by_the_tls_settings() {
    bounded(async {
        // A plain-TCP "peer" that is not a relay: the http link must dial it without TLS.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", plain.local_addr().unwrap());
        let pki = Pki::new("derpmesh test CA");
        let a = Node::start(&pki).await;
        a.server.set_mesh_tls(pki.trust()).unwrap();
        a.server.set_mesh_peers(vec![url]).unwrap();
        let (mut sock, _) = plain.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = sock.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"GET /derp HTTP/1.1\r\n"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    })
    .await;
}
