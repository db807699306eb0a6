// STUN request rate: a derpmesh node's STUN port against Tailscale's derper's, same load, same
// machine, one run.
//
//   node dist/bench/stun.js [--duration 10s] [--rounds 2] [--workers 2] [--sockets 16] [--window 8]
//                           [--timeout 1s] [--paced-duration 4s] [--paced-fraction 0.5] [--derper PATH]
//
// Both servers run as child processes on loopback: a derpmesh node (`server`, a throwaway Postgres,
// DERPMESH_STUN_ADDRESS=127.0.0.1:PORT) and derper (`-stun -stun-port PORT`). The load generator is
// this script: `--workers` worker threads share `--sockets` UDP sockets, each socket sending the
// RFC 5389 Binding Request a Tailscale client sends (SOFTWARE `tailnode`, FINGERPRINT) with a
// transaction id of its own: socket prefix + sequence number.
//
//   flood   every socket keeps `--window` requests in flight: a request out for every answer in; one
//           unanswered for `--timeout` counts as lost and is replaced. Answers/s is the server's
//           rate (or the generator's, whichever gives first: the server's CPU is printed to tell).
//   paced   every socket sends at a fixed rate, in total `--paced-fraction` of the slower server's
//           flood rate: latency is the server's answer delay, not time in a full window.
//
// Every answer is checked: a Binding Success (0x0101, the magic cookie, a consistent length) whose
// transaction id is one this socket has outstanding and whose XOR-MAPPED-ADDRESS decodes to the
// socket's own address (127.0.0.1 and its port). Anything else counts as invalid; an answer to a
// request already counted lost counts as late. Rounds alternate derpmesh/derper/derper/derpmesh…
// so background load hits both alike. The servers' own counters (derpmesh_stun_answered_total; derper's
// stun_requests{disposition="success"}) are read around each round as a cross-check. Exit code 1
// only if the run failed or an answer was invalid.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createSocket, type Socket } from 'node:dgram';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { crc32 } from 'node:zlib';

import { parseDuration } from '../src/config.js';
import { freePort } from '../src/net.js';
import { startNodeProcess, type NodeProcess } from '../test/helpers/cluster.js';
import { cachedDerper } from '../test/helpers/derper.js';
import { startPostgres, type TestPostgres } from '../test/helpers/postgres.js';
import { cpuSeconds, fmtInt, fmtMs, fmtPct, fmtRatio, formatTable, quantile, sleep } from './report.js';

// ---------------------------------------------------------------------------------------------
// The STUN messages (RFC 5389), as Tailscale's client sends and parses them.

const MAGIC_COOKIE = 0x2112a442;
const BINDING_REQUEST = 0x0001;
const BINDING_SUCCESS = 0x0101;
const ATTR_XOR_MAPPED_ADDRESS = 0x0020;
/** Not in the RFC; some servers send it and Tailscale's client reads it. */
const ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020;
const ATTR_SOFTWARE = 0x8022;
const ATTR_FINGERPRINT = 0x8028;
const FINGERPRINT_XOR = 0x5354554e;
const HEADER_LEN = 20;
/** Header, SOFTWARE "tailnode" (4 + 8), FINGERPRINT (4 + 4). */
const REQUEST_LEN = HEADER_LEN + 12 + 8;

/** A Binding Request with transaction id = `prefix` (4 bytes) + 0 (4 bytes) + `seq` (4 bytes). */
function bindingRequest(prefix: number, seq: number): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_LEN);
  b.writeUInt16BE(BINDING_REQUEST, 0);
  b.writeUInt16BE(REQUEST_LEN - HEADER_LEN, 2);
  b.writeUInt32BE(MAGIC_COOKIE, 4);
  b.writeUInt32BE(prefix, 8);
  b.writeUInt32BE(0, 12);
  b.writeUInt32BE(seq, 16);
  b.writeUInt16BE(ATTR_SOFTWARE, 20);
  b.writeUInt16BE(8, 22);
  b.write('tailnode', 24, 'latin1');
  b.writeUInt16BE(ATTR_FINGERPRINT, 32);
  b.writeUInt16BE(4, 34);
  b.writeUInt32BE((crc32(b.subarray(0, 32)) ^ FINGERPRINT_XOR) >>> 0, 36);
  return b;
}

/**
 * Checks that `b` is a Binding Success for one of `prefix`'s transactions whose XOR-MAPPED-ADDRESS
 * is 127.0.0.1:`port`. Returns its sequence number, or why it is not.
 */
