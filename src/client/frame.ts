// DERP framing, as the client sees it. A frame is type(1) ‖ length(4, big-endian, excludes this
// 5-byte header) ‖ payload. Frames are written here and parsed by parser.ts.

/** Bytes of the frame type that starts every frame. */
export const FRAME_TYPE_LENGTH = 1;
/** Bytes of the big-endian payload length that follows the type. */
export const FRAME_LENGTH_LENGTH = 4;
/** Bytes of a frame header: type(1) ‖ length(4). */
export const FRAME_HEADER_LENGTH = FRAME_TYPE_LENGTH + FRAME_LENGTH_LENGTH;
/** Raw X25519 public and private keys are 32 bytes. */
export const KEY_LENGTH = 32;
/** Largest packet (after the key fields) a SendPacket/RecvPacket may carry. */
export const MAX_PACKET_SIZE = 64 * 1024;
/** Frames larger than this are fatal for a client (enforced by the parser). */
export const MAX_FRAME_SIZE = 1024 * 1024;
/** The protocol version this client speaks (`version` in ClientInfo). */
export const PROTOCOL_VERSION = 2;
/** "DERP🔑": the start of a ServerKey payload. */
export const MAGIC = Buffer.from([0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91]);
/** Nonce prefixed to every NaCl box. */
export const NONCE_LENGTH = 24;
/** Prefix of a disco packet ("TS💬"); relays answer PeerGone(notHere) for those they cannot deliver. */
export const DISCO_MAGIC = Buffer.from([0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac]);
/** Shortest disco packet: magic(6) ‖ sender key(32) ‖ nonce(24). */
export const MIN_DISCO_PACKET_LENGTH = 62;
/** Bytes of a Ping and of the Pong that echoes it. */
export const PING_DATA_LENGTH = 8;
/** Bytes of a Restarting payload: reconnectIn ms(4, BE) ‖ tryFor ms(4, BE). */
export const RESTARTING_LENGTH = 8;

/** Frame types. S→C: server to client; C→S: client to server. */
export const enum FrameType {
  /** S→C, first frame: MAGIC(8) ‖ server public key(32). */
  ServerKey = 0x01,
  /** C→S, first frame: client public key(32) ‖ nonce(24) ‖ box(JSON ClientInfo). */
  ClientInfo = 0x02,
  /** S→C, after ClientInfo: nonce(24) ‖ box(JSON ServerInfo). */
  ServerInfo = 0x03,
  /** C→S: destination key(32) ‖ packet. */
  SendPacket = 0x04,
  /** S→C: source key(32) ‖ packet. */
  RecvPacket = 0x05,
  /** S→C: empty; sent every ~60 s so idle connections stay up. */
  KeepAlive = 0x06,
  /** C→S: 1 byte, 1 if this is the client's home relay, else 0 (stats only). */
  NotePreferred = 0x07,
  /** S→C: key(32) ‖ reason(1): the peer left or (reason 1) was never here. */
  PeerGone = 0x08,
  /** S→watcher: key(32) ‖ ip(16, v4-mapped) ‖ port(2, BE) ‖ flags(1); older relays send 32 or 50 bytes. */
  PeerPresent = 0x09,
  /** mesh→S: source key(32) ‖ destination key(32) ‖ packet. */
  ForwardPacket = 0x0a,
  /** mesh→S: empty; subscribe to PeerPresent/PeerGone for every local client. Needs the mesh key. */
  WatchConns = 0x10,
  /** mesh→S: key(32); close every connection of that key. Needs the mesh key. */
  ClosePeer = 0x11,
  /** Both ways: 8 bytes the other side echoes in a Pong. */
  Ping = 0x12,
  /** Both ways: the 8 bytes of the Ping it answers. */
  Pong = 0x13,
  /** S→C: UTF-8 text of the relay's problem; empty means healthy again. */
  Health = 0x14,
  /** S→C: reconnectIn ms(4, BE) ‖ tryFor ms(4, BE); the relay is restarting. */
  Restarting = 0x15,
}

/** Reason byte of a PeerGone frame. */
export const enum PeerGoneReason {
  /** The peer was connected and left. */
  Disconnected = 0x00,
  /** A disco packet was sent to a key that is not connected to this relay. */
  NotHere = 0x01,
}

/** Bits of the flags byte of a PeerPresent frame. */
export const enum PeerPresentFlags {
  /** An ordinary client. */
  Regular = 0x01,
  /** A connection authenticated with the mesh key (another relay). */
  MeshPeer = 0x02,
  /** A prober (ClientInfo IsProber). */
  Prober = 0x04,
  /** Connected to a relay that is not its region's ideal node. */
  NotIdeal = 0x08,
}

/** One whole frame: header and payload, in one allocation. The payload parts are concatenated. */
export function encodeFrame(frameType: FrameType, ...payload: Buffer[]): Buffer {
  let length = 0;
  for (const part of payload) length += part.length;
  const frame = Buffer.allocUnsafe(FRAME_HEADER_LENGTH + length);
  frame[0] = frameType;
  frame.writeUInt32BE(length, FRAME_TYPE_LENGTH);
  let offset = FRAME_HEADER_LENGTH;
  for (const part of payload) offset += part.copy(frame, offset);
  return frame;
}

/** Whether `packet` looks like a disco packet (the kind a relay answers with PeerGone(notHere)). */
export function isDiscoPacket(packet: Buffer): boolean {
  return packet.length >= MIN_DISCO_PACKET_LENGTH && packet.subarray(0, DISCO_MAGIC.length).equals(DISCO_MAGIC);
}
