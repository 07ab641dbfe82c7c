//! The CA's TLS front: its serving certificate (issued by its own current signer, renewed at half
//! life and whenever the signer or bundle changes), and the accept loop that terminates TLS and
//! hands tonic connections that carry the peer's verified client identity, if any, each in a
//! connection slot that unauthenticated peers cannot use up.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_base::slots::{ConnectionSlot, ConnectionSlots, Eviction, KeySlot};
use sigil_identity::SpiffeId;
use sigil_identity::tls::{self, CertifiedKey, ClientAuth};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error, warn};

use crate::authority::{Authority, SharedAuthority};
use crate::metrics::{Metrics, Port, RefusedLabels, RefusedReason};

/// Lifetime of the CA's serving certificate.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A TLS handshake that takes longer is dropped (slowloris guard).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaken but not yet taken by the gRPC server.
const ACCEPT_BACKLOG: usize = 128;
/// Most connections that have authenticated a request, open at once on the gRPC port (agents
/// keep one each).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Most connections in their TLS handshake or not yet authenticated, open at once: what
/// unauthenticated peers can hold together, whatever their addresses.
pub const MAX_UNAUTHENTICATED_CONNECTIONS: usize = 512;
/// Of those, from one IP address (an agent opens one or two at a time).
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 64;
/// How long a new connection waits for the slot of the connection evicted for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// How long after its handshake a gRPC connection has to authenticate a call (agents call at
/// once: WatchTrustBundle or Sign).
pub const AUTHENTICATE_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsServerError {
    #[error("no signing key to issue the serving certificate")]
    NoSigner,
    #[error("issuing the serving certificate: {0}")]
    Key(#[source] rcgen::Error),
    #[error("issuing the serving certificate: {0}")]
    Issue(#[source] crate::authority::AuthorityError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What tonic handlers learn about a connection (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The client certificate's SPIFFE ID, verified against the trust bundle during the handshake.
    pub client_id: Option<SpiffeId>,
    /// The connection's slot; a call that authenticates moves it to the authenticated ones.
    pub admission: Admission,
}

/// Bounds on one TLS port's connections. A connection holds an unauthenticated slot (at most
/// `unauthenticated` in all, `per_source` from one IP address) from its accept until a call on it
/// authenticates, then an authenticated slot (at most `authenticated`), so a flood of
/// connections that never authenticate cannot keep an agent out.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Which port these are (for the metrics).
    pub port: Port,
    pub authenticated: usize,
    pub unauthenticated: usize,
    pub per_source: usize,
    /// How long after its handshake a connection has to authenticate a call before it is closed;
    /// `None` where the server authenticates no one (the webhook bounds its clients otherwise).
    pub authenticate_within: Option<Duration>,
}

/// The slot pools of one port.
struct Slots {
    limits: ConnectionLimits,
    authenticated: Arc<Semaphore>,
    /// Until a call authenticates: counted by source address, the oldest evicted when full, so
    /// a flood of idle connections cannot keep an agent from connecting (it authenticates within
    /// milliseconds of its handshake).
    unauthenticated: Arc<ConnectionSlots<IpAddr>>,
    metrics: Arc<Metrics>,
}

/// Held for the connection's lifetime, given back when dropped.
enum Slot {
    Unauthenticated { _slot: ConnectionSlot<IpAddr> },
    Authenticated { _permit: OwnedSemaphorePermit },
}

/// A connection's slot, shared by the connection and the calls on it.
#[derive(Clone, Default)]
pub struct Admission(Option<Arc<AdmissionState>>);

struct AdmissionState {
    slots: Arc<Slots>,
    slot: Mutex<Slot>,
    eviction: Arc<Eviction>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("authenticated", &self.is_authenticated())
            .finish()
    }
}

impl Admission {
    /// A call on this connection authenticated: the connection takes an authenticated slot and
    /// gives its unauthenticated one back. With every authenticated slot taken it keeps the one
    /// it has (and is closed when its time to authenticate is up).
    pub fn authenticated(&self) {
        let Some(state) = &self.0 else { return };
        if state.eviction.is_settled() {
            return;
        }
        let mut slot = state.slot.lock().expect("never poisoned");
        if matches!(*slot, Slot::Authenticated { .. }) {
            return;
        }
        match state.slots.authenticated.clone().try_acquire_owned() {
            Ok(permit) => {
                *slot = Slot::Authenticated { _permit: permit };
                state.eviction.settle();
            }
            Err(_) => {
                state.slots.refused(RefusedReason::ConnectionLimit);
                warn!(
                    limit = state.slots.limits.authenticated,
                    "every authenticated connection slot is taken"
                );
            }
        }
    }

