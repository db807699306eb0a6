// Certificates for TLS tests, made with the openssl command: a private CA and leaf certificates it
// signs for 127.0.0.1 (what a cluster with its own CA, e.g. in Kubernetes, uses).
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export interface PrivateCa {
  dir: string;
  caFile: string;
  /** A certificate and key for 127.0.0.1 signed by the CA. */
  certFile: string;
  keyFile: string;
}

const openssl = (args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** A CA and one leaf certificate for IP 127.0.0.1 and localhost (files readable by every user). */
export function makePrivateCa(): PrivateCa {
  const dir = mkdtempSync(join(tmpdir(), 'derpmesh-ca-'));
  chmodSync(dir, 0o755);
  const f = (name: string) => join(dir, name);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(['req', '-x509', ...ec, '-days', '2', '-subj', '/CN=derpmesh test CA', '-keyout', f('ca.key'), '-out', f('ca.pem')]);
  openssl(['req', ...ec, '-subj', '/CN=127.0.0.1', '-keyout', f('node.key'), '-out', f('node.csr')]);
  const ext = ['subjectAltName=IP:127.0.0.1,DNS:localhost', 'extendedKeyUsage=serverAuth'].join('\n');
  execFileSync('sh', ['-c', `printf '%s\\n' "$1" > "$2"`, 'sh', ext, f('node.ext')]);
  openssl(
    ['x509', '-req', '-in', f('node.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '2'].concat([
      '-extfile',
      f('node.ext'),
      '-out',
      f('node.pem'),
    ]),
  );
  for (const name of ['ca.pem', 'node.pem', 'node.key']) chmodSync(f(name), 0o644);
  return { dir, caFile: f('ca.pem'), certFile: f('node.pem'), keyFile: f('node.key') };
}
