// Whether a tool some tests need is installed (they skip, visibly, without it).
import { execFileSync } from 'node:child_process';

/** True when `command --version`-style `args` run and exit 0. */
export function hasCommand(command: string, args: string[]): boolean {
  try {
    execFileSync(command, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export const goAvailable = () => hasCommand('go', ['version']);
export const hasOpenssl = () => hasCommand('openssl', ['version']);

/** Whether a process with this pid exists (one of another user counts too). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
