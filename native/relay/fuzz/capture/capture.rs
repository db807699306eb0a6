//! Records real DERP, WebSocket, HTTP and STUN traffic and turns it into the fuzz seed corpus.
//! Used by `capture/record.sh`; see README.md ("Seed corpus").
//!
//!   capture proxy --out DIR [--tcp-upstream HOST:PORT] [--udp-upstream HOST:PORT] [--secs N]
//!       A recording proxy (TCP and UDP on 127.0.0.1, ports printed as `tcp PORT` / `udp PORT`).
//!       Without upstreams it proxies to an in-process derpmesh relay (front door and STUN) with
//!       the fuzz targets' fixed key and mesh key, so the recorded ClientInfo opens in the targets.
//!       Each TCP connection is written to DIR/tcp-N.c2s and .s2c, each datagram to
//!       DIR/udp-N.c2s or .s2c.
//!   capture client --url URL [--fast-start]
//!       The project's own client (derpmesh-relay's `client::dial_with`, with the fuzz client key
//!       and the mesh key): packets to itself and to an absent key (disco), a ping, NotePreferred,
//!       WatchConns, then close.
//!   capture corpus --from DIR... --to CORPUS_DIR
//!       Writes seeds for every target from the recordings (see `seeds_from`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use derpmesh_relay::client::{self, DialOptions, TlsOptions};
use derpmesh_relay::frame::{self, FrameType, HEADER_LEN, KEY_LEN};
use derpmesh_relay::handshake::ClientInfo;
use derpmesh_relay::server::{Server, ServerConfig};
use derpmesh_relay::stun;
use derpmesh_relay_fuzz::common::{client_keys, server_keys, MESH_KEY, PEER, SERVER_PRIVATE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("proxy") => rt.block_on(proxy(&args)),
        Some("client") => rt.block_on(own_client(&args)),
        Some("corpus") => corpus(&args),
        _ => Err("usage: capture proxy|client|corpus ... (see capture/capture.rs)".into()),
    }
}

async fn proxy(args: &[String]) -> Res<()> {
    let out = PathBuf::from(arg(args, "--out").ok_or("--out DIR")?);
    std::fs::create_dir_all(&out)?;
    let secs: u64 = arg(args, "--secs").map_or(Ok(600), |s| s.parse())?;
    let mut keep = Vec::new();
    let tcp_up: SocketAddr = match arg(args, "--tcp-upstream") {
        Some(a) => a.parse()?,
        None => {
            let server = Arc::new(Server::new(ServerConfig {
                private_key: Some(SERVER_PRIVATE),
                mesh_key: Some(MESH_KEY.into()),
                ..ServerConfig::default()
            })?);
            let l = TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let front = server.front().clone();
            tokio::spawn(async move {
                while let Ok((s, peer)) = l.accept().await {
                    tokio::spawn(front.clone().serve(s, peer));
                }
            });
            keep.push(server);
            addr
        }
    };
    let mut stun_listener = None;
    let udp_up: SocketAddr = match arg(args, "--udp-upstream") {
        Some(a) => a.parse()?,
        None => {
            let l = stun::Listener::bind("127.0.0.1:0".parse()?)?;
            let a = l.local_addr();
            stun_listener = Some(l);
            a
        }
    };
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let udp = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    println!("tcp {}", tcp.local_addr()?.port());
    println!("udp {}", udp.local_addr()?.port());
    let n = Arc::new(AtomicUsize::new(0));
    {
        let (out, n) = (out.clone(), n.clone());
        tokio::spawn(async move {
            while let Ok((c, _)) = tcp.accept().await {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let out = out.clone();
                tokio::spawn(async move {
                    if let Ok(s) = TcpStream::connect(tcp_up).await {
                        let _ = record_tcp(c, s, &out.join(format!("tcp-{i:03}"))).await;
                    }
                });
            }
        });
    }
    {
        let out = out.clone();
        tokio::spawn(async move {
            // One upstream socket per client address, answers relayed back.
            let mut buf = vec![0u8; 64 << 10];
            let mut ups: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> = Default::default();
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let _ = std::fs::write(out.join(format!("udp-{i:03}.c2s")), &buf[..len]);
                let up = match ups.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        let u = Arc::new(u);
                        ups.insert(from, u.clone());
                        let (u2, udp, out, n) = (u.clone(), udp.clone(), out.clone(), n.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 64 << 10];
                            while let Ok((len, _)) = u2.recv_from(&mut b).await {
                                let i = n.fetch_add(1, Ordering::Relaxed);
                                let _ = std::fs::write(out.join(format!("udp-{i:03}.s2c")), &b[..len]);
                                let _ = udp.send_to(&b[..len], from).await;
                            }
                        });
                        u
                    }
                };
                let _ = up.send_to(&buf[..len], udp_up).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    drop((keep, stun_listener));
    Ok(())
}

