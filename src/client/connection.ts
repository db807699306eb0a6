// One DERP connection: dial, handshake (ServerKey → ClientInfo → ServerInfo), then decoded frames
// out and encoded frames in. No reconnecting; DerpClient does that.
import type { ConnectionOptions as TlsOptions } from 'node:tls';
import { derpClientError } from './errors.js';
import {
  type ClientInfo,
  type HandshakeBox,
  type ServerInfo,
  clientInfoFrame,
  handshakeBox,
  openServerInfo,
  parseServerKey,
} from './handshake.js';
import { type ServerMessage, decodeServerFrame } from './messages.js';
import { FrameParser } from './parser.js';
import { type Transport, type TransportKind, dial } from './transport.js';

export interface ConnectionOptions {
  url: URL;
  kind: TransportKind;
  fastStart: boolean;
  privateKey: Buffer;
  publicKey: Buffer;
  /** The relay's key must be this one (pinned by the user). */
  expectedServerKey: Buffer | undefined;
  /** The relay's key as far as it is known (pinned, or learned earlier): under fast start over TCP, ClientInfo is sealed to it and goes out with the request. */
  likelyServerKey: Buffer | undefined;
  clientInfo: ClientInfo;
  tls: TlsOptions | undefined;
  /** Limit for dial plus handshake. */
  timeoutMs: number;
  /** Aborting abandons the attempt (the client is closing). */
  signal: AbortSignal;
}

export interface ConnectionHandlers {
  /** A frame after the handshake. May be called before `open` resolves (frames in the same chunk as ServerInfo). */
  message(message: ServerMessage, connection: DerpConnection): void;
  /** The connection ended after `open` resolved. */
  close(error: Error | undefined): void;
}

type State = 'serverKey' | 'serverInfo' | 'open' | 'closed';

/** Grace for a graceful close before the connection is cut. */
const CLOSE_GRACE_MS = 1000;

export class DerpConnection {
  readonly #transport: Transport;
  readonly #options: ConnectionOptions;
  readonly #handlers: ConnectionHandlers;
  readonly #parser = new FrameParser();
  #state: State = 'serverKey';
  #clientInfoSent: boolean;
  /** The handshake's box, from ClientInfo until ServerInfo has opened. */
  #box: HandshakeBox | undefined;
  #serverPublicKey: Buffer | undefined;
  #serverInfo: ServerInfo = {};
  #handshakeDone: ((error?: Error) => void) | undefined;
  #closed: Promise<void>;
  #resolveClosed!: () => void;

  /** Dials and completes the handshake; resolves after ServerInfo opened. */
  static open(options: ConnectionOptions, handlers: ConnectionHandlers): Promise<DerpConnection> {
    const controller = new AbortController();
    const timer = setTimeout(
      () =>
        controller.abort(
          derpClientError('DERP_ERR_TIMEOUT', `no DERP session with ${options.url.host} within ${options.timeoutMs} ms`, {
            value: options.timeoutMs,
          }),
        ),
      options.timeoutMs,
    );
    const onOuterAbort = (): void => controller.abort(options.signal.reason);
    if (options.signal.aborted) onOuterAbort();
    else options.signal.addEventListener('abort', onOuterAbort, { once: true });
    const cleanup = (): void => {
      clearTimeout(timer);
      options.signal.removeEventListener('abort', onOuterAbort);
    };

    // Under fast start over TCP with a known server key, ClientInfo rides in the request's write.
    const earlyBox =
      options.fastStart && options.kind === 'tcp' && options.likelyServerKey !== undefined
        ? handshakeBox(options.privateKey, options.likelyServerKey)
        : undefined;
    const early = earlyBox && clientInfoFrame(earlyBox, options.publicKey, options.clientInfo);
    return dial({
      url: options.url,
      kind: options.kind,
      fastStart: options.fastStart && options.kind === 'tcp',
      firstBytes: early,
      tls: options.tls,
      signal: controller.signal,
    }).then(
      (transport) =>
        new Promise<DerpConnection>((resolve, reject) => {
          const connection = new DerpConnection(transport, options, handlers, earlyBox);
          const onAbort = (): void => connection.#fail(controller.signal.reason as Error);
          controller.signal.addEventListener('abort', onAbort, { once: true });
          connection.#handshakeDone = (error) => {
            controller.signal.removeEventListener('abort', onAbort);
            cleanup();
            if (error === undefined) resolve(connection);
            else reject(error);
          };
          transport.start({ data: (bytes) => connection.#onData(bytes), close: (error) => connection.#onClose(error) });
        }),
      (error: unknown) => {
        cleanup();
        throw error;
      },
    );
  }

  /** `earlyBox`: ClientInfo already went out (fast start), sealed with this box. */
  private constructor(transport: Transport, options: ConnectionOptions, handlers: ConnectionHandlers, earlyBox: HandshakeBox | undefined) {
    this.#transport = transport;
    this.#options = options;
    this.#handlers = handlers;
    this.#clientInfoSent = earlyBox !== undefined;
    this.#box = earlyBox;
    this.#closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
  }

  /** The relay's public key (from its ServerKey frame). */
  get serverPublicKey(): Buffer {
    return this.#serverPublicKey!;
  }

  get serverInfo(): ServerInfo {
    return this.#serverInfo;
  }

  get transport(): Transport {
    return this.#transport;
  }

  get isOpen(): boolean {
    return this.#state === 'open';
  }

  write(frame: Buffer): void {
    if (this.#state !== 'closed') this.#transport.write(frame);
  }

  /** Ends the connection gracefully; cuts it after a short grace. */
  close(): Promise<void> {
    if (this.#state !== 'closed') {
      this.#transport.end();
      const timer = setTimeout(() => this.#transport.destroy(), CLOSE_GRACE_MS);
      void this.#closed.then(() => clearTimeout(timer));
    }
    return this.#closed;
  }

  /** Cuts the connection at once. */
  destroy(): void {
    this.#transport.destroy();
  }

  #onData(bytes: Buffer): void {
    let inHandler = false;
    try {
      this.#parser.parse(bytes, (frameType, payload) => {
        const message = this.#onFrame(frameType, payload);
        if (message === undefined) return;
        inHandler = true;
        this.#handlers.message(message, this);
        inHandler = false;
      });
    } catch (err) {
      // An exception from the message handler (an application's listener) is not the relay's doing:
      // it propagates. Anything else is: a frame over 1 MiB, a handshake or message refused.
      if (inHandler) throw err;
      this.#fail(err as Error);
    }
  }

