// Raw-socket helpers for protocol tests: small buffer builders for frames and handshake payloads,
// and a DERP connection driven byte by byte, so tests can send exactly what they mean (including
// garbage) and observe exactly what the relay answers.
import { once } from 'node:events';
import net from 'node:net';
import WebSocket from 'ws';

import { FrameType, MAGIC, PROTOCOL_VERSION } from '../../src/client/frame.js';
import { FrameParser } from '../../src/client/parser.js';
import { native } from '../../src/native.js';

export interface Frame {
  frameType: number;
  payload: Buffer;
}

export interface KeyPair {
  privateKey: Buffer;
  publicKey: Buffer;
}

export function keyPair(): KeyPair {
  const privateKey = native.generatePrivateKey();
  return { privateKey, publicKey: native.publicKeyOf(privateKey) };
}

/** Frame header: type(1) ‖ length(4, BE). The length may lie (for bad-input tests). */
export function header(frameType: number, length: number): Buffer {
  const bytes = Buffer.alloc(5);
  bytes[0] = frameType;
  bytes.writeUInt32BE(length, 1);
  return bytes;
}

/** A whole frame; the payload parts are concatenated. */
export function frame(frameType: number, ...payload: Buffer[]): Buffer {
  const body = Buffer.concat(payload);
  return Buffer.concat([header(frameType, body.length), body]);
}

/** A disco-looking packet (magic "TS💬" and at least 62 bytes). */
export function discoPacket(length = 62): Buffer {
  const packet = Buffer.alloc(Math.max(length, 62), 0xab);
  Buffer.from([0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac]).copy(packet);
  return packet;
}

/** ClientInfo payload: client key ‖ box(json) sealed with `sealWith` (default: the client's own private key). */
export function clientInfoPayload(client: KeyPair, serverPublicKey: Buffer, json: unknown, sealWith?: Buffer): Buffer {
  const text = typeof json === 'string' ? json : JSON.stringify(json);
  const sealed = native.boxSeal(sealWith ?? client.privateKey, serverPublicKey, Buffer.from(text));
  return Buffer.concat([client.publicKey, sealed]);
}

export function upgradeRequest(options: { fastStart?: boolean; upgrade?: string; extra?: string[] } = {}): Buffer {
  const lines = ['GET /derp HTTP/1.1', 'Host: 127.0.0.1', `Upgrade: ${options.upgrade ?? 'DERP'}`, 'Connection: Upgrade'];
  if (options.fastStart) lines.push('Derp-Fast-Start: 1');
  lines.push(...(options.extra ?? []));
  return Buffer.from(`${lines.join('\r\n')}\r\n\r\n`);
}

