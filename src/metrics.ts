// /metrics on prom-client, by Prometheus conventions: counters end in `_total`, units in names
// (`_seconds`, `_bytes`), kinds of one thing as labels (drops by `reason`, ...), histograms, and
// prom-client's default process metrics, all on one Registry per node (several nodes can run in
// one process). Every derpmesh metric is declared once, in `metricDefinitions`: the registry, the
// README's table (scripts/sync-readme.mjs) and the names the other tools rely on come from it.
//
// Values are read at scrape time, never per event through JS: each scrape takes one snapshot of
// every source (the relay core's counters and histograms, the HTTP counters, STUN, the control
// plane), then prom-client renders them through collectors that read that snapshot.
import { collectDefaultMetrics, Registry } from 'prom-client';

export type MetricType = 'counter' | 'gauge' | 'histogram';

/** Where a metric's values come from (for the README). */
export type MetricSource = 'relay core' | 'node' | 'control plane' | 'stun';

export interface MetricDefinition {
  name: string;
  type: MetricType;
  help: string;
  /** Label names (and, for the README, the values they take). */
  labels: Record<string, string>;
  source: MetricSource;
}

const PREFIX = 'derpmesh_';

const def = (
  name: string,
  type: MetricType,
  help: string,
  source: MetricSource,
  labels: Record<string, string> = {},
): MetricDefinition => ({ name: PREFIX + name, type, help, labels, source });

const REASONS = 'reason';

