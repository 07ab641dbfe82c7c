//! Outbound HTTP to a meshed Service: the application's connection is served as HTTP/1.x or
//! HTTP/2 (as it speaks), and each request goes to the endpoint the balancer picks, over that
//! endpoint's pooled mutual TLS HTTP/2 connections ([`crate::pool`]). An HTTP/1.x request loses
//! its hop-by-hop headers (RFC 9110 section 7.6.1), keeps its Host as the `:authority`, and
//! carries its version in `sigil-orig-proto` for the server's proxy to speak it to the
//! application; the response is turned back into the application's protocol. Bodies stream
//! both ways frame by frame (trailers included), never buffered.
//!
//! Requests that change the protocol (`Upgrade`, CONNECT) get a dedicated mutual TLS connection
//! to their endpoint speaking HTTP/1.1; after a 101 (or a CONNECT's 2xx) both connections are
//! relayed as bytes. Every request is counted in the golden metrics when its response body
//! ends, and logged (`sigil_access`, `kind: http`: [`crate::request_log`]) with --access-log;
//! with a trace collector it gets a client span, begun before its endpoint is picked (so the
//! next hop's span is its child) and ended with its metrics.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client_h1;
use hyper_util::rt::TokioIo;
use sigil_identity::SpiffeId;
use sigil_proxy_api::ORIG_PROTO_HEADER;
use sigil_proxy_api::services::ServiceKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::warn;

use super::{ServiceRoute, route};
use crate::BoxError;
use crate::balance::{Balancer, EndpointLoad, Outcome};
use crate::dial::{self, DialError};
use crate::forward::{Ended, Shared};
use crate::l7::request_metrics::{CountedBody, grpc_status};
use crate::l7::{HttpError, HttpVersion, Tunnel, TunnelSlot, remove_hop_by_hop, serve_downstream};
use crate::metrics::{Direction, DirectionLabels, Metrics, PeerLabels, RequestOutcome, Security};
use crate::pool::{PoolError, Pools, StreamSlot, Target};
use crate::request_log::{self, RequestLine};
use crate::tls::TlsState;
use crate::trace::span::attr;
use crate::trace::{RequestTrace, SpanKind, SpanOutcome};
use sigil_route::compiled::{HeaderModifier, PortKey, ServiceRef};

/// The header of a response the proxy made itself, saying why (no endpoint, none reachable).
pub const PROXY_ERROR_HEADER: HeaderName = HeaderName::from_static("sigil-proxy-error");

