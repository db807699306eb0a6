// The chaos scenarios (issue 12): each runs on a fresh cluster (ChaosCluster), with traffic flowing
// before, during and after one fault, and returns one result row. Durations are parameters so that
// the tests run short versions of the same code.
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

import { ChaosCluster, type ChaosOptions, type ScenarioResult } from './harness.js';
import { cpuSeconds } from '../report.js';
import { NetnsLab } from './netns.js';

export interface ScenarioOptions extends ChaosOptions {
  /** Traffic before the fault (default 3 s). */
  warmupMs?: number;
  /** Traffic after the fault, or after the recovery (default 10 s). */
  afterMs?: number;
  /** How long Postgres stays down in `pg-stop` (default 30 s). */
  pgDownMs?: number;
  /** How long a node stays frozen in `sigstop` (default 20 s). */
  frozenMs?: number;
  /** How long a node stays cut off from its peers in `partition`, or slowed in `slow-link` (default 20 s). */
  faultMs?: number;
}

/** The scenario cannot run here (no network namespaces); the reason says why. */
export class ScenarioSkipped extends Error {}

export interface ScenarioReport extends ScenarioResult {
  title: string;
  /** Whether it ran over TLS (relays serving HTTPS with a private CA's certificate, clients verifying it). */
  tls: boolean;
  /** Scenario-specific findings in words, e.g. `live everywhere again 1.2 s after SIGCONT`. */
  notes: string[];
  /** The same as numbers (milliseconds): `meshedMs` (every node lists every other as live again,
   * after the frozen node resumed; after Postgres returned, also every node's database and LISTEN
   * connection healthy), `staleMs` (a peer marked the frozen node stale), `exitMs` (SIGTERM to exit). */
  measures: {
    meshedMs?: number;
    staleMs?: number;
    exitMs?: number;
    /** Storm: every client connected again / every flow delivering again, after the kill. */
    reconnectedMs?: number;
    deliveringMs?: number;
    /** Storm: handshakes per second of the surviving relays while the clients came back, and per CPU-second. */
    handshakesPerSec?: number;
    handshakesPerCpuSec?: number;
    /**
     * kill9, sigterm: CPU-seconds in the 2 s after the fault; storm: from the kill until every client
     * was connected again. Per kind of process:
     * the surviving relays, the client worker processes, the balancer processes, and the harness's
     * process (its balancer instance, its polling, the clients if they run in it); `wallSecs` that span.
     */
    cpu?: { wallSecs: number; relays: number; clients: number; balancers: number; harness: number };
  };
}

interface Context {
  o: Required<Omit<ScenarioOptions, keyof ChaosOptions>>;
  notes: string[];
  measures: ScenarioReport['measures'];
}

type Run = (cluster: ChaosCluster, victim: number, ctx: Context) => Promise<void>;

/** CPU-seconds used so far by the surviving relays, the client processes, the balancer processes and this process. */
function cpuNow(c: ChaosCluster, victim: number) {
  const sum = (pids: (number | undefined)[]) => pids.reduce<number>((t, pid) => t + cpuSeconds(pid), 0);
  const procs = c.processes();
  return {
    at: performance.now(),
    relays: sum(c.nodes.filter((_, i) => i !== victim).map((n) => n?.child.pid)),
    clients: sum(procs.clients),
    balancers: sum(procs.balancers),
    harness: cpuSeconds(procs.harness),
  };
}

/** CPU-seconds each kind of process used since `from` (a `cpuNow`), and the wall-clock seconds. */
function cpuSince(c: ChaosCluster, victim: number, from: ReturnType<typeof cpuNow>): NonNullable<ScenarioReport['measures']['cpu']> {
  const to = cpuNow(c, victim);
  return {
    wallSecs: (to.at - from.at) / 1000,
    relays: to.relays - from.relays,
    clients: to.clients - from.clients,
    balancers: to.balancers - from.balancers,
    harness: to.harness - from.harness,
  };
}

/**
 * Waits `afterMs`, noting how busy each kind of process was in the first `windowMs` of it (the heal
 * happens there): in cores, so that a process at 1.0 is a saturated event loop.
 */
async function afterWithCpu(c: ChaosCluster, victim: number, ctx: Context, from: ReturnType<typeof cpuNow>, windowMs = 2_000) {
  const wait = Math.max(0, from.at + windowMs - performance.now());
  await sleep(Math.min(wait, ctx.o.afterMs));
  const u = cpuSince(c, victim, from);
  const secs = u.wallSecs;
  ctx.measures.cpu = u;
  const cores = (x: number) => `${(x / secs).toFixed(2)}`;
  const procs = c.processes();
  ctx.notes.push(
    `CPU in the ${secs.toFixed(1)} s after the fault, in cores: surviving relays ${cores(u.relays)}` +
      (procs.clients.length ? `, client processes ${cores(u.clients)} (${procs.clients.length})` : '') +
      (procs.balancers.length ? `, balancer processes ${cores(u.balancers)}` : '') +
      `, harness process ${cores(u.harness)} (${procs.clients.length ? 'balancer, polling' : 'the clients, balancer, polling'})`,
  );
  await sleep(Math.max(0, ctx.o.afterMs - wait));
}

