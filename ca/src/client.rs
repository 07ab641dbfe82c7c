//! Connecting to the CA: a tonic channel over TLS that checks the CA's serving certificate
//! against a trust bundle (by DNS name), optionally presenting a client certificate. Used by the
//! node agent, the benchmarks and the tests.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sigil_identity::TrustBundle;
use sigil_identity::tls::{self, CertifiedKey, ExpectedServer};
use tonic::transport::{Channel, Endpoint, Uri};

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
        .map_err(|_| ClientError::Address(addr.to_string()))?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}
