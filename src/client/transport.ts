// Getting a DERP byte stream: an HTTP/1.1 upgrade over TCP or TLS, or a WebSocket with the `derp`
// subprotocol whose binary messages are concatenated into one stream (a frame may span messages,
// a message may hold several frames).
import net from 'node:net';
import tls from 'node:tls';
import WebSocket from 'ws';
import { CLIENT_SCHEMES, derpEndpoint, relayUrl as parseRelayUrl, RelayUrlError } from '../relay-url.js';
import { derpClientError } from './errors.js';

export type TransportKind = 'tcp' | 'websocket';

/** Where the stream's bytes go once it is established. */
export interface TransportHandlers {
  data(bytes: Buffer): void;
  /** The stream ended; `error` says why when it was not a clean close. */
  close(error?: Error): void;
}

/** An established DERP byte stream. */
export interface Transport {
  readonly kind: TransportKind;
  /** Local address and port of the underlying TCP connection, when known. */
  readonly localAddress: string | undefined;
  readonly localPort: number | undefined;
  /** Bytes written but not yet handed to the kernel (backpressure). */
  readonly bufferedBytes: number;
  /** Delivers the bytes received so far, then every later chunk, to `handlers`. Call once. */
  start(handlers: TransportHandlers): void;
  write(bytes: Buffer): void;
  /** Closes gracefully (FIN, or a WebSocket close frame). */
  end(): void;
  /** Closes at once. */
  destroy(): void;
}

export interface DialOptions {
  /** `http:`/`https:` (DERP upgrade) or `ws:`/`wss:` URL of the relay's DERP endpoint. */
  url: URL;
  kind: TransportKind;
  /** Send `Derp-Fast-Start: 1`: the relay answers with no HTTP response. TCP only. */
  fastStart: boolean;
  /** Bytes sent in the same write as the request (the ClientInfo frame under fast start). TCP only. */
  firstBytes?: Buffer;
  tls?: tls.ConnectionOptions;
  /** Aborting rejects the dial with the signal's reason and tears the connection down. */
  signal: AbortSignal;
}

/** The WebSocket subprotocol of DERP. */
export const WEBSOCKET_PROTOCOL = 'derp';
/**
 * Largest WebSocket message this client sends. Go relays (derper) read at most 32 KiB per message
 * and close the connection otherwise; the stream may be cut anywhere, so larger frames are split.
 */
export const MAX_WEBSOCKET_MESSAGE = 32 * 1024;
/** A relay whose response head is longer than this is not a DERP relay. */
const MAX_RESPONSE_HEAD = 16 * 1024;
const HEAD_END = Buffer.from('\r\n\r\n');
/** First byte of "HTTP/1.1 …"; no DERP frame type has this value, so it tells a response from a fast-start stream. */
const HTTP_RESPONSE_FIRST_BYTE = 0x48;

/** Parses a relay URL: `http(s)://host[:port][/path]`, or `ws(s)://…`; an empty path becomes `/derp`. */
export function relayUrl(text: string): URL {
  try {
    return derpEndpoint(parseRelayUrl(text, { schemes: CLIENT_SCHEMES }));
  } catch (err) {
    if (!(err instanceof RelayUrlError)) throw err;
    const message =
      err.reason === 'scheme'
        ? `relay URL "${text}" must use http:, https:, ws: or wss:`
        : `invalid relay URL "${text}"; expected http(s)://host:port/derp`;
    throw derpClientError('DERP_ERR_INVALID_OPTION', message, { value: text, cause: err });
  }
}

/** Connects and upgrades; resolves once the DERP stream can be read and written. */
export function dial(options: DialOptions): Promise<Transport> {
  return options.kind === 'websocket' ? dialWebSocket(options) : dialTcp(options);
}

function isSecure(url: URL): boolean {
  return url.protocol === 'https:' || url.protocol === 'wss:';
}

function upgradeRequest(url: URL, fastStart: boolean): Buffer {
  const lines = [
    `GET ${url.pathname}${url.search} HTTP/1.1`,
    `Host: ${url.host}`,
    'Upgrade: DERP',
    'Connection: Upgrade',
    'User-Agent: derpmesh-client',
  ];
  if (fastStart) lines.push('Derp-Fast-Start: 1');
  return Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1');
}

