// The relay's wire behaviour, over real TCP and real WebSocket connections: every item of
// docs/protocol.md §7 plus the interop pitfalls, and a `bad input` block in which each kind of garbage
// ends in a clean close and a metric while two bystanders keep exchanging packets.
import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { DerpClient, parsePublicKey, type DerpClientEvents } from '../src/client/index.js';
import { FrameType, MAGIC, PROTOCOL_VERSION } from '../src/client/frame.js';
import { native } from '../src/native.js';
import {
  RawConn,
  type KeyPair,
  clientInfoPayload,
  discoPacket,
  frame,
  header,
  keyPair,
  rawClient,
  sleep,
  upgradeRequest,
  waitUntil,
  withTimeout,
} from './helpers/frames.js';
import { startRelay, type TestRelay } from './helpers/relay.js';

const MESH_KEY = 'f'.repeat(64);

// ─── small helpers ─────────────────────────────────────────────────────────────

type EventName = keyof DerpClientEvents;

function nextEvent<K extends EventName>(client: DerpClient, name: K, ms = 5000): Promise<DerpClientEvents[K]> {
  return withTimeout(
    new Promise<DerpClientEvents[K]>((resolve) =>
      (client as unknown as NodeJS.EventEmitter).once(name, (...args: unknown[]) => resolve(args as DerpClientEvents[K])),
    ),
    ms,
    `event '${name}'`,
  );
}

/** Every occurrence of `name`, from now on. */
function collect<K extends EventName>(client: DerpClient, name: K): Array<DerpClientEvents[K]> {
  const seen: Array<DerpClientEvents[K]> = [];
  (client as unknown as NodeJS.EventEmitter).on(name, (...args: unknown[]) => seen.push(args as DerpClientEvents[K]));
  return seen;
}

/** Waits for a packet from `source` to `client` and returns its data. */
async function packetFrom(client: DerpClient, source: Buffer, ms = 5000): Promise<Buffer> {
  return withTimeout(
    new Promise<Buffer>((resolve) => {
      const onPacket = (from: Buffer, data: Buffer) => {
        if (!from.equals(source)) return;
        client.off('packet', onPacket);
        resolve(data);
      };
      client.on('packet', onPacket);
    }),
    ms,
    `a packet from ${source.toString('hex').slice(0, 8)}`,
  );
}

async function closeAll(...clients: Array<DerpClient | RawConn | undefined>): Promise<void> {
  await Promise.all(clients.map((c) => (c instanceof DerpClient ? c.close() : c?.destroy())));
}

interface HttpAnswer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function request(url: string, method: string, headers: Record<string, string> = {}): Promise<HttpAnswer> {
  return withTimeout(
    new Promise<HttpAnswer>((resolve, reject) => {
      const req = http.request(url, { method, headers, agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
      });
      req.on('error', reject);
      req.end();
    }),
    5000,
    `${method} ${url}`,
  );
}

/** Waits until relay metric `name` exceeds `before`. */
function metricRises(relay: TestRelay, name: string, before: number, ms = 3000): Promise<void> {
  return waitUntil(() => relay.metric(name) > before, ms, `metric ${name} to rise above ${before} (now ${relay.metric(name)})`);
}

/** Two clients exchanging numbered packets every few milliseconds; none may be lost. */
class Bystanders {
  sent = 0;
  received = 0;
  #timer: NodeJS.Timeout | undefined;
  #outOfOrder = 0;

  private constructor(
    readonly a: DerpClient,
    readonly b: DerpClient,
  ) {}

  static async start(url: string): Promise<Bystanders> {
    const [a, b] = await Promise.all([DerpClient.connect({ url }), DerpClient.connect({ url, transport: 'websocket' })]);
    const pair = new Bystanders(a, b);
    const expected = new Map<DerpClient, number>([
      [a, 0],
      [b, 0],
    ]);
    for (const [me, peer] of [
      [a, b],
      [b, a],
    ] as const) {
      me.on('packet', (source, data) => {
        if (!source.equals(peer.publicKey)) return;
        const sequence = data.readUInt32BE(0);
        if (sequence !== expected.get(me)) pair.#outOfOrder++;
        expected.set(me, sequence + 1);
        pair.received++;
      });
    }
    let sequence = 0;
    pair.#timer = setInterval(() => {
      const data = Buffer.alloc(200);
      data.writeUInt32BE(sequence++, 0);
      a.send(b.publicKey, data);
      b.send(a.publicKey, data);
      pair.sent += 2;
    }, 5);
    return pair;
  }

  /** Packets keep arriving right now. */
  async assertFlowing(): Promise<void> {
    const before = this.received;
    await waitUntil(() => this.received >= before + 20, 3000, 'the bystanders to keep exchanging packets');
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await waitUntil(() => this.received === this.sent, 3000, `all bystander packets (${this.received}/${this.sent})`);
    assert.equal(this.#outOfOrder, 0, 'bystander packets lost or reordered');
    await closeAll(this.a, this.b);
  }
}

// ─── HTTP endpoints ────────────────────────────────────────────────────────────

describe('HTTP endpoints', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  before(async () => {
    relay = await startRelay();
  });
  after(() => relay.close());

  for (const path of ['/derp/probe', '/derp/latency-check']) {
    test(`${path}: GET/HEAD 200 with Access-Control-Allow-Origin: *, POST 405`, async () => {
      for (const method of ['GET', 'HEAD']) {
        const answer = await request(relay.url + path, method);
        assert.equal(answer.status, 200, method);
        assert.equal(answer.headers['access-control-allow-origin'], '*', method);
        assert.equal(answer.body, '', method);
      }
      assert.equal((await request(relay.url + path, 'POST')).status, 405);
      assert.equal((await request(relay.url + path, 'PUT')).status, 405);
    });
  }

  test('/generate_204 without, with a valid and with an invalid X-Tailscale-Challenge', async () => {
    const plain = await request(`${relay.url}/generate_204`, 'GET');
    assert.equal(plain.status, 204);
    assert.equal(plain.headers['cache-control'], 'no-cache, no-store, must-revalidate, no-transform, max-age=0');
    assert.equal(plain.headers['x-tailscale-response'], undefined);

    for (const challenge of ['abc', 'A-Z.a_z:0-9', 'x'.repeat(64)]) {
      const answer = await request(`${relay.url}/generate_204`, 'GET', { 'X-Tailscale-Challenge': challenge });
      assert.equal(answer.status, 204);
      assert.equal(answer.headers['x-tailscale-response'], `response ${challenge}`, challenge);
    }
    for (const challenge of ['x'.repeat(65), 'has space', 'semi;colon', 'quote"', 'slash/']) {
      const answer = await request(`${relay.url}/generate_204`, 'GET', { 'X-Tailscale-Challenge': challenge });
      assert.equal(answer.status, 204);
      assert.equal(answer.headers['x-tailscale-response'], undefined, `challenge ${JSON.stringify(challenge)}`);
    }
  });

  test('426 for /derp without an upgrade, and for an upgrade that is neither DERP nor WebSocket', async () => {
    const plain = await request(`${relay.url}/derp`, 'GET');
    assert.equal(plain.status, 426);
    assert.match(plain.body, /DERP requires connection upgrade/);
    const conn = await RawConn.tcp(relay.port, { request: upgradeRequest({ upgrade: 'h2c' }) });
    await conn.waitClosed();
    assert.match(conn.responseHead ?? '', /^HTTP\/1\.1 426 /);
  });
});

// ─── handshake ─────────────────────────────────────────────────────────────────

