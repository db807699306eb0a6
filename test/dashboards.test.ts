// Every PromQL query of the Grafana dashboard (deploy/grafana/derpmesh-dashboard.json) and of the
// Helm chart's PrometheusRule (rendered by a real helm) uses only metrics a node really exports: each
// metric name is looked up on the live /metrics of a real 3-node cluster on a real Postgres, with
// clients exchanging packets through the mesh (so per-peer series, histograms and labelled counters
// exist), and every label an expression groups by exists on the series it aggregates. Where
// Prometheus' promtool is installed (Debian: `apt-get install prometheus`), its parser reads every
// query and every alert too.
import { strict as assert } from 'node:assert';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

const dashboardFile = fileURLToPath(new URL('../../deploy/grafana/derpmesh-dashboard.json', import.meta.url));
const chart = fileURLToPath(new URL('../../deploy/helm/derpmesh', import.meta.url));
const helmScript = fileURLToPath(new URL('../../scripts/helm.sh', import.meta.url));

// --- PromQL: the metric names and grouping labels of an expression -------------------------------

/** PromQL aggregation operators: `op [by|without (labels)] (expr)` or `op (expr) [by|without (labels)]`. */
const AGGREGATORS = new Set([
  'sum',
  'min',
  'max',
  'avg',
  'count',
  'stddev',
  'stdvar',
  'topk',
  'bottomk',
  'quantile',
  'count_values',
  'group',
]);
/** Functions the queries may call (PromQL's, and Grafana's label_values for template variables). */
const FUNCTIONS = new Set([
  'rate',
  'irate',
  'increase',
  'delta',
  'idelta',
  'deriv',
  'histogram_quantile',
  'vector',
  'scalar',
  'absent',
  'absent_over_time',
  'abs',
  'clamp',
  'clamp_min',
  'clamp_max',
  'time',
  'max_over_time',
  'min_over_time',
  'avg_over_time',
  'sum_over_time',
  'count_over_time',
  'last_over_time',
  'changes',
  'resets',
  'label_replace',
  'round',
  'label_values',
]);
/** Words that are neither metrics nor functions; a `(label, …)` list follows the first group. */
const GROUPING = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right']);
const OPERATORS = new Set(['and', 'or', 'unless', 'bool', 'offset']);
/** Labels Prometheus adds to every scraped series (target labels), and `le` of histogram buckets. */
const TARGET_LABELS = new Set(['job', 'instance', 'namespace', 'pod', 'service', 'container', 'endpoint']);

interface Parsed {
  metrics: Set<string>;
  /** Labels named in by/without/on/ignoring/group_* lists. */
  groupLabels: Set<string>;
}

/** Extracts metric names and grouping labels; throws on what it cannot read (unbalanced, unknown function). */
export function parsePromql(expr: string): Parsed {
  let text = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""') // string literals
    .replace(/\$\{[^}]*\}|\$\w+/g, '1'); // Grafana variables ($__rate_interval, ${job})
  // Label matchers {…} and ranges/subqueries […] hold no metric names.
  const strip = (open: string, close: string) => {
    let out = '';
    let depth = 0;
    for (const ch of text) {
      if (ch === open) depth++;
      else if (ch === close) {
        depth--;
        if (depth < 0) throw new Error(`unbalanced ${close} in ${expr}`);
      } else if (depth === 0) out += ch;
    }
    if (depth !== 0) throw new Error(`unbalanced ${open} in ${expr}`);
    text = out;
  };
  strip('{', '}');
  strip('[', ']');
  // Grafana's label_values(metric, label): the label is not a metric.
  text = text.replace(/\blabel_values\(([^,()]*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)/g, 'label_values($1)');
  const tokens = text.match(/\d+(?:\.\d+)?(?:e[+-]?\d+|ms|[smhdwy])?|[A-Za-z_:][A-Za-z0-9_:]*|==|!=|>=|<=|[()+\-*/%^<>,]/g) ?? [];
  let depth = 0;
  for (const t of tokens) {
    if (t === '(') depth++;
    if (t === ')') depth--;
    if (depth < 0) throw new Error(`unbalanced ) in ${expr}`);
  }
  if (depth !== 0) throw new Error(`unbalanced ( in ${expr}`);
  const metrics = new Set<string>();
  const groupLabels = new Set<string>();
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i]!;
    if (!/^[A-Za-z_:]/.test(t)) continue;
    if (GROUPING.has(t)) {
      if (tokens[i + 1] !== '(') continue; // group_left without labels
      let j = i + 2;
      for (; j < tokens.length && tokens[j] !== ')'; j++) if (tokens[j] !== ',') groupLabels.add(tokens[j]!);
      i = j;
    } else if (OPERATORS.has(t) || AGGREGATORS.has(t)) {
      continue;
    } else if (tokens[i + 1] === '(') {
      if (!FUNCTIONS.has(t)) throw new Error(`unknown function ${t}() in ${expr}`);
    } else {
      metrics.add(t);
    }
  }
  return { metrics, groupLabels };
}

