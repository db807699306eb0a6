// Versioned schema migrations. Every node runs migrate() on start; the advisory lock makes concurrent
// starts apply each migration exactly once, and the transaction makes a failed migration leave no trace.
import type pg from 'pg';
import type { Logger } from '../log.js';
import { migrationLockId } from './locks.js';

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

export const migrations: readonly Migration[] = [
  {
    version: 1,
    name: 'replicas and site_config',
    sql: `
      CREATE TABLE replicas (
        id uuid PRIMARY KEY,
        hostname text NOT NULL,
        region_id integer NOT NULL,
        relay_url text NOT NULL DEFAULT '',
        version text NOT NULL,
        started_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        stopped_at timestamptz NULL,
        error text NOT NULL DEFAULT '',
        database_latency integer NOT NULL DEFAULT 0,
        "primary" boolean NOT NULL DEFAULT true,
        peer_latencies jsonb NOT NULL DEFAULT '{}'
      );
      COMMENT ON COLUMN replicas.relay_url IS 'this node''s relay URL as seen by its peers; empty with custom relays';
      COMMENT ON COLUMN replicas.error IS 'empty when healthy, else why (e.g. an unreachable peer)';
      COMMENT ON COLUMN replicas.database_latency IS 'round trip to Postgres, microseconds';
      COMMENT ON COLUMN replicas.peer_latencies IS 'peer replica id -> round trip to its relay, microseconds';
      CREATE TABLE site_config (
        key text PRIMARY KEY,
        value text NOT NULL
      );
    `,
  },
  {
    version: 2,
    name: 'replica health reports',
    sql: `
      ALTER TABLE replicas ADD COLUMN health jsonb NULL;
      COMMENT ON COLUMN replicas.health IS 'the node''s last health report (cluster-wide health view)';
    `,
  },
  {
    version: 3,
    name: 'replica access URLs (multi-region DERP map)',
    sql: `
      ALTER TABLE replicas ADD COLUMN access_url text NOT NULL DEFAULT '';
      ALTER TABLE replicas ADD COLUMN stun_port integer NOT NULL DEFAULT -1;
      COMMENT ON COLUMN replicas.access_url IS 'the access URL clients of this node''s region dial (its node in /derpmap); empty when the node runs no embedded relay';
      COMMENT ON COLUMN replicas.stun_port IS 'UDP port where this node answers STUN, -1 when it does not';
    `,
  },
];

export interface MigrateResult {
  /** Schema version after migrating. */
  version: number;
  /** Versions this call applied (empty when another node already had). */
  applied: number[];
}

/** Bound on waiting for the migration lock and on each migration statement. */
const migrationTimeoutMs = 60_000;

/** pg honours a per-query client-side query_timeout, which overrides the pool's; its types omit it. */
function slowQuery(text: string, values?: unknown[]): pg.QueryConfig {
  return { text, values, query_timeout: migrationTimeoutMs + 1_000 } as pg.QueryConfig;
}

export async function migrate(pool: pg.Pool, logger: Logger, list: readonly Migration[] = migrations): Promise<MigrateResult> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    // Waiting for another node's migrations, or a migration itself, may take longer than the pool's bounds.
    await client.query(`SET LOCAL statement_timeout = ${migrationTimeoutMs}`);
    await client.query(slowQuery('SELECT pg_advisory_xact_lock($1)', [migrationLockId]));
    await client.query(`
      CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
      )`);
    const current = await client.query<{ version: number | null }>('SELECT max(version) AS version FROM schema_migrations');
    let version = current.rows[0]?.version ?? 0;
    const applied: number[] = [];
    for (const migration of [...list].sort((a, b) => a.version - b.version)) {
      if (migration.version <= version) continue;
      await client.query(slowQuery(migration.sql));
      await client.query('INSERT INTO schema_migrations (version, name) VALUES ($1, $2)', [migration.version, migration.name]);
      applied.push(migration.version);
      version = migration.version;
    }
    await client.query('COMMIT');
    if (applied.length > 0) logger.info('database schema migrated', { component: 'postgres', version, applied: applied.join(',') });
    return { version, applied };
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}
