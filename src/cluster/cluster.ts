// `derpmesh cluster --nodes N`: a local HA cluster of N real node processes sharing one embedded
// Postgres, each on its own port with its own relay URL, behind a round-robin access URL.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { options, parseDuration } from '../config.js';
import { STOP_WITH_PARENT_ENV } from '../parent.js';
import { configError } from '../errors.js';
import { createLogger } from '../log.js';
import { freePort } from '../net.js';
import { startEmbeddedPostgres } from '../postgres/embedded.js';
import { startBalancer } from './balancer.js';

const cli = fileURLToPath(new URL('../cli.js', import.meta.url));

const help = `derpmesh cluster [options]

Runs N derpmesh nodes as separate processes on this machine, sharing one embedded Postgres, with a
round-robin TCP balancer as the access URL. Ctrl-C stops everything cleanly.

  --nodes N             number of nodes (default 3)
  --access-port P       port of the access URL (default 3000)
  --base-port P         first node port; node i listens on P+i-1 (default 3001)
  --state-dir DIR       where the embedded Postgres keeps its data (default ~/.derpmesh,
                        /var/lib/derpmesh as root)
  --heartbeat-interval  replica heartbeat (default 1s for a local cluster)
`;

interface ReplicaView {
  id: string;
  hostname: string;
  relay_address: string;
  state: string;
  database_latency: number;
  peer_latencies: Record<string, number>;
}

export async function clusterCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      nodes: { type: 'string', default: '3' },
      'access-port': { type: 'string', default: '3000' },
      'base-port': { type: 'string', default: '3001' },
      'state-dir': { type: 'string' },
      'heartbeat-interval': { type: 'string', default: '1s' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(help);
    return;
  }
  const count = Number(values.nodes);
  if (!Number.isInteger(count) || count < 1 || count > 64)
    throw configError(`--nodes must be an integer from 1 to 64, got ${JSON.stringify(values.nodes)}`, values.nodes);
  const accessPortArg = Number(values['access-port']);
  const basePortArg = Number(values['base-port']);
  if (!Number.isInteger(accessPortArg) || !Number.isInteger(basePortArg))
    throw configError('--access-port and --base-port must be port numbers');
  const heartbeat = values['heartbeat-interval'];
  if (parseDuration(heartbeat) === undefined)
    throw configError(`--heartbeat-interval must be a duration like 1s, got ${JSON.stringify(heartbeat)}`, heartbeat);

  const logger = createLogger({ fields: { node: 'cluster' } });
  const stateDir = values['state-dir'] ?? process.env.DERPMESH_STATE_DIR ?? options.stateDir.default;
  const postgres = await startEmbeddedPostgres({ stateDir, logger });
  const ports: number[] = [];
  for (let i = 0; i < count; i++) ports.push(basePortArg === 0 ? await freePort() : basePortArg + i);
  const balancer = await startBalancer('127.0.0.1', accessPortArg, ports);
  const accessUrl = `http://127.0.0.1:${balancer.port}`;

  const children: ChildProcess[] = ports.map((port, i) => {
    const name = `node-${i + 1}`;
    const { CODER_PG_CONNECTION_URL: _external, ...inherited } = process.env;
    const child = spawn(process.execPath, [cli, 'server'], {
      env: {
        ...inherited,
        CODER_ADDRESS: `127.0.0.1:${port}`,
        CODER_ACCESS_URL: accessUrl,
        CODER_DERP_SERVER_RELAY_URL: `http://127.0.0.1:${port}`,
        // Each node joins the embedded Postgres through the state directory, as a user of it: the
        // last user to stop stops it, so it goes with the nodes even if this process is killed.
        DERPMESH_STATE_DIR: stateDir,
        DERPMESH_HOSTNAME: name,
        DERPMESH_HEARTBEAT_INTERVAL: heartbeat,
        // Every node answers STUN on a UDP port of its own (its /derpmap says which), unless set.
        DERPMESH_STUN_ADDRESS: process.env.DERPMESH_STUN_ADDRESS ?? '127.0.0.1:0',
        // The node stops (gracefully) when this process is gone, however it went: see cli.ts.
        [STOP_WITH_PARENT_ENV]: '1',
      },
      // The IPC channel carries nothing; it closes when this process dies, which the node watches.
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      // Own process group: a terminal's Ctrl-C reaches only this process, which then stops each
      // node gracefully (Restarting to clients, stopped_at) with one SIGTERM.
      detached: true,
    });
    child.on('error', (err) => logger.error('could not start a node process', { name, err }));
    child.on('exit', (code, signal) => {
      if (!stopping) logger.warn('node exited', { name, code, signal });
    });
    child.channel?.unref();
    return child;
  });

  // Never leave nodes behind if this process exits without stopping them.
  process.on('exit', () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  });
  let stopping = false;
  let stopped: Promise<void> | undefined;
  // A node that has not exited this long after its SIGTERM is killed: its own graceful stop is
  // bounded by the drain delay plus the shutdown grace, so this only catches a node that hangs.
  const killAfterMs =
    (parseDuration(process.env.DERPMESH_SHUTDOWN_GRACE ?? options.shutdownGrace.default ?? '5s') ?? 5_000) +
    (parseDuration(process.env.DERPMESH_SHUTDOWN_DRAIN_DELAY ?? '0s') ?? 0) +
    2_000;
  const stop = () =>
    (stopped ??= (async () => {
      stopping = true;
      logger.info('stopping the cluster', { nodes: children.length });
      const killed: string[] = [];
      await Promise.all(
        children.map(async (c, i) => {
          if (c.exitCode !== null || c.signalCode !== null) return;
          const exit = once(c, 'exit');
          c.kill('SIGTERM');
          const timer = setTimeout(() => {
            killed.push(`node-${i + 1}`);
            c.kill('SIGKILL');
          }, killAfterMs);
          await exit;
          clearTimeout(timer);
        }),
      );
      if (killed.length > 0) logger.warn('nodes did not stop in time and were killed', { nodes: killed.join(','), afterMs: killAfterMs });
      await balancer.close();
      await postgres.release();
      logger.info('cluster stopped', { killed: killed.length });
    })());
  // However many signals arrive (a terminal's Ctrl-C and a wrapper such as npm may both send one),
  // the first starts the stop and the others wait for it: the stop is bounded, and exiting early
  // would strand the nodes and the Postgres.
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    if (++signals > 1) {
      logger.warn('signal received while stopping: still stopping the nodes and the Postgres', { signal, limitMs: killAfterMs });
      return;
    }
    void stop().then(() => process.exit(0));
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, onSignal);

  try {
    const views = await waitForCluster(ports, count, 60_000);
    process.stdout.write(formatCluster(accessUrl, views));
    process.stdout.write(`\nAccess URL ${accessUrl} (round robin over the nodes). Ctrl-C to stop.\n`);
  } catch (err) {
    logger.error('cluster did not come up', { err });
    await stop();
    process.exitCode = 1;
  }
}

