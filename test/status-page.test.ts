// The live status page and `derpmesh status` against a real 3-node cluster on a real Postgres, with
// real DERP traffic between clients on different nodes, read by a real headless Chromium.
import { strict as assert } from 'node:assert';
import { copyFileSync, mkdirSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import type { Browser, Page } from 'puppeteer-core';

import type { StatusDocument } from '../src/cluster-status.js';
import { ClusterStatus, MAX_SUBSCRIBERS, ratesBetween } from '../src/cluster-status.js';
import type { TrafficSnapshot } from '../src/health.js';
import { DerpClient } from '../src/client/index.js';
import { runStatus } from './helpers/cli.js';
import { getUrl, livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { ringTraffic } from './helpers/traffic.js';
import { openWatchedPage } from './helpers/browser.js';

const HEARTBEAT_MS = 1_000;
const root = fileURLToPath(new URL('../../', import.meta.url));
const artifacts = `${root}test-artifacts`;

/** Runs `derpmesh status ...` as an operator would; resolves to its exit code and output. */

const snap = (at: number, packetsIn: number, drops = 0): TrafficSnapshot => ({
  at,
  clients: 1,
  meshConnections: 0,
  connections: 1,
  packetsIn,
  bytesIn: packetsIn * 100,
  packetsOut: packetsIn,
  bytesOut: packetsIn * 100,
  forwardedIn: 0,
  forwardedOut: 0,
  drops: { queue_full: drops },
  meshLinks: [],
});

test('rates come from counter differences; a counter that went down was reset and counts from zero', () => {
  const r = ratesBetween(snap(1_000, 100, 4), snap(3_000, 300, 10))!;
  assert.equal(r.packetsIn, 100);
  assert.equal(r.bytesIn, 10_000);
  assert.equal(r.drops, 3);
  const reset = ratesBetween(snap(1_000, 5_000), snap(2_000, 40))!;
  assert.equal(reset.packetsIn, 40, 'after a restart the new count is what arrived in the interval');
  assert.equal(ratesBetween(snap(2_000, 1), snap(2_000, 2)), null, 'no interval, no rate');
});

test('history: one point per 5 s, at most 15 minutes kept, per replica; rows gone from Postgres are forgotten', () => {
  // The registry as ClusterStatus reads it: rows with the health report each node stored.
  const t0 = Date.parse('2026-01-01T00:00:00Z');
  let now = t0;
  let rows: { id: string; packets: number }[] = [
    { id: 'a', packets: 0 },
    { id: 'b', packets: 0 },
  ];
  const replica = (r: { id: string; packets: number }) => ({
    id: r.id,
    hostname: r.id,
    regionId: 1,
    relayUrl: '',
    version: 'x',
    startedAt: new Date(t0),
    updatedAt: new Date(now),
    stoppedAt: null,
    error: '',
    databaseLatencyUs: 100,
    primary: true,
    peerLatenciesUs: {},
    health: { traffic: snap(now, r.packets) },
    ageMs: 0,
  });
  const registry = {
    self: { id: 'self', hostname: 'self' },
    replicas: () => rows.map(replica),
    peerLatencies: () => [],
    isStale: () => false,
    databaseError: () => undefined,
    databaseLatencyMs: () => 0.1,
  };
  const status = new ClusterStatus({
    registry: registry as never,
    heartbeatMs: 1_000,
    thresholdMs: 10,
    health: () => ({}) as never,
    warnings: () => [],
    logger: { warn: () => {} } as never,
  });
  // 30 minutes of heartbeats; b restarts (its counter falls to 0) at minute 20.
  for (let s = 0; s <= 30 * 60; s++) {
    now = t0 + s * 1_000;
    rows[0]!.packets += 50;
    rows[1]!.packets = s === 20 * 60 ? 0 : rows[1]!.packets + 20;
    status.sample(now);
  }
  const doc = status.document(now);
  const a = doc.nodes.find((n) => n.id === 'a')!;
  const b = doc.nodes.find((n) => n.id === 'b')!;
  assert.equal(a.history.t.length, (15 * 60) / 5, 'one point per 5 s over 15 minutes');
  assert.ok(a.history.t[0]! >= now - 15 * 60_000);
  assert.ok(a.history.packetsIn.every((v) => v === 50));
  assert.equal(a.rates!.packetsIn, 50);
  assert.ok(
    b.history.packetsIn.every((v) => v >= 0 && v <= 20),
    'a restart is no negative rate',
  );
  rows = rows.filter((r) => r.id !== 'b');
  status.sample(now + 1_000);
  assert.deepEqual(
    status.document(now + 1_000).nodes.map((n) => n.id),
    ['a'],
  );
});

describe('status page and `derpmesh status` on a 3-node cluster', { timeout: 600_000 }, () => {
  let postgres: TestPostgres;
  const nodes: NodeProcess[] = [];
  const clients: DerpClient[] = [];
  let pump: NodeJS.Timeout | undefined;
  let browser: Browser | undefined;
  let page: Page;
  let consoleErrors: string[] = [];
  let failedRequests: string[] = [];

  before(async () => {
    postgres = await startPostgres();
    for (const name of ['n1', 'n2', 'n3']) {
      const n = await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS });
      nodes.push(n);
    }
    await Promise.all(nodes.map((n) => n.started));
    await waitFor('every node listing the other two', 10_000, async () => {
      const lists = await Promise.all(nodes.map(livePeers));
      return lists.every((l) => l.length === 2);
    });
    // One client per node; packets go round n1 → n2 → n3 → n1, every hop through the mesh.
    for (const n of nodes) clients.push(await DerpClient.connect({ url: n.url }));
    // ~100 packets/s per client, with a burst of 3x every third 10 s (so the charts show change).
    pump = await ringTraffic(clients, Buffer.alloc(200, 7), (ms) => (Math.floor(ms / 10_000) % 3 === 2 ? 3 : 1));
    ({ browser, page, consoleErrors, failedRequests } = await openWatchedPage());
  });

  after(async () => {
    clearInterval(pump);
    await browser?.close().catch(() => {});
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(nodes.map((n) => n.kill9()));
    await postgres?.stop();
  });

  test('/api/v2/status: every node live with its traffic, rates and mesh links; the latency matrix', async () => {
    const [n1] = nodes as [NodeProcess];
    const { value: doc } = await waitFor('rates on every node', 15_000, async () => {
      const d = (await (await getUrl(`${n1.url}/api/v2/status`)).json()) as StatusDocument;
      return d.nodes.length === 3 && d.nodes.every((n) => (n.rates?.packetsIn ?? 0) > 0 && (n.rates?.packetsOut ?? 0) > 0) && d;
    });
    assert.equal(doc.healthy, true, `problems: ${doc.problems.join('; ')}`);
    assert.equal(doc.thresholdMs, 10);
    assert.deepEqual(doc.nodes.map((n) => [n.hostname, n.state]).sort(), [
      ['n1', 'live'],
      ['n2', 'live'],
      ['n3', 'live'],
    ]);
    for (const n of doc.nodes) {
      // ~100 packets/s in from its client and ~100/s forwarded in from the previous node's client.
      assert.ok(n.rates!.packetsIn > 20 && n.rates!.packetsIn < 1_000, `${n.hostname} packets/s in ${n.rates!.packetsIn}`);
      assert.ok(n.rates!.bytesIn > 20 * 200, `${n.hostname} bytes/s in ${n.rates!.bytesIn}`);
      assert.equal(n.traffic!.clients, 1, `${n.hostname}: one DERP client (mesh peers apart)`);
      assert.ok(n.traffic!.meshConnections >= 2, `${n.hostname}: connections from the 2 peer relays`);
      assert.equal(n.meshLinks.length, 2, `${n.hostname} links: ${JSON.stringify(n.meshLinks)}`);
      for (const l of n.meshLinks) {
        assert.ok(l.up, `${n.hostname} → ${l.url} ${l.state}`);
        assert.ok(l.peer && l.peer !== n.hostname);
      }
      assert.match(n.sections?.database.code ?? '', /^DB_(OK|SLOW)$/, 'the database reachable (slow on a loaded machine)');
      // The health report counts clients as the traffic does: the two peer relays are not clients.
      await waitFor(`${n.hostname}'s relay section counting its one client`, 10_000, async () => {
        const d = (await (await getUrl(`${n1.url}/api/v2/status`)).json()) as StatusDocument;
        return d.nodes.find((y) => y.id === n.id)!.sections?.relay.message === 'relay serving 1 client';
      });
      // The mesh link RTTs come from the probes: loopback round trips well under a second.
      await waitFor(`${n.hostname}'s links carrying RTTs`, 10_000, async () => {
        const d = (await (await getUrl(`${n1.url}/api/v2/status`)).json()) as StatusDocument;
        const x = d.nodes.find((y) => y.id === n.id)!;
        return x.meshLinks.every((l) => l.rttMs !== undefined && l.rttMs > 0 && l.rttMs < 1_000);
      });
    }
    assert.equal(doc.latency.rows.length, 3);
    const measured = doc.latency.rows.flatMap((r) => Object.values(r.to));
    assert.ok(measured.length >= 3, `round trips measured: ${JSON.stringify(doc.latency.rows)}`);
    assert.ok(measured.every((ms) => ms > 0 && ms < 1_000));
    assert.ok(doc.latency.rows.every((r) => r.databaseMs !== null && r.databaseMs > 0));
    // Secrets stay out.
    const text = await (await getUrl(`${n1.url}/api/v2/status`)).text();
    assert.doesNotMatch(text, /mesh.?key|private/i);
  });

  test('`derpmesh status`: exit 0 on a healthy cluster, every hostname printed; --json; usage and unreachable URL exit 2', async () => {
    const [n1, n2] = nodes as [NodeProcess, NodeProcess];
    const ok = await runStatus(['--url', n1.url]);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    for (const host of ['n1', 'n2', 'n3']) assert.match(ok.stdout, new RegExp(`^\\s+${host}\\*?\\s+live`, 'm'));
    assert.match(ok.stdout, /HEALTHY/);
    assert.match(ok.stdout, /Round trips \(ms/);
    assert.match(ok.stdout, /POSTGRES/);
    const viaEnv = await runStatus(['--json'], { DERPMESH_URL: n2.url });
    assert.equal(viaEnv.code, 0, viaEnv.stderr);
    const doc = JSON.parse(viaEnv.stdout) as StatusDocument;
    assert.equal(doc.reportedBy.hostname, 'n2');
    assert.equal(doc.nodes.length, 3);

    const usage = await runStatus(['--bogus']);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /unknown argument "--bogus"/);
    const badUrl = await runStatus(['--url', 'not a url']);
    assert.equal(badUrl.code, 2);
    assert.match(badUrl.stderr, /is not a URL/);
    const { freePort } = await import('./helpers/postgres.js');
    const closed = `http://127.0.0.1:${await freePort()}`;
    const unreachable = await runStatus(['--url', closed]);
    assert.equal(unreachable.code, 2);
    assert.match(unreachable.stderr, /cannot reach .*ECONNREFUSED/);
    assert.match(unreachable.stderr, /--url or DERPMESH_URL/);
  });

  test('the page: all nodes with live traffic, no console error, then a kill -9 shown within 5 s without a reload', async () => {
    const [n1, , n3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
    const response = await page.goto(`${n1.url}/status`, { waitUntil: 'load' });
    assert.equal(response?.status(), 200);
    const csp = response!.headers()['content-security-policy'] ?? '';
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'nonce-/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|https?:/);

    await page.waitForFunction(() => document.querySelectorAll('[data-node]').length === 3, { timeout: 10_000 });
    const names = await page.$$eval('[data-node]', (els) => els.map((e) => e.getAttribute('data-node')).sort());
    assert.deepEqual(names, ['n1', 'n2', 'n3']);
    // Live over the event stream (not polling), and traffic numbers that move.
    await page.waitForFunction(() => document.getElementById('conn')?.getAttribute('data-mode') === 'live', { timeout: 10_000 });
    const readTotals = () =>
      page.$$eval('[data-node]', (els) =>
        els.map((e) => ({
          node: e.getAttribute('data-node'),
          in: Number(e.querySelector('[data-field=packets]')?.getAttribute('data-in') ?? 0),
          rate: e.querySelector('[data-field=packets]')?.textContent ?? '',
        })),
      );
    const first = await readTotals();
    await page.waitForFunction(
      () =>
        [...document.querySelectorAll('[data-node]')].every((e) => {
          const text = e.querySelector('[data-field=packets]')?.textContent ?? '';
          const rateIn = Number.parseFloat(text);
          return Number.isFinite(rateIn) && rateIn > 0;
        }),
      { timeout: 15_000 },
    );
    // The page updated itself (no reload): the totals it shows grew.
    await page.evaluate(() => ((window as unknown as { marker: number }).marker = 42));
    await new Promise((r) => setTimeout(r, 2_500));
    const second = await readTotals();
    for (const s of second) {
      const f = first.find((x) => x.node === s.node)!;
      assert.ok(s.in > f.in, `${s.node}: packets in shown ${f.in} then ${s.in}`);
    }
    const linksUp = await page.$$eval('[data-link][data-up="1"]', (els) => els.length);
    assert.equal(linksUp, 6, 'each node shows its two mesh links up');
    const heat = await page.$$eval('#heatmap td', (els) => els.filter((e) => /ms/.test(e.textContent ?? '')).length);
    assert.ok(heat >= 3 + 3, `heat map cells with a round trip: ${heat}`);
    assert.equal(await page.$eval('#heatmap', (e) => e.getAttribute('data-threshold')), '10');

    // Charts need a few 5 s points: wait for lines in every node's packets/s chart, then keep a screenshot.
    await page.waitForFunction(() => [...document.querySelectorAll('[data-chart="packets/s"] polyline')].length >= 6, {
      timeout: 30_000,
      polling: 500,
    });
    await new Promise((r) => setTimeout(r, 6_000));
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: `${artifacts}/status-page.png`, fullPage: true });
    assert.ok(statSync(`${artifacts}/status-page.png`).size > 10_000);
    if (process.env.DERPMESH_UPDATE_SCREENSHOT === '1') {
      // For the README: a couple of minutes of history in the charts.
      await new Promise((r) => setTimeout(r, 100_000));
      await page.screenshot({ path: `${artifacts}/status-page.png`, fullPage: true });
      copyFileSync(`${artifacts}/status-page.png`, `${root}docs/status-page.png`);
    }
    assert.deepEqual(consoleErrors, [], 'console errors');
    assert.deepEqual(failedRequests, [], 'failed requests');

    // kill -9 one node: the page, without a reload, shows it down within 5 s.
    const killedAt = Date.now();
    await n3.kill9();
    await page.waitForFunction(() => document.querySelector('[data-node="n3"]')?.getAttribute('data-state') === 'stale', {
      timeout: 5_000,
      polling: 100,
    });
    const shownAfterMs = Date.now() - killedAt;
    console.log(`status page: n3 shown stale ${shownAfterMs} ms after kill -9`);
    assert.ok(shownAfterMs <= 5_000, `shown after ${shownAfterMs} ms`);
    assert.equal(await page.evaluate(() => (window as unknown as { marker?: number }).marker), 42, 'the page was not reloaded');
    assert.equal(await page.$eval('#cluster-health', (e) => e.textContent), 'cluster unhealthy');
    const problems = await page.$eval('#problems', (e) => e.textContent ?? '');
    assert.match(problems, /n3: stale/);
    await page.screenshot({ path: `${artifacts}/status-page-node-down.png`, fullPage: true });
    assert.deepEqual(consoleErrors, [], 'console errors');
    assert.deepEqual(failedRequests, [], 'failed requests');
  });

  test('`derpmesh status` exits 1 with a node stale, and with the database unreachable', async () => {
    const [n1] = nodes as [NodeProcess];
    const down = await runStatus(['--url', n1.url]);
    assert.equal(down.code, 1, down.stdout + down.stderr);
    assert.match(down.stdout, /UNHEALTHY/);
    assert.match(down.stdout, /n3: stale/);
    for (const host of ['n1', 'n2', 'n3']) assert.match(down.stdout, new RegExp(`^\\s+${host}\\*?\\s+(live|stale)`, 'm'));

    await postgres.stopServer();
    try {
      const { value: noDb } = await waitFor('n1 noticing the database is gone', 10_000, async () => {
        const r = await runStatus(['--url', n1.url]);
        return /database: UNREACHABLE/.test(r.stdout) && r;
      });
      assert.equal(noDb.code, 1);
    } finally {
      await postgres.startServer();
    }
  });

  test('the event stream: at most MAX_SUBSCRIBERS at once, and ended cleanly by a graceful stop', async () => {
    const [n1, n2] = nodes as [NodeProcess, NodeProcess];
    await waitFor('n1 and n2 writing heartbeats again', 20_000, async () => {
      const d = (await (await getUrl(`${n2.url}/api/v2/status`)).json()) as StatusDocument;
      return d.database.reachable && d.nodes.filter((n) => n.state === 'live').length === 2;
    });
    // The browser's page is a subscriber of n1 too: closed first, so the count below is exact.
    await page.close();
    await new Promise((r) => setTimeout(r, 500));
    const streams: { res: Response; ac: AbortController }[] = [];
    try {
      for (let i = 0; i < MAX_SUBSCRIBERS; i++) {
        const ac = new AbortController();
        const res = await fetch(`${n1.url}/api/v2/status/events`, { signal: ac.signal });
        assert.equal(res.status, 200);
        assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
        streams.push({ res, ac });
      }
      const refused = await fetch(`${n1.url}/api/v2/status/events`);
      assert.equal(refused.status, 503);
      assert.match(await refused.text(), /too many status subscribers/);
      // Closing one frees its place.
      streams.pop()!.ac.abort();
      await waitFor('a place freed', 5_000, async () => {
        const ac = new AbortController();
        const res = await fetch(`${n1.url}/api/v2/status/events`, { signal: ac.signal });
        if (res.status === 200) streams.push({ res, ac });
        else await res.text();
        return res.status === 200;
      });
    } finally {
      for (const s of streams) s.ac.abort();
    }

    // A subscriber of n2 reads events until n2 stops gracefully: the stream ends, no error.
    const res = await fetch(`${n2.url}/api/v2/status/events`);
    const reader = res.body!.getReader();
    let text = '';
    const first = await reader.read();
    text += Buffer.from(first.value ?? []).toString();
    const stopping = n2.stop();
    let ended = false;
    for (let i = 0; i < 200; i++) {
      const chunk = await reader.read();
      if (chunk.done) {
        ended = true;
        break;
      }
      text += Buffer.from(chunk.value).toString();
    }
    assert.equal(await stopping, 0);
    assert.ok(ended, 'the stream ended with the node');
    const events = text.split('\n\n').filter((e) => e.startsWith('event: status'));
    assert.ok(events.length >= 1);
    const last = JSON.parse(events.at(-1)!.split('\n')[1]!.slice('data: '.length)) as StatusDocument;
    assert.equal(last.reportedBy.hostname, 'n2');
    const { value: seen } = await waitFor('n1 showing n2 stopped', 10_000, async () => {
      const d = (await (await getUrl(`${n1.url}/api/v2/status`)).json()) as StatusDocument;
      return d.nodes.find((n) => n.hostname === 'n2')?.state === 'stopped' && d;
    });
    assert.ok(!seen.problems.some((p) => p.startsWith('n2:')), 'a graceful stop is no problem');
  });

  test('strings from the database are text on the page, never markup', async () => {
    const [n1] = nodes as [NodeProcess];
    const hostile = `<img src=x onerror="window.pwned=1"></script><script>window.pwned=2</script>&amp;'`;
    const n4 = await startNodeProcess({ name: hostile, postgresUrl: postgres.url, heartbeatMs: HEARTBEAT_MS });
    nodes.push(n4);
    await n4.started;
    await waitFor('n1 listing the new node', 10_000, async () => (await livePeers(n1)).includes(hostile));
    const html = await (await getUrl(`${n1.url}/status`)).text();
    assert.ok(!html.includes('<img src=x'), 'no raw markup from the database in the HTML');
    assert.ok(!html.includes('</script><script>window.pwned'));
    const tab = await browser!.newPage();
    const errors: string[] = [];
    tab.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
    tab.on('pageerror', (err) => errors.push((err as Error).message));
    tab.on('dialog', (d) => errors.push(`dialog: ${d.message()}`));
    await tab.goto(`${n1.url}/status`, { waitUntil: 'load' });
    await tab.waitForFunction(
      (name) => [...document.querySelectorAll('[data-node]')].some((e) => e.getAttribute('data-node') === name),
      { timeout: 10_000 },
      hostile,
    );
    const shown = await tab.$$eval('[data-node] .name', (els) => els.map((e) => e.textContent));
    assert.ok(shown.includes(hostile), `names shown: ${JSON.stringify(shown)}`);
    assert.equal(await tab.$$eval('[data-node] img', (els) => els.length), 0);
    await new Promise((r) => setTimeout(r, 1_500));
    assert.equal(await tab.evaluate(() => (window as unknown as { pwned?: number }).pwned), undefined);
    assert.deepEqual(errors, []);
    await tab.close();
  });
});