async fn record_tcp(client: TcpStream, server: TcpStream, base: &Path) -> Res<()> {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let c2s = base.with_extension("c2s");
    let s2c = base.with_extension("s2c");
    let up = async move {
        let mut log = Vec::new();
        let mut b = vec![0u8; 64 << 10];
        while let Ok(n) = cr.read(&mut b).await {
            if n == 0 || sw.write_all(&b[..n]).await.is_err() {
                break;
            }
            log.extend_from_slice(&b[..n]);
            let _ = std::fs::write(&c2s, &log);
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let mut log = Vec::new();
        let mut b = vec![0u8; 64 << 10];
        while let Ok(n) = sr.read(&mut b).await {
            if n == 0 || cw.write_all(&b[..n]).await.is_err() {
                break;
            }
            log.extend_from_slice(&b[..n]);
            let _ = std::fs::write(&s2c, &log);
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
    Ok(())
}

async fn own_client(args: &[String]) -> Res<()> {
    let url = arg(args, "--url").ok_or("--url URL")?;
    let fast_start = args.iter().any(|a| a == "--fast-start");
    let info = ClientInfo {
        version: frame::PROTOCOL_VERSION,
        mesh_key: Some(MESH_KEY.into()),
        can_ack_pings: true,
        is_prober: false,
    };
    let mut c = client::dial_tls(
        &url,
        client_keys(),
        &info,
        &DialOptions { fast_start },
        &TlsOptions::default(),
    )
    .await?;
    let me = *client_keys().public();
    c.note_preferred(true).await?;
    c.send_packet(&me, b"hello from the derpmesh client").await?;
    let mut disco = frame::DISCO_MAGIC.to_vec();
    disco.resize(frame::DISCO_MIN_LEN + 10, 7);
    c.send_packet(&PEER, &disco).await?;
    c.send_frame(&frame::ping(b"derpping")).await?;
    c.watch_conns().await?;
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
            Ok(Ok(f)) => eprintln!("capture client: {f:?}"),
            _ => break,
        }
    }
    c.close().await?;
    Ok(())
}

/// End of the HTTP head at the start of `b`, if there is one.
fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The whole frames (header included) of a DERP byte stream.
fn frames(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((_, len)) = frame::read_header(b) {
        let len = len as usize;
        if b.len() < HEADER_LEN + len {
            break;
        }
        out.push(b[..HEADER_LEN + len].to_vec());
        b = &b[HEADER_LEN + len..];
    }
    out
}

/// Payload bytes of the client's (masked) WebSocket frames.
fn unmask_websocket(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        let mask = if masked && b.len() >= at + 4 {
            let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            m
        } else {
            [0; 4]
        };
        if b.len() < at + len {
            break;
        }
        if b[0] & 0x0f == 2 || b[0] & 0x0f == 0 {
            out.extend(b[at..at + len].iter().enumerate().map(|(i, x)| x ^ mask[i % 4]));
        }
        b = &b[at + len..];
    }
    out
}

struct Seeds {
    to: PathBuf,
    seen: BTreeSet<(String, Vec<u8>)>,
}

impl Seeds {
    const MAX: usize = 2 << 10;

    fn add(&mut self, target: &str, name: &str, mut data: Vec<u8>) {
        data.truncate(Self::MAX);
        if !self.seen.insert((target.to_string(), data.clone())) {
            return;
        }
        let dir = self.to.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), data).expect("writing a seed");
    }
}

fn with_flags(flags: u8, b: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(b);
    v
}

