// Chaos benchmark (issue 12): how much a 3-node cluster loses, and how fast it heals, when a node or
// Postgres fails under load, with every packet accounted for.
//
//   node dist/bench/chaos.js [--clients 300] [--rate 10]
//                            [--scenarios kill9,sigterm,pg-stop,pg-restart,sigstop,storm,partition,slow-link]
//                            [--warmup 3s] [--after 10s] [--pg-down 30s] [--frozen 20s] [--fault 20s]
//                            [--heartbeat 1s] [--client-processes N] [--relay derpmesh|derper] [--tls]
//                            [--json out.json]
//
// Each scenario runs on a fresh cluster: a throwaway Postgres, 3 derpmesh node processes, the TCP
// balancer of `derpmesh cluster` as the access URL, and `--clients` DERP clients (the TypeScript
// client, reconnecting with its jittered backoff) that connect through it and form one random
// cycle of flows, each sending `--rate` sequence-numbered packets per second to the next. The fault
// hits the last node (or Postgres). `partition` and `slow-link` put every node in a network namespace
// of its own behind a bridge (root and iproute2; skipped with the reason otherwise): `partition`
// blackholes the routes between the last node and its peers (Postgres and its clients stay
// reachable), `slow-link` puts netem (50 ms, 1 % loss) on its link both ways, or, on a kernel
// without netem, a 1 Mbit/s token bucket. Per scenario: the flows that do not touch the failed node and
// what they lost; the flows that do (lost in the relay, and not sent while their sender was between
// connections); for the failed node's clients, the time from the fault until both their flows
// delivered again (p50/p99/max); what /api/v2/replicas said during and after.
//
// Targets (issue 12): kill -9 — 0 lost by unaffected flows, heal p99 ≤ 3 s; SIGTERM — 0 lost by
// unaffected flows, heal p99 ≤ 1 s; Postgres stopped or restarted — 0 lost anywhere, every node
// lists the others as live within 2 s of Postgres returning; SIGSTOP — the frozen node marked stale
// within 3 heartbeats, live again after SIGCONT, 0 lost by unaffected flows.
// `--client-processes N` runs the clients in N worker processes, each a cycle of flows of its own
// (one Node process handshakes about 1 100 clients a second: a 10 000-client storm is otherwise
// bound by the load generator). `--relay derper` runs kill9, sigterm and storm against 3 derpers
// meshed with -mesh-with (bench/derper.sh builds derper) behind the same balancer and clients, for
// the side-by-side; the other scenarios need derpmesh nodes and are skipped.
// `--tls` runs everything over TLS (the production path): a private CA made for the run (openssl),
// every relay serving HTTPS with a certificate for 127.0.0.1 it signs (derpmesh nodes with
// --tls-cert-file and the CA trusted for their mesh links; derpers with -certmode manual and the CA
// in SSL_CERT_FILE for theirs), the access URL https (the balancer passes TLS through), every client
// verifying the relay against the CA. Its rows say `over TLS`. partition and slow-link are skipped
// (their namespaces' addresses are not on the certificate).
// Exit code 0 whatever the verdict; 1 if the run itself failed.
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { parseDuration } from '../src/config.js';
import { runScenario, ScenarioSkipped, scenarioNames, type ScenarioReport } from './chaos/scenarios.js';
import { fmtInt, formatTable } from './report.js';

const { values } = parseArgs({
  options: {
    clients: { type: 'string', default: '300' },
    rate: { type: 'string', default: '10' },
    scenarios: { type: 'string', default: scenarioNames.join(',') },
    warmup: { type: 'string', default: '3s' },
    after: { type: 'string', default: '10s' },
    'pg-down': { type: 'string', default: '30s' },
    frozen: { type: 'string', default: '20s' },
    fault: { type: 'string', default: '20s' },
    heartbeat: { type: 'string', default: '1s' },
    'client-processes': { type: 'string', default: '0' },
    relay: { type: 'string', default: 'derpmesh' },
    tls: { type: 'boolean', default: false },
    json: { type: 'string' },
  },
});

function positive(name: string, text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) {
    console.error(`chaos: --${name} ${text}: a whole number, at least 1`);
    process.exit(2);
  }
  return n;
}

function duration(name: string, text: string): number {
  let ms: number | undefined;
  try {
    ms = parseDuration(text);
  } catch {
    ms = undefined;
  }
  if (ms === undefined || !(ms > 0)) {
    console.error(`chaos: --${name} ${text}: a duration such as 500ms, 10s or 1m`);
    process.exit(2);
  }
  return ms;
}