function parseAnswer(b: Buffer, prefix: number, port: number): number | string {
  if (b.length < HEADER_LEN || (b[0]! & 0xc0) !== 0 || b.readUInt32BE(4) !== MAGIC_COOKIE) return 'not STUN';
  if (b.readUInt16BE(0) !== BINDING_SUCCESS) return `type 0x${b.readUInt16BE(0).toString(16)}, not a Binding Success`;
  if (b.readUInt16BE(2) !== b.length - HEADER_LEN) return 'header length does not match the datagram';
  if (b.readUInt32BE(8) !== prefix || b.readUInt32BE(12) !== 0) return 'transaction id of another socket';
  let mapped: string | undefined;
  for (let off = HEADER_LEN; off < b.length;) {
    if (off + 4 > b.length) return 'truncated attribute header';
    const type = b.readUInt16BE(off);
    const len = b.readUInt16BE(off + 2);
    const value = off + 4;
    if (value + ((len + 3) & ~3) > b.length) return 'attribute runs past the end';
    if ((type === ATTR_XOR_MAPPED_ADDRESS || type === ATTR_XOR_MAPPED_ADDRESS_ALT) && mapped === undefined) {
      if (len !== 8 || b[value + 1] !== 1) return 'XOR-MAPPED-ADDRESS is not IPv4';
      const p = b.readUInt16BE(value + 2) ^ (MAGIC_COOKIE >>> 16);
      const ip = (b.readUInt32BE(value + 4) ^ MAGIC_COOKIE) >>> 0;
      mapped = `${ip >>> 24}.${(ip >>> 16) & 255}.${(ip >>> 8) & 255}.${ip & 255}:${p}`;
    }
    off = value + ((len + 3) & ~3);
  }
  if (mapped === undefined) return 'no XOR-MAPPED-ADDRESS';
  if (mapped !== `127.0.0.1:${port}`) return `XOR-MAPPED-ADDRESS ${mapped}, the socket is 127.0.0.1:${port}`;
  return b.readUInt32BE(16);
}

// ---------------------------------------------------------------------------------------------
// The load generator: one worker thread drives its share of the sockets.

interface WorkerConfig {
  worker: number;
  host: string;
  port: number;
  sockets: number;
  /** Requests in flight per socket (flood), or undefined when paced. */
  window?: number;
  /** Requests per second per socket (paced). */
  ratePerSocket?: number;
  warmupMs: number;
  durationMs: number;
  timeoutMs: number;
}

interface WorkerResult {
  /** Requests sent during the measured window. */
  sent: number;
  /** Of those, answered (whenever the answer came). */
  answered: number;
  /** Answers that arrived during the window (to requests sent then or in the warm-up). */
  answersInWindow: number;
  /** Answers to requests already counted lost. */
  late: number;
  invalid: number;
  firstInvalid?: string;
  windowSecs: number;
  /** Response latency of the window's answered requests, µs. */
  latenciesUs: Float64Array;
}

interface SocketState {
  socket: Socket;
  prefix: number;
  port: number;
  nextSeq: number;
  /** Outstanding requests: sequence number → send time (performance.now()). */
  pending: Map<number, number>;
}

