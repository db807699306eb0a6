// `derpmesh server` as a child process with its own state directory (so its embedded Postgres never
// mixes with anything else), its output collected, and the URL it listens on once it says so.
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface ServerProcess {
  child: ChildProcess;
  output: () => string;
  /** Resolves with `http://host:port` when the node logs `listen=`; rejects if it exits first. */
  url: Promise<string>;
}

/** `command` is the argv before `server`: `[process.execPath, cli]`, or an installed bin. */
export function startServerProcess(command: string[], args: string[], env: NodeJS.ProcessEnv = {}, startTimeoutMs = 15_000): ServerProcess {
  const stateDir = mkdtempSync(join(tmpdir(), 'derpmesh-server-test-'));
  // The embedded Postgres runs as its own user when we are root: it must traverse the directory.
  chmodSync(stateDir, 0o755);
  const child = spawn(command[0]!, [...command.slice(1), 'server', ...args], {
    env: { ...process.env, DERPMESH_STATE_DIR: stateDir, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.once('exit', () => setTimeout(() => rmSync(stateDir, { recursive: true, force: true }), 2_000).unref());
  let text = '';
  const url = new Promise<string>((resolve, reject) => {
    const onData = (d: Buffer) => {
      text += d.toString();
      const m = /listen=(http:\/\/\S+)/.exec(text);
      if (m) resolve(m[1]!);
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', (code) => reject(new Error(`server exited with ${code}: ${text}`)));
    setTimeout(() => reject(new Error(`server did not start: ${text}`)), startTimeoutMs).unref();
  });
  url.catch(() => {});
  return { child, output: () => text, url };
}
