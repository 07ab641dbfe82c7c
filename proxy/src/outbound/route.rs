//! Requests to a Service port that has routes (Gateway API HTTPRoute/GRPCRoute, GAMMA): the
//! rule is chosen once per request with `sigil_route::select` on the normalized path (the
//! GRPCRoute table for gRPC requests when there is one, else the HTTPRoute table), and the
//! request keeps that rule (an `Arc` of its table) to its end, whatever table comes next. A
//! request no rule matches is answered 404 (gRPC: UNIMPLEMENTED). The rule's filters apply in
//! order (header modifiers, redirect answered here, URL rewrite, mirrors), then one of its
//! backends is picked by weight (an invalid one's share answered 500, gRPC UNAVAILABLE); a
//! meshed backend is balanced over its endpoints, any other reached at its cluster IP over
//! plain HTTP. Attempts follow the rule's timeouts (GEP-1742) and retries (GEP-1731, with the
//! backend's retry budget, [`super::retry`]); each attempt's outcome feeds outlier detection.
//!
//! Where this is narrower than the specs: a gRPC status is retried only when the answer is
//! trailers-only (a status in the trailers comes after bytes were forwarded; gRPC's own retry
//! policy stops there too; it still feeds outlier detection and the balancer when the body
//! ends); the idle timeout also bounds each attempt's wait for its response
//! head; a protocol switch (Upgrade, CONNECT) is never retried, and only to a meshed backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_policy::path;
use sigil_proxy_api::routes::RouteTable;
use sigil_proxy_api::services::ServiceKey;
use sigil_route::compiled::{
    Backend, BackendTarget, Filter, GrpcRouteTable, HeaderModifier, HttpRouteTable, PortKey,
    RetryPolicy, RuleRef, ServiceRef, Timeouts,
};
use sigil_route::{filters, select};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::mirror;
use super::requests::{
    AnswerBody, CallError, RequestFacts, ResponseBody, ResponseTimers, ServiceCalls, boxed,
    head_outcome,
};
use super::retry::{self, Replay, RetryOutcome};
use crate::balance::{Balancer, EndpointLoad, Outcome, random_below};
use crate::dial;
use crate::forward::Family;
use crate::l7::request_metrics::{CountedBody, grpc_status};
use crate::l7::{HttpVersion, TunnelSlot};
use crate::metrics::RetryLabels;
use crate::pool::{PoolError, RequestBody, StreamSlot, Target};

/// gRPC status codes the proxy answers with itself.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_UNAVAILABLE: u32 = 14;

/// The rule a request takes, holding its table for the request's life.
pub struct Rule {
    table: RuleTable,
    index: usize,
    matched_prefix: Option<String>,
    pub grpc: bool,
}

enum RuleTable {
    Http(Arc<HttpRouteTable>),
    Grpc(Arc<GrpcRouteTable>),
}

impl Rule {
    /// The compiled rule, in whichever table it is.
    fn rule(&self) -> &sigil_route::Rule {
        match &self.table {
            RuleTable::Http(t) => &t.rules[self.index],
            RuleTable::Grpc(t) => &t.rules[self.index],
        }
    }

    pub fn source(&self) -> &RuleRef {
        &self.rule().source
    }

    fn filters(&self) -> &[Filter] {
        &self.rule().filters
    }

    fn backends(&self) -> &sigil_route::Backends {
        &self.rule().backends
    }

    fn timeouts(&self) -> Timeouts {
        self.rule().timeouts
    }

    fn retry(&self) -> Option<&RetryPolicy> {
        self.rule().retry.as_ref()
    }

    /// `route ns/name rule 2`, for answers and logs.
    fn describe(&self) -> String {
        let source = self.source();
        format!(
            "{} {}/{} rule {}",
            source.kind, source.namespace, source.name, source.rule_index
        )
    }
}

/// What the route table says about a request.
pub enum Selection {
    /// No table applies to the port (or to this kind of request): balanced over the Service.
    Unrouted,
    /// The path cannot be normalized.
    BadPath(String),
    NoMatch {
        grpc: bool,
    },
    Rule(Box<Rule>, Arc<RouteTable>),
}