// --- The queries ---------------------------------------------------------------------------------

interface Query {
  where: string;
  expr: string;
}

interface Panel {
  title?: string;
  type?: string;
  targets?: { expr?: string; legendFormat?: string }[];
  panels?: Panel[];
}

function dashboardQueries(): Query[] {
  const dashboard = JSON.parse(readFileSync(dashboardFile, 'utf8')) as {
    panels: Panel[];
    templating?: { list: { name: string; type: string; query?: string | { query: string } }[] };
  };
  const queries: Query[] = [];
  const visit = (panels: Panel[]) => {
    for (const p of panels) {
      for (const t of p.targets ?? []) if (t.expr) queries.push({ where: `panel "${p.title}"`, expr: t.expr });
      visit(p.panels ?? []);
    }
  };
  visit(dashboard.panels);
  for (const v of dashboard.templating?.list ?? []) {
    if (v.type !== 'query') continue;
    const q = typeof v.query === 'string' ? v.query : v.query?.query;
    if (q) queries.push({ where: `variable $${v.name}`, expr: q });
  }
  return queries;
}

const hasPromtool = spawnSync('promtool', ['--version'], { stdio: 'ignore' }).status === 0;

/**
 * Prometheus' own parser on `groups` (a rules file): `promtool check rules` reads every expression
 * (and every alert's templates). Grafana's variables are replaced by what they stand for.
 */
