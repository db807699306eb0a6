//! Accept limits over real TCP, through `Server::accept_connection` with descriptors as Node hands
//! them over: a burst over the accept rate is closed at once and counted while a connected pair
//! keeps exchanging packets; the per-address cap (over TLS) refuses the next connection, frees
//! places as connections close and spares exempt addresses; the per-relay cap; TCP keepalive and
//! `TCP_USER_TIMEOUT` read back from accepted sockets.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use derpmesh_relay::client::{self, DerpConn, DialOptions, TlsOptions};
use derpmesh_relay::handshake::ClientInfo;
use derpmesh_relay::keys::{Key, KeyPair};
use derpmesh_relay::limits::{AcceptLimits, Refusal, RefusalNotice};
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);
const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct Fixture {
    server: Arc<Server>,
    addr: SocketAddr,
    /// PEM of the self-signed certificate when served over TLS.
    cert_pem: Option<String>,
    notices: Arc<Mutex<Vec<RefusalNotice>>>,
}

/// A server behind an accept loop that gives every connection to `Server::accept_connection` by
/// descriptor and closes its own handle, as `Relay.handleConnection` does.
async fn fixture(tls: bool, limits: AcceptLimits) -> Fixture {
    let server = Arc::new(Server::new(ServerConfig::default()).unwrap());
    let cert_pem = tls.then(|| {
        let (cert_pem, key_pem) = tls::generate_self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        server.set_certificate(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
        cert_pem
    });
    server.set_accept_limits(limits);
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    server.set_refusal_log(Some(Arc::new(move |n| sink.lock().unwrap().push(n))));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Ok((tcp, remote)) = listener.accept().await {
            let std = tcp.into_std().unwrap();
            accepting.accept_connection(std.as_raw_fd(), remote).unwrap();
        }
    });
    Fixture {
        server,
        addr,
        cert_pem,
        notices,
    }
}

impl Fixture {
    fn metric(&self, name: &str) -> u64 {
        self.server
            .metrics()
            .snapshot()
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
            .unwrap()
    }

    async fn dial(&self) -> Result<(Key, DerpConn), client::ClientError> {
        let key = KeyPair::generate();
        let info = ClientInfo {
            version: 2,
            ..Default::default()
        };
        let (url, tls) = match &self.cert_pem {
            Some(pem) => (
                format!("https://localhost:{}", self.addr.port()),
                TlsOptions {
                    ca_pem: Some(pem.clone().into_bytes()),
                    insecure_skip_verify: false,
                },
            ),
            None => (format!("http://127.0.0.1:{}", self.addr.port()), TlsOptions::default()),
        };
        let options = DialOptions::default();
        let dial = client::dial_tls(&url, &key, &info, &options, &tls);
        let conn = tokio::time::timeout(Duration::from_secs(5), dial)
            .await
            .expect("a dial ends, admitted or closed")?;
        Ok((*key.public(), conn))
    }

