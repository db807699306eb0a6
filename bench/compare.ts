// derpmesh against Tailscale's derper, same load, same machine, one run.
//
//   node dist/bench/compare.js [--duration 20s] [--rounds 2] [--pairs 10] [--size 1400]
//                              [--paced-duration 10s] [--paced-fraction 0.6] [--tls auto|on|off] [--json out.json]
//
// Both relays run as child processes on loopback, so each one's CPU is its own (the derpmesh node
// with a throwaway Postgres of its own, unless --postgres-url names one). The load generator
// (Rust, in this process) runs `--rounds` rounds per relay, interleaved derpmesh/derper/derper/
// derpmesh…, each `duration / rounds` long, so drift in the machine's background load hits both alike.
//
// Two comparisons:
//   saturated  senders write as fast as the relay takes packets: packets/s is the relay's capacity;
//              RTT is latency under saturation (mostly time in full socket buffers and queues).
//   paced      every sender at a fixed rate, the total `--paced-fraction` of derper's saturated
//              packets/s: RTT is the relay's own forwarding delay, not queueing.
//
// The target: derpmesh ≥ 2× derper's packets/s, with p99 RTT no worse. The exit code is 0
// whatever the result (this is a measurement); the verdict is printed.
//
// Then, with `--tls on` (default `auto`: when the openssl command exists), the same over TLS: one
// private CA and one leaf certificate for 127.0.0.1, served by a derpmesh node (--tls-cert-file) and
// by derper (-certmode manual), dialed by the same load generator trusting that CA. The plain
// derpmesh node takes part in those rounds too, so TLS against plain is measured side by side.
// Rows: unpaced packets/s, the highest paced rate with < 1 % loss of each relay, p99 RTT at a common
// paced rate, and the TLS targets: derpmesh-TLS ≥ 3× derper-TLS's highest paced rate, p99 ≤ 0.5×
// derper-TLS's, derpmesh-TLS ≥ 0.7× derpmesh-plain.
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { runLoad, type LoadReport } from '../src/bench.js';
import { parseDuration } from '../src/config.js';
import { startPostgres } from '../test/helpers/postgres.js';
import { hasOpenssl, makePrivateCa } from '../test/helpers/certs.js';
import { getUrl } from '../test/helpers/cluster.js';
import { freePort } from '../src/net.js';

const CLI = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const DERPER_SH = fileURLToPath(new URL('../../bench/derper.sh', import.meta.url));
/** How long a relay may take to answer HTTP after it is started. */
const READY_TIMEOUT_MS = 30_000;
/** Slack on top of warm-up + window + drain before a load run counts as hung. */
const RUN_SLACK_MS = 30_000;
const WARMUP_MS = 1_000;
/** Capacity search: rate multiplier per step, most steps, loss that ends it. */
const CAPACITY_STEP = 1.25;
const CAPACITY_MAX_STEPS = 12;
const CAPACITY_MAX_LOSS = 0.01;
/** The target. */
const TARGET_THROUGHPUT_RATIO = 2;
/** The TLS targets: derpmesh-TLS against derper-TLS (highest paced rate, p99 at a common rate) and plain. */
const TLS_TARGET_CAPACITY_RATIO = 3;
const TLS_TARGET_P99_RATIO = 0.5;
const TLS_TARGET_VS_PLAIN = 0.7;

