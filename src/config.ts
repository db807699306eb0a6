// Every server option, declared once: its flag, environment names, default and description.
// The CLI help, the README table (`derpmesh config-table`) and validation all come from `options`.
import { isIP } from 'node:net';
import { homedir } from 'node:os';
import { join } from 'node:path';

import { configError, DerpmeshError } from './errors.js';
import { relayBase, relayUrl, RelayUrlError, sameUrlKey } from './relay-url.js';
import { parseBool, parseBytes } from './settings.js';

function defaultStateDir(): string {
  return process.getuid?.() === 0 ? '/var/lib/derpmesh' : join(homedir(), '.derpmesh');
}

type Kind = 'string' | 'url' | 'bool' | 'duration' | 'int' | 'address' | 'enum';

interface OptionSpec {
  flag: string;
  env: readonly string[];
  kind: Kind;
  default?: string;
  choices?: readonly string[];
  description: string;
}

export const options = {
  httpAddress: {
    flag: '--http-address',
    env: ['CODER_ADDRESS', 'CODER_HTTP_ADDRESS'],
    kind: 'address',
    default: '127.0.0.1:3000',
    description: 'Address to listen on, e.g. `*:80`, `0.0.0.0:3000`, `127.0.0.1:3000`.',
  },
  accessUrl: {
    flag: '--access-url',
    env: ['CODER_ACCESS_URL'],
    kind: 'url',
    description: 'The load-balanced URL clients use. Default: http://<listen address>.',
  },
  relayUrl: {
    flag: '--derp-server-relay-url',
    env: ['CODER_DERP_SERVER_RELAY_URL'],
    kind: 'url',
    description: "This node's own URL as other nodes reach it, e.g. `http://10.0.0.1:80`. Must differ from the access URL.",
  },
  postgresUrl: {
    flag: '--postgres-url',
    env: ['CODER_PG_CONNECTION_URL'],
    kind: 'string',
    description: 'The one Postgres endpoint of the cluster. Unset: an embedded Postgres in the state directory.',
  },
  derpServerEnable: {
    flag: '--derp-server-enable',
    env: ['CODER_DERP_SERVER_ENABLE'],
    kind: 'bool',
    default: 'true',
    description: 'Run the embedded DERP relay. `false` = custom relays: no relay here, no mesh.',
  },
  derpConfigUrl: {
    flag: '--derp-config-url',
    env: ['CODER_DERP_CONFIG_URL'],
    kind: 'url',
    description: 'URL of a custom relay map (custom relays mode).',
  },
  derpConfigPath: {
    flag: '--derp-config-path',
    env: ['CODER_DERP_CONFIG_PATH'],
    kind: 'string',
    description: 'Path of a custom relay map (custom relays mode).',
  },
  experimental: {
    flag: '--experimental',
    env: ['CODER_EXPERIMENTAL'],
    kind: 'string',
    description: 'Accepted for compatibility; high availability needs no flag.',
  },
  regionId: {
    flag: '--derp-server-region-id',
    env: ['CODER_DERP_SERVER_REGION_ID'],
    kind: 'int',
    default: '999',
    description: 'Region id of the embedded relay; only nodes of the same region are meshed.',
  },
  tlsCertFile: {
    flag: '--tls-cert-file',
    env: ['CODER_TLS_CERT_FILE'],
    kind: 'string',
    description: 'PEM certificate (chain): serve HTTPS. Reloaded when the file changes or on SIGHUP, for new connections only.',
  },
  tlsKeyFile: {
    flag: '--tls-key-file',
    env: ['CODER_TLS_KEY_FILE'],
    kind: 'string',
    description: 'PEM private key for `--tls-cert-file`.',
  },
  tlsSelfSigned: {
    flag: '--tls-self-signed',
    env: ['DERPMESH_TLS_SELF_SIGNED'],
    kind: 'string',
    description:
      'Serve HTTPS with a self-signed certificate made at start for these host names or IP addresses (comma-separated), e.g. for a relay reached by IP; its certificate is written to `<state dir>/tls/self-signed.crt` for clients to trust. Not with `--tls-cert-file`.',
  },
  meshCaFile: {
    flag: '--mesh-ca-file',
    env: ['DERPMESH_MESH_CA_FILE'],
    kind: 'string',
    description: 'PEM CA certificate(s) trusted for https relay URLs of peers, besides the public roots (private CAs).',
  },
  meshWith: {
    flag: '--mesh-with',
    env: ['DERPMESH_MESH_WITH'],
    kind: 'string',
    description:
      "Relays to mesh with besides the peers found in Postgres, e.g. Tailscale `derper` nodes: comma-separated relay URLs (`http://10.0.0.2:3000`) or host names, which mean `https://<host>` as in derper's `--mesh-with`. This node's own address may be in the list.",
  },
  stunAddress: {
    flag: '--stun-address',
    env: ['DERPMESH_STUN_ADDRESS'],
    kind: 'string',
    description:
      'UDP address where this node answers STUN (the Binding requests Tailscale clients use to learn their public address), announced in `/derpmap`. Default: the listen host, port 3478 (taken only if free); `disable` turns STUN off.',
  },
  stunAddresses: {
    flag: '--derp-server-stun-addresses',
    env: ['CODER_DERP_SERVER_STUN_ADDRESSES'],
    kind: 'string',
    description:
      "As in Coder: other STUN servers (`host:port`, comma-separated) announced in `/derpmap` as STUN-only regions; `disable` turns STUN off entirely, this node's included.",
  },
  verifyClientUrl: {
    flag: '--verify-client-url',
    env: ['DERPMESH_VERIFY_CLIENT_URL'],
    kind: 'url',
    description:
      'Client admission, as derper\'s flag: during each client\'s handshake, POST `{"NodePublic":"nodekey:<hex>","Source":"<client IP>"}` to this URL and admit the client only on `{"Allow":true}` (Headscale\'s `/verify` answers this). Mesh peers are never checked. An https URL is verified against the public roots plus `--mesh-ca-file`.',
  },
  verifyClientUrlFailOpen: {
    flag: '--verify-client-url-fail-open',
    env: ['DERPMESH_VERIFY_CLIENT_URL_FAIL_OPEN'],
    kind: 'bool',
    default: 'true',
    description:
      'Admit clients while the verify URL is unavailable: unreachable, no answer in 5 s, 1xx/3xx/5xx, an answer that is not `{"Allow": bool}`, or too many checks waiting. A 4xx answer or `"Allow": false` refuses either way.',
  },
  clientRateLimit: {
    flag: '--client-rate-limit',
    env: ['DERPMESH_CLIENT_RATE_LIMIT'],
    kind: 'string',
    default: '0',
    description:
      "Bytes per second each client may send (e.g. `1MB`); 0 = no limit. Excess is slowed by TCP backpressure, never dropped; mesh peers are exempt. This node's default: `derpmesh config set client-rate-limit` sets it for the whole cluster, live.",
  },
  clientRateBurst: {
    flag: '--client-rate-burst',
    env: ['DERPMESH_CLIENT_RATE_BURST'],
    kind: 'string',
    default: '0',
    description: 'Bytes a client may send at once above its rate (token bucket depth); raised to one largest frame (65,573 bytes).',
  },
  hostname: {
    flag: '--hostname',
    env: ['DERPMESH_HOSTNAME'],
    kind: 'string',
    description: 'Name of this node in the replica registry, logs and warnings. Default: the machine hostname.',
  },
  stateDir: {
    flag: '--state-dir',
    env: ['DERPMESH_STATE_DIR'],
    kind: 'string',
    default: defaultStateDir(),
    description:
      'Where the embedded Postgres keeps its data. Default `~/.derpmesh`; `/var/lib/derpmesh` as root (Postgres runs as its own user and cannot enter /root).',
  },
  heartbeatInterval: {
    flag: '--heartbeat-interval',
    env: ['DERPMESH_HEARTBEAT_INTERVAL'],
    kind: 'duration',
    default: '5s',
    description: 'Replica heartbeat period; a peer silent for 3 heartbeats is stale.',
  },
  latencyThreshold: {
    flag: '--latency-threshold',
    env: ['DERPMESH_LATENCY_THRESHOLD'],
    kind: 'duration',
    default: '10ms',
    description: 'Round trip to a peer or to Postgres above which a warning is raised.',
  },
  shutdownGrace: {
    flag: '--shutdown-grace',
    env: ['DERPMESH_SHUTDOWN_GRACE'],
    kind: 'duration',
    default: '5s',
    description: 'On SIGINT/SIGTERM: time to send Restarting to clients and flush before exiting.',
  },
  shutdownDrainDelay: {
    flag: '--shutdown-drain-delay',
    env: ['DERPMESH_SHUTDOWN_DRAIN_DELAY'],
    kind: 'duration',
    default: '0s',
    description:
      'On SIGINT/SIGTERM: time to stay up draining before clients get Restarting. Meanwhile `/healthz` answers 503 (so load balancers take the node out), new DERP connections are refused with 503 and connected clients keep relaying. `/healthz` answers 503 from the signal until the process exits whatever this is; the Helm chart uses a preStop sleep for the same purpose.',
  },
  queueDepth: {
    flag: '--queue-depth',
    env: ['DERPMESH_QUEUE_DEPTH'],
    kind: 'int',
    default: '512',
    description: 'Packets queued per client before the oldest is dropped.',
  },
  acceptConnectionLimit: {
    flag: '--accept-connection-limit',
    env: ['DERPMESH_ACCEPT_CONNECTION_LIMIT'],
    kind: 'string',
    description:
      "Connections accepted per second, e.g. `50` or `0.5` (derper's flag: a token bucket on accepts). A connection over it is closed at once, before TLS, and counted. Default: unlimited.",
  },
  acceptConnectionBurst: {
    flag: '--accept-connection-burst',
    env: ['DERPMESH_ACCEPT_CONNECTION_BURST'],
    kind: 'int',
    description:
      "Connections accepted at once before `--accept-connection-limit` applies (the bucket's size). Default: one second's worth of the limit (derper's default, unlimited, makes its limit a no-op).",
  },
  maxConnections: {
    flag: '--max-connections',
    env: ['DERPMESH_MAX_CONNECTIONS'],
    kind: 'string',
    default: 'auto',
    description:
      "Connections the relay holds at once (DERP clients and mesh peers; with TLS, every connection to the port); more are closed at once and counted. `auto`: 90 % of the process's open-file limit; `0`: unlimited.",
  },
  maxConnectionsPerIp: {
    flag: '--max-connections-per-ip',
    env: ['DERPMESH_MAX_CONNECTIONS_PER_IP'],
    kind: 'int',
    default: '0',
    description:
      "Connections the relay holds at once from one source address; `0`: unlimited (behind a load balancer or NAT, clients share an address). Loopback and the cluster's nodes (the addresses of their relay URLs) are exempt.",
  },
  tcpKeepaliveTime: {
    flag: '--tcp-keepalive-time',
    env: ['DERPMESH_TCP_KEEPALIVE_TIME'],
    kind: 'duration',
    default: '10m',
    description: "Idle time before TCP keepalive probes on the relay's client connections (derper's default); `0`: the system's setting.",
  },
  tcpUserTimeout: {
    flag: '--tcp-user-timeout',
    env: ['DERPMESH_TCP_USER_TIMEOUT'],
    kind: 'duration',
    default: '15s',
    description:
      "How long sent data may stay unacknowledged before a client connection is dropped (`TCP_USER_TIMEOUT`, Linux; derper's default), so dead peers are found; `0`: the system's setting.",
  },
  logFormat: {
    flag: '--log-format',
    env: ['DERPMESH_LOG_FORMAT'],
    kind: 'enum',
    choices: ['text', 'json'],
    default: 'text',
    description: 'Log lines as `text` or `json`.',
  },
  logLevel: {
    flag: '--log-level',
    env: ['DERPMESH_LOG_LEVEL'],
    kind: 'enum',
    choices: ['debug', 'info', 'warn', 'error'],
    default: 'info',
    description: 'Least severe level logged.',
  },
} as const satisfies Record<string, OptionSpec>;

