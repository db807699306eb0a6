// `derpmesh status [--url URL] [--json]`: asks a running node for the cluster's status
// (/api/v2/status) and prints replicas, health, the latency matrix and traffic. Exit code for
// scripts and cron: 0 healthy, 1 unhealthy, 2 usage error or node unreachable.
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { rootCertificates } from 'node:tls';

import { readCaFile } from './ca-file.js';
import type { StatusDocument, StatusNode } from './cluster-status.js';

export const STATUS_USAGE = `derpmesh status [--url URL] [--json] [--timeout DURATION]

Prints the cluster as one node sees it: replicas (state, version, region, clients, rates), health
per node, the latency matrix and traffic.

Options:
  --url URL         a node's address (default: $DERPMESH_URL, else http://127.0.0.1:3000)
  --json            print the raw /api/v2/status document
  --timeout SECONDS how long to wait for the answer (default 5)
  --ca-file PEM     CA certificate(s) trusted for an https URL besides the public roots

Exit code: 0 healthy; 1 unhealthy (a node in error or stale, a mesh link down, the database
unreachable); 2 usage error or the node could not be asked.
`;

export const DEFAULT_STATUS_URL = 'http://127.0.0.1:3000';

class UsageError extends Error {}

interface StatusArgs {
  url: URL;
  json: boolean;
  timeoutMs: number;
  ca?: Buffer;
}

export function parseStatusArgs(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): StatusArgs | 'help' {
  let url = env.DERPMESH_URL || DEFAULT_STATUS_URL;
  let urlFrom = env.DERPMESH_URL ? 'DERPMESH_URL' : 'the default';
  let json = false;
  let timeoutMs = 5_000;
  let ca: Buffer | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const [flag, inline] =
      arg.startsWith('--') && arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg];
    const value = () => {
      if (inline !== undefined) return inline;
      const v = argv[++i];
      if (v === undefined || v.startsWith('--')) throw new UsageError(`${flag} needs a value`);
      return v;
    };
    switch (flag) {
      case '--help':
      case '-h':
        return 'help';
      case '--url':
        url = value();
        urlFrom = '--url';
        break;
      case '--json':
        json = true;
        break;
      case '--timeout': {
        const v = value();
        const seconds = Number(v.replace(/s$/, ''));
        if (!Number.isFinite(seconds) || seconds <= 0)
          throw new UsageError(`--timeout must be a positive number of seconds, got ${JSON.stringify(v)}`);
        timeoutMs = seconds * 1000;
        break;
      }
      case '--ca-file': {
        try {
          ca = readCaFile(value());
        } catch (e) {
          throw new UsageError((e as Error).message);
        }
        break;
      }
      default:
        throw new UsageError(`unknown argument ${JSON.stringify(arg)}`);
    }
  }
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new UsageError(`${urlFrom}: ${JSON.stringify(url)} is not a URL; give a node's address such as http://10.0.0.5:3000`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new UsageError(`${urlFrom}: ${JSON.stringify(url)} must be an http:// or https:// URL`);
  }
  return { url: parsed, json, timeoutMs, ...(ca ? { ca } : {}) };
}

