//! X25519 keys and the NaCl box (X25519 → HSalsa20 → XSalsa20-Poly1305) used by the handshake.

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{PublicKey as BoxPublic, SalsaBox, SecretKey};

use crate::frame::{KEY_LEN, NONCE_LEN};

/// Poly1305 tag that precedes the ciphertext inside a box.
pub const BOX_OVERHEAD: usize = 16;

pub type Key = [u8; KEY_LEN];

/// A private key with its public half. The private bytes never leave this type except on purpose
/// (`private_bytes`), and `Debug` prints only the public key.
#[derive(Clone)]
pub struct KeyPair {
    secret: SecretKey,
    public: Key,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", node_key_string(&self.public))
    }
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        Self::from_private(SecretKey::generate(&mut OsRng).to_bytes())
    }

    pub fn from_private(private: Key) -> KeyPair {
        let secret = SecretKey::from(private);
        let public = *secret.public_key().as_bytes();
        KeyPair { secret, public }
    }

    pub fn public(&self) -> &Key {
        &self.public
    }

    pub fn private_bytes(&self) -> Key {
        self.secret.to_bytes()
    }

    /// The box between this key and `peer`. The X25519 agreement (most of a handshake's CPU) is
    /// made here, once; a handshake opens ClientInfo and seals ServerInfo with the same box.
    pub fn shared(&self, peer: &Key) -> SharedBox {
        #[cfg(fuzzing)]
        if let Some(shared) = fuzz_memo::get(&self.public, peer) {
            return shared;
        }
        #[allow(clippy::useless_conversion)]
        let shared = SharedBox(SalsaBox::new(&BoxPublic::from(*peer), &self.secret).into());
        #[cfg(fuzzing)]
        fuzz_memo::put(&self.public, peer, &shared);
        shared
    }

    /// Seals `msg` to `peer`: nonce(24) ‖ tag(16) ‖ ciphertext.
    pub fn seal(&self, peer: &Key, msg: &[u8]) -> Vec<u8> {
        self.shared(peer).seal(msg)
    }

    /// Opens nonce(24) ‖ tag(16) ‖ ciphertext from `peer`; `None` when it does not authenticate.
    pub fn open(&self, peer: &Key, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
            return None;
        }
        self.shared(peer).open(sealed)
    }
}

/// A NaCl box between two keys, agreed once (`KeyPair::shared`).
#[cfg(not(fuzzing))]
pub struct SharedBox(SalsaBox);
/// Shared, so that `fuzz_memo` can hand out the same box again (a `SalsaBox` cannot be cloned).
#[cfg(fuzzing)]
#[derive(Clone)]
pub struct SharedBox(std::sync::Arc<SalsaBox>);

impl std::fmt::Debug for SharedBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBox(..)")
    }
}

impl SharedBox {
    /// The box between a private key and a peer's public key (one X25519 agreement; unlike
    /// `KeyPair::from_private(..).shared(..)`, the private key's public half is not computed).
    pub fn between(private: &Key, peer: &Key) -> SharedBox {
        #[allow(clippy::useless_conversion)]
        SharedBox(SalsaBox::new(&BoxPublic::from(*peer), &SecretKey::from(*private)).into())
    }

    /// nonce(24) ‖ tag(16) ‖ ciphertext, with a fresh random nonce.
    pub fn seal(&self, msg: &[u8]) -> Vec<u8> {
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let sealed = self
            .0
            .encrypt(&nonce, msg)
            .expect("xsalsa20poly1305 encryption cannot fail for in-memory input");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The plaintext of nonce(24) ‖ tag(16) ‖ ciphertext; `None` when it does not authenticate.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.0.decrypt(nonce.into(), body).ok()
    }
}

/// Fuzz builds only (`--cfg fuzzing`, set by cargo-fuzz): the fuzz targets' keys are fixed, and
/// under coverage instrumentation the X25519 agreement costs about a millisecond, most of an
/// input's time. The boxes agreed are remembered (a few, per thread), so an input costs what its
/// parsing costs. The box is the one `SalsaBox::new` makes, so nothing else changes.
#[cfg(fuzzing)]
mod fuzz_memo {
    use super::{Key, SharedBox};
    use std::cell::RefCell;

