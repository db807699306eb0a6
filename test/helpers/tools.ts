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