export type OptionName = keyof typeof options;

export interface ServerConfig {
  listenHost: string;
  listenPort: number;
  accessUrl: URL;
  relayUrl?: URL;
  postgresUrl?: string;
  derpServerEnable: boolean;
  derpConfigUrl?: URL;
  derpConfigPath?: string;
  experimental?: string;
  regionId: number;
  tlsCertFile?: string;
  tlsKeyFile?: string;
  /** Host names or IP addresses of a self-signed certificate made at start. */
  tlsSelfSigned?: string[];
  meshCaFile?: string;
  /** Relay base URLs (no trailing slash, no `/derp`) meshed with in addition to the Postgres peers. */
  meshWith: string[];
  /** Client admission: the URL asked about each client, and whether to admit while it is unavailable. */
  verifyClientUrl?: URL;
  verifyClientUrlFailOpen: boolean;
  /** Where to answer STUN; `explicit` when configured (a failure to bind stops the node), else the default. */
  stun?: { host: string; port: number; explicit: boolean };
  /** Other STUN servers for the DERP map (Coder's CODER_DERP_SERVER_STUN_ADDRESSES). */
  stunServers: { host: string; port: number }[];
  /** Per-client receive limit, bytes/s (0 = none) and burst bytes: defaults that Postgres settings override. */
  clientRateLimit: number;
  clientRateBurst: number;
  hostname?: string;
  stateDir: string;
  heartbeatIntervalMs: number;
  latencyThresholdMs: number;
  shutdownGraceMs: number;
  /** Time between the stop signal (`/healthz` 503 from then on) and the Restarting frames. */
  shutdownDrainDelayMs: number;
  queueDepth: number;
  /** Accept limits and TCP timeouts of the relay's connections (`src/accept-limits.ts` applies them). */
  accept: AcceptConfig;
  logFormat: 'text' | 'json';
  logLevel: 'debug' | 'info' | 'warn' | 'error';
  /** Where each value came from, for the startup log (never values of secrets). */
  sources: Partial<Record<OptionName, string>>;
}

