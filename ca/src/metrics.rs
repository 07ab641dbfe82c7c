//! The CA's Prometheus metrics (served on the admin port's `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_base::process_metrics::ProcessMetrics;

use crate::inject::SkipReason;

/// Which API a signing request came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Api {
    Sigil,
    Istio,
}

/// Why a signing request was refused (the audit log has the detail).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DenyReason {
    Unauthenticated,
    PermissionDenied,
    InvalidCsr,
    InvalidTtl,
    InvalidRequest,
    Unavailable,
    /// The caller's signing budget is spent (`--max-signs-per-caller`).
    RateLimited,
    Internal,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Sigil => "sigil",
            Api::Istio => "istio",
        }
    }
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Unauthenticated => "unauthenticated",
            DenyReason::PermissionDenied => "permission_denied",
            DenyReason::InvalidCsr => "invalid_csr",
            DenyReason::InvalidTtl => "invalid_ttl",
            DenyReason::InvalidRequest => "invalid_request",
            DenyReason::Unavailable => "unavailable",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::Internal => "internal",
        }
    }
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
        }
    }
}

sigil_base::label_value_as_str!(
    Api,
    DenyReason,
    CacheResult,
    InjectOutcome,
    SkipReason,
    Port,
    RefusedReason,
    BodyRefusedReason
);

/// Which TLS port a connection came to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Port {
    Grpc,
    Webhook,
}

impl Port {
    pub fn as_str(self) -> &'static str {
        match self {
            Port::Grpc => "grpc",
            Port::Webhook => "webhook",
        }
    }
}

/// Why a connection was closed for want of a slot (`tls_server::ConnectionLimits`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusedReason {
    /// Its address already had every unauthenticated slot it may have.
    PerSourceLimit,
    /// Every unauthenticated slot of the port was taken.
    UnauthenticatedLimit,
    /// It authenticated a call but every authenticated slot was taken.
    ConnectionLimit,
    /// No call on it authenticated in time.
    NotAuthenticatedInTime,
    /// It had not authenticated and was the oldest such when a new connection found every
    /// unauthenticated slot taken.
    Evicted,
}

impl RefusedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedReason::PerSourceLimit => "per_source_limit",
            RefusedReason::UnauthenticatedLimit => "unauthenticated_limit",
            RefusedReason::ConnectionLimit => "connection_limit",
            RefusedReason::NotAuthenticatedInTime => "not_authenticated_in_time",
            RefusedReason::Evicted => "evicted",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub port: Port,
    pub reason: RefusedReason,
}

/// Why the webhook refused a request body (`webhook::BodyBudget`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum BodyRefusedReason {
    /// Its address already had as many body bytes in flight as it may.
    PerSourceLimit,
    /// The webhook already had as many body bytes in flight as it may.
    TotalLimit,
    /// It did not arrive in time.
    ReadTimeout,
}

impl BodyRefusedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyRefusedReason::PerSourceLimit => "per_source_limit",
            BodyRefusedReason::TotalLimit => "total_limit",
            BodyRefusedReason::ReadTimeout => "read_timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BodyRefusedLabels {
    pub reason: BodyRefusedReason,
}

/// What the injection webhook did with one AdmissionReview.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum InjectOutcome {
    Injected,
    Skipped,
    Denied,
    Malformed,
}

impl InjectOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            InjectOutcome::Injected => "injected",
            InjectOutcome::Skipped => "skipped",
            InjectOutcome::Denied => "denied",
            InjectOutcome::Malformed => "malformed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectLabels {
    pub outcome: InjectOutcome,
    /// Why a pod was admitted unchanged (empty for the other outcomes).
    pub reason: Option<SkipReason>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: Api,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    pub api: Api,
    pub reason: DenyReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub result: CacheResult,
}

