// Loaded into each node process by `bench:soak --heap` (NODE_OPTIONS=--import …): writes the process's
// V8 heap to $DERPMESH_SOAK_HEAP_DIR/<pid> every second, with the heap in use right after the latest
// major (mark-compact) collection — what the heap really holds, without the garbage that accumulates
// between collections. The soak reads the file at each sample, so that RSS growth can be told apart:
// the heap growing to its working size, garbage not yet collected, or something kept for good.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PerformanceObserver, constants } from 'node:perf_hooks';

export interface HeapProbe {
  heapUsed: number;
  heapTotal: number;
  /** Heap in use right after the latest major collection (undefined before the first). */
  liveAfterMajorGc?: number;
  majorGcs: number;
}

const dir = process.env.DERPMESH_SOAK_HEAP_DIR;
if (dir) {
  const state: HeapProbe = { heapUsed: 0, heapTotal: 0, majorGcs: 0 };
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      const kind = (entry as unknown as { detail?: { kind?: number } }).detail?.kind ?? 0;
      if (kind & constants.NODE_PERFORMANCE_GC_MAJOR) {
        state.majorGcs++;
        state.liveAfterMajorGc = process.memoryUsage().heapUsed;
      }
    }
  }).observe({ entryTypes: ['gc'] });
  setInterval(() => {
    const m = process.memoryUsage();
    state.heapUsed = m.heapUsed;
    state.heapTotal = m.heapTotal;
    try {
      writeFileSync(join(dir, String(process.pid)), JSON.stringify(state));
    } catch {
      // The soak is gone.
    }
  }, 1_000).unref();
}
