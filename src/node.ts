// One derpmesh node: Postgres (configured or embedded) → migrations and mesh key → relay → replica
// registry → mesh peers; the HTTP server with the relay, API, health and metrics; graceful stop.
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname as osHostname } from 'node:os';

import type pg from 'pg';

import type { ServerConfig } from './config.js';
import { configError } from './errors.js';
import { mostSevere, section, worst, type HealthReport, type HealthSection } from './health.js';
import { apiRoutes } from './http/api.js';
import { startHttpServer, type HttpServer } from './http/server.js';
import { statusPage } from './http/status.js';
import type { Logger } from './log.js';
import type { MetricSample } from './metrics.js';
import { startEmbeddedPostgres, type EmbeddedPostgres } from './postgres/embedded.js';
import { getOrCreateMeshKey } from './postgres/meshkey.js';
import { migrate } from './postgres/migrations.js';
import { createPool } from './postgres/pool.js';
import { Pubsub } from './postgres/pubsub.js';
import { ReplicaRegistry } from './replicas/registry.js';
import { Relay, type RelayOptions } from './relay.js';
import { MeshTrust } from './mesh-trust.js';
import { version } from './version.js';

/** Heartbeats a mesh link may be down before clients are told (Health frame). */
const LINK_DOWN_HEARTBEATS = 3;

export interface DerpmeshNode {
  id: string;
  /** Absent with custom relays. */
  relay?: Relay;
  http: HttpServer;
  registry: ReplicaRegistry;
  /** URL this node listens on. */
  url: string;
  health(): HealthReport;
  /** Graceful stop: stopped_at + publish, Restarting to every client, flush, close. */
  close(): Promise<void>;
  /** For a stop that did not finish in time: release what outlives this process (the embedded Postgres). */
  abandon(): Promise<void>;
}

export interface NodeExtras {
  /** Relay tunables beyond the configuration (tests). */
  relay?: Partial<RelayOptions>;
  /** Delete stale rows older than this (tests). */
  cleanupAfterMs?: number;
}

export async function startNode(config: ServerConfig, logger: Logger, extras: NodeExtras = {}): Promise<DerpmeshNode> {
  const cleanups: (() => Promise<void>)[] = [];
  // Undone in reverse order, each step bounded: a stop must end even when a step hangs (a database
  // that does not answer, a connection that never closes).
  const stepLimitMs = config.shutdownGraceMs + 2_000;
  const undo = async () => {
    for (const c of cleanups.splice(0).reverse()) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([c().catch(() => {}), new Promise<void>((r) => (timer = setTimeout(r, stepLimitMs)))]);
      clearTimeout(timer);
    }
  };
  try {
    return await start(config, logger, extras, cleanups, undo);
  } catch (err) {
    await undo();
    throw err;
  }
}

