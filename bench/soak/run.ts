// The soak (issue 12, point 3): a 3-node cluster (bench/chaos's ChaosCluster: real node processes on a
// throwaway Postgres, behind the access URL's balancer) under steady paced flows plus client churn, a
// fault every few minutes, and a sample of every node at a fixed period: its RSS and open descriptors
// (/proc), its connection gauges and drop counters (/metrics), and what the flows lost in the interval.
// Used by bench/soak.ts (npm run bench:soak) and test/soak.test.ts (the short CI variant).
//
// Loss is counted by sequence number. At each sample the flows' `sent` counters are read (each is the
// flow's next sequence number), so interval k holds the packets numbered from the count at its start
// to the count at its end; this module keeps its own record of the sequence numbers that arrived (its
// own listener on each client), and an interval's loss is the numbers in its range that never did. A
// packet in flight at a boundary belongs to the interval that sent it and counts once it arrives: each
// row is computed `drainMs` after its sample, and every interval again at the end, after traffic
// stopped and drained (the verdict uses the end's count).
//
// A fault window runs from 1 s before the fault began until the fault is over (the node restarted and
// meshed again, or discovery resumed after Postgres returned), plus `afterFaultMs` (10 s); an interval
// overlapping one is a fault interval. Outside fault intervals the loss must be 0. Faults begin half a
// sampling period after each multiple of `faultEveryMs`; node faults hit the nodes in turn, last
// first, so that every fault hits a node holding steady clients.
//
// Churn: pairs of extra clients (not the harness's) connect through the access URL, exchange
// `churnPackets` packets each way (a packet still missing after 1 s is sent again; every client of
// every pair must have all of its partner's within 15 s) and close.
//
// Growth: per node and process (a node restarted by a fault starts a new series), the samples taken at
// least `warmupMs` after the process started (the first processes: after traffic started) and outside
// fault windows; the mean of the last third against the mean of the first third. RSS may grow by 5 %
// or `rssSlackMiB`, whichever is more. Descriptors are judged net of the node's steady clients (one
// descriptor each: a fault moves clients to the surviving nodes, which is load, not a leak) and may
// grow by 5 % of the node's descriptors or `fdSlack`, whichever is more. With `heap`, each node process
// also reports its V8 heap (bench/soak/heap-probe.ts), to tell the heap growing to its working size
// apart from memory kept for good.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

import { DerpClient } from '../../src/client/index.js';
import { ChaosCluster, type FaultWindow } from '../chaos/harness.js';
import { quantile } from '../report.js';
import type { HeapProbe } from './heap-probe.js';

export const soakFaults = ['sigterm', 'kill9', 'pg-restart'] as const;
export type SoakFault = (typeof soakFaults)[number];

export interface SoakOptions {
  /** How long the traffic runs (ms). */
  durationMs: number;
  /** Sampling period (default 30 s). */
  sampleMs?: number;
  /** Steady clients through the access URL (default 300). */
  clients?: number;
  /** Packets per second of each steady flow (default 10). */
  rate?: number;
  /** Churn clients per minute, in pairs (default 60; 0 = none). */
  churnPerMinute?: number;
  /** Packets each churn client sends its partner (default 5). */
  churnPackets?: number;
  /** A fault every this long (default 5 min; 0 = none). */
  faultEveryMs?: number;
  /** The faults, in turn (default sigterm, kill9, pg-restart). */
  faults?: SoakFault[];
  /** At most this many faults (default: as many as fit). */
  maxFaults?: number;
  /** How long a stopped or killed node stays down before its restart (default 5 s). */
  downMs?: number;
  /** Samples this soon after a process started are not judged for growth (default 2 min). */
  warmupMs?: number;
  /** The nodes' heartbeat (default 1 s). */
  heartbeatMs?: number;
  /** Wait after a sample before its interval's loss is counted (default 2 s). */
  drainMs?: number;
  /** A fault window lasts this long after the fault is over (default 10 s). */
  afterFaultMs?: number;
  /** Growth allowed in RSS however small the node (default 4 MiB). */
  rssSlackMiB?: number;
  /** Growth allowed in descriptors however few the node has (default 8). */
  fdSlack?: number;
  /** Load bench/soak/heap-probe into each node process and sample its V8 heap too (default false). */
  heap?: boolean;
  /** Everything over TLS: HTTPS nodes with a private CA, meshed over TLS, clients verifying it (default false). */
  tls?: boolean;
  /** Progress lines. */
  log?: (line: string) => void;
  /** Each sample, once its interval's loss is counted. */
  onSample?: (sample: SoakSample) => void;
}

export type ResolvedSoakOptions = Required<Omit<SoakOptions, 'log' | 'onSample'>>;

const GAUGES = [
  'connections',
  'clients',
  'mesh_links',
  'forwarders',
  'accepted_open_connections',
  'queued_packets',
  'queue_depth_max',
] as const;
const PACKET_DROPS = [
  'dropped_packets_total{reason="unknown_dest"}',
  'dropped_packets_total{reason="unknown_dest_on_fwd"}',
  'dropped_packets_total{reason="queue_full"}',
  'dropped_packets_total{reason="gone"}',
] as const;
const DROPS = [...PACKET_DROPS, 'write_timeouts_total'] as const;
type Gauge = (typeof GAUGES)[number];
type Drop = (typeof DROPS)[number];

export interface NodeSample {
  name: string;
  /** The process sampled; undefined while the node is down. */
  pid?: number;
  rssKiB?: number;
  fds?: number;
  /** Steady clients on the node (by the relay key each one's connection saw). */
  steady: number;
  /** From /metrics, when it answered. */
  gauges?: Record<Gauge, number>;
  /** The drop counters (and write timeouts) of this process so far. */
  drops?: Record<Drop, number>;
  /** Packets dropped (the four derpmesh_dropped_packets_total series) since the previous sample of this process. */
  dropsInInterval?: number;
  /** With `heap`: the V8 heap (MiB), and what it held after its latest major collection. */
  heap?: { usedMiB: number; totalMiB: number; liveMiB?: number; majorGcs: number };
}

