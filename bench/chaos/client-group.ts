// The chaos harness's clients (issue 12): one group of DERP clients connected through the access
// URL, sending sequence-numbered paced packets along one random cycle (every client sends one flow
// and receives one), and the accounting of those flows. A group runs in the harness's process, or,
// past what one process can generate (a 10 000-client reconnect storm), several groups run in
// client-worker processes, each with a cycle of its own so that its accounting stays local; the
// harness adds their partial results.
//
// Each packet carries its flow, its sequence number and when it was sent. The node a client is on
// is the relay key its handshake saw (each node has its own key).
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContext } from 'node:tls';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { DerpClient } from '../../src/client/index.js';
import { quantile } from '../report.js';

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
  /**
   * The first delivery (its receive time, performance.now()) received after `#mark` of a packet sent
   * after `#sentFrom`: once the fault is marked, after the receiver's and the sender's latest
   * reconnections. A packet the failing node still delivered before its clients left (a graceful
   * stop drains) does not count as delivering again.
   */
  #firstAfter: number | undefined;
  #mark = Infinity;
  #sentFrom = -Infinity;

  constructor(
    readonly id: number,
    readonly from: number,
    readonly to: number,
  ) {}

  get lost(): number {
    return this.sent - this.delivered;
  }

  received(seq: number, at: number, sentAt = at): void {
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
    if (at > this.#mark && sentAt >= this.#sentFrom && this.#firstAfter === undefined) this.#firstAfter = at;
  }

  /** From now on, remember the first delivery after `at`. */
  markFrom(at: number): void {
    this.#mark = at;
    this.#sentFrom = -Infinity;
    this.#firstAfter = undefined;
  }

  /** The receiver reconnected at `at` (after the mark): only deliveries from then on count. */
  receiverReconnected(at: number): void {
    if (this.#mark === Infinity) return;
    this.#mark = Math.max(this.#mark, at);
    this.#firstAfter = undefined;
  }

  /** The sender reconnected at `at` (after the mark): only packets sent from then on count. */
  senderReconnected(at: number): void {
    if (this.#mark === Infinity) return;
    this.#sentFrom = Math.max(this.#sentFrom, at);
    this.#firstAfter = undefined;
  }

  /** The first delivery after the mark, if any. */
  get firstAfterMark(): number | undefined {
    return this.#firstAfter;
  }
}

export interface ChaosClient {
  index: number;
  client: DerpClient;
  /** Between connections (after `disconnected`, before `reconnected`). */
  down: boolean;
  disconnects: number;
  /** performance.now() of the last reconnect. */
  reconnectedAt?: number;
}

export interface GroupOptions {
  /** Clients in this group. */
  count: number;
  /** Packets per second each client sends to its peer. */
  rate: number;
  /** Bytes per packet (at least HEADER). */
  packetBytes: number;
  /** The access URLs; client i uses `accessUrls[(indexBase + i) % length]`. */
  accessUrls: string[];
  indexBase: number;
  /** Each node's relay key (hex) → node index. */
  nodeKeys: [string, number][];
  /** With https access URLs: the CA (PEM file) the relays' certificates are verified against. */
  caFile?: string;
}

/** Sums over some flows. */
export interface FlowSums {
  flows: number;
  sent: number;
  lost: number;
  notSent: number;
  duplicated: number;
  reordered: number;
}

/** A group's share of a scenario's result, added up by the harness. */
export interface GroupPartial {
  unaffected: FlowSums;
  affected: FlowSums;
  /** Per client of the failed node: ms from the fault until both its flows delivered again. */
  heals: number[];
  neverHealed: number;
  /** Clients per node when the fault began. */
  placementAtFault: number[];
}

/** Where a group's clients are, for waiting on a storm's recovery. */
export interface GroupState {
  clients: number;
  /** Connected now. */
  up: number;
  /** Connected now after at least one disconnect. */
  reconnected: number;
  /** Flows that delivered a packet after the fault mark. */
  deliveringAfterMark: number;
  flows: number;
  /** Epoch ms (performance.timeOrigin based) of the last reconnect, if any. */
  lastReconnectedAt?: number;
  /** Clients per node now. */
  placement: number[];
}

export const HEADER = 16;

const emptySums = (): FlowSums => ({ flows: 0, sent: 0, lost: 0, notSent: 0, duplicated: 0, reordered: 0 });

function addFlow(s: FlowSums, f: Flow): void {
  s.flows++;
  s.sent += f.sent;
  s.lost += f.lost;
  s.notSent += f.notSent;
  s.duplicated += f.duplicated;
  s.reordered += f.reordered;
}

export function addSums(a: FlowSums, b: FlowSums): FlowSums {
  return {
    flows: a.flows + b.flows,
    sent: a.sent + b.sent,
    lost: a.lost + b.lost,
    notSent: a.notSent + b.notSent,
    duplicated: a.duplicated + b.duplicated,
    reordered: a.reordered + b.reordered,
  };
}

/** The heal quantiles the harness reports, from the groups' heal times. */
export function healSummary(heals: number[], neverHealed: number) {
  heals.sort((x, y) => x - y);
  const q = (p: number) => quantile(heals, p) ?? NaN;
  return { clients: heals.length + neverHealed, p50: q(0.5), p99: q(0.99), max: heals.at(-1) ?? NaN, neverHealed };
}

export class ClientGroup {
  readonly clients: ChaosClient[] = [];
  readonly flows: Flow[] = [];
  #nodeKeys: Map<string, number>;
  #nodes: number;
  #sendTimer: NodeJS.Timeout | undefined;
  #placementAtFault: number[] = [];
  #faultAt = 0;
  /**
   * With TLS: one secure context (the CA) shared by every client of the group, as one machine's
   * client has one. Given only `ca`, Node builds a context per connection, ~0.85 ms of CPU each
   * (measured: a quarter of a TLS DERP connect's client-side CPU), which a storm pays thousands of
   * times in one process.
   */
  #tls: { secureContext: SecureContext } | undefined;

  constructor(readonly options: GroupOptions) {
    this.#tls = options.caFile === undefined ? undefined : { secureContext: createSecureContext({ ca: readFileSync(options.caFile) }) };
    this.#nodeKeys = new Map(options.nodeKeys);
    this.#nodes = Math.max(0, ...options.nodeKeys.map(([, i]) => i + 1));
  }

  /** After a node restarted with a new key. */
  setNodeKeys(keys: [string, number][]): void {
    this.#nodeKeys = new Map(keys);
    this.#nodes = Math.max(this.#nodes, ...keys.map(([, i]) => i + 1));
  }

  /** Connects every client (in batches) and lays out the cycle of flows. */
  async connect(): Promise<void> {
    const { count: n, accessUrls, indexBase } = this.options;
    // One random cycle: client order[k] sends to order[k+1].
    const order = [...Array(n).keys()];
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    for (let k = 0; k < n; k++) this.flows.push(new Flow(k, order[k]!, order[(k + 1) % n]!));
    // Each client sends one flow and receives one.
    const outbound = new Map(this.flows.map((f) => [f.from, f]));
    const inbound = new Map(this.flows.map((f) => [f.to, f]));
    const batch = n > 1000 ? 200 : 25;
    for (let start = 0; start < n; start += batch) {
      await Promise.all(
        [...Array(Math.min(batch, n - start)).keys()].map(async (k) => {
          const index = start + k;
          const url = accessUrls[(indexBase + index) % accessUrls.length]!;
          const client = new DerpClient({ url, reconnect: true, tls: this.#tls });
          const entry: ChaosClient = { index, client, down: false, disconnects: 0 };
          client.on('packet', (_source, data) => this.#receive(data));
          client.on('disconnected', () => {
            entry.down = true;
            entry.disconnects++;
          });
          client.on('reconnected', () => {
            entry.down = false;
            entry.reconnectedAt = performance.now();
            outbound.get(index)?.senderReconnected(entry.reconnectedAt);
            inbound.get(index)?.receiverReconnected(entry.reconnectedAt);
          });
          await client.connect();
          this.clients[index] = entry;
        }),
      );
    }
  }

  #receive(data: Buffer): void {
    if (data.length < HEADER) return;
    const flow = this.flows[data.readUInt32BE(0)];
    flow?.received(data.readUInt32BE(4), performance.now(), data.readDoubleBE(8));
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

  /** Clients per node (by the relay key each one's current connection saw). */
  placement(): number[] {
    const counts = Array<number>(this.#nodes).fill(0);
    for (const c of this.clients) {
      const node = this.nodeOf(c.index);
      if (node !== undefined) counts[node] = (counts[node] ?? 0) + 1;
    }
    return counts;
  }

  /** Starts the paced senders: every flow sends `rate` packets per second, spread over time. */
  startTraffic(): void {
    const { rate, packetBytes } = this.options;
    const sendStart = performance.now();
    const phase = this.flows.map(() => Math.random());
    const packet = Buffer.alloc(Math.max(HEADER, packetBytes));
    clearInterval(this.#sendTimer);
    this.#sendTimer = setInterval(() => {
      const elapsed = (performance.now() - sendStart) / 1000;
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

  stopTraffic(): void {
    clearInterval(this.#sendTimer);
    this.#sendTimer = undefined;
  }

  /** Marks the start of a fault at `at` (this process's performance.now()); returns each client's node. */
  beginFault(at: number): number[] {
    this.#faultAt = at;
    this.#placementAtFault = this.clients.map((c) => this.nodeOf(c.index) ?? -1);
    for (const f of this.flows) f.markFrom(at);
    return this.#placementAtFault;
  }

  state(): GroupState {
    let up = 0;
    let reconnected = 0;
    let last: number | undefined;
    for (const c of this.clients) {
      if (c.down) continue;
      up++;
      if (c.disconnects > 0) reconnected++;
      if (c.reconnectedAt !== undefined && (last === undefined || c.reconnectedAt > last)) last = c.reconnectedAt;
    }
    return {
      clients: this.clients.length,
      up,
      reconnected,
      deliveringAfterMark: this.flows.filter((f) => f.firstAfterMark !== undefined).length,
      flows: this.flows.length,
      lastReconnectedAt: last === undefined ? undefined : performance.timeOrigin + last,
      placement: this.placement(),
    };
  }

  /** This group's share of the result for a fault on node `failed` (none: every flow is unaffected). */
  partial(failed: number | undefined): GroupPartial {
    const at = this.#placementAtFault;
    const touches = (f: Flow) => failed !== undefined && (at[f.from] === failed || at[f.to] === failed);
    const unaffected = emptySums();
    const affected = emptySums();
    for (const f of this.flows) addFlow(touches(f) ? affected : unaffected, f);
    // A client of the failed node has healed once its outbound and its inbound flow delivered again.
    const outbound = new Map(this.flows.map((f) => [f.from, f]));
    const inbound = new Map(this.flows.map((f) => [f.to, f]));
    const heals: number[] = [];
    let neverHealed = 0;
    if (failed !== undefined) {
      for (const [index, node] of at.entries()) {
        if (node !== failed) continue;
        const a = outbound.get(index)?.firstAfterMark;
        const b = inbound.get(index)?.firstAfterMark;
        if (a === undefined || b === undefined) neverHealed++;
        else heals.push(Math.max(a, b) - this.#faultAt);
      }
    }
    const placementAtFault = Array<number>(this.#nodes).fill(0);
    for (const node of at) if (node >= 0) placementAtFault[node] = (placementAtFault[node] ?? 0) + 1;
    return { unaffected, affected, heals, neverHealed, placementAtFault };
  }

  async close(): Promise<void> {
    this.stopTraffic();
    await Promise.all(this.clients.map((c) => c?.client.close().catch(() => {})));
  }
}

const workerScript = fileURLToPath(new URL('./client-worker.js', import.meta.url));

/** A ClientGroup in a client-worker process, driven over its stdin/stdout (one JSON line each way). */
export class RemoteGroup {
  #next = 0;
  #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #exited: Error | undefined;

  private constructor(readonly child: ChildProcess) {
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      let reply: { id: number; value?: unknown; error?: string };
      try {
        reply = JSON.parse(line) as typeof reply;
      } catch {
        return;
      }
      const p = this.#pending.get(reply.id);
      if (!p) return;
      this.#pending.delete(reply.id);
      if (reply.error !== undefined) p.reject(new Error(`client worker: ${reply.error}`));
      else p.resolve(reply.value);
    });
    child.once('exit', (code, signal) => {
      this.#exited = new Error(`client worker exited (${signal ?? code})`);
      for (const p of this.#pending.values()) p.reject(this.#exited);
      this.#pending.clear();
    });
  }

  /** Starts the process; its clients connect with `connect()`. */
  static start(options: GroupOptions): RemoteGroup {
    const child = spawn(process.execPath, [workerScript, JSON.stringify(options)], { stdio: ['pipe', 'pipe', 'inherit'] });
    return new RemoteGroup(child);
  }

  call<T>(cmd: string, arg?: unknown): Promise<T> {
    if (this.#exited) return Promise.reject(this.#exited);
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.stdin!.write(JSON.stringify({ id, cmd, arg }) + '\n');
    });
  }

  async close(): Promise<void> {
    await this.call('close').catch(() => {});
    this.child.stdin!.end();
    setTimeout(() => this.child.kill('SIGKILL'), 2_000).unref();
  }
}
