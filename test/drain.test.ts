// Readiness during a graceful stop (issue 13, point 4): a real node process on a real Postgres. From
// the moment SIGTERM arrives /healthz answers 503 and keeps answering 503 until the process exits (a
// Kubernetes readiness probe sees it), new DERP upgrades are refused with 503, connected clients get
// Restarting, and the process exits 0. With --shutdown-drain-delay the clients keep relaying during
// the delay and get Restarting only after it.
import { strict as assert } from 'node:assert';
import { once } from 'node:events';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect as netConnect } from 'node:net';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { hasOpenssl, makePrivateCa } from './helpers/certs.js';
import { rawClient } from './helpers/frames.js';
import { startNodeProcess, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

interface Probe {
  /** ms since the test's SIGTERM (negative: before it). */
  at: number;
  status: number | string;
  body: string;
}

/** One GET on a new connection (as a kubelet probe does); the status code or the error's code. */
function get(url: string, ca?: Buffer): Promise<{ status: number | string; body: string }> {
  return new Promise((resolve) => {
    const request = url.startsWith('https:') ? httpsRequest : httpRequest;
    const req = request(url, { agent: false, timeout: 2_000, ...(ca ? { ca } : {}) }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', (err: NodeJS.ErrnoException) => resolve({ status: err.code ?? err.message, body }));
    });
    req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })));
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ status: err.code ?? err.message, body: '' }));
    req.end();
  });
}

/** The status line a plain DERP upgrade request gets (raw TCP, no TLS). */
async function derpUpgradeStatus(port: number): Promise<string> {
  const socket = netConnect({ host: '127.0.0.1', port });
  await once(socket, 'connect');
  socket.write('GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n');
  let text = '';
  socket.setEncoding('utf8');
  const deadline = setTimeout(() => socket.destroy(), 3_000);
  for await (const chunk of socket) {
    text += chunk as string;
    if (text.includes('\r\n')) break;
  }
  clearTimeout(deadline);
  socket.destroy();
  return text.split('\r\n')[0] ?? '';
}

/**
 * Sends SIGTERM and polls /healthz on new connections every 10 ms until the process exits; returns
 * every answer, the exit code and when the process exited (ms after SIGTERM).
 */
