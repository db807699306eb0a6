// Real derpmesh node processes on one real Postgres, for multi-node and failure tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { get as httpsGet } from 'node:https';
import { fileURLToPath } from 'node:url';

import { freePort } from './postgres.js';

const cli = fileURLToPath(new URL('../../src/cli.js', import.meta.url));

export interface ReplicaView {
  id: string;
  hostname: string;
  relay_address: string;
  state: 'live' | 'stale' | 'stopped';
  self: boolean;
  error: string;
  peer_latencies: Record<string, number>;
  latency_from_here_ms?: number;
  latency_warning?: string;
  unreachable_from_here?: string;
}

export interface NodeProcess {
  name: string;
  port: number;
  /** http://127.0.0.1:PORT — listen address and relay URL. */
  url: string;
  child: ChildProcess;
  output(): string;
  /** Resolves once the node logged that it started. */
  started: Promise<void>;
  /** GET /api/v2/replicas: a bare array, as Coder's API. */
  replicas(): Promise<ReplicaView[]>;
  health(): Promise<{
    severity: string;
    nodes: { hostname: string; sections: Record<string, { severity: string; code: string; message: string }> }[];
    warnings: string[];
  }>;
  metrics(): Promise<string>;
  /** SIGTERM and wait for the exit code. */
  stop(): Promise<number | null>;
  kill9(): Promise<void>;
}

export interface NodeOptions {
  name: string;
  postgresUrl: string;
  heartbeatMs?: number;
  port?: number;
  /** Relay URL to advertise; default the node's own address. `null` = none. */
  relayUrl?: string | null;
  env?: NodeJS.ProcessEnv;
  /** Serve HTTPS with this certificate and trust `caFile` for peers (and for this helper's requests). */
  tls?: { certFile: string; keyFile: string; caFile: string };
  /** Listen on (and advertise) this address instead of 127.0.0.1. */
  host?: string;
  /** Run the node inside this network namespace (`ip netns exec`). */
  netns?: string;
}

export async function startNodeProcess(o: NodeOptions): Promise<NodeProcess> {
  const port = o.port ?? (await freePort());
  const host = o.host ?? '127.0.0.1';
  const url = `${o.tls ? 'https' : 'http'}://${host}:${port}`;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    CODER_ADDRESS: `${host}:${port}`,
    CODER_ACCESS_URL: 'http://127.0.0.1:1',
    CODER_PG_CONNECTION_URL: o.postgresUrl,
    DERPMESH_HOSTNAME: o.name,
    DERPMESH_HEARTBEAT_INTERVAL: `${o.heartbeatMs ?? 500}ms`,
    DERPMESH_SHUTDOWN_GRACE: '2s',
    DERPMESH_LOG_LEVEL: 'info',
    ...(o.tls ? { CODER_TLS_CERT_FILE: o.tls.certFile, CODER_TLS_KEY_FILE: o.tls.keyFile, DERPMESH_MESH_CA_FILE: o.tls.caFile } : {}),
    ...o.env,
  };
  if (o.relayUrl !== null) env.CODER_DERP_SERVER_RELAY_URL = o.relayUrl ?? url;
  else delete env.CODER_DERP_SERVER_RELAY_URL;
  // `ip netns exec` execs the command: the child's pid is the node's.
  const [command, args] = o.netns
    ? ['ip', ['netns', 'exec', o.netns, process.execPath, cli, 'server']]
    : [process.execPath, [cli, 'server']];
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  const started = new Promise<void>((resolve, reject) => {
    const onData = (d: Buffer) => {
      text += d.toString();
      if (text.includes('derpmesh node started')) resolve();
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', (code) => reject(new Error(`${o.name} exited with ${code} before starting:\n${text}`)));
    child.once('error', (err) => reject(new Error(`${o.name} could not be started: ${err.message}`)));
    setTimeout(() => reject(new Error(`${o.name} did not start within 30 s:\n${text}`)), 30_000).unref();
  });
  started.catch(() => {});
  const ca = o.tls ? readFileSync(o.tls.caFile) : undefined;
  const get = (path: string) => getUrl(url + path, ca);
  return {
    name: o.name,
    port,
    url,
    child,
    output: () => text,
    started,
    replicas: async () => (await get('/api/v2/replicas')).json() as never,
    health: async () => (await get('/api/v2/debug/health')).json() as never,
    metrics: async () => (await get('/metrics')).text(),
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      const [code] = (await exited) as [number | null];
      return code;
    },
    kill9: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGKILL');
      await exited;
    },
  };
}

/** Polls `check` until it returns a truthy value or `timeoutMs` passes; returns how long it took. */
/** GET with a 5 s limit; https URLs are verified against `ca` (Node's fetch takes no CA). */
export async function getUrl(url: string, ca?: Buffer): Promise<{ status: number; json(): Promise<unknown>; text(): Promise<string> }> {
  if (!url.startsWith('https:')) return fetch(url, { signal: AbortSignal.timeout(5_000) });
  return new Promise((resolve, reject) => {
    const req = httpsGet(url, { ca, timeout: 5_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, json: async () => JSON.parse(body) as unknown, text: async () => body });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer within 5 s`)));
    req.on('error', reject);
  });
}

export async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => Promise<T | undefined | false> | T | undefined | false,
  intervalMs = 50,
): Promise<{ value: T; ms: number }> {
  const start = Date.now();
  let lastError: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return { value: v, ms: Date.now() - start };
    } catch (err) {
      lastError = err;
    }
    if (Date.now() - start > timeoutMs)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? `: ${String(lastError)}` : ''}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Live peers (not self) a node lists, by hostname. */
export async function livePeers(node: NodeProcess): Promise<string[]> {
  const replicas = await node.replicas();
  return replicas
    .filter((r) => r.state === 'live' && !r.self)
    .map((r) => r.hostname)
    .sort();
}
