//! Sidecar injection: what the mutating admission webhook does to a pod. Given an
//! `AdmissionReview` it answers with the JSON patch that adds the `sigil proxy init` init
//! container, the proxy (`sigil-proxy run`, a native sidecar, so it starts before and stops after
//! the app), the agent
//! socket mount, the mesh label and (unless the pod has its own) the `prometheus.io/*` scrape
//! annotations for the proxy's metrics, and points HTTP probes at the proxy so they keep working
//! under STRICT mTLS and deny-all policies. Pure: no I/O, so every decision is testable with
//! AdmissionReview documents.

use std::collections::BTreeSet;

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};
use sigil_proxy_api::ports::PortSet;
use sigil_proxy_api::{
    ACCESS_LOG_ANNOTATION, AGENT_SOCKET_DIR, OPAQUE_PORTS_ANNOTATION, PROXY_PORTS, TLS_MODE_LABEL,
    TLS_MODE_MTLS, TRACE_SAMPLING_ANNOTATION,
};

/// Namespace label (and pod label or annotation, `"false"`) that turns injection on (off).
pub const INJECT_KEY: &str = "sigil.dev/inject";
/// Set on injected pods; its presence means "already injected".
pub const STATUS_ANNOTATION: &str = "sigil.dev/status";
pub const INIT_CONTAINER: &str = "sigil-init";
pub const PROXY_CONTAINER: &str = "sigil-proxy";
pub const AGENT_VOLUME: &str = "sigil-agent";
/// Volume names the injector adds; a pod may neither define nor mount them.
pub const RESERVED_VOLUMES: [&str; 1] = [AGENT_VOLUME];
pub const DEFAULT_PROXY_IMAGE: &str = concat!("sigil:", env!("CARGO_PKG_VERSION"));
/// Never injected, whatever their labels say: the control plane's own namespaces.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "sigil-system",
];
/// Per-pod annotations passed to `sigil proxy init` (checked here, so a typo fails the pod's
/// creation with a reason rather than its init container later).
pub const EXCLUDE_INBOUND_PORTS: &str = "sigil.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "sigil.dev/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "sigil.dev/exclude-outbound-cidrs";
/// `auto`, `on` or `off`, passed as `sigil proxy init --ipv6`: `off` for pods on nodes without
/// ip6table_nat, whose IPv6 traffic then bypasses the proxy.
pub const IPV6_ANNOTATION: &str = "sigil.dev/ipv6";
/// What `sigil proxy init --ipv6` accepts.
const IPV6_MODES: [&str; 3] = ["auto", "on", "off"];
/// The proxy's metrics and probe port, as Kubernetes declares ports.
const METRICS_PORT: i32 = sigil_proxy_api::METRICS_PORT as i32;
/// The name of the proxy container's metrics port, which the Prometheus Operator's PodMonitor
/// (deploy/overlays/prometheus-operator) and the `sigil-proxies` job of
/// deploy/prometheus/scrape-config.yaml select.
pub const METRICS_PORT_NAME: &str = "sigil-metrics";
/// The conventional `prometheus.io/*` scrape annotations (honoured by many scrape configs, and by
/// deploy/prometheus/scrape-config.yaml): a pod that sets none of them gets them pointing at its
/// proxy's metrics.
const PROMETHEUS_ANNOTATION_PREFIX: &str = "prometheus.io/";
/// Bytes of a probe header's value escaped in `--app-probe` (`%XX`): those that end or escape a
/// header there, and any the flag could not carry as they are.
const PROBE_HEADER_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b'%').add(b'#');
/// Worker threads of an injected proxy.
const PROXY_CONCURRENCY: &str = "2";
/// What the proxy container runs: the image's proxy-only binary (deploy/Dockerfile), which maps a
/// third less memory per pod than the image's entrypoint `/sigil proxy run` would.
pub const PROXY_COMMAND: &str = "/sigil-proxy";

/// What the injector puts into pods (from `sigil ca serve` flags).
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub image: String,
    pub proxy_uid: u32,
    pub excluded_namespaces: BTreeSet<String>,
    /// The OTLP collector every injected proxy sends its spans to (`--trace-collector`), and
    /// how (`--trace-protocol`: `grpc` or `http/protobuf`); None: tracing off.
    pub trace_collector: Option<TraceCollector>,
}