/** Splits argv into `--flag value` / `--flag=value` pairs; unknown flags are an error naming them. */
export function parseFlags(argv: readonly string[]): Partial<Record<OptionName, string>> {
  const byFlag = new Map<string, OptionName>(Object.entries(options).map(([name, spec]) => [spec.flag as string, name as OptionName]));
  const out: Partial<Record<OptionName, string>> = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.indexOf('=');
    const flag = eq >= 0 ? arg.slice(0, eq) : arg;
    const name = byFlag.get(flag);
    if (!name) throw configError(`unknown option ${flag}; run \`derpmesh server --help\` for the list`, flag);
    let value: string | undefined = eq >= 0 ? arg.slice(eq + 1) : undefined;
    if (value === undefined) {
      const next = argv[i + 1];
      if (options[name].kind === 'bool' && (next === undefined || next.startsWith('--'))) value = 'true';
      else if (next === undefined) throw configError(`option ${flag} needs a value`, flag);
      else value = argv[++i];
    }
    out[name] = value;
  }
  return out;
}

export function parseDuration(text: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!m) return undefined;
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 'ms') as 'ms' | 's' | 'm' | 'h'];
  return Number(m[1]) * unit;
}

function describe(name: OptionName): string {
  const spec: OptionSpec = options[name];
  return [spec.flag, ...spec.env].join(' / ');
}