const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** A relay under test, running as a child process. */
class RelayProcess {
  readonly url: string;
  #stderr = '';
  #exited: string | undefined;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    port: number,
    /** Serves HTTPS with a certificate this CA signed. */
    readonly caPem?: Buffer,
  ) {
    this.url = `${caPem ? 'https' : 'http'}://127.0.0.1:${port}`;
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (text: string) => {
      this.#stderr = (this.#stderr + text).slice(-4096);
    });
    child.once('exit', (code, signal) => {
      this.#exited = signal ?? `exit code ${code}`;
    });
    child.once('error', (err) => (this.#exited = `spawn failed: ${err.message}`));
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Throws if the process is gone, with the end of its stderr. */
  checkAlive(): void {
    if (this.#exited !== undefined) throw new Error(`${this.name} exited (${this.#exited}); its stderr ends:\n${this.#stderr}`);
  }

  /** Seconds of CPU (user + system, all threads) the process has used so far. */
  cpuSeconds(): number {
    const stat = readFileSync(`/proc/${this.pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // After "pid (comm) ", fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
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
      if (Date.now() > deadline)
        throw new Error(`${this.name} did not answer ${this.url}${path} within ${READY_TIMEOUT_MS} ms; stderr:\n${this.#stderr}`);
      await sleep(100);
    }
  }

  /** SIGTERM, then SIGKILL if it lingers. */
  async stop(): Promise<void> {
    if (this.#exited !== undefined) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 3_000);
    await exited;
    clearTimeout(timer);
  }
}

const children = new Set<RelayProcess>();
const tempDirs = new Set<string>();

function cleanupNow(): void {
  for (const c of children) c.child.kill('SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
}
process.on('exit', cleanupNow);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    process.stderr.write(`\ncompare: ${signal}: stopping the relays\n`);
    process.exit(130);
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A certificate for 127.0.0.1 and the CA that signed it, for the TLS rows. */
interface TlsFiles {
  certFile: string;
  keyFile: string;
  caPem: Buffer;
}

async function startDerpmesh(postgresUrl: string, tls?: TlsFiles): Promise<RelayProcess> {
  const port = await freePort();
  const args = [CLI, 'server', '--http-address', `127.0.0.1:${port}`, '--postgres-url', postgresUrl, '--log-level', 'warn'];
  if (tls) args.push('--tls-cert-file', tls.certFile, '--tls-key-file', tls.keyFile);
  const child = spawn(process.execPath, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const relay = new RelayProcess(tls ? 'derpmesh-tls' : 'derpmesh', child, port, tls?.caPem);
  children.add(relay);
  await relay.waitReady('/healthz');
  return relay;
}

async function startDerper(binary: string, tls?: TlsFiles): Promise<RelayProcess> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-compare-'));
  tempDirs.add(dir);
  const args = ['-a', `127.0.0.1:${port}`, '-stun=false', '-http-port=-1', '-c', join(dir, 'derper.json')];
  if (tls) {
    // -certmode manual reads <certdir>/<hostname>.crt and .key (cmd/derper/cert.go); for an IP
    // hostname it generates a self-signed pair only when those files are missing, and skips the SNI
    // check (rustls sends no SNI for an IP address).
    copyFileSync(tls.certFile, join(dir, '127.0.0.1.crt'));
    copyFileSync(tls.keyFile, join(dir, '127.0.0.1.key'));
    args.push('-certmode', 'manual', '-certdir', dir, '-hostname', '127.0.0.1');
  }
  const child = spawn(binary, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const relay = new RelayProcess(tls ? 'derper-tls' : 'derper', child, port, tls?.caPem);
  children.add(relay);
  await relay.waitReady('/');
  return relay;
}

/** derper's path: --derper, $DERPER, or bench/derper.sh (which builds it with Go if needed). */
function findDerper(explicit: string | undefined): Promise<{ path: string } | { skip: string }> {
  const given = explicit ?? process.env.DERPER;
  if (given) return Promise.resolve(existsSync(given) ? { path: given } : { skip: `derper not found at ${given}` });
  return new Promise((resolve) => {
    execFile('bash', [DERPER_SH], { encoding: 'utf8', timeout: 25 * 60_000 }, (err, stdout, stderr) => {
      const path = stdout.trim().split('\n').pop() ?? '';
      if (err || !existsSync(path)) resolve({ skip: `bench/derper.sh could not provide derper:\n${stderr.trim() || String(err)}` });
      else resolve({ path });
    });
  });
}

/** One load run against one relay, with the relay's CPU use over it. */
interface Round {
  relay: string;
  report: LoadReport;
  wallSecs: number;
  relayCpuSecs: number;
  loadgenCpuSecs: number;
}

async function measure(
  relay: RelayProcess,
  load: { pairs: number; packetSize: number; durationMs: number; ratePerPair?: number },
): Promise<Round> {
  relay.checkAlive();
  const started = performance.now();
  const relayCpu = relay.cpuSeconds();
  const ownCpu = process.cpuUsage();
  let timer: NodeJS.Timeout | undefined;
  const hung = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`load run against ${relay.name} did not finish in time`)),
      WARMUP_MS + load.durationMs + RUN_SLACK_MS,
    );
  });
  try {
    const report = await Promise.race([runLoad({ url: relay.url, caPem: relay.caPem, warmupMs: WARMUP_MS, ...load }), hung]);
    const own = process.cpuUsage(ownCpu);
    return {
      relay: relay.name,
      report,
      wallSecs: (performance.now() - started) / 1000,
      relayCpuSecs: relay.cpuSeconds() - relayCpu,
      loadgenCpuSecs: (own.user + own.system) / 1e6,
    };
  } finally {
    clearTimeout(timer);
  }
}

/** Rounds of one relay combined: rates over the summed windows, percentiles weighted by samples. */
interface Summary {
  rounds: number;
  packetsPerSec: number;
  gbitPerSec: number;
  lossRatio: number;
  rttP50Us: number | undefined;
  rttP90Us: number | undefined;
  rttP99Us: number | undefined;
  rttSamples: number;
  /** Cores the relay process kept busy during the runs. */
  relayCores: number;
  /** The relay's CPU per forwarded packet (µs), from its cores and packets/s. */
  relayCpuUsPerPacket: number;
  /** Cores the load generator (this process) kept busy. */
  loadgenCores: number;
}

function summarize(rounds: Round[]): Summary {
  const sum = (f: (r: Round) => number) => rounds.reduce((total, r) => total + f(r), 0);
  const window = sum((r) => r.report.durationSecs);
  const sent = sum((r) => r.report.packetsSent);
  const samples = sum((r) => r.report.rttSamples);
  const percentile = (f: (r: LoadReport) => number | undefined | null) =>
    samples === 0 ? undefined : sum((r) => (f(r.report) ?? 0) * r.report.rttSamples) / samples;
  const packetsPerSec = sum((r) => r.report.packetsReceived) / window;
  const relayCores = sum((r) => r.relayCpuSecs) / sum((r) => r.wallSecs);
  return {
    rounds: rounds.length,
    packetsPerSec,
    gbitPerSec: sum((r) => r.report.gbitPerSec * r.report.durationSecs) / window,
    lossRatio: sent === 0 ? 0 : sum((r) => r.report.lossRatio * r.report.packetsSent) / sent,
    rttP50Us: percentile((r) => r.rttP50Us),
    rttP90Us: percentile((r) => r.rttP90Us),
    rttP99Us: percentile((r) => r.rttP99Us),
    rttSamples: samples,
    relayCores,
    relayCpuUsPerPacket: packetsPerSec > 0 ? (relayCores * 1e6) / packetsPerSec : NaN,
    loadgenCores: sum((r) => r.loadgenCpuSecs) / sum((r) => r.wallSecs),
  };
}

interface Comparison {
  name: string;
  description: string;
  ratePerPair?: number;
  derpmesh: Summary;
  derper: Summary;
  rounds: Round[];
}

/** Runs `rounds` rounds per relay, alternating which goes first (ABBA…), and summarizes each. */
async function compare(
  name: string,
  description: string,
  relays: { derpmesh: RelayProcess; derper: RelayProcess },
  load: { pairs: number; packetSize: number; durationMs: number; ratePerPair?: number },
  rounds: number,
): Promise<Comparison> {
  const done: Round[] = [];
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? [relays.derpmesh, relays.derper] : [relays.derper, relays.derpmesh];
    for (const relay of order) {
      const round = await measure(relay, load);
      done.push(round);
      const r = round.report;
      process.stderr.write(
        `  ${name} round ${i + 1}/${rounds} ${relay.name.padEnd(8)} ${fmtInt(r.packetsPerSec).padStart(9)} pkt/s  loss ${fmtPct(r.lossRatio)}  ` +
          `p99 ${fmtMs(r.rttP99Us)}  relay ${(round.relayCpuSecs / round.wallSecs).toFixed(2)} cores\n`,
      );
    }
  }
  return {
    name,
    description,
    ratePerPair: load.ratePerPair,
    derpmesh: summarize(done.filter((r) => r.relay === 'derpmesh')),
    derper: summarize(done.filter((r) => r.relay === 'derper')),
    rounds: done,
  };
}

