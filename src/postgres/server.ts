// Runs a Postgres server process from the system's binaries: initdb on first use, start on a given port
// (TCP on 127.0.0.1 only, unix sockets in a directory of our choosing), fast shutdown. Used by the tests'
// throwaway servers (test/helpers/postgres.ts). `lookupUser` and `runToCompletion` also serve the
// embedded Postgres (embedded.ts).
//
// Postgres refuses to run as root. When we are root the server runs as an unprivileged user (default
// `nobody`, or DERPMESH_POSTGRES_USER) through spawn's uid/gid options: no sudo, runuser or download needed.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { postgresAnswers } from '../net.js';

const startTimeoutMs = 30_000;
const stopTimeoutMs = 10_000;
/** The tail of the server's output kept for error messages. */
const logTailChars = 4_000;

/** DERPMESH_POSTGRES_BIN, else the newest /usr/lib/postgresql/<version>/bin, else `pg_config --bindir`. */
export function findPostgresBinDir(): string {
  const candidates: string[] = [];
  const fromEnv = process.env.DERPMESH_POSTGRES_BIN;
  if (fromEnv) candidates.push(fromEnv);
  else {
    const root = '/usr/lib/postgresql';
    if (existsSync(root)) {
      const versions = readdirSync(root)
        .filter((v) => /^\d+$/.test(v))
        .sort((a, b) => Number(b) - Number(a));
      candidates.push(...versions.map((v) => join(root, v, 'bin')));
    }
    try {
      candidates.push(execFileSync('pg_config', ['--bindir'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim());
    } catch {
      // No pg_config on PATH; the Debian layout above is the usual case.
    }
  }
  const found = candidates.find((dir) => existsSync(join(dir, 'initdb')) && existsSync(join(dir, 'postgres')));
  if (!found) {
    throw new Error(
      `postgres binaries not found at ${candidates.join(', ') || '/usr/lib/postgresql/*/bin'}; ` +
        'install PostgreSQL (apt-get install postgresql) or set DERPMESH_POSTGRES_BIN to the directory holding initdb and postgres',
    );
  }
  return found;
}

/** An unprivileged user a server runs as (through spawn's uid/gid), with its name for messages. */
export interface PostgresIdentity {
  uid: number;
  gid: number;
  name: string;
}

/** The user `user` (a name or a numeric uid), or undefined if the system has none. */
export function lookupUser(user: string): PostgresIdentity | undefined {
  try {
    const id = (flag: string) => execFileSync('id', [flag, user], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return { uid: Number(id('-u')), gid: Number(id('-g')), name: id('-nu') };
  } catch {
    return undefined;
  }
}

/** Who the server runs as: ourselves, or when we are root, DERPMESH_POSTGRES_USER (default `nobody`). */
export function postgresIdentity(): PostgresIdentity | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const user = process.env.DERPMESH_POSTGRES_USER ?? 'nobody';
  const identity = lookupUser(user);
  if (!identity) {
    throw new Error(
      `running as root and user ${JSON.stringify(user)} does not exist; Postgres refuses to run as root, so set DERPMESH_POSTGRES_USER to an unprivileged user`,
    );
  }
  return identity;
}

/**
 * Runs a helper (initdb, postgres -V) to completion as `identity` (or ourselves), with its output
 * kept for the error: rejects with a plain Error if it cannot be spawned, fails or outlives `timeoutMs`.
 */
export function runToCompletion(
  file: string,
  args: string[],
  options: { cwd: string; identity?: PostgresIdentity; timeoutMs?: number },
): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      cwd: options.cwd,
      ...(options.identity && { uid: options.identity.uid, gid: options.identity.gid }),
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? startTimeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`${file} failed to start: ${error.message}`));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(output);
      else reject(new Error(`${file} exited with ${signal ?? code}:\n${output.slice(-logTailChars)}`));
    });
  });
}

export interface PostgresServerOptions {
  binDir: string;
  dataDir: string;
  /** Holds the unix socket; must be writable by the server's user. */
  socketDir: string;
  port: number;
  /** The superuser initdb creates. */
  user: string;
  /** scram-sha-256 with this password; without one, trust (throwaway test servers only). */
  password?: string;
  /** Skip fsync and friends: faster, and only for data nobody needs after a crash. */
  throwaway?: boolean;
}

