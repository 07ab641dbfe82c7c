//! `sigil proxy run` configuration: every flag, its default (named consts)
//! and its meaning, parsed once and printed at start-up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::trace::{ExportProtocol, TraceConfig};
use clap::{Args, ValueEnum};
use sigil_base::flags::parse_duration;
use sigil_identity::tls::KeyExchange;
use sigil_policy::path::PathNormalization;
use sigil_proxy_api::ports::PortSet;
use sigil_proxy_api::{ADMIN_PORT, AGENT_SOCKET, INBOUND_PORT, METRICS_PORT, OUTBOUND_PORT};

pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT);
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), METRICS_PORT);
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// How long live connections may finish after SIGTERM (Istio's terminationDrainDuration).
pub const DEFAULT_DRAIN_TIMEOUT: &str = "5s";
/// An inbound HTTP request head (HTTP/1) or first request (HTTP/2) must arrive within this.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "30s";
/// A connection with no bytes either way for this long is closed (Envoy's default idle timeout).
pub const DEFAULT_IDLE_TIMEOUT: &str = "1h";
/// How long a connection on a port with no declared protocol may take to send enough bytes to
/// tell HTTP from other traffic before it is forwarded as opaque TCP.
pub const DEFAULT_DETECT_TIMEOUT: &str = "500ms";
/// Inbound connections held at once; more are closed at accept.
pub const DEFAULT_MAX_INBOUND_CONNECTIONS: u32 = 4096;
/// Pooled HTTP/2 connections to one endpoint of a meshed Service, at most.
pub const DEFAULT_MAX_CONNECTIONS_PER_ENDPOINT: u32 = 4;
/// The share of new traces sampled (Istio's default: 1 %).
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;
/// Spans waiting for export, at most (`OTEL_BSP_MAX_QUEUE_SIZE`'s default).
pub const DEFAULT_TRACE_QUEUE_SIZE: u32 = 2048;
/// Spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`'s default).
pub const DEFAULT_TRACE_BATCH_SIZE: u32 = 512;
/// How long a batch's first span waits for more (`OTEL_BSP_SCHEDULE_DELAY`'s default).
pub const DEFAULT_TRACE_BATCH_TIMEOUT: &str = "5s";
/// One export request's bound (`OTEL_EXPORTER_OTLP_TIMEOUT`'s default).
pub const DEFAULT_TRACE_EXPORT_TIMEOUT: &str = "10s";

/// PeerAuthentication's mode, which `--mtls-mode` and `--port-mtls` set where no policy does.
pub use sigil_policy::MtlsMode;

/// `PORT=MODE`, a per-port PeerAuthentication override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortMtls {
    pub port: u16,
    pub mode: MtlsMode,
}

fn parse_port_mtls(s: &str) -> Result<PortMtls, String> {
    let (port, mode) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PORT=MODE, e.g. 8080=PERMISSIVE"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    let mode = MtlsMode::from_str(mode, true)
        .map_err(|_| format!("{mode:?}: mode must be STRICT, PERMISSIVE or DISABLE"))?;
    Ok(PortMtls { port, mode })
}

/// `--trace-protocol`, named as `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum TraceProtocol {
    /// OTLP over gRPC (collectors listen on 4317).
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP/1.1, protobuf bodies `POST`ed to `/v1/traces` (collectors listen on 4318).
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// A collector URL: `http://HOST[:PORT][/PATH]`. Exports leave the pod in plaintext (the
/// proxy's own traffic is not redirected into the mesh), so `https` is refused rather than
/// silently downgraded.
fn parse_collector(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); expected http://HOST:PORT"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: expected http://HOST:PORT (exports are plaintext OTLP; no https)"
        ));
    }
    match uri.authority() {
        Some(authority) if !authority.host().is_empty() && !authority.as_str().contains('@') => {}
        _ => {
            return Err(format!(
                "{s:?}: expected http://HOST:PORT (a host, no userinfo)"
            ));
        }
    }
    if uri.query().is_some() {
        return Err(format!("{s:?}: a collector URL takes no query"));
    }
    Ok(uri)
}

/// A share between 0 and 1 (`0.25`, `1`).
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{s:?} is not a ratio between 0 and 1 (e.g. 0.01 for 1 %)"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("{s:?}: must be longer than zero")),
        duration => Ok(duration),
    }
}

