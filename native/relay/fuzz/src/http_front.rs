//! The relay core's front door (`front::Front::serve`, plain HTTP): request heads in a keep-alive
//! loop, the routing of `/derp` upgrades, probes and `/generate_204`, refusals, and the hand-off of
//! every other request to Node.
//!
//! The connection is one end of a Unix socket pair taken as a `TcpStream` (the fd is all the front
//! uses; setting TCP_NODELAY fails and is ignored). An accepted DERP or WebSocket upgrade therefore
//! ends right after the routing, when `upgrade::open` cannot set TCP_NODELAY: what follows an
//! upgrade is the `relay_conn` and `websocket` targets' part.
//!
//! Input: `flags ‖ bytes the client sends`. Flags: bit 0, a hand-off to Node is set (the harness
//! plays Node and reads the connection to its end); bit 1, the relay is shutting down.
//!
//! Invariants: the front answers with a sequence of complete HTTP/1.1 responses, one per request
//! in order, with only the statuses it knows; a response that closes the connection is the last; a
//! malformed or oversized head gets exactly one 400, and only such a head does; what Node is handed
//! is exactly the client's bytes from the first request not answered; the counters agree.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use derpmesh_relay::front::{Front, MAX_HEAD};
use derpmesh_relay::relay::{Relay, RelayConfig};
use tokio::io::AsyncReadExt;

use crate::common::{block_on, remote, server_keys};

const HANDOFF: u8 = 1;
const CLOSING: u8 = 2;
const MAX_HEADERS: usize = 64;

pub fn run(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    // All of it is written before the front reads: it must fit the socket buffer.
    if input.len() > 96 << 10 {
        return;
    }
    let relay = Relay::new(server_keys().clone(), RelayConfig::default());
    if flags & CLOSING != 0 {
        block_on(relay.shutdown(Duration::ZERO, Duration::ZERO, Duration::ZERO));
    }
    let front = Arc::new(Front::new(relay.clone()));
    let handed: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    if flags & HANDOFF != 0 {
        let handed = handed.clone();
        front.set_http_handoff(Some(Arc::new(move |fd: OwnedFd, _| {
            // Node's side: read the connection to its end, then close it.
            let handed = handed.clone();
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true).expect("non-blocking");
            let mut s = tokio::net::UnixStream::from_std(s).expect("registered");
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                handed.lock().unwrap().push(got);
            });
        })));
    }
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    {
        use std::io::Write;
        ours.write_all(input).expect("the input fits the socket buffer");
        ours.shutdown(std::net::Shutdown::Write).expect("half-close");
    }
    theirs.set_nonblocking(true).expect("non-blocking");
    ours.set_nonblocking(true).expect("non-blocking");
    let conn = std::net::TcpStream::from(OwnedFd::from(theirs));
    let out = block_on(async {
        let conn = tokio::net::TcpStream::from_std(conn).expect("registered");
        let mut ours = tokio::net::UnixStream::from_std(ours).expect("registered");
        let serve = tokio::spawn(front.clone().serve(conn, remote()));
        let mut out = Vec::new();
        let _ = ours.read_to_end(&mut out).await;
        tokio::time::timeout(Duration::from_secs(60), serve)
            .await
            .expect("the front still serving after the client's EOF and 60 virtual seconds")
            .expect("the front panicked");
        out
    });
    let handed = handed.lock().unwrap();
    check(input, &out, &handed, &relay, flags);
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// A complete head of this many bytes, with its method.
    Head(usize, String),
    /// The front must answer 400.
    Malformed,
    /// Cut short: the front closes without an answer.
    Partial,
    Empty,
}

