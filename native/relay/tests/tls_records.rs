//! The record layer of `tlsio` against rustls' own (through tokio-rustls) on real TCP sockets:
//! every cipher suite both ways, key updates from the peer and before our key's limit, and
//! close_notify in both directions.

use std::sync::Arc;

use derpmesh_relay::tls::generate_self_signed;
use derpmesh_relay::tlsio;
use rustls::crypto::ring::{cipher_suite, default_provider};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ProtocolVersion, SupportedCipherSuite};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

struct Identity {
    cert: CertificateDer<'static>,
    key_pem: String,
}

fn identity() -> Identity {
    let (cert_pem, key_pem) = generate_self_signed(&["localhost".into()]).unwrap();
    Identity {
        cert: CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap(),
        key_pem,
    }
}

fn provider(suite: SupportedCipherSuite) -> Arc<CryptoProvider> {
    let mut p = default_provider();
    p.cipher_suites = vec![suite];
    Arc::new(p)
}

fn version_of(suite: SupportedCipherSuite) -> &'static rustls::SupportedProtocolVersion {
    match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    }
}

fn server_config(id: &Identity, suite: SupportedCipherSuite, extract: bool) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[version_of(suite)])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    c.enable_secret_extraction = extract;
    Arc::new(c)
}

fn client_config(id: &Identity, suite: SupportedCipherSuite, extract: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[version_of(suite)])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.enable_secret_extraction = extract;
    Arc::new(c)
}

const SUITES: [SupportedCipherSuite; 6] = [
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// 1 MiB of bytes that differ from record to record.
fn payload() -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Writes `data` in uneven pieces while reading the echo back; returns what came back.
async fn echo_through<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let send = async {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let n = step.min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            at += n;
            step = (step * 7 + 13) % 40_000 + 1;
        }
        w.flush().await.unwrap();
    };
    let receive = async {
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(send, receive);
    back
}

/// Accepts one connection with `tlsio` on a loopback port and hands it to `serve`.
async fn serve_one<T, F>(
    config: Arc<rustls::ServerConfig>,
    serve: impl FnOnce(tlsio::TlsStream) -> F + Send + 'static,
) -> (SocketAddr, JoinHandle<T>)
where
    F: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(tlsio::accept(tcp, config).await.unwrap()).await
    });
    (addr, task)
}

/// rustls' own client (tokio-rustls) for `suite`, connected to `addr`.
async fn rustls_client(
    id: &Identity,
    suite: SupportedCipherSuite,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client_config(id, suite, false));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Serves one `tlsio` connection: echoes everything through the split halves, then closes.
