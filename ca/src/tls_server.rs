//! The CA's TLS front: its serving certificate (issued by its own current signer, renewed at half
//! life and whenever the signer or bundle changes), and the accept loop that terminates TLS and
//! hands tonic connections that carry the peer's verified client identity, if any.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_identity::SpiffeId;
use sigil_identity::tls::{self, CertifiedKey, ClientAuth};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error};

use crate::authority::{Authority, SharedAuthority};
use crate::metrics::Metrics;

/// Lifetime of the CA's serving certificate.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A TLS handshake that takes longer is dropped (slowloris guard).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaken but not yet taken by the gRPC server.
const ACCEPT_BACKLOG: usize = 128;
/// Most connections open at once on the gRPC port (agents keep one each; the rest wait in the
/// kernel backlog).
pub const MAX_CONNECTIONS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TlsServerError {
    #[error("no signing key to issue the serving certificate")]
    NoSigner,
    #[error("issuing the serving certificate: {0}")]
    Issue(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What tonic handlers learn about a connection (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The client certificate's SPIFFE ID, verified against the trust bundle during the handshake.
    pub client_id: Option<SpiffeId>,
}

/// One accepted TLS connection.
pub struct TlsConnection {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Held for the connection's lifetime: bounds open connections.
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections, completes TLS with the current server config, and yields them.
/// At most `max_connections` are open at once; the loop ends when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    configs: watch::Receiver<Option<Arc<ServerConfig>>>,
    metrics: Arc<Metrics>,
    max_connections: usize,
) -> ReceiverStream<std::io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Some(config) = configs.borrow().clone() else {
                debug!(%remote, "no serving certificate yet; dropping connection");
                continue;
            };
            let (tx, metrics) = (tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failures.inc();
                        debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.tls_handshake_failures.inc();
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let client_id = stream.get_ref().1.peer_certificates().and_then(|chain| {
                    chain
                        .first()
                        .and_then(|leaf| sigil_identity::profile::leaf_spiffe_id(leaf).ok())
                });
                let conn = TlsConnection {
                    inner: stream,
                    info: PeerInfo { remote, client_id },
                    _slot: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Keeps a server config with a fresh serving certificate on `tx`: re-issued when the authority
/// changes and at half of its lifetime.
pub async fn run_serving_cert(
    id: SpiffeId,
    names: Vec<String>,
    mut authority: watch::Receiver<SharedAuthority>,
    tx: watch::Sender<Option<Arc<ServerConfig>>>,
    alpn: Vec<Vec<u8>>,
) {
    loop {
        let current = authority.borrow_and_update().clone();
        let renew_in = match serving_config(&id, &names, &current, &alpn) {
            Ok((config, lifetime)) => {
                tx.send_replace(Some(Arc::new(config)));
                lifetime / 2
            }
            Err(TlsServerError::NoSigner) => Duration::MAX,
            Err(e) => {
                error!(error = %e, "could not issue the CA's serving certificate; retrying");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            changed = authority.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(renew_in.min(Duration::from_secs(365 * 24 * 3600))) => {}
        }
    }
}

/// Builds the CA's server config: the serving certificate for `names`, and optional client-cert
/// authentication against the current bundle (for renewal by certificate).
pub fn serving_config(
    id: &SpiffeId,
    names: &[String],
    authority: &Authority,
    alpn: &[Vec<u8>],
) -> Result<(ServerConfig, Duration), TlsServerError> {
    let signer = authority
        .serving_signer
        .as_ref()
        .ok_or(TlsServerError::NoSigner)?;
    let key = crate::source::generate_key().map_err(|e| TlsServerError::Issue(e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let issued = signer
        .sign_serving(&key, id, names, SERVING_CERT_TTL, now)
        .map_err(|e| TlsServerError::Issue(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = std::iter::once(issued.leaf)
        .chain(signer.intermediates.iter().cloned())
        .collect();
    let certified = CertifiedKey {
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    };
    let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    let config = tls::server_config(&certified, &authority.bundle, ClientAuth::Optional, &alpn)?;
    let lifetime = (issued.not_after - now)
        .try_into()
        .unwrap_or(SERVING_CERT_TTL);
    Ok((config, lifetime))
}
