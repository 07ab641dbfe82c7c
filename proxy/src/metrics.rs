//! The proxy's Prometheus metrics (served on --metrics-addr): connections by direction and
//! security mode, bytes, TLS handshake failures by reason, upstream failures, the certificate's
//! expiry and the health of the agent feeds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::tls::HandshakeFailure;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

pub struct Metrics {
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub connections_active: Family<ConnectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub upstream_failures: Family<DirectionLabels, Counter>,
    pub cert_expiry: Gauge,
    pub cert_updates: Counter,
    pub cert_expired: Counter,
    pub sds_connected: Gauge,
    pub sds_reconnects: Counter,
    pub mesh_members: Gauge,
    pub mesh_reconnects: Counter,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub policy_updates: Counter,
    pub policy_reconnects: Counter,
    pub policies_rejected: Gauge,
    pub http_bad_requests: Counter,
    pub connections_over_limit: Counter,
    pub idle_timeouts: Family<DirectionLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_active: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            upstream_failures: Family::default(),
            cert_expiry: Gauge::default(),
            cert_updates: Counter::default(),
            cert_expired: Counter::default(),
            sds_connected: Gauge::default(),
            sds_reconnects: Counter::default(),
            mesh_members: Gauge::default(),
            mesh_reconnects: Counter::default(),
            authz_decisions: Family::default(),
            policy_updates: Counter::default(),
            policy_reconnects: Counter::default(),
            policies_rejected: Gauge::default(),
            http_bad_requests: Counter::default(),
            connections_over_limit: Counter::default(),
            idle_timeouts: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("sigil_proxy");
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
            "connections_active",
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
        metrics
    }
}
