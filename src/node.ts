// One derpmesh node: Postgres (configured or embedded) → migrations and mesh key → relay → replica
// registry → mesh peers; the HTTP server with the relay, API, health and metrics; graceful stop.
import { randomUUID } from 'node:crypto';
import { hostname as osHostname } from 'node:os';

import type pg from 'pg';

import { acceptLimitsOf, logAcceptLimits, PeerExemption } from './accept-limits.js';
import type { ServerConfig } from './config.js';
import { derpMapSource } from './derpmap.js';
import {
  ClientHealth,
  findMisconfigurations,
  formatMisconfiguration,
  nodeHealth,
  type HealthReport,
  type Misconfiguration,
} from './health.js';
import { apiRoutes } from './http/api.js';
import { startHttpServer, type HttpServer } from './http/server.js';
import { statusPage } from './http/status.js';
import { ClusterStatus, derpClients } from './cluster-status.js';
import type { Logger } from './log.js';
import type { Sample, Snapshot } from './metrics.js';
import { startEmbeddedPostgres, type EmbeddedPostgres } from './postgres/embedded.js';
import { getOrCreateMeshKey } from './postgres/meshkey.js';
import { migrate } from './postgres/migrations.js';
import { createPool } from './postgres/pool.js';
import { Pubsub } from './postgres/pubsub.js';
import { LiveSettings } from './settings.js';
import { ReplicaRegistry } from './replicas/registry.js';
import { MeshTrust } from './mesh-trust.js';
import { startStun } from './stun.js';
import { CertificateFiles, selfSignedCertificate } from './tls-certs.js';
import { relayBase } from './relay-url.js';
import { Relay, type AcceptLimits } from './relay.js';
import { version } from './version.js';

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
  /** Re-reads the TLS certificate files (SIGHUP); without TLS, nothing to do. */
  reloadCertificates(reason: string): void;
}

export async function startNode(config: ServerConfig, logger: Logger): Promise<DerpmeshNode> {
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
    return await start(config, logger, cleanups, undo);
  } catch (err) {
    await undo();
    throw err;
  }
}

