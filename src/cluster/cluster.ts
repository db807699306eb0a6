// `derpmesh cluster --nodes N`: a local HA cluster of N real node processes sharing one embedded
// Postgres, each on its own port with its own relay URL, behind a round-robin access URL.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { options, parseDuration } from '../config.js';
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
    const child = spawn(process.execPath, [cli, 'server'], {
      env: {
        ...process.env,
        CODER_ADDRESS: `127.0.0.1:${port}`,
        CODER_ACCESS_URL: accessUrl,
        CODER_DERP_SERVER_RELAY_URL: `http://127.0.0.1:${port}`,
        CODER_PG_CONNECTION_URL: postgres.url,
        DERPMESH_HOSTNAME: name,
        DERPMESH_HEARTBEAT_INTERVAL: heartbeat,
      },
      stdio: ['ignore', 'inherit', 'inherit'],
      // Own process group: a terminal's Ctrl-C reaches only this process, which then stops each
      // node gracefully (Restarting to clients, stopped_at) with one SIGTERM.
      detached: true,
    });
    child.on('exit', (code, signal) => {
      if (!stopping) logger.warn('node exited', { name, code, signal });
    });
    return child;
  });

  // Never leave nodes behind if this process dies without stopping them.
  process.on('exit', () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    logger.info('stopping the cluster');
    await Promise.all(
      children.map(async (c) => {
        if (c.exitCode !== null || c.signalCode !== null) return;
        c.kill('SIGTERM');
        const timer = setTimeout(() => c.kill('SIGKILL'), 15_000);
        await once(c, 'exit');
        clearTimeout(timer);
      }),
    );
    await balancer.close();
    await postgres.release();
    logger.info('cluster stopped');
  };
  process.once('SIGINT', () => void stop().then(() => process.exit(0)));
  process.once('SIGTERM', () => void stop().then(() => process.exit(0)));

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
          return ((await res.json()) as { replicas: ReplicaView[] }).replicas;
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
