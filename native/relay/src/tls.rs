//! TLS terminated in the core: the server configuration, the certificate in use (replaceable for
//! new handshakes while live connections keep theirs), Tailscale's meta certificate, and
//! self-signed certificates for a development or IP-only setup.
//!
//! The meta certificate: like Tailscale's `derper`, every served chain ends with a self-signed
//! Ed25519 certificate whose Subject CN is `derpkey<64 hex of the relay public key>` and whose
//! serial number is the protocol version. A Go client (`derphttp`) that sees it over TLS 1.3 knows
//! the relay's key before the upgrade, so it sends `Derp-Fast-Start: 1` and does not wait for the
//! `101`: one round trip less per connect. Clients verify the chain from the leaf; the extra
//! certificate takes no part in that.

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::frame::PROTOCOL_VERSION;
use crate::keys::Key;

/// Why a certificate could not be used or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate PEM holds no certificate")]
    NoCertificate,
    #[error("the certificate PEM is malformed: {0}")]
    BadCertificatePem(String),
    #[error("the key PEM holds no private key ({0})")]
    NoKey(String),
    /// A key type the ring provider cannot sign with (e.g. DSA, or an unsupported curve).
    #[error("the private key is not usable: {0}")]
    UnusableKey(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate is not usable: {0}")]
    BadCertificate(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain (leaf first) and key served to new handshakes, plus the meta certificate
/// appended to every chain. Swapping the pair affects new handshakes only.
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    meta: CertificateDer<'static>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    /// A resolver without a certificate (handshakes fail until one is set) whose chains end with
    /// the meta certificate of `relay_key`.
    pub fn new(relay_key: &Key) -> Result<CertResolver, TlsError> {
        Ok(CertResolver {
            current: RwLock::new(None),
            meta: meta_certificate(relay_key)?,
        })
    }

    /// Checks the pair (PEM, key usable, key matches the leaf) and serves it to new handshakes.
    pub fn set(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let key = certified_key(cert_pem, key_pem, Some(&self.meta))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
        Ok(())
    }

    pub fn clear(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn is_set(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The meta certificate (DER).
    pub fn meta(&self) -> &CertificateDer<'static> {
        &self.meta
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The chain of `cert_pem` (leaf first), then `extra`, with the key of `key_pem`, checked.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    extra: Option<&CertificateDer<'static>>,
) -> Result<CertifiedKey, TlsError> {
    let mut chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificatePem(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NoKey(e.to_string()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::UnusableKey(e.to_string()))?;
    let leaf_only = CertifiedKey::new(vec![chain[0].clone()], signing_key.clone());
    match leaf_only.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch)
        }
        Err(e) => return Err(TlsError::BadCertificate(e.to_string())),
    }
    chain.extend(extra.cloned());
    Ok(CertifiedKey::new(chain, signing_key))
}

/// The server configuration for `resolver`: TLS 1.3 preferred, 1.2 accepted, HTTP/1.1 offered
/// by ALPN, no client certificates.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The record layer after the handshake is `tlsio`'s: rustls hands over the traffic keys.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Tailscale's meta certificate for `relay_key`: self-signed Ed25519, Subject CN
/// `derpkey<64 hex>`, serial number = the protocol version, basic constraints `CA:FALSE`.
pub fn meta_certificate(relay_key: &Key) -> Result<CertificateDer<'static>, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let signing_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen)?;
    let mut params = rcgen::CertificateParams::default();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[PROTOCOL_VERSION as u8]));
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, format!("derpkey{}", hex::encode(relay_key)));
    params.distinguished_name = name;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    Ok(params.self_signed(&signing_key).map_err(gen)?.into())
}

/// A self-signed certificate (ECDSA P-256) for `hosts` (DNS names or IP addresses, the first
/// also its CN), as PEM: (certificate, PKCS#8 private key). For development and IP-only setups:
/// clients must be told to trust it.
pub fn generate_self_signed(hosts: &[String]) -> Result<(String, String), TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::Generate("no host name or address given".into()));
    }
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(gen)?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, hosts[0].clone());
    params.distinguished_name = name;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let signing_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let cert = params.self_signed(&signing_key).map_err(gen)?;
    Ok((cert.pem(), signing_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_is_accepted_and_a_foreign_key_is_refused() {
        let (cert, key) = generate_self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let resolver = CertResolver::new(&[7u8; 32]).unwrap();
        assert!(!resolver.is_set());
        resolver.set(cert.as_bytes(), key.as_bytes()).unwrap();
        assert!(resolver.is_set());
        let (_, other_key) = generate_self_signed(&["localhost".into()]).unwrap();
        assert!(matches!(
            resolver.set(cert.as_bytes(), other_key.as_bytes()),
            Err(TlsError::KeyMismatch)
        ));
        assert!(matches!(
            resolver.set(b"nothing", key.as_bytes()),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            resolver.set(cert.as_bytes(), b"nothing"),
            Err(TlsError::NoKey(_))
        ));
        // The refused pairs left the good one in place.
        assert!(resolver.is_set());
        resolver.clear();
        assert!(!resolver.is_set());
    }

    #[test]
    fn meta_certificate_names_the_relay_key_and_protocol_version() {
        let key = [0xabu8; 32];
        let der = meta_certificate(&key).unwrap();
        let bytes = der.as_ref();
        let cn = format!("derpkey{}", hex::encode(key));
        assert!(bytes.windows(cn.len()).any(|w| w == cn.as_bytes()), "CN present");
        // TBSCertificate: [0] EXPLICIT version (a0 03 02 01 02), then serialNumber INTEGER 2.
        let version_then_serial = [0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, PROTOCOL_VERSION as u8];
        assert!(
            bytes.windows(8).any(|w| w == version_then_serial),
            "serial is the protocol version"
        );
        // Ed25519 OID 1.3.101.112.
        assert!(bytes.windows(5).any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70]));
    }
}
