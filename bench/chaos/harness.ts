// The chaos harness (issue 12): a cluster of real derpmesh node processes on one Postgres, behind an
// access URL (the TCP balancer of `derpmesh cluster`), K clients that connect through it and send
// sequence-numbered paced packets along random pairs, faults on a schedule, and per-flow accounting
// of what was sent, delivered, lost, duplicated and reordered, and of how fast each client of a
// failed node delivered again. Used by bench/chaos.ts (the full scenarios) and test/chaos.test.ts
// (short ones with assertions).
//
// A flow is one client's packets to its peer: the clients form one random cycle, so every client
// sends one flow and receives one. Each packet carries its flow, its sequence number and when it was
// sent. The node a client is on is the relay key its handshake saw (each node has its own key).
import { spawn, type ChildProcess } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

import { DerpClient } from '../../src/client/index.js';
import { startBalancer, type Backend, type Balancer } from '../../src/cluster/balancer.js';
import { startNodeProcess, waitFor, livePeers, type NodeProcess } from '../../test/helpers/cluster.js';
import { startPostgres, type TestPostgres } from '../../test/helpers/postgres.js';
import { quantile } from '../report.js';
import { NetnsLab } from './netns.js';

export interface ChaosOptions {
  /** Nodes in the cluster (default 3). */
  nodes?: number;
  /** Clients connected through the access URL (default 300). */
  clients?: number;
  /** Packets per second each client sends to its peer (default 10). */
  rate?: number;
  /** Bytes per packet (default 120; at least 16). */
  packetBytes?: number;
  /** The nodes' heartbeat (default 1000 ms). */
  heartbeatMs?: number;
  /**
   * `loopback` (default): every node on 127.0.0.1. `netns`: every node in a network namespace of its
   * own behind a bridge (NetnsLab), so one node's links can be cut or slowed; needs root.
   */
  network?: 'loopback' | 'netns';
  /** Connect every client to this node (through the access URL) instead of spreading them. */
  clientsOn?: number;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

/** One client's packets to its peer. */
export class Flow {
  sent = 0;
  /** Sends skipped because the sender was between connections (its client would drop them). */
  notSent = 0;
  delivered = 0;
  duplicated = 0;
  reordered = 0;
  #seen = new Uint8Array(1024);
  #maxSeq = -1;
  /** Receive times (performance.now()) of deliveries after `markFrom`, the first one only. */
  #firstAfter: number | undefined;
  #mark = Infinity;

  constructor(
    readonly id: number,
    readonly from: number,
    readonly to: number,
  ) {}

  get lost(): number {
    return this.sent - this.delivered;
  }

