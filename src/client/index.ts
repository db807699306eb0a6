// The DERP client's public API.
export { DerpClient, type DerpClientEvents, type DerpClientOptions } from './client.js';
export { DerpClientError, type DerpClientErrorCode } from './errors.js';
export type { BackoffOptions } from './backoff.js';
export type { ClientInfo, ServerInfo } from './handshake.js';
export type { PeerGoneReasonName, PeerPresentInfo } from './messages.js';
export type { TransportKind } from './transport.js';
export {
  DISCO_MAGIC,
  FrameType,
  KEY_LENGTH,
  MAGIC,
  MAX_PACKET_SIZE,
  PeerGoneReason,
  PeerPresentFlags,
  PROTOCOL_VERSION,
  isDiscoPacket,
} from './frame.js';
export {
  formatPrivateKey,
  formatPublicKey,
  generatePrivateKey,
  isZeroKey,
  parsePrivateKey,
  parsePublicKey,
  publicKeyOf,
} from './keys.js';
