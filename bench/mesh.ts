// The mesh path against the single-node path, side by side in one run: senders on node A and
// receivers on node B (packets cross A's mesh link to B) versus senders and receivers both on A.
//
//   node dist/bench/mesh.js [--duration 10s] [--rounds 2] [--pairs 10] [--size 1400]
//
// Two real node processes share a throwaway Postgres and mesh as in production. Rounds alternate
// single/mesh/mesh/single… so background load hits both alike. Target (HA issue): mesh ≥ 0.7×.
import { parseArgs } from 'node:util';

import { formatReport, runLoad, type LoadReport } from '../src/bench.js';
import { parseDuration } from '../src/config.js';
import { livePeers, startNodeProcess, waitFor } from '../test/helpers/cluster.js';
import { startPostgres } from '../test/helpers/postgres.js';

const { values } = parseArgs({
  options: {
    duration: { type: 'string', default: '10s' },
    rounds: { type: 'string', default: '2' },
    pairs: { type: 'string', default: '10' },
    size: { type: 'string', default: '1400' },
  },
});
const durationMs = parseDuration(values.duration) ?? 10_000;
const rounds = Number(values.rounds);
const pairs = Number(values.pairs);
const packetSize = Number(values.size);

const postgres = await startPostgres();
const a = await startNodeProcess({ name: 'bench-a', postgresUrl: postgres.url, heartbeatMs: 1_000 });
const b = await startNodeProcess({ name: 'bench-b', postgresUrl: postgres.url, heartbeatMs: 1_000 });
try {
  await Promise.all([a.started, b.started]);
  await waitFor(
    'the two nodes meshed',
    15_000,
    async () => (await livePeers(a)).includes('bench-b') && /^derpmesh_mesh_links 1$/m.test(await a.metrics()),
  );
  const results: { single: LoadReport[]; mesh: LoadReport[] } = { single: [], mesh: [] };
  const order: ('single' | 'mesh')[] = [];
  for (let i = 0; i < rounds; i++) order.push(...((i % 2 === 0 ? ['single', 'mesh'] : ['mesh', 'single']) as ('single' | 'mesh')[]));
  for (const kind of order) {
    const report = await runLoad({
      url: a.url,
      receiverUrl: kind === 'mesh' ? b.url : undefined,
      pairs,
      packetSize,
      durationMs: durationMs / rounds,
      warmupMs: 1_000,
    });
    results[kind].push(report);
    console.log(formatReport(`${kind} (${kind === 'mesh' ? 'A → mesh → B' : 'A → A'})`, report));
  }
  const mean = (rs: LoadReport[]) => rs.reduce((s, r) => s + r.packetsPerSec, 0) / rs.length;
  const ratio = mean(results.mesh) / mean(results.single);
  console.log(
    `\nmesh / single-node packets/s: ${Math.round(mean(results.mesh))} / ${Math.round(mean(results.single))} = ${ratio.toFixed(2)}×`,
  );
  console.log(ratio >= 0.7 ? 'TARGET HOLDS (≥ 0.7×)' : 'TARGET MISSED (< 0.7×)');
  // Where packets were lost, over all rounds: queue drops at A (its clients' and the mesh link's
  // queues) and at B (its clients' queues).
  for (const [name, node] of [
    ['A', a],
    ['B', b],
  ] as const) {
    const drops = (await node.metrics()).split('\n').filter((l) => /^derpmesh_packets_dropped_\w+ [1-9]/.test(l));
    console.log(`node ${name} drops: ${drops.join(', ') || 'none'}`);
  }
} finally {
  await Promise.all([a.kill9(), b.kill9()]);
  await postgres.stop();
}
