//! TLS with the record layer in our hands.
//!
//! rustls does the handshake (its unbuffered API, so that nothing is read past what it was given)
//! and then hands over the traffic keys (`dangerous_into_kernel_connection`, the kTLS hand-off);
//! from there this module seals and opens records itself, as the kernel would with kTLS:
//!
//! - the connection splits into a read half and a write half that share no lock (tokio's split of
//!   a rustls stream locks one state machine for both directions, so a busy writer stalls the
//!   reader and the other way round);
//! - a write gathers many DERP frames into each record (up to 16 KiB) and many records into one
//!   syscall; records are sealed and opened in place, with no copy into and out of rustls' buffers;
//! - rustls keeps the key schedule: a TLS 1.3 KeyUpdate from the peer moves the read keys (and,
//!   when asked, ours too), our write keys move before their confidentiality limit, and a client
//!   gives rustls the session tickets it receives.
//!
//! TLS 1.2 (AES-GCM and ChaCha20-Poly1305) and TLS 1.3 (AES-GCM and ChaCha20-Poly1305) are
//! handled: every suite the configurations in `tls.rs` and `client.rs` allow.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use ring::aead;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const HEADER: usize = 5;
const TAG: usize = 16;
const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest record accepted: TLS 1.2 allows 2048 bytes of expansion (1.3: 256).
const MAX_RECORD_BODY: usize = MAX_PLAINTEXT + 2048;
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_DATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
/// Plaintext a write takes at once: several records sealed into one buffer, one syscall.
const MAX_WRITE_BATCH: usize = 4 * MAX_PLAINTEXT;
/// Ciphertext read buffer of an idle connection (grown to a whole record while one arrives).
const IDLE_READ: usize = 2 << 10;
/// The most a read buffer grows to: two whole records (one under way, room to read the next).
const MAX_READ_BUF: usize = 2 * (HEADER + MAX_RECORD_BODY);
/// Sealed bytes a writer keeps allocated once they are written (about one record); more is freed.
const KEEP_WRITE_BUF: usize = 32 << 10;
/// Records sealed with one AES-GCM key before it is replaced (RFC 8446 §5.5 allows 2^24.5).
const GCM_RECORD_LIMIT: u64 = 1 << 24;

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O during the TLS handshake: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
}

impl From<HandshakeError> for io::Error {
    /// A rustls error stays reachable through `get_ref` (as tokio-rustls reports it).
    fn from(e: HandshakeError) -> io::Error {
        match e {
            HandshakeError::Tls(e) => io::Error::new(io::ErrorKind::InvalidData, e),
            HandshakeError::Io(e) => e,
            HandshakeError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
        }
    }
}

/// The key schedule after the hand-off, for either side: rustls' (after a handshake), or
/// [`HashedKeys`] (a connection made by [`pair_from_secrets`]). Called on key updates and
/// session tickets only, never per record.
trait KeySchedule: Send {
    /// Our next write keys (TLS 1.3 KeyUpdate).
    fn update_tx(&mut self) -> io::Result<Cipher>;
    /// The peer's next write keys, after its KeyUpdate.
    fn update_rx(&mut self) -> io::Result<Cipher>;
    /// A NewSessionTicket message's body.
    fn new_session_ticket(&mut self, payload: &[u8]) -> io::Result<()>;
}

fn tls_error(e: rustls::Error) -> io::Error {
    invalid(format!("TLS: {e}"))
}

/// The cipher of the next TLS 1.3 traffic secret rustls made (sequence numbers start again at 0).
fn next_cipher(update: Result<(u64, ConnectionTrafficSecrets), rustls::Error>) -> io::Result<Cipher> {
    let (_, secrets) = update.map_err(tls_error)?;
    Cipher::new(0, secrets, Version::Tls13)
}

impl KeySchedule for KernelConnection<ServerConnectionData> {
    fn update_tx(&mut self) -> io::Result<Cipher> {
        next_cipher(self.update_tx_secret())
    }
    fn update_rx(&mut self) -> io::Result<Cipher> {
        next_cipher(self.update_rx_secret())
    }
    fn new_session_ticket(&mut self, _: &[u8]) -> io::Result<()> {
        Err(tls_error(rustls::Error::General(
            "a client sent a session ticket".into(),
        )))
    }
}

