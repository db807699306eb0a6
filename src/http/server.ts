// The node's HTTP server: relay endpoints, DERP upgrades, health and metrics, with bounded
// request heads so a client that never finishes its headers cannot hold a connection.
//
// With a relay (Linux, macOS), a plain `net` server accepts and gives every raw connection to the
// relay core, which terminates TLS (with a certificate), applies the accept limits, reads the
// request head, serves DERP and the probes, and hands the other requests back (decrypted) to the
// HTTP server here, which then listens on nothing itself. Without a relay, on Windows, or with
// `nodeFront`, Node's own server accepts (`https` terminating TLS) and DERP goes through
// `handleUpgrade` (with TLS: the byte bridge).
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createTlsServer, type ServerOptions as HttpsOptions } from 'node:https';
import { createServer as createNetServer, type AddressInfo, type Server as NetServer, type Socket } from 'node:net';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';

import { DerpmeshError } from '../errors.js';
import type { Logger } from '../log.js';
import { Counters, mapCounters, mapHistograms, NodeMetrics, type Snapshot } from '../metrics.js';
import { rawRefusal, type Relay } from '../relay.js';

export type RouteHandler = (req: IncomingMessage, res: ServerResponse) => boolean | Promise<boolean>;

export interface HttpServerOptions {
  /** The relay serving /derp; absent with custom relays (then /derp answers 404). */
  relay?: Relay;
  host: string;
  port: number;
  logger: Logger;
  /**
   * Serve HTTPS with this certificate and key: terminated in the relay core when there is a relay
   * (not on Windows), otherwise in Node (DERP then goes through the byte bridge).
   */
  tls?: HttpsOptions;
  /**
   * Accept and read request heads in Node even where the relay core could: the `handleUpgrade`
   * path (with TLS, the byte bridge), kept for comparison and for platforms without it. Accept
   * limits then cover DERP upgrades only.
   */
  nodeFront?: boolean;
  /** A request head must be complete within this time (default 10000 ms). */
  headerTimeoutMs?: number;
  /** Extra routes tried before the 404 (the HA API adds its own). */
  routes?: RouteHandler[];
  /** Extra sources for /metrics (the control plane's, STUN's), read once per scrape. */
  metrics?: (() => Snapshot)[];
}

/** Connections the kernel queues for accept() (capped by net.core.somaxconn). */
export const ACCEPT_BACKLOG = 4096;

/** HTTP rejections counted in Node (exported as `derpmesh_http_rejections_total{layer="node"}`). */
export const httpCounters = () =>
  new Counters(['http_header_timeouts', 'http_client_errors', 'http_not_found', 'upgrades_unknown_path'] as const);

export interface HttpServer {
  server: Server;
  /** `http://host:port` of the bound address. */
  url: string;
  port: number;
  counters: ReturnType<typeof httpCounters>;
  /** This server's /metrics: a prom-client registry of its own. */
  metrics: NodeMetrics;
  /** A new certificate and key (PEM) for new TLS handshakes; live connections keep theirs. */
  setCertificate(pair: { cert: Buffer; key: Buffer }): void;
  /**
   * Starts a graceful stop's drain: the port stays open, but from now on Node's server takes every
   * new connection (not the relay core) and refuses DERP upgrades with 503; `draining` turns true
   * (the /healthz route answers 503). Open connections go on.
   */
  drain(): void;
  /** True from `drain()` on. */
  readonly draining: boolean;
  /** Stops accepting connections; open ones (and upgraded ones bridged through Node) go on. */
  stopAccepting(): void;
  /** Closes every connection open now (after the relay's Restarting); the port stays open. */
  closeConnections(): void;
  /** Stops accepting and closes every connection still open, upgraded or not. */
  close(): Promise<void>;
}