async fn tlsio_echo(stream: tlsio::TlsStream) {
    let (mut r, mut w) = stream.into_split();
    tokio::io::copy(&mut r, &mut w).await.unwrap();
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_suite_both_ways_against_rustls() {
    let id = identity();
    let data = payload();
    for suite in SUITES {
        let name = format!("{:?}", suite.suite());
        // Our server, rustls' client.
        let (addr, server) = serve_one(server_config(&id, suite, true), tlsio_echo).await;
        let mut tls = rustls_client(&id, suite, addr).await;
        assert_eq!(tls.get_ref().1.negotiated_cipher_suite(), Some(suite), "{name}");
        let back = echo_through(&mut tls, &data).await;
        assert!(back == data, "{name}: echo through our server differs");
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        // Our close_notify ends the client's stream cleanly (no UnexpectedEof).
        tls.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{name}");
        server.await.unwrap();

        // rustls' server, our client.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&id, suite, false));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let config = client_config(&id, suite, true);
        let stream = tlsio::connect(tcp, config, ServerName::try_from("localhost").unwrap())
            .await
            .unwrap();
        let expected_version = match suite {
            SupportedCipherSuite::Tls13(_) => ProtocolVersion::TLSv1_3,
            SupportedCipherSuite::Tls12(_) => ProtocolVersion::TLSv1_2,
        };
        assert_eq!(stream.protocol_version(), expected_version, "{name}");
        let (mut r, mut w) = stream.into_split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let receive = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(send, receive);
        assert!(back == data, "{name}: echo through rustls' server differs");
        server.await.unwrap();
    }
}

#[tokio::test]
async fn a_key_update_from_the_peer_keeps_the_connection_going() {
    let id = identity();
    let suite = cipher_suite::TLS13_AES_128_GCM_SHA256;
    let (addr, server) = serve_one(server_config(&id, suite, true), tlsio_echo).await;
    let mut tls = rustls_client(&id, suite, addr).await;
    let data = payload();
    for round in 0..5 {
        let chunk = &data[round * 100_000..(round + 1) * 100_000];
        tls.write_all(chunk).await.unwrap();
        tls.flush().await.unwrap();
        let mut back = vec![0u8; chunk.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert!(back == chunk, "round {round}: echo differs");
        // New keys for the client's direction (rustls asks the server to update its own too).
        tls.get_mut().1.refresh_traffic_keys().unwrap();
    }
    tls.shutdown().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn our_write_keys_are_replaced_before_their_limit() {
    let id = identity();
    let suite = cipher_suite::TLS13_AES_256_GCM_SHA384;
    let data = payload();
    let sent = data.clone();
    let (addr, server) = serve_one(server_config(&id, suite, true), |stream| async move {
        let (_r, mut w) = stream.into_split();
        // A new key every 10 records: 1 MiB in 1000-byte writes seals ~1 000 records, ~100 keys.
        w.set_record_limit(10);
        for piece in sent.chunks(1000) {
            w.write_all(piece).await.unwrap();
            w.flush().await.unwrap();
        }
        w.shutdown().await.unwrap();
        w.key_updates()
    })
    .await;
    let mut tls = rustls_client(&id, suite, addr).await;
    let mut back = Vec::new();
    tls.read_to_end(&mut back).await.unwrap();
    assert!(back == data, "data across ~100 key updates differs");
    let updates = server.await.unwrap();
    assert!((90..=1100).contains(&updates), "{updates} key updates");
}

#[tokio::test]
async fn a_tampered_record_is_an_error_not_data() {
    let id = identity();
    let suite = cipher_suite::TLS13_AES_128_GCM_SHA256;
    let (addr, server) = serve_one(server_config(&id, suite, true), |stream| async move {
        let (mut r, _w) = stream.into_split();
        let mut got = Vec::new();
        let result = r.read_to_end(&mut got).await;
        (got, result.map_err(|e| e.to_string()))
    })
    .await;
    // A client whose TCP bytes pass through this test: the handshake goes through unchanged,
    // then one byte of the first application record is flipped.
    let upstream = TcpStream::connect(addr).await.unwrap();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap();
    let proxy = tokio::spawn(async move {
        let (client, _) = proxy_listener.accept().await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let down = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut records = 0;
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = cr.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            // Forward whole records; flip a byte inside the 3rd application-data record
            // (after the client's ChangeCipherSpec and Finished records).
            while pending.len() >= 5 {
                let len = u16::from_be_bytes([pending[3], pending[4]]) as usize;
                if pending.len() < 5 + len {
                    break;
                }
                let mut rec: Vec<u8> = pending.drain(..5 + len).collect();
                if rec[0] == 23 {
                    records += 1;
                    if records == 3 {
                        rec[10] ^= 0x40;
                    }
                }
                if uw.write_all(&rec).await.is_err() {
                    break;
                }
            }
        }
        let _ = uw.shutdown().await;
        down.abort();
    });
    let mut tls = rustls_client(&id, suite, proxy_addr).await;
    tls.write_all(b"first record ").await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _ = tls.write_all(b"tampered record").await;
    let _ = tls.flush().await;
    let (got, result) = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("server reader ends")
        .unwrap();
    assert_eq!(got, b"first record ", "only the untampered record is data");
    let err = result.expect_err("the tampered record is an error");
    assert!(err.contains("authentication"), "{err}");
    drop(tls);
    proxy.abort();
}

/// Our reader and the peer's writer over an in-memory pipe, keyed without a handshake
/// (`tlsio::pair_from_secrets` with swapped secrets), for records no rustls peer sends.
fn keyed_pair(
    tls13: bool,
) -> (
    tlsio::TlsReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    tlsio::TlsWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (our_r, our_w) = tokio::io::split(ours);
    let (their_r, their_w) = tokio::io::split(theirs);
    let (a, b) = (
        *b"derpmesh-test-secret-peer-to-us!",
        *b"derpmesh-test-secret-us-to-peer!",
    );
    let (reader, _) = tlsio::pair_from_secrets(our_r, our_w, tls13, tlsio::Aead::Aes128Gcm, a, b, false);
    let (_, writer) = tlsio::pair_from_secrets(their_r, their_w, tls13, tlsio::Aead::Aes128Gcm, b, a, false);
    (reader, writer)
}

/// Reads until the end or an error: the bytes, and the error's kind and text.
async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut r: R) -> (Vec<u8>, Result<(), (std::io::ErrorKind, String)>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err((e.kind(), e.to_string()))),
        }
    }
}

