// A node's accept limits: its flags applied to the relay at start, refusals logged, and the
// cluster's own nodes kept out of the per-address cap. Mesh links are recognised only after the
// DERP handshake, long after a connection is accepted, so the exemption goes by source address:
// loopback (always, see `Relay.setAcceptExempt`) and the addresses of the peers' relay URLs, from
// Postgres and `--mesh-with`, host names resolved.
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';

import type { AcceptConfig } from './config.js';
import type { Logger } from './log.js';
import { native } from './native.js';
import type { AcceptLimits, Relay } from './relay.js';

/**
 * `--max-connections auto`: this share of the process's open-file limit (which Node raises to the
 * hard limit at start). The rest stays for Postgres, mesh links, hand-offs to Node and the files
 * the node opens, so a flood ends in refusals instead of failed `accept`s everywhere.
 */
export const AUTO_MAX_CONNECTIONS_SHARE = 0.9;

/** The setting to change for each refusal reason the core reports. */
const settingOf: Record<string, string> = {
  'rate-limit': '--accept-connection-limit',
  'max-connections': '--max-connections',
  'max-connections-per-ip': '--max-connections-per-ip',
};

/** The relay's limits for `config`; `auto` from `openFiles` (none when that is unknown or unlimited). */
export function acceptLimitsOf(config: AcceptConfig, openFiles: number | null = native.openFileLimit()): AcceptLimits {
  const auto = openFiles === null ? undefined : Math.max(1, Math.floor(openFiles * AUTO_MAX_CONNECTIONS_SHARE));
  return {
    acceptConnectionLimit: config.connectionLimit,
    acceptConnectionBurst: config.connectionBurst,
    maxConnections: config.maxConnections === 'auto' ? auto : config.maxConnections,
    maxConnectionsPerIp: config.maxConnectionsPerIp,
    tcpKeepaliveMs: config.tcpKeepaliveMs,
    tcpUserTimeoutMs: config.tcpUserTimeoutMs,
  };
}

/**
 * Logs the limits in force, what the platform leaves out (debug), and each refusal the core
 * reports (at most one per reason every 10 s) with the source address and the setting to change.
 */
export function logAcceptLimits(relay: Relay, log: Logger, limits: AcceptLimits): void {
  log.info('accept limits', { ...limits });
  if (process.platform !== 'linux' && (limits.tcpKeepaliveMs !== 0 || limits.tcpUserTimeoutMs !== 0)) {
    log.debug('TCP keepalive and user timeout are set on Linux only: the system settings apply here', { platform: process.platform });
  }
  relay.onAcceptRefused((r) => {
    const more = r.suppressed > 0 ? { notLoggedSincePrevious: r.suppressed } : {};
    log.warn(`connection refused: over ${settingOf[r.reason] ?? r.reason}`, { remote: r.remoteAddress, reason: r.reason, ...more });
  });
}

/** The IP addresses of relay URLs: literals as they are, host names resolved (skipped when they do not resolve). */
export async function addressesOf(urls: readonly string[]): Promise<string[]> {
  const addresses = new Set<string>();
  await Promise.all(
    urls.map(async (url) => {
      let host: string;
      try {
        host = new URL(url).hostname.replace(/^\[(.*)\]$/, '$1');
      } catch {
        return;
      }
      if (isIP(host) !== 0) {
        addresses.add(host);
        return;
      }
      try {
        for (const { address } of await lookup(host, { all: true })) addresses.add(address);
      } catch {
        // Not resolvable now: its mesh link cannot connect either; the next peer change retries.
      }
    }),
  );
  return [...addresses];
}

/** Keeps the relay's exempt addresses on the peers' relay URLs; the latest call wins. */
export class PeerExemption {
  readonly #relay: Relay;
  #generation = 0;
  constructor(relay: Relay) {
    this.#relay = relay;
  }

  async update(peerUrls: readonly string[]): Promise<void> {
    const generation = ++this.#generation;
    const addresses = await addressesOf(peerUrls);
    if (generation === this.#generation) this.#relay.setAcceptExempt(addresses);
  }
}