  /** The message a frame carries; undefined for handshake frames and once closed. Throws when the connection cannot go on. */
  #onFrame(frameType: number, payload: Buffer): ServerMessage | undefined {
    if (this.#state === 'closed') return undefined;
    if (this.#state !== 'open') {
      this.#onHandshakeFrame(frameType, payload);
      return undefined;
    }
    return decodeServerFrame(frameType, payload);
  }

  #onHandshakeFrame(frameType: number, payload: Buffer): void {
    if (this.#state === 'serverKey') {
      const serverKey = parseServerKey(frameType, payload);
      const { expectedServerKey, likelyServerKey } = this.#options;
      if (expectedServerKey !== undefined && !expectedServerKey.equals(serverKey)) {
        throw derpClientError('DERP_ERR_HANDSHAKE', `the relay's key ${serverKey.toString('hex')} is not the expected one`, {
          value: serverKey.toString('hex'),
        });
      }
      if (this.#clientInfoSent && !likelyServerKey!.equals(serverKey)) {
        // ClientInfo went out sealed to a key the relay no longer has (another node behind the
        // same address); the relay will refuse it, so give up on this attempt at once.
        throw derpClientError('DERP_ERR_HANDSHAKE', `the relay's key changed to ${serverKey.toString('hex')}; retry without fast start`, {
          value: serverKey.toString('hex'),
        });
      }
      this.#serverPublicKey = serverKey;
      if (!this.#clientInfoSent) {
        // One box for both directions of the handshake (an early ClientInfo's box is already the
        // one for this key: a different key was refused above).
        this.#box = handshakeBox(this.#options.privateKey, serverKey);
        const { publicKey, clientInfo } = this.#options;
        this.#transport.write(clientInfoFrame(this.#box, publicKey, clientInfo));
        this.#clientInfoSent = true;
      }
      this.#state = 'serverInfo';
      return;
    }
    this.#serverInfo = openServerInfo(this.#box!, frameType, payload);
    this.#box = undefined;
    this.#state = 'open';
    this.#settleHandshake();
  }

  #settleHandshake(error?: Error): void {
    const done = this.#handshakeDone;
    this.#handshakeDone = undefined;
    done?.(error);
  }

  #fail(error: Error): void {
    if (this.#state === 'closed') return;
    const wasOpen = this.#state === 'open';
    this.#state = 'closed';
    this.#transport.destroy();
    this.#finish(wasOpen, error);
  }

  #onClose(error: Error | undefined): void {
    if (this.#state === 'closed') {
      this.#resolveClosed();
      return;
    }
    const wasOpen = this.#state === 'open';
    this.#state = 'closed';
    this.#finish(
      wasOpen,
      wasOpen ? error : derpClientError('DERP_ERR_HANDSHAKE', `the relay closed the connection during the handshake`, { cause: error }),
    );
  }

  #finish(wasOpen: boolean, error: Error | undefined): void {
    this.#resolveClosed();
    if (wasOpen) this.#handlers.close(error);
    else this.#settleHandshake(error);
  }
}
