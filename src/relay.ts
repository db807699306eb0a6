// The relay as Node sees it: hands upgraded connections to the Rust core (by file descriptor when
// it can, through a byte bridge when TLS is terminated in Node) and serves the relay's plain
// HTTP endpoints. This is the embedding seam, shaped like ws: `handleUpgrade(req, socket, head)`.
// With TLS, one step earlier: `handleConnection(socket)` gives the core the raw TCP connection;
// the core terminates TLS, serves DERP and the probes, and hands every other request back
// decrypted (`onHttpConnection`).
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { TLSSocket } from 'node:tls';

import { formatPublicKey } from './client/keys.js';
import { DerpmeshError, fromNative } from './errors.js';
import {
  native,
  type AcceptRefusal,
  type AdmissionEvent,
  type LinkErrorCode,
  type MeshLinkStatus,
  type HistogramSnapshot,
  type Metric,
  type UpgradeKind,
} from './native.js';

export type { AcceptRefusal, AdmissionEvent };

/** The WebSocket GUID of RFC 6455, used to compute Sec-WebSocket-Accept. */
const WEBSOCKET_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

export interface RelayOptions {
  /** 32-byte private key of the relay; generated when absent. */
  privateKey?: Buffer;
  /** Shared mesh key: grants WatchConns, ClosePeer and ForwardPacket. Never logged. */
  meshKey?: string;
  /** Packets queued per client before the oldest is dropped (default 512). */
  queueDepth?: number;
  /** Disco packets queued per client (default 32). */
  discoQueueDepth?: number;
  /** A write stalled this long closes the client (default 2000 ms). */
  writeTimeoutMs?: number;
  /** KeepAlive period (default 60000 ms) plus up to `keepaliveJitterMs` (default 5000 ms). */
  keepaliveMs?: number;
  keepaliveJitterMs?: number;
  /** PEM CA certificate(s) trusted for https peer relay URLs, besides the public roots. */
  meshCaPem?: Buffer;
  /** Skip certificate verification on mesh links (testing only). */
  meshTlsInsecure?: boolean;
  /** Accept limits and TCP timeouts from the start (see `setAcceptLimits`). */
  acceptLimits?: AcceptLimits;
}

/** The defaults of `RelayOptions`, chosen here once: the native binding is given every value. */
export const relayDefaults = {
  queueDepth: 512,
  discoQueueDepth: 32,
  writeTimeoutMs: 2_000,
  keepaliveMs: 60_000,
  keepaliveJitterMs: 5_000,
  meshTlsInsecure: false,
} as const;

/**
 * Client admission, derper's `--verify-client-url`: during each client's handshake (mesh peers
 * excepted) the relay core POSTs `{"NodePublic":"nodekey:<hex>","Source":"<client IP>"}` to `url`
 * and admits the client only on `{"Allow":true}`.
 */
export interface AdmissionOptions {
  /** `http://` or `https://` URL; absent or empty turns admission off. */
  url?: string;
  /**
   * Admit clients while the URL is unavailable — unreachable, no answer in `timeoutMs`, 1xx/3xx/5xx,
   * a body that is not `{"Allow": bool}`, or every request slot busy (default true, as derper). A
   * 4xx answer or `Allow: false` refuses either way.
   */
  failOpen?: boolean;
  /** Limit for one request (default 5000 ms, derper's). */
  timeoutMs?: number;
  /** How long an answer is reused for the same key from the same IP (default 5000 ms; 0 = never). */
  cacheTtlMs?: number;
  /** Requests in flight at most (default 32)… */
  maxConcurrent?: number;
  /** …for one of which a check waits this long before the URL counts as unavailable (default 1000 ms). */
  queueWaitMs?: number;
  /** PEM CA certificate(s) trusted for an https URL, besides the public roots. */
  caPem?: Buffer;
}

/** The defaults of `AdmissionOptions`, chosen here once. */
export const admissionDefaults = {
  failOpen: true,
  timeoutMs: 5_000,
  cacheTtlMs: 5_000,
  maxConcurrent: 32,
  queueWaitMs: 1_000,
} as const;

