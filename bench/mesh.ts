// The mesh path against the single-node path, side by side in one run: senders on node A and
// receivers on node B (packets cross A's mesh link to B) versus senders and receivers both on A.
//
//   node dist/bench/mesh.js [--duration 10s] [--rounds 2] [--pairs 10] [--size 1400]
//                           [--paced-duration 4s] [--paced-fraction 0.3] [--tls auto|on|off]
//
// Two real node processes share a throwaway Postgres and mesh as in production. With `--tls on`
// (default `auto`: when the openssl command exists) a second 2-node cluster, on a Postgres of its
// own, serves HTTPS with leaf certificates of one private CA, and its nodes mesh over their https
// relay URLs trusting that CA (DERPMESH_MESH_CA_FILE); the load generator dials it trusting the same
// CA. Every round runs each path once — single, mesh, and with TLS tls-single and tls-mesh — the
// order reversed every other round, so background load hits all alike.
//
// Two phases: unpaced (senders write as fast as the relays take packets: packets/s is capacity, RTT
// mostly queueing), then paced (every path at one common rate, `--paced-fraction` of the slowest
// path's unpaced packets/s: RTT is the forwarding delay). Each mesh round checks, from the nodes'
// metrics, that the packets really crossed the mesh: node B's `packets_forwarded_in` grew by at least
// what the receivers got, and a single-node round forwarded nothing. Target (HA issue): mesh ≥ 0.7×
// single. Exit code 1 only if the run failed or a mesh round's packets did not cross the mesh.
import { readFileSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';

import { formatReport, runLoad, type LoadReport } from '../src/bench.js';
import { parseDuration } from '../src/config.js';
import { hasOpenssl, makePrivateCa } from '../test/helpers/certs.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from '../test/helpers/cluster.js';
import { startPostgres, type TestPostgres } from '../test/helpers/postgres.js';
import { cpuSeconds, fmtInt, fmtMs, fmtPct, fmtRatio, formatTable } from './report.js';

const { values } = parseArgs({
  options: {
    duration: { type: 'string', default: '10s' },
    rounds: { type: 'string', default: '2' },
    pairs: { type: 'string', default: '10' },
    size: { type: 'string', default: '1400' },
    'paced-duration': { type: 'string', default: '4s' },
    'paced-fraction': { type: 'string', default: '0.3' },
    tls: { type: 'string', default: 'auto' },
    verbose: { type: 'boolean', default: false },
  },
});
const durationMs = parseDuration(values.duration) ?? 10_000;
const pacedDurationMs = parseDuration(values['paced-duration']) ?? 4_000;
const pacedFraction = Number(values['paced-fraction']);
const rounds = Number(values.rounds);
const pairs = Number(values.pairs);
const packetSize = Number(values.size);
if (!['auto', 'on', 'off'].includes(values.tls)) throw new Error(`--tls must be auto, on or off, got ${values.tls}`);
const withTls = values.tls === 'on' || (values.tls === 'auto' && hasOpenssl());
if (values.tls === 'on' && !hasOpenssl()) throw new Error('--tls on needs the openssl command (to make a private CA)');
const WARMUP_MS = 1_000;
const TARGET_MESH_RATIO = 0.7;

/** A 2-node cluster on a Postgres of its own. */
interface Cluster {
  postgres: TestPostgres;
  a: NodeProcess;
  b: NodeProcess;
  /** The private CA the nodes' certificates chain to (TLS cluster). */
  caPem?: Buffer;
}

const nodes = new Set<NodeProcess>();
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    process.stderr.write(`\nmesh: ${signal}: stopping the nodes\n`);
    for (const n of nodes) n.child.kill('SIGKILL');
    process.exit(130); // the Postgres helpers stop their servers on exit
  });
}

async function startCluster(prefix: string, tls?: { certFile: string; keyFile: string; caFile: string }): Promise<Cluster> {
  const postgres = await startPostgres();
  // STUN off: the bench needs no UDP port, and 3478 may belong to something else on the machine.
  const env = { DERPMESH_STUN_ADDRESS: 'disable' };
  const a = await startNodeProcess({ name: `${prefix}-a`, postgresUrl: postgres.url, heartbeatMs: 1_000, env, tls });
  nodes.add(a);
  const b = await startNodeProcess({ name: `${prefix}-b`, postgresUrl: postgres.url, heartbeatMs: 1_000, env, tls });
  nodes.add(b);
  await Promise.all([a.started, b.started]);
  await waitFor('the two nodes meshed', 20_000, async () => {
    const [peers, ma, mb] = await Promise.all([livePeers(a), a.metrics(), b.metrics()]);
    return peers.includes(b.name) && /^derpmesh_mesh_links 1$/m.test(ma) && /^derpmesh_mesh_links 1$/m.test(mb);
  });
  return { postgres, a, b, caPem: tls ? readFileSync(tls.caFile) : undefined };
}

