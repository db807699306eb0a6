// A one-line progress display for long commands (bench, ping): redrawn in place on a terminal,
// silent otherwise, so logs, pipes and JSON output stay clean.

/** The part of a stream the display uses (process.stderr is one). */
export interface ProgressStream {
  isTTY?: boolean;
  columns?: number;
  write(text: string): unknown;
}

export interface Progress {
  /** True when the display draws anything (the stream is a terminal). */
  readonly active: boolean;
  /** Replaces the line with `text` (at most every `minIntervalMs`, unless `force`). */
  update(text: string, force?: boolean): void;
  /** Erases the line; further updates are ignored. */
  done(): void;
}

export interface ProgressOptions {
  /** Fewest milliseconds between two redraws (default 100); the first one is drawn at once. */
  minIntervalMs?: number;
  /** The clock, for tests (default Date.now). */
  now?: () => number;
}

const CLEAR_LINE = '\r\x1b[K';

/** A display on `stream` (default stderr); does nothing unless `stream.isTTY`. */
export function createProgress(stream: ProgressStream = process.stderr, options: ProgressOptions = {}): Progress {
  const active = stream.isTTY === true;
  const minIntervalMs = options.minIntervalMs ?? 100;
  const now = options.now ?? Date.now;
  let last = -Infinity;
  let shown = '';
  let finished = false;
  return {
    active,
    update(text: string, force = false) {
      if (!active || finished) return;
      const t = now();
      if (!force && t - last < minIntervalMs) return;
      const line = fitLine(text, stream.columns);
      if (line === shown) return;
      last = t;
      shown = line;
      stream.write(CLEAR_LINE + line);
    },
    done() {
      if (!active || finished) return;
      finished = true;
      if (shown !== '') stream.write(CLEAR_LINE);
    },
  };
}

/**
 * One line that fits the terminal: newlines become spaces and a line wider than `columns` - 1
 * (the last column would wrap on some terminals) is cut with an ellipsis.
 */
export function fitLine(text: string, columns?: number): string {
  const line = text.replace(/\s*\n\s*/g, ' ');
  const width = columns !== undefined && columns > 1 ? columns - 1 : Infinity;
  const chars = [...line];
  if (chars.length <= width) return line;
  return chars.slice(0, Math.max(width - 1, 0)).join('') + '…';
}

/** "12 s of 30 s": elapsed and total whole seconds. */
export function secondsOf(elapsedMs: number, totalMs: number): string {
  return `${Math.min(Math.floor(elapsedMs / 1000), Math.ceil(totalMs / 1000))} s of ${Math.ceil(totalMs / 1000)} s`;
}
