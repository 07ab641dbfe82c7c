//! Inbound: connections from other pods (redirected to --inbound-port, or on the explicit
//! --inbound-listen). Each port's PeerAuthentication mode decides what is accepted: STRICT
//! terminates mutual TLS and requires a verified SPIFFE ID of our trust domain, PERMISSIVE tells
//! a TLS ClientHello from plaintext by peeking at the first bytes, DISABLE takes plaintext. Then
//! the bytes go to the application at the connection's original destination (the pod IP; with
//! --inbound-to-loopback, 127.0.0.1:<original port>), or --inbound-app in explicit mode.
//!
//! Every connection's first bytes are told apart ([`Sniffed`]): HTTP is served request by
//! request (so a client's `x-forwarded-client-cert` never reaches the application; see
//! [`l7::serve`]), anything else is forwarded as bytes. A client that sends nothing for
//! --detect-timeout may be waiting for a server-first protocol's greeting: the application is
//! connected then (counted in `sigil_proxy_protocol_detect_timeouts_total`), and whichever side
//! speaks first decides (see [`forward_opaque`]). Ports in --opaque-ports are never sniffed:
//! their bytes go to the application at once, decided per connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use futures::future::Either;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use crate::config::MtlsMode;
use crate::dial;
use crate::forward::{self, ConnectionLog, Counted, Ended, HANDSHAKE_TIMEOUT, Prefixed, Shared};
use crate::l7::app_pool::{AppPools, AppUpstream};
use crate::l7::request_metrics::{InboundConnection, RequestMetrics};
use crate::l7::{self, HttpVersion, Sniffed, sniff};
use crate::metrics::{Direction, DirectionLabels, PeerLabels, Security};
use crate::policy::{ConnectionAuthz, PolicyState, Transport};
use crate::ratelimit::ConnectionLimits;
use crate::tls::{self, HandshakeFailure};
use sigil_proxy_api::services::Protocol;

/// In PERMISSIVE, how long a client's first bytes are waited for to tell TLS from plaintext
/// (TLS clients speak first). A client that has sent nothing by then is plaintext, perhaps
/// waiting for a server-first protocol's greeting (SMTP, MySQL).
const TLS_DETECT_WAIT: Duration = Duration::from_millis(500);
/// How long a refused connection's clean close (TLS close_notify) may take.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Where accepted connections go.
#[derive(Clone, Copy, Debug)]
pub enum AppTarget {
    /// Transparent mode: the connection's original destination (127.0.0.1 or ::1 at its port
    /// with --inbound-to-loopback).
    OriginalPort,
    /// Explicit mode: this address; the mode rules use the listener's port.
    Fixed(SocketAddr),
}

/// One inbound connection, from accept to close.
pub async fn handle(stream: TcpStream, source: SocketAddr, target: AppTarget, shared: Shared) {
    // Held until the connection ends: at most --max-inbound-connections at once.
    let Ok(_slot) = shared.inbound_slots.clone().try_acquire_owned() else {
        shared.metrics.connections_over_limit.inc();
        debug!(%source, "inbound connection over --max-inbound-connections; closed");
        return;
    };
    let _ = stream.set_nodelay(true);
    let (destination, app) = match target {
        AppTarget::Fixed(app) => match stream.local_addr() {
            Ok(local) => (local, app),
            Err(_) => return,
        },
        AppTarget::OriginalPort => match forward::original_destination(&stream) {
            // To the pod IP the client addressed, as Istio since 1.10: a port the application
            // bound to loopback only stays private. `sigil proxy init` exempts the proxy's uid
            // from redirection, so this connection does not come back to the proxy.
            Ok(original) if !shared.config.inbound_to_loopback => (original, original),
            Ok(original) => (
                original,
                SocketAddr::new(forward::loopback_like(original.ip()), original.port()),
            ),
            Err(e) => {
                warn!(error = %e, %source, "inbound connection without an original destination (not redirected by iptables?); closing");
                return;
            }
        },
    };
    let log = ConnectionLog::new(Direction::Inbound, source, destination);
    let config = &shared.config;
    if matches!(target, AppTarget::OriginalPort)
        && [config.inbound_port, config.outbound_port].contains(&destination.port())
    {
        // Sent straight to a proxy port: forwarding it to 127.0.0.1:<that port> would loop.
        return log.refused(
            &shared.metrics,
            HandshakeFailure::ProxyPort,
            "connection addressed to the proxy's own port",
        );
    }
    let Some(policies) = shared.policies.borrow().clone() else {
        return log.refused(
            &shared.metrics,
            HandshakeFailure::NoPolicy,
            "no policies from the agent yet",
        );
    };
    let port = destination.port();
    let use_tls = match policies.mtls_mode(port, config.mtls_mode_for(port)) {
        MtlsMode::Strict => true,
        MtlsMode::Disable => false,
        MtlsMode::Permissive => match starts_with_tls(&stream).await {
            Ok(tls) => tls,
            Err(e) => {
                return log.refused(&shared.metrics, HandshakeFailure::Io, &e.to_string());
            }
        },
    };
    if use_tls {
        if let Some((tls_stream, log)) = accept_tls(stream, log, &shared).await {
            authorize_and_forward(tls_stream, log, Security::Mtls, app, &policies, shared).await;
        }
    } else {
        authorize_and_forward(stream, log, Security::Plaintext, app, &policies, shared).await;
    }
}

