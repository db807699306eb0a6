// The cluster's live status: every node's traffic, health, mesh links and round trips, with the
// last 15 minutes of rates. Each node stores a traffic snapshot (monotonic counters) in the health
// report it writes to Postgres with every heartbeat; the node answering keeps, per replica, a
// bounded ring buffer of samples and derives rates from counter differences. Served as JSON at
// /api/v2/status and as server-sent events at /api/v2/status/events (the status page, `derpmesh status`).
import type { IncomingMessage, ServerResponse } from 'node:http';

import { worst, type HealthReport, type HealthSection, type Severity, type TrafficSnapshot } from './health.js';
import type { Logger } from './log.js';
import type { Relay } from './relay.js';
import { relayBase, sameUrlKey } from './relay-url.js';
import type { Replica } from './replicas/replica.js';
import type { ReplicaRegistry } from './replicas/registry.js';
import type { RouteHandler } from './http/server.js';

/** How far back the history goes. */
export const HISTORY_MS = 15 * 60_000;
/** One history point per this much time (so at most HISTORY_MS / POINT_MS points per replica). */
export const POINT_MS = 5_000;
/** How often subscribers of the event stream get the document. */
export const EVENT_INTERVAL_MS = 1_000;
/** Event-stream subscribers served at once; more are answered 503. */
export const MAX_SUBSCRIBERS = 32;

/** Drop counters of the relay core, by the reason the status shows. */
const DROP_KINDS = ['unknown_dest', 'unknown_dest_on_fwd', 'queue_full', 'gone'] as const;

export interface Rates {
  packetsIn: number;
  packetsOut: number;
  bytesIn: number;
  bytesOut: number;
  forwardedIn: number;
  forwardedOut: number;
  drops: number;
}

/** The history of one replica, column by column (`t`: ms since the epoch, at the end of each interval). */
export interface History {
  t: number[];
  clients: number[];
  packetsIn: number[];
  packetsOut: number[];
  bytesIn: number[];
  bytesOut: number[];
  drops: number[];
}

export interface StatusLink {
  url: string;
  /** The peer's hostname when the URL is a known replica's relay URL. */
  peer?: string;
  peerId?: string;
  state: string;
  up: boolean;
  /** Round trip measured by the latency probes of the node owning the link, ms. */
  rttMs?: number;
  forwarders: number;
  lastError?: string;
}

export interface StatusNode {
  id: string;
  hostname: string;
  region: number;
  relayUrl: string;
  version: string;
  state: 'live' | 'stale' | 'stopped';
  self: boolean;
  /** Time since its last heartbeat, ms (estimated by the node answering). */
  heartbeatAgeMs: number;
  startedAt: string;
  stoppedAt: string | null;
  /** Its health report's severity; `error` when it has none or it is stale. */
  severity: Severity;
  sections: HealthReport['sections'] | null;
  error: string;
  /** Counters and gauges of its latest snapshot; absent when it stored none (custom relays, old version). */
  traffic: {
    at: string;
    clients: number;
    meshConnections: number;
    connections: number;
    totals: Omit<Rates, 'drops'> & { drops: number };
    drops: Record<string, number>;
  } | null;
  /** Per second, over the last interval between two snapshots. */
  rates: Rates | null;
  meshLinks: StatusLink[];
  databaseRttMs: number | null;
  history: History;
}

export interface StatusDocument {
  generatedAt: string;
  reportedBy: { id: string; hostname: string };
  heartbeatMs: number;
  thresholdMs: number;
  historySeconds: number;
  pointSeconds: number;
  /** No node in error or stale, no mesh link down, the database reachable. */
  healthy: boolean;
  severity: Severity;
  /** Why the cluster is unhealthy (empty when healthy). */
  problems: string[];
  /** Cluster misconfigurations and warnings (not failures). */
  warnings: string[];
  database: { reachable: boolean; rttMs: number | null; error?: string };
  nodes: StatusNode[];
  /** Round trips each replica measured (ms), row → column; `database` to Postgres. */
  latency: { ids: string[]; rows: { from: string; to: Record<string, number>; databaseMs: number | null }[] };
}

