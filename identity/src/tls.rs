//! rustls configurations that authenticate peers by SPIFFE ID: TLS 1.3 only, one crypto provider
//! for the whole process (key exchange X25519MLKEM768 first, unless `--tls-key-exchange
//! classical`), chains verified by webpki against a [`TrustBundle`] (once per chain and
//! configuration while the chain is valid: `verified_chains`), then the leaf's SPIFFE ID checked
//! against the bundle's trust domain (and, for clients, the expected server identity).
//!
//! Verifiers report why they reject a peer through `rustls::Error`, so handshake failures in
//! logs name the reason; [`TlsError::from`] turns such an error back into a [`TlsError`].

use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms, verify_tls12_signature,
    verify_tls13_signature,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::bundle::{BundleError, TrustBundle};
use crate::profile::{ProfileError, leaf_spiffe_id};
use crate::spiffe::{SpiffeId, TrustDomain};

mod verified_chains;
use verified_chains::VerifiedChains;

/// Why a peer or a TLS configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsError {
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("certificate chain does not lead to a root of the trust bundle (unknown issuer)")]
    UnknownIssuer,
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate carries no workload SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("certificate has more than one URI SAN; an X.509-SVID must have exactly one")]
    MultipleUriSans,
    #[error("peer {got} is not in trust domain {expected}")]
    ForeignTrustDomain {
        expected: TrustDomain,
        got: SpiffeId,
    },
    #[error("a CA certificate was presented as the leaf")]
    CaAsLeaf,
    #[error("peer is {got}, expected {expected}")]
    WrongIdentity { expected: SpiffeId, got: SpiffeId },
    #[error("certificate rejected: {0}")]
    BadCertificate(String),
    #[error("peer rejected our certificate or handshake: alert {0:?}")]
    PeerAlert(AlertDescription),
    #[error("invalid PEM for certificate or key: {0}")]
    Pem(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("TLS: {0}")]
    Rustls(rustls::Error),
}

impl From<ProfileError> for TlsError {
    fn from(e: ProfileError) -> Self {
        match e {
            ProfileError::IsCa => TlsError::CaAsLeaf,
            ProfileError::MultipleUriSans => TlsError::MultipleUriSans,
            ProfileError::NoUriSan => TlsError::NotSpiffe("no URI SAN".into()),
            ProfileError::NotSpiffe(why) => TlsError::NotSpiffe(why),
            other => TlsError::BadCertificate(other.to_string()),
        }
    }
}

/// Classifies a handshake error: our own verifiers' reasons come back as themselves, webpki's
/// as the matching variant.
impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        match e {
            rustls::Error::InvalidCertificate(cert_err) => match cert_err {
                CertificateError::UnknownIssuer => TlsError::UnknownIssuer,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    TlsError::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    TlsError::NotYetValid
                }
                CertificateError::Other(OtherError(inner)) => {
                    if let Some(Rejection(ours)) = inner.downcast_ref::<Rejection>() {
                        ours.clone()
                    } else if let Some(webpki::Error::CaUsedAsEndEntity) =
                        inner.downcast_ref::<webpki::Error>()
                    {
                        TlsError::CaAsLeaf
                    } else {
                        TlsError::BadCertificate(inner.to_string())
                    }
                }
                other => TlsError::BadCertificate(format!("{other:?}")),
            },
            rustls::Error::NoCertificatesPresented => TlsError::NoPeerCertificate,
            rustls::Error::AlertReceived(alert) => TlsError::PeerAlert(alert),
            other => TlsError::Rustls(other),
        }
    }
}

impl TlsError {
    /// The TLS reason inside an I/O error from tokio-rustls, if it carries one.
    pub fn from_io_error(e: &io::Error) -> Option<TlsError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|tls| TlsError::from(tls.clone()))
    }

    /// Wraps a rejection reason for rustls so that it survives into the handshake error.
    fn into_rustls(self) -> rustls::Error {
        CertificateError::Other(OtherError(Arc::new(Rejection(self)))).into()
    }
}