async function stopWhileProbing(
  node: NodeProcess,
  ca?: Buffer,
  during?: () => Promise<void>,
): Promise<{ probes: Probe[]; code: number | null; exitedAt: number }> {
  const probes: Probe[] = [];
  const exited = once(node.child, 'exit');
  let done = false;
  let exitedAt = 0;
  const sentAt = Date.now();
  node.child.kill('SIGTERM');
  void exited.then(() => {
    exitedAt = Date.now() - sentAt;
    done = true;
  });
  const poll = (async () => {
    // Bounded: the stop ends within its grace (+ drain delay + margin); 30 s is far beyond.
    while (!done && Date.now() - sentAt < 30_000) {
      const at = Date.now() - sentAt;
      const r = await get(`${node.url}/healthz`, ca);
      if (!done) probes.push({ at, ...r });
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await during?.();
  const [code] = (await exited) as [number | null];
  await poll;
  return { probes, code, exitedAt };
}

/** The answers after SIGTERM must be: 200s still in flight, then only 503 (and refusals only at the very end). */
function assertDrainSequence(probes: Probe[], output: string): Probe[] {
  const first503 = probes.findIndex((p) => p.status === 503);
  assert.ok(first503 >= 0, `no 503 from /healthz between SIGTERM and exit: ${JSON.stringify(probes)}\n${output}`);
  const after = probes.slice(first503);
  const ok = after.filter((p) => p.status === 200);
  assert.deepEqual(ok, [], `/healthz answered 200 after it had answered 503`);
  for (const p of probes.slice(0, first503)) assert.equal(p.status, 200, `before the first 503: ${JSON.stringify(p)}`);
  assert.ok(first503 <= 3, `the first 503 came only after ${first503} answers of 200: ${JSON.stringify(probes.slice(0, 5))}`);
  // A connection refused or reset may happen only in the last instants (the port closes just before exit).
  const last503 = probes.map((p) => p.status).lastIndexOf(503);
  const others = after.filter((p, i) => p.status !== 503 && i < last503 - first503);
  assert.deepEqual(others, [], 'between the first and the last 503, every answer is 503');
  for (const p of after.filter((p) => p.status === 503)) assert.match(p.body, /shutting down/);
  return after.filter((p) => p.status === 503);
}

describe('graceful stop: readiness and drain', { timeout: 300_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];

  before(async () => {
    postgres = await startPostgres();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  const start = async (name: string, env: NodeJS.ProcessEnv = {}, tls?: Parameters<typeof startNodeProcess>[0]['tls']) => {
    const n = await startNodeProcess({ name, postgresUrl: postgres.url, env, tls });
    nodes.push(n);
    await n.started;
    return n;
  };
  const client = async (url: string, ca?: Buffer) => {
    const c = await DerpClient.connect({ url, ...(ca ? { tls: { ca } } : {}) });
    clients.push(c);
    return c;
  };

  test('SIGTERM: /healthz 503 until exit, the client gets Restarting, exit 0', async (t) => {
    const n = await start('drain-a', { DERPMESH_SHUTDOWN_GRACE: '3s' });
    assert.equal((await get(`${n.url}/healthz`)).status, 200);
    const c = await client(n.url);
    // A client that stopped reading, with megabytes queued for it: the relay's write to it stalls, so
    // the stop lasts until the stall limit (2 s) closes it, as with a slow client in production.
    const stuck = await rawClient(n.port);
    stuck.socket!.pause();
    const packet = Buffer.alloc(60_000, 7);
    for (let i = 0; i < 300; i++) c.send(stuck.keys.publicKey, packet);
    await new Promise((r) => setTimeout(r, 100));
    let restartingAt = -1;
    const sentAt = Date.now();
    c.once('restarting', () => (restartingAt = Date.now() - sentAt));
    const { probes, code, exitedAt } = await stopWhileProbing(n);
    stuck.destroy();
    assert.equal(code, 0, n.output());
    const drained = assertDrainSequence(probes, n.output());
    assert.ok(restartingAt >= 0, 'the client got no Restarting frame');
    const lastAt = drained[drained.length - 1]!.at;
    assert.ok(exitedAt >= 500, `the stop took only ${exitedAt} ms: the stalled client did not hold it`);
    assert.ok(drained.length >= 5, `only ${drained.length} answers of 503 in ${exitedAt} ms`);
    // 503 before and after the Restarting frames, up to the last instants before the exit.
    assert.ok(lastAt > restartingAt, `last 503 at ${lastAt} ms, Restarting at ${restartingAt} ms`);
    assert.ok(exitedAt - lastAt < 500, `last 503 at ${lastAt} ms, exit at ${exitedAt} ms`);
    t.diagnostic(
      `first 503 at ${drained[0]!.at} ms, Restarting at ${restartingAt} ms, last 503 at ${lastAt} ms, exit at ${exitedAt} ms; ${drained.length} answers of 503 of ${probes.length} probes`,
    );
  });

  test('--shutdown-drain-delay: clients keep relaying and new DERP upgrades get 503 during the delay, then Restarting', async (t) => {
    const n = await start('drain-b', { DERPMESH_SHUTDOWN_DRAIN_DELAY: '1500ms', DERPMESH_SHUTDOWN_GRACE: '2s' });
    const a = await client(n.url);
    const b = await client(n.url);
    await deliver(a, b);
    let restartingAt = -1;
    const sentAt = Date.now();
    a.once('restarting', () => (restartingAt = Date.now() - sentAt));
    let upgrade = '';
    let liveness: number | string = 0;
    let deliveredAt = -1;
    const refused = async () => {
      const line = (await n.metrics()).split('\n').find((l) => l.startsWith('derpmesh_upgrades_total{kind="refused"}'));
      return Number(line?.split(' ')[1]);
    };
    const refusedBefore = await refused();
    let refusedDuring = NaN;
    const { probes, code } = await stopWhileProbing(n, undefined, async () => {
      await new Promise((r) => setTimeout(r, 300));
      upgrade = await derpUpgradeStatus(n.port);
      // /metrics still answers while draining, and counts the refusal.
      refusedDuring = await refused();
      // The Helm chart's liveness probe: it stays 200 while the node drains.
      liveness = (await get(`${n.url}/derp/probe`)).status;
      await deliver(a, b, 1_000);
      deliveredAt = Date.now() - sentAt;
    });
    assert.equal(code, 0, n.output());
    const drained = assertDrainSequence(probes, n.output());
    assert.match(upgrade, /^HTTP\/1\.1 503 /, 'a new DERP upgrade during the drain');
    assert.equal(refusedDuring, refusedBefore + 1, 'the refused upgrade counted in derpmesh_upgrades_total{kind="refused"}');
    assert.equal(liveness, 200, '/derp/probe during the drain');
    assert.ok(deliveredAt > 0 && deliveredAt < 1_500, `a packet between two connected clients arrived at ${deliveredAt} ms`);
    assert.ok(restartingAt >= 1_500, `Restarting came at ${restartingAt} ms, before the 1500 ms drain delay ended`);
    assert.ok(drained[0]!.at < 500, `first 503 at ${drained[0]!.at} ms`);
    assert.match(n.output(), /draining/);
    t.diagnostic(`upgrade during drain: ${upgrade}; packet delivered at ${deliveredAt} ms; Restarting at ${restartingAt} ms`);
  });

  test(
    'with TLS (terminated in the relay core): /healthz over https answers 503 during the drain',
    { skip: !hasOpenssl() && 'no openssl' },
    async () => {
      const ca = makePrivateCa();
      const caPem = readFileSync(ca.caFile);
      const n = await start('drain-tls', { DERPMESH_SHUTDOWN_DRAIN_DELAY: '1s', DERPMESH_SHUTDOWN_GRACE: '2s' }, ca);
      assert.equal((await get(`${n.url}/healthz`, caPem)).status, 200);
      const c = await client(n.url, caPem);
      const restarting = once(c, 'restarting');
      const { probes, code } = await stopWhileProbing(n, caPem);
      await restarting;
      assert.equal(code, 0, n.output());
      const drained = assertDrainSequence(probes, n.output());
      assert.ok(drained.length >= 5, `only ${drained.length} answers of 503`);
    },
  );
});
