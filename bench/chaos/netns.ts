// Network namespaces for the chaos harness: every node in a namespace of its own, joined by a bridge
// in the harness's namespace, so that one node's links can be cut or slowed while the others' stay
// as they are. Needs root and iproute2; `NetnsLab.unavailable()` says why not.
//
//   bridge <tag>b 10.213.X.1/24 (the harness, Postgres through a forwarder, the access URL)
//     ├── veth <tag>v0 ── eth0 10.213.X.2 in namespace <tag>-n0 (node 0)
//     ├── veth <tag>v1 ── eth0 10.213.X.3 in namespace <tag>-n1 (node 1)
//     └── …
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function tc(namespace: string | undefined, ...args: string[]): void {
  const argv = namespace ? ['netns', 'exec', namespace, 'tc', ...args] : args;
  execFileSync(namespace ? 'ip' : 'tc', argv, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function stderrOf(err: unknown): string {
  const e = err as { stderr?: Buffer; message?: string };
  return (e.stderr?.toString().trim() || e.message || String(err)).split('\n')[0]!;
}

export class NetnsLab {
  readonly tag = `dmc${randomBytes(2).toString('hex')}`;
  readonly subnet = 1 + Math.floor(Math.random() * 250);
  #created: string[] = [];
  #slowed = new Map<number, string>();
  #cut = new Map<number, string[]>();
  readonly #onExit = () => this.destroy();

  private constructor(readonly nodes: number) {}

  /** Why namespaces cannot be used here, or undefined when they can. */
  static unavailable(): string | undefined {
    if (process.platform !== 'linux') return `network namespaces are Linux only (this is ${process.platform})`;
    const probe = `dmcprobe${process.pid}`;
    try {
      ip('netns', 'add', probe);
      ip('netns', 'del', probe);
      return undefined;
    } catch (err) {
      return `cannot make a network namespace (ip netns add: ${stderrOf(err)}); run as root with iproute2`;
    }
  }

  static create(nodes: number): NetnsLab {
    const lab = new NetnsLab(nodes);
    process.once('exit', lab.#onExit);
    try {
      ip('link', 'add', lab.bridge, 'type', 'bridge');
      lab.#created.push(`link:${lab.bridge}`);
      ip('addr', 'add', `${lab.bridgeIp}/24`, 'dev', lab.bridge);
      ip('link', 'set', lab.bridge, 'up');
      for (let i = 0; i < nodes; i++) {
        ip('netns', 'add', lab.namespace(i));
        lab.#created.push(`netns:${lab.namespace(i)}`);
        ip('link', 'add', lab.veth(i), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', lab.namespace(i));
        ip('link', 'set', lab.veth(i), 'master', lab.bridge, 'up');
        ip('-n', lab.namespace(i), 'addr', 'add', `${lab.nodeIp(i)}/24`, 'dev', 'eth0');
        ip('-n', lab.namespace(i), 'link', 'set', 'eth0', 'up');
        ip('-n', lab.namespace(i), 'link', 'set', 'lo', 'up');
      }
    } catch (err) {
      lab.destroy();
      throw new Error(`could not build the network namespaces: ${stderrOf(err)}`);
    }
    return lab;
  }

  get bridge(): string {
    return `${this.tag}b`;
  }

  /** The harness's address on the bridge (Postgres and the access URL are reached here). */
  get bridgeIp(): string {
    return `10.213.${this.subnet}.1`;
  }

  namespace(i: number): string {
    return `${this.tag}-n${i}`;
  }

  veth(i: number): string {
    return `${this.tag}v${i}`;
  }

  nodeIp(i: number): string {
    return `10.213.${this.subnet}.${i + 2}`;
  }

  /** Node `i` can no longer reach the other nodes, nor they it; the bridge (Postgres, clients) stays. */
  partition(i: number): void {
    const peers = [...Array(this.nodes).keys()].filter((j) => j !== i).map((j) => `${this.nodeIp(j)}/32`);
    for (const p of peers) ip('-n', this.namespace(i), 'route', 'add', 'blackhole', p);
    this.#cut.set(i, peers);
  }

  heal(i: number): void {
    for (const p of this.#cut.get(i) ?? []) ip('-n', this.namespace(i), 'route', 'del', 'blackhole', p);
    this.#cut.delete(i);
  }

  /**
   * Degrades node `i`'s link both ways: 50 ms delay and 1 % loss with netem where the kernel has it;
   * otherwise (netem is a module not every kernel carries) a 1 Mbit/s token bucket. Returns what was
   * applied, in words.
   */
  slow(i: number): string {
    const apply = (qdisc: string[]) => {
      tc(undefined, 'qdisc', 'add', 'dev', this.veth(i), 'root', ...qdisc);
      try {
        tc(this.namespace(i), 'qdisc', 'add', 'dev', 'eth0', 'root', ...qdisc);
      } catch (err) {
        tc(undefined, 'qdisc', 'del', 'dev', this.veth(i), 'root');
        throw err;
      }
    };
    let what: string;
    try {
      apply(['netem', 'delay', '50ms', 'loss', '1%']);
      what = 'netem: 50 ms delay, 1 % loss, both ways';
    } catch (err) {
      const why = stderrOf(err);
      apply(['tbf', 'rate', '1mbit', 'burst', '16kb', 'latency', '200ms']);
      what = `tbf: 1 Mbit/s, 200 ms queue, both ways (netem unavailable: ${why})`;
    }
    this.#slowed.set(i, what);
    return what;
  }

  unslow(i: number): void {
    if (!this.#slowed.delete(i)) return;
    tc(undefined, 'qdisc', 'del', 'dev', this.veth(i), 'root');
    tc(this.namespace(i), 'qdisc', 'del', 'dev', 'eth0', 'root');
  }

  /** Removes every namespace and link made (their processes must be gone or going). */
  destroy(): void {
    process.removeListener('exit', this.#onExit);
    for (const item of this.#created.reverse()) {
      const [kind, name] = item.split(':') as [string, string];
      try {
        if (kind === 'netns') ip('netns', 'del', name);
        else ip('link', 'del', name);
      } catch {
        // Already gone.
      }
    }
    this.#created = [];
  }
}