/// The TLS handshake; on success the stream and the log with the peer's identity.
async fn accept_tls(
    stream: TcpStream,
    mut log: ConnectionLog,
    shared: &Shared,
) -> Option<(TlsStream<TcpStream>, ConnectionLog)> {
    let Some(state) = shared.current_tls() else {
        log.refused(
            &shared.metrics,
            HandshakeFailure::NoCertificate,
            "no certificate from the agent yet",
        );
        return None;
    };
    let acceptor = TlsAcceptor::from(state.server.clone());
    let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => tls_stream,
        Ok(Err(e)) => {
            let (reason, detail) = HandshakeFailure::of_io_error(&e);
            log.refused(&shared.metrics, reason, &detail);
            return None;
        }
        Err(_) => {
            log.refused(
                &shared.metrics,
                HandshakeFailure::Timeout,
                "TLS handshake not finished in time",
            );
            return None;
        }
    };
    log.key_exchange = Some(state.count_handshake(Direction::Inbound, tls_stream.get_ref().1));
    // The verifier already required exactly this; reading it back gives the identity to log
    // and to authorize.
    match tls::peer_identity(tls_stream.get_ref().1, &state.bundle) {
        Ok(peer) => log.source_identity = Some(peer),
        Err(e) => {
            log.refused(
                &shared.metrics,
                HandshakeFailure::of_tls_error(&e),
                &e.to_string(),
            );
            return None;
        }
    }
    log.destination_identity = Some(state.id.clone());
    Some((tls_stream, log))
}

