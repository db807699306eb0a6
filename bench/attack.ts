// Attack benchmarks (issue 11, point 5): what legitimate traffic keeps while a derpmesh node is under
// attack, and how much memory the node holds meanwhile.
//
//   node dist/bench/attack.js [--connections 20000] [--receivers 1000] [--pairs 10] [--duration 10s]
//                             [--rate 500] [--crowd-pairs 100] [--crowd-rate 200] [--tls auto|on|off]
//                             [--scenarios flood,handshake,abuser,nonreaders] [--json out.json]
//
// Every scenario runs on a fresh derpmesh node (a child process, `--log-level warn`, one throwaway
// Postgres shared by the nodes one after the other) and measures the same legitimate load twice, side
// by side: N paced sender→receiver pairs (the Rust load generator, in this process) on the quiet node,
// then the same pairs while the attack runs. The pairs connect first; the attack starts once they are
// in and has a ramp to build up before the measured window opens (`--flood-ramp` for the flood, 2 s for
// the handshake flood and the abuser, 8 s for the non-readers). The attackers are child processes
// of this script (`--worker`), so their CPU is their own (read from /proc) and this process only runs
// the legitimate pairs. Reported per scenario: packets/s kept (attack / quiet), loss, RTT p50/p99,
// the node's VmRSS before / peak (sampled every 100 ms) / after, its refusal counters (deltas of
// /metrics), a few new clients' handshakes during the attack, and the CPU of the relay, the attackers
// and this process.
//
//   flood       connections opened and left mid-handshake (half an HTTP request head, or a whole
//               `Upgrade: DERP` head and then silence in the DERP handshake; over TLS, nothing or half a
//               TLS record), from 127.0.0.2, 127.0.0.3, … (not loopback's exempt 127.0.0.1), kept at
//               `--connections` open: a connection the node closes is replaced. Without and with the
//               accept limits (`--limit-flags`); plain, and with `--tls` a node serving TLS itself.
//   handshake   complete DERP handshakes as fast as possible (connect, handshake, close), from several
//               connections at once: handshakes/s per relay CPU-second, side by side with Tailscale's
//               derper (its pairs on derper).
//   abuser      one unpaced sender among `--crowd-pairs` paced pairs, without and with a per-client rate
//               limit set live for the cluster (`derpmesh config set client-rate-limit`).
//   nonreaders  `--receivers` clients that handshake and never read again, while senders send to them
//               (`--nonreader-rate` packets/s each); a receiver the relay drops is replaced.
//
// The target (issue 11): under each attack the legitimate pairs keep ≥ 95 % of the packets/s they get on
// a quiet node, and the node's memory stays bounded (reported). Exit code 0 whatever the verdict; 1 if
// the run itself failed.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { runLoad, type LoadReport } from '../src/bench.js';
import { parseDuration } from '../src/config.js';
import { native } from '../src/native.js';
import { freePort } from '../src/net.js';
import { parseBytes } from '../src/settings.js';
import { FrameType } from '../src/client/frame.js';
import {
  clientInfoFrame,
  handshakeBox,
  openServerInfo,
  parseServerKey,
  type HandshakeBox,
  type ServerInfo,
} from '../src/client/handshake.js';
import { startPostgres } from '../test/helpers/postgres.js';
import { hasOpenssl, makePrivateCa } from '../test/helpers/certs.js';
import { getUrl } from '../test/helpers/cluster.js';
import { cachedDerper } from '../test/helpers/derper.js';
import { cpuSeconds, fmtInt, fmtMs, fmtPct, formatTable, quantile, sleep } from './report.js';

const CLI = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const SELF = fileURLToPath(import.meta.url);
/** The issue's target: packets/s kept under attack, against the quiet node. */
const TARGET_KEPT = 0.95;
const READY_TIMEOUT_MS = 30_000;
/** How long the node may take to let go of the attack's connections before RSS "after" is read. */
const SETTLE_MS = 8_000;
/** New clients tried during each attack window, spread over it. */
const PROBES = 4;
const PROBE_TIMEOUT_MS = 5_000;
/** Every worker stops by itself after this, whatever happens to this process. */
const WORKER_MAX_MS = 120_000;

// ---------------------------------------------------------------------------------------------------
// Raw DERP over node:net, for the attackers that must do what the Rust client does not: hold a
// handshaken connection without reading, send to keys of our choosing.

const UPGRADE_HEAD = (host: string) => `GET /derp HTTP/1.1\r\nHost: ${host}\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n`;

interface DerpSocket {
  socket: Socket;
  serverKey: Buffer;
  serverInfo: ServerInfo;
}

/** Connects, upgrades and completes the DERP handshake as `privateKey`; plain HTTP only. */
function derpHandshake(host: string, port: number, privateKey: Buffer, timeoutMs = 10_000): Promise<DerpSocket> {
  const publicKey = native.publicKeyOf(privateKey);
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    socket.setNoDelay(true);
    let buf: Buffer = Buffer.alloc(0);
    let headDone = false;
    let serverKey: Buffer | undefined;
    let box: HandshakeBox | undefined;
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error('DERP handshake timed out')), timeoutMs);
    socket.once('connect', () => socket.write(UPGRADE_HEAD(`${host}:${port}`)));
    socket.once('error', fail);
    socket.once('close', () => fail(new Error('closed during the DERP handshake')));
    const onData = (chunk: Buffer) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      try {
        if (!headDone) {
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const status = buf.subarray(0, buf.indexOf('\r\n')).toString('latin1');
          if (!/^HTTP\/1\.1 101/.test(status)) throw new Error(`upgrade refused: ${status}`);
          headDone = true;
          buf = buf.subarray(end + 4);
        }
        while (buf.length >= 5) {
          const type = buf[0]!;
          const len = buf.readUInt32BE(1);
          if (buf.length < 5 + len) return;
          const payload = buf.subarray(5, 5 + len);
          buf = buf.subarray(5 + len);
          if (serverKey === undefined) {
            serverKey = parseServerKey(type, payload);
            box = handshakeBox(privateKey, serverKey);
            socket.write(clientInfoFrame(box, publicKey, { canAckPings: false, isProber: false }));
          } else {
            const serverInfo = openServerInfo(box!, type, payload);
            clearTimeout(timer);
            socket.off('data', onData);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            resolve({ socket, serverKey: serverKey, serverInfo });
            return;
          }
        }
      } catch (err) {
        fail(err as Error);
      }
    };
    socket.on('data', onData);
  });
}

// ---------------------------------------------------------------------------------------------------
// Workers: the attackers, each a child process of this script (`--worker <json>`). A worker prints one
// JSON line of its counters every 200 ms and a last one (`final: true`) when it stops: when its stdin
// closes, on SIGTERM, or after `maxMs`.

type WorkerConfig =
  | {
      kind: 'flood';
      host: string;
      port: number;
      localAddress: string;
      target: number;
      /** Connects pending at once, at most. */
      inflight: number;
      /** New connections per second, at most (a token bucket of a tenth of a second). */
      ratePerSec: number;
      /** `http`: half an HTTP head, or a whole DERP upgrade head and silence; `tls`: nothing, or half a TLS record. */
      mode: 'http' | 'tls';
      maxMs: number;
    }
  | { kind: 'handshake'; url: string; caFile?: string; loops: number; batch: number; maxMs: number }
  | { kind: 'abuser'; url: string; packetSize: number; warmupMs: number; durationMs: number; maxMs: number }
  | {
      kind: 'nonreaders';
      host: string;
      port: number;
      receivers: number;
      senders: number;
      /** Packets per second sent to each receiver. */
      ratePerReceiver: number;
      packetSize: number;
      /** Replacements of dropped receivers per second, at most. */
      reconnectPerSec: number;
      /** The receivers in python3, with this TCP_MAXSEG (0: the system's). */
      python: boolean;
      mss: number;
      maxMs: number;
    };

type Stats = Record<string, number | string | boolean | Record<string, number>>;

