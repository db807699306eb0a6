// DerpClient: a DERP connection to one relay that sends and receives packets, answers pings, and
// (optionally) reconnects when the connection breaks or the relay announces a restart.
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { createSecureContext, type ConnectionOptions as TlsOptions, type SecureContext } from 'node:tls';
import { Backoff, type BackoffOptions } from './backoff.js';
import { DerpConnection } from './connection.js';
import { derpClientError } from './errors.js';
import { FrameType, MAX_PACKET_SIZE, PING_DATA_LENGTH, encodeFrame } from './frame.js';
import type { ServerInfo } from './handshake.js';
import { assertKey, generatePrivateKey, publicKeyOf } from './keys.js';
import type { PeerGoneReasonName, PeerPresentInfo, ServerMessage } from './messages.js';
import { type TransportKind, relayUrl } from './transport.js';

export interface DerpClientOptions {
  /** The relay: `http(s)://host:port[/derp]` (or `ws(s)://…`, which implies `transport: 'websocket'`). */
  url: string;
  /** This node's 32-byte private key; a new one is generated when absent. */
  privateKey?: Buffer;
  /** Pins the relay's public key (a mismatch fails the handshake) and lets fast start send ClientInfo with the request. */
  serverPublicKey?: Buffer;
  /** Mesh key of the relay: grants WatchConns, ClosePeer and ForwardPacket. */
  meshKey?: string;
  /** `'tcp'` (HTTP upgrade, the default) or `'websocket'` (subprotocol `derp`). */
  transport?: TransportKind;
  /**
   * Send `Derp-Fast-Start: 1` so the relay skips its HTTP response (TCP only, default false). When the
   * relay's key is known (`serverPublicKey`, or learned on an earlier connection) ClientInfo goes out
   * in the same write as the request.
   */
  fastStart?: boolean;
  /** Tell the relay this client answers its Pings (default true). */
  canAckPings?: boolean;
  /** Tell the relay this client is a prober (default false). */
  isProber?: boolean;
  /**
   * Reconnect when the connection breaks (default false). `true` uses 250 ms … 10 s exponential
   * backoff; after a Restarting frame the first attempt waits the relay's reconnectIn instead.
   */
  reconnect?: boolean | BackoffOptions;
  /** Limit for dialing plus the handshake, and the default ping timeout (default 10 s). */
  connectTimeoutMs?: number;
  /** TLS options for `https:`/`wss:` relays (CA, client certificates, `rejectUnauthorized`, ...). */
  tls?: TlsOptions;
}

/** Events of {@link DerpClient}, with their arguments. */
export interface DerpClientEvents {
  /** A packet from `source`. */
  packet: [source: Buffer, data: Buffer];
  /** A peer this client exchanged packets with (or, for watchers, any peer) left or was never here. */
  peerGone: [key: Buffer, reason: PeerGoneReasonName];
  /** Watchers only: a peer connected to the relay. */
  peerPresent: [key: Buffer, info: PeerPresentInfo];
  /** The relay's problem text; empty when it is healthy again. */
  health: [problem: string];
  /** The relay is restarting: reconnect after `reconnectInMs`, keep trying for `tryForMs`. */
  restarting: [info: { reconnectInMs: number; tryForMs: number }];
  /** The relay pinged this client (already answered). */
  ping: [data: Buffer];
  /** A Pong arrived. */
  pong: [data: Buffer];
  /** The relay's keep-alive. */
  keepAlive: [];
  /** The connection broke and a reconnect is scheduled (only with `reconnect`). */
  disconnected: [error: Error | undefined];
  /** A new connection replaced the broken one. */
  reconnected: [];
  /** The client is closed for good; `error` is set unless `close()` was called. */
  close: [error?: Error];
}

interface PendingPing {
  resolve(rttMs: number): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
  sentAt: number;
}

