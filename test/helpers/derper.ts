// Tailscale's reference relay (`derper`, built and cached by bench/derper.sh) as a child process on
// a loopback port, with a state directory of its own: for interop and mixed-mesh tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';

import { freePort } from '../../src/net.js';

/** Where bench/derper.sh leaves the binary. */
export const cachedDerper = join(process.env.DERPMESH_CACHE ?? join(homedir(), '.cache', 'derpmesh'), 'bin', 'derper');

export interface DerperOptions {
  binary?: string;
  port?: number;
  /** Written to a file given to `-mesh-psk-file`. */
  meshKey?: string;
  /** `-mesh-with` (host names, as derper takes them). */
  meshWith?: string[];
  /**
   * Serve HTTPS with this certificate for 127.0.0.1 (`-certmode manual`, which reads
   * `<certdir>/<hostname>.crt` and `.key`) and trust `caFile` for the mesh dials (Go reads
   * SSL_CERT_FILE). Without it derper serves plain HTTP and, with `meshWith`, dials its peers over
   * plain HTTP too (TS_DEBUG_USE_DERP_HTTP; its default is https://<host>/derp).
   */
  tls?: { certFile: string; keyFile: string; caFile: string };
  env?: NodeJS.ProcessEnv;
}

export interface Derper {
  child: ChildProcess;
  port: number;
  /** `http://127.0.0.1:PORT` (https with `tls`) */
  url: string;
  output(): string;
  /** SIGKILL and remove its directory. */
  stop(): void;
}

/** Starts derper without STUN or a second HTTP port and resolves once it accepts connections. */
export async function startDerper(o: DerperOptions = {}): Promise<Derper> {
  const port = o.port ?? (await freePort());
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-derper-'));
  const args = ['-a', `127.0.0.1:${port}`, '-stun=false', '-http-port=-1', '-c', join(dir, 'derper.json')];
  if (o.meshKey !== undefined) {
    writeFileSync(join(dir, 'mesh.key'), o.meshKey);
    args.push('-mesh-psk-file', join(dir, 'mesh.key'));
  }
  if (o.meshWith) args.push('-mesh-with', o.meshWith.join(','));
  const env: NodeJS.ProcessEnv = { ...process.env, ...o.env };
  if (o.tls) {
    copyFileSync(o.tls.certFile, join(dir, '127.0.0.1.crt'));
    copyFileSync(o.tls.keyFile, join(dir, '127.0.0.1.key'));
    args.push('-certmode', 'manual', '-certdir', dir, '-hostname', '127.0.0.1');
    env.SSL_CERT_FILE = o.tls.caFile;
  } else if (o.meshWith) {
    env.TS_DEBUG_USE_DERP_HTTP = '1';
  }
  const child = spawn(o.binary ?? cachedDerper, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  for (const stream of [child.stdout!, child.stderr!]) stream.on('data', (d: Buffer) => (output += d.toString()));
  const failed = new Promise<never>((_, reject) => {
    child.once('error', (err) => reject(new Error(`derper could not be started: ${err.message}`)));
    child.once('exit', (code, signal) => reject(new Error(`derper exited (${signal ?? code}) before listening:\n${output}`)));
  });
  failed.catch(() => {});
  // Its directory goes with it, however it ends (stop(), a SIGTERM, a crash).
  child.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  const stop = () => {
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await Promise.race([waitUntilListening(port, 10_000), failed]);
  } catch (err) {
    stop();
    throw err;
  }
  return { child, port, url: `${o.tls ? 'https' : 'http'}://127.0.0.1:${port}`, output: () => output, stop };
}

async function waitUntilListening(port: number, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${port} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