/// Authorizes the connection (and, if it speaks HTTP, each of its requests), then forwards it to
/// the application until it ends or a policy change revokes it.
async fn authorize_and_forward<D>(
    mut downstream: D,
    mut log: ConnectionLog,
    security: Security,
    app: SocketAddr,
    policies: &PolicyState,
    shared: Shared,
) where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let port = log.destination.port();
    let authz = Arc::new(ConnectionAuthz::new(
        shared.policies.clone(),
        log.source_identity.as_ref(),
        log.source.ip(),
        port,
        Transport {
            mtls: security == Security::Mtls,
            default_mode: shared.config.mtls_mode_for(port),
        },
        shared.metrics.clone(),
    ));
    let config = &shared.config;
    let mut first = Vec::new();
    // Declared opaque on this pod (--opaque-ports) or by a Service that lists this address and
    // port as an endpoint: bytes at once, whoever speaks first.
    let declared = shared
        .services
        .borrow()
        .as_ref()
        .and_then(|table| table.endpoint_protocol(log.destination.ip(), port));
    let sniffed = if config.opaque_ports.contains(port) || declared == Some(Protocol::Opaque) {
        Some(Sniffed::Opaque)
    } else {
        let started = tokio::time::Instant::now();
        let sniffed = match sniff(&mut downstream, &mut first, config.detect_timeout).await {
            Ok(sniffed) => sniffed,
            Err(e) => return log.refused(&shared.metrics, HandshakeFailure::Io, &e.to_string()),
        };
        // Silent until the wait was over (not closed before): the fallback to opaque bytes.
        if sniffed.is_none() && started.elapsed() >= config.detect_timeout {
            shared
                .metrics
                .detect_timeouts
                .get_or_create(&DirectionLabels {
                    direction: Direction::Inbound,
                })
                .inc();
        }
        sniffed
    };
    let downstream = Prefixed::new(first, downstream);
    let http = match sniffed {
        Some(Sniffed::Http(version)) => Some(version),
        _ => None,
    };
    // Requests are decided one by one where a policy or a flag looks at them. Elsewhere the
    // connection is decided once, as bytes are (a denied client sees it refused), and HTTP is
    // still parsed, to take out what a client must not send.
    let per_request =
        http.is_some() && (policies.needs_http || config.forward_client_cert || config.access_log);
    if !per_request {
        let outcome = authz.decide_connection();
        log.policy = Some(outcome.policy.clone());
        if !outcome.allowed {
            log.security = Some(security);
            // A clean close (TLS close_notify), so the client's proxy sees a refusal rather
            // than a broken connection.
            let mut downstream = downstream;
            let _ = tokio::time::timeout(CLOSE_WAIT, downstream.shutdown()).await;
            return log.denied(&outcome.reason);
        }
    }
    let serving = HttpServing {
        app,
        app_pools: shared.app_pools.clone(),
        connect_timeout: config.connect_timeout,
        detect_timeout: config.detect_timeout,
        settings: l7::Settings {
            normalization: config.path_normalization,
            header_read_timeout: config.header_read_timeout,
            forward_client_cert: match (&log.destination_identity, &log.source_identity) {
                (Some(by), Some(peer)) if config.forward_client_cert => {
                    l7::client_cert_header(&by.to_string(), &peer.to_string())
                }
                _ => None,
            },
            metrics: RequestMetrics {
                metrics: shared.metrics.clone(),
                peer: PeerLabels::new(Direction::Inbound, None, log.source_identity.as_ref()),
                connection: Arc::new(InboundConnection {
                    tracer: shared.tracer.clone(),
                    access_log: config.access_log_ratio(),
                    source: log.source,
                    source_identity: log.source_identity.as_ref().map(ToString::to_string),
                    destination_identity: log
                        .destination_identity
                        .as_ref()
                        .map(ToString::to_string),
                    key_exchange: log.key_exchange,
                    app,
                }),
            },
            rate_limits: Some(ConnectionLimits::new(
                shared.rate_limits.clone(),
                log.destination,
                log.source_identity.clone(),
            )),
        },
        authz: authz.clone(),
    };
    let downstream = Counted::new(downstream);
    let counts = downstream.counts();
    // Bytes (possibly HTTP after all), or HTTP request by request: one future either way, boxed
    // for `track`.
    let forwarding = match http {
        None => match dial::connect(app, serving.connect_timeout).await {
            Ok(upstream) => {
                let silent = sniffed.is_none();
                Either::Left(forward_opaque(downstream, upstream, silent, serving))
            }
            Err(e) => return log.upstream_failed(&shared.metrics, &e),
        },
        // HTTP connects to the application only for its first allowed request, so a client
        // that never finishes one never holds an application connection.
        Some(version) => Either::Right(serving.serve(downstream, version, None)),
    };
    let revoked = authz.revoked(per_request);
    forward::track(
        &shared,
        log,
        security,
        counts,
        Box::pin(forwarding),
        revoked,
    )
    .await;
}

/// Forwards a connection that is not HTTP as bytes, both ways. If the client had sent nothing
/// (`silent`), whichever side speaks first decides: the application (a server-first protocol)
/// keeps it bytes; the client's first bytes are told apart as at the start, and HTTP is served
/// on the application connection already open. So a client cannot take HTTP requests past the
/// proxy's checks (and forge `x-forwarded-client-cert`) by waiting out --detect-timeout.
async fn forward_opaque<D>(
    mut downstream: Counted<Prefixed<D>>,
    mut upstream: TcpStream,
    silent: bool,
    serving: HttpServing,
) -> Ended
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if silent {
        let mut chunk = [0u8; 1024];
        let client_first = tokio::select! {
            // Readable also when the application closes or fails: bytes from here on.
            _ = upstream.readable() => None,
            read = downstream.read(&mut chunk) => Some(read),
        };
        match client_first {
            Some(Ok(n)) if n > 0 => {
                let mut first = chunk[..n].to_vec();
                let wait = serving.detect_timeout;
                let sniffed = match sniff(&mut downstream, &mut first, wait).await {
                    Ok(sniffed) => sniffed,
                    Err(e) => return failed(&e),
                };
                if let Some(Sniffed::Http(version)) = sniffed {
                    let downstream = Prefixed::new(first, downstream);
                    return serving.serve(downstream, version, Some(upstream)).await;
                }
                if let Err(e) = upstream.write_all(&first).await {
                    return failed(&e);
                }
            }
            Some(Err(e)) => return failed(&e),
            // The client closed its side first: the copy passes that on.
            Some(Ok(_)) | None => {}
        }
    }
    forward::copy_both(&mut downstream, upstream).await
}

