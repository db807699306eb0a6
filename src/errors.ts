// Errors with a stable `code` that callers and tests can match on, made in one place.

export type DerpmeshErrorCode =
  | 'DERPMESH_ERR_CONFIG'
  | 'DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL'
  | 'DERPMESH_ERR_LISTEN'
  | 'DERPMESH_ERR_UPGRADE'
  | 'DERPMESH_ERR_NATIVE_BINDING';

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
