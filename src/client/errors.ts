// The one error class of the DERP client. Every error carries a stable `code` (match on it, not on
// the message) and, where there is one, the offending value.

/** Stable error codes of {@link DerpClientError}. */
export type DerpClientErrorCode =
  /** The options are invalid (bad URL, key of the wrong length, ...). */
  | 'DERP_ERR_INVALID_OPTION'
  /** An argument to a method is invalid (wrong key length, ping data not 8 bytes, ...). */
  | 'DERP_ERR_INVALID_ARGUMENT'
  /** The TCP, TLS or WebSocket connection could not be made or broke. */
  | 'DERP_ERR_CONNECTION'
  /** The server answered the upgrade request with a status other than 101. */
  | 'DERP_ERR_HTTP_STATUS'
  /** The server's greeting (ServerKey, ServerInfo) was missing, malformed or did not authenticate. */
  | 'DERP_ERR_HANDSHAKE'
  /** The server sent a frame the client cannot accept (over 1 MiB, truncated fields). */
  | 'DERP_ERR_PROTOCOL'
  /** A packet is larger than the 64 KiB the protocol allows. */
  | 'DERP_ERR_PACKET_TOO_LARGE'
  /** The client is closed, or the connection went away before the operation finished. */
  | 'DERP_ERR_CLOSED'
  /** An operation did not finish within its time limit. */
  | 'DERP_ERR_TIMEOUT';

/** Extra fields an error may carry. */
export interface DerpClientErrorFields {
  /** The offending value (a length, a status code, a frame type, ...). */
  value?: unknown;
  /** HTTP status of a refused upgrade (`DERP_ERR_HTTP_STATUS`). */
  statusCode?: number;
  /** The lower-level error that caused this one. */
  cause?: unknown;
}

export class DerpClientError extends Error {
  override readonly name = 'DerpClientError';
  readonly code: DerpClientErrorCode;
  readonly value?: unknown;
  readonly statusCode?: number;

  constructor(code: DerpClientErrorCode, message: string, fields: DerpClientErrorFields = {}) {
    super(message, fields.cause === undefined ? undefined : { cause: fields.cause });
    this.code = code;
    if ('value' in fields) this.value = fields.value;
    if (fields.statusCode !== undefined) this.statusCode = fields.statusCode;
  }
}

/** Makes a {@link DerpClientError}; the single place errors of this package are built. */
export function derpClientError(code: DerpClientErrorCode, message: string, fields?: DerpClientErrorFields): DerpClientError {
  return new DerpClientError(code, message, fields);
}