type PathName = 'single' | 'mesh' | 'tls-single' | 'tls-mesh';

interface Path {
  name: PathName;
  cluster: Cluster;
  /** Receivers on node B (mesh) or on node A with the senders (single). */
  mesh: boolean;
}

function metric(text: string, name: string): number {
  const m = new RegExp(`^derpmesh_${name.replace(/[{}]/g, '\\$&')} (\\d+(?:\\.\\d+)?(?:e[+-]?\\d+)?)$`, 'm').exec(text);
  if (!m) throw new Error(`no derpmesh_${name} in /metrics`);
  return Number(m[1]);
}

/** The mesh counters of a cluster: forwarded out at A and in at B. */
async function meshCounters(c: Cluster): Promise<{ outA: number; inB: number }> {
  const [ma, mb] = await Promise.all([c.a.metrics(), c.b.metrics()]);
  return { outA: metric(ma, 'forwarded_packets_total{direction="out"}'), inB: metric(mb, 'forwarded_packets_total{direction="in"}') };
}

interface Round {
  path: PathName;
  report: LoadReport;
  wallSecs: number;
  /** CPU seconds of both nodes of the path's cluster. */
  nodesCpuSecs: number;
  /** ForwardPacket frames A sent and B received over the mesh during the round (warm-up included). */
  forwardedOutA: number;
  forwardedInB: number;
  /** Mesh round: B took in at least what the receivers got. Single round: nothing was forwarded. */
  crossedAsExpected: boolean;
}

async function measure(path: Path, ratePerPair: number | undefined, windowMs: number): Promise<Round> {
  const c = path.cluster;
  for (const n of [c.a, c.b])
    if (n.child.exitCode !== null || n.child.signalCode !== null) throw new Error(`${n.name} exited:\n${n.output()}`);
  const before = await meshCounters(c);
  const cpu0 = cpuSeconds(c.a.child.pid) + cpuSeconds(c.b.child.pid);
  const t0 = performance.now();
  const report = await runLoad({
    url: c.a.url,
    receiverUrl: path.mesh ? c.b.url : undefined,
    caPem: c.caPem,
    pairs,
    packetSize,
    durationMs: windowMs,
    warmupMs: WARMUP_MS,
    ratePerPair,
  });
  const wallSecs = (performance.now() - t0) / 1000;
  const nodesCpuSecs = cpuSeconds(c.a.child.pid) + cpuSeconds(c.b.child.pid) - cpu0;
  const after = await meshCounters(c);
  const forwardedOutA = after.outA - before.outA;
  const forwardedInB = after.inB - before.inB;
  const crossedAsExpected = path.mesh
    ? report.packetsReceived > 0 && forwardedInB >= report.packetsReceived && forwardedOutA >= report.packetsReceived
    : forwardedOutA === 0 && forwardedInB === 0;
  return { path: path.name, report, wallSecs, nodesCpuSecs, forwardedOutA, forwardedInB, crossedAsExpected };
}

interface Summary {
  packetsPerSec: number;
  gbitPerSec: number;
  lossRatio: number;
  rttP50Us: number | undefined;
  rttP99Us: number | undefined;
  rttSamples: number;
  nodesCores: number;
  cpuUsPerPacket: number;
  received: number;
  forwardedInB: number;
  crossedAsExpected: boolean;
}

/** Rounds of one path combined: rates over the summed windows, percentiles weighted by samples. */
function summarize(done: Round[]): Summary {
  const sum = (f: (r: Round) => number) => done.reduce((t, r) => t + f(r), 0);
  const window = sum((r) => r.report.durationSecs);
  const sent = sum((r) => r.report.packetsSent);
  const samples = sum((r) => r.report.rttSamples);
  const weighted = (f: (r: LoadReport) => number | null | undefined) =>
    samples === 0 ? undefined : sum((r) => (f(r.report) ?? 0) * r.report.rttSamples) / samples;
  const packetsPerSec = sum((r) => r.report.packetsReceived) / window;
  const nodesCores = sum((r) => r.nodesCpuSecs) / sum((r) => r.wallSecs);
  return {
    packetsPerSec,
    gbitPerSec: sum((r) => r.report.gbitPerSec * r.report.durationSecs) / window,
    lossRatio: sent === 0 ? 0 : sum((r) => r.report.lossRatio * r.report.packetsSent) / sent,
    rttP50Us: weighted((r) => r.rttP50Us),
    rttP99Us: weighted((r) => r.rttP99Us),
    rttSamples: samples,
    nodesCores,
    cpuUsPerPacket: packetsPerSec > 0 ? (nodesCores * 1e6) / packetsPerSec : NaN,
    received: sum((r) => r.report.packetsReceived),
    forwardedInB: sum((r) => r.forwardedInB),
    crossedAsExpected: done.every((r) => r.crossedAsExpected),
  };
}

