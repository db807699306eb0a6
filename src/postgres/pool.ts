// The shared connection pool for queries (registry, mesh key, publish). Pubsub's LISTEN connection is not
// from this pool: it must stay open and must never be handed to another caller.
import pg from 'pg';
import type { Logger } from '../log.js';

export interface PoolOptions {
  /** postgres://user:password@host:port/database */
  connectionString: string;
  logger: Logger;
  /** Most connections open at once. Default 10. */
  max?: number;
  /** Give up opening a connection after this long. Default 5 s. */
  connectionTimeoutMs?: number;
  /** Server-side statement_timeout for every query. Default 5 s. */
  statementTimeoutMs?: number;
  /** Close a connection idle this long. Default 30 s. */
  idleTimeoutMs?: number;
  /** Shown in pg_stat_activity. Default `derpmesh`. */
  applicationName?: string;
}

export function createPool(options: PoolOptions): pg.Pool {
  const statementTimeoutMs = options.statementTimeoutMs ?? 5_000;
  const pool = new pg.Pool({
    connectionString: options.connectionString,
    max: options.max ?? 10,
    connectionTimeoutMillis: options.connectionTimeoutMs ?? 5_000,
    statement_timeout: statementTimeoutMs,
    // Client-side bound too: statement_timeout cannot fire if the server or the network is gone.
    query_timeout: statementTimeoutMs + 1_000,
    idleTimeoutMillis: options.idleTimeoutMs ?? 30_000,
    keepAlive: true,
    application_name: options.applicationName ?? 'derpmesh',
  });
  const logger = options.logger.child({ component: 'postgres' });
  // An error on an idle connection (Postgres restarted, network cut) must be logged, not thrown: an
  // unhandled 'error' event would crash the node while its relay is still serving clients.
  pool.on('error', (error) => logger.warn('idle postgres connection failed; the pool will open a new one', { error }));
  // A checked-out connection between queries has no pool listener; give every connection one for its life.
  pool.on('connect', (client) => {
    client.on('error', (error) => logger.warn('postgres connection failed', { error }));
  });
  return pool;
}