async function start(
  config: ServerConfig,
  logger: Logger,
  extras: NodeExtras,
  cleanups: (() => Promise<void>)[],
  undo: () => Promise<void>,
): Promise<DerpmeshNode> {
  const id = randomUUID();
  const hostname = config.hostname ?? osHostname();
  const log = logger.child({ node: hostname });

  let embedded: EmbeddedPostgres | undefined;
  let databaseUrl = config.postgresUrl;
  if (!databaseUrl) {
    embedded = await startEmbeddedPostgres({ stateDir: config.stateDir, logger: log });
    cleanups.push(() => embedded!.release());
    databaseUrl = embedded.url;
  }
  const pool: pg.Pool = createPool({ connectionString: databaseUrl, logger: log });
  cleanups.push(() => pool.end());
  await migrate(pool, log);
  const meshKey = await getOrCreateMeshKey(pool);

  const customRelays = !config.derpServerEnable || config.derpConfigUrl !== undefined || config.derpConfigPath !== undefined;
  if (customRelays && config.relayUrl) {
    log.info('custom relays configured: the relay URL is ignored and nodes do not mesh; Postgres is the only rendezvous', {
      relayUrl: config.relayUrl.href,
    });
  }
  const relayUrl = customRelays ? '' : (config.relayUrl?.href.replace(/\/$/, '') ?? '');
  const trust = MeshTrust.fromFile(config.meshCaFile);
  // Custom relays: clients use the relays of the custom map, so this node runs none and meshes nothing.
  const relay = customRelays ? undefined : new Relay({ queueDepth: config.queueDepth, meshKey, meshCaPem: trust.caPem, ...extras.relay });
  if (!config.derpServerEnable && !config.derpConfigUrl && !config.derpConfigPath) {
    log.warn(
      'the embedded relay is disabled and no custom relay map is set (CODER_DERP_CONFIG_URL or CODER_DERP_CONFIG_PATH): /derpmap is empty and clients have no relay',
    );
  }
  if (relay) cleanups.push(() => relay.close({ graceMs: config.shutdownGraceMs }));

  const pubsub = new Pubsub({ connectionString: databaseUrl, pool, logger: log });
  await pubsub.start();
  cleanups.push(() => pubsub.close());

  const registry = new ReplicaRegistry({
    pool,
    pubsub,
    logger: log,
    self: { id, hostname, regionId: config.regionId, relayUrl, version, primary: true },
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    latencyThresholdMs: config.latencyThresholdMs,
    probePeers: relay !== undefined,
    trust,
    cleanupAfterMs: extras.cleanupAfterMs,
    healthReport: () => health(),
  });

  // The static peers (--mesh-with) are meshed from the start, with or without peers in Postgres.
  relay?.setMeshPeers(config.meshWith);
  registry.on('peers', (peers) => {
    relay?.setMeshPeers([
      ...config.meshWith,
      ...peers.filter((p) => p.regionId === config.regionId && p.relayUrl !== '').map((p) => p.relayUrl),
    ]);
  });

  /** Cluster misconfigurations worth shouting about (log, API, health). */
  let lastWarnings = '';
  /** This node runs a relay in a cluster of 2 or more but peers have no URL to mesh with it. */
  const lacksRelayUrl = () => relay !== undefined && !relayUrl && registry.peers().length >= 1;
  const warnings = (): string[] => {
    const out: string[] = [];
    const live = registry.peers().length + 1;
    if (lacksRelayUrl()) {
      out.push(
        `RELAY_NO_RELAY_URL: ${live} replicas share this database but ${hostname} has no relay URL, so peers cannot mesh with its relay and clients on different nodes cannot reach each other; set CODER_DERP_SERVER_RELAY_URL to this node's own address`,
      );
    }
    for (const p of registry.peers()) {
      if (relay && p.regionId === config.regionId && p.relayUrl === '') {
        out.push(`RELAY_NO_RELAY_URL: peer ${p.hostname} (${p.id}) has no relay URL; its clients are unreachable from here`);
      }
    }
    const text = out.join('\n');
    if (text !== lastWarnings) {
      lastWarnings = text;
      for (const w of out) log.warn(`MISCONFIGURATION ${w}`);
    }
    return out;
  };

  const health = (): HealthReport => {
    const dbError = registry.databaseError();
    const dbRtt = registry.databaseLatencyMs();
    const database: HealthSection = dbError
      ? section('error', 'DB_UNREACHABLE', `database unreachable: ${dbError}`)
      : dbRtt !== undefined && dbRtt > config.latencyThresholdMs
        ? section('warning', 'DB_SLOW', `database round trip ${dbRtt.toFixed(2)} ms exceeds ${config.latencyThresholdMs} ms`)
        : section('ok', 'DB_OK', dbRtt === undefined ? 'database reachable' : `database round trip ${dbRtt.toFixed(2)} ms`);
    const noRelayUrl = warnings().find((w) => w.startsWith('RELAY_NO_RELAY_URL'));
    const relaySection: HealthSection = !relay
      ? section('ok', 'RELAY_DISABLED', 'embedded relay disabled: custom relays')
      : noRelayUrl
        ? section('warning', 'RELAY_NO_RELAY_URL', noRelayUrl.replace(/^RELAY_NO_RELAY_URL: /, ''))
        : section('ok', 'RELAY_OK', `relay serving ${relay.metric('clients')} clients`);
    let mesh: HealthSection;
    if (!relay) {
      mesh = section('ok', 'MESH_DISABLED', 'custom relays: no mesh');
    } else {
      const findings: HealthSection[] = [];
      for (const l of registry.peerLatencies()) {
        if (l.error)
          findings.push(section('error', 'MESH_PEER_UNREACHABLE', `failed to reach relay ${l.hostname} (${l.relayUrl}): ${l.error}`));
        else if (l.slow)
          findings.push(
            section(
              'warning',
              'MESH_PEER_SLOW',
              `round trip to ${l.hostname} (${l.relayUrl}) is ${l.rttMs!.toFixed(2)} ms, above ${config.latencyThresholdMs} ms`,
            ),
          );
      }
      for (const link of relay.meshLinks()) {
        if (link.state !== 'connected' && link.state !== 'self') {
          findings.push(
            section('warning', 'MESH_LINK_DOWN', `mesh link to ${link.url} is ${link.state}${link.lastError ? `: ${link.lastError}` : ''}`),
          );
        }
      }
      for (const p of registry.peers()) {
        if (p.version !== version)
          findings.push(section('warning', 'MESH_VERSION_MISMATCH', `peer ${p.hostname} runs ${p.version}, this node ${version}`));
      }
      mesh = mostSevere(
        findings,
        section('ok', 'MESH_OK', `meshed with ${relay.meshLinks().filter((l) => l.state === 'connected').length} peer relays`),
      );
    }
    const ps = pubsub.state();
    const pubsubSection = ps.connected
      ? section('ok', 'PUBSUB_OK', `listening (${ps.reconnects} reconnects)`)
      : section('error', 'PUBSUB_DISCONNECTED', `LISTEN connection down${ps.lastError ? `: ${ps.lastError}` : ''}; polling only`);
    const sections = { database, relay: relaySection, mesh, pubsub: pubsubSection };
    return {
      replicaId: id,
      hostname,
      severity: worst(Object.values(sections).map((s) => s.severity)),
      generatedAt: new Date().toISOString(),
      sections,
    };
  };

  const derpMap = await loadDerpMap(config);
  const metrics = (): MetricSample[] => {
    const samples: MetricSample[] = [
      {
        name: 'replicas_live',
        kind: 'gauge',
        help: 'Live replicas in the cluster, this one included.',
        value: registry.peers().length + 1,
      },
      {
        name: 'database_latency_seconds',
        kind: 'gauge',
        help: 'Round trip to Postgres.',
        value: (registry.databaseLatencyMs() ?? 0) / 1000,
      },
      { name: 'pubsub_connected', kind: 'gauge', help: '1 when the LISTEN connection is up.', value: pubsub.state().connected ? 1 : 0 },
      { name: 'pubsub_reconnects', kind: 'counter', help: 'LISTEN connection re-establishments.', value: pubsub.state().reconnects },
      { name: 'misconfigurations', kind: 'gauge', help: 'Cluster misconfiguration warnings in effect.', value: warnings().length },
    ];
    for (const l of registry.peerLatencies()) {
      const labels = { peer: l.hostname, peer_id: l.replicaId };
      samples.push({
        name: 'peer_latency_seconds',
        kind: 'gauge',
        help: 'Round trip to a peer relay (median of a few samples).',
        value: (l.rttMs ?? Number.NaN) / 1000,
        labels,
      });
      samples.push({
        name: 'peer_latency_warning',
        kind: 'gauge',
        help: '1 when the round trip to this peer exceeds the threshold.',
        value: l.slow ? 1 : 0,
        labels,
      });
    }
    return samples;
  };

  const tls =
    config.tlsCertFile && config.tlsKeyFile ? { cert: readFileSync(config.tlsCertFile), key: readFileSync(config.tlsKeyFile) } : undefined;
  const http = await startHttpServer({
    relay,
    host: config.listenHost,
    port: config.listenPort,
    logger: log,
    tls,
    metrics,
    routes: [
      (req, res) => {
        if ((req.url ?? '').split('?')[0] !== '/healthz') return false;
        const db = registry.databaseError();
        // Ready while the relay runs; a database outage pauses discovery only, so stay ready.
        res.writeHead(200, { 'Content-Type': 'text/plain' }).end(db ? 'OK (database unreachable: discovery paused)\n' : 'OK\n');
        return true;
      },
      ...apiRoutes({ registry, health, warnings, derpMap: () => derpMap }),
      statusPage(registry, config.latencyThresholdMs, warnings),
    ],
  });
  // Stop order: stop accepting; Restarting to every client and flush (the relay stops its mesh
  // links first); then close whatever is left. With TLS terminated in Node the DERP connections are
  // sockets of this server, so closing the server before the relay would cut them without a
  // Restarting frame, and waiting for it to close would wait for clients that never leave.
  cleanups.push(async () => {
    http.stopAccepting();
    await relay?.close({ graceMs: config.shutdownGraceMs });
    await http.close();
  });

  await registry.start();
  cleanups.push(() => registry.stop());

  // Clients learn through a DERP Health frame when this relay cannot do its job: only problems of
  // this relay's own data path (what a client here would notice as lost packets), never a probe's
  // verdict or another node's state. A mesh link counts once it has been down for a few heartbeats,
  // so a peer that restarts does not make every client here flash a warning.
  const linkDownSince = new Map<string, number>();
  const healthTimer = setInterval(() => {
    if (!relay) return;
    const now = Date.now();
    const problems: string[] = [];
    if (lacksRelayUrl()) {
      problems.push('this relay has no relay URL: clients of other relays in its region cannot reach clients here');
    }
    const links = relay.meshLinks().filter((l) => l.state !== 'self' && l.state !== 'stopped');
    for (const url of linkDownSince.keys()) if (!links.some((l) => l.url === url)) linkDownSince.delete(url);
    for (const link of links) {
      if (link.state === 'connected') {
        linkDownSince.delete(link.url);
        continue;
      }
      const since = linkDownSince.get(link.url) ?? now;
      linkDownSince.set(link.url, since);
      if (now - since >= LINK_DOWN_HEARTBEATS * config.heartbeatIntervalMs) {
        problems.push(`this relay cannot reach its peer relay ${link.url}: clients connected there are unreachable from here`);
      }
    }
    relay.setHealth(problems.join('; '));
  }, config.heartbeatIntervalMs);
  healthTimer.unref();
  cleanups.push(async () => clearInterval(healthTimer));

  log.info('derpmesh node started', {
    id,
    version,
    listen: http.url,
    accessUrl: config.accessUrl.href,
    relayUrl: relayUrl || undefined,
    database: embedded ? `embedded (${embedded.dataDir})` : 'external',
    relayPublicKey: relay?.publicKey,
    peers: registry.peers().length,
  });
  warnings();

  let closing: Promise<void> | undefined;
  return {
    id,
    relay,
    http,
    registry,
    url: http.url,
    health,
    close: () =>
      (closing ??= (async () => {
        log.info('shutting down: telling peers, sending Restarting to clients', { graceMs: config.shutdownGraceMs });
        // Registry first (stopped_at + publish: peers drop us at once), then the relay, then the rest.
        await undo();
        log.info('stopped');
      })()),
    abandon: async () => {
      await embedded?.release();
    },
  };
}

