// The napi-rs addon. The generated loader (native/binding.cjs) picks the .node file for this
// platform: a local build first, then the per-platform npm package.
import { createRequire } from 'node:module';
import type * as Binding from '../native/binding.cjs';

const require = createRequire(import.meta.url);

function load(): typeof Binding {
  // dist/src/native.js and src/native.ts both sit two levels below the package root.
  const candidates = ['../../native/binding.cjs', '../native/binding.cjs'];
  let lastError: unknown;
  for (const path of candidates) {
    try {
      return require(path) as typeof Binding;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'MODULE_NOT_FOUND' || !String((err as Error).message).includes('binding.cjs')) {
        throw err;
      }
      lastError = err;
    }
  }
  throw lastError;
}

export const native = load();
export type { RelayOptions, Metric, Bridge, DecodedFrame, MeshLinkStatus } from '../native/binding.cjs';