describe('handshake', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  let serverKey: Buffer;
  before(async () => {
    relay = await startRelay({ meshKey: MESH_KEY });
    serverKey = parsePublicKey(relay.relay.publicKey);
  });
  after(() => relay.close());

  test('101 with exactly the documented headers, then ServerKey, then ServerInfo {"version":2}', async () => {
    const client = keyPair();
    const conn = await RawConn.tcp(relay.port);
    const serverKeyFrame = await conn.next();
    const lines = conn.responseHead!.split('\r\n');
    assert.equal(lines[0], 'HTTP/1.1 101 Switching Protocols');
    const headers = new Map(lines.slice(1).map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]));
    assert.equal(headers.get('upgrade')?.toLowerCase(), 'derp');
    assert.equal(headers.get('connection')?.toLowerCase(), 'upgrade');
    assert.equal(headers.get('derp-version'), '2');
    assert.equal(headers.get('derp-public-key'), serverKey.toString('hex'));
    assert.equal(serverKeyFrame.frameType, FrameType.ServerKey);
    assert.deepEqual(serverKeyFrame.payload, Buffer.concat([MAGIC, serverKey]));
    conn.write(frame(FrameType.ClientInfo, clientInfoPayload(client, serverKey, { version: PROTOCOL_VERSION, CanAckPings: true })));
    const info = await conn.next();
    assert.equal(info.frameType, FrameType.ServerInfo);
    const json = native.boxOpen(client.privateKey, serverKey, info.payload);
    assert.ok(json, 'ServerInfo must open with the client key');
    assert.equal((JSON.parse(json.toString()) as { version: number }).version, 2);
    conn.destroy();
  });

  test('fast start: request and ClientInfo in one write; no HTTP response, the DERP stream at once', async () => {
    const client = keyPair();
    const conn = await RawConn.tcp(relay.port, {
      request: upgradeRequest({ fastStart: true }),
      after: Buffer.concat([
        frame(FrameType.ClientInfo, clientInfoPayload(client, serverKey, { version: PROTOCOL_VERSION })),
        frame(FrameType.SendPacket, client.publicKey, Buffer.from('to myself')),
      ]),
      expectHead: false,
    });
    const first = await conn.next();
    assert.equal(conn.received[0], FrameType.ServerKey, 'the first byte is a ServerKey frame, not "HTTP/1.1"');
    assert.equal(first.frameType, FrameType.ServerKey);
    assert.equal((await conn.next()).frameType, FrameType.ServerInfo);
    const packet = await conn.next(FrameType.RecvPacket);
    assert.deepEqual(packet.payload, Buffer.concat([client.publicKey, Buffer.from('to myself')]));
    conn.destroy();
  });

  test('fast start through DerpClient, with and without a known server key', async () => {
    const a = await DerpClient.connect({ url: relay.url, fastStart: true });
    const b = await DerpClient.connect({ url: relay.url, fastStart: true, serverPublicKey: serverKey });
    const got = packetFrom(b, a.publicKey);
    a.send(b.publicKey, Buffer.from('fast'));
    assert.equal((await got).toString(), 'fast');
    await closeAll(a, b);
  });

  test('ClientInfo JSON field names are matched case-insensitively (mesh key grants WatchConns)', async () => {
    const watcher = keyPair();
    const conn = await RawConn.tcp(relay.port);
    await conn.handshake(watcher, { VERSION: 2, MeshKey: MESH_KEY, canackpings: true, isprober: false });
    conn.write(frame(FrameType.WatchConns));
    const present = await conn.next(FrameType.PeerPresent);
    assert.deepEqual(present.payload.subarray(0, 32), watcher.publicKey, 'the watcher sees itself');
    assert.equal(present.payload.length, 51, 'PeerPresent is key(32) ‖ ip(16) ‖ port(2) ‖ flags(1)');
    const minimal = await rawClient(relay.port, {});
    conn.destroy();
    minimal.destroy();
  });

  test('a wrong mesh key is not an error at handshake time, but WatchConns is then refused', async () => {
    const before = relay.metric('permission_denied');
    const conn = await rawClient(relay.port, { version: PROTOCOL_VERSION, meshKey: 'e'.repeat(64) });
    conn.write(frame(FrameType.WatchConns));
    await conn.waitClosed();
    assert.equal(conn.frames.filter((f) => f.frameType === FrameType.PeerPresent).length, 0);
    await metricRises(relay, 'permission_denied', before);
  });

  test('the mesh key can be set, changed and removed at run time', async () => {
    const meshRelay = await startRelay();
    try {
      const canWatch = async (meshKey: string | undefined): Promise<boolean> => {
        const client = await DerpClient.connect({ url: meshRelay.url, meshKey });
        const outcome = Promise.race([nextEvent(client, 'peerPresent').then(() => true), nextEvent(client, 'close').then(() => false)]);
        client.watchConns();
        const result = await outcome;
        await client.close();
        return result;
      };
      const first = randomBytes(32).toString('hex');
      const second = randomBytes(32).toString('hex');
      assert.equal(await canWatch(undefined), false, 'no mesh key configured: nobody may watch');
      assert.equal(await canWatch(first), false, 'no mesh key configured: any presented key is refused');
      meshRelay.relay.setMeshKey(first);
      assert.equal(await canWatch(first), true);
      assert.equal(await canWatch(first.toUpperCase()), false, 'compared exactly');
      meshRelay.relay.setMeshKey(second);
      assert.equal(await canWatch(first), false, 'the old key no longer works');
      assert.equal(await canWatch(second), true);
      meshRelay.relay.setMeshKey(undefined);
      assert.equal(await canWatch(second), false);
    } finally {
      await meshRelay.close();
    }
  });

  test('mesh keys: 64 hex characters (upstream) and arbitrary 32-character strings (Coder)', async () => {
    for (const meshKey of [randomBytes(32).toString('hex'), 'Coder-mesh-key_0123456789abcdefX']) {
      const meshRelay = await startRelay({ meshKey });
      try {
        const good = await DerpClient.connect({ url: meshRelay.url, meshKey });
        const present = nextEvent(good, 'peerPresent');
        good.watchConns();
        assert.deepEqual((await present)[0], good.publicKey);
        const bad = await DerpClient.connect({ url: meshRelay.url, meshKey: meshKey.slice(0, -1) + (meshKey.endsWith('0') ? '1' : '0') });
        const closed = nextEvent(bad, 'close');
        bad.watchConns();
        await closed;
        await good.close();
      } finally {
        await meshRelay.close();
      }
    }
  });
});

// ─── WebSocket ─────────────────────────────────────────────────────────────────