/** The DERP map clients use: the custom one when configured, else one embedded region. */
async function loadDerpMap(config: ServerConfig): Promise<unknown> {
  if (config.derpConfigPath) {
    try {
      return JSON.parse(readFileSync(config.derpConfigPath, 'utf8'));
    } catch (err) {
      throw configError(
        `CODER_DERP_CONFIG_PATH ${config.derpConfigPath} must be a readable JSON relay map: ${(err as Error).message}`,
        config.derpConfigPath,
      );
    }
  }
  if (config.derpConfigUrl) {
    const res = await fetch(config.derpConfigUrl, { signal: AbortSignal.timeout(10_000) });
    if (!res.ok)
      throw configError(`CODER_DERP_CONFIG_URL answered ${res.status}; it must serve the relay map as JSON`, config.derpConfigUrl.href);
    return res.json();
  }
  if (!config.derpServerEnable) return { Regions: {} };
  const access = config.accessUrl;
  const https = access.protocol === 'https:';
  return {
    Regions: {
      [config.regionId]: {
        RegionID: config.regionId,
        RegionCode: 'derpmesh',
        RegionName: 'derpmesh embedded relay',
        Nodes: [
          {
            Name: `${config.regionId}a`,
            RegionID: config.regionId,
            HostName: access.hostname,
            DERPPort: Number(access.port || (https ? 443 : 80)),
            STUNPort: -1,
            ForceHTTP: !https,
          },
        ],
      },
    },
  };
}
