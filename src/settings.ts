// Cluster settings: values kept in Postgres (table site_config, keys `setting.<name>`) that every
// node applies live, without a restart. A node's flags and environment give its defaults; a value
// set in Postgres overrides them on every node. `derpmesh config set NAME VALUE` writes one and
// notifies the channel below; each node re-reads all settings on the notification (and after its
// LISTEN connection comes back, since notifications sent meanwhile are lost) and applies them.
import type pg from 'pg';

import { configError } from './errors.js';
import type { Logger } from './log.js';
import type { Pubsub } from './postgres/pubsub.js';

/** The NOTIFY channel that announces a change (the payload is the setting's name). */
export const settingsChannel = 'derpmesh_settings';
const keyPrefix = 'setting.';

export type SettingValue = number | string | boolean;

export interface SettingSpec {
  description: string;
  /** What a valid value looks like, for error messages. */
  expected: string;
  /** The value, or undefined when `text` is not one. */
  parse(text: string): SettingValue | undefined;
}

const byteUnits: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
};

/** A byte count: `1500000`, `1.5MB`, `64KiB` (SI units are powers of 1000, IEC of 1024). */
export function parseBytes(text: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(text.trim());
  if (!m) return undefined;
  const unit = byteUnits[m[2]!.toLowerCase()];
  if (unit === undefined) return undefined;
  const value = Math.round(Number(m[1]) * unit);
  return Number.isSafeInteger(value) ? value : undefined;
}

/** An http(s) URL without user info or fragment, or `''`/`none`/`off` for none. */
function parseOptionalUrl(text: string): string | undefined {
  const t = text.trim();
  if (t === '' || t === 'none' || t === 'off') return '';
  try {
    const url = new URL(t);
    if (!['http:', 'https:'].includes(url.protocol) || url.username !== '' || url.password !== '' || url.hash !== '') return undefined;
    return url.href;
  } catch {
    return undefined;
  }
}

/** `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off` (flags and settings alike). */
export function parseBool(text: string): boolean | undefined {
  const t = text.trim().toLowerCase();
  if (['true', '1', 'yes', 'on'].includes(t)) return true;
  if (['false', '0', 'no', 'off'].includes(t)) return false;
  return undefined;
}

/** A number at least 0 (whole when `whole`); `0` means none / the default. */
function parseCount(whole: boolean): (text: string) => number | undefined {
  return (text) => {
    const t = text.trim();
    if (!/^\d+(\.\d+)?$/.test(t)) return undefined;
    const n = Number(t);
    return Number.isFinite(n) && (!whole || Number.isSafeInteger(n)) ? n : undefined;
  };
}

export const settings = {
  'client-rate-limit': {
    description:
      'Bytes per second each client connection may send; 0 = no limit. Enforced by reading slower (TCP backpressure), never by dropping; mesh peers are exempt. Announced to clients in ServerInfo.',
    expected: 'bytes per second, e.g. 1000000, 1.5MB or 0 (no limit)',
    parse: parseBytes,
  },
  'client-rate-burst': {
    description: 'Bytes a client may send at once above its rate (the token bucket depth); raised to one largest frame (65,573 bytes).',
    expected: 'bytes, e.g. 131072 or 128KiB',
    parse: parseBytes,
  },
  'accept-connection-limit': {
    description: "Connections each node accepts per second (a token bucket, derper's --accept-connection-limit); 0 = unlimited.",
    expected: 'connections per second, e.g. 50 or 0.5, or 0 (unlimited)',
    parse: parseCount(false),
  },
  'accept-connection-burst': {
    description: "Connections accepted at once before accept-connection-limit applies; 0 = one second's worth.",
    expected: 'a whole number of connections, or 0',
    parse: parseCount(true),
  },
  'max-connections-per-ip': {
    description: "Connections each node holds from one source address (loopback and the cluster's own nodes exempt); 0 = unlimited.",
    expected: 'a whole number of connections, or 0 (unlimited)',
    parse: parseCount(true),
  },
  'verify-client-url': {
    description:
      "Client admission: the URL each client (not mesh peers) is POSTed to during its handshake, derper's --verify-client-url (Headscale's /verify works); `none` turns it off.",
    expected: 'an http(s) URL such as https://headscale.example.com/verify, or none',
    parse: parseOptionalUrl,
  },
  'verify-client-url-fail-open': {
    description: 'Admit clients while the verify URL is unavailable (unreachable, slow, 5xx): true (as derper) or false.',
    expected: 'true or false',
    parse: parseBool,
  },
} as const satisfies Record<string, SettingSpec>;

export type SettingName = keyof typeof settings;
export type SettingValues = Partial<Record<SettingName, SettingValue>>;

export function isSettingName(name: string): name is SettingName {
  return Object.hasOwn(settings, name);
}

/** Validates `text` for `name`; a clear error names what was wrong and what is expected. */
export function parseSetting(name: string, text: string): SettingValue {
  if (!isSettingName(name)) {
    throw configError(`unknown setting ${JSON.stringify(name)}; settings: ${Object.keys(settings).join(', ')}`, name);
  }
  const spec: SettingSpec = settings[name];
  const value = spec.parse(text);
  if (value === undefined) throw configError(`setting ${name} must be ${spec.expected}, got ${JSON.stringify(text)}`, text);
  return value;
}