interface RestartPlan {
  reconnectInMs: number;
  /** Until when attempts use the shortest delay; afterwards normal backoff. */
  tryUntil: number;
  firstAttemptDone: boolean;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

type Held = { [K in keyof DerpClientEvents]: { name: K; args: DerpClientEvents[K] } }[keyof DerpClientEvents];

export class DerpClient extends EventEmitter<DerpClientEvents> {
  /** This client's public key. */
  readonly publicKey: Buffer;
  readonly #privateKey: Buffer;
  readonly #url: URL;
  readonly #kind: TransportKind;
  readonly #options: DerpClientOptions;
  readonly #connectTimeoutMs: number;
  readonly #backoff: Backoff | undefined;
  /** Pinned by the user: a relay with another key is refused. */
  readonly #pinnedServerKey: Buffer | undefined;
  /** The key of the relay this client last connected to (or the pinned one). */
  #serverPublicKey: Buffer | undefined;
  /** The key fast start seals ClientInfo to before the relay has said its key. */
  #likelyServerKey: Buffer | undefined;
  #connection: DerpConnection | undefined;
  #connecting: AbortController | undefined;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #restartPlan: RestartPlan | undefined;
  #pings = new Map<string, PendingPing[]>();
  #preferred: boolean | undefined;
  #watching = false;
  #health = '';
  #started = false;
  #closing = false;
  #closed = false;
  #closePromise: Promise<void> | undefined;
  /** Events that arrive while the first connect() is pending, replayed once it resolved. */
  #held: Held[] | undefined;

  /** Connects and resolves once the relay's ServerInfo opened. */
  static async connect(options: DerpClientOptions): Promise<DerpClient> {
    const client = new DerpClient(options);
    await client.connect();
    return client;
  }