/** One step of the capacity search: a paced rate offered, what arrived. */
interface CapacityStep {
  offeredPerSec: number;
  packetsPerSec: number;
  lossRatio: number;
  rttP99Us: number | undefined;
}

/**
 * The highest total rate a relay forwards with loss ≤ `CAPACITY_MAX_LOSS`, raised by ×`CAPACITY_STEP`
 * from `start` until two steps in a row lose more. A relay that drops under overload (derper: 32-packet queues,
 * head drop) spends its CPU reading packets it then drops, so its unpaced packets/s understates
 * what it sustains when senders stay below its capacity.
 */
async function sustainableRate(
  relay: RelayProcess,
  pairs: number,
  packetSize: number,
  start: number,
  stepMs: number,
  /** Until a step succeeds, halve the rate after a lossy one (at most 4 times) instead of raising it. */
  stepDown = false,
): Promise<{ packetsPerSec: number; steps: CapacityStep[] }> {
  const steps: CapacityStep[] = [];
  let best = 0;
  let failures = 0;
  let halvings = 0;
  let offered = Math.max(1000, start);
  // Halvings do not count against the steps.
  for (let i = 0; i < CAPACITY_MAX_STEPS + halvings && failures < 2; i++) {
    const { report } = await measure(relay, { pairs, packetSize, durationMs: stepMs, ratePerPair: offered / pairs });
    steps.push({
      offeredPerSec: offered,
      packetsPerSec: report.packetsPerSec,
      lossRatio: report.lossRatio,
      rttP99Us: report.rttP99Us ?? undefined,
    });
    process.stderr.write(
      `  capacity ${relay.name} offered ${fmtInt(offered).padStart(9)} pkt/s → ${fmtInt(report.packetsPerSec).padStart(9)} pkt/s, loss ${fmtPct(report.lossRatio)}\n`,
    );
    // One lossy step may be a burst of background load on the machine: stop at the second in a row.
    if (report.lossRatio > CAPACITY_MAX_LOSS || report.packetsPerSec < 0.97 * offered) {
      if (stepDown && best === 0 && halvings < 4) {
        halvings++;
        offered /= 2;
        continue;
      }
      failures++;
    } else {
      failures = 0;
      best = Math.max(best, report.packetsPerSec);
    }
    offered *= CAPACITY_STEP;
  }
  return { packetsPerSec: best, steps };
}

function fmtInt(v: number): string {
  return Math.round(v).toLocaleString('en-US');
}
function fmtPct(v: number): string {
  return `${(v * 100).toFixed(2)} %`;
}
function fmtMs(us: number | undefined | null): string {
  return us == null ? 'n/a' : `${(us / 1000).toFixed(3)} ms`;
}
function fmtRatio(a: number | undefined, b: number | undefined): string {
  return a === undefined || b === undefined || b === 0 ? '' : `${(a / b).toFixed(2)}×`;
}

