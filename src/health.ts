// Health report: one section per subsystem, each with a severity and a short stable code.
export type Severity = 'ok' | 'warning' | 'error';

export type HealthCode =
  | 'DB_OK'
  | 'DB_UNREACHABLE'
  | 'DB_SLOW'
  | 'RELAY_OK'
  | 'RELAY_DISABLED'
  | 'RELAY_NO_RELAY_URL'
  | 'MESH_OK'
  | 'MESH_DISABLED'
  | 'MESH_PEER_UNREACHABLE'
  | 'MESH_PEER_SLOW'
  | 'MESH_LINK_DOWN'
  | 'MESH_VERSION_MISMATCH'
  | 'PUBSUB_OK'
  | 'PUBSUB_DISCONNECTED';

export interface HealthSection {
  severity: Severity;
  code: HealthCode;
  message: string;
}

export interface HealthReport {
  replicaId: string;
  hostname: string;
  severity: Severity;
  generatedAt: string;
  sections: { database: HealthSection; relay: HealthSection; mesh: HealthSection; pubsub: HealthSection };
  /** The relay's counters when the report was stored (the cluster status derives rates from them). */
  traffic?: TrafficSnapshot;
}

/** A node's monotonic traffic counters and link states at one moment (see src/cluster-status.ts). */
export interface TrafficSnapshot {
  /** ms since the Unix epoch, by the node's clock. */
  at: number;
  /** DERP clients (distinct keys), mesh peers not counted. */
  clients: number;
  /** Incoming connections from peer relays (mesh key). */
  meshConnections: number;
  connections: number;
  packetsIn: number;
  bytesIn: number;
  packetsOut: number;
  bytesOut: number;
  forwardedIn: number;
  forwardedOut: number;
  /** Dropped packets by reason. */
  drops: Record<string, number>;
  meshLinks: { url: string; state: string; forwarders: number; rttMs?: number; lastError?: string }[];
}

const rank: Record<Severity, number> = { ok: 0, warning: 1, error: 2 };

export function worst(severities: Severity[]): Severity {
  return severities.reduce<Severity>((a, b) => (rank[b] > rank[a] ? b : a), 'ok');
}

export function section(severity: Severity, code: HealthCode, message: string): HealthSection {
  return { severity, code, message };
}

/** The most severe of several findings for one section; `fallback` when there are none. */
export function mostSevere(findings: HealthSection[], fallback: HealthSection): HealthSection {
  let best = fallback;
  for (const f of findings) if (rank[f.severity] > rank[best.severity]) best = f;
  return best;
}

/** What the node's health is computed from: narrow views of the registry, relay and pubsub. */
export interface HealthInputs {
  replicaId: string;
  hostname: string;
  version: string;
  latencyThresholdMs: number;
  database: { error: string | undefined; rttMs: number | undefined };
  /** Absent with custom relays. */
  relay?: { clients: number; links: readonly MeshLinkView[] };
  peers: readonly { hostname: string; version: string }[];
  peerLatencies: readonly PeerLatencyView[];
  pubsub: { connected: boolean; reconnects: number; lastError?: string };
  misconfigurations: readonly Misconfiguration[];
}

export interface MeshLinkView {
  url: string;
  state: string;
  lastError?: string | null;
}

export interface PeerLatencyView {
  hostname: string;
  relayUrl: string;
  rttMs?: number;
  error?: string;
  slow: boolean;
}

/**
 * A cluster misconfiguration seen from this node. `self`: this node runs a relay among peers but
 * has no relay URL, so nobody can mesh with it. `peer`: a peer in this region has none.
 */
export interface Misconfiguration {
  code: 'RELAY_NO_RELAY_URL';
  subject: 'self' | 'peer';
  message: string;
}

/** The text of a misconfiguration in logs, the API and the status page: `CODE: message`. */
export const formatMisconfiguration = (m: Misconfiguration): string => `${m.code}: ${m.message}`;

/** This node's report: database, relay, mesh and pubsub sections. */
export function nodeHealth(h: HealthInputs): HealthReport {
  const { error: dbError, rttMs: dbRtt } = h.database;
  const threshold = h.latencyThresholdMs;
  const database = dbError
    ? section('error', 'DB_UNREACHABLE', `database unreachable: ${dbError}`)
    : dbRtt !== undefined && dbRtt > threshold
      ? section('warning', 'DB_SLOW', `database round trip ${dbRtt.toFixed(2)} ms exceeds ${threshold} ms`)
      : section('ok', 'DB_OK', dbRtt === undefined ? 'database reachable' : `database round trip ${dbRtt.toFixed(2)} ms`);
  // A relay URL missing here or at a peer: either way clients here cannot reach some peers' clients.
  const misconfiguration = h.misconfigurations[0];
  const relay = !h.relay
    ? section('ok', 'RELAY_DISABLED', 'embedded relay disabled: custom relays')
    : misconfiguration
      ? section('warning', misconfiguration.code, misconfiguration.message)
      : section('ok', 'RELAY_OK', `relay serving ${h.relay.clients} client${h.relay.clients === 1 ? '' : 's'}`);
  const sections = { database, relay, mesh: meshSection(h), pubsub: pubsubSection(h.pubsub) };
  return {
    replicaId: h.replicaId,
    hostname: h.hostname,
    severity: worst(Object.values(sections).map((s) => s.severity)),
    generatedAt: new Date().toISOString(),
    sections,
  };
}

