// Errors keep their codes across the seam: the native relay throws errors with a stable `code`,
// the TypeScript side turns them into DerpmeshErrors.
import { strict as assert } from 'node:assert';
import { createServer as createNetServer, type AddressInfo } from 'node:net';
import { test } from 'node:test';

import { runLoad } from '../src/bench.js';
import { DerpmeshError } from '../src/errors.js';

function isDerpmeshError(code: string, message: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof DerpmeshError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  };
}

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
