// The DERP client: pure helpers (keys, frames, messages, backoff), its handshake and reconnect
// logic against a scripted fake relay, and end to end against the real relay (and Tailscale's
// derper when it is installed).
import { strict as assert } from 'node:assert';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { Backoff } from '../src/client/backoff.js';
import { FrameType, MAGIC, encodeFrame, isDiscoPacket } from '../src/client/frame.js';
import { clientInfoFrame, handshakeBox, openServerInfo, parseServerKey } from '../src/client/handshake.js';
import {
  DerpClient,
  DerpClientError,
  formatPrivateKey,
  formatPublicKey,
  generatePrivateKey,
  isZeroKey,
  parsePrivateKey,
  parsePublicKey,
  publicKeyOf,
} from '../src/client/index.js';
import { decodeServerFrame, formatIp } from '../src/client/messages.js';
import { FrameParser } from '../src/client/parser.js';
import { native } from '../src/native.js';
import { discoPacket, frame, keyPair, waitUntil, withTimeout } from './helpers/frames.js';
import { startRelay } from './helpers/relay.js';
import { makePrivateCa } from './helpers/certs.js';
import { hasOpenssl } from './helpers/tools.js';
import { cachedDerper, startDerper, type Derper } from './helpers/derper.js';

/** The frames `chunk` completes, in order. */
function parseFrames(parser: FrameParser, chunk: Buffer): { frameType: number; payload: Buffer }[] {
  const frames: { frameType: number; payload: Buffer }[] = [];
  parser.parse(chunk, (frameType, payload) => frames.push({ frameType, payload }));
  return frames;
}

/** Asserts that `promise` rejects with a DerpClientError of `code`. */
async function rejectsWithCode(promise: Promise<unknown>, code: string): Promise<DerpClientError> {
  const error = await promise.then(
    () => assert.fail(`expected ${code}, but it resolved`),
    (err: unknown) => err,
  );
  assert.ok(error instanceof DerpClientError, `expected DerpClientError, got ${String(error)}`);
  assert.equal(error.code, code, error.message);
  return error;
}

function throwsWithCode(fn: () => unknown, code: string): void {
  assert.throws(fn, (err: unknown) => err instanceof DerpClientError && err.code === code);
}

function nextEvent<T extends unknown[]>(client: DerpClient, name: string, ms = 5000): Promise<T> {
  return withTimeout(
    new Promise<T>((resolve) => (client as unknown as NodeJS.EventEmitter).once(name, (...args: unknown[]) => resolve(args as T))),
    ms,
    `event '${name}'`,
  );
}

describe('keys', { timeout: 30_000 }, () => {
  test('text forms round-trip and are lower-case hex', () => {
    const privateKey = generatePrivateKey();
    const publicKey = publicKeyOf(privateKey);
    assert.match(formatPublicKey(publicKey), /^nodekey:[0-9a-f]{64}$/);
    assert.match(formatPrivateKey(privateKey), /^privkey:[0-9a-f]{64}$/);
    assert.deepEqual(parsePublicKey(formatPublicKey(publicKey)), publicKey);
    assert.deepEqual(parsePrivateKey(formatPrivateKey(privateKey)), privateKey);
    assert.deepEqual(parsePublicKey(publicKey.toString('hex').toUpperCase()), publicKey);
  });

  test('malformed keys are refused with DERP_ERR_INVALID_ARGUMENT', () => {
    throwsWithCode(() => parsePublicKey('nodekey:abc'), 'DERP_ERR_INVALID_ARGUMENT');
    throwsWithCode(() => parsePublicKey(`privkey:${'00'.repeat(32)}`), 'DERP_ERR_INVALID_ARGUMENT');
    throwsWithCode(() => publicKeyOf(Buffer.alloc(31)), 'DERP_ERR_INVALID_ARGUMENT');
    throwsWithCode(() => formatPublicKey(Buffer.alloc(33)), 'DERP_ERR_INVALID_ARGUMENT');
  });

  test('isZeroKey', () => {
    assert.equal(isZeroKey(Buffer.alloc(32)), true);
    assert.equal(isZeroKey(publicKeyOf(generatePrivateKey())), false);
  });
});