/// Where injected proxies export spans (`sigil ca serve --inject-trace-collector`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceCollector {
    pub url: String,
    pub protocol: String,
}

/// What happened to one review, for the log line and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Admitted unchanged, and why.
    Skipped(SkipReason),
    /// Refused, and why (also the message the user sees).
    Denied(String),
    /// The review itself could not be read.
    Malformed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    NotPodCreate,
    ExcludedNamespace,
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotPodCreate => "not_pod_create",
            SkipReason::ExcludedNamespace => "excluded_namespace",
            SkipReason::OptedOut => "opted_out",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::HostNetwork => "host_network",
        }
    }
}

/// The pod's name for logs (`generateName` pods have none yet).
#[derive(Clone, Debug, Default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Answers one AdmissionReview body: the response review to send, and what was decided.
pub fn review(body: &[u8], config: &InjectConfig) -> (Value, Outcome, PodRef) {
    let malformed = |reason: String| {
        (
            to_wire(AdmissionResponse::invalid(format!(
                "sigil injector: {reason}"
            ))),
            Outcome::Malformed(reason),
            PodRef::default(),
        )
    };
    let raw: Value = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => return malformed(format!("the body is not JSON: {e}")),
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw.clone()) {
        Ok(review) => review,
        Err(e) => return malformed(format!("not an admission.k8s.io/v1 AdmissionReview: {e}")),
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return malformed("the AdmissionReview has no request".into()),
    };
    let original = raw["request"]["object"].clone();
    let pod_ref = PodRef {
        namespace: request.namespace.clone().unwrap_or_default(),
        name: pod_name(&original),
    };
    let response = AdmissionResponse::from(&request);
    let (response, outcome) = match decide(&request, &original, config) {
        Ok(Mutation::Skip(reason)) => (response, Outcome::Skipped(reason)),
        Ok(Mutation::Patch { mutated, warnings }) => {
            let patch = json_patch::diff(&original, &mutated);
            match response.with_patch(patch) {
                Ok(mut response) => {
                    if !warnings.is_empty() {
                        response.warnings = Some(warnings);
                    }
                    (response, Outcome::Injected)
                }
                Err(e) => {
                    let reason = format!("serializing the patch: {e}");
                    (
                        AdmissionResponse::from(&request).deny(&reason),
                        Outcome::Denied(reason),
                    )
                }
            }
        }
        Err(reason) => (response.deny(&reason), Outcome::Denied(reason)),
    };
    (to_wire(response), outcome, pod_ref)
}

/// The response review as the API server reads it: the patch, a Go `[]byte`, base64-encoded
/// (kube's type would write it as an array of numbers).
fn to_wire(response: AdmissionResponse) -> Value {
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review()).expect("a review serializes");
    if let Some(patch) = patch {
        review["response"]["patch"] =
            json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    review
}

enum Mutation {
    Skip(SkipReason),
    Patch {
        mutated: Value,
        warnings: Vec<String>,
    },
}

