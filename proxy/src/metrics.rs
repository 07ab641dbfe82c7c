//! The proxy's Prometheus metrics (served on --metrics-addr): connections by direction and
//! security mode, bytes, TLS handshakes by key exchange group and failures by reason, upstream
//! failures, the certificate's expiry and the health of the agent feeds; per HTTP request the golden metrics (requests by
//! status, latency, body bytes, by peer workload and destination Service) and the balancers'
//! state per Service.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sigil_base::process_metrics::ProcessMetrics;
use sigil_identity::SpiffeId;
use sigil_proxy_api::metrics as names;
use sigil_proxy_api::services::ServiceKey;

use crate::tls::HandshakeFailure;
use crate::trace::TraceMetrics;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => names::DIRECTION_INBOUND,
            Direction::Outbound => names::DIRECTION_OUTBOUND,
        }
    }
}

/// How a connection's bytes were carried between the pods.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS with a verified SPIFFE ID on the other side.
    Mtls,
    /// Inbound plaintext let in by PERMISSIVE or DISABLE.
    Plaintext,
    /// Outbound to a destination outside the mesh, forwarded untouched.
    Passthrough,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Mtls => "mtls",
            Security::Plaintext => "plaintext",
            Security::Passthrough => "passthrough",
        }
    }
}

/// Which way bytes flowed: from the side that opened the connection, or back to it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flow {
    DownstreamToUpstream,
    UpstreamToDownstream,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::DownstreamToUpstream => "downstream_to_upstream",
            Flow::UpstreamToDownstream => "upstream_to_downstream",
        }
    }
}

/// Where an authorization decision was made: once per connection, or per HTTP request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Layer {
    L4,
    L7,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::L4 => "l4",
            Layer::L7 => "l7",
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow,
    Deny,
}

impl AuthzDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzDecision::Allow => "allow",
            AuthzDecision::Deny => "deny",
        }
    }
}

sigil_base::label_value_as_str!(
    Direction,
    Security,
    Flow,
    HandshakeFailure,
    Layer,
    AuthzDecision
);

/// `policy` is the deciding policy (`namespace/name`, or `default`): bounded by the number of
/// policies that apply to this workload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: AuthzDecision,
    pub policy: String,
    pub layer: Layer,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    pub security: Security,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub flow: Flow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    pub reason: HandshakeFailure,
}

/// `key_exchange` is the agreed group's name from the fixed set of
/// [`sigil_identity::tls::key_exchange_group`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyExchangeLabels {
    pub direction: Direction,
    pub key_exchange: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// The workload on the other side of a request and, outbound, the Service it was sent to and the
/// route that served it: what every golden metric is broken down by. Bounded by the workloads,
/// Services and route objects this one talks to (never paths or addresses). Shared strings: a request's label sets are cloned per request
/// (each golden metric's family is looked up with them), so a clone must not allocate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub direction: Direction,
    /// Outbound: the destination Service, `<namespace>/<name>`; inbound, or outbound to a
    /// destination that is no meshed Service: empty.
    pub service: Arc<str>,
    /// Outbound: the HTTPRoute or GRPCRoute whose rule served the request, `<namespace>/<name>`;
    /// empty when no route applied, and inbound.
    pub route: Arc<str>,
    /// From the peer's verified SPIFFE ID (`/ns/<ns>/sa/<sa>`); empty for a plaintext peer or
    /// an ID of another shape.
    pub peer_namespace: Arc<str>,
    pub peer_service_account: Arc<str>,
}

impl PeerLabels {
    pub fn new(
        direction: Direction,
        service: Option<&ServiceKey>,
        peer: Option<&SpiffeId>,
    ) -> Self {
        let (namespace, service_account) =
            peer.and_then(SpiffeId::service_account).unwrap_or_default();
        PeerLabels {
            direction,
            service: service.map(ToString::to_string).unwrap_or_default().into(),
            route: Arc::default(),
            peer_namespace: namespace.into(),
            peer_service_account: service_account.into(),
        }
    }

    /// These labels with the route (`<namespace>/<name>`) that served the request, if one did.
    pub fn with_route(mut self, route: Option<&str>) -> Self {
        if let Some(route) = route {
            self.route = route.into();
        }
        self
    }
}