    thread_local! {
        static MEMO: RefCell<Vec<(Key, Key, SharedBox)>> = const { RefCell::new(Vec::new()) };
    }

    pub fn get(ours: &Key, peer: &Key) -> Option<SharedBox> {
        MEMO.with(|m| {
            m.borrow()
                .iter()
                .find(|(o, p, _)| o == ours && p == peer)
                .map(|(_, _, b)| b.clone())
        })
    }

    pub fn put(ours: &Key, peer: &Key, shared: &SharedBox) {
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() >= 16 {
                m.remove(0);
            }
            m.push((*ours, *peer, shared.clone()));
        });
    }
}

pub fn is_zero(key: &Key) -> bool {
    key.iter().all(|&b| b == 0)
}

/// `nodekey:<64 hex>`, the text form of a public key.
pub fn node_key_string(key: &Key) -> String {
    format!("nodekey:{}", hex::encode(key))
}

/// Parses `nodekey:<hex>`, `privkey:<hex>` or bare 64 hex characters.
pub fn parse_key(text: &str) -> Option<Key> {
    let hex_part = text
        .strip_prefix("nodekey:")
        .or_else(|| text.strip_prefix("privkey:"))
        .unwrap_or(text);
    let mut key = [0u8; KEY_LEN];
    hex::decode_to_slice(hex_part, &mut key).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        let sealed = a.seal(b.public(), b"hello derp");
        assert_eq!(sealed.len(), 24 + 16 + 10);
        assert_eq!(b.open(a.public(), &sealed).unwrap(), b"hello derp");
        let c = KeyPair::generate();
        assert!(c.open(a.public(), &sealed).is_none());
        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert!(b.open(a.public(), &tampered).is_none());
        assert!(b.open(a.public(), &sealed[..39]).is_none());
    }

    /// Vector from the NaCl distribution (tests/box.c, "Alice/Bob"), independent of this crate.
    #[test]
    fn nacl_box_reference_vector() {
        let alice_sk = hex_key("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_pk = hex_key("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let nonce: [u8; 24] = hex::decode("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
            .unwrap()
            .try_into()
            .unwrap();
        let msg = hex::decode(concat!(
            "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffc",
            "e5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb31",
            "0e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde",
            "048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f93776384864",
            "5e0705"
        ))
        .unwrap();
        let expected = hex::decode(concat!(
            "f3ffc7703f9400e52a7dfb4b3d3305d98e993b9f48681273c29650ba32fc76ce",
            "48332ea7164d96a4476fb8c531a1186ac0dfc17c98dce87b4da7f011ec48c972",
            "71d2c20f9b928fe2270d6fb863d51738b48eeee314a7cc8ab932164548e526ae",
            "90224368517acfeabd6bb3732bc0e9da99832b61ca01b6de56244a9e88d5f9b3",
            "7973f622a43d14a6599b1f654cb45a74e355a5"
        ))
        .unwrap();
        let alice = KeyPair::from_private(alice_sk);
        let salsa = SalsaBox::new(&BoxPublic::from(bob_pk), &alice.secret);
        let sealed = salsa.encrypt((&nonce).into(), msg.as_slice()).unwrap();
        assert_eq!(sealed, expected);
        let bob = KeyPair::from_private(hex_key(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(bob.public(), &bob_pk);
        let mut framed = nonce.to_vec();
        framed.extend_from_slice(&sealed);
        assert_eq!(bob.open(alice.public(), &framed).unwrap(), msg);
    }

    #[test]
    fn key_text_forms() {
        let k = [0xabu8; 32];
        let s = node_key_string(&k);
        assert_eq!(s.len(), 8 + 64);
        assert_eq!(parse_key(&s), Some(k));
        assert_eq!(parse_key(&hex::encode(k)), Some(k));
        assert_eq!(parse_key("nodekey:zz"), None);
        assert!(is_zero(&[0; 32]));
    }

    fn hex_key(s: &str) -> Key {
        hex::decode(s).unwrap().try_into().unwrap()
    }
}
