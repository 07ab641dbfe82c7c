//! Connections the proxy opens: plain TCP to the application (inbound, probes) and to
//! destinations (outbound), and mutual TLS to a meshed destination that must prove one of the
//! identities expected of it.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::ServerName;
use sigil_identity::SpiffeId;
use sigil_identity::tls::TlsError;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::forward::HANDSHAKE_TIMEOUT;
use crate::metrics::Direction;
use crate::tls::{self, HandshakeFailure, TlsState};

/// A TCP connection to `addr` within `timeout`, with Nagle off (request/response latency).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Why a mutual TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection failed (counted as an upstream failure).
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The handshake failed or the server is not who it must be (counted by reason).
    #[error("{detail}")]
    Refused {
        reason: HandshakeFailure,
        detail: String,
    },
}

/// A mutual TLS connection to `addr` with our current `state`, whose server proved one of
/// `expected`; with the identity it proved.
pub async fn mtls(
    addr: SocketAddr,
    connect_timeout: Duration,
    state: &TlsState,
    expected: BTreeSet<SpiffeId>,
) -> Result<(TlsStream<TcpStream>, SpiffeId), DialError> {
    let tcp = connect(addr, connect_timeout)
        .await
        .map_err(|source| DialError::Connect { addr, source })?;
    // The server is verified by SPIFFE ID, not by name; the IP only fills the SNI slot
    // (rustls sends no SNI for an IP address).
    let name = ServerName::IpAddress(addr.ip().into());
    let connector = TlsConnector::from(state.client.clone());
    let refused = |(reason, detail)| DialError::Refused { reason, detail };
    let tls_stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(e)) => return Err(refused(HandshakeFailure::of_io_error(&e))),
            Err(_) => {
                return Err(refused((
                    HandshakeFailure::Timeout,
                    "TLS handshake not finished in time".to_owned(),
                )));
            }
        };
    state.count_handshake(Direction::Outbound, tls_stream.get_ref().1);
    let got = check_server(
        tls::peer_identity(tls_stream.get_ref().1, &state.bundle),
        expected,
    )
    .map_err(refused)?;
    Ok((tls_stream, got))
}

/// The server's verified identity if it is one of `expected` (a Service's cluster IP may lead to
/// endpoints of several identities), else why the connection is refused.
pub fn check_server(
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
