// The DERP client's public API.
export { DerpClient, type DerpClientEvents, type DerpClientOptions } from './client.js';
export { DerpClientError, type DerpClientErrorCode } from './errors.js';
export type { BackoffOptions } from './backoff.js';
export type { ClientInfo, ServerInfo } from './handshake.js';
export type { PeerGoneReasonName, PeerPresentInfo } from './messages.js';
export type { TransportKind } from './transport.js';
// The const enums of frame.ts (FrameType, PeerPresentFlags, ...) stay internal: a const enum in a
// published .d.ts breaks consumers that compile file by file (isolatedModules, esbuild, swc).
export { DISCO_MAGIC, KEY_LENGTH, MAGIC, MAX_PACKET_SIZE, PROTOCOL_VERSION, isDiscoPacket } from './frame.js';
export { formatPrivateKey, formatPublicKey, generatePrivateKey, isZeroKey, parsePrivateKey, parsePublicKey, publicKeyOf } from './keys.js';