interface Sample {
  /** Local time of the snapshot, ms. */
  at: number;
  snap: TrafficSnapshot;
}

interface Track {
  /** The snapshot before the latest one and the latest (for the current rate). */
  prev?: Sample;
  last?: Sample;
  /** The snapshot at the last history point. */
  pointBase?: Sample;
  history: History;
  /** When this node first saw the replica's current `updatedAt` and its age then (staleness estimate). */
  seenUpdatedAt?: number;
  seenAtLocal: number;
  seenAge: number;
}

const emptyHistory = (): History => ({ t: [], clients: [], packetsIn: [], packetsOut: [], bytesIn: [], bytesOut: [], drops: [] });

const dropsTotal = (s: TrafficSnapshot) => Object.values(s.drops).reduce((a, b) => a + b, 0);

/** Per-second rates between two snapshots; a counter that went down was reset (a restart) and counts from 0. */
export function ratesBetween(a: TrafficSnapshot, b: TrafficSnapshot): Rates | null {
  const dt = (b.at - a.at) / 1000;
  if (!(dt > 0)) return null;
  const d = (x: number, y: number) => (y >= x ? y - x : y) / dt;
  return {
    packetsIn: d(a.packetsIn, b.packetsIn),
    packetsOut: d(a.packetsOut, b.packetsOut),
    bytesIn: d(a.bytesIn, b.bytesIn),
    bytesOut: d(a.bytesOut, b.bytesOut),
    forwardedIn: d(a.forwardedIn, b.forwardedIn),
    forwardedOut: d(a.forwardedOut, b.forwardedOut),
    drops: d(dropsTotal(a), dropsTotal(b)),
  };
}

/**
 * DERP clients connected, peer relays not counted. The core's `clients` gauge counts distinct keys,
 * peer relays' included (each meshes in under its relay key, the `peerKey` of this relay's link to
 * it); non-mesh connections bound it from above too (a client may hold two). `v` reads one snapshot
 * of the core's counters by name.
 */
export function derpClients(v: (name: string) => number, links: readonly { state: string; peerKey?: string }[]): number {
  const peerKeys = new Set(links.filter((l) => l.state === 'connected' && l.peerKey).map((l) => l.peerKey)).size;
  return Math.max(0, Math.min(v('clients') - peerKeys, v('connections') - v('mesh_connections')));
}

/** A URL's identity for matching mesh links to replicas' relay URLs. */
function urlKey(text: string): string {
  try {
    return sameUrlKey(new URL(relayBase(new URL(text))));
  } catch {
    return text;
  }
}

const round = (x: number, digits = 3) => Math.round(x * 10 ** digits) / 10 ** digits;

export interface ClusterStatusOptions {
  registry: ReplicaRegistry;
  relay?: Relay;
  heartbeatMs: number;
  thresholdMs: number;
  health: () => HealthReport;
  warnings: () => string[];
  logger: Logger;
}

export class ClusterStatus {
  readonly #o: ClusterStatusOptions;
  readonly #tracks = new Map<string, Track>();
  readonly #subscribers = new Set<ServerResponse>();
  #sampleTimer: NodeJS.Timeout | undefined;
  #eventTimer: NodeJS.Timeout | undefined;

  constructor(options: ClusterStatusOptions) {
    this.#o = options;
  }