/// A verifier's reason as carried inside `rustls::Error`. rustls prints it with `Debug`, so
/// `Debug` here is the readable message ("peer is spiffe://.., expected spiffe://..").
#[derive(thiserror::Error)]
#[error("{0}")]
struct Rejection(TlsError);

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Which key exchange groups every TLS connection of the process offers (as a client, in this
/// order of preference) and accepts (as a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyExchange {
    /// X25519MLKEM768 (the hybrid of X25519 and the post-quantum ML-KEM-768) first, then
    /// X25519, P-256 and P-384 for classical peers.
    #[default]
    Hybrid,
    /// X25519, P-256 and P-384 only: for FIPS-only or legacy environments that do not allow
    /// ML-KEM yet.
    Classical,
}

impl KeyExchange {
    fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        use rustls::crypto::aws_lc_rs::kx_group as aws;
        let classical = [
            rustls::crypto::ring::kx_group::X25519,
            rustls::crypto::ring::kx_group::SECP256R1,
            rustls::crypto::ring::kx_group::SECP384R1,
        ];
        match self {
            KeyExchange::Hybrid => [&[aws::X25519MLKEM768][..], &classical].concat(),
            KeyExchange::Classical => classical.to_vec(),
        }
    }
}

/// The name of the key exchange group a finished handshake agreed on, from a fixed set (a
/// bounded metric label): `X25519MLKEM768`, `X25519`, `secp256r1`, `secp384r1`, or `other` (a
/// group sigil never offers or accepts, so not seen in practice); `none` before the handshake
/// is done.
pub fn key_exchange_group(conn: &rustls::CommonState) -> &'static str {
    use rustls::NamedGroup;
    match conn.negotiated_key_exchange_group().map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
}

/// The process's key exchange, fixed by [`use_key_exchange`] before the first configuration.
static KEY_EXCHANGE: OnceLock<KeyExchange> = OnceLock::new();

/// Why the process's key exchange could not be set.
#[derive(Debug, thiserror::Error)]
#[error(
    "the TLS key exchange is already fixed to {0:?}; set it once, before any TLS configuration"
)]
pub struct KeyExchangeAlreadySet(KeyExchange);

/// Fixes the key exchange of every TLS configuration this process builds, and installs the
/// matching provider as rustls' process default, which the Kubernetes client uses. Call once at
/// start (the components' `--tls-key-exchange`); without it, [`KeyExchange::Hybrid`].
pub fn use_key_exchange(kx: KeyExchange) -> Result<(), KeyExchangeAlreadySet> {
    let fixed = *KEY_EXCHANGE.get_or_init(|| kx);
    if fixed != kx {
        return Err(KeyExchangeAlreadySet(fixed));
    }
    // Fails only if a provider was installed already: the Kubernetes client then uses that one.
    let _ = CryptoProvider::install_default(crypto_provider().as_ref().clone());
    Ok(())
}

fn process_key_exchange() -> KeyExchange {
    *KEY_EXCHANGE.get_or_init(KeyExchange::default)
}

/// The process-wide crypto provider for TLS 1.3: every sigil config uses this one.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| crypto_provider_for(process_key_exchange()))
        .clone()
}

/// ring for signatures, verification and ciphers; the key exchange groups of `kx`, the hybrid one
/// from aws-lc-rs (ring has no ML-KEM). BENCHMARKS.md ("Key exchange and crypto provider") has
/// the measurements behind this split.
pub fn crypto_provider_for(kx: KeyExchange) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: kx.groups(),
        ..rustls::crypto::ring::default_provider()
    })
}

/// A certificate chain (leaf first, then intermediates; never the root) and its private key.
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl CertifiedKey {
    /// Reads a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Pem(
                "certificate chain has no CERTIFICATE block".into(),
            ));
        }
        // The key error's text is generic (never includes key material).
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
        Ok(CertifiedKey { chain, key })
    }
}