async function start(
  config: ServerConfig,
  logger: Logger,
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
  const relayUrl = customRelays || !config.relayUrl ? '' : relayBase(config.relayUrl);
  const trust = MeshTrust.fromFile(config.meshCaFile);
  // Custom relays: clients use the relays of the custom map, so this node runs none and meshes nothing.
  const acceptLimits = acceptLimitsOf(config.accept);
  const relay = customRelays ? undefined : new Relay({ queueDepth: config.queueDepth, meshKey, meshCaPem: trust.caPem, acceptLimits });
  if (!config.derpServerEnable && !config.derpConfigUrl && !config.derpConfigPath) {
    log.warn(
      'the embedded relay is disabled and no custom relay map is set (CODER_DERP_CONFIG_URL or CODER_DERP_CONFIG_PATH): /derpmap is empty and clients have no relay',
    );
  }
  if (relay) cleanups.push(() => relay.close({ graceMs: config.shutdownGraceMs }));
  // Client admission (--verify-client-url), this node's flags applied at start. Refusals and
  // fail-open admissions are logged (rate-limited in the core), naming the key by its prefix only.
  if (relay) {
    relay.onAdmissionEvent((e) => {
      const fields = { client: `nodekey:${e.keyPrefix}…`, source: e.source, reason: e.reason, detail: e.detail };
      const more = e.suppressed > 0 ? { notLoggedSincePrevious: e.suppressed } : {};
      if (e.outcome === 'rejected') log.warn('client refused by the verify URL', { ...fields, ...more });
      else log.warn('verify URL unavailable: client admitted (fail-open)', { ...fields, ...more });
    });
  }
  // Applied by the cluster settings below (this node's flags, or the values set in Postgres).
  let admission = '';
  let appliedAcceptLimits = JSON.stringify(acceptLimits);
  const applyAdmission = (url: string, failOpen: boolean) => {
    if (!relay || JSON.stringify([url, failOpen]) === admission) return;
    admission = JSON.stringify([url, failOpen]);
    relay.setAdmission({ url: url === '' ? undefined : url, failOpen, caPem: trust.caPem });
    if (url === '') log.info('client admission off');
    else {
      const u = new URL(url);
      log.info('client admission on', { verifyClientUrl: u.origin + u.pathname, failOpen });
    }
  };

  const pubsub = new Pubsub({ connectionString: databaseUrl, pool, logger: log });
  await pubsub.start();
  cleanups.push(() => pubsub.close());

  // Limits and admission: this node's flags, overridden live by cluster settings in Postgres.
  const liveSettings = new LiveSettings({
    pool,
    pubsub,
    logger: log,
    defaults: {
      'client-rate-limit': config.clientRateLimit,
      'client-rate-burst': config.clientRateBurst,
      'accept-connection-limit': acceptLimits.acceptConnectionLimit ?? 0,
      'accept-connection-burst': acceptLimits.acceptConnectionBurst ?? 0,
      'max-connections-per-ip': acceptLimits.maxConnectionsPerIp ?? 0,
      'verify-client-url': config.verifyClientUrl?.href ?? '',
      'verify-client-url-fail-open': config.verifyClientUrlFailOpen,
    },
    apply: (values) => {
      relay?.setClientRateLimit(values['client-rate-limit'] as number, values['client-rate-burst'] as number);
      applyAdmission(values['verify-client-url'] as string, values['verify-client-url-fail-open'] as boolean);
      const positive = (v: unknown) => ((v as number) > 0 ? (v as number) : undefined);
      const limits: AcceptLimits = {
        ...acceptLimits,
        acceptConnectionLimit: positive(values['accept-connection-limit']),
        acceptConnectionBurst: positive(values['accept-connection-burst']),
        maxConnectionsPerIp: positive(values['max-connections-per-ip']),
      };
      if (relay && JSON.stringify(limits) !== appliedAcceptLimits) {
        appliedAcceptLimits = JSON.stringify(limits);
        relay.setAcceptLimits(limits);
      }
    },
  });
  await liveSettings.start();
  cleanups.push(async () => liveSettings.stop());

  const registry = new ReplicaRegistry({
    pool,
    pubsub,
    logger: log,
    self: { id, hostname, regionId: config.regionId, relayUrl, accessUrl: relay ? config.accessUrl.href : '', version, primary: true },
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    latencyThresholdMs: config.latencyThresholdMs,
    probePeers: relay !== undefined,
    trust,
  });

  // The static peers (--mesh-with) are meshed from the start, with or without peers in Postgres.
  relay?.setMeshPeers(config.meshWith);
  // Accept limits: this node's flags, given to the relay above; the peers' addresses exempt from
  // the per-address cap, so their mesh links and latency probes are never refused by it.
  if (relay) logAcceptLimits(relay, log, acceptLimits);
  const exemption = relay && new PeerExemption(relay);
  void exemption?.update(config.meshWith);
  registry.on('peers', () => {
    const discovered = registry
      .regionalPeers()
      .filter((p) => p.relayUrl !== '')
      .map((p) => p.relayUrl);
    relay?.setMeshPeers([...config.meshWith, ...discovered]);
    const everyPeer = registry
      .peers()
      .filter((p) => p.relayUrl !== '')
      .map((p) => p.relayUrl);
    void exemption?.update([...config.meshWith, ...everyPeer]);
  });

  /** Cluster misconfigurations as this node sees them; each change is logged once. */
  let loggedMisconfigurations = '';
  const misconfigurations = (): Misconfiguration[] => {
    const found = findMisconfigurations({
      runsRelay: relay !== undefined,
      hostname,
      relayUrl,
      livePeers: registry.peers(),
      regionalPeers: registry.regionalPeers(),
    });
    const text = found.map(formatMisconfiguration).join('\n');
    if (text !== loggedMisconfigurations) {
      loggedMisconfigurations = text;
      for (const m of found) log.warn(`MISCONFIGURATION ${formatMisconfiguration(m)}`);
    }
    return found;
  };
  const warnings = () => misconfigurations().map(formatMisconfiguration);

  // The relay as health sees it: DERP clients as the status page counts them (peer relays' mesh
  // connections left out), from one read of the core's counters and links.
  const relayView = (r: Relay) => {
    const counters = new Map(r.metrics().map((m) => [m.name, m.value]));
    const links = r.meshLinks();
    return { clients: derpClients((name) => counters.get(name) ?? 0, links), links };
  };
  const health = (): HealthReport =>
    nodeHealth({
      replicaId: id,
      hostname,
      version,
      latencyThresholdMs: config.latencyThresholdMs,
      database: { error: registry.databaseError(), rttMs: registry.databaseLatencyMs() },
      relay: relay && relayView(relay),
      peers: registry.peers(),
      peerLatencies: registry.peerLatencies(),
      pubsub: pubsub.state(),
      misconfigurations: misconfigurations(),
    });

  // The cluster's live status (/status, /api/v2/status): traffic snapshots stored with the health report.
  const clusterStatus = new ClusterStatus({
    registry,
    relay,
    heartbeatMs: config.heartbeatIntervalMs,
    thresholdMs: config.latencyThresholdMs,
    health,
    warnings,
    logger: log,
  });

  // STUN next to the relay (custom relays: the custom map's relays answer it, not this node).
  const stun = relay && config.stun ? startStun(config.stun, log) : undefined;
  if (stun) cleanups.push(async () => stun.stop());
  // Announced in Postgres with the access URL: the other regions' /derpmap lists this node's STUN port.
  registry.self.stunPort = stun?.port ?? -1;
  const derpMap = await derpMapSource(config, stun?.port, registry);
  // The control plane's metrics, read at scrape time (the relay's and HTTP's come from the server).
  const metrics = (): Snapshot => {
    const databaseRttMs = registry.databaseLatencyMs();
    const samples: Sample[] = [
      { name: 'build_info', value: 1, labels: { version } },
      { name: 'replicas_live', value: registry.peers().length + 1 },
      { name: 'database_up', value: registry.databaseError() ? 0 : 1 },
      { name: 'pubsub_connected', value: pubsub.state().connected ? 1 : 0 },
      { name: 'pubsub_reconnects_total', value: pubsub.state().reconnects },
      { name: 'misconfigurations', value: warnings().length },
    ];
    if (databaseRttMs !== undefined) samples.push({ name: 'database_rtt_seconds', value: databaseRttMs / 1000 });
    for (const l of registry.peerLatencies()) {
      const labels = { peer: l.hostname, peer_id: l.replicaId };
      if (l.rttMs !== undefined) samples.push({ name: 'peer_rtt_seconds', value: l.rttMs / 1000, labels });
      samples.push({ name: 'peer_reachable', value: l.rttMs !== undefined && !l.error ? 1 : 0, labels });
      samples.push({ name: 'peer_slow', value: l.slow ? 1 : 0, labels });
    }
    for (const link of relay?.meshLinks() ?? []) {
      if (link.state === 'self') continue;
      samples.push({ name: 'mesh_link_up', value: link.state === 'connected' ? 1 : 0, labels: { peer: link.url } });
    }
    return { samples: [...samples, ...(stun?.metrics().samples ?? [])] };
  };

  // The certificate is read and checked now (a bad pair stops the start), then watched; SIGHUP
  // re-reads it too. A new pair serves new handshakes only.
  const certificates =
    config.tlsCertFile && config.tlsKeyFile
      ? new CertificateFiles(config.tlsCertFile, config.tlsKeyFile, log, (pair) => http.setCertificate(pair))
      : undefined;
  if (certificates) cleanups.push(async () => certificates.close());
  const tls = certificates
    ? { cert: certificates.current.cert, key: certificates.current.key }
    : config.tlsSelfSigned
      ? selfSignedCertificate(config.tlsSelfSigned, config.stateDir, log)
      : undefined;
  const http = await startHttpServer({
    relay,
    host: config.listenHost,
    port: config.listenPort,
    logger: log,
    tls,
    metrics: [metrics],
    routes: [
      (req, res) => {
        if ((req.url ?? '').split('?')[0] !== '/healthz') return false;
        // Not ready from the moment a graceful stop begins until the process exits.
        if (http.draining) {
          res.writeHead(503, { 'Content-Type': 'text/plain', Connection: 'close' }).end('shutting down: draining\n');
          return true;
        }
        const db = registry.databaseError();
        // Ready while the relay runs; a database outage pauses discovery only, so stay ready.
        res.writeHead(200, { 'Content-Type': 'text/plain' }).end(db ? 'OK (database unreachable: discovery paused)\n' : 'OK\n');
        return true;
      },
      ...apiRoutes({ registry, health, warnings, derpMap, settings: () => liveSettings.state() }),
      ...clusterStatus.routes(),
      statusPage(clusterStatus),
    ],
  });
  // Stop order: drain (the port stays open: /healthz 503, DERP upgrades 503); Restarting to every
  // client and flush (the relay stops its mesh links first); then close the connections left. With
  // TLS terminated in Node the DERP connections are sockets of this server, so closing them before
  // the relay would cut them without a Restarting frame. The port itself is closed last of all
  // (unshift: undone last), so a readiness probe gets 503, not a refused connection, until exit.
  cleanups.push(async () => {
    http.drain();
    await relay?.close({ graceMs: config.shutdownGraceMs });
    http.closeConnections();
  });
  cleanups.unshift(() => http.close());

  await registry.start();
  cleanups.push(() => registry.stop());
  clusterStatus.start();
  cleanups.push(async () => clusterStatus.close());

  // Every heartbeat the node pushes its health: its report to the registry (stored with the next
  // heartbeat, for the cluster-wide view) and its own data-path problems to its clients.
  const clientHealth = new ClientHealth(config.heartbeatIntervalMs);
  const pushHealth = () => {
    registry.setHealthReport({ ...health(), traffic: clusterStatus.snapshot() });
    relay?.setHealth(clientHealth.problem(misconfigurations(), relay.meshLinks()));
  };
  pushHealth();
  const healthTimer = setInterval(pushHealth, config.heartbeatIntervalMs);
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
        http.drain();
        if (config.shutdownDrainDelayMs > 0) {
          log.info('draining: /healthz answers 503, new DERP connections are refused, clients stay', {
            drainDelayMs: config.shutdownDrainDelayMs,
          });
          await new Promise((r) => setTimeout(r, config.shutdownDrainDelayMs));
        }
        log.info('shutting down: telling peers, sending Restarting to clients', { graceMs: config.shutdownGraceMs });
        // Registry first (stopped_at + publish: peers drop us at once), then the relay, then the rest.
        await undo();
        log.info('stopped');
      })()),
    abandon: async () => {
      await embedded?.release();
    },
    reloadCertificates: (reason) => {
      if (certificates) certificates.reload(reason);
      else log.info('no TLS certificate to reload', { reason });
    },
  };
}