const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

const scenarios: Record<
  string,
  {
    title: string;
    hitsNode: boolean;
    netns?: boolean;
    clientsOnVictim?: boolean;
    /** Runs against derpers too (`relay: 'derper'`): a node fault only, no Postgres or API. */
    derper?: boolean;
    run: Run;
  }
> = {
  kill9: {
    title: 'kill -9 of one node',
    hitsNode: true,
    derper: true,
    run: async (c, victim, ctx) => {
      const cpu = cpuNow(c, victim);
      await c.kill9(victim);
      await afterWithCpu(c, victim, ctx, cpu);
    },
  },
  sigterm: {
    title: 'graceful stop (SIGTERM) of one node',
    hitsNode: true,
    derper: true,
    run: async (c, victim, ctx) => {
      const { notes, measures } = ctx;
      const cpu = cpuNow(c, victim);
      const start = performance.now();
      const code = await c.stop(victim);
      measures.exitMs = performance.now() - start;
      notes.push(`the node exited with ${code} ${secs(measures.exitMs)} after SIGTERM`);
      await afterWithCpu(c, victim, ctx, cpu);
    },
  },
  'pg-stop': {
    title: 'Postgres stopped, then started again',
    hitsNode: false,
    run: async (c, _victim, { o, notes, measures }) => {
      await c.pg!.stopServer();
      await sleep(o.pgDownMs);
      await c.pg!.startServer();
      measures.meshedMs = await c.waitDiscovery(60_000);
      notes.push(
        `Postgres down ${secs(o.pgDownMs)}; discovery (peers live, database and LISTEN healthy on every node) resumed ${secs(measures.meshedMs)} after it returned`,
      );
      await sleep(o.afterMs);
    },
  },
  'pg-restart': {
    title: 'Postgres restarted',
    hitsNode: false,
    run: async (c, _victim, { o, notes, measures }) => {
      await c.pg!.restart();
      measures.meshedMs = await c.waitDiscovery(60_000);
      notes.push(`discovery (peers live, database and LISTEN healthy on every node) resumed ${secs(measures.meshedMs)} after the restart`);
      await sleep(o.afterMs);
    },
  },
  sigstop: {
    title: 'one node frozen (SIGSTOP), then resumed',
    hitsNode: true,
    run: async (c, victim, { o, notes, measures }) => {
      const name = c.nodes[victim]!.name;
      const start = performance.now();
      c.freeze(victim);
      let staleAfter: number | undefined;
      const watcher = c.nodes[0]!;
      while (performance.now() - start < o.frozenMs) {
        if (staleAfter === undefined) {
          try {
            const r = (await watcher.replicas()).find((x) => x.hostname === name);
            if (r && r.state !== 'live') staleAfter = performance.now() - start;
          } catch {
            // Busy: try again.
          }
        }
        await sleep(100);
      }
      c.thaw(victim);
      measures.staleMs = staleAfter;
      measures.meshedMs = await c.waitMeshed(60_000);
      notes.push(
        `${watcher.name} marked ${name} stale ${staleAfter === undefined ? 'never' : secs(staleAfter)} after SIGSTOP (heartbeat ${c.options.heartbeatMs} ms); ` +
          `live everywhere again ${secs(measures.meshedMs)} after SIGCONT`,
      );
      await sleep(o.afterMs);
    },
  },
  storm: {
    title: 'reconnect storm: every client on one node, which is killed (-9)',
    hitsNode: true,
    clientsOnVictim: true,
    derper: true,
    run: async (c, victim, { o, notes, measures }) => {
      const before = cpuNow(c, victim);
      const start = performance.now();
      await c.kill9(victim);
      // Polled every 100 ms: the state of every client group (in worker processes, one round trip each).
      const deadline = start + 120_000;
      let state = await c.groupState();
      for (; ; state = await c.groupState()) {
        if (measures.reconnectedMs === undefined && state.reconnected === state.clients) {
          measures.reconnectedMs = performance.now() - start;
          measures.cpu = cpuSince(c, victim, before);
        }
        if (state.deliveringAfterMark === state.flows) break;
        if (performance.now() > deadline)
          throw new Error(
            `storm: after 120 s ${state.reconnected} of ${state.clients} clients reconnected, ${state.deliveringAfterMark} of ${state.flows} flows delivering`,
          );
        await sleep(100);
      }
      measures.deliveringMs = performance.now() - start;
      measures.reconnectedMs ??= measures.deliveringMs;
      const cpu = measures.cpu?.relays ?? cpuSince(c, victim, before).relays;
      const n = state.clients;
      // Epoch ms from the client processes, against this process's clock origin.
      const last = (state.lastReconnectedAt ?? performance.timeOrigin + start) - (performance.timeOrigin + start);
      measures.handshakesPerSec = n / (last / 1000);
      measures.handshakesPerCpuSec = n / cpu;
      notes.push(
        `${n} clients connected again ${secs(measures.reconnectedMs)} after the kill (last handshake at ${secs(last)}: ` +
          `${Math.round(measures.handshakesPerSec)} handshakes/s, ${Math.round(measures.handshakesPerCpuSec)} per relay CPU-second); ` +
          `every flow delivering again after ${secs(measures.deliveringMs)}`,
      );
      const u = measures.cpu;
      if (u) {
        const cores = (x: number) => `${x.toFixed(2)} CPU-s (${(x / u.wallSecs).toFixed(2)} cores)`;
        notes.push(
          `CPU from the kill until every client was back (${u.wallSecs.toFixed(1)} s): surviving relays ${cores(u.relays)}, ` +
            `client processes ${cores(u.clients)}, balancer processes ${cores(u.balancers)}, harness process ${cores(u.harness)}`,
        );
      }
      await sleep(o.afterMs);
    },
  },
  partition: {
    title: 'one node cut off from its peers (it still reaches Postgres and its clients)',
    hitsNode: true,
    netns: true,
    run: async (c, victim, { o, notes, measures }) => {
      c.lab!.partition(victim);
      await sleep(o.faultMs);
      c.lab!.heal(victim);
      measures.meshedMs = await c.waitMeshed(60_000);
      notes.push(
        `cut off for ${secs(o.faultMs)} (blackhole routes to the peers in its namespace); live everywhere again ${secs(measures.meshedMs)} after healing`,
      );
      await sleep(o.afterMs);
    },
  },
  'slow-link': {
    title: "one node's links degraded",
    hitsNode: true,
    netns: true,
    run: async (c, victim, { o, notes }) => {
      const what = c.lab!.slow(victim);
      await sleep(o.faultMs);
      c.lab!.unslow(victim);
      notes.push(`${what}, for ${secs(o.faultMs)}`);
      await sleep(o.afterMs);
    },
  },
};

