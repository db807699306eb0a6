// The native NaCl box against an independent implementation (tweetnacl): the same keys, the same
// boxes, both directions. The native layout is nonce(24) ‖ tag(16) ‖ ciphertext; tweetnacl's box
// takes the nonce separately and returns tag ‖ ciphertext.
import { strict as assert } from 'node:assert';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import nacl from 'tweetnacl';

import { native } from '../src/native.js';

const NONCE_LENGTH = nacl.box.nonceLength;
const SIZES = [0, 1, 16, 31, 32, 33, 64, 1000, 65_536];

function pair(): { privateKey: Buffer; publicKey: Buffer } {
  const privateKey = native.generatePrivateKey();
  return { privateKey, publicKey: native.publicKeyOf(privateKey) };
}

describe('native box vs tweetnacl', () => {
  test('public keys: nacl.box.keyPair.fromSecretKey equals native.publicKeyOf', () => {
    for (let i = 0; i < 50; i++) {
      const privateKey = i === 0 ? Buffer.alloc(32, 0xff) : native.generatePrivateKey();
      const fromTweetnacl = nacl.box.keyPair.fromSecretKey(new Uint8Array(privateKey)).publicKey;
      assert.deepEqual(native.publicKeyOf(privateKey), Buffer.from(fromTweetnacl));
    }
  });

  test('native seal → tweetnacl open', () => {
    const alice = pair();
    const bob = pair();
    for (const size of SIZES) {
      const message = randomBytes(size);
      const sealed = native.boxSeal(alice.privateKey, bob.publicKey, message);
      assert.equal(sealed.length, NONCE_LENGTH + nacl.box.overheadLength + size);
      const opened = nacl.box.open(
        new Uint8Array(sealed.subarray(NONCE_LENGTH)),
        new Uint8Array(sealed.subarray(0, NONCE_LENGTH)),
        new Uint8Array(alice.publicKey),
        new Uint8Array(bob.privateKey),
      );
      assert.ok(opened, `tweetnacl could not open a ${size}-byte native box`);
      assert.deepEqual(Buffer.from(opened), message);
    }
  });

  test('tweetnacl box → native open', () => {
    const alice = pair();
    const bob = pair();
    for (const size of SIZES) {
      const message = randomBytes(size);
      const nonce = randomBytes(NONCE_LENGTH);
      const boxed = nacl.box(
        new Uint8Array(message),
        new Uint8Array(nonce),
        new Uint8Array(bob.publicKey),
        new Uint8Array(alice.privateKey),
      );
      const opened = native.boxOpen(bob.privateKey, alice.publicKey, Buffer.concat([nonce, Buffer.from(boxed)]));
      assert.ok(opened, `native could not open a ${size}-byte tweetnacl box`);
      assert.deepEqual(opened, message);
    }
  });

  test('a nonce is never reused and both sides agree on the shared key', () => {
    const alice = pair();
    const bob = pair();
    const message = Buffer.from('{"version":2}');
    const first = native.boxSeal(alice.privateKey, bob.publicKey, message);
    const second = native.boxSeal(alice.privateKey, bob.publicKey, message);
    assert.notDeepEqual(first.subarray(0, NONCE_LENGTH), second.subarray(0, NONCE_LENGTH));
    // The precomputed shared key (X25519 + HSalsa20) is symmetric: tweetnacl's `after` with
    // bob's view opens what native sealed from alice's.
    const shared = nacl.box.before(new Uint8Array(alice.publicKey), new Uint8Array(bob.privateKey));
    const opened = nacl.box.open.after(
      new Uint8Array(first.subarray(NONCE_LENGTH)),
      new Uint8Array(first.subarray(0, NONCE_LENGTH)),
      shared,
    );
    assert.ok(opened);
    assert.deepEqual(Buffer.from(opened), message);
  });

  test('tampering is detected by both', () => {
    const alice = pair();
    const bob = pair();
    const sealed = native.boxSeal(alice.privateKey, bob.publicKey, Buffer.from('hello'));
    for (const index of [0, NONCE_LENGTH, NONCE_LENGTH + 16, sealed.length - 1]) {
      const bad = Buffer.from(sealed);
      bad[index]! ^= 0x01;
      assert.equal(native.boxOpen(bob.privateKey, alice.publicKey, bad), null, `flip at ${index}`);
      const tweetnacl = nacl.box.open(
        new Uint8Array(bad.subarray(NONCE_LENGTH)),
        new Uint8Array(bad.subarray(0, NONCE_LENGTH)),
        new Uint8Array(alice.publicKey),
        new Uint8Array(bob.privateKey),
      );
      assert.equal(tweetnacl, null, `tweetnacl accepted a flip at ${index}`);
    }
    assert.equal(native.boxOpen(bob.privateKey, alice.publicKey, sealed.subarray(0, 20)), null, 'shorter than a nonce');
    const stranger = pair();
    assert.equal(native.boxOpen(stranger.privateKey, alice.publicKey, sealed), null, 'wrong recipient');
  });
});
