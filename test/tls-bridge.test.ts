// The byte bridge that carries DERP connections whose TLS Node terminates (the fallback when the
// relay core cannot terminate TLS itself): bulk transfers through it
// keep a bounded number of listeners on the socket (one per backpressured write used to leak).
import { strict as assert } from 'node:assert';
import { readFileSync, rmSync } from 'node:fs';
import { describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { hasOpenssl, makePrivateCa } from './helpers/certs.js';
import { startRelay } from './helpers/relay.js';

describe('TLS byte bridge', { skip: hasOpenssl() ? false : 'no openssl to make a certificate', timeout: 60_000 }, () => {
  test('a bulk transfer through backpressured writes adds no listener per write (no MaxListenersExceededWarning)', async () => {
    const ca = makePrivateCa();
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on('warning', onWarning);
    const server = await startRelay({
      tls: { cert: readFileSync(ca.certFile), key: readFileSync(ca.keyFile) },
      nodeFront: true, // the fallback (no relay core TLS: Windows, or a pair the core cannot use)
    });
    const { relay } = server;
    const tls = { ca: readFileSync(ca.caFile) };
    try {
      const a = await DerpClient.connect({ url: server.url, tls });
      const b = await DerpClient.connect({ url: server.url, tls });
      const total = 300;
      let got = 0;
      const all = new Promise<void>((resolve) =>
        b.on('packet', () => {
          if (++got === total) resolve();
        }),
      );
      // 300 × 60 KB in bursts: every write of the bridge to b's TLS socket is over its high-water mark.
      for (let i = 0; i < total; i += 50) {
        for (let j = 0; j < 50; j++) a.send(b.publicKey, Buffer.alloc(60_000, j));
        await new Promise((r) => setTimeout(r, 20));
      }
      await Promise.race([all, new Promise((r) => setTimeout(r, 20_000))]);
      assert.equal(got, total, 'every packet arrived');
      await new Promise((r) => setImmediate(r));
      const leaks = warnings.filter((w) => w.name === 'MaxListenersExceededWarning');
      assert.deepEqual(
        leaks.map((w) => w.message),
        [],
      );
      assert.ok(relay.metric('upgrades_bridged') >= 2, 'the connections went through the bridge');
      await Promise.all([a.close(), b.close()]);
    } finally {
      process.off('warning', onWarning);
      await server.close();
      rmSync(ca.dir, { recursive: true, force: true });
    }
  });
});