/// gRPC UNIMPLEMENTED: a gRPC request no route rule matches.
const GRPC_UNIMPLEMENTED: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP/1.1 to the endpoint for a protocol switch: {0}")]
    Upstream(#[source] hyper::Error),
    #[error(transparent)]
    Tunnel(#[from] HttpError),
    #[error("plain HTTP to a Service outside the mesh: {0}")]
    Plain(String),
}

/// A response body as the proxy passes it on; its error is the endpoint's, or a route timeout
/// that cut it short.
pub type AnswerBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// `body` as an [`AnswerBody`].
pub(super) fn boxed<B>(body: B) -> AnswerBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A route timeout that expired after the response head was forwarded: the response is cut
/// short (HTTP/2 stream reset, HTTP/1 connection closed).
#[derive(Debug, thiserror::Error)]
#[error("the route's {0} timeout expired during the response")]
pub struct BodyTimeout(&'static str);

/// What every request of one application connection to one Service port needs.
pub(super) struct ServiceCalls {
    shared: Shared,
    /// The Service port the application addressed, for its routes.
    port_key: PortKey,
    service: ServiceKey,
    balancer: Arc<Balancer>,
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    connect_timeout: Duration,
    header_read_timeout: Duration,
    /// --access-log-sampling with --access-log; None: only failed requests logged.
    access_log: Option<f64>,
    source: SocketAddr,
    destination: SocketAddr,
}

impl ServiceCalls {
    pub(super) fn new(
        shared: &Shared,
        route: &ServiceRoute,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Arc<ServiceCalls> {
        Arc::new(ServiceCalls {
            shared: shared.clone(),
            port_key: PortKey {
                service: ServiceRef {
                    namespace: route.service.key.namespace.clone(),
                    name: route.service.key.name.clone(),
                },
                port: route.port.port,
            },
            service: route.service.key.clone(),
            balancer: route.balancer.clone(),
            pools: shared.pools.clone(),
            metrics: shared.metrics.clone(),
            tls: shared.tls.clone(),
            connect_timeout: shared.config.connect_timeout,
            header_read_timeout: shared.config.header_read_timeout,
            access_log: shared.config.access_log_ratio(),
            source,
            destination,
        })
    }
}

/// Serves the application's connection until either side closes.
pub(super) async fn serve<D>(downstream: D, version: HttpVersion, calls: Arc<ServiceCalls>) -> Ended
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match serve_connection(downstream, version, calls).await {
        Ok(()) => Ended::ok(),
        Err(e) => Ended {
            result: "error",
            detail: e.to_string(),
        },
    }
}

async fn serve_connection<D>(
    downstream: D,
    version: HttpVersion,
    calls: Arc<ServiceCalls>,
) -> Result<(), CallError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tunnel: Arc<TunnelSlot> = Arc::default();
    let header_read_timeout = calls.header_read_timeout;
    let respond = {
        let tunnel = tunnel.clone();
        move |request: Request<Incoming>| {
            let (calls, tunnel) = (calls.clone(), tunnel.clone());
            async move { calls.call(request, version, &tunnel).await }
        }
    };
    Ok(serve_downstream(downstream, version, header_read_timeout, &tunnel, respond).await?)
}

/// What a request was, for its metrics and log line.
pub(super) struct RequestFacts {
    started: Instant,
    method: Method,
    path: String,
    pub(super) host: String,
    /// The route (`<namespace>/<name>`) whose rule served it.
    pub(super) route: Option<String>,
    /// Its part in a trace: the ids its log line prints, and its client span when sampled.
    trace: RequestTrace,
}

impl ServiceCalls {
    pub(super) async fn call(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        version: HttpVersion,
        tunnel: &TunnelSlot,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let host = authority(&request).unwrap_or_default();
        let path = request.uri().path().to_owned();
        // Before the endpoint is picked: the context the request carries on is this span's.
        let mut trace = request_log::begin(
            &self.shared.tracer,
            SpanKind::Client,
            request.headers_mut(),
            self.access_log.is_some(),
        );
        if let Some(span) = trace.span_mut() {
            request_log::describe_head(span, &request, &path, &host);
            span.set(attr::URL_FULL, format!("http://{host}{path}"));
            span.set(
                attr::SIGIL_SERVICE,
                format!("{}:{}", self.service, self.port_key.port),
            );
            if let Some(state) = self.tls.borrow().as_ref() {
                span.set(attr::SIGIL_SOURCE_IDENTITY, state.id.to_string());
            }
        }
        let facts = RequestFacts {
            started,
            method: request.method().clone(),
            path,
            host,
            route: None,
            trace,
        };
        let table = self.shared.routes.borrow().clone();
        let normalization = self.shared.config.path_normalization;
        match route::select(table, &self.port_key, &request, normalization) {
            route::Selection::Unrouted => {}
            route::Selection::BadPath(why) => {
                let why = format!("bad request path: {why}");
                return self.local(StatusCode::BAD_REQUEST, &why, facts, "bad_request");
            }
            route::Selection::NoMatch { grpc } => {
                return self.failure(
                    grpc,
                    StatusCode::NOT_FOUND,
                    GRPC_UNIMPLEMENTED,
                    &format!("no route rule of {} matches", self.service),
                    facts,
                    "no_route",
                );
            }
            route::Selection::Rule(rule, table) => {
                // Boxed, as the switch below: each request's future is moved whole into its
                // task and through it, so what only some requests await is kept apart.
                let dispatch = route::dispatch(self, *rule, table, request, version, tunnel, facts);
                return Box::pin(dispatch).await;
            }
        }
        let Some(pending) = self.balancer.pick() else {
            super::no_endpoints(&self.metrics, &self.service, "503");
            let why = format!("no ready endpoints for {}", self.service);
            return self.local(StatusCode::SERVICE_UNAVAILABLE, &why, facts, "no_endpoints");
        };
        let endpoint = pending.endpoint().clone();
        let switching = version == HttpVersion::Http1
            && (request.headers().contains_key(header::UPGRADE)
                || request.method() == Method::CONNECT);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let sent = if switching {
            Box::pin(self.switch(request, &endpoint, tunnel))
                .await
                .map(|response| (response.map(boxed), None, None))
        } else {
            let (parts, body) = request.into_parts();
            let body = CountedBody::new(body, request_bytes.clone());
            let mut request = Request::from_parts(parts, body.boxed_unsync());
            to_mesh(&mut request, self.destination);
            let target = Target {
                addr: endpoint.addr,
                id: endpoint.id.clone(),
            };
            self.pools
                .send(&target, request)
                .await
                .map(|sent| {
                    let response = sent.response.map(boxed);
                    (response, Some(sent.slot), Some(sent.written))
                })
                .map_err(CallError::from)
        };
        let (response, slot, written) = match sent {
            Ok(sent) => sent,
            Err(e) => {
                self.count_upstream_failure();
                warn!(error = %e, service = %self.service, endpoint = %endpoint.addr, "a request to a Service endpoint failed; answered 502");
                endpoint.report(Outcome::NoAnswer);
                let mut response = self.local(
                    StatusCode::BAD_GATEWAY,
                    "upstream unavailable",
                    facts,
                    "upstream_failed",
                );
                response.body_mut().set_endpoint(Some(endpoint));
                return response;
            }
        };
        match written {
            Some(written) => pending.answered_since(written),
            None => pending.answered(),
        }
        let outcome = head_outcome(response.status(), response.headers());
        if let Some(outcome) = outcome {
            endpoint.report(outcome);
        }
        let (mut parts, body) = response.into_parts();
        if version == HttpVersion::Http1 {
            parts.version = Version::HTTP_11;
        }
        let head_after = facts.started.elapsed();
        let done = RequestDone {
            calls: self.clone(),
            facts,
            head_after,
            endpoint: Some(endpoint),
            status: parts.status.as_u16(),
            grpc_status: grpc_status(&parts.headers),
            outcome_at_end: outcome.is_none(),
            request_bytes,
            response_bytes: 0,
            result: sigil_proxy_api::metrics::RESULT_OK,
            slot,
        };
        Response::from_parts(
            parts,
            ResponseBody {
                inner: body,
                done: Some(done),
                timers: None,
            },
        )
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The cluster IP and port the application addressed.
    pub(super) fn destination(&self) -> SocketAddr {
        self.destination
    }

    pub(super) fn count_upstream_failure(&self) {
        self.metrics
            .upstream_failures
            .get_or_create(&DirectionLabels {
                direction: Direction::Outbound,
            })
            .inc();
    }

    /// A backend's response head, passed on: turned back into the application's protocol, the
    /// route's response header modifiers applied, counted and logged when its body ends.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn respond(
        self: &Arc<Self>,
        response: Response<AnswerBody>,
        version: HttpVersion,
        facts: RequestFacts,
        endpoint: Option<Arc<EndpointLoad>>,
        slot: Option<StreamSlot>,
        modifiers: &[HeaderModifier],
        timers: Option<ResponseTimers>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = response.into_parts();
        if version == HttpVersion::Http1 {
            parts.version = Version::HTTP_11;
        }
        // What the endpoint's answer came to, judged before the route's modifiers touch it.
        let outcome_at_end =
            endpoint.is_some() && head_outcome(parts.status, &parts.headers).is_none();
        for modifier in modifiers {
            sigil_route::filters::modify_headers(modifier, &mut parts.headers);
        }
        let done = RequestDone {
            calls: self.clone(),
            head_after: facts.started.elapsed(),
            facts,
            endpoint,
            status: parts.status.as_u16(),
            grpc_status: grpc_status(&parts.headers),
            outcome_at_end,
            request_bytes: Arc::default(),
            response_bytes: 0,
            result: sigil_proxy_api::metrics::RESULT_OK,
            slot,
        };
        Response::from_parts(
            parts,
            ResponseBody {
                inner: body,
                done: Some(done),
                timers,
            },
        )
    }

    /// A failure answered by the proxy: `status` with [`PROXY_ERROR_HEADER`], or for a gRPC
    /// request a trailers-only answer with `grpc_code`.
    pub(super) fn failure(
        self: &Arc<Self>,
        grpc: bool,
        status: StatusCode,
        grpc_code: u32,
        why: &str,
        facts: RequestFacts,
        result: &'static str,
    ) -> Response<ResponseBody> {
        if !grpc {
            return self.local(status, why, facts, result);
        }
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_code));
        if let Ok(value) = HeaderValue::from_str(why) {
            headers.insert("grpc-message", value.clone());
            headers.insert(PROXY_ERROR_HEADER, value);
        }
        self.answer(StatusCode::OK, headers, Some(grpc_code), facts, result)
    }

    /// An answer the proxy makes itself, without a body.
    pub(super) fn answer(
        self: &Arc<Self>,
        status: StatusCode,
        headers: http::HeaderMap,
        grpc_status: Option<u32>,
        facts: RequestFacts,
        result: &'static str,
    ) -> Response<ResponseBody> {
        let done = RequestDone {
            calls: self.clone(),
            head_after: facts.started.elapsed(),
            facts,
            endpoint: None,
            status: status.as_u16(),
            grpc_status,
            outcome_at_end: false,
            request_bytes: Arc::default(),
            response_bytes: 0,
            result,
            slot: None,
        };
        let mut response = Response::new(ResponseBody {
            inner: http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
            done: Some(done),
            timers: None,
        });
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// A request that switches protocols: HTTP/1.1 as the application sent it, on a dedicated
    /// connection to the endpoint, kept for the tunnel if the endpoint switches.
    pub(super) async fn switch(
        &self,
        mut request: Request<Incoming>,
        endpoint: &EndpointLoad,
        tunnel: &TunnelSlot,
    ) -> Result<Response<Incoming>, CallError> {
        let state = self.tls.borrow().clone().ok_or(PoolError::NoCertificate)?;
        let expected = BTreeSet::from([endpoint.id.clone()]);
        let (stream, _) = dial::mtls(endpoint.addr, self.connect_timeout, &state, expected)
            .await
            .inspect_err(|e| {
                if let DialError::Refused { reason, .. } = e {
                    self.pools.count_refusal(*reason);
                }
            })?;
        let (mut sender, connection) = client_h1::handshake(TokioIo::new(stream))
            .await
            .map_err(CallError::Upstream)?;
        tokio::spawn(connection.with_upgrades());
        let connect = request.method() == Method::CONNECT;
        let client = hyper::upgrade::on(&mut request);
        let mut response = sender
            .send_request(request)
            .await
            .map_err(CallError::Upstream)?;
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && response.status().is_success());
        if switched && let Ok(mut tunnel) = tunnel.lock() {
            *tunnel = Some(Tunnel {
                client,
                server: hyper::upgrade::on(&mut response),
            });
        }
        Ok(response)
    }

    /// A response the proxy makes itself, saying why in [`PROXY_ERROR_HEADER`].
    fn local(
        self: &Arc<Self>,
        status: StatusCode,
        why: &str,
        facts: RequestFacts,
        result: &'static str,
    ) -> Response<ResponseBody> {
        let body = Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|never| match never {})
            .boxed_unsync();
        let done = RequestDone {
            calls: self.clone(),
            head_after: facts.started.elapsed(),
            facts,
            endpoint: None,
            status: status.as_u16(),
            grpc_status: None,
            outcome_at_end: false,
            request_bytes: Arc::default(),
            response_bytes: 0,
            result,
            slot: None,
        };
        let mut response = Response::new(ResponseBody {
            inner: body,
            done: Some(done),
            timers: None,
        });
        *response.status_mut() = status;
        if let Ok(value) = HeaderValue::from_str(why) {
            response.headers_mut().insert(PROXY_ERROR_HEADER, value);
        }
        response
    }
}

