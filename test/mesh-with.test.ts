// Static mesh peers (`--mesh-with`): how the option reads, and a derpmesh node meshed both ways with
// Tailscale's own `derper` (built from the Go module proxy by bench/derper.sh), the migration path
// between the two: a client on each reaches a client on the other, over plain HTTP and over TLS.
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { after, describe, test } from 'node:test';

import pg from 'pg';

import { DerpClient } from '../src/client/index.js';
import { loadConfig } from '../src/config.js';
import { DerpmeshError } from '../src/errors.js';
import { startNodeProcess, waitFor } from './helpers/cluster.js';
import { freePort, startPostgres } from './helpers/postgres.js';
import { cachedDerper, startDerper } from './helpers/derper.js';
import { hasOpenssl, makePrivateCa } from './helpers/certs.js';
import { goAvailable } from './helpers/tools.js';
import { deliver } from './helpers/traffic.js';

describe('--mesh-with / DERPMESH_MESH_WITH', () => {
  const meshWith = (value: string) => loadConfig(['--mesh-with', value], {}).meshWith;

  test('relay URLs, and bare host names as derper reads them (https://host)', () => {
    assert.deepEqual(loadConfig([], {}).meshWith, []);
    assert.deepEqual(meshWith('http://10.0.0.2:3000, https://derp2.example.com/ ,derp3.example.com,derp4.example.com:8443'), [
      'http://10.0.0.2:3000',
      'https://derp2.example.com',
      'https://derp3.example.com',
      'https://derp4.example.com:8443',
    ]);
    assert.deepEqual(meshWith('https://derp1.example.com/derp,http://[::1]:3340,derp5.example.com:443,'), [
      'https://derp1.example.com',
      'http://[::1]:3340',
      'https://derp5.example.com',
    ]);
    assert.deepEqual(loadConfig([], { DERPMESH_MESH_WITH: 'derp1.example.com' }).meshWith, ['https://derp1.example.com']);
    assert.deepEqual(loadConfig(['--mesh-with=http://a:1'], { DERPMESH_MESH_WITH: 'derp1.example.com' }).meshWith, ['http://a:1']);
  });

  test('bad entries stop the node with a message naming the option and the entry', () => {
    const rejects = (value: string, message: RegExp) =>
      assert.throws(
        () => meshWith(value),
        (err: unknown) => {
          assert.ok(err instanceof DerpmeshError, String(err));
          assert.equal(err.code, 'DERPMESH_ERR_CONFIG');
          assert.match(err.message, /--mesh-with \/ DERPMESH_MESH_WITH/);
          assert.match(err.message, message);
          return true;
        },
      );
    rejects('derp1.example.com,ftp://derp2.example.com', /must use http or https, got ftp/);
    rejects('derp1.example.com/10.0.0.1', /derper's host\/dial-host form is not supported.*https:\/\/10\.0\.0\.1/);
    rejects('not a host', /"not a host" must be a host name/);
    rejects('derp1.example.com:99999', /must be a host name/);
    rejects('https://user:secret@derp1.example.com', /without user info, query or fragment/);
    rejects('http://derp1.example.com/?x=1', /without user info, query or fragment/);
  });
});

// ─── against derper ────────────────────────────────────────────────────────────

const derperScript = fileURLToPath(new URL('../../bench/derper.sh', import.meta.url));

const canRunDerper = goAvailable() || existsSync(cachedDerper);
if (!canRunDerper) console.log(`# SKIP derpmesh meshed with derper: Go is not installed and there is no ${cachedDerper}`);

describe('derpmesh and derper meshed both ways', { timeout: 600_000, skip: !canRunDerper && 'Go is not installed' }, () => {
  let derperBinary = '';
  const cleanups: (() => Promise<void> | void)[] = [];

  after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
  });

  test('builds derper', { timeout: 1_500_000 }, () => {
    derperBinary = execFileSync('bash', [derperScript], {
      encoding: 'utf8',
      timeout: 1_400_000,
      stdio: ['ignore', 'pipe', 'inherit'],
    }).trim();
    assert.ok(derperBinary.endsWith('derper'), derperBinary);
  });

  // Plain HTTP, then HTTPS on both relays with certificates from one private CA (the production
  // path): derpmesh trusts the CA for its mesh dials (DERPMESH_MESH_CA_FILE), derper through
  // SSL_CERT_FILE, and the clients verify it.
  for (const tls of [false, true]) {
    test(
      `a client on each reaches a client on the other, both directions (${tls ? 'TLS on both, private CA' : 'plain HTTP'})`,
      { timeout: 120_000, skip: tls && !hasOpenssl() && 'no openssl to make certificates' },
      async () => {
        const ca = tls ? makePrivateCa() : undefined;
        if (ca) cleanups.push(() => rmSync(ca.dir, { recursive: true, force: true }));
        const scheme = tls ? 'https' : 'http';
        const postgres = await startPostgres();
        cleanups.push(() => postgres.stop());
        const [nodePort, derperPort] = [await freePort(), await freePort()];
        const derperUrl = `${scheme}://127.0.0.1:${derperPort}`;
        // The same list on both sides, each relay's own address included (each recognizes itself by
        // its server key). derper reads bare host names (and dials https://<host>/derp, or plain HTTP
        // without certificates: test/helpers/derper.ts); derpmesh takes URLs.
        const node = await startNodeProcess({
          name: 'mesh-with-node',
          postgresUrl: postgres.url,
          port: nodePort,
          tls: ca,
          env: { DERPMESH_MESH_WITH: `${derperUrl},${scheme}://127.0.0.1:${nodePort}` },
        });
        cleanups.push(() => node.kill9());
        await node.started;
        assert.ok(node.url.startsWith(`${scheme}://`));

        // The cluster's mesh key lives in Postgres: 64 hex characters, what derper's --mesh-psk-file takes.
        const db = new pg.Client({ connectionString: postgres.url });
        await db.connect();
        const { rows } = await db.query<{ value: string }>("SELECT value FROM site_config WHERE key = 'mesh_key'");
        await db.end();
        const meshKey = rows[0]!.value;
        assert.match(meshKey, /^[0-9a-f]{64}$/);

        const derper = await startDerper({
          binary: derperBinary,
          port: derperPort,
          meshKey,
          meshWith: [`127.0.0.1:${nodePort}`, `127.0.0.1:${derperPort}`],
          tls: ca,
        });
        cleanups.push(() => derper.stop());
        assert.equal(derper.url, derperUrl);

        // derpmesh's link to derper: the node's mesh health is OK once every link is connected (or itself).
        await waitFor('the node to be meshed with derper', 30_000, async () => {
          const health = await node.health();
          const mesh = health.nodes[0]?.sections.mesh;
          return mesh?.code === 'MESH_OK' && mesh.message.includes('meshed with 1 peer relays') ? mesh : undefined;
        }).catch((err: Error) => {
          throw new Error(`${err.message}\nnode:\n${node.output()}\nderper:\n${derper.output()}`);
        });

        const clientTls = ca && { ca: readFileSync(ca.caFile) };
        for (const [from, to] of [
          [node.url, derperUrl],
          [derperUrl, node.url],
        ]) {
          const a = await DerpClient.connect({ url: from!, tls: clientTls });
          const b = await DerpClient.connect({ url: to!, tls: clientTls });
          cleanups.push(() =>
            Promise.all([a.close(), b.close()]).then(
              () => {},
              () => {},
            ),
          );
          // a → b goes through a's relay's link to b's relay, b → a through the other link.
          await deliver(a, b, 15_000).catch((err: Error) => {
            throw new Error(`${from} → ${to}: ${err.message}\nderper:\n${derper.output()}`);
          });
          await deliver(b, a, 15_000).catch((err: Error) => {
            throw new Error(`${to} → ${from}: ${err.message}\nderper:\n${derper.output()}`);
          });
        }
      },
    );
  }
});
