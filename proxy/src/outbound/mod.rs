//! Outbound: connections the application opens (redirected to --outbound-port, or on the
//! explicit --outbound-listen).
//!
//! A connection to a meshed Service's cluster IP and port is handled by the port's declared
//! protocol: opaque bytes are balanced per connection, HTTP per request ([`requests`]), and a port
//! with nothing declared is told apart by its first bytes (opaque if the client sends too little
//! within --detect-timeout). Each request or connection goes to an endpoint the balancer picks
//! ([`crate::balance`]), over mutual TLS that must prove that endpoint's own identity.
//!
//! Any other destination the agent lists as meshed gets mutual TLS per connection and must
//! prove one of the identities listed for it; any other destination is passed through
//! untouched.

mod mirror;
mod requests;
mod retry;
mod route;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use sigil_identity::SpiffeId;
use sigil_proxy_api::services::{MeshService, Protocol, ServiceKey, ServicePort};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::balance::{Balancer, EndpointLoad, Outcome};
use crate::dial::{self, DialError};
use crate::forward::{self, ConnectionLog, Counted, Family, Prefixed, Shared};
use crate::l7::{self, HttpVersion, Sniffed};
use crate::metrics::{Direction, DirectionLabels, Metrics, Security, ServiceLabels};
use crate::tls::HandshakeFailure;

pub use requests::PROXY_ERROR_HEADER;
pub use retry::{RetryBudgets, RetryOutcome};

/// Where accepted connections go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// Transparent mode: the original destination; balanced over its endpoints if it is a
    /// meshed Service, else mTLS if it is a mesh member.
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
            if let Some(route) = ServiceRoute::of(&shared, original) {
                let log = ConnectionLog::new(Direction::Outbound, source, original);
                return to_service(stream, log, route, shared).await;
            }
            (
                original,
                membership
                    .get(original.ip())
                    .map(|member| member.ids.clone()),
            )
        }
    };
    let log = ConnectionLog::new(Direction::Outbound, source, destination);
    let Some(expected) = expected else {
        let upstream = match dial::connect(destination, shared.config.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(e) => return log.upstream_failed(&shared.metrics, &e),
        };
        return forward::splice(&shared, log, Security::Passthrough, stream, upstream).await;
    };
    mtls_splice(stream, log, destination, expected, None, &shared).await;
}

/// Originates mTLS to `destination`, whose server must prove one of `expected` (the dial's
/// outcome reported to `endpoint`'s outlier detection when it is a balanced one), and forwards
/// `downstream` over it until either side is done; refusals are counted and logged.
async fn mtls_splice<D>(
    downstream: D,
    mut log: ConnectionLog,
    destination: SocketAddr,
    expected: BTreeSet<SpiffeId>,
    endpoint: Option<&EndpointLoad>,
    shared: &Shared,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let Some(state) = shared.current_tls() else {
        return log.refused(
            &shared.metrics,
            HandshakeFailure::NoCertificate,
            "no certificate from the agent yet",
        );
    };
    log.source_identity = Some(state.id.clone());
    let connected = dial::mtls(destination, shared.config.connect_timeout, &state, expected).await;
    drop(state);
    if let Some(endpoint) = endpoint {
        endpoint.report(if connected.is_ok() {
            Outcome::Success
        } else {
            Outcome::NoAnswer
        });
    }
    match connected {
        Ok((tls_stream, got)) => {
            log.destination_identity = Some(got);
            log.key_exchange = Some(sigil_identity::tls::key_exchange_group(
                tls_stream.get_ref().1,
            ));
            forward::splice(shared, log, Security::Mtls, downstream, tls_stream).await;
        }
        Err(e) => refused(log, shared, e),
    }
}

/// Counts and logs a failed mTLS dial the way every outbound connection is.
fn refused(log: ConnectionLog, shared: &Shared, e: DialError) {
    match e {
        DialError::Connect { source, .. } => log.upstream_failed(&shared.metrics, &source),
        DialError::Refused { reason, detail } => log.refused(&shared.metrics, reason, &detail),
    }
}

/// A connection's meshed Service port and its balancer.
struct ServiceRoute {
    service: Arc<MeshService>,
    port: ServicePort,
    balancer: Arc<Balancer>,
}

impl ServiceRoute {
    /// The Service port `original` is, if the agent lists a meshed Service at that cluster IP
    /// with that port; balanced over the endpoints of the cluster IP's family.
    fn of(shared: &Shared, original: SocketAddr) -> Option<ServiceRoute> {
        let table = shared.services.borrow().clone()?;
        let service = table.by_cluster_ip(original.ip())?.clone();
        let port = service.port(original.port())?.clone();
        let balancer = shared
            .balancers
            .get(&service, &port, Family::of(original.ip()));
        Some(ServiceRoute {
            service,
            port,
            balancer,
        })
    }