/// The outcome an endpoint's response head tells its balancer and outlier detection, or None
/// for a gRPC response whose status comes in its trailers ([`ResponseBody`] reports it then).
pub(super) fn head_outcome(status: StatusCode, headers: &http::HeaderMap) -> Option<Outcome> {
    Outcome::of_head(
        status.as_u16(),
        sigil_route::select::is_grpc(headers),
        grpc_status(headers),
    )
}

/// The request's authority: the URI's, else its Host.
fn authority<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            let host = request.headers().get(header::HOST)?;
            host.to_str().ok().map(str::to_owned)
        })
}

/// An HTTP/1.x request made an HTTP/2 one between proxies: hop-by-hop headers removed, the
/// version in `sigil-orig-proto`, the Host (else the destination address) as `:authority`. An
/// HTTP/2 request goes as it is.
pub(super) fn to_mesh<B>(request: &mut Request<B>, destination: SocketAddr) {
    let original = match request.version() {
        Version::HTTP_10 | Version::HTTP_09 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        _ => return,
    };
    remove_hop_by_hop(request.headers_mut());
    request.headers_mut().insert(
        HeaderName::from_static(ORIG_PROTO_HEADER),
        HeaderValue::from_static(original),
    );
    let authority = authority(request).unwrap_or_else(|| destination.to_string());
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *request.uri_mut() = uri;
    }
    *request.version_mut() = Version::HTTP_2;
}

