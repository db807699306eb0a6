// Compatibility with real Tailscale clients: Tailscale's own Go DERP client (tailscale.com/derp/derphttp,
// built from the Go module proxy by test/interop/build.sh) drives the relay.
import { strict as assert } from 'node:assert';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';
import pg from 'pg';

import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { startRelay } from './helpers/relay.js';
import { goAvailable } from './helpers/tools.js';

const buildScript = fileURLToPath(new URL('../../test/interop/build.sh', import.meta.url));

const hasGo = goAvailable();
if (!hasGo) console.log('# SKIP Tailscale interop: Go is not installed, so the derphttp client cannot be built');
const opensslMissing = hasOpenssl() ? false : 'no openssl to make the private CA certificates';
if (hasGo && opensslMissing) console.log('# SKIP Tailscale interop over TLS: openssl is not installed');

interface Check {
  check: string;
  ok: boolean;
  detail: string;
}

function runInterop(
  binary: string,
  url: string,
  meshKey: string,
  websocket: boolean,
): Promise<{ code: number; checks: Check[]; stderr: string }> {
  const args = ['-url', `${url}/derp`, '-mesh-key', meshKey, '-overall-timeout', '90s'];
  if (websocket) args.push('-websocket');
  return runChecks(binary, args);
}

/** Runs the Go checker with `args`; its stdout is one JSON check per line. */
function runChecks(binary: string, args: string[], env?: NodeJS.ProcessEnv): Promise<{ code: number; checks: Check[]; stderr: string }> {
  return new Promise((resolve) => {
    execFile(binary, args, { timeout: 120_000, env }, (err, stdout, stderr) => {
      const checks = stdout
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Check);
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, checks, stderr });
    });
  });
}

/** The cluster's mesh key, which a node keeps in its Postgres (64 hex digits). */
async function readMeshKey(postgresUrl: string): Promise<string> {
  const db = new pg.Client({ connectionString: postgresUrl });
  await db.connect();
  try {
    const { rows } = await db.query<{ value: string }>("SELECT value FROM site_config WHERE key = 'mesh_key'");
    const key = rows[0]?.value ?? '';
    assert.match(key, /^[0-9a-f]{64}$/, 'mesh_key in site_config');
    return key;
  } finally {
    await db.end();
  }
}

/** The Go process's environment: trust in the private CA only from SSL_CERT_FILE (WebSocket), or none. */
function goEnv(sslCertFile?: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.SSL_CERT_FILE;
  delete env.SSL_CERT_DIR;
  if (sslCertFile) env.SSL_CERT_FILE = sslCertFile;
  return env;
}

/** A sample's value; `name` may carry labels as served (`upgrades_total{kind="fast_start"}`). */
const metricOf = (metrics: string, name: string) =>
  Number(new RegExp(`^derpmesh_${name.replace(/[{}]/g, '\\$&')} (\\d+)$`, 'm').exec(metrics)?.[1] ?? 0);

