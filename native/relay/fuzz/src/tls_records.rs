//! `tlsio`'s record layer after the handshake: a reader under test (A) opens what a peer (B) sends,
//! and A's writer seals for B's reader. Both are real `tlsio` halves over in-memory transports,
//! made by `tlsio::pair_from_secrets` with swapped secrets (no handshake): B's writer seals data
//! and KeyUpdates with the real code, and control records (alerts, handshake messages, TLS 1.3
//! padding) with `TlsWriter::seal_record`; the script adds raw bytes and mutates B's records on
//! the wire (a flipped byte, a cut, a dropped record).
//!
//! Input: `cfg ‖ seed ‖ script`. `cfg`: bit 0 TLS 1.3 (else 1.2), bits 1–2 the AEAD (AES-128-GCM,
//! AES-256-GCM, ChaCha20-Poly1305), bit 3 session tickets taken (a client) or refused (a server),
//! bits 4–5 and 6–7 a record limit per key for A's and B's writer. `seed` drives the piece sizes
//! of every read and write (and `Pending`s). The script is a list of operations, each an opcode
//! byte (low nibble: the operation, high nibble: its variant) and its arguments:
//!
//! | op | what | arguments |
//! |---|---|---|
//! | 0, 11, 12 | B writes application data | length code |
//! | 1 | B sends KeyUpdate (bit 4: update_requested) and takes its next keys | |
//! | 2, 15 | B seals a control record | content type, padding code, length code, content |
//! | 3, 14 | B seals a handshake record of 1–4 messages (bits 4–5), with padding (bit 6) | per message: type, length, body; padding code |
//! | 4 | B seals an alert | level, description |
//! | 5 | raw bytes on the wire to A | length, bytes |
//! | 6 | B closes (close_notify) | |
//! | 7 | the next B operation's bytes are mutated | kind (flip, cut, drop), position (2 bytes), xor |
//! | 8, 13 | A writes application data in 1–4 slices (bits 4–5) | length code |
//! | 9 | A closes (close_notify) | |
//! | 10 | the wire to A ends (TCP end) | |
//!
//! Invariants, checked after every operation against a model of both sides: A's reader yields
//! exactly the plaintext of B's data records, in order, and nothing else; it ends exactly when the
//! model says and how: EOF at an authentic close_notify or a clean TCP end; `InvalidData` at the
//! first record that fails authentication (a flipped byte other than TLS 1.2's header version,
//! which its AEAD does not cover; a dropped record before it; keys out of step), has no or a wrong
//! content type, is over the size limits (RFC 8446 §5.4 and RFC 5246 §6.2: 2^14 bytes of
//! plaintext), is an empty handshake record (RFC 8446 §5.1), or carries a handshake message that
//! is truncated, spans records, is of a wrong type or length, is a KeyUpdate not at the end of its
//! record (§5.1), or is a session ticket where none is taken; `ConnectionAborted` at any other
//! authentic alert; after a raw or cut record, no more data and only `InvalidData` or
//! `UnexpectedEof`. After B's KeyUpdate, B's next keys open; a KeyUpdate(update_requested) makes
//! A's next write start with A's own KeyUpdate; a writer replaces its keys exactly when its record
//! limit is near (TLS 1.2: the write fails with `ConnectionAborted`). Every record either writer
//! puts out has the expected type and length, B's reader yields exactly what A wrote, and a reader
//! never offers its transport more room than two whole records, nor a writer more than one
//! write's records.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, ErrorKind, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use derpmesh_relay::tlsio::{pair_from_secrets, Aead, TlsReader, TlsWriter};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::common::{block_on, Rng};

