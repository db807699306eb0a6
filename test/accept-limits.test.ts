// Accept limits (issue 11, item 3): a burst over `--accept-connection-limit` is closed at once and
// counted while connected clients keep exchanging packets, the per-address cap holds (loopback
// exempt), refusals are logged once per reason per interval with the source address — in a real
// `derpmesh server` process serving TLS in the relay core, and on the plain HTTP path (DERP
// upgrades Node parsed) with limits changed at run time. Sources other than 127.0.0.1 are
// 127.0.0.2 (Linux routes all of 127/8 to loopback).
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { get as httpGet } from 'node:http';
import { get as httpsGet } from 'node:https';
import { connect as netConnect, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';

import { acceptLimitsOf } from '../src/accept-limits.js';
import { DerpClient } from '../src/client/index.js';
import { loadConfig } from '../src/config.js';
import { startRelay } from './helpers/relay.js';
import { startServerProcess } from './helpers/server-process.js';
import { exchangeOnce } from './helpers/traffic.js';

const skip = process.platform !== 'linux' ? 'sources 127.0.0.x other than 127.0.0.1 are Linux' : false;
const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
const OTHER_SOURCE = '127.0.0.2';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Relay metrics from /metrics (http or https, trusting `ca`). */
function metricsOf(url: string, ca?: Buffer): Promise<Map<string, number>> {
  return new Promise((resolve, reject) => {
    const onResponse = (res: import('node:http').IncomingMessage) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        const values = new Map<string, number>();
        for (const line of body.split('\n')) {
          const m = /^derpmesh_(\w+(?:\{[^}]*\})?) (\S+)$/.exec(line);
          if (m) values.set(m[1]!, Number(m[2]));
        }
        resolve(values);
      });
    };
    const req = url.startsWith('https:')
      ? httpsGet(`${url}/metrics`, { ca, agent: false }, onResponse)
      : httpGet(`${url}/metrics`, onResponse);
    req.on('error', reject);
  });
}

/** A TLS connection held open once its handshake completes; `undefined` if it was closed first. */
function holdTls(port: number, ca: Buffer, localAddress?: string): Promise<TLSSocket | undefined> {
  return new Promise((resolve) => {
    const tcp = netConnect({ host: '127.0.0.1', port, localAddress });
    tcp.on('error', () => resolve(undefined));
    // Over a socket made with `localAddress` (not in tls.connect's options); verified as 127.0.0.1.
    const socket = tlsConnect({ socket: tcp, host: '127.0.0.1', ca });
    socket.once('secureConnect', () => resolve(socket));
    socket.on('error', () => resolve(undefined));
    socket.once('close', () => resolve(undefined));
  });
}

/** A DERP upgrade on plain HTTP from `localAddress`, held open once the 101 arrives; `undefined` if closed first. */
function holdUpgrade(port: number, localAddress: string): Promise<Socket | undefined> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port, localAddress }, () =>
      socket.write('GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n'),
    );
    let got = '';
    socket.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.startsWith('HTTP/1.1 101 ')) resolve(socket);
    });
    socket.on('error', () => resolve(undefined));
    socket.once('close', () => resolve(undefined));
  });
}

/** `n` DERP clients connecting at once: how many were served (those are closed again) and how long it took. */
async function burst(n: number, url: string, ca?: Buffer): Promise<{ served: number; tookMs: number }> {
  const start = Date.now();
  const results = await Promise.allSettled(
    Array.from({ length: n }, () => DerpClient.connect({ url, connectTimeoutMs: 5_000, tls: ca ? { ca } : undefined })),
  );
  const tookMs = Date.now() - start;
  const served = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  await Promise.all(served.map((c) => c.close()));
  return { served: served.length, tookMs };
}

/** 5 from the bucket, plus what a 5/s rate refilled while the burst lasted. */
function assertAboutFive(served: number, tookMs: number): void {
  assert.ok(served >= 5 && served <= 5 + Math.ceil((tookMs / 1000) * 5), `${served} of the burst served in ${tookMs} ms`);
}

