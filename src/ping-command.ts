// `derpmesh ping`: the end-to-end check Tailscale's derpprobe does. A DERP client on every live
// node; for every ordered pair (A, B) the client on A sends packets to the client on B (through the
// mesh when A and B are different nodes), B echoes each one back, and the pair reports delivery and
// round trip. Exit code 0 when every pair delivered everything, 1 otherwise (for alerting).
import { randomBytes } from 'node:crypto';
import { get as httpGet, type IncomingMessage } from 'node:http';
import { get as httpsGet } from 'node:https';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { DerpClient } from './client/index.js';
import { parseDuration } from './config.js';
import { readCaFile } from './ca-file.js';
import { configError } from './errors.js';
import { createProgress, type Progress } from './progress.js';

export interface PingTarget {
  /** How the report names the node: its hostname in the registry, else host:port of its URL. */
  name: string;
  /** The relay URL the client dials. */
  url: string;
  /** Its DERP region: regions do not mesh, so only pairs within one region are checked. */
  regionId?: number;
}

export interface PingOptions {
  targets: PingTarget[];
  /** Packets per ordered pair (default 5). */
  count?: number;
  /** Limit for each connection and for each pair's packets to arrive (default 5 s). */
  timeoutMs?: number;
  /** Pause between two packets of a pair (default 10 ms). */
  intervalMs?: number;
  /** PEM CA certificate(s) trusted for https relay URLs besides the public roots. */
  caPem?: Buffer;
  progress?: Progress;
}

export interface NodeResult {
  name: string;
  url: string;
  regionId?: number;
  connected: boolean;
  /** Dial plus DERP handshake. */
  connectMs?: number;
  /** Why the client could not connect, or why its connection broke during the run. */
  error?: string;
}

export interface PairResult {
  from: string;
  to: string;
  sent: number;
  /** Packets the client on `to` received. */
  delivered: number;
  /** Echoes back at the client on `from`. */
  echoed: number;
  /** Share of the packets not delivered or not echoed, 0..1. */
  loss: number;
  rttP50Ms?: number;
  rttMaxMs?: number;
  /** Until the first packet of the pair got through (the mesh learning of the new client). */
  routeMs?: number;
  ok: boolean;
  error?: string;
}

export interface PingReport {
  ok: boolean;
  count: number;
  timeoutMs: number;
  nodes: NodeResult[];
  pairs: PairResult[];
  /** Replicas the registry lists but that are not checked (stale, or without a relay address). */
  skipped: { name: string; state: string; reason: string }[];
}

const MAGIC = Buffer.from('derpmesh-ping\0');
const enum Kind {
  Route = 1,
  Probe = 2,
  Echo = 3,
  RouteAck = 4,
}
/** MAGIC, run id (8), kind (1), pair (4), seq (4). */
const PACKET_LENGTH = MAGIC.length + 8 + 1 + 4 + 4;

interface PairState {
  /** A route packet reached B. */
  reached: boolean;
  /** B's answer to one came back to A: both directions work. */
  routed: boolean;
  delivered: Set<number>;
  sentAt: Map<number, number>;
  rtts: number[];
}

