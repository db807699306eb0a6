// The soak's rows (bench/soak.ts prints one per sample; test/soak.test.ts prints them as diagnostics).
import { fmtInt } from '../report.js';
import type { SoakReport, SoakSample } from './run.js';

export const soakLegend =
  "per sample: each node's VmRSS (MiB), open fds, connections (derpmesh_connections), packets queued to its clients " +
  '(derpmesh_queued_packets), packets dropped in the interval (derpmesh_dropped_packets_total); ' +
  "the steady flows' packets sent in the interval, lost (never arrived), lost in a fault interval by " +
  'flows not touching the faulted node (else); churn clients done/started in the interval; faults (in parentheses: ' +
  'the window goes on)';

const NODE_COLUMNS = ['MiB', 'fds', 'conn', 'queue', 'drop'];
const WIDTHS = { time: 7, node: [6, 5, 5, 5, 5], sent: 8, lost: 6, else: 5, churn: 7 };

function time(s: number): string {
  const whole = Math.round(s);
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, '0')}`;
}

/** Two header lines: the nodes, then the columns. */
export function soakHeader(nodes: number): string {
  const nodeWidth = WIDTHS.node.reduce((a, b) => a + b + 1, -1);
  const names = [...Array(nodes).keys()].map((i) => `node-${i}`.padEnd(nodeWidth));
  const cells = [
    'time'.padEnd(WIDTHS.time),
    ...names.map(() => NODE_COLUMNS.map((c, j) => c.padStart(WIDTHS.node[j]!)).join(' ')),
    'sent'.padStart(WIDTHS.sent),
    'lost'.padStart(WIDTHS.lost),
    'else'.padStart(WIDTHS.else),
    'churn'.padStart(WIDTHS.churn),
    'fault',
  ];
  return `  ${''.padEnd(WIDTHS.time)}  ${names.join('  ')}`.trimEnd() + `\n  ${cells.join('  ')}`;
}

export function soakRow(s: SoakSample): string {
  const nodes = s.nodes.map((n) => {
    const down = n.pid === undefined;
    const cells = [
      down ? 'down' : n.rssKiB === undefined ? '?' : (n.rssKiB / 1024).toFixed(1),
      down ? '' : String(n.fds ?? '?'),
      down ? '' : String(n.gauges?.connections ?? '?'),
      down ? '' : String(n.gauges?.queued_packets ?? '?'),
      down ? '' : String(n.dropsInInterval ?? '?'),
    ];
    return cells.map((c, j) => c.padStart(WIDTHS.node[j]!)).join(' ');
  });
  const i = s.interval;
  const cells = [
    time(s.t).padEnd(WIDTHS.time),
    ...nodes,
    (i ? fmtInt(i.sent) : '').padStart(WIDTHS.sent),
    (i ? fmtInt(i.lost) : '').padStart(WIDTHS.lost),
    (i && i.faults.length > 0 ? fmtInt(i.lostElsewhere) : '').padStart(WIDTHS.else),
    (i ? `${i.churnOk * 2}/${i.churnPairs * 2}` : '').padStart(WIDTHS.churn),
    i?.faultMarks.join(', ') ?? '',
  ];
  return `  ${cells.join('  ')}`.trimEnd();
}

/** The header and every row of a finished run. */
export function soakTable(r: SoakReport): string {
  return [soakHeader(r.samples[0]?.nodes.length ?? 0), ...r.samples.map(soakRow)].join('\n');
}