async function runWorker(c: WorkerConfig): Promise<WorkerResult> {
  const start = performance.now();
  const windowStart = start + c.warmupMs;
  const windowEnd = windowStart + c.durationMs;
  const r: WorkerResult = {
    sent: 0,
    answered: 0,
    answersInWindow: 0,
    late: 0,
    invalid: 0,
    windowSecs: c.durationMs / 1000,
    latenciesUs: new Float64Array(0),
  };
  let latencies = new Float64Array(1 << 16);
  let nLat = 0;
  let sending = true;
  const states: SocketState[] = [];

  const send = (s: SocketState) => {
    const seq = s.nextSeq++;
    const now = performance.now();
    s.pending.set(seq, now);
    if (now >= windowStart && now < windowEnd) r.sent++;
    s.socket.send(bindingRequest(s.prefix, seq), c.port, c.host);
  };

  for (let i = 0; i < c.sockets; i++) {
    const socket = createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.bind(0, '127.0.0.1', () => resolve());
    });
    const s: SocketState = { socket, prefix: ((c.worker << 16) | i) >>> 0, port: socket.address().port, nextSeq: 1, pending: new Map() };
    socket.on('message', (msg) => {
      const now = performance.now();
      const seq = parseAnswer(msg, s.prefix, s.port);
      if (typeof seq === 'string') {
        r.invalid++;
        r.firstInvalid ??= seq;
        return;
      }
      const sentAt = s.pending.get(seq);
      if (sentAt === undefined) {
        if (seq < s.nextSeq) r.late++;
        else {
          r.invalid++;
          r.firstInvalid ??= `an answer to transaction ${seq}, never sent`;
        }
        return;
      }
      s.pending.delete(seq);
      if (now >= windowStart && now < windowEnd) r.answersInWindow++;
      if (sentAt >= windowStart && sentAt < windowEnd) {
        r.answered++;
        if (nLat === latencies.length) {
          const grown = new Float64Array(latencies.length * 2);
          grown.set(latencies);
          latencies = grown;
        }
        latencies[nLat++] = (now - sentAt) * 1000;
      }
      if (c.window !== undefined && sending) send(s);
    });
    socket.on('error', () => {}); // ICMP errors (nothing listening) show as loss
    states.push(s);
  }

  // Flood: fill every window. Paced: a tick every millisecond sends what is due.
  let paced: NodeJS.Timeout | undefined;
  if (c.window !== undefined) for (const s of states) for (let i = 0; i < c.window; i++) send(s);
  else {
    const perMs = c.ratePerSocket! / 1000;
    let sentPerSocket = 0;
    paced = setInterval(() => {
      if (!sending) return;
      let due = Math.floor((performance.now() - start) * perMs) - sentPerSocket;
      // After a stall of this thread, catch up with at most 2 ms worth: a longer burst would only
      // overflow the server's socket buffer (the offered rate then falls short; answers/s tells).
      const cap = Math.max(1, Math.ceil(perMs * 2));
      if (due > cap) {
        sentPerSocket += due - cap;
        due = cap;
      }
      for (let k = 0; k < due; k++) for (const s of states) send(s);
      if (due > 0) sentPerSocket += due;
    }, 1);
  }
  // Requests unanswered for the timeout are lost; in a flood each is replaced, keeping the window.
  const sweep = setInterval(() => {
    const now = performance.now();
    for (const s of states) {
      for (const [seq, sentAt] of s.pending) {
        if (now - sentAt < c.timeoutMs) continue;
        s.pending.delete(seq);
        if (c.window !== undefined && sending) send(s);
      }
    }
  }, 20);

  await sleep(windowEnd - performance.now());
  sending = false;
  clearInterval(paced);
  // Let the window's last requests be answered (or time out).
  const drainUntil = performance.now() + c.timeoutMs;
  while (performance.now() < drainUntil && states.some((s) => [...s.pending.values()].some((t) => t < windowEnd))) await sleep(10);
  clearInterval(sweep);
  for (const s of states) s.socket.close();
  r.latenciesUs = latencies.slice(0, nLat);
  return r;
}

if (!isMainThread) {
  const result = await runWorker(workerData as WorkerConfig);
  parentPort!.postMessage(result, [result.latenciesUs.buffer as ArrayBuffer]);
} else {
  await main();
}

// ---------------------------------------------------------------------------------------------
// The run: the two servers, interleaved rounds, the tables.

interface Server {
  name: 'derpmesh' | 'derper';
  stunPort: number;
  pid: number | undefined;
  /** Binding requests the server says it answered so far. */
  answered(): Promise<number>;
  alive(): void;
}

