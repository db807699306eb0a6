// Pubsub over Postgres LISTEN/NOTIFY. Subscriptions live on one dedicated connection (not from the pool: a
// pooled connection would be handed to others and lose its LISTENs). Publishing goes through the pool.
//
// NOTIFY is fire-and-forget: anything sent while the LISTEN connection is down is lost. So after every
// reconnect each subscriber's onDropped runs, and it re-syncs from the tables. A watchdog pings a private
// channel and re-establishes the connection when the ping does not come back (a half-open TCP connection
// or a stuck backend looks healthy but delivers nothing).
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { Backoff } from '../client/backoff.js';
import type { Logger } from '../log.js';
import { DerpmeshError } from '../errors.js';

/** Postgres rejects NOTIFY payloads of 8000 bytes or more (the default page size limits the queue entry). */
export const maxPayloadBytes = 7_999;
/** Channel names are identifiers: at most NAMEDATALEN - 1 = 63 bytes, longer ones are silently truncated. */
const maxChannelBytes = 63;

export interface PubsubOptions {
  /** postgres://… for the dedicated LISTEN connection. */
  connectionString: string;
  /** Publishing goes through this pool. */
  pool: pg.Pool;
  logger: Logger;
  /** First reconnect delay; doubles after each failure. Default 1 s. */
  backoffInitialMs?: number;
  /** Longest reconnect delay. Default 60 s. */
  backoffMaxMs?: number;
  /** How often the watchdog pings the LISTEN connection. Default 15 s. */
  watchdogIntervalMs?: number;
  /** A ping not back within this long means the LISTEN connection is dead. Default 5 s. */
  watchdogTimeoutMs?: number;
  /** Give up opening the LISTEN connection after this long. Default 5 s. */
  connectionTimeoutMs?: number;
}

export interface PubsubState {
  /** The LISTEN connection is up and every channel is listened to. */
  connected: boolean;
  /** Successful reconnects since start (the first connection is not one). */
  reconnects: number;
  lastReconnectAt?: Date;
  /** Why the connection was last lost. */
  lastError?: string;
}

export interface Subscriber {
  onMessage(payload: string): void;
  /** Messages may have been dropped while the connection was down: re-sync from the tables. */
  onDropped?(): void;
}

/** The application_name of the LISTEN connection, to find it in pg_stat_activity. */
export const listenerApplicationName = 'derpmesh-pubsub';

export class Pubsub {
  readonly #options: Required<Omit<PubsubOptions, 'pool' | 'logger' | 'connectionString'>>;
  readonly #connectionString: string;
  readonly #pool: pg.Pool;
  readonly #logger: Logger;
  readonly #subscribers = new Map<string, Set<Subscriber>>();
  /** LISTENs sent but not yet confirmed, by channel. */
  readonly #pendingListens = new Map<string, Promise<void>>();
  /** Private to this instance, so other nodes' pings are not delivered here. */
  readonly #watchdogChannel = `derpmesh_watchdog_${randomBytes(8).toString('hex')}`;

  // Connection state: the current client is the only one whose events count.
  #client: pg.Client | undefined;
  #connected = false;
  #closed = false;
  readonly #backoff: Backoff;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #reconnects = 0;
  #lastReconnectAt: Date | undefined;
  #lastError: string | undefined;

  // Watchdog state.
  #watchdogTimer: NodeJS.Timeout | undefined;
  #pingSequence = 0;
  #pendingPing: { sequence: number; timer?: NodeJS.Timeout } | undefined;