/// One request's record, written when its response body ends or is dropped.
struct RequestDone {
    calls: Arc<ServiceCalls>,
    facts: RequestFacts,
    head_after: Duration,
    endpoint: Option<Arc<EndpointLoad>>,
    status: u16,
    grpc_status: Option<u32>,
    /// A gRPC response whose status is in its trailers: its outcome is reported to the
    /// endpoint's balancer and outlier detection when the body ends (never retried: the head
    /// went on already).
    outcome_at_end: bool,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    result: &'static str,
    /// The request's stream on its pooled connection, held until the response is done.
    slot: Option<StreamSlot>,
}

impl RequestDone {
    /// Reports the outcome left to the end of the body, once.
    fn report_end(&mut self, outcome: Outcome) {
        if std::mem::take(&mut self.outcome_at_end)
            && let Some(endpoint) = &self.endpoint
        {
            endpoint.report(outcome);
        }
    }

    /// Counts the request, ends its span and writes its log line; `complete`: its response
    /// body reached its end (else the application went away first, or a timeout cut it).
    fn finish(mut self, complete: bool) {
        let calls = &self.calls;
        let endpoint_id: Option<&SpiffeId> = self.endpoint.as_ref().map(|e| &e.id);
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        calls.metrics.record_request(&RequestOutcome {
            peer: PeerLabels::new(Direction::Outbound, Some(&calls.service), endpoint_id)
                .with_route(self.facts.route.as_deref()),
            status: self.status,
            grpc_status: self.grpc_status,
            result: self.result,
            duration: self.head_after,
            request_bytes,
            response_bytes: self.response_bytes,
        });
        let answered = matches!(self.result, "ok" | "redirect");
        let trace = &mut self.facts.trace;
        if let Some(span) = trace.span_mut() {
            if let Some(endpoint) = &self.endpoint {
                request_log::describe_peer(span, endpoint.addr);
                span.set(attr::SIGIL_DESTINATION_IDENTITY, endpoint.id.to_string());
                span.set(attr::SIGIL_SECURITY, Security::Mtls.as_str());
            } else if self.result == sigil_proxy_api::metrics::RESULT_OK {
                // Answered without a mesh endpoint: a route's backend outside the mesh, reached
                // at its cluster IP in plain HTTP.
                span.set(attr::SIGIL_SECURITY, Security::Plaintext.as_str());
            }
            if let Some(route) = &self.facts.route {
                span.set(attr::SIGIL_ROUTE, route.as_str());
            }
        }
        // The line first: it names the span, which finishing hands to the exporter.
        if request_log::wanted(&calls.shared.tracer, trace, calls.access_log, !answered) {
            self.write_line(request_bytes);
        }
        let error = match self.result {
            _ if answered && !complete => Some("cancelled"),
            _ if answered => None,
            failed => Some(failed),
        };
        self.facts.trace.finish(&SpanOutcome {
            status: Some(self.status),
            grpc_status: self.grpc_status,
            request_bytes,
            response_bytes: self.response_bytes,
            error,
        });
    }