impl KeySchedule for KernelConnection<ClientConnectionData> {
    fn update_tx(&mut self) -> io::Result<Cipher> {
        next_cipher(self.update_tx_secret())
    }
    fn update_rx(&mut self) -> io::Result<Cipher> {
        next_cipher(self.update_rx_secret())
    }
    fn new_session_ticket(&mut self, payload: &[u8]) -> io::Result<()> {
        self.handle_new_session_ticket(payload).map_err(tls_error)
    }
}

/// The AEAD of a connection made by [`pair_from_secrets`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Aead {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Aead::Aes128Gcm => &aead::AES_128_GCM,
            Aead::Aes256Gcm => &aead::AES_256_GCM,
            Aead::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// The key schedule of a connection made by [`pair_from_secrets`]: each direction has a 32-byte
/// secret; its key is the secret's first bytes, its IV from SHA-256 of the secret, and a key
/// update replaces the secret with its SHA-256. Not TLS's schedule, but deterministic: two pairs
/// made with swapped secrets stay in step through any number of key updates.
struct HashedKeys {
    aead: Aead,
    version: Version,
    rx: [u8; 32],
    tx: [u8; 32],
    /// Session tickets are taken (a client's rustls stores them) or refused (a server's).
    tickets: bool,
}

impl HashedKeys {
    fn hash(label: &[u8], secret: &[u8; 32]) -> ring::digest::Digest {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(label);
        h.update(secret);
        h.finish()
    }

    fn cipher(&self, secret: &[u8; 32]) -> Cipher {
        let alg = self.aead.algorithm();
        let iv = Self::hash(b"derpmesh tlsio iv", secret);
        Cipher::with_key(0, alg, &secret[..alg.key_len()], &iv.as_ref()[..12], self.version)
            .expect("key and IV of the AEAD's lengths")
    }

    /// The secret after `secret` (TLS 1.3 only, as rustls refuses key updates of TLS 1.2).
    fn next(&self, secret: &[u8; 32]) -> io::Result<[u8; 32]> {
        if self.version == Version::Tls12 {
            return Err(invalid("TLS: TLS 1.2 has no key update"));
        }
        let mut next = [0u8; 32];
        next.copy_from_slice(Self::hash(b"derpmesh tlsio next", secret).as_ref());
        Ok(next)
    }
}

impl KeySchedule for HashedKeys {
    fn update_tx(&mut self) -> io::Result<Cipher> {
        self.tx = self.next(&self.tx)?;
        Ok(self.cipher(&self.tx))
    }
    fn update_rx(&mut self) -> io::Result<Cipher> {
        self.rx = self.next(&self.rx)?;
        Ok(self.cipher(&self.rx))
    }
    fn new_session_ticket(&mut self, _: &[u8]) -> io::Result<()> {
        if self.tickets {
            Ok(())
        } else {
            Err(invalid("TLS: a session ticket where none is taken"))
        }
    }
}

/// What both halves share: the key schedule and the peer's request for new write keys.
struct Shared {
    keys: Mutex<Box<dyn KeySchedule>>,
    /// The peer sent KeyUpdate(update_requested): our next write starts with one of ours.
    key_update_requested: AtomicBool,
}

