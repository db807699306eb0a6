// `derpmesh bench`: the Rust load generator against any DERP relay URL.
import { parseArgs } from 'node:util';

import { parseDuration } from './config.js';
import { readCaFile } from './ca-file.js';
import { configError, fromNative } from './errors.js';
import { native } from './native.js';
import { createProgress, secondsOf } from './progress.js';

export type LoadReport = Awaited<ReturnType<typeof native.runLoad>>;

export interface LoadOptions {
  url: string;
  receiverUrl?: string;
  pairs?: number;
  packetSize?: number;
  durationMs?: number;
  warmupMs?: number;
  ratePerPair?: number;
  /** Packets in flight per pair; caps queueing so round trips show the relay's own delay. */
  window?: number;
  /**
   * PEM CA certificate(s) trusted for `https://` URLs besides the public roots: the private CA
   * that signed the relay's certificate.
   */
  caPem?: Buffer | string;
}

/** The defaults of `LoadOptions`, chosen here once: the native binding is given every value. */
export const loadDefaults = { pairs: 10, packetSize: 1400, durationMs: 5_000, warmupMs: 1_000 } as const;

/**
 * Runs N sender→receiver pairs through a relay and reports throughput and round-trip latency.
 * `https://` URLs are dialed over TLS (the public roots plus `caPem`). Rejects with a
 * `DerpmeshError`: `DERPMESH_ERR_LOAD_OPTIONS` (also an unusable `caPem`), `DERPMESH_ERR_LOAD_DIAL`,
 * `DERPMESH_ERR_LOAD_TLS` (a TLS handshake failed, e.g. the certificate is not signed by a trusted
 * CA) or `DERPMESH_ERR_LOAD_RUN`.
 */
export function runLoad(options: LoadOptions): Promise<LoadReport> {
  const { caPem, ...rest } = options;
  const given = Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined)) as Omit<LoadOptions, 'caPem'>;
  const ca = caPem === undefined ? {} : { caPem: typeof caPem === 'string' ? Buffer.from(caPem) : caPem };
  return native.runLoad({ ...loadDefaults, ...given, ...ca }).catch((err: unknown) => {
    throw fromNative(err);
  });
}

export function formatReport(label: string, r: LoadReport): string {
  const us = (v: number | null | undefined) => (v == null ? 'n/a' : `${(v / 1000).toFixed(3)} ms`);
  return [
    `${label}`,
    `  pairs × size      ${r.pairs} × ${r.packetSize} B, ${r.durationSecs.toFixed(1)} s`,
    `  packets/s         ${Math.round(r.packetsPerSec).toLocaleString('en-US')}`,
    `  throughput        ${r.gbitPerSec.toFixed(3)} Gbit/s`,
    `  loss              ${(r.lossRatio * 100).toFixed(2)} %`,
    `  rtt p50/p90/p99   ${us(r.rttP50Us)} / ${us(r.rttP90Us)} / ${us(r.rttP99Us)} (${r.rttSamples} samples)`,
  ].join('\n');
}

const help = `derpmesh bench --url http://host:port [options]

  --url URL            relay the senders dial (required); https://host:port dials over TLS
  --receiver-url URL   relay the receivers dial (default: --url); another node measures the mesh path
  --ca-file PEM        CA certificate(s) trusted for https URLs besides the public roots
  --pairs N            sender→receiver pairs (default 10)
  --size BYTES         packet size (default 1400)
  --duration D         measured window, e.g. 20s (default 10s)
  --warmup D           unmeasured lead-in (default 1s)
  --rate N             packets/s per sender (default: as fast as the relay takes them)
  --window N           packets in flight per pair (default: no cap)
  --json               print the report as JSON
`;

export async function benchCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string' },
      'receiver-url': { type: 'string' },
      'ca-file': { type: 'string' },
      pairs: { type: 'string', default: '10' },
      size: { type: 'string', default: '1400' },
      duration: { type: 'string', default: '10s' },
      warmup: { type: 'string', default: '1s' },
      rate: { type: 'string' },
      window: { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(help);
    return;
  }
  if (!values.url) throw configError('derpmesh bench needs --url http://host:port (or https://) of the relay to measure');
  const int = (name: string, text: string) => {
    if (!/^\d+$/.test(text)) throw configError(`--${name} must be a positive integer, got ${JSON.stringify(text)}`, text);
    return Number(text);
  };
  const duration = (name: string, text: string) => {
    const ms = parseDuration(text);
    if (ms === undefined) throw configError(`--${name} must be a duration like 20s, got ${JSON.stringify(text)}`, text);
    return ms;
  };
  const caPem = readCaFile(values['ca-file']);
  const options: LoadOptions = {
    caPem,
    url: values.url,
    receiverUrl: values['receiver-url'],
    pairs: int('pairs', values.pairs),
    packetSize: int('size', values.size),
    durationMs: duration('duration', values.duration),
    warmupMs: duration('warmup', values.warmup),
    ratePerPair: values.rate === undefined ? undefined : int('rate', values.rate),
    window: values.window === undefined ? undefined : int('window', values.window),
  };
  // On a terminal, one line on stderr counts the seconds (the run itself reports only at its end).
  const progress = createProgress(process.stderr);
  const started = Date.now();
  const tick = () => {
    const elapsed = Date.now() - started;
    const warmupMs = options.warmupMs!;
    progress.update(
      elapsed < warmupMs
        ? `bench ${values.url}: warm-up ${secondsOf(elapsed, warmupMs)}`
        : `bench ${values.url}: ${secondsOf(elapsed - warmupMs, options.durationMs!)}, ${options.pairs} pairs`,
    );
  };
  const timer = progress.active ? setInterval(tick, 250) : undefined;
  if (progress.active) tick();
  let report: LoadReport;
  try {
    report = await runLoad(options);
  } finally {
    clearInterval(timer);
    progress.done();
  }
  process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : formatReport(values.url, report) + '\n');
}
