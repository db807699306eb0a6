// `derpmesh ping` against real clusters (real node processes on a real Postgres, real DERP clients
// through the mesh), and the progress display of ping and bench: silent when not on a terminal,
// drawn on a real pseudo-terminal (util-linux `script`) when on one.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { createProgress, fitLine, secondsOf } from '../src/progress.js';
import type { PingReport } from '../src/ping-command.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { runCli, type CliResult } from './helpers/cli.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
/** Heartbeat of the plain cluster: 3 missed (6 s) before a killed node is stale, time for ping to find it listed live. */
const HEARTBEAT_MS = 2_000;

/** Every node's own health says its relay is meshed with all `peers` others (links up, not just listed). */
async function meshed(nodes: NodeProcess[], peers: number): Promise<boolean> {
  const reports = await Promise.all(nodes.map((n) => n.health()));
  return reports.every((h, i) => {
    const own = h.nodes.find((x) => x.hostname === nodes[i]!.name);
    return own?.sections.mesh.code === 'MESH_OK' && own.sections.mesh.message.includes(`meshed with ${peers} peer`);
  });
}

/** `derpmesh ARGS` as a child process (not a terminal), bounded to 60 s. */
const derpmesh = (args: string[]): Promise<CliResult> => runCli(args);

/** `derpmesh ARGS` on a pseudo-terminal (util-linux `script`): what a person at a terminal sees. */
function derpmeshOnTerminal(args: string[]): CliResult {
  const command = [process.execPath, cli, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const started = Date.now();
  const r = spawnSync('script', ['-qec', command, '/dev/null'], {
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, COLUMNS: '200' },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - started };
}

const hasScript = spawnSync('script', ['--version'], { encoding: 'utf8' }).status === 0;

function parseReport(run: CliResult): PingReport {
  try {
    return JSON.parse(run.stdout) as PingReport;
  } catch {
    throw new Error(`ping --json printed no JSON (exit ${run.code}):\n${run.stdout}\n${run.stderr}`);
  }
}

const pairNames = (r: PingReport, ok: boolean) =>
  r.pairs
    .filter((p) => p.ok === ok)
    .map((p) => `${p.from}>${p.to}`)
    .sort();

describe('derpmesh ping: a 3-node cluster on one Postgres', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];

  before(async () => {
    postgres = await startPostgres();
    for (const name of ['p1', 'p2', 'p3']) {
      const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS });
      nodes.push(n);
      await n.started;
    }
    await waitFor('every node listing the other two', 20_000, async () => {
      const lists = await Promise.all(nodes.map(livePeers));
      return lists[0]!.join() === 'p2,p3' && lists[1]!.join() === 'p1,p3' && lists[2]!.join() === 'p1,p2';
    });
    await waitFor('every mesh link up', 20_000, () => meshed(nodes, 2), 200);
  });
  after(async () => {
    for (const n of nodes) if (n.child.signalCode === null && n.child.exitCode === null) n.child.kill('SIGCONT');
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('all 6 ordered pairs deliver every packet through the mesh: exit 0, a table per pair', async () => {
    const json = await derpmesh(['ping', '--url', nodes[1]!.url, '--count', '20', '--json']);
    assert.equal(json.code, 0, json.stdout + json.stderr);
    assert.equal(json.stderr, '', 'no progress or other output on stderr when it is not a terminal');
    const report = parseReport(json);
    assert.equal(report.ok, true);
    assert.deepEqual(report.nodes.map((n) => [n.name, n.url, n.connected]).sort(), [
      ['p1', nodes[0]!.url, true],
      ['p2', nodes[1]!.url, true],
      ['p3', nodes[2]!.url, true],
    ]);
    assert.deepEqual(pairNames(report, true), ['p1>p2', 'p1>p3', 'p2>p1', 'p2>p3', 'p3>p1', 'p3>p2']);
    for (const p of report.pairs) {
      assert.equal(p.sent, 20);
      assert.equal(p.delivered, 20, `${p.from}>${p.to}`);
      assert.equal(p.echoed, 20, `${p.from}>${p.to}`);
      assert.equal(p.loss, 0);
      assert.ok(p.rttP50Ms! > 0 && p.rttP50Ms! <= p.rttMaxMs! && p.rttMaxMs! < 5_000, `${p.from}>${p.to}: ${p.rttP50Ms} / ${p.rttMaxMs}`);
    }
    const rtts = report.pairs.map((p) => p.rttP50Ms!);
    console.log(
      `ping: 6 pairs × 20 packets, rtt p50 ${Math.min(...rtts).toFixed(2)}-${Math.max(...rtts).toFixed(2)} ms, max ${Math.max(...report.pairs.map((p) => p.rttMaxMs!)).toFixed(2)} ms, run ${json.ms} ms`,
    );

    const text = await derpmesh(['ping', '--url', nodes[0]!.url]);
    assert.equal(text.code, 0, text.stdout + text.stderr);
    assert.match(text.stdout, /^FROM +TO +SENT +DELIVERED +ECHOED +LOSS +RTT P50 +RTT MAX +RESULT$/m);
    for (const [a, b] of [
      ['p1', 'p2'],
      ['p1', 'p3'],
      ['p2', 'p1'],
      ['p2', 'p3'],
      ['p3', 'p1'],
      ['p3', 'p2'],
    ])
      assert.match(text.stdout, new RegExp(`^${a} +${b} +5 +5 +5 +0 % +[0-9.]+ ms +[0-9.]+ ms +ok$`, 'm'));
    assert.match(text.stdout, /^OK: every pair delivered all 5 packets$/m);
  });

  test('usage errors exit 2 with what was wrong', async () => {
    const none = await derpmesh(['ping']);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /needs --url/);
    const count = await derpmesh(['ping', '--url', nodes[0]!.url, '--count', 'many']);
    assert.equal(count.code, 2);
    assert.match(count.stderr, /--count must be an integer/);
    const both = await derpmesh(['ping', '--url', nodes[0]!.url, '--node', nodes[1]!.url]);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /--url or --node, not both/);
    const unknown = await derpmesh(['ping', '--url', nodes[0]!.url, '--frobnicate']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /frobnicate/);
    const ca = await derpmesh(['ping', '--url', nodes[0]!.url, '--ca-file', '/nonexistent/ca.pem']);
    assert.equal(ca.code, 2);
    assert.match(ca.stderr, /--ca-file "\/nonexistent\/ca.pem" cannot be read/);
  });

  test(
    'progress: nothing when not a terminal; one redrawn line on a pseudo-terminal (ping and bench)',
    { skip: !hasScript && 'no util-linux script' },
    async () => {
      const plain = await derpmesh(['ping', '--url', nodes[0]!.url]);
      assert.equal(plain.code, 0);
      assert.equal(plain.stderr, '');
      assert.doesNotMatch(plain.stdout, /\r|\x1b|pairs \d/);

      const tty = derpmeshOnTerminal(['ping', '--url', nodes[0]!.url]);
      assert.equal(tty.code, 0, tty.stdout);
      assert.match(tty.stdout, /\r\x1b\[Kping: connecting \d\/3/);
      assert.match(tty.stdout, /\r\x1b\[Kping: pairs \d\/6, p\d → p\d/);
      // The line is erased before the report: the table starts on a clean line.
      assert.match(tty.stdout, /\r\x1b\[K(\r\n)?derpmesh ping: 3 nodes, 6 ordered pairs/);

      const bench = [
        'bench',
        '--url',
        nodes[0]!.url,
        '--receiver-url',
        nodes[1]!.url,
        '--pairs',
        '1',
        '--duration',
        '2s',
        '--warmup',
        '1s',
        '--rate',
        '100',
      ];
      const benchPlain = await derpmesh(bench);
      assert.equal(benchPlain.code, 0, benchPlain.stderr);
      assert.equal(benchPlain.stderr, '', 'bench prints no progress into a pipe');
      const benchTty = derpmeshOnTerminal(bench);
      assert.equal(benchTty.code, 0, benchTty.stdout);
      assert.match(benchTty.stdout, /\r\x1b\[Kbench http:\/\/127\.0\.0\.1:\d+: warm-up 0 s of 1 s/);
      assert.match(benchTty.stdout, /\r\x1b\[Kbench http:\/\/127\.0\.0\.1:\d+: 1 s of 2 s, 1 pairs/);
      assert.match(benchTty.stdout, /packets\/s/);
    },
  );

  test('a frozen node (SIGSTOP): its pairs fail within the timeout, named; the others deliver; exit 1', async () => {
    const [p1, p2, p3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    p3.child.kill('SIGSTOP');
    try {
      const run = await derpmesh(['ping', '--node', p1.url, '--node', p2.url, '--node', p3.url, '--timeout', '1s', '--json']);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      const r = parseReport(run);
      assert.equal(r.ok, false);
      const p3name = new URL(p3.url).host;
      const frozen = r.nodes.find((n) => n.name === p3name)!;
      assert.equal(frozen.connected, false);
      assert.match(frozen.error!, /1000 ms|timed? ?out/i);
      const [a, b, c] = [p1, p2, p3].map((n) => new URL(n.url).host);
      assert.deepEqual(pairNames(r, true), [`${a}>${b}`, `${b}>${a}`].sort());
      assert.deepEqual(pairNames(r, false), [`${a}>${c}`, `${b}>${c}`, `${c}>${a}`, `${c}>${b}`].sort());
      for (const p of r.pairs.filter((x) => !x.ok)) assert.match(p.error!, new RegExp(`${c} unreachable`));
      assert.ok(run.ms < 15_000, `took ${run.ms} ms with a 1 s timeout`);
    } finally {
      p3.child.kill('SIGCONT');
    }
    await waitFor('p3 live again', 20_000, async () => (await livePeers(p1)).join() === 'p2,p3');
    await waitFor('every mesh link up again', 20_000, () => meshed(nodes, 2), 200);
  });

  test('kill -9 before the registry marks it stale: exit 1, the failing pairs and the dead node named', async () => {
    const [p1, , p3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    await p3.kill9();
    const run = await derpmesh(['ping', '--url', p1.url, '--timeout', '2s']);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    // Still listed live (6 s to go stale), so checked, and found dead.
    assert.match(run.stdout, /^p3 +999 +http:\/\/127\.0\.0\.1:\d+ +FAILED: .*(ECONNREFUSED|refused)/m);
    for (const [a, b] of [
      ['p1', 'p3'],
      ['p2', 'p3'],
      ['p3', 'p1'],
      ['p3', 'p2'],
    ])
      assert.match(run.stdout, new RegExp(`^${a} +${b} +0 +0 +0 +100 % +- +- +FAILED: p3 unreachable`, 'm'));
    assert.match(run.stdout, /^p1 +p2 +5 +5 +5 +0 % .* ok$/m);
    assert.match(run.stdout, /^p2 +p1 +5 +5 +5 +0 % .* ok$/m);
    assert.match(run.stdout, /^FAILED: 4 of 6 pairs: p1 → p3, p2 → p3, p3 → p1, p3 → p2$/m);
    assert.match(run.stdout, /^FAILED: unreachable: p3 /m);

    // Once stale, it is listed as not checked, and the rest of the cluster passes.
    await waitFor('p3 stale at p1', 20_000, async () => (await livePeers(p1)).join() === 'p2');
    const later = await derpmesh(['ping', '--url', p1.url]);
    assert.equal(later.code, 0, later.stdout + later.stderr);
    assert.match(later.stdout, /not checked: p3: the registry lists it stale/);
  });

  test('the cluster cannot be asked: exit 1, why', async () => {
    const run = await derpmesh(['ping', '--url', 'http://127.0.0.1:1']);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /cannot list the replicas: GET http:\/\/127\.0\.0\.1:1\/api\/v2\/replicas: .*ECONNREFUSED/);
  });
});

describe('derpmesh ping over TLS with a private CA', { timeout: 600_000, skip: !hasOpenssl() && 'no openssl' }, () => {
  let postgres: TestPostgres;
  let ca: PrivateCa;
  const nodes: NodeProcess[] = [];

  before(async () => {
    postgres = await startPostgres();
    ca = makePrivateCa();
    for (const name of ['t1', 't2', 't3']) {
      const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: 500, tls: ca });
      nodes.push(n);
      await n.started;
    }
    await waitFor('every TLS node listing the other two', 20_000, async () => {
      const lists = await Promise.all(nodes.map(livePeers));
      return lists.every((l) => l.length === 2);
    });
    await waitFor('every TLS mesh link up', 20_000, () => meshed(nodes, 2), 200);
  });
  after(async () => {
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('--ca-file: every pair over https delivers; without it the certificate is refused (exit 1, why)', async () => {
    const run = await derpmesh(['ping', '--url', nodes[0]!.url, '--ca-file', ca.caFile, '--count', '10', '--json']);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    const r = parseReport(run);
    assert.equal(r.pairs.length, 6);
    assert.ok(r.nodes.every((n) => n.url.startsWith('https://127.0.0.1:')));
    assert.ok(r.pairs.every((p) => p.ok && p.delivered === 10 && p.echoed === 10));

    const untrusted = await derpmesh(['ping', '--url', nodes[0]!.url]);
    assert.equal(untrusted.code, 1);
    assert.match(untrusted.stderr, /cannot list the replicas: .*(self[- ]signed|certificate)/i);
    // Relay URLs given directly: the DERP clients' TLS handshakes are refused, every node named.
    const direct = await derpmesh(['ping', ...nodes.flatMap((n) => ['--node', n.url]), '--timeout', '2s']);
    assert.equal(direct.code, 1);
    assert.match(direct.stdout, /FAILED: unreachable: .*certificate/i);
  });
});

describe('progress display (unit)', () => {
  const fake = (isTTY: boolean, columns?: number) => {
    const writes: string[] = [];
    return { writes, stream: { isTTY, columns, write: (t: string) => writes.push(t) } };
  };

  test('silent when the stream is not a terminal', () => {
    const { writes, stream } = fake(false);
    const p = createProgress(stream);
    assert.equal(p.active, false);
    p.update('pairs 1/6', true);
    p.done();
    assert.deepEqual(writes, []);
  });

  test('on a terminal: one line redrawn in place, throttled, cut to the width, erased at the end', () => {
    let now = 1_000;
    const { writes, stream } = fake(true, 20);
    const p = createProgress(stream, { minIntervalMs: 100, now: () => now });
    p.update('pairs 1/6');
    p.update('pairs 2/6'); // within 100 ms: skipped
    now += 100;
    p.update('pairs 3/6');
    p.update('pairs 4/6 with a long tail that does not fit', true);
    p.done();
    p.update('pairs 5/6', true); // after done: ignored
    assert.deepEqual(writes, ['\r\x1b[Kpairs 1/6', '\r\x1b[Kpairs 3/6', '\r\x1b[Kpairs 4/6 with a l…', '\r\x1b[K']);
    assert.equal(fitLine('a\nb'), 'a b');
    assert.equal(secondsOf(12_400, 30_000), '12 s of 30 s');
    assert.equal(secondsOf(31_000, 30_000), '30 s of 30 s');
  });
});
