// The access URL of `derpmesh cluster` (its TCP balancer) against dialling the nodes directly:
// request/response round trips between two clients on different nodes, side by side in one run.
//
//   node dist/bench/access.js [--exchanges 1000] [--rounds 4] [--burst 3]
//
// Runs the real command (`derpmesh cluster --nodes 2`, its own embedded Postgres in a temporary
// state directory), then alternates rounds through the access URL and direct so background load
// hits both alike. Each exchange sends `--burst` small packets in separate writes and waits for all
// their echoes: the pattern a tunnel's small packets make, where a proxy with Nagle's algorithm on
// stalls ~40 ms for a delayed ACK. Target (issue 15): access URL p50 within 0.2 ms of direct.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { DerpClient } from '../src/client/index.js';
import { waitFor } from '../test/helpers/cluster.js';
import { deliver, echoRoundTrips, quantile } from '../test/helpers/traffic.js';

const { values } = parseArgs({
  options: {
    exchanges: { type: 'string', default: '1000' },
    rounds: { type: 'string', default: '4' },
    burst: { type: 'string', default: '3' },
  },
});
const exchanges = Number(values.exchanges);
const rounds = Number(values.rounds);
const burst = Number(values.burst);

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const stateDir = mkdtempSync(join(tmpdir(), 'derpmesh-bench-access-'));
chmodSync(stateDir, 0o755); // as root, the embedded Postgres runs as another user
const cluster = spawn(
  process.execPath,
  [cli, 'cluster', '--nodes', '2', '--access-port', '0', '--base-port', '0', '--state-dir', stateDir],
  {
    stdio: ['ignore', 'pipe', 'pipe'],
  },
);
cluster.on('error', (err) => {
  console.error(`cannot start derpmesh cluster: ${err.message}`);
  process.exit(1);
});
let stdout = '';
cluster.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
cluster.stderr!.resume();
const clients: DerpClient[] = [];
try {
  await waitFor('the cluster table', 90_000, () => /Access URL (http:\/\/127\.0\.0\.1:\d+) /.test(stdout), 100);
  const accessUrl = /Access URL (http:\/\/127\.0\.0\.1:\d+) /.exec(stdout)![1]!;
  const nodeUrls = [...stdout.matchAll(/^node-\d+\s+(http:\/\/127\.0\.0\.1:\d+)\s/gm)].map((m) => m[1]!);
  const connect = async (url: string) => {
    const c = await DerpClient.connect({ url });
    clients.push(c);
    return c;
  };
  // Through the access URL: connect until the two clients sit on different nodes.
  const a = await connect(accessUrl);
  let b = await connect(accessUrl);
  while (b.serverPublicKey.equals(a.serverPublicKey)) b = await connect(accessUrl);
  const da = await connect(nodeUrls[0]!);
  const db = await connect(nodeUrls[1]!);
  await deliver(a, b, 10_000);
  await deliver(da, db, 10_000);
  const via: number[] = [];
  const direct: number[] = [];
  const per = Math.ceil(exchanges / rounds);
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 === 0 ? ([via, direct] as const) : ([direct, via] as const);
    for (const into of order) {
      const [x, y] = into === via ? [a, b] : [da, db];
      into.push(...(await echoRoundTrips(x, y, per, { burst })));
    }
  }
  const row = (name: string, v: number[]) =>
    `| ${name} | ${v.length} | ${quantile(v, 0.5).toFixed(3)} | ${quantile(v, 0.9).toFixed(3)} | ${quantile(v, 0.99).toFixed(3)} |`;
  console.log(`\nround trips, client on node 1 ↔ client on node 2, ${burst} × 64 B each way per exchange\n`);
  console.log('| path | exchanges | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|');
  console.log(row('direct to the nodes', direct));
  console.log(row('through the access URL', via));
  console.log(`\naccess URL p50 − direct p50 = ${(quantile(via, 0.5) - quantile(direct, 0.5)).toFixed(3)} ms`);
} finally {
  await Promise.all(clients.map((c) => c.close().catch(() => {})));
  if (cluster.exitCode === null) {
    cluster.kill('SIGINT');
    await once(cluster, 'exit');
  }
  rmSync(stateDir, { recursive: true, force: true });
}