  received(seq: number, at: number): void {
    if (seq >= this.#seen.length * 8) {
      const grown = new Uint8Array(Math.max(this.#seen.length * 2, (seq >> 3) + 1));
      grown.set(this.#seen);
      this.#seen = grown;
    }
    const bit = 1 << (seq & 7);
    if (this.#seen[seq >> 3]! & bit) {
      this.duplicated++;
      return;
    }
    this.#seen[seq >> 3]! |= bit;
    this.delivered++;
    if (seq < this.#maxSeq) this.reordered++;
    else this.#maxSeq = seq;
    if (at > this.#mark && this.#firstAfter === undefined) this.#firstAfter = at;
  }

  /** From now on, remember the first delivery after `at`. */
  markFrom(at: number): void {
    this.#mark = at;
    this.#firstAfter = undefined;
  }

  /** The first delivery after the mark, if any. */
  get firstAfterMark(): number | undefined {
    return this.#firstAfter;
  }
}

interface ChaosClient {
  index: number;
  client: DerpClient;
  /** Between connections (after `disconnected`, before `reconnected`). */
  down: boolean;
  disconnects: number;
  /** performance.now() of the last reconnect. */
  reconnectedAt?: number;
}

export interface FaultWindow {
  /** performance.now() when the fault began. */
  at: number;
  /** The node that failed, if one did. */
  node?: number;
  /** Node of each client when the fault began. */
  placement: number[];
}

export interface ScenarioResult {
  scenario: string;
  flows: number;
  unaffected: { flows: number; sent: number; lost: number; duplicated: number; reordered: number };
  affected: { flows: number; sent: number; lost: number; notSent: number; duplicated: number; reordered: number };
  /** Per client of the failed node: ms from the fault until both its flows delivered again. */
  heal: { clients: number; p50: number; p99: number; max: number; neverHealed: number };
  /** Clients per node when the fault began, and at the end. */
  placementBefore: number[];
  placementAfter: number[];
  /** What the surviving nodes' /api/v2/replicas said during and after the fault. */
  replicasDuring: string;
  replicasAfter: string;
  healthAfter: string;
}

const HEADER = 16;

/** Clients one balancer process serves (two descriptors each, under a 20 000 open-file limit). */
const ACCESS_CLIENTS_PER_PROCESS = 4_000;
const accessWorkerScript = fileURLToPath(new URL('./access-worker.js', import.meta.url));

/** A balancer instance in a child process (access-worker.ts). */
class AccessWorker {
  #acks: ((line: string) => void)[] = [];

  private constructor(
    readonly child: ChildProcess,
    readonly port: number,
    lines: ReturnType<typeof createInterface>,
  ) {
    lines.on('line', (line) => this.#acks.shift()?.(line));
  }

  static async start(): Promise<AccessWorker> {
    const child = spawn(process.execPath, [accessWorkerScript], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines = createInterface({ input: child.stdout! });
    const port = await new Promise<number>((resolve, reject) => {
      lines.once('line', (line) =>
        /^port \d+$/.test(line) ? resolve(Number(line.slice(5))) : reject(new Error(`access worker: ${line}`)),
      );
      child.once('exit', (code) => reject(new Error(`access worker exited with ${code} before listening`)));
    });
    return new AccessWorker(child, port, lines);
  }

  /** Resolves once the worker has the new list. */
  async setBackends(backends: Backend[]): Promise<void> {
    const list = backends.map((b) => (typeof b === 'number' ? { host: '127.0.0.1', port: b } : b));
    const ack = new Promise<string>((resolve) => this.#acks.push(resolve));
    this.child.stdin!.write(`${JSON.stringify(list)}\n`);
    const line = await ack;
    if (line !== 'ok') throw new Error(`access worker: ${line}`);
  }

  close(): void {
    this.child.stdin!.end();
    setTimeout(() => this.child.kill('SIGKILL'), 2_000).unref();
  }
}

export class ChaosCluster {
  readonly nodes: (NodeProcess | undefined)[] = [];
  readonly clients: ChaosClient[] = [];
  readonly flows: Flow[] = [];
  #nodeKeys = new Map<string, number>();
  #sendTimer: NodeJS.Timeout | undefined;
  #sendStart = 0;
  #log: (line: string) => void;
  #heartbeatMs: number;
  #observations: { at: number; text: string }[] = [];
  #observeTimer: NodeJS.Timeout | undefined;
  /** With `network: 'netns'`: the namespaces, and the forwarder that lets them reach Postgres. */
  lab: NetnsLab | undefined;
  #pgForward: Balancer | undefined;
  #pgUrl: string;

  private constructor(
    readonly pg: TestPostgres,
    readonly balancer: Balancer,
    readonly options: Required<Omit<ChaosOptions, 'log'>>,
    log: (line: string) => void,
  ) {
    this.#log = log;
    this.#heartbeatMs = options.heartbeatMs;
    this.#pgUrl = pg.url;
  }

  get accessUrl(): string {
    return `http://127.0.0.1:${this.balancer.port}`;
  }

  /** The access URL client `index` uses: with access workers, spread over them. */
  accessUrlOf(index: number): string {
    const w = this.#access[index % Math.max(1, this.#access.length)];
    return w ? `http://127.0.0.1:${w.port}` : this.accessUrl;
  }

  /** Balancer instances in processes of their own (more clients than one process has descriptors for). */
  #access: AccessWorker[] = [];

  async #setBackends(backends: Backend[]): Promise<void> {
    this.balancer.setBackends(backends);
    await Promise.all(this.#access.map((w) => w.setBackends(backends)));
  }

  static async start(options: ChaosOptions = {}): Promise<ChaosCluster> {
    const o = {
      nodes: options.nodes ?? 3,
      clients: options.clients ?? 300,
      rate: options.rate ?? 10,
      packetBytes: Math.max(HEADER, options.packetBytes ?? 120),
      heartbeatMs: options.heartbeatMs ?? 1000,
      network: options.network ?? 'loopback',
      clientsOn: options.clientsOn ?? -1,
    };
    const log = options.log ?? (() => {});
    if (o.network === 'netns') {
      const why = NetnsLab.unavailable();
      if (why) throw new Error(why);
    }
    const pg = await startPostgres();
    const balancer = await startBalancer('127.0.0.1', 0, []);
    const cluster = new ChaosCluster(pg, balancer, o, log);
    try {
      // A balanced connection takes two descriptors at the balancer and one at the client: past a
      // few thousand clients the balancer runs as several processes.
      const workers = o.clients > ACCESS_CLIENTS_PER_PROCESS ? Math.ceil(o.clients / ACCESS_CLIENTS_PER_PROCESS) : 0;
      for (let i = 0; i < workers; i++) cluster.#access.push(await AccessWorker.start());
      if (workers) log(`access URL served by ${workers} balancer processes (${ACCESS_CLIENTS_PER_PROCESS} clients each at most)`);
      if (o.network === 'netns') {
        cluster.lab = NetnsLab.create(o.nodes);
        // Postgres listens on loopback only; the namespaces reach it through a forwarder on the bridge.
        cluster.#pgForward = await startBalancer(cluster.lab.bridgeIp, 0, [pg.port]);
        cluster.#pgUrl = pg.url.replace(`127.0.0.1:${pg.port}`, `${cluster.lab.bridgeIp}:${cluster.#pgForward.port}`);
      }
      for (let i = 0; i < o.nodes; i++) cluster.nodes.push(await cluster.#startNode(i));
      const backends = cluster.nodes.map((n, i): Backend => (cluster.lab ? { host: cluster.lab.nodeIp(i), port: n!.port } : n!.port));
      await cluster.#waitMeshed();
      await cluster.#learnKeys();
      await cluster.#setBackends(o.clientsOn >= 0 ? [backends[o.clientsOn]!] : backends);
      await cluster.#connectClients();
      await cluster.#setBackends(backends);
    } catch (err) {
      await cluster.close();
      throw err;
    }
    return cluster;
  }

  async #startNode(i: number, port?: number): Promise<NodeProcess> {
    const node = await startNodeProcess({
      name: `node-${i}`,
      postgresUrl: this.#pgUrl,
      heartbeatMs: this.#heartbeatMs,
      port,
      host: this.lab?.nodeIp(i),
      netns: this.lab?.namespace(i),
      env: { CODER_ACCESS_URL: this.accessUrl },
    });
    await node.started;
    return node;
  }

  /** Every live node lists every other live node as live. */
  async #waitMeshed(timeoutMs = 30_000): Promise<void> {
    const alive = this.nodes.flatMap((n) => (n && n.child.exitCode === null && n.child.signalCode === null ? [n] : []));
    const names = alive.map((n) => n.name).sort();
    await waitFor('every node to list every other as live', timeoutMs, async () => {
      for (const n of alive) {
        const peers = await livePeers(n);
        if (peers.join() !== names.filter((x) => x !== n.name).join()) return false;
      }
      return true;
    });
  }

  /** Each node's relay key, by connecting to it directly once. */
  async #learnKeys(): Promise<void> {
    for (const [i, node] of this.nodes.entries()) {
      if (!node) continue;
      const probe = await DerpClient.connect({ url: node.url });
      this.#nodeKeys.set(probe.serverPublicKey.toString('hex'), i);
      await probe.close();
    }
  }

  async #connectClients(): Promise<void> {
    const n = this.options.clients;
    // One random cycle: client order[k] sends to order[k+1].
    const order = [...Array(n).keys()];
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    for (let k = 0; k < n; k++) this.flows.push(new Flow(k, order[k]!, order[(k + 1) % n]!));
    const batch = n > 1000 ? 200 : 25;
    for (let start = 0; start < n; start += batch) {
      await Promise.all(
        [...Array(Math.min(batch, n - start)).keys()].map(async (k) => {
          const index = start + k;
          const client = new DerpClient({ url: this.accessUrlOf(index), reconnect: true });
          const entry: ChaosClient = { index, client, down: false, disconnects: 0 };
          client.on('packet', (_source, data) => this.#receive(data));
          client.on('disconnected', () => {
            entry.down = true;
            entry.disconnects++;
          });
          client.on('reconnected', () => {
            entry.down = false;
            entry.reconnectedAt = performance.now();
          });
          await client.connect();
          this.clients[index] = entry;
        }),
      );
    }
    const through = this.#access.length ? `${this.#access.length} balancer processes` : this.accessUrl;
    this.#log(`${n} clients connected through ${through}: ${this.placement().join(' / ')} per node`);
  }

  #receive(data: Buffer): void {
    if (data.length < HEADER) return;
    const flow = this.flows[data.readUInt32BE(0)];
    flow?.received(data.readUInt32BE(4), performance.now());
  }

  /** Clients per node (by the relay key each one's current connection saw). */
  placement(): number[] {
    const counts = this.nodes.map(() => 0);
    for (const c of this.clients) {
      const node = this.nodeOf(c.index);
      if (node !== undefined) counts[node]!++;
    }
    return counts;
  }

  /** The node client `index` is on (undefined while it is between connections). */
  nodeOf(index: number): number | undefined {
    const c = this.clients[index];
    if (!c || c.down) return undefined;
    try {
      return this.#nodeKeys.get(c.client.serverPublicKey.toString('hex'));
    } catch {
      return undefined;
    }
  }

  /** Starts the paced senders: every flow sends `rate` packets per second, spread over time. */
  startTraffic(): void {
    const { rate, packetBytes } = this.options;
    this.#sendStart = performance.now();
    const phase = this.flows.map(() => Math.random());
    const packet = Buffer.alloc(packetBytes);
    this.#sendTimer = setInterval(() => {
      const elapsed = (performance.now() - this.#sendStart) / 1000;
      for (const flow of this.flows) {
        const due = Math.floor(elapsed * rate + phase[flow.id]!);
        const from = this.clients[flow.from]!;
        const to = this.clients[flow.to]!;
        while (flow.sent + flow.notSent < due) {
          if (from.down) {
            flow.notSent++;
            continue;
          }
          const seq = flow.sent;
          packet.writeUInt32BE(flow.id, 0);
          packet.writeUInt32BE(seq, 4);
          packet.writeDoubleBE(performance.now(), 8);
          flow.sent++;
          try {
            from.client.send(to.client.publicKey, packet);
          } catch {
            // Closed: counted as sent and lost.
          }
        }
      }
    }, 10);
  }

  /** Stops sending and waits `drainMs` for packets in flight. */
  async stopTraffic(drainMs = 2_000): Promise<void> {
    clearInterval(this.#sendTimer);
    this.#sendTimer = undefined;
    await sleep(drainMs);
  }

  /** Marks the start of a fault: heal times are measured from here. */
  beginFault(node?: number): FaultWindow {
    const at = performance.now();
    const placement = this.clients.map((c) => this.nodeOf(c.index) ?? -1);
    for (const f of this.flows) f.markFrom(at);
    this.#observations = [];
    return { at, node, placement };
  }

  /** Samples the surviving nodes' view of the replicas every `everyMs` until `stopObserving`. */
  observe(everyMs = 500): void {
    const sample = async () => {
      const node = this.nodes.find((n) => n && n.child.exitCode === null && n.child.signalCode === null && !this.#frozen.has(n));
      if (!node) return;
      try {
        const replicas = await node.replicas();
        const text = replicas
          .filter((r) => !r.self)
          .map((r) => `${r.hostname}=${r.state}`)
          .sort()
          .join(' ');
        const last = this.#observations.at(-1);
        if (last?.text !== `${node.name}: ${text}`) this.#observations.push({ at: performance.now(), text: `${node.name}: ${text}` });
      } catch {
        // The node is busy or going away: the next sample tells.
      }
    };
    this.#observeTimer = setInterval(() => void sample(), everyMs);
  }

  stopObserving(): void {
    clearInterval(this.#observeTimer);
  }

  #frozen = new Set<NodeProcess>();

  // ---- faults --------------------------------------------------------------------------------

  async kill9(i: number): Promise<void> {
    await this.nodes[i]!.kill9();
  }

  /** SIGTERM, waiting for the node's exit (its graceful drain sends clients Restarting). */
  async stop(i: number): Promise<number | null> {
    return this.nodes[i]!.stop();
  }

  freeze(i: number): void {
    this.#frozen.add(this.nodes[i]!);
    this.nodes[i]!.child.kill('SIGSTOP');
  }

  thaw(i: number): void {
    this.nodes[i]!.child.kill('SIGCONT');
    this.#frozen.delete(this.nodes[i]!);
  }

  /** Starts node `i` again (after a kill or stop) and waits until the cluster is meshed. */
  async restart(i: number): Promise<void> {
    const old = this.nodes[i];
    if (old && old.child.exitCode === null && old.child.signalCode === null) await old.kill9();
    this.nodes[i] = await this.#startNode(i, old?.port);
    await this.#waitMeshed();
    await this.#learnKeys();
  }

  /** Waits until every live node lists the others (`ms` it took), e.g. after a node resumed. */
  async waitMeshed(timeoutMs = 30_000): Promise<number> {
    const start = performance.now();
    await this.#waitMeshed(timeoutMs);
    return performance.now() - start;
  }

  /**
   * Waits until discovery works again everywhere (`ms` it took), e.g. after Postgres returned: every
   * live node lists the others as live, and reports its own database and LISTEN connection healthy
   * (pushed changes reach it again, not only the heartbeat's polling).
   */
  async waitDiscovery(timeoutMs = 30_000): Promise<number> {
    const start = performance.now();
    await this.#waitMeshed(timeoutMs);
    const alive = this.nodes.flatMap((n) => (n && n.child.exitCode === null && n.child.signalCode === null ? [n] : []));
    await waitFor('every node to report its database and LISTEN connection healthy', timeoutMs, async () => {
      for (const n of alive) {
        const own = (await n.health()).nodes.find((x) => x.hostname === n.name);
        const sections = own?.sections ?? {};
        if (sections.database?.severity !== 'ok' || sections.pubsub?.severity !== 'ok') return false;
      }
      return true;
    });
    return performance.now() - start;
  }

  // ---- results -------------------------------------------------------------------------------

  result(scenario: string, fault: FaultWindow): ScenarioResult {
    const failed = fault.node;
    const touches = (f: Flow) => failed !== undefined && (fault.placement[f.from] === failed || fault.placement[f.to] === failed);
    const unaffected = this.flows.filter((f) => !touches(f));
    const affected = this.flows.filter(touches);
    const sum = (flows: Flow[], key: 'sent' | 'lost' | 'notSent' | 'duplicated' | 'reordered') => flows.reduce((s, f) => s + f[key], 0);
    // A client of the failed node has healed once its outbound and its inbound flow delivered again.
    const outbound = new Map(this.flows.map((f) => [f.from, f]));
    const inbound = new Map(this.flows.map((f) => [f.to, f]));
    const heals: number[] = [];
    let neverHealed = 0;
    if (failed !== undefined) {
      for (const [index, node] of fault.placement.entries()) {
        if (node !== failed) continue;
        const a = outbound.get(index)?.firstAfterMark;
        const b = inbound.get(index)?.firstAfterMark;
        if (a === undefined || b === undefined) neverHealed++;
        else heals.push(Math.max(a, b) - fault.at);
      }
    }
    heals.sort((x, y) => x - y);
    const q = (p: number) => quantile(heals, p) ?? NaN;
    const rel = (at: number) => `${((at - fault.at) / 1000).toFixed(1)} s`;
    const during = this.#observations.map((o) => `+${rel(o.at)} ${o.text}`);
    return {
      scenario,
      flows: this.flows.length,
      unaffected: {
        flows: unaffected.length,
        sent: sum(unaffected, 'sent'),
        lost: sum(unaffected, 'lost'),
        duplicated: sum(unaffected, 'duplicated'),
        reordered: sum(unaffected, 'reordered'),
      },
      affected: {
        flows: affected.length,
        sent: sum(affected, 'sent'),
        lost: sum(affected, 'lost'),
        notSent: sum(affected, 'notSent'),
        duplicated: sum(affected, 'duplicated'),
        reordered: sum(affected, 'reordered'),
      },
      heal: { clients: heals.length + neverHealed, p50: q(0.5), p99: q(0.99), max: heals.at(-1) ?? NaN, neverHealed },
      placementBefore: this.nodes.map((_, i) => fault.placement.filter((p) => p === i).length),
      placementAfter: this.placement(),
      replicasDuring: during.slice(0, -1).join('; ') || '(no change seen)',
      replicasAfter: during.at(-1) ?? '(no sample)',
      healthAfter: '',
    };
  }

  /** The health severity every live node reports, e.g. `node-0 ok, node-1 ok`. */
  async healthSummary(): Promise<string> {
    const parts: string[] = [];
    for (const node of this.nodes) {
      if (!node || node.child.exitCode !== null || node.child.signalCode !== null) continue;
      try {
        const h = await node.health();
        parts.push(`${node.name} ${h.severity}`);
      } catch (err) {
        parts.push(`${node.name} unreachable (${(err as Error).message})`);
      }
    }
    return parts.join(', ');
  }

  async close(): Promise<void> {
    clearInterval(this.#sendTimer);
    this.stopObserving();
    await Promise.all(this.clients.map((c) => c?.client.close().catch(() => {})));
    for (const [i, node] of this.nodes.entries()) {
      if (!node) continue;
      if (this.#frozen.has(node)) this.thaw(i);
      await node.kill9().catch(() => {});
    }
    await this.balancer.close().catch(() => {});
    for (const w of this.#access) w.close();
    await this.#pgForward?.close().catch(() => {});
    this.lab?.destroy();
    await this.pg.stop().catch(() => {});
  }
}
