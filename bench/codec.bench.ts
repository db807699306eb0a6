// Micro benchmarks of the native codec against pure JavaScript: frame encoding, incremental frame
// parsing, and the NaCl box of a ClientInfo. Each case runs the native call and its JavaScript
// counterpart side by side; the table shows both rates and their ratio.
//
//   node dist/bench/codec.bench.js [--time 500ms] [--json out.json]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import nacl from 'tweetnacl';

import { FRAME_HEADER_LENGTH, FrameType, KEY_LENGTH, NONCE_LENGTH } from '../src/client/frame.js';
import { parseDuration } from '../src/config.js';
import { native } from '../src/native.js';

/** A frame the way a JavaScript client would build it: header and payload in one allocation. */
function encodeFrameJs(frameType: number, payload: Buffer): Buffer {
  const frame = Buffer.allocUnsafe(FRAME_HEADER_LENGTH + payload.length);
  frame[0] = frameType;
  frame.writeUInt32BE(payload.length, 1);
  payload.copy(frame, FRAME_HEADER_LENGTH);
  return frame;
}

/** An incremental frame parser in JavaScript, the same contract as `native.FrameParser`. */
class FrameParserJs {
  #pending: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): { frameType: number; payload: Buffer }[] {
    const data = this.#pending.length === 0 ? chunk : Buffer.concat([this.#pending, chunk]);
    const frames: { frameType: number; payload: Buffer }[] = [];
    let at = 0;
    while (data.length - at >= FRAME_HEADER_LENGTH) {
      const length = data.readUInt32BE(at + 1);
      const end = at + FRAME_HEADER_LENGTH + length;
      if (end > data.length) break;
      // A copy, like the native parser's payloads: a view would pin the whole chunk.
      frames.push({ frameType: data[at], payload: Buffer.from(data.subarray(at + FRAME_HEADER_LENGTH, end)) });
      at = end;
    }
    this.#pending = at === data.length ? Buffer.alloc(0) : data.subarray(at);
    return frames;
  }
}

interface Case {
  name: string;
  native: () => unknown;
  js: () => unknown;
  jsLabel: string;
}

function cases(): Case[] {
  // SendPacket of a 1400-byte packet: destination key ‖ packet.
  const sendPayload = Buffer.alloc(KEY_LENGTH + 1400, 0x5a);
  const pingPayload = Buffer.alloc(8, 1);
  // A read's worth of back-to-back frames, as one socket read delivers them.
  const packets = Buffer.concat(Array.from({ length: 64 }, () => encodeFrameJs(FrameType.RecvPacket, sendPayload)));
  const pings = Buffer.concat(Array.from({ length: 1000 }, () => encodeFrameJs(FrameType.Ping, pingPayload)));
  const nativeParser = new native.FrameParser();
  const jsParser = new FrameParserJs();

  const client = native.generatePrivateKey();
  const server = native.generatePrivateKey();
  const clientPublic = native.publicKeyOf(client);
  const serverPublic = native.publicKeyOf(server);
  const clientInfo = Buffer.from(JSON.stringify({ version: 2, meshKey: '', canAckPings: true, isProber: false }));
  const sealed = native.boxSeal(client, serverPublic, clientInfo);
  const [clientU8, serverU8, clientPublicU8, serverPublicU8] = [client, server, clientPublic, serverPublic].map((b) => new Uint8Array(b));
  const nonce = new Uint8Array(sealed.subarray(0, NONCE_LENGTH));
  const box = new Uint8Array(sealed.subarray(NONCE_LENGTH));

  return [
    {
      name: 'encode SendPacket (1400 B)',
      native: () => native.encodeFrame(FrameType.SendPacket, sendPayload),
      js: () => encodeFrameJs(FrameType.SendPacket, sendPayload),
      jsLabel: 'Buffer (JS)',
    },
    {
      name: 'encode Ping (8 B)',
      native: () => native.encodeFrame(FrameType.Ping, pingPayload),
      js: () => encodeFrameJs(FrameType.Ping, pingPayload),
      jsLabel: 'Buffer (JS)',
    },
    {
      name: `parse 64 × RecvPacket (${packets.length} B)`,
      native: () => nativeParser.push(packets),
      js: () => jsParser.push(packets),
      jsLabel: 'Buffer (JS)',
    },
    {
      name: `parse 1000 × Ping (${pings.length} B)`,
      native: () => nativeParser.push(pings),
      js: () => jsParser.push(pings),
      jsLabel: 'Buffer (JS)',
    },
    {
      name: `boxSeal ClientInfo (${clientInfo.length} B)`,
      native: () => native.boxSeal(client, serverPublic, clientInfo),
      js: () => nacl.box(clientInfo, nacl.randomBytes(NONCE_LENGTH), serverPublicU8, clientU8),
      jsLabel: 'tweetnacl',
    },
    {
      name: `boxOpen ClientInfo (${clientInfo.length} B)`,
      native: () => native.boxOpen(server, clientPublic, sealed),
      js: () => nacl.box.open(box, nonce, clientPublicU8, serverU8),
      jsLabel: 'tweetnacl',
    },
  ];
}

