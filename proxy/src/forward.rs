//! What every proxied connection shares, whichever direction: the original destination of a
//! redirected socket, upstream connects with a timeout, the byte copy in both directions, the
//! connection metrics and the one JSON access-log line per connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sigil_identity::SpiffeId;
use sigil_identity::tls::TlsError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::balance::Balancers;
use crate::config::ProxyConfig;
use crate::l7::app_pool::AppPools;
use crate::metrics::{
    BytesLabels, ConnectionLabels, Direction, Flow, HandshakeLabels, Metrics, Security,
};
use crate::policy::PolicyState;
use crate::pool::Pools;
use crate::ratelimit::RateLimits;
use crate::tls::{HandshakeFailure, TlsState};
use sigil_proxy_api::mesh::MeshSnapshot;
use sigil_proxy_api::routes::RouteTable;
use sigil_proxy_api::services::ServiceTable;

/// Copy buffer per direction: one TLS record's worth of plaintext (16 KiB), so a full record
/// is read or written per call without growing rustls' buffers.
pub const COPY_BUFFER: usize = 16 * 1024;
/// A TLS handshake (or, in PERMISSIVE, the first bytes) must arrive within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection task needs from the rest of the proxy.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<ProxyConfig>,
    pub tls: watch::Receiver<Option<Arc<TlsState>>>,
    pub mesh: watch::Receiver<Option<Arc<MeshSnapshot>>>,
    pub metrics: Arc<Metrics>,
    pub policies: watch::Receiver<Option<Arc<PolicyState>>>,
    /// Flips to true when the drain period is over: live connections close.
    pub close: watch::Receiver<bool>,
    /// One permit per inbound connection held (--max-inbound-connections).
    pub inbound_slots: Arc<tokio::sync::Semaphore>,
    /// Meshed Services (transparent mode; None from an agent without them, or before the first
    /// update).
    pub services: watch::Receiver<Option<Arc<ServiceTable>>>,
    /// Routes, backend policies and local rate limits for this workload (None from an agent
    /// without them, or before the first update: every Service is balanced as it is).
    pub routes: watch::Receiver<Option<Arc<RouteTable>>>,
    /// Inbound: the local rate limits of the Service ports this workload serves.
    pub rate_limits: Arc<RateLimits>,
    /// Outbound: a balancer per meshed Service port...
    pub balancers: Arc<Balancers>,
    /// ...and pooled HTTP/2 connections per endpoint.
    pub pools: Arc<Pools>,
    /// Outbound: the retry budget of each backend Service routes retry to.
    pub retry_budgets: Arc<crate::outbound::RetryBudgets>,
    /// Inbound: connections to the application, reused across requests and client connections.
    pub app_pools: Arc<AppPools>,
    /// Spans of sampled requests, both directions ([`crate::trace::Tracer::disabled`] without a
    /// collector).
    pub tracer: crate::trace::Tracer,
}

impl Shared {
    pub fn current_tls(&self) -> Option<Arc<TlsState>> {
        self.tls.borrow().clone()
    }
}

/// Accepts on `listener` until `stop` flips, running `handle` for each connection on its own
/// task (tracked, so that shutdown can wait for them).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    tracker: TaskTracker,
    mut stop: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(handle(stream, canonical(peer)));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, direction = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The destination a redirected connection was originally addressed to: `SO_ORIGINAL_DST` for
/// IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6, by the family of the connection's local address. An
/// IPv4 connection accepted on a dual-stack socket has an IPv4-mapped local address and its
/// original destination in the IPv4 table, so that is asked first (as ztunnel does). The result
/// is canonical: never an IPv4-mapped address.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(local) if local.ip().to_ipv4_mapped().is_some() => socket
            .original_dst_v4()
            .or_else(|_| socket.original_dst_v6())?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    original
        .as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP socket address"))
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:198.18.0.1`) as the IPv4 address it is, so
/// that policies, mesh membership, metrics and logs see one address per peer.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address family, of a cluster IP and of the endpoints a connection to it is balanced over
/// (kube-proxy's semantics: a Service's IPv6 cluster IP leads to its IPv6 endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`, an IPv4-mapped address being IPv4.
    pub fn of(ip: IpAddr) -> Family {
        match ip.to_canonical() {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Loopback of the same family as `ip`: where inbound traffic for the app goes.
pub fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// One connection's facts, filled in as it goes, logged once when it ends.
pub struct ConnectionLog {
    pub direction: Direction,
    pub started: Instant,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub security: Option<Security>,
    pub source_identity: Option<SpiffeId>,
    pub destination_identity: Option<SpiffeId>,
    /// The policy that decided on the connection (inbound).
    pub policy: Option<String>,
    /// The key exchange group of the mTLS handshake (see `sigil_proxy_tls_handshakes_total`).
    pub key_exchange: Option<&'static str>,
}

impl ConnectionLog {
    pub fn new(direction: Direction, source: SocketAddr, destination: SocketAddr) -> Self {
        ConnectionLog {
            direction,
            started: Instant::now(),
            source,
            destination,
            security: None,
            source_identity: None,
            destination_identity: None,
            policy: None,
            key_exchange: None,
        }
    }

    /// A connection refused before forwarding: counted by reason and logged with the detail.
    pub fn refused(self, metrics: &Metrics, reason: HandshakeFailure, detail: &str) {
        metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: self.direction,
                reason,
            })
            .inc();
        self.write(0, 0, reason.as_str(), detail);
    }

    /// Refused by an authorization policy (counted with the decision).
    pub fn denied(self, reason: &str) {
        self.write(0, 0, "denied", reason);
    }

    /// The upstream (the app inbound, the destination outbound) could not be reached.
    pub fn upstream_failed(self, metrics: &Metrics, error: &io::Error) {
        metrics
            .upstream_failures
            .get_or_create(&crate::metrics::DirectionLabels {
                direction: self.direction,
            })
            .inc();
        self.write(0, 0, "upstream_connect_failed", &error.to_string());
    }

    fn write(&self, received: u64, sent: u64, result: &str, detail: &str) {
        let identity = |id: &Option<SpiffeId>| id.as_ref().map(ToString::to_string);
        tracing::info!(
            target: "sigil_access",
            direction = self.direction.as_str(),
            security = self.security.map(Security::as_str),
            source = %self.source,
            destination = %self.destination,
            source_identity = identity(&self.source_identity),
            destination_identity = identity(&self.destination_identity),
            policy = self.policy.as_deref(),
            key_exchange = self.key_exchange,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            result,
            detail,
        );
    }
}

/// How a connection's forwarding ended.
pub struct Ended {
    pub result: &'static str,
    pub detail: String,
}

impl Ended {
    pub fn ok() -> Self {
        Ended {
            result: "ok",
            detail: String::new(),
        }
    }
}

/// Copies bytes both ways between `downstream` (counted) and `upstream` until both are done.
pub async fn copy_both<D, U>(downstream: &mut Counted<D>, mut upstream: U) -> Ended
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(
        downstream,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    {
        Ok(_) => Ended::ok(),
        Err(e) => Ended {
            result: copy_failure(&e, downstream.counts.written()),
            detail: e.to_string(),
        },
    }
}

/// Runs an established connection's `forwarding` until it ends, the policy `revoked` it, or the
/// drain period is over; then counts and logs it. `counts` are the downstream side's bytes.
///
/// `forwarding` comes boxed because an async fn keeps each argument in its frame for its whole
/// life: passed by value, the connection's largest future (about 12 KB for an inbound TLS
/// connection) was stored twice, as the argument and as the copy `select!` polls.
pub async fn track<F, R>(
    shared: &Shared,
    mut log: ConnectionLog,
    security: Security,
    counts: Arc<ByteCounts>,
    forwarding: Pin<Box<F>>,
    revoked: R,
) where
    F: Future<Output = Ended>,
    R: Future<Output = String>,
{
    log.security = Some(security);
    let labels = ConnectionLabels {
        direction: log.direction,
        security,
    };
    let metrics = &shared.metrics;
    metrics.connections_opened.get_or_create(&labels).inc();
    let active = metrics.connections_active.get_or_create(&labels).clone();
    active.inc();

    let mut close = shared.close.clone();
    let ended = tokio::select! {
        ended = forwarding => ended,
        reason = revoked => Ended { result: "closed_by_policy", detail: reason },
        _ = close.wait_for(|close| *close) => Ended { result: "closed_by_drain", detail: String::new() },
        () = idle(&counts, shared.config.idle_timeout) => {
            metrics
                .idle_timeouts
                .get_or_create(&crate::metrics::DirectionLabels { direction: log.direction })
                .inc();
            Ended {
                result: "idle_timeout",
                detail: format!("no byte either way for {:?}", shared.config.idle_timeout),
            }
        }
    };

    active.dec();
    metrics.connections_closed.get_or_create(&labels).inc();
    if ended.result == HandshakeFailure::PeerAlert.as_str() {
        metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: log.direction,
                reason: HandshakeFailure::PeerAlert,
            })
            .inc();
    }
    let (received, sent) = (counts.read(), counts.written());
    for (flow, bytes) in [
        (Flow::DownstreamToUpstream, received),
        (Flow::UpstreamToDownstream, sent),
    ] {
        metrics
            .bytes
            .get_or_create(&BytesLabels {
                direction: log.direction,
                flow,
            })
            .inc_by(bytes);
    }
    log.write(received, sent, ended.result, &ended.detail);
}