function parseHttpUrl(name: OptionName, text: string, plain = false): URL {
  try {
    return relayUrl(text, { plain });
  } catch (err) {
    if (!(err instanceof RelayUrlError)) throw err;
    const got = JSON.stringify(text);
    switch (err.reason) {
      case 'syntax':
        throw configError(`${describe(name)} must be an http(s) URL like http://10.0.0.1:3000, got ${got}`, text);
      case 'scheme':
        throw configError(`${describe(name)} must use http or https, got ${new URL(text).protocol.replace(':', '')} in ${got}`, text);
      case 'extras':
        throw configError(
          `${describe(name)} must be a plain URL like http://10.0.0.2:3000, without user info, query or fragment, got ${got}`,
          text,
        );
    }
  }
}

/** Reads options from flags (first) and the environment, validates them, and derives defaults. */
export function loadConfig(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): ServerConfig {
  const flags = parseFlags(argv);
  const raw: Partial<Record<OptionName, string>> = {};
  const sources: Partial<Record<OptionName, string>> = {};
  for (const name of Object.keys(options) as OptionName[]) {
    const spec: OptionSpec = options[name];
    const fromEnv = spec.env.find((e) => env[e] !== undefined && env[e] !== '');
    if (flags[name] !== undefined) {
      raw[name] = flags[name];
      sources[name] = spec.flag;
    } else if (fromEnv) {
      raw[name] = env[fromEnv];
      sources[name] = fromEnv;
    } else if (spec.default !== undefined) {
      raw[name] = spec.default;
      sources[name] = 'default';
    }
  }
  const value = <T>(name: OptionName, parse: (text: string) => T | undefined, expected: string): T | undefined => {
    const text = raw[name];
    if (text === undefined) return undefined;
    const parsed = parse(text);
    if (parsed === undefined) throw configError(`${describe(name)} must be ${expected}, got ${JSON.stringify(text)}`, text);
    return parsed;
  };
  const durationMs = (name: OptionName) => value(name, parseDuration, 'a duration like 500ms, 5s or 1m')!;
  const positiveInt = (name: OptionName) =>
    value(name, (t) => (/^\d+$/.test(t) && Number(t) > 0 ? Number(t) : undefined), 'a positive integer')!;
  const oneOf = <T extends string>(name: OptionName) => {
    const choices = (options[name] as OptionSpec).choices!;
    return value(name, (t) => (choices.includes(t) ? (t as T) : undefined), `one of ${choices.join(', ')}`)!;
  };

  const [listenHost, listenPort] = value('httpAddress', parseAddress, 'host:port, e.g. *:80 or 127.0.0.1:3000')!;
  const accessUrl =
    raw.accessUrl !== undefined
      ? parseHttpUrl('accessUrl', raw.accessUrl)
      : new URL(`http://${listenHost === '0.0.0.0' ? '127.0.0.1' : listenHost}:${listenPort}`);
  const relayUrl = raw.relayUrl !== undefined ? parseHttpUrl('relayUrl', raw.relayUrl) : undefined;
  const derpServerEnable = value('derpServerEnable', parseBool, 'true or false')!;
  if (relayUrl && derpServerEnable && sameUrlKey(relayUrl) === sameUrlKey(accessUrl)) {
    throw new DerpmeshError(
      'DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL',
      `the relay URL (${relayUrl.href}) equals the access URL: nodes would mesh through the load balancer and reach random nodes. ` +
        `Set CODER_DERP_SERVER_RELAY_URL to this node's own address (e.g. http://<node IP>:<port>), not the load-balanced one.`,
      relayUrl.href,
    );
  }
  const tlsCertFile = raw.tlsCertFile;
  const tlsKeyFile = raw.tlsKeyFile;
  if ((tlsCertFile === undefined) !== (tlsKeyFile === undefined)) {
    throw configError('--tls-cert-file and --tls-key-file go together: set both or neither', tlsCertFile ?? tlsKeyFile);
  }
  const tlsSelfSigned = raw.tlsSelfSigned
    ?.split(',')
    .map((h) => h.trim())
    .filter((h) => h !== '');
  if (tlsSelfSigned !== undefined) {
    if (tlsCertFile !== undefined)
      throw configError(
        '--tls-self-signed and --tls-cert-file exclude each other: serve either your certificate or a generated one',
        raw.tlsSelfSigned,
      );
    const bad = tlsSelfSigned.find(
      (h) => isIP(h) === 0 && !/^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i.test(h),
    );
    if (tlsSelfSigned.length === 0 || bad !== undefined)
      throw configError(
        `${describe('tlsSelfSigned')} must list host names or IP addresses, e.g. derp.example.com,203.0.113.7; got ${JSON.stringify(bad ?? raw.tlsSelfSigned)}`,
        raw.tlsSelfSigned,
      );
  }
  return {
    listenHost,
    listenPort,
    accessUrl,
    relayUrl,
    postgresUrl: raw.postgresUrl,
    derpServerEnable,
    derpConfigUrl: raw.derpConfigUrl !== undefined ? parseHttpUrl('derpConfigUrl', raw.derpConfigUrl) : undefined,
    derpConfigPath: raw.derpConfigPath,
    experimental: raw.experimental,
    regionId: positiveInt('regionId'),
    tlsCertFile,
    tlsKeyFile,
    tlsSelfSigned,
    meshCaFile: raw.meshCaFile,
    meshWith: raw.meshWith !== undefined ? parseMeshWith(raw.meshWith) : [],
    verifyClientUrl: raw.verifyClientUrl !== undefined ? parseVerifyClientUrl(raw.verifyClientUrl) : undefined,
    verifyClientUrlFailOpen: value('verifyClientUrlFailOpen', parseBool, 'true or false')!,
    ...stunConfig(raw.stunAddress, raw.stunAddresses, listenHost),
    clientRateLimit: value('clientRateLimit', parseBytes, 'bytes per second, e.g. 1000000, 1.5MB or 0 (no limit)')!,
    clientRateBurst: value('clientRateBurst', parseBytes, 'bytes, e.g. 131072 or 128KiB')!,
    hostname: raw.hostname,
    stateDir: raw.stateDir!,
    heartbeatIntervalMs: durationMs('heartbeatInterval'),
    latencyThresholdMs: durationMs('latencyThreshold'),
    shutdownGraceMs: durationMs('shutdownGrace'),
    shutdownDrainDelayMs: durationMs('shutdownDrainDelay'),
    queueDepth: positiveInt('queueDepth'),
    accept: acceptConfig(raw),
    logFormat: oneOf('logFormat'),
    logLevel: oneOf('logLevel'),
    sources,
  };
}