/** `rounds` rounds of every path, the order reversed every other round. */
async function phase(label: string, paths: Path[], ratePerPair: number | undefined, totalMs: number): Promise<Map<PathName, Summary>> {
  const done: Round[] = [];
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? paths : [...paths].reverse();
    for (const path of order) {
      const round = await measure(path, ratePerPair, totalMs / rounds);
      done.push(round);
      const r = round.report;
      process.stderr.write(
        `  ${label} round ${i + 1}/${rounds} ${path.name.padEnd(10)} ${fmtInt(r.packetsPerSec).padStart(9)} pkt/s  loss ${fmtPct(r.lossRatio)}  ` +
          `p50 ${fmtMs(r.rttP50Us)}  p99 ${fmtMs(r.rttP99Us)}  forwarded in at B ${fmtInt(round.forwardedInB)}` +
          `${round.crossedAsExpected ? '' : '  (NOT AS EXPECTED)'}\n`,
      );
      if (values.verbose) console.log(formatReport(`${label} ${path.name}`, r));
    }
  }
  return new Map(paths.map((p) => [p.name, summarize(done.filter((r) => r.path === p.name))]));
}

function resultTable(title: string, paths: Path[], s: Map<PathName, Summary>): string {
  const names = paths.map((p) => p.name);
  const ratios: [PathName, PathName][] = [['mesh', 'single']];
  if (s.has('tls-mesh')) ratios.push(['tls-mesh', 'mesh'], ['tls-mesh', 'tls-single'], ['tls-single', 'single']);
  const row = (label: string, f: (x: Summary) => string, r?: (x: Summary) => number | undefined) => [
    label,
    ...names.map((n) => f(s.get(n)!)),
    ...ratios.map(([x, y]) => (r ? fmtRatio(r(s.get(x)!), r(s.get(y)!)) : '')),
  ];
  return formatTable(title, [
    ['', ...names, ...ratios.map(([x, y]) => `${x}/${y}`)],
    row(
      'packets/s',
      (x) => fmtInt(x.packetsPerSec),
      (x) => x.packetsPerSec,
    ),
    row(
      'Gbit/s',
      (x) => x.gbitPerSec.toFixed(3),
      (x) => x.gbitPerSec,
    ),
    row('loss', (x) => fmtPct(x.lossRatio)),
    row(
      'RTT p50',
      (x) => fmtMs(x.rttP50Us),
      (x) => x.rttP50Us,
    ),
    row(
      'RTT p99',
      (x) => fmtMs(x.rttP99Us),
      (x) => x.rttP99Us,
    ),
    row('RTT samples', (x) => fmtInt(x.rttSamples)),
    row('nodes CPU (cores)', (x) => x.nodesCores.toFixed(2)),
    row(
      'nodes CPU/packet',
      (x) => `${x.cpuUsPerPacket.toFixed(2)} µs`,
      (x) => x.cpuUsPerPacket,
    ),
    row('received', (x) => fmtInt(x.received)),
    row('forwarded in at B', (x) => fmtInt(x.forwardedInB)),
    // Mesh rounds: B took in at least what the receivers got; single rounds: nothing forwarded.
    row('mesh check', (x) => (x.crossedAsExpected ? 'ok' : 'FAILED')),
  ]);
}