export const scenarioNames = Object.keys(scenarios);

export function scenarioTitle(name: string): string {
  return scenarios[name]?.title ?? name;
}

/** Runs scenario `name` on a fresh cluster and tears it down. */
export async function runScenario(name: string, options: ScenarioOptions = {}): Promise<ScenarioReport> {
  const scenario = scenarios[name];
  if (!scenario) throw new Error(`no chaos scenario ${name} (scenarios: ${scenarioNames.join(', ')})`);
  const o = {
    warmupMs: options.warmupMs ?? 3_000,
    afterMs: options.afterMs ?? 10_000,
    pgDownMs: options.pgDownMs ?? 30_000,
    frozenMs: options.frozenMs ?? 20_000,
    faultMs: options.faultMs ?? 20_000,
  };
  if (options.relay === 'derper' && !scenario.derper)
    throw new ScenarioSkipped(`${name} skipped: it needs derpmesh nodes (Postgres or their API)`);
  if (scenario.netns && options.tls) throw new ScenarioSkipped(`${name} skipped: the namespace scenarios run without TLS`);
  if (scenario.netns) {
    const why = NetnsLab.unavailable();
    if (why) throw new ScenarioSkipped(`${name} skipped: ${why}`);
  }
  const cluster = await ChaosCluster.start({
    ...options,
    network: scenario.netns ? 'netns' : options.network,
    clientsOn: scenario.clientsOnVictim ? (options.nodes ?? 3) - 1 : options.clientsOn,
  });
  try {
    cluster.startTraffic();
    await sleep(o.warmupMs);
    // The last node is the one that fails; the others keep the cluster.
    const victim = cluster.nodes.length - 1;
    const fault = cluster.beginFault(scenario.hitsNode ? victim : undefined);
    cluster.observe();
    const ctx: Context = { o, notes: [], measures: {} };
    await scenario.run(cluster, victim, ctx);
    await cluster.stopTraffic();
    cluster.stopObserving();
    const result = await cluster.result(name, fault);
    result.healthAfter = await cluster.healthSummary();
    return { ...result, title: scenario.title, tls: cluster.options.tls, notes: ctx.notes, measures: ctx.measures };
  } finally {
    await cluster.close();
  }
}
