// The Postgres layer against a real server: migrations, the mesh key, and pubsub surviving restarts and
// silent connections.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import { silentLogger } from '../src/log.js';
import { getOrCreateMeshKey } from '../src/postgres/meshkey.js';
import { migrate, migrations } from '../src/postgres/migrations.js';
import { createPool } from '../src/postgres/pool.js';
import { listenerApplicationName, Pubsub, type PubsubOptions } from '../src/postgres/pubsub.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

describe('postgres', () => {
  let postgres: TestPostgres;
  let pool: pg.Pool;
  const pools: pg.Pool[] = [];
  const pubsubs: Pubsub[] = [];

  const newPool = () => {
    const created = createPool({ connectionString: postgres.url, logger: silentLogger });
    pools.push(created);
    return created;
  };
  const newPubsub = async (options: Partial<PubsubOptions> = {}) => {
    const pubsub = new Pubsub({
      connectionString: postgres.url,
      pool,
      logger: silentLogger,
      backoffInitialMs: 100,
      backoffMaxMs: 1_000,
      ...options,
    });
    pubsubs.push(pubsub);
    await pubsub.start();
    return pubsub;
  };

  before(async () => {
    postgres = await startPostgres();
    pool = newPool();
  });

  after(async () => {
    await Promise.all(pubsubs.map((pubsub) => pubsub.close()));
    await Promise.all(pools.map((created) => created.end()));
    await postgres?.stop();
  });

  test('nodes migrating at the same instant end with one schema', async () => {
    const first = newPool();
    const second = newPool();
    const results = await Promise.all([migrate(first, silentLogger), migrate(second, silentLogger)]);
    const latest = migrations[migrations.length - 1]!.version;
    assert.deepEqual(
      results.map((r) => r.version),
      [latest, latest],
    );
    // Exactly one of them applied the migrations, the other found them done.
    assert.deepEqual(results.map((r) => r.applied.length).sort(), [0, migrations.length]);
    const rows = await pool.query<{ version: number }>('SELECT version FROM schema_migrations ORDER BY version');
    assert.deepEqual(
      rows.rows.map((r) => r.version),
      migrations.map((m) => m.version),
    );
    const again = await migrate(pool, silentLogger);
    assert.deepEqual(again, { version: latest, applied: [] });
    const columns = await pool.query<{ column_name: string }>(
      "SELECT column_name FROM information_schema.columns WHERE table_name = 'replicas' ORDER BY ordinal_position",
    );
    // Migration 1's columns, in order; later migrations may add more after them.
    assert.deepEqual(columns.rows.map((c) => c.column_name).slice(0, 12), [
      'id',
      'hostname',
      'region_id',
      'relay_url',
      'version',
      'started_at',
      'updated_at',
      'stopped_at',
      'error',
      'database_latency',
      'primary',
      'peer_latencies',
    ]);
  });

  test('nodes asking for the mesh key at the same instant get the same key', async () => {
    const keys = await Promise.all([getOrCreateMeshKey(newPool()), getOrCreateMeshKey(newPool()), getOrCreateMeshKey(pool)]);
    assert.match(keys[0]!, /^[0-9a-f]{64}$/);
    assert.equal(new Set(keys).size, 1);
    assert.equal(await getOrCreateMeshKey(pool), keys[0]);
  });

  test('publish reaches subscribers of the channel only, until they unsubscribe', async () => {
    const pubsub = await newPubsub();
    const replica: string[] = [];
    const other: string[] = [];
    const unsubscribe = await pubsub.subscribe('replica', (payload) => replica.push(payload));
    await pubsub.subscribe('other', (payload) => other.push(payload));
    await pubsub.publish('replica', 'node-1');
    await waitFor('the message', () => replica.length === 1);
    assert.deepEqual(replica, ['node-1']);
    assert.deepEqual(other, []);
    unsubscribe();
    await pubsub.publish('replica', 'node-2');
    await pubsub.publish('other', 'marker');
    await waitFor('the marker', () => other.length === 1);
    assert.deepEqual(replica, ['node-1']);
    await pubsub.close();
  });

  test('payloads at the NOTIFY limit are refused with a clear error', async () => {
    const pubsub = await newPubsub();
    await assert.rejects(pubsub.publish('replica', 'x'.repeat(8_000)), { code: 'DERPMESH_ERR_PUBSUB_PAYLOAD_TOO_LARGE' });
    await pubsub.close();
  });

  test('pubsub reconnects after Postgres restarts on the same port and tells subscribers to re-sync', async () => {
    const pubsub = await newPubsub();
    const messages: string[] = [];
    let dropped = 0;
    await pubsub.subscribe('replica', { onMessage: (payload) => messages.push(payload), onDropped: () => dropped++ });
    await pubsub.publish('replica', 'before');
    await waitFor('the message before the restart', () => messages.length === 1);

    await postgres.stopServer();
    await waitFor('pubsub to notice', () => !pubsub.state().connected);
    await sleep(2_000); // several failed reconnects, so the backoff is in play
    assert.equal(dropped, 0);
    await postgres.startServer();

    await waitFor('pubsub to reconnect', () => pubsub.state().connected);
    assert.equal(dropped, 1);
    assert.equal(pubsub.state().reconnects, 1);
    assert.ok(pubsub.state().lastReconnectAt instanceof Date);
    // The pool's connections died with the server too; it must open new ones.
    await pubsub.publish('replica', 'after');
    await waitFor('the message after the restart', () => messages.length === 2);
    assert.deepEqual(messages, ['before', 'after']);
    await pubsub.close();
  });

  test('the watchdog re-establishes a LISTEN connection that went silent', async () => {
    const pubsub = await newPubsub({ watchdogIntervalMs: 200, watchdogTimeoutMs: 500 });
    const messages: string[] = [];
    let dropped = 0;
    await pubsub.subscribe('replica', { onMessage: (payload) => messages.push(payload), onDropped: () => dropped++ });
    // Earlier tests' listeners are closed but their backends may take a moment to go away.
    let silentPid = 0;
    await waitFor('exactly one LISTEN connection', async () => {
      const listeners = await pool.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE application_name = $1', [
        listenerApplicationName,
      ]);
      silentPid = listeners.rows[0]?.pid ?? 0;
      return listeners.rows.length === 1;
    });
    // SIGSTOP freezes the backend: its socket stays open but nothing comes out — the half-open case.
    process.kill(silentPid, 'SIGSTOP');
    try {
      await waitFor('the watchdog to reconnect', () => pubsub.state().reconnects === 1, 10_000);
      assert.equal(dropped, 1);
      await pubsub.publish('replica', 'after');
      await waitFor('the message on the new connection', () => messages.length === 1);
      assert.deepEqual(messages, ['after']);
    } finally {
      process.kill(silentPid, 'SIGCONT');
    }
    await pubsub.close();
  });
});