    fn write_line(&self, request_bytes: u64) {
        let calls = &self.calls;
        let endpoint_id = self.endpoint.as_ref().map(|e| e.id.to_string());
        let trace = &self.facts.trace;
        let source_identity = calls.tls.borrow().as_ref().map(|s| s.id.to_string());
        let service = calls.service.to_string();
        RequestLine {
            direction: Direction::Outbound,
            trace,
            source_ip: calls.source.ip(),
            source_identity: source_identity.as_deref(),
            destination_identity: endpoint_id.as_deref(),
            method: self.facts.method.as_str(),
            authority: &self.facts.host,
            path: &self.facts.path,
            route: self.facts.route.as_deref(),
            service: Some(&service),
            status: self.status,
            grpc_status: self.grpc_status,
            result: self.result,
            policy: None,
            request_bytes,
            response_bytes: self.response_bytes,
            duration: self.head_after,
            total: self.facts.started.elapsed(),
            upstream: self.endpoint.as_ref().map(|e| e.addr),
            key_exchange: self.slot.as_ref().map(StreamSlot::key_exchange),
            detail: None,
        }
        .write();
    }
}

/// A response body on its way to the application: counts its data bytes, reads `grpc-status`
/// from its trailers, and writes the request's record when it ends or is dropped.
pub(super) struct ResponseBody {
    inner: AnswerBody,
    done: Option<RequestDone>,
    timers: Option<ResponseTimers>,
}