interface Round {
  server: string;
  sent: number;
  answered: number;
  answersInWindow: number;
  late: number;
  invalid: number;
  firstInvalid?: string;
  windowSecs: number;
  latenciesUs: Float64Array;
  wallSecs: number;
  serverCpuSecs: number;
  genCpuSecs: number;
  /** Context switches of the server's threads (voluntary and not) during the run. */
  serverSwitches: number;
  /** The kernel's UDP receive-buffer overflows during the run (machine-wide: /proc/net/snmp). */
  udpRcvbufErrors: number;
  serverAnswered: number;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      duration: { type: 'string', default: '10s' },
      rounds: { type: 'string', default: '2' },
      workers: { type: 'string', default: '2' },
      sockets: { type: 'string', default: '16' },
      window: { type: 'string', default: '8' },
      timeout: { type: 'string', default: '1s' },
      'paced-duration': { type: 'string', default: '4s' },
      'paced-fraction': { type: 'string', default: '0.5' },
      derper: { type: 'string' },
    },
  });
  const durationMs = parseDuration(values.duration) ?? 10_000;
  const pacedDurationMs = parseDuration(values['paced-duration']) ?? 4_000;
  const timeoutMs = parseDuration(values.timeout) ?? 1_000;
  const rounds = Number(values.rounds);
  const workers = Number(values.workers);
  const sockets = Number(values.sockets);
  const window = Number(values.window);
  const pacedFraction = Number(values['paced-fraction']);
  if (!(workers >= 1 && sockets >= workers && window >= 1 && rounds >= 1))
    throw new Error('need --workers ≥ 1, --sockets ≥ --workers, --window ≥ 1, --rounds ≥ 1');

  const children: ChildProcess[] = [];
  const tempDirs: string[] = [];
  let postgres: TestPostgres | undefined;
  let node: NodeProcess | undefined;
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      process.stderr.write(`\nstun: ${signal}: stopping the servers\n`);
      node?.child.kill('SIGKILL');
      for (const c of children) c.kill('SIGKILL');
      process.exit(130); // the Postgres helper stops its server on exit
    });
  }
  let failed = false;
  try {
    console.log(
      `stun bench: ${sockets} sockets in ${workers} worker threads, window ${window}, flood ${values.duration} per server in ${rounds} rounds, ` +
        `paced ${pacedDurationMs > 0 ? values['paced-duration'] : 'off'}; load average ${loadavg()[0]!.toFixed(2)}`,
    );
    const servers: Server[] = [];

    postgres = await startPostgres();
    const meshStun = await freeUdpPort();
    node = await startNodeProcess({
      name: 'bench-stun',
      postgresUrl: postgres.url,
      env: { DERPMESH_STUN_ADDRESS: `127.0.0.1:${meshStun}`, DERPMESH_LOG_LEVEL: 'info' },
    });
    await node.started;
    const n = node;
    servers.push({
      name: 'derpmesh',
      stunPort: meshStun,
      pid: n.child.pid,
      answered: async () => metricValue(await n.metrics(), /^derpmesh_stun_answered_total (\d+)$/m),
      alive: () => {
        if (n.child.exitCode !== null || n.child.signalCode !== null) throw new Error(`the derpmesh node exited:\n${n.output()}`);
      },
    });

    const derperPath = await findDerper(values.derper);
    if ('skip' in derperPath) console.log(`derper: SKIPPED (${derperPath.skip}); derpmesh only`);
    else {
      const httpPort = await freePort();
      const stunPort = await freeUdpPort();
      const dir = mkdtempSync(join(tmpdir(), 'derpmesh-stun-'));
      tempDirs.push(dir);
      const child = spawn(
        derperPath.path,
        ['-a', `127.0.0.1:${httpPort}`, '-http-port=-1', '-stun', '-stun-port', String(stunPort), '-c', join(dir, 'derper.json')],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      children.push(child);
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4096)));
      const varz = async () => (await fetch(`http://127.0.0.1:${httpPort}/debug/varz`, { signal: AbortSignal.timeout(5_000) })).text();
      const deadline = Date.now() + 15_000;
      while (
        !(await varz()
          .then(() => true)
          .catch(() => false))
      ) {
        if (child.exitCode !== null || Date.now() > deadline) throw new Error(`derper did not start:\n${stderr}`);
        await sleep(100);
      }
      servers.push({
        name: 'derper',
        stunPort,
        pid: child.pid,
        answered: async () => metricValue(await varz(), /^stun_requests\{disposition="success"\} (\d+)$/m),
        alive: () => {
          if (child.exitCode !== null || child.signalCode !== null) throw new Error(`derper exited:\n${stderr}`);
        },
      });
    }

    // One exchange each first: the answer must be right before it is measured at rate.
    for (const s of servers) {
      const one = await generate(s, { workers: 1, sockets: 1, window: 1, warmupMs: 0, durationMs: 300, timeoutMs });
      if (one.answered === 0 || one.invalid > 0)
        throw new Error(`${s.name}'s STUN port 127.0.0.1:${s.stunPort} gave no valid answer: ${one.firstInvalid ?? 'none came'}`);
    }
    console.log(servers.map((s) => `${s.name} STUN on 127.0.0.1:${s.stunPort} (pid ${s.pid})`).join('; ') + '\n');

    const flood = await phase('flood', servers, rounds, (s) =>
      generate(s, { workers, sockets, window, warmupMs: 1_000, durationMs: durationMs / rounds, timeoutMs }),
    );
    const tables = [
      table(
        `flood: ${sockets} sockets × ${window} requests in flight, ${rounds} × ${durationMs / rounds / 1000} s per server`,
        servers,
        flood,
      ),
    ];
    let paced: Map<string, Summary> | undefined;
    if (pacedDurationMs > 0) {
      const slower = Math.min(...[...flood.values()].map((x) => x.answersPerSec));
      const rate = Math.max(1_000, slower * pacedFraction);
      paced = await phase('paced', servers, rounds, (s) =>
        generate(s, { workers, sockets, ratePerSocket: rate / sockets, warmupMs: 500, durationMs: pacedDurationMs / rounds, timeoutMs }),
      );
      tables.push(
        table(
          `paced: ${sockets} sockets at ${fmtInt(rate)} requests/s in total (${Math.round(pacedFraction * 100)} % of the slower server's flood rate), ${rounds} × ${pacedDurationMs / rounds / 1000} s per server`,
          servers,
          paced,
        ),
      );
    }
    console.log('\n' + tables.join('\n\n'));
    const invalid = [flood, ...(paced ? [paced] : [])].flatMap((m) => [...m.values()]).filter((x) => x.invalid > 0);
    if (invalid.length > 0) {
      failed = true;
      console.log(`\nINVALID ANSWERS: ${invalid.map((x) => `${x.server}: ${x.invalid} (${x.firstInvalid})`).join('; ')}`);
    } else console.log('\nevery answer: a Binding Success for an outstanding transaction, XOR-MAPPED-ADDRESS = the sending socket');
    const m = flood.get('derpmesh')!;
    const d = flood.get('derper');
    if (d) {
      console.log(
        `derpmesh / derper answers/s (flood): ${fmtInt(m.answersPerSec)} / ${fmtInt(d.answersPerSec)} = ${fmtRatio(m.answersPerSec, d.answersPerSec)}; ` +
          `server CPU per answer ${fmtRatio(m.serverCpuUsPerAnswer, d.serverCpuUsPerAnswer)}` +
          (paced
            ? `; paced p50 ${fmtRatio(paced.get('derpmesh')!.p50Us, paced.get('derper')!.p50Us)}, p99 ${fmtRatio(paced.get('derpmesh')!.p99Us, paced.get('derper')!.p99Us)}`
            : ''),
      );
    }
  } catch (err) {
    failed = true;
    console.error(err);
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await node?.kill9();
    await postgres?.stop();
    for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  }
  if (failed) process.exitCode = 1;

  /** One load run over `workers` threads against `s`, with the server's CPU and counter around it. */
  async function generate(
    s: Server,
    o: {
      workers: number;
      sockets: number;
      window?: number;
      ratePerSocket?: number;
      warmupMs: number;
      durationMs: number;
      timeoutMs: number;
    },
  ): Promise<Round> {
    s.alive();
    const answered0 = await s.answered();
    const switches0 = contextSwitches(s.pid);
    const rcvbuf0 = udpReceiveBufferErrors();
    const cpu0 = cpuSeconds(s.pid);
    const gen0 = process.cpuUsage();
    const t0 = performance.now();
    const per = Array.from({ length: o.workers }, (_, w) => Math.floor(o.sockets / o.workers) + (w < o.sockets % o.workers ? 1 : 0));
    const results = await Promise.all(
      per.map(
        (count, w) =>
          new Promise<WorkerResult>((resolve, reject) => {
            const cfg: WorkerConfig = {
              worker: w,
              host: '127.0.0.1',
              port: s.stunPort,
              sockets: count,
              window: o.window,
              ratePerSocket: o.ratePerSocket,
              warmupMs: o.warmupMs,
              durationMs: o.durationMs,
              timeoutMs: o.timeoutMs,
            };
            const worker = new Worker(fileURLToPath(import.meta.url), { workerData: cfg });
            worker.once('message', resolve);
            worker.once('error', reject);
            worker.once('exit', (code) => reject(new Error(`load worker exited with ${code}`)));
          }),
      ),
    );
    const wallSecs = (performance.now() - t0) / 1000;
    const serverCpuSecs = cpuSeconds(s.pid) - cpu0;
    const serverSwitches = contextSwitches(s.pid) - switches0;
    const udpRcvbufErrors = udpReceiveBufferErrors() - rcvbuf0;
    const gen = process.cpuUsage(gen0);
    s.alive();
    const sum = (f: (r: WorkerResult) => number) => results.reduce((t, r) => t + f(r), 0);
    const latenciesUs = new Float64Array(sum((r) => r.latenciesUs.length));
    let at = 0;
    for (const r of results) {
      latenciesUs.set(r.latenciesUs, at);
      at += r.latenciesUs.length;
    }
    return {
      server: s.name,
      sent: sum((r) => r.sent),
      answered: sum((r) => r.answered),
      answersInWindow: sum((r) => r.answersInWindow),
      late: sum((r) => r.late),
      invalid: sum((r) => r.invalid),
      firstInvalid: results.find((r) => r.firstInvalid)?.firstInvalid,
      windowSecs: o.durationMs / 1000,
      latenciesUs,
      wallSecs,
      serverCpuSecs,
      genCpuSecs: (gen.user + gen.system) / 1e6,
      serverSwitches,
      udpRcvbufErrors,
      serverAnswered: (await s.answered()) - answered0,
    };
  }
}