fn decide(
    request: &AdmissionRequest<DynamicObject>,
    original: &Value,
    config: &InjectConfig,
) -> Result<Mutation, String> {
    if request.operation != Operation::Create
        || request.kind.kind != "Pod"
        || !request.kind.group.is_empty()
        || request.sub_resource.is_some()
    {
        return Ok(Mutation::Skip(SkipReason::NotPodCreate));
    }
    let namespace = request.namespace.as_deref().unwrap_or_default();
    if config.excluded_namespaces.contains(namespace) {
        return Ok(Mutation::Skip(SkipReason::ExcludedNamespace));
    }
    let pod: Pod = serde_json::from_value(original.clone())
        .map_err(|e| format!("sigil injector: the object is not a valid Pod: {e}"))?;
    let meta = &pod.metadata;
    let opted_out = [meta.labels.as_ref(), meta.annotations.as_ref()]
        .into_iter()
        .flatten()
        .any(|map| map.get(INJECT_KEY).is_some_and(|v| v == "false"));
    if opted_out {
        return Ok(Mutation::Skip(SkipReason::OptedOut));
    }
    let spec = pod
        .spec
        .as_ref()
        .ok_or("sigil injector: the Pod has no spec")?;
    let already = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER);
    if already {
        return Ok(Mutation::Skip(SkipReason::AlreadyInjected));
    }
    // iptables rules in a host-network pod would redirect the node's own traffic.
    if spec.host_network == Some(true) {
        return Ok(Mutation::Skip(SkipReason::HostNetwork));
    }
    // The injector's own volume is the node's agent socket directory, which only the proxy may
    // see (read-only): a pod that defines that name, or mounts it, would get the hostPath under
    // its own terms after injection (e.g. writable, to replace the agent's socket).
    if let Some(volume) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| RESERVED_VOLUMES.contains(&v.name.as_str()))
    {
        return Err(format!(
            "sigil injector: the pod defines volume \"{}\", a name the sigil injector \
             reserves for the proxy; rename the volume or opt the pod out with the label \
             {INJECT_KEY}: \"false\"",
            volume.name
        ));
    }
    let mounts = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| {
            let mounts = c.volume_mounts.iter().flatten().map(|m| m.name.as_str());
            let devices = c.volume_devices.iter().flatten().map(|d| d.name.as_str());
            mounts
                .chain(devices)
                .map(move |name| (c.name.as_str(), name))
        })
        .chain(spec.ephemeral_containers.iter().flatten().flat_map(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .map(move |m| (c.name.as_str(), m.name.as_str()))
        }));
    for (container, volume) in mounts {
        if RESERVED_VOLUMES.contains(&volume) {
            return Err(format!(
                "sigil injector: container \"{container}\" mounts volume \"{volume}\", which \
                 the sigil injector reserves for the proxy; remove the mount"
            ));
        }
    }
    // Init containers too: they share the network namespace, and native sidecars run beside
    // the app.
    let all_containers = || {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
    };
    for container in all_containers() {
        for port in container.ports.iter().flatten() {
            if u16::try_from(port.container_port).is_ok_and(|p| PROXY_PORTS.contains(&p)) {
                return Err(format!(
                    "sigil injector: container {:?} declares port {}, which the sigil proxy uses \
                     (reserved: {PROXY_PORTS:?}); move the app or opt the pod out with the label \
                     {INJECT_KEY}: \"false\"",
                    container.name, port.container_port
                ));
            }
        }
    }
    // A container running as the proxy's uid is exempt from redirection: it would talk past the
    // proxy, unauthenticated.
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    for container in all_containers() {
        let uid = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if uid == Some(i64::from(config.proxy_uid)) {
            return Err(format!(
                "sigil injector: container {:?} runs as uid {}, the sigil proxy's uid, whose \
                 traffic is not intercepted; run it as another uid",
                container.name, config.proxy_uid
            ));
        }
    }
    let init_args = init_args(meta.annotations.as_ref(), config.proxy_uid)?;
    let proxy_flags = proxy_flags(meta.annotations.as_ref(), config)?;

    let mut mutated = original.clone();
    let mut warnings = Vec::new();
    let mut probe_flags = Vec::new();
    for (index, container) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("livenessProbe", "live", &container.liveness_probe),
            ("readinessProbe", "ready", &container.readiness_probe),
            ("startupProbe", "startup", &container.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            match rewrite_probe(container, kind, probe) {
                ProbeRewrite::ToProxy { flag, path } => {
                    probe_flags.push(flag);
                    let probe = &mut mutated["spec"]["containers"][index][field];
                    // The kubelet asks the proxy over plain HTTP, whatever the app speaks; an
                    // httpGet keeps its headers (the proxy ignores them and sends the app the
                    // ones its --app-probe flag carries).
                    if let Some(probe) = probe.as_object_mut() {
                        probe.remove("tcpSocket");
                        probe.remove("grpc");
                    }
                    let get = &mut probe["httpGet"];
                    get["port"] = json!(METRICS_PORT);
                    get["path"] = json!(path);
                    get["scheme"] = json!("HTTP");
                }
                ProbeRewrite::Unchanged => {}
                ProbeRewrite::Warn(warning) => warnings.push(warning),
            }
        }
    }

    let labels = object_at(&mut mutated["metadata"], "labels");
    labels.insert(TLS_MODE_LABEL.into(), json!(TLS_MODE_MTLS));
    let annotations = object_at(&mut mutated["metadata"], "annotations");
    annotations.insert(STATUS_ANNOTATION.into(), json!("injected"));
    if let Some(first) = spec.containers.first() {
        annotations
            .entry("kubectl.kubernetes.io/default-container")
            .or_insert(json!(first.name));
    }
    // A pod that sets any scrape annotation keeps all of them as they are: they describe the
    // app's own metrics, which are the app's to expose (adding `scrape: "true"` beside its `port`
    // would turn on a scrape it left off, and a `port` of ours would hide its metrics). Its proxy
    // is still scraped by the named port.
    if !annotations
        .keys()
        .any(|key| key.starts_with(PROMETHEUS_ANNOTATION_PREFIX))
    {
        for (key, value) in [
            ("prometheus.io/scrape", "true".to_string()),
            ("prometheus.io/port", METRICS_PORT.to_string()),
            ("prometheus.io/path", "/metrics".to_string()),
        ] {
            annotations.insert(key.into(), json!(value));
        }
    }
    let init_containers = array_at(&mut mutated["spec"], "initContainers");
    // First the rules, then the proxy: the app's own init containers already run meshed.
    init_containers.insert(0, init_container(config, init_args));
    init_containers.insert(1, proxy_container(config, probe_flags, proxy_flags));
    array_at(&mut mutated["spec"], "volumes").push(json!({
        "name": AGENT_VOLUME,
        // OrCreate: a pod scheduled on a new node before the agent would otherwise wait for its
        // mount; the kubelet creates the directory as the agent does (root, 0755).
        "hostPath": {"path": AGENT_SOCKET_DIR, "type": "DirectoryOrCreate"},
    }));
    Ok(Mutation::Patch { mutated, warnings })
}

