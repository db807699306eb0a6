// A throwaway Postgres for a test: initdb into a fresh temp dir, listen on 127.0.0.1 on a free port, unix
// sockets inside the temp dir, trust auth, no fsync. As root the server runs as `nobody` (see
// src/postgres/server.ts). stop() removes everything; a test process that exits without stop() still
// takes the server and the directory with it.
import { chownSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { findPostgresBinDir, postgresIdentity, PostgresServer } from '../../src/postgres/server.js';

import { freePort } from '../../src/net.js';

export { freePort };

export interface TestPostgres {
  /** postgres://derpmesh@127.0.0.1:PORT/derpmesh */
  url: string;
  port: number;
  /** Stops the server and removes its data directory. */
  stop(): Promise<void>;
  /** Fast shutdown then start again: same port, same data. */
  restart(): Promise<void>;
  /** Fast shutdown (clients are disconnected), data kept. */
  stopServer(): Promise<void>;
  /** Starts the server again on the same port with the same data. */
  startServer(): Promise<void>;
}

const databaseUser = 'derpmesh';
const databaseName = 'derpmesh';

export async function startPostgres(): Promise<TestPostgres> {
  const binDir = findPostgresBinDir();
  const identity = postgresIdentity();
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-pg-'));
  if (identity) chownSync(dir, identity.uid, identity.gid);
  const port = await freePort();
  const server = new PostgresServer({ binDir, dataDir: join(dir, 'data'), socketDir: dir, port, user: databaseUser, throwaway: true });

  const cleanUp = () => {
    server.kill();
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', cleanUp);

  try {
    await server.init();
    await server.start();
    const admin = new pg.Client({ connectionString: server.maintenanceUrl() });
    await admin.connect();
    await admin.query(`CREATE DATABASE ${databaseName}`);
    await admin.end();
  } catch (error) {
    process.removeListener('exit', cleanUp);
    cleanUp();
    throw error;
  }

  return {
    url: `postgres://${databaseUser}@127.0.0.1:${port}/${databaseName}`,
    port,
    stopServer: () => server.stop(),
    startServer: () => server.start(),
    restart: async () => {
      await server.stop();
      await server.start();
    },
    stop: async () => {
      try {
        await server.stop();
      } finally {
        process.removeListener('exit', cleanUp);
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}