  /** A client that is not connected yet: attach listeners, then call {@link connect}. */
  constructor(options: DerpClientOptions) {
    super();
    this.#options = options;
    this.#url = relayUrl(options.url);
    const kind = options.transport ?? (this.#url.protocol.startsWith('ws') ? 'websocket' : 'tcp');
    if (kind !== 'tcp' && kind !== 'websocket') {
      throw derpClientError('DERP_ERR_INVALID_OPTION', `transport must be 'tcp' or 'websocket'`, { value: kind });
    }
    this.#kind = kind;
    if (options.privateKey !== undefined) assertKey(options.privateKey, 'privateKey');
    if (options.serverPublicKey !== undefined) assertKey(options.serverPublicKey, 'serverPublicKey');
    this.#privateKey = options.privateKey ?? generatePrivateKey();
    this.publicKey = publicKeyOf(this.#privateKey);
    this.#pinnedServerKey = options.serverPublicKey;
    this.#serverPublicKey = options.serverPublicKey;
    this.#likelyServerKey = options.serverPublicKey;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    if (!(this.#connectTimeoutMs > 0)) {
      throw derpClientError('DERP_ERR_INVALID_OPTION', 'connectTimeoutMs must be a positive number', {
        value: options.connectTimeoutMs,
      });
    }
    const reconnect = options.reconnect ?? false;
    this.#backoff = reconnect === false ? undefined : new Backoff(reconnect === true ? {} : reconnect);
  }

  /** The relay's public key; known once connected. */
  get serverPublicKey(): Buffer {
    if (this.#serverPublicKey === undefined) {
      throw derpClientError('DERP_ERR_CLOSED', 'the relay key is known only after connecting');
    }
    return this.#serverPublicKey;
  }

  /** What the relay said in ServerInfo on the current connection. */
  get serverInfo(): ServerInfo | undefined {
    return this.#connection?.serverInfo;
  }

  /** Whether a connection is open right now. */
  get connected(): boolean {
    return this.#connection?.isOpen ?? false;
  }

  /** The relay's last Health text ('' = healthy). */
  get health(): string {
    return this.#health;
  }

  /** Bytes queued for the relay but not yet written to the socket; 0 when not connected. */
  get bufferedBytes(): number {
    return this.#connection?.transport.bufferedBytes ?? 0;
  }

  /** Local address of the current connection (what watchers see in PeerPresent). */
  get localAddress(): { address: string; port: number } | undefined {
    const transport = this.#connection?.transport;
    if (transport?.localAddress === undefined || transport.localPort === undefined) return undefined;
    return { address: transport.localAddress, port: transport.localPort };
  }

  /** Opens the first connection. Rejects (and closes the client) if it fails, even with `reconnect`. */
  async connect(): Promise<void> {
    if (this.#started) throw derpClientError('DERP_ERR_INVALID_ARGUMENT', 'connect() was already called');
    this.#started = true;
    this.#held = [];
    try {
      await this.#open();
    } catch (err) {
      this.#held = undefined;
      this.#closed = true;
      throw err;
    }
    const held = this.#held;
    this.#held = undefined;
    if (held.length > 0) {
      setImmediate(() => {
        for (const event of held) this.emit(event.name, ...event.args);
      });
    }
  }

  /** Sends `packet` to the client with public key `destination`. Dropped while reconnecting. */
  send(destination: Buffer, packet: Buffer): void {
    assertKey(destination, 'destination');
    if (packet.length > MAX_PACKET_SIZE) {
      throw derpClientError('DERP_ERR_PACKET_TOO_LARGE', `packet of ${packet.length} bytes exceeds ${MAX_PACKET_SIZE}`, {
        value: packet.length,
      });
    }
    this.#write(encodeFrame(FrameType.SendPacket, destination, packet));
  }

  /** Mesh clients: hands the relay a packet from `source` for its local client `destination`. */
  forwardPacket(source: Buffer, destination: Buffer, packet: Buffer): void {
    assertKey(source, 'source');
    assertKey(destination, 'destination');
    if (packet.length > MAX_PACKET_SIZE) {
      throw derpClientError('DERP_ERR_PACKET_TOO_LARGE', `packet of ${packet.length} bytes exceeds ${MAX_PACKET_SIZE}`, {
        value: packet.length,
      });
    }
    this.#write(encodeFrame(FrameType.ForwardPacket, source, destination, packet));
  }

  /** Pings the relay; resolves with the round trip in milliseconds when the matching Pong arrives. */
  async ping(data: Buffer = randomBytes(PING_DATA_LENGTH), timeoutMs = this.#connectTimeoutMs): Promise<number> {
    if (!Buffer.isBuffer(data) || data.length !== PING_DATA_LENGTH) {
      throw derpClientError('DERP_ERR_INVALID_ARGUMENT', `ping data must be ${PING_DATA_LENGTH} bytes`, {
        value: Buffer.isBuffer(data) ? data.length : typeof data,
      });
    }
    const connection = this.#requireConnection();
    const id = data.toString('hex');
    return new Promise<number>((resolve, reject) => {
      const pending: PendingPing = {
        resolve,
        reject,
        sentAt: performance.now(),
        timer: setTimeout(() => {
          this.#removePing(id, pending);
          reject(derpClientError('DERP_ERR_TIMEOUT', `no Pong within ${timeoutMs} ms`, { value: timeoutMs }));
        }, timeoutMs),
      };
      const waiting = this.#pings.get(id);
      if (waiting === undefined) this.#pings.set(id, [pending]);
      else waiting.push(pending);
      connection.write(encodeFrame(FrameType.Ping, data));
    });
  }

  /** Tells the relay whether it is this client's home relay (stats only); repeated after reconnects. */
  notePreferred(preferred: boolean): void {
    this.#preferred = preferred;
    this.#write(encodeFrame(FrameType.NotePreferred, Buffer.from([preferred ? 1 : 0])));
  }

  /** Mesh clients: subscribe to PeerPresent/PeerGone for every client of the relay; repeated after reconnects. */
  watchConns(): void {
    this.#watching = true;
    this.#write(encodeFrame(FrameType.WatchConns));
  }

  /** Mesh clients: asks the relay to close every connection of `key`. */
  closePeer(key: Buffer): void {
    assertKey(key, 'key');
    this.#write(encodeFrame(FrameType.ClosePeer, key));
  }

  /** Closes the connection gracefully and stops reconnecting. */
  close(): Promise<void> {
    this.#closePromise ??= this.#close();
    return this.#closePromise;
  }

  async #close(): Promise<void> {
    this.#closing = true;
    clearTimeout(this.#reconnectTimer);
    this.#connecting?.abort(derpClientError('DERP_ERR_CLOSED', 'the client was closed'));
    this.#rejectPings(derpClientError('DERP_ERR_CLOSED', 'the client was closed'));
    const connection = this.#connection;
    this.#connection = undefined;
    if (connection !== undefined) await connection.close();
    const wasClosed = this.#closed;
    this.#closed = true;
    if (!wasClosed) this.emit('close');
  }

  #requireConnection(): DerpConnection {
    if (this.#closed || this.#closing) throw derpClientError('DERP_ERR_CLOSED', 'the client is closed');
    const connection = this.#connection;
    if (connection === undefined) throw derpClientError('DERP_ERR_CLOSED', 'not connected to the relay (reconnecting)');
    return connection;
  }

  #write(frame: Buffer): void {
    if (this.#closed || this.#closing) throw derpClientError('DERP_ERR_CLOSED', 'the client is closed');
    this.#connection?.write(frame);
  }

  #secureContext: SecureContext | undefined;

  /**
   * The TLS options of every connection: the given ones with one secure context built from them on
   * the first connect and kept. Given only `ca` (or a certificate), Node builds a context per
   * connection (about 0.85 ms of CPU with one CA, more with the public roots), which every
   * reconnection would pay again.
   */
  #tlsOptions(): TlsOptions | undefined {
    const given = this.#options.tls;
    if (given === undefined || given.secureContext !== undefined) return given;
    this.#secureContext ??= createSecureContext(given);
    return { ...given, secureContext: this.#secureContext };
  }

  async #open(): Promise<void> {
    // Health is per connection: a new one is healthy until the relay says otherwise (its Health
    // frame may arrive with ServerInfo, before open() resolves).
    this.#health = '';
    const controller = new AbortController();
    this.#connecting = controller;
    let connection: DerpConnection;
    try {
      connection = await DerpConnection.open(
        {
          url: this.#url,
          kind: this.#kind,
          fastStart: this.#options.fastStart ?? false,
          privateKey: this.#privateKey,
          publicKey: this.publicKey,
          expectedServerKey: this.#pinnedServerKey,
          likelyServerKey: this.#likelyServerKey,
          clientInfo: {
            meshKey: this.#options.meshKey,
            canAckPings: this.#options.canAckPings ?? true,
            isProber: this.#options.isProber ?? false,
          },
          tls: this.#tlsOptions(),
          timeoutMs: this.#connectTimeoutMs,
          signal: controller.signal,
        },
        {
          message: (message, from) => this.#onMessage(message, from),
          close: (error) => this.#onConnectionClose(connection, error),
        },
      );
    } catch (err) {
      // Under fast start a stale learned key would fail every attempt; learn it afresh.
      this.#likelyServerKey = this.#pinnedServerKey;
      throw err;
    } finally {
      this.#connecting = undefined;
    }
    if (this.#closing) {
      connection.destroy();
      throw derpClientError('DERP_ERR_CLOSED', 'the client was closed');
    }
    this.#connection = connection;
    this.#serverPublicKey = connection.serverPublicKey;
    this.#likelyServerKey = connection.serverPublicKey;
    if (this.#preferred !== undefined) connection.write(encodeFrame(FrameType.NotePreferred, Buffer.from([this.#preferred ? 1 : 0])));
    if (this.#watching) connection.write(encodeFrame(FrameType.WatchConns));
  }

  #onMessage(message: ServerMessage, from: DerpConnection): void {
    switch (message.type) {
      case 'packet':
        this.#emit({ name: 'packet', args: [message.source, message.data] });
        break;
      case 'keepAlive':
        this.#emit({ name: 'keepAlive', args: [] });
        break;
      case 'peerGone':
        this.#emit({ name: 'peerGone', args: [message.key, message.reason] });
        break;
      case 'peerPresent':
        this.#emit({ name: 'peerPresent', args: [message.key, message.info] });
        break;
      case 'ping':
        from.write(encodeFrame(FrameType.Pong, message.data));
        this.#emit({ name: 'ping', args: [message.data] });
        break;
      case 'pong':
        this.#onPong(message.data);
        this.#emit({ name: 'pong', args: [message.data] });
        break;
      case 'health':
        this.#health = message.problem;
        this.#emit({ name: 'health', args: [message.problem] });
        break;
      case 'restarting': {
        const { reconnectInMs, tryForMs } = message;
        this.#restartPlan = { reconnectInMs, tryUntil: Date.now() + reconnectInMs + tryForMs, firstAttemptDone: false };
        this.#emit({ name: 'restarting', args: [{ reconnectInMs, tryForMs }] });
        break;
      }
      case 'ignored':
        break;
    }
  }

  #emit(event: Held): void {
    if (this.#held !== undefined) this.#held.push(event);
    else this.emit(event.name, ...event.args);
  }

  #onPong(data: Buffer): void {
    const id = data.toString('hex');
    const waiting = this.#pings.get(id);
    const first = waiting?.shift();
    if (first === undefined) return;
    if (waiting!.length === 0) this.#pings.delete(id);
    clearTimeout(first.timer);
    first.resolve(performance.now() - first.sentAt);
  }

  #removePing(id: string, pending: PendingPing): void {
    const waiting = this.#pings.get(id);
    if (waiting === undefined) return;
    const index = waiting.indexOf(pending);
    if (index >= 0) waiting.splice(index, 1);
    if (waiting.length === 0) this.#pings.delete(id);
  }