export async function startHttpServer(options: HttpServerOptions): Promise<HttpServer> {
  const { relay, logger } = options;
  const counters = httpCounters();
  // One snapshot of each source per scrape: the relay core's counters and histograms, the HTTP
  // counters here, and the node's own sources.
  const metrics = new NodeMetrics();
  metrics.addSource(() => ({
    samples: mapCounters([...(relay?.metrics() ?? []), ...counters.samples()]),
    histograms: relay ? mapHistograms(relay.histograms()) : [],
  }));
  for (const source of options.metrics ?? []) metrics.addSource(source);
  const headerTimeoutMs = options.headerTimeoutMs ?? 10_000;
  const routes = options.routes ?? [];

  const onRequest = async (req: IncomingMessage, res: ServerResponse) => {
    try {
      if (relay?.handleRequest(req, res)) return;
      const path = (req.url ?? '').split('?')[0];
      if (path === '/metrics') {
        const text = await metrics.render();
        res.writeHead(200, { 'Content-Type': metrics.contentType }).end(text);
        return;
      }
      for (const route of routes) {
        if (await route(req, res)) return;
      }
      counters.inc('http_not_found');
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
    } catch (err) {
      logger.error('request failed', { path: req.url, err });
      if (!res.headersSent) res.writeHead(500, { 'Content-Type': 'text/plain' });
      res.end('internal error\n');
    }
  };

  let coreFront = !!relay?.takesConnections && !options.nodeFront;
  const coreTls = options.tls && coreFront ? pemPair(options.tls) : undefined;
  if (options.tls && coreFront) {
    try {
      if (!coreTls) throw new Error('only a certificate and a key (no other TLS option) can be served by the core');
      relay!.setCertificate(coreTls);
    } catch (err) {
      // A pair Node accepts but the core's TLS library cannot use (e.g. a P-521 key): Node serves it.
      logger.warn('TLS terminated in Node (slower): the relay core cannot use this certificate', { err: (err as Error).message });
      coreFront = false;
    }
  }
  // With the core in front, `server` listens on nothing: `listener` accepts.
  const server: Server = options.tls && !coreFront ? createTlsServer(options.tls) : createServer();
  const listener: NetServer = coreFront ? createNetServer({ pauseOnConnect: true }) : server;
  // Draining (a graceful stop): the port keeps answering, /healthz with 503, until the process exits.
  let draining = false;
  // With the core in front and TLS, Node terminates TLS for the connections it takes while draining.
  let currentPair = coreTls;
  let drainTls: SecureContext | undefined;
  const drainTlsContext = () => (drainTls ??= currentPair ? createSecureContext(currentPair) : undefined);
  if (coreFront) {
    relay!.setHeadTimeout(headerTimeoutMs);
    listener.on('connection', (socket: Socket) => {
      if (!draining) {
        if (!relay!.handleConnection(socket)) socket.destroy();
        return;
      }
      // The core no longer takes connections (it is about to send Restarting, or did): Node serves
      // them, DERP upgrades get 503 below.
      const context = drainTlsContext();
      const stream = context ? new TLSSocket(socket, { isServer: true, secureContext: context }) : socket;
      server.emit('connection', stream);
      socket.resume();
    });
    relay!.onHttpConnection((socket) => server.emit('connection', socket));
  }
  server.on('request', (req, res) => void onRequest(req, res));
  server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
    clearHeaderTimer(socket);
    if (draining && relay?.isDerpUpgrade(req)) {
      relay.countRefusedUpgrade();
      socket.end(rawRefusal('503 Service Unavailable', 'relay is shutting down', req.method));
      return;
    }
    if (!relay?.isDerpUpgrade(req)) {
      counters.inc('upgrades_unknown_path');
      socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    relay.handleUpgrade(req, socket, head);
  });

  // Every TCP connection, upgraded or not: with TLS in Node, bridged DERP connections live here and
  // keep server.close() waiting until they are gone.
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  // Our own head timer: Node's headersTimeout is only checked every connectionsCheckingInterval.
  const connectionEvent = options.tls && !coreFront ? 'secureConnection' : 'connection';
  server.on(connectionEvent, (socket: Socket) => {
    const timer = setTimeout(() => {
      counters.inc('http_header_timeouts');
      socket.destroy();
    }, headerTimeoutMs);
    timer.unref();
    headerTimers.set(socket, timer);
    socket.once('close', () => clearHeaderTimer(socket));
  });
  server.on('request', (req: IncomingMessage) => clearHeaderTimer(req.socket));
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    counters.inc('http_client_errors');
    logger.debug('malformed HTTP request', { code: err.code, remote: socket.remoteAddress });
    if (socket.writable && !socket.destroyed) {
      socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
    }
    socket.destroy();
  });
  server.headersTimeout = headerTimeoutMs + 1_000;
  server.requestTimeout = 60_000;
  server.keepAliveTimeout = 5_000;

  await new Promise<void>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) =>
      reject(
        new DerpmeshError(
          'DERPMESH_ERR_LISTEN',
          `cannot listen on ${options.host}:${options.port}: ${err.code ?? err.message}` +
            (err.code === 'EADDRINUSE' ? ' (another process uses this port; set CODER_ADDRESS to a free one)' : ''),
          `${options.host}:${options.port}`,
        ),
      );
    listener.once('error', onError);
    // A deep accept queue: when a node dies, its clients all come back at once (a reconnect storm),
    // and with Node's default of 511 the kernel drops the SYNs past it; each such client then waits
    // a full SYN retransmission (1 s, then 3 s) before it tries again. The kernel caps it at somaxconn.
    listener.listen({ port: options.port, host: options.host, backlog: ACCEPT_BACKLOG }, () => {
      listener.off('error', onError);
      resolve();
    });
  });
  const port = (listener.address() as AddressInfo).port;
  let closing = false;
  const closed = new Promise<void>((resolve) => listener.once('close', () => resolve()));
  const stopAccepting = () => {
    if (closing) return;
    closing = true;
    listener.close();
    if (listener !== server) server.close();
  };
  const hostForUrl = options.host.includes(':')
    ? `[${options.host}]`
    : options.host === '0.0.0.0' || options.host === '::'
      ? '127.0.0.1'
      : options.host;
  return {
    server,
    port,
    url: `${options.tls ? 'https' : 'http'}://${hostForUrl}:${port}`,
    counters,
    metrics,
    drain: () => {
      draining = true;
    },
    stopAccepting,
    get draining() {
      return draining;
    },
    closeConnections: () => {
      server.closeAllConnections();
      for (const socket of sockets) socket.destroy();
    },
    setCertificate: (pair) => {
      if (!options.tls)
        throw new DerpmeshError('DERPMESH_ERR_CONFIG', 'this server does not serve TLS: there is no certificate to replace');
      if (coreFront) {
        relay!.setCertificate(pair);
        currentPair = pair;
        drainTls = undefined;
      } else (server as unknown as import('node:tls').Server).setSecureContext({ ...options.tls, cert: pair.cert, key: pair.key });
    },
    close: () => {
      draining = true;
      stopAccepting();
      server.closeAllConnections();
      for (const socket of sockets) socket.destroy();
      return closed;
    },
  };
}

/** The certificate and key of `tls` when the relay core can serve them (one PEM each, no other option). */
function pemPair(tls: HttpsOptions): { cert: Buffer; key: Buffer } | undefined {
  const pem = (v: unknown) => (typeof v === 'string' ? Buffer.from(v) : Buffer.isBuffer(v) ? v : undefined);
  const cert = pem(tls.cert);
  const key = pem(tls.key);
  const others = Object.entries(tls).filter(([k, v]) => k !== 'cert' && k !== 'key' && v !== undefined);
  return cert && key && others.length === 0 ? { cert, key } : undefined;
}

const headerTimers = new WeakMap<Socket, NodeJS.Timeout>();

function clearHeaderTimer(socket: Socket): void {
  const timer = headerTimers.get(socket);
  if (timer) {
    clearTimeout(timer);
    headerTimers.delete(socket);
  }
}