/** Packets a→b→a every 20 ms until `stop()`, which reports how many rounds went through. */
function bystanders(a: DerpClient, b: DerpClient) {
  let running = true;
  let rounds = 0;
  const closed: string[] = [];
  a.on('close', () => closed.push('a'));
  b.on('close', () => closed.push('b'));
  const loop = (async () => {
    while (running) {
      await exchangeOnce(a, b);
      rounds++;
      await sleep(20);
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return { rounds, closed };
    },
  };
}

describe('accept limits', { skip, timeout: 120_000 }, () => {
  test('configuration: derper-named flags and DERPMESH_* variables, `auto` from the open-file limit', () => {
    const config = loadConfig(['--accept-connection-limit', '2.5', '--max-connections-per-ip', '20'], {
      DERPMESH_ACCEPT_CONNECTION_BURST: '10',
      DERPMESH_TCP_USER_TIMEOUT: '0',
    });
    assert.deepEqual(config.accept, {
      connectionLimit: 2.5,
      connectionBurst: 10,
      maxConnections: 'auto',
      maxConnectionsPerIp: 20,
      tcpKeepaliveMs: 600_000,
      tcpUserTimeoutMs: 0,
    });
    assert.deepEqual(acceptLimitsOf(config.accept, 1_000), {
      acceptConnectionLimit: 2.5,
      acceptConnectionBurst: 10,
      maxConnections: 900,
      maxConnectionsPerIp: 20,
      tcpKeepaliveMs: 600_000,
      tcpUserTimeoutMs: 0,
    });
    const defaults = loadConfig([], {}).accept;
    assert.deepEqual(
      Object.fromEntries(Object.entries(defaults).filter(([, v]) => v !== undefined)),
      { maxConnections: 'auto', tcpKeepaliveMs: 600_000, tcpUserTimeoutMs: 15_000 },
      'no rate, no burst, no per-address cap',
    );
    assert.equal(acceptLimitsOf(defaults, null).maxConnections, undefined, 'no open-file limit: no cap');
    assert.equal(acceptLimitsOf(loadConfig(['--max-connections', '0'], {}).accept, 1_000).maxConnections, undefined);
    for (const [flag, value] of [
      ['--accept-connection-limit', '0'],
      ['--accept-connection-limit', 'fast'],
      ['--accept-connection-burst', '0'],
      ['--max-connections', '-1'],
      ['--max-connections-per-ip', '1.5'],
      ['--tcp-keepalive-time', 'soon'],
    ]) {
      assert.throws(
        () => loadConfig([flag!, value!], {}),
        (err: Error & { code?: string }) => err.code === 'DERPMESH_ERR_CONFIG' && err.message.includes(flag!),
        `${flag} ${value}`,
      );
    }
  });

  test('a real node serving TLS: a burst of 50 over the accept rate, the per-address cap, one log line per reason', async () => {
    const server = startServerProcess(
      [process.execPath, cli],
      [
        '--http-address',
        '127.0.0.1:0',
        '--tls-self-signed',
        '127.0.0.1',
        '--stun-address',
        'disable',
        '--accept-connection-limit',
        '5',
        '--accept-connection-burst',
        '5',
        '--max-connections-per-ip',
        '3',
      ],
      {},
      60_000,
    );
    const held: TLSSocket[] = [];
    let traffic: ReturnType<typeof bystanders> | undefined;
    try {
      const url = await server.url;
      assert.match(url, /^https:/);
      const port = Number(new URL(url).port);
      const ca = readFileSync(join(server.stateDir, 'tls', 'self-signed.crt'));
      // Every connection to the port takes a token, /metrics included: tokens are counted below.
      const a = await DerpClient.connect({ url, tls: { ca } });
      const b = await DerpClient.connect({ url, tls: { ca } });
      const start = await metricsOf(url, ca);
      traffic = bystanders(a, b);
      await sleep(1_200); // a full bucket: 5

      const { served, tookMs } = await burst(50, url, ca);
      assertAboutFive(served, tookMs);
      await sleep(1_200);
      let now = await metricsOf(url, ca); // 4 tokens left
      const delta = (name: string) => (now.get(name) ?? 0) - (start.get(name) ?? 0);
      assert.equal(delta('accepts_refused_total{reason="rate_limit"}'), 50 - served);
      assert.equal(
        delta('accepts_refused_total{reason="max_connections"}') + delta('accepts_refused_total{reason="max_connections_per_ip"}'),
        0,
      );
      assert.equal(delta('tls_handshakes_total'), served + 1, 'refused connections never reached TLS');

      // Three connections from 127.0.0.2 (3 tokens); a fourth is over the per-address cap (no token
      // spent); loopback is exempt (the last token).
      for (let i = 0; i < 3; i++) {
        const s = await holdTls(port, ca, OTHER_SOURCE);
        assert.ok(s, `connection ${i + 1} from ${OTHER_SOURCE}`);
        held.push(s);
      }
      assert.equal(await holdTls(port, ca, OTHER_SOURCE), undefined, `a fourth from ${OTHER_SOURCE} is closed`);
      const local = await holdTls(port, ca);
      assert.ok(local, 'loopback is not capped per address');
      held.push(local);
      // A place is given back when a connection closes.
      held.shift()!.destroy();
      await sleep(1_200);
      const again = await holdTls(port, ca, OTHER_SOURCE);
      assert.ok(again, `a place for ${OTHER_SOURCE} again`);
      held.push(again);
      now = await metricsOf(url, ca);
      assert.equal(delta('accepts_refused_total{reason="max_connections_per_ip"}'), 1);
      assert.equal(now.get('accepted_open_connections'), 2 + 4 + 1, 'a, b, the held connections and this request');

      const { rounds, closed } = await traffic.stop();
      traffic = undefined;
      assert.ok(rounds > 20, `bystanders exchanged ${rounds} rounds meanwhile`);
      assert.deepEqual(closed, []);
      await exchangeOnce(b, a);

      const log = server.output();
      const rateLines =
        log.match(/WARN +connection refused: over --accept-connection-limit .*remote=127\.0\.0\.1 reason=rate-limit/g) ?? [];
      assert.equal(rateLines.length, 1, `one line for the whole burst:\n${log}`);
      assert.match(log, /WARN +connection refused: over --max-connections-per-ip .*remote=127\.0\.0\.2 reason=max-connections-per-ip/);
      assert.match(log, /INFO +accept limits .*acceptConnectionLimit=5 acceptConnectionBurst=5 maxConnections=\d+ maxConnectionsPerIp=3/);
      await Promise.all([a.close(), b.close()]);
    } finally {
      await traffic?.stop().catch(() => {});
      held.forEach((s) => s.destroy());
      server.child.kill('SIGKILL');
    }
  });

  test('plain HTTP (DERP upgrades Node parsed): over the rate, per-address cap, limits changed at run time', async () => {
    const relay = await startRelay({ acceptLimits: { acceptConnectionLimit: 5, acceptConnectionBurst: 5 } });
    const refusals: string[] = [];
    relay.relay.onAcceptRefused((r) => refusals.push(`${r.reason} ${r.remoteAddress}`));
    const held: Socket[] = [];
    let traffic: ReturnType<typeof bystanders> | undefined;
    try {
      const a = await DerpClient.connect({ url: relay.url });
      const b = await DerpClient.connect({ url: relay.url });
      traffic = bystanders(a, b);
      await sleep(1_200);
      const { served, tookMs } = await burst(30, relay.url);
      assertAboutFive(served, tookMs);
      assert.equal(relay.metric('accepts_refused_rate_limit'), 30 - served);

      // No rate any more; two DERP connections per address.
      relay.relay.setAcceptLimits({ maxConnectionsPerIp: 2 });
      for (let i = 0; i < 2; i++) {
        const s = await holdUpgrade(relay.port, OTHER_SOURCE);
        assert.ok(s, `upgrade ${i + 1} from ${OTHER_SOURCE}`);
        held.push(s);
      }
      assert.equal(await holdUpgrade(relay.port, OTHER_SOURCE), undefined, `a third from ${OTHER_SOURCE} is closed`);
      assert.equal(relay.metric('accepts_refused_max_connections_per_ip'), 1);
      relay.relay.setAcceptExempt([OTHER_SOURCE]);
      const exempt = await holdUpgrade(relay.port, OTHER_SOURCE);
      assert.ok(exempt, 'an exempt address is not capped');
      held.push(exempt);
      // a, b and the held upgrades (the burst's clients are gone once the relay saw them close).
      for (let i = 0; i < 100 && relay.metric('accepted_open') !== 2 + 3; i++) await sleep(20);
      assert.equal(relay.metric('accepted_open'), 2 + 3);

      assert.throws(
        () => relay.relay.setAcceptLimits({ maxConnections: 0 }),
        (err: Error & { code?: string }) => err.code === 'DERPMESH_ERR_INVALID_ARGUMENT' && /maxConnections/.test(err.message),
      );
      const { rounds, closed } = await traffic.stop();
      traffic = undefined;
      assert.ok(rounds > 10, `bystanders exchanged ${rounds} rounds meanwhile`);
      assert.deepEqual(closed, []);
      await sleep(100); // the refusal callbacks run on the event loop
      assert.deepEqual(refusals, ['rate-limit 127.0.0.1', `max-connections-per-ip ${OTHER_SOURCE}`]);
      await Promise.all([a.close(), b.close()]);
    } finally {
      await traffic?.stop().catch(() => {});
      held.forEach((s) => s.destroy());
      await relay.close();
    }
  });
});