export class PostgresServer {
  readonly #options: PostgresServerOptions;
  readonly #identity = postgresIdentity();
  #process: ChildProcess | undefined;
  #log = '';

  constructor(options: PostgresServerOptions) {
    this.#options = options;
  }

  get running(): boolean {
    return this.#process !== undefined;
  }

  /** initdb unless the data directory already holds a cluster. */
  async init(): Promise<void> {
    const { binDir, dataDir, user, password } = this.#options;
    if (existsSync(join(dataDir, 'PG_VERSION'))) return;
    const args = ['-D', dataDir, '-U', user, '--encoding=UTF8', '--no-locale'];
    if (this.#options.throwaway) args.push('--no-sync');
    if (password === undefined) {
      await this.#run(join(binDir, 'initdb'), [...args, '--auth=trust']);
      return;
    }
    // initdb reads the password from a file; it lives only as long as initdb runs.
    const passwordFile = join(this.#options.socketDir, `.initdb-password-${process.pid}`);
    writeFileSync(passwordFile, `${password}\n`, { mode: 0o600 });
    try {
      if (this.#identity) chownSync(passwordFile, this.#identity.uid, this.#identity.gid);
      await this.#run(join(binDir, 'initdb'), [...args, '--auth=scram-sha-256', `--pwfile=${passwordFile}`]);
    } finally {
      rmSync(passwordFile, { force: true });
    }
  }

  /** Starts the server and resolves once it accepts connections. */
  async start(): Promise<void> {
    if (this.#process) return;
    const { binDir, dataDir, socketDir, port } = this.#options;
    const args = ['-D', dataDir, '-p', String(port), '-k', socketDir, '-c', 'listen_addresses=127.0.0.1'];
    if (this.#options.throwaway) args.push('-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off');
    this.#log = '';
    const child = spawn(join(binDir, 'postgres'), args, {
      cwd: socketDir,
      ...(this.#identity && { uid: this.#identity.uid, gid: this.#identity.gid }),
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    const keep = (chunk: Buffer) => (this.#log = (this.#log + chunk.toString()).slice(-logTailChars));
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
    child.once('error', (error) => (this.#log += `\nspawn failed: ${error.message}`));
    child.once('exit', () => {
      if (this.#process === child) this.#process = undefined;
    });
    this.#process = child;

    const deadline = Date.now() + startTimeoutMs;
    for (;;) {
      if (this.#process !== child) throw new Error(`postgres exited during startup:\n${this.#log}`);
      if (await this.#accepting()) return;
      if (Date.now() > deadline) {
        child.kill('SIGQUIT');
        throw new Error(`postgres did not accept connections on 127.0.0.1:${port} within ${startTimeoutMs} ms:\n${this.#log}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Fast shutdown (SIGINT: abort transactions, disconnect clients, checkpoint); SIGQUIT if that hangs. */
  async stop(): Promise<void> {
    const child = this.#process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGQUIT');
        reject(new Error(`postgres did not shut down within ${stopTimeoutMs} ms; sent SIGQUIT (immediate shutdown)`));
      }, stopTimeoutMs);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
      child.kill('SIGINT');
    });
  }

  /** Immediate shutdown without waiting, for process exit handlers. */
  kill(): void {
    this.#process?.kill('SIGQUIT');
  }

  /** A connection to the built-in `postgres` database, which exists from initdb on. */
  maintenanceUrl(): string {
    const { user, password, port } = this.#options;
    const credentials = password === undefined ? user : `${user}:${encodeURIComponent(password)}`;
    return `postgres://${credentials}@127.0.0.1:${port}/postgres`;
  }

  #accepting(): Promise<boolean> {
    return postgresAnswers(this.maintenanceUrl(), 1_000);
  }

  async #run(file: string, args: string[]): Promise<void> {
    await runToCompletion(file, args, { cwd: this.#options.socketDir, identity: this.#identity });
  }
}
