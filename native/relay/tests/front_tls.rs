//! The front door with TLS in the core: a server with a self-signed certificate behind a plain
//! accept loop that gives every raw TCP connection to the server's front (what
//! `Server::accept_connection` does with a descriptor). DERP over TLS with the meta certificate,
//! probes answered in the core, other requests handed off over a socket pair, bad input counted.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use derpmesh_relay::client::{self, DerpConn, DialOptions, TlsOptions};
use derpmesh_relay::handshake::ClientInfo;
use derpmesh_relay::keys::{Key, KeyPair};
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

struct Fixture {
    server: Arc<Server>,
    addr: SocketAddr,
    cert_pem: String,
    handed: tokio::sync::mpsc::UnboundedReceiver<std::os::fd::OwnedFd>,
}

async fn fixture() -> Fixture {
    let server = Arc::new(Server::new(ServerConfig::default()).unwrap());
    let (cert_pem, key_pem) = tls::generate_self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    server.set_certificate(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    let (tx, handed) = tokio::sync::mpsc::unbounded_channel();
    server.set_http_handoff(Some(Arc::new(move |fd, _remote| {
        let _ = tx.send(fd);
    })));
    let addr = common::serve_front(&server).await;
    Fixture {
        server,
        addr,
        cert_pem,
        handed,
    }
}

impl Fixture {
    fn trust(&self) -> TlsOptions {
        TlsOptions {
            ca_pem: Some(self.cert_pem.clone().into_bytes()),
            insecure_skip_verify: false,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        self.server
            .metrics()
            .snapshot()
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
            .unwrap()
    }

    async fn client(&self, fast_start: bool) -> (Key, DerpConn) {
        let key = KeyPair::generate();
        let info = ClientInfo {
            version: 2,
            ..Default::default()
        };
        let url = format!("https://localhost:{}", self.addr.port());
        let conn = client::dial_tls(&url, &key, &info, &DialOptions { fast_start }, &self.trust())
            .await
            .unwrap();
        (*key.public(), conn)
    }

    /// A TLS connection trusting the certificate, and the chain the server sent.
    async fn tls(&self) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<CertificateDer<'static>>) {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let chain = stream.get_ref().1.peer_certificates().unwrap().to_vec();
        (stream, chain)
    }
}

async fn read_to_end_or_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn derp_over_tls_with_the_meta_certificate_and_fast_start() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture().await;
        let (_, chain) = f.tls().await;
        assert_eq!(chain.len(), 2, "leaf, then the meta certificate");
        let cn = format!("derpkey{}", hex::encode(f.server.public_key()));
        assert!(chain[1].windows(cn.len()).any(|w| w == cn.as_bytes()));
        let (a_key, mut a) = f.client(false).await;
        let (b_key, mut b) = f.client(true).await;
        common::exchange(&mut a, &b_key, &mut b, b"hello over tls").await;
        common::exchange(&mut b, &a_key, &mut a, b"hello over tls").await;
        assert_eq!(f.metric("upgrades_fast_start"), 1);
        assert!(f.metric("tls_handshakes") >= 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn probes_are_answered_and_other_requests_handed_off() {
    tokio::time::timeout(LIMIT, async {
        let mut f = fixture().await;
        let (mut s, _) = f.tls().await;
        // Two probes on one kept-alive connection, then a request for Node.
        s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 0\r\nDate: "));
        assert!(
            text.ends_with("\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n"),
            "{text}"
        );
        s.write_all(b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: abc\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(text.contains("\r\nX-Tailscale-Response: response abc\r\n"));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let fd = f.handed.recv().await.unwrap();
        let node_side = std::os::unix::net::UnixStream::from(fd);
        node_side.set_nonblocking(true).unwrap();
        let mut node_side = tokio::net::UnixStream::from_std(node_side).unwrap();
        let mut got = vec![0u8; 64];
        let n = node_side.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        node_side
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await
            .unwrap();
        drop(node_side);
        let rest = read_to_end_or_close(&mut s).await;
        assert!(rest.ends_with(b"\r\n\r\nok"));
        assert_eq!(f.metric("connections_handed_to_node"), 1);
        assert_eq!(f.metric("http_requests_answered"), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_input_is_closed_and_counted() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture().await;
        let (a_key, mut a) = f.client(false).await;
        let (b_key, mut b) = f.client(false).await;

        // Plain HTTP to the TLS port.
        let mut tcp = TcpStream::connect(f.addr).await.unwrap();
        tcp.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_to_end_or_close(&mut tcp).await;
        // A truncated ClientHello, then the client gives up.
        let mut tcp = TcpStream::connect(f.addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
        read_to_end_or_close(&mut tcp).await;
        // Garbage after the handshake.
        let (mut s, _) = f.tls().await;
        s.write_all(b"\x00\x01\x02 not http\r\n\r\n").await.unwrap();
        let answer = read_to_end_or_close(&mut s).await;
        assert!(answer.starts_with(b"HTTP/1.1 400 Bad Request"));
        // An oversized head.
        let (mut s, _) = f.tls().await;
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let _ = s.write_all(big.as_bytes()).await;
        read_to_end_or_close(&mut s).await;

        common::exchange(&mut a, &b_key, &mut b, b"hello over tls").await;
        common::exchange(&mut b, &a_key, &mut a, b"hello over tls").await;
        assert_eq!(f.metric("tls_handshake_errors"), 2);
        assert_eq!(f.metric("http_bad_requests"), 2);
        assert_eq!(f.server.metrics().connections.load(Relaxed), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn stalled_handshakes_and_heads_time_out() {
    let f = fixture().await;
    // Mid-handshake: a partial ClientHello and then silence.
    let mut stalled = TcpStream::connect(f.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    // After the handshake: half a request head.
    let (mut half, _) = f.tls().await;
    half.write_all(b"GET /derp/probe HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(read_to_end_or_close(&mut stalled).await, b"");
    read_to_end_or_close(&mut half).await;
    assert_eq!(f.metric("tls_handshake_timeouts"), 1);
    assert_eq!(f.metric("http_head_timeouts"), 1);
}

#[tokio::test]
async fn a_new_certificate_serves_new_handshakes_and_bad_pairs_are_refused() {
    tokio::time::timeout(LIMIT, async {
        let mut f = fixture().await;
        let (a_key, mut a) = f.client(false).await;
        let (b_key, mut b) = f.client(false).await;
        let (cert2, key2) = tls::generate_self_signed(&["localhost".into()]).unwrap();
        let (_, key3) = tls::generate_self_signed(&["localhost".into()]).unwrap();
        assert!(matches!(
            f.server.set_certificate(cert2.as_bytes(), key3.as_bytes()),
            Err(tls::TlsError::KeyMismatch)
        ));
        f.server.set_certificate(cert2.as_bytes(), key2.as_bytes()).unwrap();
        f.cert_pem = cert2;
        let (c_key, mut c) = f.client(false).await;
        common::exchange(&mut a, &b_key, &mut b, b"hello over tls").await;
        common::exchange(&mut c, &a_key, &mut a, b"hello over tls").await;
        common::exchange(&mut b, &c_key, &mut c, b"hello over tls").await;
    })
    .await
    .unwrap();
}

/// With no Node behind the front, a request for Node is answered 404 and closed; a HEAD request
/// gets the head only, as it does when an upgrade is refused (found by the `http_front` fuzz
/// target: the body followed the head).
#[tokio::test]
async fn without_node_requests_get_404_and_head_requests_get_no_body() {
    tokio::time::timeout(LIMIT, async {
        let server = Arc::new(Server::new(ServerConfig::default()).unwrap());
        let addr = common::serve_front(&server).await;
        let ask = |request: &'static str| async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request.as_bytes()).await.unwrap();
            String::from_utf8(read_to_end_or_close(&mut tcp).await).unwrap()
        };
        let get = ask("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 404 Not Found\r\n"), "{get:?}");
        assert!(get.ends_with("\r\n\r\nnot found\n"), "{get:?}");
        let head = ask("HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head:?}");
        assert!(head.contains("Content-Length: 10\r\n"), "{head:?}");
        assert!(head.ends_with("Connection: close\r\n\r\n"), "HEAD got a body: {head:?}");
        // A refused upgrade too: the head of the 426, with the length its body would have.
        let refused = ask("HEAD /derp HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await;
        assert!(refused.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{refused:?}");
        assert!(refused.contains("Content-Length: 32\r\n"), "{refused:?}");
        assert!(refused.ends_with("\r\n\r\n"), "HEAD got a body: {refused:?}");
        // Keep-alive answers before it do not change that.
        let both = ask("HEAD /derp/probe HTTP/1.1\r\n\r\nHEAD /x HTTP/1.1\r\n\r\n").await;
        assert!(both.starts_with("HTTP/1.1 200 OK\r\n"), "{both:?}");
        assert!(
            both.ends_with(
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
            ),
            "{both:?}"
        );
    })
    .await
    .unwrap();
}