/**
 * `--mesh-with`: comma-separated relay URLs or host names, as relay base URLs. A bare `host[:port]`
 * is `https://host[:port]`, the URL derper's own `--mesh-with` dials (`https://<host>/derp`).
 */
function parseMeshWith(text: string): string[] {
  const urls: string[] = [];
  for (const entry of text.split(',').map((e) => e.trim())) {
    if (entry === '') continue;
    const what = `${describe('meshWith')} entry ${JSON.stringify(entry)}`;
    if (!entry.includes('://')) {
      if (entry.includes('/')) {
        const dialHost = entry.slice(entry.indexOf('/') + 1);
        throw configError(
          `${what}: derper's host/dial-host form is not supported; give the address to dial as a URL instead, e.g. https://${dialHost} (its certificate must then be valid for that name)`,
          entry,
        );
      }
      const bad = () =>
        configError(`${what} must be a host name like derp1.example.com[:port] or a relay URL like http://10.0.0.2:3000`, entry);
      if (!/^(?:\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::\d{1,5})?$/i.test(entry)) throw bad();
      try {
        urls.push(new URL(`https://${entry}`).origin);
      } catch {
        throw bad();
      }
      continue;
    }
    // A relay base URL: derper-style `…/derp` URLs name the same relay.
    urls.push(relayBase(parseHttpUrl('meshWith', entry, true)));
  }
  return urls;
}

