//! `sigil ca serve` configuration: every flag, its default (named consts) and its meaning, parsed
//! once and printed at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use sigil_base::flags::parse_duration;
use sigil_identity::profile::parse_server_name;
use sigil_identity::spiffe::DEFAULT_TRUST_DOMAIN;
use sigil_identity::tls::KeyExchange;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15014";
pub const DEFAULT_SERVICE_NAME: &str = "sigil-ca.sigil-system.svc";
pub const DEFAULT_TTL: &str = "24h";
pub const DEFAULT_MAX_TTL: &str = "7d";
pub const DEFAULT_RELOAD_INTERVAL: &str = "5s";
/// Istio's sidecars and Envoy's drain use 5 s too; kube-proxy drops an endpoint in about 1 s.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "5s";
pub const DEFAULT_WEBHOOK_ADDR: &str = "0.0.0.0:15017";
pub const DEFAULT_WEBHOOK_CONFIG: &str = "sigil-injector";
pub const DEFAULT_JWT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How often the JWKS is re-read (file) or re-fetched (OIDC discovery).
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);

/// How callers' service-account tokens are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Ask the API server (TokenReview, audience-checked), caching results by token hash for
    /// 10 s at most, as the API server caches its own.
    Tokenreview,
    /// Validate locally against the cluster's JWKS (--jwks-file, or OIDC discovery): no API call
    /// per request. It cannot see a deleted service account: that account's tokens keep working
    /// until they expire (pod-bound ones only while their pod exists). Use tokenreview where
    /// that matters.
    Jwks,
    /// No tokens: only client certificates issued by this CA (outside Kubernetes; see --static-entries).
    Certs,
}

