// HA at a larger scale with real node processes on a real Postgres: a 5-node full mesh, a simultaneous
// cold start on an empty database, how fast a new node becomes visible, how fast a dead one goes.
import { strict as assert } from 'node:assert';
import { after, before, describe, test } from 'node:test';

import pg from 'pg';

import { DerpClient } from '../src/client/index.js';
import { migrations } from '../src/postgres/migrations.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

const HEARTBEAT_MS = 500;

describe('HA at scale', { timeout: 110_000 }, () => {
  let postgres: TestPostgres;
  let admin: pg.Client;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];
  let databases = 0;

  const database = async () => {
    const name = `scale_${++databases}`;
    await admin.query(`CREATE DATABASE ${name}`);
    return postgres.url.replace(/\/[^/]+$/, `/${name}`);
  };
  const spawnNode = async (name: string, postgresUrl: string) => {
    const n = await startNodeProcess({ name, postgresUrl, heartbeatMs: HEARTBEAT_MS });
    nodes.push(n);
    return n;
  };
  const client = async (n: NodeProcess) => {
    const c = await DerpClient.connect({ url: n.url });
    clients.push(c);
    return c;
  };
  const alive = (n: NodeProcess) => n.child.exitCode === null && n.child.signalCode === null;

  before(async () => {
    postgres = await startPostgres();
    admin = new pg.Client({ connectionString: postgres.url });
    await admin.connect();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await admin?.end().catch(() => {});
    await postgres?.stop();
  });

  describe('one 5-node cluster', () => {
    let db: string;
    const cluster: NodeProcess[] = [];

    test('5 nodes: every ordered pair of clients (20) exchanges packets through the mesh', async () => {
      db = await database();
      for (let i = 1; i <= 5; i++) {
        const n = await spawnNode(`s${i}`, db);
        await n.started;
        cluster.push(n);
      }
      const names = cluster.map((n) => n.name);
      await waitFor('every node listing the other four', 10_000, async () => {
        const lists = await Promise.all(cluster.map(livePeers));
        return lists.every((l, i) => l.join() === names.filter((_, j) => j !== i).join());
      });
      await waitFor(
        'every node with 4 mesh links up',
        15_000,
        async () => {
          const all = await Promise.all(cluster.map((n) => n.metrics()));
          return all.every((m) => /^derpmesh_mesh_links 4$/m.test(m));
        },
        100,
      );
      const cs = await Promise.all(cluster.map(client));
      let pairs = 0;
      const slowest = { ms: 0, pair: '' };
      for (let i = 0; i < cs.length; i++) {
        for (let j = 0; j < cs.length; j++) {
          if (i === j) continue;
          const ms = await deliver(cs[i]!, cs[j]!, 10_000).catch((err: Error) => {
            throw new Error(`${names[i]} → ${names[j]}: ${err.message}`);
          });
          if (ms > slowest.ms) Object.assign(slowest, { ms, pair: `${names[i]}→${names[j]}` });
          pairs++;
        }
      }
      assert.equal(pairs, 20);
      console.log(`20 ordered pairs delivered; slowest ${slowest.pair} in ${slowest.ms} ms`);
    });

    test('a new node is visible to every existing peer in < 1 s from its start', async () => {
      assert.equal(cluster.length, 5, 'needs the 5-node cluster');
      const n6 = await spawnNode('s6', db);
      await n6.started;
      const startedAt = Date.now();
      await waitFor(
        'every peer listing s6',
        5_000,
        async () => {
          const lists = await Promise.all(cluster.map(livePeers));
          return lists.every((l) => l.includes('s6'));
        },
        20,
      );
      const ms = Date.now() - startedAt;
      console.log(`s6 visible to all 5 peers ${ms} ms after it logged "started"`);
      assert.ok(ms < 1_000, `s6 became visible to every peer after ${ms} ms`);
      cluster.push(n6);
    });

    test('a killed node (kill -9) is dropped by every peer within 3 heartbeats', async () => {
      assert.equal(cluster.length, 6, 'needs the 6-node cluster');
      const victim = cluster[2]!;
      const survivors = cluster.filter((n) => n !== victim);
      // Everyone fully meshed and heartbeating before the kill.
      await waitFor('every node listing the other five', 5_000, async () =>
        (await Promise.all(cluster.map(livePeers))).every((l) => l.length === 5),
      );
      const killedAt = Date.now();
      await victim.kill9();
      await waitFor(
        `every survivor dropping ${victim.name}`,
        10 * HEARTBEAT_MS,
        async () => {
          const lists = await Promise.all(survivors.map(livePeers));
          return lists.every((l) => !l.includes(victim.name) && l.length === 4);
        },
        20,
      );
      const ms = Date.now() - killedAt;
      console.log(`${victim.name} (kill -9) dropped by all 5 survivors after ${ms} ms (3 heartbeats = ${3 * HEARTBEAT_MS} ms)`);
      assert.ok(ms <= 3 * HEARTBEAT_MS + 300, `detected after ${ms} ms`);
      await waitFor('the survivors dropping the mesh link to it', 5_000, async () =>
        (await Promise.all(survivors.map((n) => n.metrics()))).every((m) => /^derpmesh_mesh_links 4$/m.test(m)),
      );
    });

    test('stop the cluster gracefully', async () => {
      const codes = await Promise.all(cluster.filter(alive).map((n) => n.stop()));
      assert.deepEqual(
        codes,
        codes.map(() => 0),
      );
    });
  });

  test('two nodes started at the same instant on an empty database: one schema, one mesh key, one mesh', async () => {
    for (let round = 1; round <= 2; round++) {
      const db = await database();
      const pair = await Promise.all([spawnNode(`cold-${round}a`, db), spawnNode(`cold-${round}b`, db)]);
      await Promise.all(pair.map((n) => n.started));
      const [a, b] = pair as [NodeProcess, NodeProcess];

      const check = new pg.Client({ connectionString: db });
      await check.connect();
      try {
        const versions = (await check.query<{ version: number }>('SELECT version FROM schema_migrations ORDER BY version')).rows.map(
          (r) => r.version,
        );
        assert.deepEqual(
          versions,
          migrations.map((m) => m.version).sort((x, y) => x - y),
          'every migration recorded exactly once',
        );
        assert.deepEqual(
          versions,
          Array.from({ length: versions.length }, (_, i) => i + 1),
        );
        const keys = (await check.query<{ key: string; value: string }>(`SELECT key, value FROM site_config WHERE key LIKE '%mesh%'`)).rows;
        assert.equal(keys.length, 1, `mesh key rows: ${keys.map((k) => k.key).join(', ')}`);
        assert.equal(keys[0]!.key, 'mesh_key');
        assert.match(keys[0]!.value, /^[0-9a-f]{64}$/);
        for (const n of pair) assert.ok(!n.output().includes(keys[0]!.value), `${n.name} logged the mesh key`);
      } finally {
        await check.end();
      }
      const migrated = pair.filter((n) => /database schema migrated/.test(n.output()));
      assert.equal(migrated.length, 1, `exactly one node applies the migrations, got: ${migrated.map((n) => n.name).join(', ')}`);

      await waitFor(
        'both meshed',
        10_000,
        async () => {
          const [ma, mb] = await Promise.all([a.metrics(), b.metrics()]);
          return /^derpmesh_mesh_links 1$/m.test(ma) && /^derpmesh_mesh_links 1$/m.test(mb);
        },
        100,
      );
      const [ca, cb] = await Promise.all([client(a), client(b)]);
      await deliver(ca, cb, 10_000);
      await deliver(cb, ca, 10_000);
      await Promise.all([ca.close(), cb.close()]);
      assert.deepEqual(await Promise.all(pair.map((n) => n.stop())), [0, 0]);
    }
  });
});