/// Chooses the rule of `request` to the Service port `key` from `table`.
pub fn select(
    table: Option<Arc<RouteTable>>,
    key: &PortKey,
    request: &Request<Incoming>,
    normalization: sigil_policy::path::PathNormalization,
) -> Selection {
    let Some(table) = table else {
        return Selection::Unrouted;
    };
    let Some(routes) = table.routes.ports.get(key).cloned() else {
        return Selection::Unrouted;
    };
    let grpc = select::is_grpc(request.headers());
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let normalized = match path::normalize_target(target, normalization) {
        Ok(normalized) => normalized,
        Err(e) => return Selection::BadPath(e.to_string()),
    };
    let (path, query) = match normalized.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (normalized.as_str(), None),
    };
    let head = select::RequestHead {
        method: request.method(),
        path,
        query,
        headers: request.headers(),
    };
    let (selected, table_of_rule) = match (&routes.grpc, &routes.http) {
        (Some(t), _) if grpc => (select::select_rule(t, &head), RuleTable::Grpc(t.clone())),
        (_, Some(t)) => (select::select_rule(t, &head), RuleTable::Http(t.clone())),
        _ => return Selection::Unrouted,
    };
    let rule = selected.map(|s| Rule {
        index: s.rule_index,
        matched_prefix: s.matched_prefix.map(str::to_owned),
        table: table_of_rule,
        grpc,
    });
    match rule {
        Some(rule) => Selection::Rule(Box::new(rule), table),
        None => Selection::NoMatch { grpc },
    }
}

/// Where an attempt goes.
pub enum Destination {
    /// A meshed Service: its endpoints, over pooled mutual TLS.
    Meshed {
        service: ServiceKey,
        balancer: Arc<Balancer>,
    },
    /// A Service outside the mesh: its cluster IP, plain HTTP.
    Plain {
        service: ServiceKey,
        addr: SocketAddr,
    },
}

impl Destination {
    fn service(&self) -> &ServiceKey {
        match self {
            Destination::Meshed { service, .. } | Destination::Plain { service, .. } => service,
        }
    }
}

/// Where `backend` is reached, or why it cannot be.
pub fn destination(calls: &ServiceCalls, backend: &Backend) -> Result<Destination, String> {
    let key = ServiceKey::new(&backend.service.namespace, &backend.service.name);
    let shared = calls.shared();
    // The backend is reached in the family the application dialled, as kube-proxy would.
    let family = Family::of(calls.destination().ip());
    let table = shared.services.borrow().clone();
    if let Some(service) = table.as_ref().and_then(|t| t.get(&key)) {
        let Some(port) = service.port(backend.port) else {
            return Err(format!("{key} has no port {}", backend.port));
        };
        let balancer = shared.balancers.get(service, port, family);
        return Ok(Destination::Meshed {
            service: key,
            balancer,
        });
    }
    let same_family = backend
        .cluster_ips
        .iter()
        .find(|ip| Family::of(**ip) == family);
    match same_family.or(backend.cluster_ips.first()) {
        Some(ip) => Ok(Destination::Plain {
            service: key,
            addr: SocketAddr::new(*ip, backend.port),
        }),
        None => Err(format!("{key} is neither meshed nor has a cluster IP")),
    }
}

/// A response head from a backend.
pub struct Answered {
    pub response: Response<AnswerBody>,
    slot: Option<StreamSlot>,
    endpoint: Option<Arc<EndpointLoad>>,
}

/// An attempt without an answer.
pub enum Failed {
    NoEndpoints(ServiceKey),
    Call {
        error: CallError,
        endpoint: Option<Arc<EndpointLoad>>,
        /// The request provably never reached the backend (no connection was made).
        unsent: bool,
    },
    /// The attempt's backendRequest (or idle) timeout.
    TimedOut,
}

