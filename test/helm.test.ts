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
}
interface Container {
  name: string;
  image: string;
  ports: { name: string; containerPort: number }[];
  env: EnvVar[];
  readinessProbe?: Probe;
  livenessProbe?: Probe;
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
    assert.deepEqual(docs.map((d) => d.kind).sort(), ['Deployment', 'Service']);
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

    assert.deepEqual(c.readinessProbe?.httpGet, { path: '/healthz', port: 'http' });
    assert.equal(c.livenessProbe, undefined, 'no liveness probe by default');

    const pod = d.template.spec;
    const grace = parseDuration(env(c, 'DERPMESH_SHUTDOWN_GRACE').value!);
    assert.equal(grace, 5000);
    assert.ok(
      pod.terminationGracePeriodSeconds * 1000 > grace! + 2000,
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
    assert.deepEqual(c.livenessProbe?.httpGet, { path: '/healthz', port: 'http' });
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
      /terminationGracePeriodSeconds \(5\) must be longer than shutdownGrace \(5s\) plus 2s.*at least 8/,
    );
    renderFails(
      [...ha, '--set', 'shutdownGrace=1m'],
      /terminationGracePeriodSeconds \(30\) must be longer than shutdownGrace \(1m\).*at least 63/,
    );
    renderFails([...ha, '--set', 'shutdownGrace=5'], /shutdownGrace must be a duration: a number with a unit ms, s, m or h/);
    renderFails([...ha, '--set', 'heartbeatInterval=often'], /heartbeatInterval must be a duration/);
    renderFails([...ha, '--set', 'log.format=yaml'], /log.format must be json or text/);
  });

  test('shutdown grace in ms, s and m against terminationGracePeriodSeconds', () => {
    for (const [grace, seconds] of [
      ['5s', 8],
      ['1500ms', 4],
      ['1m', 63],
      ['0.5m', 33],
    ] as const) {
      const c = container(
        deployment(render([...ha, '--set', `shutdownGrace=${grace}`, '--set', `terminationGracePeriodSeconds=${seconds}`])),
      );
      assert.equal(env(c, 'DERPMESH_SHUTDOWN_GRACE').value, grace);
      renderFails(
        [...ha, '--set', `shutdownGrace=${grace}`, '--set', `terminationGracePeriodSeconds=${seconds - 1}`],
        /must be longer than shutdownGrace/,
      );
    }
  });
});
