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
import { deliver } from './helpers/traffic.js';

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

interface RunningCluster {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  output(): string;
  exited: Promise<[number | null, NodeJS.Signals | null]>;
  accessUrl: string;
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

describe('derpmesh cluster', { timeout: 110_000 }, () => {
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
});
