// Micro benchmarks of the client codec: the TypeScript frame writer and incremental parser
// (src/client/frame.ts, parser.ts) on their own, and the NaCl box of a ClientInfo, native against
// tweetnacl side by side. Framing has no native counterpart any more (it left the napi seam, where
// it ran at 0.1–0.26× of plain Buffer code), so its table shows rates and throughput only.
//
//   node dist/bench/codec.bench.js [--time 500ms] [--json out.json]
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import nacl from 'tweetnacl';

import { FrameType, KEY_LENGTH, NONCE_LENGTH, PING_DATA_LENGTH, encodeFrame } from '../src/client/frame.js';
import { FrameParser } from '../src/client/parser.js';
import { parseDuration } from '../src/config.js';
import { native } from '../src/native.js';

/** Size of the packets in the framing cases: a typical WireGuard packet. */
const PACKET_SIZE = 1400;

interface FramingCase {
  name: string;
  run: () => unknown;
  /** Bytes and frames one run handles. */
  bytes: number;
  frames: number;
}

interface BoxCase {
  name: string;
  native: () => unknown;
  tweetnacl: () => unknown;
}

/** Parses `stream`, cut into `chunkSize`-byte chunks, with a parser that lives across runs. */
function parseCase(name: string, stream: Buffer, frames: number, chunkSize = stream.length): FramingCase {
  const chunks: Buffer[] = [];
  for (let offset = 0; offset < stream.length; offset += chunkSize) chunks.push(stream.subarray(offset, offset + chunkSize));
  const parser = new FrameParser();
  let parsed = 0;
  const count = (): void => {
    parsed++;
  };
  return {
    name,
    run: () => {
      for (const chunk of chunks) parser.parse(chunk, count);
      return parsed;
    },
    bytes: stream.length,
    frames,
  };
}

function framingCases(): FramingCase[] {
  const destination = Buffer.alloc(KEY_LENGTH, 0x11);
  const packet = Buffer.alloc(PACKET_SIZE, 0x5a);
  const pingData = Buffer.alloc(PING_DATA_LENGTH, 1);
  const recvPacket = encodeFrame(FrameType.RecvPacket, destination, packet);
  const ping = encodeFrame(FrameType.Ping, pingData);
  // A read's worth of back-to-back frames, as one socket read delivers them.
  const packets = Buffer.concat(Array.from({ length: 64 }, () => recvPacket));
  const pings = Buffer.concat(Array.from({ length: 1000 }, () => ping));
  return [
    {
      name: `encode SendPacket (${PACKET_SIZE} B)`,
      run: () => encodeFrame(FrameType.SendPacket, destination, packet),
      bytes: recvPacket.length,
      frames: 1,
    },
    { name: 'encode Ping (8 B)', run: () => encodeFrame(FrameType.Ping, pingData), bytes: ping.length, frames: 1 },
    parseCase(`parse 64 × RecvPacket (${packets.length} B)`, packets, 64),
    parseCase(`parse 1000 × Ping (${pings.length} B)`, pings, 1000),
    // Frames straddling chunk boundaries take the partial-frame path (payload assembled across chunks).
    parseCase(`parse 64 × RecvPacket in 1000 B chunks`, packets, 64, 1000),
  ];
}

function boxCases(): BoxCase[] {
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
      name: `boxSeal ClientInfo (${clientInfo.length} B)`,
      native: () => native.boxSeal(client, serverPublic, clientInfo),
      tweetnacl: () => nacl.box(clientInfo, nacl.randomBytes(NONCE_LENGTH), serverPublicU8, clientU8),
    },
    {
      name: `boxOpen ClientInfo (${clientInfo.length} B)`,
      native: () => native.boxOpen(server, clientPublic, sealed),
      tweetnacl: () => nacl.box.open(box, nonce, clientPublicU8, serverU8),
    },
  ];
}

interface FramingRow {
  case: string;
  opsPerSec: number;
  meanNs: number;
  megabytesPerSec: number;
  framesPerSec: number;
}

interface BoxRow {
  case: string;
  nativeOpsPerSec: number;
  nativeMeanNs: number;
  tweetnaclOpsPerSec: number;
  tweetnaclMeanNs: number;
  /** native ops/s ÷ tweetnacl ops/s: above 1, native is faster. */
  ratio: number;
}

const ops = (v: number): string => Math.round(v).toLocaleString('en-US');
const ns = (v: number): string => (v >= 10_000 ? `${(v / 1000).toFixed(1)} µs` : `${Math.round(v)} ns`);

/** A text table: the first column left-aligned, the others right-aligned. */
function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const line = (row: string[]): string => row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ');
  return [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)].join('\n') + '\n';
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
  const framing = framingCases();
  const boxes = boxCases();
  for (const c of framing) bench.add(c.name, c.run);
  for (const c of boxes) {
    bench.add(`${c.name} · native`, c.native);
    bench.add(`${c.name} · tweetnacl`, c.tweetnacl);
  }
  await bench.run();

  const stats = (name: string) => {
    const result = bench.tasks.find((t) => t.name === name)?.result;
    if (!result || result.state !== 'completed') throw new Error(`benchmark ${name} did not complete: ${result?.state}`);
    // period = total time ÷ runs: the mean cost of one call, GC pauses included.
    return { opsPerSec: 1000 / result.period, meanNs: result.period * 1e6 };
  };
  const framingRows: FramingRow[] = framing.map((c) => {
    const s = stats(c.name);
    return { case: c.name, ...s, megabytesPerSec: (s.opsPerSec * c.bytes) / 1e6, framesPerSec: s.opsPerSec * c.frames };
  });
  const boxRows: BoxRow[] = boxes.map((c) => {
    const n = stats(`${c.name} · native`);
    const t = stats(`${c.name} · tweetnacl`);
    return {
      case: c.name,
      nativeOpsPerSec: n.opsPerSec,
      nativeMeanNs: n.meanNs,
      tweetnaclOpsPerSec: t.opsPerSec,
      tweetnaclMeanNs: t.meanNs,
      ratio: n.opsPerSec / t.opsPerSec,
    };
  });

  process.stdout.write(
    table([
      ['framing (TypeScript)', 'ops/s', 'mean', 'MB/s', 'frames/s'],
      ...framingRows.map((r) => [r.case, ops(r.opsPerSec), ns(r.meanNs), r.megabytesPerSec.toFixed(0), ops(r.framesPerSec)]),
    ]) +
      '\n' +
      table([
        ['NaCl box', 'native ops/s', 'native mean', 'tweetnacl ops/s', 'tweetnacl mean', 'native/tweetnacl'],
        ...boxRows.map((r) => [
          r.case,
          ops(r.nativeOpsPerSec),
          ns(r.nativeMeanNs),
          ops(r.tweetnaclOpsPerSec),
          ns(r.tweetnaclMeanNs),
          `${r.ratio.toFixed(2)}×`,
        ]),
      ]),
  );
  if (values.json) {
    writeFileSync(values.json, JSON.stringify({ node: process.version, timeMs: time, framing: framingRows, box: boxRows }, null, 2) + '\n');
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`codec.bench: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = 1;
});