/** Every setting stored in Postgres. Malformed rows (written by hand) are reported, not applied. */
export async function readSettings(pool: pg.Pool): Promise<{ values: SettingValues; invalid: string[] }> {
  const result = await pool.query<{ key: string; value: string }>('SELECT key, value FROM site_config WHERE key LIKE $1', [
    `${keyPrefix}%`,
  ]);
  const values: SettingValues = {};
  const invalid: string[] = [];
  for (const row of result.rows) {
    const name = row.key.slice(keyPrefix.length);
    if (!isSettingName(name)) {
      invalid.push(`unknown setting ${name}`);
      continue;
    }
    const parsed = (settings[name] as SettingSpec).parse(row.value);
    if (parsed === undefined) invalid.push(`setting ${name} = ${JSON.stringify(row.value)} is not ${settings[name].expected}`);
    else values[name] = parsed;
  }
  return { values, invalid };
}

/** Stores `value` for `name` (validated) and notifies every node, in one transaction. */
export async function writeSetting(pool: pg.Pool, name: string, text: string): Promise<SettingValue> {
  const value = parseSetting(name, text);
  await inTransaction(pool, async (client) => {
    await client.query('INSERT INTO site_config (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value', [
      keyPrefix + name,
      String(value),
    ]);
    await client.query('SELECT pg_notify($1, $2)', [settingsChannel, name]);
  });
  return value;
}

/** Removes `name` from Postgres: nodes go back to their own flags. Returns whether it was set. */
export async function deleteSetting(pool: pg.Pool, name: string): Promise<boolean> {
  if (!isSettingName(name)) {
    throw configError(`unknown setting ${JSON.stringify(name)}; settings: ${Object.keys(settings).join(', ')}`, name);
  }
  let deleted = false;
  await inTransaction(pool, async (client) => {
    const result = await client.query('DELETE FROM site_config WHERE key = $1', [keyPrefix + name]);
    deleted = (result.rowCount ?? 0) > 0;
    await client.query('SELECT pg_notify($1, $2)', [settingsChannel, name]);
  });
  return deleted;
}

async function inTransaction(pool: pg.Pool, work: (client: pg.PoolClient) => Promise<void>): Promise<void> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await work(client);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

export interface SettingState {
  name: SettingName;
  value: SettingValue;
  /** `postgres` when the cluster setting is in force, else `node` (this node's flag, env or default). */
  source: 'postgres' | 'node';
}

export interface LiveSettingsOptions {
  pool: pg.Pool;
  pubsub: Pubsub;
  logger: Logger;
  /** This node's own values (flags, environment, defaults), in force where Postgres sets none. */
  defaults: Record<SettingName, SettingValue>;
  /** Applies the values in force; called at start and after every change. */
  apply(values: Record<SettingName, SettingValue>): void;
}

/** Keeps a node's settings in step with Postgres (see the top of this file). */
export class LiveSettings {
  readonly #options: LiveSettingsOptions;
  #state: SettingState[];
  #applied = '';
  #refreshing: Promise<void> | undefined;
  #again = false;
  #unsubscribe: (() => void) | undefined;

  constructor(options: LiveSettingsOptions) {
    this.#options = options;
    this.#state = (Object.keys(settings) as SettingName[]).map((name) => ({ name, value: options.defaults[name], source: 'node' }));
  }

  /** Reads the settings once and applies them, then follows every change. */
  async start(): Promise<void> {
    // This node's own values first: they hold even if Postgres cannot be read now.
    this.#applied = JSON.stringify(this.#state);
    this.#options.apply(Object.fromEntries(this.#state.map((s) => [s.name, s.value])) as Record<SettingName, SettingValue>);
    this.#unsubscribe = await this.#options.pubsub.subscribe(settingsChannel, {
      onMessage: () => void this.refresh(),
      onDropped: () => void this.refresh(),
    });
    await this.refresh();
  }

  stop(): void {
    this.#unsubscribe?.();
  }

  /** The values in force and where each comes from. */
  state(): SettingState[] {
    return this.#state.map((s) => ({ ...s }));
  }

  /** Re-reads Postgres and applies what changed. Concurrent calls coalesce into one more read. */
  refresh(): Promise<void> {
    if (this.#refreshing) {
      this.#again = true;
      return this.#refreshing;
    }
    this.#refreshing = (async () => {
      do {
        this.#again = false;
        await this.#readAndApply();
      } while (this.#again);
    })().finally(() => (this.#refreshing = undefined));
    return this.#refreshing;
  }

  async #readAndApply(): Promise<void> {
    const { logger, defaults } = this.#options;
    let stored: Awaited<ReturnType<typeof readSettings>>;
    try {
      stored = await readSettings(this.#options.pool);
    } catch (err) {
      // The values in force stay; the next notification or reconnect reads again.
      logger.warn('cluster settings not read from Postgres: the current values stay in force', { error: (err as Error).message });
      return;
    }
    for (const problem of stored.invalid) logger.warn(`cluster setting ignored: ${problem}`);
    const state: SettingState[] = (Object.keys(settings) as SettingName[]).map((name) =>
      stored.values[name] !== undefined
        ? { name, value: stored.values[name]!, source: 'postgres' }
        : { name, value: defaults[name], source: 'node' },
    );
    const key = JSON.stringify(state);
    if (key === this.#applied) return;
    const before = new Map(this.#state.map((s) => [s.name, s]));
    this.#state = state;
    this.#applied = key;
    this.#options.apply(Object.fromEntries(state.map((s) => [s.name, s.value])) as Record<SettingName, SettingValue>);
    for (const s of state) {
      const old = before.get(s.name);
      if (old && (old.value !== s.value || old.source !== s.source)) {
        logger.info(`cluster setting ${s.name} = ${s.value} now in force`, { from: old.value, source: s.source });
      }
    }
  }
}