interface Summary {
  server: string;
  answersPerSec: number;
  lossRatio: number;
  late: number;
  invalid: number;
  firstInvalid?: string;
  p50Us: number | undefined;
  p90Us: number | undefined;
  p99Us: number | undefined;
  samples: number;
  serverCores: number;
  serverCpuUsPerAnswer: number;
  genCores: number;
  serverSwitchesPerAnswer: number;
  udpRcvbufErrors: number;
  /** What the server's own counter says it answered, against what the generator received. */
  serverAnswered: number;
  received: number;
}

async function phase(label: string, servers: Server[], rounds: number, run: (s: Server) => Promise<Round>): Promise<Map<string, Summary>> {
  const done: Round[] = [];
  for (let i = 0; i < rounds; i++) {
    for (const s of i % 2 === 0 ? servers : [...servers].reverse()) {
      const r = await run(s);
      done.push(r);
      const sorted = r.latenciesUs.slice().sort();
      process.stderr.write(
        `  ${label} round ${i + 1}/${rounds} ${s.name.padEnd(8)} ${fmtInt(r.answersInWindow / r.windowSecs).padStart(9)} answers/s  ` +
          `loss ${fmtPct(r.sent === 0 ? 0 : 1 - r.answered / r.sent)}  p50 ${fmtMs(quantile(sorted, 0.5))}  p99 ${fmtMs(quantile(sorted, 0.99))}  ` +
          `server ${(r.serverCpuSecs / r.wallSecs).toFixed(2)} cores${r.invalid ? `  INVALID ${r.invalid}: ${r.firstInvalid}` : ''}\n`,
      );
    }
  }
  return new Map(
    servers.map((s) => [
      s.name,
      summarize(
        s.name,
        done.filter((r) => r.server === s.name),
      ),
    ]),
  );
}