describe('frames', { timeout: 30_000 }, () => {
  test('header is type(1) ‖ big-endian length(4) and the parser reassembles split input', () => {
    const payload = Buffer.from('0123456789');
    const encoded = encodeFrame(FrameType.SendPacket, payload.subarray(0, 4), payload.subarray(4));
    assert.deepEqual(encoded.subarray(0, 5), Buffer.from([0x04, 0, 0, 0, 10]));
    assert.deepEqual(encoded.subarray(5), payload);
    const parser = new FrameParser();
    const bytes = Buffer.concat([encoded, encodeFrame(FrameType.KeepAlive), encoded]);
    const frames = [];
    for (const byte of bytes) frames.push(...parseFrames(parser, Buffer.from([byte])));
    assert.deepEqual(
      frames.map((f) => [f.frameType, f.payload.toString()]),
      [
        [0x04, '0123456789'],
        [0x06, ''],
        [0x04, '0123456789'],
      ],
    );
    assert.equal(parser.pendingBytes, 0);
  });

  test('several frames in one chunk, and a 1 MiB limit', () => {
    const parser = new FrameParser();
    const many = Buffer.concat(Array.from({ length: 100 }, (_, i) => encodeFrame(FrameType.Ping, Buffer.alloc(8, i))));
    assert.equal(parseFrames(parser, many).length, 100);
    assert.equal(parseFrames(parser, encodeFrame(FrameType.Health, Buffer.alloc(1024 * 1024))).length, 1);
    assert.throws(() => parseFrames(new FrameParser(), frame(FrameType.RecvPacket, Buffer.alloc(0)).fill(0xff, 1, 5)));
  });

  test('isDiscoPacket needs the magic and 62 bytes', () => {
    assert.equal(isDiscoPacket(discoPacket(62)), true);
    assert.equal(isDiscoPacket(discoPacket(62).subarray(0, 61)), false);
    assert.equal(isDiscoPacket(Buffer.alloc(100)), false);
  });
});

describe('messages', { timeout: 30_000 }, () => {
  const key = Buffer.alloc(32, 7);

  test('PeerGone reasons: disconnected, notHere, unknown numbers, and 32-byte frames', () => {
    const reason = (payload: Buffer) => {
      const message = decodeServerFrame(FrameType.PeerGone, payload);
      assert.equal(message.type, 'peerGone');
      return message.type === 'peerGone' ? message.reason : undefined;
    };
    assert.equal(reason(Buffer.concat([key, Buffer.from([0])])), 'disconnected');
    assert.equal(reason(Buffer.concat([key, Buffer.from([1])])), 'notHere');
    assert.equal(reason(Buffer.concat([key, Buffer.from([9])])), 9);
    assert.equal(reason(key), 'disconnected');
  });

  test('PeerPresent of 32, 50, 51 and more bytes', () => {
    const ip = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
    const port = Buffer.from([0x1f, 0x90]);
    const decode = (payload: Buffer) => {
      const message = decodeServerFrame(FrameType.PeerPresent, payload);
      assert.equal(message.type, 'peerPresent');
      return message.type === 'peerPresent' ? message.info : undefined;
    };
    assert.deepEqual(decode(key), {});
    assert.deepEqual(decode(Buffer.concat([key, ip, port])), { ip: '10.1.2.3', port: 8080 });
    assert.deepEqual(decode(Buffer.concat([key, ip, port, Buffer.from([2])])), { ip: '10.1.2.3', port: 8080, flags: 2 });
    assert.deepEqual(decode(Buffer.concat([key, ip, port, Buffer.from([5, 0xaa, 0xbb])])), {
      ip: '10.1.2.3',
      port: 8080,
      flags: 5,
    });
    assert.equal(decodeServerFrame(FrameType.PeerPresent, key.subarray(0, 31)).type, 'ignored');
  });

  test('formatIp writes RFC 5952 IPv6', () => {
    const v6 = (text: string) => {
      const groups = text.split(':').map((g) => parseInt(g, 16));
      const bytes = Buffer.alloc(16);
      groups.forEach((g, i) => bytes.writeUInt16BE(g, i * 2));
      return bytes;
    };
    assert.equal(formatIp(Buffer.alloc(16)), '::');
    assert.equal(formatIp(v6('0:0:0:0:0:0:0:1')), '::1');
    assert.equal(formatIp(v6('2001:db8:0:0:1:0:0:1')), '2001:db8::1:0:0:1');
    assert.equal(formatIp(v6('2001:db8:1:2:3:4:5:6')), '2001:db8:1:2:3:4:5:6');
    assert.equal(formatIp(v6('fe80:0:0:0:0:0:0:0')), 'fe80::');
    assert.equal(formatIp(v6('1:0:2:3:4:5:6:7')), '1:0:2:3:4:5:6:7');
  });

  test('Restarting, Health, Ping/Pong, and unknown types', () => {
    const restarting = Buffer.alloc(8);
    restarting.writeUInt32BE(1500, 0);
    restarting.writeUInt32BE(30000, 4);
    assert.deepEqual(decodeServerFrame(FrameType.Restarting, restarting), { type: 'restarting', reconnectInMs: 1500, tryForMs: 30000 });
    assert.deepEqual(decodeServerFrame(FrameType.Health, Buffer.from('degraded')), { type: 'health', problem: 'degraded' });
    assert.equal(decodeServerFrame(FrameType.Ping, Buffer.alloc(7)).type, 'ignored');
    assert.deepEqual(decodeServerFrame(0x7e, Buffer.alloc(3)), { type: 'ignored', frameType: 0x7e });
    throwsWithCode(() => decodeServerFrame(FrameType.RecvPacket, Buffer.alloc(31)), 'DERP_ERR_PROTOCOL');
  });
});

