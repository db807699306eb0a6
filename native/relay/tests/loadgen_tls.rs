//! The load generator over TLS against the core's own TLS front door: a server with a self-signed
//! certificate for 127.0.0.1, every accepted TCP connection given to its front (what
//! `Server::accept_connection` does with a descriptor). Trusting the certificate, packets flow;
//! without it, the dial fails on the unknown issuer.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derpmesh_relay::client::{ClientError, TlsOptions};
use derpmesh_relay::loadgen::{self, LoadError, LoadOptions};
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::tls;

const LIMIT: Duration = Duration::from_secs(30);

/// A TLS relay on a loopback port, and the PEM of its certificate.
async fn tls_relay() -> (Arc<Server>, SocketAddr, String) {
    let server = Arc::new(Server::new(ServerConfig::default()).unwrap());
    let (cert_pem, key_pem) = tls::generate_self_signed(&["127.0.0.1".into()]).unwrap();
    server.set_certificate(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    let addr = common::serve_front(&server).await;
    (server, addr, cert_pem)
}

fn trusting(pem: &str) -> TlsOptions {
    TlsOptions {
        ca_pem: Some(pem.as_bytes().to_vec()),
        ..TlsOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_a_tls_relay_trusting_its_certificate() {
    let (_server, addr, pem) = tls_relay().await;
    let run = loadgen::run(LoadOptions {
        url: format!("https://{addr}"),
        pairs: 2,
        packet_size: 300,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        rate_per_pair: Some(2000.0),
        tls: trusting(&pem),
        ..LoadOptions::default()
    });
    let r = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap();
    // 2 pairs × 2000/s × 0.4 s, paced well below what the relay takes: nothing lost.
    assert!(r.packets_received > 1000, "{r:?}");
    assert!(r.loss_ratio < 0.01, "{r:?}");
    assert!(r.rtt_samples > 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_idle_tls_clients() {
    let (_server, addr, pem) = tls_relay().await;
    let (url, tls) = (format!("https://{addr}"), trusting(&pem));
    let hold = loadgen::hold_clients(&url, 20, Duration::from_millis(10), &tls);
    assert_eq!(tokio::time::timeout(LIMIT, hold).await.unwrap().unwrap(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_certificate_the_dial_fails_on_the_unknown_issuer() {
    let (_server, addr, _pem) = tls_relay().await;
    let run = loadgen::run(LoadOptions {
        url: format!("https://{addr}"),
        pairs: 1,
        ..LoadOptions::default()
    });
    let err = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap_err();
    let LoadError::Dial { error, .. } = &err else {
        panic!("expected a dial error, got {err}");
    };
    assert!(
        matches!(error, ClientError::Tls { .. }) && error.is_unknown_issuer(),
        "{err}"
    );
    assert!(err.to_string().contains("not signed by a trusted CA"), "{err}");

    let (url, tls) = (format!("https://{addr}"), TlsOptions::default());
    let hold = loadgen::hold_clients(&url, 1, Duration::ZERO, &tls);
    let err = tokio::time::timeout(LIMIT, hold).await.unwrap().unwrap_err();
    assert!(err.is_unknown_issuer(), "{err}");
}
