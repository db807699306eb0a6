// `derpmesh status` without a cluster: argument handling, and the exit code and message for every
// way asking a node can fail (nothing listening, a server that is not derpmesh, one that never
// answers). The command against a real 3-node cluster is in status-page.test.ts.
import { strict as assert } from 'node:assert';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';

import { DEFAULT_STATUS_URL, parseStatusArgs } from '../src/status-command.js';
import { hasOpenssl, makePrivateCa } from './helpers/certs.js';
import { runStatus } from './helpers/cli.js';
import { startNodeProcess, type NodeProcess } from './helpers/cluster.js';
import { freePort, startPostgres, type TestPostgres } from './helpers/postgres.js';

describe('derpmesh status: arguments', () => {
  test('the URL comes from --url, else DERPMESH_URL, else the default listen address', () => {
    assert.equal(DEFAULT_STATUS_URL, 'http://127.0.0.1:3000');
    const plain = parseStatusArgs([], {});
    assert.ok(plain !== 'help');
    assert.equal(plain.url.href, 'http://127.0.0.1:3000/');
    const env = parseStatusArgs([], { DERPMESH_URL: 'http://10.0.0.5:8080' });
    assert.ok(env !== 'help');
    assert.equal(env.url.href, 'http://10.0.0.5:8080/');
    const flag = parseStatusArgs(['--url=https://derp.example.com', '--json', '--timeout', '2'], { DERPMESH_URL: 'http://10.0.0.5:8080' });
    assert.ok(flag !== 'help');
    assert.equal(flag.url.href, 'https://derp.example.com/');
    assert.equal(flag.json, true);
    assert.equal(flag.timeoutMs, 2_000);
    assert.equal(parseStatusArgs(['--help'], {}), 'help');
  });

  test('usage errors exit 2 with what was wrong', async () => {
    for (const [args, message] of [
      [['--url'], /--url needs a value/],
      [['--url', 'ftp://x'], /must be an http:\/\/ or https:\/\/ URL/],
      [['--timeout', 'soon'], /--timeout must be a positive number of seconds/],
      [['extra'], /unknown argument "extra"/],
    ] as const) {
      const r = await runStatus([...args]);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.match(r.stderr, /derpmesh status \[--url URL\]/, 'the usage follows');
    }
    const badEnv = await runStatus([], { DERPMESH_URL: 'not a url' });
    assert.equal(badEnv.code, 2);
    assert.match(badEnv.stderr, /DERPMESH_URL: "not a url" is not a URL/);
    const help = await runStatus(['--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /Exit code: 0 healthy; 1 unhealthy/);
  });
});

describe('derpmesh status: a node that cannot be asked', () => {
  let notDerpmesh: Server;
  let silent: Server;
  let notDerpmeshUrl: string;
  let silentUrl: string;
  const listen = async (server: Server) => {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  };

  before(async () => {
    // Another HTTP service on the port: 404 for /api/v2/status, or 200 with something else.
    notDerpmesh = createServer((req, res) => {
      if (req.url === '/other/api/v2/status') res.writeHead(200, { 'Content-Type': 'text/html' }).end('<html>hello</html>');
      else res.writeHead(404).end('not found');
    });
    notDerpmeshUrl = await listen(notDerpmesh);
    // Accepts and never answers.
    silent = createServer(() => {});
    silentUrl = await listen(silent);
  });
  after(() => {
    notDerpmesh.closeAllConnections();
    notDerpmesh.close();
    silent.closeAllConnections();
    silent.close();
  });

  test('nothing listening: exit 2, naming the URL and what to check', async () => {
    const url = `http://127.0.0.1:${await freePort()}`;
    const r = await runStatus(['--url', url]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, new RegExp(`cannot reach ${url}/api/v2/status: ECONNREFUSED`));
    assert.match(r.stderr, /--http-address/);
    assert.equal(r.stdout, '');
  });

  test('not a derpmesh node: exit 2 for a 404 and for an answer that is not a status document', async () => {
    const missing = await runStatus(['--url', notDerpmeshUrl]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /answered 404: is this a derpmesh node/);
    const other = await runStatus(['--url', `${notDerpmeshUrl}/other`]);
    assert.equal(other.code, 2);
    assert.match(other.stderr, /did not answer a status document/);
  });

  test('no answer: exit 2 after --timeout', async () => {
    const start = Date.now();
    const r = await runStatus(['--url', silentUrl, '--timeout', '1']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /no answer within 1 s/);
    assert.ok(Date.now() - start < 10_000);
  });
});

describe('derpmesh status: a node serving https with a private CA', { skip: !hasOpenssl() && 'no openssl to make certificates' }, () => {
  let postgres: TestPostgres;
  let node: NodeProcess;
  let caFile: string;

  before(async () => {
    postgres = await startPostgres();
    const ca = makePrivateCa();
    caFile = ca.caFile;
    node = await startNodeProcess({ name: 'tls-status', postgresUrl: postgres.url, heartbeatMs: 500, tls: ca });
    await node.started;
  });
  after(async () => {
    await node?.kill9();
    await postgres?.stop();
  });

  test('untrusted certificate: exit 2 naming --ca-file; with --ca-file: the status, exit 0', async () => {
    assert.ok(node.url.startsWith('https://'));
    const untrusted = await runStatus(['--url', node.url]);
    assert.equal(untrusted.code, 2, untrusted.stdout + untrusted.stderr);
    assert.match(untrusted.stderr, /certificate is not trusted: give its CA with --ca-file/);
    const trusted = await runStatus(['--url', node.url, '--ca-file', caFile]);
    assert.equal(trusted.code, 0, trusted.stdout + trusted.stderr);
    assert.match(trusted.stdout, /^\s+tls-status\*\s+live\s+ok/m);
    const missing = await runStatus(['--url', node.url, '--ca-file', '/nonexistent/ca.pem']);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--ca-file "\/nonexistent\/ca.pem" cannot be read/);
  });
});
