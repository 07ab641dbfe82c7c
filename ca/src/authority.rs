//! The signing authority as it stands now: the key that signs, the chain above it, and the trust
//! bundle. Key sources (`source.rs`) rebuild it when the stored state, the plug-in files or the
//! rotation schedule change; requests read it through a `watch` channel.

use sigil_identity::bundle::certificate_to_pem;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{Issuer, KeyPair, PublicKeyData, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateDer;
use sigil_identity::profile::{self, KeyKind};
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("the CA has no signing key yet")]
    NoKey,
    #[error("the signing certificate expired at {0}")]
    SignerExpired(OffsetDateTime),
    #[error("signing certificate is unusable: {0}")]
    BadSigner(String),
    #[error("signing certificate is unusable: {0}")]
    SignerProfile(#[source] profile::ProfileError),
    #[error("signing certificate is unusable: {0}")]
    SignerKey(#[source] rcgen::Error),
    #[error("public key is unusable: {0}")]
    BadPublicKey(String),
    /// X509-SVID spec §2: a leaf's SPIFFE ID MUST have a non-root path; `spiffe://<td>` names
    /// the trust domain itself (what CA certificates carry), never a workload.
    #[error("{0} is a trust-domain ID (no path); a workload certificate needs a path")]
    TrustDomainIdLeaf(SpiffeId),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// One immutable view of the CA; replaced whole on every change.
pub struct Authority {
    pub trust_domain: TrustDomain,
    /// Signs workload certificates.
    pub signer: Option<Arc<Signer>>,
    /// Signs the CA's own serving certificate (during a root rotation, possibly the older root:
    /// see `state::Schedule::serving`).
    pub serving_signer: Option<Arc<Signer>>,
    pub bundle: TrustBundle,
}

impl Authority {
    /// An authority with nothing loaded yet: every Sign is refused as unavailable.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Authority {
            bundle: TrustBundle::new(trust_domain.clone(), Vec::new(), 0),
            trust_domain,
            signer: None,
            serving_signer: None,
        }
    }

    pub fn signer(&self) -> Result<&Signer, AuthorityError> {
        self.signer.as_deref().ok_or(AuthorityError::NoKey)
    }

    /// The bundle's roots as PEM, in the order the bundle holds them.
    pub fn roots_pem(&self) -> Vec<String> {
        self.bundle
            .roots
            .iter()
            .map(|r| certificate_to_pem(r))
            .collect()
    }
}

/// The key that signs leaves, with its certificate and the intermediates up to a root.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// No certificate it signs lives past this: its own NotAfter, or earlier when the root it
    /// chains to is scheduled to leave the trust bundle.
    pub not_after: OffsetDateTime,
    /// The signer's certificate followed by any intermediates above it, excluding roots; empty
    /// when the signer is itself a root.
    pub intermediates: Vec<CertificateDer<'static>>,
}