export interface SoakInterval {
  /** Seconds since traffic started. */
  fromS: number;
  toS: number;
  /** Packets of the steady flows sent in the interval, lost (never arrived), arrived twice. */
  sent: number;
  lost: number;
  duplicated: number;
  /** Sends skipped while the sender was between connections. */
  notSent: number;
  /** Faults whose window the interval overlaps (indexes into the report's faults), and in words:
   * `sigterm node-2` where the fault began in the interval, `(sigterm node-2)` where it went on. */
  faults: number[];
  faultMarks: string[];
  /** In a fault interval: packets lost by flows that did not touch a faulted node. */
  lostElsewhere: number;
  /** Churn pairs that started in the interval: all, and those done with every packet (so far). */
  churnPairs: number;
  churnOk: number;
}

export interface SoakSample {
  /** Seconds since traffic started. */
  t: number;
  nodes: NodeSample[];
  /** The interval that ended at this sample (not on the first sample). */
  interval?: SoakInterval;
}

export interface SoakFaultRecord {
  kind: SoakFault;
  /** The node hit (undefined: Postgres). */
  node?: number;
  target: string;
  /** Seconds since traffic started: the fault began, and was over. */
  beganS: number;
  endedS?: number;
  note: string;
}

export interface ChurnSummary {
  pairs: number;
  clients: number;
  /** Clients that got all their partner's packets. */
  ok: number;
  failed: number;
  /** Of the failed, those whose pair overlapped a fault window. */
  failedInFaultWindows: number;
  packets: number;
  /** Packets that arrived the first time they were sent, and packets sent again. */
  firstTry: number;
  resent: number;
  /** Packets that did not arrive at the first send in pairs that overlapped no fault window. */
  missedFirstOutside: number;
  /** The pairs with packets that did not arrive at the first send (the first few), in words. */
  missedFirst: string[];
  /** Connects that failed and were tried again; reconnects during an exchange. */
  connectRetries: number;
  reconnects: number;
  /** Time from the pair's start (both connecting) until both had every packet. */
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** The first few failures, in words. */
  failures: string[];
}

export interface SeriesJudgment {
  node: string;
  pid: number;
  /** Samples of the process, and those judged (after warm-up, outside fault windows). */
  samples: number;
  judged: number;
  /** Means of the first and the last third of the judged samples. */
  rssFirstMiB: number;
  rssLastMiB: number;
  rssOk: boolean;
  /** Descriptors net of the node's steady clients; the raw count of the first third. */
  fdsNetFirst: number;
  fdsNetLast: number;
  fdsFirst: number;
  fdsOk: boolean;
  /** With `heap`: the V8 heap's size and its live part after major collections, first and last third. */
  heapTotalFirstMiB?: number;
  heapTotalLastMiB?: number;
  heapLiveFirstMiB?: number;
  heapLiveLastMiB?: number;
  /** Set when the series is too short to judge (fewer than 3 judged samples). */
  skipped?: string;
}

export interface StateCheck {
  node: string;
  /** Gauges net of the steady clients (clients and connections: minus the node's own; forwarders:
   * minus the other nodes'), before the traffic started and after the run. */
  baseline: Record<'clients' | 'connections' | 'forwarders', number>;
  final?: Record<'clients' | 'connections' | 'forwarders', number>;
  ok: boolean;
}

export interface SoakVerdict {
  target: string;
  /** One of the issue's targets (the others are this soak's own checks). */
  issue: boolean;
  ok: boolean;
  detail: string;
}

export interface SoakReport {
  options: ResolvedSoakOptions;
  samples: SoakSample[];
  faults: SoakFaultRecord[];
  flows: {
    flows: number;
    sent: number;
    lost: number;
    duplicated: number;
    /** Outside fault intervals. */
    sentOutside: number;
    lostOutside: number;
    duplicatedOutside: number;
    /** In fault intervals: all, and by flows not touching a faulted node. */
    lostInFaults: number;
    lostElsewhereInFaults: number;
    /** Flows that lost packets although they touched no faulted node (at any fault), and those packets. */
    flowsLostUntouched: number;
    lostUntouched: number;
    /** Packets the rows counted lost that arrived later (the rows' drain was too short). */
    arrivedAfterRow: number;
    /** The flows that lost packets outside fault windows (the first 10): the nodes of their clients at
     * the end, and the intervals (seconds since traffic started) with their losses. */
    lossy: { flow: number; from: string; to: string; lost: number; intervals: string[] }[];
  };
  /** Steady clients whose connection broke (the harness's clients reconnect), and when. */
  disconnects: { atS: number; client: number; node: string; inFaultWindow: boolean; error: string }[];
  /** Packets dropped by the relays (derpmesh_dropped_packets_total) in intervals outside fault windows. */
  dropsOutside: number;
  churn: ChurnSummary;
  series: SeriesJudgment[];
  state: StateCheck[];
  verdicts: SoakVerdict[];
  /** Milliseconds the cluster took to start, the traffic ran, everything took. */
  timing: { startMs: number; trafficMs: number; totalMs: number };
}

export function resolveSoakOptions(options: SoakOptions): ResolvedSoakOptions {
  const o: ResolvedSoakOptions = {
    durationMs: options.durationMs,
    sampleMs: options.sampleMs ?? 30_000,
    clients: options.clients ?? 300,
    rate: options.rate ?? 10,
    churnPerMinute: options.churnPerMinute ?? 60,
    churnPackets: options.churnPackets ?? 5,
    faultEveryMs: options.faultEveryMs ?? 300_000,
    faults: options.faults ?? [...soakFaults],
    maxFaults: options.maxFaults ?? Infinity,
    downMs: options.downMs ?? 5_000,
    warmupMs: options.warmupMs ?? 120_000,
    heartbeatMs: options.heartbeatMs ?? 1_000,
    drainMs: options.drainMs ?? 2_000,
    afterFaultMs: options.afterFaultMs ?? 10_000,
    rssSlackMiB: options.rssSlackMiB ?? 4,
    fdSlack: options.fdSlack ?? 8,
    heap: options.heap ?? false,
    tls: options.tls ?? false,
  };
  const problems: string[] = [];
  if (!(o.sampleMs >= 1_000)) problems.push(`the sampling period must be at least 1 s (got ${secs(o.sampleMs)})`);
  if (!(o.drainMs >= 0 && o.drainMs < o.sampleMs)) problems.push(`the drain (${secs(o.drainMs)}) must be shorter than the sampling period`);
  if (!(o.durationMs >= o.warmupMs + 3 * o.sampleMs))
    problems.push(
      `the duration (${secs(o.durationMs)}) must leave at least 3 samples after the warm-up (${secs(o.warmupMs)} + 3 × ${secs(o.sampleMs)})`,
    );
  if (!(o.clients >= 2)) problems.push(`at least 2 steady clients (got ${o.clients})`);
  if (!(o.rate > 0)) problems.push(`the rate must be positive (got ${o.rate})`);
  if (!(o.churnPerMinute >= 0)) problems.push(`churn must be 0 or more clients per minute (got ${o.churnPerMinute})`);
  if (!(o.faultEveryMs === 0 || o.faultEveryMs >= 20_000))
    problems.push(`faults must be at least 20 s apart, or 0 for none (got ${secs(o.faultEveryMs)})`);
  if (o.faults.length === 0 || o.faults.some((f) => !soakFaults.includes(f)))
    problems.push(`faults are some of ${soakFaults.join(', ')} (got ${o.faults.join(', ') || 'none'})`);
  if (problems.length > 0) throw new Error(`soak: ${problems.join('; ')}`);
  return o;
}

