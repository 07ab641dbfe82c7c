//! What a proxy uses, already valid and ordered: the routes of one Service port for one client
//! ([`PortRoutes`]), the traffic policy of a backend Service ([`BackendPolicy`]) and the local
//! rate limits of a Service port a workload serves ([`InboundPolicy`]). The agent builds these
//! ([`crate::compile`]), `sigil_proxy_api::routes` carries them on the wire, the proxy and
//! `sigil inspect route` read them with [`crate::select`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use sigil_identity::SpiffeId;

/// A Service's namespace and name: `<namespace>/<name>` in logs, labels and on the wire.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: `<namespace>/<name>:<port>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub service: ServiceRef,
    pub port: u16,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

/// Whose routes apply to a client for a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteOrigin {
    /// Routes in the Service's namespace, for every client without consumer routes.
    Producer,
    /// Routes in the client's own namespace, which replace the producer routes for it.
    Consumer,
}

/// The routes that apply to one client for one Service port.
#[derive(Clone, Debug)]
pub struct PortRoutes {
    pub key: PortKey,
    pub origin: RouteOrigin,
    /// `None`: no HTTPRoute applies.
    pub http: Option<Arc<HttpRouteTable>>,
    /// Used for gRPC requests (content-type `application/grpc*`) when present, else `http` is.
    pub grpc: Option<Arc<GrpcRouteTable>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    HttpRoute,
    GrpcRoute,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::GrpcRoute => "GRPCRoute",
        })
    }
}

/// Which object and rule a compiled rule came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub rule_index: u32,
    /// `spec.rules[].name`, if given.
    pub rule_name: Option<String>,
}

impl RuleRef {
    /// `<namespace>/<name>`: the `route` label of request metrics (bounded: objects, not paths).
    pub fn route(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A route table over matches of type `M` ([`HttpMatch`] or [`GrpcMatch`]): the rules, and
/// every (rule, match) pair in precedence order.
#[derive(Clone, Debug)]
pub struct RouteTable<M> {
    pub rules: Vec<Rule>,
    /// The proxy tries these in order and takes the first that matches; `.0` indexes `rules`.
    pub order: Vec<(usize, M)>,
}

/// An HTTPRoute table.
pub type HttpRouteTable = RouteTable<HttpMatch>;
/// A GRPCRoute table.
pub type GrpcRouteTable = RouteTable<GrpcMatch>;

/// One HTTPRoute match; every part present must match.
#[derive(Clone, Debug, Default)]
pub struct HttpMatch {
    /// `None`: every path.
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// `None`: every method.
    pub method: Option<Method>,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise, a trailing `/` ignored: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`;
    /// `/` matches every path.
    Prefix(String),
    /// Already anchored: built with [`PathMatch::regex`] from `^(?:pattern)$`, so that
    /// [`crate::select`] matches the whole path with `is_match`; [`regex_pattern`] gives back
    /// the user's pattern.
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    /// Already anchored: built with [`ValueMatch::regex`] from `^(?:pattern)$` (see
    /// [`PathMatch::Regex`]).
    Regex(Regex),
}

/// The largest compiled regex a route may carry ([`regex::RegexBuilder::size_limit`]): a pattern
/// over it is refused (`UnsupportedValue` in status), so that no route costs a proxy megabytes.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// `pattern` compiled to match a whole path or value: `^(?:pattern)$`, at most
/// [`REGEX_SIZE_LIMIT`]. Every regex of the compiled types is built here (the agent's compiler,
/// the proxy's wire conversion), so that `is_match` is a whole match everywhere.
pub fn anchored_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// The user's pattern of a regex built by [`anchored_regex`] (its `as_str()` is the anchored
/// form); a regex built otherwise is returned whole.
pub fn regex_pattern(regex: &Regex) -> &str {
    let text = regex.as_str();
    text.strip_prefix("^(?:")
        .and_then(|rest| rest.strip_suffix(")$"))
        .unwrap_or(text)
}

impl PathMatch {
    /// A `RegularExpression` path match (see [`anchored_regex`]).
    pub fn regex(pattern: &str) -> Result<PathMatch, regex::Error> {
        anchored_regex(pattern).map(PathMatch::Regex)
    }
}

impl ValueMatch {
    /// A `RegularExpression` header, query or gRPC match (see [`anchored_regex`]).
    pub fn regex(pattern: &str) -> Result<ValueMatch, regex::Error> {
        anchored_regex(pattern).map(ValueMatch::Regex)
    }
}

/// As the Gateway API spells it: `PathPrefix /api`, `Exact /a`, `RegularExpression /v[0-9]+`.
impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(path) => write!(f, "Exact {path}"),
            PathMatch::Prefix(prefix) => write!(f, "PathPrefix {prefix}"),
            PathMatch::Regex(regex) => write!(f, "RegularExpression {}", regex_pattern(regex)),
        }
    }
}

/// `=value` or `~regex`, after a header, query parameter, service or method name.
impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueMatch::Exact(value) => write!(f, "={value}"),
            ValueMatch::Regex(regex) => write!(f, "~{}", regex_pattern(regex)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

/// One rule of an HTTPRoute or a GRPCRoute (whose filters are only header modifiers and
/// mirrors).
#[derive(Clone, Debug)]
pub struct Rule {
    pub source: RuleRef,
    /// In spec order.
    pub filters: Vec<Filter>,
    pub backends: Backends,
    pub timeouts: Timeouts,
    /// `None`: no retries.
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the prefix the request matched (only with a PathPrefix match).
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `None`: the request's.
    pub scheme: Option<String>,
    /// `None`: the request's.
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    /// `None`: inferred from the scheme as the Gateway API says.
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status: StatusCode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// RequestMirror: a copy of `numerator`/`denominator` of the requests goes to `backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: Backend,
    pub numerator: u32,
    /// Never 0.
    pub denominator: u32,
}

/// A weighted choice of backends; the weights of `entries` are never 0.
#[derive(Clone, Debug, Default)]
pub struct Backends {
    pub entries: Vec<WeightedBackend>,
}

#[derive(Clone, Debug)]
pub struct WeightedBackend {
    pub weight: u32,
    pub target: BackendTarget,
    /// HTTPBackendRef filters (header modifiers).
    pub filters: Vec<Filter>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    Service(Backend),
    /// An invalid backendRef and why: its share of the requests is answered 500 (gRPC:
    /// UNAVAILABLE).
    Invalid(String),
}

/// A Service port as a backend. A meshed Service is balanced over its endpoints (the proxy's
/// Service table); any other is reached at one of `cluster_ips` with a plain connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub service: ServiceRef,
    pub port: u16,
    /// Only for a Service outside the mesh.
    pub cluster_ips: Vec<std::net::IpAddr>,
}

/// GEP-1742 timeouts; `None` (or a zero duration on the way in): no timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request head to the end of the response, retries and backoff included.
    pub request: Option<Duration>,
    /// Each attempt, from its request head to the end of its response.
    pub backend_request: Option<Duration>,
    /// No byte either way for this long.
    pub idle: Option<Duration>,
}

