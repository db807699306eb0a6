// Frames a relay sends once the handshake is done, decoded into typed messages.
import { derpClientError } from './errors.js';
import { FrameType, KEY_LENGTH, PING_DATA_LENGTH, PeerGoneReason, RESTARTING_LENGTH } from './frame.js';

/** Why a peer is gone: it left, it was never connected here, or a reason this client does not know. */
export type PeerGoneReasonName = 'disconnected' | 'notHere' | number;

/** Where a peer is connected from, as reported to watchers; fields are absent when an older relay left them out. */
export interface PeerPresentInfo {
  /** IPv4 (dotted) or IPv6 text of the peer's address. */
  ip?: string;
  port?: number;
  /** PeerPresentFlags bits. */
  flags?: number;
}

export type ServerMessage =
  | { type: 'packet'; source: Buffer; data: Buffer }
  | { type: 'keepAlive' }
  | { type: 'peerGone'; key: Buffer; reason: PeerGoneReasonName }
  | { type: 'peerPresent'; key: Buffer; info: PeerPresentInfo }
  | { type: 'ping'; data: Buffer }
  | { type: 'pong'; data: Buffer }
  | { type: 'health'; problem: string }
  | { type: 'restarting'; reconnectInMs: number; tryForMs: number }
  /** Unknown types, handshake frames repeated, and informational frames too short to use. */
  | { type: 'ignored'; frameType: number };

// PeerPresent payload offsets: key(32) ‖ ip(16) ‖ port(2) ‖ flags(1).
const PEER_PRESENT_WITH_ADDRESS = KEY_LENGTH + 16 + 2;
const PEER_PRESENT_WITH_FLAGS = PEER_PRESENT_WITH_ADDRESS + 1;

/**
 * Decodes one server frame. Short frames, as Tailscale's client treats them (`derp_client.go`,
 * `recv`): a PeerGone or PeerPresent without its key, or a Ping, Pong or Restarting under 8 bytes,
 * is ignored and the connection goes on. Throws `DERP_ERR_PROTOCOL` only for a RecvPacket without
 * its source key, as the Rust decoder does; Tailscale's client drops that one like the others.
 * `test/vectors/frames.json` holds this rule for both codecs.
 */
export function decodeServerFrame(frameType: number, payload: Buffer): ServerMessage {
  switch (frameType) {
    case FrameType.RecvPacket:
      if (payload.length < KEY_LENGTH) {
        throw derpClientError('DERP_ERR_PROTOCOL', 'RecvPacket frame shorter than its source key', { value: payload.length });
      }
      return { type: 'packet', source: payload.subarray(0, KEY_LENGTH), data: payload.subarray(KEY_LENGTH) };
    case FrameType.KeepAlive:
      return { type: 'keepAlive' };
    case FrameType.PeerGone:
      if (payload.length < KEY_LENGTH) break;
      return { type: 'peerGone', key: payload.subarray(0, KEY_LENGTH), reason: peerGoneReason(payload) };
    case FrameType.PeerPresent:
      if (payload.length < KEY_LENGTH) break;
      return { type: 'peerPresent', key: payload.subarray(0, KEY_LENGTH), info: peerPresentInfo(payload) };
    case FrameType.Ping:
      if (payload.length < PING_DATA_LENGTH) break;
      return { type: 'ping', data: payload.subarray(0, PING_DATA_LENGTH) };
    case FrameType.Pong:
      if (payload.length < PING_DATA_LENGTH) break;
      return { type: 'pong', data: payload.subarray(0, PING_DATA_LENGTH) };
    case FrameType.Health:
      return { type: 'health', problem: payload.toString('utf8') };
    case FrameType.Restarting:
      if (payload.length < RESTARTING_LENGTH) break;
      return { type: 'restarting', reconnectInMs: payload.readUInt32BE(0), tryForMs: payload.readUInt32BE(4) };
  }
  return { type: 'ignored', frameType };
}

function peerGoneReason(payload: Buffer): PeerGoneReasonName {
  // A 32-byte PeerGone (older relays) means disconnected.
  const reason = payload.length > KEY_LENGTH ? payload[KEY_LENGTH]! : PeerGoneReason.Disconnected;
  if (reason === PeerGoneReason.Disconnected) return 'disconnected';
  if (reason === PeerGoneReason.NotHere) return 'notHere';
  return reason;
}

function peerPresentInfo(payload: Buffer): PeerPresentInfo {
  const info: PeerPresentInfo = {};
  if (payload.length >= PEER_PRESENT_WITH_ADDRESS) {
    info.ip = formatIp(payload.subarray(KEY_LENGTH, KEY_LENGTH + 16));
    info.port = payload.readUInt16BE(KEY_LENGTH + 16);
  }
  if (payload.length >= PEER_PRESENT_WITH_FLAGS) info.flags = payload[PEER_PRESENT_WITH_ADDRESS]!;
  return info;
}

const V4_MAPPED_PREFIX = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);

/** Text of a 16-byte address: dotted quad for v4-mapped addresses, RFC 5952 form otherwise. */
export function formatIp(address: Buffer): string {
  if (address.subarray(0, 12).equals(V4_MAPPED_PREFIX)) return [...address.subarray(12)].join('.');
  const groups: number[] = [];
  for (let offset = 0; offset < 16; offset += 2) groups.push(address.readUInt16BE(offset));
  // Compress the longest run (length ≥ 2) of zero groups to "::".
  let bestStart = -1;
  let bestLength = 1;
  for (let start = 0; start < 8;) {
    let end = start;
    while (end < 8 && groups[end] === 0) end++;
    if (end - start > bestLength) {
      bestStart = start;
      bestLength = end - start;
    }
    start = end === start ? start + 1 : end;
  }
  const hex = groups.map((group) => group.toString(16));
  if (bestStart < 0) return hex.join(':');
  return `${hex.slice(0, bestStart).join(':')}::${hex.slice(bestStart + bestLength).join(':')}`;
}
