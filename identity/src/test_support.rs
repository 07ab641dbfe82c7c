//! Test fixtures shared by the module tests: CAs and leaves built with the production profile,
//! keys and CSRs made by the openssl CLI (for key types rcgen/ring cannot make), and openssl
//! checks of what we emit.

use std::io::Write;
use std::process::{Command, Stdio};

use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::bundle::TrustBundle;
use crate::profile::{KeyKind, LEAF_BACKDATE, ca_params, leaf_params};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::tls::CertifiedKey;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub fn spiffe(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A CA (root or intermediate) whose certificate comes from `ca_params`.
pub struct TestCa {
    pub td: TrustDomain,
    pub key: KeyPair,
    pub params: CertificateParams,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn root(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = ca_params(
            &td,
            "test root",
            now() - Duration::hours(1),
            now() + Duration::days(1),
            None,
        );
        let der = params.self_signed(&key).unwrap().der().clone();
        TestCa {
            td,
            key,
            params,
            der,
        }
    }

    pub fn intermediate(&self, path_len: Option<u8>) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(
            &self.td,
            "test intermediate",
            now() - Duration::hours(1),
            now() + Duration::hours(12),
            path_len,
        );
        let der = self.sign(&params, &key);
        TestCa {
            td: self.td.clone(),
            key,
            params,
            der,
        }
    }

    pub fn sign(
        &self,
        params: &CertificateParams,
        subject_key: &KeyPair,
    ) -> CertificateDer<'static> {
        let issuer = Issuer::from_params(&self.params, &self.key);
        params
            .signed_by(subject_key, &issuer)
            .unwrap()
            .der()
            .clone()
    }

    /// A compliant P-256 leaf for `id`, valid now for an hour.
    pub fn leaf(&self, id: &str) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let params = leaf_params(
            &spiffe(id),
            KeyKind::EcdsaP256,
            now() - LEAF_BACKDATE,
            now() + Duration::hours(1),
        );
        (self.sign(&params, &key), key)
    }

    /// This CA's own certificate and key as a TLS identity (to test CA-as-leaf rejection).
    pub fn as_identity(&self) -> CertifiedKey {
        certified(vec![self.der.clone()], &self.key)
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.td.clone(), vec![self.der.clone()], 1)
    }
}

pub fn certified(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> CertifiedKey {
    CertifiedKey {
        chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// Runs the openssl CLI with `stdin`, asserting success; returns stdout.
pub fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI is installed");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A fresh private key in PKCS#8 PEM, e.g. `&["-algorithm", "RSA", "-pkeyopt",
/// "rsa_keygen_bits:2048"]`.
pub fn openssl_genpkey(args: &[&str]) -> String {
    let mut all = vec!["genpkey"];
    all.extend_from_slice(args);
    String::from_utf8(openssl(&all, b"")).unwrap()
}

pub fn openssl_rsa_key(bits: usize) -> KeyPair {
    let opt = format!("rsa_keygen_bits:{bits}");
    KeyPair::from_pem(&openssl_genpkey(&["-algorithm", "RSA", "-pkeyopt", &opt])).unwrap()
}

/// `openssl x509 -text` of a DER certificate.
pub fn openssl_text(der: &[u8]) -> String {
    String::from_utf8(openssl(&["x509", "-inform", "DER", "-noout", "-text"], der)).unwrap()
}

pub fn to_pem(der: &[u8]) -> String {
    crate::bundle::certificate_to_pem(der)
}

/// `openssl verify -x509_strict -purpose <purpose>` of `leaf` (with `untrusted` intermediates)
/// against `root`; returns whether it verified, and openssl's output.
pub fn openssl_verify(
    root: &[u8],
    untrusted: &[&[u8]],
    leaf: &[u8],
    purpose: &str,
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("root.pem");
    std::fs::write(&root_path, to_pem(root)).unwrap();
    let untrusted_path = dir.path().join("untrusted.pem");
    let untrusted_pem: String = untrusted.iter().map(|d| to_pem(d)).collect();
    std::fs::write(&untrusted_path, untrusted_pem).unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(&leaf_path, to_pem(leaf)).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&root_path);
    if !untrusted.is_empty() {
        cmd.arg("-untrusted").arg(&untrusted_path);
    }
    let out = cmd.arg(&leaf_path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