  /** This node's traffic counters now (stored with its health report every heartbeat). */
  snapshot(): TrafficSnapshot | undefined {
    const relay = this.#o.relay;
    if (!relay) return undefined;
    const m = new Map(relay.metrics().map((x) => [x.name, x.value]));
    const v = (name: string) => m.get(name) ?? 0;
    const links = relay.meshLinks();
    const rtts = new Map(this.#o.registry.peerLatencies().map((l) => [urlKey(l.relayUrl), l.rttMs]));
    return {
      at: Date.now(),
      clients: derpClients(v, links),
      meshConnections: v('mesh_connections'),
      connections: v('connections'),
      packetsIn: v('packets_received'),
      bytesIn: v('bytes_received'),
      packetsOut: v('packets_sent'),
      bytesOut: v('bytes_sent'),
      forwardedIn: v('packets_forwarded_in'),
      forwardedOut: v('packets_forwarded_out'),
      drops: Object.fromEntries(DROP_KINDS.map((k) => [k, v(`packets_dropped_${k}`)])),
      meshLinks: links
        .filter((l) => l.state !== 'self')
        .map((l) => {
          const rtt = rtts.get(urlKey(l.url));
          return {
            url: l.url,
            state: l.state,
            forwarders: l.forwarders,
            ...(rtt !== undefined ? { rttMs: round(rtt) } : {}),
            ...(l.lastError ? { lastError: l.lastError } : {}),
          };
        }),
    };
  }

  /** Starts sampling (once a second: this node's counters, and every replica's latest stored snapshot). */
  start(): void {
    this.sample();
    this.#sampleTimer = setInterval(() => this.sample(), 1_000);
    this.#sampleTimer.unref();
  }

  /** Stops sampling and ends every event stream. */
  close(): void {
    clearInterval(this.#sampleTimer);
    clearInterval(this.#eventTimer);
    for (const res of this.#subscribers) res.end();
    this.#subscribers.clear();
  }

  /** Takes one sample of every replica (exported for tests). */
  sample(now = Date.now()): void {
    const registry = this.#o.registry;
    const seen = new Set<string>();
    for (const r of registry.replicas()) {
      seen.add(r.id);
      const track = this.#track(r, now);
      const snap = r.id === registry.self.id ? this.snapshot() : r.health?.traffic;
      if (snap && r.stoppedAt === null) this.#ingest(track, snap);
    }
    // Rows deleted from Postgres (cleaned up after an hour): forget them, so memory stays bounded.
    for (const id of this.#tracks.keys()) if (!seen.has(id) && id !== registry.self.id) this.#tracks.delete(id);
  }

  #track(r: Replica, now: number): Track {
    let t = this.#tracks.get(r.id);
    if (!t) {
      t = { history: emptyHistory(), seenAtLocal: now, seenAge: r.ageMs, seenUpdatedAt: r.updatedAt.getTime() };
      this.#tracks.set(r.id, t);
    } else if (t.seenUpdatedAt !== r.updatedAt.getTime()) {
      t.seenUpdatedAt = r.updatedAt.getTime();
      t.seenAtLocal = now;
      t.seenAge = r.ageMs;
    }
    return t;
  }

  #ingest(track: Track, snap: TrafficSnapshot): void {
    if (track.last && snap.at <= track.last.snap.at) return;
    const sample: Sample = { at: snap.at, snap };
    track.prev = track.last;
    track.last = sample;
    if (!track.pointBase) {
      track.pointBase = sample;
      return;
    }
    if (snap.at - track.pointBase.at < POINT_MS) return;
    const rates = ratesBetween(track.pointBase.snap, snap);
    track.pointBase = sample;
    if (!rates) return;
    const h = track.history;
    h.t.push(snap.at);
    h.clients.push(snap.clients);
    h.packetsIn.push(round(rates.packetsIn, 2));
    h.packetsOut.push(round(rates.packetsOut, 2));
    h.bytesIn.push(round(rates.bytesIn, 1));
    h.bytesOut.push(round(rates.bytesOut, 1));
    h.drops.push(round(rates.drops, 2));
    const limit = Math.ceil(HISTORY_MS / POINT_MS);
    while (h.t.length > limit || (h.t.length > 0 && h.t[0]! < snap.at - HISTORY_MS)) {
      for (const column of Object.values(h) as number[][]) column.shift();
    }
  }

  /** The whole document, as /api/v2/status serves it. */
  document(now = Date.now()): StatusDocument {
    const { registry, heartbeatMs, thresholdMs } = this.#o;
    const self = registry.self;
    const here = this.#o.health();
    const replicas = registry.replicas();
    // Heartbeats seen since the last sample count now (the staleness estimate below).
    for (const r of replicas) this.#track(r, now);
    const byUrl = new Map(replicas.filter((r) => r.relayUrl).map((r) => [urlKey(r.relayUrl), r]));
    const staleAfter = 3 * heartbeatMs;
    const problems: string[] = [];
    const dbError = registry.databaseError();
    const dbRtt = registry.databaseLatencyMs();
    if (dbError) problems.push(`${self.hostname}: database unreachable: ${dbError}`);

    const nodes: StatusNode[] = replicas.map((r) => {
      const isSelf = r.id === self.id;
      const track = this.#tracks.get(r.id);
      const age = isSelf ? 0 : track ? track.seenAge + (now - track.seenAtLocal) : r.ageMs;
      const state: StatusNode['state'] =
        r.stoppedAt !== null ? 'stopped' : !isSelf && (registry.isStale(r) || age > staleAfter) ? 'stale' : 'live';
      const report: Partial<HealthReport> | null = isSelf ? here : r.health;
      const snap = isSelf ? track?.last?.snap : r.health?.traffic;
      const rates = track?.prev && track.last ? ratesBetween(track.prev.snap, track.last.snap) : null;
      const meshLinks: StatusLink[] = (snap?.meshLinks ?? []).map((l) => {
        const peer = byUrl.get(urlKey(l.url));
        return {
          url: l.url,
          ...(peer ? { peer: peer.hostname, peerId: peer.id } : {}),
          state: l.state,
          up: l.state === 'connected',
          ...(l.rttMs !== undefined ? { rttMs: l.rttMs } : {}),
          forwarders: l.forwarders,
          ...(l.lastError ? { lastError: l.lastError } : {}),
        };
      });
      meshLinks.sort((a, b) => (a.peer ?? a.url).localeCompare(b.peer ?? b.url));
      const severity: Severity = state === 'stopped' ? 'ok' : state === 'stale' ? 'error' : (report?.severity ?? 'error');
      if (state === 'stale') problems.push(`${r.hostname}: stale, no heartbeat for ${(age / 1000).toFixed(1)} s`);
      if (state === 'live') {
        const sections = report?.sections ? (Object.values(report.sections) as HealthSection[]) : [];
        for (const s of sections) if (s.severity === 'error') problems.push(`${r.hostname}: ${s.code}: ${s.message}`);
        if (!report?.sections) problems.push(`${r.hostname}: no health report stored yet`);
        for (const l of meshLinks)
          if (!l.up && l.state !== 'stopped') problems.push(`${r.hostname}: mesh link to ${l.peer ?? l.url} is ${l.state}`);
      }
      return {
        id: r.id,
        hostname: r.hostname,
        region: r.regionId,
        relayUrl: r.relayUrl,
        version: r.version,
        state,
        self: isSelf,
        heartbeatAgeMs: Math.round(age),
        startedAt: r.startedAt.toISOString(),
        stoppedAt: r.stoppedAt?.toISOString() ?? null,
        severity,
        sections: report?.sections ?? null,
        error: r.error,
        traffic: snap
          ? {
              at: new Date(snap.at).toISOString(),
              clients: snap.clients,
              meshConnections: snap.meshConnections ?? 0,
              connections: snap.connections,
              totals: {
                packetsIn: snap.packetsIn,
                packetsOut: snap.packetsOut,
                bytesIn: snap.bytesIn,
                bytesOut: snap.bytesOut,
                forwardedIn: snap.forwardedIn,
                forwardedOut: snap.forwardedOut,
                drops: dropsTotal(snap),
              },
              drops: snap.drops,
            }
          : null,
        rates: rates && {
          packetsIn: round(rates.packetsIn, 2),
          packetsOut: round(rates.packetsOut, 2),
          bytesIn: round(rates.bytesIn, 1),
          bytesOut: round(rates.bytesOut, 1),
          forwardedIn: round(rates.forwardedIn, 2),
          forwardedOut: round(rates.forwardedOut, 2),
          drops: round(rates.drops, 2),
        },
        meshLinks,
        databaseRttMs: isSelf ? (dbRtt === undefined ? null : round(dbRtt)) : r.databaseLatencyUs ? r.databaseLatencyUs / 1000 : null,
        history: track?.history ?? emptyHistory(),
      };
    });
    // Order: live first, then stale, then stopped; by hostname within.
    const order = { live: 0, stale: 1, stopped: 2 };
    nodes.sort((a, b) => order[a.state] - order[b.state] || a.hostname.localeCompare(b.hostname) || a.id.localeCompare(b.id));

    // The matrix covers the replicas not stopped: what each measured to the others and to Postgres.
    const matrixNodes = nodes.filter((n) => n.state !== 'stopped');
    const ids = matrixNodes.map((n) => n.id);
    const rows = matrixNodes.map((n) => {
      const r = replicas.find((x) => x.id === n.id)!;
      const to: Record<string, number> = {};
      if (n.self) {
        for (const l of registry.peerLatencies()) if (l.rttMs !== undefined) to[l.replicaId] = round(l.rttMs);
      } else {
        for (const [peer, us] of Object.entries(r.peerLatenciesUs)) to[peer] = us / 1000;
      }
      return { from: n.id, to, databaseMs: n.databaseRttMs };
    });

    const warnings = this.#o.warnings();
    const active = nodes.filter((n) => n.state !== 'stopped');
    return {
      generatedAt: new Date(now).toISOString(),
      reportedBy: { id: self.id, hostname: self.hostname },
      heartbeatMs,
      thresholdMs,
      historySeconds: HISTORY_MS / 1000,
      pointSeconds: POINT_MS / 1000,
      healthy: problems.length === 0,
      severity: problems.length > 0 ? 'error' : worst(active.map((n) => n.severity)),
      problems,
      warnings,
      database: { reachable: !dbError, rttMs: dbRtt === undefined ? null : round(dbRtt), ...(dbError ? { error: dbError } : {}) },
      nodes,
      latency: { ids, rows },
    };
  }

  /** GET /api/v2/status and GET /api/v2/status/events. */
  routes(): RouteHandler[] {
    return [
      (req, res) => {
        if (pathOf(req) !== '/api/v2/status') return false;
        res
          .writeHead(200, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' })
          .end(JSON.stringify(this.document(), null, 2) + '\n');
        return true;
      },
      (req, res) => {
        if (pathOf(req) !== '/api/v2/status/events') return false;
        this.#subscribe(req, res);
        return true;
      },
    ];
  }

  #subscribe(req: IncomingMessage, res: ServerResponse): void {
    if (this.#subscribers.size >= MAX_SUBSCRIBERS) {
      res
        .writeHead(503, { 'Content-Type': 'application/json', 'Retry-After': '10' })
        .end(
          JSON.stringify({ error: `too many status subscribers (${MAX_SUBSCRIBERS}); close another status page or poll /api/v2/status` }) +
            '\n',
        );
      return;
    }
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-store',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    res.socket?.setNoDelay(true);
    this.#subscribers.add(res);
    const drop = () => this.#subscribers.delete(res);
    req.once('close', drop);
    res.once('close', drop);
    res.once('error', drop);
    res.write(`retry: 2000\n\n`);
    this.#send(res, JSON.stringify(this.document()));
    if (!this.#eventTimer) {
      this.#eventTimer = setInterval(() => this.#broadcast(), EVENT_INTERVAL_MS);
      this.#eventTimer.unref();
    }
  }

  #send(res: ServerResponse, json: string): void {
    // A subscriber that does not read (its buffer keeps growing) is dropped rather than buffered for.
    if (res.writableLength > 4 * 1024 * 1024) {
      this.#subscribers.delete(res);
      res.destroy();
      return;
    }
    res.write(`event: status\ndata: ${json}\n\n`);
  }

  #broadcast(): void {
    if (this.#subscribers.size === 0) {
      clearInterval(this.#eventTimer);
      this.#eventTimer = undefined;
      return;
    }
    let json: string;
    try {
      json = JSON.stringify(this.document());
    } catch (err) {
      this.#o.logger.warn('status document failed', { err });
      return;
    }
    for (const res of this.#subscribers) this.#send(res, json);
  }
}

function pathOf(req: IncomingMessage): string {
  return (req.url ?? '').split('?')[0]!;
}
