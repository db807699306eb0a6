// Soak benchmark (issue 12, point 3): a 3-node cluster under steady mixed load and client churn for a
// long time, with a fault every few minutes; does anything grow without bound, is anything lost
// outside the faults?
//
//   node dist/bench/soak.js [--duration 30m] [--sample 30s] [--clients 300] [--rate 10] [--churn 60]
//                           [--fault-every 5m] [--faults sigterm,kill9,pg-restart] [--down 5s]
//                           [--warmup 2m] [--heartbeat 1s] [--heap] [--tls] [--json out.json] [--fail-on-miss]
//
// The cluster is bench/chaos's (a throwaway Postgres, 3 derpmesh node processes, the TCP balancer of
// `derpmesh cluster` as the access URL) with `--clients` reconnecting DERP clients in one random
// cycle of flows, each sending `--rate` sequence-numbered packets per second to the next. Beside them,
// `--churn` extra clients per minute connect through the access URL in pairs, exchange 5 packets each
// way and close. Every `--fault-every` one fault, in turn from `--faults`: SIGTERM of a node, then its
// restart after `--down`; kill -9 of a node, then its restart; a Postgres restart (nodes in turn, the
// last first). Every `--sample` each node's VmRSS and open descriptors (/proc/PID), its connections
// and drop counters (/metrics), and the flows' loss in the interval, counted by sequence number (see
// bench/soak/run.ts): one row per sample. A fault window is the fault and 10 s after it.
//
// Targets (issue 12): RSS and open fds flat after warm-up (≤ 5 % growth; small absolute slack stated
// in the output), 0 loss outside fault windows. Checks of its own: flows not touching the faulted node
// lose nothing, every churn client exchanged its packets, no relay drops outside fault windows, the
// nodes' connection and forwarder gauges back to their baseline after the run.
// Exit code 0 whatever the verdict; 1 if the run itself failed; 2 for bad options; 3 with
// --fail-on-miss when a target or check missed.
import { writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';

import { parseDuration } from '../src/config.js';
import { fmtInt, formatTable } from './report.js';
import { soakHeader, soakLegend, soakRow, soakTable } from './soak/table.js';
import { resolveSoakOptions, runSoak, soakFaults, type SoakFault, type SoakOptions, type SoakReport } from './soak/run.js';

function fail(message: string): never {
  console.error(`soak: ${message}`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    options: {
      duration: { type: 'string', default: '30m' },
      sample: { type: 'string', default: '30s' },
      clients: { type: 'string', default: '300' },
      rate: { type: 'string', default: '10' },
      churn: { type: 'string', default: '60' },
      'fault-every': { type: 'string', default: '5m' },
      faults: { type: 'string', default: soakFaults.join(',') },
      down: { type: 'string', default: '5s' },
      warmup: { type: 'string', default: '2m' },
      heartbeat: { type: 'string', default: '1s' },
      json: { type: 'string' },
      heap: { type: 'boolean', default: false },
      tls: { type: 'boolean', default: false },
      'fail-on-miss': { type: 'boolean', default: false },
    },
  });
} catch (err) {
  fail(
    `${(err as Error).message} (options: --duration --sample --clients --rate --churn --fault-every --faults --down --warmup --heartbeat --json --heap --tls --fail-on-miss)`,
  );
}
const { values } = parsed;

function whole(name: string, text: string, min: number): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isInteger(n) || n < min) fail(`--${name} ${text}: a whole number, at least ${min}`);
  return n;
}

function duration(name: string, text: string, zero = false): number {
  let ms: number | undefined;
  try {
    ms = parseDuration(text);
  } catch {
    ms = undefined;
  }
  if (ms === undefined || !(ms > 0 || (zero && ms === 0)))
    fail(`--${name} ${text}: a duration such as 500ms, 30s, 5m or 1h${zero ? ' (0 = none)' : ''}`);
  return ms;
}

const faults = values.faults.split(',').filter(Boolean);
for (const f of faults)
  if (!(soakFaults as readonly string[]).includes(f)) fail(`--faults: no fault ${f} (faults: ${soakFaults.join(', ')})`);

const options: SoakOptions = {
  durationMs: duration('duration', values.duration),
  sampleMs: duration('sample', values.sample),
  clients: whole('clients', values.clients, 2),
  rate: whole('rate', values.rate, 1),
  churnPerMinute: whole('churn', values.churn, 0),
  faultEveryMs: duration('fault-every', values['fault-every'], true),
  faults: faults as SoakFault[],
  downMs: duration('down', values.down),
  warmupMs: duration('warmup', values.warmup, true),
  heartbeatMs: duration('heartbeat', values.heartbeat),
  heap: values.heap,
  tls: values.tls,
};
try {
  resolveSoakOptions(options);
} catch (err) {
  fail((err as Error).message.replace(/^soak: /, ''));
}