impl Clone for CertifiedKey {
    fn clone(&self) -> Self {
        CertifiedKey {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Never prints the private key.
impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A valid SPIFFE client certificate is required.
    Required,
    /// Requested and verified if sent; clients without one are let through.
    Optional,
    /// Not requested.
    Off,
}

/// What a client accepts as the server's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Chain verified against the bundle, SNI/hostname ignored, the leaf's SPIFFE ID must equal
    /// this one.
    Spiffe(SpiffeId),
    /// Any workload SPIFFE ID of the bundle's trust domain.
    AnyInTrustDomain,
    /// Ordinary webpki hostname verification of the connect-time server name against the
    /// bundle's roots (for serving certificates with DNS/IP SANs).
    DnsName,
}

/// Which TLS versions a configuration speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum TlsVersions {
    /// TLS 1.3 only: sigil's default everywhere.
    #[default]
    Tls13,
    /// TLS 1.3, and TLS 1.2 for older peers, restricted to ECDHE key exchange with AES-GCM.
    Tls12And13,
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12_AND_13: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl TlsVersions {
    fn provider_and_versions(
        self,
    ) -> (
        Arc<CryptoProvider>,
        &'static [&'static rustls::SupportedProtocolVersion],
    ) {
        match self {
            TlsVersions::Tls13 => (crypto_provider(), TLS13_ONLY),
            TlsVersions::Tls12And13 => (tls12_provider(), TLS12_AND_13),
        }
    }
}

/// The process's provider with TLS 1.2 limited to forward-secret AEAD suites (no CBC, no static
/// RSA, no ChaCha20 for 1.2), as the proxy's `--tls12` promises. TLS 1.2 peers never negotiate
/// the hybrid group (it is defined for TLS 1.3 only) and get a classical one.
fn tls12_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = crypto_provider().as_ref().clone();
            provider.cipher_suites = vec![
                suite::TLS13_AES_128_GCM_SHA256,
                suite::TLS13_AES_256_GCM_SHA384,
                suite::TLS13_CHACHA20_POLY1305_SHA256,
                suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ];
            Arc::new(provider)
        })
        .clone()
}

