// Round trips to peer relays (`<relay URL>/derp/latency-check`) and to Postgres.
import http from 'node:http';
import https from 'node:https';
import { performance } from 'node:perf_hooks';

import type pg from 'pg';

import type { MeshTrust } from '../mesh-trust.js';

export interface ProbeResult {
  /** Median round trip in ms, when the peer answered. */
  rttMs?: number;
  /** Why the peer could not be reached. */
  error?: string;
}

/** Samples measured per probe; the median is kept, so one slow outlier does not raise a warning. */
const SAMPLES = 3;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function request(agent: http.Agent, url: URL, timeoutMs: number): Promise<void> {
  const mod = url.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.request(url, { method: 'GET', agent, timeout: timeoutMs }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`status ${res.statusCode}`))));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

/**
 * Median round trip of a few GETs to the peer's latency-check endpoint over one kept-alive
 * connection (the first request opens the connection and is not counted). https peers are checked
 * against `trust`, the same trust the mesh links use.
 */
export async function probeRelay(relayUrl: string, trust: MeshTrust, timeoutMs = 3_000): Promise<ProbeResult> {
  const url = new URL('/derp/latency-check', relayUrl);
  const agent =
    url.protocol === 'https:'
      ? new https.Agent({ keepAlive: true, maxSockets: 1, ...trust.tlsOptions() })
      : new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await request(agent, url, timeoutMs);
    const samples: number[] = [];
    for (let i = 0; i < SAMPLES; i++) {
      const start = performance.now();
      await request(agent, url, timeoutMs);
      samples.push(performance.now() - start);
    }
    return { rttMs: median(samples) };
  } catch (err) {
    return { error: (err as Error).message };
  } finally {
    agent.destroy();
  }
}

/** Round trip of a trivial query through the pool, in ms. */
export async function probeDatabase(pool: pg.Pool): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    const start = performance.now();
    await pool.query('SELECT 1');
    samples.push(performance.now() - start);
  }
  return median(samples);
}
