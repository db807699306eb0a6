// Runs examples/embed (compiled) as its own process and checks what its comments promise: the
// application's routes still answer, DERP clients relay through it over TCP and WebSocket, and
// SIGTERM sends them Restarting before the process exits 0.
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { once } from 'node:events';

import { DerpClient } from '../../src/client/index.js';

export async function checkEmbedExample(script: string, options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<void> {
  const child = spawn(process.execPath, [script], {
    cwd: options.cwd,
    env: { ...process.env, ...options.env, PORT: '0' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const exited = once(child, 'exit');
  try {
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the example did not start: ${output}`)), 20_000);
      child.stdout!.on('data', () => {
        const m = /listening on (http:\/\/\S+)/.exec(output);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!);
        }
      });
      child.once('exit', (code) => reject(new Error(`the example exited with ${code}: ${output}`)));
    });

    const app = await fetch(url);
    assert.equal(await app.text(), 'hello from the application\n', 'the application route still answers');
    assert.equal((await fetch(`${url}/derp/probe`)).status, 200, 'the relay answers its probe');

    const a = await DerpClient.connect({ url });
    const b = await DerpClient.connect({ url, transport: 'websocket' });
    const toB = once(b, 'packet');
    a.send(b.publicKey, Buffer.from('a to b'));
    const [fromA, dataB] = (await toB) as [Buffer, Buffer];
    assert.deepEqual(fromA, a.publicKey);
    assert.equal(dataB.toString(), 'a to b');
    const toA = once(a, 'packet');
    b.send(a.publicKey, Buffer.from('b to a'));
    const [fromB, dataA] = (await toA) as [Buffer, Buffer];
    assert.deepEqual(fromB, b.publicKey);
    assert.equal(dataA.toString(), 'b to a');
    const metrics = (await (await fetch(`${url}/relay-metrics`)).json()) as Record<string, number>;
    assert.equal(metrics.packets_sent, 2, JSON.stringify(metrics));

    const restarting = [once(a, 'restarting'), once(b, 'restarting')];
    child.kill('SIGTERM');
    await Promise.all(restarting);
    const [code] = (await exited) as [number];
    assert.equal(code, 0, output);
    await Promise.all([a.close(), b.close()]);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}
