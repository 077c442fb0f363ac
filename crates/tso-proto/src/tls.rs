//! TLS material shared by servers and clients: PEM certificates and keys, checked once when
//! they are loaded, then handed to tonic as they are.
//!
//! Invariant: a [`TlsIdentity`] or [`CaCertificates`] only exists checked: every PEM block is
//! an X.509 certificate that parses, a key is a private key ring can sign with, and an
//! identity's key belongs to its certificate. A bad file then fails at start with a clear
//! reason, not at the first handshake with a vague one.
//!
//! The crypto provider is ring's (pure Rust and assembly, no cmake); see DESIGN.md.

use std::fmt;

use rustls::RootCertStore;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;

/// Why TLS material was refused. Each variant says which part is wrong, so the caller can name
/// the file it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// The certificate (chain) is not usable.
    #[error("not a PEM certificate: {0}")]
    Certificate(String),
    /// The private key is not usable.
    #[error("not a PEM private key: {0}")]
    Key(String),
    /// The key parses but belongs to another certificate.
    #[error("the private key does not belong to the certificate")]
    Mismatch,
}

/// A certificate chain (leaf first) and its private key, both PEM: what a server presents, or
/// a client presents for mutual TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for TlsIdentity {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Checks that `cert_pem` holds at least one certificate, `key_pem` a private key
    /// (PKCS#8, PKCS#1 or SEC1), and that the key is the first certificate's.
    pub fn from_pem(
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, PemError> {
        let cert_pem = cert_pem.into();
        let key_pem = key_pem.into();
        let chain = certificates(&cert_pem)?;
        ParsedCertificate::try_from(&chain[0])
            .map_err(|e| PemError::Certificate(format!("the first certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            PemError::Key(format!("{e} (expected a PKCS#8, PKCS#1 or SEC1 key block)"))
        })?;
        let signer = any_supported_type(&key).map_err(|e| PemError::Key(e.to_string()))?;
        match CertifiedKey::new(chain, signer).keys_match() {
            Ok(()) => {}
            // ring cannot always show a key's public half; the handshake still checks it.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(PemError::Mismatch),
        }
        Ok(Self { cert_pem, key_pem })
    }

    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    /// The identity as tonic takes it.
    pub fn to_tonic(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// One or more CA certificates (PEM): what a client trusts for servers, or a server for
/// client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificates {
    pem: Vec<u8>,
}

impl CaCertificates {
    /// Checks that `pem` holds at least one certificate and that each one can be a trust anchor.
    pub fn from_pem(pem: impl Into<Vec<u8>>) -> Result<Self, PemError> {
        let pem = pem.into();
        let mut roots = RootCertStore::empty();
        for (i, cert) in certificates(&pem)?.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| PemError::Certificate(format!("certificate {}: {e}", i + 1)))?;
        }
        Ok(Self { pem })
    }

    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// The certificates as tonic takes them.
    pub fn to_tonic(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.pem)
    }
}

/// The certificates of `pem`, at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Certificate(
            "no `BEGIN CERTIFICATE` block found".into(),
        ));
    }
    Ok(certs)
}

/// Makes ring the process's rustls crypto provider, unless one is installed already. tonic's
/// server side asks rustls for the process default; with ring as the only provider compiled
/// in, rustls picks it by itself, but an embedder whose build also enables aws-lc-rs would
/// otherwise panic there.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: any provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA and a leaf it signed for 127.0.0.1: (ca pem, leaf pem, leaf key pem).
    fn ca_and_leaf() -> (String, String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        (ca_pem, leaf.pem(), leaf_key.serialize_pem())
    }

    #[test]
    fn good_material_is_taken() {
        let (ca, cert, key) = ca_and_leaf();
        CaCertificates::from_pem(ca.clone()).unwrap();
        let two = format!("{ca}{cert}");
        CaCertificates::from_pem(two).unwrap();
        let identity = TlsIdentity::from_pem(cert.clone(), key.clone()).unwrap();
        assert_eq!(identity.cert_pem(), cert.as_bytes());
        assert!(!format!("{identity:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_material_says_which_part_is_wrong() {
        let (ca, cert, key) = ca_and_leaf();
        let (_, _, other_key) = ca_and_leaf();
        for garbage in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert!(matches!(
                CaCertificates::from_pem(garbage),
                Err(PemError::Certificate(_))
            ));
            assert!(matches!(
                TlsIdentity::from_pem(garbage, key.clone()),
                Err(PemError::Certificate(_))
            ));
        }
        // A key where the certificate belongs, and the other way round.
        assert!(matches!(
            CaCertificates::from_pem(key.clone()),
            Err(PemError::Certificate(_))
        ));
        assert!(matches!(
            TlsIdentity::from_pem(cert.clone(), ca.clone()),
            Err(PemError::Key(_))
        ));
        assert_eq!(
            TlsIdentity::from_pem(cert, other_key),
            Err(PemError::Mismatch)
        );
    }
}