  constructor(options: PubsubOptions) {
    this.#connectionString = options.connectionString;
    this.#pool = options.pool;
    this.#logger = options.logger.child({ component: 'pubsub' });
    this.#options = {
      backoffInitialMs: options.backoffInitialMs ?? 1_000,
      backoffMaxMs: options.backoffMaxMs ?? 60_000,
      watchdogIntervalMs: options.watchdogIntervalMs ?? 15_000,
      watchdogTimeoutMs: options.watchdogTimeoutMs ?? 5_000,
      connectionTimeoutMs: options.connectionTimeoutMs ?? 5_000,
    };
    this.#backoff = new Backoff({ minDelayMs: this.#options.backoffInitialMs, maxDelayMs: this.#options.backoffMaxMs });
  }

  /** Opens the LISTEN connection; rejects if the first attempt fails. Later failures reconnect on their own. */
  async start(): Promise<void> {
    this.#assertOpen();
    await this.#establish();
    this.#watchdogTimer = setInterval(() => this.#ping(), this.#options.watchdogIntervalMs);
    this.#watchdogTimer.unref();
  }

  state(): PubsubState {
    return { connected: this.#connected, reconnects: this.#reconnects, lastReconnectAt: this.#lastReconnectAt, lastError: this.#lastError };
  }

  /**
   * Calls `subscriber` for every message on `channel` until the returned function is called. Resolves once
   * the channel is listened to, so anything published afterwards is delivered — or, if the connection is
   * down, reported through onDropped when it is back.
   */
  async subscribe(channel: string, subscriber: Subscriber | ((payload: string) => void)): Promise<() => void> {
    this.#assertOpen();
    checkChannel(channel);
    const entry: Subscriber = typeof subscriber === 'function' ? { onMessage: subscriber } : subscriber;
    let set = this.#subscribers.get(channel);
    if (!set) {
      set = new Set();
      this.#subscribers.set(channel, set);
      this.#pendingListens.set(
        channel,
        this.#listen(channel).finally(() => this.#pendingListens.delete(channel)),
      );
    }
    set.add(entry);
    // A second subscriber to a channel whose LISTEN is still in flight waits for it too.
    await this.#pendingListens.get(channel);
    return () => {
      const current = this.#subscribers.get(channel);
      if (!current?.delete(entry) || current.size > 0) return;
      this.#subscribers.delete(channel);
      void this.#unlisten(channel);
    };
  }

  async publish(channel: string, payload: string): Promise<void> {
    this.#assertOpen();
    checkChannel(channel);
    const bytes = Buffer.byteLength(payload);
    if (bytes > maxPayloadBytes) {
      throw new DerpmeshError(
        'DERPMESH_ERR_PUBSUB_PAYLOAD_TOO_LARGE',
        `pubsub payload on channel ${channel} is ${bytes} bytes; Postgres NOTIFY allows at most ${maxPayloadBytes}. Publish an id and let subscribers read the rest from the tables`,
        bytes,
      );
    }
    await this.#pool.query('SELECT pg_notify($1, $2)', [channel, payload]);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#watchdogTimer);
    clearTimeout(this.#reconnectTimer);
    this.#clearPendingPing();
    this.#subscribers.clear();
    const client = this.#client;
    this.#client = undefined;
    this.#connected = false;
    if (client) await endQuietly(client);
  }

  #assertOpen(): void {
    if (this.#closed) throw new DerpmeshError('DERPMESH_ERR_PUBSUB_CLOSED', 'pubsub is closed');
  }

  async #establish(): Promise<void> {
    const client = new pg.Client({
      connectionString: this.#connectionString,
      connectionTimeoutMillis: this.#options.connectionTimeoutMs,
      keepAlive: true,
      application_name: listenerApplicationName,
    });
    client.on('error', (error) => this.#lost(client, error));
    client.on('end', () => this.#lost(client, new Error('connection ended')));
    client.on('notification', (message) => this.#deliver(message.channel, message.payload ?? ''));
    try {
      await client.connect();
      // Bounded: a LISTEN that hangs would otherwise leave us "connecting" forever.
      await withTimeout(
        client.query(`LISTEN ${client.escapeIdentifier(this.#watchdogChannel)}`),
        this.#options.connectionTimeoutMs,
        'LISTEN',
      );
      for (const channel of this.#subscribers.keys()) {
        await withTimeout(client.query(`LISTEN ${client.escapeIdentifier(channel)}`), this.#options.connectionTimeoutMs, 'LISTEN');
      }
    } catch (error) {
      void endQuietly(client);
      throw error;
    }
    if (this.#closed) {
      await endQuietly(client);
      return;
    }
    this.#client = client;
    this.#connected = true;
  }

  /** The connection failed, ended, or the watchdog gave up on it: drop it and reconnect with backoff. */
  #lost(client: pg.Client, error: Error): void {
    if (client !== this.#client) return;
    this.#client = undefined;
    this.#connected = false;
    this.#lastError = error.message;
    this.#clearPendingPing();
    void endQuietly(client);
    if (this.#closed) return;
    this.#scheduleReconnect('pubsub connection lost; reconnecting', error.message);
  }

  #scheduleReconnect(why: string, error: string): void {
    if (this.#closed || this.#reconnectTimer) return;
    const delay = this.#backoff.next();
    this.#logger.warn(why, { error, retryInMs: delay });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = undefined;
      this.#reconnect();
    }, delay);
  }

  /**
   * The database answers again (another connection got through): the LISTEN connection tries now
   * instead of at its backoff's next attempt, which after a long outage can be many seconds away.
   */
  reconnectNow(): void {
    if (this.#closed || this.#connected || !this.#reconnectTimer) return;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = undefined;
    this.#reconnect();
  }

  #reconnect(): void {
    this.#establish().then(
      () => {
        if (this.#closed) return;
        this.#backoff.reset();
        this.#reconnects += 1;
        this.#lastReconnectAt = new Date();
        this.#logger.info('pubsub reconnected; subscribers will re-sync', { reconnects: this.#reconnects });
        this.#notifyDropped();
      },
      (error: unknown) => {
        this.#lastError = error instanceof Error ? error.message : String(error);
        this.#scheduleReconnect('pubsub reconnect failed', this.#lastError);
      },
    );
  }

  #notifyDropped(): void {
    for (const set of [...this.#subscribers.values()]) {
      for (const subscriber of [...set]) {
        try {
          subscriber.onDropped?.();
        } catch (error) {
          this.#logger.error('pubsub subscriber failed handling dropped messages', { error });
        }
      }
    }
  }

  #deliver(channel: string, payload: string): void {
    if (channel === this.#watchdogChannel) {
      if (this.#pendingPing && payload === String(this.#pendingPing.sequence)) this.#clearPendingPing();
      return;
    }
    for (const subscriber of [...(this.#subscribers.get(channel) ?? [])]) {
      try {
        subscriber.onMessage(payload);
      } catch (error) {
        this.#logger.error('pubsub subscriber failed', { channel, error });
      }
    }
  }

  async #listen(channel: string): Promise<void> {
    const client = this.#client;
    if (!client) return; // #establish LISTENs to every subscribed channel when it connects.
    await client.query(`LISTEN ${client.escapeIdentifier(channel)}`).catch((error: Error) => this.#lost(client, error));
  }

  async #unlisten(channel: string): Promise<void> {
    const client = this.#client;
    if (!client) return;
    await client.query(`UNLISTEN ${client.escapeIdentifier(channel)}`).catch((error: Error) => this.#lost(client, error));
  }

  /** Publishes a numbered ping to our private channel through the pool; the LISTEN connection must echo it. */
  #ping(): void {
    const client = this.#client;
    if (!client || this.#pendingPing) return;
    const sequence = ++this.#pingSequence;
    this.#pendingPing = { sequence };
    this.#pool.query('SELECT pg_notify($1, $2)', [this.#watchdogChannel, String(sequence)]).then(
      () => {
        // The clock starts once the ping is sent, so a slow or busy pool cannot pass for a dead listener.
        const pending = this.#pendingPing;
        if (pending?.sequence !== sequence) return;
        pending.timer = setTimeout(() => {
          if (this.#pendingPing?.sequence !== sequence) return;
          this.#logger.warn('pubsub watchdog: ping not received; re-establishing the LISTEN connection', {
            timeoutMs: this.#options.watchdogTimeoutMs,
          });
          this.#lost(client, new Error(`watchdog ping not received within ${this.#options.watchdogTimeoutMs} ms`));
        }, this.#options.watchdogTimeoutMs);
        pending.timer.unref();
      },
      (error: Error) => {
        // The pool cannot reach Postgres either; that says nothing about the LISTEN connection, so skip this round.
        if (this.#pendingPing?.sequence === sequence) this.#clearPendingPing();
        this.#logger.debug('pubsub watchdog: ping not sent', { error });
      },
    );
  }

  #clearPendingPing(): void {
    clearTimeout(this.#pendingPing?.timer);
    this.#pendingPing = undefined;
  }
}

function checkChannel(channel: string): void {
  const bytes = Buffer.byteLength(channel);
  if (bytes === 0 || bytes > maxChannelBytes) {
    throw new DerpmeshError(
      'DERPMESH_ERR_PUBSUB_CHANNEL',
      `pubsub channel name must be 1 to ${maxChannelBytes} bytes, got ${bytes}`,
      channel,
    );
  }
}

async function withTimeout<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Ends a client we no longer want; a dead connection may never answer, so nothing waits on it for long. */
async function endQuietly(client: pg.Client): Promise<void> {
  client.removeAllListeners('notification');
  client.removeAllListeners('end');
  client.on('error', () => {});
  await withTimeout(client.end(), 1_000, 'closing the pubsub connection').catch(() => {});
}