/// Sends `request` once to `destination`: through its balancer (a new pick) or to its cluster IP,
/// waiting at most `limit` for the response head (an endpoint that takes longer counts as not
/// answering).
pub async fn send_once(
    calls: &ServiceCalls,
    destination: &Destination,
    mut request: Request<RequestBody>,
    app_version: HttpVersion,
    limit: Option<Duration>,
) -> Result<Answered, Failed> {
    let within = |limit: Option<Duration>| limit.map_or(Duration::MAX, |l| l);
    match destination {
        Destination::Meshed { service, balancer } => {
            let Some(pending) = balancer.pick() else {
                return Err(Failed::NoEndpoints(service.clone()));
            };
            let endpoint = pending.endpoint().clone();
            super::requests::to_mesh(&mut request, calls.destination());
            let target = Target {
                addr: endpoint.addr,
                id: endpoint.id.clone(),
            };
            let sent =
                tokio::time::timeout(within(limit), calls.shared().pools.send(&target, request));
            let Ok(sent) = sent.await else {
                endpoint.report(Outcome::NoAnswer);
                return Err(Failed::TimedOut);
            };
            match sent {
                Ok(sent) => {
                    pending.answered_since(sent.written);
                    // A status in the trailers is reported when the body ends.
                    let outcome = head_outcome(sent.response.status(), sent.response.headers());
                    if let Some(outcome) = outcome {
                        endpoint.report(outcome);
                    }
                    Ok(Answered {
                        response: sent.response.map(boxed),
                        slot: Some(sent.slot),
                        endpoint: Some(endpoint),
                    })
                }
                Err(error) => {
                    endpoint.report(Outcome::NoAnswer);
                    let unsent = matches!(
                        error,
                        PoolError::Dial(_) | PoolError::Handshake { .. } | PoolError::NoCertificate
                    );
                    Err(Failed::Call {
                        error: error.into(),
                        endpoint: Some(endpoint),
                        unsent,
                    })
                }
            }
        }
        Destination::Plain { addr, .. } => tokio::time::timeout(
            within(limit),
            send_plain(calls, *addr, request, app_version),
        )
        .await
        .unwrap_or(Err(Failed::TimedOut)),
    }
}

/// One request in plain HTTP to a Service outside the mesh, on a connection of its own, in the
/// version the application spoke.
async fn send_plain(
    calls: &ServiceCalls,
    addr: SocketAddr,
    mut request: Request<RequestBody>,
    app_version: HttpVersion,
) -> Result<Answered, Failed> {
    let failed = |error, unsent| Failed::Call {
        error,
        endpoint: None,
        unsent,
    };
    let stream = dial::connect(addr, calls.shared().config.connect_timeout)
        .await
        .map_err(|e| failed(CallError::Plain(e.to_string()), true))?;
    let io = TokioIo::new(stream);
    let response = if app_version == HttpVersion::Http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| failed(CallError::Plain(e.to_string()), true))?;
        tokio::spawn(connection);
        *request.version_mut() = Version::HTTP_2;
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| failed(CallError::Plain(e.to_string()), true))?;
        tokio::spawn(connection);
        crate::l7::remove_hop_by_hop(request.headers_mut());
        *request.version_mut() = Version::HTTP_11;
        let origin = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = origin.parse::<Uri>() {
            *request.uri_mut() = uri;
        }
        sender.send_request(request).await
    };
    response
        .map(|response| Answered {
            response: response.map(boxed),
            slot: None,
            endpoint: None,
        })
        .map_err(|e| failed(CallError::Plain(e.to_string()), false))
}

/// The request's Host (or authority) without its port, and the port it names.
fn host_of(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => name,
        _ => host,
    }
}

