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

/**
 * `count` request/response exchanges a→b→a, one at a time: b answers every packet from a with
 * the same bytes. Returns each exchange's round trip in ms, in the order measured.
 */
export async function echoRoundTrips(
  a: DerpClient,
  b: DerpClient,
  count: number,
  { size = 64, burst = 1, timeoutMs = 5_000 }: { size?: number; burst?: number; timeoutMs?: number } = {},
): Promise<number[]> {
  const echo = (src: Buffer, data: Buffer) => {
    if (src.equals(a.publicKey)) b.send(a.publicKey, data);
  };
  b.on('packet', echo);
  const rtts: number[] = [];
  try {
    for (let i = 0; i < count; i++) {
      // `burst` packets sent back to back (each its own write, as a tunnel's small packets are);
      // the exchange ends when every echo is back.
      const payloads = Array.from({ length: burst }, (_, j) => {
        const p = Buffer.alloc(size, (i + j) & 0xff);
        p.writeUInt32BE(i, 0);
        p.writeUInt16BE(j, 4);
        return p;
      });
      const start = process.hrtime.bigint();
      await new Promise<void>((resolve, reject) => {
        let waiting = burst;
        const timer = setTimeout(() => {
          a.off('packet', onPacket);
          reject(new Error(`exchange ${i} got ${burst - waiting} of ${burst} answers within ${timeoutMs} ms`));
        }, timeoutMs);
        const onPacket = (src: Buffer, data: Buffer) => {
          if (!src.equals(b.publicKey) || !payloads.some((p) => p.equals(data)) || --waiting > 0) return;
          clearTimeout(timer);
          a.off('packet', onPacket);
          resolve();
        };
        a.on('packet', onPacket);
        // Each packet of the burst in its own turn of the event loop, so each is its own segment.
        const sendFrom = (j: number) => {
          a.send(b.publicKey, payloads[j]!);
          if (j + 1 < burst) setImmediate(sendFrom, j + 1);
        };
        sendFrom(0);
      });
      rtts.push(Number(process.hrtime.bigint() - start) / 1e6);
    }
  } finally {
    b.off('packet', echo);
  }
  return rtts;
}

/** The q-quantile (0..1) of `values`. */
export function quantile(values: number[], q: number): number {
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

/**
 * Traffic round a ring of clients (each on its own node: every hop crosses the mesh): first one
 * packet along each hop, waited for; then `payload` along every hop every 10 ms, `burst(elapsed ms)`
 * times (default once) until the returned timer is cleared. A client whose node died is skipped.
 */
export async function ringTraffic(
  ring: DerpClient[],
  payload: Buffer,
  burst: (elapsedMs: number) => number = () => 1,
): Promise<NodeJS.Timeout> {
  const hops = ring.map((from, i) => [from, ring[(i + 1) % ring.length]!] as const);
  for (const [from, to] of hops) await deliver(from, to);
  const startedAt = Date.now();
  return setInterval(() => {
    const n = burst(Date.now() - startedAt);
    for (const [from, to] of hops) {
      try {
        for (let i = 0; i < n; i++) from.send(to.publicKey, payload);
      } catch {
        // A client of a killed node: its packets stop, the others go on.
      }
    }
  }, 10);
}
