//! The TLS side of the proxy: the rustls configurations built from the certificate and bundle the
//! agent sent (rebuilt on every update, used by new handshakes only), and the classification of
//! why a handshake or a peer was refused.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_identity::tls::{self, CertifiedKey, ClientAuth, ExpectedServer, TlsError, TlsVersions};
use sigil_identity::{SpiffeId, TrustBundle};

use crate::metrics::{Direction, KeyExchangeLabels};

/// The proxy's certificate, key and trust bundle in use, as configurations ready to handshake.
pub struct TlsState {
    pub id: SpiffeId,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The certificate chain (leaf first) as PEM: public, for `/certs/chain.pem`.
    pub chain_pem: String,
    pub bundle: TrustBundle,
    /// Inbound: requires a client certificate of our trust domain.
    pub server: Arc<rustls::ServerConfig>,
    /// Outbound: presents our certificate, accepts any server of our trust domain; the expected
    /// identity of each destination is compared after the handshake (one config for all).
    pub client: Arc<rustls::ClientConfig>,
    /// Where handshakes made with these configurations are counted: the proxy's
    /// `sigil_proxy_tls_handshakes_total` once [`crate::sds`] publishes the state.
    pub handshakes: Family<KeyExchangeLabels, Counter>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("roots", &self.bundle.roots.len())
            .finish()
    }
}

impl TlsState {
    /// Builds both configurations; fails if the chain's leaf is not a workload SVID of the
    /// bundle's trust domain, if it does not verify against the bundle, or if the key does not
    /// belong to it.
    pub fn new(
        certified: CertifiedKey,
        bundle: TrustBundle,
        versions: TlsVersions,
    ) -> Result<TlsState, TlsError> {
        let leaf = certified.chain.first().ok_or(TlsError::NoPeerCertificate)?;
        let id = tls::peer_spiffe_id(std::slice::from_ref(leaf), &bundle.trust_domain)?;
        let report = sigil_identity::profile::inspect_cert(leaf)?;
        bundle
            .verify_chain(&certified.chain, UnixTime::now())
            .map_err(|e| TlsError::BadCertificate(format!("our own certificate: {e}")))?;
        let server = tls::server_config_with_versions(
            &certified,
            &bundle,
            ClientAuth::Required,
            &[],
            versions,
        )?;
        let client = tls::client_config_with_versions(
            Some(&certified),
            &bundle,
            ExpectedServer::AnyInTrustDomain,
            &[],
            versions,
        )?;
        Ok(TlsState {
            id,
            serial: report.serial_hex,
            not_before: report.not_before.into(),
            not_after: report.not_after.into(),
            chain_pem: sigil_identity::bundle::certificates_to_pem(&certified.chain),
            bundle,
            server: Arc::new(server),
            client: Arc::new(client),
            handshakes: Family::default(),
        })
    }

    /// Counts a completed handshake by its key exchange group; returns the group's name.
    pub fn count_handshake(
        &self,
        direction: Direction,
        conn: &rustls::CommonState,
    ) -> &'static str {
        let key_exchange = tls::key_exchange_group(conn);
        self.handshakes
            .get_or_create(&KeyExchangeLabels {
                direction,
                key_exchange,
            })
            .inc();
        key_exchange
    }

    pub fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}