/// Sets the request's Host (and its URI's authority, when it has one) to `host`.
fn set_host<B>(request: &mut Request<B>, host: &str) {
    if let Ok(value) = HeaderValue::from_str(host) {
        request.headers_mut().insert(header::HOST, value);
    }
    if request.uri().authority().is_some() {
        let mut parts = request.uri().clone().into_parts();
        if let Ok(authority) = host.parse() {
            parts.authority = Some(authority);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
}

/// Sets the request's path, keeping its query.
fn set_path<B>(request: &mut Request<B>, new_path: &str, query: Option<&str>) {
    let target = match query {
        Some(query) => format!("{new_path}?{query}"),
        None => new_path.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(path_and_query) = target.parse() {
        parts.path_and_query = Some(path_and_query);
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

/// Serves `request` by `rule` (see the module docs).
pub async fn dispatch(
    calls: &Arc<ServiceCalls>,
    rule: Rule,
    table: Arc<RouteTable>,
    mut request: Request<Incoming>,
    version: HttpVersion,
    tunnel: &TunnelSlot,
    mut facts: RequestFacts,
) -> Response<ResponseBody> {
    let started = Instant::now();
    facts.route = Some(rule.source().route());
    let grpc = rule.grpc;
    let timeouts = rule.timeouts();
    let deadline = timeouts.request.map(|d| started + d);
    // The path as normalized for matching is what goes on (and what rewrites work on).
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let normalized = path::normalize_target(target, calls.shared().config.path_normalization)
        .unwrap_or_else(|_| target.to_owned());
    let (mut req_path, query) = match normalized.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (normalized.clone(), None),
    };
    set_path(&mut request, &req_path, query.as_deref());

    let mut response_modifiers: Vec<HeaderModifier> = Vec::new();
    let mut mirrors = Vec::new();
    for filter in rule.filters() {
        match filter {
            Filter::RequestHeaders(modifier) => {
                filters::modify_headers(modifier, request.headers_mut())
            }
            Filter::ResponseHeaders(modifier) => response_modifiers.push(modifier.clone()),
            Filter::Redirect(redirect) => {
                let host = facts.host.clone();
                let url = filters::RequestUrl {
                    scheme: "http",
                    host: host_of(&host),
                    port: calls.destination().port(),
                    path: &req_path,
                    query: query.as_deref(),
                };
                let to = filters::redirect(redirect, &url, rule.matched_prefix.as_deref());
                let mut headers = http::HeaderMap::new();
                if let Ok(location) = HeaderValue::from_str(&to.location) {
                    headers.insert(header::LOCATION, location);
                }
                return calls.answer(to.status, headers, None, facts, "redirect");
            }
            Filter::Rewrite(rewrite) => {
                if let Some(hostname) = &rewrite.hostname {
                    set_host(&mut request, hostname);
                }
                if let Some(modifier) = &rewrite.path {
                    req_path =
                        filters::rewrite_path(modifier, &req_path, rule.matched_prefix.as_deref());
                    set_path(&mut request, &req_path, query.as_deref());
                }
            }
            Filter::Mirror(mirror) => {
                if mirror::chosen(mirror) {
                    mirrors.push(mirror.clone());
                }
            }
        }
    }

    let backends = rule.backends();
    let total = backends.total_weight();
    let picked = (total > 0)
        .then(|| backends.pick(random_below(total as usize) as u64))
        .flatten();
    let Some(picked) = picked else {
        let why = format!("no backend for {}", rule.describe());
        return calls.failure(
            grpc,
            StatusCode::INTERNAL_SERVER_ERROR,
            GRPC_UNAVAILABLE,
            &why,
            facts,
            "no_backend",
        );
    };
    let backend = match &picked.target {
        BackendTarget::Service(backend) => backend,
        BackendTarget::Invalid(why) => {
            warn!(route = %rule.describe(), why, "a request took an invalid backend's share; answered 500");
            let why = format!("invalid backend of {}", rule.describe());
            return calls.failure(
                grpc,
                StatusCode::INTERNAL_SERVER_ERROR,
                GRPC_UNAVAILABLE,
                &why,
                facts,
                "invalid_backend",
            );
        }
    };
    for filter in &picked.filters {
        match filter {
            Filter::RequestHeaders(modifier) => {
                filters::modify_headers(modifier, request.headers_mut())
            }
            Filter::ResponseHeaders(modifier) => response_modifiers.push(modifier.clone()),
            _ => {}
        }
    }
    let destination = match destination(calls, backend) {
        Ok(destination) => destination,
        Err(why) => {
            warn!(route = %rule.describe(), why, "a request's backend cannot be reached");
            return calls.failure(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                "backend unavailable",
                facts,
                "no_endpoints",
            );
        }
    };

    let switching = version == HttpVersion::Http1
        && (request.headers().contains_key(header::UPGRADE) || request.method() == Method::CONNECT);
    if switching {
        // Bytes after the switch cannot be repeated, nor timed per request: no retries.
        let Destination::Meshed { balancer, service } = &destination else {
            return calls.failure(
                false,
                StatusCode::BAD_GATEWAY,
                0,
                "protocol switch to a Service outside the mesh",
                facts,
                "upstream_failed",
            );
        };
        let Some(pending) = balancer.pick() else {
            super::no_endpoints(calls.metrics(), service, "503");
            return calls.failure(
                false,
                StatusCode::SERVICE_UNAVAILABLE,
                0,
                &format!("no ready endpoints for {service}"),
                facts,
                "no_endpoints",
            );
        };
        let endpoint = pending.endpoint().clone();
        return match Box::pin(calls.switch(request, &endpoint, tunnel)).await {
            Ok(response) => {
                pending.answered();
                calls.respond(
                    response.map(boxed),
                    version,
                    facts,
                    Some(endpoint),
                    None,
                    &response_modifiers,
                    None,
                )
            }
            Err(e) => {
                endpoint.report(Outcome::NoAnswer);
                warn!(error = %e, endpoint = %endpoint.addr, "a protocol switch to a Service endpoint failed; answered 502");
                calls.failure(
                    false,
                    StatusCode::BAD_GATEWAY,
                    0,
                    "upstream unavailable",
                    facts,
                    "upstream_failed",
                )
            }
        };
    }

    let (parts, body) = request.into_parts();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let mut body: RequestBody = CountedBody::new(body, request_bytes.clone()).boxed_unsync();
    for mirror in &mirrors {
        let head = mirror::Head {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
            host: &authority_of(&parts).unwrap_or_else(|| facts.host.clone()),
        };
        let timeout = timeouts.request.unwrap_or(mirror::DEFAULT_MIRROR_TIMEOUT);
        body = mirror::start(calls, mirror, &head, version, timeout, body);
    }

    let attempts = attempts(
        calls,
        &rule,
        &table,
        backend,
        &destination,
        parts,
        body,
        version,
    );
    let attempted = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, attempts).await.ok(),
        None => Some(attempts.await),
    };
    let Some((attempted, attempt_started)) = attempted else {
        let why = format!("request timeout ({})", rule.describe());
        let mut response = calls.failure(
            grpc,
            StatusCode::GATEWAY_TIMEOUT,
            GRPC_DEADLINE_EXCEEDED,
            &why,
            facts,
            sigil_proxy_api::metrics::RESULT_TIMEOUT,
        );
        response.body_mut().count_request_bytes(request_bytes);
        return response;
    };
    let mut response = match attempted {
        Ok(answered) => {
            let body_deadline = [
                deadline,
                timeouts.backend_request.map(|d| attempt_started + d),
            ]
            .into_iter()
            .flatten()
            .min();
            let timers = ResponseTimers::new(body_deadline, timeouts.idle);
            calls.respond(
                answered.response,
                version,
                facts,
                answered.endpoint,
                answered.slot,
                &response_modifiers,
                Some(timers),
            )
        }
        Err(Failed::NoEndpoints(service)) => {
            super::no_endpoints(calls.metrics(), &service, "503");
            let why = format!("no ready endpoints for {service}");
            calls.failure(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                &why,
                facts,
                "no_endpoints",
            )
        }
        Err(Failed::TimedOut) => {
            let why = format!("backend request timeout ({})", rule.describe());
            calls.failure(
                grpc,
                StatusCode::GATEWAY_TIMEOUT,
                GRPC_DEADLINE_EXCEEDED,
                &why,
                facts,
                sigil_proxy_api::metrics::RESULT_TIMEOUT,
            )
        }
        Err(Failed::Call {
            error, endpoint, ..
        }) => {
            calls.count_upstream_failure();
            warn!(error = %error, service = %destination.service(), endpoint = endpoint.as_ref().map(|e| e.addr.to_string()), "a routed request failed; answered 502");
            let mut response = calls.failure(
                grpc,
                StatusCode::BAD_GATEWAY,
                GRPC_UNAVAILABLE,
                "upstream unavailable",
                facts,
                "upstream_failed",
            );
            response.body_mut().set_endpoint(endpoint);
            response
        }
    };
    response.body_mut().count_request_bytes(request_bytes);
    response
}

fn empty_body() -> RequestBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn authority_of(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
}

/// The attempts of one request: the first, then retries as the rule's policy and the backend's
/// budget allow, each through the balancer again. Returns the last attempt's result and when
/// that attempt started.
#[allow(clippy::too_many_arguments)]
async fn attempts(
    calls: &Arc<ServiceCalls>,
    rule: &Rule,
    table: &RouteTable,
    backend: &Backend,
    destination: &Destination,
    parts: http::request::Parts,
    body: RequestBody,
    version: HttpVersion,
) -> (Result<Answered, Failed>, Instant) {
    let timeouts = rule.timeouts();
    let per_attempt = [timeouts.backend_request, timeouts.idle]
        .into_iter()
        .flatten()
        .min();
    let policy = rule.retry();
    // Without retries the client's body goes as it is, once.
    let (replay, mut single) = match policy {
        Some(_) => (Some(Replay::new(body)), None),
        None => (None, Some(body)),
    };
    let budget = policy.map(|_| {
        let service = ServiceRef {
            namespace: backend.service.namespace.clone(),
            name: backend.service.name.clone(),
        };
        let policy = table
            .routes
            .backends
            .get(&service)
            .map(|p| p.retry_budget.clone())
            .unwrap_or_default();
        let budget = calls.shared().retry_budgets.get(&service, &policy);
        budget.deposit();
        budget
    });
    let count = |outcome: RetryOutcome| {
        calls
            .metrics()
            .retries
            .get_or_create(&RetryLabels {
                service: destination.service().to_string(),
                route: rule.source().route(),
                outcome,
            })
            .inc();
    };
    // Every gRPC call is a POST: the statuses a gRPC policy names are the operator saying those
    // calls are safe to repeat (as gRPC's own retry policy reads them).
    let may_repeat =
        policy.is_some_and(|p| p.non_idempotent) || rule.grpc || retry::idempotent(&parts.method);
    let mut retries = 0;
    loop {
        let started = Instant::now();
        // A replay is asked for a body only while it is replayable, and a single body is
        // sent once: the empty body is never used.
        let body = match (&replay, single.take()) {
            (Some(replay), _) => replay.body().unwrap_or_else(empty_body),
            (None, Some(body)) => body,
            (None, None) => empty_body(),
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = parts.headers.clone();
        let result = send_once(calls, destination, request, version, per_attempt).await;
        let Some(policy) = policy else {
            return (result, started);
        };
        // Whether the policy names this result, and whether repeating it is safe.
        let (named, safe) = match &result {
            Ok(answered) => {
                let status = answered.response.status().as_u16();
                let grpc = grpc_status(answered.response.headers());
                (
                    retry::retried_answer(policy, rule.grpc, status, grpc),
                    may_repeat,
                )
            }
            Err(Failed::Call { unsent, .. }) => (true, *unsent || may_repeat),
            Err(Failed::TimedOut) => (true, may_repeat),
            Err(Failed::NoEndpoints(_)) => (false, false),
        };
        if !named || retries >= policy.attempts {
            return (result, started);
        }
        if !safe {
            count(RetryOutcome::NotRetryable);
            return (result, started);
        }
        if !replay.as_ref().is_some_and(Replay::replayable) {
            count(RetryOutcome::BodyTooLarge);
            return (result, started);
        }
        if !budget.as_ref().is_some_and(|b| b.try_withdraw()) {
            count(RetryOutcome::BudgetExhausted);
            return (result, started);
        }
        count(RetryOutcome::Sent);
        retries += 1;
        debug!(route = %rule.describe(), retry = retries, "retrying a request");
        drop(result);
        // The backoff is the least wait; up to half of it again spreads retries out.
        let wait = sigil_base::backoff::jitter(policy.backoff.mul_f64(1.25), 0.2);
        tokio::time::sleep(wait).await;
    }
}
