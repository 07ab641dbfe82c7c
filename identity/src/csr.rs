//! PKCS#10 certificate signing requests. The CA only takes the public key from a CSR, after
//! proving the requester holds the private key (the CSR's own signature); every other CSR field
//! is ignored because the identity comes from the authenticated caller (its token or client
//! certificate), never from what the CSR asks for.

use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
use x509_parser::prelude::FromDer;

use crate::profile::{KeyKind, ProfileError, key_kind_of_spki};

/// Largest DER CSR accepted; an RSA-8192 CSR is well under 2 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Largest PEM CSR accepted (base64 and line breaks inflate DER by about 4/3).
pub const MAX_CSR_PEM_BYTES: usize = 2 * MAX_CSR_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {size} bytes, the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed CSR: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with the CSR's public key")]
    BadSignature,
    #[error("CSR signature algorithm is not accepted: {0}")]
    UnsupportedSignatureAlgorithm(String),
    #[error("unsupported CSR key: {0}")]
    UnsupportedKey(String),
}

/// The public key of a CSR whose proof of possession has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    pub spki_der: Vec<u8>,
    pub key: KeyKind,
}

/// Checks size, structure, key type and the CSR's self-signature, in that order (the key type
/// comes before the signature so that an unsupported key is reported as such, not as a
/// signature failure).
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge {
            size: der.len(),
            max: MAX_CSR_BYTES,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key = key_kind_of_spki(spki.raw).map_err(|e| match e {
        ProfileError::UnsupportedKey(what) => CsrError::UnsupportedKey(what),
        other => CsrError::Malformed(other.to_string()),
    })?;

    let sig_alg = &csr.signature_algorithm.algorithm;
    // x509-parser still accepts SHA-1 RSA signatures; the profile does not.
    if *sig_alg == OID_PKCS1_SHA1WITHRSA || *sig_alg == OID_SHA1_WITH_RSA {
        return Err(CsrError::UnsupportedSignatureAlgorithm(format!(
            "{sig_alg} (SHA-1)"
        )));
    }
    csr.verify_signature().map_err(|e| match e {
        X509Error::SignatureUnsupportedAlgorithm => {
            CsrError::UnsupportedSignatureAlgorithm(sig_alg.to_string())
        }
        _ => CsrError::BadSignature,
    })?;

    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
        key,
    })
}

