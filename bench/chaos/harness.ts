// The chaos harness (issue 12): a cluster of real derpmesh node processes on one Postgres, behind an
// access URL (the TCP balancer of `derpmesh cluster`), K clients that connect through it and send
// sequence-numbered paced packets along random pairs, faults on a schedule, and per-flow accounting
// of what was sent, delivered, lost, duplicated and reordered, and of how fast each client of a
// failed node delivered again. Used by bench/chaos.ts (the full scenarios) and test/chaos.test.ts
// (short ones with assertions).
//
// The clients and their flows are client-group.ts: one group in this process, or, with
// `clientProcesses`, one group per worker process (a reconnect storm of 10 000 clients needs more
// handshakes per second than one Node process generates). `relay: 'derper'` runs the same clients
// against meshed derpers instead (Tailscale's relay, side by side; no Postgres, node kills only).
// `tls: true` runs all of it over TLS: one private CA per cluster, every relay serving HTTPS with a
// leaf it signs (derpmesh nodes and their mesh links trust the CA; derpers read it from
// SSL_CERT_FILE for theirs), and every client verifying against it through the (L4) balancer.
import { spawn, type ChildProcess } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync, rmSync } from 'node:fs';

import { DerpClient } from '../../src/client/index.js';
import { startBalancer, type Backend, type Balancer } from '../../src/cluster/balancer.js';
import { freePort } from '../../src/net.js';
import { startNodeProcess, waitFor, livePeers, type NodeProcess } from '../../test/helpers/cluster.js';
import { makePrivateCa, type PrivateCa } from '../../test/helpers/certs.js';
import { startDerper } from '../../test/helpers/derper.js';
import { startPostgres, type TestPostgres } from '../../test/helpers/postgres.js';
import {
  addSums,
  ClientGroup,
  HEADER,
  healSummary,
  RemoteGroup,
  type ChaosClient,
  type Flow,
  type GroupOptions,
  type GroupPartial,
  type GroupState,
} from './client-group.js';
import { NetnsLab } from './netns.js';

