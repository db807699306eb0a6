// The examples in examples/ run as written (compiled by tsc; `derpmesh` resolves to this package).
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';

import { checkEmbedExample } from './helpers/embed-example.js';

test(
  'examples/embed: an existing HTTP server with a relay attached relays, keeps its routes, stops cleanly',
  { timeout: 60_000 },
  async () => {
    await checkEmbedExample(fileURLToPath(new URL('../examples/embed.js', import.meta.url)));
  },
);
