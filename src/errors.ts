// Errors with a stable `code` that callers and tests can match on, made in one place.

export type DerpmeshErrorCode =
  | 'DERPMESH_ERR_CONFIG'
  | 'DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL'
  | 'DERPMESH_ERR_LISTEN'
  | 'DERPMESH_ERR_UPGRADE'
  | 'DERPMESH_ERR_NATIVE_BINDING'
  // The Postgres layer (src/postgres/):
  /** A NOTIFY payload at or over Postgres's 8000-byte limit. */
  | 'DERPMESH_ERR_PUBSUB_PAYLOAD_TOO_LARGE'
  /** A channel name Postgres would truncate or reject. */
  | 'DERPMESH_ERR_PUBSUB_CHANNEL'
  /** publish/subscribe after close(). */
  | 'DERPMESH_ERR_PUBSUB_CLOSED'
  /** A stored value that this version cannot use (e.g. a malformed mesh key). */
  | 'DERPMESH_ERR_POSTGRES_DATA'
  // Thrown by the native relay (native/node/src/lib.rs `Code`), converted by `fromNative`:
  | 'DERPMESH_ERR_INVALID_ARGUMENT'
  | 'DERPMESH_ERR_MESH_TLS'
  | 'DERPMESH_ERR_NO_RUNTIME'
  | 'DERPMESH_ERR_DESCRIPTOR'
  | 'DERPMESH_ERR_TLS'
  | 'DERPMESH_ERR_LOAD_OPTIONS'
  | 'DERPMESH_ERR_LOAD_DIAL'
  | 'DERPMESH_ERR_LOAD_RUN'
  | 'DERPMESH_ERR_LOAD_TLS'
  /** Unusable client admission settings (a verify URL that is not http(s), a CA without a certificate). */
  | 'DERPMESH_ERR_ADMISSION';

/** The codes the native relay sets on the errors it throws (`err.code`). */
const nativeCodes: ReadonlySet<string> = new Set<DerpmeshErrorCode>([
  'DERPMESH_ERR_INVALID_ARGUMENT',
  'DERPMESH_ERR_MESH_TLS',
  'DERPMESH_ERR_NO_RUNTIME',
  'DERPMESH_ERR_DESCRIPTOR',
  'DERPMESH_ERR_TLS',
  'DERPMESH_ERR_LOAD_OPTIONS',
  'DERPMESH_ERR_LOAD_DIAL',
  'DERPMESH_ERR_LOAD_RUN',
  'DERPMESH_ERR_LOAD_TLS',
  'DERPMESH_ERR_LISTEN',
  'DERPMESH_ERR_ADMISSION',
]);

/** What an operator does about a native error: the settings are named here, never in Rust. */
const nativeHints: Partial<Record<DerpmeshErrorCode, string>> = {
  DERPMESH_ERR_MESH_TLS:
    'the mesh CA (DERPMESH_MESH_CA_FILE, --mesh-ca-file; relay option meshCaPem) must hold one or more PEM CA certificates',
  DERPMESH_ERR_LOAD_TLS: 'derpmesh bench --ca-file PEM, runLoad option caPem',
};

export class DerpmeshError extends Error {
  override readonly name = 'DerpmeshError';
  constructor(
    readonly code: DerpmeshErrorCode,
    message: string,
    /** The offending value, when there is one (never a secret). */
    readonly value?: unknown,
  ) {
    super(message);
  }
}

export function configError(message: string, value?: unknown): DerpmeshError {
  return new DerpmeshError('DERPMESH_ERR_CONFIG', message, value);
}

/**
 * An error thrown by the native relay as a `DerpmeshError` with the same code and, when there is
 * one, the operator's hint; any other error is returned as is.
 */
export function fromNative(err: unknown): unknown {
  const code = (err as { code?: unknown } | undefined)?.code;
  if (!(err instanceof Error) || typeof code !== 'string' || !nativeCodes.has(code)) return err;
  const hint = nativeHints[code as DerpmeshErrorCode];
  return new DerpmeshError(code as DerpmeshErrorCode, hint ? `${err.message} — ${hint}` : err.message);
}