enum ProbeRewrite {
    /// Point the probe at the proxy's `path`, which the proxy answers as `--app-probe flag`.
    ToProxy {
        flag: String,
        path: String,
    },
    Unchanged,
    Warn(String),
}

/// An HTTP, HTTPS, TCP or gRPC probe goes to the proxy's `/app-health/<container>-<kind>` (as an
/// HTTP GET), which probes the app the same way on loopback. A probe naming another host is left
/// as it is.
fn rewrite_probe(container: &Container, kind: &str, probe: &Probe) -> ProbeRewrite {
    let name = &container.name;
    let probe_name = format!("{name}-{kind}");
    let to_proxy = |target: String| ProbeRewrite::ToProxy {
        flag: format!("{probe_name}={target}"),
        path: format!("/app-health/{probe_name}"),
    };
    let port_of = |port: &IntOrString| match port {
        IntOrString::Int(port) => Some(*port).filter(|p| (1..=65535).contains(p)),
        IntOrString::String(port_name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .map(|p| p.container_port),
    };
    let undeclared = |port: &IntOrString| {
        // As the user wrote it in the pod: a number, or a quoted port name.
        let port = match port {
            IntOrString::Int(number) => number.to_string(),
            IntOrString::String(port_name) => format!("\"{port_name}\""),
        };
        ProbeRewrite::Warn(format!(
            "sigil: the {kind} probe of container \"{name}\" names port {port}, which the \
             container does not declare; not rewritten"
        ))
    };
    if let Some(get) = &probe.http_get {
        if get.host.is_some() {
            return ProbeRewrite::Unchanged;
        }
        let Some(port) = port_of(&get.port) else {
            return undeclared(&get.port);
        };
        let path = get.path.as_deref().unwrap_or("/");
        if path.contains(|c: char| c.is_whitespace() || c == '#') {
            return ProbeRewrite::Warn(format!(
                "sigil: the {kind} probe of container \"{name}\" has a path with whitespace or \
                 '#' ({path}); not rewritten"
            ));
        }
        let slash = if path.starts_with('/') { "" } else { "/" };
        let https = get
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let scheme = if https { "https:" } else { "" };
        // The pod's headers travel with the probe (a virtual host, a token): `#NAME=VALUE`.
        let mut headers = String::new();
        for header in get.http_headers.iter().flatten() {
            // '#' is legal in a header name but separates headers in the flag.
            let carried = http::HeaderName::from_bytes(header.name.as_bytes()).is_ok()
                && !header.name.contains('#');
            if !carried {
                return ProbeRewrite::Warn(format!(
                    "sigil: the {kind} probe of container \"{name}\" sends header \"{}\", \
                     which the proxy cannot carry; not rewritten",
                    header.name
                ));
            }
            let value = percent_encoding::utf8_percent_encode(&header.value, PROBE_HEADER_ESCAPES);
            headers.push_str(&format!("#{}={value}", header.name));
        }
        return to_proxy(format!("{scheme}{port}{slash}{path}{headers}"));
    }
    if let Some(tcp) = &probe.tcp_socket {
        if tcp.host.is_some() {
            return ProbeRewrite::Unchanged;
        }
        return match port_of(&tcp.port) {
            Some(port) => to_proxy(format!("tcp:{port}")),
            None => undeclared(&tcp.port),
        };
    }
    if let Some(grpc) = &probe.grpc {
        let Some(port) = Some(grpc.port).filter(|p| (1..=65535).contains(p)) else {
            return undeclared(&IntOrString::Int(grpc.port));
        };
        let service = grpc.service.as_deref().unwrap_or_default();
        if service.contains(|c: char| c.is_whitespace() || c == '/') {
            return ProbeRewrite::Warn(format!(
                "sigil: the gRPC {kind} probe of container {name:?} names service {service:?}, \
                 which the proxy cannot carry; not rewritten"
            ));
        }
        return to_proxy(format!("grpc:{port}/{service}"));
    }
    ProbeRewrite::Unchanged
}

/// `sigil proxy init` arguments, with the pod's exclusion annotations checked.
fn init_args(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    proxy_uid: u32,
) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = ["proxy", "init", "--proxy-uid"].map(String::from).to_vec();
    args.push(proxy_uid.to_string());
    for (annotation, flag, check) in [
        (
            EXCLUDE_INBOUND_PORTS,
            "--exclude-inbound-ports",
            check_port as fn(&str) -> bool,
        ),
        (
            EXCLUDE_OUTBOUND_PORTS,
            "--exclude-outbound-ports",
            check_port,
        ),
        (
            EXCLUDE_OUTBOUND_CIDRS,
            "--exclude-outbound-cidrs",
            check_cidr,
        ),
    ] {
        let Some(value) = annotations.and_then(|a| a.get(annotation)) else {
            continue;
        };
        let items: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = items.iter().find(|item| !check(item)) {
            return Err(format!(
                "sigil injector: annotation {annotation}: {bad:?} is not valid (expected a \
                 comma-separated list of {})",
                if flag.ends_with("cidrs") {
                    "IPv4 or IPv6 CIDRs, e.g. 169.254.169.254/32,fd00:ec2::254/128"
                } else {
                    "ports, e.g. 8080,9090"
                }
            ));
        }
        let mut items: Vec<String> = items.into_iter().map(String::from).collect();
        // The flag replaces `sigil proxy init`'s default list, which keeps the kubelet's probes
        // to the proxy (and the proxy's own startup probe) out of the redirection.
        if flag == "--exclude-inbound-ports" && !items.contains(&METRICS_PORT.to_string()) {
            items.push(METRICS_PORT.to_string());
        }
        if !items.is_empty() {
            args.push(flag.to_string());
            args.push(items.join(","));
        }
    }
    if let Some(mode) = annotations.and_then(|a| a.get(IPV6_ANNOTATION)) {
        if !IPV6_MODES.contains(&mode.as_str()) {
            return Err(format!(
                "sigil injector: annotation {IPV6_ANNOTATION}: {mode:?} is not valid; write \
                 \"auto\" (IPv6 rules when the pod has IPv6), \"on\" or \"off\" (IPv6 traffic \
                 then bypasses the proxy)"
            ));
        }
        args.extend(["--ipv6".to_owned(), mode.clone()]);
    }
    Ok(args)
}