impl ResponseBody {
    /// Where the request's body bytes are counted, for its metrics and log line.
    pub(super) fn count_request_bytes(&mut self, bytes: Arc<AtomicU64>) {
        if let Some(done) = &mut self.done {
            done.request_bytes = bytes;
        }
    }

    /// The endpoint a failed request went to, for its log line.
    pub(super) fn set_endpoint(&mut self, endpoint: Option<Arc<EndpointLoad>>) {
        if let Some(done) = &mut self.done {
            done.endpoint = endpoint;
        }
    }
}

/// A routed response's timeouts past its head: the request (or attempt) deadline, and no
/// frame for the idle time.
pub(super) struct ResponseTimers {
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl ResponseTimers {
    pub(super) fn new(deadline: Option<tokio::time::Instant>, idle: Option<Duration>) -> Self {
        ResponseTimers {
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            idle: idle.map(|idle| (idle, Box::pin(tokio::time::sleep(idle)))),
        }
    }

    /// Which timeout expired, if one did.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        if let Some(deadline) = &mut self.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Some("request");
        }
        if let Some((_, idle)) = &mut self.idle
            && idle.as_mut().poll(cx).is_ready()
        {
            return Some("idle");
        }
        None
    }

    fn frame_seen(&mut self) {
        if let Some((idle, sleep)) = &mut self.idle {
            sleep.as_mut().reset(tokio::time::Instant::now() + *idle);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(timers) = &mut self.timers {
            if polled.is_pending() {
                if let Some(which) = timers.expired(cx) {
                    if let Some(mut done) = self.done.take() {
                        done.result = sigil_proxy_api::metrics::RESULT_TIMEOUT;
                        done.report_end(Outcome::NoAnswer);
                        done.finish(false);
                    }
                    self.timers = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(which)))));
                }
            } else {
                timers.frame_seen();
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(done) = &mut self.done {
                    if let Some(data) = frame.data_ref() {
                        done.response_bytes += data.len() as u64;
                    }
                    if let Some(trailers) = frame.trailers_ref() {
                        if let Some(status) = grpc_status(trailers) {
                            done.grpc_status = Some(status);
                        }
                        done.report_end(Outcome::of_grpc_end(done.status, done.grpc_status));
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(mut done) = self.done.take() {
                    done.report_end(Outcome::of_grpc_end(done.status, done.grpc_status));
                    done.finish(true);
                }
            }
            // The endpoint's stream broke before its status (a client that goes away drops
            // the body instead, and nothing is reported: that is no endpoint's doing).
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = &mut self.done {
                    done.report_end(Outcome::of_grpc_end(done.status, None));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            // A body with nothing to send may be dropped unpolled: that is its end.
            done.finish(self.inner.is_end_stream());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_connection() {
        let mut request = Request::get("/a?b=c")
            .header("host", "api.demo:80")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "h2c")
            .header("te", "trailers, deflate")
            .header("x-end", "kept")
            .body(())
            .unwrap();
        to_mesh(&mut request, "198.19.0.10:80".parse().unwrap());
        assert_eq!(request.version(), Version::HTTP_2);
        assert_eq!(request.uri().to_string(), "http://api.demo:80/a?b=c");
        let headers = request.headers();
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["x-end"], "kept");
        assert_eq!(headers[ORIG_PROTO_HEADER], "HTTP/1.1");
        assert_eq!(headers["host"], "api.demo:80");

        // HTTP/1.0 without a Host: the destination address is the authority; TE without
        // trailers goes.
        let mut request = Request::get("/")
            .version(Version::HTTP_10)
            .header("te", "gzip")
            .body(())
            .unwrap();
        to_mesh(&mut request, "198.19.0.10:80".parse().unwrap());
        assert_eq!(request.uri().to_string(), "http://198.19.0.10:80/");
        assert_eq!(request.headers()[ORIG_PROTO_HEADER], "HTTP/1.0");
        assert!(!request.headers().contains_key("te"));

        // HTTP/2 from the application: untouched.
        let mut request = Request::get("http://api.demo/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        to_mesh(&mut request, "198.19.0.10:80".parse().unwrap());
        assert!(!request.headers().contains_key(ORIG_PROTO_HEADER));
    }
}
