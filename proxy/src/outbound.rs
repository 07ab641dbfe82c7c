//! Outbound: connections the application opens (redirected to --outbound-port, or on the
//! explicit --outbound-listen). A destination the agent lists as meshed gets mutual TLS and must
//! prove one of the identities listed for it; any other destination is passed through untouched.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use sigil_identity::SpiffeId;
use sigil_identity::tls::TlsError;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

use crate::dial;
use crate::forward::{self, ConnectionLog, HANDSHAKE_TIMEOUT, Shared};
use crate::metrics::{Direction, Security};
use crate::tls::{self, HandshakeFailure};

/// Where accepted connections go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// Transparent mode: the original destination; mTLS if it is a mesh member.
    OriginalDestination,
    /// Explicit mode: this address, always over mTLS, which must prove this identity.
    Fixed(SocketAddr, SpiffeId),
}

/// One outbound connection, from accept to close.
pub async fn handle(stream: TcpStream, source: SocketAddr, upstream: Upstream, shared: Shared) {
    let _ = stream.set_nodelay(true);
    let (destination, expected) = match upstream {
        Upstream::Fixed(addr, id) => (addr, Some(BTreeSet::from([id]))),
        Upstream::OriginalDestination => {
            let original = match forward::original_destination(&stream) {
                Ok(original) => original,
                Err(e) => {
                    warn!(error = %e, %source, "outbound connection without an original destination (not redirected by iptables?); closing");
                    return;
                }
            };
            if stream.local_addr().is_ok_and(|local| local == original) {
                // Not redirected: someone connected to the outbound port itself.
                let log = ConnectionLog::new(Direction::Outbound, source, original);
                return log.refused(
                    &shared.metrics,
                    HandshakeFailure::ProxyPort,
                    "connection addressed to the proxy's own outbound port",
                );
            }
            let membership = shared.mesh.borrow().clone();
            let Some(membership) = membership else {
                // Unknown membership must not turn into plaintext to a meshed pod.
                let log = ConnectionLog::new(Direction::Outbound, source, original);
                return log.refused(
                    &shared.metrics,
                    HandshakeFailure::NoMeshMembership,
                    "mesh membership not received from the agent yet",
                );
            };
            (
                original,
                membership
                    .get(original.ip())
                    .map(|member| member.ids.clone()),
            )
        }
    };
    let mut log = ConnectionLog::new(Direction::Outbound, source, destination);
    let Some(expected) = expected else {
        let upstream = match dial::connect(destination, shared.config.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(e) => return log.upstream_failed(&shared.metrics, &e),
        };
        return forward::splice(&shared, log, Security::Passthrough, stream, upstream).await;
    };

    let Some(state) = shared.current_tls() else {
        return log.refused(
            &shared.metrics,
            HandshakeFailure::NoCertificate,
            "no certificate from the agent yet",
        );
    };
    log.source_identity = Some(state.id.clone());
    let tcp = match dial::connect(destination, shared.config.connect_timeout).await {
        Ok(tcp) => tcp,
        Err(e) => return log.upstream_failed(&shared.metrics, &e),
    };
    // The server is verified by SPIFFE ID, not by name; the IP only fills the SNI slot
    // (rustls sends no SNI for an IP address).
    let name = ServerName::IpAddress(destination.ip().into());
    let connector = TlsConnector::from(state.client.clone());
    let tls_stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(e)) => {
                let (reason, detail) = HandshakeFailure::of_io_error(&e);
                return log.refused(&shared.metrics, reason, &detail);
            }
            Err(_) => {
                return log.refused(
                    &shared.metrics,
                    HandshakeFailure::Timeout,
                    "TLS handshake not finished in time",
                );
            }
        };
    match check_server(
        tls::peer_identity(tls_stream.get_ref().1, &state.bundle),
        expected,
    ) {
        Ok(got) => log.destination_identity = Some(got),
        Err((reason, detail)) => return log.refused(&shared.metrics, reason, &detail),
    }
    drop(state);
    forward::splice(&shared, log, Security::Mtls, stream, tls_stream).await;
}

/// The server's verified identity if it is one of `expected` (a Service's cluster IP may lead to
/// endpoints of several identities), else why the connection is refused.
fn check_server(
    verified: Result<SpiffeId, TlsError>,
    expected: BTreeSet<SpiffeId>,
) -> Result<SpiffeId, (HandshakeFailure, String)> {
    match verified {
        Ok(got) if expected.contains(&got) => Ok(got),
        Ok(got) => {
            let detail = if expected.len() == 1 {
                let expected = expected.into_iter().next().expect("one identity");
                TlsError::WrongIdentity { expected, got }.to_string()
            } else {
                let listed: Vec<String> = expected.iter().map(ToString::to_string).collect();
                format!("peer is {got}, expected one of {}", listed.join(", "))
            };
            Err((HandshakeFailure::WrongIdentity, detail))
        }
        Err(e) => Err((HandshakeFailure::of_tls_error(&e), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn the_server_must_prove_one_of_the_listed_identities() {
        let [api, api_v2, other] = [
            "spiffe://cluster.local/ns/demo/sa/api",
            "spiffe://cluster.local/ns/demo/sa/api-v2",
            "spiffe://cluster.local/ns/demo/sa/other",
        ]
        .map(id);
        let both = BTreeSet::from([api.clone(), api_v2.clone()]);
        assert_eq!(check_server(Ok(api.clone()), both.clone()), Ok(api.clone()));
        assert_eq!(
            check_server(Ok(api_v2.clone()), both.clone()),
            Ok(api_v2.clone())
        );
        let (reason, detail) = check_server(Ok(other.clone()), both).unwrap_err();
        assert_eq!(reason.as_str(), "wrong_identity");
        assert_eq!(
            detail,
            format!("peer is {other}, expected one of {api}, {api_v2}")
        );
        // One identity: the message names it alone.
        let (reason, detail) =
            check_server(Ok(other.clone()), BTreeSet::from([api.clone()])).unwrap_err();
        assert_eq!(reason, HandshakeFailure::WrongIdentity);
        assert_eq!(detail, format!("peer is {other}, expected {api}"));
        // A verification failure is reported as such.
        let (reason, _) = check_server(Err(TlsError::CaAsLeaf), BTreeSet::from([api])).unwrap_err();
        assert_eq!(reason, HandshakeFailure::of_tls_error(&TlsError::CaAsLeaf));
    }
}