/** Runs the command; resolves to the exit code. */
export async function statusCommand(argv: readonly string[], out = process.stdout, err = process.stderr): Promise<number> {
  let args: StatusArgs | 'help';
  try {
    args = parseStatusArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    err.write(`derpmesh status: ${e.message}\n\n${STATUS_USAGE}`);
    return 2;
  }
  if (args === 'help') {
    out.write(STATUS_USAGE);
    return 0;
  }
  const endpoint = new URL('api/v2/status', args.url.href.endsWith('/') ? args.url : new URL(args.url.href + '/'));
  let body: string;
  try {
    const res = await get(endpoint, args.timeoutMs, args.ca);
    body = res.body;
    if (res.status === 404) {
      err.write(`derpmesh status: ${endpoint.href} answered 404: is this a derpmesh node of this version (with /api/v2/status)?\n`);
      return 2;
    }
    if (res.status !== 200) {
      err.write(`derpmesh status: ${endpoint.href} answered HTTP ${res.status}: ${body.slice(0, 200).trim()}\n`);
      return 2;
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ETIMEDOUT' ? `no answer within ${args.timeoutMs / 1000} s` : (code ?? (e as Error).message);
    const tls = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS/.test(code ?? '');
    err.write(
      `derpmesh status: cannot reach ${endpoint.href}: ${why}\n` +
        (tls
          ? `The node's certificate is not trusted: give its CA with --ca-file.\n`
          : `Check that a derpmesh node listens there (its --http-address / CODER_ADDRESS), or give its address with --url or DERPMESH_URL.\n`),
    );
    return 2;
  }
  let doc: StatusDocument;
  try {
    doc = JSON.parse(body) as StatusDocument;
    if (!Array.isArray(doc.nodes) || typeof doc.healthy !== 'boolean') throw new Error('not a status document');
  } catch (e) {
    err.write(`derpmesh status: ${endpoint.href} did not answer a status document (${(e as Error).message})\n`);
    return 2;
  }
  if (args.json) out.write(body.endsWith('\n') ? body : body + '\n');
  else out.write(formatStatus(doc, args.url.href));
  return doc.healthy ? 0 : 1;
}

/** GET `url` (http, or https trusting the public roots and `ca`), the whole answer within `timeoutMs`. */
function get(url: URL, timeoutMs: number, ca?: Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const onResponse = (res: IncomingMessage) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        // A status document of a large cluster is a few MB at most.
        if (size > 64 * 1024 * 1024) req.destroy(new Error('answer larger than 64 MB'));
        else chunks.push(c);
      });
      res.on('end', () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') });
      });
      res.on('error', reject);
    };
    const options = { headers: { Accept: 'application/json' } };
    const req =
      url.protocol === 'https:'
        ? httpsRequest(url, { ...options, ...(ca ? { ca: [...rootCertificates, ca.toString()] } : {}) }, onResponse)
        : httpRequest(url, options, onResponse);
    const timer = setTimeout(() => req.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })), timeoutMs);
    req.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    req.end();
  });
}

const fmtNum = (x: number | undefined | null) => {
  if (x === undefined || x === null || !Number.isFinite(x)) return '-';
  const a = Math.abs(x);
  if (a >= 1e9) return `${(x / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${(x / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(x / 1e3).toFixed(1)}k`;
  return a >= 100 || Number.isInteger(x) ? String(Math.round(x)) : x.toFixed(1);
};

const fmtBytes = (x: number | undefined | null) => {
  if (x === undefined || x === null || !Number.isFinite(x)) return '-';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (Math.abs(x) >= 1000 && i < units.length - 1) {
    x /= 1000;
    i++;
  }
  return `${i === 0 ? Math.round(x) : x.toFixed(1)}${units[i]}`;
};

/** Control characters out of strings that came from the database, so they cannot drive the terminal. */
const clean = (s: string) => s.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?');