/** Every derpmesh metric /metrics serves. */
export const metricDefinitions: readonly MetricDefinition[] = [
  // Connections and clients (relay core).
  def('accepts_total', 'counter', 'Connections handed to the relay (DERP upgrades).', 'relay core'),
  def('connections', 'gauge', 'Connections currently open (handshaken or not).', 'relay core'),
  def('clients', 'gauge', 'Distinct client keys currently connected.', 'relay core'),
  def('home_connections', 'gauge', 'Connections whose client said this is its preferred (home) relay.', 'relay core'),
  def('mesh_connections', 'gauge', 'Connections authenticated with the mesh key (peer relays).', 'relay core'),
  def('watchers', 'gauge', 'Connections subscribed with WatchConns.', 'relay core'),
  def('forwarders', 'gauge', 'Client keys reachable through a mesh peer.', 'relay core'),
  def('queued_packets', 'gauge', 'Packets queued to local clients now (read from the queues at scrape time).', 'relay core'),
  def(
    'queue_depth_max',
    'gauge',
    'Packets queued to the client with the fullest queue now; at --queue-depth the oldest are being dropped.',
    'relay core',
  ),
  def(
    'duplicate_client_connections_total',
    'counter',
    'Connections for a key that already had one (the last one is active).',
    'relay core',
  ),
  def('handshake_failures_total', 'counter', 'Connections closed during the DERP handshake, by reason.', 'relay core', {
    [REASONS]: 'timeout (no ClientInfo in 10 s), io, bad_first_frame, bad_size, zero_key, box_open, bad_json',
  }),
  def(
    'handshake_duration_seconds',
    'histogram',
    'From the DERP upgrade to ServerInfo written: the ClientInfo exchange and the admission check.',
    'relay core',
  ),
  def('protocol_errors_total', 'counter', 'Connections closed for a malformed frame after the handshake.', 'relay core'),
  def('permission_denied_total', 'counter', 'Connections closed for a mesh-only frame sent without the mesh key.', 'relay core'),
  def('write_timeouts_total', 'counter', 'Connections closed because a write stalled past the write deadline.', 'relay core'),
  def('unknown_frames_total', 'counter', 'Frames of unknown or unexpected type skipped.', 'relay core'),
  // Packets.
  def('received_packets_total', 'counter', 'Packets received from clients and mesh peers.', 'relay core'),
  def('received_bytes_total', 'counter', 'Packet payload bytes received.', 'relay core'),
  def('sent_packets_total', 'counter', 'Packets queued to a local client.', 'relay core'),
  def('sent_bytes_total', 'counter', 'Packet payload bytes queued to a local client.', 'relay core'),
  def('forwarded_packets_total', 'counter', 'Packets forwarded through the mesh.', 'relay core', {
    direction: 'out (sent to a peer relay as ForwardPacket), in (ForwardPacket received from a peer relay)',
  }),
  def('dropped_packets_total', 'counter', 'Packets dropped, by reason.', 'relay core', {
    [REASONS]:
      'unknown_dest (destination unknown here and on every mesh peer), unknown_dest_on_fwd (forwarded packet whose destination is not local), queue_full (oldest dropped from a full receiver queue), gone (receiver closed)',
  }),
  def(
    'queue_wait_seconds',
    'histogram',
    "Time a packet waited in a client's send queue before its writer took it; sampled: every 64th packet queued to a client is timed.",
    'relay core',
  ),
  def('peer_gone_sent_total', 'counter', 'PeerGone frames sent to clients, by reason.', 'relay core', {
    [REASONS]: 'disconnected (a peer the client sent to left), not_here (answer to a disco packet for an unknown key)',
  }),
  def('pings_received_total', 'counter', 'Ping frames answered with Pong.', 'relay core'),
  def('keepalives_sent_total', 'counter', 'KeepAlive frames sent.', 'relay core'),
  def('restarting_sent_total', 'counter', 'Restarting frames sent on graceful shutdown.', 'relay core'),
  def('rate_limited_frames_total', 'counter', 'Frames from rate-limited clients that waited for tokens before being read.', 'relay core'),
  def('rate_limit_wait_seconds_total', 'counter', 'Time rate-limited clients were made to wait.', 'relay core'),
  // Mesh.
  def('mesh_links', 'gauge', 'Outgoing mesh links currently connected to peer relays.', 'relay core'),
  def('mesh_link_up', 'gauge', 'Per outgoing mesh link: 1 connected, 0 not (connecting, backing off, stopped).', 'relay core', {
    peer: 'the peer relay URL',
  }),
  // The core's front (TLS, HTTP heads) and accept limits.
  def('front_connections_total', 'counter', 'Raw TCP connections taken over before HTTP (TLS in the core, or plain).', 'relay core'),
  def('tls_handshakes_total', 'counter', 'TLS handshakes completed by the core.', 'relay core'),
  def('tls_handshake_failures_total', 'counter', 'Connections closed for a TLS handshake that failed, by reason.', 'relay core', {
    [REASONS]: 'error (not TLS, truncated, refused), timeout (not complete in 10 s)',
  }),
  def('http_rejections_total', 'counter', 'HTTP requests or connections refused before reaching a handler.', 'node', {
    [REASONS]:
      'head_timeout (request head not complete in time), bad_request (malformed or oversized head), not_found (unknown path), unknown_upgrade_path (upgrade for a path other than /derp)',
    layer: 'core (read by the relay core), node (read by the Node HTTP server)',
  }),
  def(
    'core_http_requests_answered_total',
    'counter',
    'Requests the core answered itself (probes, /generate_204, refused upgrades).',
    'relay core',
  ),
  def(
    'connections_handed_to_node_total',
    'counter',
    "Connections the core handed to Node's HTTP server (operator API, metrics, ...).",
    'relay core',
  ),
  def(
    'http_handoff_failures_total',
    'counter',
    'Connections closed because no socket pair could be made to hand them to Node.',
    'relay core',
  ),
  def('accepted_open_connections', 'gauge', 'Connections taken by the core and open now, under the accept limits.', 'relay core'),
  def('accepts_refused_total', 'counter', 'Connections closed as they were accepted, over an accept limit, by reason.', 'relay core', {
    [REASONS]: 'rate_limit (accept rate exceeded), max_connections (relay full), max_connections_per_ip (source address full)',
  }),
  def('upgrades_total', 'counter', 'DERP upgrades by how they were made or refused.', 'node', {
    kind: 'fast_start (Derp-Fast-Start: 1, no 101), bridged (carried by the byte bridge: TLS in Node), refused (bad Upgrade header or shutting down)',
  }),
  // Admission (--verify-client-url).
  def('admission_checks_total', 'counter', 'Client handshakes checked against the admission URL (mesh peers never are).', 'relay core'),
  def('admission_cache_hits_total', 'counter', 'Admission checks answered from the decision cache.', 'relay core'),
  def('admission_requests_total', 'counter', 'Requests sent to the admission URL.', 'relay core'),
  def('admission_requests_in_flight', 'gauge', 'Requests to the admission URL awaiting their answer.', 'relay core'),
  def(
    'admission_endpoint_errors_total',
    'counter',
    'Admission requests without a usable answer: unreachable, timed out, 1xx/3xx/5xx, or not {"Allow": bool}.',
    'relay core',
  ),
  def('admission_allowed_total', 'counter', 'Clients the admission URL allowed (cached answers included).', 'relay core'),
  def(
    'admission_fail_open_total',
    'counter',
    'Clients admitted without an answer because the admission URL was unavailable (fail-open).',
    'relay core',
  ),
  def('admission_rejected_total', 'counter', 'Clients refused by admission, by reason.', 'relay core', {
    [REASONS]: 'denied (Allow: false), status (4xx), endpoint_error, timeout, busy (the last three: URL unavailable, fail-closed)',
  }),
  // STUN.
  def('stun_answered_total', 'counter', 'STUN Binding requests answered.', 'stun'),
  def('stun_dropped_total', 'counter', 'UDP datagrams on the STUN port dropped, by reason.', 'stun', {
    [REASONS]: 'malformed (not STUN, or not what a Tailscale client sends), not_binding (well-formed, not a Binding request)',
  }),
  def('stun_socket_errors_total', 'counter', 'Errors on the STUN socket.', 'stun', { op: 'send, read' }),
  // Control plane.
  def('build_info', 'gauge', 'Always 1; the version label tells which derpmesh this node runs.', 'control plane', {
    version: 'package version',
  }),
  def('replicas_live', 'gauge', 'Live replicas in the cluster, this one included.', 'control plane'),
  def('database_up', 'gauge', '1 when the last Postgres round trip succeeded, 0 when Postgres is unreachable.', 'control plane'),
  def('database_rtt_seconds', 'gauge', 'Round trip of the last Postgres heartbeat query (absent before the first).', 'control plane'),
  def('pubsub_connected', 'gauge', '1 when the LISTEN connection to Postgres is up.', 'control plane'),
  def('pubsub_reconnects_total', 'counter', 'LISTEN connection re-establishments.', 'control plane'),
  def('misconfigurations', 'gauge', 'Cluster misconfiguration warnings in effect.', 'control plane'),
  def('peer_rtt_seconds', 'gauge', 'Round trip to a peer relay (median of a few probes); absent while unreachable.', 'control plane', {
    peer: 'peer hostname',
    peer_id: 'peer replica id',
  }),
  def('peer_reachable', 'gauge', '1 when the last latency probe of the peer relay answered.', 'control plane', {
    peer: 'peer hostname',
    peer_id: 'peer replica id',
  }),
  def('peer_slow', 'gauge', '1 when the round trip to the peer exceeds the latency threshold.', 'control plane', {
    peer: 'peer hostname',
    peer_id: 'peer replica id',
  }),
];