/// Why a connection was refused before any byte was forwarded: the `reason` label of
/// `sigil_proxy_tls_handshake_failures_total` and the access log's result.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The chain does not lead to a root of our bundle (another CA).
    UnknownIssuer,
    Expired,
    NotYetValid,
    /// No SPIFFE ID, or not a workload one.
    NotSpiffe,
    MultipleUriSans,
    ForeignTrustDomain,
    CaAsLeaf,
    /// The server proved an identity other than the destination's.
    WrongIdentity,
    /// STRICT and the client sent no certificate.
    NoClientCertificate,
    BadCertificate,
    /// The other side aborted the handshake with an alert (it refused us).
    PeerAlert,
    /// No TLS version or cipher suite in common (e.g. a TLS 1.2-only peer without --tls12).
    ProtocolVersion,
    /// Plaintext on a STRICT port, or bytes that are not TLS.
    NotTls,
    /// The handshake did not finish in time.
    Timeout,
    /// The connection broke during the handshake.
    Io,
    /// The proxy has no certificate yet (agent not reached since start).
    NoCertificate,
    /// Transparent outbound before the agent sent the mesh membership: refused rather than
    /// risk plaintext to a meshed pod.
    NoMeshMembership,
    /// Addressed to one of the proxy's own ports (forwarding it would loop).
    ProxyPort,
    /// Inbound before the agent sent this workload's policies.
    NoPolicy,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownIssuer => "unknown_issuer",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::NotSpiffe => "not_spiffe",
            HandshakeFailure::MultipleUriSans => "multiple_uri_sans",
            HandshakeFailure::ForeignTrustDomain => "foreign_trust_domain",
            HandshakeFailure::CaAsLeaf => "ca_as_leaf",
            HandshakeFailure::WrongIdentity => "wrong_identity",
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::PeerAlert => "peer_alert",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Io => "io",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::NoMeshMembership => "no_mesh_membership",
            HandshakeFailure::ProxyPort => "proxy_port",
            HandshakeFailure::NoPolicy => "no_policy",
        }
    }

    /// The reason behind a failed tokio-rustls handshake.
    pub fn of_io_error(e: &io::Error) -> (HandshakeFailure, String) {
        match TlsError::from_io_error(e) {
            Some(tls) => (HandshakeFailure::of_tls_error(&tls), tls.to_string()),
            None if e.kind() == io::ErrorKind::InvalidData => {
                (HandshakeFailure::NotTls, e.to_string())
            }
            None => (HandshakeFailure::Io, e.to_string()),
        }
    }

    pub fn of_tls_error(e: &TlsError) -> HandshakeFailure {
        match e {
            TlsError::NoPeerCertificate => HandshakeFailure::NoClientCertificate,
            TlsError::UnknownIssuer => HandshakeFailure::UnknownIssuer,
            TlsError::Expired => HandshakeFailure::Expired,
            TlsError::NotYetValid => HandshakeFailure::NotYetValid,
            TlsError::NotSpiffe(_) => HandshakeFailure::NotSpiffe,
            TlsError::MultipleUriSans => HandshakeFailure::MultipleUriSans,
            TlsError::ForeignTrustDomain { .. } => HandshakeFailure::ForeignTrustDomain,
            TlsError::CaAsLeaf => HandshakeFailure::CaAsLeaf,
            TlsError::WrongIdentity { .. } => HandshakeFailure::WrongIdentity,
            TlsError::PeerAlert(_) => HandshakeFailure::PeerAlert,
            TlsError::Rustls(rustls::Error::PeerIncompatible(_)) => {
                HandshakeFailure::ProtocolVersion
            }
            TlsError::Rustls(rustls::Error::InvalidMessage(_)) => HandshakeFailure::NotTls,
            TlsError::BadCertificate(_)
            | TlsError::Pem(_)
            | TlsError::Bundle(_)
            | TlsError::Rustls(_) => HandshakeFailure::BadCertificate,
        }
    }
}

/// The SPIFFE ID of the peer of an established connection (the handshake verified its chain).
pub fn peer_identity(
    conn: &rustls::CommonState,
    bundle: &TrustBundle,
) -> Result<SpiffeId, TlsError> {
    let chain: &[CertificateDer<'static>] = conn.peer_certificates().unwrap_or(&[]);
    tls::peer_spiffe_id(chain, &bundle.trust_domain)
}

#[cfg(test)]
mod tests {
    use sigil_identity::TrustDomain;

    use super::*;

    #[test]
    fn every_refusal_reason_has_its_own_label() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let cases = [
            (TlsError::NoPeerCertificate, "no_client_certificate"),
            (TlsError::UnknownIssuer, "unknown_issuer"),
            (TlsError::Expired, "expired"),
            (TlsError::NotYetValid, "not_yet_valid"),
            (TlsError::NotSpiffe("x".into()), "not_spiffe"),
            (TlsError::MultipleUriSans, "multiple_uri_sans"),
            (
                TlsError::ForeignTrustDomain {
                    expected: TrustDomain::new("example.org").unwrap(),
                    got: id.clone(),
                },
                "foreign_trust_domain",
            ),
            (TlsError::CaAsLeaf, "ca_as_leaf"),
            (
                TlsError::WrongIdentity {
                    expected: id.clone(),
                    got: id,
                },
                "wrong_identity",
            ),
            (
                TlsError::PeerAlert(rustls::AlertDescription::BadCertificate),
                "peer_alert",
            ),
            (
                TlsError::Rustls(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
                )),
                "protocol_version",
            ),
            (
                TlsError::Rustls(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "not_tls",
            ),
        ];
        for (error, label) in cases {
            assert_eq!(
                HandshakeFailure::of_tls_error(&error).as_str(),
                label,
                "{error}"
            );
        }
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            HandshakeFailure::of_io_error(&reset).0,
            HandshakeFailure::Io
        );
    }
}
