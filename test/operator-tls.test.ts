// The operator's view on the production path: a 3-node cluster serving HTTPS with a private CA (as
// in Kubernetes with cert-manager), meshed over TLS, with DERP traffic between TLS clients on
// different nodes. The status page in a real headless Chromium that trusts only the cluster's key,
// its event stream over TLS, /metrics counting the packets through the TLS mesh, and a kill -9 seen
// by all three within 5 s. (test/status-page.test.ts and test/metrics.test.ts do the same in depth
// over plain HTTP.)
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import type { Browser, Page } from 'puppeteer-core';

import type { StatusDocument } from '../src/cluster-status.js';
import { DerpClient } from '../src/client/index.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { runStatus } from './helpers/cli.js';
import { getUrl, livePeers, startNodeProcess, waitFor, type NodeProcess } from './helpers/cluster.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { ringTraffic } from './helpers/traffic.js';
import { openWatchedPage } from './helpers/browser.js';

/** Chromium's `--ignore-certificate-errors-spki-list` entry for a certificate: base64 SHA-256 of its public key. */
function spkiHash(certFile: string): string {
  const pub = execFileSync('openssl', ['x509', '-in', certFile, '-noout', '-pubkey']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  return execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
}

/** The value of one sample in a Prometheus text exposition, if present. */
function sample(text: string, name: string, labels = ''): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels ? `{${labels}}` : ''} `));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
}

describe(
  'the operator view over TLS (3 HTTPS nodes, private CA, TLS mesh)',
  { timeout: 600_000, skip: !hasOpenssl() && 'no openssl' },
  () => {
    let postgres: TestPostgres;
    let ca: PrivateCa;
    const nodes: NodeProcess[] = [];
    const clients: DerpClient[] = [];
    let pump: NodeJS.Timeout | undefined;
    let browser: Browser | undefined;
    let page: Page;
    let consoleErrors: string[] = [];
    let failedRequests: string[] = [];

    before(async () => {
      ca = makePrivateCa();
      postgres = await startPostgres();
      for (const name of ['t1', 't2', 't3'])
        nodes.push(await startNodeProcess({ name, postgresUrl: postgres.url, heartbeatMs: 1_000, tls: ca }));
      await Promise.all(nodes.map((n) => n.started));
      await waitFor('every TLS node listing the other two', 20_000, async () =>
        (await Promise.all(nodes.map(livePeers))).every((l) => l.length === 2),
      );
      const caPem = readFileSync(ca.caFile);
      for (const n of nodes) clients.push(await DerpClient.connect({ url: n.url, tls: { ca: caPem } }));
      // Every hop crosses the TLS mesh: t1's client → t2's, t2's → t3's, t3's → t1's.
      pump = await ringTraffic(clients, Buffer.alloc(200, 9));
      // Chromium trusts the cluster's certificate by its key only (no CA store change, no blanket
      // "ignore certificate errors"): any other certificate is still refused.
      ({ browser, page, consoleErrors, failedRequests } = await openWatchedPage([
        `--ignore-certificate-errors-spki-list=${spkiHash(ca.certFile)}`,
      ]));
    });

    after(async () => {
      clearInterval(pump);
      await browser?.close().catch(() => {});
      await Promise.all(clients.map((c) => c.close().catch(() => {})));
      await Promise.all(nodes.map((n) => n.kill9()));
      await postgres?.stop();
    });

    test('/metrics over TLS: packets counted through the TLS mesh, TLS handshakes counted, every link up', async () => {
      const caPem = readFileSync(ca.caFile);
      for (const n of nodes) {
        const { value: text } = await waitFor(`${n.name} counting forwarded packets`, 10_000, async () => {
          const t = await (await getUrl(`${n.url}/metrics`, caPem)).text();
          return (sample(t, 'derpmesh_forwarded_packets_total', 'direction="in"') ?? 0) > 50 && t;
        });
        assert.ok((sample(text, 'derpmesh_forwarded_packets_total', 'direction="out"') ?? 0) > 50, `${n.name} forwarded out`);
        assert.ok((sample(text, 'derpmesh_received_packets_total') ?? 0) > 50, `${n.name} received`);
        // Its clients, its peers' mesh links and this scrape's own connection came over TLS.
        assert.ok((sample(text, 'derpmesh_tls_handshakes_total') ?? 0) >= 3, `${n.name} TLS handshakes`);
        for (const peer of nodes.filter((p) => p !== n)) {
          assert.ok(peer.url.startsWith('https://'));
          assert.equal(sample(text, 'derpmesh_mesh_link_up', `peer="${peer.url}"`), 1, `${n.name} → ${peer.name} link`);
        }
        assert.doesNotMatch(text, /BEGIN|PRIVATE KEY/, 'no key material in /metrics');
      }
    });

    test('the page over HTTPS: all nodes live over the event stream, then a kill -9 shown within 5 s, status exits 1', async () => {
      const [t1, , t3] = nodes as [NodeProcess, NodeProcess, NodeProcess];
      const response = await page.goto(`${t1.url}/status`, { waitUntil: 'load' });
      assert.equal(response?.status(), 200);
      assert.ok(response!.url().startsWith('https://'));
      assert.ok(response!.securityDetails(), 'served over TLS');
      await page.waitForFunction(() => document.querySelectorAll('[data-node]').length === 3, { timeout: 10_000 });
      assert.deepEqual(await page.$$eval('[data-node]', (els) => els.map((e) => e.getAttribute('data-node')).sort()), ['t1', 't2', 't3']);
      await page.waitForFunction(() => document.getElementById('conn')?.getAttribute('data-mode') === 'live', { timeout: 10_000 });
      const totals = () => page.$$eval('[data-node] [data-field=packets]', (els) => els.map((e) => Number(e.getAttribute('data-in') ?? 0)));
      const first = await totals();
      await new Promise((r) => setTimeout(r, 2_500));
      const second = await totals();
      second.forEach((v, i) => assert.ok(v > first[i]!, `node ${i}: packets in shown ${first[i]} then ${v}`));
      await page.waitForFunction(() => document.querySelectorAll('[data-link][data-up="1"]').length === 6, { timeout: 10_000 });

      const ok = await runStatus(['--url', t1.url, '--ca-file', ca.caFile]);
      assert.equal(ok.code, 0, ok.stdout + ok.stderr);

      const killedAt = Date.now();
      await t3.kill9();
      await page.waitForFunction(() => document.querySelector('[data-node="t3"]')?.getAttribute('data-state') === 'stale', {
        timeout: 5_000,
        polling: 100,
      });
      console.log(`status page over TLS: t3 shown stale ${Date.now() - killedAt} ms after kill -9`);
      const caPem = readFileSync(ca.caFile);
      // Down (0) while t3 is being given up on, then gone once t3 is stale and its link removed.
      await waitFor("t1's link to t3 down or removed in /metrics", 5_000, async () => {
        const t = await (await getUrl(`${t1.url}/metrics`, caPem)).text();
        return (sample(t, 'derpmesh_mesh_link_up', `peer="${t3.url}"`) ?? 0) === 0 && sample(t, 'derpmesh_mesh_links') === 1;
      });
      const down = await runStatus(['--url', t1.url, '--ca-file', ca.caFile]);
      assert.equal(down.code, 1, down.stdout + down.stderr);
      assert.match(down.stdout, /t3: stale/);
      const doc = (await (await getUrl(`${t1.url}/api/v2/status`, caPem)).json()) as StatusDocument;
      assert.equal(doc.healthy, false);
      assert.deepEqual(consoleErrors, [], 'console errors');
      assert.deepEqual(failedRequests, [], 'failed requests');
    });
  },
);