console.log(
  `soak: ${values.duration} of ${options.clients} clients × ${options.rate} packets/s through the access URL of 3 nodes${options.tls ? ' over TLS' : ''}, ` +
    `churn ${options.churnPerMinute} clients/min, ` +
    (options.faultEveryMs! > 0 ? `a fault every ${values['fault-every']} (${faults.join(', ')} in turn)` : 'no faults') +
    `; sample every ${values.sample}, warm-up ${values.warmup}; load average ${loadavg()
      .map((l) => l.toFixed(1))
      .join(' ')}`,
);
let printedHeader = false;
let report: SoakReport;
try {
  report = await runSoak({
    ...options,
    log: (line) => console.log(`  ${line}`),
    onSample: (s) => {
      if (!printedHeader) {
        console.log(`\n${soakLegend}`);
        console.log(soakHeader(s.nodes.length));
        printedHeader = true;
      }
      console.log(soakRow(s));
    },
  });
} catch (err) {
  console.error(`soak: the run failed: ${(err as Error).stack ?? String(err)}`);
  process.exit(1);
}

const r = report;
console.log(`\nthe rows again, counted after the traffic stopped and drained (the verdict's count):`);
console.log(soakTable(r));

console.log('\nfaults');
for (const f of r.faults) console.log(`  +${f.beganS.toFixed(1)} s ${f.kind} of ${f.target}: ${f.note}`);
if (r.faults.length === 0) console.log('  none');

const mib = (v: number) => (Number.isNaN(v) ? '' : v.toFixed(1));
const fd = (v: number) => (Number.isNaN(v) ? '' : v.toFixed(1));
console.log(
  '\n' +
    formatTable(
      `growth per node process: means of the first and last third of the samples after warm-up (${
        r.options.warmupMs / 1000
      } s after the process started) outside fault windows; fds net of the node's steady clients`,
      [
        [
          'node',
          'pid',
          'samples',
          'judged',
          'RSS first',
          'last',
          'ok',
          'fds net first',
          'last',
          'fds first',
          'ok',
          ...(r.options.heap ? ['heap first', 'last', 'live first', 'last'] : []),
        ],
        ...r.series.map((s) => [
          s.node,
          String(s.pid),
          String(s.samples),
          String(s.judged),
          mib(s.rssFirstMiB),
          mib(s.rssLastMiB),
          s.skipped ? 'too short' : s.rssOk ? 'yes' : 'NO',
          fd(s.fdsNetFirst),
          fd(s.fdsNetLast),
          fd(s.fdsFirst),
          s.skipped ? '' : s.fdsOk ? 'yes' : 'NO',
          ...(r.options.heap
            ? [s.heapTotalFirstMiB, s.heapTotalLastMiB, s.heapLiveFirstMiB, s.heapLiveLastMiB].map((v) => mib(v ?? NaN))
            : []),
        ]),
      ],
    ),
);
const c = r.churn;
console.log(
  `\nchurn: ${c.pairs} pairs, ${c.ok} of ${c.clients} clients exchanged all their packets; ${c.firstTry} of ${c.packets} packets arrived ` +
    `at the first send, ${c.resent} sent again; ${c.connectRetries} connects tried again, ${c.reconnects} reconnects; ` +
    `pair done in p50 ${fmtInt(c.p50Ms)} ms, p99 ${fmtInt(c.p99Ms)} ms, max ${fmtInt(c.maxMs)} ms`,
);
for (const m of c.missedFirst) console.log(`  ${m}`);
for (const m of c.failures) console.log(`  failed: ${m}`);
const outsideDisconnects = r.disconnects.filter((d) => !d.inFaultWindow).length;
console.log(`steady clients' connections broken: ${r.disconnects.length} (${outsideDisconnects} outside fault windows)`);
const f = r.flows;
console.log(
  `flows: ${f.flows} flows sent ${fmtInt(f.sent)} packets, lost ${fmtInt(f.lost)} (outside fault windows ${fmtInt(f.lostOutside)} of ` +
    `${fmtInt(f.sentOutside)}; in fault windows ${fmtInt(f.lostInFaults)}), duplicated ${fmtInt(f.duplicated)}`,
);
console.log(
  `took ${(r.timing.totalMs / 1000).toFixed(0)} s (cluster start ${(r.timing.startMs / 1000).toFixed(1)} s); load average now ${loadavg()
    .map((l) => l.toFixed(1))
    .join(' ')}`,
);

console.log("\ntargets (* = the issue's)");
for (const v of r.verdicts) console.log(`  ${v.ok ? 'holds ' : 'MISSED'} ${v.issue ? '*' : ' '} ${v.target}: ${v.detail}`);
const missed = r.verdicts.filter((v) => !v.ok);
console.log(missed.length === 0 ? 'SOAK TARGETS HOLD' : `SOAK: ${missed.length} MISSED`);
if (values.json) writeFileSync(values.json, JSON.stringify(r, null, 2));
process.exit(values['fail-on-miss'] && missed.length > 0 ? 3 : 0);