const HEADER: usize = 5;
const TAG: usize = 16;
const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest record body tlsio reads (TLS 1.2's 2048 bytes of expansion).
const MAX_RECORD_BODY: usize = MAX_PLAINTEXT + 2048;
/// Plaintext one write call takes.
const MAX_WRITE_BATCH: usize = 4 * MAX_PLAINTEXT;
/// Room a reader may offer its transport at once: its buffer holds at most two whole records.
const READ_LIMIT: usize = 2 * (HEADER + MAX_RECORD_BODY);
/// Bytes a writer under test may hand its transport at once: one write's records (a KeyUpdate
/// and four full records).
const WRITE_LIMIT: usize = (HEADER + 5 + 1 + TAG) + 4 * (HEADER + 8 + MAX_PLAINTEXT + TAG + 1);

/// Plaintext an input may have sealed: two writes of several batches and a few records over the
/// limits. More reaches no new code, and costs executions.
const BUDGET: usize = 192 << 10;

const SECRET_A_TO_B: [u8; 32] = *b"derpmesh-fuzz-tls-secret-a-to-b!";
const SECRET_B_TO_A: [u8; 32] = *b"derpmesh-fuzz-tls-secret-b-to-a!";

/// Record limits per key for a writer (`None`: the AEAD's own, never reached here).
const LIMITS: [Option<u64>; 4] = [None, None, Some(8), Some(13)];

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_DATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

pub fn run(data: &[u8]) {
    let [cfg, seed, ref script @ ..] = *data else {
        return;
    };
    let tls13 = cfg & 1 != 0;
    let aead = [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::Chacha20Poly1305][usize::from(cfg >> 1 & 3) % 3];
    let tickets = cfg & 8 != 0;
    let config = Config {
        tls13,
        explicit_nonce: !tls13 && aead != Aead::Chacha20Poly1305,
        tickets,
    };
    let rng = Rng::new(u64::from(seed) << 8 | u64::from(cfg));
    block_on(Harness::new(config, aead, cfg, rng).run(Script(script)));
}

#[derive(Clone, Copy)]
struct Config {
    tls13: bool,
    /// TLS 1.2 AES-GCM: 8 bytes of explicit nonce before the ciphertext.
    explicit_nonce: bool,
    tickets: bool,
}

impl Config {
    /// A record's body for `plain` bytes of plaintext (TLS 1.3: plus the inner content type).
    fn body(&self, plain: usize) -> usize {
        match (self.tls13, self.explicit_nonce) {
            (true, _) => plain + 1 + TAG,
            (false, true) => 8 + plain + TAG,
            (false, false) => plain + TAG,
        }
    }
}

/// The script's bytes; missing arguments read as zeros.
struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    fn op(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn byte(&mut self) -> u8 {
        self.op().unwrap_or(0)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// A length: small ones as they are, then steps of 1500, then the sizes around a record's
    /// and a write's limits.
    fn length(&mut self) -> usize {
        const BIG: [usize; 16] = [
            16_383, 16_384, 16_385, 16_400, 18_400, 18_407, 18_408, 18_409, 18_415, 18_416, 18_417, 32_768, 65_535,
            65_536, 65_537, 81_920,
        ];
        match self.byte() {
            b @ 0..=0xbf => usize::from(b),
            b @ 0xc0..=0xef => usize::from(b - 0xbf) * 1500,
            b => BIG[usize::from(b - 0xf0)],
        }
    }

    /// TLS 1.3 padding: small amounts, then the amounts around the record limits.
    fn padding(&mut self) -> usize {
        const BIG: [usize; 16] = [
            256, 1024, 2000, 16_000, 16_366, 16_367, 16_368, 16_369, 16_383, 16_384, 18_000, 18_398, 18_399, 18_400,
            18_414, 18_415,
        ];
        match self.byte() {
            b @ 0..=0xef => usize::from(b),
            b => BIG[usize::from(b - 0xf0)],
        }
    }
}

/// Reads hand over what was pushed in pieces of random size (sometimes after a `Pending`), then
/// `Pending` until more comes, or EOF once closed.
#[derive(Clone)]
struct Pipe(Rc<RefCell<PipeState>>);

struct PipeState {
    data: Vec<u8>,
    at: usize,
    closed: bool,
    rng: Rng,
    pended: bool,
}

impl Pipe {
    fn new(rng: Rng) -> Pipe {
        Pipe(Rc::new(RefCell::new(PipeState {
            data: Vec::new(),
            at: 0,
            closed: false,
            rng,
            pended: false,
        })))
    }

    fn push(&self, bytes: &[u8]) {
        let mut s = self.0.borrow_mut();
        assert!(!s.closed, "bytes pushed after the end");
        s.data.extend_from_slice(bytes);
    }

    fn close(&self) {
        self.0.borrow_mut().closed = true;
    }

    fn closed(&self) -> bool {
        self.0.borrow().closed
    }

    /// Nothing to read now, and more may come.
    fn starved(&self) -> bool {
        let s = self.0.borrow();
        s.at == s.data.len() && !s.closed
    }
}

impl AsyncRead for Pipe {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = self.0.borrow_mut();
        assert!(
            buf.remaining() <= READ_LIMIT,
            "a reader offers {} bytes of room (limit {READ_LIMIT})",
            buf.remaining()
        );
        if !s.pended && s.rng.chance(8) {
            s.pended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        s.pended = false;
        let left = s.data.len() - s.at;
        if left == 0 {
            return if s.closed { Poll::Ready(Ok(())) } else { Poll::Pending };
        }
        let most = left.min(buf.remaining());
        let n = match s.rng.below(4) {
            0 => most,
            1 => most.min(1 + s.rng.below(8)),
            2 => most.min(1 + s.rng.below(512)),
            _ => most.min(1 + s.rng.below(20_000)),
        };
        let at = s.at;
        buf.put_slice(&s.data[at..at + n]);
        s.at += n;
        if s.at == s.data.len() {
            s.data.clear();
            s.at = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// A writer's transport: takes a random part of each write (sometimes after a `Pending`).
#[derive(Clone)]
struct Sink(Rc<RefCell<SinkState>>);

struct SinkState {
    out: Vec<u8>,
    rng: Rng,
    pended: bool,
    /// The most one write may hand over (the writer under test), or none.
    limit: Option<usize>,
}

impl Sink {
    fn new(rng: Rng, limit: Option<usize>) -> Sink {
        Sink(Rc::new(RefCell::new(SinkState {
            out: Vec::new(),
            rng,
            pended: false,
            limit,
        })))
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.borrow_mut().out)
    }
}

impl AsyncWrite for Sink {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = self.0.borrow_mut();
        if let Some(limit) = s.limit {
            assert!(
                buf.len() <= limit,
                "a writer hands over {} bytes at once (limit {limit})",
                buf.len()
            );
        }
        if !s.pended && s.rng.chance(8) {
            s.pended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        s.pended = false;
        let n = match s.rng.below(3) {
            0 => buf.len(),
            1 => buf.len().min(1 + s.rng.below(64)),
            _ => buf.len().min(1 + s.rng.below(20_000)),
        };
        s.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a sealed record carries.
#[derive(Clone, Debug)]
enum What {
    /// Application data: this range of the operation's bytes.
    Data(Range<usize>),
    /// A KeyUpdate sealed by the writer's own path (its keys move with it).
    KeyUpdate {
        requested: bool,
    },
    CloseNotify,
    /// `seal_record`: the writer's keys stay.
    Control {
        ct: u8,
        content: Vec<u8>,
        padding: usize,
    },
}

#[derive(Clone, Debug)]
struct Rec {
    what: What,
    /// The header's content type (TLS 1.3: always application data).
    outer: u8,
    body: usize,
}

/// One writer as `tlsio` should behave: records per key, KeyUpdates, its close.
struct WriterModel {
    config: Config,
    limit: Option<u64>,
    /// Records sealed with the current key.
    seq: u64,
    /// The peer asked for a KeyUpdate (only A's writer: B never gets a request).
    requested: bool,
    key_updates: u64,
    closed: bool,
}

impl WriterModel {
    fn new(config: Config, limit: Option<u64>) -> WriterModel {
        WriterModel {
            config,
            limit,
            seq: 0,
            requested: false,
            key_updates: 0,
            closed: false,
        }
    }

    fn rec(&mut self, what: What, ct: u8, plain: usize) -> Rec {
        self.seq += 1;
        Rec {
            what,
            outer: if self.config.tls13 { CT_DATA } else { ct },
            body: self.config.body(plain),
        }
    }

    fn key_update(&mut self, requested: bool) -> Rec {
        let rec = self.rec(What::KeyUpdate { requested }, CT_HANDSHAKE, 5);
        self.seq = 0;
        self.key_updates += 1;
        rec
    }

    /// A whole write of `len` bytes: write calls of up to one batch, each first replacing the
    /// key if asked or worn. The records sealed, and how the write ends.
    fn write(&mut self, len: usize) -> (Vec<Rec>, Result<(), ErrorKind>) {
        let mut recs = Vec::new();
        if len == 0 {
            // write_all of nothing calls no write.
            return (recs, Ok(()));
        }
        if self.closed {
            return (recs, Err(ErrorKind::BrokenPipe));
        }
        let mut at = 0;
        while at < len {
            let requested = std::mem::take(&mut self.requested);
            // A call seals up to 4 records, and the key must last for a KeyUpdate and a close.
            let worn = self.limit.is_some_and(|l| self.seq + 4 + 2 >= l);
            if requested || worn {
                if !self.config.tls13 {
                    return (recs, Err(ErrorKind::ConnectionAborted));
                }
                recs.push(self.key_update(false));
            }
            let n = (len - at).min(MAX_WRITE_BATCH);
            let end = at + n;
            while at < end {
                let m = (end - at).min(MAX_PLAINTEXT);
                recs.push(self.rec(What::Data(at..at + m), CT_DATA, m));
                at += m;
            }
        }
        (recs, Ok(()))
    }

    fn close(&mut self) -> Vec<Rec> {
        if std::mem::replace(&mut self.closed, true) {
            return Vec::new();
        }
        vec![self.rec(What::CloseNotify, CT_ALERT, 2)]
    }

    fn control(&mut self, ct: u8, content: &[u8], padding: usize) -> Rec {
        let plain = if self.config.tls13 {
            content.len() + padding
        } else {
            content.len()
        };
        let what = What::Control {
            ct,
            content: content.to_vec(),
            padding,
        };
        self.rec(what, ct, plain)
    }
}

/// What becomes of one of B's records on its way to A.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Intact,
    /// A flipped byte the AEAD covers: the record fails authentication.
    Fails,
    /// Cut, or its length changed: the framing from here on is the fuzzer's.
    Poison,
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Every record so far was B's, whole, in step with A's keys.
    Open,
    /// A's keys and B's no longer match (a record dropped, or a KeyUpdate B did not make): B's
    /// next record fails.
    Desync,
    /// Bytes not of B's records reached A: the reader must end with an error, with no more data.
    Poisoned,
    Ended(Result<(), ErrorKind>),
}

/// A's reader as `tlsio` (and the RFCs) say it behaves.
struct ReaderModel {
    config: Config,
    state: State,
    /// Plaintext A's reader should yield, from the last check on.
    want: Vec<u8>,
}

fn invalid() -> State {
    State::Ended(Err(ErrorKind::InvalidData))
}

impl ReaderModel {
    fn deliver(&mut self, rec: &Rec, data: &[u8], fate: Fate, a: &mut WriterModel) {
        self.state = match (self.state, fate) {
            (State::Ended(_) | State::Poisoned, _) => return,
            (_, Fate::Poison) => State::Poisoned,
            (State::Desync, Fate::Dropped) | (State::Open, Fate::Dropped) => State::Desync,
            (State::Desync, _) | (State::Open, Fate::Fails) => invalid(),
            (State::Open, Fate::Intact) => self.open(rec, data, a),
        };
    }

    /// An authentic record, whole and in step.
    fn open(&mut self, rec: &Rec, data: &[u8], a: &mut WriterModel) -> State {
        if rec.body > MAX_RECORD_BODY {
            return invalid();
        }
        match &rec.what {
            What::Data(range) => {
                self.want.extend_from_slice(&data[range.clone()]);
                State::Open
            }
            What::KeyUpdate { requested } => {
                a.requested |= requested;
                State::Open
            }
            What::CloseNotify => State::Ended(Ok(())),
            What::Control { ct, content, padding } => self.control(*ct, content, *padding, a),
        }
    }

    fn control(&mut self, ct: u8, content: &[u8], padding: usize, a: &mut WriterModel) -> State {
        let inner;
        let (typ, content) = if self.config.tls13 {
            let mut v = content.to_vec();
            v.push(ct);
            v.resize(v.len() + padding, 0);
            inner = v;
            // TLSInnerPlaintext is at most 2^14 + 1 bytes (RFC 8446 §5.4).
            if inner.len() > MAX_PLAINTEXT + 1 {
                return invalid();
            }
            let Some(at) = inner.iter().rposition(|&b| b != 0) else {
                return invalid();
            };
            (inner[at], &inner[..at])
        } else {
            // TLSPlaintext.fragment is at most 2^14 bytes (RFC 5246 §6.2.1).
            if content.len() > MAX_PLAINTEXT {
                return invalid();
            }
            (ct, content)
        };
        match typ {
            CT_DATA => {
                self.want.extend_from_slice(content);
                State::Open
            }
            CT_ALERT if content.len() == 2 && content[1] == 0 => State::Ended(Ok(())),
            CT_ALERT => State::Ended(Err(ErrorKind::ConnectionAborted)),
            CT_HANDSHAKE if self.config.tls13 => self.handshake(content, a),
            _ => invalid(),
        }
    }

    /// Post-handshake messages of TLS 1.3, each whole in the record.
    fn handshake(&mut self, mut d: &[u8], a: &mut WriterModel) -> State {
        // No zero-length handshake records (RFC 8446 §5.1).
        if d.is_empty() {
            return invalid();
        }
        let mut state = State::Open;
        while !d.is_empty() {
            if d.len() < 4 {
                return invalid();
            }
            let len = u32::from_be_bytes([0, d[1], d[2], d[3]]) as usize;
            if d.len() < 4 + len {
                return invalid();
            }
            let (typ, body) = (d[0], &d[4..4 + len]);
            d = &d[4 + len..];
            match typ {
                HS_KEY_UPDATE if len == 1 && body[0] <= 1 => {
                    // A key change ends its record (RFC 8446 §5.1).
                    if !d.is_empty() {
                        return invalid();
                    }
                    a.requested |= body[0] == 1;
                    // A's keys move, B's do not.
                    state = State::Desync;
                }
                HS_NEW_SESSION_TICKET if self.config.tickets => {}
                _ => return invalid(),
            }
        }
        state
    }
}

/// How the next B operation's bytes are changed on the wire.
#[derive(Clone, Copy)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Cut { at: usize },
    Drop,
}

/// Reads from `reader` until it wants bytes the pipe does not have (`None`), or ends.
async fn pump<R: AsyncRead + Unpin>(
    reader: &mut R,
    pipe: &Pipe,
    got: &mut Vec<u8>,
    space: &mut [u8],
    rng: &mut Rng,
) -> Option<Result<(), ErrorKind>> {
    poll_fn(|cx| loop {
        let n = match rng.below(4) {
            0 => 1 + rng.below(16),
            1 => 1 + rng.below(2048),
            _ => space.len(),
        };
        let mut out = ReadBuf::new(&mut space[..n]);
        match Pin::new(&mut *reader).poll_read(cx, &mut out) {
            Poll::Ready(Ok(())) if out.filled().is_empty() => return Poll::Ready(Some(Ok(()))),
            Poll::Ready(Ok(())) => got.extend_from_slice(out.filled()),
            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.kind()))),
            Poll::Pending if pipe.starved() => return Poll::Ready(None),
            Poll::Pending => {}
        }
    })
    .await
}

/// Bytes of a data write: a running pattern, so that no two writes carry the same bytes.
fn pattern(counter: &mut u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        *counter += 1;
        v.extend_from_slice(&counter.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The records in `out`, checked against what the writer should have sealed: each header's
/// type, version and length. Returns each record's byte range.
fn check_records(out: &[u8], recs: &[Rec], who: &str) -> Vec<Range<usize>> {
    let mut at = 0;
    let mut ranges = Vec::with_capacity(recs.len());
    for (i, rec) in recs.iter().enumerate() {
        assert!(
            out.len() >= at + HEADER,
            "{who}: {} bytes where record {i} of {} ({rec:?}) starts",
            out.len(),
            recs.len()
        );
        let len = usize::from(u16::from_be_bytes([out[at + 3], out[at + 4]]));
        assert_eq!(
            (out[at], out[at + 1], out[at + 2], len),
            (rec.outer, 3, 3, rec.body),
            "{who}: header of record {i} ({rec:?})"
        );
        ranges.push(at..at + HEADER + len);
        at += HEADER + len;
    }
    assert_eq!(at, out.len(), "{who}: bytes after the expected {} records", recs.len());
    ranges
}

struct Harness {
    config: Config,
    a_reader: TlsReader<Pipe>,
    a_writer: TlsWriter<Sink>,
    b_reader: TlsReader<Pipe>,
    b_writer: TlsWriter<Sink>,
    /// B's bytes to A, and A's to B.
    to_a: Pipe,
    to_b: Pipe,
    a_out: Sink,
    b_out: Sink,
    a_model: WriterModel,
    b_model: WriterModel,
    reader_a: ReaderModel,
    /// A's reader ended (and how).
    a_end: Option<Result<(), ErrorKind>>,
    /// What A's reader yielded since the last check, and before it.
    a_got: Vec<u8>,
    a_checked: usize,
    /// What A wrote and B's reader yielded since the last check, and B's reader's end.
    b_want: Vec<u8>,
    b_got: Vec<u8>,
    b_end: Option<Result<(), ErrorKind>>,
    mutation: Option<Mutation>,
    rng: Rng,
    counter: u64,
    /// Bytes of data and control records the script may still ask for.
    budget: usize,
    space: Vec<u8>,
}

impl Harness {
    fn new(config: Config, aead: Aead, cfg: u8, mut rng: Rng) -> Harness {
        let to_a = Pipe::new(Rng::new(rng.next_u64()));
        let to_b = Pipe::new(Rng::new(rng.next_u64()));
        let a_out = Sink::new(Rng::new(rng.next_u64()), Some(WRITE_LIMIT));
        let b_out = Sink::new(Rng::new(rng.next_u64()), None);
        let (a_reader, mut a_writer) = pair_from_secrets(
            to_a.clone(),
            a_out.clone(),
            config.tls13,
            aead,
            SECRET_B_TO_A,
            SECRET_A_TO_B,
            config.tickets,
        );
        let (b_reader, mut b_writer) = pair_from_secrets(
            to_b.clone(),
            b_out.clone(),
            config.tls13,
            aead,
            SECRET_A_TO_B,
            SECRET_B_TO_A,
            false,
        );
        let (limit_a, limit_b) = (LIMITS[usize::from(cfg >> 4 & 3)], LIMITS[usize::from(cfg >> 6)]);
        if let Some(l) = limit_a {
            a_writer.set_record_limit(l);
        }
        if let Some(l) = limit_b {
            b_writer.set_record_limit(l);
        }
        Harness {
            config,
            a_reader,
            a_writer,
            b_reader,
            b_writer,
            to_a,
            to_b,
            a_out,
            b_out,
            a_model: WriterModel::new(config, limit_a),
            b_model: WriterModel::new(config, limit_b),
            reader_a: ReaderModel {
                config,
                state: State::Open,
                want: Vec::new(),
            },
            a_end: None,
            a_got: Vec::new(),
            a_checked: 0,
            b_want: Vec::new(),
            b_got: Vec::new(),
            b_end: None,
            mutation: None,
            rng,
            counter: 0,
            budget: BUDGET,
            space: vec![0u8; 40 << 10],
        }
    }

    /// `len` within the budget left, which it uses up.
    fn budget(&mut self, len: usize) -> usize {
        let len = len.min(self.budget);
        self.budget -= len;
        len
    }

    async fn run(mut self, mut script: Script<'_>) {
        while let Some(op) = script.op() {
            let variant = op >> 4;
            match op & 15 {
                0 | 11 | 12 => {
                    let len = self.budget(script.length());
                    let data = pattern(&mut self.counter, len);
                    let (recs, want) = self.b_model.write(len);
                    let got = self.b_writer.write_all(&data).await;
                    assert_eq!(got.map_err(|e| e.kind()), want, "B's write of {len} bytes");
                    self.b_sent(&recs, &data).await;
                }
                1 => {
                    let requested = variant & 1 != 0;
                    let got = self.b_writer.send_key_update(requested);
                    if self.config.tls13 {
                        got.expect("a TLS 1.3 KeyUpdate");
                        let rec = self.b_model.key_update(requested);
                        self.b_sent(&[rec], &[]).await;
                    } else {
                        assert_eq!(got.expect_err("a TLS 1.2 KeyUpdate").kind(), ErrorKind::InvalidInput);
                    }
                }
                2 | 15 => {
                    let ct = script.byte();
                    let padding = script.padding();
                    // Up to 20,000 bytes: with the most padding, a body under 64 KiB.
                    let len = self.budget(script.length().min(20_000));
                    let mut content = script.take(len).to_vec();
                    if content.len() < len {
                        content.extend(pattern(&mut self.counter, len - content.len()));
                    }
                    self.b_control(ct, &content, padding).await;
                }
                3 | 14 => {
                    let mut content = Vec::new();
                    for _ in 0..=variant & 3 {
                        let typ = script.byte();
                        let len = script.byte();
                        let body = script.take(usize::from(len));
                        let len = (body.len() as u32).to_be_bytes();
                        content.extend_from_slice(&[typ, len[1], len[2], len[3]]);
                        content.extend_from_slice(body);
                    }
                    let padding = if variant & 4 != 0 { script.padding() } else { 0 };
                    self.b_control(CT_HANDSHAKE, &content, padding).await;
                }
                4 => {
                    let alert = [script.byte(), script.byte()];
                    self.b_control(CT_ALERT, &alert, 0).await;
                }
                5 => {
                    let len = script.byte();
                    let raw = script.take(usize::from(len));
                    if !raw.is_empty() && !self.to_a.closed() {
                        self.to_a.push(raw);
                        if matches!(self.reader_a.state, State::Open | State::Desync) {
                            self.reader_a.state = State::Poisoned;
                        }
                    }
                }
                6 => {
                    self.b_writer.shutdown().await.expect("B's close");
                    let recs = self.b_model.close();
                    self.b_sent(&recs, &[]).await;
                }
                7 => {
                    let kind = script.byte();
                    let at = usize::from(u16::from_be_bytes([script.byte(), script.byte()]));
                    let xor = script.byte();
                    self.mutation = Some(match kind % 3 {
                        0 => Mutation::Flip {
                            at,
                            xor: if xor == 0 { 0x80 } else { xor },
                        },
                        1 => Mutation::Cut { at },
                        _ => Mutation::Drop,
                    });
                }
                8 | 13 => {
                    let len = self.budget(script.length());
                    self.a_write(len, 1 + usize::from(variant & 3)).await;
                }
                9 => {
                    self.a_writer.shutdown().await.expect("A's close");
                    let recs = self.a_model.close();
                    self.a_sent(&recs, &[]).await;
                }
                _ => {
                    self.to_a.close();
                    self.pump_a().await;
                }
            }
        }
        // The wires end: both readers must come to their end.
        self.to_a.close();
        self.pump_a().await;
        assert!(self.a_end.is_some(), "A's reader did not end with its wire");
        self.to_b.close();
        self.pump_b().await;
        assert_eq!(self.b_end, Some(Ok(())), "B's reader's end");
    }

    /// B sealed `recs` (data records are ranges of `data`): checks them, applies the pending
    /// mutation, puts them on A's wire, and reads what A's reader makes of them.
    async fn b_sent(&mut self, recs: &[Rec], data: &[u8]) {
        self.b_writer.flush().await.expect("B's flush");
        let mut out = self.b_out.take();
        let ranges = check_records(&out, recs, "B's writer");
        assert_eq!(self.b_writer.key_updates(), self.b_model.key_updates, "B's key updates");
        let mut fates = vec![Fate::Intact; recs.len()];
        // A record cut short ends A's wire: the connection broke there. (Were more of B's records
        // to follow, their bytes would complete the cut one, which opens if they happen to equal
        // the bytes cut off: authentic data the model could not foresee.)
        let mut wire_ends = false;
        let mutation = self.mutation.take();
        match mutation {
            _ if out.is_empty() => {}
            None => {}
            Some(Mutation::Drop) => {
                fates.fill(Fate::Dropped);
                out.clear();
            }
            Some(Mutation::Flip { at, xor }) => {
                let at = at % out.len();
                let i = ranges.iter().position(|r| r.contains(&at)).expect("a record");
                out[at] ^= xor;
                fates[i] = match at - ranges[i].start {
                    3 | 4 => Fate::Poison,
                    // TLS 1.2's additional data has a fixed version, not the header's.
                    1 | 2 if !self.config.tls13 => Fate::Intact,
                    _ => Fate::Fails,
                };
            }
            Some(Mutation::Cut { at }) => {
                let at = at % out.len();
                let i = ranges.iter().position(|r| r.contains(&at)).expect("a record");
                fates[i] = if at == ranges[i].start {
                    Fate::Dropped
                } else {
                    wire_ends = true;
                    Fate::Poison
                };
                for f in &mut fates[i + 1..] {
                    *f = Fate::Dropped;
                }
                out.truncate(at);
            }
        }
        if self.to_a.closed() {
            return;
        }
        for (rec, fate) in recs.iter().zip(fates) {
            self.reader_a.deliver(rec, data, fate, &mut self.a_model);
        }
        self.to_a.push(&out);
        if wire_ends {
            self.to_a.close();
        }
        self.pump_a().await;
    }

    async fn b_control(&mut self, ct: u8, content: &[u8], padding: usize) {
        let padding = if self.config.tls13 { padding } else { 0 };
        self.b_writer.seal_record(ct, content, padding);
        let rec = self.b_model.control(ct, content, padding);
        self.b_sent(&[rec], &[]).await;
    }

    /// Reads what A's reader yields now, and checks it and its end against the model.
    async fn pump_a(&mut self) {
        if self.a_end.is_none() {
            let end = pump(
                &mut self.a_reader,
                &self.to_a,
                &mut self.a_got,
                &mut self.space,
                &mut self.rng,
            )
            .await;
            self.a_end = end;
        }
        let model = &mut self.reader_a;
        if self.a_got != model.want {
            let same = self.a_got.iter().zip(&model.want).take_while(|(x, y)| x == y).count();
            panic!(
                "A's reader yielded {} more bytes, the model {} (first difference at {}; state {:?})",
                self.a_got.len(),
                model.want.len(),
                self.a_checked + same,
                model.state
            );
        }
        // Checked: only what comes next is compared next time.
        self.a_checked += self.a_got.len();
        self.a_got.clear();
        model.want.clear();
        let closed = self.to_a.closed();
        match (model.state, self.a_end) {
            (State::Open | State::Desync | State::Poisoned, None) => {}
            (State::Ended(want), None) => panic!("A's reader waits for more where it should have ended: {want:?}"),
            (State::Ended(want), Some(end)) => assert_eq!(end, want, "A's reader's end"),
            // A clean TCP end, with B's records all whole.
            (State::Open | State::Desync, Some(end)) => assert!(
                closed && end == Ok(()),
                "A's reader ended ({end:?}) in state {:?}, its wire {}",
                model.state,
                if closed { "ended" } else { "open" }
            ),
            // Only an error after bytes not of B's: a cut record at the end of the wire is one.
            (State::Poisoned, Some(end)) => assert!(
                end == Err(ErrorKind::InvalidData) || (closed && end == Err(ErrorKind::UnexpectedEof)),
                "A's reader ended {end:?} after bytes not of B's records, its wire {}",
                if closed { "ended" } else { "open" }
            ),
        }
    }

    /// A writes `len` bytes in write calls of `slices` slices each.
    async fn a_write(&mut self, len: usize, slices: usize) {
        let data = pattern(&mut self.counter, len);
        let (recs, want) = self.a_model.write(len);
        let mut at = 0;
        let mut result = Ok(());
        while at < len {
            let rest = &data[at..];
            let mut bufs = Vec::with_capacity(slices);
            let mut from = 0;
            for i in 0..slices {
                let to = if i + 1 == slices {
                    rest.len()
                } else {
                    from + self.rng.below(rest.len() - from + 1)
                };
                bufs.push(IoSlice::new(&rest[from..to]));
                from = to;
            }
            let writer = &mut self.a_writer;
            match poll_fn(|cx| Pin::new(&mut *writer).poll_write_vectored(cx, &bufs)).await {
                Ok(n) => {
                    assert_eq!(n, rest.len().min(MAX_WRITE_BATCH), "A's write call took {n} bytes");
                    at += n;
                }
                Err(e) => {
                    result = Err(e.kind());
                    break;
                }
            }
        }
        assert_eq!(result, want, "A's write of {len} bytes");
        self.a_sent(&recs, &data).await;
    }

    /// A sealed `recs`: checks them and its key updates, and reads them with B's reader.
    async fn a_sent(&mut self, recs: &[Rec], data: &[u8]) {
        self.a_writer.flush().await.expect("A's flush");
        let out = self.a_out.take();
        check_records(&out, recs, "A's writer");
        assert_eq!(self.a_writer.key_updates(), self.a_model.key_updates, "A's key updates");
        for rec in recs {
            if let What::Data(range) = &rec.what {
                self.b_want.extend_from_slice(&data[range.clone()]);
            }
        }
        self.to_b.push(&out);
        self.pump_b().await;
    }

    async fn pump_b(&mut self) {
        if self.b_end.is_none() {
            let end = pump(
                &mut self.b_reader,
                &self.to_b,
                &mut self.b_got,
                &mut self.space,
                &mut self.rng,
            )
            .await;
            self.b_end = end;
        }
        assert!(self.b_got == self.b_want, "B's reader yielded other bytes than A wrote");
        self.b_got.clear();
        self.b_want.clear();
        let want = if self.a_model.closed || self.to_b.closed() {
            Some(Ok(()))
        } else {
            None
        };
        assert_eq!(self.b_end, want, "B's reader's end");
    }
}
