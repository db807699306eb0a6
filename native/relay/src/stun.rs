//! STUN for Tailscale clients: the RFC 5389 Binding exchange as Tailscale speaks it
//! (`tailscale.com/net/stun`), and a UDP responder like the one derper runs next to its relay.
//!
//! A Tailscale client finds its public address by sending a Binding Request to the relay's STUN
//! port and reading the XOR-MAPPED-ADDRESS of the answer. The request is always the same 40
//! bytes: the 20-byte header (type `0x0001`, length, magic cookie `0x2112A442`, a random 12-byte
//! transaction id), a SOFTWARE attribute `tailnode` and a FINGERPRINT (CRC-32 of everything before
//! it, xor `0x5354554E`). Like Tailscale's `stun.ParseBindingRequest`, [`parse_binding_request`]
//! accepts only requests that carry that SOFTWARE value and end in a correct FINGERPRINT; other
//! attributes are skipped. Two checks go further than Tailscale's, and only refuse crafted packets
//! (Tailscale's own request always passes them): the header length must equal the datagram length
//! minus 20 (RFC 5389 §6), and the final FINGERPRINT must be 4 bytes long.
//!
//! The answer, [`Response`], is byte for byte what Tailscale's `stun.Response` builds: a Binding
//! Success with one XOR-MAPPED-ADDRESS, family 1 (IPv4, 32 bytes in all) or 2 (IPv6, 44 bytes).
//! [`serve`] answers an IPv4 client of a dual-stack socket (`::ffff:a.b.c.d`) with its IPv4
//! address; derper answers it with the v4-mapped IPv6 address, which Tailscale's client unmaps,
//! so both end up with the same result.
//!
//! Only std and tokio: no allocation per datagram (one 64 KiB receive buffer per [`serve`], the
//! answer on the stack), and no input can make it panic.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

/// The magic cookie of every RFC 5389 message, bytes 4..8 of the header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// The SOFTWARE value every Tailscale request carries (8 bytes, so no padding).
pub const SOFTWARE: &[u8; 8] = b"tailnode";
/// Length of Tailscale's Binding Request: header, SOFTWARE (4 + 8), FINGERPRINT (4 + 4).
pub const REQUEST_LEN: usize = HEADER_LEN + 12 + 8;
/// Length of the largest answer (IPv6).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 8 + 16;
/// Receive buffer of [`serve`]: holds any UDP datagram whole, so none is judged on a truncated copy.
const RECV_BUF_LEN: usize = 64 << 10;

const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Not in the RFC, but some servers send it and Tailscale's client reads it (so does [`parse_response`]).
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
/// FINGERPRINT attribute: type (2), length (2), CRC (4).
const FINGERPRINT_ATTR_LEN: usize = 8;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const COOKIE: [u8; 4] = MAGIC_COOKIE.to_be_bytes();

/// A STUN transaction id.
pub type TxId = [u8; 12];

/// Why a datagram is not a Binding Request derpmesh answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header, top two bits set, or no magic cookie.
    NotStun,
    /// A STUN message, but not a Binding Request (a response, an indication, another method).
    NotBindingRequest,
    /// The header length is not the datagram length minus 20.
    BadLength,
    /// An attribute runs past the end of the message (padding included).
    MalformedAttrs,
    /// No SOFTWARE attribute `tailnode`: not a Tailscale client.
    WrongSoftware,
    /// The last attribute is not a 4-byte FINGERPRINT.
    NoFingerprint,
    /// The FINGERPRINT does not match the bytes before it.
    WrongFingerprint,
    /// (Responses) not a Binding Success, or no usable (XOR-)MAPPED-ADDRESS.
    NotSuccessResponse,
}

impl ParseError {
    /// Whether the datagram counts as `not_binding` (a well-formed STUN message of another kind)
    /// rather than `malformed`.
    pub fn is_not_binding(self) -> bool {
        self == ParseError::NotBindingRequest
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::NotStun => "not a STUN message",
            ParseError::NotBindingRequest => "STUN message is not a Binding Request",
            ParseError::BadLength => "STUN header length does not match the datagram",
            ParseError::MalformedAttrs => "STUN message has malformed attributes",
            ParseError::WrongSoftware => "STUN request did not come from Tailscale (no SOFTWARE tailnode)",
            ParseError::NoFingerprint => "STUN request does not end in a FINGERPRINT",
            ParseError::WrongFingerprint => "STUN request has a wrong FINGERPRINT",
            ParseError::NotSuccessResponse => "STUN message is not a Binding Success with a mapped address",
        })
    }
}

