// `derpmesh server` as a real process: it relays, shuts down gracefully with Restarting, and
// refuses bad configuration with a clear message.
import { strict as assert } from 'node:assert';
import { createSocket } from 'node:dgram';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { embeddedPostmasterPid, startServerProcess, type ServerProcess } from './helpers/server-process.js';
import { pidAlive } from './helpers/tools.js';

const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));

function startServer(args: string[], env: NodeJS.ProcessEnv = {}): ServerProcess {
  return startServerProcess([process.execPath, cli], args, env);
}

describe('derpmesh server process', () => {
  test('relays packets, then SIGTERM sends Restarting to every client and exits 0', { timeout: 30_000 }, async () => {
    const server = startServer(['--http-address', '127.0.0.1:0', '--shutdown-grace', '2s']);
    try {
      const url = await server.url;
      const a = await DerpClient.connect({ url });
      const b = await DerpClient.connect({ url, transport: 'websocket' });
      const got = once(b, 'packet');
      a.send(b.publicKey, Buffer.from('hello through a real process'));
      const [src, data] = (await got) as [Buffer, Buffer];
      assert.deepEqual(src, a.publicKey);
      assert.equal(data.toString(), 'hello through a real process');

      const restarts = [once(a, 'restarting'), once(b, 'restarting')];
      const exited = once(server.child, 'exit');
      server.child.kill('SIGTERM');
      const [[ra], [rb]] = (await Promise.all(restarts)) as [[{ tryForMs: number }], [{ tryForMs: number }]];
      assert.ok(ra.tryForMs > 0 && rb.tryForMs > 0);
      const [code] = (await exited) as [number];
      assert.equal(code, 0, server.output());
      assert.match(server.output(), /shutting down: telling peers, sending Restarting to clients/);
      await Promise.all([a.close(), b.close()]);
    } finally {
      server.child.kill('SIGKILL');
    }
  });

  test(
    'two SIGTERMs 5 ms apart: Restarting still reaches the client, and the embedded Postgres stops with the server',
    { timeout: 40_000 },
    async () => {
      const server = startServer(['--http-address', '127.0.0.1:0', '--shutdown-grace', '2s']);
      try {
        const url = await server.url;
        const a = await DerpClient.connect({ url });
        const postmaster = embeddedPostmasterPid(server.stateDir);
        assert.ok(postmaster !== undefined && pidAlive(postmaster), 'the embedded Postgres runs');
        const restarting = once(a, 'restarting');
        const exited = once(server.child, 'exit');
        server.child.kill('SIGTERM');
        await new Promise((r) => setTimeout(r, 5));
        server.child.kill('SIGTERM');
        await restarting;
        const [code] = (await exited) as [number];
        assert.equal(code, 0, server.output());
        assert.match(server.output(), /already stopping: the graceful stop goes on/);
        for (let i = 0; i < 50 && pidAlive(postmaster!); i++) await new Promise((r) => setTimeout(r, 100));
        assert.ok(!pidAlive(postmaster!), `the embedded Postgres (pid ${postmaster}) outlived the server:\n${server.output()}`);
        await a.close();
      } finally {
        server.child.kill('SIGKILL');
      }
    },
  );

  test(
    'STUN: a configured address that is taken stops the start (exit 2, the fix); the default one is skipped with a warning',
    { timeout: 40_000 },
    async () => {
      const taken = createSocket('udp4');
      await new Promise<void>((resolve) => taken.bind(0, '127.0.0.1', resolve));
      const port = taken.address().port;
      try {
        const explicit = startServer(['--http-address', '127.0.0.1:0', '--stun-address', `127.0.0.1:${port}`]);
        const [code] = (await once(explicit.child, 'exit')) as [number];
        assert.equal(code, 2, explicit.output());
        assert.match(
          explicit.output(),
          new RegExp(`cannot listen for STUN on udp 127\\.0\\.0\\.1:${port}.*DERPMESH_STUN_ADDRESS.*\\[DERPMESH_ERR_LISTEN\\]`),
        );
        assert.doesNotMatch(explicit.output(), /\n\s+at /, 'no stack trace');
      } finally {
        taken.close();
      }
      // The default (the listen host, port 3478) held by someone else: the node runs without STUN.
      // Held by this test: another process holding it (a node of a test running beside this one)
      // could let it go before the server starts. Taken when it is free, within 20 s.
      let holder = createSocket('udp4');
      let held = false;
      for (let i = 0; i < 200 && !held; i++) {
        held = await new Promise<boolean>((resolve) => {
          holder.once('error', () => resolve(false));
          holder.bind(3478, '127.0.0.1', () => resolve(true));
        });
        if (!held) {
          holder.close();
          holder = createSocket('udp4');
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      assert.ok(held, 'udp 127.0.0.1:3478 stayed taken by another process for 20 s');
      const server = startServer(['--http-address', '127.0.0.1:0']);
      try {
        const url = await server.url;
        assert.match(server.output(), /STUN is off: its default address is not free.*address=127\.0\.0\.1:3478/);
        const map = (await (await fetch(`${url}/derpmap`)).json()) as { Regions: Record<string, { Nodes: { STUNPort: number }[] }> };
        assert.deepEqual(
          Object.values(map.Regions).flatMap((r) => r.Nodes.map((n) => n.STUNPort)),
          [-1],
        );
      } finally {
        server.child.kill('SIGKILL');
        if (held) holder.close();
      }
    },
  );

  test(
    '--tls-self-signed: a certificate made at start for an IP, written for clients to trust; TCP and WebSocket relay over it',
    { timeout: 30_000 },
    async () => {
      const server = startServer(['--http-address', '127.0.0.1:0', '--tls-self-signed', '127.0.0.1,localhost']);
      try {
        const url = await server.url;
        assert.match(url, /^https:\/\//);
        const ca = readFileSync(join(server.stateDir, 'tls', 'self-signed.crt'));
        const leaf = new X509Certificate(ca);
        assert.match(leaf.subjectAltName ?? '', /IP Address:127\.0\.0\.1/);
        assert.match(server.output(), new RegExp(`serving a self-signed certificate.*fingerprint=${leaf.fingerprint256}`));
        const a = await DerpClient.connect({ url, tls: { ca } });
        const b = await DerpClient.connect({ url, transport: 'websocket', tls: { ca } });
        const got = once(b, 'packet');
        a.send(b.publicKey, Buffer.from('over a self-signed certificate'));
        const [, data] = (await got) as [Buffer, Buffer];
        assert.equal(data.toString(), 'over a self-signed certificate');
        await Promise.all([a.close(), b.close()]);
      } finally {
        server.child.kill('SIGKILL');
      }
    },
  );

  test('bad configuration exits 2 with the code and what to do', { timeout: 15_000 }, async () => {
    const server = startServer([], {
      CODER_ADDRESS: '127.0.0.1:0',
      CODER_ACCESS_URL: 'http://lb.example.com',
      CODER_DERP_SERVER_RELAY_URL: 'http://lb.example.com/',
    });
    const [code] = (await once(server.child, 'exit')) as [number];
    assert.equal(code, 2);
    assert.match(server.output(), /DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL/);
    assert.match(server.output(), /Set CODER_DERP_SERVER_RELAY_URL to this node's own address/);
  });

  test('a port already in use is reported with the address and the fix', { timeout: 15_000 }, async () => {
    const first = startServer(['--http-address', '127.0.0.1:0']);
    try {
      const port = new URL(await first.url).port;
      const second = startServer(['--http-address', `127.0.0.1:${port}`]);
      const [code] = (await once(second.child, 'exit')) as [number];
      assert.equal(code, 2);
      assert.match(second.output(), new RegExp(`cannot listen on 127.0.0.1:${port}: EADDRINUSE`));
    } finally {
      // SIGTERM, not SIGKILL: the node stops the embedded Postgres it started.
      const exited = once(first.child, 'exit');
      first.child.kill('SIGTERM');
      await exited;
    }
  });
});