    /// Waits until `name` reads `value` (a connection's slot is given back when its task sees the
    /// close).
    async fn settle(&self, name: &str, value: u64) {
        let start = Instant::now();
        while self.metric(name) != value {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{name} stayed at {}",
                self.metric(name)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A probe on a fresh plain connection: whether it was answered (else it was closed unanswered).
async fn probe(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    if tcp
        .write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 12 {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_accept_rate_is_closed_at_once_and_counted_while_a_pair_exchanges() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture(
            false,
            AcceptLimits {
                rate: Some(5.0),
                burst: Some(5),
                ..AcceptLimits::default()
            },
        )
        .await;
        let (a_key, mut a) = f.dial().await.unwrap();
        let (b_key, mut b) = f.dial().await.unwrap();
        // Two tokens spent: a full bucket again after 0.4 s.
        tokio::time::sleep(Duration::from_millis(1_100)).await;

        let started = Instant::now();
        let burst: Vec<_> = (0..30).map(|_| tokio::spawn(probe(f.addr))).collect();
        let mut served = 0;
        for p in burst {
            served += usize::from(p.await.unwrap());
        }
        let took = started.elapsed();
        // 5 from the bucket, plus what it refilled (5/s) while the burst lasted.
        let refill = (took.as_secs_f64() * 5.0).ceil() as usize;
        assert!((5..=5 + refill).contains(&served), "{served} served in {took:?}");
        let refused = 30 - served as u64;
        assert_eq!(f.metric("accepts_refused_rate_limit"), refused);
        assert_eq!(f.metric("accepts_refused"), refused);
        assert_eq!(f.metric("accepts_refused_max_connections"), 0);

        common::exchange(&mut a, &b_key, &mut b, b"through the limits").await;
        common::exchange(&mut b, &a_key, &mut a, b"through the limits").await;
        let notices = f.notices.lock().unwrap().clone();
        assert_eq!(
            notices,
            vec![RefusalNotice {
                reason: Refusal::RateLimit,
                ip: LOOPBACK,
                suppressed: 0
            }],
            "one log line per reason per interval"
        );

        // The bucket refills: a probe a second later is served.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(probe(f.addr).await);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_over_tls_refuses_the_next_connection_and_frees_places_on_close() {
    tokio::time::timeout(LIMIT, async {
        let limits = AcceptLimits {
            max_connections_per_ip: Some(2),
            ..AcceptLimits::default()
        };
        let f = fixture(true, limits.clone()).await;
        let (a_key, mut a) = f.dial().await.unwrap();
        let (b_key, mut b) = f.dial().await.unwrap();
        assert!(f.dial().await.is_err(), "a third connection from 127.0.0.1 is closed");
        assert_eq!(f.metric("accepts_refused_max_connections_per_ip"), 1);
        assert_eq!(f.metric("tls_handshakes"), 2, "closed before its TLS handshake");
        assert_eq!(f.server.limiter().open_from(LOOPBACK), 2);
        common::exchange(&mut a, &b_key, &mut b, b"through the limits").await;
        common::exchange(&mut b, &a_key, &mut a, b"through the limits").await;

        // A connection's place is given back when it closes.
        b.close().await.unwrap();
        f.settle("accepted_open", 1).await;
        let (c_key, mut c) = f.dial().await.unwrap();
        common::exchange(&mut c, &a_key, &mut a, b"through the limits").await;

        // Exempt addresses (the cluster's own nodes, local proxies) are not capped, still counted.
        f.server.set_accept_exempt(vec![LOOPBACK]);
        let (_, _d) = f.dial().await.unwrap();
        let (_, _e) = f.dial().await.unwrap();
        assert_eq!(f.metric("accepted_open"), 4);

        // The per-relay cap counts every source.
        f.server.set_accept_limits(AcceptLimits {
            max_connections: Some(4),
            ..limits
        });
        assert!(f.dial().await.is_err(), "a fifth connection to the relay is closed");
        assert_eq!(f.metric("accepts_refused_max_connections"), 1);
        assert_eq!(f.metric("accepts_refused"), 2);
        common::exchange(&mut a, &c_key, &mut c, b"through the limits").await;
        let reasons: Vec<_> = f.notices.lock().unwrap().iter().map(|n| n.reason).collect();
        assert_eq!(reasons, [Refusal::MaxConnectionsPerIp, Refusal::MaxConnections]);
    })
    .await
    .unwrap();
}

#[cfg(target_os = "linux")]
fn sockopt(fd: RawFd, level: i32, name: i32) -> i32 {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own.
    let r = unsafe { libc::getsockopt(fd, level, name, std::ptr::from_mut(&mut value).cast(), &mut len) };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    value
}

/// SO_KEEPALIVE, TCP_KEEPIDLE (s), TCP_KEEPINTVL (s), TCP_KEEPCNT, TCP_USER_TIMEOUT (ms).
#[cfg(target_os = "linux")]
fn timeouts(fd: RawFd) -> [i32; 5] {
    [
        sockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        sockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    ]
}

/// Both ways in: a raw connection (`accept_connection`) and a DERP upgrade Node parsed
/// (`accept_fd`). The options belong to the socket, so the caller's descriptor reads them back.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sockets_get_tcp_keepalive_and_user_timeout() {
    use derpmesh_relay::upgrade::Upgrade;

    let server = Server::new(ServerConfig::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut accepted = Vec::new();
    let mut take = async |by_fd: bool| {
        let client = TcpStream::connect(addr).await.unwrap();
        let (tcp, remote) = listener.accept().await.unwrap();
        let std = tcp.into_std().unwrap();
        let untouched = timeouts(std.as_raw_fd());
        if by_fd {
            let upgrade = Upgrade::Derp { fast_start: true };
            server
                .accept_fd(std.as_raw_fd(), Default::default(), upgrade, remote)
                .unwrap();
        } else {
            server.accept_connection(std.as_raw_fd(), remote).unwrap();
        }
        let tuned = timeouts(std.as_raw_fd());
        accepted.push(client);
        (untouched, tuned)
    };

    // derper's defaults: keepalive after 10 min idle (then Go's 15 s × 9 probes), 15 s user timeout.
    let (untouched, tuned) = take(false).await;
    assert_eq!((untouched[0], untouched[4]), (0, 0), "the system's defaults before");
    assert_eq!(tuned, [1, 600, 15, 9, 15_000]);
    assert_eq!(take(true).await.1, [1, 600, 15, 9, 15_000]);

    server.set_accept_limits(AcceptLimits {
        tcp_keepalive: Some(Duration::from_secs(30)),
        tcp_user_timeout: Some(Duration::from_millis(4_500)),
        ..AcceptLimits::default()
    });
    assert_eq!(take(false).await.1, [1, 30, 15, 9, 4_500]);

    server.set_accept_limits(AcceptLimits {
        tcp_keepalive: None,
        tcp_user_timeout: None,
        ..AcceptLimits::default()
    });
    let (untouched, tuned) = take(true).await;
    assert_eq!(tuned, untouched, "off: the system's settings stay");
}