function table(c: Comparison): string {
  const m = c.derpmesh;
  const d = c.derper;
  const rows: [string, string, string, string][] = [
    ['', 'derpmesh', 'derper', 'derpmesh/derper'],
    ['packets/s', fmtInt(m.packetsPerSec), fmtInt(d.packetsPerSec), fmtRatio(m.packetsPerSec, d.packetsPerSec)],
    ['Gbit/s', m.gbitPerSec.toFixed(3), d.gbitPerSec.toFixed(3), fmtRatio(m.gbitPerSec, d.gbitPerSec)],
    ['loss', fmtPct(m.lossRatio), fmtPct(d.lossRatio), ''],
    ['RTT p50', fmtMs(m.rttP50Us), fmtMs(d.rttP50Us), fmtRatio(m.rttP50Us, d.rttP50Us)],
    ['RTT p90', fmtMs(m.rttP90Us), fmtMs(d.rttP90Us), fmtRatio(m.rttP90Us, d.rttP90Us)],
    ['RTT p99', fmtMs(m.rttP99Us), fmtMs(d.rttP99Us), fmtRatio(m.rttP99Us, d.rttP99Us)],
    ['RTT samples', fmtInt(m.rttSamples), fmtInt(d.rttSamples), ''],
    ['relay CPU (cores)', m.relayCores.toFixed(2), d.relayCores.toFixed(2), ''],
    [
      'relay CPU/packet',
      `${m.relayCpuUsPerPacket.toFixed(2)} µs`,
      `${d.relayCpuUsPerPacket.toFixed(2)} µs`,
      fmtRatio(m.relayCpuUsPerPacket, d.relayCpuUsPerPacket),
    ],
    ['load gen CPU (cores)', m.loadgenCores.toFixed(2), d.loadgenCores.toFixed(2), ''],
  ];
  const widths = [0, 1, 2, 3].map((i) => Math.max(...rows.map((r) => r[i].length)));
  const lines = rows.map(
    (r) =>
      `  ${r[0].padEnd(widths[0])}  ${r
        .slice(1)
        .map((cell, i) => cell.padStart(widths[i + 1]))
        .join('  ')}`,
  );
  return [`${c.name}: ${c.description}`, ...lines].join('\n');
}

interface Verdict {
  throughputRatio: number;
  throughputHolds: boolean;
  /** derpmesh's unpaced packets/s ÷ derper's sustainable rate: the stricter reading, for information. */
  throughputRatioVsSustainable: number | undefined;
  p99RatioSaturated: number | undefined;
  p99HoldsSaturated: boolean;
  p99RatioPaced: number | undefined;
  p99HoldsPaced: boolean;
  holds: boolean;
}

function verdict(saturated: Comparison, paced: Comparison | undefined, derperSustainable: number | undefined): Verdict {
  const ratio = (a: number | undefined, b: number | undefined) => (a === undefined || b === undefined || b === 0 ? undefined : a / b);
  const throughputRatio = saturated.derpmesh.packetsPerSec / saturated.derper.packetsPerSec;
  const p99RatioSaturated = ratio(saturated.derpmesh.rttP99Us, saturated.derper.rttP99Us);
  const p99RatioPaced = paced && ratio(paced.derpmesh.rttP99Us, paced.derper.rttP99Us);
  const throughputHolds = throughputRatio >= TARGET_THROUGHPUT_RATIO;
  const p99HoldsSaturated = p99RatioSaturated !== undefined && p99RatioSaturated <= 1;
  const p99HoldsPaced = p99RatioPaced !== undefined && p99RatioPaced <= 1;
  return {
    throughputRatio,
    throughputHolds,
    throughputRatioVsSustainable: ratio(saturated.derpmesh.packetsPerSec, derperSustainable),
    p99RatioSaturated,
    p99HoldsSaturated,
    p99RatioPaced,
    p99HoldsPaced,
    holds: throughputHolds && p99HoldsSaturated && (paced === undefined || p99HoldsPaced),
  };
}

function verdictText(v: Verdict): string {
  const mark = (ok: boolean) => (ok ? 'yes' : 'NO ');
  const r = (x: number | undefined) => (x === undefined ? 'n/a' : `${x.toFixed(2)}×`);
  const lines = [
    `target: derpmesh ≥ ${TARGET_THROUGHPUT_RATIO}× derper's packets/s with p99 RTT no worse`,
    `  ${mark(v.throughputHolds)} packets/s ratio (saturated)          ${r(v.throughputRatio)}  (needs ≥ ${TARGET_THROUGHPUT_RATIO}×)`,
    `  ${mark(v.p99HoldsSaturated)} p99 RTT ratio (saturated)            ${r(v.p99RatioSaturated)}  (needs ≤ 1×)`,
  ];
  if (v.p99RatioPaced !== undefined)
    lines.push(`  ${mark(v.p99HoldsPaced)} p99 RTT ratio (paced)                ${r(v.p99RatioPaced)}  (needs ≤ 1×)`);
  if (v.throughputRatioVsSustainable !== undefined) {
    lines.push(`  (info) packets/s vs derper's sustainable rate  ${r(v.throughputRatioVsSustainable)}`);
  }
  lines.push(v.holds ? 'TARGET HOLDS' : 'TARGET DOES NOT HOLD');
  return lines.join('\n');
}

