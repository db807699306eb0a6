//! What every target shares: fixed keys, one paused-clock runtime per thread, a reader that hands
//! its bytes over in pieces, a small deterministic random source, and checks of the relay's output.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use derpmesh_relay::frame::{self, FrameType, HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE, PING_LEN};
use derpmesh_relay::handshake::{client_info_frame, ClientInfo};
use derpmesh_relay::keys::{Key, KeyPair};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::{Builder, Runtime};

/// The relay's private key in every target. Fixed, so a ClientInfo recorded from a real client
/// against a relay with this key (see `capture/`) opens in the targets, and so does a ServerInfo
/// recorded with [`CLIENT_PRIVATE`] as the client's key.
pub const SERVER_PRIVATE: Key = *b"derpmesh-fuzz-server-private-key";
/// The client's private key (the harness's own client, and the recording client).
pub const CLIENT_PRIVATE: Key = *b"derpmesh-fuzz-client-private-key";
/// A peer reachable through a mesh forwarder (no connection of its own).
pub const PEER: Key = *b"derpmesh-fuzz-mesh-peer-pub-key!";
/// The mesh key the relay accepts (64 hex digits, as Tailscale clients take it); the harness's
/// client presents it when told to.
pub const MESH_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The address the relay is told the client has.
pub fn remote() -> SocketAddr {
    "203.0.113.7:41641".parse().expect("literal address")
}

pub fn server_keys() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| KeyPair::from_private(SERVER_PRIVATE))
}

pub fn client_keys() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| KeyPair::from_private(CLIENT_PRIVATE))
}

pub fn server_public() -> &'static Key {
    server_keys().public()
}

pub fn client_public() -> &'static Key {
    client_keys().public()
}

/// The ClientInfo frame the harness's client sends (sealed once per variant: sealing costs a key
/// agreement, and the relay's opening of it is what is under test).
pub fn client_info(mesh: bool, prober: bool) -> &'static Bytes {
    static FRAMES: OnceLock<Vec<Bytes>> = OnceLock::new();
    let frames = FRAMES.get_or_init(|| {
        (0..4)
            .map(|i| {
                let info = ClientInfo {
                    version: frame::PROTOCOL_VERSION,
                    mesh_key: (i & 1 != 0).then(|| MESH_KEY.to_string()),
                    can_ack_pings: true,
                    is_prober: i & 2 != 0,
                };
                client_info_frame(client_keys(), server_public(), &info)
            })
            .collect()
    });
    &frames[mesh as usize | (prober as usize) << 1]
}

/// Runs `f` to completion on this thread's runtime (current-thread, clock paused: timers fire as
/// soon as nothing else can run), then waits until every task it spawned has ended. A task still
/// alive after five virtual minutes is a hang: the relay's longest timeout is 60 s.
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: Runtime = Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| {
        let out = rt.block_on(f);
        rt.block_on(async {
            let metrics = tokio::runtime::Handle::current().metrics();
            for _ in 0..3000 {
                if metrics.num_alive_tasks() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!(
                "{} task(s) still alive 300 virtual seconds after the exchange ended",
                metrics.num_alive_tasks()
            );
        });
        out
    })
}

/// xorshift64*: deterministic, seeded from fuzz input bytes.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Hands `data` to its reader in pieces of random size (1 byte to all of it), sometimes after a
/// `Pending`, then EOF: the way a socket delivers a stream.
pub struct Chunked {
    data: Bytes,
    rng: Rng,
    pended: bool,
}

impl Chunked {
    pub fn new(data: &[u8], rng: Rng) -> Chunked {
        Chunked {
            data: Bytes::copy_from_slice(data),
            rng,
            pended: false,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pended && this.rng.chance(8) {
            this.pended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.pended = false;
        let most = buf.remaining().min(this.data.len());
        let n = match this.rng.below(4) {
            0 => most,
            1 => most.min(1 + this.rng.below(4)),
            2 => most.min(1 + this.rng.below(64)),
            _ => most.min(1 + this.rng.below(4096)),
        };
        let chunk = this.data.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// `s` occurs in order (not necessarily contiguously) in `of`.
pub fn is_subsequence<T: PartialEq>(s: &[T], of: &[T]) -> bool {
    let mut it = of.iter();
    s.iter().all(|x| it.any(|y| y == x))
}

/// What the relay wrote to a client after its ServerKey, split into frames.
#[derive(Debug, Default)]
pub struct ServerStream {
    /// ServerInfo was received: the handshake succeeded.
    pub server_info: bool,
    pub frames: Vec<(u8, Bytes)>,
    /// The stream ended inside a frame.
    pub torn: bool,
}

/// Checks a relay's byte stream to a client from the first byte: the 101 (unless fast start or
/// WebSocket, where the caller strips it), ServerKey exactly, ServerInfo, then frames of the kinds
/// a relay sends, each with its exact size. Panics on anything else.
pub fn check_server_stream(mut out: &[u8], expect_101: bool) -> ServerStream {
    if expect_101 {
        let want = derpmesh_relay::upgrade::derp_switching_protocols(server_public());
        assert!(
            out.starts_with(want.as_bytes()),
            "the relay's answer does not start with its 101: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
        out = &out[want.len()..];
    }
    let key_frame = frame::server_key(server_public());
    assert!(
        out.len() >= key_frame.len() || key_frame.starts_with(out),
        "the relay's first frame is not its ServerKey"
    );
    if out.len() < key_frame.len() {
        return ServerStream {
            torn: !out.is_empty(),
            ..ServerStream::default()
        };
    }
    assert_eq!(
        &out[..key_frame.len()],
        &key_frame[..],
        "the relay's first frame is not its ServerKey"
    );
    out = &out[key_frame.len()..];
    let mut stream = ServerStream::default();
    let mut first = true;
    while !out.is_empty() {
        let Some((t, len)) = frame::read_header(out) else {
            stream.torn = true;
            break;
        };
        let len = len as usize;
        if out.len() < HEADER_LEN + len {
            stream.torn = true;
            break;
        }
        let payload = Bytes::copy_from_slice(&out[HEADER_LEN..HEADER_LEN + len]);
        out = &out[HEADER_LEN + len..];
        if first {
            first = false;
            // nonce(24) ‖ tag(16) ‖ {"version":2}
            assert_eq!(
                t,
                FrameType::ServerInfo as u8,
                "the relay's second frame is not ServerInfo"
            );
            assert_eq!(len, 24 + 16 + br#"{"version":2}"#.len(), "ServerInfo of {len} bytes");
            stream.server_info = true;
            continue;
        }
        let ok = match FrameType::from_u8(t) {
            Some(FrameType::RecvPacket) => (KEY_LEN..=KEY_LEN + MAX_PACKET_SIZE).contains(&len),
            Some(FrameType::KeepAlive) => len == 0,
            Some(FrameType::PeerGone) => {
                len == KEY_LEN + 1
                    && matches!(
                        payload[KEY_LEN],
                        frame::PEER_GONE_DISCONNECTED | frame::PEER_GONE_NOT_HERE
                    )
            }
            Some(FrameType::PeerPresent) => len == frame::PEER_PRESENT_LEN,
            Some(FrameType::Pong) => len == PING_LEN,
            Some(FrameType::Health) => std::str::from_utf8(&payload).is_ok(),
            Some(FrameType::Restarting) => len == frame::RESTARTING_LEN,
            _ => false,
        };
        assert!(ok, "the relay sent a frame of type {t:#04x} with a {len}-byte payload");
        stream.frames.push((t, payload));
    }
    stream
}
