// The node's TLS certificate: from PEM files (checked when read: a certificate, a private key, and
// the key belongs to the certificate), watched on disk and re-read on SIGHUP. A new pair replaces the
// old one for new handshakes only; live connections keep theirs. A pair that fails the checks is
// reported and the one in use stays. Or a self-signed certificate made at start (IP-only relays).
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdirSync, readFileSync, unwatchFile, watchFile, writeFileSync, type Stats } from 'node:fs';
import { join } from 'node:path';

import { configError } from './errors.js';
import type { Logger } from './log.js';
import { native } from './native.js';

export interface CertificatePair {
  /** PEM: the leaf certificate, then any intermediates. */
  cert: Buffer;
  key: Buffer;
  /** SHA-256 fingerprint of the leaf, for logs. */
  fingerprint: string;
  validTo: Date;
}

/** How often the files' metadata is polled (a rename or a Kubernetes secret update counts). */
const WATCH_INTERVAL_MS = 1_000;
/** Writers replace a certificate and its key one after the other: wait for both. */
const SETTLE_MS = 300;

/** Reads and checks a certificate and its key; throws a configuration error naming the file and the fault. */
export function readCertificatePair(certFile: string, keyFile: string): CertificatePair {
  const read = (file: string, what: string) => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw configError(`${what} ${file} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, file);
    }
  };
  const cert = read(certFile, 'the TLS certificate file (CODER_TLS_CERT_FILE)');
  const key = read(keyFile, 'the TLS key file (CODER_TLS_KEY_FILE)');
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch (err) {
    throw configError(`the TLS certificate file ${certFile} holds no PEM certificate: ${(err as Error).message}`, certFile);
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw configError(`the TLS key file ${keyFile} holds no PEM private key: ${(err as Error).message}`, keyFile);
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw configError(`the TLS key in ${keyFile} does not belong to the certificate in ${certFile}`, keyFile);
  }
  return { cert, key, fingerprint: leaf.fingerprint256, validTo: new Date(leaf.validTo) };
}

/** The certificate files, watched. `onChange` gets every new valid pair. */
export class CertificateFiles {
  readonly #certFile: string;
  readonly #keyFile: string;
  readonly #logger: Logger;
  readonly #onChange: (pair: CertificatePair) => void;
  #current: CertificatePair;
  #settle: NodeJS.Timeout | undefined;
  readonly #listener = (now: Stats, before: Stats) => {
    if (now.mtimeMs === before.mtimeMs && now.size === before.size && now.ino === before.ino) return;
    clearTimeout(this.#settle);
    this.#settle = setTimeout(() => this.reload('changed on disk'), SETTLE_MS);
    this.#settle.unref();
  };

  /** Reads the pair now (a bad pair stops the start) and starts watching. */
  constructor(certFile: string, keyFile: string, logger: Logger, onChange: (pair: CertificatePair) => void) {
    this.#certFile = certFile;
    this.#keyFile = keyFile;
    this.#logger = logger;
    this.#onChange = onChange;
    this.#current = readCertificatePair(certFile, keyFile);
    this.#warnIfExpiring(this.#current);
    for (const file of [certFile, keyFile]) watchFile(file, { interval: WATCH_INTERVAL_MS, persistent: false }, this.#listener);
  }

  get current(): CertificatePair {
    return this.#current;
  }

  /** Re-reads the files; a valid pair that differs from the one in use replaces it. */
  reload(reason: string): void {
    let pair: CertificatePair;
    try {
      pair = readCertificatePair(this.#certFile, this.#keyFile);
    } catch (err) {
      this.#logger.error('TLS certificate not reloaded: the files do not hold a usable pair; the current one stays in use', {
        reason,
        err: (err as Error).message,
      });
      return;
    }
    if (pair.cert.equals(this.#current.cert) && pair.key.equals(this.#current.key)) {
      this.#logger.info('TLS certificate unchanged', { reason, fingerprint: pair.fingerprint });
      return;
    }
    try {
      this.#onChange(pair);
    } catch (err) {
      // Readable and matching, but refused where it is served (e.g. a key type the TLS library lacks).
      this.#logger.error('TLS certificate not reloaded: the server refused the new pair; the current one stays in use', {
        reason,
        err: (err as Error).message,
      });
      return;
    }
    this.#current = pair;
    this.#logger.info('TLS certificate reloaded: new handshakes use it, live connections keep theirs', {
      reason,
      fingerprint: pair.fingerprint,
      validTo: pair.validTo.toISOString(),
    });
    this.#warnIfExpiring(pair);
  }

  close(): void {
    clearTimeout(this.#settle);
    for (const file of [this.#certFile, this.#keyFile]) unwatchFile(file, this.#listener);
  }

  #warnIfExpiring(pair: CertificatePair): void {
    const days = (pair.validTo.getTime() - Date.now()) / 86_400_000;
    if (days < 7) {
      this.#logger.warn(days < 0 ? 'the TLS certificate has expired' : 'the TLS certificate expires within 7 days', {
        validTo: pair.validTo.toISOString(),
        file: this.#certFile,
      });
    }
  }
}

/**
 * A self-signed certificate for `hosts`, made now (the relay core generates it). Its certificate is
 * written to `<stateDir>/tls/self-signed.crt` for clients to trust; the key stays in memory.
 */
export function selfSignedCertificate(hosts: string[], stateDir: string, logger: Logger): { cert: Buffer; key: Buffer } {
  const made = native.generateSelfSigned(hosts);
  const cert = Buffer.from(made.certPem);
  const dir = join(stateDir, 'tls');
  const file = join(dir, 'self-signed.crt');
  try {
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    writeFileSync(file, cert, { mode: 0o644 });
  } catch (err) {
    throw configError(
      `cannot write the self-signed certificate to ${file}: ${(err as Error).message}; set DERPMESH_STATE_DIR to a writable directory`,
      file,
    );
  }
  logger.info('serving a self-signed certificate: clients must be told to trust it', {
    hosts: hosts.join(','),
    certificate: file,
    fingerprint: new X509Certificate(cert).fingerprint256,
  });
  return { cert, key: Buffer.from(made.keyPem) };
}