const clusters: Cluster[] = [];
let ca: ReturnType<typeof makePrivateCa> | undefined;
let failed = false;
try {
  console.log(
    `mesh bench: ${pairs} pairs × ${packetSize} B, unpaced ${values.duration} per path in ${rounds} rounds, ` +
      `paced ${pacedDurationMs > 0 ? values['paced-duration'] : 'off'}; TLS ${withTls ? 'on' : 'off'}; load average ${loadavg()[0]!.toFixed(2)}`,
  );
  const plain = await startCluster('bench');
  clusters.push(plain);
  const paths: Path[] = [
    { name: 'single', cluster: plain, mesh: false },
    { name: 'mesh', cluster: plain, mesh: true },
  ];
  if (withTls) {
    ca = makePrivateCa();
    const tls = await startCluster('bench-tls', { certFile: ca.certFile, keyFile: ca.keyFile, caFile: ca.caFile });
    clusters.push(tls);
    // The mesh link runs over TLS: B's relay URL is https (its port speaks only TLS) and A's link to it is up.
    const relayOfB = (await tls.a.replicas()).find((r) => r.hostname === tls.b.name)?.relay_address ?? '';
    if (!relayOfB.startsWith('https://')) throw new Error(`the TLS cluster's node B advertises ${relayOfB}, not an https relay URL`);
    console.log(`TLS cluster: A ${tls.a.url}, B ${relayOfB} (mesh over https, DERPMESH_MESH_CA_FILE=${ca.caFile})`);
    paths.push({ name: 'tls-single', cluster: tls, mesh: false }, { name: 'tls-mesh', cluster: tls, mesh: true });
  }
  console.log(`plain cluster: A ${plain.a.url}, B ${plain.b.url}\n`);

  const unpaced = await phase('unpaced', paths, undefined, durationMs);
  const tables = [
    resultTable(
      `unpaced: ${pairs} pairs × ${packetSize} B, senders unpaced, ${rounds} × ${durationMs / rounds / 1000} s per path`,
      paths,
      unpaced,
    ),
  ];
  let paced: Map<PathName, Summary> | undefined;
  if (pacedDurationMs > 0) {
    const slowest = Math.min(...[...unpaced.values()].map((x) => x.packetsPerSec));
    const rate = Math.max(1_000, slowest * pacedFraction);
    paced = await phase('paced', paths, rate / pairs, pacedDurationMs);
    tables.push(
      resultTable(
        `paced: ${pairs} pairs × ${packetSize} B at ${fmtInt(rate)} pkt/s total (${Math.round(pacedFraction * 100)} % of the slowest path), ${rounds} × ${pacedDurationMs / rounds / 1000} s per path`,
        paths,
        paced,
      ),
    );
  }
  console.log('\n' + tables.join('\n\n'));

  const ratio = (s: Map<PathName, Summary>, x: PathName, y: PathName) => s.get(x)!.packetsPerSec / s.get(y)!.packetsPerSec;
  console.log(
    `\nmesh / single-node packets/s: ${fmtInt(unpaced.get('mesh')!.packetsPerSec)} / ${fmtInt(unpaced.get('single')!.packetsPerSec)} = ${ratio(unpaced, 'mesh', 'single').toFixed(2)}×`,
  );
  console.log(ratio(unpaced, 'mesh', 'single') >= TARGET_MESH_RATIO ? 'TARGET HOLDS (≥ 0.7×)' : 'TARGET MISSED (< 0.7×)');
  if (withTls) {
    console.log(
      `TLS: tls-mesh / mesh packets/s ${ratio(unpaced, 'tls-mesh', 'mesh').toFixed(2)}×, tls-mesh / tls-single ${ratio(unpaced, 'tls-mesh', 'tls-single').toFixed(2)}× ` +
        `(the HA target ≥ 0.7× ${ratio(unpaced, 'tls-mesh', 'tls-single') >= TARGET_MESH_RATIO ? 'holds' : 'missed'} on the TLS cluster)` +
        (paced ? `; paced p99 tls-mesh / mesh ${fmtRatio(paced.get('tls-mesh')!.rttP99Us, paced.get('mesh')!.rttP99Us)}` : ''),
    );
  }
  const crossed = [unpaced, ...(paced ? [paced] : [])].every((s) => [...s.values()].every((x) => x.crossedAsExpected));
  console.log(
    crossed
      ? "mesh check: in every mesh round node B's packets_forwarded_in grew by at least what the receivers got; single rounds forwarded nothing"
      : 'mesh check FAILED: see the "mesh check" rows above',
  );
  if (!crossed) failed = true;
  // Where packets were lost, over all rounds: queue drops at A (its clients' and the mesh link's
  // queues) and at B (its clients' queues).
  for (const c of clusters) {
    for (const node of [c.a, c.b]) {
      const drops = (await node.metrics()).split('\n').filter((l) => /^derpmesh_dropped_packets_total\{[^}]*\} [1-9]/.test(l));
      console.log(`node ${node.name} drops: ${drops.join(', ') || 'none'}`);
    }
  }
} catch (err) {
  failed = true;
  console.error(err);
} finally {
  await Promise.all([...nodes].map((n) => n.kill9()));
  for (const c of clusters) await c.postgres.stop();
  if (ca) rmSync(ca.dir, { recursive: true, force: true });
}
if (failed) process.exitCode = 1;