/** Rejects after `ms` with a message naming what was awaited. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Polls `check` until it returns true; fails after `ms`. */
export async function waitUntil(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Where the raw bytes go: a TCP socket after an HTTP upgrade, or a WebSocket (one message per write). */
interface ByteSink {
  write(bytes: Buffer): void;
  end(): void;
  destroy(): void;
}

/**
 * A DERP connection at the byte level. Frames received are kept in order; `next` waits for one.
 * The HTTP response head (if any) is kept in `responseHead`.
 */
export class RawConn {
  readonly frames: Frame[] = [];
  /** Resolves when the connection is gone (either side closed it). */
  readonly closed: Promise<void>;
  responseHead: string | undefined;
  /** Every byte received after the response head, unparsed. */
  received = Buffer.alloc(0);
  #parser = new FrameParser();
  #waiters = new Set<() => void>();
  #isClosed = false;
  #sink: ByteSink;
  #expectHead: boolean;
  #headBuffer = Buffer.alloc(0);
  #parseError: Error | undefined;

  private constructor(sink: ByteSink, expectHead: boolean, onClose: (listener: () => void) => void) {
    this.#sink = sink;
    this.#expectHead = expectHead;
    this.closed = new Promise((resolve) =>
      onClose(() => {
        this.#isClosed = true;
        this.#wake();
        resolve();
      }),
    );
  }

  /** Opens a TCP connection and writes `request` (default: a DERP upgrade) plus `after` in one write. */
  static async tcp(port: number, options: { request?: Buffer; after?: Buffer; expectHead?: boolean } = {}): Promise<RawConn> {
    const socket = net.connect(port, '127.0.0.1');
    socket.setNoDelay(true);
    socket.on('error', () => {});
    const conn = new RawConn(
      { write: (b) => socket.write(b), end: () => socket.end(), destroy: () => socket.destroy() },
      options.expectHead ?? true,
      (listener) => socket.once('close', listener),
    );
    conn.socket = socket;
    socket.on('data', (chunk: Buffer) => conn.#onBytes(chunk));
    await once(socket, 'connect');
    const request = options.request ?? upgradeRequest();
    socket.write(options.after === undefined ? request : Buffer.concat([request, options.after]));
    return conn;
  }

  /** Opens a WebSocket with the `derp` subprotocol; every `write` is one binary message. */
  static async websocket(url: string): Promise<RawConn> {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws')}/derp`, ['derp'], { perMessageDeflate: false });
    ws.on('error', () => {});
    const conn = new RawConn(
      { write: (b) => ws.send(b, { binary: true }), end: () => ws.close(1000), destroy: () => ws.terminate() },
      false,
      (listener) => ws.once('close', listener),
    );
    conn.websocket = ws;
    ws.on('message', (data) => conn.#onBytes(data as Buffer));
    await withTimeout(once(ws, 'open'), 5000, 'the WebSocket to open');
    return conn;
  }

  /** The TCP socket (TCP connections only). */
  socket: net.Socket | undefined;
  /** The WebSocket (WebSocket connections only). */
  websocket: WebSocket | undefined;

  get isClosed(): boolean {
    return this.#isClosed;
  }

  write(bytes: Buffer): void {
    this.#sink.write(bytes);
  }

  end(): void {
    this.#sink.end();
  }

  destroy(): void {
    this.#sink.destroy();
  }

  /** Waits for the next frame of `frameType` (any type when omitted), removing it and the frames before it. */
  async next(frameType?: number, ms = 5000): Promise<Frame> {
    const take = (): Frame | undefined => {
      const index = this.frames.findIndex((f) => frameType === undefined || f.frameType === frameType);
      if (index < 0) return undefined;
      return this.frames.splice(0, index + 1)[index];
    };
    return withTimeout(
      (async () => {
        for (;;) {
          const found = take();
          if (found !== undefined) return found;
          if (this.#parseError !== undefined) throw this.#parseError;
          if (this.#isClosed) throw new Error(`connection closed while waiting for frame type ${frameType ?? 'any'}`);
          await new Promise<void>((resolve) => {
            this.#waiters.add(resolve);
          });
        }
      })(),
      ms,
      `frame type ${frameType ?? 'any'}`,
    );
  }

  /** Asserts-by-timeout that the relay closes this connection within `ms`. */
  waitClosed(ms = 5000): Promise<void> {
    return withTimeout(this.closed, ms, 'the relay to close the connection');
  }

  /** ServerKey → ClientInfo → ServerInfo; returns the server key. */
  async handshake(client: KeyPair, json: unknown = { version: PROTOCOL_VERSION, CanAckPings: true }): Promise<Buffer> {
    const serverKeyFrame = await this.next();
    if (serverKeyFrame.frameType !== FrameType.ServerKey) throw new Error(`first frame was type ${serverKeyFrame.frameType}`);
    if (!serverKeyFrame.payload.subarray(0, 8).equals(MAGIC)) throw new Error('ServerKey without magic');
    const serverKey = serverKeyFrame.payload.subarray(8, 40);
    this.write(frame(FrameType.ClientInfo, clientInfoPayload(client, serverKey, json)));
    const info = await this.next();
    if (info.frameType !== FrameType.ServerInfo) throw new Error(`expected ServerInfo, got type ${info.frameType}`);
    if (native.boxOpen(client.privateKey, serverKey, info.payload) === null) throw new Error('ServerInfo did not open');
    return serverKey;
  }

  #onBytes(chunk: Buffer): void {
    if (this.#expectHead && this.responseHead === undefined) {
      this.#headBuffer = Buffer.concat([this.#headBuffer, chunk]);
      const end = this.#headBuffer.indexOf('\r\n\r\n');
      if (end < 0) return;
      this.responseHead = this.#headBuffer.subarray(0, end).toString('latin1');
      chunk = this.#headBuffer.subarray(end + 4);
    }
    this.received = Buffer.concat([this.received, chunk]);
    try {
      this.#parser.parse(chunk, (frameType, payload) => this.frames.push({ frameType, payload }));
    } catch (err) {
      this.#parseError = err as Error;
    }
    this.#wake();
  }

  #wake(): void {
    const waiters = [...this.#waiters];
    this.#waiters.clear();
    for (const wake of waiters) wake();
  }
}

/** A raw TCP connection that completed the DERP handshake. */
export async function rawClient(port: number, json?: unknown): Promise<RawConn & { keys: KeyPair }> {
  const keys = keyPair();
  const conn = await RawConn.tcp(port);
  await conn.handshake(keys, json);
  return Object.assign(conn, { keys });
}
