// A row of the `replicas` table, as the control plane uses it.
import type { HealthReport } from '../health.js';

export interface Replica {
  id: string;
  hostname: string;
  regionId: number;
  /** This node's relay URL as peers reach it; "" when it has none (custom relays, or unset). */
  relayUrl: string;
  /** The access URL clients of its region dial (its node in /derpmap); "" when it runs no embedded relay. */
  accessUrl: string;
  /** UDP port where it answers STUN; -1 when it does not. */
  stunPort: number;
  version: string;
  startedAt: Date;
  updatedAt: Date;
  stoppedAt: Date | null;
  /** "" when healthy, else why (e.g. an unreachable peer). */
  error: string;
  /** Round trip to Postgres, µs. */
  databaseLatencyUs: number;
  primary: boolean;
  /** Peer replica id → round trip to its relay, µs. */
  peerLatenciesUs: Record<string, number>;
  health: HealthReport | null;
  /** Time since the last heartbeat, by the database clock, ms. */
  ageMs: number;
}

export interface ReplicaRow {
  id: string;
  hostname: string;
  region_id: number;
  relay_url: string;
  access_url: string;
  stun_port: number;
  version: string;
  started_at: Date;
  updated_at: Date;
  stopped_at: Date | null;
  error: string;
  database_latency: number;
  primary: boolean;
  peer_latencies: Record<string, number> | null;
  health: HealthReport | null;
  age_ms: string | number;
}

export function fromRow(row: ReplicaRow): Replica {
  return {
    id: row.id,
    hostname: row.hostname,
    regionId: row.region_id,
    relayUrl: row.relay_url,
    accessUrl: row.access_url ?? '',
    stunPort: row.stun_port ?? -1,
    version: row.version,
    startedAt: row.started_at,
    updatedAt: row.updated_at,
    stoppedAt: row.stopped_at,
    error: row.error,
    databaseLatencyUs: row.database_latency,
    primary: row.primary,
    peerLatenciesUs: row.peer_latencies ?? {},
    health: row.health,
    ageMs: Number(row.age_ms),
  };
}
