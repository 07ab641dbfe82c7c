//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_base::process_metrics::ProcessMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Which API on the agent socket.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SocketApi {
    Sds,
    WorkloadApi,
    Mesh,
    Services,
    Policy,
    Routes,
}

impl SocketApi {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketApi::Sds => "sds",
            SocketApi::WorkloadApi => "workload_api",
            SocketApi::Mesh => "mesh",
            SocketApi::Services => "services",
            SocketApi::Policy => "policy",
            SocketApi::Routes => "routes",
        }
    }
}

sigil_base::label_value_as_str!(SocketApi, RefusedReason);

/// Why an agent-socket connection was closed by the agent's limits (`peer::ConnectionSlots`,
/// `h2_authority`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusedReason {
    /// Its process already held every connection one process may.
    PerProcessLimit,
    /// Every connection slot of the socket was taken.
    ConnectionLimit,
    /// It did not finish its preface or a header block in time.
    HeaderTimeout,
    /// It sent a header block larger than the agent accepts.
    HeaderTooLarge,
}

impl RefusedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedReason::PerProcessLimit => "per_process_limit",
            RefusedReason::ConnectionLimit => "connection_limit",
            RefusedReason::HeaderTimeout => "header_timeout",
            RefusedReason::HeaderTooLarge => "header_too_large",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: RefusedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: SocketApi,
}

pub struct Metrics {
    pub cert_expiry: Family<IdentityLabels, Gauge>,
    pub csr_duration: Histogram,
    pub csr_failures: Family<IdentityLabels, Counter>,
    pub identities: Gauge,
    pub streams: Family<ApiLabels, Gauge>,
    pub pushes: Family<ApiLabels, Counter>,
    pub nacks: Counter,
    pub attestation_failures: Counter,
    pub mesh_members: Gauge,
    pub mesh_services: Gauge,
    pub mesh_file_reload_failures: Counter,
    pub policy_objects: Gauge,
    pub policy_file_reload_failures: Counter,
    pub connections_refused: Family<RefusedLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            cert_expiry: Family::default(),
            csr_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            csr_failures: Family::default(),
            identities: Gauge::default(),
            streams: Family::default(),
            pushes: Family::default(),
            nacks: Counter::default(),
            attestation_failures: Counter::default(),
            mesh_members: Gauge::default(),
            mesh_services: Gauge::default(),
            mesh_file_reload_failures: Counter::default(),
            policy_objects: Gauge::default(),
            policy_file_reload_failures: Counter::default(),
            connections_refused: Family::default(),
        };
        registry.register_collector(Box::new(ProcessMetrics::default()));
        let r = registry.sub_registry_with_prefix("sigil_agent");
        r.register(
            "cert_expiry_timestamp_seconds",
            "NotAfter (unix seconds) of the certificate held for each identity",
            metrics.cert_expiry.clone(),
        );
        r.register(
            "csr_duration_seconds",
            "Time for one signing request to the CA, successful or not",
            metrics.csr_duration.clone(),
        );
        r.register(
            "csr_failures",
            "Signing requests that failed, per identity (logs say why)",
            metrics.csr_failures.clone(),
        );
        r.register(
            "identities",
            "Identities the agent currently keeps certificates for",
            metrics.identities.clone(),
        );
        r.register(
            "streams",
            "Open streams on the agent socket, by API",
            metrics.streams.clone(),
        );
        r.register(
            "pushes",
            "Responses pushed on streams (first answers, rotations, bundle changes), by API",
            metrics.pushes.clone(),
        );
        r.register(
            "sds_nacks",
            "SDS responses Envoy rejected (NACK)",
            metrics.nacks.clone(),
        );
        r.register(
            "attestation_failures",
            "Callers on the agent socket that could not be attested (logs say why)",
            metrics.attestation_failures.clone(),
        );
        r.register(
            "mesh_members",
            "Meshed addresses in the current mesh membership",
            metrics.mesh_members.clone(),
        );
        r.register(
            "mesh_services",
            "Meshed Services (every endpoint meshed) served to proxies for load balancing",
            metrics.mesh_services.clone(),
        );
        r.register(
            "mesh_file_reload_failures",
            "Times --mesh-file became unreadable or invalid; its last good members were kept (logs say why)",
            metrics.mesh_file_reload_failures.clone(),
        );
        r.register(
            "policy_objects",
            "AuthorizationPolicy and PeerAuthentication objects known to the policy feed, from every source",
            metrics.policy_objects.clone(),
        );
        r.register(
            "policy_file_reload_failures",
            "Times --policy-file became unreadable or invalid; its last good objects were kept (logs say why)",
            metrics.policy_file_reload_failures.clone(),
        );
        r.register(
            "connections_refused",
            "Agent-socket connections refused or closed by the agent's limits, by reason",
            metrics.connections_refused.clone(),
        );
        metrics
    }
}

/// Counts a stream in `sigil_agent_streams{api}` while it lives, however it ends.
pub struct OpenStream(Gauge);

impl OpenStream {
    pub fn new(metrics: &Metrics, api: SocketApi) -> OpenStream {
        let gauge = metrics.streams.get_or_create(&ApiLabels { api }).clone();
        gauge.inc();
        OpenStream(gauge)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}