const definitionsByName = new Map(metricDefinitions.map((d) => [d.name, d]));

/** One value of a derpmesh metric (name without the prefix is accepted too). */
export interface Sample {
  name: string;
  value: number;
  labels?: Record<string, string>;
}

/** A histogram read from its source: per-bucket counts (not cumulative) and the sum, in seconds. */
export interface HistogramSample {
  name: string;
  /** Upper bounds in seconds, ascending; `counts` has one more entry (above every bound). */
  bounds: number[];
  counts: number[];
  sum: number;
}

export interface Snapshot {
  samples: Sample[];
  histograms?: HistogramSample[];
}

/**
 * The relay core's flat counters (Rust names, kept for the code that reads them by name) mapped to
 * their Prometheus metric and labels. `null`: not exported (an aggregate of labelled series).
 */
export const coreMetricMap: Record<string, { metric: string; labels?: Record<string, string>; scale?: number } | null> = {
  accepts: { metric: 'accepts_total' },
  connections: { metric: 'connections' },
  clients: { metric: 'clients' },
  home_connections: { metric: 'home_connections' },
  mesh_connections: { metric: 'mesh_connections' },
  watchers: { metric: 'watchers' },
  duplicate_client_connections: { metric: 'duplicate_client_connections_total' },
  handshake_failures: null,
  handshake_failure_timeout: { metric: 'handshake_failures_total', labels: { reason: 'timeout' } },
  handshake_failure_io: { metric: 'handshake_failures_total', labels: { reason: 'io' } },
  handshake_failure_bad_first_frame: { metric: 'handshake_failures_total', labels: { reason: 'bad_first_frame' } },
  handshake_failure_bad_size: { metric: 'handshake_failures_total', labels: { reason: 'bad_size' } },
  handshake_failure_zero_key: { metric: 'handshake_failures_total', labels: { reason: 'zero_key' } },
  handshake_failure_box_open: { metric: 'handshake_failures_total', labels: { reason: 'box_open' } },
  handshake_failure_bad_json: { metric: 'handshake_failures_total', labels: { reason: 'bad_json' } },
  protocol_errors: { metric: 'protocol_errors_total' },
  permission_denied: { metric: 'permission_denied_total' },
  write_timeouts: { metric: 'write_timeouts_total' },
  unknown_frames: { metric: 'unknown_frames_total' },
  packets_received: { metric: 'received_packets_total' },
  bytes_received: { metric: 'received_bytes_total' },
  packets_sent: { metric: 'sent_packets_total' },
  bytes_sent: { metric: 'sent_bytes_total' },
  packets_forwarded_out: { metric: 'forwarded_packets_total', labels: { direction: 'out' } },
  packets_forwarded_in: { metric: 'forwarded_packets_total', labels: { direction: 'in' } },
  packets_dropped_unknown_dest: { metric: 'dropped_packets_total', labels: { reason: 'unknown_dest' } },
  packets_dropped_unknown_dest_on_fwd: { metric: 'dropped_packets_total', labels: { reason: 'unknown_dest_on_fwd' } },
  packets_dropped_queue_full: { metric: 'dropped_packets_total', labels: { reason: 'queue_full' } },
  packets_dropped_gone: { metric: 'dropped_packets_total', labels: { reason: 'gone' } },
  peer_gone_disconnected_sent: { metric: 'peer_gone_sent_total', labels: { reason: 'disconnected' } },
  peer_gone_not_here_sent: { metric: 'peer_gone_sent_total', labels: { reason: 'not_here' } },
  rate_limited_frames: { metric: 'rate_limited_frames_total' },
  rate_limit_wait_micros: { metric: 'rate_limit_wait_seconds_total', scale: 1e-6 },
  pings_received: { metric: 'pings_received_total' },
  keepalives_sent: { metric: 'keepalives_sent_total' },
  restarting_sent: { metric: 'restarting_sent_total' },
  mesh_links: { metric: 'mesh_links' },
  forwarders: { metric: 'forwarders' },
  queued_packets: { metric: 'queued_packets' },
  queue_depth_max: { metric: 'queue_depth_max' },
  upgrades_fast_start: { metric: 'upgrades_total', labels: { kind: 'fast_start' } },
  upgrades_refused: { metric: 'upgrades_total', labels: { kind: 'refused' } },
  upgrades_bridged: { metric: 'upgrades_total', labels: { kind: 'bridged' } },
  front_connections: { metric: 'front_connections_total' },
  tls_handshakes: { metric: 'tls_handshakes_total' },
  tls_handshake_errors: { metric: 'tls_handshake_failures_total', labels: { reason: 'error' } },
  tls_handshake_timeouts: { metric: 'tls_handshake_failures_total', labels: { reason: 'timeout' } },
  http_head_timeouts: { metric: 'http_rejections_total', labels: { reason: 'head_timeout', layer: 'core' } },
  http_bad_requests: { metric: 'http_rejections_total', labels: { reason: 'bad_request', layer: 'core' } },
  http_requests_answered: { metric: 'core_http_requests_answered_total' },
  connections_handed_to_node: { metric: 'connections_handed_to_node_total' },
  http_handoff_failures: { metric: 'http_handoff_failures_total' },
  accepted_open: { metric: 'accepted_open_connections' },
  accepts_refused: null,
  accepts_refused_rate_limit: { metric: 'accepts_refused_total', labels: { reason: 'rate_limit' } },
  accepts_refused_max_connections: { metric: 'accepts_refused_total', labels: { reason: 'max_connections' } },
  accepts_refused_max_connections_per_ip: { metric: 'accepts_refused_total', labels: { reason: 'max_connections_per_ip' } },
  admission_checks: { metric: 'admission_checks_total' },
  admission_cache_hits: { metric: 'admission_cache_hits_total' },
  admission_requests: { metric: 'admission_requests_total' },
  admission_in_flight: { metric: 'admission_requests_in_flight' },
  admission_endpoint_errors: { metric: 'admission_endpoint_errors_total' },
  admission_allowed: { metric: 'admission_allowed_total' },
  admission_admitted_fail_open: { metric: 'admission_fail_open_total' },
  admission_rejected_denied: { metric: 'admission_rejected_total', labels: { reason: 'denied' } },
  admission_rejected_status: { metric: 'admission_rejected_total', labels: { reason: 'status' } },
  admission_rejected_endpoint_error: { metric: 'admission_rejected_total', labels: { reason: 'endpoint_error' } },
  admission_rejected_timeout: { metric: 'admission_rejected_total', labels: { reason: 'timeout' } },
  admission_rejected_busy: { metric: 'admission_rejected_total', labels: { reason: 'busy' } },
  // Counted by the Node HTTP server (`httpCounters` in src/http/server.ts).
  http_header_timeouts: { metric: 'http_rejections_total', labels: { reason: 'head_timeout', layer: 'node' } },
  http_client_errors: { metric: 'http_rejections_total', labels: { reason: 'bad_request', layer: 'node' } },
  http_not_found: { metric: 'http_rejections_total', labels: { reason: 'not_found', layer: 'node' } },
  upgrades_unknown_path: { metric: 'http_rejections_total', labels: { reason: 'unknown_upgrade_path', layer: 'node' } },
};