fn corpus(args: &[String]) -> Res<()> {
    let to = PathBuf::from(arg(args, "--to").ok_or("--to CORPUS_DIR")?);
    let mut seeds = Seeds {
        to,
        seen: BTreeSet::new(),
    };
    let froms: Vec<&String> = args.windows(2).filter(|w| w[0] == "--from").map(|w| &w[1]).collect();
    for from in froms {
        let label = Path::new(from).file_name().unwrap().to_string_lossy().to_string();
        let mut files: Vec<PathBuf> = std::fs::read_dir(from)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            let name = format!("{label}-{}", f.file_name().unwrap().to_string_lossy().replace('.', "-"));
            let data = std::fs::read(&f)?;
            if data.is_empty() {
                continue;
            }
            match f.extension().and_then(|e| e.to_str()) {
                Some("c2s") if name.contains("-udp-") => seeds.add("stun", &name, data),
                Some("s2c") if name.contains("-udp-") => seeds.add("stun", &name, data),
                Some("c2s") => seeds_from_client(&mut seeds, &name, &data),
                Some("s2c") => seeds_from_server(&mut seeds, &name, &data),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Seeds from what a client sent: its request head, its ClientInfo, its frames.
fn seeds_from_client(seeds: &mut Seeds, name: &str, data: &[u8]) {
    let Some(end) = head_end(data) else { return };
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    // http_front: the request as sent (flags 0: no Node; 1: Node takes other requests).
    seeds.add("http_front", name, with_flags(0, &data[..end]));
    seeds.add("http_front", &format!("{name}-node"), with_flags(1, data));
    let websocket = head.contains("upgrade: websocket");
    let fast_start = head.contains("derp-fast-start: 1");
    let body = &data[end..];
    let derp = if websocket {
        // websocket (raw): the client's frames as sent, ClientInfo included.
        seeds.add("websocket", name, with_flags(1, body));
        unmask_websocket(body)
    } else {
        // relay_conn (raw): the stream after the head, ClientInfo included.
        seeds.add("relay_conn", name, with_flags(1 | if fast_start { 2 } else { 0 }, body));
        body.to_vec()
    };
    let fs = frames(&derp);
    let Some(ci_frame) = fs.first() else { return };
    if ci_frame[0] != FrameType::ClientInfo as u8 || ci_frame.len() < HEADER_LEN + KEY_LEN {
        return;
    }
    let ci = &ci_frame[HEADER_LEN..];
    seeds.add("handshake", &format!("{name}-clientinfo"), with_flags(0, ci_frame));
    seeds.add("frame_reader", name, with_flags(0, &derp));
    let client_key: [u8; KEY_LEN] = ci[..KEY_LEN].try_into().unwrap();
    let Some(json) = server_keys().open(&client_key, &ci[KEY_LEN..]) else {
        return; // sealed to another relay's key (recorded against derper)
    };
    seeds.add("handshake", &format!("{name}-json"), with_flags(2, &json));
    seeds.add("handshake", &format!("{name}-sealed"), with_flags(1, &json));
    let mesh = ClientInfo::from_json(&json).ok().and_then(|i| i.mesh_key).is_some();
    // relay_conn / websocket (harness's ClientInfo): the frames after ClientInfo, with the
    // recorded client's key replaced by the harness client's and any other key by the mesh peer.
    let me = *client_keys().public();
    let mut rest = Vec::new();
    for f in &fs[1..] {
        let mut f = f.clone();
        let keys = match FrameType::from_u8(f[0]) {
            Some(FrameType::SendPacket | FrameType::ClosePeer) => 1,
            Some(FrameType::ForwardPacket) => 2,
            _ => 0,
        };
        for k in 0..keys {
            let at = HEADER_LEN + k * KEY_LEN;
            if f.len() >= at + KEY_LEN {
                let new = if f[at..at + KEY_LEN] == client_key { me } else { PEER };
                f[at..at + KEY_LEN].copy_from_slice(&new);
            }
        }
        rest.extend_from_slice(&f);
    }
    let flags = if mesh { 4 | 8 } else { 8 };
    seeds.add("relay_conn", &format!("{name}-frames"), with_flags(flags, &rest));
    if websocket {
        // A program of binary messages of at most 4111 bytes each.
        let mut program = Vec::new();
        for chunk in rest.chunks(4000) {
            let len = chunk.len();
            program.push(((len % 16) as u8) << 3);
            program.push((len / 16) as u8);
            program.extend_from_slice(chunk);
        }
        seeds.add(
            "websocket",
            &format!("{name}-messages"),
            with_flags(if mesh { 2 | 8 } else { 8 }, &program),
        );
    }
}

/// Seeds from what a relay sent: the 101, ServerKey, ServerInfo and frames.
fn seeds_from_server(seeds: &mut Seeds, name: &str, data: &[u8]) {
    if data.starts_with(b"HTTP/") {
        seeds.add("client", name, with_flags(0, data));
        if let Some(end) = head_end(data) {
            let body = &data[end..];
            if body.first() == Some(&(FrameType::ServerKey as u8)) {
                seeds.add("handshake", &format!("{name}-server"), with_flags(3, body));
                seeds.add("frame_reader", name, with_flags(0x33, body));
            } else if !body.is_empty() {
                // WebSocket: the relay's frames.
                let derp = unmask_websocket(body);
                seeds.add("client", &format!("{name}-ws"), with_flags(1, &derp));
            }
        }
    } else {
        // Fast start: the DERP stream from the first byte.
        seeds.add("client", name, with_flags(1, data));
        seeds.add("handshake", &format!("{name}-server"), with_flags(3, data));
    }
}