function summarize(server: string, rs: Round[]): Summary {
  const sum = (f: (r: Round) => number) => rs.reduce((t, r) => t + f(r), 0);
  const all = new Float64Array(sum((r) => r.latenciesUs.length));
  let at = 0;
  for (const r of rs) {
    all.set(r.latenciesUs, at);
    at += r.latenciesUs.length;
  }
  all.sort();
  const answersPerSec = sum((r) => r.answersInWindow) / sum((r) => r.windowSecs);
  const serverCores = sum((r) => r.serverCpuSecs) / sum((r) => r.wallSecs);
  const sent = sum((r) => r.sent);
  return {
    server,
    answersPerSec,
    lossRatio: sent === 0 ? 0 : 1 - sum((r) => r.answered) / sent,
    late: sum((r) => r.late),
    invalid: sum((r) => r.invalid),
    firstInvalid: rs.find((r) => r.firstInvalid)?.firstInvalid,
    p50Us: quantile(all, 0.5),
    p90Us: quantile(all, 0.9),
    p99Us: quantile(all, 0.99),
    samples: all.length,
    serverCores,
    serverCpuUsPerAnswer: answersPerSec > 0 ? (serverCores * 1e6) / answersPerSec : NaN,
    genCores: sum((r) => r.genCpuSecs) / sum((r) => r.wallSecs),
    serverSwitchesPerAnswer:
      sum((r) => r.serverSwitches) /
      Math.max(
        1,
        sum((r) => r.serverAnswered),
      ),
    udpRcvbufErrors: sum((r) => r.udpRcvbufErrors),
    serverAnswered: sum((r) => r.serverAnswered),
    received: sum((r) => r.answered + r.late),
  };
}

