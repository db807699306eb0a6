// The operator API of an HA node: replicas, cluster-wide health, the DERP map.
import type { IncomingMessage, ServerResponse } from 'node:http';

import { worst, type HealthReport } from '../health.js';
import type { ReplicaRegistry } from '../replicas/registry.js';
import type { SettingState } from '../settings.js';
import type { RouteHandler } from './server.js';

export interface ApiSources {
  registry: ReplicaRegistry;
  /** This node's live health report. */
  health: () => HealthReport;
  /** Cluster-level warnings (e.g. a relay URL missing in a multi-node cluster). */
  warnings: () => string[];
  derpMap: () => unknown;
  /** The cluster settings in force on this node and where each comes from. */
  settings: () => SettingState[];
}

function json(res: ServerResponse, status: number, body: unknown): true {
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' }).end(JSON.stringify(body, null, 2) + '\n');
  return true;
}

function path(req: IncomingMessage): string {
  return (req.url ?? '').split('?')[0]!;
}

export function apiRoutes(s: ApiSources): RouteHandler[] {
  return [
    (req, res) => {
      if (path(req) !== '/api/v2/replicas') return false;
      const registry = s.registry;
      const latencies = new Map(registry.peerLatencies().map((l) => [l.replicaId, l]));
      const replicas = registry.replicas().map((r) => {
        const self = r.id === registry.self.id;
        const measured = latencies.get(r.id);
        return {
          id: r.id,
          hostname: r.hostname,
          region_id: r.regionId,
          relay_address: r.relayUrl,
          error: r.error,
          database_latency: r.databaseLatencyUs,
          created_at: r.startedAt,
          updated_at: r.updatedAt,
          stopped_at: r.stoppedAt,
          version: r.version,
          state: r.stoppedAt ? 'stopped' : registry.isLive(r) ? 'live' : 'stale',
          self,
          // Round trips this replica measured to its peers (µs), keyed by peer id.
          peer_latencies: r.peerLatenciesUs,
          // What this node measured to that replica just now.
          latency_from_here_ms: measured?.rttMs,
          latency_warning: measured?.slow
            ? `round trip ${measured.rttMs!.toFixed(2)} ms from ${registry.self.hostname} exceeds the threshold`
            : undefined,
          unreachable_from_here: measured?.error,
        };
      });
      // A bare array, as Coder's API answers (codersdk.Replica's fields first); cluster warnings
      // are in the health report.
      return json(res, 200, replicas);
    },
    (req, res) => {
      if (path(req) !== '/api/v2/debug/health') return false;
      const here = s.health();
      const others = s.registry
        .replicas()
        .filter((r) => r.id !== here.replicaId && r.stoppedAt === null)
        .map((r) => ({ ...(r.health ?? {}), replicaId: r.id, hostname: r.hostname, reportAgeMs: r.ageMs, stale: s.registry.isStale(r) }));
      const nodes = [here, ...others];
      const severity = worst(nodes.map((n) => ((n as Partial<HealthReport>).severity ?? 'error') as HealthReport['severity']));
      return json(res, 200, { severity, reportedBy: here.hostname, nodes, warnings: s.warnings() });
    },
    (req, res) => {
      // Read-only: settings are changed with `derpmesh config set` (which needs the database).
      if (path(req) !== '/api/v2/settings') return false;
      return json(res, 200, s.settings());
    },
    (req, res) => {
      if (path(req) !== '/derpmap') return false;
      return json(res, 200, s.derpMap());
    },
  ];
}
