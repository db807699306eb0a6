// Node keys: raw 32-byte X25519 keys, and their text forms `nodekey:<64 hex>` (public) and
// `privkey:<64 hex>` (private).
import { native } from '../native.js';
import { derpClientError } from './errors.js';
import { KEY_LENGTH } from './frame.js';

const PUBLIC_KEY_PREFIX = 'nodekey:';
const PRIVATE_KEY_PREFIX = 'privkey:';
const KEY_HEX = /^[0-9a-fA-F]{64}$/;

/** A new random private key. */
export function generatePrivateKey(): Buffer {
  return native.generatePrivateKey();
}

/** The public key of `privateKey`. */
export function publicKeyOf(privateKey: Buffer): Buffer {
  assertKey(privateKey, 'privateKey');
  return native.publicKeyOf(privateKey);
}

/** `nodekey:<64 hex>`. */
export function formatPublicKey(publicKey: Buffer): string {
  assertKey(publicKey, 'publicKey');
  return PUBLIC_KEY_PREFIX + publicKey.toString('hex');
}

/** `privkey:<64 hex>`. */
export function formatPrivateKey(privateKey: Buffer): string {
  assertKey(privateKey, 'privateKey');
  return PRIVATE_KEY_PREFIX + privateKey.toString('hex');
}

/** Parses `nodekey:<64 hex>` (or bare hex) into a raw public key. */
export function parsePublicKey(text: string): Buffer {
  return parseKey(text, PUBLIC_KEY_PREFIX);
}

/** Parses `privkey:<64 hex>` (or bare hex) into a raw private key. */
export function parsePrivateKey(text: string): Buffer {
  return parseKey(text, PRIVATE_KEY_PREFIX);
}

/** Whether every byte of `key` is zero (relays refuse such keys). */
export function isZeroKey(key: Buffer): boolean {
  return key.every((byte) => byte === 0);
}

/** Throws `DERP_ERR_INVALID_ARGUMENT` unless `key` is a 32-byte buffer. */
export function assertKey(key: unknown, name: string): asserts key is Buffer {
  if (!Buffer.isBuffer(key) || key.length !== KEY_LENGTH) {
    throw derpClientError('DERP_ERR_INVALID_ARGUMENT', `${name} must be a ${KEY_LENGTH}-byte Buffer`, {
      value: Buffer.isBuffer(key) ? key.length : typeof key,
    });
  }
}

function parseKey(text: string, prefix: string): Buffer {
  const hex = text.startsWith(prefix) ? text.slice(prefix.length) : text;
  if (!KEY_HEX.test(hex)) {
    throw derpClientError('DERP_ERR_INVALID_ARGUMENT', `expected "${prefix}" followed by 64 hex digits`, { value: text });
  }
  return Buffer.from(hex, 'hex');
}