export { Flow, type ChaosClient } from './client-group.js';

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
  /**
   * Client processes (default 0: the clients run in this process). Each runs its share of the
   * clients with a cycle of flows of its own.
   */
  clientProcesses?: number;
  /** `derpmesh` (default), or `derper`: Tailscale's relay, meshed with `-mesh-with`, for comparison. */
  relay?: 'derpmesh' | 'derper';
  /**
   * Everything over TLS (default false): a private CA made for the cluster, every relay serving
   * HTTPS with a certificate for 127.0.0.1 it signs, the access URL https, every client verifying
   * the relay against the CA.
   */
  tls?: boolean;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
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
  #nodeKeys = new Map<string, number>();
  #log: (line: string) => void;
  #heartbeatMs: number;
  #observations: { at: number; text: string }[] = [];
  #observeTimer: NodeJS.Timeout | undefined;
  /** With `network: 'netns'`: the namespaces, and the forwarder that lets them reach Postgres. */
  lab: NetnsLab | undefined;
  #pgForward: Balancer | undefined;
  #pgUrl: string;
  /** The clients: one group here, or groups in worker processes. */
  #local: ClientGroup | undefined;
  #remote: RemoteGroup[] = [];
  /** With relay 'derper': every derper's port (they mesh with all of them) and the mesh key. */
  #derperPorts: number[] = [];
  #derperMeshKey = randomBytes(32).toString('hex');
  /** With `tls`: the cluster's CA, its leaf for 127.0.0.1, and the CA certificate's bytes. */
  #ca: PrivateCa | undefined;
  #caPem: Buffer | undefined;

  private constructor(
    /** Absent with relay 'derper'. */
    readonly pg: TestPostgres | undefined,
    readonly balancer: Balancer,
    readonly options: Required<Omit<ChaosOptions, 'log'>>,
    log: (line: string) => void,
  ) {
    this.#log = log;
    this.#heartbeatMs = options.heartbeatMs;
    this.#pgUrl = pg?.url ?? '';
  }

  get accessUrl(): string {
    return `${this.#scheme}://127.0.0.1:${this.balancer.port}`;
  }

  get #scheme(): 'http' | 'https' {
    return this.options.tls ? 'https' : 'http';
  }

  /** TLS options for a DerpClient of this cluster (its CA), or none for plain HTTP. */
  get clientTls(): { ca: Buffer } | undefined {
    return this.#caPem ? { ca: this.#caPem } : undefined;
  }

  /** The in-process clients (none when they run in worker processes). */
  get clients(): ChaosClient[] {
    return this.#local?.clients ?? [];
  }

  /** The in-process flows (none when the clients run in worker processes). */
  get flows(): Flow[] {
    return this.#local?.flows ?? [];
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
      clientProcesses: options.clientProcesses ?? 0,
      relay: options.relay ?? 'derpmesh',
      tls: options.tls ?? false,
    };
    const log = options.log ?? (() => {});
    if (o.network === 'netns') {
      const why = NetnsLab.unavailable();
      if (why) throw new Error(why);
      if (o.relay === 'derper') throw new Error('the netns network runs derpmesh nodes only');
    }
    const pg = o.relay === 'derper' ? undefined : await startPostgres();
    const balancer = await startBalancer('127.0.0.1', 0, []);
    const cluster = new ChaosCluster(pg, balancer, o, log);
    try {
      if (o.tls) {
        if (o.network === 'netns') throw new Error('the netns network runs without TLS (its certificates are for 127.0.0.1)');
        cluster.#ca = makePrivateCa();
        cluster.#caPem = readFileSync(cluster.#ca.caFile);
      }
      // A balanced connection takes two descriptors at the balancer and one at the client: past a
      // few thousand clients the balancer runs as several processes.
      const workers = o.clients > ACCESS_CLIENTS_PER_PROCESS ? Math.ceil(o.clients / ACCESS_CLIENTS_PER_PROCESS) : 0;
      for (let i = 0; i < workers; i++) cluster.#access.push(await AccessWorker.start());
      if (workers) log(`access URL served by ${workers} balancer processes (${ACCESS_CLIENTS_PER_PROCESS} clients each at most)`);
      if (o.network === 'netns') {
        cluster.lab = NetnsLab.create(o.nodes);
        // Postgres listens on loopback only; the namespaces reach it through a forwarder on the bridge.
        cluster.#pgForward = await startBalancer(cluster.lab.bridgeIp, 0, [pg!.port]);
        cluster.#pgUrl = pg!.url.replace(`127.0.0.1:${pg!.port}`, `${cluster.lab.bridgeIp}:${cluster.#pgForward.port}`);
      }
      if (o.relay === 'derper') for (let i = 0; i < o.nodes; i++) cluster.#derperPorts.push(await freePort());
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
    if (this.options.relay === 'derper') return this.#startDerper(i);
    const node = await startNodeProcess({
      name: `node-${i}`,
      postgresUrl: this.#pgUrl,
      heartbeatMs: this.#heartbeatMs,
      port,
      host: this.lab?.nodeIp(i),
      netns: this.lab?.namespace(i),
      tls: this.#ca && { certFile: this.#ca.certFile, keyFile: this.#ca.keyFile, caFile: this.#ca.caFile },
      env: { CODER_ACCESS_URL: this.accessUrl },
    });
    await node.started;
    return node;
  }

  /**
   * derper `i`, meshed with every derper of the cluster (itself included, as derper expects); with
   * `tls`, serving the cluster CA's leaf and trusting the CA for its mesh dials (startDerper).
   */
  async #startDerper(i: number): Promise<NodeProcess> {
    const port = this.#derperPorts[i]!;
    const d = await startDerper({
      port,
      meshKey: this.#derperMeshKey,
      meshWith: this.#derperPorts.map((p) => `127.0.0.1:${p}`),
      tls: this.#ca && { certFile: this.#ca.certFile, keyFile: this.#ca.keyFile, caFile: this.#ca.caFile },
    });
    const child = d.child;
    const noApi = () => Promise.reject(new Error('derper has no derpmesh API'));
    const gone = () => child.exitCode !== null || child.signalCode !== null;
    return {
      name: `derper-${i}`,
      port,
      url: d.url,
      child,
      output: d.output,
      started: Promise.resolve(),
      replicas: noApi,
      health: noApi,
      metrics: noApi,
      stop: async () => {
        if (gone()) return child.exitCode;
        const exited = once(child, 'exit');
        child.kill('SIGTERM');
        const [code] = (await exited) as [number | null];
        return code;
      },
      kill9: async () => {
        if (gone()) return;
        const exited = once(child, 'exit');
        child.kill('SIGKILL');
        await exited;
      },
    };
  }

  #alive(): NodeProcess[] {
    return this.nodes.flatMap((n) => (n && n.child.exitCode === null && n.child.signalCode === null ? [n] : []));
  }

  /** Every live node lists every other live node as live (derpers: a packet crosses every link). */
  async #waitMeshed(timeoutMs = 30_000): Promise<void> {
    const alive = this.#alive();
    if (this.options.relay === 'derper') return this.#waitDerpersMeshed(alive, timeoutMs);
    const names = alive.map((n) => n.name).sort();
    await waitFor('every node to list every other as live', timeoutMs, async () => {
      for (const n of alive) {
        const peers = await livePeers(n);
        if (peers.join() !== names.filter((x) => x !== n.name).join()) return false;
      }
      return true;
    });
  }

  /** derper has no API saying it is meshed: a client on each sends to a client on every other. */
  async #waitDerpersMeshed(alive: NodeProcess[], timeoutMs: number): Promise<void> {
    const clients = await Promise.all(alive.map((n) => DerpClient.connect({ url: n.url, tls: this.clientTls })));
    try {
      const got = new Set<string>();
      for (const [j, c] of clients.entries()) c.on('packet', (_s, data) => got.add(`${data.toString()}>${j}`));
      await waitFor('every derper to forward to every other', timeoutMs, () => {
        for (const [i, a] of clients.entries())
          for (const [j, b] of clients.entries()) if (i !== j && !got.has(`${i}>${j}`)) a.send(b.publicKey, Buffer.from(String(i)));
        return clients.every((_, i) => clients.every((_, j) => i === j || got.has(`${i}>${j}`)));
      });
    } finally {
      await Promise.all(clients.map((c) => c.close().catch(() => {})));
    }
  }

  /** Each node's relay key, by connecting to it directly once. */
  async #learnKeys(): Promise<void> {
    for (const [i, node] of this.nodes.entries()) {
      if (!node) continue;
      const probe = await DerpClient.connect({ url: node.url, tls: this.clientTls });
      this.#nodeKeys.set(probe.serverPublicKey.toString('hex'), i);
      await probe.close();
    }
    await Promise.all(this.#remote.map((g) => g.call('keys', [...this.#nodeKeys])));
    this.#local?.setNodeKeys([...this.#nodeKeys]);
  }

  async #connectClients(): Promise<void> {
    const n = this.options.clients;
    const accessUrls = this.#access.length ? this.#access.map((w) => `${this.#scheme}://127.0.0.1:${w.port}`) : [this.accessUrl];
    const base = {
      rate: this.options.rate,
      packetBytes: this.options.packetBytes,
      accessUrls,
      nodeKeys: [...this.#nodeKeys],
      caFile: this.#ca?.caFile,
    };
    const groups = this.options.clientProcesses;
    if (groups > 0) {
      // Each worker's share; a cycle needs at least two clients.
      const each = Math.floor(n / groups);
      if (each < 2) throw new Error(`${n} clients cannot be split over ${groups} client processes (at least 2 each)`);
      let indexBase = 0;
      for (let g = 0; g < groups; g++) {
        const count = g === groups - 1 ? n - indexBase : each;
        const options: GroupOptions = { ...base, count, indexBase };
        this.#remote.push(RemoteGroup.start(options));
        indexBase += count;
      }
      await Promise.all(this.#remote.map((g) => g.call('connect')));
    } else {
      this.#local = new ClientGroup({ ...base, count: n, indexBase: 0 });
      await this.#local.connect();
    }
    const through = this.#access.length ? `${this.#access.length} balancer processes` : this.accessUrl;
    const procs = groups > 0 ? ` from ${groups} client processes` : '';
    this.#log(`${n} clients connected${procs} through ${through}: ${(await this.placementNow()).join(' / ')} per node`);
  }

  /**
   * The processes besides the relays, for CPU accounting: the client worker processes (this one when
   * the clients run here), the balancer processes, and this process (its own balancer instance, the
   * harness's polling, and the clients when they run here).
   */
  processes(): { clients: number[]; balancers: number[]; harness: number } {
    return {
      clients: this.#remote.flatMap((g) => (g.child.pid === undefined ? [] : [g.child.pid])),
      balancers: this.#access.flatMap((w) => (w.child.pid === undefined ? [] : [w.child.pid])),
      harness: process.pid,
    };
  }

  /** Clients per node (in-process clients only; see placementNow). */
  placement(): number[] {
    return this.#local?.placement() ?? this.nodes.map(() => 0);
  }

  /** Clients per node, wherever the clients run. */
  async placementNow(): Promise<number[]> {
    return (await this.groupState()).placement;
  }

  /** The node client `index` is on (in-process clients only). */
  nodeOf(index: number): number | undefined {
    return this.#local?.nodeOf(index);
  }

  /** Where every client is and how many flows delivered since the fault mark, over all groups. */
  async groupState(): Promise<GroupState> {
    const states = this.#local ? [this.#local.state()] : await Promise.all(this.#remote.map((g) => g.call<GroupState>('state')));
    const placement = this.nodes.map(() => 0);
    let last: number | undefined;
    for (const s of states) {
      s.placement.forEach((c, i) => (placement[i] = (placement[i] ?? 0) + c));
      if (s.lastReconnectedAt !== undefined && (last === undefined || s.lastReconnectedAt > last)) last = s.lastReconnectedAt;
    }
    const sum = (k: 'clients' | 'up' | 'reconnected' | 'deliveringAfterMark' | 'flows') => states.reduce((t, s) => t + s[k], 0);
    return {
      clients: sum('clients'),
      up: sum('up'),
      reconnected: sum('reconnected'),
      deliveringAfterMark: sum('deliveringAfterMark'),
      flows: sum('flows'),
      lastReconnectedAt: last,
      placement,
    };
  }

  /** Starts the paced senders: every flow sends `rate` packets per second, spread over time. */
  startTraffic(): void {
    this.#local?.startTraffic();
    for (const g of this.#remote) void g.call('traffic').catch(() => {});
  }

  /** Stops sending and waits `drainMs` for packets in flight. */
  async stopTraffic(drainMs = 2_000): Promise<void> {
    this.#local?.stopTraffic();
    await Promise.all(this.#remote.map((g) => g.call('stop')));
    await sleep(drainMs);
  }

  /**
   * Marks the start of a fault: heal times are measured from here. The placement is the in-process
   * clients' (each client process records its own).
   */
  beginFault(node?: number): FaultWindow {
    const at = performance.now();
    const placement = this.#local?.beginFault(at) ?? [];
    for (const g of this.#remote) void g.call('fault', performance.timeOrigin + at).catch(() => {});
    this.#observations = [];
    return { at, node, placement };
  }

  /** Samples the surviving nodes' view of the replicas every `everyMs` until `stopObserving`. */
  observe(everyMs = 500): void {
    if (this.options.relay === 'derper') return;
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
    const alive = this.#alive();
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

  async result(scenario: string, fault: FaultWindow): Promise<ScenarioResult> {
    const failed = fault.node;
    const partials: GroupPartial[] = this.#local
      ? [this.#local.partial(failed)]
      : await Promise.all(this.#remote.map((g) => g.call<GroupPartial>('partial', failed)));
    const [first, ...rest] = partials;
    const total = rest.reduce<GroupPartial>(
      (t, p) => ({
        unaffected: addSums(t.unaffected, p.unaffected),
        affected: addSums(t.affected, p.affected),
        heals: t.heals.concat(p.heals),
        neverHealed: t.neverHealed + p.neverHealed,
        placementAtFault: t.placementAtFault.map((c, i) => c + (p.placementAtFault[i] ?? 0)),
      }),
      first!,
    );
    const rel = (at: number) => `${((at - fault.at) / 1000).toFixed(1)} s`;
    const during = this.#observations.map((o) => `+${rel(o.at)} ${o.text}`);
    const { notSent: _, ...unaffected } = total.unaffected;
    return {
      scenario,
      flows: total.unaffected.flows + total.affected.flows,
      unaffected,
      affected: total.affected,
      heal: healSummary(total.heals, total.neverHealed),
      placementBefore: this.nodes.map((_, i) => total.placementAtFault[i] ?? 0),
      placementAfter: await this.placementNow(),
      replicasDuring: during.slice(0, -1).join('; ') || '(no change seen)',
      replicasAfter: during.at(-1) ?? '(no sample)',
      healthAfter: '',
    };
  }

  /** The health severity every live node reports, e.g. `node-0 ok, node-1 ok`. */
  async healthSummary(): Promise<string> {
    if (this.options.relay === 'derper') return '(derper: no health API)';
    const parts: string[] = [];
    for (const node of this.#alive()) {
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
    this.stopObserving();
    await this.#local?.close();
    await Promise.all(this.#remote.map((g) => g.close()));
    for (const [i, node] of this.nodes.entries()) {
      if (!node) continue;
      if (this.#frozen.has(node)) this.thaw(i);
      await node.kill9().catch(() => {});
    }
    await this.balancer.close().catch(() => {});
    for (const w of this.#access) w.close();
    await this.#pgForward?.close().catch(() => {});
    this.lab?.destroy();
    await this.pg?.stop().catch(() => {});
    if (this.#ca) rmSync(this.#ca.dir, { recursive: true, force: true });
  }
}
