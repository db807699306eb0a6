//! A small mutator for the stable harness (no libFuzzer): byte flips, interesting values,
//! inserted, deleted, duplicated and spliced ranges, length fields rewritten — applied in stacks
//! to the corpus's inputs. Deterministic for a given seed.

use crate::common::Rng;

const INTERESTING: &[u32] = &[
    0,
    1,
    4,
    5,
    7,
    8,
    16,
    31,
    32,
    33,
    50,
    51,
    56,
    63,
    64,
    100,
    125,
    126,
    127,
    128,
    255,
    256,
    1000,
    1001,
    4096,
    16384,
    32768,
    65535,
    65536,
    65568,
    65600,
    262144,
    262145,
    1 << 20,
    (1 << 20) + 1,
    0x7fff_ffff,
    0xffff_ffff,
];

/// A mutation of `input` (possibly mixed with `other`), at most `max_len` bytes.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(6);
    for _ in 0..rounds {
        match rng.below(10) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, fill);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                v.drain(i..i + n);
            }
            4 if !v.is_empty() => {
                // Duplicate a range (a frame repeated, a header doubled).
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(256));
                let copy = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, copy);
            }
            5 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let i = rng.below(v.len() + 1);
                let j = rng.below(other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            6 if v.len() >= 4 => {
                // An interesting value as a big-endian u32 or u16 (DERP and STUN lengths).
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(v.len() - 3);
                if rng.chance(2) {
                    v[i..i + 4].copy_from_slice(&x.to_be_bytes());
                } else {
                    v[i..i + 2].copy_from_slice(&(x as u16).to_be_bytes());
                }
            }
            7 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 1, 0x7f, 0x80, 0xff, b'\r', b'\n', b':', b' ', b','][rng.below(10)];
            }
            8 if !v.is_empty() => {
                v.truncate(rng.below(v.len()));
            }
            _ if !v.is_empty() => {
                // The first (flags) byte: every target reads one.
                v[0] = rng.next_u64() as u8;
            }
            _ => v.push(rng.next_u64() as u8),
        }
    }
    v.truncate(max_len);
    v
}