impl Shared {
    fn keys(&self) -> std::sync::MutexGuard<'_, Box<dyn KeySchedule>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

/// One direction's record protection: AEAD key, IV and sequence number.
struct Cipher {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    version: Version,
    /// TLS 1.2 AES-GCM carries an explicit 8-byte nonce in each record.
    explicit_nonce: bool,
    /// Records this key may seal (AES-GCM's confidentiality limit).
    limit: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Cipher {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets, version: Version) -> io::Result<Cipher> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(invalid("TLS: negotiated cipher has no record layer here")),
        };
        Cipher::with_key(seq, alg, key.as_ref(), iv.as_ref(), version)
    }

    fn with_key(
        seq: u64,
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        version: Version,
    ) -> io::Result<Cipher> {
        let gcm = alg != &aead::CHACHA20_POLY1305;
        let key = aead::UnboundKey::new(alg, key).map_err(|_| invalid("TLS: bad traffic key"))?;
        let iv: [u8; 12] = iv.try_into().map_err(|_| invalid("TLS: bad IV length"))?;
        Ok(Cipher {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
            version,
            explicit_nonce: gcm && version == Version::Tls12,
            limit: if gcm { GCM_RECORD_LIMIT } else { u64::MAX },
        })
    }

    /// The IV with the sequence number XORed into its last 8 bytes.
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// TLS 1.2's additional data: sequence number, type, version, plaintext length.
    fn aad12(&self, content_type: u8, len: usize) -> [u8; 13] {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8] = content_type;
        aad[9..11].copy_from_slice(&[3, 3]);
        aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
        aad
    }

    /// Bytes a record adds before the plaintext (after the header), and after it.
    fn overhead(&self) -> (usize, usize) {
        match (self.version, self.explicit_nonce) {
            (Version::Tls13, _) => (0, 1 + TAG),
            (Version::Tls12, true) => (8, TAG),
            (Version::Tls12, false) => (0, TAG),
        }
    }

    /// Appends one record carrying `content_type` and the plaintext `fill` writes (`len` bytes).
    fn seal(&mut self, out: &mut Vec<u8>, content_type: u8, len: usize, fill: impl FnOnce(&mut [u8])) {
        let (pre, post) = self.overhead();
        let start = out.len();
        let body = pre + len + post;
        out.resize(start + HEADER + body, 0);
        let outer_type = if self.version == Version::Tls13 {
            CT_DATA
        } else {
            content_type
        };
        out[start..start + HEADER].copy_from_slice(&[outer_type, 3, 3, (body >> 8) as u8, body as u8]);
        let nonce = self.nonce();
        let text = start + HEADER + pre;
        fill(&mut out[text..text + len]);
        let sealed_len = match self.version {
            Version::Tls13 => {
                out[text + len] = content_type;
                len + 1
            }
            Version::Tls12 => len,
        };
        let (head, rest) = out[start..].split_at_mut(HEADER);
        let (explicit, rest) = rest.split_at_mut(pre);
        if self.explicit_nonce {
            explicit.copy_from_slice(&nonce[4..]);
        }
        let aad12;
        let aad: &[u8] = match self.version {
            Version::Tls13 => head,
            Version::Tls12 => {
                aad12 = self.aad12(content_type, len);
                &aad12
            }
        };
        let (text, tag_slot) = rest.split_at_mut(sealed_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(aad), text)
            .expect("record within AEAD limits");
        tag_slot[..TAG].copy_from_slice(tag.as_ref());
        self.seq += 1;
    }

    /// Opens the record `rec` (header and body) in place; returns the content type and the
    /// plaintext's range within `rec`.
    fn open(&mut self, rec: &mut [u8]) -> io::Result<(u8, std::ops::Range<usize>)> {
        let outer_type = rec[0];
        let (pre, _) = self.overhead();
        let body_len = rec.len() - HEADER;
        if body_len < pre + TAG {
            return Err(invalid("TLS: record too short"));
        }
        // Plaintext is at most 2^14 bytes (RFC 5246 §6.2.1), TLS 1.3's with its content type and
        // padding 2^14 + 1 (RFC 8446 §5.4): a longer record is refused before it is opened.
        let plain_max = match self.version {
            Version::Tls12 => MAX_PLAINTEXT,
            Version::Tls13 => MAX_PLAINTEXT + 1,
        };
        if body_len - pre - TAG > plain_max {
            return Err(invalid(format!(
                "TLS: record of {} bytes of plaintext exceeds the limit",
                body_len - pre - TAG
            )));
        }
        let mut nonce = self.nonce();
        if self.explicit_nonce {
            nonce[..4].copy_from_slice(&self.iv[..4]);
            nonce[4..].copy_from_slice(&rec[HEADER..HEADER + 8]);
        }
        let aad12;
        let (head, body) = rec.split_at_mut(HEADER);
        let aad: &[u8] = match self.version {
            Version::Tls13 => {
                if outer_type != CT_DATA {
                    return Err(invalid(format!("TLS: unexpected record type {outer_type}")));
                }
                head
            }
            Version::Tls12 => {
                aad12 = self.aad12(outer_type, body_len - pre - TAG);
                &aad12
            }
        };
        let plain_len = self
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut body[pre..],
            )
            .map_err(|_| invalid("TLS: record failed authentication"))?
            .len();
        self.seq += 1;
        let start = HEADER + pre;
        match self.version {
            Version::Tls12 => Ok((outer_type, start..start + plain_len)),
            Version::Tls13 => {
                // The inner content type is the last non-zero byte; zeros after it are padding.
                let inner = &body[pre..pre + plain_len];
                let Some(at) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(invalid("TLS: record without a content type"));
                };
                Ok((inner[at], start..start + at))
            }
        }
    }
}