describe('handshake helpers', { timeout: 30_000 }, () => {
  test('ClientInfo: client key ‖ box of the documented JSON; meshKey omitted when empty', () => {
    const client = keyPair();
    const server = keyPair();
    for (const meshKey of [undefined, 'a'.repeat(64)]) {
      const encoded = clientInfoFrame(handshakeBox(client.privateKey, server.publicKey), client.publicKey, {
        meshKey,
        canAckPings: true,
        isProber: false,
      });
      const [decoded] = parseFrames(new FrameParser(), encoded);
      assert.equal(decoded!.frameType, FrameType.ClientInfo);
      assert.deepEqual(decoded!.payload.subarray(0, 32), client.publicKey);
      const json = native.boxOpen(server.privateKey, client.publicKey, decoded!.payload.subarray(32));
      assert.ok(json);
      const expected =
        meshKey === undefined
          ? { version: 2, CanAckPings: true, IsProber: false }
          : { version: 2, meshKey, CanAckPings: true, IsProber: false };
      assert.deepEqual(JSON.parse(json.toString()), expected);
    }
  });

  test('ServerKey needs the magic; ServerInfo is read case-insensitively', () => {
    const server = keyPair();
    const client = keyPair();
    assert.deepEqual(parseServerKey(FrameType.ServerKey, Buffer.concat([MAGIC, server.publicKey])), server.publicKey);
    throwsWithCode(() => parseServerKey(FrameType.ServerKey, Buffer.concat([Buffer.alloc(8), server.publicKey])), 'DERP_ERR_HANDSHAKE');
    throwsWithCode(() => parseServerKey(FrameType.ServerInfo, Buffer.alloc(40)), 'DERP_ERR_HANDSHAKE');
    throwsWithCode(() => parseServerKey(FrameType.ServerKey, Buffer.concat([MAGIC, Buffer.alloc(32)])), 'DERP_ERR_HANDSHAKE');
    const sealed = native.boxSeal(server.privateKey, client.publicKey, Buffer.from('{"Version":2,"tokenBucketBytesPerSecond":5}'));
    const box = handshakeBox(client.privateKey, server.publicKey);
    assert.deepEqual(openServerInfo(box, FrameType.ServerInfo, sealed), {
      version: 2,
      tokenBucketBytesPerSecond: 5,
    });
    throwsWithCode(
      () => openServerInfo(handshakeBox(client.privateKey, keyPair().publicKey), FrameType.ServerInfo, sealed),
      'DERP_ERR_HANDSHAKE',
    );
    // One box seals and opens: what it seals, the relay's side opens, and the other way round.
    const reply = native.boxSeal(server.privateKey, client.publicKey, Buffer.from('pong'));
    assert.equal(box.open(reply)?.toString(), 'pong');
    assert.equal(native.boxOpen(server.privateKey, client.publicKey, box.seal(Buffer.from('ping')))?.toString(), 'ping');
    assert.equal(box.open(Buffer.alloc(40)), null);
    assert.throws(() => handshakeBox(Buffer.alloc(31), server.publicKey), /privateKey/);
  });
});

test('backoff doubles up to its ceiling, with jitter, and resets', () => {
  const backoff = new Backoff({ minDelayMs: 100, maxDelayMs: 1000 });
  const delays = Array.from({ length: 8 }, () => backoff.next());
  const ceilings = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
  delays.forEach((delay, i) => assert.ok(delay >= ceilings[i]! / 2 && delay <= ceilings[i]!, `attempt ${i}: ${delay}`));
  backoff.reset();
  assert.ok(backoff.next() <= 100);
});

