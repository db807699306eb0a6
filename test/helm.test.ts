// The Helm chart deploy/helm/derpmesh, linted and rendered by a real helm (scripts/helm.sh finds it on PATH
// or builds it from the Go module proxy). Rendered YAML is turned into JSON by helm itself (a throwaway chart
// applying fromYaml/toJson), so the test needs no YAML parser.
import { strict as assert } from 'node:assert';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { loadConfig, options, parseDuration } from '../src/config.js';

const helmScript = fileURLToPath(new URL('../../scripts/helm.sh', import.meta.url));
const chart = fileURLToPath(new URL('../../deploy/helm/derpmesh', import.meta.url));

function runs(command: string, args: string[]): boolean {
  return spawnSync(command, args, { stdio: 'ignore' }).status === 0;
}

const hasHelm = runs('helm', ['version', '--short']);
const hasGo = runs('go', ['version']);
if (!hasHelm && !hasGo) console.log('# SKIP Helm chart: neither helm nor Go (to build helm) is installed');

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { fieldRef?: { fieldPath: string }; secretKeyRef?: { name: string; key: string } };
}
interface Probe {
  httpGet?: { path: string; port: string | number };
  periodSeconds?: number;
  failureThreshold?: number;
}
interface Container {
  name: string;
  image: string;
  ports: { name: string; containerPort: number }[];
  env: EnvVar[];
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  securityContext?: { allowPrivilegeEscalation?: boolean; capabilities?: { drop?: string[] } };
  volumeMounts?: { name: string; mountPath: string }[];
}
interface AffinityTerm {
  weight: number;
  podAffinityTerm: { topologyKey: string; labelSelector: { matchLabels: Record<string, string> } };
}
interface PodSpec {
  containers: Container[];
  terminationGracePeriodSeconds: number;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; runAsGroup?: number; fsGroup?: number };
  affinity?: { podAntiAffinity?: { preferredDuringSchedulingIgnoredDuringExecution?: AffinityTerm[] }; nodeAffinity?: unknown };
  volumes?: { name: string; emptyDir?: Record<string, unknown> }[];
}
interface Manifest {
  apiVersion: string;
  kind: string;
  metadata: { name: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  spec?: unknown;
  stringData?: Record<string, string>;
}
interface DeploymentSpec {
  replicas: number;
  selector: { matchLabels: Record<string, string> };
  template: { metadata: { labels: Record<string, string>; annotations?: Record<string, string> }; spec: PodSpec };
}
interface PdbSpec {
  minAvailable?: number | string;
  maxUnavailable?: number | string;
  selector: { matchLabels: Record<string, string> };
}
interface ServiceMonitorSpec {
  selector: { matchLabels: Record<string, string> };
  namespaceSelector: { matchNames: string[] };
  endpoints: { port: string; path: string; interval: string; scrapeTimeout: string }[];
}
interface Rule {
  alert: string;
  expr: string;
  for: string;
  labels: Record<string, string>;
  annotations: { summary: string; description: string };
}
interface ServiceSpec {
  type: string;
  selector: Record<string, string>;
  ports: { name: string; port: number; targetPort: string | number }[];
}

const ha = ['--set', 'replicaCount=3', '--set', 'accessURL=https://derp.example.com', '--set', 'postgres.existingSecret=pg'];

describe('Helm chart deploy/helm/derpmesh', { skip: !hasHelm && !hasGo && 'neither helm nor Go is installed' }, () => {
  let helmBin = '';
  let helmVersion = '';
  let home = '';
  let converter = '';

  before(() => {
    home = mkdtempSync(join(tmpdir(), 'derpmesh-helm-'));
    // Helm turns the rendered manifest (a string value) into one JSON document per object.
    converter = join(home, 'yaml2json');
    mkdirSync(join(converter, 'templates'), { recursive: true });
    writeFileSync(join(converter, 'Chart.yaml'), 'apiVersion: v2\nname: yaml2json\nversion: 0.0.0\n');
    writeFileSync(
      join(converter, 'templates', 'json.yaml'),
      [
        '{{- range $doc := regexSplit "(?m)^---[ \\\\t]*$" (toString .Values.manifest) -1 }}',
        '{{- $obj := fromYaml $doc }}',
        '{{- if $obj }}',
        '---',
        '{{ toJson $obj }}',
        '{{- end }}',
        '{{- end }}',
        '',
      ].join('\n'),
    );
  });
  after(() => {
    if (home) rmSync(home, { recursive: true, force: true });
  });

  /** Runs helm with its config, cache and data dirs in the temp dir (nothing of the user's is read or written). */
  function helm(args: string[]): { code: number; stdout: string; stderr: string } {
    const r = spawnSync(helmBin, args, {
      encoding: 'utf8',
      timeout: 60_000,
      env: {
        ...process.env,
        HELM_CONFIG_HOME: join(home, 'config'),
        HELM_CACHE_HOME: join(home, 'cache'),
        HELM_DATA_HOME: join(home, 'data'),
      },
    });
    if (r.error) throw r.error;
    return { code: r.status ?? 1, stdout: r.stdout, stderr: r.stderr };
  }

  function render(args: string[]): Manifest[] {
    const r = helm(['template', 'derpmesh', chart, ...args]);
    assert.equal(r.code, 0, `helm template ${args.join(' ')} failed:\n${r.stderr}`);
    const file = join(home, 'manifest.yaml');
    writeFileSync(file, r.stdout);
    const j = helm(['template', 'convert', converter, '--set-file', `manifest=${file}`]);
    assert.equal(j.code, 0, `yaml2json failed:\n${j.stderr}`);
    const docs = j.stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Manifest & { Error?: string });
    for (const d of docs) assert.equal(d.Error, undefined, `rendered YAML does not parse: ${d.Error}`);
    assert.ok(docs.length > 0, `nothing rendered:\n${r.stdout}`);
    return docs;
  }

  function renderFails(args: string[], message: RegExp): void {
    const r = helm(['template', 'derpmesh', chart, ...args]);
    assert.notEqual(r.code, 0, `helm template ${args.join(' ')} should fail but rendered:\n${r.stdout}`);
    assert.match(r.stderr, message);
  }

  function one(docs: Manifest[], kind: string): Manifest {
    const found = docs.filter((d) => d.kind === kind);
    assert.equal(found.length, 1, `expected one ${kind}, got ${found.length}: ${docs.map((d) => d.kind).join(', ')}`);
    return found[0]!;
  }
  const deployment = (docs: Manifest[]) => one(docs, 'Deployment').spec as DeploymentSpec;
  const container = (spec: DeploymentSpec) => spec.template.spec.containers[0]!;
  const env = (c: Container, name: string) => {
    const e = c.env.find((v) => v.name === name);
    assert.ok(e, `env ${name} missing: ${c.env.map((v) => v.name).join(', ')}`);
    return e;
  };

  test('finds or builds helm', { timeout: 2_000_000 }, (t) => {
    helmBin = execFileSync('bash', [helmScript], { encoding: 'utf8', timeout: 1_900_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim();
    assert.match(helmBin, /(^|\/)helm$/);
    const v = helm(['version', '--short']);
    assert.equal(v.code, 0, v.stderr);
    helmVersion = v.stdout.trim();
    t.diagnostic(`helm ${helmVersion} at ${helmBin}`);
  });

  test('helm lint passes; with the default values it passes too but reports the missing accessURL', () => {
    const ok = helm(['lint', '--strict', chart, '--set', 'accessURL=https://derp.example.com,postgres.existingSecret=pg']);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, /1 chart\(s\) linted, 0 chart\(s\) failed/);
    assert.doesNotMatch(ok.stderr, /Fail:/);
    const single = helm(['lint', '--strict', chart, '--set', 'replicaCount=1,accessURL=http://derpmesh.default.svc']);
    assert.equal(single.code, 0, single.stdout + single.stderr);
    assert.doesNotMatch(single.stderr, /Fail:/);
    // Helm lints in "lint mode", where `fail` and `required` are reported, not fatal: lint cannot know the
    // values of an install, and a chart with a required value must still lint in CI. Installing or
    // rendering with those defaults fails (see below).
    const bare = helm(['lint', chart]);
    assert.equal(bare.code, 0, bare.stdout + bare.stderr);
    if (/^v3\./.test(helmVersion)) {
      // Helm 3 logs the lenient failures on stderr (Helm 4 logs differently).
      assert.match(bare.stderr, /Fail: accessURL is required/);
      assert.match(bare.stderr, /Fail: replicaCount is 3 but no Postgres is configured/);
    }
    renderFails([], /accessURL is required/);
  });

  test('HA: 3 replicas, relay URL from the pod IP, Postgres from the Secret, probes, spreading, security', () => {
    const docs = render(ha);
    assert.deepEqual(docs.map((d) => d.kind).sort(), ['Deployment', 'PodDisruptionBudget', 'Service']);
    const d = deployment(docs);
    assert.equal(d.replicas, 3);
    const c = container(d);
    assert.equal(c.image, 'ghcr.io/derpmesh/derpmesh:0.1.0');
    assert.deepEqual(c.ports, [
      { name: 'http', containerPort: 3000, protocol: 'TCP' },
      { name: 'stun', containerPort: 3478, protocol: 'UDP' },
    ]);
    assert.equal(env(c, 'DERPMESH_STUN_ADDRESS').value, '0.0.0.0:3478');

    const names = c.env.map((e) => e.name);
    assert.deepEqual(env(c, 'POD_IP').valueFrom, { fieldRef: { fieldPath: 'status.podIP' } });
    assert.equal(env(c, 'CODER_DERP_SERVER_RELAY_URL').value, 'http://$(POD_IP):3000');
    assert.ok(names.indexOf('POD_IP') < names.indexOf('CODER_DERP_SERVER_RELAY_URL'), 'POD_IP must be declared before its use');
    assert.equal(env(c, 'CODER_HTTP_ADDRESS').value, '0.0.0.0:3000');
    assert.equal(env(c, 'CODER_ACCESS_URL').value, 'https://derp.example.com');
    assert.deepEqual(env(c, 'CODER_PG_CONNECTION_URL').valueFrom, { secretKeyRef: { name: 'pg', key: 'url' } });
    assert.equal(env(c, 'DERPMESH_LOG_FORMAT').value, 'json');
    assert.equal(new Set(names).size, names.length, `duplicate env: ${names.join(', ')}`);

    // The server accepts what the chart sets: every variable is one of its options, and loadConfig takes them.
    const known = new Set<string>(Object.values(options).flatMap((o) => [...o.env]));
    for (const n of names) if (n !== 'POD_IP') assert.ok(known.has(n), `${n} is not a derpmesh option`);
    const podEnv: Record<string, string> = {};
    for (const e of c.env)
      podEnv[e.name] = e.value?.replace('$(POD_IP)', '10.1.2.3') ?? (e.name === 'POD_IP' ? '10.1.2.3' : 'postgres://u@pg/db');
    const config = loadConfig([], podEnv);
    assert.equal(config.relayUrl?.href, 'http://10.1.2.3:3000/');
    assert.equal(config.listenPort, 3000);

    // Readiness: /healthz, which answers 503 from SIGTERM until exit (test/drain.test.ts checks a real node).
    assert.deepEqual(c.readinessProbe?.httpGet, { path: '/healthz', port: 'http' });
    assert.equal(c.readinessProbe?.periodSeconds, 5);
    assert.equal(c.livenessProbe, undefined, 'no liveness probe by default');

    // Stopping: a preStop sleep first (the endpoints and load balancers forget the pod), then SIGTERM:
    // the drain delay (0 by default) and the shutdown grace, all within terminationGracePeriodSeconds.
    assert.deepEqual(c.lifecycle?.preStop?.exec?.command, ['sleep', '10']);
    const pod = d.template.spec;
    const grace = parseDuration(env(c, 'DERPMESH_SHUTDOWN_GRACE').value!);
    const drainDelay = parseDuration(env(c, 'DERPMESH_SHUTDOWN_DRAIN_DELAY').value!);
    assert.equal(grace, 5000);
    assert.equal(drainDelay, 0);
    assert.equal(config.shutdownDrainDelayMs, 0);
    assert.ok(
      pod.terminationGracePeriodSeconds * 1000 > 10_000 + drainDelay! + grace! + 2000,
      `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds}`,
    );

    const selector = d.selector.matchLabels;
    assert.deepEqual(selector, { 'app.kubernetes.io/name': 'derpmesh', 'app.kubernetes.io/instance': 'derpmesh' });
    const [term, ...more] = pod.affinity?.podAntiAffinity?.preferredDuringSchedulingIgnoredDuringExecution ?? [];
    assert.equal(more.length, 0);
    assert.deepEqual(term, {
      weight: 100,
      podAffinityTerm: { topologyKey: 'kubernetes.io/hostname', labelSelector: { matchLabels: selector } },
    });

    const { runAsNonRoot, runAsUser, runAsGroup, fsGroup } = pod.securityContext ?? {};
    assert.deepEqual(
      { runAsNonRoot, runAsUser, runAsGroup, fsGroup },
      { runAsNonRoot: true, runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001 },
    );
    assert.equal(c.securityContext?.allowPrivilegeEscalation, false);
    assert.deepEqual(c.securityContext?.capabilities?.drop, ['ALL']);

    const labels = d.template.metadata.labels;
    for (const [k, v] of Object.entries(selector)) assert.equal(labels[k], v);
    for (const k of ['app.kubernetes.io/version', 'app.kubernetes.io/managed-by', 'helm.sh/chart']) assert.ok(labels[k], `label ${k}`);

    const svc = one(docs, 'Service');
    const s = svc.spec as ServiceSpec;
    assert.equal(s.type, 'ClusterIP');
    assert.deepEqual(s.selector, selector);
    assert.deepEqual(s.ports, [
      { name: 'http', port: 80, targetPort: 'http', protocol: 'TCP' },
      { name: 'stun', port: 3478, targetPort: 'stun', protocol: 'UDP' },
    ]);
  });

  test('liveness probe when enabled; affinity and container port from values', () => {
    const d = deployment(
      render([
        ...ha,
        '--set',
        'livenessProbe.enabled=true',
        '--set',
        'containerPort=8080',
        '--set',
        'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool,affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists',
      ]),
    );
    const c = container(d);
    // Liveness on /derp/probe: it stays 200 while the pod drains (/healthz turns 503 then).
    assert.deepEqual(c.livenessProbe?.httpGet, { path: '/derp/probe', port: 'http' });
    assert.equal(c.livenessProbe?.failureThreshold, 6);
    assert.equal((c.livenessProbe as Record<string, unknown>).path, undefined, 'the path value is not a probe field');
    assert.equal(c.ports[0]!.containerPort, 8080);
    // stunPort 0: no UDP port, STUN off in the pods.
    const noStun = container(deployment(render([...ha, '--set', 'stunPort=0'])));
    assert.deepEqual(
      noStun.ports.map((p) => p.name),
      ['http'],
    );
    assert.equal(env(noStun, 'DERPMESH_STUN_ADDRESS').value, 'disable');
    assert.equal(env(c, 'CODER_DERP_SERVER_RELAY_URL').value, 'http://$(POD_IP):8080');
    assert.equal(env(c, 'CODER_HTTP_ADDRESS').value, '0.0.0.0:8080');
    assert.ok(d.template.spec.affinity?.nodeAffinity, 'affinity from values');
    assert.equal(d.template.spec.affinity?.podAntiAffinity, undefined, 'values.affinity replaces the default');
  });

  test('postgres.url: the chart creates a Secret and the pods read the URL from it', () => {
    const url = 'postgres://derpmesh:hunter2@db.example:5432/derpmesh';
    const docs = render(['--set', 'accessURL=https://derp.example.com', '--set', `postgres.url=${url}`]);
    const secret = one(docs, 'Secret');
    assert.equal(secret.metadata.name, 'derpmesh-postgres');
    assert.deepEqual(secret.stringData, { url });
    const dep = one(docs, 'Deployment');
    assert.deepEqual(env(container(dep.spec as DeploymentSpec), 'CODER_PG_CONNECTION_URL').valueFrom, {
      secretKeyRef: { name: 'derpmesh-postgres', key: 'url' },
    });
    const text = JSON.stringify(dep);
    assert.ok(!text.includes('hunter2') && !text.includes('db.example'), 'the URL must not be in the Deployment');
    // existingSecretKey applies to an existing Secret.
    const other = render([...ha, '--set', 'postgres.existingSecretKey=dsn']);
    assert.deepEqual(env(container(deployment(other)), 'CODER_PG_CONNECTION_URL').valueFrom, { secretKeyRef: { name: 'pg', key: 'dsn' } });
  });

  test('replicaCount=1 without Postgres runs the embedded one on an emptyDir', () => {
    const docs = render(['--set', 'replicaCount=1', '--set', 'accessURL=https://derp.example.com']);
    // No PodDisruptionBudget for a single pod: it would block every node drain (or protect nothing).
    assert.deepEqual(docs.map((d) => d.kind).sort(), ['Deployment', 'Service']);
    const d = deployment(docs);
    assert.equal(d.replicas, 1);
    const c = container(d);
    assert.ok(!c.env.some((e) => e.name === 'CODER_PG_CONNECTION_URL'));
    assert.equal(env(c, 'DERPMESH_STATE_DIR').value, '/var/lib/derpmesh');
    const mount = c.volumeMounts?.find((m) => m.mountPath === '/var/lib/derpmesh');
    assert.ok(mount, 'state dir mounted');
    assert.deepEqual(
      d.template.spec.volumes?.find((v) => v.name === mount.name),
      { name: mount.name, emptyDir: {} },
    );
  });

  test('misconfigurations fail rendering with what to set', () => {
    renderFails(['--set', 'postgres.existingSecret=pg'], /accessURL is required: set it to the load-balanced URL/);
    renderFails(
      ['--set', 'accessURL=derp.example.com', '--set', 'postgres.existingSecret=pg'],
      /accessURL must be an http:\/\/ or https:\/\/ URL/,
    );
    renderFails(
      ['--set', 'replicaCount=3', '--set', 'accessURL=https://derp.example.com'],
      /replicaCount is 3 but no Postgres is configured: set postgres.existingSecret .* or postgres.url.*each pod would start its own embedded Postgres and they would not form a cluster/,
    );
    renderFails([...ha, '--set', 'postgres.url=postgres://x@y/z'], /postgres.existingSecret and postgres.url are both set/);
    renderFails(
      [...ha, '--set', 'terminationGracePeriodSeconds=5', '--set', 'shutdownGrace=5s'],
      /terminationGracePeriodSeconds \(5\) must be longer than preStopSleepSeconds \(10\) \+ shutdownDrainDelay \(0s\) \+ shutdownGrace \(5s\) plus 2s.*at least 18/,
    );
    renderFails(
      [...ha, '--set', 'shutdownGrace=1m'],
      /terminationGracePeriodSeconds \(30\) must be longer than .*shutdownGrace \(1m\).*at least 73/,
    );
    renderFails([...ha, '--set', 'shutdownDrainDelay=5'], /shutdownDrainDelay must be a duration/);
    renderFails([...ha, '--set', 'preStopSleepSeconds=-1'], /preStopSleepSeconds must be 0 \(no preStop hook\) or more/);
    renderFails(
      [...ha, '--set', 'podDisruptionBudget.minAvailable=2'],
      /podDisruptionBudget: set minAvailable or maxUnavailable, not both/,
    );
    renderFails(
      [...ha, '--set', 'podDisruptionBudget.minAvailable=3', '--set', 'podDisruptionBudget.maxUnavailable=null'],
      /podDisruptionBudget.minAvailable \(3\) is not below replicaCount \(3\): no pod could ever be evicted/,
    );
    renderFails([...ha, '--set', 'podDisruptionBudget.maxUnavailable=null'], /neither minAvailable nor maxUnavailable is set/);
    renderFails(
      [...ha, '--set', 'metrics.prometheusRule.enabled=true', '--set', 'metrics.prometheusRule.peerSlowThreshold=10'],
      /metrics.prometheusRule.peerSlowThreshold must be a duration/,
    );
    renderFails([...ha, '--set', 'shutdownGrace=5'], /shutdownGrace must be a duration: a number with a unit ms, s, m or h/);
    renderFails([...ha, '--set', 'heartbeatInterval=often'], /heartbeatInterval must be a duration/);
    renderFails([...ha, '--set', 'log.format=yaml'], /log.format must be json or text/);
  });

  test('preStop sleep + drain delay + shutdown grace (ms, s, m) against terminationGracePeriodSeconds', () => {
    for (const [preStop, drain, grace, seconds] of [
      [0, '0s', '5s', 8],
      [0, '0s', '1500ms', 4],
      [0, '0s', '1m', 63],
      [0, '0s', '0.5m', 33],
      [10, '0s', '5s', 18],
      [15, '2500ms', '5s', 25],
      [5, '1m', '1s', 69],
    ] as const) {
      const args = [
        ...ha,
        '--set',
        `preStopSleepSeconds=${preStop}`,
        '--set',
        `shutdownDrainDelay=${drain}`,
        '--set',
        `shutdownGrace=${grace}`,
        '--set',
      ];
      const c = container(deployment(render([...args, `terminationGracePeriodSeconds=${seconds}`])));
      assert.equal(env(c, 'DERPMESH_SHUTDOWN_GRACE').value, grace);
      assert.equal(env(c, 'DERPMESH_SHUTDOWN_DRAIN_DELAY').value, drain);
      if (preStop === 0) assert.equal(c.lifecycle, undefined, 'preStopSleepSeconds=0: no hook');
      else assert.deepEqual(c.lifecycle?.preStop?.exec?.command, ['sleep', String(preStop)]);
      renderFails([...args, `terminationGracePeriodSeconds=${seconds - 1}`], /must be longer than preStopSleepSeconds/);
    }
  });

  test('PodDisruptionBudget: maxUnavailable 1 by default, minAvailable instead, off when disabled', () => {
    const selector = { 'app.kubernetes.io/name': 'derpmesh', 'app.kubernetes.io/instance': 'derpmesh' };
    const pdb = one(render(ha), 'PodDisruptionBudget');
    assert.equal(pdb.apiVersion, 'policy/v1');
    assert.equal(pdb.metadata.name, 'derpmesh');
    assert.deepEqual(pdb.spec, { maxUnavailable: 1, selector: { matchLabels: selector } });
    // The PDB selects exactly the Deployment's pods.
    assert.deepEqual((pdb.spec as PdbSpec).selector.matchLabels, deployment(render(ha)).selector.matchLabels);
    const min = one(
      render([
        ...ha,
        '--set',
        'replicaCount=5',
        '--set',
        'podDisruptionBudget.minAvailable=3',
        '--set',
        'podDisruptionBudget.maxUnavailable=null',
      ]),
      'PodDisruptionBudget',
    );
    assert.deepEqual(min.spec, { minAvailable: 3, selector: { matchLabels: selector } });
    const percent = one(render([...ha, '--set', 'podDisruptionBudget.maxUnavailable=34%']), 'PodDisruptionBudget');
    assert.equal((percent.spec as PdbSpec).maxUnavailable, '34%');
    const off = render([...ha, '--set', 'podDisruptionBudget.enabled=false']);
    assert.deepEqual(off.map((d) => d.kind).sort(), ['Deployment', 'Service']);
  });

  test('monitoring: ServiceMonitor and PrometheusRule pass helm lint --strict and select this release', () => {
    const monitoring = [...ha, '--set', 'metrics.serviceMonitor.enabled=true', '--set', 'metrics.prometheusRule.enabled=true'];
    const lint = helm(['lint', '--strict', chart, ...monitoring]);
    assert.equal(lint.code, 0, lint.stdout + lint.stderr);
    assert.match(lint.stdout, /1 chart\(s\) linted, 0 chart\(s\) failed/);
    // Off by default: they need the Prometheus Operator's CRDs.
    assert.ok(!render(ha).some((d) => d.kind === 'ServiceMonitor' || d.kind === 'PrometheusRule'));

    const docs = render([...monitoring, '--set', 'metrics.serviceMonitor.labels.release=kube-prometheus', '--namespace', 'relays']);
    const sm = one(docs, 'ServiceMonitor');
    assert.equal(sm.apiVersion, 'monitoring.coreos.com/v1');
    assert.equal(sm.metadata.labels?.release, 'kube-prometheus');
    const smSpec = sm.spec as ServiceMonitorSpec;
    const svc = one(docs, 'Service');
    // It selects the chart's Service (by its labels) and scrapes its port `http` at /metrics.
    for (const [k, v] of Object.entries(smSpec.selector.matchLabels)) assert.equal(svc.metadata.labels?.[k], v, `Service label ${k}`);
    assert.deepEqual(smSpec.namespaceSelector.matchNames, ['relays']);
    assert.deepEqual(smSpec.endpoints, [{ port: 'http', path: '/metrics', interval: '30s', scrapeTimeout: '10s' }]);
    assert.ok((svc.spec as ServiceSpec).ports.some((p) => p.name === smSpec.endpoints[0]!.port));

    const rule = one(docs, 'PrometheusRule');
    assert.equal(rule.apiVersion, 'monitoring.coreos.com/v1');
    const rules = (rule.spec as { groups: { name: string; rules: Rule[] }[] }).groups.flatMap((g) => g.rules);
    const byName = Object.fromEntries(rules.map((r) => [r.alert, r]));
    assert.deepEqual(Object.keys(byName).sort(), [
      'DerpmeshDatabaseSlow',
      'DerpmeshDatabaseUnreachable',
      'DerpmeshDropsRising',
      'DerpmeshNodesMissing',
      'DerpmeshPeerSlow',
      'DerpmeshPeerUnreachable',
    ]);
    for (const r of rules) {
      assert.match(r.for, /^\d+m$/, `${r.alert} for`);
      assert.equal(r.labels.severity, 'warning');
      assert.ok(r.annotations.summary && r.annotations.description.length > 60, `${r.alert} annotations`);
      // Every series of the release, and only of it: the job name a ServiceMonitor gives is the Service's.
      const selectors = r.expr.match(/derpmesh_\w+\{[^}]*\}/g) ?? [];
      assert.ok(selectors.length > 0, `${r.alert}: ${r.expr}`);
      for (const s of selectors) assert.match(s, /\{namespace="relays",job="derpmesh"\}$/, `${r.alert}: ${s}`);
    }
    assert.match(byName.DerpmeshPeerUnreachable!.expr, /derpmesh_peer_reachable\{[^}]*\}\) == 0$/);
    // The 10 ms threshold of latencyThreshold, in seconds.
    assert.match(byName.DerpmeshPeerSlow!.expr, /^derpmesh_peer_rtt_seconds\{[^}]*\} > 0\.01$/);
    assert.match(byName.DerpmeshDatabaseSlow!.expr, /^derpmesh_database_rtt_seconds\{[^}]*\} > 0\.01$/);
    assert.match(byName.DerpmeshDatabaseUnreachable!.expr, /^derpmesh_database_up\{[^}]*\} == 0$/);
    assert.match(
      byName.DerpmeshDropsRising!.expr,
      /rate\(derpmesh_dropped_packets_total\{[^}]*\}\[10m\]\)[\s\S]*derpmesh_received_packets_total[\s\S]*> 0\.01\s*$/,
    );
    assert.match(
      byName.DerpmeshNodesMissing!.expr,
      /count\(derpmesh_replicas_live\{[^}]*\}\) or vector\(0\)\) < 3 or min\(derpmesh_replicas_live\{[^}]*\}\) < 3$/,
    );
    // The alert text keeps Prometheus' templates (not expanded by Helm).
    assert.match(byName.DerpmeshPeerUnreachable!.annotations.summary, /\{\{ \$labels\.pod \}\}.*\{\{ \$labels\.peer \}\}/);

    // Thresholds and selector from values; the node count follows replicaCount.
    const tuned = one(
      render([
        ...monitoring,
        '--set',
        'replicaCount=5',
        '--set',
        'latencyThreshold=25ms',
        '--set',
        'metrics.prometheusRule.databaseSlowThreshold=0.1s',
        '--set',
        'metrics.prometheusRule.selector=app="derp"',
        '--set',
        'metrics.prometheusRule.severity=critical',
      ]),
      'PrometheusRule',
    );
    const tunedRules = (tuned.spec as { groups: { rules: Rule[] }[] }).groups.flatMap((g) => g.rules);
    const t = Object.fromEntries(tunedRules.map((r) => [r.alert, r]));
    assert.equal(t.DerpmeshPeerSlow!.expr, 'derpmesh_peer_rtt_seconds{app="derp"} > 0.025');
    assert.equal(t.DerpmeshDatabaseSlow!.expr, 'derpmesh_database_rtt_seconds{app="derp"} > 0.1');
    assert.match(t.DerpmeshNodesMissing!.expr, /< 5$/);
    assert.equal(t.DerpmeshNodesMissing!.labels.severity, 'critical');
  });
});