/// Resolves once `counts` stayed the same for `timeout` (checked every quarter of it, so an idle
/// connection ends within 1.25 times the timeout).
async fn idle(counts: &ByteCounts, timeout: Duration) {
    let step = timeout / 4;
    let mut last = (counts.read(), counts.written());
    let mut quiet = Duration::ZERO;
    while quiet < timeout {
        tokio::time::sleep(step).await;
        let now = (counts.read(), counts.written());
        quiet = if now == last {
            quiet + step
        } else {
            Duration::ZERO
        };
        last = now;
    }
}

/// Forwards bytes both ways between the two sides (see [`track`]); nothing revokes it.
pub async fn splice<D, U>(
    shared: &Shared,
    log: ConnectionLog,
    security: Security,
    downstream: D,
    upstream: U,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut downstream = Counted::new(downstream);
    let counts = downstream.counts();
    track(
        shared,
        log,
        security,
        counts,
        Box::pin(copy_both(&mut downstream, upstream)),
        std::future::pending(),
    )
    .await;
}

/// The result of a copy that ended in an error. With TLS 1.3 a client's handshake completes
/// before the server has judged the client's certificate, so a server refusing us shows up as
/// an alert on the first read: with nothing received from upstream yet, that is a refusal
/// (`peer_alert`), not a broken connection.
fn copy_failure(e: &io::Error, from_upstream: u64) -> &'static str {
    match TlsError::from_io_error(e) {
        Some(TlsError::PeerAlert(_)) if from_upstream == 0 => HandshakeFailure::PeerAlert.as_str(),
        _ => "error",
    }
}

/// Bytes read from and written to one side of a connection, readable while it runs.
#[derive(Debug, Default)]
pub struct ByteCounts {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteCounts {
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Counts the bytes through a stream, so a connection that ends in an error (or is handed to
/// the HTTP server) still reports what it carried.
pub struct Counted<S> {
    inner: S,
    counts: Arc<ByteCounts>,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Self {
        Counted {
            inner,
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<ByteCounts> {
        self.counts.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts.read.fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counts.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    // Vectored writes pass through (as in `Prefixed`): without them HTTP/2 writes a frame's
    // header and its payload one at a time, each its own TLS record and system call.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counts.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were already read (to tell the protocol): reads return them
/// first, then the rest of the stream.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    position: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, whose first bytes `prefix` were already read from it.
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            position: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.position < self.prefix.len() {
            let rest = &self.prefix[self.position..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.position += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // TLS writes its records to the socket as one vectored write: passed through, several
    // records go out in one system call.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address_and_family() {
        let mapped: SocketAddr = "[::ffff:198.18.0.7]:8080".parse().unwrap();
        assert_eq!(canonical(mapped), "198.18.0.7:8080".parse().unwrap());
        assert_eq!(Family::of(mapped.ip()), Family::V4);
        let v6: SocketAddr = "[2001:2::7]:8080".parse().unwrap();
        assert_eq!(canonical(v6), v6, "a real IPv6 address stays as it is");
        assert_eq!(Family::of(v6.ip()), Family::V6);
        let v4: SocketAddr = "198.18.0.7:8080".parse().unwrap();
        assert_eq!((canonical(v4), Family::of(v4.ip())), (v4, Family::V4));
    }

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(local).await.unwrap();
            let (client, accepted) = tokio::join!(
                TcpStream::connect(listener.local_addr().unwrap()),
                listener.accept()
            );
            let (_client, (server, _)) = (client.unwrap(), accepted.unwrap());
            // No NAT entry (ENOENT; ENOPROTOOPT without conntrack): an error, never an address
            // made up from the wrong family's table.
            let found = original_destination(&server);
            assert!(found.is_err(), "{local}: {found:?}");
        }
    }

    /// A frame's header and payload written as one vectored write through both wrappers reach
    /// the socket in one call (one TLS record when TLS is between), and are counted.
    #[tokio::test]
    async fn vectored_writes_pass_through_the_wrappers_whole() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (_client, (server, _)) = (client.unwrap(), accepted.unwrap());
        let mut stream = Counted::new(Prefixed::new(Vec::new(), server));
        let counts = stream.counts();
        assert!(stream.is_write_vectored());
        let (header, payload) = ([0u8; 9], [1u8; 1024]);
        let written = stream
            .write_vectored(&[io::IoSlice::new(&header), io::IoSlice::new(&payload)])
            .await
            .unwrap();
        assert_eq!(written, header.len() + payload.len());
        assert_eq!(counts.written(), written as u64);
    }
}