function table(header: string[], rows: string[][], rightAlign: Set<number> = new Set()): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    '  ' +
    cells
      .map((c, i) => (rightAlign.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n') + '\n';
}

function linkSummary(n: StatusNode): string {
  if (n.meshLinks.length === 0) return '-';
  const up = n.meshLinks.filter((l) => l.up).length;
  return `${up}/${n.meshLinks.length} up`;
}

/** The human-readable report. */
export function formatStatus(doc: StatusDocument, url: string): string {
  const name = (n: StatusNode) => clean(n.hostname) + (n.self ? '*' : '');
  let out = '';
  const verdict = doc.healthy ? (doc.severity === 'ok' ? 'HEALTHY' : `HEALTHY with ${doc.severity}s`) : 'UNHEALTHY';
  out += `derpmesh cluster at ${url} (answered by ${clean(doc.reportedBy.hostname)}): ${verdict}\n`;
  out += `  database: ${doc.database.reachable ? `reachable, ${doc.database.rttMs?.toFixed(2) ?? '?'} ms` : `UNREACHABLE: ${clean(doc.database.error ?? '')}`}\n`;
  if (doc.problems.length) out += `\nProblems:\n${doc.problems.map((p) => `  - ${clean(p)}\n`).join('')}`;
  if (doc.warnings.length) out += `\nWarnings:\n${doc.warnings.map((p) => `  - ${clean(p)}\n`).join('')}`;

  out += `\nReplicas (* = the node answering):\n`;
  out += table(
    [
      'NODE',
      'STATE',
      'HEALTH',
      'VERSION',
      'REGION',
      'CLIENTS',
      'PKT/S IN',
      'PKT/S OUT',
      'B/S IN',
      'B/S OUT',
      'DROPS/S',
      'MESH',
      'HEARTBEAT',
    ],
    doc.nodes.map((n) => [
      name(n),
      n.state,
      n.severity,
      clean(n.version),
      String(n.region),
      fmtNum(n.traffic?.clients),
      fmtNum(n.rates?.packetsIn),
      fmtNum(n.rates?.packetsOut),
      fmtBytes(n.rates?.bytesIn),
      fmtBytes(n.rates?.bytesOut),
      fmtNum(n.rates?.drops),
      linkSummary(n),
      n.state === 'stopped' ? 'stopped' : `${(n.heartbeatAgeMs / 1000).toFixed(1)} s ago`,
    ]),
    new Set([4, 5, 6, 7, 8, 9, 10]),
  );

  out += `\nHealth:\n`;
  for (const n of doc.nodes.filter((x) => x.state !== 'stopped')) {
    out += `  ${name(n)}: ${n.state === 'stale' ? 'STALE (no heartbeat; its last report follows)' : n.severity}\n`;
    if (!n.sections) out += `    no health report stored yet\n`;
    else
      for (const k of ['database', 'relay', 'mesh', 'pubsub'] as const) {
        const s = n.sections[k];
        if (s) out += `    ${k.padEnd(8)} ${s.severity.padEnd(7)} ${s.code}: ${clean(s.message)}\n`;
      }
    for (const l of n.meshLinks.filter((x) => !x.up)) {
      out += `    link to ${clean(l.peer ?? l.url)} ${l.state}${l.lastError ? `: ${clean(l.lastError)}` : ''}\n`;
    }
  }

  const byId = new Map(doc.nodes.map((n) => [n.id, n]));
  const ids = doc.latency.ids;
  if (ids.length > 0) {
    const thr = doc.thresholdMs;
    const cell = (v: number | null | undefined) => (v === undefined || v === null ? '?' : `${v.toFixed(2)}${v > thr ? '!' : ''}`);
    out += `\nRound trips (ms, row -> column; ! = over the ${thr} ms threshold):\n`;
    out += table(
      ['FROM \\ TO', ...ids.map((id) => clean(byId.get(id)?.hostname ?? id)), 'POSTGRES'],
      doc.latency.rows.map((r) => [
        clean(byId.get(r.from)?.hostname ?? r.from),
        ...ids.map((id) => (id === r.from ? '-' : cell(r.to[id]))),
        cell(r.databaseMs),
      ]),
      new Set(ids.map((_, i) => i + 1).concat([ids.length + 1])),
    );
  }

  const withTraffic = doc.nodes.filter((n) => n.traffic && n.state !== 'stopped');
  if (withTraffic.length > 0) {
    out += `\nTraffic (totals since each node started; drops by reason):\n`;
    out += table(
      ['NODE', 'PACKETS IN', 'PACKETS OUT', 'BYTES IN', 'BYTES OUT', 'FWD IN', 'FWD OUT', 'DROPS'],
      withTraffic.map((n) => {
        const t = n.traffic!;
        const reasons = Object.entries(t.drops)
          .filter(([, v]) => v > 0)
          .map(([k, v]) => `${k} ${fmtNum(v)}`)
          .join(', ');
        return [
          name(n),
          fmtNum(t.totals.packetsIn),
          fmtNum(t.totals.packetsOut),
          fmtBytes(t.totals.bytesIn),
          fmtBytes(t.totals.bytesOut),
          fmtNum(t.totals.forwardedIn),
          fmtNum(t.totals.forwardedOut),
          `${fmtNum(t.totals.drops)}${reasons ? ` (${reasons})` : ''}`,
        ];
      }),
      new Set([1, 2, 3, 4, 5, 6]),
    );
  }
  return out;
}