impl std::error::Error for ParseError {}

/// Whether `b` looks like a STUN message at all (Tailscale's `stun.Is`).
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0b1100_0000 == 0 && b[4..8] == COOKIE
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn tx_id(b: &[u8]) -> TxId {
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&b[8..HEADER_LEN]);
    tx
}

/// Walks the attributes of `b` (the message after its header), calling `f(type, value)` for each;
/// the value excludes the padding, which must be present. Returns the type of the last attribute.
fn for_each_attr(mut b: &[u8], mut f: impl FnMut(u16, &[u8])) -> Result<Option<u16>, ParseError> {
    let mut last = None;
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(ParseError::MalformedAttrs);
        }
        let typ = u16_at(b, 0);
        let len = u16_at(b, 2) as usize;
        let padded = (len + 3) & !3;
        b = &b[4..];
        if padded > b.len() {
            return Err(ParseError::MalformedAttrs);
        }
        f(typ, &b[..len]);
        last = Some(typ);
        b = &b[padded..];
    }
    Ok(last)
}

/// Parses a Binding Request from a Tailscale client and returns its transaction id.
pub fn parse_binding_request(b: &[u8]) -> Result<TxId, ParseError> {
    if !is_stun(b) {
        return Err(ParseError::NotStun);
    }
    if b[..2] != BINDING_REQUEST {
        return Err(ParseError::NotBindingRequest);
    }
    if u16_at(b, 2) as usize != b.len() - HEADER_LEN {
        return Err(ParseError::BadLength);
    }
    let mut software_ok = false;
    let mut last_len = 0;
    let last = for_each_attr(&b[HEADER_LEN..], |typ, value| {
        software_ok |= typ == ATTR_SOFTWARE && value == SOFTWARE;
        last_len = value.len();
    })?;
    if !software_ok {
        return Err(ParseError::WrongSoftware);
    }
    if last != Some(ATTR_FINGERPRINT) || last_len != 4 {
        return Err(ParseError::NoFingerprint);
    }
    // A 4-byte last attribute needs no padding: the FINGERPRINT is the final 8 bytes.
    let (covered, attr) = b.split_at(b.len() - FINGERPRINT_ATTR_LEN);
    let got = u32::from_be_bytes([attr[4], attr[5], attr[6], attr[7]]);
    if got != fingerprint(covered) {
        return Err(ParseError::WrongFingerprint);
    }
    Ok(tx_id(b))
}

/// Tailscale's Binding Request (`stun.Request`), byte for byte.
pub fn binding_request(tx: &TxId) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..2].copy_from_slice(&BINDING_REQUEST);
    b[2..4].copy_from_slice(&((REQUEST_LEN - HEADER_LEN) as u16).to_be_bytes());
    b[4..8].copy_from_slice(&COOKIE);
    b[8..20].copy_from_slice(tx);
    b[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b[22..24].copy_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    b[24..32].copy_from_slice(SOFTWARE);
    b[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&b[..REQUEST_LEN - FINGERPRINT_ATTR_LEN]);
    b[REQUEST_LEN - 4..].copy_from_slice(&fp.to_be_bytes());
    b
}

/// A Binding Success response (Tailscale's `stun.Response`), built on the stack.
#[derive(Clone, Copy)]
pub struct Response {
    buf: [u8; MAX_RESPONSE_LEN],
    len: usize,
}

