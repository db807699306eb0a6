// Prometheus text exposition of the relay core's counters plus the control plane's own.

export interface MetricSample {
  name: string;
  kind: string;
  help: string;
  value: number;
  labels?: Record<string, string>;
}

const PREFIX = 'derpmesh_';

export function renderPrometheus(samples: MetricSample[]): string {
  const lines: string[] = [];
  const described = new Set<string>();
  for (const s of samples) {
    const name = PREFIX + s.name;
    if (!described.has(name)) {
      described.add(name);
      lines.push(`# HELP ${name} ${s.help}`, `# TYPE ${name} ${s.kind === 'gauge' ? 'gauge' : 'counter'}`);
    }
    const labels = s.labels
      ? '{' +
        Object.entries(s.labels)
          .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, (c) => (c === '\n' ? '\\n' : '\\' + c))}"`)
          .join(',') +
        '}'
      : '';
    lines.push(`${name}${labels} ${s.value}`);
  }
  return lines.join('\n') + '\n';
}

/** Counters kept in TypeScript (HTTP-level rejections), named and described once. */
export class Counters<Name extends string> {
  readonly #values = new Map<Name, number>();
  constructor(readonly descriptions: Record<Name, string>) {
    for (const name of Object.keys(descriptions) as Name[]) this.#values.set(name, 0);
  }
  inc(name: Name, by = 1): void {
    this.#values.set(name, (this.#values.get(name) ?? 0) + by);
  }
  get(name: Name): number {
    return this.#values.get(name) ?? 0;
  }
  samples(): MetricSample[] {
    return [...this.#values].map(([name, value]) => ({ name, kind: 'counter', help: this.descriptions[name], value }));
  }
}
