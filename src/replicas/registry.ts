// The replica registry: register this node in Postgres, heartbeat, discover peers (pubsub push +
// polling), probe them, and tell the relay which peers to mesh with. Data flows one way:
// Postgres → registry → `peers` event → relay.
import { EventEmitter } from 'node:events';

import type pg from 'pg';

import type { HealthReport } from '../health.js';
import type { Logger } from '../log.js';
import type { MeshTrust } from '../mesh-trust.js';
import type { Pubsub } from '../postgres/pubsub.js';
import { probeDatabase, probeRelay, type ProbeResult } from './probe.js';
import { fromRow, type Replica, type ReplicaRow } from './replica.js';

/** Pubsub channel carrying the id of a replica that started, stopped or changed its error. */
export const REPLICA_CHANNEL = 'replica';
/** Consecutive probes above the latency threshold before a peer is reported slow. */
export const SLOW_PROBES_TO_WARN = 2;
/** Heartbeats a replica may miss before it is stale. */
export const STALE_AFTER_HEARTBEATS = 3;

export interface SelfDescription {
  id: string;
  hostname: string;
  regionId: number;
  relayUrl: string;
  /** The access URL announced as this region's node in /derpmap; "" when this node runs no embedded relay. */
  accessUrl?: string;
  /** UDP port where this node answers STUN (-1 or absent: none). */
  stunPort?: number;
  version: string;
  primary: boolean;
}

export interface ReplicaRegistryOptions {
  pool: pg.Pool;
  pubsub: Pubsub;
  logger: Logger;
  self: SelfDescription;
  heartbeatIntervalMs: number;
  latencyThresholdMs: number;
  /** Probe peers' relays every heartbeat (off when this node runs no relay). */
  probePeers: boolean;
  /** Whom to trust on https relay URLs: the same as the mesh links. */
  trust: MeshTrust;
  /** Stale and stopped rows older than this are deleted (default 1 h). */
  cleanupAfterMs?: number;
}

export interface PeerLatency {
  replicaId: string;
  hostname: string;
  relayUrl: string;
  rttMs?: number;
  error?: string;
  /** Round trip above the threshold. */
  slow: boolean;
}

export interface RegistryEvents {
  /** Live peers changed (ids or relay URLs). */
  peers: [peers: Replica[]];
}

export class ReplicaRegistry extends EventEmitter<RegistryEvents> {
  readonly #options: ReplicaRegistryOptions;
  readonly #log: Logger;
  #replicas: Replica[] = [];
  #peerSignature = '';
  #regionalPeers: Replica[] = [];
  #peerLatency = new Map<string, PeerLatency>();
  /** This node's latest health report, stored with every heartbeat (the cluster-wide view). */
  #healthReport: HealthReport | null = null;
  #databaseLatencyMs: number | undefined;
  #databaseError: string | undefined;
  /** Since when heartbeats succeed without a break; peers are only judged stale after a full window of it. */
  #databaseHealthySince: number | undefined;
  #error = '';
  #heartbeatTimer: NodeJS.Timeout | undefined;
  #staleTimer: NodeJS.Timeout | undefined;
  #syncing: Promise<void> | undefined;
  #syncAgain = false;
  #stopped = false;
  #unsubscribe: (() => void) | undefined;
  #warnedVersions = new Set<string>();
  #slowWarned = new Set<string>();
  #slowStreak = new Map<string, number>();
  #heartbeats = 0;
  /** Peers whose probe is under way (by id). */
  #probing = new Set<string>();

  constructor(options: ReplicaRegistryOptions) {
    super();
    this.#options = options;
    this.#log = options.logger.child({ component: 'replicas' });
  }

  get self(): SelfDescription {
    return this.#options.self;
  }

  /** Every row seen at the last sync, stale and stopped included. */
  replicas(): Replica[] {
    return this.#replicas;
  }

  /** Live peers (not this node, not stopped, heartbeating). */
  peers(): Replica[] {
    return this.#replicas.filter((r) => r.id !== this.#options.self.id && this.isLive(r));
  }