/** What an operator does about a mesh link's last error, by its code (the core names no setting). */
const linkHints: Partial<Record<LinkErrorCode, string>> = {
  'untrusted-certificate':
    "set DERPMESH_MESH_CA_FILE (--mesh-ca-file; relay option meshCaPem) to the CA that signed the peer's certificate",
};

/** A mesh link's status with the operator's hint, if its last error has one, appended to that error. */
export function withLinkHint(link: MeshLinkStatus): MeshLinkStatus {
  const hint = link.lastErrorCode ? linkHints[link.lastErrorCode] : undefined;
  return hint && link.lastError ? { ...link, lastError: `${link.lastError} — ${hint}` } : link;
}

export interface ShutdownOptions {
  /** Sent in the Restarting frame: when clients should reconnect (default 0 ms: at once, elsewhere). */
  reconnectInMs?: number;
  /** Sent in the Restarting frame: how long clients should keep trying (default 30000 ms). */
  tryForMs?: number;
  /** How long to wait for clients to be flushed and closed (default 5000 ms). */
  graceMs?: number;
}

/**
 * What happens to a connection as the relay core takes it (`handleConnection`, `handleUpgrade`),
 * before a byte of it is read. A connection over a limit is closed at once and counted
 * (`accepts_refused_*` metrics); absent limits are none.
 */
export interface AcceptLimits {
  /** Connections accepted per second on average (derper's `--accept-connection-limit`: a token bucket). */
  acceptConnectionLimit?: number;
  /** Connections accepted at once before the rate applies (default: one second's worth of the limit, at least 1). */
  acceptConnectionBurst?: number;
  /** Connections the core holds at once. */
  maxConnections?: number;
  /** Connections the core holds at once from one source address, except the exempt ones (`setAcceptExempt`). */
  maxConnectionsPerIp?: number;
  /** Idle time before TCP keepalive probes (default 600000 ms, derper's); 0 = the system's setting. */
  tcpKeepaliveMs?: number;
  /** `TCP_USER_TIMEOUT`, Linux only (default 15000 ms, derper's); 0 = the system's setting. */
  tcpUserTimeoutMs?: number;
}

/** The defaults of `AcceptLimits`, chosen here once. */
export const acceptDefaults = { tcpKeepaliveMs: 600_000, tcpUserTimeoutMs: 15_000 } as const;

/** Always exempt from the per-address cap: local proxies and `derpmesh cluster`'s balancer connect from here. */
export const loopbackAddresses = ['127.0.0.1', '::1'] as const;

export class Relay {
  readonly #core: InstanceType<typeof native.RelayCore>;
  /** What Node decided before the relay core saw a connection. */
  readonly #upgrades = { refused: 0, bridged: 0 };
  #closed = false;
  #closing: Promise<void> | undefined;