interface Row {
  case: string;
  nativeOpsPerSec: number;
  nativeMeanNs: number;
  alternative: string;
  alternativeOpsPerSec: number;
  alternativeMeanNs: number;
  /** native ops/s ÷ alternative ops/s: above 1, native is faster. */
  ratio: number;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      time: { type: 'string', default: '500ms' },
      json: { type: 'string' },
    },
  });
  const time = parseDuration(values.time);
  if (time === undefined) throw new Error(`--time must be a duration like 500ms, got ${JSON.stringify(values.time)}`);

  const bench = new Bench({ time, warmupTime: Math.min(200, time) });
  const list = cases();
  for (const c of list) {
    bench.add(`${c.name} · native`, c.native);
    bench.add(`${c.name} · ${c.jsLabel}`, c.js);
  }
  await bench.run();

  const stats = (name: string) => {
    const result = bench.tasks.find((t) => t.name === name)?.result;
    if (!result || result.state !== 'completed') throw new Error(`benchmark ${name} did not complete: ${result?.state}`);
    // period = total time ÷ runs: the mean cost of one call, GC pauses included.
    return { opsPerSec: 1000 / result.period, meanNs: result.period * 1e6 };
  };
  const rows: Row[] = list.map((c) => {
    const n = stats(`${c.name} · native`);
    const j = stats(`${c.name} · ${c.jsLabel}`);
    return {
      case: c.name,
      nativeOpsPerSec: n.opsPerSec,
      nativeMeanNs: n.meanNs,
      alternative: c.jsLabel,
      alternativeOpsPerSec: j.opsPerSec,
      alternativeMeanNs: j.meanNs,
      ratio: n.opsPerSec / j.opsPerSec,
    };
  });

  const ops = (v: number) => Math.round(v).toLocaleString('en-US');
  const ns = (v: number) => (v >= 10_000 ? `${(v / 1000).toFixed(1)} µs` : `${Math.round(v)} ns`);
  const table = [
    ['case', 'native ops/s', 'native mean', 'alternative', 'alt ops/s', 'alt mean', 'native/alt'],
    ...rows.map((r) => [
      r.case,
      ops(r.nativeOpsPerSec),
      ns(r.nativeMeanNs),
      r.alternative,
      ops(r.alternativeOpsPerSec),
      ns(r.alternativeMeanNs),
      `${r.ratio.toFixed(2)}×`,
    ]),
  ];
  const widths = table[0].map((_, i) => Math.max(...table.map((row) => row[i].length)));
  const line = (row: string[]) => row.map((cell, i) => (i === 0 || i === 3 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  process.stdout.write([line(table[0]), widths.map((w) => '-'.repeat(w)).join('  '), ...table.slice(1).map(line)].join('\n') + '\n');
  if (values.json) writeFileSync(values.json, JSON.stringify({ node: process.version, timeMs: time, rows }, null, 2) + '\n');
}

main().catch((err: unknown) => {
  process.stderr.write(`codec.bench: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
