// High availability with real node processes on a real Postgres: discovery, mesh, failures.
import { strict as assert } from 'node:assert';
import { after, before, describe, test } from 'node:test';

import pg from 'pg';

import { DerpClient } from '../src/client/index.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver, stream } from './helpers/traffic.js';

const HEARTBEAT_MS = 500;

describe('HA cluster', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];

  const node = async (name: string, extra: Partial<Parameters<typeof startNodeProcess>[0]> = {}) => {
    const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS, ...extra });
    nodes.push(n);
    await n.started;
    return n;
  };
  const client = async (n: NodeProcess) => {
    const c = await DerpClient.connect({ url: n.url });
    clients.push(c);
    return c;
  };

  before(async () => {
    postgres = await startPostgres();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('three nodes discover each other within one heartbeat and mesh their relays', async () => {
    const n1 = await node('n1');
    const n2 = await node('n2');
    const n3 = await node('n3');
    const seen = await waitFor('every node listing the other two', HEARTBEAT_MS, async () => {
      const lists = await Promise.all([n1, n2, n3].map(livePeers));
      return lists[0]!.join() === 'n2,n3' && lists[1]!.join() === 'n1,n3' && lists[2]!.join() === 'n1,n2';
    });
    assert.ok(seen.ms <= HEARTBEAT_MS, `took ${seen.ms} ms`);

    const a = await client(n1);
    const b = await client(n3);
    await deliver(a, b);
    await deliver(b, a);
    const metrics = await n1.metrics();
    assert.match(metrics, /^derpmesh_forwarded_packets_total\{direction="out"\} [1-9]/m);
  });

  test('kill -9 under traffic: peers drop it within 3 heartbeats, others keep flowing, it rejoins', async () => {
    const [n1, n2, n3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    const a = await client(n1);
    const b = await client(n2);
    const victimClient = await client(n3);
    await deliver(a, b);
    await deliver(a, victimClient);
    const flow = stream(a, b, 200);
    await new Promise((r) => setTimeout(r, 500));
    const killedAt = Date.now();
    await n3.kill9();
    const gone = await waitFor('n1 and n2 dropping n3', 6 * HEARTBEAT_MS, async () => {
      const [p1, p2] = await Promise.all([livePeers(n1), livePeers(n2)]);
      return p1.join() === 'n2' && p2.join() === 'n1';
    });
    const detectedMs = Date.now() - killedAt;
    assert.ok(detectedMs <= 3 * HEARTBEAT_MS + 300, `detected after ${detectedMs} ms (poll ${gone.ms} ms)`);
    const links = await n1.metrics();
    assert.match(links, /^derpmesh_mesh_links 1$/m, 'n1 keeps only its link to n2');
    await new Promise((r) => setTimeout(r, 500));
    const result = await flow.stop();
    assert.ok(result.sent > 100);
    assert.deepEqual(result.missing, [], `lost ${result.missing.length} of ${result.sent} packets between n1 and n2`);

    const restarted = await node('n3', { port: n3.port });
    await waitFor(
      'n3 meshed again',
      10_000,
      async () => (await livePeers(n1)).includes('n3') && (await livePeers(restarted)).join() === 'n1,n2',
    );
    const c = await client(restarted);
    await deliver(a, c);
    await deliver(c, b);
  });

  test('graceful stop: stopped_at set, peers told at once, clients get Restarting', async () => {
    const n4 = await node('n4');
    const [n1] = nodes as [NodeProcess];
    await waitFor('n1 sees n4', 5_000, async () => (await livePeers(n1)).includes('n4'));
    const c = await client(n4);
    const restarting = new Promise<{ reconnectInMs: number; tryForMs: number }>((resolve) => c.once('restarting', resolve));
    const stoppedAt = Date.now();
    const code = n4.stop();
    const info = await restarting;
    assert.ok(info.tryForMs > 0);
    const told = await waitFor('n1 marking n4 stopped', HEARTBEAT_MS, async () => {
      const replicas = await n1.replicas();
      return replicas.find((r) => r.hostname === 'n4')?.state === 'stopped';
    });
    assert.ok(Date.now() - stoppedAt < 2 * HEARTBEAT_MS + 2_000, `peers learned after ${told.ms} ms`);
    assert.equal(await code, 0, n4.output());
    const db = new pg.Client({ connectionString: postgres.url });
    await db.connect();
    const { rows } = await db.query(`SELECT stopped_at FROM replicas WHERE hostname = 'n4' ORDER BY started_at DESC LIMIT 1`);
    await db.end();
    assert.ok(rows[0].stopped_at instanceof Date);
  });

  test('Postgres down for 10 s: traffic keeps flowing; afterwards every node heartbeats and listens again', async () => {
    const live = nodes.filter((n) => n.child.exitCode === null && n.child.signalCode === null);
    const [n1, n2] = live as [NodeProcess, NodeProcess];
    const a = await client(n1);
    const b = await client(n2);
    await deliver(a, b);
    const flow = stream(a, b, 100);
    await postgres.stopServer();
    await new Promise((r) => setTimeout(r, 10_000));
    await postgres.startServer();
    for (const n of live) {
      await waitFor(`${n.name} listening again`, 20_000, async () => /^derpmesh_pubsub_connected 1$/m.test(await n.metrics()), 200);
    }
    const result = await flow.stop();
    assert.deepEqual(result.missing, [], `lost ${result.missing.length} of ${result.sent} packets during the outage`);
    await waitFor('registry whole on every node', 10_000, async () => {
      const lists = await Promise.all(live.map(livePeers));
      return lists.every((l, i) => l.length === live.length - 1 && !l.includes(live[i]!.name));
    });
    for (const n of live) {
      const pubsubLines = (await n.metrics())
        .split('\n')
        .filter((l) => l.startsWith('derpmesh_pubsub'))
        .join(', ');
      assert.match(
        pubsubLines,
        /derpmesh_pubsub_reconnects_total [1-9]/,
        `${n.name}: ${pubsubLines}\n${n
          .output()
          .split('\n')
          .filter((l) => /pubsub|database/.test(l))
          .join('\n')}`,
      );
    }

    const db = new pg.Client({ connectionString: postgres.url });
    await db.connect();
    await db.query(`DELETE FROM replicas WHERE hostname = $1`, [n2.name]);
    await waitFor(
      'the deleted row re-inserted',
      5_000,
      async () => (await db.query(`SELECT 1 FROM replicas WHERE hostname = $1 AND stopped_at IS NULL`, [n2.name])).rowCount === 1,
    );
    await db.end();
    await waitFor('n1 listing n2 again', 5_000, async () => (await livePeers(n1)).includes('n2'));
  });
});
