// TLS terminated in the relay core: a `net` server hands every raw connection to the core, which
// does TLS, serves DERP and the probes itself and hands every other request back to Node's HTTP
// server decrypted. Bad input on the TLS port is closed and counted while bystanders keep
// exchanging packets; the probes answer over TLS byte for byte as over plain HTTP.
import { strict as assert } from 'node:assert';
import { readFileSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, TLSSocket } from 'node:tls';
import { after, before, describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { startHttpServer, type HttpServer } from '../src/http/server.js';
import { silentLogger } from '../src/log.js';
import { native } from '../src/native.js';
import { Relay } from '../src/relay.js';
import { hasOpenssl, makePrivateCa, type PrivateCa } from './helpers/certs.js';
import { exchangeOnce } from './helpers/traffic.js';

const skip = process.platform === 'win32' ? 'the core takes descriptors on Linux and macOS only' : hasOpenssl() ? false : 'no openssl';

/** GET over https trusting `ca`: status and body. */
function httpsGet(url: string, ca: Buffer): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ca, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Writes `request` on a fresh connection and collects everything until the server closes or goes quiet. */
function raw(open: () => Socket | TLSSocket, request: string | Buffer, quietMs = 300): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = open();
    const chunks: Buffer[] = [];
    let timer: NodeJS.Timeout | undefined;
    const done = (closed: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ data: Buffer.concat(chunks), closed });
    };
    const quiet = () => {
      clearTimeout(timer);
      timer = setTimeout(() => done(false), quietMs);
    };
    socket.once(socket instanceof TLSSocket ? 'secureConnect' : 'connect', () => {
      socket.write(request);
      quiet();
    });
    socket.on('data', (d: Buffer) => {
      chunks.push(d);
      quiet();
    });
    socket.on('error', () => {});
    socket.on('close', () => done(true));
  });
}

const normalizeDate = (b: Buffer) => b.toString('latin1').replace(/\r\nDate: [^\r]+\r\n/g, '\r\nDate: X\r\n');