/// The read half: opens records as the reader asks for bytes. `R` is the transport's read half:
/// TCP, except for connections made by [`pair_from_secrets`].
pub struct TlsReader<R = OwnedReadHalf> {
    tcp: R,
    cipher: Cipher,
    /// Ciphertext read but not yet opened.
    buf: BytesMut,
    /// An opened record; `plain` is the range of its plaintext not yet handed out.
    record: BytesMut,
    plain: std::ops::Range<usize>,
    /// The peer closed (close_notify or TCP end).
    eof: bool,
    shared: Arc<Shared>,
}

/// The write half: seals what it is given into records. `W` is the transport's write half: TCP,
/// except for connections made by [`pair_from_secrets`].
pub struct TlsWriter<W = OwnedWriteHalf> {
    tcp: W,
    cipher: Cipher,
    /// Sealed records not yet written; `out[written..]` is what is left.
    out: Vec<u8>,
    written: usize,
    shared: Arc<Shared>,
    closed: bool,
    /// Records per key instead of the cipher's limit (tests).
    record_limit: Option<u64>,
    key_updates: u64,
}

/// A TLS connection after its handshake.
pub struct TlsStream {
    reader: TlsReader,
    writer: TlsWriter,
    version: ProtocolVersion,
}

impl TlsStream {
    pub fn into_split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }

    pub fn protocol_version(&self) -> ProtocolVersion {
        self.version
    }
}

/// The unbuffered connection of either side, driven the same way.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &UnbufferedConnectionCommon<Self::Data>;
    #[allow(clippy::type_complexity)]
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn KeySchedule>), rustls::Error>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &UnbufferedConnectionCommon<ServerConnectionData> {
        self
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn KeySchedule>), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Box::new(kernel)))
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &UnbufferedConnectionCommon<ClientConnectionData> {
        self
    }
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn KeySchedule>), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Box::new(kernel)))
    }
}

/// Serves the handshake of a client connection. `config` must allow secret extraction.
pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<TlsStream, HandshakeError> {
    handshake(tcp, UnbufferedServerConnection::new(config)?).await
}

/// Makes the handshake with a server. `config` must allow secret extraction.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Result<TlsStream, HandshakeError> {
    handshake(tcp, UnbufferedClientConnection::new(config, name)?).await
}

