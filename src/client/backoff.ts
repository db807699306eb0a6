// Reconnect delays: exponential between a floor and a ceiling, with jitter so that the clients of
// a relay that went away do not all come back in the same instant.

export interface BackoffOptions {
  /** First delay (default 250 ms). */
  minDelayMs?: number;
  /** Largest delay (default 10 s). */
  maxDelayMs?: number;
}

export const DEFAULT_MIN_DELAY_MS = 250;
export const DEFAULT_MAX_DELAY_MS = 10_000;

export class Backoff {
  readonly minDelayMs: number;
  readonly maxDelayMs: number;
  #attempt = 0;

  constructor(options: BackoffOptions = {}) {
    this.minDelayMs = options.minDelayMs ?? DEFAULT_MIN_DELAY_MS;
    this.maxDelayMs = Math.max(this.minDelayMs, options.maxDelayMs ?? DEFAULT_MAX_DELAY_MS);
  }

  /** The delay before the next attempt: doubles each time, jittered within its upper half. */
  next(): number {
    const ceiling = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** Math.min(this.#attempt, 30));
    this.#attempt++;
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  reset(): void {
    this.#attempt = 0;
  }
}
