// Incremental DERP frame parser: bytes in as the transport delivers them, whole frames out. A chunk
// may hold many frames, and a frame may span many chunks; what is left of a frame at the end of a
// chunk is kept until the rest arrives.
import { derpClientError } from './errors.js';
import { FRAME_HEADER_LENGTH, FRAME_TYPE_LENGTH, MAX_FRAME_SIZE } from './frame.js';

/** Called once per whole frame, in stream order. `payload` is the frame's own copy. */
export type FrameCallback = (frameType: number, payload: Buffer) => void;

/** A frame whose header has been read and whose payload is still arriving. */
interface PartialFrame {
  frameType: number;
  payload: Buffer;
  /** Payload bytes received so far. */
  received: number;
}

export class FrameParser {
  /** The start of a header cut off at the end of a chunk. */
  readonly #header = Buffer.alloc(FRAME_HEADER_LENGTH);
  #headerReceived = 0;
  #partial: PartialFrame | undefined;

  /** Bytes received toward a frame not yet complete (0 when the stream is at a frame boundary). */
  get pendingBytes(): number {
    return this.#partial === undefined ? this.#headerReceived : FRAME_HEADER_LENGTH + this.#partial.received;
  }

  /**
   * Feeds one chunk; `onFrame` gets every frame it completes. A header announcing more than
   * MAX_FRAME_SIZE bytes throws `DERP_ERR_PROTOCOL` (after the frames before it were delivered):
   * the stream cannot be trusted past it.
   */
  parse(chunk: Buffer, onFrame: FrameCallback): void {
    let offset = 0;
    while (offset < chunk.length) {
      if (this.#partial !== undefined) {
        offset = this.#continuePayload(chunk, offset, onFrame);
      } else if (this.#headerReceived > 0 || chunk.length - offset < FRAME_HEADER_LENGTH) {
        offset = this.#continueHeader(chunk, offset, onFrame);
      } else {
        // The common case: a whole header in this chunk, and often the whole payload too.
        const frameType = chunk[offset]!;
        const length = chunk.readUInt32BE(offset + FRAME_TYPE_LENGTH);
        offset = this.#startFrame(frameType, length, chunk, offset + FRAME_HEADER_LENGTH, onFrame);
      }
    }
  }

  /** Collects header bytes split across chunks; starts the frame once the header is whole. */
  #continueHeader(chunk: Buffer, offset: number, onFrame: FrameCallback): number {
    const copied = chunk.copy(this.#header, this.#headerReceived, offset, offset + FRAME_HEADER_LENGTH - this.#headerReceived);
    this.#headerReceived += copied;
    offset += copied;
    if (this.#headerReceived < FRAME_HEADER_LENGTH) return offset;
    this.#headerReceived = 0;
    return this.#startFrame(this.#header[0]!, this.#header.readUInt32BE(FRAME_TYPE_LENGTH), chunk, offset, onFrame);
  }

  /** Starts a frame whose payload begins at `offset`: delivers it if the chunk holds all of it. */
  #startFrame(frameType: number, length: number, chunk: Buffer, offset: number, onFrame: FrameCallback): number {
    if (length > MAX_FRAME_SIZE) {
      throw derpClientError('DERP_ERR_PROTOCOL', `frame of ${length} bytes (type ${frameType}) exceeds the ${MAX_FRAME_SIZE}-byte limit`, {
        value: length,
      });
    }
    const end = offset + length;
    if (end <= chunk.length) {
      // A copy: a view would keep the whole chunk alive for as long as the payload is kept.
      onFrame(frameType, Buffer.from(chunk.subarray(offset, end)));
      return end;
    }
    this.#partial = { frameType, payload: Buffer.allocUnsafe(length), received: 0 };
    return this.#continuePayload(chunk, offset, onFrame);
  }

  /** Copies payload bytes into the partial frame; delivers it once complete. */
  #continuePayload(chunk: Buffer, offset: number, onFrame: FrameCallback): number {
    const partial = this.#partial!;
    const copied = chunk.copy(partial.payload, partial.received, offset);
    partial.received += copied;
    if (partial.received === partial.payload.length) {
      this.#partial = undefined;
      onFrame(partial.frameType, partial.payload);
    }
    return offset + copied;
  }
}
