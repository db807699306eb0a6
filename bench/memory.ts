// Memory per idle client: a derpmesh server in a child process, N idle DERP clients held by a
// second child process, the server's resident set size before and after.
//
//   node dist/bench/memory.js [--clients 5000] [--tls auto|on|off] [--json out.json]
//
// RSS comes from /proc/<pid>/status (VmRSS), so it counts the whole server process — Node, the Rust
// runtime, every connection's buffers and tasks — but not the kernel's socket buffers. The baseline
// is taken after a warm-up (a few clients connected and gone, so lazily started threads and code
// paths are already paid for). The target: ≤ 10 KiB per idle client.
//
// With `--tls on` (default `auto`: when the openssl command exists) a second server serves HTTPS with
// a private CA's certificate and the clients dial it over TLS: RSS per idle TLS client against per
// idle plain client, target ≤ 2×.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get as httpsGet } from 'node:https';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { native } from '../src/native.js';
import { startPostgres } from '../test/helpers/postgres.js';
import { hasOpenssl, makePrivateCa } from '../test/helpers/certs.js';
import { freePort } from '../src/net.js';

const CLI = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const NATIVE_MODULE = new URL('../src/native.js', import.meta.url).href;
const TARGET_KIB_PER_CLIENT = 10;
/** An idle TLS client may cost at most this many times an idle plain one. */
const TARGET_TLS_RATIO = 2;
const WARMUP_CLIENTS = 100;
/** Descriptors each process needs beyond one per client (stdio, epoll, listener, Node's own). */
const FD_HEADROOM = 200;
const READY_TIMEOUT_MS = 30_000;
/** Longest wait for the N clients to show up in the server's gauge. */
const CONNECT_TIMEOUT_MS = 120_000;
/** The gauge must stop moving for this long before we give up waiting for more clients. */
const PLATEAU_MS = 10_000;

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    process.stderr.write(`\nmemory: ${signal}: stopping\n`);
    process.exit(130);
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function spawnChild(command: string, args: string[]): { child: ChildProcess; stderr: () => string; exited: () => string | undefined } {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  let stderr = '';
  let exited: string | undefined;
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (text: string) => {
    stderr = (stderr + text).slice(-4096);
  });
  child.once('exit', (code, signal) => {
    exited = signal ?? `exit code ${code}`;
    children.delete(child);
  });
  child.once('error', (err) => {
    exited = `spawn failed: ${err.message}`;
    children.delete(child);
  });
  return { child, stderr: () => stderr, exited: () => exited };
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 3_000);
  await exited;
  clearTimeout(timer);
}

/** A field of /proc/<pid>/status in KiB (VmRSS, VmHWM, …). */
function statusKib(pid: number, field: string): number {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error(`/proc/${pid}/status has no ${field}`);
  return Number(match[1]);
}

/** Median of a few RSS samples, so one allocator burst does not decide the result. */
async function sampleRssKib(pid: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < 5; i++) {
    samples.push(statusKib(pid, 'VmRSS'));
    await sleep(200);
  }
  return samples.sort((a, b) => a - b)[2]!;
}

/** Soft and hard limits on open files of a process. */
function fileLimits(pid: number | 'self'): { soft: number; hard: number } {
  const line = /^Max open files\s+(\S+)\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'));
  const value = (text: string | undefined) => (text === undefined || text === 'unlimited' ? Infinity : Number(text));
  return { soft: value(line?.[1]), hard: value(line?.[2]) };
}

async function gauge(url: string, name: string, ca?: Buffer): Promise<number> {
  const text = await getText(`${url}/metrics`, ca);
  const match = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  if (!match) throw new Error(`${url}/metrics has no ${name}`);
  return Number(match[1]);
}

