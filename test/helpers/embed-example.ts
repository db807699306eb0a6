// Runs examples/embed (compiled) as its own process and checks what its comments promise: the
// application's routes still answer, DERP clients relay through it over TCP and WebSocket, and
// SIGTERM sends them Restarting before the process exits 0.
import { strict as assert } from 'node:assert';
import { once } from 'node:events';

import { DerpClient } from '../../src/client/index.js';
import { getUrl } from './cluster.js';
import { spawnAnnounced } from './server-process.js';
import { exchangeOnce } from './traffic.js';

export async function checkEmbedExample(
  script: string,
  options: { cwd?: string; env?: NodeJS.ProcessEnv; ca?: Buffer } = {},
): Promise<void> {
  const example = spawnAnnounced([process.execPath, script], {
    announce: /listening on (https?:\/\/\S+)/,
    what: 'the example',
    cwd: options.cwd,
    env: { ...options.env, PORT: '0' },
    timeoutMs: 20_000,
  });
  const { child, output } = example;
  const exited = once(child, 'exit');
  try {
    const url = await example.url;

    const { ca } = options;
    const app = await getUrl(url, ca);
    assert.equal(await app.text(), 'hello from the application\n', 'the application route still answers');
    assert.equal((await getUrl(`${url}/derp/probe`, ca)).status, 200, 'the relay answers its probe');

    const tls = ca && { ca };
    const a = await DerpClient.connect({ url, tls });
    const b = await DerpClient.connect({ url, transport: 'websocket', tls });
    await exchangeOnce(a, b);
    const metrics = (await (await getUrl(`${url}/relay-metrics`, ca)).json()) as Record<string, number>;
    assert.equal(metrics.packets_sent, 2, JSON.stringify(metrics));

    const restarting = [once(a, 'restarting'), once(b, 'restarting')];
    child.kill('SIGTERM');
    await Promise.all(restarting);
    const [code] = (await exited) as [number];
    assert.equal(code, 0, output());
    await Promise.all([a.close(), b.close()]);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}
