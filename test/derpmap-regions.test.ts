// Multi-region /derpmap: real node processes in two regions on one real Postgres. Every node's map
// lists every region with a live replica, each region's node(s) being the access URL(s) its
// replicas announce, computed per request (a region appears and disappears with its replicas).
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { freePort, startPostgres, type TestPostgres } from './helpers/postgres.js';

const HEARTBEAT_MS = 500;
const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));

interface MapNode {
  Name: string;
  RegionID: number;
  HostName: string;
  DERPPort: number;
  STUNPort: number;
  STUNOnly?: boolean;
  ForceHTTP?: boolean;
}
interface MapRegion {
  RegionID: number;
  RegionCode: string;
  RegionName: string;
  Nodes: MapNode[];
}
type DerpMap = { Regions: Record<string, MapRegion> };

async function derpMap(n: NodeProcess): Promise<DerpMap> {
  const res = await fetch(`${n.url}/derpmap`, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200);
  return (await res.json()) as DerpMap;
}

/** Region id → "host:port/http|https" of each node, in map order. */
function summary(map: DerpMap): Record<string, string[]> {
  return Object.fromEntries(
    Object.entries(map.Regions).map(([id, r]) => [id, r.Nodes.map((n) => `${n.HostName}:${n.DERPPort}/${n.ForceHTTP ? 'http' : 'https'}`)]),
  );
}