/// [`PeerLabels`] and the response's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peer: PeerLabels,
    /// `2xx`, `5xx`...
    pub status_class: &'static str,
    pub status_code: u16,
    /// The response's `grpc-status` (trailer, or header of a trailers-only response); empty
    /// for a response that is not gRPC.
    pub grpc_status: Option<u32>,
    /// How the request ended, [`RequestOutcome::result`].
    pub result: &'static str,
}

/// [`PeerLabels`] and the status class (the latency histogram leaves out the code, to bound
/// its series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    #[prometheus(flatten)]
    pub peer: PeerLabels,
    pub status_class: &'static str,
}

/// A destination Service's balancer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// A balancer's endpoints by state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    /// `ready` (takes new requests), `draining` (terminating, unready or removed: finishes
    /// what it has) or `ejected` (those of the ready ones that outlier detection holds out).
    pub state: &'static str,
}

/// Why a destination Service's endpoint was ejected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: String,
    /// `consecutive`, `gateway` or `rate`.
    pub reason: &'static str,
}

/// A refusal by a local rate limit (ratelimit, issue 15): no client label, to stay bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// `<namespace>/<name>` of the RateLimitPolicy.
    pub policy: String,
    /// `total`, `identity` or `override`.
    pub scope: &'static str,
}

/// Upper bounds of the request latency histogram, seconds: 1 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One finished HTTP request, as the golden metrics count it.
pub struct RequestOutcome {
    pub peer: PeerLabels,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Outbound: `ok` for an answer passed on from the backend; else what the proxy answered
    /// itself, and why (`timeout`: a route timeout, 504 before the response head, the
    /// backend's status after it, the response cut short; `no_endpoints`, `upstream_failed`,
    /// `no_route`, `bad_request`, `redirect`, `no_backend`, `invalid_backend`), the same word
    /// as the access log's `result`. Inbound: the inbound access log's word, `allowed` for a
    /// request the application answered, else the proxy's own answer (`denied`,
    /// `rate_limited`, `bad_request`, `upstream_failed`). A bounded set either way.
    pub result: &'static str,
    pub duration: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// `2xx` for 200 and so on.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => names::STATUS_CLASS_SERVER_ERROR,
    }
}

// proxy-routing (issue 15): labels of the retry and mirror counters.
/// Retries of routed requests, by backend Service, route (`<namespace>/<name>` of the
/// HTTPRoute/GRPCRoute) and what became of each retry the policy named.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub route: String,
    pub outcome: crate::outbound::RetryOutcome,
}

/// Mirrored copies by mirror backend Service and outcome (`sent`, `dropped`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub service: String,
    pub outcome: &'static str,
}