/** The core's histograms (Rust names) mapped to their Prometheus metric. */
const coreHistogramMap: Record<string, string> = {
  handshake_duration: 'handshake_duration_seconds',
  queue_wait: 'queue_wait_seconds',
};

/** Flat counters by their source name (the relay core's, the HTTP server's) as Prometheus samples. */
export function mapCounters(values: Iterable<{ name: string; value: number }>): Sample[] {
  const out: Sample[] = [];
  for (const { name, value } of values) {
    const to = coreMetricMap[name];
    if (to === null) continue;
    if (to === undefined) throw new Error(`metrics: the counter ${name} has no Prometheus name (add it to coreMetricMap)`);
    out.push({ name: to.metric, value: value * (to.scale ?? 1), labels: to.labels });
  }
  return out;
}

/** The core's histograms (bounds and sums in microseconds) as histogram samples in seconds. */
export function mapHistograms(values: Iterable<{ name: string; boundsUs: number[]; buckets: number[]; sumUs: number }>): HistogramSample[] {
  const out: HistogramSample[] = [];
  for (const h of values) {
    const metric = coreHistogramMap[h.name];
    if (!metric) throw new Error(`metrics: the histogram ${h.name} has no Prometheus name (add it to coreHistogramMap)`);
    out.push({ name: metric, bounds: h.boundsUs.map((b) => b / 1e6), counts: h.buckets, sum: h.sumUs / 1e6 });
  }
  return out;
}