    fn is_authenticated(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|state| state.eviction.is_settled())
    }
}

impl Slots {
    fn refused(&self, reason: RefusedReason) {
        self.metrics
            .connections_refused
            .get_or_create(&RefusedLabels {
                port: self.limits.port,
                reason,
            })
            .inc();
    }

    /// A place for one more unauthenticated connection from `source`, if its address has one.
    fn slot_for(&self, source: IpAddr) -> Option<KeySlot<IpAddr>> {
        let slot = self.unauthenticated.take_key(source);
        if slot.is_none() {
            self.refused(RefusedReason::PerSourceLimit);
            debug!(%source, limit = self.limits.per_source, "too many unauthenticated connections from one address");
        }
        slot
    }

    /// An unauthenticated slot, and the way to evict its connection. With every slot taken, the
    /// oldest unauthenticated connection is evicted and its slot awaited briefly.
    async fn unauthenticated(&self, source: KeySlot<IpAddr>) -> Option<(Slot, Arc<Eviction>)> {
        let address = *source.key();
        let Some((slot, eviction)) = self
            .unauthenticated
            .take_evicting(source, EVICTION_WAIT)
            .await
        else {
            self.refused(RefusedReason::UnauthenticatedLimit);
            debug!(source = %address, limit = self.limits.unauthenticated, "every unauthenticated connection slot is taken");
            return None;
        };
        Some((Slot::Unauthenticated { _slot: slot }, eviction))
    }
}

/// One accepted TLS connection.
pub struct TlsConnection {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Until a call on it authenticates: ends, with the reason, when it is to be closed.
    closing: Option<Pin<Box<dyn Future<Output = RefusedReason> + Send>>>,
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(closing) = &mut this.closing {
            if this.info.admission.is_authenticated() {
                this.closing = None;
            } else if let Poll::Ready(reason) = closing.as_mut().poll(cx) {
                if let Some(state) = &this.info.admission.0 {
                    state.slots.refused(reason);
                }
                debug!(remote = %this.info.remote, reason = reason.as_str(), "closing a connection that has not authenticated a call");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no call authenticated",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
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

/// Accepts TCP connections, completes TLS with the current server config, and yields them, each
/// holding a slot as [`ConnectionLimits`] describes; a connection with no slot free is closed at
/// once. The loop ends when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    configs: watch::Receiver<Option<Arc<ServerConfig>>>,
    metrics: Arc<Metrics>,
    limits: ConnectionLimits,
) -> ReceiverStream<std::io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let slots = Arc::new(Slots {
        limits,
        authenticated: Arc::new(Semaphore::new(limits.authenticated)),
        unauthenticated: ConnectionSlots::new(limits.unauthenticated, limits.per_source),
        metrics,
    });
    tokio::spawn(async move {
        loop {
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
            let Some(source) = slots.slot_for(remote.ip()) else {
                continue;
            };
            let Some(config) = configs.borrow().clone() else {
                debug!(%remote, "no serving certificate yet; dropping connection");
                continue;
            };
            let (tx, slots) = (tx.clone(), slots.clone());
            tokio::spawn(async move {
                let Some((slot, eviction)) = slots.unauthenticated(source).await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let handshake = tokio::select! {
                    handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => handshake,
                    () = eviction.evicted() => {
                        slots.refused(RefusedReason::Evicted);
                        return;
                    }
                };
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        slots.metrics.tls_handshake_failures.inc();
                        debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        slots.metrics.tls_handshake_failures.inc();
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let client_id = stream.get_ref().1.peer_certificates().and_then(|chain| {
                    chain
                        .first()
                        .and_then(|leaf| sigil_identity::profile::leaf_spiffe_id(leaf).ok())
                });
                let closing = {
                    let (eviction, within) = (eviction.clone(), slots.limits.authenticate_within);
                    Box::pin(async move {
                        let deadline = async {
                            match within {
                                Some(within) => tokio::time::sleep(within).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            () = deadline => RefusedReason::NotAuthenticatedInTime,
                            () = eviction.evicted() => RefusedReason::Evicted,
                        }
                    })
                };
                let admission = Admission(Some(Arc::new(AdmissionState {
                    slots,
                    slot: Mutex::new(slot),
                    eviction,
                })));
                let conn = TlsConnection {
                    inner: stream,
                    info: PeerInfo {
                        remote,
                        client_id,
                        admission,
                    },
                    closing: Some(closing),
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
    let key = crate::source::generate_key().map_err(TlsServerError::Key)?;
    let now = OffsetDateTime::now_utc();
    let issued = signer
        .sign_serving(&key, id, names, SERVING_CERT_TTL, now)
        .map_err(TlsServerError::Issue)?;
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