/// A freshly signed certificate.
#[derive(Debug)]
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl Signer {
    /// `chain_above` is every certificate between the signer and a root (empty for a root
    /// signer); `retire_at` caps the lifetime of what it signs.
    pub fn new(
        cert: CertificateDer<'static>,
        key: KeyPair,
        is_root: bool,
        chain_above: Vec<CertificateDer<'static>>,
        retire_at: Option<OffsetDateTime>,
    ) -> Result<Self, AuthorityError> {
        let report = profile::inspect_cert(&cert).map_err(AuthorityError::SignerProfile)?;
        if !report.is_ca {
            return Err(AuthorityError::BadSigner("certificate is not a CA".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(AuthorityError::SignerKey)?;
        let intermediates = if is_root {
            Vec::new()
        } else {
            std::iter::once(cert.clone()).chain(chain_above).collect()
        };
        Ok(Signer {
            issuer,
            cert,
            not_after: retire_at.map_or(report.not_after, |r| r.min(report.not_after)),
            intermediates,
        })
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs a workload certificate for `id` over the given public key. NotAfter is `now + ttl`
    /// but never past the signer's own NotAfter. Every leaf the CA issues (Sign,
    /// CreateCertificate, `sigil ca issue`) comes through here, so this is where a trust-domain
    /// ID is refused.
    pub fn sign_leaf(
        &self,
        spki_der: &[u8],
        key: KeyKind,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, AuthorityError> {
        if id.is_trust_domain_id() {
            return Err(AuthorityError::TrustDomainIdLeaf(id.clone()));
        }
        let (not_before, not_after) = self.validity(ttl, now)?;
        let params = profile::leaf_params(id, key, not_before, not_after);
        self.sign(params, spki_der, not_after)
    }

    /// Signs the CA's own TLS serving certificate.
    pub fn sign_serving(
        &self,
        key: &KeyPair,
        id: &SpiffeId,
        names: &[String],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, AuthorityError> {
        let (not_before, not_after) = self.validity(ttl, now)?;
        let params = profile::serving_params(id, names, not_before, not_after)
            .map_err(|e| AuthorityError::BadSigner(format!("serving certificate names: {e}")))?;
        self.sign(params, &key.subject_public_key_info(), not_after)
    }

    fn validity(
        &self,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(OffsetDateTime, OffsetDateTime), AuthorityError> {
        if now >= self.not_after {
            return Err(AuthorityError::SignerExpired(self.not_after));
        }
        let not_after = (now + ttl).min(self.not_after);
        Ok((now - profile::LEAF_BACKDATE, not_after))
    }

    fn sign(
        &self,
        params: rcgen::CertificateParams,
        spki_der: &[u8],
        not_after: OffsetDateTime,
    ) -> Result<Issued, AuthorityError> {
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| AuthorityError::BadPublicKey(e.to_string()))?;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| profile::hex(s.as_ref()))
            .unwrap_or_default();
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(Issued {
            leaf: cert.der().clone(),
            serial_hex,
            not_after,
        })
    }
}

pub type SharedAuthority = Arc<Authority>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sigil_identity::csr;

    /// A root signer for tests, with its DER certificate.
    pub(crate) fn test_root(td: &TrustDomain) -> (Signer, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let cert = profile::ca_params(
            td,
            "test root",
            now - time::Duration::minutes(1),
            now + time::Duration::days(30),
            None,
        )
        .self_signed(&key)
        .unwrap();
        let der = cert.der().clone();
        (
            Signer::new(der.clone(), key, true, Vec::new(), None).unwrap(),
            der,
        )
    }

    #[test]
    fn leaf_is_capped_at_the_signer_not_after() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (signer, _) = test_root(&td);
        let key = KeyPair::generate().unwrap();
        let verified = csr::verify_csr(&csr::build_csr(&key).unwrap()).unwrap();
        let id = SpiffeId::for_service_account(&td, "ns", "sa").unwrap();
        let issued = signer
            .sign_leaf(
                &verified.spki_der,
                verified.key,
                &id,
                Duration::from_secs(400 * 24 * 3600),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        assert_eq!(issued.not_after, signer.not_after);
        let report = profile::inspect_cert(&issued.leaf).unwrap();
        assert_eq!(report.spiffe_id, Some(id));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            report.serial_hex.trim_start_matches('0'),
            issued.serial_hex.trim_start_matches('0')
        );
    }

    #[test]
    fn retiring_root_caps_leaf_lifetime() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let cert = profile::ca_params(
            &td,
            "root",
            now - time::Duration::minutes(1),
            now + time::Duration::days(30),
            None,
        )
        .self_signed(&key)
        .unwrap();
        let retire = now + time::Duration::hours(2);
        let signer = Signer::new(cert.der().clone(), key, true, Vec::new(), Some(retire)).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let id = SpiffeId::for_service_account(&td, "ns", "sa").unwrap();
        let issued = signer
            .sign_leaf(
                &leaf_key.subject_public_key_info(),
                KeyKind::EcdsaP256,
                &id,
                Duration::from_secs(86_400),
                now,
            )
            .unwrap();
        assert_eq!(
            issued.not_after, retire,
            "no leaf outlives its root's place in the bundle"
        );
    }

    #[test]
    fn expired_signer_refuses() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (signer, _) = test_root(&td);
        let key = KeyPair::generate().unwrap();
        let id = SpiffeId::for_service_account(&td, "ns", "sa").unwrap();
        let later = signer.not_after + time::Duration::seconds(1);
        let err = signer
            .sign_leaf(
                &key.subject_public_key_info(),
                KeyKind::EcdsaP256,
                &id,
                Duration::from_secs(60),
                later,
            )
            .unwrap_err();
        assert!(matches!(err, AuthorityError::SignerExpired(_)));
    }

    #[test]
    fn a_trust_domain_id_gets_no_leaf() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (signer, _) = test_root(&td);
        let key = KeyPair::generate().unwrap();
        let err = signer
            .sign_leaf(
                &key.subject_public_key_info(),
                KeyKind::EcdsaP256,
                &td.id(),
                Duration::from_secs(60),
                OffsetDateTime::now_utc(),
            )
            .unwrap_err();
        assert!(matches!(err, AuthorityError::TrustDomainIdLeaf(_)), "{err}");
    }

    #[test]
    fn empty_authority_has_no_signer() {
        let a = Authority::empty(TrustDomain::new("cluster.local").unwrap());
        assert!(matches!(a.signer(), Err(AuthorityError::NoKey)));
    }
}