describe('WebSocket', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  let serverKey: Buffer;
  before(async () => {
    relay = await startRelay();
    serverKey = parsePublicKey(relay.relay.publicKey);
  });
  after(() => relay.close());

  test('the relay accepts subprotocol derp, no compression', async () => {
    const conn = await RawConn.websocket(relay.url);
    assert.equal(conn.websocket!.protocol, 'derp');
    assert.equal(conn.websocket!.extensions, '');
    assert.equal((await conn.next()).frameType, FrameType.ServerKey);
    conn.destroy();
  });

  test('a frame split byte by byte across messages, and several frames in one message', async () => {
    const client = keyPair();
    const conn = await RawConn.websocket(relay.url);
    await conn.next(FrameType.ServerKey);
    const clientInfo = frame(FrameType.ClientInfo, clientInfoPayload(client, serverKey, { version: PROTOCOL_VERSION }));
    for (const byte of clientInfo) conn.write(Buffer.from([byte]));
    assert.equal((await conn.next()).frameType, FrameType.ServerInfo);

    const selfPacket = frame(FrameType.SendPacket, client.publicKey, Buffer.from('split'));
    for (const byte of selfPacket) conn.write(Buffer.from([byte]));
    assert.deepEqual((await conn.next(FrameType.RecvPacket)).payload.subarray(32).toString(), 'split');

    conn.write(
      Buffer.concat([
        frame(FrameType.Ping, Buffer.from('pingpin1')),
        frame(FrameType.SendPacket, client.publicKey, Buffer.from('one')),
        frame(FrameType.SendPacket, client.publicKey, Buffer.from('two')),
        frame(FrameType.Ping, Buffer.from('pingpin2')),
      ]),
    );
    const pongs: string[] = [];
    const packets: string[] = [];
    while (pongs.length < 2 || packets.length < 2) {
      const f = await conn.next();
      if (f.frameType === FrameType.Pong) pongs.push(f.payload.toString());
      if (f.frameType === FrameType.RecvPacket) packets.push(f.payload.subarray(32).toString());
    }
    assert.deepEqual(pongs, ['pingpin1', 'pingpin2']);
    assert.deepEqual(packets, ['one', 'two']);
    conn.destroy();
  });

  test('WebSocket and TCP clients talk to each other', async () => {
    const tcp = await DerpClient.connect({ url: relay.url });
    const ws = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
    const big = randomBytes(65_536);
    const toWs = packetFrom(ws, tcp.publicKey);
    tcp.send(ws.publicKey, big);
    assert.deepEqual(await toWs, big);
    const toTcp = packetFrom(tcp, ws.publicKey);
    ws.send(tcp.publicKey, big);
    assert.deepEqual(await toTcp, big);
    await closeAll(tcp, ws);
  });

  test('Upgrade: websocket without the derp subprotocol is plain DERP', async () => {
    const conn = await RawConn.tcp(relay.port, { request: upgradeRequest({ upgrade: 'websocket' }) });
    await conn.handshake(keyPair());
    assert.match(conn.responseHead!, /^HTTP\/1\.1 101 /);
    conn.destroy();
  });
});

// ─── packets ───────────────────────────────────────────────────────────────────

describe('packets among three clients', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  before(async () => {
    relay = await startRelay();
  });
  after(() => relay.close());

  test('send/recv in every direction and to oneself, 0 B … 64 KiB, with the right source', async () => {
    const clients = await Promise.all([
      DerpClient.connect({ url: relay.url }),
      DerpClient.connect({ url: relay.url }),
      DerpClient.connect({ url: relay.url, transport: 'websocket' }),
    ]);
    for (const size of [0, 1, 1400, 65_536]) {
      for (const from of clients) {
        for (const to of clients) {
          const data = randomBytes(size);
          const got = packetFrom(to, from.publicKey);
          from.send(to.publicKey, data);
          assert.deepEqual(await got, data, `${size} bytes`);
        }
      }
    }
    await closeAll(...clients);
  });

  test('PeerGone(disconnected) goes to those who received from the departed peer, and only to them', async () => {
    const [a, b, c, d] = await Promise.all([0, 1, 2, 3].map(() => DerpClient.connect({ url: relay.url })));
    const goneAtB = collect(b!, 'peerGone');
    const goneAtC = collect(c!, 'peerGone');
    const goneAtD = collect(d!, 'peerGone');
    for (const to of [b!, c!]) {
      const got = packetFrom(to, a!.publicKey);
      a!.send(to.publicKey, Buffer.from('hello'));
      await got;
    }
    await a!.close();
    await waitUntil(() => goneAtB.length > 0 && goneAtC.length > 0, 3000, 'PeerGone at B and C');
    assert.deepEqual(goneAtB, [[a!.publicKey, 'disconnected']]);
    assert.deepEqual(goneAtC, [[a!.publicKey, 'disconnected']]);
    // D never heard from A: a marker from B arrives and still no PeerGone.
    const marker = packetFrom(d!, b!.publicKey);
    b!.send(d!.publicKey, Buffer.from('marker'));
    await marker;
    await sleep(50);
    assert.deepEqual(goneAtD, []);
    await closeAll(b, c, d);
  });

  test('PeerGone(notHere) for disco packets to unknown keys; other packets are dropped silently', async () => {
    const a = await DerpClient.connect({ url: relay.url });
    const gone = collect(a, 'peerGone');
    const before = relay.metric('packets_dropped_unknown_dest');
    const nobody = keyPair().publicKey;
    a.send(nobody, Buffer.alloc(100, 1));
    a.send(nobody, discoPacket(61).subarray(0, 61)); // one byte short of a disco packet
    await metricRises(relay, 'packets_dropped_unknown_dest', before + 1);
    await sleep(100);
    assert.deepEqual(gone, [], 'no PeerGone for non-disco packets');
    a.send(nobody, discoPacket());
    await waitUntil(() => gone.length === 1, 3000, 'PeerGone(notHere)');
    assert.deepEqual(gone[0], [nobody, 'notHere']);
    await a.close();
  });

  test('the not-here answers are rate-limited: a burst of 3, then about one per second', async () => {
    const a = await DerpClient.connect({ url: relay.url });
    const gone = collect(a, 'peerGone');
    const unknownKeys = Array.from({ length: 20 }, () => keyPair().publicKey);
    for (const key of unknownKeys.slice(0, 10)) a.send(key, discoPacket());
    await waitUntil(() => gone.length >= 3, 3000, 'the first 3 PeerGone(notHere)');
    await sleep(300);
    assert.equal(gone.length, 3, 'exactly the burst of 3 at once');
    await sleep(800);
    for (const key of unknownKeys.slice(10)) a.send(key, discoPacket());
    await waitUntil(() => gone.length >= 4, 3000, 'one more after a second');
    await sleep(300);
    assert.equal(gone.length, 4, 'one token per second');
    assert.ok(gone.every(([, reason]) => reason === 'notHere'));
    await a.close();
  });
});

describe('a stalled receiver does not block others (send freeze)', { timeout: 30_000 }, () => {
  test('others keep flowing; the stalled connection drops packets and is closed on the write deadline', async () => {
    const relay = await startRelay({ writeTimeoutMs: 400, queueDepth: 8 });
    try {
      const stalled = await rawClient(relay.port);
      stalled.socket!.pause(); // never reads again
      const sender = await DerpClient.connect({ url: relay.url });
      const [b, c] = await Promise.all([DerpClient.connect({ url: relay.url }), DerpClient.connect({ url: relay.url })]);
      let flowing = 0;
      b.on('packet', () => flowing++);
      const big = Buffer.alloc(60_000, 1);
      const started = Date.now();
      let rounds = 0;
      while (relay.metric('write_timeouts') === 0 && Date.now() - started < 5000) {
        for (let i = 0; i < 50; i++) sender.send(stalled.keys.publicKey, big);
        c.send(b.publicKey, Buffer.from([rounds++]));
        await sleep(10);
      }
      assert.ok(relay.metric('write_timeouts') >= 1, 'write_timeouts counts the stalled connection');
      // A socket that does not read cannot see the FIN: read again, and the relay's close shows.
      stalled.socket!.resume();
      await stalled.waitClosed(3000);
      assert.ok(
        relay.metric('packets_dropped_queue_full') + relay.metric('packets_dropped_gone') > 0,
        'packets for the stalled receiver were dropped',
      );
      await waitUntil(() => flowing === rounds, 3000, `every packet between the others (${flowing}/${rounds})`);
      assert.ok((await sender.ping()) < 1000, 'the sender is still served');
      await closeAll(sender, b, c);
    } finally {
      await relay.close();
    }
  });
});

