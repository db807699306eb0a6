// `derpmesh cluster`: N real node processes on one embedded Postgres behind a round-robin access URL,
// started and stopped the way an operator does it (the command, then Ctrl-C).
import { strict as assert } from 'node:assert';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { DerpClient } from '../src/client/index.js';
import { waitFor } from './helpers/cluster.js';
import { pidAlive } from './helpers/tools.js';
import { deliver, echoRoundTrips, quantile } from './helpers/traffic.js';

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));

/** Postgres processes whose command line names `dir` (their data directory lives inside it). */
function postgresProcessesIn(dir: string): string[] {
  const out = execFileSync('ps', ['-eo', 'pid=,args='], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => /postgres/.test(l) && l.includes(dir))
    .map((l) => l.trim());
}

function processGroupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The pids of the `derpmesh server` processes whose parent is `ppid`. */
function nodesOf(ppid: number): number[] {
  return execFileSync('ps', ['-eo', 'pid=,ppid=,args='], { encoding: 'utf8' })
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter(([, parent, ...args]) => Number(parent) === ppid && args.join(' ').includes('cli.js server'))
    .map(([pid]) => Number(pid));
}

/** Waits until none of `pids` runs, or fails naming those that still do. */
async function expectGone(pids: number[], withinMs: number, what: string): Promise<number> {
  const start = Date.now();
  await waitFor(`${what} gone`, withinMs, () => pids.every((p) => !pidAlive(p)), 50).catch(() => {
    const left = pids.filter(pidAlive);
    const ps = execFileSync('ps', ['-o', 'pid=,args=', '-p', left.join(',')], { encoding: 'utf8' });
    throw new Error(`${what} still running ${withinMs} ms later:\n${ps}`);
  });
  return Date.now() - start;
}

interface RunningCluster {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  output(): string;
  exited: Promise<[number | null, NodeJS.Signals | null]>;
  accessUrl: string;
  /** Each node's own address, from the table. */
  nodeUrls: string[];
}

/** Runs `derpmesh cluster --nodes 3` in its own process group and waits for its table. */
async function startCluster(stateDir: string): Promise<RunningCluster> {
  const child = spawn(
    process.execPath,
    [cli, 'cluster', '--nodes', '3', '--access-port', '0', '--base-port', '0', '--state-dir', stateDir],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    },
  );
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  const output = () => `stdout:\n${stdout}\nstderr:\n${stderr}`;
  const startedAt = Date.now();
  await Promise.race([
    waitFor('the cluster table', 60_000, () => /Access URL http:\/\/127\.0\.0\.1:\d+ /.test(stdout), 100),
    exited.then(([code]) => {
      throw new Error(`derpmesh cluster exited with ${code} before printing its table:\n${output()}`);
    }),
  ]);
  console.log(`cluster of 3 up and printed after ${Date.now() - startedAt} ms`);
  return {
    child,
    stdout: () => stdout,
    stderr: () => stderr,
    output,
    exited,
    accessUrl: /Access URL (http:\/\/127\.0\.0\.1:\d+) /.exec(stdout)![1]!,
    nodeUrls: [...stdout.matchAll(/^node-\d+\s+(http:\/\/127\.0\.0\.1:\d+)\s/gm)].map((m) => m[1]!),
  };
}

/** Waits for the exit (≤ 20 s) and checks that nothing of the cluster is left running. */
async function expectCleanExit(cluster: RunningCluster, stateDir: string, how: string): Promise<void> {
  const stopAt = Date.now();
  const timeout = new Promise<never>((_, reject) =>
    setTimeout(() => reject(new Error(`derpmesh cluster still running 20 s after ${how}:\n${cluster.output()}`)), 20_000).unref(),
  );
  const [code, signal] = await Promise.race([cluster.exited, timeout]);
  console.log(`derpmesh cluster exited ${code ?? signal} ${Date.now() - stopAt} ms after ${how}`);
  assert.equal(code, 0, cluster.output());
  const pgid = cluster.child.pid!;
  await waitFor('the node processes gone', 5_000, () => !processGroupAlive(pgid), 100).catch(() => {
    const left = execFileSync('ps', ['-eo', 'pid=,pgid=,args='], { encoding: 'utf8' })
      .split('\n')
      .filter((l) => l.trim().split(/\s+/)[1] === String(pgid))
      .join('\n');
    throw new Error(`processes of the cluster left behind:\n${left}`);
  });
  await waitFor('its Postgres gone', 5_000, () => postgresProcessesIn(stateDir).length === 0, 100).catch(() => {
    throw new Error(`postgres left running:\n${postgresProcessesIn(stateDir).join('\n')}`);
  });
  assert.ok(!existsSync(join(stateDir, 'postgres', 'embedded-postgres.json')), 'the embedded Postgres descriptor is removed');
  assert.match(cluster.stderr(), /cluster stopped/);
}