fn alpn_list(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

/// A TLS 1.3 server config presenting `identity`; client certificates (if asked for) are
/// checked by [`SpiffeClientVerifier`]. Session resumption is off so every connection's peer
/// proves its key and is checked against the current bundle.
pub fn server_config(
    identity: &CertifiedKey,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with_versions(identity, bundle, client_auth, alpn, TlsVersions::Tls13)
}

/// [`server_config`] speaking `versions`.
pub fn server_config_with_versions(
    identity: &CertifiedKey,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    versions: TlsVersions,
) -> Result<rustls::ServerConfig, TlsError> {
    let (provider, versions) = versions.provider_and_versions();
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Rustls)?;
    let builder = match client_auth {
        ClientAuth::Off => builder.with_no_client_auth(),
        ClientAuth::Required | ClientAuth::Optional => {
            let verifier = SpiffeClientVerifier::new(bundle, client_auth == ClientAuth::Required)?;
            builder.with_client_cert_verifier(Arc::new(verifier))
        }
    };
    let mut config = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = alpn_list(alpn);
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 client config, presenting `identity` if given and verifying the server as
/// `server` says. Resumption is off (as in ztunnel) so the server proves its key and is checked
/// every time.
pub fn client_config(
    identity: Option<&CertifiedKey>,
    bundle: &TrustBundle,
    server: ExpectedServer,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with_versions(identity, bundle, server, alpn, TlsVersions::Tls13)
}

/// [`client_config`] speaking `versions`.
pub fn client_config_with_versions(
    identity: Option<&CertifiedKey>,
    bundle: &TrustBundle,
    server: ExpectedServer,
    alpn: &[&[u8]],
    versions: TlsVersions,
) -> Result<rustls::ClientConfig, TlsError> {
    let (provider, versions) = versions.provider_and_versions();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Rustls)?;
    let builder = match server {
        ExpectedServer::DnsName => {
            let verifier = WebPkiServerVerifier::builder_with_provider(
                Arc::new(bundle.root_store()?),
                crypto_provider(),
            )
            .build()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
            builder.with_webpki_verifier(verifier)
        }
        ExpectedServer::Spiffe(id) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                    bundle,
                    Some(id),
                )?))
        }
        ExpectedServer::AnyInTrustDomain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, None)?)),
    };
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(TlsError::Rustls)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn_list(alpn);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The SPIFFE ID of a peer whose chain the handshake already verified: what callers use to
/// authorize a connection. Checks the X.509-SVID rules and the trust domain, not the chain.
pub fn peer_spiffe_id(
    chain: &[CertificateDer<'_>],
    td: &TrustDomain,
) -> Result<SpiffeId, TlsError> {
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    let id = leaf_spiffe_id(leaf)?;
    if id.trust_domain() != td {
        return Err(TlsError::ForeignTrustDomain {
            expected: td.clone(),
            got: id,
        });
    }
    Ok(id)
}

/// Turns webpki's "CA used as end entity" (which rustls reports only as an opaque error) into
/// our named reason; leaves every other rustls error as is.
fn name_ca_as_leaf(e: rustls::Error) -> rustls::Error {
    match TlsError::from(e.clone()) {
        TlsError::CaAsLeaf => TlsError::CaAsLeaf.into_rustls(),
        _ => e,
    }
}

/// Verifies client certificates: the chain by webpki against the bundle (client-auth EKU),
/// once per chain while it is valid (`verified_chains`), then the leaf must be an X.509-SVID of
/// the bundle's trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    verified: VerifiedChains,
    trust_domain: TrustDomain,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets clients without a certificate through (their identity is then
    /// absent); a certificate that is sent is always verified.
    pub fn new(bundle: &TrustBundle, mandatory: bool) -> Result<Self, TlsError> {
        let builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(bundle.root_store()?),
            crypto_provider(),
        );
        let builder = if mandatory {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let chain = builder
            .build()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        Ok(SpiffeClientVerifier {
            chain,
            verified: VerifiedChains::default(),
            trust_domain: bundle.trust_domain.clone(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verified
            .verify_once(end_entity, intermediates, now, || {
                self.chain
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ())
            })
            .map_err(name_ca_as_leaf)?;
        peer_spiffe_id(std::slice::from_ref(end_entity), &self.trust_domain)
            .map_err(TlsError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Verifies server certificates by SPIFFE ID instead of hostname: the chain by webpki against
/// the bundle (server-auth EKU), once per chain while it is valid (`verified_chains`), then the
/// leaf must be an X.509-SVID of the bundle's trust domain and, if an identity is expected,
/// exactly that identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    verified: VerifiedChains,
    trust_domain: TrustDomain,
    expected: Option<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// `expected = None` accepts any workload of the bundle's trust domain. An expected ID
    /// outside that trust domain could never match, so it is refused here.
    pub fn new(bundle: &TrustBundle, expected: Option<SpiffeId>) -> Result<Self, TlsError> {
        if let Some(id) = &expected
            && id.trust_domain() != &bundle.trust_domain
        {
            return Err(TlsError::ForeignTrustDomain {
                expected: bundle.trust_domain.clone(),
                got: id.clone(),
            });
        }
        Ok(SpiffeServerVerifier {
            roots: Arc::new(bundle.root_store()?),
            verified: VerifiedChains::default(),
            trust_domain: bundle.trust_domain.clone(),
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verified
            .verify_once(end_entity, intermediates, now, || {
                let cert = ParsedCertificate::try_from(end_entity)?;
                verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            })
            .map_err(name_ca_as_leaf)?;
        let got = peer_spiffe_id(std::slice::from_ref(end_entity), &self.trust_domain)
            .map_err(TlsError::into_rustls)?;
        if let Some(expected) = &self.expected
            && &got != expected
        {
            return Err(TlsError::WrongIdentity {
                expected: expected.clone(),
                got,
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