async function metricsOf(server: HttpServer, ca: Buffer): Promise<Map<string, number>> {
  const { body } = await httpsGet(`${server.url}/metrics`, ca);
  const values = new Map<string, number>();
  for (const line of body.split('\n')) {
    const m = /^derpmesh_(\w+(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (m) values.set(m[1]!, Number(m[2]));
  }
  return values;
}

describe('TLS terminated in the relay core', { skip, timeout: 120_000 }, () => {
  let ca: PrivateCa;
  let caPem: Buffer;
  let relay: Relay;
  let tls: HttpServer;
  let plainRelay: Relay;
  let plain: HttpServer;
  const clients: DerpClient[] = [];
  const replicasRoute = (req: { url?: string }, res: import('node:http').ServerResponse) => {
    if (req.url !== '/api/v2/replicas') return false;
    res.writeHead(200, { 'Content-Type': 'application/json' }).end('[]');
    return true;
  };

  before(async () => {
    ca = makePrivateCa();
    caPem = readFileSync(ca.caFile);
    relay = new Relay();
    tls = await startHttpServer({
      relay,
      host: '127.0.0.1',
      port: 0,
      logger: silentLogger,
      tls: { cert: readFileSync(ca.certFile), key: readFileSync(ca.keyFile) },
      routes: [replicasRoute],
    });
    plainRelay = new Relay();
    plain = await startHttpServer({ relay: plainRelay, host: '127.0.0.1', port: 0, logger: silentLogger });
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all([relay?.close({ graceMs: 500 }), plainRelay?.close({ graceMs: 500 })]);
    await Promise.all([tls?.close(), plain?.close()]);
    if (ca) rmSync(ca.dir, { recursive: true, force: true });
  });

  const tlsOpen = () => tlsConnect({ host: '127.0.0.1', port: tls.port, ca: caPem, servername: 'localhost' });
  const plainOpen = () => netConnect(plain.port, '127.0.0.1');

  test('DERP clients (TCP and WebSocket) over the core TLS path; the meta certificate ends the chain', async () => {
    const a = await DerpClient.connect({ url: tls.url, tls: { ca: caPem } });
    const b = await DerpClient.connect({ url: tls.url, transport: 'websocket', tls: { ca: caPem } });
    clients.push(a, b);
    await exchangeOnce(a, b);
    assert.ok(relay.metric('tls_handshakes') >= 2, 'the core did the handshakes');
    assert.equal(relay.metric('upgrades_bridged'), 0, 'nothing went through the byte bridge');

    const socket = tlsOpen();
    await new Promise((r) => socket.once('secureConnect', r));
    assert.equal(socket.getProtocol(), 'TLSv1.3');
    let cert = socket.getPeerCertificate(true);
    const chain: string[] = [];
    for (let i = 0; i < 5 && cert; i++) {
      chain.push(cert.subject.CN as string);
      if (cert.issuerCertificate === cert) break;
      cert = cert.issuerCertificate;
    }
    socket.destroy();
    // Node builds the verified chain (leaf, CA); the meta certificate is checked by the Go client
    // (test/interop.test.ts) and by native/relay/tests/front_tls.rs.
    assert.equal(chain[0], '127.0.0.1');

    // TLS 1.2 is accepted too (1.3 is preferred).
    const old = await raw(
      () => tlsConnect({ host: '127.0.0.1', port: tls.port, ca: caPem, servername: 'localhost', maxVersion: 'TLSv1.2' }),
      'GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n',
    );
    assert.match(old.data.toString('latin1'), /^HTTP\/1\.1 200 OK\r\n/);
    const tls12 = tlsConnect({ host: '127.0.0.1', port: tls.port, ca: caPem, servername: 'localhost', maxVersion: 'TLSv1.2' });
    await new Promise((r) => tls12.once('secureConnect', r));
    assert.equal(tls12.getProtocol(), 'TLSv1.2');
    tls12.destroy();
  });

  test('the operator API and /metrics are handed back to Node over the core TLS path', async () => {
    const before = relay.metric('connections_handed_to_node');
    const replicas = await httpsGet(`${tls.url}/api/v2/replicas`, caPem);
    assert.equal(replicas.status, 200);
    assert.deepEqual(JSON.parse(replicas.body), []);
    const metrics = await httpsGet(`${tls.url}/metrics`, caPem);
    assert.equal(metrics.status, 200);
    assert.match(metrics.body, /^derpmesh_tls_handshakes_total \d+$/m);
    const missing = await httpsGet(`${tls.url}/nope`, caPem);
    assert.equal(missing.status, 404);
    assert.equal(relay.metric('connections_handed_to_node'), before + 3);
  });

  test('probes and /generate_204 answer over TLS byte for byte as over plain HTTP', async () => {
    const requests = [
      'GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n',
      'HEAD /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n',
      'POST /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n',
      'GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc-1.2:3_4\r\n\r\n',
      'GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: not valid\r\n\r\n',
      'GET /derp HTTP/1.1\r\nHost: x\r\n\r\n',
      'GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n',
      'GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
      'GET /derp/probe HTTP/1.0\r\nHost: x\r\n\r\n',
      'GET /derp/probe?x=1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n',
      // Two requests in one write: both answered, in order.
      'GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\nGET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n',
    ];
    const answeredBefore = relay.metric('http_requests_answered');
    for (const r of requests) {
      const [overTls, overPlain] = await Promise.all([raw(tlsOpen, r), raw(plainOpen, r)]);
      assert.ok(overPlain.data.length > 0, `plain answered ${JSON.stringify(r)}`);
      assert.equal(normalizeDate(overTls.data), normalizeDate(overPlain.data), `same answer to ${JSON.stringify(r)}`);
      assert.equal(overTls.closed, overPlain.closed, `same connection handling for ${JSON.stringify(r)}`);
    }
    assert.equal(relay.metric('http_requests_answered'), answeredBefore + requests.length + 1, 'the core answered them');
  });

  test('bad input on the TLS port: closed and counted, bystanders keep exchanging packets', async () => {
    const a = await DerpClient.connect({ url: tls.url, tls: { ca: caPem } });
    const b = await DerpClient.connect({ url: tls.url, tls: { ca: caPem } });
    clients.push(a, b);
    const closed: string[] = [];
    a.on('close', () => closed.push('a'));
    b.on('close', () => closed.push('b'));
    let traffic = true;
    let exchanged = 0;
    const bystanders = (async () => {
      while (traffic) {
        await exchangeOnce(a, b);
        exchanged++;
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const start = await metricsOf(tls, caPem);
    const delta = async (name: string) => ((await metricsOf(tls, caPem)).get(name) ?? 0) - (start.get(name) ?? 0);

    // A plaintext HTTP request to the TLS port.
    const plaintext = await raw(() => netConnect(tls.port, '127.0.0.1'), 'GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n', 2_000);
    assert.ok(plaintext.closed, 'plaintext request: closed');
    // A truncated ClientHello (record header promising 512 bytes, 4 given), then the client's FIN.
    const truncated = await new Promise<boolean>((resolve) => {
      const s = netConnect(tls.port, '127.0.0.1', () => s.end(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])));
      s.on('error', () => {});
      s.resume();
      s.on('close', () => resolve(true));
      setTimeout(() => resolve(false), 3_000).unref();
    });
    assert.ok(truncated, 'truncated ClientHello: closed');
    // Garbage after the handshake.
    const garbage = await raw(tlsOpen, Buffer.from([0, 1, 2, 3, 0x0d, 0x0a, 0x0d, 0x0a]), 2_000);
    assert.ok(garbage.closed, 'garbage after the handshake: closed');
    assert.match(garbage.data.toString('latin1'), /^HTTP\/1\.1 400 Bad Request\r\n/);
    // A client stalled mid-handshake: half a ClientHello, then silence until the 10 s deadline.
    const stalledAt = Date.now();
    const stalled = await new Promise<number>((resolve) => {
      const s = netConnect(tls.port, '127.0.0.1', () => s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])));
      s.on('error', () => {});
      s.resume();
      s.on('close', () => resolve(Date.now() - stalledAt));
    });
    assert.ok(stalled >= 9_500 && stalled < 13_000, `stalled handshake closed after ${stalled} ms`);

    assert.equal(await delta('tls_handshake_failures_total{reason="error"}'), 2, 'plaintext request and truncated ClientHello');
    assert.equal(await delta('tls_handshake_failures_total{reason="timeout"}'), 1);
    assert.equal(await delta('http_rejections_total{reason="bad_request",layer="core"}'), 1);
    traffic = false;
    await bystanders;
    assert.ok(exchanged > 10, `bystanders exchanged ${exchanged} rounds meanwhile`);
    await exchangeOnce(b, a);
    assert.deepEqual(closed, []);
  });

  test('a certificate the core refuses is a DERPMESH_ERR_TLS error and the current one stays', async () => {
    const other = native.generateSelfSigned(['localhost', '127.0.0.1']);
    assert.match(other.certPem, /^-----BEGIN CERTIFICATE-----/);
    assert.throws(
      () => relay.setCertificate({ cert: readFileSync(ca.certFile), key: Buffer.from(other.keyPem) }),
      (err: Error & { code?: string }) => err.code === 'DERPMESH_ERR_TLS' && /does not belong/.test(err.message),
    );
    assert.throws(
      () => native.generateSelfSigned([]),
      (err: Error & { code?: string }) => err.code === 'DERPMESH_ERR_TLS',
    );
    const c = await DerpClient.connect({ url: tls.url, tls: { ca: caPem } });
    clients.push(c);
    await exchangeOnce(c, clients[0]!);
  });
});
