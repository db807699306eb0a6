// The examples in examples/ run as written (compiled by tsc; `derpmesh` resolves to this package).
import { readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';

import { hasOpenssl, makePrivateCa } from './helpers/certs.js';
import { checkEmbedExample } from './helpers/embed-example.js';

test(
  'examples/embed: an existing HTTP server with a relay attached relays, keeps its routes, stops cleanly',
  { timeout: 60_000 },
  async () => {
    await checkEmbedExample(fileURLToPath(new URL('../examples/embed.js', import.meta.url)));
  },
);

test(
  'examples/embed-tls: the application and DERP on one TLS port, TLS terminated by the relay core',
  { timeout: 60_000, skip: hasOpenssl() ? false : 'no openssl to make a certificate' },
  async () => {
    const pki = makePrivateCa();
    try {
      await checkEmbedExample(fileURLToPath(new URL('../examples/embed-tls.js', import.meta.url)), {
        env: { TLS_CERT: pki.certFile, TLS_KEY: pki.keyFile },
        ca: readFileSync(pki.caFile),
      });
    } finally {
      rmSync(pki.dir, { recursive: true, force: true });
    }
  },
);