/** Runs the soak on a fresh cluster and tears it down. Throws if the run itself fails. */
export async function runSoak(options: SoakOptions): Promise<SoakReport> {
  const o = resolveSoakOptions(options);
  const log = options.log ?? (() => {});
  const begin = performance.now();
  // The node processes inherit this process's environment (test/helpers/cluster.ts).
  const env = { NODE_OPTIONS: process.env.NODE_OPTIONS, DERPMESH_SOAK_HEAP_DIR: process.env.DERPMESH_SOAK_HEAP_DIR };
  const heapDir = o.heap ? mkdtempSync(join(tmpdir(), 'derpmesh-soak-heap-')) : undefined;
  if (heapDir) {
    process.env.NODE_OPTIONS = `${env.NODE_OPTIONS ?? ''} --import=${new URL('./heap-probe.js', import.meta.url).href}`.trim();
    process.env.DERPMESH_SOAK_HEAP_DIR = heapDir;
  }
  try {
    const cluster = await ChaosCluster.start({ clients: o.clients, rate: o.rate, heartbeatMs: o.heartbeatMs, tls: o.tls, log });
    const soak = new Soak(cluster, o, log, options.onSample ?? (() => {}), heapDir);
    try {
      const report = await soak.run(performance.now() - begin);
      report.timing.totalMs = performance.now() - begin;
      return report;
    } finally {
      await soak.close();
      await cluster.close();
    }
  } finally {
    for (const [name, value] of Object.entries(env)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    if (heapDir) rmSync(heapDir, { recursive: true, force: true });
  }
}

// ---- bookkeeping ---------------------------------------------------------------------------------

/** The sequence numbers of one flow that arrived, and those that arrived more than once. */
class Arrivals {
  #bits = new Uint8Array(256);
  duplicates: number[] = [];

  add(seq: number): void {
    if (seq >= this.#bits.length * 8) {
      const grown = new Uint8Array(Math.max(this.#bits.length * 2, (seq >> 3) + 1));
      grown.set(this.#bits);
      this.#bits = grown;
    }
    const bit = 1 << (seq & 7);
    if (this.#bits[seq >> 3]! & bit) this.duplicates.push(seq);
    else this.#bits[seq >> 3]! |= bit;
  }

  /** How many of the numbers in [from, to) arrived. */
  countIn(from: number, to: number): number {
    let n = 0;
    for (let seq = from; seq < to; seq++) if (this.#bits[seq >> 3]! & (1 << (seq & 7))) n++;
    return n;
  }
}

interface Tick {
  at: number;
  /** Each flow's `sent` and `notSent` at the tick. */
  sent: Uint32Array;
  notSent: Uint32Array;
}

interface FaultState extends SoakFaultRecord {
  window: FaultWindow;
  began: number;
  ended?: number;
}

interface ChurnPair {
  id: number;
  started: number;
  ended?: number;
  ok?: boolean;
  /** Clients of the pair that got every packet of their partner. */
  clientsOk: number;
  /** The node each client connected to first (by the relay key its handshake saw), and when. */
  nodes: string[];
  connected: number[];
  /** When the first packets went out. */
  firstSend?: number;
  firstTry: number;
  resent: number;
  connectRetries: number;
  reconnects: number;
  error?: string;
}

const MiB = 1024;
const CHURN_MAGIC = 0x534f414b; // 'SOAK'
const CHURN_DEADLINE_MS = 15_000;
const CHURN_BYTES = 64;
/** A fault window opens this long before the fault (a packet sent just before it may be in the node). */
const WINDOW_LEAD_MS = 1_000;

const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
const alive = (n: { child: { exitCode: number | null; signalCode: NodeJS.Signals | null } } | undefined) =>
  n !== undefined && n.child.exitCode === null && n.child.signalCode === null;

/** VmRSS (KiB) and the number of open descriptors of `pid`; undefined if it is gone. */
function readProc(pid: number | undefined): { rssKiB: number; fds: number } | undefined {
  if (pid === undefined) return undefined;
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const rss = /^VmRSS:\s+(\d+) kB/m.exec(status);
    if (!rss) return undefined;
    return { rssKiB: Number(rss[1]), fds: readdirSync(`/proc/${pid}/fd`).length };
  } catch {
    return undefined;
  }
}

/** What bench/soak/heap-probe last wrote for `pid` (MiB). */
function readHeap(dir: string | undefined, pid: number | undefined): NodeSample['heap'] {
  if (dir === undefined || pid === undefined) return undefined;
  try {
    const h = JSON.parse(readFileSync(join(dir, String(pid)), 'utf8')) as HeapProbe;
    const mib = (b: number) => b / 1048576;
    return {
      usedMiB: mib(h.heapUsed),
      totalMiB: mib(h.heapTotal),
      liveMiB: h.liveAfterMajorGc === undefined ? undefined : mib(h.liveAfterMajorGc),
      majorGcs: h.majorGcs,
    };
  } catch {
    return undefined;
  }
}

/** The `derpmesh_*` samples of a Prometheus text page, by name without the prefix and labels as served. */
export function parseMetrics(text: string): Map<string, number> {
  const values = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^derpmesh_([a-z0-9_]+(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (m) values.set(m[1]!, Number(m[2]));
  }
  return values;
}

function pick<K extends string>(values: Map<string, number>, names: readonly K[]): Record<K, number> | undefined {
  const out = {} as Record<K, number>;
  for (const name of names) {
    const v = values.get(name);
    if (v === undefined) return undefined;
    out[name] = v;
  }
  return out;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

class Soak {
  #ticks: Tick[] = [];
  #arrivals: Arrivals[];
  #faults: FaultState[] = [];
  #samples: SoakSample[] = [];
  #pairs: ChurnPair[] = [];
  #churning = new Set<Promise<void>>();
  #churnClients = new Set<DerpClient>();
  /** When each node process started (performance.now()), by pid. */
  #processStart = new Map<number, number>();
  #lastDrops = new Map<number, number>();
  #rowLost: number[] = [];
  #t0 = 0;
  #stop = new AbortController();
  #failure: Error | undefined;
  #state: StateCheck[] = [];
  #disconnects: { at: number; client: number; node: string; error: string }[] = [];
  /** Node names by relay key (learned at the start and after each restart). */
  #nodeKeys = new Map<string, string>();

  constructor(
    readonly cluster: ChaosCluster,
    readonly o: ResolvedSoakOptions,
    readonly log: (line: string) => void,
    readonly onSample: (sample: SoakSample) => void,
    readonly heapDir: string | undefined,
  ) {
    this.#arrivals = cluster.flows.map(() => new Arrivals());
  }

  async run(startMs: number): Promise<SoakReport> {
    const { cluster, o } = this;
    await this.#baseline();
    await this.#learnKeys();
    for (const c of cluster.clients) {
      c.client.on('packet', (_source, data) => this.#arrived(data));
      c.client.on('disconnected', (error) => {
        let node = '?';
        try {
          node = this.#nodeKeys.get(c.client.serverPublicKey.toString('hex')) ?? '?';
        } catch {
          // No key yet.
        }
        this.#disconnects.push({ at: performance.now(), client: c.index, node, error: error?.message ?? 'closed' });
      });
    }
    cluster.startTraffic();
    this.#t0 = performance.now();
    for (const n of cluster.nodes) if (n?.child.pid !== undefined) this.#processStart.set(n.child.pid, this.#t0);
    this.log(
      `traffic: ${cluster.flows.length} flows × ${o.rate} packets/s; churn ${o.churnPerMinute} clients/min; ` +
        (o.faultEveryMs > 0 ? `a fault every ${secs(o.faultEveryMs)} (${o.faults.join(', ')} in turn)` : 'no faults'),
    );
    await this.#sample();
    const churn = this.#churnLoop();
    const faults = this.#faultLoop();
    faults.catch((err: Error) => (this.#failure ??= err));
    for (let k = 1; k * o.sampleMs <= o.durationMs; k++) {
      await this.#until(this.#t0 + k * o.sampleMs);
      if (this.#failure) break;
      await this.#sample();
    }
    this.#stop.abort();
    await faults.catch(() => {});
    await churn;
    await Promise.all(this.#churning);
    const trafficMs = performance.now() - this.#t0;
    if (this.#failure) throw this.#failure;
    await cluster.stopTraffic(o.drainMs);
    await this.#finalState();
    return this.#report(startMs, trafficMs);
  }

  async close(): Promise<void> {
    this.#stop.abort();
    await Promise.all([...this.#churnClients].map((c) => c.close().catch(() => {})));
  }

  async #until(at: number): Promise<void> {
    const ms = at - performance.now();
    if (ms > 0) await sleep(ms);
  }

  #arrived(data: Buffer): void {
    if (data.length < 16) return;
    this.#arrivals[data.readUInt32BE(0)]?.add(data.readUInt32BE(4));
  }

  // ---- samples -----------------------------------------------------------------------------------

  async #sample(): Promise<void> {
    const { cluster, o } = this;
    // The counters first, in the same turn: every packet numbered below them was sent before this.
    const at = performance.now();
    this.#ticks.push({
      at,
      sent: Uint32Array.from(cluster.flows, (f) => f.sent),
      notSent: Uint32Array.from(cluster.flows, (f) => f.notSent),
    });
    const placement = cluster.placement();
    const nodes = cluster.nodes.map((n) => (alive(n) ? n : undefined));
    const procs = nodes.map((n) => readProc(n?.child.pid));
    const pages = await Promise.all(nodes.map((n) => n?.metrics().then(parseMetrics, () => undefined)));
    const samples: NodeSample[] = cluster.nodes.map((n, i) => {
      const pid = procs[i] ? nodes[i]!.child.pid : undefined;
      const s: NodeSample = { name: n?.name ?? `node-${i}`, pid, rssKiB: procs[i]?.rssKiB, fds: procs[i]?.fds, steady: placement[i]! };
      if (this.heapDir) s.heap = readHeap(this.heapDir, pid);
      const page = pages[i];
      if (page && pid !== undefined) {
        s.gauges = pick(page, GAUGES);
        s.drops = pick(page, DROPS);
        if (s.drops) {
          const d = s.drops;
          const all = PACKET_DROPS.reduce((sum, k) => sum + d[k], 0);
          s.dropsInInterval = all - (this.#lastDrops.get(pid) ?? 0);
          this.#lastDrops.set(pid, all);
        }
      }
      return s;
    });
    const sample: SoakSample = { t: (at - this.#t0) / 1000, nodes: samples };
    this.#samples.push(sample);
    const k = this.#ticks.length - 1;
    if (k > 0) {
      await this.#until(at + o.drainMs);
      sample.interval = this.#interval(k);
      this.#rowLost[k] = sample.interval.lost;
    }
    this.onSample(sample);
  }

  /** Faults whose window overlaps [from, to] (performance.now() times). */
  #faultsOverlapping(from: number, to: number): number[] {
    const out: number[] = [];
    for (const [i, f] of this.#faults.entries()) {
      const end = f.ended === undefined ? Infinity : f.ended + this.o.afterFaultMs;
      if (f.began - WINDOW_LEAD_MS <= to && end >= from) out.push(i);
    }
    return out;
  }

  /** Whether a flow touched the node of one of `faults` when that fault began. */
  #touches(flow: number, faults: number[]): boolean {
    const f = this.cluster.flows[flow]!;
    return faults.some((i) => {
      const fault = this.#faults[i]!;
      return fault.node !== undefined && (fault.window.placement[f.from] === fault.node || fault.window.placement[f.to] === fault.node);
    });
  }

  /** Interval k (from tick k-1 to tick k), counted with what has arrived so far. */
  #interval(k: number): SoakInterval {
    const a = this.#ticks[k - 1]!;
    const b = this.#ticks[k]!;
    const faults = this.#faultsOverlapping(a.at, b.at);
    let sent = 0;
    let lost = 0;
    let duplicated = 0;
    let notSent = 0;
    let lostElsewhere = 0;
    for (const [f, arrivals] of this.#arrivals.entries()) {
      const from = a.sent[f]!;
      const to = b.sent[f]!;
      const missing = to - from - arrivals.countIn(from, to);
      sent += to - from;
      lost += missing;
      notSent += b.notSent[f]! - a.notSent[f]!;
      duplicated += arrivals.duplicates.filter((seq) => seq >= from && seq < to).length;
      if (faults.length > 0 && missing > 0 && !this.#touches(f, faults)) lostElsewhere += missing;
    }
    const pairs = this.#pairs.filter((p) => p.started >= a.at && p.started < b.at);
    return {
      fromS: (a.at - this.#t0) / 1000,
      toS: (b.at - this.#t0) / 1000,
      sent,
      lost,
      duplicated,
      notSent,
      faults,
      faultMarks: faults.map((i) => {
        const f = this.#faults[i]!;
        return f.began >= a.at && f.began < b.at ? `${f.kind} ${f.target}` : `(${f.kind} ${f.target})`;
      }),
      lostElsewhere,
      churnPairs: pairs.length,
      churnOk: pairs.filter((p) => p.ok).length,
    };
  }

  // ---- faults ------------------------------------------------------------------------------------

  async #faultLoop(): Promise<void> {
    const { o } = this;
    if (o.faultEveryMs === 0) return;
    // Half a sampling period after each multiple of `faultEveryMs`, so that a fault window overlaps
    // as few intervals as it can; a fault needs ~30 s (the node down, its restart, the window after it).
    for (let k = 1; k <= o.maxFaults && k * o.faultEveryMs + o.sampleMs / 2 + 30_000 <= o.durationMs; k++) {
      try {
        await sleep(this.#t0 + k * o.faultEveryMs + o.sampleMs / 2 - performance.now(), undefined, { signal: this.#stop.signal });
      } catch {
        return;
      }
      await this.#fault(k - 1);
    }
  }

  async #fault(i: number): Promise<void> {
    const { cluster, o } = this;
    const kind = o.faults[i % o.faults.length]!;
    const nodeFaults = this.#faults.filter((f) => f.node !== undefined).length;
    const victim = kind === 'pg-restart' ? undefined : cluster.nodes.length - 1 - (nodeFaults % cluster.nodes.length);
    const window = cluster.beginFault(victim);
    const target = victim === undefined ? 'postgres' : cluster.nodes[victim]!.name;
    const fault: FaultState = { kind, node: victim, target, window, began: window.at, beganS: (window.at - this.#t0) / 1000, note: '' };
    this.#faults.push(fault);
    const placement = victim === undefined ? '' : ` (${window.placement.filter((p) => p === victim).length} steady clients on it)`;
    this.log(`+${secs(window.at - this.#t0)} fault ${i + 1}: ${kind} of ${target}${placement}`);
    const notes: string[] = [];
    if (victim !== undefined) {
      if (kind === 'sigterm') {
        const code = await cluster.stop(victim);
        notes.push(`exited with ${code} ${secs(performance.now() - window.at)} after SIGTERM`);
      } else {
        await cluster.kill9(victim);
      }
      await sleep(o.downMs);
      await cluster.restart(victim);
      await this.#learnKeys();
      const pid = cluster.nodes[victim]!.child.pid;
      if (pid !== undefined) this.#processStart.set(pid, performance.now());
      notes.push(`restarted after ${secs(o.downMs)} down, meshed again ${secs(performance.now() - window.at)} after the fault began`);
    } else {
      await cluster.pg!.restart();
      const ms = await cluster.waitDiscovery(60_000);
      notes.push(`discovery resumed ${secs(ms)} after the restart`);
    }
    fault.ended = performance.now();
    fault.endedS = (fault.ended - this.#t0) / 1000;
    fault.note = notes.join('; ');
    this.log(`+${secs(fault.ended - this.#t0)} fault ${i + 1} over: ${fault.note}; clients per node ${cluster.placement().join(' / ')}`);
  }

  // ---- churn -------------------------------------------------------------------------------------

  async #churnLoop(): Promise<void> {
    const { o } = this;
    if (o.churnPerMinute === 0) return;
    const every = 120_000 / o.churnPerMinute;
    for (let id = 0; ; id++) {
      const at = this.#t0 + (id + 0.5) * every;
      if (at - this.#t0 >= o.durationMs) return;
      try {
        await sleep(at - performance.now(), undefined, { signal: this.#stop.signal });
      } catch {
        return;
      }
      const run = this.#churnPair(id);
      this.#churning.add(run);
      void run.finally(() => this.#churning.delete(run));
    }
  }

  async #churnPair(id: number): Promise<void> {
    const { cluster, o } = this;
    const pair: ChurnPair = {
      id,
      started: performance.now(),
      clientsOk: 0,
      nodes: ['?', '?'],
      connected: [NaN, NaN],
      firstTry: 0,
      resent: 0,
      connectRetries: 0,
      reconnects: 0,
    };
    this.#pairs.push(pair);
    const deadline = pair.started + CHURN_DEADLINE_MS;
    // got[s]: the sequence numbers client s has from its partner.
    const got = [new Set<number>(), new Set<number>()];
    const onPacket = (side: number, data: Buffer) => {
      if (data.length < 16 || data.readUInt32BE(0) !== CHURN_MAGIC || data.readUInt32BE(4) !== id) return;
      const seq = data.readUInt32BE(8);
      if (got[side]!.has(seq)) return;
      got[side]!.add(seq);
      if (data.readUInt32BE(12) === 0) pair.firstTry++;
    };
    const connect = async (side: number): Promise<DerpClient> => {
      for (;;) {
        const client = new DerpClient({ url: cluster.accessUrl, reconnect: true, connectTimeoutMs: 5_000, tls: cluster.clientTls });
        client.on('packet', (_source, data) => onPacket(side, data));
        client.on('reconnected', () => pair.reconnects++);
        this.#churnClients.add(client);
        try {
          await client.connect();
          pair.nodes[side] = this.#nodeKeys.get(client.serverPublicKey.toString('hex')) ?? '?';
          pair.connected[side] = performance.now();
          return client;
        } catch (err) {
          this.#churnClients.delete(client);
          if (performance.now() + 250 > deadline) throw err;
          pair.connectRetries++;
          await sleep(250);
        }
      }
    };
    const clients: DerpClient[] = [];
    const done = () => got[0]!.size === o.churnPackets && got[1]!.size === o.churnPackets;
    try {
      const connected = await Promise.allSettled([connect(0), connect(1)]);
      for (const c of connected) if (c.status === 'fulfilled') clients.push(c.value);
      for (const c of connected) if (c.status === 'rejected') throw c.reason;
      const packet = Buffer.alloc(CHURN_BYTES);
      packet.writeUInt32BE(CHURN_MAGIC, 0);
      packet.writeUInt32BE(id, 4);
      pair.firstSend = performance.now();
      for (let attempt = 0; ; attempt++) {
        for (const side of [0, 1]) {
          for (let seq = 0; seq < o.churnPackets; seq++) {
            if (got[1 - side]!.has(seq)) continue;
            packet.writeUInt32BE(seq, 8);
            packet.writeUInt32BE(attempt, 12);
            if (attempt > 0) pair.resent++;
            try {
              clients[side]!.send(clients[1 - side]!.publicKey, packet);
            } catch {
              // Closed: sent again next round.
            }
          }
        }
        const wait = performance.now() + (attempt === 0 ? 1_000 : 500);
        while (!done() && performance.now() < wait) await sleep(10);
        if (done()) break;
        if (performance.now() > deadline)
          throw new Error(`after ${attempt + 1} sends: ${got[0]!.size} and ${got[1]!.size} of ${o.churnPackets} packets`);
      }
      pair.ok = true;
    } catch (err) {
      pair.ok = false;
      pair.error = (err as Error).message;
    } finally {
      pair.clientsOk = got.filter((g) => g.size === o.churnPackets).length;
      pair.ended = performance.now();
      await Promise.all(
        clients.map(async (c) => {
          await c.close().catch(() => {});
          this.#churnClients.delete(c);
        }),
      );
    }
  }

  /** Each live node's relay key, by connecting to it directly once. */
  async #learnKeys(): Promise<void> {
    for (const n of this.cluster.nodes) {
      if (!alive(n)) continue;
      const probe = await DerpClient.connect({ url: n!.url, tls: this.cluster.clientTls });
      this.#nodeKeys.set(probe.serverPublicKey.toString('hex'), n!.name);
      await probe.close();
    }
  }

  // ---- per-node state ----------------------------------------------------------------------------

  /** Gauges net of the steady clients, per node; undefined where /metrics did not answer. */
  async #netGauges(): Promise<(StateCheck['baseline'] | undefined)[]> {
    const { cluster } = this;
    const placement = cluster.placement();
    const total = placement.reduce((a, b) => a + b, 0);
    return Promise.all(
      cluster.nodes.map(async (n, i) => {
        if (!alive(n)) return undefined;
        const page = await n!.metrics().then(parseMetrics, () => undefined);
        const g = page && pick(page, GAUGES);
        if (!g) return undefined;
        const own = placement[i]!;
        return { clients: g.clients - own, connections: g.connections - own, forwarders: g.forwarders - (total - own) };
      }),
    );
  }

  /** The nodes' gauges once they hold still (two equal readings 1 s apart), before any traffic. */
  async #baseline(): Promise<void> {
    let last = '';
    for (let i = 0; i < 20; i++) {
      const now = await this.#netGauges();
      const text = JSON.stringify(now);
      if (text === last && now.every((x) => x !== undefined)) {
        this.#state = this.cluster.nodes.map((n, j) => ({ node: n!.name, baseline: now[j]!, ok: false }));
        return;
      }
      last = text;
      await sleep(1_000);
    }
    throw new Error(`the nodes' gauges did not settle before the traffic started: ${last}`);
  }

  /** After the run: every node's gauges back to its baseline (waits up to 20 s for them to settle). */
  async #finalState(): Promise<void> {
    const same = (a: StateCheck['baseline'], b?: StateCheck['baseline']) =>
      b !== undefined && a.clients === b.clients && a.connections === b.connections && a.forwarders === b.forwarders;
    const start = performance.now();
    for (;;) {
      const now = await this.#netGauges();
      for (const [i, s] of this.#state.entries()) {
        s.final = now[i];
        s.ok = same(s.baseline, s.final);
      }
      if (this.#state.every((s) => s.ok) || performance.now() - start > 20_000) break;
      await sleep(1_000);
    }
  }

  // ---- the report --------------------------------------------------------------------------------

  #inWindow(at: number): boolean {
    return this.#faultsOverlapping(at, at).length > 0;
  }

  #judge(): SeriesJudgment[] {
    const { o } = this;
    const out: SeriesJudgment[] = [];
    for (let i = 0; i < this.cluster.nodes.length; i++) {
      const byPid = new Map<number, { at: number; s: NodeSample }[]>();
      for (const [k, sample] of this.#samples.entries()) {
        const s = sample.nodes[i];
        if (s?.pid === undefined || s.rssKiB === undefined || s.fds === undefined) continue;
        let list = byPid.get(s.pid);
        if (!list) byPid.set(s.pid, (list = []));
        list.push({ at: this.#ticks[k]!.at, s });
      }
      for (const [pid, list] of byPid) {
        const start = this.#processStart.get(pid) ?? this.#t0;
        // Timers may fire a millisecond early: a sample due at the end of the warm-up counts.
        const judged = list.filter((x) => x.at >= start + o.warmupMs - 100 && !this.#inWindow(x.at)).map((x) => x.s);
        const third = Math.floor(judged.length / 3);
        const j: SeriesJudgment = {
          node: list[0]!.s.name,
          pid,
          samples: list.length,
          judged: judged.length,
          rssFirstMiB: NaN,
          rssLastMiB: NaN,
          rssOk: true,
          fdsNetFirst: NaN,
          fdsNetLast: NaN,
          fdsFirst: NaN,
          fdsOk: true,
        };
        if (third === 0) {
          j.skipped = `${judged.length} samples after warm-up, outside fault windows (3 needed)`;
        } else {
          const first = judged.slice(0, third);
          const last = judged.slice(-third);
          j.rssFirstMiB = mean(first.map((s) => s.rssKiB!)) / MiB;
          j.rssLastMiB = mean(last.map((s) => s.rssKiB!)) / MiB;
          j.rssOk = j.rssLastMiB - j.rssFirstMiB <= Math.max(0.05 * j.rssFirstMiB, o.rssSlackMiB);
          j.fdsFirst = mean(first.map((s) => s.fds!));
          j.fdsNetFirst = mean(first.map((s) => s.fds! - s.steady));
          j.fdsNetLast = mean(last.map((s) => s.fds! - s.steady));
          j.fdsOk = j.fdsNetLast - j.fdsNetFirst <= Math.max(0.05 * j.fdsFirst, o.fdSlack);
          const heapMean = (xs: NodeSample[], key: 'totalMiB' | 'liveMiB') => {
            const v = xs.flatMap((s) => (s.heap?.[key] === undefined ? [] : [s.heap[key]!]));
            return v.length > 0 ? mean(v) : undefined;
          };
          j.heapTotalFirstMiB = heapMean(first, 'totalMiB');
          j.heapTotalLastMiB = heapMean(last, 'totalMiB');
          j.heapLiveFirstMiB = heapMean(first, 'liveMiB');
          j.heapLiveLastMiB = heapMean(last, 'liveMiB');
        }
        out.push(j);
      }
    }
    return out;
  }

  #churnSummary(): ChurnSummary {
    const pairs = this.#pairs;
    const times = pairs
      .filter((p) => p.ok)
      .map((p) => p.ended! - p.started)
      .sort((a, b) => a - b);
    const failed = pairs.filter((p) => !p.ok);
    const clientsFailed = failed.reduce((s, p) => s + 2 - p.clientsOk, 0);
    const inWindow = (p: ChurnPair) => this.#faultsOverlapping(p.started, p.ended ?? Infinity).length > 0;
    const inWindows = failed.filter(inWindow).reduce((s, p) => s + 2 - p.clientsOk, 0);
    const k = this.o.churnPackets;
    const missed = pairs.filter((p) => p.firstTry < 2 * k);
    return {
      pairs: pairs.length,
      clients: pairs.length * 2,
      ok: pairs.length * 2 - clientsFailed,
      failed: clientsFailed,
      failedInFaultWindows: inWindows,
      packets: pairs.length * 2 * this.o.churnPackets,
      firstTry: pairs.reduce((s, p) => s + p.firstTry, 0),
      resent: pairs.reduce((s, p) => s + p.resent, 0),
      missedFirstOutside: missed.filter((p) => !inWindow(p)).reduce((s, p) => s + 2 * k - p.firstTry, 0),
      missedFirst: missed
        .slice(0, 8)
        .map(
          (p) =>
            `pair ${p.id} at +${secs(p.started - this.#t0)} (${p.nodes.join(' and ')}${inWindow(p) ? ', in a fault window' : ''}): ` +
            `${2 * k - p.firstTry} of ${2 * k} not at the first send, sent ` +
            `${(p.firstSend! - Math.max(p.connected[0]!, p.connected[1]!)).toFixed(1)} ms after the later client's handshake`,
        ),
      connectRetries: pairs.reduce((s, p) => s + p.connectRetries, 0),
      reconnects: pairs.reduce((s, p) => s + p.reconnects, 0),
      p50Ms: quantile(times, 0.5) ?? NaN,
      p99Ms: quantile(times, 0.99) ?? NaN,
      maxMs: times.at(-1) ?? NaN,
      failures: failed.slice(0, 5).map((p) => `pair ${p.id} at +${secs(p.started - this.#t0)} (${p.nodes.join(' and ')}): ${p.error}`),
    };
  }

  #report(startMs: number, trafficMs: number): SoakReport {
    const { o, cluster } = this;
    // Every interval again, now that everything in flight has arrived.
    const intervals = this.#ticks.map((_, k) => (k === 0 ? undefined : this.#interval(k)));
    for (const [k, sample] of this.#samples.entries()) if (intervals[k]) sample.interval = intervals[k];
    const counted = intervals.filter((x): x is SoakInterval => x !== undefined);
    const outside = counted.filter((x) => x.faults.length === 0);
    const inFaults = counted.filter((x) => x.faults.length > 0);
    const sum = (xs: SoakInterval[], key: 'sent' | 'lost' | 'duplicated' | 'lostElsewhere') => xs.reduce((s, x) => s + x[key], 0);
    const arrivedAfterRow = intervals.reduce((s, x, k) => s + (x ? (this.#rowLost[k] ?? x.lost) - x.lost : 0), 0);
    // Per flow over the whole run (up to the last tick): lost packets of flows no fault touched.
    const lastTick = this.#ticks.at(-1)!;
    const allFaults = this.#faults.map((_, i) => i);
    let flowsLostUntouched = 0;
    let lostUntouched = 0;
    for (const [f, arrivals] of this.#arrivals.entries()) {
      const missing = lastTick.sent[f]! - arrivals.countIn(0, lastTick.sent[f]!);
      if (missing > 0 && !this.#touches(f, allFaults)) {
        flowsLostUntouched++;
        lostUntouched += missing;
      }
    }
    const lossy: SoakReport['flows']['lossy'] = [];
    const nodeName = (index: number) => {
      const i = cluster.nodeOf(index);
      return i === undefined ? 'down' : (cluster.nodes[i]?.name ?? '?');
    };
    for (const [f, arrivals] of this.#arrivals.entries()) {
      let lost = 0;
      const where: string[] = [];
      for (const [k, x] of intervals.entries()) {
        if (!x || x.faults.length > 0) continue;
        const from = this.#ticks[k - 1]!.sent[f]!;
        const to = this.#ticks[k]!.sent[f]!;
        const missing = to - from - arrivals.countIn(from, to);
        if (missing === 0) continue;
        lost += missing;
        where.push(`${x.fromS.toFixed(0)}-${x.toS.toFixed(0)} s: ${missing}`);
      }
      if (lost === 0 || lossy.length >= 10) continue;
      const flow = cluster.flows[f]!;
      lossy.push({
        flow: f,
        from: `client ${flow.from} on ${nodeName(flow.from)}`,
        to: `client ${flow.to} on ${nodeName(flow.to)}`,
        lost,
        intervals: where,
      });
    }
    const dropsOutside = this.#samples.reduce(
      (s, sample, k) =>
        s + (intervals[k] && intervals[k].faults.length === 0 ? sample.nodes.reduce((t, n) => t + (n.dropsInInterval ?? 0), 0) : 0),
      0,
    );
    const flows: SoakReport['flows'] = {
      flows: cluster.flows.length,
      sent: sum(counted, 'sent'),
      lost: sum(counted, 'lost'),
      duplicated: sum(counted, 'duplicated'),
      sentOutside: sum(outside, 'sent'),
      lostOutside: sum(outside, 'lost'),
      duplicatedOutside: sum(outside, 'duplicated'),
      lostInFaults: sum(inFaults, 'lost'),
      lostElsewhereInFaults: sum(inFaults, 'lostElsewhere'),
      flowsLostUntouched,
      lostUntouched,
      arrivedAfterRow,
      lossy,
    };
    const disconnects: SoakReport['disconnects'] = this.#disconnects.map((d) => ({
      atS: (d.at - this.#t0) / 1000,
      client: d.client,
      node: d.node,
      inFaultWindow: this.#inWindow(d.at),
      error: d.error,
    }));
    const disconnectsOutside = disconnects.filter((d) => !d.inFaultWindow);
    const series = this.#judge();
    const churn = this.#churnSummary();
    const judged = series.filter((s) => !s.skipped);
    const mib = (v: number) => `${v.toFixed(1)} MiB`;
    const pct = (a: number, b: number) => `${(((a - b) / b) * 100).toFixed(1)} %`;
    const seriesText = (s: SeriesJudgment, what: 'rss' | 'fds') =>
      what === 'rss'
        ? `${s.node} ${mib(s.rssFirstMiB)} → ${mib(s.rssLastMiB)} (${pct(s.rssLastMiB, s.rssFirstMiB)}` +
          (s.heapTotalFirstMiB !== undefined && s.heapTotalLastMiB !== undefined
            ? `; V8 heap ${mib(s.heapTotalFirstMiB)} → ${mib(s.heapTotalLastMiB)}, live after a major GC ` +
              `${s.heapLiveFirstMiB === undefined ? '?' : mib(s.heapLiveFirstMiB)} → ${s.heapLiveLastMiB === undefined ? '?' : mib(s.heapLiveLastMiB)}`
            : '') +
          ')'
        : `${s.node} ${s.fdsNetFirst.toFixed(1)} → ${s.fdsNetLast.toFixed(1)} (of ${s.fdsFirst.toFixed(0)})`;
    const skipped = series.filter((s) => s.skipped).map((s) => `${s.node} pid ${s.pid}: ${s.skipped}`);
    const skippedText = skipped.length > 0 ? `; not judged: ${skipped.join('; ')}` : '';
    const verdicts: SoakVerdict[] = [
      {
        target: `RSS flat after warm-up (≤ 5 % growth, or ${o.rssSlackMiB} MiB)`,
        issue: true,
        ok: judged.length > 0 && judged.every((s) => s.rssOk),
        detail: (judged.map((s) => seriesText(s, 'rss')).join(', ') || 'no series long enough to judge') + skippedText,
      },
      {
        target: `open fds flat after warm-up (net of steady clients; ≤ 5 % of the fds, or ${o.fdSlack})`,
        issue: true,
        ok: judged.length > 0 && judged.every((s) => s.fdsOk),
        detail: judged.map((s) => seriesText(s, 'fds')).join(', ') || 'no series long enough to judge',
      },
      {
        target: '0 loss outside fault windows',
        issue: true,
        ok: flows.lostOutside === 0 && flows.duplicatedOutside === 0 && flows.sentOutside > 0,
        detail:
          `${flows.lostOutside} lost, ${flows.duplicatedOutside} duplicated of ${flows.sentOutside} packets in ${outside.length} intervals` +
          (flows.arrivedAfterRow > 0 ? ` (${flows.arrivedAfterRow} counted lost by the rows arrived later)` : '') +
          flows.lossy.map((l) => `; flow ${l.flow} (${l.from} → ${l.to}) lost ${l.lost} in ${l.intervals.join(', ')}`).join('') +
          (disconnectsOutside.length > 0
            ? `; steady clients disconnected outside fault windows: ${disconnectsOutside
                .slice(0, 10)
                .map((d) => `client ${d.client} on ${d.node} at +${d.atS.toFixed(1)} s (${d.error})`)
                .join(', ')}`
            : ''),
      },
      {
        target: 'flows not touching a faulted node lose 0, in fault windows too',
        issue: false,
        ok: flows.lostUntouched === 0 && flows.lostElsewhereInFaults === 0,
        detail:
          `${flows.lostInFaults} lost in ${inFaults.length} fault intervals, ${flows.lostElsewhereInFaults} of them by flows not touching the faulted node; ` +
          `${flows.flowsLostUntouched} flows that no fault touched lost ${flows.lostUntouched}`,
      },
      {
        target: 'every churn client exchanged its packets',
        issue: false,
        ok: churn.failed === 0 && (churn.clients > 0 || o.churnPerMinute === 0),
        detail:
          `${churn.ok} of ${churn.clients} clients (${churn.failedInFaultWindows} failures in fault windows); ` +
          `${churn.firstTry} of ${churn.packets} packets arrived at the first send (${churn.missedFirstOutside} missed it outside fault windows), ` +
          `${churn.resent} sent again` +
          (churn.failures.length > 0 ? `; ${churn.failures.join('; ')}` : ''),
      },
      {
        // A churn client's first packets may go out before its partner's node told the sender's node
        // about it (the mesh learns of a new client from its node's PeerPresent): those drops are the
        // churn's first sends that did not arrive, and are allowed; any other drop is not.
        target: 'no packet dropped by the relays outside fault windows (but churn first sends to a peer the mesh did not know yet)',
        issue: false,
        ok: dropsOutside <= churn.missedFirstOutside,
        detail:
          `${dropsOutside} dropped (derpmesh_dropped_packets_total), ${churn.missedFirstOutside} churn packets missed their first send ` +
          `outside fault windows`,
      },
      {
        target: 'connections, clients and forwarders back to their baseline after the run',
        issue: false,
        ok: this.#state.every((s) => s.ok),
        detail: this.#state
          .map(
            (s) =>
              `${s.node} ${s.baseline.clients}/${s.baseline.connections}/${s.baseline.forwarders} → ` +
              (s.final ? `${s.final.clients}/${s.final.connections}/${s.final.forwarders}` : 'no answer'),
          )
          .join(', '),
      },
    ];
    return {
      options: o,
      samples: this.#samples,
      faults: this.#faults.map(({ kind, node, target, beganS, endedS, note }) => ({ kind, node, target, beganS, endedS, note })),
      flows,
      dropsOutside,
      disconnects,
      churn,
      series,
      state: this.#state,
      verdicts,
      timing: { startMs, trafficMs, totalMs: 0 },
    };
  }
}
