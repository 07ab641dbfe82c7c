//! The channel to the CA: tonic over TLS, checking the CA's serving certificate against a trust
//! bundle (by DNS name), optionally presenting a client certificate. The node agent's
//! [`crate::ca_client`] dials the CA with it; so do the benchmarks and the tests.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sigil_identity::TrustBundle;
use sigil_identity::tls::{self, CertifiedKey, ExpectedServer};
use tonic::transport::{Channel, Endpoint, Uri};

/// A CA that does not complete TCP+TLS in this time is given up on (the caller retries).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A unary call (Sign) that gets no answer in this time fails, so a stalled CA cannot hold a
/// caller's request slot forever. Streams are not cut: the timeout covers the response headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings find a CA that vanished without a reset (a long-lived bundle stream would
/// otherwise wait forever).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid CA address {0:?}: use host:port")]
    Address(String),
    #[error("invalid CA server name {0:?}")]
    ServerName(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("connecting to the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// Opens a channel to the CA at `addr` (host:port), verifying that its certificate chains to
/// `bundle` and names `server_name`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    bundle: &TrustBundle,
    client_identity: Option<&CertifiedKey>,
) -> Result<Channel, ClientError> {
    let config = tls::client_config(client_identity, bundle, ExpectedServer::DnsName, &[b"h2"])?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| ClientError::ServerName(server_name.to_string()))?;
    let target = addr.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
            async move {
                let handshake = async {
                    let tcp = tokio::net::TcpStream::connect(&target).await?;
                    tcp.set_nodelay(true)?;
                    connector.connect(name, tcp).await
                };
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TCP+TLS to the CA timed out",
                        )
                    })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}
