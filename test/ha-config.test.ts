// HA configuration with real node processes on a real Postgres: a slow peer link, misconfigurations,
// custom relays, the DERP map and the cluster-wide health report. Every test gets its own database.
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import pg from 'pg';

import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startDelayProxy, type DelayProxy } from './helpers/delay-proxy.js';
import { freePort, startPostgres, type TestPostgres } from './helpers/postgres.js';

const HEARTBEAT_MS = 500;
const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));

/** Status of a DERP upgrade request to `url`/derp (101 when a relay takes it). */
function derpUpgradeStatus(url: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(`${url}/derp`, { headers: { Connection: 'Upgrade', Upgrade: 'DERP' }, timeout: 5_000 });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve(res.statusCode ?? 101);
    });
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('timeout', () => req.destroy(new Error('no answer to the upgrade')));
    req.on('error', reject);
    req.end();
  });
}

const lines = (text: string, pattern: RegExp) => text.split('\n').filter((l) => pattern.test(l));

describe('HA configuration', { timeout: 110_000 }, () => {
  let postgres: TestPostgres;
  let admin: pg.Client;
  const nodes: NodeProcess[] = [];
  const proxies: DelayProxy[] = [];
  const dirs: string[] = [];
  let databases = 0;

  /** A fresh, empty database on the shared server, so tests do not see each other's replicas. */
  const database = async () => {
    const name = `cfg_${++databases}`;
    await admin.query(`CREATE DATABASE ${name}`);
    return postgres.url.replace(/\/[^/]+$/, `/${name}`);
  };
  const node = async (name: string, postgresUrl: string, extra: Partial<Parameters<typeof startNodeProcess>[0]> = {}) => {
    const n = await startNodeProcess({ name, postgresUrl, heartbeatMs: HEARTBEAT_MS, ...extra });
    nodes.push(n);
    await n.started;
    return n;
  };

  before(async () => {
    postgres = await startPostgres();
    admin = new pg.Client({ connectionString: postgres.url });
    await admin.connect();
  });
  after(async () => {
    await Promise.all(nodes.map((n) => n.kill9()));
    await Promise.all(proxies.map((p) => p.close()));
    await admin?.end().catch(() => {});
    await postgres?.stop();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  test('slow link to a peer: warning in log, API, health and metrics; cleared when the link is fast again', async () => {
    const db = await database();
    const env = { DERPMESH_LATENCY_THRESHOLD: '50ms' };
    const bPort = await freePort();
    const proxy = await startDelayProxy(bPort);
    proxies.push(proxy);
    const a = await node('slow-a', db, { env });
    const b = await node('slow-b', db, { env, port: bPort, relayUrl: proxy.url });
    await waitFor('slow-a listing slow-b', 5_000, async () => (await livePeers(a)).join() === 'slow-b');

    proxy.setDelay(100);
    const warned = await waitFor('slow-a warning about slow-b', 10 * HEARTBEAT_MS, async () => {
      const entry = (await a.replicas()).find((r) => r.hostname === 'slow-b');
      return entry?.latency_warning ? entry : undefined;
    });
    const entry = warned.value;
    assert.match(entry.latency_warning!, /slow-a/, 'the warning names the node that measured');
    assert.ok(
      entry.latency_from_here_ms! >= 80 && entry.latency_from_here_ms! <= 120,
      `latency_from_here_ms ${entry.latency_from_here_ms} not within 20 % of the injected 100 ms`,
    );
    console.log(`slow-a measured ${entry.latency_from_here_ms!.toFixed(1)} ms to slow-b through the 100 ms proxy`);

    const logged = lines(a.output(), /WARN .*peer relay round trip above threshold/);
    assert.ok(
      logged.some((l) => / peer=slow-b /.test(l) && / rttMs=\d+(\.\d+)?/.test(l) && / thresholdMs=50\b/.test(l)),
      `no warning naming slow-b in slow-a's log:\n${logged.join('\n')}`,
    );

    const health = await a.health();
    const own = health.nodes.find((n) => n.hostname === 'slow-a')!;
    assert.equal(own.sections.mesh!.code, 'MESH_PEER_SLOW', JSON.stringify(own.sections.mesh));
    assert.equal(own.sections.mesh!.severity, 'warning');
    assert.match(own.sections.mesh!.message, /slow-b/);
    assert.notEqual(health.severity, 'ok');

    const metrics = await a.metrics();
    assert.match(
      metrics,
      /^derpmesh_peer_slow\{peer="slow-b",[^}]*\} 1$/m,
      metrics
        .split('\n')
        .filter((l) => /peer_(slow|rtt)/.test(l))
        .join('\n'),
    );
    const seconds = Number(/^derpmesh_peer_rtt_seconds\{peer="slow-b",[^}]*\} (\S+)$/m.exec(metrics)?.[1]);
    assert.ok(seconds >= 0.08 && seconds <= 0.12, `derpmesh_peer_rtt_seconds for slow-b is ${seconds}`);

    // b measures a directly: no warning there.
    const fromB = (await b.replicas()).find((r) => r.hostname === 'slow-a');
    assert.equal(fromB?.latency_warning, undefined, JSON.stringify(fromB));

    proxy.setDelay(0);
    await waitFor('the warning cleared everywhere', 10 * HEARTBEAT_MS, async () => {
      const r = (await a.replicas()).find((x) => x.hostname === 'slow-b');
      const h = (await a.health()).nodes.find((n) => n.hostname === 'slow-a');
      const m = await a.metrics();
      return (
        r !== undefined &&
        r.latency_warning === undefined &&
        h?.sections.mesh?.code === 'MESH_OK' &&
        /^derpmesh_peer_slow\{peer="slow-b",[^}]*\} 0$/m.test(m)
      );
    });
    assert.match(a.output(), /peer relay round trip back under threshold .*peer=slow-b/);
  });

  test('an unreachable peer relay goes into the error column, the API and health', async () => {
    const db = await database();
    const deadPort = await freePort();
    const a = await node('reach-a', db);
    // B advertises a relay URL where nothing listens.
    await node('reach-b', db, { relayUrl: `http://127.0.0.1:${deadPort}` });
    const client = new pg.Client({ connectionString: db });
    await client.connect();
    try {
      const { value: error } = await waitFor('A writing B into its error column', 10_000, async () => {
        const { rows } = await client.query<{ error: string }>(`SELECT error FROM replicas WHERE hostname = 'reach-a'`);
        return rows[0]?.error.includes('failed to reach relay reach-b') ? rows[0].error : undefined;
      });
      assert.match(error, new RegExp(`127\\.0\\.0\\.1:${deadPort}`));
    } finally {
      await client.end();
    }
    const mesh = (await a.health()).nodes.find((n) => n.hostname === 'reach-a')!.sections.mesh!;
    assert.equal(mesh.code, 'MESH_PEER_UNREACHABLE');
    assert.match(mesh.message, /reach-b/);
    const replicas = await a.replicas();
    assert.ok(replicas.find((r) => r.hostname === 'reach-b')?.unreachable_from_here);
  });

  test('relay URL equal to the access URL: refuses to start, exit 2, says why', async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const child = spawn(process.execPath, [cli, 'server'], {
      env: {
        ...process.env,
        CODER_ADDRESS: `127.0.0.1:${port}`,
        CODER_ACCESS_URL: url,
        CODER_DERP_SERVER_RELAY_URL: `${url}/`,
        CODER_PG_CONNECTION_URL: postgres.url,
        DERPMESH_HOSTNAME: 'same-url',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let text = '';
    child.stdout!.on('data', (d: Buffer) => (text += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (text += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
    const [code] = (await once(child, 'exit')) as [number | null];
    clearTimeout(timer);
    assert.equal(code, 2, text);
    assert.match(text, /DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL/);
    assert.match(text, /CODER_DERP_SERVER_RELAY_URL/, 'the message tells which setting to fix');
    assert.doesNotMatch(text, /derpmesh node started/);
  });

  test('a node without a relay URL in a 2-node cluster: MISCONFIGURATION in log, API and health of both nodes', async () => {
    const db = await database();
    const bare = await node('norelay', db, { relayUrl: null });
    const other = await node('withrelay', db);
    await waitFor(
      'both listing each other',
      5_000,
      async () => (await livePeers(bare)).join() === 'withrelay' && (await livePeers(other)).join() === 'norelay',
    );

    const { warnings } = await waitFor("the warning in norelay's API", 10 * HEARTBEAT_MS, async () => {
      const r = await bare.health();
      return r.warnings.some((w) => w.startsWith('RELAY_NO_RELAY_URL')) ? r : undefined;
    }).then((x) => x.value);
    assert.ok(
      warnings.some((w) => /^RELAY_NO_RELAY_URL: .*norelay has no relay URL.*CODER_DERP_SERVER_RELAY_URL/.test(w)),
      warnings.join('\n'),
    );
    await waitFor("the warning in norelay's log", 5 * HEARTBEAT_MS, () =>
      /WARN .*MISCONFIGURATION RELAY_NO_RELAY_URL: .*norelay has no relay URL/.test(bare.output()),
    );
    const own = (await bare.health()).nodes.find((n) => n.hostname === 'norelay')!;
    assert.equal(own.sections.relay!.code, 'RELAY_NO_RELAY_URL', JSON.stringify(own.sections.relay));
    assert.equal(own.sections.relay!.severity, 'warning');

    // The peer complains too: its clients cannot reach norelay's clients.
    const otherWarnings = (await other.health()).warnings;
    assert.ok(
      otherWarnings.some((w) => /^RELAY_NO_RELAY_URL: peer norelay /.test(w)),
      otherWarnings.join('\n'),
    );
    await waitFor("the warning in withrelay's log", 5 * HEARTBEAT_MS, () =>
      /WARN .*MISCONFIGURATION RELAY_NO_RELAY_URL: peer norelay /.test(other.output()),
    );
    const otherHealth = (await other.health()).nodes.find((n) => n.hostname === 'withrelay')!;
    assert.equal(otherHealth.sections.relay!.code, 'RELAY_NO_RELAY_URL', JSON.stringify(otherHealth.sections.relay));
    assert.match(await other.metrics(), /^derpmesh_misconfigurations [1-9]/m);

    // Logged once per change, not at every heartbeat.
    await new Promise((r) => setTimeout(r, 4 * HEARTBEAT_MS));
    assert.equal(lines(bare.output(), /MISCONFIGURATION/).length, 1, lines(bare.output(), /MISCONFIGURATION/).join('\n'));
  });

  /** Writes a custom relay map and returns it with its path. */
  const customMap = () => {
    const dir = mkdtempSync(join(tmpdir(), 'derpmesh-map-'));
    dirs.push(dir);
    const map = {
      Regions: {
        '900': {
          RegionID: 900,
          RegionCode: 'custom',
          RegionName: 'custom relays',
          Nodes: [{ Name: '900a', RegionID: 900, HostName: 'relay.example.net', DERPPort: 443 }],
        },
      },
    };
    const path = join(dir, 'derpmap.json');
    writeFileSync(path, JSON.stringify(map));
    return { map, path };
  };

  test('custom relays: relay URL ignored (said once), no mesh, no /derp, discovery through Postgres, custom /derpmap', async () => {
    const db = await database();
    const { map, path } = customMap();
    // custom-1: embedded relay off, custom map. custom-2: embedded relay off, no map of its own.
    const c1 = await node('custom-1', db, { env: { CODER_DERP_SERVER_ENABLE: 'false', CODER_DERP_CONFIG_PATH: path } });
    const c2 = await node('custom-2', db, { env: { CODER_DERP_SERVER_ENABLE: 'false' } });
    await waitFor(
      'both listing each other through Postgres',
      5_000,
      async () => (await livePeers(c1)).join() === 'custom-2' && (await livePeers(c2)).join() === 'custom-1',
    );
    await new Promise((r) => setTimeout(r, 3 * HEARTBEAT_MS));

    for (const n of [c1, c2]) {
      const ignored = lines(n.output(), /relay URL is ignored/);
      assert.equal(ignored.length, 1, `${n.name} should say once that the relay URL is ignored:\n${n.output()}`);
      assert.match(ignored[0]!, new RegExp(`relayUrl=${n.url}`));

      assert.equal(await derpUpgradeStatus(n.url), 404, `${n.name} must not serve /derp`);
      const metrics = await n.metrics();
      assert.doesNotMatch(metrics, /^derpmesh_mesh_links [1-9]/m, `${n.name} has mesh links`);
      assert.doesNotMatch(metrics, /^derpmesh_peer_(rtt_seconds|reachable|slow)\{/m, `${n.name} probes peer relays`);
      const replicas = await n.replicas();
      const { warnings } = await n.health();
      assert.equal(replicas.length, 2);
      for (const r of replicas) {
        assert.equal(r.relay_address, '', `${r.hostname} registered a relay URL in custom relays mode`);
        assert.equal(r.error, '');
      }
      assert.deepEqual(warnings, [], 'no RELAY_NO_RELAY_URL warning with custom relays');
      const h = (await n.health()).nodes.find((x) => x.hostname === n.name)!;
      assert.equal(h.sections.relay!.code, 'RELAY_DISABLED');
      assert.equal(h.sections.mesh!.code, 'MESH_DISABLED');
    }
    const res = await fetch(`${c1.url}/derpmap`);
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), map);
  });

  test('custom relay map with the embedded relay left on: relay URL ignored (said once), no mesh, custom /derpmap', async () => {
    const db = await database();
    const { map, path } = customMap();
    const env = { CODER_DERP_CONFIG_PATH: path };
    const m1 = await node('mapped-1', db, { env });
    const m2 = await node('mapped-2', db, { env });
    await waitFor(
      'both listing each other through Postgres',
      5_000,
      async () => (await livePeers(m1)).join() === 'mapped-2' && (await livePeers(m2)).join() === 'mapped-1',
    );
    await new Promise((r) => setTimeout(r, 3 * HEARTBEAT_MS));
    for (const n of [m1, m2]) {
      assert.equal(lines(n.output(), /relay URL is ignored/).length, 1, n.output());
      // No relay runs with a custom map, so there are no mesh links at all.
      assert.doesNotMatch(await n.metrics(), /^derpmesh_mesh_links [1-9]/m);
      const replicas = await n.replicas();
      const { warnings } = await n.health();
      assert.deepEqual(
        replicas.map((r) => r.relay_address),
        ['', ''],
      );
      assert.deepEqual(warnings, []);
      assert.equal((await n.health()).nodes.find((x) => x.hostname === n.name)!.sections.mesh!.code, 'MESH_DISABLED');
      assert.deepEqual(await (await fetch(`${n.url}/derpmap`)).json(), map);
    }
  });

  test('custom relay map with the embedded relay left on: /derp is not served either', {}, async () => {
    const db = await database();
    const { path } = customMap();
    const n = await node('mapped-derp', db, { env: { CODER_DERP_CONFIG_PATH: path } });
    assert.equal(await derpUpgradeStatus(n.url), 404);
  });

  test('/derpmap: one embedded region (999) whose node is the access URL', async () => {
    const db = await database();
    const n = await node('mapnode', db, { env: { CODER_ACCESS_URL: 'http://derp.example.com:8443' } });
    const res = await fetch(`${n.url}/derpmap`);
    assert.equal(res.status, 200);
    const body = (await res.json()) as {
      Regions: Record<string, { RegionID: number; Nodes: { RegionID: number; HostName: string; DERPPort: number; ForceHTTP?: boolean }[] }>;
    };
    assert.deepEqual(Object.keys(body.Regions), ['999']);
    const region = body.Regions['999']!;
    assert.equal(region.RegionID, 999);
    assert.equal(region.Nodes.length, 1);
    assert.equal(region.Nodes[0]!.RegionID, 999);
    assert.equal(region.Nodes[0]!.HostName, 'derp.example.com');
    assert.equal(region.Nodes[0]!.DERPPort, 8443);
    assert.equal(region.Nodes[0]!.ForceHTTP, true, 'an http access URL means DERP over plain HTTP');
    await n.stop();
  });

  test('cluster-wide health: any node reports every live node with all four sections', async () => {
    const db = await database();
    const a = await node('health-a', db);
    const b = await node('health-b', db);
    const codes = /^(DB|RELAY|MESH|PUBSUB)_[A-Z_]+$/;
    for (const [here, there] of [
      [a, b],
      [b, a],
    ] as const) {
      const report = await waitFor(`${here.name} reporting ${there.name}'s sections`, 10 * HEARTBEAT_MS, async () => {
        const h = await here.health();
        return h.nodes.find((n) => n.hostname === there.name)?.sections ? h : undefined;
      }).then((x) => x.value);
      assert.deepEqual(report.nodes.map((n) => n.hostname).sort(), [a.name, b.name].sort());
      for (const n of report.nodes) {
        assert.deepEqual(
          Object.keys(n.sections).sort(),
          ['database', 'mesh', 'pubsub', 'relay'],
          `${n.hostname}: ${JSON.stringify(n.sections)}`,
        );
        for (const [name, s] of Object.entries(n.sections)) {
          assert.match(s.code, codes, `${n.hostname}.${name}`);
          assert.match(s.severity, /^(ok|warning|error)$/);
          assert.ok(s.message.length > 0);
        }
        assert.equal(n.sections.relay!.code, 'RELAY_OK', `${n.hostname}: ${JSON.stringify(n.sections.relay)}`);
        assert.equal(n.sections.pubsub!.code, 'PUBSUB_OK');
      }
    }
    // The status page draws the same cluster (from the document embedded in it): both nodes and a
    // latency matrix with Postgres.
    await waitFor('latencies on the status page', 5_000, async () => {
      const page = await (await fetch(`${a.url}/status`)).text();
      return (
        page.includes('"hostname":"health-a"') &&
        page.includes('"hostname":"health-b"') &&
        /"to":\{"[0-9a-f-]{36}":\d/.test(page) &&
        /"databaseMs":\d/.test(page)
      );
    });
    // A stopped node leaves the cluster-wide report.
    assert.equal(await b.stop(), 0, b.output());
    await waitFor('health-a dropping health-b from its report', 5_000, async () =>
      (await a.health()).nodes.every((n) => n.hostname !== 'health-b'),
    );
  });
});