pub struct Metrics {
    pub issued: Family<ApiLabels, Counter>,
    pub denied: Family<DenyLabels, Counter>,
    pub sign_duration: Histogram,
    pub root_expiry: Gauge,
    pub intermediate_expiry: Gauge,
    pub bundle_roots: Gauge,
    pub token_cache: Family<CacheLabels, Counter>,
    pub key_source_errors: Counter,
    pub bundle_watchers: Gauge,
    pub tls_handshake_failures: Counter,
    pub policy_status_writes: Counter,
    pub policy_status_write_failures: Counter,
    pub injections: Family<InjectLabels, Counter>,
    pub webhook_ca_bundle_writes: Counter,
    pub webhook_ca_bundle_write_failures: Counter,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub webhook_bodies_refused: Family<BodyRefusedLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            issued: Family::default(),
            denied: Family::default(),
            sign_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            root_expiry: Gauge::default(),
            intermediate_expiry: Gauge::default(),
            bundle_roots: Gauge::default(),
            token_cache: Family::default(),
            key_source_errors: Counter::default(),
            bundle_watchers: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            policy_status_writes: Counter::default(),
            policy_status_write_failures: Counter::default(),
            injections: Family::default(),
            webhook_ca_bundle_writes: Counter::default(),
            webhook_ca_bundle_write_failures: Counter::default(),
            connections_refused: Family::default(),
            webhook_bodies_refused: Family::default(),
        };
        registry.register_collector(Box::new(ProcessMetrics::default()));
        let r = registry.sub_registry_with_prefix("sigil_ca");
        r.register(
            "certs_issued",
            "Certificates issued",
            metrics.issued.clone(),
        );
        r.register(
            "sign_denied",
            "Signing requests refused, by reason",
            metrics.denied.clone(),
        );
        r.register(
            "sign_duration_seconds",
            "Time to authenticate, authorize and sign one request",
            metrics.sign_duration.clone(),
        );
        r.register(
            "root_expiry_timestamp_seconds",
            "NotAfter (unix seconds) of the root the signing key chains to",
            metrics.root_expiry.clone(),
        );
        r.register(
            "intermediate_expiry_timestamp_seconds",
            "NotAfter (unix seconds) of the plug-in intermediate that signs (0 in self-signed mode)",
            metrics.intermediate_expiry.clone(),
        );
        r.register(
            "trust_bundle_roots",
            "Roots in the trust bundle",
            metrics.bundle_roots.clone(),
        );
        r.register(
            "token_review_cache",
            "Service-account token validations answered from the cache (hit) or not (miss)",
            metrics.token_cache.clone(),
        );
        r.register(
            "key_source_errors",
            "Failures to load or refresh the signing key (state store or plug-in files)",
            metrics.key_source_errors.clone(),
        );
        r.register(
            "trust_bundle_watchers",
            "Open WatchTrustBundle streams",
            metrics.bundle_watchers.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes on the gRPC and webhook ports that failed or timed out (debug logs say why)",
            metrics.tls_handshake_failures.clone(),
        );
        r.register(
            "policy_status_writes",
            "Status condition updates of AuthorizationPolicy and PeerAuthentication objects",
            metrics.policy_status_writes.clone(),
        );
        r.register(
            "policy_status_write_failures",
            "Failed status condition updates of policy objects (retried)",
            metrics.policy_status_write_failures.clone(),
        );
        r.register(
            "injections",
            "AdmissionReviews answered by the injection webhook, by outcome (and why skipped)",
            metrics.injections.clone(),
        );
        r.register(
            "webhook_ca_bundle_writes",
            "Updates of the MutatingWebhookConfiguration's caBundle to the current trust bundle",
            metrics.webhook_ca_bundle_writes.clone(),
        );
        r.register(
            "webhook_ca_bundle_write_failures",
            "Failed caBundle updates (retried)",
            metrics.webhook_ca_bundle_write_failures.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed for want of a connection slot or for not authenticating in time, by port and reason",
            metrics.connections_refused.clone(),
        );
        r.register(
            "webhook_bodies_refused",
            "AdmissionReview bodies refused by the webhook before or while reading them, by reason",
            metrics.webhook_bodies_refused.clone(),
        );
        metrics
    }
}
