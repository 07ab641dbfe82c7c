//! The contract between the node agent and the proxies it serves, typed on both sides: what the
//! agent publishes on its socket (mesh membership in [`mesh`], meshed Services and their
//! endpoints in [`services`], policies in [`policy`], SDS resources in [`sds`]), where that
//! socket is, what the CA's sidecar injector must know about the proxy it injects (its ports and
//! uid, and the label that puts a pod in the mesh), and the names of the proxy's request metrics
//! that `sigil stat` reads ([`metrics`]).
#![forbid(unsafe_code)]

pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod ports;
pub mod routes;
pub mod sds;
pub mod services;

/// Where the agent DaemonSet puts its socket on every node, and where pods see it.
pub const AGENT_SOCKET_DIR: &str = "/run/sigil";
/// The agent socket, in [`AGENT_SOCKET_DIR`].
pub const AGENT_SOCKET: &str = "/run/sigil/agent.sock";

/// The uid the injected proxy container runs as (Istio's 1337, so existing exclusions carry
/// over); `sigil proxy init` exempts it from redirection.
pub const PROXY_UID: u32 = 1337;
/// The proxy's transparent outbound listener, where `sigil proxy init` redirects the pod's
/// outgoing connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's transparent inbound listener, where incoming connections are redirected.
pub const INBOUND_PORT: u16 = 15006;
/// The proxy's admin endpoint (loopback only).
pub const ADMIN_PORT: u16 = 15000;
/// The proxy's Prometheus `/metrics`, `/ready` and rewritten application probes; never
/// redirected, so scrapers and the kubelet need no mTLS.
pub const METRICS_PORT: u16 = 15020;
/// Every port the proxy listens on inside the pod: an application container may not use them.
pub const PROXY_PORTS: [u16; 4] = [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, METRICS_PORT];

/// The pod label that puts a pod in the mesh: the injector sets it on injected pods, the
/// agent's membership selects on it.
pub const TLS_MODE_LABEL: &str = "sigil.dev/tls-mode";
/// The value of [`TLS_MODE_LABEL`] for pods whose proxy accepts mTLS.
pub const TLS_MODE_MTLS: &str = "mtls";

/// The annotation listing ports whose traffic is opaque TCP (never waits for protocol
/// detection: server-first protocols such as MySQL or SMTP), comma-separated: on a Service, its
/// Service ports; on a pod, the ports its proxy accepts inbound (Linkerd's
/// `config.linkerd.io/opaque-ports`).
pub const OPAQUE_PORTS_ANNOTATION: &str = "sigil.dev/opaque-ports";

/// The pod annotation that turns on its proxy's per-request access log (`"true"`; a ratio in
/// (0, 1] such as `"0.1"` logs that share of allowed requests; `"false"` or absent: off): the
/// injector passes `--access-log` (and `--access-log-sampling`), so one workload can be looked
/// at closely without every proxy of the mesh logging each request.
pub const ACCESS_LOG_ANNOTATION: &str = "sigil.dev/access-log";

/// The pod annotation setting the share of new traces its proxy samples (`"0.05"`; 0 to 1),
/// passed as `--trace-sampling` when the injector is configured with a trace collector.
pub const TRACE_SAMPLING_ANNOTATION: &str = "sigil.dev/trace-sampling";

/// The request header that carries an HTTP/1.x request's version between two sigil proxies,
/// which send every request over HTTP/2: the server's proxy removes it and speaks HTTP/1.1 to
/// its application (Linkerd's `l5d-orig-proto`). Value: `HTTP/1.1` or `HTTP/1.0`.
pub const ORIG_PROTO_HEADER: &str = "sigil-orig-proto";