fn failed(e: &dyn std::error::Error) -> Ended {
    Ended {
        result: "error",
        detail: e.to_string(),
    }
}

/// What serving a connection as HTTP needs.
struct HttpServing {
    app: SocketAddr,
    app_pools: Arc<AppPools>,
    connect_timeout: Duration,
    detect_timeout: Duration,
    settings: l7::Settings,
    authz: Arc<ConnectionAuthz>,
}

impl HttpServing {
    /// Serves `downstream` as HTTP of `version` (see [`l7::serve`]); the application is reached
    /// on `connected` if a connection to it is open already, else on a new one.
    async fn serve<D>(
        self,
        downstream: D,
        version: HttpVersion,
        connected: Option<TcpStream>,
    ) -> Ended
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let HttpServing {
            app,
            app_pools,
            connect_timeout,
            settings,
            authz,
            ..
        } = self;
        let upstream = Arc::new(AppUpstream::new(
            app_pools.get(app, connect_timeout),
            connected,
        ));
        let served = l7::serve(downstream, version, upstream.clone(), settings, authz).await;
        // The client got a 502 for each request the application could not be reached for; the
        // connection's log line says so too, as it does for bytes.
        match (served, upstream.connect_failure()) {
            (Err(e), _) => failed(&e),
            (Ok(()), Some(detail)) => Ended {
                result: "upstream_connect_failed",
                detail,
            },
            (Ok(()), None) => Ended::ok(),
        }
    }
}

/// PERMISSIVE detection: a TLS record header (handshake, version 3.x) opens every ClientHello.
/// Peeks without consuming, so either path sees the bytes from the start.
async fn starts_with_tls(stream: &TcpStream) -> io::Result<bool> {
    let mut head = [0u8; 3];
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let first = tokio::time::timeout(TLS_DETECT_WAIT, stream.peek(&mut head)).await;
    let mut seen = match first {
        Err(_) => return Ok(false),
        Ok(peeked) => peeked?,
    };
    // A ClientHello's header arrives in one segment in practice; if only part of it did, wait
    // briefly for the rest rather than guessing.
    while seen > 0 && seen < head.len() && head[0] == 0x16 {
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "partial TLS record header",
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        seen = stream.peek(&mut head).await?;
    }
    Ok(seen >= 3 && head[0] == 0x16 && head[1] == 0x03)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Connects, lets the client send `first` (if anything), and runs the detection.
    async fn detect(first: Option<&'static [u8]>) -> io::Result<bool> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            if let Some(bytes) = first {
                stream.write_all(bytes).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        let detected = starts_with_tls(&server).await;
        client.abort();
        detected
    }

    #[tokio::test]
    async fn a_client_hello_is_tls_and_anything_else_is_plaintext() {
        // A TLS record header: handshake (22), version 3.1.
        assert!(detect(Some(&[0x16, 0x03, 0x01, 0x02, 0x00])).await.unwrap());
        assert!(!detect(Some(b"GET / HTTP/1.1\r\n")).await.unwrap());
        // 0x16 followed by something that is not a TLS version.
        assert!(!detect(Some(&[0x16, 0x7f, 0x00])).await.unwrap());
        // A client that waits for the server (server-first protocols) is plaintext.
        assert!(!detect(None).await.unwrap());
    }

    #[tokio::test]
    async fn a_header_split_across_segments_is_waited_for() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(&[0x16]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(&[0x03, 0x03]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        assert!(starts_with_tls(&server).await.unwrap());
        client.abort();
    }
}
