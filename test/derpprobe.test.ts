// Tailscale's own prober, `derpprobe` (tailscale.com/cmd/derpprobe, built from the Go module proxy by
// bench/derper.sh), against a 3-node cluster, reading the cluster's own /derpmap: every node's
// certificate, and a packet through every ordered pair of nodes (the mesh) and through each node
// alone. Over HTTPS with a private CA: derpprobe probes TLS nodes only (its DERP clients fail with
// "no TLS state" on plain HTTP). A node in the map that does not answer makes it fail, naming that
// node's probes only.
import { strict as assert } from 'node:assert';
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, describe, test } from 'node:test';

import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { getUrl, livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { cachedDerper } from './helpers/derper.js';
import { freePort, startPostgres, type TestPostgres } from './helpers/postgres.js';
import { goAvailable } from './helpers/tools.js';

const derperScript = fileURLToPath(new URL('../../bench/derper.sh', import.meta.url));
const cachedDerpprobe = join(cachedDerper, '..', 'derpprobe');
const canRun = goAvailable() || existsSync(cachedDerpprobe);

interface DerpMap {
  Regions: Record<
    string,
    { RegionID: number; RegionCode: string; Nodes: { Name: string; HostName: string; DERPPort: number; ForceHTTP?: boolean }[] }
  >;
}

interface ProbeRun {
  code: number | null;
  good: string[];
  bad: string[];
  output: string;
}

/** `derpprobe -once` (every probe once, then exit 1 if any failed) with the map at `mapUrl`. */
function derpprobe(binary: string, mapUrl: string, ca: PrivateCa): Promise<ProbeRun> {
  const args = ['-once', '-spread=false', '-derp-map', mapUrl, '-stun-interval', '0'];
  // Go on Linux takes its roots from SSL_CERT_FILE: the cluster's CA, for the map, the TLS probes and the DERP clients.
  const env = { ...process.env, SSL_CERT_FILE: ca.caFile };
  return new Promise((resolve) => {
    execFile(binary, args, { env, timeout: 120_000 }, (err, stdout, stderr) => {
      const output = stdout + stderr;
      const lines = (tag: string) => [...output.matchAll(new RegExp(`${tag}: (.*)$`, 'gm'))].map((m) => m[1]!);
      const code = err ? ((err as { code?: number }).code ?? null) : 0;
      resolve({ code: typeof code === 'number' ? code : null, good: lines('good'), bad: lines('bad'), output });
    });
  });
}

describe(
  'derpprobe (Tailscale) against a 3-node cluster, from its /derpmap',
  { timeout: 900_000, skip: !canRun && 'Go is not installed' },
  () => {
    let binary = '';
    const cleanups: (() => Promise<unknown> | void)[] = [];
    after(async () => {
      for (const c of cleanups.reverse()) await c();
    });

    test('builds derpprobe', { timeout: 1_500_000 }, () => {
      binary = execFileSync('bash', [derperScript, 'derpprobe'], {
        encoding: 'utf8',
        timeout: 1_400_000,
        stdio: ['ignore', 'pipe', 'inherit'],
      }).trim();
      assert.ok(binary.endsWith('derpprobe'), binary);
    });

    test(
      "every node's certificate, single and mesh probes pass (HTTPS, private CA); an unreachable node fails only its own",
      { timeout: 300_000, skip: !hasOpenssl() && 'no openssl' },
      async () => {
        const ca = makePrivateCa();
        cleanups.push(() => rmSync(ca.dir, { recursive: true, force: true }));
        const postgres: TestPostgres = await startPostgres();
        cleanups.push(() => postgres.stop());
        const nodes: NodeProcess[] = [];
        for (const name of ['p1', 'p2', 'p3']) {
          const port = await freePort();
          // Each node its own access URL (one host name per node, as Tailscale's regions list
          // theirs): the region's map then has the three nodes, and derpprobe meshes each pair. By
          // the name `localhost` (in the certificate too): a node refuses an access URL equal to
          // its relay URL (127.0.0.1), the mistake of meshing through a load balancer.
          const url = `https://localhost:${port}`;
          const n = await startNodeProcess({ name, postgresUrl: postgres.url, port, tls: ca, env: { CODER_ACCESS_URL: url } });
          cleanups.push(() => n.kill9());
          nodes.push(n);
        }
        await Promise.all(nodes.map((n) => n.started));
        await waitFor('every node listing the other two', 20_000, async () =>
          (await Promise.all(nodes.map(livePeers))).every((l) => l.length === 2),
        );
        const mapUrl = `${nodes[0]!.url}/derpmap`;
        const caPem = readFileSync(ca.caFile);
        const { value: map } = await waitFor('/derpmap listing the three nodes', 10_000, async () => {
          const m = (await (await getUrl(mapUrl, caPem)).json()) as DerpMap;
          return Object.values(m.Regions).some((r) => r.Nodes.length === 3) && m;
        });
        const region = Object.values(map.Regions).find((r) => r.Nodes.length === 3)!;
        assert.ok(
          region.Nodes.every((n) => !n.ForceHTTP && n.HostName === 'localhost'),
          JSON.stringify(region.Nodes),
        );

        const run = await derpprobe(binary, mapUrl, ca);
        const names = region.Nodes.map((n) => n.Name);
        const expected = names.flatMap((from) => names.map((to) => `derp/${region.RegionCode}/${from}/${to}/mesh`));
        expected.push(...names.map((n) => `derp/${region.RegionCode}/${n}/tls`));
        assert.equal(run.code, 0, run.output);
        assert.deepEqual(run.bad, [], run.output);
        for (const probe of expected)
          assert.ok(
            run.good.some((g) => g.startsWith(probe)),
            `no good ${probe}:\n${run.output}`,
          );

        // A fourth node in the map where nothing answers: its probes fail, and only its.
        const dir = mkdtempSync(join(tmpdir(), 'derpmesh-derpprobe-'));
        cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
        const dead = { ...region.Nodes[0]!, Name: `${region.RegionID}dead`, DERPPort: await freePort() };
        region.Nodes.push(dead);
        writeFileSync(join(dir, 'map.json'), JSON.stringify(map));
        const failing = await derpprobe(binary, `file://${join(dir, 'map.json')}`, ca);
        assert.equal(failing.code, 1, failing.output);
        assert.ok(failing.bad.length > 0, failing.output);
        assert.ok(
          failing.bad.every((b) => b.includes(dead.Name)),
          `a probe not involving the dead node failed:\n${failing.bad.join('\n')}`,
        );
        for (const probe of expected)
          assert.ok(
            failing.good.some((g) => g.startsWith(probe)),
            `no good ${probe}:\n${failing.output}`,
          );
      },
    );
  },
);