/// Runs the proxy beside an application.
///
/// Transparent mode (default): `sigil proxy init` has redirected the pod's traffic; inbound
/// connections arrive on --inbound-port and go to their original destination (the pod IP)
/// after mTLS;
/// outbound connections arrive on --outbound-port and leave for their original destination,
/// over mTLS when the agent lists it as meshed.
///
/// Explicit mode (--explicit): no iptables; listen on the given addresses and forward to fixed
/// ones (for hosts without iptables, and for benchmarks).
#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct ProxyConfig {
    /// The node agent's socket (certificates over SDS, mesh membership).
    #[arg(long, default_value = AGENT_SOCKET)]
    pub agent_socket: PathBuf,

    /// Admin endpoint: /certs, /config, /ready. Keep it on loopback: it describes the pod.
    #[arg(long, default_value_t = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Prometheus /metrics (and /ready for the kubelet's probe).
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    /// Transparent mode: where `sigil proxy init` redirects inbound connections.
    #[arg(long, default_value_t = INBOUND_PORT)]
    pub inbound_port: u16,

    /// Transparent mode: where `sigil proxy init` redirects outbound connections.
    #[arg(long, default_value_t = OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Transparent mode: forward inbound connections to 127.0.0.1:<port> instead of the pod IP
    /// they were addressed to, for applications that listen on loopback only. This exposes
    /// every loopback-only port of the pod (debug endpoints, this proxy's admin) to the mesh.
    #[arg(long)]
    pub inbound_to_loopback: bool,

    /// Inbound HTTP: set `x-forwarded-client-cert` on every allowed request from an mTLS peer
    /// to `By=<this workload's SPIFFE ID>;URI=<the peer's>` (Envoy's SANITIZE_SET). Without it
    /// the header never reaches the application: the proxy tells HTTP from other bytes on every
    /// inbound connection and removes a client's own x-forwarded-client-cert from every request.
    #[arg(long)]
    pub forward_client_cert: bool,

    /// HTTP, both directions: log one JSON line per request (target `sigil_access`, `kind:
    /// http`) when its response ends: trace and span ids, identities of both sides, method,
    /// authority, normalized path (never the query), route, status, gRPC status, deciding
    /// policy, body bytes both ways, time to the response head and to its end, upstream
    /// address. Denied, malformed (400) and requests the proxy failed itself are always
    /// logged, with or without this flag.
    #[arg(long)]
    pub access_log: bool,

    /// With --access-log: the share of allowed requests logged (0 to 1). Traced (sampled)
    /// requests are always logged; others are picked on their trace id, so the proxies on
    /// both sides of a request log the same requests.
    #[arg(long, value_parser = parse_ratio, default_value_t = 1.0)]
    pub access_log_sampling: f64,

    /// Send spans to this OpenTelemetry collector (OTLP), e.g. http://otel-collector.observability:4317.
    /// Each proxy then takes part in W3C Trace Context (`traceparent`) and B3 propagation: it
    /// continues the caller's trace (or starts one), passes the context on, and records a
    /// server span per inbound and a client span per outbound HTTP request. Spans leave the pod
    /// in plaintext, outside the mesh. Without it, no trace header is read or written.
    #[arg(long, value_parser = parse_collector)]
    #[serde(serialize_with = "display")]
    pub trace_collector: Option<http::Uri>,

    /// How spans reach the collector: `grpc` (port 4317) or `http/protobuf` (port 4318; the
    /// URL's path, else `/v1/traces`).
    #[arg(long, value_enum, default_value_t = TraceProtocol::Grpc, requires = "trace_collector")]
    pub trace_protocol: TraceProtocol,

    /// The share (0 to 1) of new traces sampled: requests that arrive with no sampling decision
    /// of their caller. A caller's decision (sampled or not) is always followed.
    #[arg(long, value_parser = parse_ratio, default_value_t = DEFAULT_TRACE_SAMPLING)]
    pub trace_sampling: f64,

    /// Spans waiting for export, at most; more are dropped (counted in
    /// sigil_proxy_trace_spans_dropped_total{reason="queue_full"}), never waited for.
    #[arg(long, default_value_t = DEFAULT_TRACE_QUEUE_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub trace_queue_size: u32,

    /// Spans per export request, at most.
    #[arg(long, default_value_t = DEFAULT_TRACE_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub trace_batch_size: u32,

    /// How long the first span of a batch waits for more before the batch is sent.
    #[arg(long, value_parser = parse_positive_duration, default_value = DEFAULT_TRACE_BATCH_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub trace_batch_timeout: Duration,

    /// Give up on an export request after this long (its spans are dropped and counted).
    #[arg(long, value_parser = parse_positive_duration, default_value = DEFAULT_TRACE_EXPORT_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub trace_export_timeout: Duration,

    /// The spans' `service.name`. Default: `SERVICE_ACCOUNT.NAMESPACE` of this proxy's SPIFFE ID.
    #[arg(long, requires = "trace_collector")]
    pub trace_service_name: Option<String>,

    /// Inbound PeerAuthentication mode for every port without a --port-mtls override.
    #[arg(long, value_enum, default_value_t = MtlsMode::Strict, ignore_case = true)]
    pub mtls_mode: MtlsMode,

    /// Per-port inbound mode, PORT=MODE (repeatable), e.g. --port-mtls 8080=PERMISSIVE.
    #[arg(long = "port-mtls", value_parser = parse_port_mtls)]
    pub port_mtls: Vec<PortMtls>,

    /// Also accept and offer TLS 1.2 (ECDHE with AES-GCM only) for peers without TLS 1.3.
    #[arg(long)]
    pub tls12: bool,

    /// Key exchange of every TLS connection the proxy accepts (inbound mTLS) or makes
    /// (outbound mTLS, HTTPS probes): `hybrid` offers and prefers X25519MLKEM768 (X25519 with
    /// the post-quantum ML-KEM-768, against traffic recorded now and decrypted later) and falls
    /// back to X25519, P-256, P-384; `classical` offers and accepts only X25519, P-256, P-384
    /// (FIPS-only or legacy environments). TLS 1.2 peers (--tls12) get a classical group.
    #[arg(long, value_enum, env = "SIGIL_TLS_KEY_EXCHANGE", default_value_t = KeyExchange::Hybrid)]
    pub tls_key_exchange: KeyExchange,

    /// How inbound HTTP request paths are normalized before policies match them; the
    /// normalized path is what the application receives. Istio's modes: NONE, BASE (RFC 3986:
    /// dot segments, unreserved escapes, `\` to `/`), MERGE_SLASHES, DECODE_AND_MERGE_SLASHES
    /// (also `%2F`, `%5C`). Refused with 400 whatever the mode: `%00`, invalid escapes; in all
    /// but NONE: `;`, escapes that are not UTF-8, and `%2F`/`%5C` unless decoded.
    #[arg(long, value_enum, default_value_t = PathNormalization::Base, ignore_case = true)]
    pub path_normalization: PathNormalization,

    /// Inbound ports whose traffic is opaque TCP, comma-separated (`3306,4000-4010`): forwarded
    /// as bytes at once, never waiting for protocol detection (server-first protocols such as
    /// MySQL or SMTP). The injector sets it from the pod's `sigil.dev/opaque-ports` annotation.
    #[arg(long, default_value = "")]
    pub opaque_ports: PortSet,

    /// Ports with no declared protocol (no appProtocol, no protocol-named port, not opaque):
    /// a client that has not sent enough to tell HTTP from other bytes within this time is
    /// forwarded as opaque TCP (counted in sigil_proxy_protocol_detect_timeouts_total).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_DETECT_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub detect_timeout: Duration,

    /// Give up on an upstream that has not accepted the TCP connection within this time.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_CONNECT_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,

    /// Inbound HTTP: close a connection whose HTTP/1 request head (the first one, or the next
    /// one on a keep-alive connection) or first HTTP/2 request has not fully arrived within
    /// this time. The application is connected to only once a request is allowed, so clients
    /// that never finish a request never hold an application connection.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_HEADER_READ_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub header_read_timeout: Duration,

    /// Close a connection (inbound or outbound, HTTP or TCP) that carried no byte either way
    /// for this long.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_IDLE_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub idle_timeout: Duration,

    /// Inbound connections held at once (from accept to close); more are closed at once and
    /// counted in sigil_proxy_connections_over_limit_total.
    #[arg(long, default_value_t = DEFAULT_MAX_INBOUND_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inbound_connections: u32,

    /// After SIGTERM: stop accepting, report not ready, let live connections finish for this
    /// long, then close them.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_DRAIN_TIMEOUT)]
    #[serde(with = "humantime_secs")]
    pub drain_timeout: Duration,

    /// A kubelet HTTP probe answered on the metrics port as /app-health/NAME by asking the
    /// application at 127.0.0.1:PORT/PATH (repeatable), so probes work under STRICT mTLS and
    /// deny-all policies; the injector rewrites the pod's probes to these.
    #[arg(long = "app-probe", value_name = "NAME=PORT/PATH", value_parser = crate::probes::parse_app_probe)]
    pub app_probes: Vec<crate::probes::AppProbe>,

    /// Worker threads. Default: the CPUs this process may use (its cgroup CPU limit rounded up),
    /// so a pod limited to 1 CPU gets 1 worker.
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Non-transparent mode: fixed listen and forward addresses instead of iptables.
    #[arg(long)]
    pub explicit: bool,

    /// Explicit mode: accept mTLS here (the mode rules apply to this listener's port)...
    #[arg(long, requires_all = ["explicit", "inbound_app"])]
    pub inbound_listen: Option<SocketAddr>,

    /// ...and forward plaintext to the application here.
    #[arg(long, requires = "inbound_listen")]
    pub inbound_app: Option<SocketAddr>,

    /// Explicit mode: accept plaintext here...
    #[arg(long, requires_all = ["explicit", "outbound_upstream", "outbound_identity"])]
    pub outbound_listen: Option<SocketAddr>,

    /// ...and originate mTLS to this upstream...
    #[arg(long, requires = "outbound_listen")]
    pub outbound_upstream: Option<SocketAddr>,

    /// ...which must present this SPIFFE ID.
    #[arg(long, requires = "outbound_listen")]
    pub outbound_identity: Option<String>,

    /// Outbound HTTP to a meshed Service: mutual TLS HTTP/2 connections kept open to each of its
    /// endpoints. One carries many requests at once; another is opened only when the open ones
    /// are busy.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_ENDPOINT, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_endpoint: u32,
}