/** Rounds over any number of relays, the order rotated each round; summaries by relay name. */
async function roundsOver(
  name: string,
  relays: RelayProcess[],
  load: { pairs: number; packetSize: number; durationMs: number; ratePerPair?: number },
  rounds: number,
): Promise<{ summaries: Record<string, Summary>; rounds: Round[] }> {
  const done: Round[] = [];
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? relays : [...relays].reverse();
    for (const relay of order) {
      const round = await measure(relay, load);
      done.push(round);
      const r = round.report;
      process.stderr.write(
        `  ${name} round ${i + 1}/${rounds} ${relay.name.padEnd(12)} ${fmtInt(r.packetsPerSec).padStart(9)} pkt/s  loss ${fmtPct(r.lossRatio)}  ` +
          `p99 ${fmtMs(r.rttP99Us)}  relay ${(round.relayCpuSecs / round.wallSecs).toFixed(2)} cores\n`,
      );
    }
  }
  const summaries = Object.fromEntries(relays.map((relay) => [relay.name, summarize(done.filter((r) => r.relay === relay.name))]));
  return { summaries, rounds: done };
}

/** A table of several relays' summaries, with ratio columns `a/b`. */
function tableOf(title: string, columns: [string, Summary][], ratios: [number, number][]): string {
  const header = [...columns.map(([label]) => label), ...ratios.map(([a, b]) => `${columns[a]![0]}/${columns[b]![0]}`)];
  const row = (label: string, cell: (s: Summary) => string, value?: (s: Summary) => number | undefined): string[] => [
    label,
    ...columns.map(([, s]) => cell(s)),
    ...ratios.map(([a, b]) => (value ? fmtRatio(value(columns[a]![1]), value(columns[b]![1])) : '')),
  ];
  const rows: string[][] = [
    ['', ...header],
    row(
      'packets/s',
      (s) => fmtInt(s.packetsPerSec),
      (s) => s.packetsPerSec,
    ),
    row(
      'Gbit/s',
      (s) => s.gbitPerSec.toFixed(3),
      (s) => s.gbitPerSec,
    ),
    row('loss', (s) => fmtPct(s.lossRatio)),
    row(
      'RTT p50',
      (s) => fmtMs(s.rttP50Us),
      (s) => s.rttP50Us,
    ),
    row(
      'RTT p90',
      (s) => fmtMs(s.rttP90Us),
      (s) => s.rttP90Us,
    ),
    row(
      'RTT p99',
      (s) => fmtMs(s.rttP99Us),
      (s) => s.rttP99Us,
    ),
    row('RTT samples', (s) => fmtInt(s.rttSamples)),
    row('relay CPU (cores)', (s) => s.relayCores.toFixed(2)),
    row(
      'relay CPU/packet',
      (s) => `${s.relayCpuUsPerPacket.toFixed(2)} µs`,
      (s) => s.relayCpuUsPerPacket,
    ),
    row('load gen CPU (cores)', (s) => s.loadgenCores.toFixed(2)),
  ];
  return [title, ...alignRows(rows)].join('\n');
}

function alignRows(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map(
    (r) =>
      `  ${r[0]!.padEnd(widths[0]!)}  ${r
        .slice(1)
        .map((cell, i) => cell.padStart(widths[i + 1]!))
        .join('  ')}`,
  );
}

/** What the TLS rows measured. */
interface TlsComparison {
  saturated: { summaries: Record<string, Summary>; rounds: Round[]; description: string };
  /** Highest paced rate with loss ≤ 1 % of each relay (absent with --capacity-step 0). */
  capacity?: Record<string, { packetsPerSec: number; steps: CapacityStep[] }>;
  paced?: { summaries: Record<string, Summary>; rounds: Round[]; description: string; totalRate: number };
  verdict: TlsVerdict;
}

interface TlsVerdict {
  /** derpmesh-TLS ÷ derper-TLS, highest paced rate with < 1 % loss. */
  capacityRatio: number | undefined;
  capacityHolds: boolean;
  /** derpmesh-TLS ÷ derper-TLS p99 RTT at the common paced rate. */
  p99Ratio: number | undefined;
  p99Holds: boolean;
  /** derpmesh-TLS ÷ derpmesh-plain, unpaced packets/s and highest paced rate. */
  vsPlainUnpaced: number | undefined;
  vsPlainCapacity: number | undefined;
  vsPlainHolds: boolean;
  holds: boolean;
}

const TLS_NAMES = { mesh: 'derpmesh-tls', derper: 'derper-tls', plain: 'derpmesh' } as const;

