// A child process whose output is collected and whose URL is known once it prints it; `derpmesh
// server` that way, with its own state directory (so its embedded Postgres never mixes with anything else).
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface AnnouncedProcess {
  child: ChildProcess;
  output: () => string;
  /** Resolves with the first group of `announce` once the process prints it; rejects if it exits first. */
  url: Promise<string>;
}

/** Spawns `argv` with its stdout and stderr collected, and waits for the line that gives its URL. */
export function spawnAnnounced(
  argv: string[],
  options: { announce: RegExp; what: string; env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs: number },
): AnnouncedProcess {
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let text = '';
  const url = new Promise<string>((resolve, reject) => {
    const onData = (d: Buffer) => {
      text += d.toString();
      const m = options.announce.exec(text);
      if (m) resolve(m[1]!);
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('error', (err) => reject(new Error(`${options.what} could not be started: ${err.message}`)));
    child.once('exit', (code) => reject(new Error(`${options.what} exited with ${code}: ${text}`)));
    setTimeout(() => reject(new Error(`${options.what} did not start: ${text}`)), options.timeoutMs).unref();
  });
  url.catch(() => {});
  return { child, output: () => text, url };
}

export type ServerProcess = AnnouncedProcess & { stateDir: string };

/** The pid of the postmaster running on `stateDir`'s embedded Postgres data, if its pid file names one. */
export function embeddedPostmasterPid(stateDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(stateDir, 'postgres', 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * `command` is the argv before `server`: `[process.execPath, cli]`, or an installed bin. With
 * DERPMESH_STATE_DIR in `env`, the server uses that state directory (shared with others, kept);
 * otherwise one of its own, removed (with any Postgres left on it) after the server exits.
 */
export function startServerProcess(command: string[], args: string[], env: NodeJS.ProcessEnv = {}, startTimeoutMs = 15_000): ServerProcess {
  const ownStateDir = env.DERPMESH_STATE_DIR === undefined;
  const stateDir = env.DERPMESH_STATE_DIR ?? mkdtempSync(join(tmpdir(), 'derpmesh-server-test-'));
  // The embedded Postgres runs as its own user when we are root: it must traverse the directory.
  if (ownStateDir) chmodSync(stateDir, 0o755);
  const server = spawnAnnounced([...command, 'server', ...args], {
    announce: /listen=(https?:\/\/\S+)/,
    what: 'server',
    env: { ...env, DERPMESH_STATE_DIR: stateDir },
    timeoutMs: startTimeoutMs,
  });
  if (ownStateDir) {
    ownStateDirs.add(stateDir);
    server.child.once('exit', () => setTimeout(() => removeStateDir(stateDir), 2_000).unref());
  }
  return { ...server, stateDir };
}

/** State directories of servers started here, removed after their server exits or with this process. */
const ownStateDirs = new Set<string>();
process.once('exit', () => ownStateDirs.forEach(removeStateDir));

function removeStateDir(stateDir: string): void {
  // Only its server used the state directory: a Postgres still on it (the server was killed before
  // it could stop it) goes with the directory.
  const postmaster = embeddedPostmasterPid(stateDir);
  try {
    if (postmaster) process.kill(postmaster, 'SIGQUIT');
  } catch {
    // already gone
  }
  rmSync(stateDir, { recursive: true, force: true });
  ownStateDirs.delete(stateDir);
}
