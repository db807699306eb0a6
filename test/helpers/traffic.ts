// Packet exchange between DERP clients on (possibly) different nodes, with loss accounting.
import { strict as assert } from 'node:assert';
import { once } from 'node:events';

import { DerpClient } from '../../src/client/index.js';

/** One packet a→b, then one b→a, each sent once and checked for its source and bytes. */
export async function exchangeOnce(a: DerpClient, b: DerpClient): Promise<void> {
  for (const [from, to, text] of [
    [a, b, 'a to b'],
    [b, a, 'b to a'],
  ] as const) {
    const got = once(to, 'packet');
    from.send(to.publicKey, Buffer.from(text));
    const [src, data] = (await got) as [Buffer, Buffer];
    assert.deepEqual(src, from.publicKey);
    assert.equal(data.toString(), text);
  }
}

/** Sends one packet a→b and waits for it (retrying while the mesh converges). */
export async function deliver(a: DerpClient, b: DerpClient, timeoutMs = 5_000): Promise<number> {
  const start = Date.now();
  const token = Buffer.from(`probe-${Math.random()}`);
  return new Promise<number>((resolve, reject) => {
    const onPacket = (src: Buffer, data: Buffer) => {
      if (src.equals(a.publicKey) && data.equals(token)) {
        cleanup();
        resolve(Date.now() - start);
      }
    };
    const timer = setInterval(() => {
      if (Date.now() - start > timeoutMs) {
        cleanup();
        reject(new Error(`packet did not arrive within ${timeoutMs} ms`));
        return;
      }
      a.send(b.publicKey, token);
    }, 100);
    const cleanup = () => {
      clearInterval(timer);
      b.off('packet', onPacket);
    };
    b.on('packet', onPacket);
    a.send(b.publicKey, token);
  });
}

/**
 * A steady stream a→b of numbered packets (`ratePerSec`), counting what arrives. `stop()` waits
 * briefly for stragglers and reports sent, received and missing sequence numbers.
 */
export function stream(a: DerpClient, b: DerpClient, ratePerSec = 200) {
  let sent = 0;
  const received = new Set<number>();
  const tag = Buffer.from(Math.random().toString(36).slice(2, 10));
  const onPacket = (src: Buffer, data: Buffer) => {
    if (!src.equals(a.publicKey) || data.length < tag.length + 4 || !data.subarray(0, tag.length).equals(tag)) return;
    received.add(data.readUInt32BE(tag.length));
  };
  b.on('packet', onPacket);
  const timer = setInterval(() => {
    const p = Buffer.alloc(tag.length + 4 + 100);
    tag.copy(p);
    p.writeUInt32BE(sent++, tag.length);
    a.send(b.publicKey, p);
  }, 1000 / ratePerSec);
  return {
    sentSoFar: () => sent,
    receivedSoFar: () => received.size,
    stop: async () => {
      clearInterval(timer);
      await new Promise((r) => setTimeout(r, 500));
      b.off('packet', onPacket);
      const missing: number[] = [];
      for (let i = 0; i < sent; i++) if (!received.has(i)) missing.push(i);
      return { sent, received: received.size, missing };
    },
  };
}