impl ProxyConfig {
    /// Worker threads for the runtime: --concurrency, else every CPU the process may use (the
    /// standard library reads the cgroup CPU quota).
    pub fn worker_threads(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    /// The tracing settings, when --trace-collector names a collector.
    pub fn trace_config(&self) -> Option<TraceConfig> {
        Some(TraceConfig {
            collector: self.trace_collector.clone()?,
            protocol: match self.trace_protocol {
                TraceProtocol::Grpc => ExportProtocol::Grpc,
                TraceProtocol::HttpProtobuf => ExportProtocol::HttpProtobuf,
            },
            sampling: self.trace_sampling,
            queue_size: self.trace_queue_size as usize,
            batch_size: self.trace_batch_size as usize,
            batch_timeout: self.trace_batch_timeout,
            export_timeout: self.trace_export_timeout,
            service_name: self.trace_service_name.clone(),
        })
    }

    /// The share of allowed requests the access log writes; None without --access-log.
    pub fn access_log_ratio(&self) -> Option<f64> {
        self.access_log.then_some(self.access_log_sampling)
    }

    /// The mode for inbound connections to `port`.
    pub fn mtls_mode_for(&self, port: u16) -> MtlsMode {
        self.port_mtls
            .iter()
            .find(|p| p.port == port)
            .map_or(self.mtls_mode, |p| p.mode)
    }
}

/// Values shown as their text in /config (a collector URL).
fn display<T: std::fmt::Display, S: serde::Serializer>(
    value: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => s.collect_str(value),
        None => s.serialize_none(),
    }
}