/// What the front makes of the bytes at the start of `b` (same parser, same header limit).
fn next_request(b: &[u8]) -> Next {
    if b.is_empty() {
        return Next::Empty;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // The front never holds more than MAX_HEAD bytes of a head.
    let b = &b[..b.len().min(MAX_HEAD)];
    match req.parse(b) {
        Ok(httparse::Status::Complete(n)) => Next::Head(n, req.method.unwrap_or("").to_string()),
        Ok(httparse::Status::Partial) if b.len() >= MAX_HEAD => Next::Malformed,
        Ok(httparse::Status::Partial) => Next::Partial,
        Err(_) => Next::Malformed,
    }
}

fn check(input: &[u8], mut out: &[u8], handed: &[Vec<u8>], relay: &Relay, flags: u8) {
    let all_out = out;
    let mut off = 0;
    let mut statuses = Vec::new();
    let mut closed = false;
    while !out.is_empty() {
        assert!(
            !closed,
            "bytes after a response that closed the connection (flags {flags}): the client sent {:?}, the front answered {:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(all_out)
        );
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            r => panic!(
                "not a complete HTTP response ({r:?}): {:?}",
                String::from_utf8_lossy(out)
            ),
        };
        assert_eq!(resp.version, Some(1), "responses are HTTP/1.1");
        let status = resp.code.expect("a status");
        assert!([200, 204, 400, 404, 405, 426, 503].contains(&status), "status {status}");
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        closed = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let request = next_request(&input[off..]);
        let head_method = match &request {
            Next::Head(len, method) => {
                off += len;
                method == "HEAD"
            }
            Next::Malformed => {
                assert_eq!(status, 400, "a malformed head answered {status}");
                false
            }
            other => panic!("a {status} answers no request ({other:?})"),
        };
        if status == 400 {
            assert_eq!(request, Next::Malformed, "a 400 for a well-formed head");
            assert!(closed);
        }
        if status == 404 {
            assert!(
                handed.is_empty() && flags & HANDOFF == 0,
                "404 although Node takes requests"
            );
            assert!(closed);
        }
        if status == 503 {
            assert!(flags & CLOSING != 0, "503 from a relay that is not shutting down");
        }
        let mut rest = &out[n..];
        let body_len = if head_method || status == 204 {
            0
        } else if let Some(cl) = header("content-length") {
            cl.trim().parse::<usize>().expect("a numeric Content-Length")
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            chunked_len(rest)
        } else {
            // Delimited by the end of the connection.
            closed = true;
            rest.len()
        };
        assert!(rest.len() >= body_len, "response body cut short");
        rest = &rest[body_len..];
        statuses.push(status);
        out = rest;
    }
    if !closed {
        // The first request not answered: a head the front routed on (an upgrade, or one for Node),
        // or the end of the input. Never one it should have refused.
        let next = next_request(&input[off..]);
        assert_ne!(next, Next::Malformed, "a malformed head at {off} got no 400");
    }
    match handed {
        [] => {}
        [bytes] => {
            assert!(flags & HANDOFF != 0);
            assert_eq!(
                bytes,
                &input[off..],
                "Node was not handed the client's bytes from offset {off}"
            );
            assert!(
                matches!(next_request(bytes), Next::Head(..)),
                "Node was handed no request head"
            );
        }
        _ => panic!("{} hand-offs for one connection", handed.len()),
    }
    let m = &relay.metrics;
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count() as u64;
    assert_eq!(m.http_bad_requests.load(Relaxed), count(400));
    assert_eq!(
        m.http_requests_answered.load(Relaxed),
        statuses.len() as u64 - count(400) - count(404)
    );
    assert_eq!(m.connections_handed_to_node.load(Relaxed), handed.len() as u64);
    assert_eq!(m.front_connections.load(Relaxed), 1);
}

/// Length of a chunked body at the start of `b` (the front writes one chunk, then `0`).
fn chunked_len(b: &[u8]) -> usize {
    let mut at = 0;
    loop {
        let line_end = b[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line")
            + at;
        let size = usize::from_str_radix(std::str::from_utf8(&b[at..line_end]).expect("hex"), 16).expect("hex size");
        at = line_end + 2 + size + 2;
        assert!(b.len() >= at && &b[at - 2..at] == b"\r\n", "chunk not terminated");
        if size == 0 {
            return at;
        }
    }
}