/// The proxy's flags from the pod's annotations (`sigil.dev/opaque-ports` as `--opaque-ports`,
/// `sigil.dev/access-log: "true"` or a ratio as `--access-log [--access-log-sampling R]`,
/// `sigil.dev/trace-sampling` as `--trace-sampling`) and the mesh-wide trace collector,
/// checked here so that a typo refuses the pod with the reason instead of a proxy that never
/// starts or a setting silently ignored.
fn proxy_flags(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<Vec<String>, String> {
    let mut flags = Vec::new();
    if let Some(value) = annotations.and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION)) {
        let ports: PortSet = value.parse().map_err(|e| {
            format!(
                "sigil injector: annotation {OPAQUE_PORTS_ANNOTATION}: {e}; write a \
                 comma-separated list of ports and ranges, e.g. \"3306,25,4000-4010\""
            )
        })?;
        if !ports.is_empty() {
            flags.extend(["--opaque-ports".to_owned(), ports.to_string()]);
        }
    }
    match annotations
        .and_then(|a| a.get(ACCESS_LOG_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("false") => {}
        Some("true") => flags.push("--access-log".to_owned()),
        Some(other) => match ratio(other).filter(|r| *r > 0.0) {
            Some(share) => flags.extend([
                "--access-log".to_owned(),
                "--access-log-sampling".to_owned(),
                share.to_string(),
            ]),
            None => {
                return Err(format!(
                    "sigil injector: annotation {ACCESS_LOG_ANNOTATION}: {other:?} is not \
                     valid; write \"true\" (one log line per request), a share of the allowed \
                     requests to log between 0 and 1 (e.g. \"0.1\"), or \"false\""
                ));
            }
        },
    }
    if let Some(value) = annotations.and_then(|a| a.get(TRACE_SAMPLING_ANNOTATION)) {
        let share = ratio(value).ok_or_else(|| {
            format!(
                "sigil injector: annotation {TRACE_SAMPLING_ANNOTATION}: {value:?} is not \
                 valid; write the share of new traces to sample between 0 and 1, e.g. \"0.05\""
            )
        })?;
        flags.extend(["--trace-sampling".to_owned(), share.to_string()]);
    }
    if let Some(collector) = &config.trace_collector {
        flags.extend([
            "--trace-collector".to_owned(),
            collector.url.clone(),
            "--trace-protocol".to_owned(),
            collector.protocol.clone(),
        ]);
    }
    Ok(flags)
}

