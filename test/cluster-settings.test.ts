// Cluster settings: `derpmesh config set` writes a per-client rate limit or the admission URL to
// Postgres and every node of a 3-node cluster applies it live. Real node processes, real Postgres,
// a real HTTP admission endpoint, real traffic from the native load generator (throughput measured
// at the receivers).
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';

import { runLoad } from '../src/bench.js';
import { DerpClient } from '../src/client/index.js';
import { generatePrivateKey, publicKeyOf } from '../src/client/keys.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { getUrl, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const run = promisify(execFile);

/** What one frame of a 1400-byte packet costs in the bucket: header, destination key, packet. */
const FRAME_BYTES = 5 + 32 + 1400;
const LIMIT = 400_000;

interface SettingView {
  name: string;
  value: number | string | boolean;
  source: string;
}

describe('cluster settings in Postgres: per-client rate limit and admission, live on every node', { timeout: 240_000 }, () => {
  let pg: TestPostgres;
  let ca: PrivateCa | undefined;
  const nodes: NodeProcess[] = [];
  const settingsOf = async (node: NodeProcess): Promise<SettingView[]> => {
    const res = await getUrl(`${node.url}/api/v2/settings`, ca ? readFileSync(ca.caFile) : undefined);
    return (await res.json()) as SettingView[];
  };

  const config = (...args: string[]) => run(process.execPath, [cli, 'config', ...args, '--postgres-url', pg.url], { timeout: 30_000 });

  before(async () => {
    pg = await startPostgres();
    ca = hasOpenssl() ? makePrivateCa() : undefined;
    // Two plain nodes and, where certificates can be made, a TLS one: the limit holds on both paths.
    const started = await Promise.all([
      startNodeProcess({ name: 'rl-a', postgresUrl: pg.url }),
      startNodeProcess({ name: 'rl-b', postgresUrl: pg.url }),
      startNodeProcess({ name: 'rl-c', postgresUrl: pg.url, tls: ca }),
    ]);
    nodes.push(...started);
    await Promise.all(nodes.map((n) => n.started));
    await waitFor('the three nodes see each other', 20_000, async () => {
      const views = await Promise.all(nodes.map((n) => n.replicas()));
      return views.every((v) => v.filter((r) => r.state === 'live').length === 3);
    });
  });
  after(async () => {
    await Promise.all(nodes.map((n) => n.kill9()));
    await pg?.stop();
    if (ca) rmSync(ca.dir, { recursive: true, force: true });
  });

  test('a limit set in Postgres is in force on all three nodes within 1 s', async () => {
    for (const n of nodes) {
      const rate = (await settingsOf(n)).find((s) => s.name === 'client-rate-limit');
      assert.deepEqual(rate, { name: 'client-rate-limit', value: 0, source: 'node' }, `${n.name} starts without a limit`);
    }
    const cliStart = Date.now();
    const { stdout } = await config('set', 'client-rate-limit', '400KB');
    assert.match(stdout, /client-rate-limit = 400000/);
    // The change is committed just before the command returns: time from there.
    const setAt = Date.now();
    const seen = await Promise.all(
      nodes.map(async (n) => {
        for (;;) {
          const rate = (await settingsOf(n)).find((s) => s.name === 'client-rate-limit');
          if (rate?.value === LIMIT && rate.source === 'postgres') return Date.now() - setAt;
          if (Date.now() - setAt > 5_000) return Infinity;
          await new Promise((r) => setTimeout(r, 25));
        }
      }),
    );
    console.log(
      `# limit in force ${seen.map((ms) => `${ms} ms`).join(', ')} after \`derpmesh config set\` returned (it ran ${setAt - cliStart} ms)`,
    );
    for (const [i, ms] of seen.entries()) assert.ok(ms < 1_000, `${nodes[i]!.name} applied the limit after ${ms} ms`);

    // A client connecting now is told the limit in ServerInfo, as derper tells it.
    const client = await DerpClient.connect({ url: nodes[0]!.url });
    try {
      assert.equal(client.serverInfo?.tokenBucketBytesPerSecond, LIMIT);
      assert.equal(client.serverInfo?.tokenBucketBytesBurst, 65_573, 'burst raised to one largest frame');
    } finally {
      await client.close();
    }
  });

  test('a limited sender gets its limit (±10 %) while a paced bystander keeps its rate, plain and TLS', async () => {
    const caPem = ca ? readFileSync(ca.caFile) : undefined;
    for (const node of ca ? [nodes[0]!, nodes[2]!] : [nodes[0]!]) {
      const opts = { url: node.url, pairs: 1, packetSize: 1400, durationMs: 3_000, warmupMs: 1_000, caPem };
      // Unpaced sender, and a bystander paced at about half the limit, at the same time.
      const [limited, bystander] = await Promise.all([runLoad(opts), runLoad({ ...opts, ratePerPair: 140 })]);
      const limitedBytes = limited.packetsPerSec * FRAME_BYTES;
      console.log(
        `# ${node.url}: limited sender ${Math.round(limitedBytes)} B/s (limit ${LIMIT}), bystander ${bystander.packetsPerSec.toFixed(1)} pkt/s, loss ${(bystander.lossRatio * 100).toFixed(2)} %`,
      );
      assert.ok(Math.abs(limitedBytes - LIMIT) <= 0.1 * LIMIT, `limited sender at ${Math.round(limitedBytes)} B/s, limit ${LIMIT}`);
      assert.ok(Math.abs(bystander.packetsPerSec - 140) <= 14, `bystander at ${bystander.packetsPerSec} pkt/s, paced at 140`);
      assert.ok(bystander.lossRatio < 0.01, `bystander lost ${bystander.lossRatio}`);
    }
  });

  test('mesh links are exempt: three limited senders on one node reach receivers on another at 3× the limit', async () => {
    const report = await runLoad({ url: nodes[0]!.url, receiverUrl: nodes[1]!.url, pairs: 3, durationMs: 3_000, warmupMs: 1_000 });
    const bytes = report.packetsPerSec * FRAME_BYTES;
    console.log(`# across the mesh: ${Math.round(bytes)} B/s for 3 senders limited to ${LIMIT} B/s each`);
    assert.ok(bytes >= 0.9 * 3 * LIMIT, `${Math.round(bytes)} B/s crossed the mesh link`);
    assert.ok(bytes <= 1.1 * 3 * LIMIT, `${Math.round(bytes)} B/s: the senders were limited`);
  });

  test('unset: the nodes go back to their own flags (no limit)', async () => {
    const { stdout } = await config('unset', 'client-rate-limit');
    assert.match(stdout, /unset/);
    await waitFor('every node is back to its own value', 5_000, async () => {
      const views = await Promise.all(nodes.map(settingsOf));
      return views.every((v) => v.find((s) => s.name === 'client-rate-limit')?.source === 'node');
    });
    const report = await runLoad({ url: nodes[0]!.url, pairs: 1, durationMs: 2_000, warmupMs: 500 });
    assert.ok(report.packetsPerSec * FRAME_BYTES > 5 * LIMIT, `unlimited again: ${report.packetsPerSec} pkt/s`);
  });

  test('bad values are refused with the reason, before the database is touched', async () => {
    await assert.rejects(config('set', 'client-rate-limit', 'fast'), (err: Error & { stderr?: string }) => {
      assert.match(err.stderr ?? '', /client-rate-limit must be bytes per second/);
      return true;
    });
    await assert.rejects(config('set', 'client-speed', '1'), (err: Error & { stderr?: string }) => {
      assert.match(err.stderr ?? '', /unknown setting "client-speed"; settings: client-rate-limit, client-rate-burst/);
      return true;
    });
  });

  test('an admission URL set in Postgres: every node asks it about new clients; unset, none does', async () => {
    const allowed = generatePrivateKey();
    const denied = generatePrivateKey();
    const asked: string[] = [];
    const endpoint: Server = createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        const { NodePublic } = JSON.parse(body) as { NodePublic: string };
        asked.push(NodePublic);
        const allow = NodePublic === `nodekey:${publicKeyOf(allowed).toString('hex')}`;
        res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ Allow: allow }));
      });
    });
    await new Promise<void>((resolve) => endpoint.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(endpoint.address() as AddressInfo).port}/verify`;
    const tls = ca ? { ca: readFileSync(ca.caFile) } : undefined;
    const connect = (node: NodeProcess, privateKey: Buffer) =>
      DerpClient.connect({ url: node.url, privateKey, connectTimeoutMs: 3_000, tls });
    try {
      await config('set', 'verify-client-url', url);
      await waitFor('every node has the admission URL', 5_000, async () => {
        const views = await Promise.all(nodes.map(settingsOf));
        return views.every((v) => v.find((s) => s.name === 'verify-client-url')?.value === url);
      });
      for (const node of nodes) {
        const ok = await connect(node, allowed);
        await ok.close();
        await assert.rejects(connect(node, denied), `${node.name} refuses the denied key`);
      }
      assert.ok(asked.length >= 2, `the endpoint was asked (${asked.length} requests)`);

      await config('unset', 'verify-client-url');
      await waitFor('every node is back to no admission', 5_000, async () => {
        const views = await Promise.all(nodes.map(settingsOf));
        return views.every((v) => v.find((s) => s.name === 'verify-client-url')?.source === 'node');
      });
      const before = asked.length;
      for (const node of nodes) await (await connect(node, denied)).close();
      assert.equal(asked.length, before, 'no node asked the endpoint once the setting was gone');
    } finally {
      await new Promise((r) => endpoint.close(r));
    }
  });

  test(
    'an accept limit set in Postgres is enforced at once; unset, the burst goes through',
    { skip: hasOpenssl() ? false : 'no openssl for the TLS node' },
    async () => {
      // The TLS node: there every connection to the port passes the core's accept limits.
      const node = nodes[2]!;
      const refused = async () => {
        const text = await (await getUrl(`${node.url}/metrics`, readFileSync(ca!.caFile))).text();
        return Number(/^derpmesh_accepts_refused_total\{reason="rate_limit"\} (\d+)/m.exec(text)?.[1] ?? NaN);
      };
      const burst = async (n: number) => {
        const port = Number(new URL(node.url).port);
        await Promise.all(
          Array.from(
            { length: n },
            () =>
              new Promise<void>((resolve) => {
                const socket = connect(port, '127.0.0.1');
                const done = () => {
                  socket.destroy();
                  resolve();
                };
                socket.once('close', done);
                socket.once('error', done);
                setTimeout(done, 500);
              }),
          ),
        );
      };
      await config('set', 'accept-connection-limit', '1');
      await config('set', 'accept-connection-burst', '2');
      await waitFor('the TLS node has the accept limit', 5_000, async () => {
        const v = await settingsOf(node);
        return (
          v.find((s) => s.name === 'accept-connection-limit')?.value === 1 &&
          v.find((s) => s.name === 'accept-connection-burst')?.value === 2
        );
      });
      const before = await refused();
      await burst(20);
      const during = await refused();
      assert.ok(during - before >= 15, `${during - before} of 20 connections refused at 1/s with a burst of 2`);

      await config('unset', 'accept-connection-limit');
      await config('unset', 'accept-connection-burst');
      await waitFor('the TLS node is back to no accept limit', 5_000, async () =>
        (await settingsOf(node)).every((s) => !s.name.startsWith('accept-') || s.source === 'node'),
      );
      // (The peers' probes and mesh links are refused too while the limit holds: count from here.)
      const after = await refused();
      await burst(20);
      assert.equal(await refused(), after, 'no refusal once the limit is unset');
    },
  );
});