// ─── watchers and mesh privileges ──────────────────────────────────────────────

describe('watchers (mesh key)', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  before(async () => {
    relay = await startRelay({ meshKey: MESH_KEY });
  });
  after(() => relay.close());

  test('snapshot includes the watcher itself with 51-byte PeerPresent, then changes are streamed', async () => {
    const a = await DerpClient.connect({ url: relay.url });
    const prober = await DerpClient.connect({ url: relay.url, isProber: true });
    const watcher = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY });
    const present = collect(watcher, 'peerPresent');
    const gone = collect(watcher, 'peerGone');
    watcher.watchConns();
    const find = (key: Buffer) => present.find(([k]) => k.equals(key))?.[1];
    await waitUntil(() => [a, prober, watcher].every((c) => find(c.publicKey) !== undefined), 3000, 'the snapshot');
    assert.deepEqual(find(a.publicKey), { ip: '127.0.0.1', port: a.localAddress!.port, flags: 1 });
    assert.equal(find(prober.publicKey)!.flags, 4);
    assert.deepEqual(find(watcher.publicKey), { ip: '127.0.0.1', port: watcher.localAddress!.port, flags: 2 });

    const c = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
    await waitUntil(() => find(c.publicKey) !== undefined, 3000, 'PeerPresent for a new client');
    assert.equal(find(c.publicKey)!.flags, 1);
    await c.close();
    await waitUntil(() => gone.some(([k]) => k.equals(c.publicKey)), 3000, 'PeerGone for the departed client');
    assert.deepEqual(
      gone.find(([k]) => k.equals(c.publicKey)),
      [c.publicKey, 'disconnected'],
    );
    await closeAll(a, prober, watcher);
  });

  test('a mesh peer that is also a prober has both flags (mesh 2 | prober 4)', async () => {
    const watcher = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY, isProber: true });
    const present = nextEvent(watcher, 'peerPresent');
    watcher.watchConns();
    const [key, info] = await present;
    assert.deepEqual(key, watcher.publicKey);
    assert.equal(info.flags, 6);
    await watcher.close();
  });

  test('watcher connection break and reconnect: a fresh snapshot after re-subscribing', async (t) => {
    const a = await DerpClient.connect({ url: relay.url });
    const watchersBefore = relay.metric('watchers');
    const watcher = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY, reconnect: { minDelayMs: 20, maxDelayMs: 100 } });
    t.after(() => closeAll(a, watcher));
    const present = collect(watcher, 'peerPresent');
    watcher.watchConns();
    await waitUntil(() => present.some(([k]) => k.equals(a.publicKey)), 3000, 'the first snapshot');
    await waitUntil(() => relay.metric('watchers') === watchersBefore + 1, 3000, 'the watchers gauge');

    // Another mesh client closes the watcher's connection (ClosePeer); it reconnects and re-subscribes.
    const admin = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY });
    const disconnected = nextEvent(watcher, 'disconnected');
    const reconnected = nextEvent(watcher, 'reconnected');
    present.length = 0;
    admin.closePeer(watcher.publicKey);
    await disconnected;
    await reconnected;
    await waitUntil(() => present.some(([k]) => k.equals(a.publicKey)), 3000, 'the snapshot after reconnecting');
    await waitUntil(() => relay.metric('watchers') === watchersBefore + 1, 3000, 'one watcher again, not two');
    await closeAll(a, admin, watcher);
    await waitUntil(() => relay.metric('watchers') === watchersBefore, 3000, 'the watcher gone from the gauge');
  });

  test('ClosePeer closes every connection of the key; watchers see PeerGone', async () => {
    const victimKey = native.generatePrivateKey();
    const first = await DerpClient.connect({ url: relay.url, privateKey: victimKey });
    const second = await DerpClient.connect({ url: relay.url, privateKey: victimKey, transport: 'websocket' });
    const watcher = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY });
    const gone = collect(watcher, 'peerGone');
    watcher.watchConns();
    const closedFirst = nextEvent(first, 'close');
    const closedSecond = nextEvent(second, 'close');
    watcher.closePeer(first.publicKey);
    await Promise.all([closedFirst, closedSecond]);
    await waitUntil(() => gone.some(([k]) => k.equals(first.publicKey)), 3000, 'PeerGone for the closed key');
    await watcher.close();
  });

  test('ForwardPacket from a mesh peer is delivered locally; to an unknown key it is dropped, disco gets notHere', async () => {
    const a = await DerpClient.connect({ url: relay.url });
    const mesh = await DerpClient.connect({ url: relay.url, meshKey: MESH_KEY });
    const remote = keyPair().publicKey;
    const got = packetFrom(a, remote);
    mesh.forwardPacket(remote, a.publicKey, Buffer.from('via mesh'));
    assert.equal((await got).toString(), 'via mesh');

    const before = relay.metric('packets_dropped_unknown_dest_on_fwd');
    const gone = collect(mesh, 'peerGone');
    const nobody = keyPair().publicKey;
    mesh.forwardPacket(remote, nobody, Buffer.from('lost'));
    await metricRises(relay, 'packets_dropped_unknown_dest_on_fwd', before);
    mesh.forwardPacket(remote, nobody, discoPacket());
    await waitUntil(() => gone.length > 0, 3000, 'PeerGone(notHere) back to the mesh peer');
    assert.deepEqual(gone[0], [nobody, 'notHere']);
    await closeAll(a, mesh);
  });
});

// ─── mesh between relays ───────────────────────────────────────────────────────

