//! Service-account signing keys: an RSA 2048 key (RS256) and a P-256 key (ES256) that the double
//! signs tokens with and publishes as a JWKS, plus a second, unpublished pair for tokens that must
//! fail signature checks. Key IDs are derived as Kubernetes derives them (base64url SHA-256 of the
//! PKIX public key). Keys live only in memory, one set per process.

use std::{process::Command, sync::OnceLock};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    digest::{SHA256, digest},
    rand::SystemRandom,
    rsa::PublicKeyComponents,
    signature::{
        self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        RsaKeyPair, UnparsedPublicKey,
    },
};
use serde_json::{Value, json};

use crate::TokenAlg;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not run `openssl genpkey` to generate the RSA key (is openssl installed?): {0}")]
    OpensslLaunch(#[source] std::io::Error),
    #[error("`openssl genpkey` failed: {0}")]
    OpensslFailed(String),
    #[error("generated key rejected: {0}")]
    Rejected(String),
}

enum KeyMaterial {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// One signing key with its JWK identity.
pub struct SigningKey {
    pub kid: String,
    alg: TokenAlg,
    material: KeyMaterial,
}

/// The RS256 and ES256 keys of one issuer.
pub struct KeySet {
    pub rsa: SigningKey,
    pub ec: SigningKey,
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_length(content.len()));
    out.extend_from_slice(content);
    out
}

/// DER `SubjectPublicKeyInfo` for an algorithm identifier and raw public key bits.
fn spki(algorithm_identifier: &[u8], public_key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8]; // no unused bits
    bits.extend_from_slice(public_key);
    let mut content = algorithm_identifier.to_vec();
    content.extend(der(0x03, &bits));
    der(0x30, &content)
}

/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
const P256_ALGORITHM: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];

/// Kubernetes' key ID: unpadded base64url of SHA-256 over the DER PKIX public key.
fn key_id(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, spki_der))
}

fn generate_rsa() -> Result<SigningKey, KeyError> {
    // ring cannot generate RSA keys; openssl writes a DER key to our pipe, never to disk.
    let output = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ])
        .output()
        .map_err(KeyError::OpensslLaunch)?;
    if !output.status.success() {
        return Err(KeyError::OpensslFailed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    // OpenSSL 3 writes DER keys from genpkey as PKCS#1 RSAPrivateKey; older releases as PKCS#8.
    let pair = RsaKeyPair::from_der(&output.stdout)
        .or_else(|_| RsaKeyPair::from_pkcs8(&output.stdout))
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
    let kid = key_id(&spki(RSA_ALGORITHM, pair.public().as_ref()));
    Ok(SigningKey {
        kid,
        alg: TokenAlg::Rs256,
        material: KeyMaterial::Rsa(pair),
    })
}

fn generate_ec() -> Result<SigningKey, KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
    let kid = key_id(&spki(P256_ALGORITHM, pair.public_key().as_ref()));
    Ok(SigningKey {
        kid,
        alg: TokenAlg::Es256,
        material: KeyMaterial::Ec(pair),
    })
}

fn generate_set() -> KeySet {
    let rsa = generate_rsa().unwrap_or_else(|e| panic!("test API server signing key: {e}"));
    let ec = generate_ec().unwrap_or_else(|e| panic!("test API server signing key: {e}"));
    KeySet { rsa, ec }
}

/// The keys the double signs with and publishes in its JWKS.
pub fn server_keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(generate_set)
}

/// Keys of the same shape that are never published: their tokens must fail verification.
pub fn unknown_keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(generate_set)
}

impl SigningKey {
    pub fn alg(&self) -> TokenAlg {
        self.alg
    }

    /// Signs `message` in JWS form (PKCS#1 v1.5 for RS256, fixed-width r||s for ES256).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let mut sig = vec![0u8; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .expect("RSA signing with a valid key");
                sig
            }
            KeyMaterial::Ec(pair) => pair
                .sign(&rng, message)
                .expect("ECDSA signing with a valid key")
                .as_ref()
                .to_vec(),
        }
    }

    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let public: PublicKeyComponents<Vec<u8>> = pair.public().into();
                public
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                    .is_ok()
            }
            KeyMaterial::Ec(pair) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }

    /// The public key as a JWK, as the API server's `/openid/v1/jwks` lists it.
    pub fn jwk(&self) -> Value {
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let public: PublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({
                    "use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
                    "n": URL_SAFE_NO_PAD.encode(&public.n),
                    "e": URL_SAFE_NO_PAD.encode(&public.e),
                })
            }
            KeyMaterial::Ec(pair) => {
                // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = pair.public_key().as_ref();
                json!({
                    "use": "sig", "kty": "EC", "kid": self.kid, "alg": "ES256", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
        }
    }
}

impl KeySet {
    pub fn key(&self, alg: TokenAlg) -> &SigningKey {
        match alg {
            TokenAlg::Rs256 => &self.rsa,
            TokenAlg::Es256 => &self.ec,
        }
    }

    /// The JWKS document (`{"keys": [...]}`).
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.rsa.jwk(), self.ec.jwk()] })
    }

    /// Checks a JWS signature. Like the API server, which tries each of its keys whatever the
    /// `kid` says, the kid is not consulted: there is one key per algorithm.
    pub fn verify(&self, alg: TokenAlg, message: &[u8], sig: &[u8]) -> bool {
        self.key(alg).verify(message, sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_long_form_above_127() {
        assert_eq!(der_length(5), vec![5]);
        assert_eq!(der_length(0x80), vec![0x81, 0x80]);
        assert_eq!(der_length(270), vec![0x82, 0x01, 0x0e]);
    }

    #[test]
    fn signatures_verify_only_with_the_signing_key() {
        let server = server_keys();
        let unknown = unknown_keys();
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let sig = server.key(alg).sign(b"payload");
            assert!(server.verify(alg, b"payload", &sig));
            assert!(!server.verify(alg, b"tampered", &sig));
            let foreign = unknown.key(alg).sign(b"payload");
            assert!(!server.verify(alg, b"payload", &foreign));
            assert_ne!(server.key(alg).kid, unknown.key(alg).kid);
        }
    }

    #[test]
    fn key_ids_match_openssl_pkix_encoding() {
        // Kubernetes hashes the PKIX DER; check our hand-built SPKI against openssl's.
        let rsa = generate_rsa().unwrap();
        let KeyMaterial::Rsa(pair) = &rsa.material else {
            panic!("generate_rsa returns an RSA key");
        };
        let ours = spki(RSA_ALGORITHM, pair.public().as_ref());
        let mut child = Command::new("openssl")
            .args(["pkey", "-pubin", "-inform", "DER", "-outform", "DER"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&ours).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl rejected our SPKI");
        assert_eq!(out.stdout, ours);
    }

    #[test]
    fn jwks_lists_both_keys_with_public_parts_only() {
        let jwks = server_keys().jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["kty"], "RSA");
        assert_eq!(keys[0]["e"], "AQAB");
        assert_eq!(keys[1]["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(keys[1]["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        for key in keys {
            assert!(
                key.get("d").is_none(),
                "private exponent must never be published"
            );
        }
    }
}