function meshSection(h: HealthInputs): HealthSection {
  if (!h.relay) return section('ok', 'MESH_DISABLED', 'custom relays: no mesh');
  const findings: HealthSection[] = [];
  for (const l of h.peerLatencies) {
    if (l.error) {
      findings.push(section('error', 'MESH_PEER_UNREACHABLE', `failed to reach relay ${l.hostname} (${l.relayUrl}): ${l.error}`));
    } else if (l.slow) {
      const rtt = l.rttMs!.toFixed(2);
      findings.push(
        section('warning', 'MESH_PEER_SLOW', `round trip to ${l.hostname} (${l.relayUrl}) is ${rtt} ms, above ${h.latencyThresholdMs} ms`),
      );
    }
  }
  for (const link of h.relay.links) {
    if (link.state !== 'connected' && link.state !== 'self') {
      const why = link.lastError ? `: ${link.lastError}` : '';
      findings.push(section('warning', 'MESH_LINK_DOWN', `mesh link to ${link.url} is ${link.state}${why}`));
    }
  }
  for (const p of h.peers) {
    if (p.version !== h.version)
      findings.push(section('warning', 'MESH_VERSION_MISMATCH', `peer ${p.hostname} runs ${p.version}, this node ${h.version}`));
  }
  const connected = h.relay.links.filter((l) => l.state === 'connected').length;
  return mostSevere(findings, section('ok', 'MESH_OK', `meshed with ${connected} peer relays`));
}

function pubsubSection(ps: HealthInputs['pubsub']): HealthSection {
  return ps.connected
    ? section('ok', 'PUBSUB_OK', `listening (${ps.reconnects} reconnects)`)
    : section('error', 'PUBSUB_DISCONNECTED', `LISTEN connection down${ps.lastError ? `: ${ps.lastError}` : ''}; polling only`);
}

/** Heartbeats a mesh link may be down before clients are told (Health frame). */
export const LINK_DOWN_HEARTBEATS = 3;

/**
 * What this relay tells its clients in a DERP Health frame: only problems of its own data path,
 * ones a client here would notice as lost packets — never a probe's verdict or another node's
 * state. A mesh link counts once it has been down for LINK_DOWN_HEARTBEATS, so a peer that
 * restarts does not make every client here flash a warning.
 */
export class ClientHealth {
  readonly #heartbeatMs: number;
  readonly #linkDownSince = new Map<string, number>();

  constructor(heartbeatMs: number) {
    this.#heartbeatMs = heartbeatMs;
  }

  /** The problem text for the Health frame ("" when healthy), from this heartbeat's view. */
  problem(misconfigurations: readonly Misconfiguration[], links: readonly MeshLinkView[], now = Date.now()): string {
    const problems: string[] = [];
    if (misconfigurations.some((m) => m.subject === 'self')) {
      problems.push('this relay has no relay URL: clients of other relays in its region cannot reach clients here');
    }
    const watched = links.filter((l) => l.state !== 'self' && l.state !== 'stopped');
    for (const url of this.#linkDownSince.keys()) if (!watched.some((l) => l.url === url)) this.#linkDownSince.delete(url);
    for (const link of watched) {
      if (link.state === 'connected') {
        this.#linkDownSince.delete(link.url);
        continue;
      }
      const since = this.#linkDownSince.get(link.url) ?? now;
      this.#linkDownSince.set(link.url, since);
      if (now - since >= LINK_DOWN_HEARTBEATS * this.#heartbeatMs) {
        problems.push(`this relay cannot reach its peer relay ${link.url}: clients connected there are unreachable from here`);
      }
    }
    return problems.join('; ');
  }
}

/** Misconfigurations of the cluster as this node sees it (only a node running a relay has any). */
export function findMisconfigurations(view: {
  runsRelay: boolean;
  hostname: string;
  relayUrl: string;
  /** Live peers, every region. */
  livePeers: readonly unknown[];
  /** Live peers of this node's region. */
  regionalPeers: readonly { id: string; hostname: string; relayUrl: string }[];
}): Misconfiguration[] {
  if (!view.runsRelay) return [];
  const out: Misconfiguration[] = [];
  if (!view.relayUrl && view.livePeers.length >= 1) {
    out.push({
      code: 'RELAY_NO_RELAY_URL',
      subject: 'self',
      message:
        `${view.livePeers.length + 1} replicas share this database but ${view.hostname} has no relay URL, so peers cannot mesh with its relay ` +
        `and clients on different nodes cannot reach each other; set CODER_DERP_SERVER_RELAY_URL to this node's own address`,
    });
  }
  for (const p of view.regionalPeers) {
    if (p.relayUrl === '') {
      out.push({
        code: 'RELAY_NO_RELAY_URL',
        subject: 'peer',
        message: `peer ${p.hostname} (${p.id}) has no relay URL; its clients are unreachable from here`,
      });
    }
  }
  return out;
}
