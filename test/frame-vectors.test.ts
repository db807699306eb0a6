// The frame test vectors shared with the Rust core (test/vectors/frames.json; the Rust side is
// native/relay/tests/frame_vectors.rs), run through the TypeScript client's parser and decoder.
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';

import { DerpClientError } from '../src/client/errors.js';
import { type ServerMessage, decodeServerFrame } from '../src/client/messages.js';
import { FrameParser } from '../src/client/parser.js';

type ErrorClass = 'frameTooLarge' | 'recvPacketTooShort';

interface Vector {
  name: string;
  chunks: string[];
  messages: unknown[];
  pending?: number;
  error?: ErrorClass;
}

const file = JSON.parse(readFileSync(new URL('../../test/vectors/frames.json', import.meta.url), 'utf8')) as { vectors: Vector[] };

function fromHex(text: string): Buffer {
  return Buffer.from(text.replaceAll(' ', ''), 'hex');
}

/** A message in the vectors' form: the ServerMessage with its buffers in hex. */
function vectorForm(message: ServerMessage): unknown {
  switch (message.type) {
    case 'packet':
      return { type: message.type, source: message.source.toString('hex'), data: message.data.toString('hex') };
    case 'peerGone':
    case 'peerPresent':
      return { ...message, key: message.key.toString('hex') };
    case 'ping':
    case 'pong':
      return { type: message.type, data: message.data.toString('hex') };
    default:
      return message;
  }
}

interface Run {
  messages: unknown[];
  pending?: number;
  error?: ErrorClass;
}

/** Parses `chunks` and decodes every frame, as DerpConnection does once the handshake is done. */
function run(chunks: Buffer[]): Run {
  const parser = new FrameParser();
  const messages: unknown[] = [];
  let decoding = false;
  try {
    for (const chunk of chunks) {
      parser.parse(chunk, (frameType, payload) => {
        decoding = true;
        messages.push(vectorForm(decodeServerFrame(frameType, payload)));
        decoding = false;
      });
    }
  } catch (err) {
    assert.ok(err instanceof DerpClientError, `expected DerpClientError, got ${String(err)}`);
    assert.equal(err.code, 'DERP_ERR_PROTOCOL');
    return { messages, error: decoding ? 'recvPacketTooShort' : 'frameTooLarge' };
  }
  return { messages, pending: parser.pendingBytes };
}

function expected(vector: Vector): Run {
  return vector.error === undefined
    ? { messages: vector.messages, pending: vector.pending }
    : { messages: vector.messages, error: vector.error };
}

describe('frame vectors (test/vectors/frames.json)', () => {
  assert.ok(file.vectors.length > 0);

  for (const vector of file.vectors) {
    test(vector.name, () => {
      assert.deepEqual(run(vector.chunks.map(fromHex)), expected(vector));
    });
  }

  test('the same streams cut differently: in one chunk, and one byte per chunk', () => {
    for (const vector of file.vectors) {
      const stream = fromHex(vector.chunks.join(''));
      assert.deepEqual(run([stream]), expected(vector), `${vector.name}, in one chunk`);
      const bytes = [...stream].map((byte) => Buffer.from([byte]));
      assert.deepEqual(run(bytes), expected(vector), `${vector.name}, one byte per chunk`);
    }
  });
});
