//! Trust bundles: the set of root certificates of one trust domain (several at once while a
//! root rotates), as PEM, as a SPIFFE JWK-set bundle, and as a rustls root store.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe::TrustDomain;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle has no certificates")]
    NoCertificates,
    #[error("trust bundle PEM: {0}")]
    Pem(String),
    #[error("trust bundle certificate #{index} is invalid: {reason}")]
    InvalidCertificate { index: usize, reason: String },
    #[error("certificate chain does not verify against the trust bundle: {0}")]
    ChainDoesNotVerify(String),
}

/// The roots of one trust domain and the bundle's sequence number (bumped on every change so
/// consumers can tell a new bundle from a re-sent one).
#[derive(Clone, Debug, PartialEq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    pub sequence: u64,
}

impl TrustBundle {
    pub fn new(td: TrustDomain, roots: Vec<CertificateDer<'static>>, sequence: u64) -> Self {
        TrustBundle {
            trust_domain: td,
            roots,
            sequence,
        }
    }

    /// Every `CERTIFICATE` block of `pem` (other blocks are ignored); each must parse as X.509.
    /// The sequence starts at 0.
    pub fn from_pem(td: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let blocks = pem::parse_many(pem).map_err(|e| BundleError::Pem(e.to_string()))?;
        let roots: Vec<CertificateDer<'static>> = blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(|b| CertificateDer::from(b.into_contents()))
            .collect();
        if roots.is_empty() {
            return Err(BundleError::NoCertificates);
        }
        for (index, root) in roots.iter().enumerate() {
            let (rest, _) =
                X509Certificate::from_der(root).map_err(|e| BundleError::InvalidCertificate {
                    index,
                    reason: e.to_string(),
                })?;
            if !rest.is_empty() {
                return Err(BundleError::InvalidCertificate {
                    index,
                    reason: "trailing bytes after the certificate".into(),
                });
            }
        }
        Ok(Self::new(td, roots, 0))
    }

    /// Concatenated `CERTIFICATE` PEM blocks, LF line endings.
    pub fn to_pem(&self) -> String {
        certificates_to_pem(&self.roots)
    }

    /// The SPIFFE bundle format (SPIFFE Trust Domain and Bundle spec §4): a JWK set with one
    /// `x509-svid` JWK per root. Roots with keys other than EC P-256/P-384/P-521 or RSA (or that
    /// do not parse) are left out, since a JWK without its key members is invalid.
    pub fn to_spiffe_jwks(&self, refresh_hint_seconds: u64) -> Value {
        let keys: Vec<Value> = self
            .roots
            .iter()
            .filter_map(|der| x509_svid_jwk(der))
            .collect();
        json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": refresh_hint_seconds,
        })
    }

    /// Verifies a chain (leaf first, then intermediates) against these roots at `now`, for
    /// client-auth use (sigil's leaves carry both EKUs): the one check used by `sigil inspect`,
    /// plug-in validation and tests.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), BundleError> {
        let (leaf, intermediates) = chain.split_first().ok_or(BundleError::NoCertificates)?;
        let anchors = self
            .roots
            .iter()
            .enumerate()
            .map(|(index, root)| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::InvalidCertificate {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| BundleError::ChainDoesNotVerify(format!("{e:?}")))?;
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
            .map_err(|e| BundleError::ChainDoesNotVerify(format!("{e:?}")))
    }

    /// The roots as a rustls trust-anchor store.
    pub fn root_store(&self) -> Result<rustls::RootCertStore, BundleError> {
        if self.roots.is_empty() {
            return Err(BundleError::NoCertificates);
        }
        let mut store = rustls::RootCertStore::empty();
        for (index, root) in self.roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| BundleError::InvalidCertificate {
                    index,
                    reason: e.to_string(),
                })?;
        }
        Ok(store)
    }
}

fn x509_svid_jwk(der: &[u8]) -> Option<Value> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut jwk = public_key_jwk(cert.public_key())?;
    let obj = jwk.as_object_mut()?;
    obj.insert("use".into(), json!("x509-svid"));
    obj.insert("x5c".into(), json!([STANDARD.encode(der)]));
    Some(jwk)
}