async function compareTls(
  relays: { meshTls: RelayProcess; derperTls: RelayProcess; meshPlain: RelayProcess },
  o: {
    pairs: number;
    packetSize: number;
    durationMs: number;
    rounds: number;
    capacityStepMs: number;
    pacedDurationMs: number;
    pacedFraction: number;
    pacedRate: number | undefined;
  },
): Promise<TlsComparison> {
  const all = [relays.meshTls, relays.derperTls, relays.meshPlain];
  const perRound = (ms: number) => Math.max(1, Math.round(ms / o.rounds));
  const { pairs, packetSize } = o;
  const saturated = {
    ...(await roundsOver('tls saturated', all, { pairs, packetSize, durationMs: perRound(o.durationMs) }, o.rounds)),
    description: `${pairs} pairs × ${packetSize} B, senders unpaced, ${o.rounds} × ${perRound(o.durationMs) / 1000} s per relay`,
  };
  let capacity: TlsComparison['capacity'];
  if (o.capacityStepMs > 0) {
    capacity = {};
    for (const relay of all) {
      // From the unpaced rate, which understates a relay that drops under overload (derper, and
      // derpmesh's TLS bridge) and overstates what paced senders reach on a relay that does not: the
      // rate is halved until a step succeeds, then raised.
      const unpaced = saturated.summaries[relay.name]!.packetsPerSec;
      capacity[relay.name] = await sustainableRate(relay, pairs, packetSize, unpaced, o.capacityStepMs, true);
    }
  }
  let paced: TlsComparison['paced'];
  if (o.pacedDurationMs > 0) {
    const derperMax = Math.max(saturated.summaries[TLS_NAMES.derper]!.packetsPerSec, capacity?.[TLS_NAMES.derper]?.packetsPerSec ?? 0);
    const totalRate = o.pacedRate ?? o.pacedFraction * derperMax;
    const basis = o.pacedRate === undefined ? ` (${Math.round(o.pacedFraction * 100)} % of derper-tls's max)` : '';
    paced = {
      ...(await roundsOver(
        'tls paced',
        all,
        { pairs, packetSize, durationMs: perRound(o.pacedDurationMs), ratePerPair: totalRate / pairs },
        o.rounds,
      )),
      description: `${pairs} pairs × ${packetSize} B at ${fmtInt(totalRate)} pkt/s total${basis}, ${o.rounds} × ${perRound(o.pacedDurationMs) / 1000} s per relay`,
      totalRate,
    };
  }
  return { saturated, capacity, paced, verdict: tlsVerdict(saturated.summaries, capacity, paced?.summaries) };
}

function tlsVerdict(
  saturated: Record<string, Summary>,
  capacity: TlsComparison['capacity'],
  paced: Record<string, Summary> | undefined,
): TlsVerdict {
  const ratio = (a: number | undefined, b: number | undefined) => (a === undefined || b === undefined || b === 0 ? undefined : a / b);
  const capacityRatio = ratio(capacity?.[TLS_NAMES.mesh]?.packetsPerSec, capacity?.[TLS_NAMES.derper]?.packetsPerSec);
  const p99Ratio = ratio(paced?.[TLS_NAMES.mesh]?.rttP99Us, paced?.[TLS_NAMES.derper]?.rttP99Us);
  const vsPlainUnpaced = ratio(saturated[TLS_NAMES.mesh]?.packetsPerSec, saturated[TLS_NAMES.plain]?.packetsPerSec);
  const vsPlainCapacity = ratio(capacity?.[TLS_NAMES.mesh]?.packetsPerSec, capacity?.[TLS_NAMES.plain]?.packetsPerSec);
  const capacityHolds = capacityRatio !== undefined && capacityRatio >= TLS_TARGET_CAPACITY_RATIO;
  const p99Holds = p99Ratio !== undefined && p99Ratio <= TLS_TARGET_P99_RATIO;
  const vsPlainHolds =
    vsPlainUnpaced !== undefined &&
    vsPlainUnpaced >= TLS_TARGET_VS_PLAIN &&
    (vsPlainCapacity === undefined || vsPlainCapacity >= TLS_TARGET_VS_PLAIN);
  return {
    capacityRatio,
    capacityHolds,
    p99Ratio,
    p99Holds,
    vsPlainUnpaced,
    vsPlainCapacity,
    vsPlainHolds,
    holds: capacityHolds && p99Holds && vsPlainHolds,
  };
}