async fn handshake<C: Unbuffered>(mut tcp: TcpStream, mut conn: C) -> Result<TlsStream, HandshakeError> {
    let mut incoming = BytesMut::with_capacity(8 << 10);
    let mut outgoing = vec![0u8; 4 << 10];
    let mut outgoing_len = 0;
    // Application data that arrived with the handshake's last flight (opened by rustls).
    let mut early_plain = BytesMut::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..]);
        let state = state?;
        let mut need_read = false;
        let mut done = false;
        match state {
            ConnectionState::EncodeTlsData(mut enc) => loop {
                match enc.encode(&mut outgoing[outgoing_len..]) {
                    Ok(n) => {
                        outgoing_len += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        outgoing.resize(outgoing_len + e.required_size, 0);
                    }
                    Err(EncodeError::AlreadyEncoded) => break,
                }
            },
            ConnectionState::TransmitTlsData(tx) => {
                tcp.write_all(&outgoing[..outgoing_len]).await?;
                outgoing_len = 0;
                tx.done();
            }
            ConnectionState::ReadTraffic(mut read) => {
                while let Some(record) = read.next_record() {
                    early_plain.extend_from_slice(record?.payload);
                }
            }
            ConnectionState::BlockedHandshake => need_read = true,
            ConnectionState::WriteTraffic(_) => {
                // A TLS 1.3 server may send before the client's Finished has arrived: wait for it.
                if conn.common().is_handshaking() {
                    need_read = true;
                } else {
                    done = true;
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => return Err(HandshakeError::Closed),
            _ => return Err(rustls::Error::General("unexpected early data".into()).into()),
        }
        incoming.advance(discard);
        if done {
            break;
        }
        if need_read {
            if incoming.capacity() - incoming.len() < 1024 {
                incoming.reserve(8 << 10);
            }
            if tcp.read_buf(&mut incoming).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        }
    }
    if outgoing_len > 0 {
        tcp.write_all(&outgoing[..outgoing_len]).await?;
    }
    let version = match conn.common().protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => Version::Tls13,
        Some(ProtocolVersion::TLSv1_2) => Version::Tls12,
        _ => return Err(rustls::Error::General("no TLS version negotiated".into()).into()),
    };
    let protocol = conn.common().protocol_version().expect("checked above");
    let (secrets, keys) = conn.into_kernel()?;
    let rx = Cipher::new(secrets.rx.0, secrets.rx.1, version)?;
    let tx = Cipher::new(secrets.tx.0, secrets.tx.1, version)?;
    let (r, w) = tcp.into_split();
    let (reader, writer) = halves(r, w, rx, tx, keys, incoming, early_plain);
    Ok(TlsStream {
        reader,
        writer,
        version: protocol,
    })
}

/// The two halves of a connection whose handshake is done: `buf` holds ciphertext read past the
/// handshake, `early_plain` application data that came with it.
fn halves<R, W>(
    read: R,
    write: W,
    rx: Cipher,
    tx: Cipher,
    keys: Box<dyn KeySchedule>,
    buf: BytesMut,
    early_plain: BytesMut,
) -> (TlsReader<R>, TlsWriter<W>) {
    let shared = Arc::new(Shared {
        keys: Mutex::new(keys),
        key_update_requested: AtomicBool::new(false),
    });
    let plain = 0..early_plain.len();
    let reader = TlsReader {
        tcp: read,
        cipher: rx,
        buf,
        record: early_plain,
        plain,
        eof: false,
        shared: shared.clone(),
    };
    let writer = TlsWriter {
        tcp: write,
        cipher: tx,
        out: Vec::new(),
        written: 0,
        shared,
        closed: false,
        record_limit: None,
        key_updates: 0,
    };
    (reader, writer)
}

/// A connection over any transport with its record keys given, no handshake (fuzzing and tests):
/// TLS 1.3 or 1.2 with `aead`, the read keys from the secret `rx`, the write keys from `tx`, and
/// the schedule of [`HashedKeys`] for key updates; session tickets are taken when `tickets`, as a
/// client takes them, and refused otherwise, as a server does. Two pairs made with swapped
/// secrets talk to each other.
#[doc(hidden)]
pub fn pair_from_secrets<R, W>(
    read: R,
    write: W,
    tls13: bool,
    aead: Aead,
    rx: [u8; 32],
    tx: [u8; 32],
    tickets: bool,
) -> (TlsReader<R>, TlsWriter<W>) {
    let version = if tls13 { Version::Tls13 } else { Version::Tls12 };
    let keys = HashedKeys {
        aead,
        version,
        rx,
        tx,
        tickets,
    };
    let (rx, tx) = (keys.cipher(&rx), keys.cipher(&tx));
    halves(
        read,
        write,
        rx,
        tx,
        Box::new(keys),
        BytesMut::with_capacity(IDLE_READ),
        BytesMut::new(),
    )
}

impl<R> TlsReader<R> {
    /// Length of the first record in `buf`, when it is all there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[3], self.buf[4]]) as usize;
        if len > MAX_RECORD_BODY {
            return Err(invalid(format!("TLS: record of {len} bytes exceeds the limit")));
        }
        Ok((self.buf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens the next whole record; control records (alerts, key updates, tickets) are handled
    /// here and leave `plain` empty.
    fn open_record(&mut self, len: usize) -> io::Result<()> {
        let mut rec = self.buf.split_to(len);
        let (content_type, range) = self.cipher.open(&mut rec)?;
        match content_type {
            CT_DATA => {
                self.record = rec;
                self.plain = range;
            }
            CT_ALERT => {
                let alert = &rec[range];
                // close_notify (warning level, description 0) ends the stream; any other alert is
                // an error from the peer.
                if alert.len() == 2 && alert[1] == 0 {
                    self.eof = true;
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("TLS: the peer sent alert {alert:?}"),
                    ));
                }
            }
            CT_HANDSHAKE if self.cipher.version == Version::Tls13 => self.handshake_messages(&rec[range])?,
            other => {
                return Err(invalid(format!(
                    "TLS: unexpected record of type {other} after the handshake"
                )))
            }
        }
        Ok(())
    }