/// Durations as seconds in /config.
mod humantime_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyConfig,
    }

    fn parse(args: &[&str]) -> Result<ProxyConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied())).map(|c| c.proxy)
    }

    #[test]
    fn port_overrides_win_over_the_default_mode() {
        let config = parse(&[
            "--mtls-mode",
            "permissive",
            "--port-mtls",
            "8080=STRICT",
            "--port-mtls",
            "9090=disable",
        ])
        .unwrap();
        assert_eq!(config.mtls_mode_for(8080), MtlsMode::Strict);
        assert_eq!(config.mtls_mode_for(9090), MtlsMode::Disable);
        assert_eq!(config.mtls_mode_for(80), MtlsMode::Permissive);
        assert_eq!(parse(&[]).unwrap().mtls_mode_for(80), MtlsMode::Strict);
    }

    #[test]
    fn bad_port_modes_say_what_is_expected() {
        for (arg, expected) in [
            ("8080", "expected PORT=MODE"),
            ("0=STRICT", "not a port"),
            ("70000=STRICT", "not a port"),
            ("8080=OFF", "STRICT, PERMISSIVE or DISABLE"),
        ] {
            let e = parse(&["--port-mtls", arg]).err().unwrap().to_string();
            assert!(e.contains(expected), "{arg}: {e}");
        }
    }

    #[test]
    fn explicit_listeners_need_explicit_mode_and_their_partners() {
        assert!(
            parse(&[
                "--inbound-listen",
                "127.0.0.1:1",
                "--inbound-app",
                "127.0.0.1:2"
            ])
            .is_err()
        );
        assert!(parse(&["--explicit", "--inbound-listen", "127.0.0.1:1"]).is_err());
        assert!(
            parse(&[
                "--explicit",
                "--outbound-listen",
                "127.0.0.1:1",
                "--outbound-upstream",
                "127.0.0.1:2"
            ])
            .is_err(),
            "an outbound upstream without the identity it must prove"
        );
        let config = parse(&[
            "--explicit",
            "--outbound-listen",
            "127.0.0.1:1",
            "--outbound-upstream",
            "127.0.0.1:2",
            "--outbound-identity",
            "spiffe://cluster.local/ns/a/sa/b",
        ])
        .unwrap();
        assert!(config.explicit && config.inbound_listen.is_none());
    }

    #[test]
    fn tracing_is_off_without_a_collector_and_takes_every_flag_with_one() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.trace_config(), None);
        assert_eq!(config.access_log_ratio(), None);
        let config = parse(&[
            "--trace-collector",
            "http://198.18.0.9:4318",
            "--trace-protocol",
            "http/protobuf",
            "--trace-sampling",
            "0.5",
            "--trace-queue-size",
            "16",
            "--trace-batch-size",
            "4",
            "--trace-batch-timeout",
            "200ms",
            "--trace-export-timeout",
            "2s",
            "--trace-service-name",
            "web.shop",
            "--access-log",
            "--access-log-sampling",
            "0.25",
        ])
        .unwrap();
        assert_eq!(
            config.trace_config(),
            Some(TraceConfig {
                collector: "http://198.18.0.9:4318".parse().unwrap(),
                protocol: ExportProtocol::HttpProtobuf,
                sampling: 0.5,
                queue_size: 16,
                batch_size: 4,
                batch_timeout: Duration::from_millis(200),
                export_timeout: Duration::from_secs(2),
                service_name: Some("web.shop".into()),
            })
        );
        assert_eq!(config.access_log_ratio(), Some(0.25));
        let defaults = parse(&["--trace-collector", "http://collector:4317"])
            .unwrap()
            .trace_config()
            .unwrap();
        assert_eq!(defaults.protocol, ExportProtocol::Grpc);
        assert_eq!(defaults.sampling, 0.01);
        assert_eq!((defaults.queue_size, defaults.batch_size), (2048, 512));
        assert_eq!(defaults.batch_timeout, Duration::from_secs(5));
        assert_eq!(defaults.export_timeout, Duration::from_secs(10));
        let json =
            serde_json::to_value(parse(&["--trace-collector", "http://c:4317"]).unwrap()).unwrap();
        assert_eq!(json["trace_collector"], "http://c:4317/");
        assert_eq!(json["trace_protocol"], "grpc");
    }

    #[test]
    fn bad_trace_flags_say_what_is_expected() {
        for (args, expected) in [
            (&["--trace-collector", "https://c:4317"][..], "no https"),
            (
                &["--trace-collector", "c:4317"][..],
                "expected http://HOST:PORT",
            ),
            (&["--trace-collector", "http://u@c:4317"][..], "no userinfo"),
            (&["--trace-collector", "http://c:4317/?a=b"][..], "no query"),
            (&["--trace-collector", "not a url"][..], "is not a URL"),
            (&["--trace-sampling", "1.5"][..], "between 0 and 1"),
            (&["--trace-sampling=-0.1"][..], "between 0 and 1"),
            (&["--trace-sampling", "NaN"][..], "between 0 and 1"),
            (&["--access-log-sampling", "2"][..], "between 0 and 1"),
            (&["--trace-queue-size", "0"][..], "0"),
            (&["--trace-batch-size", "0"][..], "0"),
            (&["--trace-batch-timeout", "0s"][..], "longer than zero"),
            (&["--trace-export-timeout", "soon"][..], "not a duration"),
            (&["--trace-protocol", "http"][..], "http/protobuf"),
        ] {
            let e = parse(args).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(expected)),
                "{args:?}: {e:?}"
            );
        }
    }

    #[test]
    fn worker_threads_follow_concurrency_and_never_reach_zero() {
        assert_eq!(parse(&["--concurrency", "3"]).unwrap().worker_threads(), 3);
        assert_eq!(parse(&["--concurrency", "0"]).unwrap().worker_threads(), 1);
        assert!(parse(&[]).unwrap().worker_threads() >= 1);
    }
}