describe('mesh: forwarders', { timeout: 30_000 }, () => {
  /** Waits until `relay`'s link to the peer on `peer.port` is connected and has learned at least `forwarders` keys. */
  async function linkReady(relay: TestRelay, peer: { port: number }, forwarders = 0): Promise<void> {
    const port = `:${peer.port}`;
    await waitUntil(
      () => relay.relay.meshLinks().some((l) => l.url.includes(port) && l.state === 'connected' && l.forwarders >= forwarders),
      5000,
      `the mesh link to port ${peer.port} (links: ${JSON.stringify(relay.relay.meshLinks())})`,
    );
  }

  async function meshedRelays(count: number): Promise<TestRelay[]> {
    return Promise.all(Array.from({ length: count }, () => startRelay({ meshKey: MESH_KEY })));
  }

  test('forwarder registration: clients on two meshed relays reach each other', async () => {
    const [r1, r2] = await meshedRelays(2);
    try {
      r1!.relay.setMeshPeers([r2!.url]);
      r2!.relay.setMeshPeers([r1!.url]);
      const a = await DerpClient.connect({ url: r1!.url });
      const b = await DerpClient.connect({ url: r2!.url, transport: 'websocket' });
      await linkReady(r1!, r2!, 1);
      await linkReady(r2!, r1!, 1);
      const toB = packetFrom(b, a.publicKey);
      a.send(b.publicKey, Buffer.from('across'));
      assert.equal((await toB).toString(), 'across');
      const toA = packetFrom(a, b.publicKey);
      b.send(a.publicKey, Buffer.from('and back'));
      assert.equal((await toA).toString(), 'and back');
      assert.ok(r1!.metric('packets_forwarded_out') >= 1);
      assert.ok(r2!.metric('packets_forwarded_in') >= 1);
      await closeAll(a, b);
    } finally {
      await Promise.all([r1!.close(), r2!.close()]);
    }
  });

  test('multi-forwarder: the first registered peer wins, never both; the next takes over when it goes', async () => {
    const [r1, r2, r3] = await meshedRelays(3);
    try {
      r1!.relay.setMeshPeers([r2!.url, r3!.url]);
      const privateKey = native.generatePrivateKey();
      const onR2 = await DerpClient.connect({ url: r2!.url, privateKey });
      await linkReady(r1!, r2!, 1);
      await linkReady(r1!, r3!);
      const onR3 = await DerpClient.connect({ url: r3!.url, privateKey });
      await linkReady(r1!, r3!, 1);
      const a = await DerpClient.connect({ url: r1!.url });
      const atR2 = collect(onR2, 'packet');
      const atR3 = collect(onR3, 'packet');
      for (let i = 0; i < 5; i++) a.send(onR2.publicKey, Buffer.from(`first ${i}`));
      await waitUntil(() => atR2.length === 5, 3000, 'the packets at the first registered peer');
      await sleep(100);
      assert.equal(atR3.length, 0, 'no tee to the second peer');

      await onR2.close();
      await waitUntil(
        () => r1!.relay.meshLinks().find((l) => l.url.includes(`:${r2!.port}`))?.forwarders === 0,
        3000,
        'the forwarder via r2 to go',
      );
      for (let i = 0; i < 5; i++) a.send(onR3.publicKey, Buffer.from(`next ${i}`));
      await waitUntil(() => atR3.length === 5, 3000, 'the packets at the remaining peer');
      assert.deepEqual(
        atR3.map(([source, data]) => [source.equals(a.publicKey), data.toString()]),
        [0, 1, 2, 3, 4].map((i) => [true, `next ${i}`]),
      );
      await closeAll(a, onR3);
    } finally {
      await Promise.all([r1!.close(), r2!.close(), r3!.close()]);
    }
  });

  test('a local client wins over a forwarder for the same key', async () => {
    const [r1, r2] = await meshedRelays(2);
    try {
      r1!.relay.setMeshPeers([r2!.url]);
      const privateKey = native.generatePrivateKey();
      const remote = await DerpClient.connect({ url: r2!.url, privateKey });
      await linkReady(r1!, r2!, 1);
      const local = await DerpClient.connect({ url: r1!.url, privateKey });
      const a = await DerpClient.connect({ url: r1!.url });
      const atRemote = collect(remote, 'packet');
      const got = packetFrom(local, a.publicKey);
      a.send(local.publicKey, Buffer.from('stay here'));
      assert.equal((await got).toString(), 'stay here');
      await sleep(100);
      assert.equal(atRemote.length, 0);
      await closeAll(a, local, remote);
    } finally {
      await Promise.all([r1!.close(), r2!.close()]);
    }
  });

  test('ForwardPacket is never re-forwarded (one hop)', async () => {
    const [r1, r2] = await meshedRelays(2);
    try {
      r1!.relay.setMeshPeers([r2!.url]);
      const far = await DerpClient.connect({ url: r2!.url });
      await linkReady(r1!, r2!, 1);
      const mesh = await DerpClient.connect({ url: r1!.url, meshKey: MESH_KEY });
      const atFar = collect(far, 'packet');
      const before = r1!.metric('packets_dropped_unknown_dest_on_fwd');
      mesh.forwardPacket(keyPair().publicKey, far.publicKey, Buffer.from('second hop'));
      await metricRises(r1!, 'packets_dropped_unknown_dest_on_fwd', before);
      await sleep(100);
      assert.equal(atFar.length, 0, 'r1 did not pass a forwarded packet on to r2');
      await closeAll(mesh, far);
    } finally {
      await Promise.all([r1!.close(), r2!.close()]);
    }
  });

  test('a lost mesh peer: PeerGone(disconnected) to local clients that received from its clients', async () => {
    const [r1, r2] = await meshedRelays(2);
    try {
      r1!.relay.setMeshPeers([r2!.url]);
      r2!.relay.setMeshPeers([r1!.url]);
      const far = await DerpClient.connect({ url: r2!.url });
      const a = await DerpClient.connect({ url: r1!.url });
      const bystander = await DerpClient.connect({ url: r1!.url });
      await linkReady(r1!, r2!, 1);
      await linkReady(r2!, r1!, 2);
      const got = packetFrom(a, far.publicKey);
      far.send(a.publicKey, Buffer.from('hello from afar'));
      await got;
      const goneAtA = collect(a, 'peerGone');
      const goneAtBystander = collect(bystander, 'peerGone');
      await r2!.close();
      await waitUntil(() => goneAtA.length > 0, 5000, 'PeerGone at the client that heard from the lost peer');
      assert.deepEqual(goneAtA, [[far.publicKey, 'disconnected']]);
      await waitUntil(() => r1!.relay.meshLinks().every((l) => l.forwarders === 0), 3000, 'the forwarders of the lost link to go');
      assert.deepEqual(goneAtBystander, [], 'nothing to clients that never heard from it');
      await closeAll(a, bystander, far);
    } finally {
      await Promise.all([r1!.close(), r2!.close()]);
    }
  });

  test('a cut mesh link (peer still up): forwarders removed, PeerGone(disconnected) to those who heard from its keys', async () => {
    const [r1, r2] = await meshedRelays(2);
    const proxy = await tcpProxy(r2!.port);
    try {
      r1!.relay.setMeshPeers([`http://127.0.0.1:${proxy.port}`]);
      r2!.relay.setMeshPeers([r1!.url]);
      const far = await DerpClient.connect({ url: r2!.url });
      const a = await DerpClient.connect({ url: r1!.url });
      await linkReady(r1!, proxy, 1);
      await linkReady(r2!, r1!, 1);
      const got = packetFrom(a, far.publicKey);
      far.send(a.publicKey, Buffer.from('hello from afar'));
      await got;
      const gone = nextEvent(a, 'peerGone');
      await proxy.close(); // the link breaks and cannot come back; r2 and far stay up
      assert.deepEqual(await gone, [far.publicKey, 'disconnected']);
      assert.equal(r1!.relay.meshLinks()[0]!.forwarders, 0);
      const before = r1!.metric('packets_dropped_unknown_dest');
      a.send(far.publicKey, Buffer.from('nowhere to go'));
      await metricRises(r1!, 'packets_dropped_unknown_dest', before);
      await closeAll(a, far);
    } finally {
      await proxy.close();
      await Promise.all([r1!.close(), r2!.close()]);
    }
  });

  test('a link with the wrong mesh key does not connect', async () => {
    const r1 = await startRelay({ meshKey: MESH_KEY });
    const r2 = await startRelay({ meshKey: 'a'.repeat(64) });
    try {
      r1.relay.setMeshPeers([r2.url]);
      await sleep(300);
      const [link] = r1.relay.meshLinks();
      assert.ok(link);
      assert.notEqual(link.state, 'connected');
      assert.ok(r2.metric('permission_denied') >= 1);
    } finally {
      await Promise.all([r1.close(), r2.close()]);
    }
  });
});

// ─── connection lifecycle ──────────────────────────────────────────────────────