impl Response {
    /// The answer to transaction `tx` telling the client it was seen at `addr`. The address is
    /// encoded as given: a v4-mapped IPv6 address stays IPv6 (family 2), as in Go; see
    /// [`unmap`].
    pub fn new(tx: &TxId, addr: SocketAddr) -> Response {
        let mut ip16 = [0u8; 16];
        let (family, ip): (u8, &[u8]) = match addr.ip() {
            IpAddr::V4(v4) => {
                ip16[..4].copy_from_slice(&v4.octets());
                (1, &ip16[..4])
            }
            IpAddr::V6(v6) => {
                ip16 = v6.octets();
                (2, &ip16[..])
            }
        };
        let attrs_len = 8 + ip.len();
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        buf[..2].copy_from_slice(&BINDING_SUCCESS);
        buf[2..4].copy_from_slice(&(attrs_len as u16).to_be_bytes());
        buf[4..8].copy_from_slice(&COOKIE);
        buf[8..20].copy_from_slice(tx);
        buf[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
        buf[22..24].copy_from_slice(&((4 + ip.len()) as u16).to_be_bytes());
        buf[24] = 0;
        buf[25] = family;
        buf[26..28].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
        for (i, o) in ip.iter().enumerate() {
            buf[28 + i] = o ^ xor_key(tx, i);
        }
        Response {
            buf,
            len: HEADER_LEN + attrs_len,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Response {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Response").field(&self.as_bytes()).finish()
    }
}

/// Byte `i` of the XOR key of an address: the magic cookie, then the transaction id.
fn xor_key(tx: &TxId, i: usize) -> u8 {
    if i < 4 {
        COOKIE[i]
    } else {
        tx[i - 4]
    }
}

/// An IPv4 client seen through a dual-stack socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Parses a Binding Success the way Tailscale's client does (`stun.ParseResponse`): the
/// XOR-MAPPED-ADDRESS (type 0x0020 or 0x8020) wins, MAPPED-ADDRESS is the fallback; a v4-mapped
/// address comes back as IPv4. For tests, probes and benchmarks; the relay itself only answers.
pub fn parse_response(b: &[u8]) -> Result<(TxId, SocketAddr), ParseError> {
    if !is_stun(b) {
        return Err(ParseError::NotStun);
    }
    let tx = tx_id(b);
    if b[..2] != BINDING_SUCCESS {
        return Err(ParseError::NotSuccessResponse);
    }
    let attrs_len = u16_at(b, 2) as usize;
    let attrs = &b[HEADER_LEN..];
    if attrs_len > attrs.len() {
        return Err(ParseError::MalformedAttrs);
    }
    let (mut xor, mut plain, mut bad) = (None, None, false);
    for_each_attr(&attrs[..attrs_len], |typ, value| match typ {
        ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => match mapped_address(value, Some(&tx)) {
            Some(a) => xor = Some(a),
            None => bad = true,
        },
        ATTR_MAPPED_ADDRESS => match mapped_address(value, None) {
            Some(a) => plain = Some(a),
            None => bad = true,
        },
        _ => {}
    })?;
    if bad {
        return Err(ParseError::MalformedAttrs);
    }
    xor.or(plain)
        .map(|a| (tx, unmap(a)))
        .ok_or(ParseError::NotSuccessResponse)
}

/// The value of a (XOR-)MAPPED-ADDRESS attribute: reserved (1), family (1), port (2), address.
fn mapped_address(b: &[u8], xor_tx: Option<&TxId>) -> Option<SocketAddr> {
    if b.len() < 4 {
        return None;
    }
    let ip_len = match b[1] {
        1 => 4,
        2 => 16,
        _ => return None,
    };
    let field = b.get(4..4 + ip_len)?;
    let mut port = u16_at(b, 2);
    let mut ip = [0u8; 16];
    ip[..ip_len].copy_from_slice(field);
    if let Some(tx) = xor_tx {
        port ^= (MAGIC_COOKIE >> 16) as u16;
        for (i, o) in ip[..ip_len].iter_mut().enumerate() {
            *o ^= xor_key(tx, i);
        }
    }
    let ip = if ip_len == 4 {
        IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(ip))
    };
    Some(SocketAddr::new(ip, port))
}

/// The answer to one datagram from `from`, as [`serve`] sends it (the address unmapped).
pub fn respond(datagram: &[u8], from: SocketAddr) -> Result<Response, ParseError> {
    let tx = parse_binding_request(datagram)?;
    Ok(Response::new(&tx, unmap(from)))
}

/// The STUN FINGERPRINT of `b` (RFC 5389 §15.5).
fn fingerprint(b: &[u8]) -> u32 {
    crc32(b) ^ FINGERPRINT_XOR
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as Go's `crc32.ChecksumIEEE`.
fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c = CRC32_TABLE[((c ^ x as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// What [`serve`] did with the datagrams it received. Plain counters, read with [`Self::snapshot`].
#[derive(Debug, Default)]
pub struct StunCounters {
    /// Binding Requests answered (the answer was handed to the socket).
    pub answered: AtomicU64,
    /// Datagrams dropped: not STUN, or a request Tailscale's parser would refuse (bad length or
    /// attributes, no SOFTWARE `tailnode`, no or a wrong FINGERPRINT).
    pub malformed: AtomicU64,
    /// Datagrams dropped: well-formed STUN, but not a Binding Request.
    pub not_binding: AtomicU64,
    /// Answers the socket refused to send.
    pub send_errors: AtomicU64,
    /// Receive errors (the socket stays open; derper counts these too).
    pub read_errors: AtomicU64,
}

/// The values of [`StunCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StunStats {
    pub answered: u64,
    pub malformed: u64,
    pub not_binding: u64,
    pub send_errors: u64,
    pub read_errors: u64,
}

impl StunCounters {
    pub fn snapshot(&self) -> StunStats {
        StunStats {
            answered: self.answered.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            not_binding: self.not_binding.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
        }
    }

    fn drop_counter(&self, e: ParseError) -> &AtomicU64 {
        if e.is_not_binding() {
            &self.not_binding
        } else {
            &self.malformed
        }
    }
}

/// Resolves once the flag is set, or once its sender is gone (which also means: stop).
async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Whether the flag is set or its sender gone, without waiting.
fn stopped(rx: &watch::Receiver<bool>) -> bool {
    rx.has_changed().is_err() || *rx.borrow()
}

/// After a receive error, wait this long before reading again, as derper does, so a broken socket
/// does not spin. Not after a reset or refusal: the ICMP error for an earlier answer to a client
/// that has gone, which Windows reports on the next receive.
const READ_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Answers every Binding Request from a Tailscale client that arrives on `socket` until `shutdown`
/// becomes `true` or its sender is dropped; everything else is dropped and counted. Never returns
/// an error: receive and send errors are counted and the loop goes on. The socket is closed when
/// this returns.
pub async fn serve(socket: UdpSocket, counters: Arc<StunCounters>, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; RECV_BUF_LEN];
    loop {
        // The datagram first: while one is ready, the shutdown future is never polled (polling it
        // registers a waiter, a lock per datagram); a cheap check of the flag takes its place.
        if stopped(&shutdown) {
            return;
        }
        let received = tokio::select! {
            biased;
            r = socket.recv_from(&mut buf) => r,
            _ = signalled(&mut shutdown) => return,
        };
        let (n, from) = match received {
            Ok(r) => r,
            Err(e) => {
                counters.read_errors.fetch_add(1, Relaxed);
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                ) {
                    tokio::select! {
                        _ = signalled(&mut shutdown) => return,
                        _ = tokio::time::sleep(READ_ERROR_PAUSE) => {}
                    }
                }
                continue;
            }
        };
        let response = match respond(&buf[..n], from) {
            Ok(r) => r,
            Err(e) => {
                counters.drop_counter(e).fetch_add(1, Relaxed);
                continue;
            }
        };
        let sent = tokio::select! {
            biased;
            r = socket.send_to(response.as_bytes(), from) => r,
            _ = signalled(&mut shutdown) => return,
        };
        match sent {
            Ok(_) => counters.answered.fetch_add(1, Relaxed),
            Err(_) => counters.send_errors.fetch_add(1, Relaxed),
        };
    }
}

/// A running STUN listener: the socket is bound when it is made (so a busy or forbidden address
/// is reported to the caller at once), served on the current tokio runtime until [`Self::stop`] or
/// drop.
pub struct Listener {
    local: SocketAddr,
    counters: Arc<StunCounters>,
    stop: watch::Sender<bool>,
}

impl Listener {
    /// Binds `address` and starts answering. Must be called inside a tokio runtime.
    pub fn bind(address: SocketAddr) -> io::Result<Listener> {
        let socket = std::net::UdpSocket::bind(address)?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let socket = UdpSocket::from_std(socket)?;
        let counters = Arc::new(StunCounters::default());
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(socket, counters.clone(), stopped));
        Ok(Listener { local, counters, stop })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> StunStats {
        self.counters.snapshot()
    }

    /// Stops answering; the socket closes once the serving task sees it.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Transaction id 0xa0, 0xa1, … 0xab, as in the Go vectors below.
    const TX: TxId = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab];

    // Printed by Go with tailscale.com@v1.102.5/net/stun, for the transaction id TX:
    //   stun.Request(TX)
    const GO_REQUEST: &str = "000100142112a442a0a1a2a3a4a5a6a7a8a9aaab802200087461696c6e6f64658028000428a54bbb";
    //   stun.Response(TX, 198.51.100.7:41641)
    const GO_RESPONSE_V4: &str = "0101000c2112a442a0a1a2a3a4a5a6a7a8a9aaab00200008000183bbe721c045";
    //   stun.Response(TX, [2001:db8::1234:5678]:41641)
    const GO_RESPONSE_V6: &str =
        "010100182112a442a0a1a2a3a4a5a6a7a8a9aaab00200014000283bb0113a9faa0a1a2a3a4a5a6a7ba9dfcd3";
    //   stun.Response(TX, [::ffff:198.51.100.7]:41641)
    const GO_RESPONSE_V4_IN_V6: &str =
        "010100182112a442a0a1a2a3a4a5a6a7a8a9aaab00200014000283bb2112a442a0a1a2a3a4a559586e9aceac";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Builds a request from attributes (type, value), padding each, with a correct length and
    /// (if `fp`) a correct FINGERPRINT at the end.
    fn request_with(attrs: &[(u16, &[u8])], fp: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&BINDING_REQUEST);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&COOKIE);
        b.extend_from_slice(&TX);
        for (typ, value) in attrs {
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&(value.len() as u16).to_be_bytes());
            b.extend_from_slice(value);
            b.resize((b.len() + 3) & !3, 0);
        }
        let fix_len = |b: &mut Vec<u8>, extra: usize| {
            let len = (b.len() + extra - HEADER_LEN) as u16;
            b[2..4].copy_from_slice(&len.to_be_bytes());
        };
        if fp {
            fix_len(&mut b, FINGERPRINT_ATTR_LEN);
            let crc = fingerprint(&b);
            b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
            b.extend_from_slice(&4u16.to_be_bytes());
            b.extend_from_slice(&crc.to_be_bytes());
        } else {
            fix_len(&mut b, 0);
        }
        b
    }

    #[test]
    fn crc32_known_answer() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn request_is_byte_for_byte_tailscales() {
        assert_eq!(binding_request(&TX).as_slice(), unhex(GO_REQUEST));
        assert_eq!(request_with(&[(ATTR_SOFTWARE, SOFTWARE)], true), unhex(GO_REQUEST));
        assert_eq!(parse_binding_request(&unhex(GO_REQUEST)), Ok(TX));
    }

    #[test]
    fn response_is_byte_for_byte_tailscales() {
        let cases = [
            ("198.51.100.7:41641", GO_RESPONSE_V4),
            ("[2001:db8::1234:5678]:41641", GO_RESPONSE_V6),
            ("[::ffff:198.51.100.7]:41641", GO_RESPONSE_V4_IN_V6),
        ];
        for (a, want) in cases {
            assert_eq!(Response::new(&TX, addr(a)).as_bytes(), unhex(want), "{a}");
        }
        assert_eq!(Response::new(&TX, addr("1.2.3.4:5")).as_bytes().len(), 32);
        assert_eq!(Response::new(&TX, addr("[::1]:5")).as_bytes().len(), MAX_RESPONSE_LEN);
    }

    #[test]
    fn round_trip_v4_and_v6() {
        for a in [
            "198.51.100.7:41641",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[2001:db8::1]:3478",
            "[::1]:1",
        ] {
            let from = addr(a);
            let tx: TxId = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ from.port() as u8);
            let resp = respond(&binding_request(&tx), from).unwrap();
            assert_eq!(parse_response(resp.as_bytes()), Ok((tx, from)), "{a}");
        }
        // An IPv4 client on a dual-stack socket is answered with family 1, its IPv4 address.
        let resp = respond(&binding_request(&TX), addr("[::ffff:198.51.100.7]:41641")).unwrap();
        assert_eq!(resp.as_bytes(), unhex(GO_RESPONSE_V4));
        // Go's v4-in-v6 answer reads back as IPv4 too (Tailscale's client unmaps).
        assert_eq!(
            parse_response(&unhex(GO_RESPONSE_V4_IN_V6)),
            Ok((TX, addr("198.51.100.7:41641")))
        );
    }

    #[test]
    fn other_attributes_are_skipped() {
        let req = request_with(
            &[(0x8023, b"x"), (ATTR_SOFTWARE, SOFTWARE), (0x0006, b"user:name")],
            true,
        );
        assert_eq!(parse_binding_request(&req), Ok(TX));
    }

    #[test]
    fn refusals() {
        let good = binding_request(&TX);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.to_vec();
            f(&mut b);
            parse_binding_request(&b)
        };
        use ParseError::*;
        assert_eq!(with(&|b| b[0] |= 0x80), Err(NotStun));
        assert_eq!(with(&|b| b[0] |= 0x40), Err(NotStun));
        assert_eq!(with(&|b| b[4] ^= 1), Err(NotStun));
        assert_eq!(
            with(&|b| b[..2].copy_from_slice(&BINDING_SUCCESS)),
            Err(NotBindingRequest)
        );
        assert_eq!(with(&|b| b[..2].copy_from_slice(&[0x00, 0x11])), Err(NotBindingRequest)); // indication
        assert_eq!(with(&|b| b[3] += 4), Err(BadLength));
        assert_eq!(with(&|b| b[3] -= 4), Err(BadLength));
        assert_eq!(with(&|b| b.extend_from_slice(&[0; 4])), Err(BadLength));
        assert_eq!(with(&|b| b[24] = b'T'), Err(WrongSoftware)); // "Tailnode"
        assert_eq!(with(&|b| b[39] ^= 1), Err(WrongFingerprint));
        assert_eq!(with(&|b| b[12] ^= 1), Err(WrongFingerprint)); // the fingerprint covers the tx id
        assert_eq!(with(&|b| b[23] = 17), Err(MalformedAttrs)); // SOFTWARE runs past the end
        assert_eq!(
            parse_binding_request(&request_with(&[(ATTR_SOFTWARE, SOFTWARE)], false)),
            Err(NoFingerprint)
        );
        assert_eq!(
            parse_binding_request(&request_with(&[(ATTR_SOFTWARE, b"tailnode2")], true)),
            Err(WrongSoftware)
        );
        assert_eq!(parse_binding_request(&request_with(&[], true)), Err(WrongSoftware));
        // FINGERPRINT not last.
        let mut b = request_with(&[(ATTR_SOFTWARE, SOFTWARE)], true);
        b.extend_from_slice(&[0x80, 0x23, 0, 0]);
        let len = (b.len() - HEADER_LEN) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse_binding_request(&b), Err(NoFingerprint));
        // A last FINGERPRINT of another length.
        let b = request_with(&[(ATTR_SOFTWARE, SOFTWARE), (ATTR_FINGERPRINT, &[0; 8])], false);
        assert_eq!(parse_binding_request(&b), Err(NoFingerprint));
    }

    #[test]
    fn every_truncation_is_refused() {
        let good = binding_request(&TX);
        for n in 0..good.len() {
            let e = parse_binding_request(&good[..n]).unwrap_err();
            let want = if n < HEADER_LEN {
                ParseError::NotStun
            } else {
                ParseError::BadLength
            };
            assert_eq!(e, want, "prefix of {n} bytes");
        }
        // Truncated with the length field made consistent: the attributes are then malformed.
        for n in HEADER_LEN + 1..good.len() {
            let mut b = good[..n].to_vec();
            b[2..4].copy_from_slice(&((n - HEADER_LEN) as u16).to_be_bytes());
            assert!(parse_binding_request(&b).is_err(), "prefix of {n} bytes, length fixed");
        }
    }

    /// xorshift64*: deterministic noise without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn fill(&mut self, b: &mut [u8]) {
            b.iter_mut().for_each(|x| *x = self.next() as u8);
        }
    }

    #[test]
    fn garbage_never_panics_and_is_refused() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let from = addr("[2001:db8::1]:1");
        let mut buf = vec![0u8; 2048];
        for i in 0..20_000 {
            let n = (rng.next() as usize) % buf.len();
            rng.fill(&mut buf[..n]);
            if i % 2 == 0 && n >= HEADER_LEN {
                // Make it look like STUN so the attribute walk is exercised too.
                buf[0] &= 0x3f;
                buf[4..8].copy_from_slice(&COOKIE);
                buf[..2].copy_from_slice(&BINDING_REQUEST);
                buf[2..4].copy_from_slice(&((n - HEADER_LEN) as u16).to_be_bytes());
            }
            assert!(respond(&buf[..n], from).is_err());
            let _ = parse_response(&buf[..n]);
        }
        // Every single-bit flip of a good request is refused (the FINGERPRINT covers the rest).
        let good = binding_request(&TX);
        for bit in 0..good.len() * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_binding_request(&b).is_err(), "bit {bit}");
        }
        // Byte-wise mutations of a good response never panic the client-side parser.
        let resp = Response::new(&TX, addr("[2001:db8::1]:1"));
        for i in 0..resp.as_bytes().len() {
            for v in [0u8, 1, 2, 0x7f, 0xff] {
                let mut b = resp.as_bytes().to_vec();
                b[i] = v;
                let _ = parse_response(&b);
                let _ = parse_response(&b[..i]);
            }
        }
    }

    #[test]
    fn oversize() {
        // The largest UDP payload (IPv4): garbage, and STUN-looking with an inconsistent length.
        let mut big = vec![0u8; 65_507];
        Rng(7).fill(&mut big);
        assert_eq!(parse_binding_request(&big), Err(ParseError::NotStun));
        big[..20].copy_from_slice(&binding_request(&TX)[..20]);
        assert_eq!(parse_binding_request(&big), Err(ParseError::BadLength));
        // A long but well-formed request (a 60 000-byte unknown attribute) is answered, as by Go.
        let filler = vec![0x5a; 60_000];
        let req = request_with(&[(0x8023, &filler), (ATTR_SOFTWARE, SOFTWARE)], true);
        assert_eq!(parse_binding_request(&req), Ok(TX));
        // Header length field is only 16 bits: a datagram with more than 65 535 bytes of attributes
        // cannot be consistent.
        let mut b = vec![0u8; HEADER_LEN + 65_536];
        b[..20].copy_from_slice(&binding_request(&TX)[..20]);
        b[2..4].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse_binding_request(&b), Err(ParseError::BadLength));
    }

    #[test]
    fn counters_classify() {
        let c = StunCounters::default();
        c.drop_counter(ParseError::NotBindingRequest).fetch_add(1, Relaxed);
        c.drop_counter(ParseError::NotStun).fetch_add(1, Relaxed);
        c.drop_counter(ParseError::WrongFingerprint).fetch_add(1, Relaxed);
        let s = c.snapshot();
        assert_eq!((s.not_binding, s.malformed, s.answered), (1, 2, 0));
    }

    async fn start_server(
        bind: &str,
    ) -> Option<(
        SocketAddr,
        Arc<StunCounters>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )> {
        let socket = UdpSocket::bind(bind).await.ok()?;
        let server = socket.local_addr().unwrap();
        let counters = Arc::new(StunCounters::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(socket, counters.clone(), stop_rx));
        Some((server, counters, stop, task))
    }

    async fn exchange(client: &UdpSocket, server: SocketAddr, tx: &TxId) -> (TxId, SocketAddr) {
        client.send_to(&binding_request(tx), server).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, src) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("no STUN answer within 5 s")
            .unwrap();
        assert_eq!(src, server);
        parse_response(&buf[..n]).unwrap()
    }

    #[tokio::test]
    async fn udp_loopback_v4() {
        let (server, counters, stop, task) = start_server("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Noise first: none of it is answered, all of it is counted.
        client.send_to(b"hello", server).await.unwrap();
        client
            .send_to(Response::new(&TX, addr("1.2.3.4:5")).as_bytes(), server)
            .await
            .unwrap();
        let mut bad = binding_request(&TX);
        bad[39] ^= 1;
        client.send_to(&bad, server).await.unwrap();
        client.send_to(&[], server).await.unwrap();
        let (tx, mapped) = exchange(&client, server, &TX).await;
        assert_eq!(tx, TX);
        assert_eq!(mapped, client.local_addr().unwrap());
        let (tx, _) = exchange(&client, server, &[7; 12]).await;
        assert_eq!(tx, [7; 12]);
        assert_eq!(
            counters.snapshot(),
            StunStats {
                answered: 2,
                malformed: 3,
                not_binding: 1,
                send_errors: 0,
                read_errors: 0
            }
        );
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn udp_loopback_v6_and_dual_stack() {
        // Skipped where the host has no IPv6 loopback.
        let Some((server, _counters, _stop, _task)) = start_server("[::1]:0").await else {
            eprintln!("no IPv6 loopback: skipped");
            return;
        };
        let client = UdpSocket::bind("[::1]:0").await.unwrap();
        let (_, mapped) = exchange(&client, server, &TX).await;
        assert_eq!(mapped, client.local_addr().unwrap());

        // A dual-stack socket answers an IPv4 client with its IPv4 address (family 1).
        let Some((server, _counters, _stop, _task)) = start_server("[::]:0").await else {
            return;
        };
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), server.port());
        client.send_to(&binding_request(&TX), server).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("no answer from the dual-stack socket")
            .unwrap();
        assert_eq!(n, 32, "IPv4 family expected");
        assert_eq!(parse_response(&buf[..n]).unwrap().1, client.local_addr().unwrap());
    }

    #[tokio::test]
    async fn stops_on_signal_or_dropped_sender() {
        let (_, _, stop, task) = start_server("127.0.0.1:0").await.unwrap();
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        // Under a flood: the flag is still seen between datagrams.
        let (server, counters, stop, task) = start_server("127.0.0.1:0").await.unwrap();
        let flood = tokio::spawn(async move {
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            loop {
                let _ = client.send_to(&binding_request(&TX), server).await;
                let _ = client.send_to(b"noise", server).await;
            }
        });
        while counters.snapshot().answered < 100 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        flood.abort();

        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_stop, rx) = watch::channel(true);
        tokio::time::timeout(Duration::from_secs(5), serve(socket, Arc::default(), rx))
            .await
            .expect("serve must return at once when already stopped");
    }

    /// Request rate over loopback: `STUN_BENCH_SENDERS` (default 8) client sockets, each keeping
    /// `STUN_BENCH_WINDOW` (default 4) requests in flight, for `STUN_BENCH_SECS` (default 3) s,
    /// against one `serve` task, or against `STUN_BENCH_SERVER` (host:port, e.g. derper's STUN port
    /// for a side-by-side run) when set. Run it in release mode:
    /// `cargo test --release -p derpmesh-relay stun::tests::bench_loopback_rate -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn bench_loopback_rate() {
        let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        let (senders, window, secs) = (
            env("STUN_BENCH_SENDERS", 8),
            env("STUN_BENCH_WINDOW", 4),
            env("STUN_BENCH_SECS", 3),
        );
        let external: Option<SocketAddr> = std::env::var("STUN_BENCH_SERVER").ok().map(|v| v.parse().unwrap());
        let (server, counters, stop, task) = match external {
            Some(a) => (a, Arc::default(), watch::channel(false).0, tokio::spawn(async {})),
            None => start_server("127.0.0.1:0").await.unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut clients = Vec::new();
        for s in 0..senders {
            clients.push(tokio::spawn(async move {
                let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let me = sock.local_addr().unwrap();
                let mut buf = [0u8; 64];
                let (mut got, mut lost) = (0u64, 0u64);
                let mut seq = 0u64;
                let next = |seq: &mut u64| {
                    *seq += 1;
                    let mut tx = [0u8; 12];
                    tx[..4].copy_from_slice(&(s as u32).to_be_bytes());
                    tx[4..].copy_from_slice(&seq.to_be_bytes());
                    binding_request(&tx)
                };
                for _ in 0..window {
                    sock.send_to(&next(&mut seq), server).await.unwrap();
                }
                while Instant::now() < deadline {
                    match tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await {
                        Ok(Ok((n, _))) => {
                            assert_eq!(parse_response(&buf[..n]).unwrap().1, me);
                            got += 1;
                        }
                        _ => lost += 1, // resend on a timeout: UDP may drop under load
                    }
                    sock.send_to(&next(&mut seq), server).await.unwrap();
                }
                (got, lost)
            }));
        }
        let t0 = Instant::now();
        let (mut got, mut lost) = (0, 0);
        for c in clients {
            let (g, l) = c.await.unwrap();
            got += g;
            lost += l;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let _ = stop.send(true);
        task.await.unwrap();
        let s = counters.snapshot();
        let target = external.map_or("serve".to_string(), |a| a.to_string());
        println!(
            "stun bench ({target}): {senders} senders x {window} in flight, {elapsed:.2} s: {got} answers = {:.0} req/s \
             (server answered {}, {lost} client timeouts, {} send errors)",
            got as f64 / elapsed,
            s.answered,
            s.send_errors
        );
        assert!(got > 0);
    }
}