/// Runs the certificate authority.
#[derive(Args, Clone, Debug)]
pub struct CaConfig {
    /// SPIFFE trust domain of every identity this CA issues.
    #[arg(long, env = "SIGIL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// gRPC over TLS: sigil.ca.v1.CertificateAuthority and istio.v1.auth.IstioCertificateService.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Prometheus /metrics, /ready and /healthz (plain HTTP).
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Key exchange of every TLS connection the CA accepts (gRPC API, webhook) or makes (the
    /// Kubernetes API): `hybrid` offers and prefers X25519MLKEM768 (X25519 with the
    /// post-quantum ML-KEM-768, against traffic recorded now and decrypted later) and falls
    /// back to X25519, P-256, P-384; `classical` offers and accepts only X25519, P-256, P-384
    /// (FIPS-only or legacy environments).
    #[arg(long, value_enum, env = "SIGIL_TLS_KEY_EXCHANGE", default_value_t = KeyExchange::Hybrid)]
    pub tls_key_exchange: KeyExchange,

    /// Keep the self-signed root in this directory instead of the Kubernetes Secret.
    #[arg(long, conflicts_with_all = ["plugin_dir", "plugin_secret"])]
    pub state_dir: Option<PathBuf>,

    /// Namespace of the CA's Secrets (the pod's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = crate::store::DEFAULT_SECRET_NAMESPACE)]
    pub namespace: String,

    /// Secret holding the self-signed root (created on first start).
    #[arg(long, default_value = crate::store::DEFAULT_SECRET_NAME)]
    pub secret_name: String,

    /// Plug-in CA: sign with the intermediate in this directory (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem), reloaded on change.
    #[arg(long, conflicts_with = "plugin_secret")]
    pub plugin_dir: Option<PathBuf>,

    /// Plug-in CA from a Secret in --namespace with the same keys as --plugin-dir.
    #[arg(long)]
    pub plugin_secret: Option<String>,

    /// How callers' tokens are validated.
    #[arg(long, value_enum, default_value_t = AuthMode::Tokenreview)]
    pub auth: AuthMode,

    /// With --auth jwks: the cluster's JWKS as a file (else fetched by OIDC discovery).
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,

    /// With --auth jwks --jwks-file: the token issuer to require.
    #[arg(long, default_value = DEFAULT_JWT_ISSUER)]
    pub jwt_issuer: String,

    /// Audiences a token may carry besides sigil-ca, which is always accepted (repeat the flag
    /// for several; istio-ca for Istio's ztunnel and istio-agent). Adds, never replaces: sigil's
    /// own agents present sigil-ca tokens.
    #[arg(long = "audience")]
    pub audiences: Vec<String>,

    /// Service accounts (namespace/name) of node agents allowed to request pods' identities.
    #[arg(long = "trusted-agent", value_parser = crate::authz::parse_service_account,
          default_values = crate::authz::DEFAULT_TRUSTED_AGENTS)]
    pub trusted_agents: Vec<(String, String)>,

    /// YAML registration entries for hosts without Kubernetes: which agent certificates may
    /// issue which identities (`agents: [{id: ..., may_issue: [...]}]`).
    #[arg(long)]
    pub static_entries: Option<PathBuf>,

    /// Extra DNS names / IP addresses for the CA's serving certificate (e.g. localhost, 127.0.0.1).
    #[arg(long = "server-name", value_parser = parse_server_name)]
    pub server_names: Vec<String>,

    /// Lifetime of a certificate when the request asks for none.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_TTL)]
    pub default_ttl: Duration,

    /// Longest lifetime a request may ask for; longer requests are rejected, not shortened.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_MAX_TTL)]
    pub max_ttl: Duration,

    /// How often the key material (state, plug-in files) is re-read.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_RELOAD_INTERVAL)]
    pub reload_interval: Duration,

    /// After SIGTERM, report not ready at once but keep serving (gRPC, webhook, metrics) this
    /// long, so that what the Service still routes here while it drops the endpoint is answered;
    /// then stop accepting, give calls in flight a few seconds, and exit. The pod's
    /// terminationGracePeriodSeconds must exceed it by those seconds.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_SHUTDOWN_GRACE)]
    pub shutdown_grace: Duration,

    /// Do not publish the sigil-ca-root ConfigMap in every namespace.
    #[arg(long)]
    pub no_root_configmaps: bool,

    /// HTTPS address of the sidecar-injection webhook (`POST /inject`, serving certificate from
    /// this CA). Served only when the CA talks to Kubernetes.
    #[arg(long, default_value = DEFAULT_WEBHOOK_ADDR)]
    pub webhook_addr: SocketAddr,

    /// Neither serve the injection webhook nor keep its caBundle.
    #[arg(long)]
    pub no_webhook: bool,

    /// The MutatingWebhookConfiguration whose webhooks' caBundle the CA keeps equal to the
    /// trust bundle.
    #[arg(long, default_value = DEFAULT_WEBHOOK_CONFIG)]
    pub webhook_config: String,

    /// Image of the injected `sigil-init` and `sigil-proxy` containers (deploy/ sets it to the
    /// CA's own image).
    #[arg(long, env = "SIGIL_PROXY_IMAGE", default_value = crate::inject::DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,

    /// The uid injected proxies run as; `sigil proxy init` exempts it from redirection.
    #[arg(long, default_value_t = sigil_proxy_api::PROXY_UID,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub proxy_uid: u32,

    /// Namespaces never injected, whatever their labels (repeat the flag; replaces the default
    /// list: kube-system, kube-public, kube-node-lease, sigil-system).
    #[arg(long = "inject-exclude-namespace", default_values = crate::inject::DEFAULT_EXCLUDED_NAMESPACES)]
    pub inject_excluded_namespaces: Vec<String>,

    /// Make every injected proxy send its spans to this OpenTelemetry collector (OTLP), e.g.
    /// http://otel-collector.observability:4317: the proxies then propagate W3C Trace Context
    /// and B3 headers and record a span per HTTP request (`sigil proxy run --trace-collector`).
    /// Spans leave the pods in plaintext. Pods choose their share of new traces with the
    /// annotation `sigil.dev/trace-sampling: "0.05"` (default 0.01).
    #[arg(long, value_parser = parse_trace_collector)]
    pub inject_trace_collector: Option<String>,

    /// How injected proxies reach --inject-trace-collector: `grpc` (port 4317) or
    /// `http/protobuf` (port 4318).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "http/protobuf"], requires = "inject_trace_collector")]
    pub inject_trace_protocol: String,

    /// Most gRPC connections that have authenticated a call, open at once (agents keep one
    /// each). Connections not yet authenticated have their own 512 slots.
    #[arg(long, default_value_t = crate::tls_server::MAX_CONNECTIONS, value_parser = clap::value_parser!(usize))]
    pub max_connections: usize,

    /// Most gRPC connections from one IP address that are in their TLS handshake or have not
    /// authenticated a call yet; each has 10 s after its handshake to authenticate one.
    #[arg(long, default_value_t = crate::tls_server::MAX_UNAUTHENTICATED_PER_SOURCE)]
    pub max_connections_per_source: usize,

    /// Signing requests one caller may make at once and per second (its budget refills at that
    /// rate); beyond it the caller gets RESOURCE_EXHAUSTED "retry later" and the audit log says
    /// why. A caller is one pod for a pod-bound token (each node agent has its own budget),
    /// else one SPIFFE ID. 0: no limit.
    #[arg(long, default_value_t = crate::service::SIGNS_PER_CALLER)]
    pub max_signs_per_caller: u32,
}

/// A collector URL as `sigil proxy run --trace-collector` takes it (`http://HOST[:PORT][/PATH]`),
/// checked here so that a typo stops the CA rather than every injected proxy.
fn parse_trace_collector(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); expected http://HOST:PORT"))?;
    let host = uri.authority().map_or("", |a| a.host());
    let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if uri.scheme_str() != Some("http") || host.is_empty() || userinfo || uri.query().is_some() {
        return Err(format!(
            "{s:?}: expected http://HOST:PORT (plaintext OTLP; no https, userinfo or query)"
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_collector_must_be_plain_http_to_a_host() {
        assert_eq!(
            parse_trace_collector("http://otel-collector.observability:4317").as_deref(),
            Ok("http://otel-collector.observability:4317")
        );
        for bad in [
            "https://c:4317",
            "c:4317",
            "http://u@c:4317",
            "http://c:4318/v1/traces?x=1",
            "not a url",
        ] {
            let e = parse_trace_collector(bad).unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }
}