describe('ping, duplicates, keepalive, health, restarting', { timeout: 30_000 }, () => {
  test('Ping → Pong with the same 8 bytes; longer pings echo their first 8 bytes', async () => {
    const relay = await startRelay();
    try {
      const client = await DerpClient.connect({ url: relay.url });
      assert.ok((await client.ping(Buffer.from('01234567'))) < 1000);
      const conn = await rawClient(relay.port);
      conn.write(frame(FrameType.Ping, Buffer.from('abcdefgh')));
      assert.deepEqual((await conn.next(FrameType.Pong)).payload, Buffer.from('abcdefgh'));
      conn.write(frame(FrameType.Ping, Buffer.from('ABCDEFGH-and-more-bytes')));
      assert.deepEqual((await conn.next(FrameType.Pong)).payload, Buffer.from('ABCDEFGH'));
      await closeAll(client, conn);
    } finally {
      await relay.close();
    }
  });

  test('duplicate clients: the newest, then the last writer, is active; PeerGone only when the last goes', async () => {
    const relay = await startRelay();
    try {
      const sender = await DerpClient.connect({ url: relay.url });
      const privateKey = native.generatePrivateKey();
      const first = await DerpClient.connect({ url: relay.url, privateKey });
      const before = relay.metric('duplicate_client_connections');
      const second = await DerpClient.connect({ url: relay.url, privateKey, transport: 'websocket' });
      await metricRises(relay, 'duplicate_client_connections', before);
      const key = first.publicKey;

      /** Sends one packet to the shared key and tells which connection got it. */
      const deliverTo = async (): Promise<DerpClient> => {
        const tag = randomBytes(8);
        const winner = Promise.race(
          [first, second].map(async (c) => {
            for (;;) {
              const data = await packetFrom(c, sender.publicKey);
              if (data.equals(tag)) return c;
            }
          }),
        );
        sender.send(key, tag);
        return winner;
      };
      assert.equal(await deliverTo(), second, 'the newest connection is active');
      const toSender = packetFrom(sender, key);
      first.send(sender.publicKey, Buffer.from('I am here'));
      await toSender;
      assert.equal(await deliverTo(), first, 'the last writer is active');
      second.send(sender.publicKey, Buffer.from('me too'));
      await packetFrom(sender, key);
      assert.equal(await deliverTo(), second, 'the last writer is active again');

      const gone = collect(sender, 'peerGone');
      await second.close();
      assert.equal(await deliverTo(), first, 'the remaining connection takes over');
      assert.deepEqual(gone, [], 'no PeerGone while a connection of the key remains');
      await first.close();
      await waitUntil(() => gone.length > 0, 3000, 'PeerGone when the last connection of the key leaves');
      assert.deepEqual(gone, [[key, 'disconnected']]);
      await sender.close();
    } finally {
      await relay.close();
    }
  });

  /** Connections of one key, oldest first, opened after `sender`. */
  const sameKeyConns = async (relay: TestRelay, count: number, clientInfo?: unknown): Promise<{ shared: KeyPair; conns: RawConn[] }> => {
    const shared = keyPair();
    const conns: RawConn[] = [];
    for (let i = 0; i < count; i++) {
      const before = relay.metric('duplicate_client_connections');
      const conn = await RawConn.tcp(relay.port);
      await conn.handshake(shared, clientInfo);
      conns.push(conn);
      if (i > 0) await metricRises(relay, 'duplicate_client_connections', before);
    }
    return { shared, conns };
  };

  /** Sends one tagged packet from `sender` to `key` and tells which of `conns` got it (its index). */
  const deliveredTo = async (sender: RawConn, key: Buffer, conns: RawConn[]): Promise<number> => {
    const tag = randomBytes(8);
    const got = (c: RawConn) => c.frames.some((f) => f.frameType === FrameType.RecvPacket && f.payload.subarray(32).equals(tag));
    sender.write(frame(FrameType.SendPacket, key, tag));
    await waitUntil(() => conns.some(got), 5000, 'the packet on one of the connections of the key');
    return conns.findIndex(got);
  };

  test('duplicate clients: any frame, not only SendPacket, makes its connection the active one', async () => {
    const relay = await startRelay();
    try {
      const sender = await rawClient(relay.port);
      const { shared, conns } = await sameKeyConns(relay, 2);
      const [older, newer] = conns as [RawConn, RawConn];
      const OLDER = 0;
      const NEWER = 1;
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), NEWER, 'the newest connection is active');

      // Ping: the Pong says the relay has read it.
      older.write(frame(FrameType.Ping, Buffer.from('12345678')));
      await older.next(FrameType.Pong);
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), OLDER, 'a Ping makes its connection active');

      // NotePreferred has no answer: the home-connections gauge says the relay has read it.
      const home = relay.metric('home_connections');
      newer.write(frame(FrameType.NotePreferred, Buffer.from([1])));
      await metricRises(relay, 'home_connections', home);
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), NEWER, 'a NotePreferred makes its connection active');

      // A frame type the relay skips still counts as activity (as in derper, every frame read does).
      const unknown = relay.metric('unknown_frames');
      older.write(frame(0x7e, Buffer.from('whatever')));
      await metricRises(relay, 'unknown_frames', unknown);
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), OLDER, 'a skipped frame makes its connection active');
      await closeAll(sender, ...conns);
    } finally {
      await relay.close();
    }
  });

  test('duplicate mesh connections (the data lanes of a mesh link) do not move the active one by sending', async () => {
    const relay = await startRelay({ meshKey: MESH_KEY });
    try {
      const sender = await rawClient(relay.port);
      const { shared, conns } = await sameKeyConns(relay, 2, { version: PROTOCOL_VERSION, meshKey: MESH_KEY });
      const [older] = conns as [RawConn, RawConn];
      older.write(frame(FrameType.Ping, Buffer.from('12345678')));
      await older.next(FrameType.Pong);
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), 1, 'the newest mesh connection stays active');
      await closeAll(sender, ...conns);
    } finally {
      await relay.close();
    }
  });

  test('duplicate clients: when the active connection leaves, the most recently active other one takes over', async () => {
    const relay = await startRelay();
    try {
      const sender = await rawClient(relay.port);
      const { shared, conns } = await sameKeyConns(relay, 3);
      const [first, second] = conns as [RawConn, RawConn, RawConn];
      for (const [index, conn] of [
        [1, second],
        [0, first],
      ] as const) {
        conn.write(frame(FrameType.Ping, Buffer.from('12345678')));
        await conn.next(FrameType.Pong);
        assert.equal(await deliveredTo(sender, shared.publicKey, conns), index);
      }
      // Active: the first; before it the second spoke, after the third (the newest) connected.
      first.destroy();
      await waitUntil(() => relay.metric('connections') <= 3, 3000, 'the relay to see the first connection go');
      assert.equal(await deliveredTo(sender, shared.publicKey, conns), 1, 'the second, not the newest, takes over');
      await closeAll(sender, ...conns);
    } finally {
      await relay.close();
    }
  });

  test('KeepAlive arrives on the configured period', async () => {
    const relay = await startRelay({ keepaliveMs: 200, keepaliveJitterMs: 0 });
    try {
      const client = await DerpClient.connect({ url: relay.url });
      const keepAlives = collect(client, 'keepAlive');
      await waitUntil(() => keepAlives.length >= 3, 2000, '3 KeepAlives');
      const ws = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
      await nextEvent(ws, 'keepAlive', 1000);
      await closeAll(client, ws);
    } finally {
      await relay.close();
    }
  });

  test('Health goes to connected clients and to new ones; empty text means healthy', async () => {
    const relay = await startRelay();
    try {
      const connected = await DerpClient.connect({ url: relay.url });
      const problem = nextEvent(connected, 'health');
      relay.relay.setHealth('disk on fire');
      assert.deepEqual(await problem, ['disk on fire']);

      const late = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
      await waitUntil(() => late.health === 'disk on fire', 2000, 'Health at a client that connected later');
      const raw = await rawClient(relay.port);
      assert.equal((await raw.next(FrameType.Health)).payload.toString(), 'disk on fire');

      const healthy = nextEvent(connected, 'health');
      relay.relay.setHealth('');
      assert.deepEqual(await healthy, ['']);
      await closeAll(connected, late, raw);
    } finally {
      await relay.close();
    }
  });

  test('graceful shutdown sends Restarting, then closes', async () => {
    const relay = await startRelay();
    const tcp = await DerpClient.connect({ url: relay.url });
    const ws = await DerpClient.connect({ url: relay.url, transport: 'websocket' });
    const restarting = [nextEvent(tcp, 'restarting'), nextEvent(ws, 'restarting')];
    const closed = [nextEvent(tcp, 'close'), nextEvent(ws, 'close')];
    await relay.close();
    for (const [info] of await Promise.all(restarting)) {
      assert.equal(typeof info.reconnectInMs, 'number');
      assert.ok(info.tryForMs > 0);
    }
    await Promise.all(closed);
    assert.ok(relay.metric('restarting_sent') >= 2);
  });

  test('a reconnecting client follows Restarting to the next relay behind the same address', async () => {
    const first = await startRelay();
    const proxy = await tcpProxy(first.port);
    const client = await DerpClient.connect({ url: `http://127.0.0.1:${proxy.port}`, reconnect: { minDelayMs: 50, maxDelayMs: 200 } });
    const second = await startRelay();
    try {
      const restarting = nextEvent(client, 'restarting');
      const reconnected = nextEvent(client, 'reconnected');
      proxy.target = second.port;
      await first.close();
      await restarting;
      await reconnected;
      assert.deepEqual(client.serverPublicKey, parsePublicKey(second.relay.publicKey));
      assert.ok((await client.ping()) < 1000);
    } finally {
      await client.close();
      await proxy.close();
      await second.close();
    }
  });
});

