//! Outbound: connections the application opens (redirected to --outbound-port, or on the
//! explicit --outbound-listen). A destination the agent lists as meshed gets mutual TLS and must
//! prove the identity listed for it; any other destination is passed through untouched.

use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use sigil_identity::SpiffeId;
use sigil_identity::tls::TlsError;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

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
        Upstream::Fixed(addr, id) => (addr, Some(id)),
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
                    .map(|member| member.id.clone()),
            )
        }
    };
    let mut log = ConnectionLog::new(Direction::Outbound, source, destination);
    let Some(expected) = expected else {
        let upstream = match forward::connect(destination, shared.config.connect_timeout).await {
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
    let tcp = match forward::connect(destination, shared.config.connect_timeout).await {
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
    match tls::peer_identity(tls_stream.get_ref().1, &state.bundle) {
        Ok(got) if got == expected => log.destination_identity = Some(got),
        Ok(got) => {
            let e = TlsError::WrongIdentity { expected, got };
            return log.refused(
                &shared.metrics,
                HandshakeFailure::WrongIdentity,
                &e.to_string(),
            );
        }
        Err(e) => {
            return log.refused(
                &shared.metrics,
                HandshakeFailure::of_tls_error(&e),
                &e.to_string(),
            );
        }
    }
    drop(state);
    forward::splice(&shared, log, Security::Mtls, stream, tls_stream).await;
}