  /** Throws a `DerpmeshError` (`DERPMESH_ERR_MESH_TLS`, `DERPMESH_ERR_INVALID_ARGUMENT`) for unusable options. */
  constructor(options: RelayOptions = {}) {
    const { acceptLimits, ...rest } = options;
    const given = Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined)) as RelayOptions;
    try {
      this.#core = new native.RelayCore({ ...relayDefaults, ...given });
    } catch (err) {
      throw fromNative(err);
    }
    this.setAcceptLimits(acceptLimits ?? {});
    this.setAcceptExempt([]);
  }

  /** The relay's public key as `nodekey:<64 hex>`. */
  get publicKey(): string {
    return formatPublicKey(Buffer.from(this.#core.publicKey, 'hex'));
  }

  /** Whether `req` asks for a DERP connection this relay should take. */
  isDerpUpgrade(req: IncomingMessage): boolean {
    const path = (req.url ?? '').split('?')[0];
    return path === '/derp' || path === '/derp/';
  }

  /**
   * Takes over an upgraded connection. Call it synchronously from the server's `upgrade` event
   * (no `await` before it), so Node reads nothing more from the socket.
   */
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const kind = this.#classify(req);
    if (this.#closed || kind === undefined) {
      this.#upgrades.refused++;
      const body = this.#closed ? 'relay is shutting down' : 'DERP requires connection upgrade';
      const status = this.#closed ? '503 Service Unavailable' : '426 Upgrade Required';
      socket.end(rawRefusal(status, body, req.method));
      return;
    }
    const accept = kind === 'websocket' ? websocketAccept(String(req.headers['sec-websocket-key'] ?? '')) : undefined;
    const remoteAddress = req.socket.remoteAddress ?? '0.0.0.0';
    const remotePort = req.socket.remotePort ?? 0;
    const fd = descriptorOf(socket);
    if (fd !== undefined) {
      try {
        this.#core.acceptFd(fd, head, kind, accept, remoteAddress, remotePort);
        socket.destroy();
        return;
      } catch {
        // Fall through to the bridge: correct, just slower.
      }
    }
    this.#upgrades.bridged++;
    this.#bridge(socket, head, kind, accept, remoteAddress, remotePort);
  }

  /** Whether `handleConnection` can take sockets here (it needs their descriptors: not on Windows). */
  get takesConnections(): boolean {
    return process.platform !== 'win32';
  }

  /**
   * Takes over a raw accepted TCP socket before anything was read from it — from a `net` server
   * made with `pauseOnConnect: true` — and destroys Node's handle. With a certificate set
   * (`setCertificate`) the core terminates TLS. It serves `/derp`, `/derp/probe`,
   * `/derp/latency-check` and `/generate_204` itself and hands every other request to the
   * `onHttpConnection` handler. Returns false, leaving the socket alone, when it cannot be taken
   * (no descriptor, relay closed).
   */
  handleConnection(socket: Socket): boolean {
    const fd = descriptorOf(socket);
    if (this.#closed || fd === undefined) return false;
    try {
      this.#core.acceptConnection(fd, socket.remoteAddress ?? '0.0.0.0', socket.remotePort ?? 0);
    } catch {
      return false;
    }
    socket.destroy();
    return true;
  }

  /**
   * Serves TLS with this certificate chain (PEM, leaf first) and key on connections given to
   * `handleConnection` from now on; live connections keep theirs. Throws a `DerpmeshError`
   * (`DERPMESH_ERR_TLS`) for an unusable pair, and the current one stays.
   */
  setCertificate(pair: { cert: Buffer; key: Buffer }): void {
    try {
      this.#core.setCertificate(pair.cert, pair.key);
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** Connections given to `handleConnection` from now on are served without TLS. */
  clearCertificate(): void {
    this.#core.clearCertificate();
  }

  /**
   * How long a connection given to `handleConnection` from now on may take to send its request
   * head (default 10 s); a slower one is closed and counted (`http_head_timeouts`).
   */
  setHeadTimeout(ms: number): void {
    if (!Number.isInteger(ms) || ms < 1 || ms > 0xffff_ffff)
      throw new DerpmeshError('DERPMESH_ERR_INVALID_ARGUMENT', `head timeout ${ms} ms: a whole number of milliseconds, at least 1`);
    this.#core.setHeadTimeout(ms);
  }

  /**
   * Accept limits for connections taken from now on (see `AcceptLimits`); open ones stay, a lower
   * cap refusing new ones until enough have closed. Replaces the previous limits, so it can follow
   * a setting changed at run time. Throws a `DerpmeshError` (`DERPMESH_ERR_INVALID_ARGUMENT`) for a
   * limit that is not a positive number; the current ones stay.
   */
  setAcceptLimits(limits: AcceptLimits): void {
    const given = Object.fromEntries(Object.entries(limits).filter(([, v]) => v !== undefined)) as AcceptLimits;
    try {
      this.#core.setAcceptLimits({ ...acceptDefaults, ...given });
    } catch (err) {
      throw fromNative(err);
    }
  }

  /**
   * Source addresses the per-address cap does not apply to (the cluster's own nodes), besides
   * loopback, which always is; replaces the previous list.
   */
  setAcceptExempt(addresses: string[]): void {
    try {
      this.#core.setAcceptExempt([...new Set([...loopbackAddresses, ...addresses])]);
    } catch (err) {
      throw fromNative(err);
    }
  }

  /**
   * Called for connections refused by an accept limit, at most once per reason every 10 s
   * (`suppressed` counts the refusals left out), with the source address.
   */
  onAcceptRefused(handler: (refusal: AcceptRefusal) => void): void {
    this.#core.onAcceptRefused(handler);
  }

  /**
   * Where requests the core does not answer go, as a socket carrying the decrypted stream from the
   * request head on (its `remoteAddress` and `remotePort` are the client's): hand it to an HTTP
   * server with `server.emit('connection', socket)`.
   */
  onHttpConnection(handler: (socket: Socket) => void): void {
    this.#core.onHttpConnection((fd, remoteAddress, remotePort) => {
      let socket: Socket;
      try {
        socket = new Socket({ fd, readable: true, writable: true });
      } catch {
        return;
      }
      Object.defineProperty(socket, 'remoteAddress', { value: remoteAddress });
      Object.defineProperty(socket, 'remotePort', { value: remotePort });
      Object.defineProperty(socket, 'remoteFamily', { value: remoteAddress.includes(':') ? 'IPv6' : 'IPv4' });
      handler(socket);
    });
  }

  /** Serves the relay's plain HTTP endpoints; returns false for any other request. */
  handleRequest(req: IncomingMessage, res: ServerResponse): boolean {
    const path = (req.url ?? '').split('?')[0];
    switch (path) {
      case '/derp':
      case '/derp/':
        res.writeHead(426, { 'Content-Type': 'text/plain', Connection: 'close' }).end('DERP requires connection upgrade');
        return true;
      case '/derp/probe':
      case '/derp/latency-check':
        if (req.method !== 'GET' && req.method !== 'HEAD') {
          res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' }).end('bogus probe method');
          return true;
        }
        res.writeHead(200, { 'Access-Control-Allow-Origin': '*', 'Content-Length': 0 }).end();
        return true;
      case '/generate_204': {
        const headers: Record<string, string> = {
          'Cache-Control': 'no-cache, no-store, must-revalidate, no-transform, max-age=0',
        };
        const challenge = req.headers['x-tailscale-challenge'];
        if (typeof challenge === 'string' && /^[A-Za-z0-9._:-]{1,64}$/.test(challenge)) {
          headers['X-Tailscale-Response'] = `response ${challenge}`;
        }
        res.writeHead(204, headers).end();
        return true;
      }
      default:
        return false;
    }
  }

  /**
   * The peer relays to mesh with (their relay URLs). The core adds and removes links by difference;
   * each link dials `<url>/derp` with the mesh key, sends WatchConns and reconnects with backoff.
   */
  setMeshPeers(urls: string[]): void {
    try {
      this.#core.setMeshPeers(urls);
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** State of every mesh link; a last error the operator can fix says how. */
  meshLinks(): MeshLinkStatus[] {
    return this.#core.meshLinks().map(withLinkHint);
  }

  setMeshKey(meshKey: string | undefined): void {
    this.#core.setMeshKey(meshKey);
  }

  /**
   * Limits what each client connection may send: `bytesPerSec` (0 = no limit) with a bucket of
   * `burst` bytes (raised to one largest frame). Connected clients get it with their next frame, by
   * TCP backpressure (nothing is dropped); mesh peers are exempt. Returns the limit in force.
   */
  setClientRateLimit(bytesPerSec: number, burst = 0): { bytesPerSec: number; burst: number } {
    try {
      const [rate, bucket] = this.#core.setClientRateLimit(bytesPerSec, burst);
      return { bytesPerSec: rate!, burst: bucket! };
    } catch (err) {
      throw fromNative(err);
    }
  }

  /**
   * Client admission from now on (see `AdmissionOptions`); connected clients stay. Replaces the
   * previous settings, so it can follow a setting changed at run time, and empties the decision
   * cache. Throws a `DerpmeshError` (`DERPMESH_ERR_ADMISSION`) for unusable settings; the current
   * ones stay.
   */
  setAdmission(options: AdmissionOptions): void {
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as AdmissionOptions;
    try {
      this.#core.setAdmission({ ...admissionDefaults, ...given });
    } catch (err) {
      throw fromNative(err);
    }
  }

  /**
   * Called for each client refused by admission and each one admitted only because the URL was
   * unavailable (fail-open), rate-limited in the core: a burst of 5, then one a second, `suppressed`
   * counting the events left out. The event names the key by its first 8 hex characters only.
   */
  onAdmissionEvent(handler: (event: AdmissionEvent) => void): void {
    this.#core.onAdmissionEvent(handler);
  }

  /** Tells every client (now and on connect) that this node is degraded; "" = healthy again. */
  setHealth(problem: string): void {
    this.#core.setHealth(problem);
  }

  /** Counts a DERP upgrade refused outside the relay (the HTTP server's 503 while a stop drains). */
  countRefusedUpgrade(): void {
    this.#upgrades.refused++;
  }

  /** Counters and gauges of the relay core, plus the upgrades Node refused or bridged. */
  metrics(): Metric[] {
    return [
      ...this.#core.metrics(),
      {
        name: 'upgrades_refused',
        kind: 'counter',
        help: 'DERP upgrades refused (bad Upgrade header, or during shutdown).',
        value: this.#upgrades.refused,
      },
      {
        name: 'upgrades_bridged',
        kind: 'counter',
        help: 'Connections carried by the byte bridge (TLS in Node, no descriptor).',
        value: this.#upgrades.bridged,
      },
    ];
  }

  /** The core's histograms (handshake duration, queue wait), read at scrape time. */
  histograms(): HistogramSnapshot[] {
    return this.#core.histograms();
  }

  metric(name: string): number {
    return this.metrics().find((m) => m.name === name)?.value ?? 0;
  }

  /** Graceful shutdown: Restarting to every client, flush, close. New upgrades get 503. */
  close(options: ShutdownOptions = {}): Promise<void> {
    this.#closed = true;
    return (this.#closing ??= this.#core.shutdown(options.reconnectInMs ?? 0, options.tryForMs ?? 30_000, options.graceMs ?? 5_000));
  }

  #classify(req: IncomingMessage): UpgradeKind | undefined {
    const upgrade = String(req.headers.upgrade ?? '').toLowerCase();
    if (upgrade === 'websocket') {
      const protocols = String(req.headers['sec-websocket-protocol'] ?? '')
        .split(',')
        .map((p) => p.trim());
      // Without the derp subprotocol, very old clients sent `Upgrade: websocket` for plain DERP.
      if (protocols.includes('derp') && req.headers['sec-websocket-key']) return 'websocket';
    } else if (upgrade !== 'derp') {
      return undefined;
    }
    return req.headers['derp-fast-start'] === '1' ? 'derp-fast-start' : 'derp';
  }

  #bridge(socket: Duplex, head: Buffer, kind: UpgradeKind, accept: string | undefined, address: string, port: number): void {
    let bridge;
    try {
      bridge = this.#core.openBridge(head, kind, accept, address, port);
    } catch (err) {
      socket.destroy();
      throw new DerpmeshError('DERPMESH_ERR_UPGRADE', `cannot bridge DERP connection: ${(err as Error).message}`);
    }
    socket.on('data', (chunk: Buffer) => bridge.push(chunk));
    socket.on('end', () => bridge.end());
    socket.on('close', () => bridge.end());
    socket.on('error', () => bridge.end());
    void (async () => {
      for (;;) {
        const chunk = await bridge.read();
        if (chunk === null || socket.destroyed) break;
        if (!socket.write(chunk)) await writable(socket);
      }
      socket.end();
    })();
  }
}

/** Resolves when a backpressured socket drains or closes, leaving no listener behind either way. */
/**
 * The raw response an upgrade is refused with (written to the socket, then closed); to a HEAD request,
 * the head only (the core's front does the same, `raw_refusal` in native/relay/src/front.rs).
 */
export function rawRefusal(status: string, body: string, method: string | undefined): string {
  const head = `HTTP/1.1 ${status}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n`;
  return method === 'HEAD' ? head : head + body;
}

function writable(socket: Duplex): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = () => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

function websocketAccept(key: string): string {
  return createHash('sha1')
    .update(key + WEBSOCKET_GUID)
    .digest('base64');
}

/**
 * The socket's file descriptor when the relay can take it over directly: plain TCP on Unix (not
 * TLS in Node, not a connection the core handed back over a Unix socket).
 */
function descriptorOf(socket: Duplex): number | undefined {
  if (process.platform === 'win32' || socket instanceof TLSSocket) return undefined;
  const handle = (socket as unknown as { _handle?: { fd?: number; constructor?: { name?: string } } })._handle;
  if (handle?.constructor?.name !== 'TCP') return undefined;
  const fd = handle.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}