function tlsText(t: TlsComparison, capacityStepMs: number): string {
  const col = (name: string, summaries: Record<string, Summary>): [string, Summary] => [name, summaries[name]!];
  const columns = (summaries: Record<string, Summary>) => [
    col(TLS_NAMES.mesh, summaries),
    col(TLS_NAMES.derper, summaries),
    col(TLS_NAMES.plain, summaries),
  ];
  const ratios: [number, number][] = [
    [0, 1],
    [0, 2],
  ];
  const out = [tableOf(`tls saturated: ${t.saturated.description}`, columns(t.saturated.summaries), ratios)];
  if (t.capacity) {
    const c = t.capacity;
    const rate = (name: string) => c[name]?.packetsPerSec;
    out.push(
      [
        `tls capacity: highest paced rate with loss ≤ ${CAPACITY_MAX_LOSS * 100} % (steps of ×${CAPACITY_STEP}, ${capacityStepMs / 1000} s each)`,
        ...alignRows([
          [
            '',
            TLS_NAMES.mesh,
            TLS_NAMES.derper,
            TLS_NAMES.plain,
            `${TLS_NAMES.mesh}/${TLS_NAMES.derper}`,
            `${TLS_NAMES.mesh}/${TLS_NAMES.plain}`,
          ],
          [
            'packets/s',
            fmtInt(rate(TLS_NAMES.mesh) ?? 0),
            fmtInt(rate(TLS_NAMES.derper) ?? 0),
            fmtInt(rate(TLS_NAMES.plain) ?? 0),
            fmtRatio(rate(TLS_NAMES.mesh), rate(TLS_NAMES.derper)),
            fmtRatio(rate(TLS_NAMES.mesh), rate(TLS_NAMES.plain)),
          ],
          [
            'steps (last offered)',
            ...[TLS_NAMES.mesh, TLS_NAMES.derper, TLS_NAMES.plain].map((n) => {
              const steps = c[n]?.steps ?? [];
              return `${steps.length} (${fmtInt(steps.at(-1)?.offeredPerSec ?? 0)})`;
            }),
            '',
            '',
          ],
        ]),
      ].join('\n'),
    );
  }
  if (t.paced) out.push(tableOf(`tls paced: ${t.paced.description}`, columns(t.paced.summaries), ratios));
  const v = t.verdict;
  const mark = (ok: boolean) => (ok ? 'yes' : 'NO ');
  const r = (x: number | undefined) => (x === undefined ? 'n/a' : `${x.toFixed(2)}×`);
  out.push(
    [
      `tls targets: derpmesh-TLS ≥ ${TLS_TARGET_CAPACITY_RATIO}× derper-TLS's highest paced rate with < 1 % loss, p99 ≤ ${TLS_TARGET_P99_RATIO}× derper-TLS's at a common rate, ≥ ${TLS_TARGET_VS_PLAIN}× derpmesh-plain`,
      `  ${mark(v.capacityHolds)} highest paced rate, derpmesh-tls/derper-tls   ${r(v.capacityRatio)}  (needs ≥ ${TLS_TARGET_CAPACITY_RATIO}×)`,
      `  ${mark(v.p99Holds)} p99 RTT (paced), derpmesh-tls/derper-tls     ${r(v.p99Ratio)}  (needs ≤ ${TLS_TARGET_P99_RATIO}×)`,
      `  ${mark(v.vsPlainHolds)} derpmesh-tls/derpmesh, unpaced packets/s    ${r(v.vsPlainUnpaced)}  (needs ≥ ${TLS_TARGET_VS_PLAIN}×)`,
      ...(v.vsPlainCapacity === undefined
        ? []
        : [
            `  ${mark(v.vsPlainCapacity >= TLS_TARGET_VS_PLAIN)} derpmesh-tls/derpmesh, highest paced rate   ${r(v.vsPlainCapacity)}  (needs ≥ ${TLS_TARGET_VS_PLAIN}×)`,
          ]),
      v.holds ? 'TLS TARGETS HOLD' : 'TLS TARGETS DO NOT HOLD',
    ].join('\n'),
  );
  return out.join('\n\n');
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      duration: { type: 'string', default: '20s' },
      rounds: { type: 'string', default: '2' },
      pairs: { type: 'string', default: '10' },
      size: { type: 'string', default: '1400' },
      'capacity-step': { type: 'string', default: '2s' },
      'paced-duration': { type: 'string', default: '10s' },
      'paced-fraction': { type: 'string', default: '0.6' },
      'paced-rate': { type: 'string' },
      tls: { type: 'string', default: 'auto' },
      derper: { type: 'string' },
      'postgres-url': { type: 'string' },
      json: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`node dist/bench/compare.js [options]

  --duration D          saturated window per relay, split over the rounds (default 20s)
  --rounds N            rounds per relay, interleaved (default 2)
  --pairs N             sender→receiver pairs (default 10)
  --size BYTES          packet size (default 1400)
  --capacity-step D     window of each step of the search for derper's sustainable rate
                        (default 2s; 0 skips the search)
  --paced-duration D    paced window per relay, split over the rounds (default 10s; 0 skips it)
  --paced-fraction F    paced total rate as a share of derper's max: the higher of its unpaced
                        packets/s and its sustainable rate (default 0.6)
  --paced-rate N        paced total rate in packets/s (overrides --paced-fraction)
  --tls auto|on|off     the TLS rows too: derpmesh and derper serving HTTPS with one private CA's
                        certificate, against each other and against plain derpmesh (default auto:
                        when the openssl command exists to make the certificates)
  --derper PATH         derper binary (default: $DERPER, else bench/derper.sh)
  --postgres-url URL    database of the derpmesh node (default: a throwaway Postgres for this run)
  --json FILE           write every round and the summaries as JSON
`);
    return;
  }
  const durationOf = (flag: string, text: string) => {
    const ms = parseDuration(text);
    if (ms === undefined) throw new Error(`--${flag} must be a duration like 20s, got ${JSON.stringify(text)}`);
    return ms;
  };
  const positive = (flag: string, text: string) => {
    const n = Number(text);
    if (!(n > 0) || !Number.isFinite(n)) throw new Error(`--${flag} must be a positive number, got ${JSON.stringify(text)}`);
    return n;
  };
  const durationMs = durationOf('duration', values.duration);
  const pacedDurationMs = durationOf('paced-duration', values['paced-duration']);
  const capacityStepMs = durationOf('capacity-step', values['capacity-step']);
  const rounds = Math.round(positive('rounds', values.rounds));
  const pairs = Math.round(positive('pairs', values.pairs));
  const packetSize = Math.round(positive('size', values.size));
  const pacedFraction = positive('paced-fraction', values['paced-fraction']);
  const pacedRate = values['paced-rate'] === undefined ? undefined : positive('paced-rate', values['paced-rate']);
  if (!['auto', 'on', 'off'].includes(values.tls)) throw new Error(`--tls must be auto, on or off, got ${JSON.stringify(values.tls)}`);
  const openssl = hasOpenssl();
  if (values.tls === 'on' && !openssl) throw new Error('--tls on needs the openssl command, to make the certificates');
  const withTls = values.tls === 'on' || (values.tls === 'auto' && openssl);

  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npx tsc -p .\` first`);
  const derperBinary = await findDerper(values.derper);
  if ('skip' in derperBinary) {
    process.stdout.write(
      `compare: SKIPPED — no derper to compare against (install Go ≥ 1.26 and re-run, or pass --derper PATH).\n${derperBinary.skip}\n`,
    );
    return;
  }

  // A derpmesh node needs its database; a fresh one per run, so no replica rows of old runs linger.
  const postgres = values['postgres-url'] === undefined ? await startPostgres() : undefined;
  const postgresUrl = values['postgres-url'] ?? postgres!.url;
  const loadAverageBefore = loadavg();
  const [derpmesh, derper] = await Promise.all([startDerpmesh(postgresUrl), startDerper(derperBinary.path)]);
  process.stderr.write(
    `derpmesh pid ${derpmesh.pid} at ${derpmesh.url}; derper pid ${derper.pid} at ${derper.url} (${derperBinary.path})\n`,
  );
  const relays = { derpmesh, derper };
  const perRound = (ms: number) => Math.max(1, Math.round(ms / rounds));

  const saturated = await compare(
    'saturated',
    `${pairs} pairs × ${packetSize} B, senders unpaced, ${rounds} × ${perRound(durationMs) / 1000} s per relay`,
    relays,
    { pairs, packetSize, durationMs: perRound(durationMs) },
    rounds,
  );
  const capacity =
    capacityStepMs > 0 ? await sustainableRate(derper, pairs, packetSize, saturated.derper.packetsPerSec, capacityStepMs) : undefined;
  const derperMax = Math.max(saturated.derper.packetsPerSec, capacity?.packetsPerSec ?? 0);
  let paced: Comparison | undefined;
  if (pacedDurationMs > 0) {
    const total = pacedRate ?? pacedFraction * derperMax;
    const ratePerPair = total / pairs;
    const basis = pacedRate === undefined ? ` (${Math.round(pacedFraction * 100)} % of derper's max)` : '';
    paced = await compare(
      'paced',
      `${pairs} pairs × ${packetSize} B at ${fmtInt(total)} pkt/s total${basis}, ${rounds} × ${perRound(pacedDurationMs) / 1000} s per relay`,
      relays,
      { pairs, packetSize, durationMs: perRound(pacedDurationMs), ratePerPair },
      rounds,
    );
  }
  await derper.stop();

  let tls: TlsComparison | undefined;
  if (withTls) {
    // One private CA and one leaf for 127.0.0.1, served by both; the TLS node gets a database of its
    // own so the two derpmesh nodes do not form a cluster.
    const ca = makePrivateCa();
    tempDirs.add(ca.dir);
    const files: TlsFiles = { certFile: ca.certFile, keyFile: ca.keyFile, caPem: readFileSync(ca.caFile) };
    const tlsPostgres = await startPostgres();
    try {
      const [meshTls, derperTls] = await Promise.all([startDerpmesh(tlsPostgres.url, files), startDerper(derperBinary.path, files)]);
      process.stderr.write(`tls: derpmesh pid ${meshTls.pid} at ${meshTls.url}; derper pid ${derperTls.pid} at ${derperTls.url}\n`);
      tls = await compareTls(
        { meshTls, derperTls, meshPlain: derpmesh },
        { pairs, packetSize, durationMs, rounds, capacityStepMs, pacedDurationMs, pacedFraction, pacedRate },
      );
      await Promise.all([meshTls.stop(), derperTls.stop()]);
    } finally {
      await tlsPostgres.stop();
    }
  } else {
    process.stderr.write(`tls: skipped (${values.tls === 'off' ? '--tls off' : 'no openssl command to make certificates'})\n`);
  }
  await derpmesh.stop();
  await postgres?.stop();

  const result = verdict(saturated, paced, capacity?.packetsPerSec);
  const capacityText = capacity
    ? [
        `capacity: derper's highest paced rate with loss ≤ ${CAPACITY_MAX_LOSS * 100} % (steps of ×${CAPACITY_STEP}, ${capacityStepMs / 1000} s each): ` +
          `${fmtInt(capacity.packetsPerSec)} pkt/s (unpaced it forwards ${fmtInt(saturated.derper.packetsPerSec)} pkt/s: overrun, it drops at its queues)`,
      ]
    : [];
  const out = [
    table(saturated),
    ...capacityText,
    ...(paced ? [table(paced)] : []),
    verdictText(result),
    ...(tls ? [tlsText(tls, capacityStepMs)] : []),
  ];
  const machine = `machine: ${cpus().length} CPUs, load average ${loadAverageBefore[0]!.toFixed(2)} before, ${loadavg()[0]!.toFixed(2)} after`;
  process.stdout.write('\n' + [machine, ...out].join('\n\n') + '\n');
  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify(
        {
          machine: { cpus: cpus().length, model: cpus()[0]?.model, loadAverageBefore, loadAverageAfter: loadavg() },
          saturated,
          derperCapacity: capacity,
          paced,
          verdict: result,
          tls,
        },
        null,
        2,
      ) + '\n',
    );
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`compare: ${(err as Error).stack ?? String(err)}\n`);
  // Exit now: the 'exit' handler kills the children, whose pipes would otherwise keep us alive.
  process.exit(1);
});
