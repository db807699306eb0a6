// A cluster serving TLS with certificates from a private CA (DERPMESH_MESH_CA_FILE): the mesh, the
// latency probes and the Health frames agree on whom to trust, and a graceful stop reaches every
// TLS client with a Restarting frame. Real node processes, real Postgres, real TLS.
import { strict as assert } from 'node:assert';
import { readFileSync, rmSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

const HEARTBEAT_MS = 300;

describe('TLS cluster with a private CA', { skip: hasOpenssl() ? false : 'no openssl to make certificates', timeout: 180_000 }, () => {
  let pg: TestPostgres;
  let ca: PrivateCa;
  let caPem: Buffer;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];

  before(async () => {
    ca = makePrivateCa();
    caPem = readFileSync(ca.caFile);
    pg = await startPostgres();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await pg?.stop();
    if (ca) rmSync(ca.dir, { recursive: true, force: true });
  });

  const startPair = async () => {
    const pair = await Promise.all(
      ['tls-a', 'tls-b'].map((name) => startNodeProcess({ name, postgresUrl: pg.url, heartbeatMs: HEARTBEAT_MS, tls: ca })),
    );
    nodes.push(...pair);
    await Promise.all(pair.map((n) => n.started));
    // Both see each other and have probed each other over https a few times.
    await waitFor('each node probed its peer over https', 20_000, async () => {
      const views = await Promise.all(pair.map((n) => n.replicas()));
      return views.every((v) => {
        const peer = v.find((r) => !r.self && r.state === 'live');
        return peer !== undefined && (peer.latency_from_here_ms !== undefined || peer.unreachable_from_here !== undefined);
      });
    });
    await new Promise((r) => setTimeout(r, 3 * HEARTBEAT_MS));
    return pair as [NodeProcess, NodeProcess];
  };

  test('mesh links and latency probes trust the private CA; no client receives a Health frame', async () => {
    const [a, b] = await startPair();
    const problems: string[] = [];
    const connect = async (node: NodeProcess, transport: 'tcp' | 'websocket') => {
      const c = await DerpClient.connect({ url: node.url, transport, tls: { ca: caPem } });
      clients.push(c);
      c.on('health', (p) => {
        if (p !== '') problems.push(`${node.name}/${transport}: ${p}`);
      });
      return c;
    };
    const ca1 = await connect(a, 'tcp');
    const cb1 = await connect(b, 'tcp');
    const cb2 = await connect(b, 'websocket');
    await deliver(ca1, cb1, 10_000);
    await deliver(cb1, ca1, 10_000);
    await deliver(cb2, ca1, 10_000);
    // A few more heartbeats: the Health frame is refreshed every heartbeat.
    await new Promise((r) => setTimeout(r, 4 * HEARTBEAT_MS));
    assert.deepEqual(problems, [], 'no Health frame with a problem');
    for (const node of [a, b]) {
      const replicas = await node.replicas();
      assert.ok(Array.isArray(replicas), 'the replicas API answers a bare array');
      for (const r of replicas) {
        assert.equal(r.error, '', `${node.name} reports ${r.hostname}: ${r.error}`);
        if (!r.self) {
          assert.equal(r.unreachable_from_here, undefined, `${node.name} could not probe ${r.hostname}`);
          assert.equal(typeof r.latency_from_here_ms, 'number');
        }
      }
      const health = await node.health();
      for (const n of health.nodes) {
        assert.notEqual(n.sections.mesh?.code, 'MESH_PEER_UNREACHABLE', `${n.hostname}: ${n.sections.mesh?.message}`);
        assert.equal(n.sections.mesh?.severity, 'ok', `${n.hostname}: ${JSON.stringify(n.sections.mesh)}`);
      }
    }
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await Promise.all(nodes.splice(0).map((n) => n.stop()));
  });

  test('SIGTERM to both TLS nodes at once: every client (TCP and WebSocket) gets Restarting, both exit within the grace', async () => {
    const [a, b] = await startPair();
    const restarted = new Set<string>();
    const connect = async (node: NodeProcess, transport: 'tcp' | 'websocket') => {
      const c = await DerpClient.connect({ url: node.url, transport, tls: { ca: caPem } });
      clients.push(c);
      c.on('restarting', () => restarted.add(`${node.name}/${transport}`));
      return c;
    };
    const conns = [await connect(a, 'tcp'), await connect(a, 'websocket'), await connect(b, 'tcp'), await connect(b, 'websocket')];
    await deliver(conns[0]!, conns[2]!, 10_000);
    const stoppedAt = Date.now();
    // The helper's nodes run with DERPMESH_SHUTDOWN_GRACE=2s.
    const codes = await Promise.race([
      Promise.all([a.stop(), b.stop()]),
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error(`TLS nodes still running 6 s after SIGTERM:\n${a.output()}\n${b.output()}`)), 6_000).unref(),
      ),
    ]);
    console.log(`both TLS nodes exited ${Date.now() - stoppedAt} ms after SIGTERM`);
    assert.deepEqual(codes, [0, 0]);
    await waitFor('every client got Restarting', 2_000, () => restarted.size === 4).catch(() => {
      throw new Error(`Restarting reached only ${[...restarted].join(', ')}`);
    });
    nodes.splice(0);
  });
});