/** `--verify-client-url`: an http(s) URL, path and query kept, without user info. */
function parseVerifyClientUrl(text: string): URL {
  const url = parseHttpUrl('verifyClientUrl', text.trim());
  if (url.username !== '' || url.password !== '')
    throw configError(`${describe('verifyClientUrl')} must not carry user info (user:password@); the URL is not shown here`);
  url.hash = '';
  return url;
}

/** STUN: this node's listener (default: the listen host, port 3478) and the other servers announced. */
function stunConfig(
  address: string | undefined,
  servers: string | undefined,
  listenHost: string,
): Pick<ServerConfig, 'stun' | 'stunServers'> {
  const off = (t: string | undefined) => t !== undefined && ['', 'disable', 'disabled', 'off', 'false'].includes(t.trim().toLowerCase());
  if (off(servers)) return { stunServers: [] };
  const stunServers = (servers ?? '')
    .split(',')
    .map((e) => e.trim())
    .filter((e) => e !== '')
    .map((entry) => {
      const parsed = parseAddress(entry);
      if (!parsed || parsed[0] === '0.0.0.0' || parsed[1] === 0)
        throw configError(
          `${describe('stunAddresses')} entry ${JSON.stringify(entry)} must be host:port, e.g. stun.example.com:3478`,
          entry,
        );
      return { host: parsed[0], port: parsed[1] };
    });
  if (off(address)) return { stunServers };
  // The default follows the HTTP listen host (a host name there leaves STUN on every address).
  if (address === undefined) {
    return { stun: { host: isIP(listenHost) ? listenHost : '0.0.0.0', port: DEFAULT_STUN_PORT, explicit: false }, stunServers };
  }
  const parsed = parseAddress(address);
  if (!parsed || isIP(parsed[0]) === 0)
    throw configError(
      `${describe('stunAddress')} must be an IP address and port (e.g. 0.0.0.0:3478 or [::]:3478) or disable, got ${JSON.stringify(address)}`,
      address,
    );
  return { stun: { host: parsed[0], port: parsed[1], explicit: true }, stunServers };
}

