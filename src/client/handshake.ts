// The DERP handshake, client side: ServerKey in, ClientInfo out, ServerInfo in.
import { native } from '../native.js';
import { derpClientError } from './errors.js';
import { FrameType, KEY_LENGTH, MAGIC, NONCE_LENGTH, PROTOCOL_VERSION, encodeFrame } from './frame.js';
import { isZeroKey } from './keys.js';

/** What the client tells the relay about itself, sealed in the ClientInfo frame. */
export interface ClientInfo {
  /** Grants mesh privileges (WatchConns, ClosePeer, ForwardPacket) when it matches the relay's. */
  meshKey?: string;
  /** The client answers the relay's Ping frames. */
  canAckPings: boolean;
  /** The client is a prober (shown in PeerPresent flags). */
  isProber: boolean;
}

/** What the relay tells the client after accepting it. */
export interface ServerInfo {
  /** Protocol version of the relay (2 today). */
  version?: number;
  /** Client-side send rate limit the relay asks for, if any. */
  tokenBucketBytesPerSecond?: number;
  tokenBucketBytesBurst?: number;
}

/** Largest ServerInfo box a client accepts (the JSON is a few dozen bytes). */
const MAX_SERVER_INFO_LENGTH = NONCE_LENGTH + 16 + 256 * 1024;

/** The server public key carried by a ServerKey frame: MAGIC(8) ‖ key(32), maybe followed by more. */
export function parseServerKey(frameType: number, payload: Buffer): Buffer {
  if (frameType !== FrameType.ServerKey) {
    throw derpClientError('DERP_ERR_HANDSHAKE', `expected ServerKey as the first frame, got frame type ${frameType}`, {
      value: frameType,
    });
  }
  if (payload.length < MAGIC.length + KEY_LENGTH || !payload.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'invalid ServerKey frame (bad magic or short)', { value: payload.length });
  }
  const serverKey = Buffer.from(payload.subarray(MAGIC.length, MAGIC.length + KEY_LENGTH));
  if (isZeroKey(serverKey)) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'the relay sent an all-zero public key');
  }
  return serverKey;
}

/** The NaCl box between the client's key and the relay's: one handshake seals and opens with it. */
export type HandshakeBox = InstanceType<typeof native.NaclBox>;

/** The box for a handshake with the relay whose key is `serverPublicKey` (one X25519 agreement). */
export function handshakeBox(privateKey: Buffer, serverPublicKey: Buffer): HandshakeBox {
  return new native.NaclBox(privateKey, serverPublicKey);
}

/** The whole ClientInfo frame: client key(32) ‖ box(JSON) sealed to the server key (`box`). */
export function clientInfoFrame(box: HandshakeBox, publicKey: Buffer, info: ClientInfo): Buffer {
  const json: Record<string, unknown> = { version: PROTOCOL_VERSION };
  if (info.meshKey !== undefined && info.meshKey !== '') json.meshKey = info.meshKey;
  json.CanAckPings = info.canAckPings;
  json.IsProber = info.isProber;
  const sealed = box.seal(Buffer.from(JSON.stringify(json)));
  return encodeFrame(FrameType.ClientInfo, publicKey, sealed);
}

/** Opens and parses a ServerInfo frame; JSON field names are matched case-insensitively. */
export function openServerInfo(box: HandshakeBox, frameType: number, payload: Buffer): ServerInfo {
  if (frameType !== FrameType.ServerInfo) {
    throw derpClientError('DERP_ERR_HANDSHAKE', `expected ServerInfo after ClientInfo, got frame type ${frameType}`, {
      value: frameType,
    });
  }
  if (payload.length < NONCE_LENGTH || payload.length > MAX_SERVER_INFO_LENGTH) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'ServerInfo frame has an invalid length', { value: payload.length });
  }
  const opened = box.open(payload);
  if (opened === null) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'ServerInfo box did not open with the server key');
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(opened.toString('utf8'));
  } catch (err) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'ServerInfo is not valid JSON', { cause: err });
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw derpClientError('DERP_ERR_HANDSHAKE', 'ServerInfo is not a JSON object');
  }
  const info: ServerInfo = {};
  for (const [name, value] of Object.entries(parsed)) {
    if (typeof value !== 'number') continue;
    switch (name.toLowerCase()) {
      case 'version':
        info.version = value;
        break;
      case 'tokenbucketbytespersecond':
        info.tokenBucketBytesPerSecond = value;
        break;
      case 'tokenbucketbytesburst':
        info.tokenBucketBytesBurst = value;
        break;
    }
  }
  return info;
}
