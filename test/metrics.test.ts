// /metrics against a real 3-node cluster on one real Postgres, with real DERP traffic: Prometheus
// conventions, counters that move with traffic, drops under their reason, histograms, per-peer mesh
// link gauges (1, then 0 for a killed peer), process metrics; and the README's generated table.
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import pg from 'pg';

import { DerpClient } from '../src/client/index.js';
import { FrameType } from '../src/client/frame.js';
import { defaultMetricDefinitions, metricDefinitions, metricsMarkdownTable } from '../src/metrics.js';
import { getOrCreateMeshKey } from '../src/postgres/meshkey.js';
import { livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { frame, keyPair, RawConn, rawClient, sleep } from './helpers/frames.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { deliver } from './helpers/traffic.js';

const HEARTBEAT_MS = 1_000;

interface Series {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Scrape {
  text: string;
  types: Map<string, string>;
  series: Series[];
}

/** Parses the Prometheus text format strictly: every line is a comment, HELP, TYPE or a sample. */
function parse(text: string): Scrape {
  const types = new Map<string, string>();
  const series: Series[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('# HELP ')) continue;
    const type = /^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$/.exec(line);
    if (type) {
      assert.ok(!types.has(type[1]!), `# TYPE ${type[1]} twice`);
      types.set(type[1]!, type[2]!);
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `not a sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    // Prometheus parses values as Go's ParseFloat does: NaN in any case (prom-client writes "Nan").
    const value = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : /^nan$/i.test(m[3]!) ? NaN : Number(m[3]);
    assert.ok(/^nan$/i.test(m[3]!) || !Number.isNaN(value), `bad value in ${line}`);
    series.push({ name: m[1]!, labels, value });
  }
  return { text, types, series };
}

/** The family a sample belongs to (a histogram's `_bucket`, `_sum`, `_count` lines belong to it). */
function familyOf(name: string, types: Map<string, string>): string | undefined {
  if (types.has(name)) return name;
  const base = name.replace(/_(bucket|sum|count)$/, '');
  return types.get(base) === 'histogram' || types.get(base) === 'summary' ? base : undefined;
}

/** The value of one series; `labels` must match exactly. Undefined when absent. */
function value(s: Scrape, name: string, labels: Record<string, string> = {}): number | undefined {
  const key = JSON.stringify(Object.entries(labels).sort());
  return s.series.find((x) => x.name === name && JSON.stringify(Object.entries(x.labels).sort()) === key)?.value;
}

const must = (s: Scrape, name: string, labels: Record<string, string> = {}): number => {
  const v = value(s, name, labels);
  assert.ok(v !== undefined, `no ${name}${JSON.stringify(labels)} in\n${s.text}`);
  return v;
};

describe('/metrics', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  let meshKey: string;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];
  const scrape = async (n: NodeProcess) => parse(await n.metrics());
  const client = async (n: NodeProcess, meshKey?: string) => {
    const c = await DerpClient.connect({ url: n.url, meshKey });
    clients.push(c);
    return c;
  };

  before(async () => {
    postgres = await startPostgres();
    for (const name of ['m1', 'm2', 'm3']) {
      const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS });
      nodes.push(n);
      await n.started;
    }
    await waitFor('every node listing the other two', 10_000, async () => {
      const lists = await Promise.all(nodes.map(livePeers));
      return lists.every((l) => l.length === 2);
    });
    // The cluster's mesh key, as the nodes stored it (for a mesh client, and to check it never shows).
    const pool = new pg.Pool({ connectionString: postgres.url, max: 1 });
    pool.on('error', () => {});
    meshKey = await getOrCreateMeshKey(pool);
    await pool.end();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('follows the conventions: TYPE for every family, counters end in _total, no duplicate series, every declared metric', async () => {
    // The Postgres round trip is measured by the heartbeat: present from the first one on.
    const { value: s } = await waitFor('a database round trip on m1', 5 * HEARTBEAT_MS, async () => {
      const s = await scrape(nodes[0]!);
      return value(s, 'derpmesh_database_rtt_seconds') !== undefined && s;
    });
    const seen = new Set<string>();
    for (const x of s.series) {
      const family = familyOf(x.name, s.types);
      assert.ok(family, `${x.name} has no # TYPE`);
      const key = `${x.name}${JSON.stringify(Object.entries(x.labels).sort())}`;
      assert.ok(!seen.has(key), `duplicate series ${key}`);
      seen.add(key);
    }
    for (const [name, type] of s.types) {
      if (type === 'counter') assert.match(name, /_total$/, `counter ${name} does not end in _total`);
      if (name.startsWith('derpmesh_')) {
        assert.doesNotMatch(name, /_(micros|millis|ms|us)(_|$)/, `${name}: units in base units (_seconds, _bytes)`);
        if (name.endsWith('_total')) assert.equal(type, 'counter', `${name} ends in _total but is a ${type}`);
      }
    }
    // Exactly the declared derpmesh metrics, each with its declared type.
    const served = [...s.types].filter(([n]) => n.startsWith('derpmesh_'));
    assert.deepEqual(served.map(([n, t]) => `${n} ${t}`).sort(), metricDefinitions.map((d) => `${d.name} ${d.type}`).sort());
    // Labels as declared.
    for (const x of s.series) {
      const d = metricDefinitions.find((m) => m.name === familyOf(x.name, s.types));
      if (!d) continue;
      const names = Object.keys(x.labels).filter((l) => !(d.type === 'histogram' && l === 'le'));
      assert.deepEqual(names.sort(), Object.keys(d.labels).sort(), `labels of ${x.name}`);
    }
    // The names the dashboard, the alerts and the status page rely on.
    for (const name of [
      'derpmesh_clients',
      'derpmesh_connections',
      'derpmesh_replicas_live',
      'derpmesh_database_up',
      'derpmesh_database_rtt_seconds',
      'derpmesh_pubsub_connected',
      'derpmesh_accepts_total',
      'derpmesh_received_packets_total',
      'derpmesh_received_bytes_total',
      'derpmesh_sent_packets_total',
      'derpmesh_sent_bytes_total',
      'derpmesh_handshake_duration_seconds_count',
      'derpmesh_queue_wait_seconds_count',
    ]) {
      assert.ok(
        s.series.some((x) => x.name === name),
        `no ${name}`,
      );
    }
    assert.equal(must(s, 'derpmesh_replicas_live'), 3);
    assert.equal(must(s, 'derpmesh_database_up'), 1);
    assert.equal(must(s, 'derpmesh_pubsub_connected'), 1);
    const rtt = must(s, 'derpmesh_database_rtt_seconds');
    assert.ok(rtt > 0 && rtt < 1, `database round trip ${rtt} s`);
    for (const reason of ['unknown_dest', 'unknown_dest_on_fwd', 'queue_full', 'gone']) {
      assert.equal(typeof must(s, 'derpmesh_dropped_packets_total', { reason }), 'number');
    }
    // prom-client's default process metrics, on this node's registry.
    for (const name of ['process_resident_memory_bytes', 'process_open_fds', 'nodejs_heap_size_used_bytes', 'process_cpu_seconds_total']) {
      assert.ok(must(s, name) > 0, `${name} > 0`);
    }
    assert.ok(must(s, 'nodejs_eventloop_lag_seconds') >= 0); // measured after the scrape: 0 on the first
    // No secret: the mesh key is nowhere in the exposition.
    assert.ok(meshKey.length >= 32);
    assert.ok(!s.text.includes(meshKey), 'the mesh key appears on /metrics');
  });

  test('packet and byte counters move with real traffic across the mesh; histograms have observations', async () => {
    const [m1, , m3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    const a = await client(m1);
    const b = await client(m3);
    await deliver(a, b); // the mesh knows b now
    const [before1, before3] = await Promise.all([scrape(m1), scrape(m3)]);
    const N = 200;
    const SIZE = 1000;
    let got = 0;
    const arrived = new Promise<void>((resolve) =>
      b.on('packet', (src: Buffer, data: Buffer) => {
        if (src.equals(a.publicKey) && data.length === SIZE && data[0] === 0xab && ++got === N) resolve();
      }),
    );
    for (let i = 0; i < N; i++) a.send(b.publicKey, Buffer.alloc(SIZE, 0xab));
    await Promise.race([arrived, sleep(10_000).then(() => assert.fail(`${got} of ${N} packets arrived`))]);
    const [after1, after3] = await Promise.all([scrape(m1), scrape(m3)]);
    const delta = (b: Scrape, a: Scrape, name: string, labels: Record<string, string> = {}) =>
      must(a, name, labels) - must(b, name, labels);

    assert.ok(delta(before1, after1, 'derpmesh_received_packets_total') >= N, 'm1 received the packets');
    assert.ok(delta(before1, after1, 'derpmesh_received_bytes_total') >= N * SIZE, 'm1 received the bytes');
    assert.ok(delta(before1, after1, 'derpmesh_forwarded_packets_total', { direction: 'out' }) >= N, 'm1 forwarded them');
    assert.ok(delta(before3, after3, 'derpmesh_forwarded_packets_total', { direction: 'in' }) >= N, 'm3 got them forwarded');
    assert.ok(delta(before3, after3, 'derpmesh_sent_packets_total') >= N, 'm3 sent them to b');
    assert.ok(delta(before3, after3, 'derpmesh_sent_bytes_total') >= N * SIZE, 'm3 sent the bytes');
    assert.equal(must(after1, 'derpmesh_clients') >= 1, true);

    // Histograms: every client handshake timed; a sampled packet's queue wait on the receiving node.
    for (const [s, what] of [
      [after1, 'm1'],
      [after3, 'm3'],
    ] as const) {
      const count = must(s, 'derpmesh_handshake_duration_seconds_count');
      assert.ok(count >= 1, `${what}: handshakes timed`);
      assert.equal(must(s, 'derpmesh_handshake_duration_seconds_bucket', { le: '+Inf' }), count);
      const sum = must(s, 'derpmesh_handshake_duration_seconds_sum');
      assert.ok(sum > 0 && sum / count < 10, `${what}: mean handshake ${sum / count} s`);
      // Buckets are cumulative: never decreasing with `le`.
      const buckets = s.series
        .filter((x) => x.name === 'derpmesh_handshake_duration_seconds_bucket')
        .map((x) => [Number(x.labels.le === '+Inf' ? Infinity : x.labels.le), x.value] as const)
        .sort((p, q) => p[0] - q[0]);
      for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]![1] >= buckets[i - 1]![1], `buckets of ${what} cumulative`);
    }
    const waits = delta(before3, after3, 'derpmesh_queue_wait_seconds_count');
    assert.ok(waits >= Math.floor(N / 64), `m3 timed ${waits} packets' queue wait (1 in 64 of ${N})`);
    assert.ok(waits <= N / 64 + 2, `m3 timed ${waits} packets' queue wait: sampled, not every packet`);
    assert.ok(must(after3, 'derpmesh_queue_wait_seconds_sum') >= 0);
  });

  test('each provoked drop shows up under its reason', async () => {
    const [m1, m2] = nodes as [NodeProcess, NodeProcess];
    const reasonOf = async (n: NodeProcess, reason: string) => must(await scrape(n), 'derpmesh_dropped_packets_total', { reason });

    // unknown_dest: a key no relay of the cluster has.
    const unknownBefore = await reasonOf(m1, 'unknown_dest');
    const a = await client(m1);
    for (let i = 0; i < 5; i++) a.send(keyPair().publicKey, Buffer.from('to nobody'));
    await waitFor('unknown_dest drops on m1', 5_000, async () => (await reasonOf(m1, 'unknown_dest')) >= unknownBefore + 5);

    // unknown_dest_on_fwd: a mesh peer forwards a packet for a client m2 does not have.
    const onFwdBefore = await reasonOf(m2, 'unknown_dest_on_fwd');
    const mesh = await client(m2, meshKey);
    for (let i = 0; i < 3; i++) mesh.forwardPacket(keyPair().publicKey, keyPair().publicKey, Buffer.from('forwarded to nobody'));
    await waitFor('unknown_dest_on_fwd drops on m2', 5_000, async () => (await reasonOf(m2, 'unknown_dest_on_fwd')) >= onFwdBefore + 3);

    // queue_full: a receiver that stops reading, flooded until its queue overflows.
    const fullBefore = await reasonOf(m1, 'queue_full');
    const stalled = await rawClient(m1.port);
    stalled.socket!.pause();
    const flooder = await client(m1);
    const big = Buffer.alloc(60_000, 2);
    const started = Date.now();
    let full = fullBefore;
    while (full === fullBefore && Date.now() - started < 10_000) {
      for (let i = 0; i < 50; i++) flooder.send(stalled.keys.publicKey, big);
      await sleep(20);
      full = await reasonOf(m1, 'queue_full');
    }
    assert.ok(full > fullBefore, 'queue_full drops rise');
    // The queue depth gauges, computed at scrape time from the client queues: the stalled client's
    // queue is at its limit (--queue-depth, 512 by default; the oldest packet makes room).
    const stuck = await scrape(m1);
    assert.equal(must(stuck, 'derpmesh_queue_depth_max'), 512);
    assert.ok(must(stuck, 'derpmesh_queued_packets') >= 512);
    stalled.destroy();
    await waitFor(
      'the queue emptied once the stalled client left',
      5_000,
      async () => must(await scrape(m1), 'derpmesh_queued_packets') === 0,
    );
  });

  test('a failed handshake shows up under its reason', async () => {
    const m1 = nodes[0]!;
    const failures = async (reason: string) => must(await scrape(m1), 'derpmesh_handshake_failures_total', { reason });
    const before = await failures('bad_first_frame');
    const ioBefore = await failures('io');
    // A SendPacket where ClientInfo must come first.
    const conn = await RawConn.tcp(m1.port, { after: frame(FrameType.SendPacket, keyPair().publicKey, Buffer.from('early')) });
    await conn.waitClosed();
    await waitFor('bad_first_frame counted on m1', 5_000, async () => (await failures('bad_first_frame')) === before + 1);
    assert.equal(await failures('io'), ioBefore, 'counted under its own reason only');
  });

  test('per-peer gauges: mesh links up and peers reachable in a 3-node cluster; a killed peer turns 0', async () => {
    const [m1, m2, m3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    const s = await waitFor('m1 with both mesh links up', 10_000, async () => {
      const s = await scrape(m1);
      return must(s, 'derpmesh_mesh_link_up', { peer: m2.url }) === 1 && value(s, 'derpmesh_mesh_link_up', { peer: m3.url }) === 1 && s;
    });
    const links = s.value.series.filter((x) => x.name === 'derpmesh_mesh_link_up');
    assert.deepEqual(links.map((x) => x.labels.peer).sort(), [m2.url, m3.url].sort(), 'one link gauge per peer, none for itself');
    assert.equal(must(s.value, 'derpmesh_mesh_links'), 2);
    const peerIds = new Map<string, string>();
    await waitFor('m1 probed both peers', 10_000, async () => {
      const s = await scrape(m1);
      for (const x of s.series.filter((x) => x.name === 'derpmesh_peer_reachable' && x.value === 1))
        peerIds.set(x.labels.peer!, x.labels.peer_id!);
      return peerIds.size === 2;
    });
    const probed = await scrape(m1);
    for (const peer of ['m2', 'm3']) {
      const labels = { peer, peer_id: peerIds.get(peer)! };
      const rtt = must(probed, 'derpmesh_peer_rtt_seconds', labels);
      assert.ok(rtt > 0 && rtt < 1, `rtt to ${peer}: ${rtt} s`);
      assert.equal(must(probed, 'derpmesh_peer_slow', labels), 0);
    }

    await m3.kill9();
    // The link to the dead peer goes down at once (0) until the registry drops the peer (3
    // heartbeats), after which its series is gone; the link to m2 stays up.
    const down = await waitFor('m1 showing its link to m3 down', 5_000, async () => {
      const s = await scrape(m1);
      return value(s, 'derpmesh_mesh_link_up', { peer: m3.url }) === 0 && s;
    });
    assert.equal(must(down.value, 'derpmesh_mesh_link_up', { peer: m2.url }), 1);
    await waitFor('m1 dropping m3', 10_000, async () => (await livePeers(m1)).join() === 'm2');
    const gone = await scrape(m1);
    assert.equal(value(gone, 'derpmesh_mesh_link_up', { peer: m3.url }), undefined);
    assert.equal(must(gone, 'derpmesh_mesh_link_up', { peer: m2.url }), 1);
    assert.equal(must(gone, 'derpmesh_replicas_live'), 2);
  });

  test("the README's metrics table is the one generated from the code", async () => {
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    const m = /<!-- metrics-table:start -->\n([\s\S]*?)\n<!-- metrics-table:end -->/.exec(readme);
    assert.ok(m, 'README.md has the metrics-table markers');
    assert.equal(
      m[1],
      metricsMarkdownTable(await defaultMetricDefinitions()),
      'README out of date: run `npm run build:ts && node scripts/sync-readme.mjs`',
    );
  });
});