/// A share between 0 and 1 (`"0.25"`, `"1"`).
fn ratio(s: &str) -> Option<f64> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
}

fn check_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p != 0)
}

/// An IPv4 (prefix 0-32) or IPv6 (prefix 0-128) CIDR, with its prefix, as `sigil proxy init
/// --exclude-outbound-cidrs` takes them.
fn check_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    len.parse::<u8>().is_ok_and(|l| l <= max)
}

fn init_container(config: &InjectConfig, args: Vec<String>) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "args": args,
        // Root with NET_ADMIN and NET_RAW only, to write this pod's nat table; iptables needs a
        // writable /run for its lock.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
    })
}

fn proxy_container(
    config: &InjectConfig,
    probe_flags: Vec<String>,
    proxy_flags: Vec<String>,
) -> Value {
    // The container has no CPU limit (a sidecar should not be throttled), so the proxy would
    // otherwise start a worker per CPU of the node; two is Istio's sidecar default.
    let mut args: Vec<String> = ["run", "--concurrency", PROXY_CONCURRENCY]
        .map(String::from)
        .to_vec();
    for flag in probe_flags {
        args.push("--app-probe".into());
        args.push(flag);
    }
    args.extend(proxy_flags);
    let ready = json!({"httpGet": {"path": "/ready", "port": METRICS_PORT}});
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "command": [PROXY_COMMAND],
        "args": args,
        // A native sidecar: started before the app containers (once its startup probe passes,
        // so the app never runs before its certificate), stopped after them.
        "restartPolicy": "Always",
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": ready["httpGet"],
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": {
            "httpGet": ready["httpGet"],
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        // The proxy's uid is the one `sigil proxy init` exempts from redirection.
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": "20m", "memory": "32Mi"},
            "limits": {"memory": "256Mi"},
        },
        "volumeMounts": [{"name": AGENT_VOLUME, "mountPath": AGENT_SOCKET_DIR, "readOnly": true}],
    });
    // The spans' resource names the pod (`k8s.pod.name`, `k8s.namespace.name`).
    if config.trace_collector.is_some() {
        let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
        container["env"] = json!([
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        ]);
    }
    container
}

fn pod_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    meta["name"]
        .as_str()
        .map(String::from)
        .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
        .unwrap_or_default()
}

/// The object at `parent[key]`, created if absent or null.
fn object_at<'a>(parent: &'a mut Value, key: &str) -> &'a mut serde_json::Map<String, Value> {
    let slot = &mut parent[key];
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

/// The array at `parent[key]`, created if absent or null.
fn array_at<'a>(parent: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let slot = &mut parent[key];
    if !slot.is_array() {
        *slot = json!([]);
    }
    slot.as_array_mut().expect("just made an array")
}

#[cfg(test)]
mod tests;