describe('Tailscale derphttp client against derpmesh', { skip: !hasGo && 'Go is not installed' }, () => {
  let built = '';
  // Built by the first test; a test selected alone (--test-name-pattern) builds it itself.
  const binary = () =>
    (built ||= execFileSync('bash', [buildScript], { encoding: 'utf8', timeout: 1_400_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim());
  test('builds the Go interop client', { timeout: 1_500_000 }, () => {
    assert.ok(binary().endsWith('derpinterop'));
  });

  for (const websocket of [false, true]) {
    test(
      `handshake, packets both ways, ping, WatchConns with the mesh key (${websocket ? 'WebSocket' : 'TCP upgrade'})`,
      { timeout: 150_000 },
      async () => {
        const meshKey = randomBytes(32).toString('hex');
        const relay = await startRelay({ meshKey });
        try {
          const { code, checks, stderr } = await runInterop(binary(), relay.url, meshKey, websocket);
          const failed = checks.filter((c) => !c.ok);
          assert.deepEqual(failed, [], `failed checks: ${JSON.stringify(failed)}\n${stderr}`);
          const names = checks.map((c) => c.check);
          for (const required of ['handshake', 'packet_a_to_b_1400', 'packet_b_to_a_1400', 'ping_pong']) {
            assert.ok(names.includes(required), `missing check ${required}: ${names.join(', ')}`);
          }
          if (!websocket) {
            for (const required of ['watch_snapshot', 'watch_new_peer', 'watch_peer_gone', 'watch_refused_without_mesh_key']) {
              assert.ok(names.includes(required), `missing check ${required}`);
            }
          }
          assert.equal(code, 0);
        } finally {
          await relay.close();
        }
      },
    );
  }

  // The same single-relay suite against a node serving https, TLS terminated by the Rust core
  // (certificates from a private CA), with the mesh key the node keeps in Postgres. TCP trusts the CA
  // with -ca-file (derphttp.Client.TLSConfig); derphttp's WebSocket dialer ignores that config and
  // uses the system roots, which Go on Linux reads from SSL_CERT_FILE. Watchers always use TCP.
  for (const websocket of [false, true]) {
    test(
      `TLS relay (private CA, TLS in the core): handshake, packets both ways, ping, WatchConns with the mesh key, refusal without (${websocket ? 'WebSocket, SSL_CERT_FILE' : 'TCP upgrade, -ca-file'})`,
      { skip: opensslMissing, timeout: 1_400_000 + 180_000 }, // the build bound (when run alone) + the run
      async () => {
        let ca: PrivateCa | undefined;
        let postgres: TestPostgres | undefined;
        let node: NodeProcess | undefined;
        try {
          ca = makePrivateCa();
          postgres = await startPostgres();
          node = await startNodeProcess({ name: `interop-tls-${websocket ? 'ws' : 'tcp'}`, postgresUrl: postgres.url, tls: ca });
          await node.started;
          const meshKey = await readMeshKey(postgres.url);
          const url = `${node.url}/derp`;
          assert.ok(url.startsWith('https://'), url);

          if (websocket) {
            // Without SSL_CERT_FILE, WebSocket does not trust the private CA: the trust below comes from it.
            const untrusted = await runChecks(binary(), ['-url', url, '-websocket', '-timeout', '5s', '-overall-timeout', '30s'], goEnv());
            const hs = untrusted.checks.find((c) => c.check === 'handshake');
            assert.ok(
              hs && !hs.ok && /certificate|x509/.test(hs.detail),
              `WebSocket without SSL_CERT_FILE: ${JSON.stringify(untrusted.checks)}`,
            );
            assert.equal(untrusted.code, 1);
            console.log(`WebSocket without SSL_CERT_FILE refused as expected: ${hs.detail}`);
          }

          const started = Date.now();
          const args = ['-url', url, '-mesh-key', meshKey, '-overall-timeout', '90s'];
          if (websocket) args.push('-websocket');
          else args.push('-ca-file', ca.caFile);
          const { code, checks, stderr } = await runChecks(binary(), args, goEnv(websocket ? ca.caFile : undefined));
          console.log(`TLS relay interop (${websocket ? 'WebSocket' : 'TCP'}): derpinterop ran ${Date.now() - started} ms`);
          for (const c of checks) console.log(`  ${c.ok ? 'ok  ' : 'FAIL'} ${c.check}: ${c.detail}`);
          const failed = checks.filter((c) => !c.ok);
          assert.deepEqual(failed, [], `failed checks: ${JSON.stringify(failed)}\n${stderr}\n${node.output()}`);
          const names = checks.map((c) => c.check);
          const required = ['handshake', 'tls_connection'];
          for (const size of [16, 1400, websocket ? 32000 : 65536]) required.push(`packet_a_to_b_${size}`, `packet_b_to_a_${size}`);
          required.push('packet_to_self', 'ping_pong', 'peer_gone_not_here', 'watch_snapshot', 'watch_present_flags', 'watch_present_addr');
          required.push(
            'watch_new_peer',
            'watch_peer_gone',
            'peer_gone_to_receiver',
            'watch_refused_without_mesh_key',
            'watch_refused_wrong_mesh_key',
          );
          if (websocket) required.push('websocket_transport');
          for (const r of required) assert.ok(names.includes(r), `missing check ${r}: ${names.join(', ')}`);
          assert.equal(code, 0, stderr);
          const metrics = await node.metrics();
          assert.ok(metricOf(metrics, 'tls_handshakes_total') >= 1, `TLS terminated in the core\n${metrics}`);
          if (!websocket)
            assert.ok(
              metricOf(metrics, 'upgrades_total{kind="fast_start"}') >= 1,
              `the Go client used fast start (meta certificate seen)\n${metrics}`,
            );
        } finally {
          await node?.kill9();
          await postgres?.stop();
          if (ca) rmSync(ca.dir, { recursive: true, force: true });
        }
      },
    );
  }

  // Two TLS nodes (certificates from a private CA) meshed over https; over TCP the Go client trusts
  // the CA with -ca-file (derphttp.Client.TLSConfig), over WebSocket with SSL_CERT_FILE (the system
  // roots: derphttp's WebSocket dialer ignores TLSConfig). Handshake for the restart step:
  // derpinterop prints the check restart_ready and reads stdin; the test sends SIGTERM to node A
  // and writes a line.
  for (const websocket of [false, true]) {
    test(
      `TLS cluster (private CA): packets both ways through the mesh, no Health problem, SIGTERM sends Restarting${websocket ? ' (WebSocket, SSL_CERT_FILE)' : ''}`,
      { skip: opensslMissing, timeout: 1_400_000 + 240_000 }, // the build bound (when run alone) + the run
      async () => {
        const HEARTBEAT_MS = 300;
        let ca: PrivateCa | undefined;
        let pg: TestPostgres | undefined;
        const nodes: NodeProcess[] = [];
        try {
          ca = makePrivateCa();
          pg = await startPostgres();
          const [a, b] = await Promise.all(
            [`interop-tls-a${websocket ? '-ws' : ''}`, `interop-tls-b${websocket ? '-ws' : ''}`].map((name) =>
              startNodeProcess({ name, postgresUrl: pg!.url, heartbeatMs: HEARTBEAT_MS, tls: ca! }),
            ),
          );
          nodes.push(a!, b!);
          await Promise.all(nodes.map((n) => n.started));
          await waitFor('each node probed its peer over https', 30_000, async () => {
            const views = await Promise.all(nodes.map((n) => n.replicas()));
            return views.every((v) => {
              const peer = v.find((r) => !r.self && r.state === 'live');
              return peer !== undefined && (peer.latency_from_here_ms !== undefined || peer.unreachable_from_here !== undefined);
            });
          });
          await new Promise((r) => setTimeout(r, 3 * HEARTBEAT_MS));

          const started = Date.now();
          const args = ['-url', `${a!.url}/derp`, '-url2', `${b!.url}/derp`];
          if (websocket) args.push('-websocket');
          else args.push('-ca-file', ca.caFile);
          args.push('-expect-no-health', '-hold', `${4 * HEARTBEAT_MS}ms`, '-wait-restarting', '-overall-timeout', '90s');
          const env = websocket ? goEnv(ca.caFile) : process.env;
          const child = spawn(binary(), args, { stdio: ['pipe', 'pipe', 'pipe'], env });
          child.stdin.on('error', () => {}); // EPIPE if it already exited
          let stderr = '';
          child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          const exited = new Promise<number | null>((resolve) => {
            child.once('exit', (code) => resolve(code));
            child.once('error', (err) => {
              stderr += `spawn error: ${err.message}\n`;
              resolve(null);
            });
          });
          const killer = setTimeout(() => child.kill('SIGKILL'), 120_000);
          const checks: Check[] = [];
          let nodeAExit: Promise<number | null> | undefined;
          let stoppedAt = 0;
          let stopMs = -1;
          for await (const line of createInterface({ input: child.stdout })) {
            if (!line.startsWith('{')) continue;
            const check = JSON.parse(line) as Check;
            checks.push(check);
            if (check.check === 'restart_ready' && check.ok) {
              stoppedAt = Date.now();
              nodeAExit = a!.stop().then((exitCode) => {
                stopMs = Date.now() - stoppedAt;
                return exitCode;
              }); // sends SIGTERM at once
              child.stdin.end('stopped\n');
            }
          }
          const code = await exited;
          clearTimeout(killer);
          const aCode = nodeAExit ? await nodeAExit : undefined;
          console.log(
            `TLS interop${websocket ? ' (WebSocket)' : ''}: derpinterop ran ${Date.now() - started} ms; node A exited ${aCode === undefined ? 'never stopped' : `${stopMs} ms after SIGTERM`}`,
          );
          for (const c of checks) console.log(`  ${c.ok ? 'ok  ' : 'FAIL'} ${c.check}: ${c.detail}`);

          const failed = checks.filter((c) => !c.ok);
          assert.deepEqual(failed, [], `failed checks: ${JSON.stringify(failed)}\n${stderr}`);
          const names = checks.map((c) => c.check);
          const required = ['two_node_handshake', 'tls_connection', 'mesh_route_a_to_b', 'mesh_route_b_to_a'];
          if (websocket) required.push('websocket_transport');
          for (const size of [16, 1400, websocket ? 32000 : 65536])
            required.push(`mesh_packet_a_to_b_${size}`, `mesh_packet_b_to_a_${size}`);
          required.push('no_health_problem', 'restart_ready', 'restarting_frame', 'other_node_unaffected');
          for (const r of required) assert.ok(names.includes(r), `missing check ${r}: ${names.join(', ')}\n${stderr}`);
          assert.equal(code, 0, `derpinterop exit code\n${stderr}`);
          assert.equal(aCode, 0, `node A exit code after SIGTERM\n${a!.output()}`);
          // TLS is terminated in the relay core, whose chain ends with Tailscale's meta certificate:
          // over TLS 1.3 the Go client reads the relay key from it and skips the 101 (fast start).
          // derpmesh's own mesh links never ask for fast start, so these are the Go client's.
          const bMetrics = await b!.metrics();
          const metric = (name: string) => metricOf(bMetrics, name);
          assert.ok(metric('tls_handshakes_total') >= 1, 'node B terminated TLS in the core');
          if (!websocket)
            assert.ok(
              metric('upgrades_total{kind="fast_start"}') >= 1,
              `the Go client used fast start on node B (meta certificate seen)\n${bMetrics}`,
            );
          console.log(
            `  node B: ${metric('tls_handshakes_total')} TLS handshakes in the core, ${metric('upgrades_total{kind="fast_start"}')} fast-start upgrades`,
          );
        } finally {
          await Promise.all(nodes.map((n) => n.kill9()));
          await pg?.stop();
          if (ca) rmSync(ca.dir, { recursive: true, force: true });
        }
      },
    );
  }

  // STUN: Tailscale's own net/stun against a node's STUN listener.
  test(
    'STUN: Tailscale net/stun gets its own address back, non-Tailscale datagrams are dropped and counted, /derpmap announces the port',
    { timeout: 1_400_000 + 120_000 }, // the build bound (when run alone) + the run
    async () => {
      let pg: TestPostgres | undefined;
      let node: NodeProcess | undefined;
      try {
        pg = await startPostgres();
        node = await startNodeProcess({ name: 'interop-stun', postgresUrl: pg.url, env: { DERPMESH_STUN_ADDRESS: '127.0.0.1:0' } });
        await node.started;
        // The DERP map tells clients where to send STUN (tailcfg.DERPNode.STUNPort; -1 = none).
        const map = (await (await fetch(`${node.url}/derpmap`)).json()) as { Regions: Record<string, { Nodes: { STUNPort: number }[] }> };
        const [stunPort] = Object.values(map.Regions).flatMap((r) => r.Nodes.map((n) => n.STUNPort));
        assert.ok(stunPort! > 0, `STUNPort ${stunPort}`);
        const { code, checks, stderr } = await runChecks(binary(), [
          '-stun',
          `127.0.0.1:${stunPort}`,
          '-timeout',
          '5s',
          '-overall-timeout',
          '60s',
        ]);
        for (const c of checks) console.log(`  ${c.ok ? 'ok  ' : 'FAIL'} ${c.check}: ${c.detail}`);
        assert.deepEqual(
          checks.filter((c) => !c.ok),
          [],
          `${stderr}\n${node.output()}`,
        );
        assert.deepEqual(
          checks.map((c) => c.check),
          ['stun_binding', 'stun_drops_non_tailscale'],
        );
        assert.equal(code, 0, stderr);
        const metrics = await node.metrics();
        assert.match(metrics, /^derpmesh_stun_answered_total [1-9]/m, metrics);
        assert.match(
          metrics,
          /^derpmesh_stun_dropped_total\{reason="malformed"\} [1-9]/m,
          'the bare RFC 5389 request and the non-STUN datagram are counted',
        );
      } finally {
        await node?.kill9();
        await pg?.stop();
      }
    },
  );
});