describe('options and arguments', { timeout: 30_000 }, () => {
  test('invalid options throw DERP_ERR_INVALID_OPTION / DERP_ERR_INVALID_ARGUMENT', () => {
    throwsWithCode(() => new DerpClient({ url: 'not a url' }), 'DERP_ERR_INVALID_OPTION');
    throwsWithCode(() => new DerpClient({ url: 'ftp://x/derp' }), 'DERP_ERR_INVALID_OPTION');
    throwsWithCode(() => new DerpClient({ url: 'http://x', privateKey: Buffer.alloc(3) }), 'DERP_ERR_INVALID_ARGUMENT');
    throwsWithCode(() => new DerpClient({ url: 'http://x', connectTimeoutMs: 0 }), 'DERP_ERR_INVALID_OPTION');
    throwsWithCode(() => new DerpClient({ url: 'http://x', transport: 'udp' as 'tcp' }), 'DERP_ERR_INVALID_OPTION');
  });

  test('connection refused → DERP_ERR_CONNECTION', async () => {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as net.AddressInfo;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await rejectsWithCode(DerpClient.connect({ url: `http://127.0.0.1:${port}` }), 'DERP_ERR_CONNECTION');
    await rejectsWithCode(DerpClient.connect({ url: `http://127.0.0.1:${port}`, transport: 'websocket' }), 'DERP_ERR_CONNECTION');
  });
});

// A scripted relay: plain TCP, one behaviour per test.
interface FakeConnection {
  socket: net.Socket;
  request: string;
  client: Buffer;
  clientInfo: Record<string, unknown>;
  received: Array<{ frameType: number; payload: Buffer }>;
  send(frameType: number, ...payload: Buffer[]): void;
}

interface FakeRelayOptions {
  /** Respond with this instead of a 101 (e.g. '404 Not Found'). */
  status?: string;
  /** Never answer. */
  silent?: boolean;
  /** Replace the ServerKey frame. */
  serverKeyFrame?: Buffer;
  /** Seal ServerInfo with this private key instead of the relay's. */
  sealServerInfoWith?: Buffer;
  /** Frames sent right after ServerInfo, in the same write. */
  afterServerInfo?: Buffer;
}

class FakeRelay {
  readonly keys = keyPair();
  readonly connections: FakeConnection[] = [];
  readonly server: net.Server;
  options: FakeRelayOptions = {};
  #onConnection: ((c: FakeConnection) => void) | undefined;
  #sockets = new Set<net.Socket>();