/** A TCP forwarder to `target` on loopback; change `target` to move new connections elsewhere. */
async function tcpProxy(target: number): Promise<{ port: number; target: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    const upstream = net.connect(proxy.target, '127.0.0.1');
    for (const s of [socket, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        sockets.delete(s);
        socket.destroy();
        upstream.destroy();
      });
    }
    socket.pipe(upstream).pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const proxy = {
    port: (server.address() as net.AddressInfo).port,
    target,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  return proxy;
}

// ─── scale ─────────────────────────────────────────────────────────────────────

describe('scale', { timeout: 30_000 }, () => {
  test('1 000 clients (500 pairs) exchange packets with no loss', async () => {
    const relay = await startRelay();
    const clients: DerpClient[] = [];
    try {
      for (let batch = 0; batch < 10; batch++) {
        clients.push(
          ...(await Promise.all(
            Array.from({ length: 100 }, (_, i) =>
              DerpClient.connect({ url: relay.url, transport: (batch * 100 + i) % 10 === 0 ? 'websocket' : 'tcp' }),
            ),
          )),
        );
      }
      const perDirection = 10;
      let received = 0;
      let wrong = 0;
      for (let i = 0; i < 500; i++) {
        const [a, b] = [clients[i]!, clients[i + 500]!];
        for (const [me, peer] of [
          [a, b],
          [b, a],
        ] as const) {
          me.on('packet', (source, data) => {
            if (!source.equals(peer.publicKey) || data.length !== 64) wrong++;
            received++;
          });
        }
      }
      for (let round = 0; round < perDirection; round++) {
        for (let i = 0; i < 500; i++) {
          const [a, b] = [clients[i]!, clients[i + 500]!];
          a.send(b.publicKey, Buffer.alloc(64, round));
          b.send(a.publicKey, Buffer.alloc(64, round));
        }
      }
      const expected = 500 * 2 * perDirection;
      await waitUntil(() => received >= expected, 20_000, `all ${expected} packets (got ${received})`);
      await sleep(50);
      assert.equal(received, expected);
      assert.equal(wrong, 0);
    } finally {
      await Promise.all(clients.map((c) => c.close()));
      await relay.close();
    }
  });
});

// ─── bad input ─────────────────────────────────────────────────────────────────