const chosen = values.scenarios.split(',').filter(Boolean);
for (const s of chosen) {
  if (!scenarioNames.includes(s)) {
    console.error(`chaos: no scenario ${s} (scenarios: ${scenarioNames.join(', ')})`);
    process.exit(2);
  }
}
if (values.relay !== 'derpmesh' && values.relay !== 'derper') {
  console.error(`chaos: --relay ${values.relay}: derpmesh or derper`);
  process.exit(2);
}
const clientProcesses = values['client-processes'] === '0' ? 0 : positive('client-processes', values['client-processes']);
const options = {
  clients: positive('clients', values.clients),
  clientProcesses,
  relay: values.relay as 'derpmesh' | 'derper',
  tls: values.tls,
  rate: positive('rate', values.rate),
  warmupMs: duration('warmup', values.warmup),
  afterMs: duration('after', values.after),
  pgDownMs: duration('pg-down', values['pg-down']),
  frozenMs: duration('frozen', values.frozen),
  faultMs: duration('fault', values.fault),
  heartbeatMs: duration('heartbeat', values.heartbeat),
  log: (line: string) => console.log(`  ${line}`),
};

/** Whether a report meets the issue's targets, and why not. */
export function verdict(r: ScenarioReport, heartbeatMs: number): { ok: boolean; why: string[] } {
  const why: string[] = [];
  if (r.unaffected.lost !== 0) why.push(`${r.unaffected.lost} packets lost by flows not touching the failed node`);
  if (r.unaffected.duplicated !== 0) why.push(`${r.unaffected.duplicated} duplicated`);
  const healLimit = r.scenario === 'kill9' ? 3_000 : r.scenario === 'sigterm' ? 1_000 : r.scenario === 'storm' ? 10_000 : undefined;
  if (healLimit !== undefined) {
    if (r.heal.neverHealed > 0) why.push(`${r.heal.neverHealed} clients never delivered again`);
    else if (!(r.heal.p99 <= healLimit)) why.push(`heal p99 ${fmtInt(r.heal.p99)} ms > ${healLimit} ms`);
  }
  if (r.scenario === 'storm' && !(r.measures.deliveringMs! <= 10_000))
    why.push(`every flow delivering again after ${fmtInt(r.measures.deliveringMs!)} ms (> 10 000 ms)`);
  if ((r.scenario === 'pg-stop' || r.scenario === 'pg-restart') && !(r.measures.meshedMs! <= 2_000))
    why.push(`discovery resumed ${fmtInt(r.measures.meshedMs!)} ms after Postgres returned (> 2000 ms)`);
  // Measured from SIGSTOP and sampled every 100 ms; the node's last heartbeat was up to one interval before.
  if (r.scenario === 'sigstop' && !(r.measures.staleMs! <= 3 * heartbeatMs + 250))
    why.push(`stale after ${r.measures.staleMs === undefined ? 'never' : `${fmtInt(r.measures.staleMs)} ms`} (> 3 heartbeats)`);
  return { ok: why.length === 0, why };
}

const reports: ScenarioReport[] = [];
console.log(
  `chaos: ${chosen.join(', ')}; ${options.clients} clients × ${options.rate} packets/s` +
    `${clientProcesses ? ` from ${clientProcesses} client processes` : ''} through the access URL of 3 ${options.relay === 'derper' ? 'derpers' : 'nodes'}` +
    `${options.tls ? ' over TLS' : ''}; heartbeat ${options.heartbeatMs} ms`,
);
try {
  for (const name of chosen) {
    console.log(`\n${name}${options.tls ? ' over TLS' : ''}:`);
    let r: ScenarioReport;
    try {
      r = await runScenario(name, options);
    } catch (err) {
      if (!(err instanceof ScenarioSkipped)) throw err;
      console.log(`  ${err.message}`);
      continue;
    }
    reports.push(r);
    console.log(`  clients per node before ${r.placementBefore.join(' / ')}, after ${r.placementAfter.join(' / ')}`);
    for (const n of r.notes) console.log(`  ${n}`);
    console.log(`  replicas during: ${r.replicasDuring}`);
    console.log(`  replicas after:  ${r.replicasAfter}`);
    console.log(`  health after:    ${r.healthAfter}`);
  }
} catch (err) {
  console.error(`chaos: the run failed: ${(err as Error).stack ?? String(err)}`);
  process.exit(1);
}

const ms = (v: number) => (Number.isNaN(v) ? 'n/a' : `${fmtInt(v)} ms`);
console.log(
  '\n' +
    formatTable('results', [
      [
        'scenario',
        'unaffected flows',
        'sent',
        'lost',
        'dup/reord',
        'failed-node flows',
        'sent',
        'lost',
        'not sent',
        'heal p50',
        'p99',
        'max',
        'target',
      ],
      ...reports.map((r) => {
        const v = verdict(r, options.heartbeatMs);
        return [
          r.tls ? `${r.scenario} over TLS` : r.scenario,
          fmtInt(r.unaffected.flows),
          fmtInt(r.unaffected.sent),
          fmtInt(r.unaffected.lost),
          `${r.unaffected.duplicated}/${r.unaffected.reordered}`,
          fmtInt(r.affected.flows),
          fmtInt(r.affected.sent),
          fmtInt(r.affected.lost),
          fmtInt(r.affected.notSent),
          ms(r.heal.p50),
          ms(r.heal.p99),
          ms(r.heal.max),
          v.ok ? 'holds' : `MISSED: ${v.why.join('; ')}`,
        ];
      }),
    ]),
);
if (values.json) writeFileSync(values.json, JSON.stringify({ options: { ...options, log: undefined }, reports }, null, 2));
