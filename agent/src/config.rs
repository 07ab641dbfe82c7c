//! `sigil agent run` configuration: every flag, its default (named consts) and its meaning,
//! parsed once and printed at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use sigil_base::flags::parse_duration;
use sigil_identity::profile::{parse_host_port, parse_server_name};
use sigil_identity::spiffe::DEFAULT_TRUST_DOMAIN;
use sigil_identity::tls::KeyExchange;
use sigil_proxy_api::AGENT_SOCKET;

pub const DEFAULT_CA_ADDR: &str = "sigil-ca.sigil-system.svc:15012";
pub const DEFAULT_CA_NAME: &str = "sigil-ca.sigil-system.svc";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15021";
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/sigil-ca/token";
pub const DEFAULT_CERT_TTL: &str = "24h";
pub const DEFAULT_PROC_ROOT: &str = "/proc";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttestorKind {
    /// Pods: caller's PID → cgroup → pod UID → this node's pods (needs --node-name and the API).
    K8s,
    /// Hosts without Kubernetes: --unix-map maps uid (and optionally executable path) to an ID.
    Unix,
}

/// Runs the node agent.
#[derive(Args, Clone, Debug)]
pub struct AgentConfig {
    /// SPIFFE trust domain.
    #[arg(long, env = "SIGIL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The CA's address (host:port).
    #[arg(long = "ca", default_value = DEFAULT_CA_ADDR, value_parser = parse_host_port)]
    pub ca_addr: String,

    /// The name the CA's serving certificate must carry.
    #[arg(long, default_value = DEFAULT_CA_NAME, value_parser = parse_server_name)]
    pub ca_name: String,

    /// PEM roots that authenticate the CA at start (the `sigil-ca-root` ConfigMap's
    /// root-cert.pem); after that the bundle follows the CA's WatchTrustBundle stream.
    #[arg(long)]
    pub ca_bundle: PathBuf,

    /// The agent's projected service-account token (audience sigil-ca), re-read on every request.
    #[arg(long, default_value = DEFAULT_TOKEN_FILE, conflicts_with = "client_cert")]
    pub token_file: PathBuf,

    /// Hosts without Kubernetes: the agent's certificate from `sigil ca issue` (renewed by the
    /// agent itself before it expires); use with --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// Key exchange of every TLS connection the agent makes (to the CA, the Kubernetes API):
    /// `hybrid` offers and prefers X25519MLKEM768 (X25519 with the post-quantum ML-KEM-768,
    /// against traffic recorded now and decrypted later) and falls back to X25519, P-256,
    /// P-384; `classical` offers only X25519, P-256, P-384 (FIPS-only or legacy environments).
    #[arg(long, value_enum, env = "SIGIL_TLS_KEY_EXCHANGE", default_value_t = KeyExchange::Hybrid)]
    pub tls_key_exchange: KeyExchange,

    /// The Unix socket serving SDS and the SPIFFE Workload API (mode 0666; share the directory
    /// with pods through a hostPath).
    #[arg(long, default_value = AGENT_SOCKET)]
    pub socket: PathBuf,

    /// How callers are attested.
    #[arg(long, value_enum, default_value_t = AttestorKind::K8s)]
    pub attestor: AttestorKind,

    /// With --attestor unix: `workloads: [{uid: 1000, path: /usr/bin/envoy, id: spiffe://...,
    /// labels: {app: web}}]`; `path` and `labels` are optional. The labels are what
    /// authorization policy selectors (`spec.selector.matchLabels`) match for that workload, as a
    /// pod's labels do in Kubernetes; its namespace is the one in an `/ns/<ns>/sa/<sa>` ID (other
    /// IDs get only the mesh-wide policies of sigil-system).
    #[arg(long, required_if_eq("attestor", "unix"))]
    pub unix_map: Option<PathBuf>,

    /// Meshed workloads listed in a YAML file, with either attestor:
    /// `members: [{ip: 198.18.0.2, id: "spiffe://cluster.local/ns/b/sa/b"}]`, each the address of
    /// a meshed workload and the SPIFFE ID (in --trust-domain) its proxy presents. Outside
    /// Kubernetes it is the only source of the mesh membership; with --attestor k8s it adds to the
    /// pods labelled sigil.dev/tls-mode=mtls and wins on a shared IP. An optional `services:`
    /// list declares meshed Services for load balancing (namespace, name, clusterIPs, ports with
    /// name/port/targetPort/appProtocol, opaquePorts, endpoints with ip/ready/terminating, each
    /// endpoint one of the members); they win over Kubernetes Services of the same name. Re-read
    /// every second; an invalid edit is logged and the last good file kept.
    #[arg(long)]
    pub mesh_file: Option<PathBuf>,

    /// Authorization policies and routes in a YAML file, with either attestor:
    /// AuthorizationPolicy and PeerAuthentication objects as in the cluster (`apiVersion:
    /// sigil.dev/v1alpha1`, `kind`, `metadata: {name, namespace}`, `spec`), several documents
    /// separated by `---`; beside them, the route kinds as in the cluster: HTTPRoute, GRPCRoute
    /// and ReferenceGrant (`gateway.networking.k8s.io/v1`, ReferenceGrant also v1beta1),
    /// BackendPolicy and RateLimitPolicy (`sigil.dev/v1alpha1`), served to proxies as their
    /// routes. Outside Kubernetes it is the only source of policies and routes; with --attestor
    /// k8s it adds to the cluster's, which win over an object of the same kind, namespace and
    /// name. Re-read every
    /// second; an invalid edit is logged and the last good objects kept. Replace it whole (write
    /// another file, then rename it over this one): a read of a half-written file may take
    /// effect.
    #[arg(long)]
    pub policy_file: Option<PathBuf>,

    /// This node's name (the downward API's spec.nodeName), for --attestor k8s.
    #[arg(long, env = "NODE_NAME", required_if_eq("attestor", "k8s"))]
    pub node_name: Option<String>,

    /// Where /proc is (the host's, with hostPID).
    #[arg(long, default_value = DEFAULT_PROC_ROOT)]
    pub proc_root: PathBuf,

    /// Prometheus /metrics, /ready and /healthz.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Lifetime to ask for; certificates are renewed at half of it.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_CERT_TTL)]
    pub cert_ttl: Duration,

    /// Most signing requests in flight at once.
    #[arg(long, default_value_t = crate::certs::DEFAULT_MAX_CONCURRENT_FETCHES)]
    pub max_concurrent_fetches: usize,

    /// Most connections open at once on the agent socket (each proxy keeps a few).
    #[arg(long, default_value_t = crate::peer::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Most connections one process (SO_PEERCRED's pid) may hold open on the agent socket.
    #[arg(long, default_value_t = crate::peer::DEFAULT_MAX_CONNECTIONS_PER_PROCESS)]
    pub max_connections_per_process: usize,
}