/** Runs the check against `targets`; never rejects for an unreachable node (the report says so). */
export async function runPing(options: PingOptions): Promise<PingReport> {
  const count = options.count ?? 5;
  const timeoutMs = options.timeoutMs ?? 5_000;
  const intervalMs = options.intervalMs ?? 10;
  const progress = options.progress;
  const runId = randomBytes(8);
  const targets = options.targets;
  const nodes: NodeResult[] = targets.map((t) => ({ name: t.name, url: t.url, regionId: t.regionId, connected: false }));
  const clients: (DerpClient | undefined)[] = targets.map(() => undefined);
  const pairs: { from: number; to: number }[] = [];
  const sameRegion = (a: PingTarget, b: PingTarget) => a.regionId === undefined || b.regionId === undefined || a.regionId === b.regionId;
  for (let a = 0; a < targets.length; a++)
    for (let b = 0; b < targets.length; b++) if (a !== b && sameRegion(targets[a]!, targets[b]!)) pairs.push({ from: a, to: b });
  const states: PairState[] = pairs.map(() => ({ reached: false, routed: false, delivered: new Set(), sentAt: new Map(), rtts: [] }));
  /** Last PeerGone a client's relay sent about a destination key (hex), e.g. "not here". */
  const gone: Map<string, string>[] = targets.map(() => new Map());

  const packet = (kind: Kind, pair: number, seq: number) => {
    const p = Buffer.alloc(PACKET_LENGTH);
    MAGIC.copy(p, 0);
    runId.copy(p, MAGIC.length);
    p.writeUInt8(kind, MAGIC.length + 8);
    p.writeUInt32BE(pair, MAGIC.length + 9);
    p.writeUInt32BE(seq, MAGIC.length + 13);
    return p;
  };
  const onPacket = (self: number, source: Buffer, data: Buffer) => {
    if (data.length !== PACKET_LENGTH || !data.subarray(0, MAGIC.length).equals(MAGIC)) return;
    if (!data.subarray(MAGIC.length, MAGIC.length + 8).equals(runId)) return;
    const kind = data.readUInt8(MAGIC.length + 8) as Kind;
    const index = data.readUInt32BE(MAGIC.length + 9);
    const seq = data.readUInt32BE(MAGIC.length + 13);
    const pair = pairs[index];
    const state = states[index];
    if (!pair || !state) return;
    if (kind === Kind.RouteAck) {
      if (pair.from === self) state.routed = true;
      return;
    }
    if (kind === Kind.Echo) {
      if (pair.from !== self) return;
      const sentAt = state.sentAt.get(seq);
      if (sentAt === undefined) return;
      state.sentAt.delete(seq);
      state.rtts.push(performance.now() - sentAt);
      return;
    }
    if (pair.to !== self) return;
    if (kind === Kind.Route) {
      state.reached = true;
      try {
        clients[self]?.send(source, packet(Kind.RouteAck, index, seq));
      } catch {
        // The connection broke: A sees no answer.
      }
    } else if (kind === Kind.Probe && !state.delivered.has(seq)) {
      state.delivered.add(seq);
      try {
        clients[self]?.send(source, packet(Kind.Echo, index, seq));
      } catch {
        // The connection broke: the missing echo is counted.
      }
    }
  };

  // Connect every client at once: one slow or frozen node costs one timeout, not one per node.
  let connected = 0;
  progress?.update(`ping: connecting 0/${targets.length}`, true);
  await Promise.all(
    targets.map(async (t, i) => {
      const client = new DerpClient({
        url: t.url,
        isProber: true,
        connectTimeoutMs: timeoutMs,
        ...(options.caPem ? { tls: { ca: options.caPem } } : {}),
      });
      client.on('packet', (source, data) => onPacket(i, source, data));
      client.on('peerGone', (key, reason) => gone[i]!.set(key.toString('hex'), String(reason)));
      client.on('close', (error) => {
        if (nodes[i]!.connected && error) nodes[i]!.error = `the connection broke: ${error.message}`;
      });
      const start = performance.now();
      try {
        await client.connect();
        clients[i] = client;
        nodes[i]!.connected = true;
        nodes[i]!.connectMs = performance.now() - start;
      } catch (err) {
        nodes[i]!.error = (err as Error).message;
      }
      progress?.update(`ping: connecting ${++connected}/${targets.length}`);
    }),
  );

  const results: PairResult[] = [];
  try {
    for (const [index, { from, to }] of pairs.entries()) {
      progress?.update(`ping: pairs ${index}/${pairs.length}, ${targets[from]!.name} → ${targets[to]!.name}`);
      results.push(await runPair(index, from, to));
    }
  } finally {
    await Promise.all(clients.map((c) => c?.close().catch(() => {})));
    progress?.done();
  }
  return { ok: results.every((r) => r.ok) && nodes.every((n) => n.connected), count, timeoutMs, nodes, pairs: results, skipped: [] };

  async function runPair(index: number, from: number, to: number): Promise<PairResult> {
    const base = { from: targets[from]!.name, to: targets[to]!.name, sent: 0, delivered: 0, echoed: 0 };
    const down = [from, to].find((i) => !clients[i] || nodes[i]!.error !== undefined);
    if (down !== undefined) {
      const n = nodes[down]!;
      return { ...base, loss: 1, ok: false, error: `${n.name} unreachable: ${n.error ?? 'not connected'}` };
    }
    const a = clients[from]!;
    const bKey = clients[to]!.publicKey;
    const state = states[index]!;
    const started = performance.now();
    const deadline = started + timeoutMs;
    const send = (kind: Kind, seq: number) => {
      try {
        a.send(bKey, packet(kind, index, seq));
        return true;
      } catch {
        return false;
      }
    };
    // A client is known to its own relay at once, to the other relays once the mesh told them:
    // the first packets to a new client may be dropped ("not here"). Resend a route packet until
    // B's answer to one arrives (both directions work), within the timeout; then measure.
    let lastRoute = -Infinity;
    while (!state.routed && performance.now() < deadline && nodes[from]!.error === undefined && nodes[to]!.error === undefined) {
      if (performance.now() - lastRoute >= 100) {
        send(Kind.Route, 0);
        lastRoute = performance.now();
      }
      await sleep(5);
    }
    if (!state.routed) {
      const reason = gone[from]!.get(bKey.toString('hex'));
      const broke = nodes[from]!.error ?? nodes[to]!.error;
      return {
        ...base,
        loss: 1,
        ok: false,
        error:
          broke ??
          (state.reached
            ? `packets reach ${base.to} but its answers do not come back to ${base.from} within ${timeoutMs} ms`
            : `no packet reached ${base.to} within ${timeoutMs} ms${reason ? ` (${base.from}'s relay says the destination is ${reason})` : ''}`),
      };
    }
    const routeMs = performance.now() - started;
    let sent = 0;
    for (let seq = 0; seq < count; seq++) {
      if (seq > 0) await sleep(intervalMs);
      state.sentAt.set(seq, performance.now());
      if (send(Kind.Probe, seq)) sent++;
    }
    // Wait for every packet and echo, at most the timeout after the last send.
    const waitUntil = performance.now() + timeoutMs;
    while ((state.delivered.size < count || state.rtts.length < count) && performance.now() < waitUntil) await sleep(5);
    const delivered = state.delivered.size;
    const echoed = state.rtts.length;
    const rtts = [...state.rtts].sort((x, y) => x - y);
    const ok = delivered === count && echoed === count;
    const result: PairResult = {
      ...base,
      sent,
      delivered,
      echoed,
      loss: (count - Math.min(delivered, echoed)) / count,
      rttP50Ms: rtts.length ? rtts[Math.floor((rtts.length - 1) / 2)] : undefined,
      rttMaxMs: rtts.length ? rtts[rtts.length - 1] : undefined,
      routeMs,
      ok,
    };
    if (sent < count) result.error = `${count - sent} packets could not be sent: ${nodes[from]!.error ?? 'the connection broke'}`;
    else if (!ok)
      result.error =
        nodes[to]!.error ??
        nodes[from]!.error ??
        `${count - delivered} not delivered, ${count - echoed} echoes missing after ${timeoutMs} ms`;
    return result;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface ReplicaListing {
  hostname: string;
  id?: string;
  relay_address: string;
  state: string;
  region_id?: number;
  updated_at?: string;
}

/** GET a JSON document over http or https (with `ca` trusted), within `timeoutMs`. */
export function getJson(url: string, timeoutMs: number, ca?: Buffer): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const onResponse = (res: IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        if (res.statusCode !== 200) return reject(new Error(`answered HTTP ${res.statusCode}: ${body.slice(0, 200).trim()}`));
        try {
          resolve(JSON.parse(body));
        } catch {
          reject(new Error(`answered something that is not JSON: ${body.slice(0, 80).trim()}`));
        }
      });
    };
    const req = url.startsWith('https:')
      ? httpsGet(url, { ca, timeout: timeoutMs }, onResponse)
      : httpGet(url, { timeout: timeoutMs }, onResponse);
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

/** The nodes to check, from a node's /api/v2/replicas: live ones with a relay address. */
export async function discoverTargets(
  url: string,
  timeoutMs: number,
  ca?: Buffer,
): Promise<{ targets: PingTarget[]; skipped: PingReport['skipped'] }> {
  const endpoint = new URL('/api/v2/replicas', url).href;
  let listing: unknown;
  try {
    listing = await getJson(endpoint, timeoutMs, ca);
  } catch (err) {
    throw new Error(`cannot list the replicas: GET ${endpoint}: ${(err as Error).message}`);
  }
  if (!Array.isArray(listing)) throw new Error(`GET ${endpoint} did not answer the replica list (a JSON array)`);
  const replicas = listing as ReplicaListing[];
  const targets: PingTarget[] = [];
  const skipped: PingReport['skipped'] = [];
  const seen = new Map<string, number>();
  for (const r of replicas) seen.set(r.hostname, (seen.get(r.hostname) ?? 0) + 1);
  for (const r of replicas) {
    // Two replicas with one hostname (a restart before the old row expired): tell them apart.
    const name = (seen.get(r.hostname) ?? 0) > 1 && r.id ? `${r.hostname}/${r.id.slice(0, 8)}` : r.hostname;
    if (r.state === 'stopped') continue;
    if (r.state !== 'live') skipped.push({ name, state: r.state, reason: `the registry lists it ${r.state} (no recent heartbeat)` });
    else if (!r.relay_address) skipped.push({ name, state: r.state, reason: 'no relay address (CODER_DERP_SERVER_RELAY_URL unset)' });
    else targets.push({ name, url: r.relay_address, regionId: r.region_id });
  }
  return { targets, skipped };
}

const ms = (v: number | undefined) => (v === undefined ? '-' : `${v.toFixed(2)} ms`);

export function formatPingReport(r: PingReport): string {
  const lines: string[] = [];
  const table = (rows: string[][]) => {
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((row) => [...(row[c] ?? '')].length)));
    for (const row of rows)
      lines.push(
        row
          .map((cell, c) => (c === row.length - 1 ? cell : cell.padEnd(widths[c]!)))
          .join('  ')
          .trimEnd(),
      );
  };
  lines.push(`derpmesh ping: ${r.nodes.length} nodes, ${r.pairs.length} ordered pairs, ${r.count} packets each`);
  lines.push('');
  const connect = (n: NodeResult) =>
    n.connected ? (n.error ? `BROKE: ${n.error}` : ms(n.connectMs)) : `FAILED: ${n.error ?? 'not connected'}`;
  // Regions are known when the nodes came from the registry (--url), not with --node.
  table(
    r.nodes.some((n) => n.regionId !== undefined)
      ? [['NODE', 'REGION', 'RELAY', 'CONNECT'], ...r.nodes.map((n) => [n.name, String(n.regionId ?? '-'), n.url, connect(n)])]
      : [['NODE', 'RELAY', 'CONNECT'], ...r.nodes.map((n) => [n.name, n.url, connect(n)])],
  );
  for (const s of r.skipped) lines.push(`(not checked: ${s.name}: ${s.reason})`);
  if (r.pairs.length > 0) {
    lines.push('');
    table([
      ['FROM', 'TO', 'SENT', 'DELIVERED', 'ECHOED', 'LOSS', 'RTT P50', 'RTT MAX', 'RESULT'],
      ...r.pairs.map((p) => [
        p.from,
        p.to,
        String(p.sent),
        String(p.delivered),
        String(p.echoed),
        `${(p.loss * 100).toFixed(0)} %`,
        ms(p.rttP50Ms),
        ms(p.rttMaxMs),
        p.ok ? 'ok' : `FAILED: ${p.error ?? 'lost packets'}`,
      ]),
    ]);
  }
  lines.push('');
  const failedPairs = r.pairs.filter((p) => !p.ok);
  const failedNodes = r.nodes.filter((n) => !n.connected || n.error);
  if (r.ok) lines.push(`OK: every pair delivered all ${r.count} packets`);
  else {
    if (failedNodes.length)
      lines.push(`FAILED: unreachable: ${failedNodes.map((n) => `${n.name} (${n.error ?? 'not connected'})`).join(', ')}`);
    if (failedPairs.length)
      lines.push(`FAILED: ${failedPairs.length} of ${r.pairs.length} pairs: ${failedPairs.map((p) => `${p.from} → ${p.to}`).join(', ')}`);
  }
  return lines.join('\n');
}

