// Errors from the Postgres layer, with a stable `code` callers and tests can match on.

export type PostgresErrorCode =
  /** A NOTIFY payload at or over Postgres's 8000-byte limit. */
  | 'DERPMESH_ERR_PUBSUB_PAYLOAD_TOO_LARGE'
  /** A channel name Postgres would truncate or reject. */
  | 'DERPMESH_ERR_PUBSUB_CHANNEL'
  /** publish/subscribe after close(). */
  | 'DERPMESH_ERR_PUBSUB_CLOSED'
  /** A stored value that this version cannot use (e.g. a malformed mesh key). */
  | 'DERPMESH_ERR_POSTGRES_DATA';

export class PostgresError extends Error {
  override readonly name = 'PostgresError';
  constructor(
    readonly code: PostgresErrorCode,
    message: string,
    /** The offending value, when there is one (never a secret). */
    readonly value?: unknown,
  ) {
    super(message);
  }
}