function dialTcp(options: DialOptions): Promise<Transport> {
  const { url, signal } = options;
  const secure = isSecure(url);
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  const port = Number(url.port) || (secure ? 443 : 80);
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const socket: net.Socket = secure
      ? tls.connect({
          host,
          port,
          ALPNProtocols: ['http/1.1'],
          ...(net.isIP(host) === 0 ? { servername: host } : {}),
          ...options.tls,
        })
      : net.connect({ host, port });
    socket.setNoDelay(true);
    let received: Buffer = Buffer.alloc(0);

    const cleanup = (): void => {
      signal.removeEventListener('abort', onAbort);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    const fail = (error: Error): void => {
      cleanup();
      socket.on('error', () => {});
      socket.destroy();
      reject(error);
    };
    const succeed = (initial: Buffer): void => {
      cleanup();
      // Synchronously, so no chunk falls between the two listeners.
      resolve(new SocketTransport(socket, initial));
    };
    const onAbort = (): void => fail(signal.reason as Error);
    const onError = (error: Error): void =>
      fail(derpClientError('DERP_ERR_CONNECTION', `cannot connect to ${url.host}: ${error.message}`, { cause: error }));
    const onClose = (): void =>
      fail(derpClientError('DERP_ERR_CONNECTION', `${url.host} closed the connection before the DERP stream started`));
    const onData = (chunk: Buffer): void => {
      received = received.length === 0 ? chunk : Buffer.concat([received, chunk]);
      // Under fast start the relay sends no response; tolerate one that answers anyway.
      if (options.fastStart && received[0] !== HTTP_RESPONSE_FIRST_BYTE) {
        succeed(received);
        return;
      }
      const headEnd = received.indexOf(HEAD_END);
      if (headEnd < 0) {
        if (received.length > MAX_RESPONSE_HEAD) {
          fail(derpClientError('DERP_ERR_HTTP_STATUS', `${url.host} sent an HTTP response head over ${MAX_RESPONSE_HEAD} bytes`));
        }
        return;
      }
      const head = received.subarray(0, headEnd).toString('latin1');
      const statusCode = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? NaN);
      if (statusCode !== 101) {
        const body = received
          .subarray(headEnd + HEAD_END.length, headEnd + HEAD_END.length + 200)
          .toString('utf8')
          .trim();
        fail(
          derpClientError(
            'DERP_ERR_HTTP_STATUS',
            `${url.host} refused the DERP upgrade: ${head.split('\r\n')[0]}${body === '' ? '' : ` (${body})`}`,
            { statusCode: Number.isNaN(statusCode) ? undefined : statusCode, value: head.split('\r\n')[0] },
          ),
        );
        return;
      }
      succeed(received.subarray(headEnd + HEAD_END.length));
    };

    signal.addEventListener('abort', onAbort);
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    const request = upgradeRequest(url, options.fastStart);
    socket.write(options.firstBytes === undefined ? request : Buffer.concat([request, options.firstBytes]));
  });
}

/**
 * What a transport received before the client attached its handlers (the handshake runs first),
 * and its close, delivered in order once `start` is called.
 */
class Inbox {
  #pending: Buffer[] = [];
  #handlers: TransportHandlers | undefined;
  #closed = false;
  /** The first error seen; reported with the close. */
  error: Error | undefined;

