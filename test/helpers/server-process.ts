// A child process whose output is collected and whose URL is known once it prints it; `derpmesh
// server` that way, with its own state directory (so its embedded Postgres never mixes with anything else).
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
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
    child.once('exit', (code) => reject(new Error(`${options.what} exited with ${code}: ${text}`)));
    setTimeout(() => reject(new Error(`${options.what} did not start: ${text}`)), options.timeoutMs).unref();
  });
  url.catch(() => {});
  return { child, output: () => text, url };
}

export type ServerProcess = AnnouncedProcess;

/** `command` is the argv before `server`: `[process.execPath, cli]`, or an installed bin. */
export function startServerProcess(command: string[], args: string[], env: NodeJS.ProcessEnv = {}, startTimeoutMs = 15_000): ServerProcess {
  const stateDir = mkdtempSync(join(tmpdir(), 'derpmesh-server-test-'));
  // The embedded Postgres runs as its own user when we are root: it must traverse the directory.
  chmodSync(stateDir, 0o755);
  const server = spawnAnnounced([...command, 'server', ...args], {
    announce: /listen=(http:\/\/\S+)/,
    what: 'server',
    env: { DERPMESH_STATE_DIR: stateDir, ...env },
    timeoutMs: startTimeoutMs,
  });
  server.child.once('exit', () => setTimeout(() => rmSync(stateDir, { recursive: true, force: true }), 2_000).unref());
  return server;
}