async function runWorker(config: WorkerConfig): Promise<void> {
  let stopping = false;
  const stopWaiters: (() => void)[] = [];
  const stopped = new Promise<void>((resolve) => stopWaiters.push(resolve));
  const stop = () => {
    if (stopping) return;
    stopping = true;
    for (const w of stopWaiters) w();
  };
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.resume();
  process.on('SIGTERM', stop);
  setTimeout(stop, config.maxMs).unref();
  const print = (stats: Stats, final = false) => process.stdout.write(JSON.stringify({ t: Date.now(), final, ...stats }) + '\n');

  let stats: () => Stats;
  let finish: () => Promise<void> = async () => {};
  switch (config.kind) {
    case 'flood':
      ({ stats, finish } = floodWorker(config, () => stopping));
      break;
    case 'handshake':
      ({ stats, finish } = handshakeWorker(config, () => stopping));
      break;
    case 'abuser':
      ({ stats, finish } = abuserWorker(config, stop));
      break;
    case 'nonreaders':
      ({ stats, finish } = nonreadersWorker(config, () => stopping));
      break;
  }
  const ticker = setInterval(() => print(stats()), 200);
  await stopped;
  clearInterval(ticker);
  await finish();
  print(stats(), true);
  process.exit(0);
}

function floodWorker(c: Extract<WorkerConfig, { kind: 'flood' }>, stopping: () => boolean) {
  const sockets = new Set<Socket>();
  const errors: Record<string, number> = {};
  let attempts = 0;
  let connected = 0;
  let closedByServer = 0;
  let pending = 0;
  let open = 0;
  let maxOpen = 0;
  let tokens = 0;
  let last = performance.now();
  let nextPort = 10_000 + Math.floor(Math.random() * 50_000);
  const partialHttp = 'GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n';
  const fullHttp = UPGRADE_HEAD('127.0.0.1');
  // A TLS handshake record header announcing 512 bytes, and the first few of them.
  const partialTls = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
  const openOne = () => {
    attempts++;
    pending++;
    const n = attempts;
    // The source port is ours to pick: bind() with port 0 searches the ephemeral range, which costs
    // the kernel ~0.3 ms per connection once thousands are open (connect() alone does not).
    nextPort = nextPort >= 64_999 ? 10_000 : nextPort + 1;
    const socket = connect({ host: c.host, port: c.port, localAddress: c.localAddress, localPort: nextPort });
    sockets.add(socket);
    let isOpen = false;
    socket.setTimeout(10_000, () => {
      if (!isOpen) {
        errors['connect-timeout'] = (errors['connect-timeout'] ?? 0) + 1;
        socket.destroy();
      }
    });
    socket.once('connect', () => {
      pending--;
      isOpen = true;
      connected++;
      open++;
      maxOpen = Math.max(maxOpen, open);
      socket.setTimeout(0);
      if (c.mode === 'http') socket.write(n % 2 === 0 ? partialHttp : fullHttp);
      else if (n % 2 === 0) socket.write(partialTls);
    });
    socket.on('data', () => {});
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const code = err.code ?? 'error';
      errors[code] = (errors[code] ?? 0) + 1;
    });
    socket.once('close', () => {
      sockets.delete(socket);
      if (isOpen) {
        open--;
        if (!stopping()) closedByServer++;
      } else pending--;
    });
  };
  const pump = setInterval(() => {
    if (stopping()) return;
    const now = performance.now();
    tokens = Math.min(c.ratePerSec / 10, tokens + ((now - last) / 1000) * c.ratePerSec);
    last = now;
    while (tokens >= 1 && open + pending < c.target && pending < c.inflight) {
      tokens--;
      openOne();
    }
  }, 5);
  return {
    stats: (): Stats => ({ attempts, connected, closedByServer, pending, open, maxOpen, errors }),
    finish: async () => {
      clearInterval(pump);
      for (const s of sockets) s.destroy();
    },
  };
}

function handshakeWorker(c: Extract<WorkerConfig, { kind: 'handshake' }>, stopping: () => boolean) {
  const ca = c.caFile ? readFileSync(c.caFile) : undefined;
  let handshakes = 0;
  let failedBatches = 0;
  let lastError = '';
  const loop = async () => {
    while (!stopping()) {
      try {
        handshakes += await native.holdClients(c.url, c.batch, 0, ca);
      } catch (err) {
        failedBatches++;
        lastError = (err as Error).message.slice(0, 200);
        await sleep(20);
      }
    }
  };
  const loops = Array.from({ length: c.loops }, loop);
  return {
    stats: (): Stats => ({ handshakes, failedBatches, lastError }),
    finish: async () => {
      await Promise.all(loops);
    },
  };
}

function abuserWorker(c: Extract<WorkerConfig, { kind: 'abuser' }>, stop: () => void) {
  let report: LoadReport | undefined;
  let error = '';
  const run = runLoad({ url: c.url, pairs: 1, packetSize: c.packetSize, warmupMs: c.warmupMs, durationMs: c.durationMs })
    .then((r) => (report = r))
    .catch((err: unknown) => (error = (err as Error).message))
    .finally(stop);
  return {
    stats: (): Stats => ({
      done: report !== undefined || error !== '',
      error,
      packetsPerSec: report?.packetsPerSec ?? 0,
      bytesPerSec: report ? (report.gbitPerSec * 1e9) / 8 : 0,
      lossRatio: report?.lossRatio ?? 0,
    }),
    finish: async () => {
      await run;
    },
  };
}

/**
 * The receivers of the non-reader attack, in Python when python3 exists: Node cannot set TCP_MAXSEG,
 * and on loopback (MTU 64 KiB) the kernel sizes a connection's send buffer for 64 KiB segments, so
 * each stalled receiver would soak up ~4 MB in the kernel before the relay noticed anything. With an
 * Ethernet-sized MSS (1448) the relay's socket gets the send buffer it would get on the internet.
 * Protocol on stdin: `connect SLOT HEX` (HEX: the ClientInfo frame, sealed in Node); on stdout: `up
 * SLOT`, `fail SLOT REASON`, `down SLOT` (a write failed: the relay closed it). After its handshake a
 * receiver never reads again; once a second it writes a NotePreferred frame, which is how it notices
 * that the relay has dropped it.
 */
const PYTHON_RECEIVERS = String.raw`
import socket, sys, threading, time
host, port, mss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
HEAD = ('GET /derp HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n' % (host, port)).encode()
NOTE = b'\x07\x00\x00\x00\x01\x00'
socks = {}
lock = threading.Lock()
stop = threading.Event()
def say(line):
    with lock:
        sys.stdout.write(line + '\n')
        sys.stdout.flush()
def recv_more(s, buf):
    d = s.recv(4096)
    if not d:
        raise Exception('closed during the handshake')
    return buf + d
def handshake(slot, frame):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mss > 0:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(HEAD + frame)
        buf = b''
        while b'\r\n\r\n' not in buf:
            buf = recv_more(s, buf)
        if not buf.startswith(b'HTTP/1.1 101'):
            raise Exception(buf.split(b'\r\n')[0].decode('latin1'))
        buf = buf[buf.index(b'\r\n\r\n') + 4:]
        for _ in range(2):  # ServerKey, ServerInfo
            while len(buf) < 5 or len(buf) < 5 + int.from_bytes(buf[1:5], 'big'):
                buf = recv_more(s, buf)
            buf = buf[5 + int.from_bytes(buf[1:5], 'big'):]
        s.setblocking(False)
        with lock:
            socks[slot] = s
        say('up %d' % slot)
    except Exception as e:
        s.close()
        say('fail %d %s' % (slot, str(e).replace(' ', '_')[:120]))
def commands():
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 3 and parts[0] == 'connect':
            handshake(int(parts[1]), bytes.fromhex(parts[2]))
    stop.set()
threading.Thread(target=commands, daemon=True).start()
while not stop.wait(1.0):
    with lock:
        items = list(socks.items())
    for slot, s in items:
        try:
            s.send(NOTE)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            with lock:
                socks.pop(slot, None)
            say('down %d' % slot)
`;

