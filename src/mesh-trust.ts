// Whom a node trusts when it talks to peer relays over https: the public roots plus the private
// CA certificates of DERPMESH_MESH_CA_FILE. One value serves both ways a node reaches a peer: the
// mesh links (rustls, in the relay core) and the latency probes (Node's https), so the two can
// never disagree about a peer's certificate.
import { readFileSync } from 'node:fs';
import { createSecureContext, rootCertificates, type SecureContext } from 'node:tls';

import { configError } from './errors.js';

export class MeshTrust {
  /** PEM CA certificate(s) trusted besides the public roots. */
  readonly caPem: Buffer | undefined;

  constructor(caPem?: Buffer) {
    this.caPem = caPem;
  }

  /** Reads the CA file of the configuration (none: the public roots only). */
  static fromFile(path: string | undefined): MeshTrust {
    if (!path) return new MeshTrust();
    try {
      return new MeshTrust(readFileSync(path));
    } catch (err) {
      throw configError(`DERPMESH_MESH_CA_FILE ${path} cannot be read: ${(err as Error).message}`, path);
    }
  }

  #context: SecureContext | undefined;

  /**
   * TLS options for Node's https: the same roots the relay core's mesh links trust, as one secure
   * context built on first use. Given `ca`, Node builds a context per connection, parsing the ~140
   * public roots each time, and their native memory stays until a garbage collection the small
   * JavaScript objects rarely trigger: with a probe per peer every heartbeat, a TLS node's RSS grew
   * by 100-200 MiB in 100 s (the TLS soak).
   */
  tlsOptions(): { secureContext: SecureContext } {
    this.#context ??= createSecureContext(this.caPem ? { ca: [...rootCertificates, this.caPem.toString('utf8')] } : {});
    return { secureContext: this.#context };
  }
}
