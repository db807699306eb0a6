// The TLS certificate is reloaded while the node runs — when its files change on disk, and on
// SIGHUP — without dropping a connection; a broken pair is refused and the current one stays.
import { strict as assert } from 'node:assert';
import { copyFileSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:tls';
import { after, describe, test } from 'node:test';
import { X509Certificate } from 'node:crypto';

import { DerpClient } from '../src/client/index.js';
import { hasOpenssl, issueLeaf, makePrivateCa } from './helpers/certs.js';
import { startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

/** The SHA-256 fingerprint of the certificate a new TLS handshake with `port` is given. */
function servedFingerprint(port: number, ca: Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, ca, servername: 'localhost' }, () => {
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      socket.destroy();
      resolve(fingerprint);
    });
    socket.once('error', reject);
  });
}

const fingerprintOf = (file: string) => new X509Certificate(readFileSync(file)).fingerprint256;

/** Replaces `target` by `source` the way deploy tools do: write aside, then rename over. */
function replace(source: string, target: string): void {
  copyFileSync(source, `${target}.new`);
  renameSync(`${target}.new`, target);
}

describe('TLS certificate reload', { skip: hasOpenssl() ? false : 'no openssl to make certificates', timeout: 120_000 }, () => {
  let pg: TestPostgres | undefined;
  let node: NodeProcess | undefined;
  const clients: DerpClient[] = [];
  const ca = hasOpenssl() ? makePrivateCa() : undefined;
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await node?.kill9();
    await pg?.stop();
    if (ca) rmSync(ca.dir, { recursive: true, force: true });
  });

  test('a new pair on disk and on SIGHUP serves new handshakes; live clients stay connected; a bad pair is refused', async () => {
    const caPem = readFileSync(ca!.caFile);
    // The node reads these two paths; the test swaps what they hold.
    const live = { certFile: join(ca!.dir, 'live.pem'), keyFile: join(ca!.dir, 'live.key'), caFile: ca!.caFile };
    copyFileSync(ca!.certFile, live.certFile);
    copyFileSync(ca!.keyFile, live.keyFile);
    const second = issueLeaf(ca!, 'second');
    const third = issueLeaf(ca!, 'third');

    pg = await startPostgres();
    node = await startNodeProcess({ name: 'reload', postgresUrl: pg.url, tls: live });
    await node.started;
    assert.equal(await servedFingerprint(node.port, caPem), fingerprintOf(ca!.certFile));

    const a = await DerpClient.connect({ url: node.url, tls: { ca: caPem } });
    const b = await DerpClient.connect({ url: node.url, transport: 'websocket', tls: { ca: caPem } });
    clients.push(a, b);
    const closed: string[] = [];
    a.on('close', () => closed.push('a'));
    b.on('close', () => closed.push('b'));
    await deliver(a, b);

    // 1. Changed on disk: the key first, then the certificate, as a deploy tool writes them.
    replace(second.keyFile, live.keyFile);
    replace(second.certFile, live.certFile);
    const { ms } = await waitFor(
      'the new certificate served',
      10_000,
      async () => (await servedFingerprint(node!.port, caPem)) === fingerprintOf(second.certFile),
    );
    console.log(`new certificate served ${ms} ms after the files changed`);
    await deliver(a, b);
    await deliver(b, a);

    // 2. A broken pair (the third key with the second certificate): refused, the second pair stays.
    replace(third.keyFile, live.keyFile);
    await waitFor('the refusal logged', 10_000, () => /TLS certificate not reloaded/.test(node!.output()));
    assert.match(node.output(), /does not belong to the certificate/);
    assert.equal(await servedFingerprint(node.port, caPem), fingerprintOf(second.certFile));

    // 3. SIGHUP: the matching certificate is now in place and the signal loads it.
    copyFileSync(third.certFile, live.certFile);
    node.child.kill('SIGHUP');
    await waitFor('the SIGHUP reload', 10_000, async () => (await servedFingerprint(node!.port, caPem)) === fingerprintOf(third.certFile));
    // The signal came right after the copy, before the file watch polls again: the reload is its own.
    assert.match(node.output(), /TLS certificate reloaded.*reason=SIGHUP/);
    assert.ok(node.child.exitCode === null, 'SIGHUP does not stop the node');

    // Nobody was disconnected by any of it, and new clients connect with the new certificate.
    await deliver(a, b);
    await deliver(b, a);
    assert.deepEqual(closed, []);
    const c = await DerpClient.connect({ url: node.url, tls: { ca: caPem } });
    clients.push(c);
    await deliver(c, a);

    // All of it went through TLS terminated in the relay core, none through Node's byte bridge.
    const metrics = await node.metrics();
    const metric = (name: string) =>
      Number(new RegExp(`^derpmesh_${name.replace(/[{}]/g, '\\$&')} (\\d+)$`, 'm').exec(metrics)?.[1] ?? NaN);
    assert.ok(metric('tls_handshakes_total') >= 3, `TLS handshakes in the core: ${metric('tls_handshakes_total')}`);
    assert.equal(metric('upgrades_total{kind="bridged"}'), 0);
  });
});
