// Compatibility with real Tailscale clients: Tailscale's own Go DERP client (tailscale.com/derp/derphttp,
// built from the Go module proxy by test/interop/build.sh) drives the relay.
import { strict as assert } from 'node:assert';
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { describe, test } from 'node:test';

import { startRelay } from './helpers/relay.js';

const buildScript = fileURLToPath(new URL('../../test/interop/build.sh', import.meta.url));

function goAvailable(): boolean {
  try {
    execFileSync('go', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const hasGo = goAvailable();
if (!hasGo) console.log('# SKIP Tailscale interop: Go is not installed, so the derphttp client cannot be built');

interface Check {
  check: string;
  ok: boolean;
  detail: string;
}

function runInterop(
  binary: string,
  url: string,
  meshKey: string,
  websocket: boolean,
): Promise<{ code: number; checks: Check[]; stderr: string }> {
  const args = ['-url', `${url}/derp`, '-mesh-key', meshKey, '-overall-timeout', '90s'];
  if (websocket) args.push('-websocket');
  return new Promise((resolve) => {
    execFile(binary, args, { timeout: 120_000 }, (err, stdout, stderr) => {
      const checks = stdout
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Check);
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, checks, stderr });
    });
  });
}

describe('Tailscale derphttp client against derpmesh', { skip: !hasGo && 'Go is not installed' }, () => {
  let binary = '';
  test('builds the Go interop client', { timeout: 1_500_000 }, () => {
    binary = execFileSync('bash', [buildScript], { encoding: 'utf8', timeout: 1_400_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim();
    assert.ok(binary.endsWith('derpinterop'));
  });

  for (const websocket of [false, true]) {
    test(
      `handshake, packets both ways, ping, WatchConns with the mesh key (${websocket ? 'WebSocket' : 'TCP upgrade'})`,
      { timeout: 150_000 },
      async () => {
        const meshKey = randomBytes(32).toString('hex');
        const relay = await startRelay({ meshKey });
        try {
          const { code, checks, stderr } = await runInterop(binary, relay.url, meshKey, websocket);
          const failed = checks.filter((c) => !c.ok);
          assert.deepEqual(failed, [], `failed checks: ${JSON.stringify(failed)}\n${stderr}`);
          const names = checks.map((c) => c.check);
          for (const required of ['handshake', 'packet_a_to_b_1400', 'packet_b_to_a_1400', 'ping_pong']) {
            assert.ok(names.includes(required), `missing check ${required}: ${names.join(', ')}`);
          }
          if (!websocket) {
            for (const required of ['watch_snapshot', 'watch_new_peer', 'watch_peer_gone', 'watch_refused_without_mesh_key']) {
              assert.ok(names.includes(required), `missing check ${required}`);
            }
          }
          assert.equal(code, 0);
        } finally {
          await relay.close();
        }
      },
    );
  }
});