/** Every node shut down gracefully (one signal each, "stopped" logged). */
function expectGracefulNodes(cluster: RunningCluster): void {
  const stderr = cluster.stderr();
  assert.doesNotMatch(stderr, /second signal: exiting now/, `a node got two signals and skipped its graceful shutdown:\n${stderr}`);
  assert.equal((stderr.match(/INFO {2}stopped node=node-\d/g) ?? []).length, 3, `not every node logged "stopped":\n${stderr}`);
}

describe('derpmesh cluster', { timeout: 400_000 }, () => {
  const stateDir = mkdtempSync(join(tmpdir(), 'derpmesh-cluster-'));
  // When the tests run as root the embedded Postgres runs as an unprivileged user, which must be able
  // to traverse the state directory (mkdtemp makes it 0700).
  chmodSync(stateDir, 0o755);
  const running: RunningCluster[] = [];
  const clients: DerpClient[] = [];

  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    for (const c of running) {
      if (c.child.pid && processGroupAlive(c.child.pid)) {
        try {
          process.kill(-c.child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
    for (const line of postgresProcessesIn(stateDir)) {
      try {
        process.kill(Number(line.split(/\s+/)[0]), 'SIGKILL');
      } catch {
        // already gone
      }
    }
    rmSync(stateDir, { recursive: true, force: true });
  });

  test('--nodes 3: prints the nodes and the latency matrix, relays packets through the access URL, SIGINT stops everything', async () => {
    const cluster = await startCluster(stateDir);
    running.push(cluster);
    const stdout = cluster.stdout();
    const output = cluster.output;

    // The node table: node-1..3 with their listen and relay URLs.
    const rows = [...stdout.matchAll(/^(node-\d+)\s+(http:\/\/127\.0\.0\.1:\d+)\s+(http:\/\/127\.0\.0\.1:\d+)\s+(\d+\.\d+) ms$/gm)];
    assert.deepEqual(
      rows.map((r) => r[1]),
      ['node-1', 'node-2', 'node-3'],
      output(),
    );
    const nodeUrls = rows.map((r) => r[2]!);
    for (const r of rows) assert.equal(r[3], r[2], `${r[1]}: relay URL is its own address`);
    assert.equal(new Set(nodeUrls).size, 3, 'three distinct ports');
    assert.ok(!nodeUrls.includes(cluster.accessUrl), 'the access URL is not a node address');

    // The latency matrix: a row per node, "-" on the diagonal, a number of ms elsewhere.
    const matrix = stdout.slice(stdout.indexOf('latency matrix'));
    assert.match(matrix, /^\s+node-1\s+node-2\s+node-3$/m, output());
    for (let i = 1; i <= 3; i++) {
      const row = new RegExp(`^node-${i}((?:\\s+(?:-|\\d+\\.\\d+)){3})$`, 'm').exec(matrix);
      assert.ok(row, `no matrix row for node-${i}:\n${matrix}`);
      const cells = row[1]!.trim().split(/\s+/);
      cells.forEach((c, j) => (j === i - 1 ? assert.equal(c, '-') : assert.match(c, /^\d+\.\d+$/)));
    }

    // Its own Postgres runs from the state directory.
    assert.ok(postgresProcessesIn(stateDir).length > 0, 'no postgres process found for the state directory');

    // Two clients through the round-robin access URL, landing on different nodes, exchange packets.
    const a = await DerpClient.connect({ url: cluster.accessUrl });
    clients.push(a);
    let b: DerpClient | undefined;
    for (let i = 0; i < 6 && !b; i++) {
      const c = await DerpClient.connect({ url: cluster.accessUrl });
      clients.push(c);
      if (!c.serverPublicKey.equals(a.serverPublicKey)) b = c;
    }
    assert.ok(b, 'the access URL never put a second client on another node');
    await deliver(a, b, 10_000);
    await deliver(b, a, 10_000);
    await Promise.all(clients.map((c) => c.close().catch(() => {})));

    process.kill(cluster.child.pid!, 'SIGINT');
    await expectCleanExit(cluster, stateDir, 'SIGINT');
    expectGracefulNodes(cluster);
  });

  test(
    'Ctrl-C in a terminal (SIGINT to the whole process group): exits 0, nothing left, every node shuts down gracefully',
    {},
    async () => {
      // Same state directory again: a second start reuses the embedded Postgres data.
      const cluster = await startCluster(stateDir);
      running.push(cluster);
      process.kill(-cluster.child.pid!, 'SIGINT');
      await expectCleanExit(cluster, stateDir, 'Ctrl-C');
      expectGracefulNodes(cluster);
    },
  );

  test('through the access URL, small request/response exchanges between nodes are as fast as direct (p50 < 2 ms)', async () => {
    const cluster = await startCluster(stateDir);
    running.push(cluster);
    try {
      // Two clients on different nodes through the access URL, and two dialled directly.
      const viaAccess: DerpClient[] = [];
      const a = await DerpClient.connect({ url: cluster.accessUrl });
      viaAccess.push(a);
      let b: DerpClient | undefined;
      for (let i = 0; i < 6 && !b; i++) {
        const c = await DerpClient.connect({ url: cluster.accessUrl });
        viaAccess.push(c);
        if (!c.serverPublicKey.equals(a.serverPublicKey)) b = c;
      }
      clients.push(...viaAccess);
      assert.ok(b, 'the access URL never put a second client on another node');
      const da = await DerpClient.connect({ url: cluster.nodeUrls[0]! });
      const db = await DerpClient.connect({ url: cluster.nodeUrls[1]! });
      clients.push(da, db);
      await deliver(a, b, 10_000);
      await deliver(da, db, 10_000);
      // Interleaved rounds, so both paths see the same machine load.
      const via: number[] = [];
      const direct: number[] = [];
      for (let round = 0; round < 4; round++) {
        via.push(...(await echoRoundTrips(a, b, 50, { burst: 3 })));
        direct.push(...(await echoRoundTrips(da, db, 50, { burst: 3 })));
      }
      const row = (name: string, v: number[]) => `${name}: p50 ${quantile(v, 0.5).toFixed(3)} ms, p99 ${quantile(v, 0.99).toFixed(3)} ms`;
      console.log(`${row('access URL', via)}; ${row('direct', direct)} (${via.length} exchanges each)`);
      assert.equal(via.length, 200);
      assert.ok(quantile(via, 0.5) < 2, row('through the access URL', via));
    } finally {
      await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
      process.kill(cluster.child.pid!, 'SIGINT');
      await expectCleanExit(cluster, stateDir, 'SIGINT');
    }
  });

  test('two SIGTERMs 5 ms apart: the nodes and the Postgres stop within the shutdown grace, checked by pid', async () => {
    const cluster = await startCluster(stateDir);
    running.push(cluster);
    const nodes = nodesOf(cluster.child.pid!);
    assert.equal(nodes.length, 3, `three node processes under the cluster: ${nodes.join(',')}`);
    const postgres = postgresProcessesIn(stateDir).map((l) => Number(l.split(/\s+/)[0]));
    assert.ok(postgres.length > 0, 'its Postgres runs');
    process.kill(cluster.child.pid!, 'SIGTERM');
    await new Promise((r) => setTimeout(r, 5));
    process.kill(cluster.child.pid!, 'SIGTERM');
    const graceMs = 5_000;
    const ms = await expectGone([cluster.child.pid!, ...nodes, ...postgres], graceMs, 'the cluster, its nodes and its Postgres');
    console.log(`everything stopped ${ms} ms after two SIGTERMs`);
    const [code] = await cluster.exited;
    assert.equal(code, 0, cluster.output());
    assert.match(cluster.stderr(), /signal received while stopping/);
    assert.match(cluster.stderr(), /cluster stopped/);
    expectGracefulNodes(cluster);
  });

  test('kill -9 of the cluster command: its nodes stop by themselves, and the Postgres with the last of them', async () => {
    const cluster = await startCluster(stateDir);
    running.push(cluster);
    const nodes = nodesOf(cluster.child.pid!);
    assert.equal(nodes.length, 3);
    const postgres = postgresProcessesIn(stateDir).map((l) => Number(l.split(/\s+/)[0]));
    process.kill(cluster.child.pid!, 'SIGKILL');
    const ms = await expectGone([...nodes, ...postgres], 15_000, 'the orphaned nodes and their Postgres');
    console.log(`nodes and Postgres gone ${ms} ms after the cluster command was killed`);
    assert.match(cluster.stderr(), /stopping.*reason="the parent process is gone"/);
    expectGracefulNodes(cluster);
  });
});