/// When a failed attempt is tried again (GEP-1731).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Response codes that are retried (connection failures always are).
    pub http_codes: BTreeSet<u16>,
    /// gRPC status codes that are retried.
    pub grpc_codes: BTreeSet<u32>,
    /// Minimum wait before each retry (the proxy adds jitter).
    pub backoff: Duration,
    /// Retry methods that are not idempotent on a response too.
    pub non_idempotent: bool,
}

#[derive(Clone, Debug, Default)]
pub struct GrpcMatch {
    /// `None`: any service.
    pub service: Option<ValueMatch>,
    /// `None`: any method.
    pub method: Option<ValueMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// The traffic policy of one backend Service, for every client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPolicy {
    pub service: ServiceRef,
    /// `<namespace>/<BackendPolicy name>`, or `default`.
    pub source: String,
    pub outlier_detection: Option<OutlierDetection>,
    pub retry_budget: RetryBudget,
}

/// Istio's DestinationRule `outlierDetection`, with Envoy's `maxEjectionTime` and
/// failure-percentage ejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 0: off.
    pub consecutive_5xx_errors: u32,
    /// 502, 503, 504 and connection failures; 0: off.
    pub consecutive_gateway_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
    pub failure_percentage: Option<FailurePercentage>,
}

impl Default for OutlierDetection {
    /// Istio's defaults, and Envoy's maximum ejection time.
    fn default() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 0,
            failure_percentage: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailurePercentage {
    pub threshold: u32,
    pub request_volume: u32,
    pub minimum_hosts: u32,
}

/// Retries may add `percent`% of the original requests counted over `interval`, plus
/// `min_retries` per `min_interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    pub percent: u32,
    pub interval: Duration,
    pub min_retries: u32,
    pub min_interval: Duration,
}

impl Default for RetryBudget {
    /// 20% over 10 s, plus 3 per second.
    fn default() -> RetryBudget {
        RetryBudget {
            percent: 20,
            interval: Duration::from_secs(10),
            min_retries: 3,
            min_interval: Duration::from_secs(1),
        }
    }
}

/// The local rate limits of one Service port, enforced by the inbound proxy of each endpoint.
#[derive(Clone, Debug)]
pub struct InboundPolicy {
    pub key: PortKey,
    /// Every one applies.
    pub limits: Vec<LocalRateLimit>,
}

#[derive(Clone, Debug)]
pub struct LocalRateLimit {
    /// `<namespace>/<RateLimitPolicy name>`.
    pub source: String,
    /// Only requests that match one of these are limited; both empty: every request.
    pub http_matches: Vec<HttpMatch>,
    pub grpc_matches: Vec<GrpcMatch>,
    /// One bucket shared by every client.
    pub total: Option<Limit>,
    /// One bucket per client identity.
    pub per_identity: Option<Limit>,
    /// Replace `per_identity` for these clients.
    pub overrides: Vec<IdentityOverride>,
}

/// `requests` per `period`, in a bucket of `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityOverride {
    pub clients: BTreeSet<SpiffeId>,
    pub limit: Limit,
}

/// Everything one client's proxy uses, each entry shared (`Arc`) so that the agent's per-stream
/// diff and the proxy's table swap compare pointers: the routes of each Service port (for
/// outbound), the traffic policy of each backend Service, and the local rate limits of each
/// Service port the client's workload serves (for inbound).
#[derive(Clone, Debug, Default)]
pub struct RouteSet {
    pub ports: std::collections::BTreeMap<PortKey, Arc<PortRoutes>>,
    pub backends: std::collections::BTreeMap<ServiceRef, Arc<BackendPolicy>>,
    pub inbound: std::collections::BTreeMap<PortKey, Arc<InboundPolicy>>,
}

impl Backends {
    /// The entry `point` falls on, `point` being uniform in `0..self.total_weight()`; `None`
    /// when there is no entry.
    pub fn pick(&self, point: u64) -> Option<&WeightedBackend> {
        let mut left = point;
        for entry in &self.entries {
            let weight = u64::from(entry.weight);
            if left < weight {
                return Some(entry);
            }
            left -= weight;
        }
        self.entries.last()
    }

    /// The sum of the weights.
    pub fn total_weight(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.weight)).sum()
    }
}