describe('multi-region /derpmap', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];

  const node = async (name: string, regionId: number, accessUrl: string, env: NodeJS.ProcessEnv = {}) => {
    const n = await startNodeProcess({
      name,
      postgresUrl: postgres.url,
      heartbeatMs: HEARTBEAT_MS,
      env: { CODER_DERP_SERVER_REGION_ID: String(regionId), CODER_ACCESS_URL: accessUrl, DERPMESH_STUN_ADDRESS: 'disable', ...env },
    });
    nodes.push(n);
    await n.started;
    return n;
  };

  before(async () => {
    postgres = await startPostgres();
  });
  after(async () => {
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('two regions: every node lists both, one node per distinct access URL; regions come and go with their replicas', async () => {
    const stunPort = await freePort();
    const eu1 = await node('eu-1', 1, 'https://derp-eu.example.com');
    const eu2 = await node('eu-2', 1, 'https://derp-eu.example.com');
    const us1 = await node('us-1', 2, 'http://derp-us.example.com:8080', { DERPMESH_STUN_ADDRESS: `127.0.0.1:${stunPort}` });

    const expected = { '1': ['derp-eu.example.com:443/https'], '2': ['derp-us.example.com:8080/http'] };
    for (const n of [eu1, eu2, us1]) {
      await waitFor(`${n.name}'s /derpmap listing regions 1 and 2`, 10_000, async () => {
        return JSON.stringify(summary(await derpMap(n))) === JSON.stringify(expected);
      });
    }
    // The full tailcfg.DERPMap shape, as eu-1 sees the other region (its STUN port from Postgres).
    const map = await derpMap(eu1);
    assert.deepEqual(map.Regions['2'], {
      RegionID: 2,
      RegionCode: 'derpmesh-2',
      RegionName: 'derpmesh region 2',
      Nodes: [{ Name: '2a', RegionID: 2, HostName: 'derp-us.example.com', DERPPort: 8080, STUNPort: stunPort, ForceHTTP: true }],
    });
    assert.deepEqual(map.Regions['1']!.Nodes, [
      { Name: '1a', RegionID: 1, HostName: 'derp-eu.example.com', DERPPort: 443, STUNPort: -1, ForceHTTP: false },
    ]);
    // Every node serves the same map.
    assert.deepEqual(await derpMap(us1), map);
    assert.deepEqual(await derpMap(eu2), map);

    // derpmesh ping checks pairs within a region only (regions do not mesh): eu-1 <-> eu-2.
    await waitFor('eu-1 and eu-2 meshed', 10_000, async () => {
      const h = await eu1.health();
      return h.nodes.find((x) => x.hostname === 'eu-1')?.sections.mesh.message.includes('meshed with 1 peer');
    });
    const ping = await new Promise<{ code: number; stdout: string }>((resolve) => {
      execFile(process.execPath, [cli, 'ping', '--url', us1.url, '--json'], { timeout: 60_000 }, (err, stdout) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout }),
      );
    });
    assert.equal(ping.code, 0, ping.stdout);
    const report = JSON.parse(ping.stdout) as {
      nodes: { name: string; regionId: number }[];
      pairs: { from: string; to: string; ok: boolean }[];
    };
    assert.deepEqual(report.nodes.map((n) => `${n.name}@${n.regionId}`).sort(), ['eu-1@1', 'eu-2@1', 'us-1@2']);
    assert.deepEqual(report.pairs.map((p) => `${p.from}>${p.to}:${p.ok}`).sort(), ['eu-1>eu-2:true', 'eu-2>eu-1:true']);

    // A third replica of region 1 behind another access URL: region 1 gets a second node.
    const eu3 = await node('eu-3', 1, 'https://derp-eu-b.example.com:8443');
    const two = { '1': ['derp-eu-b.example.com:8443/https', 'derp-eu.example.com:443/https'], '2': ['derp-us.example.com:8080/http'] };
    for (const n of [eu1, us1]) {
      await waitFor(
        `${n.name} listing eu-3's access URL`,
        10_000,
        async () => JSON.stringify(summary(await derpMap(n))) === JSON.stringify(two),
      );
    }
    assert.deepEqual(
      (await derpMap(us1)).Regions['1']!.Nodes.map((n) => n.Name),
      ['1a', '1b'],
    );

    // kill -9: the replica goes stale (3 heartbeats) and its access URL leaves the map.
    await eu3.kill9();
    const staleGone = await waitFor('eu-3 dropped from the map after going stale', 10_000, async () => {
      return JSON.stringify(summary(await derpMap(us1))) === JSON.stringify(expected);
    });
    assert.ok(staleGone.ms <= 3 * HEARTBEAT_MS + 2_000, `took ${staleGone.ms} ms`);

    // The only node of region 2 stops: region 2 disappears from the other nodes' maps.
    assert.equal(await us1.stop(), 0);
    const gone = await waitFor('region 2 gone from eu-1 and eu-2', 10_000, async () => {
      const maps = await Promise.all([eu1, eu2].map(derpMap));
      return maps.every((m) => JSON.stringify(Object.keys(m.Regions)) === '["1"]');
    });
    assert.ok(gone.ms <= 2_000, `a graceful stop is seen at once (pubsub); took ${gone.ms} ms`);

    // It comes back: the region reappears.
    const us2 = await node('us-2', 2, 'http://derp-us.example.com:8080');
    await waitFor('region 2 back in eu-1', 10_000, async () => JSON.stringify(summary(await derpMap(eu1))) === JSON.stringify(expected));
    await Promise.all([eu1.stop(), eu2.stop(), us2.stop()]);
  });

  test('STUN-only regions are numbered after the highest relay region; a custom map is served as it is', async () => {
    const r5 = await node('r5', 5, 'https://r5.example.com', { CODER_DERP_SERVER_STUN_ADDRESSES: 'stun.example.com:3478' });
    const r7 = await node('r7', 7, 'https://r7.example.com');
    await waitFor('r5 listing regions 5, 7 and the STUN region 8', 10_000, async () => {
      const m = await derpMap(r5);
      return JSON.stringify(Object.keys(m.Regions).sort()) === '["5","7","8"]';
    });
    const stun = (await derpMap(r5)).Regions['8']!;
    assert.equal(stun.Nodes[0]!.STUNOnly, true);
    assert.equal(stun.Nodes[0]!.HostName, 'stun.example.com');
    assert.deepEqual(Object.keys((await derpMap(r7)).Regions).sort(), ['5', '7'], 'r7 announces no STUN servers');

    // A node with a custom map (custom relays mode) serves that map, whatever Postgres lists.
    const dir = mkdtempSync(join(tmpdir(), 'derpmap-custom-'));
    const custom = { Regions: { '900': { RegionID: 900, RegionCode: 'custom', RegionName: 'custom relays', Nodes: [] } } };
    writeFileSync(join(dir, 'map.json'), JSON.stringify(custom));
    const c = await node('custom', 5, 'https://custom.example.com', { CODER_DERP_CONFIG_PATH: join(dir, 'map.json') });
    assert.deepEqual(await derpMap(c), custom);
    // ... and announces no access URL: the other nodes' maps do not list it.
    await new Promise((r) => setTimeout(r, 2 * HEARTBEAT_MS));
    assert.deepEqual(
      (await derpMap(r7)).Regions['5']!.Nodes.map((n) => n.HostName),
      ['r5.example.com'],
    );
    await Promise.all([r5.stop(), r7.stop(), c.stop()]);
  });
});