describe('bad input', { timeout: 30_000 }, () => {
  let relay: TestRelay;
  let serverKey: Buffer;
  let bystanders: Bystanders;
  before(async () => {
    relay = await startRelay({ meshKey: MESH_KEY, writeTimeoutMs: 400, queueDepth: 16, headerTimeoutMs: 400 });
    serverKey = parsePublicKey(relay.relay.publicKey);
    bystanders = await Bystanders.start(relay.url);
  });
  after(async () => {
    try {
      await bystanders.stop();
    } finally {
      await relay.close();
    }
  });

  /** Opens a raw upgraded connection, reads ServerKey, runs `misbehave`, and expects a clean close and `metric` to rise. */
  async function expectHandshakeRejected(metric: string, misbehave: (conn: RawConn) => void): Promise<void> {
    const before = relay.metric(metric);
    const failuresBefore = relay.metric('handshake_failures');
    const conn = await RawConn.tcp(relay.port);
    await conn.next(FrameType.ServerKey);
    misbehave(conn);
    await conn.waitClosed();
    assert.deepEqual(conn.frames, [], 'the relay sends nothing after a failed handshake');
    await metricRises(relay, metric, before);
    await metricRises(relay, 'handshake_failures', failuresBefore);
    await bystanders.assertFlowing();
  }

  /** A raw client completes the handshake (with `json`), runs `misbehave`, and expects a clean close and `metric` to rise. */
  async function expectClosedAfterHandshake(
    metric: string,
    misbehave: (conn: RawConn & { keys: ReturnType<typeof keyPair> }) => void,
    json?: unknown,
  ): Promise<void> {
    const before = relay.metric(metric);
    const conn = await rawClient(relay.port, json);
    misbehave(conn);
    await conn.waitClosed();
    await metricRises(relay, metric, before);
    await bystanders.assertFlowing();
  }

  test('random bytes instead of ClientInfo', async () => {
    const garbage = randomBytes(300);
    garbage[0] = 0x99;
    await expectHandshakeRejected('handshake_failure_bad_first_frame', (conn) => conn.write(garbage));
  });

  test('random bytes instead of an HTTP request', async () => {
    // The core reads request heads (it is in front of Node's HTTP server), and counts bad ones.
    const before = relay.metric('http_bad_requests');
    const conn = await RawConn.tcp(relay.port, { request: randomBytes(300).fill(0x01, 0, 1), expectHead: false });
    await conn.waitClosed();
    await metricRises(relay, 'http_bad_requests', before);
    await bystanders.assertFlowing();
  });

  test('wrong first frame (SendPacket before ClientInfo)', async () => {
    await expectHandshakeRejected('handshake_failure_bad_first_frame', (conn) =>
      conn.write(frame(FrameType.SendPacket, keyPair().publicKey, Buffer.from('early'))),
    );
  });

  test('truncated ClientInfo, then end of stream', async () => {
    await expectHandshakeRejected('handshake_failure_io', (conn) => {
      const full = frame(FrameType.ClientInfo, clientInfoPayload(keyPair(), serverKey, { version: PROTOCOL_VERSION }));
      conn.write(full.subarray(0, full.length - 10));
      conn.end();
    });
  });

  test('ClientInfo shorter than 56 bytes, and longer than 256 KiB', async () => {
    await expectHandshakeRejected('handshake_failure_bad_size', (conn) => conn.write(frame(FrameType.ClientInfo, Buffer.alloc(55, 1))));
    await expectHandshakeRejected('handshake_failure_bad_size', (conn) => conn.write(header(FrameType.ClientInfo, 256 * 1024 + 1)));
  });

  test('a ClientInfo box that does not open', async () => {
    await expectHandshakeRejected('handshake_failure_box_open', (conn) =>
      conn.write(frame(FrameType.ClientInfo, clientInfoPayload(keyPair(), serverKey, { version: PROTOCOL_VERSION }, keyPair().privateKey))),
    );
  });

  test('an all-zero client key', async () => {
    const zero = { privateKey: native.generatePrivateKey(), publicKey: Buffer.alloc(32) };
    await expectHandshakeRejected('handshake_failure_zero_key', (conn) =>
      conn.write(frame(FrameType.ClientInfo, clientInfoPayload(zero, serverKey, { version: PROTOCOL_VERSION }))),
    );
  });

  test('ClientInfo JSON that does not parse', async () => {
    await expectHandshakeRejected('handshake_failure_bad_json', (conn) =>
      conn.write(frame(FrameType.ClientInfo, clientInfoPayload(keyPair(), serverKey, '{"version":2,'))),
    );
  });

  test('a SendPacket length over 64 KiB + 32', async () => {
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(header(FrameType.SendPacket, 65_536 + 32 + 1)));
  });

  test('a SendPacket shorter than its destination key', async () => {
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.SendPacket, Buffer.alloc(20, 1))));
  });

  test('a frame truncated by the end of the stream', async () => {
    const connections = relay.metric('connections');
    const accepts = relay.metric('accepts');
    const conn = await rawClient(relay.port);
    await metricRises(relay, 'accepts', accepts);
    conn.write(Buffer.concat([header(FrameType.SendPacket, 1000), Buffer.alloc(40, 1)]));
    conn.end();
    await conn.waitClosed();
    await waitUntil(() => relay.metric('connections') === connections, 3000, 'the connections gauge to drop back');
    await bystanders.assertFlowing();
  });

  test('wrong sizes: NotePreferred ≠ 1, Ping < 8 or > 1000 bytes', async () => {
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.NotePreferred, Buffer.from([1, 1]))));
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.Ping, Buffer.alloc(4))));
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.Ping, Buffer.alloc(1001))));
  });

  test('wrong sizes from a mesh peer: WatchConns ≠ 0, ClosePeer ≠ 32 bytes', async () => {
    const mesh = { version: PROTOCOL_VERSION, meshKey: MESH_KEY };
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.WatchConns, Buffer.alloc(1))), mesh);
    await expectClosedAfterHandshake('protocol_errors', (conn) => conn.write(frame(FrameType.ClosePeer, Buffer.alloc(31, 1))), mesh);
  });

  for (const [name, make] of [
    ['WatchConns', () => frame(FrameType.WatchConns)],
    ['ClosePeer', () => frame(FrameType.ClosePeer, bystanders.a.publicKey)],
    ['ForwardPacket', () => frame(FrameType.ForwardPacket, keyPair().publicKey, bystanders.a.publicKey, Buffer.from('spoofed'))],
  ] as const) {
    test(`${name} without the mesh key`, async () => {
      let spoofed = 0;
      const onPacket = (_: Buffer, data: Buffer) => {
        if (data.toString() === 'spoofed') spoofed++;
      };
      bystanders.a.on('packet', onPacket);
      await expectClosedAfterHandshake('permission_denied', (conn) => conn.write(make()));
      bystanders.a.off('packet', onPacket);
      assert.equal(spoofed, 0, 'the forwarded packet was not delivered');
      assert.ok(bystanders.a.connected, 'ClosePeer without permission closed nobody');
    });
  }

  test('unknown frame types are skipped, not fatal', async () => {
    const before = relay.metric('unknown_frames');
    const conn = await rawClient(relay.port);
    conn.write(
      Buffer.concat([
        frame(0x7f, randomBytes(100)),
        frame(0x20),
        frame(FrameType.SendPacket, conn.keys.publicKey, Buffer.from('still here')),
      ]),
    );
    const packet = await conn.next(FrameType.RecvPacket);
    assert.equal(packet.payload.subarray(32).toString(), 'still here');
    await metricRises(relay, 'unknown_frames', before + 1);
    assert.equal(conn.isClosed, false);
    conn.destroy();
  });

  test('a request that never finishes its headers', async () => {
    const before = relay.metric('http_head_timeouts');
    const conn = await RawConn.tcp(relay.port, { request: Buffer.from('GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n') });
    await conn.waitClosed(3000);
    await metricRises(relay, 'http_head_timeouts', before);
    await bystanders.assertFlowing();
  });

  test('a client that stops reading is dropped from, then closed', async () => {
    const dropped = relay.metric('packets_dropped_queue_full');
    const timeouts = relay.metric('write_timeouts');
    const stalled = await rawClient(relay.port);
    stalled.socket!.pause();
    const flooder = await DerpClient.connect({ url: relay.url });
    const big = Buffer.alloc(60_000, 2);
    const started = Date.now();
    while (relay.metric('write_timeouts') === timeouts && Date.now() - started < 5000) {
      for (let i = 0; i < 50; i++) flooder.send(stalled.keys.publicKey, big);
      await sleep(10);
    }
    assert.ok(relay.metric('write_timeouts') > timeouts, 'write_timeouts rises');
    stalled.socket!.resume(); // a socket that does not read cannot see the FIN
    await stalled.waitClosed(3000);
    assert.ok(relay.metric('packets_dropped_queue_full') > dropped, 'packets_dropped_queue_full rises');
    await bystanders.assertFlowing();
    await flooder.close();
  });
});

// ─── HEAD ──────────────────────────────────────────────────────────────────────

/** Everything the server sends to `request` until it closes the connection (5 s at most). */
function rawExchange(port: number, request: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(request));
    let got = '';
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => (got += d));
    socket.on('close', () => resolve(got));
    socket.on('error', reject);
    socket.setTimeout(5_000, () => socket.destroy(new Error(`no close after 5 s; got ${JSON.stringify(got)}`)));
  });
}

describe('a HEAD request gets a head and no body', { timeout: 30_000 }, () => {
  // The core's front (the node's port) and Node's server in front (an embedder's, `nodeFront`).
  for (const nodeFront of [false, true]) {
    test(`${nodeFront ? "Node's server" : "the core's front"}: a refused upgrade (426) and the probe`, async () => {
      const relay = await startRelay({ nodeFront });
      try {
        const refused = await rawExchange(relay.port, 'HEAD /derp HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n');
        assert.match(refused, /^HTTP\/1\.1 426 Upgrade Required\r\n/);
        assert.match(refused, /\r\nContent-Length: 32\r\n/, 'the length the body would have');
        assert.ok(refused.endsWith('\r\n\r\n'), `a body after the head: ${JSON.stringify(refused)}`);
        const get = await rawExchange(relay.port, 'GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n');
        assert.ok(get.endsWith('\r\n\r\nDERP requires connection upgrade'), `GET keeps its body: ${JSON.stringify(get)}`);
        const probe = await rawExchange(relay.port, 'HEAD /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
        assert.match(probe, /^HTTP\/1\.1 200 OK\r\n/);
        assert.ok(probe.endsWith('\r\n\r\n'), JSON.stringify(probe));
      } finally {
        await relay.close();
      }
    });
  }
});