/** Waits until every node lists every other as live and has measured the round trip to it. */
async function waitForCluster(ports: number[], count: number, timeoutMs: number): Promise<ReplicaView[][]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const views = await Promise.all(
      ports.map(async (port) => {
        try {
          const res = await fetch(`http://127.0.0.1:${port}/api/v2/replicas`, { signal: AbortSignal.timeout(2_000) });
          return (await res.json()) as ReplicaView[];
        } catch {
          return [];
        }
      }),
    );
    const complete = views.every((v) => {
      const live = v.filter((r) => r.state === 'live');
      return live.length === count && live.every((r) => Object.keys(r.peer_latencies).length === count - 1);
    });
    if (complete) return views;
    if (Date.now() > deadline) throw new Error(`not every node sees ${count} live replicas with measured latencies after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

function formatCluster(accessUrl: string, views: ReplicaView[][]): string {
  const replicas = views[0]!.filter((r) => r.state === 'live').sort((a, b) => a.hostname.localeCompare(b.hostname));
  const lines = [`\nderpmesh cluster: ${replicas.length} nodes, access URL ${accessUrl}\n`];
  lines.push('node     listen                  relay URL               database rtt');
  for (const r of replicas) {
    const port = new URL(r.relay_address).port;
    lines.push(
      `${r.hostname.padEnd(8)} ${`http://127.0.0.1:${port}`.padEnd(23)} ${r.relay_address.padEnd(23)} ${(r.database_latency / 1000).toFixed(2)} ms`,
    );
  }
  lines.push('', 'latency matrix (ms, row → column relay round trip):');
  lines.push('         ' + replicas.map((r) => r.hostname.padStart(9)).join(''));
  for (const from of replicas) {
    const cells = replicas.map((to) =>
      to.id === from.id ? '-' : from.peer_latencies[to.id] === undefined ? '?' : (from.peer_latencies[to.id]! / 1000).toFixed(2),
    );
    lines.push(from.hostname.padEnd(9) + cells.map((c) => c.padStart(9)).join(''));
  }
  return lines.join('\n') + '\n';
}
