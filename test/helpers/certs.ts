// Certificates for TLS tests, made with the openssl command: a private CA and leaf certificates it
// signs for 127.0.0.1 (what a cluster with its own CA, e.g. in Kubernetes, uses).
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export { hasOpenssl } from './tools.js';

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
  const caFile = join(dir, 'ca.pem');
  openssl(['req', '-x509', ...EC, '-days', '30', '-subj', '/CN=derpmesh test CA', '-keyout', join(dir, 'ca.key'), '-out', caFile]);
  chmodSync(caFile, 0o644);
  return { dir, caFile, ...issueLeaf({ dir, caFile }, 'node') };
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/** Another leaf for 127.0.0.1 and localhost, signed by the CA, as `<name>.pem` and `<name>.key` in its directory. */
export function issueLeaf(ca: { dir: string; caFile: string }, name: string): { certFile: string; keyFile: string } {
  const f = (file: string) => join(ca.dir, file);
  openssl(['req', ...EC, '-subj', '/CN=127.0.0.1', '-keyout', f(`${name}.key`), '-out', f(`${name}.csr`)]);
  const ext = ['subjectAltName=IP:127.0.0.1,DNS:localhost', 'extendedKeyUsage=serverAuth'].join('\n');
  execFileSync('sh', ['-c', `printf '%s\\n' "$1" > "$2"`, 'sh', ext, f(`${name}.ext`)]);
  openssl(
    ['x509', '-req', '-in', f(`${name}.csr`), '-CA', ca.caFile, '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '30'].concat([
      '-extfile',
      f(`${name}.ext`),
      '-out',
      f(`${name}.pem`),
    ]),
  );
  for (const file of [`${name}.pem`, `${name}.key`]) chmodSync(f(file), 0o644);
  return { certFile: f(`${name}.pem`), keyFile: f(`${name}.key`) };
}