/// Extracts the DER of the single `CERTIFICATE REQUEST` (or legacy `NEW CERTIFICATE REQUEST`)
/// PEM block.
pub fn csr_pem_to_der(pem: &str) -> Result<Vec<u8>, CsrError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge {
            size: pem.len(),
            max: MAX_CSR_PEM_BYTES,
        });
    }
    let blocks = pem::parse_many(pem).map_err(|e| CsrError::Malformed(format!("PEM: {e}")))?;
    let mut csrs = blocks
        .into_iter()
        .filter(|b| matches!(b.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"));
    match (csrs.next(), csrs.next()) {
        (Some(csr), None) => Ok(csr.into_contents()),
        (None, _) => Err(CsrError::Malformed(
            "no CERTIFICATE REQUEST PEM block".into(),
        )),
        (Some(_), Some(_)) => Err(CsrError::Malformed(
            "more than one CERTIFICATE REQUEST PEM block".into(),
        )),
    }
}

/// A DER CSR for `key` with an empty subject and no extensions: all the CA looks at is the key.
pub fn build_csr(key: &KeyPair) -> Result<Vec<u8>, CsrError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(key)
        .map_err(|e| CsrError::Malformed(format!("building CSR: {e}")))?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData};

    use super::*;
    use crate::test_support::{openssl, openssl_rsa_key};

    /// A DER CSR made by `openssl req` with a fresh key from `newkey` (e.g. `rsa:1024`).
    fn openssl_csr(newkey: &str, extra: &[&str]) -> Vec<u8> {
        let mut args = vec![
            "req",
            "-new",
            "-newkey",
            newkey,
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=x",
            "-outform",
            "DER",
        ];
        args.extend_from_slice(extra);
        openssl(&args, b"")
    }

    #[test]
    fn accepts_supported_keys() {
        let keys = [
            (KeyKind::EcdsaP256, KeyPair::generate().unwrap()),
            (
                KeyKind::EcdsaP384,
                KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
            ),
            (KeyKind::Rsa { bits: 2048 }, openssl_rsa_key(2048)),
        ];
        for (kind, key) in keys {
            let der = build_csr(&key).unwrap();
            let verified = verify_csr(&der).unwrap();
            assert_eq!(verified.key, kind);
            assert_eq!(verified.spki_der, key.subject_public_key_info());
        }
        // CSRs from other tools, with a subject and SANs the CA will ignore.
        let der = openssl_csr(
            "ec",
            &[
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-addext",
                "subjectAltName=URI:spiffe://evil/x",
            ],
        );
        assert_eq!(verify_csr(&der).unwrap().key, KeyKind::EcdsaP256);
        assert_eq!(
            verify_csr(&openssl_csr("rsa:3072", &[])).unwrap().key,
            KeyKind::Rsa { bits: 3072 }
        );
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let mut der = build_csr(&KeyPair::generate().unwrap()).unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert_eq!(verify_csr(&der), Err(CsrError::BadSignature));

        // The signature must come from the CSR's own key: swap in another key's SPKI.
        let mut der = build_csr(&KeyPair::generate().unwrap()).unwrap();
        let ours = KeyPair::generate().unwrap().subject_public_key_info();
        let theirs = verify_csr(&der).unwrap().spki_der;
        let at = der
            .windows(theirs.len())
            .position(|w| w == theirs.as_slice())
            .unwrap();
        der[at..at + theirs.len()].copy_from_slice(&ours);
        assert_eq!(verify_csr(&der), Err(CsrError::BadSignature));
    }

    #[test]
    fn unsupported_keys_are_rejected() {
        assert_eq!(
            verify_csr(&openssl_csr("rsa:1024", &[])),
            Err(CsrError::UnsupportedKey("RSA 1024".into()))
        );
        let ed25519 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        assert_eq!(
            verify_csr(&build_csr(&ed25519).unwrap()),
            Err(CsrError::UnsupportedKey("Ed25519".into()))
        );
        // x509-parser parses Ed448 CSRs fine (the SPKI is generic), so this is the key check,
        // not a parse failure.
        assert_eq!(
            verify_csr(&openssl_csr("ed448", &[])),
            Err(CsrError::UnsupportedKey("Ed448".into()))
        );
        assert_eq!(
            verify_csr(&openssl_csr(
                "ec",
                &["-pkeyopt", "ec_paramgen_curve:secp256k1"]
            )),
            Err(CsrError::UnsupportedKey("EC curve 1.3.132.0.10".into()))
        );
    }

    #[test]
    fn sha1_signatures_are_rejected() {
        assert!(matches!(
            verify_csr(&openssl_csr("rsa:2048", &["-sha1"])),
            Err(CsrError::UnsupportedSignatureAlgorithm(_))
        ));
    }

    #[test]
    fn size_and_structure_errors() {
        let garbage = vec![0x30u8; 20 * 1024];
        assert_eq!(
            verify_csr(&garbage),
            Err(CsrError::TooLarge {
                size: 20 * 1024,
                max: MAX_CSR_BYTES
            })
        );
        let mut random = [0u8; 1024];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).unwrap();
        random[0] = 0x30; // a SEQUENCE tag, so parsing gets past the first byte
        assert!(matches!(verify_csr(&random), Err(CsrError::Malformed(_))));
        assert!(matches!(verify_csr(&[]), Err(CsrError::Malformed(_))));

        let mut trailing = build_csr(&KeyPair::generate().unwrap()).unwrap();
        trailing.push(0);
        assert_eq!(
            verify_csr(&trailing),
            Err(CsrError::Malformed("trailing bytes after the CSR".into()))
        );
    }

    #[test]
    fn pem_blocks() {
        let der = build_csr(&KeyPair::generate().unwrap()).unwrap();
        for tag in ["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"] {
            let text = pem::encode(&pem::Pem::new(tag, der.clone()));
            assert_eq!(csr_pem_to_der(&text), Ok(der.clone()));
        }
        let pem_csr = String::from_utf8(openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "/dev/null",
                "-subj",
                "/CN=x",
            ],
            b"",
        ))
        .unwrap();
        let der = csr_pem_to_der(&pem_csr).unwrap();
        assert_eq!(verify_csr(&der).unwrap().key, KeyKind::EcdsaP256);

        let cert_only = pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()));
        assert!(matches!(
            csr_pem_to_der(&cert_only),
            Err(CsrError::Malformed(_))
        ));
        let two = format!("{pem_csr}{pem_csr}");
        assert!(matches!(csr_pem_to_der(&two), Err(CsrError::Malformed(_))));
        assert!(matches!(
            csr_pem_to_der(
                "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(CsrError::Malformed(_))
        ));
        let huge = "A".repeat(MAX_CSR_PEM_BYTES + 1);
        assert_eq!(
            csr_pem_to_der(&huge),
            Err(CsrError::TooLarge {
                size: MAX_CSR_PEM_BYTES + 1,
                max: MAX_CSR_PEM_BYTES
            })
        );
    }
}