  /** Live peers of this node's region (the ones its relay meshes with), as of the last sync. */
  regionalPeers(): Replica[] {
    return this.#regionalPeers;
  }

  /** The node's current health report; the next heartbeat stores it for the cluster to read. */
  setHealthReport(report: HealthReport): void {
    this.#healthReport = report;
  }

  peerLatencies(): PeerLatency[] {
    return [...this.#peerLatency.values()];
  }

  databaseLatencyMs(): number | undefined {
    return this.#databaseLatencyMs;
  }

  databaseError(): string | undefined {
    return this.#databaseError;
  }

  isStale(r: Replica): boolean {
    return r.ageMs > STALE_AFTER_HEARTBEATS * this.#options.heartbeatIntervalMs;
  }

  /** Registers this node, subscribes to changes, and starts heartbeating. */
  async start(): Promise<void> {
    await this.#insert();
    this.#unsubscribe = await this.#options.pubsub.subscribe(REPLICA_CHANNEL, {
      onMessage: (id) => {
        if (id !== this.#options.self.id) this.requestSync();
      },
      onDropped: () => this.requestSync(),
    });
    this.#databaseHealthySince = Date.now();
    await this.#publish();
    await this.sync();
    this.#log.info('registered replica', {
      id: this.#options.self.id,
      relayUrl: this.#options.self.relayUrl || undefined,
      peers: this.peers().length,
    });
    this.#scheduleHeartbeat();
  }

  /** Soft stop: mark the row stopped and tell peers at once. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#heartbeatTimer);
    clearTimeout(this.#staleTimer);
    this.#unsubscribe?.();
    try {
      await this.#options.pool.query('UPDATE replicas SET stopped_at = now(), updated_at = now() WHERE id = $1', [this.#options.self.id]);
      await this.#publish();
    } catch (err) {
      this.#log.warn('could not mark replica stopped; peers will drop it after 3 heartbeats', { err });
    }
  }

  /** Re-reads the table soon; calls while a sync runs are coalesced into one more. */
  requestSync(): void {
    if (this.#stopped) return;
    if (this.#syncing) {
      this.#syncAgain = true;
      return;
    }
    void this.sync();
  }

  async sync(): Promise<void> {
    if (this.#syncing) {
      this.#syncAgain = true;
      return this.#syncing;
    }
    this.#syncing = (async () => {
      do {
        this.#syncAgain = false;
        try {
          await this.#syncOnce();
        } catch (err) {
          this.#log.debug('replica sync failed', { err });
        }
      } while (this.#syncAgain && !this.#stopped);
    })();
    try {
      await this.#syncing;
    } finally {
      this.#syncing = undefined;
    }
  }

  async #syncOnce(): Promise<void> {
    const { rows } = await this.#options.pool.query<ReplicaRow>(
      `SELECT *, (EXTRACT(EPOCH FROM (now() - updated_at)) * 1000)::bigint AS age_ms FROM replicas ORDER BY started_at, id`,
    );
    this.#replicas = rows.map(fromRow);
    const peers = this.peers();
    this.#regionalPeers = peers.filter((p) => p.regionId === this.#options.self.regionId);
    for (const p of peers) {
      if (p.version !== this.#options.self.version && !this.#warnedVersions.has(p.id)) {
        this.#warnedVersions.add(p.id);
        this.#log.warn('peer runs a different derpmesh version', {
          peer: p.hostname,
          peerId: p.id,
          peerVersion: p.version,
          ourVersion: this.#options.self.version,
        });
      }
    }
    const key = peers.map((p) => `${p.id}=${p.relayUrl}@${p.regionId}`).join(',');
    if (key !== this.#peerSignature) {
      this.#peerSignature = key;
      this.#log.info('peers changed', { peers: peers.map((p) => p.hostname + (p.relayUrl ? ` ${p.relayUrl}` : '')).join(', ') || 'none' });
      this.emit('peers', peers);
    }
    this.#scheduleStaleCheck(peers);
  }

  /** Re-sync the moment the oldest live peer would turn stale, so a dead peer goes within 3 heartbeats. */
  #scheduleStaleCheck(peers: Replica[]): void {
    clearTimeout(this.#staleTimer);
    if (peers.length === 0 || this.#stopped) return;
    const limit = STALE_AFTER_HEARTBEATS * this.#options.heartbeatIntervalMs;
    const soonest = Math.min(...peers.map((p) => limit - p.ageMs));
    this.#staleTimer = setTimeout(() => this.requestSync(), Math.max(soonest, 0) + 20);
    this.#staleTimer.unref();
  }

  /**
   * Live: not stopped, and heartbeating — or, for a while after this node's own database outage,
   * given a full window to heartbeat again (the state /api/v2/replicas shows, and whom the relay meshes with).
   */
  isLive(r: Replica): boolean {
    if (r.stoppedAt !== null) return false;
    if (!this.isStale(r)) return true;
    // After our own database outage everyone's heartbeats look old: give peers a full window to
    // heartbeat again before dropping them (the relay mesh keeps working meanwhile).
    const window = STALE_AFTER_HEARTBEATS * this.#options.heartbeatIntervalMs;
    return this.#databaseHealthySince === undefined || Date.now() - this.#databaseHealthySince < window;
  }

  #scheduleHeartbeat(): void {
    if (this.#stopped) return;
    this.#heartbeatTimer = setTimeout(
      () => void this.#heartbeat().finally(() => this.#scheduleHeartbeat()),
      this.#options.heartbeatIntervalMs,
    );
    this.#heartbeatTimer.unref();
  }

  async #heartbeat(): Promise<void> {
    this.#heartbeats++;
    // Peer probes run beside the heartbeat, never in its way: a peer that does not answer (frozen,
    // partitioned) must not delay this node's own heartbeat, or every peer would see this node go
    // stale too. The heartbeat stores the latest finished probe of each peer.
    this.#probePeers();
    const database = await this.#probeDatabase();
    if (!database) return;
    const probes = this.peerLatencies();
    const errors = probes.filter((p) => p.error).map((p) => `failed to reach relay ${p.hostname} (${p.relayUrl}): ${p.error}`);
    const error = errors.join('; ');
    const peerLatencies = Object.fromEntries(
      probes.filter((p) => p.rttMs !== undefined).map((p) => [p.replicaId, Math.round(p.rttMs! * 1000)]),
    );
    try {
      const result = await this.#options.pool.query(
        `UPDATE replicas SET updated_at = now(), database_latency = $2, error = $3, peer_latencies = $4, health = $5, relay_url = $6,
           access_url = $7, stun_port = $8, stopped_at = NULL
         WHERE id = $1`,
        [
          this.#options.self.id,
          Math.round((this.#databaseLatencyMs ?? 0) * 1000),
          error,
          JSON.stringify(peerLatencies),
          JSON.stringify(this.#healthReport),
          this.#options.self.relayUrl,
          this.#options.self.accessUrl ?? '',
          this.#options.self.stunPort ?? -1,
        ],
      );
      if (result.rowCount === 0) {
        this.#log.warn('our replica row is gone (cleaned up by a peer or deleted by hand); registering again', {
          id: this.#options.self.id,
        });
        await this.#insert();
        await this.#publish();
      }
      if (error !== this.#error) {
        this.#error = error;
        if (error) this.#log.warn('peer relays unreachable', { error });
        await this.#publish();
      }
      if (this.#heartbeats % 60 === 0) await this.#cleanup();
    } catch (err) {
      this.#noteDatabaseFailure(err);
      return;
    }
    await this.sync();
  }

  async #probeDatabase(): Promise<boolean> {
    try {
      this.#databaseLatencyMs = await probeDatabase(this.#options.pool);
      if (this.#databaseError !== undefined) {
        this.#log.info('database reachable again', { rttMs: round(this.#databaseLatencyMs) });
        this.#databaseError = undefined;
        this.#databaseHealthySince = Date.now();
        this.#options.pubsub.reconnectNow();
      }
      if (this.#databaseLatencyMs > this.#options.latencyThresholdMs) {
        this.#log.warn('database round trip above threshold', {
          rttMs: round(this.#databaseLatencyMs),
          thresholdMs: this.#options.latencyThresholdMs,
        });
      }
      return true;
    } catch (err) {
      this.#noteDatabaseFailure(err);
      return false;
    }
  }

  #noteDatabaseFailure(err: unknown): void {
    const message = (err as Error).message;
    if (this.#databaseError === undefined) {
      this.#log.warn('database unreachable: discovery paused, the relay keeps forwarding', { err: message });
    }
    this.#databaseError = message;
    this.#databaseHealthySince = undefined;
  }

  /**
   * Starts a probe of every regional peer not already being probed; each result replaces that
   * peer's entry when it arrives. Peers no longer listed lose theirs.
   */
  #probePeers(): void {
    if (!this.#options.probePeers) {
      this.#peerLatency.clear();
      return;
    }
    const peers = this.#regionalPeers.filter((p) => p.relayUrl !== '');
    const current = new Set(peers.map((p) => p.id));
    for (const id of this.#peerLatency.keys()) if (!current.has(id)) this.#peerLatency.delete(id);
    for (const peer of peers) {
      if (this.#probing.has(peer.id)) continue;
      this.#probing.add(peer.id);
      void probeRelay(peer.relayUrl, this.#options.trust)
        .then((result: ProbeResult) => {
          if (this.#stopped || !this.#regionalPeers.some((p) => p.id === peer.id)) return;
          this.#peerLatency.set(peer.id, this.#notePeerLatency(peer, result));
        })
        .finally(() => this.#probing.delete(peer.id));
    }
  }

  #notePeerLatency(peer: Replica, result: ProbeResult): PeerLatency {
    // Two slow probes in a row before warning: one scheduling hiccup on a busy host is not a slow link.
    const over = result.rttMs !== undefined && result.rttMs > this.#options.latencyThresholdMs;
    const streak = over ? (this.#slowStreak.get(peer.id) ?? 0) + 1 : 0;
    this.#slowStreak.set(peer.id, streak);
    const slow = streak >= SLOW_PROBES_TO_WARN;
    if (slow && !this.#slowWarned.has(peer.id)) {
      this.#log.warn('peer relay round trip above threshold', {
        peer: peer.hostname,
        peerId: peer.id,
        relayUrl: peer.relayUrl,
        rttMs: round(result.rttMs!),
        thresholdMs: this.#options.latencyThresholdMs,
      });
      this.#slowWarned.add(peer.id);
    } else if (!slow && result.rttMs !== undefined && this.#slowWarned.delete(peer.id)) {
      this.#log.info('peer relay round trip back under threshold', { peer: peer.hostname, rttMs: round(result.rttMs) });
    }
    return { replicaId: peer.id, hostname: peer.hostname, relayUrl: peer.relayUrl, rttMs: result.rttMs, error: result.error, slow };
  }

  async #insert(): Promise<void> {
    const s = this.#options.self;
    await this.#options.pool.query(
      `INSERT INTO replicas (id, hostname, region_id, relay_url, version, started_at, updated_at, "primary", access_url, stun_port)
       VALUES ($1, $2, $3, $4, $5, now(), now(), $6, $7, $8)
       ON CONFLICT (id) DO UPDATE SET updated_at = now(), stopped_at = NULL`,
      [s.id, s.hostname, s.regionId, s.relayUrl, s.version, s.primary, s.accessUrl ?? '', s.stunPort ?? -1],
    );
  }

  async #publish(): Promise<void> {
    try {
      await this.#options.pubsub.publish(REPLICA_CHANNEL, this.#options.self.id);
    } catch (err) {
      this.#log.debug('could not publish replica change; peers will see it at their next poll', { err });
    }
  }

  async #cleanup(): Promise<void> {
    const ms = this.#options.cleanupAfterMs ?? 3_600_000;
    const { rowCount } = await this.#options.pool.query(
      `DELETE FROM replicas WHERE updated_at < now() - make_interval(secs => $1) AND id <> $2`,
      [ms / 1000, this.#options.self.id],
    );
    if (rowCount) this.#log.info('removed old replica rows', { count: rowCount });
  }
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}