interface ValueLine {
  value: number;
  labels: Record<string, string | number>;
  metricName?: string;
}

/**
 * A node's metrics: one prom-client Registry with every derpmesh metric (values from `sources`,
 * read once per scrape) and prom-client's default process metrics.
 */
export class NodeMetrics {
  readonly registry = new Registry();
  readonly #sources: (() => Snapshot)[] = [];
  #current = new Map<string, ValueLine[]>();

  constructor() {
    for (const d of metricDefinitions) this.#register(d);
    collectDefaultMetrics({ register: this.registry });
  }

  /** Adds a source, called once per scrape. */
  addSource(source: () => Snapshot): void {
    this.#sources.push(source);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The Prometheus text exposition: reads every source once, then renders. */
  async render(): Promise<string> {
    const current = new Map<string, ValueLine[]>();
    const add = (name: string, line: ValueLine) => {
      const list = current.get(name);
      if (list) list.push(line);
      else current.set(name, [line]);
    };
    for (const source of this.#sources) {
      const snapshot = source();
      for (const s of snapshot.samples) {
        const d = this.#definition(s.name, s.labels);
        if (d.type === 'histogram') throw new Error(`metrics: ${d.name} is a histogram, not a sample`);
        add(d.name, { value: s.value, labels: s.labels ?? {} });
      }
      for (const h of snapshot.histograms ?? []) {
        const d = this.#definition(h.name, {});
        if (d.type !== 'histogram') throw new Error(`metrics: ${d.name} is not a histogram`);
        let cumulative = 0;
        h.bounds.forEach((bound, i) => {
          cumulative += h.counts[i] ?? 0;
          add(d.name, { metricName: `${d.name}_bucket`, labels: { le: bound }, value: cumulative });
        });
        const count = h.counts.reduce((a, b) => a + b, 0);
        add(d.name, { metricName: `${d.name}_bucket`, labels: { le: '+Inf' }, value: count });
        add(d.name, { metricName: `${d.name}_sum`, labels: {}, value: h.sum });
        add(d.name, { metricName: `${d.name}_count`, labels: {}, value: count });
      }
    }
    // The collectors below read this map; prom-client calls them all before its first await.
    this.#current = current;
    return this.registry.metrics();
  }

  #definition(name: string, labels: Record<string, string> | undefined): MetricDefinition {
    const d = definitionsByName.get(name.startsWith(PREFIX) ? name : PREFIX + name);
    if (!d) throw new Error(`metrics: ${name} is not a declared metric (add it to metricDefinitions)`);
    const want = Object.keys(d.labels).sort().join(',');
    const got = Object.keys(labels ?? {})
      .sort()
      .join(',');
    if (want !== got) throw new Error(`metrics: ${d.name} takes the labels {${want}}, given {${got}}`);
    return d;
  }