/** The STUN port Tailscale clients assume. */
export const DEFAULT_STUN_PORT = 3478;

/** `*:80` → 0.0.0.0:80; `[::1]:80`; `host:port`. Port 0 picks a free port. */
function parseAddress(text: string): [string, number] | undefined {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim());
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  const host = m[1] ?? m[2] ?? '';
  return [host === '*' || host === '' ? '0.0.0.0' : host, port];
}

/** Help text for `derpmesh server --help`. */
export function optionsHelp(): string {
  return (Object.keys(options) as OptionName[])
    .map((name) => {
      const spec: OptionSpec = options[name];
      const def = spec.default !== undefined ? ` (default ${spec.default})` : '';
      return `  ${spec.flag}\n      ${spec.description}${def}\n      env: ${spec.env.join(', ')}`;
    })
    .join('\n');
}

/** The README's configuration table, generated from the same declarations. */
export function optionsMarkdownTable(): string {
  const rows = (Object.keys(options) as OptionName[]).map((name) => {
    const spec: OptionSpec = options[name];
    const def = spec.default === undefined || name === 'stateDir' ? '' : `\`${spec.default}\``;
    return `| ${spec.env.map((e) => `\`${e}\``).join(', ')} | \`${spec.flag}\` | ${def} | ${spec.description} |`;
  });
  return ['| env | flag | default | meaning |', '|---|---|---|---|', ...rows].join('\n');
}

/** The relay's accept limits and TCP timeouts as configured; absent limits are none. */
export interface AcceptConfig {
  /** Connections accepted per second. */
  connectionLimit?: number;
  connectionBurst?: number;
  /** `auto`: from the process's open-file limit. */
  maxConnections?: number | 'auto';
  maxConnectionsPerIp?: number;
  /** 0: the system's setting. */
  tcpKeepaliveMs: number;
  tcpUserTimeoutMs: number;
}

/** The largest count or duration (ms) the relay core takes. */
const MAX_U32 = 0xffff_ffff;

function acceptConfig(raw: Partial<Record<OptionName, string>>): AcceptConfig {
  const number = (name: OptionName, expected: string, valid: (n: number) => boolean): number | undefined => {
    const text = raw[name];
    if (text === undefined) return undefined;
    const n = text.trim() === '' ? Number.NaN : Number(text);
    if (!valid(n)) throw configError(`${describe(name)} must be ${expected}, got ${JSON.stringify(text)}`, text);
    return n;
  };
  const whole = (n: number, min: number) => Number.isInteger(n) && n >= min && n <= MAX_U32;
  const cap = (name: OptionName) => number(name, 'a whole number of connections, 0 for unlimited', (n) => whole(n, 0)) || undefined;
  const durationMs = (name: OptionName) => {
    const text = raw[name]!;
    const ms = parseDuration(text);
    if (ms === undefined)
      throw configError(
        `${describe(name)} must be a duration like 15s or 10m (0: the system's setting), got ${JSON.stringify(text)}`,
        text,
      );
    return Math.min(Math.round(ms), MAX_U32);
  };
  return {
    connectionLimit: number('acceptConnectionLimit', 'connections per second above 0, e.g. 50 or 0.5', (n) => Number.isFinite(n) && n > 0),
    connectionBurst: number('acceptConnectionBurst', 'a whole number of connections, at least 1', (n) => whole(n, 1)),
    maxConnections: raw.maxConnections?.trim().toLowerCase() === 'auto' ? 'auto' : cap('maxConnections'),
    maxConnectionsPerIp: cap('maxConnectionsPerIp'),
    tcpKeepaliveMs: durationMs('tcpKeepaliveTime'),
    tcpUserTimeoutMs: durationMs('tcpUserTimeout'),
  };
}