/// RFC 7518 §6: the public key members of a JWK.
fn public_key_jwk(spki: &SubjectPublicKeyInfo<'_>) -> Option<Value> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
        let (crv, coord_len) = if curve == OID_EC_P256 {
            ("P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            ("P-384", 48)
        } else if curve == OID_NIST_EC_P521 {
            ("P-521", 66)
        } else {
            return None;
        };
        let point = spki.subject_public_key.data.as_ref();
        let (tag, xy) = point.split_first()?;
        if *tag != 0x04 || xy.len() != 2 * coord_len {
            return None;
        }
        let (x, y) = xy.split_at(coord_len);
        Some(json!({
            "kty": "EC",
            "crv": crv,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        }))
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let PublicKey::RSA(rsa) = spki.parsed().ok()? else {
            return None;
        };
        Some(json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.modulus)),
            "e": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.exponent)),
        }))
    } else {
        None
    }
}

/// JWK integers are unsigned big-endian without DER's sign-padding zero bytes.
fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[start..]
}

/// One DER certificate as a `CERTIFICATE` PEM block, LF line endings: the one PEM encoder of
/// sigil (the CA's APIs, ConfigMaps and files, the agent's Workload API and SDS, the tests).
pub fn certificate_to_pem(der: &[u8]) -> String {
    certificates_to_pem(&[CertificateDer::from(der)])
}

/// Certificates as concatenated `CERTIFICATE` PEM blocks, LF line endings.
pub fn certificates_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.as_ref()))
        .collect();
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;
    use crate::profile::ca_params;
    use crate::test_support::{TestCa, now, openssl_rsa_key};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn pem_round_trip() {
        let (a, b) = (TestCa::root("example.org"), TestCa::root("example.org"));
        let key_block = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        let text = format!("{}{key_block}{}", pem_of(&a.der), pem_of(&b.der));
        let bundle = TrustBundle::from_pem(td(), &text).unwrap();
        assert_eq!(bundle.roots, vec![a.der.clone(), b.der.clone()]);
        assert_eq!(bundle.sequence, 0);

        let out = bundle.to_pem();
        assert!(!out.contains('\r'));
        assert_eq!(out.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert_eq!(TrustBundle::from_pem(td(), &out).unwrap(), bundle);
        assert_eq!(bundle.root_store().unwrap().len(), 2);
    }

    fn pem_of(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", der))
    }

    #[test]
    fn pem_errors() {
        assert_eq!(
            TrustBundle::from_pem(td(), ""),
            Err(BundleError::NoCertificates)
        );
        let key_only = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        assert_eq!(
            TrustBundle::from_pem(td(), &key_only),
            Err(BundleError::NoCertificates)
        );
        let good = TestCa::root("example.org");
        let text = format!("{}{}", pem_of(&good.der), pem_of(b"not a certificate"));
        assert!(matches!(
            TrustBundle::from_pem(td(), &text),
            Err(BundleError::InvalidCertificate { index: 1, .. })
        ));
        assert_eq!(
            TrustBundle::new(td(), vec![], 3)
                .root_store()
                .map(|s| s.len()),
            Err(BundleError::NoCertificates)
        );
    }

    #[test]
    fn spiffe_jwks_format() {
        let ec_root = TestCa::root("example.org");
        let rsa_key = openssl_rsa_key(2048);
        let rsa_root = ca_params(
            &td(),
            "rsa root",
            now(),
            now() + time::Duration::hours(1),
            None,
        )
        .self_signed(&rsa_key)
        .unwrap();
        let bundle = TrustBundle::new(td(), vec![ec_root.der.clone(), rsa_root.der().clone()], 42);
        let jwks = bundle.to_spiffe_jwks(300);
        assert_eq!(jwks["spiffe_sequence"], 42);
        assert_eq!(jwks["spiffe_refresh_hint"], 300);
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);

        let ec = &keys[0];
        assert_eq!(ec["use"], "x509-svid");
        assert_eq!(ec["kty"], "EC");
        assert_eq!(ec["crv"], "P-256");
        let x = URL_SAFE_NO_PAD.decode(ec["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(ec["y"].as_str().unwrap()).unwrap();
        assert_eq!([&[4u8][..], &x, &y].concat(), ec_root.key.public_key_raw());
        let x5c = ec["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            ec_root.der.as_ref()
        );

        let rsa = &keys[1];
        assert_eq!(rsa["use"], "x509-svid");
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["e"], "AQAB");
        let n = URL_SAFE_NO_PAD.decode(rsa["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256);
        assert_ne!(n[0], 0);

        // A root whose key has no JWK form here (Ed25519) is left out rather than emitted
        // without key members.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_root = CertificateParams::default().self_signed(&ed).unwrap();
        let bundle = TrustBundle::new(td(), vec![ed_root.der().clone()], 1);
        assert_eq!(bundle.to_spiffe_jwks(0)["keys"], json!([]));
    }
}