    /// Post-handshake messages of TLS 1.3 (each whole within the record, as peers send them).
    fn handshake_messages(&mut self, mut data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            // RFC 8446 §5.1: no zero-length handshake records.
            return Err(invalid("TLS: empty handshake record"));
        }
        while !data.is_empty() {
            if data.len() < 4 {
                return Err(invalid("TLS: truncated handshake message"));
            }
            let len = u32::from_be_bytes([0, data[1], data[2], data[3]]) as usize;
            if data.len() < 4 + len {
                return Err(invalid("TLS: handshake message spans records"));
            }
            let (typ, body) = (data[0], &data[4..4 + len]);
            match typ {
                HS_KEY_UPDATE if len == 1 && body[0] <= 1 => {
                    // RFC 8446 §5.1: handshake messages do not span a key change, so a KeyUpdate
                    // ends its record.
                    if data.len() > 4 + len {
                        return Err(invalid("TLS: KeyUpdate not at the end of its record"));
                    }
                    self.cipher = self.shared.keys().update_rx()?;
                    if body[0] == 1 {
                        self.shared.key_update_requested.store(true, Ordering::Release);
                    }
                }
                HS_NEW_SESSION_TICKET => self.shared.keys().new_session_ticket(body)?,
                other => return Err(invalid(format!("TLS: unexpected handshake message {other}"))),
            }
            data = &data[4 + len..];
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for TlsReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(out.remaining());
                out.put_slice(&this.record[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    // Hand the record's memory back to the read buffer's allocation when possible.
                    this.record = BytesMut::new();
                    this.plain = 0..0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(len) = this.whole_record()? {
                this.open_record(len)?;
                continue;
            }
            // Read more: room for at least the rest of the record under way.
            let need = if this.buf.len() >= HEADER {
                HEADER + u16::from_be_bytes([this.buf[3], this.buf[4]]) as usize - this.buf.len()
            } else {
                HEADER - this.buf.len()
            };
            if this.buf.is_empty() && this.buf.capacity() > HEADER + MAX_RECORD_BODY {
                // Idle again after a burst: hand the big buffer back.
                this.buf = BytesMut::with_capacity(IDLE_READ);
            }
            if this.buf.capacity() - this.buf.len() < need.max(512) && !this.buf.try_reclaim(need.max(IDLE_READ)) {
                // No room behind the partial record either (or the allocation is shared): a new
                // buffer for twice the record under way, at most two whole records, with the
                // partial record copied over. (BytesMut::reserve would double the allocation with
                // the bytes already opened kept in front: up to four records while busy.)
                let size = (2 * (this.buf.len() + need)).clamp(IDLE_READ, MAX_READ_BUF);
                let mut fresh = BytesMut::with_capacity(size);
                fresh.extend_from_slice(&this.buf);
                this.buf = fresh;
            }
            let mut read = ReadBuf::uninit(this.buf.spare_capacity_mut());
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                if this.buf.is_empty() {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            // SAFETY: the read initialised the first n bytes of the spare capacity.
            unsafe { this.buf.set_len(this.buf.len() + n) };
        }
    }
}

impl<W: AsyncWrite + Unpin> TlsWriter<W> {
    /// Replaces the write keys every `records` records (tests: AES-GCM's real limit is 2^24).
    #[doc(hidden)]
    pub fn set_record_limit(&mut self, records: u64) {
        self.record_limit = Some(records);
    }

    /// How many times the write keys were replaced.
    pub fn key_updates(&self) -> u64 {
        self.key_updates
    }

    /// Writes sealed records until none are left, or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > KEEP_WRITE_BUF {
            // A burst is written: hand its buffer back, so a connection idle after a burst costs
            // no more than one that never had one (the next burst allocates again).
            self.out = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Seals a KeyUpdate (with `update_requested` as given) and moves to the next write keys, as
    /// before a key's limit (fuzzing and tests). The record goes out with the next write or flush.
    #[doc(hidden)]
    pub fn send_key_update(&mut self, update_requested: bool) -> io::Result<()> {
        if self.cipher.version == Version::Tls12 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS 1.2 has no key update"));
        }
        self.update_keys(update_requested)
    }

    /// Seals one record of `content_type` around `content` with the current write keys, and for
    /// TLS 1.3 `padding` zeros after the inner content type (fuzzing and tests: the control
    /// records a peer may send). The keys stay; the record goes out with the next write or flush.
    #[doc(hidden)]
    pub fn seal_record(&mut self, content_type: u8, content: &[u8], padding: usize) {
        let (pre, post) = self.cipher.overhead();
        let n = content.len();
        if self.cipher.version == Version::Tls12 || padding == 0 {
            assert!(pre + n + post <= u16::MAX as usize, "a record body over 64 KiB");
            self.cipher
                .seal(&mut self.out, content_type, n, |b| b.copy_from_slice(content));
        } else {
            // The inner plaintext content ‖ type ‖ zeros, sealed as content ‖ type ‖ zeros with
            // the last zero as its type.
            assert!(
                pre + n + padding + post <= u16::MAX as usize,
                "a record body over 64 KiB"
            );
            self.cipher.seal(&mut self.out, 0, n + padding, |b| {
                b[..n].copy_from_slice(content);
                b[n] = content_type;
                b[n + 1..].fill(0);
            });
        }
    }

    /// Seals a KeyUpdate with the current keys, then takes the next ones (TLS 1.3).
    fn update_keys(&mut self, update_requested: bool) -> io::Result<()> {
        self.cipher.seal(&mut self.out, CT_HANDSHAKE, 5, |b| {
            b.copy_from_slice(&[HS_KEY_UPDATE, 0, 0, 1, u8::from(update_requested)])
        });
        self.cipher = self.shared.keys().update_tx()?;
        self.key_updates += 1;
        Ok(())
    }

    /// Replaces our write keys (TLS 1.3 KeyUpdate) when the peer asked or the limit is near.
    fn maybe_update_keys(&mut self) -> io::Result<()> {
        let requested = self.shared.key_update_requested.swap(false, Ordering::AcqRel);
        let limit = self.record_limit.unwrap_or(self.cipher.limit);
        // A write seals at most this many records, plus a KeyUpdate and a close_notify.
        let worn = self.cipher.seq + (MAX_WRITE_BATCH / MAX_PLAINTEXT) as u64 + 2 >= limit;
        if !requested && !worn {
            return Ok(());
        }
        if self.cipher.version == Version::Tls12 {
            // TLS 1.2 has no key update: the connection ends before the key wears out.
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS 1.2: record limit of the key reached",
            ));
        }
        // KeyUpdate(update_not_requested), sealed with the old key.
        self.update_keys(false)
    }

    fn seal_from(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        let total: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_WRITE_BATCH);
        let mut taken = 0;
        let mut slice = 0;
        let mut offset = 0;
        while taken < total {
            let len = (total - taken).min(MAX_PLAINTEXT);
            self.cipher.seal(&mut self.out, CT_DATA, len, |mut dst| {
                while !dst.is_empty() {
                    let src = &bufs[slice][offset..];
                    let n = src.len().min(dst.len());
                    dst[..n].copy_from_slice(&src[..n]);
                    dst = &mut dst[n..];
                    offset += n;
                    if offset == bufs[slice].len() {
                        slice += 1;
                        offset = 0;
                    }
                }
            });
            taken += len;
        }
        total
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for TlsWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        this.maybe_update_keys()?;
        let n = this.seal_from(bufs);
        // Start writing now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            ready!(this.poll_drain(cx))?;
            // close_notify (warning, 0), then the TCP half-close.
            this.cipher
                .seal(&mut this.out, CT_ALERT, 2, |b| b.copy_from_slice(&[1, 0]));
            this.closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}