pub struct Metrics {
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub connections_active: Family<ConnectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub handshakes: Family<KeyExchangeLabels, Counter>,
    pub upstream_failures: Family<DirectionLabels, Counter>,
    pub cert_expiry: Gauge,
    pub cert_updates: Counter,
    pub cert_expired: Counter,
    pub sds_connected: Gauge,
    pub sds_reconnects: Counter,
    pub mesh_members: Gauge,
    pub mesh_reconnects: Counter,
    pub services_reconnects: Counter,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub policy_updates: Counter,
    pub policy_reconnects: Counter,
    pub policies_rejected: Gauge,
    pub http_bad_requests: Counter,
    pub connections_over_limit: Counter,
    pub idle_timeouts: Family<DirectionLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<LatencyLabels, Histogram>,
    pub request_bytes: Family<PeerLabels, Counter>,
    pub response_bytes: Family<PeerLabels, Counter>,
    pub balancer_endpoints: Family<EndpointLabels, Gauge>,
    pub balancer_pending: Family<ServiceLabels, Gauge>,
    pub no_endpoints: Family<ServiceLabels, Counter>,
    pub detect_timeouts: Family<DirectionLabels, Counter>,
    // outlier (issue 15, circuit breaking)
    pub endpoint_ejections: Family<EjectionLabels, Counter>,
    pub endpoint_readmissions: Family<ServiceLabels, Counter>,
    // ratelimit (issue 15): local rate limits on inbound requests.
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    // proxy-routing (issue 15)
    pub retries: Family<RetryLabels, Counter>,
    pub mirrored_requests: Family<MirrorLabels, Counter>,
    pub route_updates_rejected: Counter,
    pub routes_reconnects: Counter,
    // tracing (s23-tcore): the span exporter's counters (crate::trace::export).
    pub trace: TraceMetrics,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_active: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            handshakes: Family::default(),
            upstream_failures: Family::default(),
            cert_expiry: Gauge::default(),
            cert_updates: Counter::default(),
            cert_expired: Counter::default(),
            sds_connected: Gauge::default(),
            sds_reconnects: Counter::default(),
            mesh_members: Gauge::default(),
            mesh_reconnects: Counter::default(),
            services_reconnects: Counter::default(),
            authz_decisions: Family::default(),
            policy_updates: Counter::default(),
            policy_reconnects: Counter::default(),
            policies_rejected: Gauge::default(),
            http_bad_requests: Counter::default(),
            connections_over_limit: Counter::default(),
            idle_timeouts: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS.iter().copied())
            }),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            balancer_endpoints: Family::default(),
            balancer_pending: Family::default(),
            no_endpoints: Family::default(),
            detect_timeouts: Family::default(),
            // outlier (issue 15, circuit breaking)
            endpoint_ejections: Family::default(),
            endpoint_readmissions: Family::default(),
            // ratelimit (issue 15).
            rate_limited: Family::default(),
            // proxy-routing (issue 15)
            retries: Family::default(),
            mirrored_requests: Family::default(),
            route_updates_rejected: Counter::default(),
            routes_reconnects: Counter::default(),
            // tracing (s23-tcore)
            trace: TraceMetrics::default(),
        };
        registry.register_collector(Box::new(ProcessMetrics::default()));
        let r = registry.sub_registry_with_prefix(names::PREFIX);
        r.register(
            "connections_opened",
            "Connections accepted and established, by direction and security",
            metrics.connections_opened.clone(),
        );
        r.register(
            "connections_closed",
            "Established connections that ended, by direction and security",
            metrics.connections_closed.clone(),
        );
        r.register(
            names::CONNECTIONS_ACTIVE,
            "Established connections open now",
            metrics.connections_active.clone(),
        );
        r.register(
            "bytes",
            "Bytes forwarded, counted when a connection closes",
            metrics.bytes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Connections refused before any byte was forwarded, by reason (handshakes, plaintext \
             in STRICT, a server with the wrong identity, no certificate or membership yet)",
            metrics.handshake_failures.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes completed, by direction and the key exchange group agreed \
             (X25519MLKEM768: post-quantum hybrid); a peer refused after its handshake (wrong \
             identity) is also in tls_handshake_failures",
            metrics.handshakes.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Upstreams (the app inbound, the destination outbound) that could not be reached",
            metrics.upstream_failures.clone(),
        );
        r.register(
            "cert_expiry_timestamp_seconds",
            "NotAfter of the certificate the proxy presents (0 before the first one)",
            metrics.cert_expiry.clone(),
        );
        r.register(
            "cert_updates",
            "Certificates or trust bundles received from the agent and put in use",
            metrics.cert_updates.clone(),
        );
        r.register(
            "cert_expired",
            "Certificates that expired while the proxy presented them, no renewal having arrived \
             (every mTLS connection fails until one does)",
            metrics.cert_expired.clone(),
        );
        r.register(
            "sds_connected",
            "1 while the SDS stream to the agent is open",
            metrics.sds_connected.clone(),
        );
        r.register(
            "sds_reconnects",
            "Times the SDS stream to the agent was lost and re-opened",
            metrics.sds_reconnects.clone(),
        );
        r.register(
            "mesh_members",
            "Meshed addresses known from the agent (transparent mode)",
            metrics.mesh_members.clone(),
        );
        r.register(
            "mesh_reconnects",
            "Times the mesh membership stream to the agent was lost and re-opened",
            metrics.mesh_reconnects.clone(),
        );
        r.register(
            "services_reconnects",
            "Times the meshed Services stream to the agent was lost and re-opened",
            metrics.services_reconnects.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions by result, deciding policy and layer (l4: per connection, \
             l7: per HTTP request)",
            metrics.authz_decisions.clone(),
        );
        r.register(
            "policy_updates",
            "Policy sets received from the agent and put in force",
            metrics.policy_updates.clone(),
        );
        r.register(
            "policy_reconnects",
            "Times the policy stream to the agent was lost and re-opened",
            metrics.policy_reconnects.clone(),
        );
        r.register(
            "policies_rejected",
            "Policies in the current set that did not validate and are enforced fail-closed",
            metrics.policies_rejected.clone(),
        );
        r.register(
            "http_bad_requests",
            "HTTP requests answered 400 before authorization: a path that cannot be normalized, \
             an ambiguous Host, userinfo, a method that is not upper-case",
            metrics.http_bad_requests.clone(),
        );
        r.register(
            "connections_over_limit",
            "Inbound connections closed at accept because --max-inbound-connections were open",
            metrics.connections_over_limit.clone(),
        );
        r.register(
            "idle_timeouts",
            "Connections closed for carrying no byte for --idle-timeout, or for not finishing a \
             request head within --header-read-timeout",
            metrics.idle_timeouts.clone(),
        );
        r.register(
            names::REQUESTS,
            "HTTP and gRPC requests answered, by direction, destination Service (outbound), peer \
             workload, status class and code, and gRPC status",
            metrics.requests.clone(),
        );
        r.register_with_unit(
            names::REQUEST_DURATION,
            "From a request's head to its response's head, by direction, destination Service, peer \
             workload and status class",
            prometheus_client::registry::Unit::Seconds,
            metrics.request_duration.clone(),
        );
        r.register_with_unit(
            "request_body",
            "Request body bytes, by direction, destination Service and peer workload",
            prometheus_client::registry::Unit::Bytes,
            metrics.request_bytes.clone(),
        );
        r.register_with_unit(
            "response_body",
            "Response body bytes, by direction, destination Service and peer workload",
            prometheus_client::registry::Unit::Bytes,
            metrics.response_bytes.clone(),
        );
        r.register(
            "balancer_endpoints",
            "A destination Service's endpoints in its balancer: ready (takes new requests per \
             the Service's endpoints), draining (finishes what it has), ejected (of the ready \
             ones, held out by outlier detection)",
            metrics.balancer_endpoints.clone(),
        );
        r.register(
            "balancer_pending_requests",
            "Requests and opaque connections sent to a destination Service's endpoints and not \
             answered yet",
            metrics.balancer_pending.clone(),
        );
        r.register(
            "no_endpoints",
            "Requests and connections to a meshed Service refused at once (503) because it had no \
             ready endpoint",
            metrics.no_endpoints.clone(),
        );
        r.register(
            "protocol_detect_timeouts",
            "Connections on a port with no declared protocol whose client sent too little to tell \
             its protocol within the detection timeout, forwarded as opaque TCP",
            metrics.detect_timeouts.clone(),
        );
        // outlier (issue 15, circuit breaking)
        r.register(
            "endpoint_ejections",
            "Endpoints of a destination Service ejected by its outlier detection, by reason: \
             consecutive (failures in a row, or a failed probe), gateway (502, 503, 504 or no \
             answer in a row), rate (failure percentage of an interval)",
            metrics.endpoint_ejections.clone(),
        );
        r.register(
            "endpoint_readmissions",
            "Ejected endpoints of a destination Service taken back after a successful probe \
             request",
            metrics.endpoint_readmissions.clone(),
        );
        // ratelimit (issue 15).
        r.register(
            "rate_limited",
            "Inbound requests refused by a RateLimitPolicy (answered 429, or gRPC \
             RESOURCE_EXHAUSTED), by Service, policy and the bucket that was empty: total, \
             identity (the client's own) or override",
            metrics.rate_limited.clone(),
        );
        // proxy-routing (issue 15)
        r.register(
            names::RETRIES,
            "Retries of routed requests by backend Service, route and outcome: sent, or not sent \
             because the backend's retry budget was spent (budget_exhausted), the request may not \
             be repeated (not_retryable) or its body passed the retry buffer (body_too_large)",
            metrics.retries.clone(),
        );
        r.register(
            names::MIRRORED_REQUESTS,
            "Copies of routed requests sent to a RequestMirror backend, by mirror Service and \
             outcome: sent (answered, the answer dropped), dropped (the mirror fell behind the \
             primary, which went on), failed",
            metrics.mirrored_requests.clone(),
        );
        r.register(
            "route_updates_rejected",
            "Route updates from the agent refused whole for an invalid entry (the last table \
             stays in force)",
            metrics.route_updates_rejected.clone(),
        );
        r.register(
            "routes_reconnects",
            "Times the routes stream to the agent was lost and re-opened",
            metrics.routes_reconnects.clone(),
        );
        // tracing (s23-tcore)
        r.register(
            "trace_spans_exported",
            "Spans the collector accepted",
            metrics.trace.spans_exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans not exported, by reason: queue_full (the exporter fell behind; the request \
             went on), export_failed (the collector failed or timed out, or the exporter was \
             backing off after a failure), rejected (the collector's partial success), shutdown \
             (still queued when the proxy stopped)",
            metrics.trace.spans_dropped.clone(),
        );
        r.register(
            "trace_exports",
            "Export requests sent to the collector, by result (ok, error)",
            metrics.trace.exports.clone(),
        );
        r.register_with_unit(
            "trace_export_duration",
            "Time one export request took, up to --trace-export-timeout",
            prometheus_client::registry::Unit::Seconds,
            metrics.trace.export_duration.clone(),
        );
        r.register(
            "trace_queue_spans",
            "Spans waiting in the exporter's queue",
            metrics.trace.queue_spans.clone(),
        );
        metrics
    }

    /// Counts one finished HTTP request in the golden metrics.
    pub fn record_request(&self, outcome: &RequestOutcome) {
        let class = status_class(outcome.status);
        self.requests
            .get_or_create(&RequestLabels {
                peer: outcome.peer.clone(),
                status_class: class,
                status_code: outcome.status,
                grpc_status: outcome.grpc_status,
                result: outcome.result,
            })
            .inc();
        self.request_duration
            .get_or_create(&LatencyLabels {
                peer: outcome.peer.clone(),
                status_class: class,
            })
            .observe(outcome.duration.as_secs_f64());
        self.request_bytes
            .get_or_create(&outcome.peer)
            .inc_by(outcome.request_bytes);
        self.response_bytes
            .get_or_create(&outcome.peer)
            .inc_by(outcome.response_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_metrics_are_labelled_by_peer_workload_and_status() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let service = ServiceKey::new("shop", "api");
        metrics.record_request(&RequestOutcome {
            peer: PeerLabels::new(Direction::Outbound, Some(&service), Some(&peer))
                .with_route(Some("shop/api-canary")),
            status: 200,
            grpc_status: Some(0),
            result: "ok",
            duration: std::time::Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
        });
        // Spelled with the names `sigil stat` queries: a renamed field or metric fails here.
        use names::*;
        let labels = format!(
            "{DIRECTION}=\"{DIRECTION_OUTBOUND}\",{SERVICE}=\"shop/api\",\
             {ROUTE}=\"shop/api-canary\",{PEER_NAMESPACE}=\"shop\",{PEER_SERVICE_ACCOUNT}=\"web\""
        );
        metrics
            .connections_active
            .get_or_create(&ConnectionLabels {
                direction: Direction::Inbound,
                security: Security::Mtls,
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            format!(
                "{REQUESTS_SERIES}{{{labels},{STATUS_CLASS}=\"2xx\",{STATUS_CODE}=\"200\",\
                 {GRPC_STATUS}=\"{GRPC_STATUS_OK}\",{RESULT}=\"{RESULT_OK}\"}} 1"
            ),
            format!(
                "{REQUEST_DURATION_BUCKET_SERIES}{{le=\"0.005\",{labels},{STATUS_CLASS}=\"2xx\"}} 1"
            ),
            format!("sigil_proxy_request_body_bytes_total{{{labels}}} 10"),
            format!("sigil_proxy_response_body_bytes_total{{{labels}}} 20"),
            format!(
                "{CONNECTIONS_ACTIVE_SERIES}{{{DIRECTION}=\"{DIRECTION_INBOUND}\",security=\"mtls\"}} 1"
            ),
        ] {
            assert!(text.contains(&series), "{series} not in\n{text}");
        }
    }
}