  constructor() {
    this.server = net.createServer((socket) => this.#serve(socket));
  }

  async listen(port = 0): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(port, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
  }

  nextConnection(ms = 5000): Promise<FakeConnection> {
    return withTimeout(new Promise((resolve) => (this.#onConnection = resolve)), ms, 'a connection to the fake relay');
  }

  dropAll(): void {
    for (const socket of this.#sockets) socket.destroy();
  }

  async close(): Promise<void> {
    this.dropAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  #serve(socket: net.Socket): void {
    this.#sockets.add(socket);
    socket.on('close', () => this.#sockets.delete(socket));
    socket.on('error', () => {});
    const options = this.options;
    let buffered = Buffer.alloc(0);
    let request: string | undefined;
    const parser = new FrameParser();
    let connection: FakeConnection | undefined;
    socket.on('data', (chunk: Buffer) => {
      if (options.silent) return;
      let rest = chunk;
      if (request === undefined) {
        buffered = Buffer.concat([buffered, chunk]);
        const end = buffered.indexOf('\r\n\r\n');
        if (end < 0) return;
        request = buffered.subarray(0, end).toString();
        rest = buffered.subarray(end + 4);
        if (options.status !== undefined) {
          socket.end(`HTTP/1.1 ${options.status}\r\nContent-Length: 4\r\n\r\nnope`);
          return;
        }
        const fastStart = /\r\nDerp-Fast-Start: 1/i.test(request);
        if (!fastStart) socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n');
        socket.write(options.serverKeyFrame ?? encodeFrame(FrameType.ServerKey, MAGIC, this.keys.publicKey));
      }
      for (const { frameType, payload } of parseFrames(parser, rest)) {
        if (connection === undefined) {
          assert.equal(frameType, FrameType.ClientInfo);
          const client = payload.subarray(0, 32);
          const json = native.boxOpen(this.keys.privateKey, client, payload.subarray(32));
          assert.ok(json, 'ClientInfo must open');
          connection = {
            socket,
            request: request!,
            client: Buffer.from(client),
            clientInfo: JSON.parse(json.toString()) as Record<string, unknown>,
            received: [],
            send: (type, ...parts) => socket.write(encodeFrame(type, ...parts)),
          };
          const info = native.boxSeal(options.sealServerInfoWith ?? this.keys.privateKey, client, Buffer.from('{"version":2}'));
          socket.write(Buffer.concat([encodeFrame(FrameType.ServerInfo, info), options.afterServerInfo ?? Buffer.alloc(0)]));
          this.connections.push(connection);
          this.#onConnection?.(connection);
          continue;
        }
        connection.received.push({ frameType, payload });
        if (frameType === FrameType.Ping) connection.send(FrameType.Pong, payload);
      }
    });
  }
}

describe('client against a scripted relay', { timeout: 30_000 }, () => {
  let fake: FakeRelay;
  let url: string;
  before(async () => {
    fake = new FakeRelay();
    url = await fake.listen();
  });
  after(() => fake.close());

  test('sends the upgrade request and the documented ClientInfo JSON', async () => {
    fake.options = {};
    const accepted = fake.nextConnection();
    const client = await DerpClient.connect({ url, meshKey: 'm'.repeat(32), isProber: true });
    const connection = await accepted;
    assert.match(connection.request, /^GET \/derp HTTP\/1\.1\r\n/);
    assert.match(connection.request, /\r\nUpgrade: DERP\r\n/i);
    assert.match(connection.request, /\r\nConnection: Upgrade/i);
    assert.doesNotMatch(connection.request, /Derp-Fast-Start/i);
    assert.deepEqual(connection.clientInfo, { version: 2, meshKey: 'm'.repeat(32), CanAckPings: true, IsProber: true });
    assert.deepEqual(connection.client, client.publicKey);
    assert.deepEqual(client.serverPublicKey, fake.keys.publicKey);
    await client.close();
  });

  test('fast start with a known key: ClientInfo in the same write as the request', async () => {
    fake.options = {};
    const raw = new Promise<Buffer>((resolve) => fake.server.once('connection', (s: net.Socket) => s.once('data', resolve)));
    const client = await DerpClient.connect({ url, fastStart: true, serverPublicKey: fake.keys.publicKey });
    const firstChunk = await raw;
    const headEnd = firstChunk.indexOf('\r\n\r\n');
    assert.ok(headEnd > 0);
    assert.match(firstChunk.subarray(0, headEnd).toString(), /\r\nDerp-Fast-Start: 1/);
    assert.equal(firstChunk[headEnd + 4], FrameType.ClientInfo, 'ClientInfo follows the request in the same chunk');
    await client.close();
  });

  test('a pinned server key that does not match fails the handshake', async () => {
    fake.options = {};
    await rejectsWithCode(DerpClient.connect({ url, serverPublicKey: keyPair().publicKey }), 'DERP_ERR_HANDSHAKE');
  });

  test('HTTP status other than 101 → DERP_ERR_HTTP_STATUS with the status', async () => {
    fake.options = { status: '404 Not Found' };
    const error = await rejectsWithCode(DerpClient.connect({ url }), 'DERP_ERR_HTTP_STATUS');
    assert.equal(error.statusCode, 404);
  });

  test('a relay that never answers → DERP_ERR_TIMEOUT within connectTimeoutMs', async () => {
    fake.options = { silent: true };
    const started = Date.now();
    await rejectsWithCode(DerpClient.connect({ url, connectTimeoutMs: 200 }), 'DERP_ERR_TIMEOUT');
    assert.ok(Date.now() - started < 2000);
  });

  test('bad ServerKey magic, and a ServerInfo that does not open → DERP_ERR_HANDSHAKE', async () => {
    fake.options = { serverKeyFrame: encodeFrame(FrameType.ServerKey, Buffer.alloc(8), fake.keys.publicKey) };
    await rejectsWithCode(DerpClient.connect({ url }), 'DERP_ERR_HANDSHAKE');
    fake.options = { sealServerInfoWith: keyPair().privateKey };
    await rejectsWithCode(DerpClient.connect({ url }), 'DERP_ERR_HANDSHAKE');
  });

  test('a frame over 1 MiB is fatal (DERP_ERR_PROTOCOL)', async () => {
    fake.options = {};
    const accepted = fake.nextConnection();
    const client = await DerpClient.connect({ url });
    const connection = await accepted;
    const closed = nextEvent<[Error]>(client, 'close');
    connection.socket.write(Buffer.concat([Buffer.from([FrameType.RecvPacket]), Buffer.from([0, 0x20, 0, 0])]));
    const [error] = await closed;
    assert.ok(error instanceof DerpClientError);
    assert.equal(error.code, 'DERP_ERR_PROTOCOL');
  });

  test('events right after ServerInfo reach listeners attached after connect() resolves', async () => {
    fake.options = {
      afterServerInfo: Buffer.concat([encodeFrame(FrameType.Health, Buffer.from('sad')), encodeFrame(FrameType.KeepAlive)]),
    };
    const client = await DerpClient.connect({ url });
    const [problem] = await nextEvent<[string]>(client, 'health');
    assert.equal(problem, 'sad');
    assert.equal(client.health, 'sad');
    await client.close();
  });

  test('answers server Pings with a Pong of the same bytes; ping() matches Pongs by data', async () => {
    fake.options = {};
    const accepted = fake.nextConnection();
    const client = await DerpClient.connect({ url });
    const connection = await accepted;
    const pinged = nextEvent<[Buffer]>(client, 'ping');
    connection.send(FrameType.Ping, Buffer.from('12345678'));
    assert.deepEqual((await pinged)[0], Buffer.from('12345678'));
    await waitUntil(() => connection.received.some((f) => f.frameType === FrameType.Pong), 2000, 'the Pong');
    assert.deepEqual(connection.received.find((f) => f.frameType === FrameType.Pong)!.payload, Buffer.from('12345678'));
    const rtt = await client.ping(Buffer.from('abcdefgh'));
    assert.ok(rtt >= 0 && rtt < 1000);
    await rejectsWithCode(client.ping(Buffer.alloc(3)), 'DERP_ERR_INVALID_ARGUMENT');
    await client.close();
  });

  test('ping() times out with DERP_ERR_TIMEOUT; pending pings reject with DERP_ERR_CLOSED on close', async () => {
    fake.options = {};
    const accepted = fake.nextConnection();
    const client = await DerpClient.connect({ url });
    const connection = await accepted;
    connection.socket.pause(); // the fake stops answering Pings
    await rejectsWithCode(client.ping(undefined, 100), 'DERP_ERR_TIMEOUT');
    const pending = client.ping(undefined, 5000);
    void client.close();
    await rejectsWithCode(pending, 'DERP_ERR_CLOSED');
    throwsWithCode(() => client.send(keyPair().publicKey, Buffer.alloc(1)), 'DERP_ERR_CLOSED');
  });

  test('send() refuses packets over 64 KiB and keys of the wrong length', async () => {
    fake.options = {};
    const client = await DerpClient.connect({ url });
    throwsWithCode(() => client.send(keyPair().publicKey, Buffer.alloc(65_537)), 'DERP_ERR_PACKET_TOO_LARGE');
    throwsWithCode(() => client.send(Buffer.alloc(31), Buffer.alloc(1)), 'DERP_ERR_INVALID_ARGUMENT');
    client.send(keyPair().publicKey, Buffer.alloc(65_536));
    await client.close();
  });

  test('without reconnect, a dropped connection ends in close(error)', async () => {
    fake.options = {};
    const client = await DerpClient.connect({ url });
    const closed = nextEvent<[Error | undefined]>(client, 'close');
    fake.dropAll();
    const [error] = await closed;
    assert.ok(error instanceof DerpClientError);
    assert.equal(client.connected, false);
  });

  test('reconnect: backoff after a drop, re-sends WatchConns and NotePreferred, emits reconnected', async (t) => {
    fake.options = {};
    const client = await DerpClient.connect({ url, reconnect: { minDelayMs: 20, maxDelayMs: 100 } });
    t.after(() => client.close());
    client.watchConns();
    client.notePreferred(true);
    const disconnected = nextEvent(client, 'disconnected');
    const reconnected = nextEvent(client, 'reconnected');
    const second = fake.nextConnection();
    fake.dropAll();
    await disconnected;
    const connection = await second;
    await reconnected;
    await waitUntil(() => connection.received.length >= 2, 2000, 'WatchConns and NotePreferred again');
    assert.deepEqual(
      connection.received.map((f) => [f.frameType, [...f.payload]]),
      [
        [FrameType.NotePreferred, [1]],
        [FrameType.WatchConns, []],
      ],
    );
    assert.deepEqual(connection.client, client.publicKey, 'same key after reconnecting');
    await client.close();
  });

  test('Restarting: waits reconnectInMs, then reconnects', async (t) => {
    fake.options = {};
    const accepted = fake.nextConnection();
    const client = await DerpClient.connect({ url, reconnect: { minDelayMs: 10, maxDelayMs: 50 } });
    t.after(() => client.close());
    const connection = await accepted;
    const restarting = nextEvent<[{ reconnectInMs: number; tryForMs: number }]>(client, 'restarting');
    const payload = Buffer.alloc(8);
    payload.writeUInt32BE(300, 0);
    payload.writeUInt32BE(5000, 4);
    connection.send(FrameType.Restarting, payload);
    assert.deepEqual((await restarting)[0], { reconnectInMs: 300, tryForMs: 5000 });
    const dropped = Date.now();
    const second = fake.nextConnection();
    connection.socket.destroy();
    await second;
    const waited = Date.now() - dropped;
    assert.ok(waited >= 280, `reconnected after ${waited} ms, before reconnectIn`);
    assert.ok(waited < 2000, `reconnected only after ${waited} ms`);
    await client.close();
  });

  test('close() during a pending reconnect stops it', async () => {
    fake.options = {};
    const client = await DerpClient.connect({ url, reconnect: { minDelayMs: 5000 } });
    const disconnected = nextEvent(client, 'disconnected');
    fake.dropAll();
    await disconnected;
    const closed = nextEvent<[Error | undefined]>(client, 'close');
    await client.close();
    assert.deepEqual(await closed, []);
  });
});

describe('client against the relay', { timeout: 30_000 }, () => {
  test('TCP, fast start and WebSocket clients exchange packets and ping', async () => {
    const relay = await startRelay();
    try {
      const serverPublicKey = parsePublicKey(relay.relay.publicKey);
      const clients = await Promise.all([
        DerpClient.connect({ url: relay.url }),
        DerpClient.connect({ url: relay.url, fastStart: true }),
        DerpClient.connect({ url: relay.url, fastStart: true, serverPublicKey }),
        DerpClient.connect({ url: relay.url, transport: 'websocket' }),
        DerpClient.connect({ url: relay.url.replace('http', 'ws') }),
      ]);
      for (const client of clients) assert.deepEqual(client.serverPublicKey, serverPublicKey);
      for (const from of clients) {
        for (const to of clients) {
          const got = nextEvent<[Buffer, Buffer]>(to, 'packet');
          from.send(to.publicKey, Buffer.from(`${from.publicKey.toString('hex')}`));
          const [source, data] = await got;
          assert.deepEqual(source, from.publicKey);
          assert.equal(data.toString(), from.publicKey.toString('hex'));
        }
        assert.ok((await from.ping()) < 1000);
      }
      await Promise.all(clients.map((c) => c.close()));
    } finally {
      await relay.close();
    }
  });

  test('max-size packets over TCP and WebSocket', async () => {
    const relay = await startRelay();
    try {
      const a = await DerpClient.connect({ url: relay.url });
      const b = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
      const big = Buffer.alloc(65_536, 0x5a);
      for (const [from, to] of [
        [a, b],
        [b, a],
      ] as const) {
        const got = nextEvent<[Buffer, Buffer]>(to, 'packet');
        from.send(to.publicKey, big);
        assert.deepEqual((await got)[1], big);
      }
      await Promise.all([a.close(), b.close()]);
    } finally {
      await relay.close();
    }
  });
});

describe(
  'client over TLS (https:// and wss://)',
  { timeout: 30_000, skip: hasOpenssl() ? false : 'no openssl to make a test certificate' },
  () => {
    test('DERP upgrade over TLS and WebSocket over TLS, verified against the relay certificate', async () => {
      const pki = makePrivateCa();
      const ca = readFileSync(pki.caFile);
      const server = await startRelay({ tls: { cert: readFileSync(pki.certFile), key: readFileSync(pki.keyFile) } });
      try {
        assert.match(server.url, /^https:/);
        const a = await DerpClient.connect({ url: server.url, tls: { ca } });
        const b = await DerpClient.connect({ url: server.url.replace('https', 'wss'), tls: { ca } });
        const c = await DerpClient.connect({ url: server.url, fastStart: true, serverPublicKey: a.serverPublicKey, tls: { ca } });
        for (const [from, to] of [
          [a, b],
          [b, c],
          [c, a],
        ] as const) {
          const got = nextEvent<[Buffer, Buffer]>(to, 'packet');
          from.send(to.publicKey, Buffer.alloc(65_536, 9));
          const [source, data] = await got;
          assert.deepEqual(source, from.publicKey);
          assert.equal(data.length, 65_536);
        }
        await Promise.all([a.close(), b.close(), c.close()]);
        await rejectsWithCode(DerpClient.connect({ url: server.url, connectTimeoutMs: 2000 }), 'DERP_ERR_CONNECTION');
      } finally {
        await server.close();
        rmSync(pki.dir, { recursive: true, force: true });
      }
    });

    test('a TLS client reconnects (a new handshake with the secure context it built once) and delivers again', async () => {
      const pki = makePrivateCa();
      const ca = readFileSync(pki.caFile);
      const server = await startRelay({ tls: { cert: readFileSync(pki.certFile), key: readFileSync(pki.keyFile) } });
      // A TCP relay in front of it whose connections can be cut.
      const open = new Set<net.Socket>();
      const proxy = net.createServer((inbound) => {
        const outbound = net.connect(server.port, '127.0.0.1');
        for (const s of [inbound, outbound]) {
          open.add(s);
          s.on('error', () => {});
          s.on('close', () => open.delete(s));
        }
        inbound.pipe(outbound).pipe(inbound);
      });
      await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
      const port = (proxy.address() as net.AddressInfo).port;
      try {
        const a = await DerpClient.connect({
          url: `https://127.0.0.1:${port}`,
          tls: { ca },
          reconnect: { minDelayMs: 20, maxDelayMs: 100 },
        });
        const b = await DerpClient.connect({ url: server.url, tls: { ca } });
        for (let round = 0; round < 3; round++) {
          if (round > 0) {
            const reconnected = nextEvent(a, 'reconnected');
            for (const s of open) s.destroy();
            await reconnected;
          }
          const got = nextEvent<[Buffer, Buffer]>(b, 'packet');
          a.send(b.publicKey, Buffer.from(`round ${round}`));
          const [source, data] = await got;
          assert.deepEqual(source, a.publicKey);
          assert.equal(data.toString(), `round ${round}`);
        }
        await Promise.all([a.close(), b.close()]);
      } finally {
        for (const s of open) s.destroy();
        proxy.close();
        await server.close();
        rmSync(pki.dir, { recursive: true, force: true });
      }
    });
  },
);

describe(
  'client against Tailscale derper',
  { timeout: 30_000, skip: existsSync(cachedDerper) ? false : `no ${cachedDerper} (bench/derper.sh builds it)` },
  () => {
    let derper: Derper;
    let url: string;
    const meshKey = native.generatePrivateKey().toString('hex');

    before(async () => {
      derper = await startDerper({ meshKey });
      url = derper.url;
    });
    after(() => derper.stop());

    test('handshake, packets (TCP, fast start, WebSocket), ping, PeerGone', async () => {
      const a = await DerpClient.connect({ url });
      const b = await DerpClient.connect({ url, fastStart: true, serverPublicKey: a.serverPublicKey });
      const c = await DerpClient.connect({ url, transport: 'websocket' });
      const big = Buffer.alloc(65_536, 0x42); // over WebSocket: split into messages derper accepts
      for (const [from, to] of [
        [a, b],
        [b, c],
        [c, a],
      ] as const) {
        const got = nextEvent<[Buffer, Buffer]>(to, 'packet');
        from.send(to.publicKey, big);
        const [source, data] = await got;
        assert.deepEqual(source, from.publicKey);
        assert.deepEqual(data, big);
      }
      assert.ok((await a.ping()) < 1000);
      const gone = nextEvent<[Buffer, string]>(a, 'peerGone');
      await c.close();
      assert.deepEqual(await gone, [c.publicKey, 'disconnected']);
      const notHere = nextEvent<[Buffer, string]>(a, 'peerGone');
      const stranger = keyPair().publicKey;
      a.send(stranger, discoPacket());
      assert.deepEqual(await notHere, [stranger, 'notHere']);
      await Promise.all([a.close(), b.close()]);
    });

    test('watcher with the mesh key: snapshot with flags, then changes', async () => {
      const a = await DerpClient.connect({ url });
      const watcher = new DerpClient({ url, meshKey });
      const present: Array<[Buffer, { flags?: number; port?: number }]> = [];
      watcher.on('peerPresent', (key, info) => present.push([key, info]));
      await watcher.connect();
      watcher.watchConns();
      await waitUntil(
        () => present.some(([k]) => k.equals(a.publicKey)) && present.some(([k]) => k.equals(watcher.publicKey)),
        5000,
        'snapshot',
      );
      assert.equal(present.find(([k]) => k.equals(a.publicKey))![1].flags, 1);
      assert.equal(present.find(([k]) => k.equals(a.publicKey))![1].port, a.localAddress!.port);
      assert.equal(present.find(([k]) => k.equals(watcher.publicKey))![1].flags, 2);
      const gone = nextEvent<[Buffer, string]>(watcher, 'peerGone');
      await a.close();
      assert.deepEqual((await gone)[0], a.publicKey);
      await watcher.close();
    });
  },
);
