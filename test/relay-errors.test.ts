// Errors keep their codes across the seam: the native relay throws errors with a stable `code`,
// the TypeScript side turns them into DerpmeshErrors and adds the operator's hint (the Rust core
// never names a flag or an environment variable).
import { strict as assert } from 'node:assert';
import { readFileSync, rmSync } from 'node:fs';
import { createServer as createNetServer, type AddressInfo } from 'node:net';
import { createServer as createTlsServer } from 'node:tls';
import { test } from 'node:test';

import { runLoad } from '../src/bench.js';
import { DerpmeshError } from '../src/errors.js';
import type { MeshLinkStatus } from '../src/native.js';
import { Relay, withLinkHint } from '../src/relay.js';
import { hasOpenssl, makePrivateCa } from './helpers/certs.js';

const MESH_KEY = 'ab'.repeat(32);

function isDerpmeshError(code: string, message: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof DerpmeshError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  };
}

test('an unusable mesh CA is a DerpmeshError that names the setting', () => {
  assert.throws(
    () => new Relay({ meshCaPem: Buffer.from('/etc/derpmesh/ca.pem') }),
    isDerpmeshError(
      'DERPMESH_ERR_MESH_TLS',
      /^mesh TLS settings: private CA PEM holds no "-----BEGIN CERTIFICATE-----" block — the mesh CA \(DERPMESH_MESH_CA_FILE, --mesh-ca-file/,
    ),
  );
});

test('a private key that is not 32 bytes is an invalid argument', () => {
  assert.throws(
    () => new Relay({ privateKey: Buffer.alloc(31) }),
    isDerpmeshError('DERPMESH_ERR_INVALID_ARGUMENT', /privateKey must be 32 bytes, got 31/),
  );
});

test('the hint is added to an untrusted certificate only', () => {
  const link: MeshLinkStatus = {
    url: 'https://peer.example',
    state: 'backoff',
    lastError: 'TLS handshake with peer.example:443 failed: invalid peer certificate: UnknownIssuer',
    lastErrorCode: 'untrusted-certificate',
    forwarders: 0,
  };
  assert.match(withLinkHint(link).lastError!, /UnknownIssuer — set DERPMESH_MESH_CA_FILE \(--mesh-ca-file; relay option meshCaPem\)/);
  const refused: MeshLinkStatus = { ...link, lastError: 'connect to peer.example:443 failed', lastErrorCode: 'dial' };
  assert.equal(withLinkHint(refused), refused);
});

test(
  'a peer whose certificate no trusted CA signed: the link error names DERPMESH_MESH_CA_FILE',
  { skip: hasOpenssl() ? false : 'no openssl to make certificates' },
  async () => {
    const ca = makePrivateCa();
    const peer = createTlsServer({ cert: readFileSync(ca.certFile), key: readFileSync(ca.keyFile) }, (s) => s.destroy());
    peer.on('tlsClientError', () => {});
    await new Promise<void>((resolve) => peer.listen(0, '127.0.0.1', resolve));
    const url = `https://127.0.0.1:${(peer.address() as AddressInfo).port}`;
    const relay = new Relay({ meshKey: MESH_KEY });
    try {
      relay.setMeshPeers([url]);
      let link: MeshLinkStatus | undefined;
      for (let i = 0; i < 100 && link?.lastErrorCode !== 'untrusted-certificate'; i++) {
        await new Promise((r) => setTimeout(r, 50));
        link = relay.meshLinks().find((l) => l.url === url);
      }
      assert.equal(link?.lastErrorCode, 'untrusted-certificate', JSON.stringify(link));
      assert.match(link!.lastError!, /^TLS handshake with 127\.0\.0\.1:\d+ failed: invalid peer certificate: UnknownIssuer/);
      assert.match(
        link!.lastError!,
        /set DERPMESH_MESH_CA_FILE \(--mesh-ca-file; relay option meshCaPem\) to the CA that signed the peer's certificate$/,
      );
    } finally {
      await relay.close({ graceMs: 100 });
      peer.close();
      rmSync(ca.dir, { recursive: true, force: true });
    }
  },
);

test('the load generator rejects with coded DerpmeshErrors', async () => {
  await assert.rejects(
    runLoad({ url: 'http://127.0.0.1:1', pairs: 0 }),
    isDerpmeshError('DERPMESH_ERR_LOAD_OPTIONS', /^pairs must be at least 1$/),
  );
  const closed = createNetServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const port = (closed.address() as AddressInfo).port;
  await new Promise((resolve) => closed.close(resolve));
  await assert.rejects(
    runLoad({ url: `http://127.0.0.1:${port}`, pairs: 1, durationMs: 100 }),
    isDerpmeshError('DERPMESH_ERR_LOAD_DIAL', /^dial receiver 0: connect to 127\.0\.0\.1:\d+ failed/),
  );
});