  #register(d: MetricDefinition): void {
    // A collector in prom-client's metric shape: `get()` returns the values of this scrape.
    const collector = {
      name: d.name,
      help: d.help,
      type: d.type,
      aggregator: 'sum',
      get: async () => ({ name: d.name, help: d.help, type: d.type, aggregator: 'sum', values: this.#current.get(d.name) ?? [] }),
    };
    this.registry.registerMetric(collector as unknown as Parameters<Registry['registerMetric']>[0]);
  }
}

/** Counters kept in TypeScript (HTTP-level rejections), by their source name (see `coreMetricMap`). */
export class Counters<Name extends string> {
  readonly #values = new Map<Name, number>();
  constructor(names: readonly Name[]) {
    for (const name of names) this.#values.set(name, 0);
  }
  inc(name: Name, by = 1): void {
    this.#values.set(name, (this.#values.get(name) ?? 0) + by);
  }
  get(name: Name): number {
    return this.#values.get(name) ?? 0;
  }
  samples(): { name: Name; value: number }[] {
    return [...this.#values].map(([name, value]) => ({ name, value }));
  }
}

/** Metric names of prom-client's default process metrics, as a registry of this platform has them. */
export async function defaultMetricDefinitions(): Promise<{ name: string; type: string; help: string }[]> {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const json = await registry.getMetricsAsJSON();
  return json.map((m) => ({ name: m.name, type: String(m.type), help: m.help })).sort((a, b) => a.name.localeCompare(b.name));
}

const escapeCell = (s: string) => s.replace(/\|/g, '\\|');

/**
 * The README's metrics table (between `<!-- metrics-table:start -->` and `<!-- metrics-table:end -->`):
 * every derpmesh metric, then prom-client's default process metrics (`defaults`, from
 * `defaultMetricDefinitions()`).
 */
export function metricsMarkdownTable(defaults: readonly { name: string; type: string; help: string }[]): string {
  const rows = [
    '| Metric | Type | Labels | Source | Meaning |',
    '| --- | --- | --- | --- | --- |',
    ...metricDefinitions.map((d) => {
      const labels = Object.entries(d.labels)
        .map(([k, v]) => `\`${k}\`: ${v}`)
        .join('; ');
      return `| \`${d.name}\` | ${d.type} | ${escapeCell(labels) || '—'} | ${d.source} | ${escapeCell(d.help)} |`;
    }),
    ...defaults.map((m) => `| \`${m.name}\` | ${m.type} | — | process (prom-client default) | ${escapeCell(m.help)} |`),
  ];
  return rows.join('\n');
}

/** The list handed to dashboards and alerts: `name type` per line, derpmesh metrics then defaults. */
export async function metricNamesList(): Promise<string> {
  const lines = metricDefinitions.map(
    (d) => `${d.name} ${d.type}${Object.keys(d.labels).length ? ` {${Object.keys(d.labels).join(',')}}` : ''}`,
  );
  for (const m of await defaultMetricDefinitions()) lines.push(`${m.name} ${m.type} (prom-client default)`);
  return lines.join('\n') + '\n';
}