function promtoolCheck(groups: unknown): { code: number; output: string } {
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-promtool-'));
  try {
    const file = join(dir, 'rules.json');
    writeFileSync(file, JSON.stringify({ groups }));
    const r = spawnSync('promtool', ['check', 'rules', file], { encoding: 'utf8', timeout: 60_000 });
    return { code: r.status ?? 1, output: `${r.stdout}${r.stderr}` };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const withoutGrafanaVariables = (expr: string) => expr.replace(/\$__(rate_interval|interval|range)\b/g, '5m').replace(/\$\{?\w+\}?/g, '.+');

/** The PrometheusRule's alerts, rendered by a real helm (null when there is no helm). */
function ruleGroups(): { name: string; rules: { alert: string; expr: string }[] }[] | null {
  const hasHelm = spawnSync('helm', ['version', '--short'], { stdio: 'ignore' }).status === 0;
  const hasGo = spawnSync('go', ['version'], { stdio: 'ignore' }).status === 0;
  if (!hasHelm && !hasGo) return null;
  const helmBin = execFileSync('bash', [helmScript], { encoding: 'utf8', timeout: 1_900_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim();
  const home = mkdtempSync(join(tmpdir(), 'derpmesh-rules-'));
  try {
    const env = {
      ...process.env,
      HELM_CONFIG_HOME: join(home, 'config'),
      HELM_CACHE_HOME: join(home, 'cache'),
      HELM_DATA_HOME: join(home, 'data'),
    };
    const rendered = execFileSync(
      helmBin,
      [
        'template',
        'derpmesh',
        chart,
        '--set',
        'accessURL=https://derp.example.com,postgres.existingSecret=pg,metrics.prometheusRule.enabled=true',
        '--show-only',
        'templates/prometheusrule.yaml',
      ],
      { encoding: 'utf8', env },
    );
    // Helm itself turns the YAML into JSON (no YAML parser needed here).
    const converter = join(home, 'yaml2json');
    mkdirSync(join(converter, 'templates'), { recursive: true });
    writeFileSync(join(converter, 'Chart.yaml'), 'apiVersion: v2\nname: yaml2json\nversion: 0.0.0\n');
    writeFileSync(join(converter, 'templates', 'json.yaml'), '{{ toJson (fromYaml (toString .Values.manifest)) }}\n');
    writeFileSync(join(home, 'rule.yaml'), rendered);
    const json = execFileSync(helmBin, ['template', 'c', converter, '--set-file', `manifest=${join(home, 'rule.yaml')}`], {
      encoding: 'utf8',
      env,
    });
    const rule = JSON.parse(json.split('\n').find((l) => l.startsWith('{'))!) as {
      kind: string;
      spec: { groups: unknown };
    };
    assert.equal(rule.kind, 'PrometheusRule');
    return rule.spec.groups as { name: string; rules: { alert: string; expr: string }[] }[];
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
}

// --- A live /metrics -----------------------------------------------------------------------------

/** Sample names of a Prometheus text exposition, each with the label names its series carry. */
function exposition(text: string): Map<string, Set<string>> {
  const names = new Map<string, Set<string>>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+\S+/.exec(line);
    if (!m) continue;
    const labels = names.get(m[1]!) ?? new Set<string>();
    for (const l of (m[3] ?? '').matchAll(/([A-Za-z_][A-Za-z0-9_]*)="/g)) labels.add(l[1]!);
    names.set(m[1]!, labels);
  }
  return names;
}

const HEARTBEAT_MS = 500;

describe('dashboard and alert queries against a live /metrics', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];
  let live = new Map<string, Set<string>>();

  before(async () => {
    postgres = await startPostgres();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('the PromQL reader finds metric names and grouping labels, and rejects what it cannot read', () => {
    const p = parsePromql(
      'sum by (namespace, pod, reason) (rate(derpmesh_dropped_packets_total{job="x",a=~"b|c"}[10m])) / on (pod) group_left sum(rate(b_total[$__rate_interval])) > 0.01',
    );
    assert.deepEqual([...p.metrics].sort(), ['b_total', 'derpmesh_dropped_packets_total']);
    assert.deepEqual([...p.groupLabels].sort(), ['namespace', 'pod', 'reason']);
    const q = parsePromql(
      'histogram_quantile(0.99, sum by (le) (rate(x_bucket{i=~"$instance"}[5m]))) or vector(0) < 3 and min(y) offset 5m',
    );
    assert.deepEqual([...q.metrics].sort(), ['x_bucket', 'y']);
    assert.deepEqual([...parsePromql('label_values(derpmesh_clients{job=~"$job"}, instance)').metrics], ['derpmesh_clients']);
    assert.throws(() => parsePromql('sum(rate(x[5m])'), /unbalanced/);
    assert.throws(() => parsePromql('rte(x[5m])'), /unknown function rte/);
  });

  test('the dashboard is well-formed: unique uid, panel ids and refIds, a layout in 24 columns, the data source a variable', () => {
    interface GridPanel extends Panel {
      id: number;
      gridPos: { x: number; y: number; w: number; h: number };
      datasource?: { type: string; uid: string };
      targets?: { expr?: string; refId?: string; datasource?: { uid: string } }[];
    }
    const d = JSON.parse(readFileSync(dashboardFile, 'utf8')) as {
      uid: string;
      title: string;
      schemaVersion: number;
      panels: GridPanel[];
      templating: { list: { name: string; type: string; query?: unknown }[] };
    };
    assert.match(d.uid, /^[a-z0-9-]{1,40}$/);
    assert.ok(d.schemaVersion >= 36, `schemaVersion ${d.schemaVersion}`);
    assert.deepEqual(
      d.templating.list.map((v) => `${v.name}:${v.type}`),
      ['datasource:datasource', 'job:query', 'instance:query'],
    );
    const ids = d.panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, 'panel ids are unique');
    const cells = new Set<string>();
    for (const p of d.panels) {
      const { x, y, w, h } = p.gridPos;
      assert.ok(x >= 0 && w > 0 && x + w <= 24 && h > 0, `panel "${p.title}" at ${JSON.stringify(p.gridPos)}`);
      for (let i = x; i < x + w; i++)
        for (let j = y; j < y + h; j++) {
          assert.ok(!cells.has(`${i},${j}`), `panel "${p.title}" overlaps another at ${i},${j}`);
          cells.add(`${i},${j}`);
        }
      if (p.type === 'row') continue;
      assert.equal(p.datasource?.uid, '${datasource}', `panel "${p.title}" data source`);
      const refIds = (p.targets ?? []).map((t) => t.refId);
      assert.ok(refIds.length > 0, `panel "${p.title}" has no query`);
      assert.equal(new Set(refIds).size, refIds.length, `panel "${p.title}" refIds`);
      for (const t of p.targets ?? []) assert.match(t.expr ?? '', /job=~"\$job",instance=~"\$instance"/, `panel "${p.title}": ${t.expr}`);
    }
  });

  test('a 3-node cluster with traffic: every series the queries need', async (t) => {
    for (const name of ['n1', 'n2', 'n3']) {
      const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS });
      nodes.push(n);
    }
    await Promise.all(nodes.map((n) => n.started));
    await waitFor('every node listing the other two', 15_000, async () => {
      const lists = await Promise.all(nodes.map(livePeers));
      return lists.every((l) => l.length === 2);
    });
    const [n1, n2, n3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    const a = await DerpClient.connect({ url: n1.url });
    const b = await DerpClient.connect({ url: n2.url });
    const c = await DerpClient.connect({ url: n3.url });
    clients.push(a, b, c);
    await deliver(a, b);
    await deliver(b, c);
    await deliver(c, a);
    // A packet to nobody: a drop with a reason (unknown_dest).
    a.send(Buffer.alloc(32, 9), Buffer.from('to nobody'));
    // Per-peer gauges come with the latency probes (every heartbeat).
    const texts = await waitFor('per-peer round trips on every node', 15_000, async () => {
      const all = await Promise.all(nodes.map((n) => n.metrics()));
      return all.every((text) => (text.match(/^derpmesh_peer_rtt_seconds\{/gm) ?? []).length === 2) && all;
    });
    live = new Map();
    for (const text of texts.value) {
      for (const [name, labels] of exposition(text)) {
        const merged = live.get(name) ?? new Set<string>();
        for (const l of labels) merged.add(l);
        live.set(name, merged);
      }
    }
    assert.ok(live.size > 30, `only ${live.size} sample names on /metrics`);
    t.diagnostic(`${live.size} sample names on the live /metrics of 3 nodes`);
    void n3;
  });

  const check = (queries: Query[], t: { diagnostic(m: string): void }) => {
    assert.ok(live.size > 0, 'no live /metrics (the cluster test failed)');
    const missing: string[] = [];
    const used = new Set<string>();
    for (const q of queries) {
      const { metrics, groupLabels } = parsePromql(q.expr);
      assert.ok(metrics.size > 0, `${q.where}: no metric in ${q.expr}`);
      for (const m of metrics) {
        used.add(m);
        if (!live.has(m)) missing.push(`${q.where}: ${m}`);
      }
      // Labels it groups by must exist on the series it reads (besides the ones Prometheus adds).
      const labelsOnSeries = new Set<string>();
      for (const m of metrics) for (const l of live.get(m) ?? []) labelsOnSeries.add(l);
      for (const l of groupLabels) {
        if (TARGET_LABELS.has(l)) continue;
        if (!labelsOnSeries.has(l)) missing.push(`${q.where}: label ${l} (not on ${[...metrics].join(', ')})`);
      }
    }
    assert.deepEqual(missing, [], `queries use what the nodes do not export:\n${missing.join('\n')}`);
    t.diagnostic(`${queries.length} queries, ${used.size} metrics: ${[...used].sort().join(' ')}`);
    return used;
  };

  test('every query of the Grafana dashboard uses metrics the nodes export', (t) => {
    const queries = dashboardQueries();
    assert.ok(queries.length >= 30, `only ${queries.length} queries in the dashboard`);
    const used = check(queries, t);
    // What the dashboard is for: traffic, drops, mesh, peers, Postgres, histograms, the process.
    for (const m of [
      'derpmesh_clients',
      'derpmesh_received_packets_total',
      'derpmesh_sent_bytes_total',
      'derpmesh_dropped_packets_total',
      'derpmesh_mesh_link_up',
      'derpmesh_peer_rtt_seconds',
      'derpmesh_database_rtt_seconds',
      'derpmesh_handshake_duration_seconds_bucket',
      'derpmesh_queue_wait_seconds_bucket',
      'process_resident_memory_bytes',
      'nodejs_heap_size_used_bytes',
    ])
      assert.ok(used.has(m), `the dashboard shows no ${m}`);
  });

  test('every alert of the PrometheusRule uses metrics the nodes export', (t) => {
    const groups = ruleGroups();
    if (groups === null) {
      t.skip('neither helm nor Go (to build helm) is installed');
      return;
    }
    const queries = groups.flatMap((g) => g.rules).map((r) => ({ where: `alert ${r.alert}`, expr: String(r.expr) }));
    assert.equal(queries.length, 6, queries.map((q) => q.where).join(', '));
    check(queries, t);
    if (hasPromtool) {
      const r = promtoolCheck(groups);
      assert.equal(r.code, 0, r.output);
      assert.match(r.output, /SUCCESS: 6 rules found/);
    } else t.diagnostic('promtool not installed: the rules were read by this test only, not by Prometheus');
  });

  test("Prometheus' parser accepts every dashboard query", { skip: !hasPromtool && 'promtool not installed' }, () => {
    const queries = dashboardQueries().filter((q) => !/^\s*label_values\(/.test(q.expr));
    const rules = queries.map((q, i) => ({ record: `derpmesh_dashboard:query_${i}`, expr: withoutGrafanaVariables(q.expr) }));
    const r = promtoolCheck([{ name: 'dashboard', rules }]);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, new RegExp(`SUCCESS: ${rules.length} rules found`));
    // And it would refuse a broken one.
    const broken = promtoolCheck([{ name: 'broken', rules: [{ record: 'x:y', expr: 'sum by (a (rate(x[5m]))' }] }]);
    assert.notEqual(broken.code, 0, broken.output);
  });
});