const help = `derpmesh ping --url URL [options]
derpmesh ping --node RELAY_URL --node RELAY_URL ... [options]

The end-to-end check of a cluster: a DERP client on every live node; for every ordered pair of
nodes of one region (regions do not mesh), packets from the client on one to the client on the
other (through the mesh), echoed back.
Exit 0 when every pair delivered every packet, 1 when a pair lost packets or a node could not be
reached, 2 for a usage error.

  --url URL        any node's HTTP address; the live nodes and their relay URLs come from its
                   /api/v2/replicas
  --node URL       a relay URL to check (repeatable), instead of --url (e.g. when the relay
                   addresses in the registry are internal ones)
  --count N        packets per ordered pair (default 5)
  --timeout D      limit for each connection and for each pair's packets, e.g. 5s (default 5s)
  --ca-file PEM    CA certificate(s) trusted for https URLs besides the public roots
  --json           print the report as JSON
`;

export async function pingCommand(argv: string[]): Promise<void> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        url: { type: 'string' },
        node: { type: 'string', multiple: true },
        count: { type: 'string', default: '5' },
        timeout: { type: 'string', default: '5s' },
        'ca-file': { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    throw configError(`derpmesh ping: ${(err as Error).message} (see derpmesh ping --help)`);
  }
  if (values.help) {
    process.stdout.write(help);
    return;
  }
  const nodeUrls = values.node ?? [];
  if (!values.url && nodeUrls.length === 0)
    throw configError('derpmesh ping needs --url http://host:port of any node (or --node RELAY_URL, repeated, for each node)');
  if (values.url && nodeUrls.length > 0) throw configError('derpmesh ping takes --url or --node, not both');
  if (!/^\d+$/.test(values.count) || Number(values.count) < 1 || Number(values.count) > 100_000)
    throw configError(`--count must be an integer from 1 to 100000, got ${JSON.stringify(values.count)}`, values.count);
  const timeoutMs = parseDuration(values.timeout);
  if (timeoutMs === undefined || timeoutMs <= 0)
    throw configError(`--timeout must be a duration like 5s, got ${JSON.stringify(values.timeout)}`, values.timeout);
  const httpUrl = (flag: string, text: string) => {
    let url: URL;
    try {
      url = new URL(text);
    } catch {
      throw configError(`${flag} must be an http:// or https:// URL, got ${JSON.stringify(text)}`, text);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:')
      throw configError(`${flag} must be an http:// or https:// URL, got ${JSON.stringify(text)}`, text);
    return url;
  };
  const caPem = readCaFile(values['ca-file']);

  let targets: PingTarget[];
  let skipped: PingReport['skipped'] = [];
  if (values.url) {
    const url = httpUrl('--url', values.url);
    try {
      ({ targets, skipped } = await discoverTargets(url.href, timeoutMs, caPem));
    } catch (err) {
      fail(values.json, `derpmesh ping: ${(err as Error).message}`);
      return;
    }
    if (targets.length === 0) {
      fail(values.json, `derpmesh ping: ${url.href} lists no live node with a relay address`, skipped);
      return;
    }
  } else {
    targets = nodeUrls.map((text) => {
      const url = httpUrl('--node', text);
      return { name: url.host, url: url.href.replace(/\/$/, '') };
    });
  }
  const progress = createProgress(process.stderr);
  const report = await runPing({ targets, count: Number(values.count), timeoutMs, caPem, progress });
  report.skipped = skipped;
  process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : formatPingReport(report) + '\n');
  process.exitCode = report.ok ? 0 : 1;
}

/** The cluster could not be asked at all: exit 1 (an alert, not a usage error). */
function fail(json: boolean, message: string, skipped: PingReport['skipped'] = []): void {
  if (json) process.stdout.write(JSON.stringify({ ok: false, error: message, nodes: [], pairs: [], skipped }, null, 2) + '\n');
  process.stderr.write(message + '\n');
  for (const s of skipped) process.stderr.write(`  not checked: ${s.name}: ${s.reason}\n`);
  process.exitCode = 1;
}