// Found by the `tls_records` fuzz target: records whose plaintext is over 2^14 bytes (RFC 5246
// §6.2.1; RFC 8446 §5.4: 2^14 + 1 with the content type and padding) were taken (an alert of 16 KiB
// was reported as the peer's alert).
#[tokio::test]
async fn a_record_over_the_plaintext_limit_is_refused() {
    let full = vec![7u8; 1 << 14];
    for tls13 in [false, true] {
        let (reader, mut peer) = keyed_pair(tls13);
        peer.seal_record(23, &full, 0);
        if tls13 {
            // 2^14 bytes, its type, one byte of padding: 2^14 + 2.
            peer.seal_record(23, &full, 1);
        } else {
            peer.seal_record(23, &[full.as_slice(), b"!"].concat(), 0);
        }
        peer.shutdown().await.unwrap();
        let (got, end) = read_all(reader).await;
        assert!(got == full, "TLS 1.3: {tls13}: the record at the limit is data");
        let (kind, text) = end.expect_err("the record over the limit is an error");
        assert_eq!(kind, std::io::ErrorKind::InvalidData, "{text}");
        assert!(text.contains("exceeds the limit"), "{text}");
    }
}

// Found by the `tls_records` fuzz target: a KeyUpdate followed by more messages in its record
// (RFC 8446 §5.1: handshake messages do not span a key change) and a handshake record with no
// message (§5.1: no zero-length handshake records) were taken.
#[tokio::test]
async fn a_key_update_ends_its_record_and_handshake_records_are_not_empty() {
    let key_update = [24u8, 0, 0, 1, 0];
    for (content, want) in [
        (
            [key_update, key_update].concat(),
            "KeyUpdate not at the end of its record",
        ),
        (Vec::new(), "empty handshake record"),
    ] {
        let (reader, mut peer) = keyed_pair(true);
        peer.write_all(b"before").await.unwrap();
        peer.seal_record(22, &content, 0);
        peer.shutdown().await.unwrap();
        let (got, end) = read_all(reader).await;
        assert_eq!(got, b"before");
        let (kind, text) = end.expect_err("an error");
        assert_eq!(kind, std::io::ErrorKind::InvalidData, "{text}");
        assert!(text.contains(want), "{text}");
    }
    // A KeyUpdate alone in its record moves the keys: what the peer seals next opens.
    let (reader, mut peer) = keyed_pair(true);
    peer.write_all(b"old keys, ").await.unwrap();
    peer.send_key_update(false).unwrap();
    peer.write_all(b"new keys").await.unwrap();
    peer.shutdown().await.unwrap();
    let (got, end) = read_all(reader).await;
    assert_eq!(got, b"old keys, new keys");
    end.unwrap();
}