    /// No endpoint takes new requests: counted and logged (the caller closes).
    fn no_endpoints(&self, shared: &Shared) {
        no_endpoints(&shared.metrics, &self.service.key, "connection closed");
    }
}

/// A request or connection to `service` refused for want of a ready endpoint: counted and
/// logged with what the application got.
fn no_endpoints(metrics: &Metrics, service: &ServiceKey, answer: &str) {
    metrics
        .no_endpoints
        .get_or_create(&ServiceLabels {
            service: service.to_string(),
        })
        .inc();
    warn!(%service, answer, "no ready endpoints for a meshed Service");
}

/// A connection to a meshed Service, by the port's declared protocol.
async fn to_service(
    mut stream: TcpStream,
    log: ConnectionLog,
    route: ServiceRoute,
    shared: Shared,
) {
    let config = &shared.config;
    let protocol = route.port.protocol;
    if protocol == Protocol::Opaque {
        return opaque(Prefixed::new(Vec::new(), stream), log, route, shared).await;
    }
    // HTTP kinds wait for the request head as long as an HTTP server would; a port with nothing
    // declared waits --detect-timeout, then is bytes.
    let wait = if protocol.is_http() {
        config.header_read_timeout
    } else {
        config.detect_timeout
    };
    let mut first = Vec::new();
    let sniffed = match l7::sniff(&mut stream, &mut first, wait).await {
        Ok(sniffed) => sniffed,
        Err(e) => {
            debug!(error = %e, destination = %log.destination, "outbound connection broke before its first bytes");
            return;
        }
    };
    let undecided = Sniffed::of(&first) == Sniffed::Undecided && first.len() < l7::SNIFF_LIMIT;
    let downstream = Prefixed::new(first, stream);
    let version = if protocol.is_http() {
        match sniffed {
            Some(Sniffed::Http(version)) => version,
            // Declared HTTP: whatever came is served as HTTP/1 (the server answers 400 if it
            // is not); nothing at all is a client that went away.
            Some(_) => HttpVersion::Http1,
            None => return,
        }
    } else {
        match sniffed {
            Some(Sniffed::Http(version)) if !undecided => version,
            _ => {
                if undecided {
                    shared
                        .metrics
                        .detect_timeouts
                        .get_or_create(&DirectionLabels {
                            direction: Direction::Outbound,
                        })
                        .inc();
                }
                return opaque(downstream, log, route, shared).await;
            }
        }
    };
    serve_http(downstream, version, log, route, shared).await;
}

/// Bytes to one endpoint the balancer picks for the whole connection.
async fn opaque<D>(downstream: D, log: ConnectionLog, route: ServiceRoute, shared: Shared)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let Some(pending) = route.balancer.pick() else {
        // Closing is all a byte stream can be told.
        return route.no_endpoints(&shared);
    };
    let endpoint = pending.endpoint().clone();
    debug!(service = %route.service.key, endpoint = %endpoint.addr, "opaque connection to a Service endpoint");
    let expected = BTreeSet::from([endpoint.id.clone()]);
    mtls_splice(
        downstream,
        log,
        endpoint.addr,
        expected,
        Some(&endpoint),
        &shared,
    )
    .await;
    // Counted in the endpoint's load until the connection ends.
    drop(pending);
}

/// The application's connection served as HTTP, each request balanced on its own.
async fn serve_http<D>(
    downstream: D,
    version: HttpVersion,
    mut log: ConnectionLog,
    route: ServiceRoute,
    shared: Shared,
) where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    log.source_identity = shared.current_tls().map(|state| state.id.clone());
    // Each request proves its own endpoint's identity (its access-log line names it); the
    // connection's line names the Service's identity when all its endpoints share one.
    let mut ids = route.service.endpoints.iter().map(|endpoint| &endpoint.id);
    if let Some(first) = ids.next()
        && ids.all(|id| id == first)
    {
        log.destination_identity = Some(first.clone());
    }
    let downstream = Counted::new(downstream);
    let counts = downstream.counts();
    let calls = requests::ServiceCalls::new(&shared, &route, log.source, log.destination);
    let serving = requests::serve(downstream, version, calls);
    forward::track(
        &shared,
        log,
        Security::Mtls,
        counts,
        Box::pin(serving),
        std::future::pending(),
    )
    .await;
}

#[cfg(test)]
mod tests;