  #rejectPings(error: Error): void {
    for (const waiting of this.#pings.values()) {
      for (const pending of waiting) {
        clearTimeout(pending.timer);
        pending.reject(error);
      }
    }
    this.#pings.clear();
  }

  #onConnectionClose(connection: DerpConnection, error: Error | undefined): void {
    if (this.#connection !== connection && this.#connection !== undefined) return;
    this.#connection = undefined;
    const reason = error ?? derpClientError('DERP_ERR_CLOSED', 'the relay closed the connection');
    this.#rejectPings(derpClientError('DERP_ERR_CLOSED', 'the connection to the relay closed', { cause: reason }));
    if (this.#closing) return;
    if (this.#backoff === undefined) {
      this.#closed = true;
      this.emit('close', reason);
      return;
    }
    this.emit('disconnected', reason);
    this.#scheduleReconnect();
  }

  #scheduleReconnect(): void {
    const backoff = this.#backoff!;
    let delay: number;
    const plan = this.#restartPlan;
    if (plan !== undefined && !plan.firstAttemptDone) {
      plan.firstAttemptDone = true;
      delay = plan.reconnectInMs;
    } else if (plan !== undefined && Date.now() < plan.tryUntil) {
      delay = backoff.minDelayMs;
    } else {
      this.#restartPlan = undefined;
      delay = backoff.next();
    }
    this.#reconnectTimer = setTimeout(() => {
      this.#open().then(
        () => {
          backoff.reset();
          this.#restartPlan = undefined;
          this.emit('reconnected');
        },
        () => {
          if (!this.#closing) this.#scheduleReconnect();
        },
      );
    }, delay);
  }
}
