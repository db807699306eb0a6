// Small helpers shared by bench/mesh.ts and bench/stun.ts: number formats, a text table, and a
// process's CPU time from /proc.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

export function fmtInt(v: number): string {
  return Math.round(v).toLocaleString('en-US');
}

export function fmtPct(v: number): string {
  return `${(v * 100).toFixed(2)} %`;
}

/** Microseconds as milliseconds with 3 decimals; `n/a` when there is no value. */
export function fmtMs(us: number | undefined | null): string {
  return us == null || Number.isNaN(us) ? 'n/a' : `${(us / 1000).toFixed(3)} ms`;
}

/** `a / b` as `1.23×`; empty when either is missing or `b` is 0. */
export function fmtRatio(a: number | undefined | null, b: number | undefined | null): string {
  return a == null || b == null || b === 0 || Number.isNaN(a) || Number.isNaN(b) ? '' : `${(a / b).toFixed(2)}×`;
}

/** Rows of cells as an aligned text table: the first column left-aligned, the others right-aligned. */
export function formatTable(title: string, rows: string[][]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  const lines = rows.map((row) => '  ' + row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  '));
  return [title, ...lines.map((l) => l.trimEnd())].join('\n');
}

const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** Seconds of CPU (user + system, all threads) process `pid` has used so far; NaN if unreadable. */
export function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // After "pid (comm) ", fields[0] is field 3 (state): utime is field 14, stime field 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}

/** The `q` quantile (0..1) of ascending `sorted`, nearest rank; undefined when empty. */
export function quantile(sorted: ArrayLike<number>, q: number): number | undefined {
  if (sorted.length === 0) return undefined;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
