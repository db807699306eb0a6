// The load generator over TLS: `runLoad` and `derpmesh bench --ca-file` against a real derpmesh node
// process serving HTTPS with a certificate from a private CA. Packets flow when the CA is given; a
// bad or missing CA fails with a code saying so.
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { runLoad } from '../src/bench.js';
import { DerpmeshError } from '../src/errors.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { startNodeProcess, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));

function isDerpmeshError(code: string, message: RegExp): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof DerpmeshError, `expected a DerpmeshError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  };
}

/** Runs `derpmesh bench` and resolves with its exit code and output (bounded by `timeout`). */
function bench(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, 'bench', ...args], { encoding: 'utf8', timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('load generator over TLS', { skip: hasOpenssl() ? false : 'no openssl to make certificates', timeout: 120_000 }, () => {
  let pg: TestPostgres;
  let ca: PrivateCa;
  let node: NodeProcess;

  before(async () => {
    ca = makePrivateCa();
    pg = await startPostgres();
    node = await startNodeProcess({ name: 'bench-tls', postgresUrl: pg.url, tls: ca });
    await node.started;
  });
  after(async () => {
    await node?.kill9();
    await pg?.stop();
    if (ca) rmSync(ca.dir, { recursive: true, force: true });
  });

  test('runLoad with the private CA: packets flow through the TLS node, unpaced and paced', async () => {
    assert.match(node.url, /^https:\/\/127\.0\.0\.1:\d+$/);
    const caPem = readFileSync(ca.caFile);
    const unpaced = await runLoad({ url: node.url, caPem, pairs: 2, packetSize: 500, durationMs: 500, warmupMs: 200 });
    assert.ok(unpaced.packetsReceived > 100, JSON.stringify(unpaced));
    assert.ok(unpaced.rttSamples > 0, JSON.stringify(unpaced));
    // A rate the relay keeps up with: nothing lost (the CA as a string works too).
    const paced = await runLoad({
      url: node.url,
      caPem: caPem.toString('utf8'),
      pairs: 2,
      packetSize: 500,
      durationMs: 500,
      warmupMs: 200,
      ratePerPair: 500,
    });
    assert.ok(paced.packetsReceived >= 400, JSON.stringify(paced));
    assert.ok(paced.lossRatio < 0.01, JSON.stringify(paced));
  });

  test('without the CA the dial fails with DERPMESH_ERR_LOAD_TLS, naming the untrusted issuer', async () => {
    await assert.rejects(
      runLoad({ url: node.url, pairs: 1, durationMs: 200 }),
      isDerpmeshError(
        'DERPMESH_ERR_LOAD_TLS',
        /^dial (receiver|sender) 0: TLS handshake with 127\.0\.0\.1:\d+ failed: .*UnknownIssuer.*--ca-file/,
      ),
    );
  });

  test('a CA PEM without a certificate is refused before dialing: DERPMESH_ERR_LOAD_OPTIONS', async () => {
    await assert.rejects(
      runLoad({ url: node.url, caPem: 'not a certificate', pairs: 1, durationMs: 200 }),
      isDerpmeshError('DERPMESH_ERR_LOAD_OPTIONS', /private CA PEM holds no/),
    );
  });

  test('derpmesh bench --ca-file measures the TLS node; without it, exits with the TLS error', async () => {
    const ok = await bench([
      '--url',
      node.url,
      '--ca-file',
      ca.caFile,
      '--pairs',
      '1',
      '--duration',
      '300ms',
      '--warmup',
      '100ms',
      '--json',
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    const report = JSON.parse(ok.stdout) as { packetsReceived: number };
    assert.ok(report.packetsReceived > 0, ok.stdout);

    const untrusted = await bench(['--url', node.url, '--pairs', '1', '--duration', '300ms']);
    assert.notEqual(untrusted.code, 0);
    assert.match(untrusted.stderr, /DERPMESH_ERR_LOAD_TLS/);

    const missing = join(ca.dir, 'missing.pem');
    const unreadable = await bench(['--url', node.url, '--ca-file', missing, '--pairs', '1']);
    assert.equal(unreadable.code, 2, unreadable.stderr);
    assert.match(unreadable.stderr, /--ca-file .*missing\.pem.* cannot be read/);

    const empty = join(ca.dir, 'empty.pem');
    writeFileSync(empty, '');
    const noCert = await bench(['--url', node.url, '--ca-file', empty, '--pairs', '1']);
    // Refused before anything connects, as bench, ping and status all read --ca-file.
    assert.equal(noCert.code, 2, noCert.stderr);
    assert.match(noCert.stderr, /--ca-file .*empty\.pem.* holds no PEM certificate/);
  });
});