  data(chunk: Buffer): void {
    if (this.#handlers === undefined) this.#pending.push(chunk);
    else this.#handlers.data(chunk);
  }

  close(): void {
    this.#closed = true;
    this.#handlers?.close(this.error);
  }

  start(handlers: TransportHandlers): void {
    this.#handlers = handlers;
    const pending = this.#pending;
    this.#pending = [];
    for (const chunk of pending) handlers.data(chunk);
    if (this.#closed) handlers.close(this.error);
  }
}

/** A TCP or TLS socket carrying the DERP stream. */
class SocketTransport implements Transport {
  readonly kind = 'tcp';
  readonly #socket: net.Socket;
  readonly #inbox = new Inbox();

  constructor(socket: net.Socket, initial: Buffer) {
    this.#socket = socket;
    if (initial.length > 0) this.#inbox.data(initial);
    socket.on('data', (chunk: Buffer) => this.#inbox.data(chunk));
    socket.on('error', (error) => {
      this.#inbox.error ??= derpClientError('DERP_ERR_CONNECTION', `connection to the relay failed: ${error.message}`, {
        cause: error,
      });
    });
    socket.on('close', () => this.#inbox.close());
  }

  get localAddress(): string | undefined {
    return this.#socket.localAddress;
  }

  get localPort(): number | undefined {
    return this.#socket.localPort;
  }

  start(handlers: TransportHandlers): void {
    this.#inbox.start(handlers);
  }

  get bufferedBytes(): number {
    return this.#socket.writableLength;
  }

  write(bytes: Buffer): void {
    if (this.#socket.destroyed) return;
    // Frames written in the same tick leave in one writev.
    if (this.#socket.writableCorked === 0) {
      this.#socket.cork();
      process.nextTick(() => this.#socket.uncork());
    }
    this.#socket.write(bytes);
  }

  end(): void {
    this.#socket.end();
  }

  destroy(): void {
    this.#socket.destroy();
  }
}

function dialWebSocket(options: DialOptions): Promise<Transport> {
  const { signal } = options;
  const url = new URL(options.url);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  if (url.protocol === 'https:') url.protocol = 'wss:';
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const socket = new WebSocket(url, [WEBSOCKET_PROTOCOL], {
      perMessageDeflate: false,
      ...(options.tls as WebSocket.ClientOptions | undefined),
    });
    // ws reports failures as 'error' events; after the dial settles they surface through 'close'.
    socket.on('error', () => {});
    let tcp: net.Socket | undefined;
    socket.once('upgrade', (response) => {
      tcp = response.socket;
    });
    let settled = false;
    const fail = (error: Error): void => {
      if (settled) return;
      settled = true;
      signal.removeEventListener('abort', onAbort);
      socket.terminate();
      reject(error);
    };
    const onAbort = (): void => fail(signal.reason as Error);
    signal.addEventListener('abort', onAbort);
    socket.once('unexpected-response', (request, response) => {
      fail(
        derpClientError('DERP_ERR_HTTP_STATUS', `${url.host} refused the WebSocket upgrade: HTTP ${response.statusCode}`, {
          statusCode: response.statusCode,
          value: response.statusCode,
        }),
      );
      response.destroy();
      request.destroy();
    });
    socket.once('error', (error) =>
      fail(derpClientError('DERP_ERR_CONNECTION', `cannot connect to ${url.host}: ${error.message}`, { cause: error })),
    );
    socket.once('close', () => fail(derpClientError('DERP_ERR_CONNECTION', `${url.host} closed the WebSocket before it opened`)));
    socket.once('open', () => {
      if (socket.protocol !== WEBSOCKET_PROTOCOL) {
        fail(
          derpClientError('DERP_ERR_HANDSHAKE', `${url.host} did not accept the "derp" WebSocket subprotocol`, {
            value: socket.protocol,
          }),
        );
        return;
      }
      settled = true;
      signal.removeEventListener('abort', onAbort);
      resolve(new WebSocketTransport(socket, tcp));
    });
  });
}

/** A WebSocket whose binary messages carry the DERP byte stream. */
class WebSocketTransport implements Transport {
  readonly kind = 'websocket';
  readonly #socket: WebSocket;
  readonly #inbox = new Inbox();
  readonly #tcp: net.Socket | undefined;

  constructor(socket: WebSocket, tcp: net.Socket | undefined) {
    this.#socket = socket;
    this.#tcp = tcp;
    socket.on('message', (data) => {
      this.#inbox.data(Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data));
    });
    socket.on('error', (error) => {
      this.#inbox.error ??= derpClientError('DERP_ERR_CONNECTION', `WebSocket to the relay failed: ${error.message}`, {
        cause: error,
      });
    });
    socket.on('close', (code, reason) => {
      if (this.#inbox.error === undefined && code !== 1000 && code !== 1005) {
        this.#inbox.error = derpClientError('DERP_ERR_CONNECTION', `WebSocket closed with code ${code} ${reason.toString()}`.trim(), {
          value: code,
        });
      }
      this.#inbox.close();
    });
  }

  get localAddress(): string | undefined {
    return this.#tcp?.localAddress;
  }

  get localPort(): number | undefined {
    return this.#tcp?.localPort;
  }

  start(handlers: TransportHandlers): void {
    this.#inbox.start(handlers);
  }

  get bufferedBytes(): number {
    return this.#socket.bufferedAmount;
  }

  write(bytes: Buffer): void {
    if (this.#socket.readyState !== WebSocket.OPEN) return;
    for (let offset = 0; offset < bytes.length; offset += MAX_WEBSOCKET_MESSAGE) {
      this.#socket.send(bytes.subarray(offset, offset + MAX_WEBSOCKET_MESSAGE), { binary: true });
    }
  }

  end(): void {
    this.#socket.close(1000);
  }

  destroy(): void {
    this.#socket.terminate();
  }
}