/** Polls the clients gauge until `predicate` holds, it stops moving for PLATEAU_MS, or time runs out. */
async function waitForClients(
  clientsGauge: (name: string) => Promise<number>,
  predicate: (n: number) => boolean,
  timeoutMs: number,
  alive: () => void,
): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let last = -1;
  let lastChange = Date.now();
  for (;;) {
    alive();
    const n = await clientsGauge('derpmesh_clients');
    if (predicate(n)) return n;
    if (n !== last) {
      last = n;
      lastChange = Date.now();
    }
    if (Date.now() > deadline || Date.now() - lastChange > PLATEAU_MS) return n;
    await sleep(250);
  }
}

/** A certificate for 127.0.0.1 and the CA that signed it, for the TLS server. */
interface TlsFiles {
  certFile: string;
  keyFile: string;
  caFile: string;
}

/** What one server measured. */
interface Measurement {
  clients: number;
  connected: number;
  connectSecs: number;
  connections: number;
  baselineKib: number;
  loadedKib: number;
  peakKib: number;
  releasedKib: number;
  perClientKib: number;
  serverLimit: { soft: number; hard: number };
  /** WARNING lines about this measurement. */
  warnings: string[];
}

/** GET with a 5 s limit; https through node:https, trusting `ca` (fetch takes no CA). */
function getText(url: string, ca?: Buffer): Promise<string> {
  if (!url.startsWith('https:')) return fetch(url, { signal: AbortSignal.timeout(5_000) }).then((res) => res.text());
  return new Promise((resolve, reject) => {
    const req = httpsGet(url, { ca, timeout: 5_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve(body));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer within 5 s`)));
    req.on('error', reject);
  });
}

/**
 * One derpmesh server child (HTTPS with `tls`), warmed up, then `clients` idle clients held by a
 * second child: its RSS before, with and after them.
 */
async function measureServer(clients: number, postgresUrl: string, tls: TlsFiles | undefined): Promise<Measurement> {
  const label = tls ? 'TLS' : 'plain';
  const caPem = tls ? readFileSync(tls.caFile) : undefined;
  const port = await freePort();
  const url = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  const gaugeOf = (name: string) => gauge(url, name, caPem);
  const args = [CLI, 'server', '--http-address', `127.0.0.1:${port}`, '--postgres-url', postgresUrl, '--log-level', 'warn'];
  if (tls) args.push('--tls-cert-file', tls.certFile, '--tls-key-file', tls.keyFile);
  const server = spawnChild(process.execPath, args);
  const serverAlive = () => {
    const exited = server.exited();
    if (exited !== undefined) throw new Error(`the derpmesh server exited (${exited}); its stderr ends:\n${server.stderr()}`);
  };
  const pid = server.child.pid!;
  const readyBy = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    serverAlive();
    try {
      await gaugeOf('derpmesh_clients');
      break;
    } catch {
      if (Date.now() > readyBy)
        throw new Error(`the derpmesh server did not serve ${url}/metrics within ${READY_TIMEOUT_MS} ms; stderr:\n${server.stderr()}`);
      await sleep(100);
    }
  }
  const serverLimit = fileLimits(pid);
  process.stderr.write(`${label}: derpmesh server pid ${pid} at ${url}; warming up with ${WARMUP_CLIENTS} clients\n`);

  // Warm-up from this process (not measured): connect and drop a few clients.
  const warmed = await native.holdClients(url, WARMUP_CLIENTS, 500, caPem);
  if (warmed !== WARMUP_CLIENTS) throw new Error(`warm-up: only ${warmed} of ${WARMUP_CLIENTS} clients connected`);
  await waitForClients(gaugeOf, (n) => n === 0, 15_000, serverAlive);
  await sleep(1_000);
  const baselineKib = await sampleRssKib(pid);
  process.stderr.write(`${label}: baseline RSS ${baselineKib} KiB; connecting ${clients} idle clients from a second process\n`);

  // The idle clients live in their own process, so their memory is not the server's.
  const holdMs = CONNECT_TIMEOUT_MS + 60_000;
  const ca = tls ? `readFileSync(${JSON.stringify(tls.caFile)})` : 'undefined';
  const script = [
    `import { readFileSync } from 'node:fs';`,
    `import { native } from ${JSON.stringify(NATIVE_MODULE)};`,
    `await native.holdClients(${JSON.stringify(url)}, ${clients}, ${holdMs}, ${ca});`,
  ].join('\n');
  const holder = spawnChild(process.execPath, ['--input-type=module', '-e', script]);
  const started = Date.now();
  const connected = await waitForClients(
    gaugeOf,
    (n) => n >= clients,
    CONNECT_TIMEOUT_MS,
    () => {
      serverAlive();
      const exited = holder.exited();
      if (exited !== undefined) throw new Error(`the client holder exited early (${exited}); its stderr ends:\n${holder.stderr()}`);
    },
  );
  const connectSecs = (Date.now() - started) / 1000;
  await sleep(1_000);
  const loadedKib = await sampleRssKib(pid);
  const peakKib = statusKib(pid, 'VmHWM');
  const connections = await gaugeOf('derpmesh_connections');
  process.stderr.write(`${label}: ${connected} clients after ${connectSecs.toFixed(1)} s; RSS ${loadedKib} KiB; releasing them\n`);

  await stopChild(holder.child);
  const afterRelease = await waitForClients(gaugeOf, (n) => n === 0, 15_000, serverAlive);
  await sleep(1_000);
  const releasedKib = await sampleRssKib(pid);
  await stopChild(server.child);

  const warnings: string[] = [];
  if (connected < clients)
    warnings.push(`WARNING: only ${connected} of ${clients} ${label} clients connected; per-client memory is over ${connected}.`);
  if (afterRelease !== 0) warnings.push(`WARNING: ${afterRelease} ${label} clients still counted 15 s after the holder exited.`);
  return {
    clients,
    connected,
    connectSecs,
    connections,
    baselineKib,
    loadedKib,
    peakKib,
    releasedKib,
    perClientKib: connected > 0 ? (loadedKib - baselineKib) / connected : NaN,
    serverLimit,
    warnings,
  };
}

function rowsOf(m: Measurement): [string, string][] {
  return [
    ['idle clients connected', `${m.connected} of ${m.clients} (${m.connectSecs.toFixed(1)} s; ${m.connections} connections)`],
    ['server RSS, baseline', `${(m.baselineKib / 1024).toFixed(1)} MiB`],
    [`server RSS, ${m.connected} clients`, `${(m.loadedKib / 1024).toFixed(1)} MiB (peak ${(m.peakKib / 1024).toFixed(1)} MiB)`],
    ['server RSS, after release', `${(m.releasedKib / 1024).toFixed(1)} MiB`],
    ['RSS per idle client', `${m.perClientKib.toFixed(2)} KiB`],
    ['server open-file limit', `soft ${m.serverLimit.soft}, hard ${m.serverLimit.hard}`],
  ];
}

function aligned(rows: [string, string][]): string[] {
  const width = Math.max(...rows.map((r) => r[0].length));
  return rows.map(([k, v]) => `  ${k.padEnd(width)}  ${v}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      clients: { type: 'string', default: '5000' },
      tls: { type: 'string', default: 'auto' },
      'postgres-url': { type: 'string' },
      json: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'node dist/bench/memory.js [--clients N (default 5000)] [--tls auto|on|off] [--postgres-url URL (default: a throwaway one)] [--json FILE]\n\n' +
        '  --tls   also measure a server serving HTTPS (a private CA made with openssl) with N idle TLS\n' +
        '          clients, against the plain one (default auto: when the openssl command exists)\n',
    );
    return;
  }
  const clients = Number(values.clients);
  if (!Number.isInteger(clients) || clients < 1)
    throw new Error(`--clients must be a positive integer, got ${JSON.stringify(values.clients)}`);
  if (!['auto', 'on', 'off'].includes(values.tls)) throw new Error(`--tls must be auto, on or off, got ${JSON.stringify(values.tls)}`);
  const openssl = hasOpenssl();
  if (values.tls === 'on' && !openssl) throw new Error('--tls on needs the openssl command, to make the certificates');
  const withTls = values.tls === 'on' || (values.tls === 'auto' && openssl);
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npx tsc -p .\` first`);

  // Server and holder each need a descriptor per client; they inherit this process's limit.
  const limits = fileLimits('self');
  const needed = clients + FD_HEADROOM;
  const notes: string[] = [`open-file limit (ulimit -n): soft ${limits.soft}, hard ${limits.hard}; needed per process ≈ ${needed}`];
  if (limits.soft < needed) {
    notes.push(
      `WARNING: the soft limit is below ${needed}: clients past it fail to connect. Raise it (ulimit -n ${Math.min(needed * 2, limits.hard)}) and re-run.`,
    );
  }
  const ports = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
  if (ports.length === 2 && ports[1]! - ports[0]! < clients + 1000) {
    notes.push(`WARNING: the ephemeral port range ${ports.join('–')} is narrow for ${clients} clients to one address.`);
  }

  // The node's database runs in its own process, so its memory is not counted. The TLS server
  // runs after the plain one has stopped, on the same database.
  const postgres = values['postgres-url'] === undefined ? await startPostgres() : undefined;
  const postgresUrl = values['postgres-url'] ?? postgres!.url;
  const plain = await measureServer(clients, postgresUrl, undefined);
  let tls: Measurement | undefined;
  if (withTls) {
    const ca = makePrivateCa();
    process.on('exit', () => rmSync(ca.dir, { recursive: true, force: true }));
    tls = await measureServer(clients, postgresUrl, ca);
  } else {
    process.stderr.write(`TLS: skipped (${values.tls === 'off' ? '--tls off' : 'no openssl command to make certificates'})\n`);
  }
  await postgres?.stop();

  const holds = plain.perClientKib <= TARGET_KIB_PER_CLIENT;
  const tlsRatio = tls ? tls.perClientKib / plain.perClientKib : undefined;
  const tlsHolds = tlsRatio !== undefined && tlsRatio <= TARGET_TLS_RATIO;
  const out = [
    ...aligned(rowsOf(plain)),
    ...[...notes, ...plain.warnings].map((n) => `  ${n}`),
    `target: ≤ ${TARGET_KIB_PER_CLIENT} KiB per idle client — ${holds ? 'HOLDS' : 'DOES NOT HOLD'} (${plain.perClientKib.toFixed(2)} KiB)`,
  ];
  if (tls) {
    out.push(
      '',
      'TLS (the server with --tls-cert-file, the clients over TLS):',
      ...aligned(rowsOf(tls)),
      ...tls.warnings.map((n) => `  ${n}`),
      `target: TLS ≤ ${TARGET_TLS_RATIO}× plain per idle client — ${tlsHolds ? 'HOLDS' : 'DOES NOT HOLD'} (${tls.perClientKib.toFixed(2)} KiB against ${plain.perClientKib.toFixed(2)} KiB: ${tlsRatio!.toFixed(2)}×)`,
    );
  }
  process.stdout.write(out.join('\n') + '\n');
  if (values.json) {
    writeFileSync(
      values.json,
      JSON.stringify(
        {
          ...plain,
          targetKib: TARGET_KIB_PER_CLIENT,
          holds,
          limits,
          notes: [...notes, ...plain.warnings],
          tls: tls && { ...tls, ratioToPlain: tlsRatio, targetRatio: TARGET_TLS_RATIO, holds: tlsHolds },
        },
        null,
        2,
      ) + '\n',
    );
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`memory: ${(err as Error).stack ?? String(err)}\n`);
  // Exit now: the 'exit' handler kills the children, whose pipes would otherwise keep us alive.
  process.exit(1);
});