function hasPython(): boolean {
  try {
    execFileSync('python3', ['-c', 'import socket; socket.TCP_MAXSEG'], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

function nonreadersWorker(c: Extract<WorkerConfig, { kind: 'nonreaders' }>, stopping: () => boolean) {
  interface Slot {
    key: Buffer;
    alive: boolean;
    /** Being connected (or waiting to be replaced). */
    busy: boolean;
    socket?: Socket;
  }
  const slots: Slot[] = Array.from({ length: c.receivers }, () => ({ key: Buffer.alloc(32), alive: false, busy: false }));
  const senders: { socket: Socket; blocked: boolean }[] = [];
  let serverKey: Buffer | undefined;
  let connectedReceivers = 0;
  let receiverFailures = 0;
  let dropped = 0;
  let replaced = 0;
  let offered = 0;
  let written = 0;
  let sendersLost = 0;
  let ready = false;
  let lastError = '';
  const payload = Buffer.alloc(c.packetSize, 0x42);
  const frameLen = 5 + 32 + c.packetSize;
  const notePreferred = Buffer.from([FrameType.NotePreferred, 0, 0, 0, 1, 0]);
  const python = c.python
    ? spawn('python3', ['-c', PYTHON_RECEIVERS, c.host, String(c.port), String(c.mss)], { stdio: ['pipe', 'pipe', 'inherit'] })
    : undefined;
  const pending = new Map<number, () => void>();

  const up = (slot: Slot) => {
    slot.alive = true;
    slot.busy = false;
    connectedReceivers++;
  };
  const down = (slot: Slot) => {
    if (!slot.alive) return;
    slot.alive = false;
    dropped++;
  };
  if (python) {
    let line = '';
    python.stdout!.setEncoding('utf8');
    python.stdout!.on('data', (text: string) => {
      line += text;
      for (let i = line.indexOf('\n'); i >= 0; i = line.indexOf('\n')) {
        const [what, n, reason] = line.slice(0, i).split(' ');
        line = line.slice(i + 1);
        const slot = slots[Number(n)]!;
        if (what === 'up') up(slot);
        else if (what === 'down') down(slot);
        else if (what === 'fail') {
          receiverFailures++;
          slot.busy = false;
          lastError = reason ?? '';
        }
        pending.get(Number(n))?.();
        if (what !== 'down') pending.delete(Number(n));
      }
    });
    python.stdin!.on('error', () => {});
  }

  const connectReceiver = async (index: number): Promise<void> => {
    const slot = slots[index]!;
    slot.busy = true;
    const priv = native.generatePrivateKey();
    const pub = native.publicKeyOf(priv);
    if (python) {
      const frame = clientInfoFrame(handshakeBox(priv, serverKey!), pub, { canAckPings: false, isProber: false });
      slot.key = pub;
      const answered = new Promise<void>((resolve) => pending.set(index, resolve));
      python.stdin!.write(`connect ${index} ${frame.toString('hex')}\n`);
      await answered;
      return;
    }
    try {
      const { socket } = await derpHandshake(c.host, c.port, priv);
      // Never read again: Node stops reading once its buffer is full, then TCP's window closes.
      socket.pause();
      slot.key = pub;
      slot.socket = socket;
      up(slot);
      const probe = setInterval(() => socket.write(notePreferred), 1_000);
      socket.on('error', () => {});
      socket.once('close', () => {
        clearInterval(probe);
        down(slot);
      });
    } catch (err) {
      receiverFailures++;
      slot.busy = false;
      lastError = (err as Error).message;
    }
  };

  // Senders read (and discard) what the relay sends them.
  const connectSender = async () => {
    const { socket, serverKey: key } = await derpHandshake(c.host, c.port, native.generatePrivateKey());
    serverKey = key;
    const sender = { socket, blocked: false };
    socket.on('data', () => {});
    socket.on('drain', () => (sender.blocked = false));
    socket.on('error', () => {});
    socket.once('close', () => {
      if (!stopping()) sendersLost++;
      senders.splice(senders.indexOf(sender), 1);
    });
    senders.push(sender);
  };

  let pump: NodeJS.Timeout | undefined;
  let refill: NodeJS.Timeout | undefined;
  const start = (async () => {
    for (let i = 0; i < c.senders; i++) await connectSender();
    for (let i = 0; i < c.receivers && !stopping(); i += 100) {
      await Promise.all(slots.slice(i, i + 100).map((_, k) => connectReceiver(i + k)));
    }
    ready = true;
    // Send: every 10 ms what the rate owes by then, round-robin over the live receivers.
    let cursor = 0;
    let owed = 0;
    let last = performance.now();
    const total = c.ratePerReceiver * c.receivers;
    pump = setInterval(() => {
      if (stopping()) return;
      const now = performance.now();
      owed = Math.min(owed + ((now - last) / 1000) * total, total / 10);
      last = now;
      const count = Math.floor(owed);
      if (count === 0 || senders.length === 0) return;
      owed -= count;
      offered += count;
      const per = Math.ceil(count / senders.length);
      let left = count;
      for (const sender of senders) {
        const n = Math.min(per, left);
        left -= n;
        if (sender.blocked || n === 0) continue;
        const batch = Buffer.allocUnsafe(n * frameLen);
        let off = 0;
        for (let k = 0; k < n; k++) {
          let slot: Slot | undefined;
          for (let tries = 0; tries < slots.length && !slot; tries++) {
            const s = slots[cursor++ % slots.length]!;
            if (s.alive) slot = s;
          }
          if (!slot) break;
          batch[off] = FrameType.SendPacket;
          batch.writeUInt32BE(32 + c.packetSize, off + 1);
          slot.key.copy(batch, off + 5);
          payload.copy(batch, off + 37);
          off += frameLen;
        }
        written += off / frameLen;
        if (off > 0 && !sender.socket.write(batch.subarray(0, off))) sender.blocked = true;
      }
    }, 10);
    // Replace dropped receivers (new keys), a few at a time.
    refill = setInterval(() => {
      if (stopping()) return;
      let budget = Math.ceil(c.reconnectPerSec / 10);
      slots.forEach((slot, index) => {
        if (budget > 0 && !slot.alive && !slot.busy) {
          budget--;
          replaced++;
          void connectReceiver(index);
        }
      });
    }, 100);
  })().catch((err: unknown) => (lastError = (err as Error).message));
  return {
    stats: (): Stats => ({
      ready,
      alive: slots.filter((s) => s.alive).length,
      connectedReceivers,
      receiverFailures,
      dropped,
      replaced,
      offered,
      written,
      senders: senders.length,
      sendersLost,
      lastError,
    }),
    finish: async () => {
      await start;
      clearInterval(pump);
      clearInterval(refill);
      python?.stdin!.end();
      python?.kill('SIGKILL');
      for (const s of slots) s.socket?.destroy();
      for (const s of senders) s.socket.destroy();
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// The bench side: processes it starts, and their bookkeeping.

const processes = new Set<ChildProcess>();
const tempDirs = new Set<string>();
process.on('exit', () => {
  for (const child of processes) child.kill('SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/** A child process whose stderr tail is kept and whose exit is noticed. */
class Child {
  readonly child: ChildProcess;
  #stderr = '';
  #exited: string | undefined;

  constructor(
    readonly name: string,
    command: string,
    args: string[],
    stdin: 'ignore' | 'pipe' = 'ignore',
  ) {
    this.child = spawn(command, args, { stdio: [stdin, 'pipe', 'pipe'] });
    processes.add(this.child);
    this.child.stderr!.setEncoding('utf8');
    this.child.stderr!.on('data', (text: string) => (this.#stderr = (this.#stderr + text).slice(-4096)));
    this.child.once('exit', (code, signal) => {
      this.#exited = signal ?? `exit code ${code}`;
      processes.delete(this.child);
    });
    this.child.once('error', (err) => (this.#exited = `spawn failed: ${err.message}`));
  }

  get pid(): number {
    return this.child.pid!;
  }

  get exited(): string | undefined {
    return this.#exited;
  }

  get stderr(): string {
    return this.#stderr;
  }

  cpuSeconds(): number {
    return cpuSeconds(this.pid);
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 5_000): Promise<void> {
    if (this.#exited !== undefined) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await exited;
    clearTimeout(timer);
  }
}

/** A relay under attack: a derpmesh node or derper. */
class Relay extends Child {
  constructor(
    name: string,
    command: string,
    args: string[],
    readonly url: string,
    readonly caPem: Buffer | undefined,
    readonly hasMetrics: boolean,
  ) {
    super(name, command, args);
    this.child.stdout!.resume();
  }

  get host(): string {
    return new URL(this.url).hostname;
  }

  get port(): number {
    return Number(new URL(this.url).port);
  }

  checkAlive(): void {
    if (this.exited !== undefined) throw new Error(`${this.name} exited (${this.exited}); its stderr ends:\n${this.stderr}`);
  }

  async waitReady(path: string): Promise<void> {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      this.checkAlive();
      try {
        const res = await getUrl(this.url + path, this.caPem);
        await res.text();
        if (res.status >= 200 && res.status < 300) return;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) throw new Error(`${this.name} did not answer ${this.url}${path}; stderr:\n${this.stderr}`);
      await sleep(100);
    }
  }

  /** Every `derpmesh_*` sample of /metrics, by name and labels as served; undefined when it does not answer (e.g. out of descriptors). */
  async metrics(attempts = 3): Promise<Record<string, number> | undefined> {
    if (!this.hasMetrics) return undefined;
    for (let attempt = 0; attempt < attempts; attempt++) {
      try {
        const res = await getUrl(`${this.url}/metrics`, this.caPem);
        const text = await res.text();
        const out: Record<string, number> = {};
        for (const m of text.matchAll(/^(derpmesh_\w+(?:\{[^}]*\})?) (\S+)$/gm)) out[m[1]!] = Number(m[2]);
        return out;
      } catch {
        await sleep(200);
      }
    }
    return undefined;
  }

  rssKib(): number {
    try {
      const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${this.pid}/status`, 'utf8'));
      return m ? Number(m[1]) : NaN;
    } catch {
      return NaN;
    }
  }

  /** Descriptors the process has open. */
  openFiles(): number {
    try {
      return readdirSync(`/proc/${this.pid}/fd`).length;
    } catch {
      return NaN;
    }
  }

  /** Median of 5 samples 100 ms apart. */
  async rssMedianKib(): Promise<number> {
    const samples: number[] = [];
    for (let i = 0; i < 5; i++) {
      samples.push(this.rssKib());
      await sleep(100);
    }
    return samples.sort((a, b) => a - b)[2]!;
  }
}

class Worker extends Child {
  last: Stats = {};
  final: Stats | undefined;

  constructor(
    name: string,
    readonly config: WorkerConfig,
  ) {
    super(name, process.execPath, [SELF, '--worker', JSON.stringify(config)], 'pipe');
    let line = '';
    this.child.stdout!.setEncoding('utf8');
    this.child.stdout!.on('data', (text: string) => {
      line += text;
      for (let i = line.indexOf('\n'); i >= 0; i = line.indexOf('\n')) {
        const stats = JSON.parse(line.slice(0, i)) as Stats;
        line = line.slice(i + 1);
        this.last = stats;
        if (stats.final) this.final = stats;
      }
    });
    this.child.stdin!.on('error', () => {});
  }

  /** Closes its stdin and waits for its last counters (SIGKILL after `graceMs`). */
  async finish(graceMs = 10_000): Promise<Stats> {
    if (this.exited === undefined) {
      const exited = new Promise((resolve) => this.child.once('exit', resolve));
      this.child.stdin!.end();
      const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    }
    return this.final ?? this.last;
  }
}

async function startDerpmesh(
  postgresUrl: string,
  name: string,
  extraArgs: string[],
  tls?: { certFile: string; keyFile: string; caPem: Buffer },
): Promise<Relay> {
  const port = await freePort();
  const args = [CLI, 'server', '--http-address', `127.0.0.1:${port}`, '--postgres-url', postgresUrl, '--log-level', 'warn'];
  args.push('--stun-address', 'disable', '--hostname', `attack-${name}`, ...extraArgs);
  if (tls) args.push('--tls-cert-file', tls.certFile, '--tls-key-file', tls.keyFile);
  const relay = new Relay(
    tls ? 'derpmesh-tls' : 'derpmesh',
    process.execPath,
    args,
    `${tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    tls?.caPem,
    true,
  );
  await relay.waitReady('/healthz');
  return relay;
}

async function startDerper(binary: string): Promise<Relay> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-attack-derper-'));
  tempDirs.add(dir);
  const args = ['-a', `127.0.0.1:${port}`, '-stun=false', '-http-port=-1', '-c', join(dir, 'derper.json')];
  const relay = new Relay('derper', binary, args, `http://127.0.0.1:${port}`, undefined, false);
  await relay.waitReady('/');
  return relay;
}

/** Memory of every TCP socket in this network namespace (/proc/net/sockstat, pages), in KiB: kernel buffers, not in any RSS. */
function tcpMemKib(): number {
  try {
    const m = /^TCP:.* mem (\d+)/m.exec(readFileSync('/proc/net/sockstat', 'utf8'));
    return m ? Number(m[1]) * 4 : NaN;
  } catch {
    return NaN;
  }
}

/** The node's open-file limits (soft, hard). */
function fileLimits(pid: number | 'self'): string {
  try {
    const line = /^Max open files\s+(\S+)\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'));
    return line ? `${line[1]}/${line[2]}` : '?';
  } catch {
    return '?';
  }
}

// ---------------------------------------------------------------------------------------------------
// One measurement: the quiet run, then the attack.

interface Legit {
  pairs: number;
  ratePerPair: number;
  packetSize: number;
  durationMs: number;
}

interface Attack {
  /** Starts the attack; the pairs are connected already. */
  start(): Promise<Worker[]>;
  /** One line about what the attack did, from the workers' last counters (at window start and end). */
  /** `quietCores`: the relay's CPU while the same pairs ran on the quiet node (NaN if not measured). */
  describe(atStart: Stats[], atEnd: Stats[], windowSecs: number, relayCpuSecs: number, quietCores: number): string;
  /** Time the attack gets to build up before the window. */
  rampMs: number;
}

interface Probe {
  ok: boolean;
  ms: number;
  error?: string;
}

interface Result {
  id: string;
  title: string;
  relay: string;
  /** Counted in the verdict (derper's rows are for comparison). */
  judged: boolean;
  quiet?: LoadReport;
  attack?: LoadReport;
  error?: string;
  kept: number;
  rssKib: { before: number; peak: number; after: number };
  /** Kernel memory of all TCP sockets here (sockstat). */
  tcpMemKib: { before: number; peak: number; after: number };
  /** Most descriptors the relay had open (sampled every 500 ms). */
  openFilesPeak: number;
  fileLimit: string;
  counters: Record<string, number>;
  probes: Probe[];
  cpu: { relay: number; attackers: number; bench: number; windowSecs: number };
  attackText: string;
  notes: string[];
}

/** The counters reported per scenario, deltas over the attack (only those that moved are printed). */
const COUNTERS = [
  'derpmesh_accepts_refused_total{reason="rate_limit"}',
  'derpmesh_accepts_refused_total{reason="max_connections"}',
  'derpmesh_accepts_refused_total{reason="max_connections_per_ip"}',
  'derpmesh_http_rejections_total{reason="head_timeout",layer="node"}',
  'derpmesh_http_rejections_total{reason="head_timeout",layer="core"}',
  'derpmesh_http_rejections_total{reason="bad_request",layer="node"}',
  'derpmesh_handshake_failures_total{reason="timeout"}',
  'derpmesh_handshake_failures_total{reason="io"}',
  'derpmesh_tls_handshake_failures_total{reason="timeout"}',
  'derpmesh_tls_handshake_failures_total{reason="error"}',
  'derpmesh_write_timeouts_total',
  'derpmesh_dropped_packets_total{reason="queue_full"}',
  'derpmesh_dropped_packets_total{reason="unknown_dest"}',
  'derpmesh_dropped_packets_total{reason="gone"}',
  'derpmesh_rate_limited_frames_total',
  'derpmesh_accepts_total',
];

async function probeNewClient(relay: Relay): Promise<Probe> {
  const started = performance.now();
  try {
    const n = await Promise.race([
      native.holdClients(relay.url, 1, 0, relay.caPem),
      sleep(PROBE_TIMEOUT_MS).then(() => {
        throw new Error(`no handshake within ${PROBE_TIMEOUT_MS} ms`);
      }),
    ]);
    return { ok: n === 1, ms: performance.now() - started };
  } catch (err) {
    return { ok: false, ms: performance.now() - started, error: (err as Error).message.split('\n')[0]!.slice(0, 160) };
  }
}

async function measure(
  id: string,
  title: string,
  relay: Relay,
  legit: Legit,
  attack: Attack,
  quiet: LoadReport | undefined,
  judged = true,
): Promise<Result> {
  const notes: string[] = [];
  const load = (warmupMs: number) =>
    runLoad({
      url: relay.url,
      caPem: relay.caPem,
      pairs: legit.pairs,
      packetSize: legit.packetSize,
      ratePerPair: legit.ratePerPair,
      durationMs: legit.durationMs,
      warmupMs,
    });
  process.stderr.write(`${id}: ${title} — ${relay.name} pid ${relay.pid} at ${relay.url}\n`);
  let quietCores = NaN;
  if (!quiet) {
    const t0 = performance.now();
    const cpu0 = relay.cpuSeconds();
    quiet = await load(1_000);
    quietCores = (relay.cpuSeconds() - cpu0) / ((performance.now() - t0) / 1000);
    process.stderr.write(
      `${id}: quiet ${fmtInt(quiet.packetsPerSec)} pkt/s, loss ${fmtPct(quiet.lossRatio)}, p99 ${fmtMs(quiet.rttP99Us)}\n`,
    );
  }
  relay.checkAlive();
  const fileLimit = fileLimits(relay.pid);
  const before = (await relay.metrics()) ?? {};
  const rssBefore = await relay.rssMedianKib();

  // The pairs connect and warm up while the attack builds; the window opens after `rampMs`.
  const loadStarted = performance.now();
  const attackRun = load(attack.rampMs).catch((err: unknown) => err as Error);
  if (relay.hasMetrics) {
    const want = (before.derpmesh_clients ?? 0) + 2 * legit.pairs;
    for (let i = 0; i < 60; i++) {
      const m = await relay.metrics();
      if ((m?.derpmesh_clients ?? 0) >= want) break;
      await sleep(50);
    }
  } else await sleep(500);
  const workers = await attack.start();

  let peak = rssBefore;
  const tcpBefore = tcpMemKib();
  let tcpPeak = tcpBefore;
  let openFilesPeak = relay.openFiles();
  let ticks = 0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, relay.rssKib() || 0);
    tcpPeak = Math.max(tcpPeak, tcpMemKib() || 0);
    if (++ticks % 5 === 0) openFilesPeak = Math.max(openFilesPeak, relay.openFiles() || 0);
  }, 100);
  // CPU and the attackers' counters at the window's start and end.
  const snapshot = () => ({
    t: performance.now(),
    relay: relay.cpuSeconds(),
    attackers: workers.reduce((sum, w) => sum + (w.cpuSeconds() || 0), 0),
    bench: process.cpuUsage(),
    stats: workers.map((w) => w.last),
  });
  let atStart: ReturnType<typeof snapshot> | undefined;
  const windowOpens = Math.max(0, attack.rampMs - (performance.now() - loadStarted));
  const startTimer = setTimeout(() => (atStart = snapshot()), windowOpens);
  const probes: Promise<Probe>[] = [];
  const probeTimers = Array.from({ length: PROBES }, (_, i) =>
    setTimeout(() => probes.push(probeNewClient(relay)), windowOpens + ((i + 0.5) * legit.durationMs) / PROBES),
  );
  const outcome = await attackRun;
  const atEnd = snapshot();
  // The counters while the attack still runs (tearing it down makes errors of its own).
  const atEndMetrics = await relay.metrics(1);
  clearTimeout(startTimer);
  for (const t of probeTimers) clearTimeout(t);
  const probed = await Promise.all(probes);
  const start = atStart ?? atEnd;
  const windowSecs = (atEnd.t - start.t) / 1000;
  const finals = await Promise.all(workers.map((w) => w.finish()));
  const attackText = attack.describe(start.stats, atEnd.stats, windowSecs, atEnd.relay - start.relay, quietCores);
  if (finals.length === 0) notes.push('no attacker ran');

  // After: the attack's connections gone (the gauge back to what it was), then RSS.
  const settleBy = Date.now() + SETTLE_MS;
  while (Date.now() < settleBy && relay.exited === undefined && relay.hasMetrics) {
    const m = await relay.metrics();
    if (
      m &&
      (m.derpmesh_connections ?? 0) <= (before.derpmesh_connections ?? 0) &&
      (m.derpmesh_accepted_open_connections ?? 0) <= (before.derpmesh_accepted_open_connections ?? 0) + 1
    )
      break;
    await sleep(250);
  }
  if (!relay.hasMetrics) await sleep(2_000);
  clearInterval(sampler);
  const alive = relay.exited === undefined;
  const rssAfter = alive ? await relay.rssMedianKib() : NaN;
  const after = alive ? await relay.metrics() : undefined;
  const counters: Record<string, number> = {};
  const upTo = atEndMetrics ?? after;
  if (upTo) for (const name of COUNTERS) counters[name] = (upTo[name] ?? 0) - (before[name] ?? 0);
  if (relay.hasMetrics && !atEndMetrics)
    notes.push(
      `the node did not answer /metrics at the end of the window${after ? ': counters up to after the attack (its teardown included)' : ', nor after it'}`,
    );
  if (!alive) notes.push(`THE NODE DIED during the attack (${relay.exited}); stderr ends: ${relay.stderr.slice(-600)}`);

  const cpu = {
    relay: (atEnd.relay - start.relay) / windowSecs,
    attackers: (atEnd.attackers - start.attackers) / windowSecs,
    bench: (atEnd.bench.user + atEnd.bench.system - start.bench.user - start.bench.system) / 1e6 / windowSecs,
    windowSecs,
  };
  const report = outcome instanceof Error ? undefined : outcome;
  const error = outcome instanceof Error ? outcome.message.split('\n')[0] : undefined;
  const kept = report ? report.packetsPerSec / quiet.packetsPerSec : 0;
  process.stderr.write(
    `${id}: under attack ${report ? `${fmtInt(report.packetsPerSec)} pkt/s (${(kept * 100).toFixed(1)} %), loss ${fmtPct(report.lossRatio)}, p99 ${fmtMs(report.rttP99Us)}` : `FAILED: ${error}`}; ${attackText}\n`,
  );
  return {
    id,
    title,
    relay: relay.name,
    judged,
    quiet,
    attack: report,
    error,
    kept,
    rssKib: { before: rssBefore, peak, after: rssAfter },
    tcpMemKib: { before: tcpBefore, peak: tcpPeak, after: tcpMemKib() },
    openFilesPeak,
    fileLimit,
    counters,
    probes: probed,
    cpu,
    attackText,
    notes,
  };
}

// ---------------------------------------------------------------------------------------------------
// The attacks.

const num = (s: Stats | undefined, k: string) => Number(s?.[k] ?? 0);
const sum = (all: Stats[], k: string) => all.reduce((acc, s) => acc + num(s, k), 0);

function floodAttack(relay: Relay, connections: number, processesCount: number, ratePerSec: number, rampMs: number): Attack {
  return {
    rampMs,
    start: async () => {
      const per = Math.ceil(connections / processesCount);
      return Array.from(
        { length: processesCount },
        (_, i) =>
          new Worker(`flood-${i}`, {
            kind: 'flood',
            host: relay.host,
            port: relay.port,
            localAddress: `127.0.0.${2 + i}`,
            target: Math.max(0, Math.min(per, connections - per * i)),
            inflight: 256,
            ratePerSec,
            mode: relay.caPem ? 'tls' : 'http',
            maxMs: WORKER_MAX_MS,
          }),
      );
    },
    describe: (atStart, atEnd) => {
      const errors: Record<string, number> = {};
      for (const s of atEnd)
        for (const [k, v] of Object.entries((s.errors ?? {}) as Record<string, number>)) errors[k] = (errors[k] ?? 0) + v;
      const errorText = Object.entries(errors)
        .map(([k, v]) => `${k} ${fmtInt(v)}`)
        .join(', ');
      return (
        `held open ${fmtInt(sum(atStart, 'open'))} at window start, ${fmtInt(sum(atEnd, 'open'))} at its end (max ${fmtInt(sum(atEnd, 'maxOpen'))}) of ${fmtInt(connections)}; ` +
        `${fmtInt(sum(atEnd, 'attempts'))} connects, ${fmtInt(sum(atEnd, 'closedByServer'))} closed by the node` +
        (errorText ? `; errors: ${errorText}` : '')
      );
    },
  };
}

interface HandshakeRate {
  perSec: number;
  relayCores: number;
  /** The relay's CPU for the pairs alone (the quiet run). */
  pairsCores: number;
  /** Handshakes per relay CPU-second beyond the pairs'. */
  perCoreSec: number;
}

function handshakeAttack(relay: Relay, loops: number, batch: number, caFile: string | undefined, out: { rate?: HandshakeRate }): Attack {
  return {
    rampMs: 2_000,
    start: async () => [new Worker('handshake', { kind: 'handshake', url: relay.url, caFile, loops, batch, maxMs: WORKER_MAX_MS })],
    describe: (atStart, atEnd, windowSecs, relayCpuSecs, quietCores) => {
      const done = sum(atEnd, 'handshakes') - sum(atStart, 'handshakes');
      // The relay's CPU for the handshakes: what it used, less what the same pairs cost it when quiet.
      const netCpu = relayCpuSecs - (Number.isNaN(quietCores) ? 0 : quietCores * windowSecs);
      out.rate = { perSec: done / windowSecs, relayCores: relayCpuSecs / windowSecs, pairsCores: quietCores, perCoreSec: done / netCpu };
      const failed = sum(atEnd, 'failedBatches');
      const lastError = atEnd.map((s) => s.lastError).find((e) => e);
      return (
        `${fmtInt(out.rate.perSec)} handshakes/s; relay ${out.rate.relayCores.toFixed(2)} cores (the pairs alone: ${quietCores.toFixed(2)}): ` +
        `${fmtInt(out.rate.perCoreSec)} handshakes per relay CPU-second beyond the pairs'` +
        (failed > 0 ? `; ${failed} failed batches (${String(lastError)})` : '')
      );
    },
  };
}

function abuserAttack(relay: Relay, packetSize: number, legitMs: number, rampMs: number): Attack {
  let worker: Worker | undefined;
  return {
    rampMs,
    start: async () => {
      worker = new Worker('abuser', {
        kind: 'abuser',
        url: relay.url,
        packetSize,
        warmupMs: 200,
        // Covers the pairs' warm-up and window with room to spare.
        durationMs: rampMs + legitMs + 1_500,
        maxMs: WORKER_MAX_MS,
      });
      return [worker];
    },
    // Runs after the worker finished: its last line carries its load report.
    describe: () => {
      const s = worker?.final ?? worker?.last ?? {};
      return s.error
        ? `the abuser failed: ${String(s.error)}`
        : `the abuser (1 unpaced pair) got ${fmtInt(num(s, 'packetsPerSec'))} pkt/s through (${(num(s, 'bytesPerSec') / 1e6).toFixed(2)} MB/s); ` +
            `its loss ${fmtPct(num(s, 'lossRatio'))} (packets dropped at its receiver's queue, or still in TCP buffers when its window closed)`;
    },
  };
}

function nonreadersAttack(
  relay: Relay,
  receivers: number,
  ratePerReceiver: number,
  packetSize: number,
  mss: number,
  rampMs: number,
): Attack {
  const python = mss > 0 && hasPython();
  return {
    rampMs,
    start: async () => [
      new Worker('nonreaders', {
        kind: 'nonreaders',
        host: relay.host,
        port: relay.port,
        receivers,
        senders: 4,
        ratePerReceiver,
        packetSize,
        reconnectPerSec: 200,
        python,
        mss,
        maxMs: WORKER_MAX_MS,
      }),
    ],
    describe: (atStart, atEnd, windowSecs) => {
      const s = atStart[0];
      const e = atEnd[0];
      const sent = (num(e, 'written') - num(s, 'written')) / windowSecs;
      const offered = (num(e, 'offered') - num(s, 'offered')) / windowSecs;
      return (
        `${fmtInt(num(s, 'alive'))} non-readers connected at window start, ${fmtInt(num(e, 'alive'))} at its end ` +
        (python ? `(python3 sockets, MSS ${mss}); ` : '(Node sockets, loopback MSS: the kernel soaks up MBs per receiver); ') +
        `${fmtInt(num(e, 'dropped'))} dropped by the node, ${fmtInt(num(e, 'replaced'))} replaced with new keys; ` +
        `sent to them ${fmtInt(sent)} pkt/s (${fmtInt(offered)} offered)` +
        (num(e, 'receiverFailures') > 0
          ? `; ${fmtInt(num(e, 'receiverFailures'))} receiver handshakes failed (${String(e?.lastError)})`
          : '') +
        (num(e, 'sendersLost') > 0 ? `; ${num(e, 'sendersLost')} senders lost` : '')
      );
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// Output.

const mib = (kib: number) => (Number.isNaN(kib) ? 'n/a' : (kib / 1024).toFixed(0));

function resultRow(r: Result): string[] {
  const q = r.quiet;
  const a = r.attack;
  const refused = ['rate_limit', 'max_connections', 'max_connections_per_ip'].map((k) =>
    fmtInt(r.counters[`derpmesh_accepts_refused_total{reason="${k}"}`] ?? 0),
  );
  const probesOk = r.probes.filter((p) => p.ok).length;
  const probeMs = quantile(
    r.probes
      .filter((p) => p.ok)
      .map((p) => p.ms)
      .sort((x, y) => x - y),
    0.5,
  );
  return [
    r.id,
    r.relay,
    q ? fmtInt(q.packetsPerSec) : 'n/a',
    a ? fmtInt(a.packetsPerSec) : 'FAILED',
    a ? `${(r.kept * 100).toFixed(1)} %` : '0 %',
    `${q ? fmtPct(q.lossRatio) : 'n/a'} / ${a ? fmtPct(a.lossRatio) : 'n/a'}`,
    `${fmtMs(q?.rttP50Us)} / ${fmtMs(a?.rttP50Us)}`,
    `${fmtMs(q?.rttP99Us)} / ${fmtMs(a?.rttP99Us)}`,
    `${mib(r.rssKib.before)} / ${mib(r.rssKib.peak)} / ${mib(r.rssKib.after)}`,
    r.relay === 'derper' ? 'n/a' : refused.join(' / '),
    `${probesOk}/${r.probes.length}${probeMs === undefined ? '' : ` ${probeMs.toFixed(0)} ms`}`,
    `${r.cpu.relay.toFixed(2)} / ${r.cpu.attackers.toFixed(2)} / ${r.cpu.bench.toFixed(2)}`,
    r.judged ? (r.kept >= TARGET_KEPT && !r.notes.some((n) => n.startsWith('THE NODE DIED')) ? 'yes' : 'NO') : '(ref)',
  ];
}

function details(r: Result): string {
  const moved = Object.entries(r.counters)
    .filter(([, v]) => v !== 0)
    .map(([k, v]) => `${k.replace(/^derpmesh_/, '')} ${fmtInt(v)}`)
    .join(', ');
  const failedProbes = r.probes.filter((p) => !p.ok).map((p) => p.error);
  return [
    `  ${r.id} ${r.title}`,
    `      attack: ${r.attackText}`,
    `      relay's open descriptors at most ${fmtInt(r.openFilesPeak)} (limit soft/hard ${r.fileLimit}); ` +
      `kernel TCP memory, all sockets here (MiB before/peak/after): ${mib(r.tcpMemKib.before)} / ${mib(r.tcpMemKib.peak)} / ${mib(r.tcpMemKib.after)}`,
    ...(moved ? [`      node counters (delta): ${moved}`] : []),
    ...(failedProbes.length ? [`      new clients refused/failed: ${[...new Set(failedProbes)].join('; ')}`] : []),
    ...(r.error ? [`      the pairs' run failed: ${r.error}`] : []),
    ...r.notes.map((n) => `      ${n}`),
  ].join('\n');
}

// ---------------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      connections: { type: 'string', default: '20000' },
      receivers: { type: 'string', default: '1000' },
      pairs: { type: 'string', default: '10' },
      duration: { type: 'string', default: '10s' },
      rate: { type: 'string', default: '500' },
      size: { type: 'string', default: '1400' },
      'crowd-pairs': { type: 'string', default: '100' },
      'crowd-rate': { type: 'string', default: '200' },
      'flood-processes': { type: 'string', default: '2' },
      'flood-rate': { type: 'string', default: '5000' },
      'flood-ramp': { type: 'string', default: '8s' },
      'limit-flags': { type: 'string', default: '--accept-connection-limit 500 --max-connections-per-ip 100' },
      'client-rate-limit': { type: 'string', default: '1MB' },
      'handshake-loops': { type: 'string', default: '4' },
      'handshake-batch': { type: 'string', default: '32' },
      'nonreader-rate': { type: 'string', default: '100' },
      'nonreader-mss': { type: 'string', default: '1448' },
      scenarios: { type: 'string', default: 'flood,handshake,abuser,nonreaders' },
      tls: { type: 'string', default: 'auto' },
      derper: { type: 'string' },
      'postgres-url': { type: 'string' },
      json: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`node dist/bench/attack.js [options]   (npm run bench:attack -- [options])

  --connections N        connection flood: connections held open mid-handshake (default 20000)
  --flood-processes N    processes the flood is spread over, one source address each, 127.0.0.2… (default 2)
  --flood-rate N         new connections per second per flood process, at most (default 5000)
  --flood-ramp D         time the flood gets to build before the window (default 8s)
  --limit-flags "..."    the node's flags for the flood's "with limits" rows
                         (default "--accept-connection-limit 500 --max-connections-per-ip 100")
  --tls auto|on|off      also flood a node serving TLS itself, where the accept limits cover every
                         connection (default auto: when openssl exists to make a certificate)
  --pairs N              legitimate paced pairs (default 10)   --rate N  packets/s per pair (default 500)
  --size BYTES           packet size of every sender (default 1400)
  --duration D           measured window of every run (default 10s)
  --handshake-loops N    handshake flood: concurrent connect+handshake+close loops (default 4)
  --handshake-batch N    … clients dialled at once per loop (default 32)
  --crowd-pairs N        abuser scenario: paced pairs around the abuser (default 100)
  --crowd-rate N         … packets/s per pair (default 200)
  --client-rate-limit B  the per-client limit set live for the "with limit" row (default 1MB)
  --receivers N          receivers that never read (default 1000)
  --nonreader-rate N     packets/s sent to each of them (default 100)
  --nonreader-mss N      their TCP_MAXSEG, set in python3 (default 1448, Ethernet's; 0: Node sockets
                         with loopback's 64 KiB MSS, where the kernel buffers MBs per receiver)
  --scenarios LIST       any of flood,handshake,abuser,nonreaders (default all)
  --derper PATH          derper binary (default: $DERPER, else ${cachedDerper})
  --postgres-url URL     database of the nodes (default: a throwaway Postgres)
  --json FILE            every result as JSON
`);
    return;
  }
  const int = (flag: string, text: string) => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${flag} must be a positive integer, got ${JSON.stringify(text)}`);
    return n;
  };
  const duration = (flag: string, text: string) => {
    const ms = parseDuration(text);
    if (ms === undefined || ms <= 0) throw new Error(`--${flag} must be a duration like 10s, got ${JSON.stringify(text)}`);
    return ms;
  };
  const connections = int('connections', values.connections);
  const receivers = int('receivers', values.receivers);
  const durationMs = duration('duration', values.duration);
  const floodRampMs = duration('flood-ramp', values['flood-ramp']);
  const packetSize = int('size', values.size);
  const legit: Legit = { pairs: int('pairs', values.pairs), ratePerPair: int('rate', values.rate), packetSize, durationMs };
  const crowd: Legit = {
    pairs: int('crowd-pairs', values['crowd-pairs']),
    ratePerPair: int('crowd-rate', values['crowd-rate']),
    packetSize,
    durationMs,
  };
  const floodProcesses = int('flood-processes', values['flood-processes']);
  const floodRate = int('flood-rate', values['flood-rate']);
  const limitFlags = values['limit-flags'].split(/\s+/).filter((s) => s !== '');
  const rateLimit = values['client-rate-limit'];
  const rateLimitBytes = parseBytes(rateLimit);
  if (rateLimitBytes === undefined || rateLimitBytes <= 0)
    throw new Error(`--client-rate-limit must be bytes/s like 1MB, got ${rateLimit}`);
  const scenarios = new Set(values.scenarios.split(',').map((s) => s.trim()));
  for (const s of scenarios)
    if (!['flood', 'handshake', 'abuser', 'nonreaders'].includes(s)) throw new Error(`--scenarios: unknown scenario ${JSON.stringify(s)}`);
  if (!['auto', 'on', 'off'].includes(values.tls)) throw new Error(`--tls must be auto, on or off, got ${JSON.stringify(values.tls)}`);
  const withTls = values.tls === 'on' || (values.tls === 'auto' && hasOpenssl());
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build:ts\` first`);
  const derperPath = values.derper ?? process.env.DERPER ?? cachedDerper;
  const haveDerper = existsSync(derperPath);

  const started = Date.now();
  const loadBefore = loadavg();
  const notes: string[] = [];
  const ownLimit = fileLimits('self');
  notes.push(`open-file limit (soft/hard): this process ${ownLimit}; the nodes inherit it (Node raises the soft limit to the hard one)`);
  const postgres = values['postgres-url'] === undefined ? await startPostgres() : undefined;
  const postgresUrl = values['postgres-url'] ?? postgres!.url;
  const results: Result[] = [];
  const handshakeRates: Record<string, HandshakeRate> = {};

  const withNode = async <T>(name: string, args: string[], tls: boolean, body: (relay: Relay) => Promise<T>): Promise<T> => {
    let files: { certFile: string; keyFile: string; caPem: Buffer } | undefined;
    if (tls) {
      const ca = makePrivateCa();
      tempDirs.add(ca.dir);
      files = { certFile: ca.certFile, keyFile: ca.keyFile, caPem: readFileSync(ca.caFile) };
    }
    const relay = await startDerpmesh(postgresUrl, name, args, files);
    try {
      return await body(relay);
    } finally {
      await relay.stop('SIGTERM', 8_000);
    }
  };

  if (scenarios.has('flood')) {
    const variants: [string, string, string[], boolean][] = [
      ['1a', 'connection flood, plain HTTP, no accept limits', [], false],
      ['1b', `connection flood, plain HTTP, ${limitFlags.join(' ')}`, limitFlags, false],
    ];
    if (withTls) {
      variants.push(['1c', 'connection flood, TLS in the relay core, no accept limits', [], true]);
      variants.push(['1d', `connection flood, TLS in the relay core, ${limitFlags.join(' ')}`, limitFlags, true]);
    } else notes.push('TLS flood rows skipped (--tls off, or no openssl)');
    for (const [id, title, args, tls] of variants) {
      results.push(
        await withNode(`flood-${id}`, args, tls, (relay) =>
          measure(id, title, relay, legit, floodAttack(relay, connections, floodProcesses, floodRate, floodRampMs), undefined),
        ),
      );
    }
  }

  if (scenarios.has('handshake')) {
    const loops = int('handshake-loops', values['handshake-loops']);
    const batch = int('handshake-batch', values['handshake-batch']);
    const out: { rate?: HandshakeRate } = {};
    results.push(
      await withNode('handshake', [], false, (relay) =>
        measure(
          '2',
          `handshake flood (${loops} loops × ${batch} connect+handshake+close)`,
          relay,
          legit,
          handshakeAttack(relay, loops, batch, undefined, out),
          undefined,
        ),
      ),
    );
    if (out.rate) handshakeRates.derpmesh = out.rate;
    if (haveDerper) {
      const derper = await startDerper(derperPath);
      try {
        const ref: { rate?: HandshakeRate } = {};
        results.push(
          await measure(
            '2',
            `handshake flood (${loops} loops × ${batch}), the same on derper`,
            derper,
            legit,
            handshakeAttack(derper, loops, batch, undefined, ref),
            undefined,
            false,
          ),
        );
        if (ref.rate) handshakeRates.derper = ref.rate;
      } finally {
        await derper.stop('SIGTERM', 3_000);
      }
    } else notes.push(`derper not found at ${derperPath} (bench/derper.sh builds it): no handshake comparison`);
  }

  if (scenarios.has('abuser')) {
    await withNode('abuser', [], false, async (relay) => {
      const rampMs = 2_000;
      const quiet = await runLoad({ url: relay.url, ...crowd, warmupMs: 1_000 });
      process.stderr.write(`3: quiet ${crowd.pairs} pairs ${fmtInt(quiet.packetsPerSec)} pkt/s, p99 ${fmtMs(quiet.rttP99Us)}\n`);
      const run = (id: string, title: string) =>
        measure(id, title, relay, crowd, abuserAttack(relay, packetSize, durationMs, rampMs), quiet);
      results.push(await run('3a', `1 unpaced sender among ${crowd.pairs} paced pairs, no rate limit`));
      // The limit, set live for the cluster; in force once a new client's ServerInfo announces it.
      const config = (args: string[]) =>
        execFileSync(process.execPath, [CLI, 'config', ...args, '--postgres-url', postgresUrl], { encoding: 'utf8' });
      config(['set', 'client-rate-limit', rateLimit]);
      const setAt = performance.now();
      let appliedMs: number | undefined;
      while (performance.now() - setAt < 10_000) {
        const { socket, serverInfo } = await derpHandshake(relay.host, relay.port, native.generatePrivateKey());
        socket.destroy();
        if (serverInfo.tokenBucketBytesPerSecond === rateLimitBytes) {
          appliedMs = performance.now() - setAt;
          break;
        }
        await sleep(20);
      }
      const r = await run('3b', `1 unpaced sender among ${crowd.pairs} paced pairs, client-rate-limit ${rateLimit} (set live)`);
      r.notes.push(
        appliedMs === undefined
          ? 'WARNING: the rate limit was not announced in ServerInfo within 10 s of `derpmesh config set`'
          : `\`derpmesh config set client-rate-limit ${rateLimit}\` was in force (announced in ServerInfo) ${appliedMs.toFixed(0)} ms after it returned`,
      );
      results.push(r);
      config(['unset', 'client-rate-limit']);
    });
  }

  if (scenarios.has('nonreaders')) {
    const rate = int('nonreader-rate', values['nonreader-rate']);
    const mss = Number(values['nonreader-mss']);
    if (!Number.isInteger(mss) || mss < 0) throw new Error(`--nonreader-mss must be a whole number, got ${values['nonreader-mss']}`);
    results.push(
      await withNode('nonreaders', [], false, (relay) =>
        measure(
          '4',
          `${receivers} receivers that never read, ${rate} pkt/s sent to each`,
          relay,
          legit,
          nonreadersAttack(relay, receivers, rate, packetSize, mss, 8_000),
          undefined,
        ),
      ),
    );
  }

  await postgres?.stop();
  const loadAfter = loadavg();
  let commit = '';
  try {
    commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    // Not a checkout.
  }

  const header = [
    'scenario',
    'relay',
    'quiet pkt/s',
    'attack pkt/s',
    'kept',
    'loss quiet/attack',
    'RTT p50 quiet/attack',
    'RTT p99 quiet/attack',
    'RSS MiB before/peak/after',
    'refused rate/max/per-ip',
    'new clients',
    'CPU relay/attack/bench',
    '≥ 95 %',
  ];
  const judged = results.filter((r) => r.judged);
  const holds = judged.length > 0 && judged.every((r) => r.kept >= TARGET_KEPT && !r.notes.some((n) => n.startsWith('THE NODE DIED')));
  const out = [
    `machine: ${cpus().length} CPUs, load average ${loadBefore[0]!.toFixed(2)} before, ${loadAfter[0]!.toFixed(2)} after; ${((Date.now() - started) / 1000).toFixed(0)} s${commit ? `; commit ${commit}` : ''}`,
    `legitimate load: ${legit.pairs} pairs × ${legit.ratePerPair} pkt/s × ${packetSize} B (scenario 3: ${crowd.pairs} pairs × ${crowd.ratePerPair} pkt/s), ${durationMs / 1000} s windows, quiet and under attack on the same node`,
    ...notes,
    '',
    formatTable('results (RSS of the relay process; CPU in cores over the window: relay, attackers, this process)', [
      header,
      ...results.map(resultRow),
    ]),
    '',
    'details',
    ...results.map(details),
  ];
  if (handshakeRates.derpmesh) {
    const d = handshakeRates.derpmesh;
    const t = handshakeRates.derper;
    out.push(
      '',
      formatTable('handshake flood: connect + DERP handshake + close, while the 10 paced pairs run', [
        ['relay', 'handshakes/s', 'relay CPU (cores)', 'of it the pairs (quiet)', 'handshakes per relay CPU-second'],
        ['derpmesh', fmtInt(d.perSec), d.relayCores.toFixed(2), d.pairsCores.toFixed(2), fmtInt(d.perCoreSec)],
        ...(t ? [['derper', fmtInt(t.perSec), t.relayCores.toFixed(2), t.pairsCores.toFixed(2), fmtInt(t.perCoreSec)]] : []),
        ...(t ? [['derpmesh/derper', `${(d.perSec / t.perSec).toFixed(2)}×`, '', '', `${(d.perCoreSec / t.perCoreSec).toFixed(2)}×`]] : []),
      ]),
    );
  }
  out.push(
    '',
    `target: under each attack the legitimate pairs keep ≥ ${TARGET_KEPT * 100} % of their quiet packets/s (derpmesh rows; derper's are for reference)`,
    ...judged.map(
      (r) => `  ${r.kept >= TARGET_KEPT ? 'yes' : 'NO '} ${r.id.padEnd(3)} ${(r.kept * 100).toFixed(1).padStart(5)} %  ${r.title}`,
    ),
    holds ? 'ATTACK TARGETS HOLD' : 'ATTACK TARGETS DO NOT HOLD',
  );
  process.stdout.write('\n' + out.join('\n') + '\n');
  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify(
        { machine: { cpus: cpus().length, loadBefore, loadAfter, commit }, legit, crowd, results, handshakeRates, holds },
        null,
        2,
      ) + '\n',
    );
  }
}

if (process.argv[2] === '--worker') {
  runWorker(JSON.parse(process.argv[3]!) as WorkerConfig).catch((err: unknown) => {
    process.stderr.write(`worker: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
} else {
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      process.stderr.write(`\nattack: ${signal}: stopping\n`);
      process.exit(130);
    });
  }
  main().catch((err: unknown) => {
    process.stderr.write(`attack: ${(err as Error).stack ?? String(err)}\n`);
    // Exit now: the 'exit' handler kills the children, whose pipes would otherwise keep us alive.
    process.exit(1);
  });
}