function table(title: string, servers: Server[], s: Map<string, Summary>): string {
  const names = servers.map((x) => x.name);
  const withRatio = names.length === 2;
  const row = (label: string, f: (x: Summary) => string, r?: (x: Summary) => number | undefined) => [
    label,
    ...names.map((n) => f(s.get(n)!)),
    ...(withRatio ? [r ? fmtRatio(r(s.get(names[0]!)!), r(s.get(names[1]!)!)) : ''] : []),
  ];
  return formatTable(title, [
    ['', ...names, ...(withRatio ? [`${names[0]}/${names[1]}`] : [])],
    row(
      'answers/s',
      (x) => fmtInt(x.answersPerSec),
      (x) => x.answersPerSec,
    ),
    row('loss', (x) => fmtPct(x.lossRatio)),
    row('late answers', (x) => fmtInt(x.late)),
    row('invalid answers', (x) => fmtInt(x.invalid)),
    row(
      'latency p50',
      (x) => fmtMs(x.p50Us),
      (x) => x.p50Us,
    ),
    row(
      'latency p90',
      (x) => fmtMs(x.p90Us),
      (x) => x.p90Us,
    ),
    row(
      'latency p99',
      (x) => fmtMs(x.p99Us),
      (x) => x.p99Us,
    ),
    row('latency samples', (x) => fmtInt(x.samples)),
    row('server CPU (cores)', (x) => x.serverCores.toFixed(2)),
    row(
      'server CPU/answer',
      (x) => `${x.serverCpuUsPerAnswer.toFixed(2)} µs`,
      (x) => x.serverCpuUsPerAnswer,
    ),
    row(
      'server context switches/answer',
      (x) => x.serverSwitchesPerAnswer.toFixed(3),
      (x) => x.serverSwitchesPerAnswer,
    ),
    row('load gen CPU (cores)', (x) => x.genCores.toFixed(2)),
    row('kernel UDP receive-buffer drops', (x) => fmtInt(x.udpRcvbufErrors)),
    row("server's answered counter", (x) => fmtInt(x.serverAnswered)),
  ]);
}

/** Context switches (voluntary + involuntary) of every thread of `pid` so far; NaN if unreadable. */
function contextSwitches(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    let total = 0;
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      const status = readFileSync(`/proc/${pid}/task/${task}/status`, 'utf8');
      for (const m of status.matchAll(/^(?:non)?voluntary_ctxt_switches:\s+(\d+)$/gm)) total += Number(m[1]);
    }
    return total;
  } catch {
    return NaN;
  }
}

/** The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets of the machine). */
function udpReceiveBufferErrors(): number {
  try {
    const lines = readFileSync('/proc/net/snmp', 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('Udp:'));
    const names = lines[0]!.split(/\s+/);
    const counts = lines[1]!.split(/\s+/);
    return Number(counts[names.indexOf('RcvbufErrors')]);
  } catch {
    return NaN;
  }
}

function metricValue(text: string, re: RegExp): number {
  const m = re.exec(text);
  if (!m) throw new Error(`metric ${re.source} not found`);
  return Number(m[1]);
}

function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createSocket('udp4');
    s.once('error', reject);
    s.bind(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** derper's path: --derper, $DERPER, or bench/derper.sh (which uses the cached binary or builds it with Go). */
function findDerper(explicit: string | undefined): Promise<{ path: string } | { skip: string }> {
  const given = explicit ?? process.env.DERPER;
  if (given) return Promise.resolve(existsSync(given) ? { path: given } : { skip: `derper not found at ${given}` });
  const script = fileURLToPath(new URL('../../bench/derper.sh', import.meta.url));
  return new Promise((resolve) => {
    execFile('bash', [script], { encoding: 'utf8', timeout: 25 * 60_000 }, (err, stdout, stderr) => {
      const path = stdout.trim().split('\n').pop() ?? '';
      if (!err && existsSync(path)) resolve({ path });
      else if (existsSync(cachedDerper)) resolve({ path: cachedDerper });
      else resolve({ skip: `bench/derper.sh could not provide derper:\n${stderr.trim() || String(err)}` });
    });
  });
}
