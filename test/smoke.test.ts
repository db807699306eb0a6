import { strict as assert } from 'node:assert';
import { connect } from 'node:net';
import { test } from 'node:test';

import { FrameType, encodeFrame } from '../src/client/frame.js';
import { FrameParser } from '../src/client/parser.js';
import { native } from '../src/native.js';
import { startRelay } from './helpers/relay.js';

test('raw handshake and packet through the relay', async () => {
  const r = await startRelay();
  try {
    const clients = await Promise.all([0, 1].map(() => rawClient(r.port)));
    const [a, b] = clients;
    const payload = Buffer.alloc(100, 7);
    a.socket.write(encodeFrame(FrameType.SendPacket, b.pub, payload));
    const f = await b.next((t) => t === 0x05);
    assert.deepEqual(f.payload.subarray(0, 32), a.pub);
    assert.deepEqual(f.payload.subarray(32), payload);
    for (const c of clients) c.socket.destroy();
  } finally {
    await r.close();
  }
});

async function rawClient(port: number) {
  const priv = native.generatePrivateKey();
  const pub = native.publicKeyOf(priv);
  const socket = connect(port, '127.0.0.1');
  const parser = new FrameParser();
  const frames: { frameType: number; payload: Buffer }[] = [];
  let waiter: (() => void) | undefined;
  let head = Buffer.alloc(0);
  let upgraded = false;
  socket.on('data', (d: Buffer) => {
    if (!upgraded) {
      head = Buffer.concat([head, d]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      upgraded = true;
      d = head.subarray(end + 4);
    }
    parser.parse(d, (frameType, payload) => frames.push({ frameType, payload }));
    waiter?.();
  });
  socket.write('GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n');
  const next = async (pred: (t: number) => boolean) => {
    for (;;) {
      const i = frames.findIndex((f) => pred(f.frameType));
      if (i >= 0) return frames.splice(i, 1)[0]!;
      await new Promise<void>((res) => (waiter = res));
    }
  };
  const sk = await next((t) => t === 0x01);
  const serverPub = sk.payload.subarray(8);
  const sealed = native.boxSeal(priv, serverPub, Buffer.from(JSON.stringify({ version: 2 })));
  socket.write(encodeFrame(FrameType.ClientInfo, pub, sealed));
  const si = await next((t) => t === 0x03);
  assert.ok(native.boxOpen(priv, serverPub, si.payload));
  return { socket, pub, next };
}
