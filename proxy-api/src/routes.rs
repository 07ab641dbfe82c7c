//! Routes, backend policies and local rate limits as the agent publishes them to one client
//! (`sigil.route.v1.RouteDiscovery`): a full set first, then only the changed entries, each
//! whole; checked entry by entry on the way in, an update with one bad entry refused whole (the
//! proxy keeps its previous table and counts the refusal). The compiled types are
//! `sigil_route`'s.
//!
//! Regexes travel as the user's pattern (`sigil_route::compiled::regex_pattern`) and are
//! compiled on the way in with `sigil_route::compiled::anchored_regex`, the agent's own
//! anchoring and size limit, so that a pattern means the same on both sides. Durations travel
//! in milliseconds; a zero timeout is no timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use sigil_identity::SpiffeId;
use sigil_proto::sigil::route::v1 as wire;
use sigil_route::RouteSet;
use sigil_route::compiled::{
    self, Backend, BackendPolicy, BackendTarget, Backends, FailurePercentage, Filter, GrpcMatch,
    HeaderMatch, HeaderModifier, HttpMatch, IdentityOverride, InboundPolicy, Limit, LocalRateLimit,
    Mirror, OutlierDetection, PathMatch, PathModifier, PortKey, PortRoutes, QueryMatch, Redirect,
    RetryBudget, RetryPolicy, Rewrite, RouteKind, RouteOrigin, Rule, RuleRef, ServiceRef, Timeouts,
    ValueMatch, WeightedBackend, regex_pattern,
};
use sigil_route::validate::{Catalog, ServiceInfo, ServicePortInfo};

use crate::services::{MeshService, ServiceKey, ServicePort};

/// Request bodies up to this size are kept while they are sent, so a failed attempt can be
/// retried; a longer body makes its request not retryable (Linkerd's bound).
pub const MAX_RETRY_BODY_BYTES: usize = 64 * 1024;
/// How much of a request body may wait for a slow mirror before the mirror's copy is abandoned
/// (never the primary request).
pub const MAX_MIRROR_BODY_BYTES: usize = 64 * 1024;

/// The status codes a RequestRedirect may answer with (the Gateway API's enum).
const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];
/// The largest gRPC status number (UNAUTHENTICATED).
const MAX_GRPC_CODE: u32 = 16;

/// Why a `RouteUpdate` is refused, naming the entry and field.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{key}: {message}")]
    Entry { key: String, message: String },
    #[error("{0} is both upserted and removed in one update")]
    UpsertedAndRemoved(String),
}

/// The proxy's copy: the last update it accepted, as compiled types.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    pub routes: RouteSet,
}

impl RouteTable {
    /// The table after `update` (a `reset` replaces everything), or why it is refused whole.
    pub fn apply(&self, update: &wire::RouteUpdate) -> Result<RouteTable, RouteError> {
        let mut routes = if update.reset {
            RouteSet::default()
        } else {
            self.routes.clone()
        };
        let ports = update
            .port_upserts
            .iter()
            .map(port_routes_from_message)
            .collect::<Result<Vec<_>, _>>()?;
        let backends = update
            .backend_upserts
            .iter()
            .map(backend_policy_from_message)
            .collect::<Result<Vec<_>, _>>()?;
        let inbound = update
            .inbound_upserts
            .iter()
            .map(inbound_policy_from_message)
            .collect::<Result<Vec<_>, _>>()?;
        for key in &update.port_removals {
            let key = parse_port_key(key)?;
            if ports.iter().any(|routes| routes.key == key) {
                return Err(RouteError::UpsertedAndRemoved(key.to_string()));
            }
            routes.ports.remove(&key);
        }
        for key in &update.backend_removals {
            let key = parse_service_ref(key)?;
            if backends.iter().any(|policy| policy.service == key) {
                return Err(RouteError::UpsertedAndRemoved(key.to_string()));
            }
            routes.backends.remove(&key);
        }
        for key in &update.inbound_removals {
            let key = parse_port_key(key)?;
            if inbound.iter().any(|policy| policy.key == key) {
                return Err(RouteError::UpsertedAndRemoved(key.to_string()));
            }
            routes.inbound.remove(&key);
        }
        for entry in ports {
            routes.ports.insert(entry.key.clone(), Arc::new(entry));
        }
        for entry in backends {
            routes
                .backends
                .insert(entry.service.clone(), Arc::new(entry));
        }
        for entry in inbound {
            routes.inbound.insert(entry.key.clone(), Arc::new(entry));
        }
        Ok(RouteTable {
            version: update.version,
            routes,
        })
    }
}

/// The message that takes a client from `previous` (`None`: nothing yet, a reset) to `current`;
/// `None` when nothing changed. Entries are compared by pointer (`Arc::ptr_eq`) first.
///
/// Only by pointer: the agent re-builds an entry only when its inputs changed, so a new `Arc`
/// is sent even if it happens to equal the old one (a rare, harmless re-send, cheaper than
/// comparing regexes structurally on every publish).
pub fn update(
    previous: Option<&RouteSet>,
    current: &RouteSet,
    version: u64,
) -> Option<wire::RouteUpdate> {
    let Some(previous) = previous else {
        return Some(wire::RouteUpdate {
            version,
            reset: true,
            port_upserts: current
                .ports
                .values()
                .map(|r| port_routes_to_message(r))
                .collect(),
            backend_upserts: current
                .backends
                .values()
                .map(|p| backend_policy_to_message(p))
                .collect(),
            inbound_upserts: current
                .inbound
                .values()
                .map(|p| inbound_policy_to_message(p))
                .collect(),
            ..wire::RouteUpdate::default()
        });
    };
    let message = wire::RouteUpdate {
        version,
        reset: false,
        port_upserts: changed(&previous.ports, &current.ports)
            .map(port_routes_to_message)
            .collect(),
        port_removals: removed(&previous.ports, &current.ports),
        backend_upserts: changed(&previous.backends, &current.backends)
            .map(backend_policy_to_message)
            .collect(),
        backend_removals: removed(&previous.backends, &current.backends),
        inbound_upserts: changed(&previous.inbound, &current.inbound)
            .map(inbound_policy_to_message)
            .collect(),
        inbound_removals: removed(&previous.inbound, &current.inbound),
    };
    let unchanged = message.port_upserts.is_empty()
        && message.port_removals.is_empty()
        && message.backend_upserts.is_empty()
        && message.backend_removals.is_empty()
        && message.inbound_upserts.is_empty()
        && message.inbound_removals.is_empty();
    (!unchanged).then_some(message)
}

/// The entries of `current` that are new or another `Arc` than in `previous`.
fn changed<'c, K: Ord, V>(
    previous: &BTreeMap<K, Arc<V>>,
    current: &'c BTreeMap<K, Arc<V>>,
) -> impl Iterator<Item = &'c V> {
    current
        .iter()
        .filter(|(key, entry)| {
            previous
                .get(*key)
                .is_none_or(|before| !Arc::ptr_eq(before, entry))
        })
        .map(|(_, entry)| entry.as_ref())
}

/// The keys of `previous` that `current` lacks, as the wire spells them.
fn removed<K: Ord + fmt::Display, V>(
    previous: &BTreeMap<K, Arc<V>>,
    current: &BTreeMap<K, Arc<V>>,
) -> Vec<String> {
    previous
        .keys()
        .filter(|key| !current.contains_key(*key))
        .map(ToString::to_string)
        .collect()
}

/// A Service outside the mesh (some endpoint is not a meshed workload): routes may send to it,
/// plainly, at its cluster IPs, but it is no parent of routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmeshedService {
    pub key: ServiceKey,
    /// Empty for a headless Service (which routes cannot reach: it has no address of its own).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// The Services routes are judged against: the meshed ones (the agent's table, or a mesh file's
/// `services:` for `sigil inspect route`), with their ports and the SPIFFE IDs of their
/// endpoints, and the unmeshed ones, with their ports and cluster IPs. A meshed Service wins
/// over an unmeshed one of the same name.
pub fn catalog<'s>(
    meshed: impl IntoIterator<Item = &'s MeshService>,
    unmeshed: impl IntoIterator<Item = &'s UnmeshedService>,
) -> Catalog {
    let unmeshed = unmeshed.into_iter().map(|service| {
        let info = ServiceInfo {
            ports: port_infos(&service.ports),
            cluster_ips: service.cluster_ips.clone(),
            meshed: false,
            endpoint_ids: BTreeSet::new(),
        };
        (ServiceRef::from(&service.key), info)
    });
    let meshed = meshed.into_iter().map(|service| {
        let info = ServiceInfo {
            ports: port_infos(&service.ports),
            cluster_ips: service.cluster_ips.clone(),
            meshed: true,
            endpoint_ids: service.endpoints.iter().map(|e| e.id.clone()).collect(),
        };
        (ServiceRef::from(&service.key), info)
    });
    Catalog {
        // Collected in order: the meshed entries replace unmeshed ones of the same key.
        services: unmeshed.chain(meshed).collect(),
    }
}

fn port_infos(ports: &[ServicePort]) -> Vec<ServicePortInfo> {
    ports
        .iter()
        .map(|port| ServicePortInfo {
            name: port.name.clone(),
            port: port.port,
            app_protocol: port.app_protocol.clone(),
        })
        .collect()
}

// ---- checking: what is wrong, and where ----

/// A field of an entry that is not valid: its path in the message and why.
#[derive(Debug)]
struct Invalid {
    field: String,
    reason: String,
}

type Checked<T> = Result<T, Invalid>;

impl Invalid {
    fn new(field: impl Into<String>, reason: impl fmt::Display) -> Invalid {
        Invalid {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// This error, inside field `parent`.
    fn under(self, parent: impl fmt::Display) -> Invalid {
        let field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        Invalid { field, ..self }
    }

    fn of_entry(self, key: impl fmt::Display) -> RouteError {
        RouteError::Entry {
            key: key.to_string(),
            message: format!("{}: {}", self.field, self.reason),
        }
    }
}

trait Within<T> {
    /// The error, if any, as one inside field `parent`.
    fn within(self, parent: &str) -> Checked<T>;
}

impl<T> Within<T> for Checked<T> {
    fn within(self, parent: &str) -> Checked<T> {
        self.map_err(|invalid| invalid.under(parent))
    }
}

/// Each of `items` checked, an error naming `field[index]`.
fn each<W, T>(items: &[W], field: &str, check: impl Fn(&W) -> Checked<T>) -> Checked<Vec<T>> {
    items
        .iter()
        .enumerate()
        .map(|(index, item)| check(item).map_err(|e| e.under(format!("{field}[{index}]"))))
        .collect()
}

/// A message field the proxy cannot do without (an absent one, or a oneof with no case known
/// to this proxy, perhaps one a newer agent added).
fn required<'m, T>(value: Option<&'m T>, field: &str) -> Checked<&'m T> {
    value.ok_or_else(|| Invalid::new(field, "missing (or of a kind this proxy does not know)"))
}

fn port(value: u32, field: &str) -> Checked<u16> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| Invalid::new(field, format_args!("{value} is not a port (1-65535)")))
}

fn service_ref(namespace: &str, name: &str) -> Checked<ServiceRef> {
    if namespace.is_empty() || namespace.contains('/') {
        return Err(Invalid::new(
            "namespace",
            format_args!("{namespace:?} is not a namespace"),
        ));
    }
    if name.is_empty() || name.contains(['/', ':']) {
        return Err(Invalid::new(
            "name",
            format_args!("{name:?} is not a Service name"),
        ));
    }
    Ok(ServiceRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn parse_service_ref(key: &str) -> Result<ServiceRef, RouteError> {
    key.split_once('/')
        .and_then(|(namespace, name)| service_ref(namespace, name).ok())
        .ok_or_else(|| RouteError::Entry {
            key: key.to_owned(),
            message: "removal key is not <namespace>/<service>".to_owned(),
        })
}

fn parse_port_key(key: &str) -> Result<PortKey, RouteError> {
    key.rsplit_once(':')
        .and_then(|(service, port)| {
            let port = port.parse::<u16>().ok().filter(|port| *port != 0)?;
            Some(PortKey {
                service: parse_service_ref(service).ok()?,
                port,
            })
        })
        .ok_or_else(|| RouteError::Entry {
            key: key.to_owned(),
            message: "removal key is not <namespace>/<service>:<port>".to_owned(),
        })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A duration that must not be zero (an interval, a period).
fn positive_millis(value: u64, field: &str) -> Checked<Duration> {
    if value == 0 {
        return Err(Invalid::new(field, "is 0"));
    }
    Ok(Duration::from_millis(value))
}

fn percent(value: u32, field: &str) -> Checked<u32> {
    if value > 100 {
        return Err(Invalid::new(field, format_args!("{value} is over 100")));
    }
    Ok(value)
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn header_name(value: &str, field: &str) -> Checked<HeaderName> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| Invalid::new(field, format_args!("{value:?} is not a header name")))
}

fn header_value_text(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

// ---- PortRoutes ----

pub fn port_routes_to_message(routes: &PortRoutes) -> wire::PortRoutes {
    wire::PortRoutes {
        namespace: routes.key.service.namespace.clone(),
        name: routes.key.service.name.clone(),
        port: u32::from(routes.key.port),
        origin: match routes.origin {
            RouteOrigin::Producer => wire::RouteOrigin::Producer,
            RouteOrigin::Consumer => wire::RouteOrigin::Consumer,
        } as i32,
        http: routes.http.as_deref().map(WireTable::to_message),
        grpc: routes.grpc.as_deref().map(WireTable::to_message),
    }
}

fn port_routes_from_message(message: &wire::PortRoutes) -> Result<PortRoutes, RouteError> {
    let key = || format!("{}/{}:{}", message.namespace, message.name, message.port);
    let checked = || -> Checked<PortRoutes> {
        Ok(PortRoutes {
            key: PortKey {
                service: service_ref(&message.namespace, &message.name)?,
                port: port(message.port, "port")?,
            },
            origin: match wire::RouteOrigin::try_from(message.origin) {
                Ok(wire::RouteOrigin::Producer) => RouteOrigin::Producer,
                Ok(wire::RouteOrigin::Consumer) => RouteOrigin::Consumer,
                _ => {
                    return Err(Invalid::new(
                        "origin",
                        format_args!("{} is not PRODUCER or CONSUMER", message.origin),
                    ));
                }
            },
            http: message
                .http
                .as_ref()
                .map(|table| table.compiled().within("http").map(Arc::new))
                .transpose()?,
            grpc: message
                .grpc
                .as_ref()
                .map(|table| table.compiled().within("grpc").map(Arc::new))
                .transpose()?,
        })
    };
    checked().map_err(|invalid| invalid.of_entry(key()))
}

fn rule_ref_to_message(source: &RuleRef) -> wire::RuleRef {
    wire::RuleRef {
        kind: match source.kind {
            RouteKind::HttpRoute => wire::RouteKind::HttpRoute,
            RouteKind::GrpcRoute => wire::RouteKind::GrpcRoute,
        } as i32,
        namespace: source.namespace.clone(),
        name: source.name.clone(),
        rule_index: source.rule_index,
        rule_name: source.rule_name.clone().unwrap_or_default(),
    }
}

fn rule_ref_from_message(message: Option<&wire::RuleRef>) -> Checked<RuleRef> {
    let message = required(message, "source")?;
    Ok(RuleRef {
        kind: match wire::RouteKind::try_from(message.kind) {
            Ok(wire::RouteKind::HttpRoute) => RouteKind::HttpRoute,
            Ok(wire::RouteKind::GrpcRoute) => RouteKind::GrpcRoute,
            _ => {
                return Err(Invalid::new(
                    "source.kind",
                    format_args!("{} is not HTTP_ROUTE or GRPC_ROUTE", message.kind),
                ));
            }
        },
        namespace: message.namespace.clone(),
        name: message.name.clone(),
        rule_index: message.rule_index,
        rule_name: non_empty(&message.rule_name),
    })
}

// ---- matches ----

fn value_match_to_message(value: &ValueMatch) -> wire::ValueMatch {
    use wire::value_match::Kind;
    wire::ValueMatch {
        kind: Some(match value {
            ValueMatch::Exact(exact) => Kind::Exact(exact.clone()),
            ValueMatch::Regex(regex) => Kind::Regex(regex_pattern(regex).to_owned()),
        }),
    }
}

fn value_match_from_message(
    message: Option<&wire::ValueMatch>,
    field: &str,
) -> Checked<ValueMatch> {
    use wire::value_match::Kind;
    match required(message.and_then(|m| m.kind.as_ref()), field)? {
        Kind::Exact(exact) => Ok(ValueMatch::Exact(exact.clone())),
        Kind::Regex(pattern) => ValueMatch::regex(pattern)
            .map_err(|e| Invalid::new(format!("{field}.regex"), format_args!("{pattern:?}: {e}"))),
    }
}

fn header_matches_to_message(headers: &[HeaderMatch]) -> Vec<wire::HeaderMatch> {
    headers
        .iter()
        .map(|m| wire::HeaderMatch {
            name: m.name.as_str().to_owned(),
            value: Some(value_match_to_message(&m.value)),
        })
        .collect()
}

fn header_matches_from_message(headers: &[wire::HeaderMatch]) -> Checked<Vec<HeaderMatch>> {
    each(headers, "headers", |m| {
        Ok(HeaderMatch {
            name: header_name(&m.name, "name")?,
            value: value_match_from_message(m.value.as_ref(), "value")?,
        })
    })
}

fn http_match_to_message(m: &HttpMatch) -> wire::HttpMatch {
    use wire::path_match::Kind;
    wire::HttpMatch {
        path: m.path.as_ref().map(|path| wire::PathMatch {
            kind: Some(match path {
                PathMatch::Exact(exact) => Kind::Exact(exact.clone()),
                PathMatch::Prefix(prefix) => Kind::Prefix(prefix.clone()),
                PathMatch::Regex(regex) => Kind::Regex(regex_pattern(regex).to_owned()),
            }),
        }),
        headers: header_matches_to_message(&m.headers),
        query_params: m
            .query
            .iter()
            .map(|q| wire::QueryMatch {
                name: q.name.clone(),
                value: Some(value_match_to_message(&q.value)),
            })
            .collect(),
        method: m
            .method
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

fn http_match_from_message(message: &wire::HttpMatch) -> Checked<HttpMatch> {
    use wire::path_match::Kind;
    let absolute = |value: &String, field: &str| {
        if value.starts_with('/') {
            Ok(value.clone())
        } else {
            Err(Invalid::new(
                field,
                format_args!("{value:?} does not start with /"),
            ))
        }
    };
    let path = match message.path.as_ref() {
        None => None,
        Some(path) => Some(match required(path.kind.as_ref(), "path")? {
            Kind::Exact(exact) => PathMatch::Exact(absolute(exact, "path.exact")?),
            Kind::Prefix(prefix) => PathMatch::Prefix(absolute(prefix, "path.prefix")?),
            Kind::Regex(pattern) => PathMatch::regex(pattern)
                .map_err(|e| Invalid::new("path.regex", format_args!("{pattern:?}: {e}")))?,
        }),
    };
    Ok(HttpMatch {
        path,
        headers: header_matches_from_message(&message.headers)?,
        query: each(&message.query_params, "query_params", |q| {
            if q.name.is_empty() {
                return Err(Invalid::new("name", "is empty"));
            }
            Ok(QueryMatch {
                name: q.name.clone(),
                value: value_match_from_message(q.value.as_ref(), "value")?,
            })
        })?,
        method: match message.method.as_str() {
            "" => None,
            method => {
                Some(Method::from_bytes(method.as_bytes()).map_err(|_| {
                    Invalid::new("method", format_args!("{method:?} is not a method"))
                })?)
            }
        },
    })
}

fn grpc_match_to_message(m: &GrpcMatch) -> wire::GrpcMatch {
    wire::GrpcMatch {
        service: m.service.as_ref().map(value_match_to_message),
        method: m.method.as_ref().map(value_match_to_message),
        headers: header_matches_to_message(&m.headers),
    }
}

fn grpc_match_from_message(message: &wire::GrpcMatch) -> Checked<GrpcMatch> {
    Ok(GrpcMatch {
        service: message
            .service
            .as_ref()
            .map(|v| value_match_from_message(Some(v), "service"))
            .transpose()?,
        method: message
            .method
            .as_ref()
            .map(|v| value_match_from_message(Some(v), "method"))
            .transpose()?,
        headers: header_matches_from_message(&message.headers)?,
    })
}

// ---- tables and rules ----

/// A compiled route table and its wire message. The wire has a message per kind (prost makes
/// `HttpRouteTable`/`HttpRule` and `GrpcRouteTable`/`GrpcRule` distinct types of the same
/// shape), so the field-by-field conversion of a table and its rules is written once here and
/// implemented for both by [`wire_table!`]; only the match conversion differs.
trait WireTable: Sized {
    type Match;

    fn to_message(table: &compiled::RouteTable<Self::Match>) -> Self;
    fn compiled(&self) -> Checked<compiled::RouteTable<Self::Match>>;
}

macro_rules! wire_table {
    ($table:ident, $rule:ident, $entry:ident, $match:ty, $to:ident, $from:ident) => {
        impl WireTable for wire::$table {
            type Match = $match;

            fn to_message(table: &compiled::RouteTable<$match>) -> wire::$table {
                wire::$table {
                    rules: table
                        .rules
                        .iter()
                        .map(|rule| wire::$rule {
                            source: Some(rule_ref_to_message(&rule.source)),
                            filters: filters_to_message(&rule.filters),
                            backends: backends_to_message(&rule.backends),
                            timeouts: Some(timeouts_to_message(&rule.timeouts)),
                            retry: rule.retry.as_ref().map(retry_to_message),
                        })
                        .collect(),
                    order: table
                        .order
                        .iter()
                        .map(|(rule, m)| wire::$entry {
                            rule: rule_index_to_message(*rule),
                            r#match: Some($to(m)),
                        })
                        .collect(),
                }
            }

            fn compiled(&self) -> Checked<compiled::RouteTable<$match>> {
                let rules = each(&self.rules, "rules", |rule| {
                    Ok(Rule {
                        source: rule_ref_from_message(rule.source.as_ref())?,
                        filters: filters_from_message(&rule.filters)?,
                        backends: backends_from_message(&rule.backends)?,
                        timeouts: timeouts_from_message(rule.timeouts.as_ref()),
                        retry: rule
                            .retry
                            .as_ref()
                            .map(retry_from_message)
                            .transpose()
                            .within("retry")?,
                    })
                })?;
                let order = each(&self.order, "order", |entry| {
                    Ok((
                        rule_index_from_message(entry.rule, rules.len())?,
                        $from(required(entry.r#match.as_ref(), "match")?).within("match")?,
                    ))
                })?;
                Ok(compiled::RouteTable { rules, order })
            }
        }
    };
}

wire_table!(
    HttpRouteTable,
    HttpRule,
    HttpMatchEntry,
    HttpMatch,
    http_match_to_message,
    http_match_from_message
);
wire_table!(
    GrpcRouteTable,
    GrpcRule,
    GrpcMatchEntry,
    GrpcMatch,
    grpc_match_to_message,
    grpc_match_from_message
);

fn rule_index_to_message(rule: usize) -> u32 {
    u32::try_from(rule).unwrap_or(u32::MAX)
}

fn rule_index_from_message(rule: u32, rules: usize) -> Checked<usize> {
    usize::try_from(rule)
        .ok()
        .filter(|rule| *rule < rules)
        .ok_or_else(|| {
            Invalid::new(
                "rule",
                format_args!("{rule} is out of range ({rules} rules)"),
            )
        })
}

fn timeouts_to_message(timeouts: &Timeouts) -> wire::Timeouts {
    wire::Timeouts {
        request_ms: timeouts.request.map(millis),
        backend_request_ms: timeouts.backend_request.map(millis),
        idle_ms: timeouts.idle.map(millis),
    }
}

fn timeouts_from_message(message: Option<&wire::Timeouts>) -> Timeouts {
    let timeout = |ms: Option<u64>| ms.filter(|ms| *ms != 0).map(Duration::from_millis);
    message.map_or_else(Timeouts::default, |t| Timeouts {
        request: timeout(t.request_ms),
        backend_request: timeout(t.backend_request_ms),
        idle: timeout(t.idle_ms),
    })
}

fn retry_to_message(retry: &RetryPolicy) -> wire::Retry {
    wire::Retry {
        attempts: retry.attempts,
        http_codes: retry
            .http_codes
            .iter()
            .map(|code| u32::from(*code))
            .collect(),
        grpc_codes: retry.grpc_codes.iter().copied().collect(),
        backoff_ms: millis(retry.backoff),
        non_idempotent: retry.non_idempotent,
    }
}

fn retry_from_message(message: &wire::Retry) -> Checked<RetryPolicy> {
    let http_codes = each(&message.http_codes, "http_codes", |code| {
        u16::try_from(*code)
            .ok()
            .filter(|code| (400..=599).contains(code))
            .ok_or_else(|| Invalid::new("", format_args!("{code} is not a status 400-599")))
    })?;
    let grpc_codes = each(&message.grpc_codes, "grpc_codes", |code| {
        if *code > MAX_GRPC_CODE {
            return Err(Invalid::new(
                "",
                format_args!("{code} is not a gRPC status (0-16)"),
            ));
        }
        Ok(*code)
    })?;
    Ok(RetryPolicy {
        attempts: message.attempts,
        http_codes: http_codes.into_iter().collect(),
        grpc_codes: grpc_codes.into_iter().collect(),
        backoff: Duration::from_millis(message.backoff_ms),
        non_idempotent: message.non_idempotent,
    })
}

// ---- filters ----

fn filters_to_message(filters: &[Filter]) -> Vec<wire::HttpFilter> {
    use wire::http_filter::Filter as Wire;
    filters
        .iter()
        .map(|filter| wire::HttpFilter {
            filter: Some(match filter {
                Filter::RequestHeaders(m) => {
                    Wire::RequestHeaderModifier(header_modifier_to_message(m))
                }
                Filter::ResponseHeaders(m) => {
                    Wire::ResponseHeaderModifier(header_modifier_to_message(m))
                }
                Filter::Redirect(r) => Wire::RequestRedirect(wire::RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(path_modifier_to_message),
                    port: r.port.map(u32::from),
                    status_code: u32::from(r.status.as_u16()),
                }),
                Filter::Rewrite(r) => Wire::UrlRewrite(wire::UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(path_modifier_to_message),
                }),
                Filter::Mirror(m) => Wire::RequestMirror(wire::RequestMirror {
                    backend: Some(backend_to_message(&m.backend)),
                    numerator: m.numerator,
                    denominator: m.denominator,
                }),
            }),
        })
        .collect()
}

fn filters_from_message(filters: &[wire::HttpFilter]) -> Checked<Vec<Filter>> {
    use wire::http_filter::Filter as Wire;
    each(filters, "filters", |filter| {
        Ok(match required(filter.filter.as_ref(), "")? {
            Wire::RequestHeaderModifier(m) => Filter::RequestHeaders(
                header_modifier_from_message(m).within("request_header_modifier")?,
            ),
            Wire::ResponseHeaderModifier(m) => Filter::ResponseHeaders(
                header_modifier_from_message(m).within("response_header_modifier")?,
            ),
            Wire::RequestRedirect(r) => {
                Filter::Redirect(redirect_from_message(r).within("request_redirect")?)
            }
            Wire::UrlRewrite(r) => Filter::Rewrite(Rewrite {
                hostname: non_empty(&r.hostname),
                path: r
                    .path
                    .as_ref()
                    .map(path_modifier_from_message)
                    .transpose()
                    .within("url_rewrite.path")?,
            }),
            Wire::RequestMirror(m) => {
                Filter::Mirror(mirror_from_message(m).within("request_mirror")?)
            }
        })
    })
}

fn header_modifier_to_message(modifier: &HeaderModifier) -> wire::HeaderModifier {
    let headers = |pairs: &[(HeaderName, HeaderValue)]| {
        pairs
            .iter()
            .map(|(name, value)| wire::Header {
                name: name.as_str().to_owned(),
                value: header_value_text(value),
            })
            .collect()
    };
    wire::HeaderModifier {
        set: headers(&modifier.set),
        add: headers(&modifier.add),
        remove: modifier
            .remove
            .iter()
            .map(|n| n.as_str().to_owned())
            .collect(),
    }
}

fn header_modifier_from_message(message: &wire::HeaderModifier) -> Checked<HeaderModifier> {
    let header = |h: &wire::Header| {
        Ok((
            header_name(&h.name, "name")?,
            HeaderValue::from_str(&h.value).map_err(|_| {
                Invalid::new("value", format_args!("{:?} is not a header value", h.value))
            })?,
        ))
    };
    Ok(HeaderModifier {
        set: each(&message.set, "set", header)?,
        add: each(&message.add, "add", header)?,
        remove: each(&message.remove, "remove", |name| header_name(name, ""))?,
    })
}

fn path_modifier_to_message(modifier: &PathModifier) -> wire::PathModifier {
    use wire::path_modifier::Kind;
    wire::PathModifier {
        kind: Some(match modifier {
            PathModifier::ReplaceFullPath(path) => Kind::ReplaceFullPath(path.clone()),
            PathModifier::ReplacePrefixMatch(path) => Kind::ReplacePrefixMatch(path.clone()),
        }),
    }
}

fn path_modifier_from_message(message: &wire::PathModifier) -> Checked<PathModifier> {
    use wire::path_modifier::Kind;
    Ok(match required(message.kind.as_ref(), "")? {
        Kind::ReplaceFullPath(path) => PathModifier::ReplaceFullPath(path.clone()),
        Kind::ReplacePrefixMatch(path) => PathModifier::ReplacePrefixMatch(path.clone()),
    })
}

fn redirect_from_message(message: &wire::RequestRedirect) -> Checked<Redirect> {
    let status = u16::try_from(message.status_code)
        .ok()
        .filter(|code| REDIRECT_STATUSES.contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| {
            Invalid::new(
                "status_code",
                format_args!("{} is not 301, 302, 303, 307 or 308", message.status_code),
            )
        })?;
    Ok(Redirect {
        scheme: non_empty(&message.scheme),
        hostname: non_empty(&message.hostname),
        path: message
            .path
            .as_ref()
            .map(path_modifier_from_message)
            .transpose()
            .within("path")?,
        port: message.port.map(|p| port(p, "port")).transpose()?,
        status,
    })
}

fn mirror_from_message(message: &wire::RequestMirror) -> Checked<Mirror> {
    if message.denominator == 0 {
        return Err(Invalid::new("denominator", "is 0"));
    }
    if message.numerator > message.denominator {
        return Err(Invalid::new(
            "numerator",
            format_args!(
                "{} is over the denominator {}",
                message.numerator, message.denominator
            ),
        ));
    }
    Ok(Mirror {
        backend: backend_from_message(required(message.backend.as_ref(), "backend")?)
            .within("backend")?,
        numerator: message.numerator,
        denominator: message.denominator,
    })
}

// ---- backends ----

fn backend_to_message(backend: &Backend) -> wire::Backend {
    wire::Backend {
        namespace: backend.service.namespace.clone(),
        name: backend.service.name.clone(),
        port: u32::from(backend.port),
        cluster_ips: backend
            .cluster_ips
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

fn backend_from_message(message: &wire::Backend) -> Checked<Backend> {
    Ok(Backend {
        service: service_ref(&message.namespace, &message.name)?,
        port: port(message.port, "port")?,
        cluster_ips: each(&message.cluster_ips, "cluster_ips", |ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| Invalid::new("", format_args!("{ip:?} is not an IP address")))
        })?,
    })
}

fn backends_to_message(backends: &Backends) -> Vec<wire::WeightedBackend> {
    use wire::weighted_backend::Target;
    backends
        .entries
        .iter()
        .map(|entry| wire::WeightedBackend {
            weight: entry.weight,
            target: Some(match &entry.target {
                BackendTarget::Service(backend) => Target::Backend(backend_to_message(backend)),
                BackendTarget::Invalid(reason) => Target::Invalid(reason.clone()),
            }),
            filters: filters_to_message(&entry.filters),
        })
        .collect()
}

fn backends_from_message(backends: &[wire::WeightedBackend]) -> Checked<Backends> {
    use wire::weighted_backend::Target;
    let entries = each(backends, "backends", |entry| {
        if entry.weight == 0 {
            return Err(Invalid::new("weight", "is 0"));
        }
        Ok(WeightedBackend {
            weight: entry.weight,
            target: match required(entry.target.as_ref(), "target")? {
                Target::Backend(backend) => {
                    BackendTarget::Service(backend_from_message(backend).within("backend")?)
                }
                Target::Invalid(reason) => BackendTarget::Invalid(reason.clone()),
            },
            filters: filters_from_message(&entry.filters)?,
        })
    })?;
    Ok(Backends { entries })
}

// ---- BackendPolicy ----

pub fn backend_policy_to_message(policy: &BackendPolicy) -> wire::BackendPolicy {
    wire::BackendPolicy {
        namespace: policy.service.namespace.clone(),
        name: policy.service.name.clone(),
        source: policy.source.clone(),
        outlier_detection: policy
            .outlier_detection
            .as_ref()
            .map(|o| wire::OutlierDetection {
                consecutive_5xx_errors: o.consecutive_5xx_errors,
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                interval_ms: millis(o.interval),
                base_ejection_time_ms: millis(o.base_ejection_time),
                max_ejection_time_ms: millis(o.max_ejection_time),
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
                failure_percentage: o.failure_percentage.as_ref().map(|f| {
                    wire::FailurePercentage {
                        threshold: f.threshold,
                        request_volume: f.request_volume,
                        minimum_hosts: f.minimum_hosts,
                    }
                }),
            }),
        retry_budget: Some(wire::RetryBudget {
            percent: policy.retry_budget.percent,
            interval_ms: millis(policy.retry_budget.interval),
            min_retry_count: policy.retry_budget.min_retries,
            min_retry_interval_ms: millis(policy.retry_budget.min_interval),
        }),
    }
}

fn backend_policy_from_message(message: &wire::BackendPolicy) -> Result<BackendPolicy, RouteError> {
    let checked = || -> Checked<BackendPolicy> {
        let budget = required(message.retry_budget.as_ref(), "retry_budget")?;
        Ok(BackendPolicy {
            service: service_ref(&message.namespace, &message.name)?,
            source: message.source.clone(),
            outlier_detection: message
                .outlier_detection
                .as_ref()
                .map(outlier_detection_from_message)
                .transpose()
                .within("outlier_detection")?,
            retry_budget: RetryBudget {
                percent: budget.percent,
                interval: positive_millis(budget.interval_ms, "retry_budget.interval_ms")?,
                min_retries: budget.min_retry_count,
                min_interval: positive_millis(
                    budget.min_retry_interval_ms,
                    "retry_budget.min_retry_interval_ms",
                )?,
            },
        })
    };
    checked().map_err(|invalid| invalid.of_entry(format!("{}/{}", message.namespace, message.name)))
}

fn outlier_detection_from_message(message: &wire::OutlierDetection) -> Checked<OutlierDetection> {
    let base_ejection_time =
        positive_millis(message.base_ejection_time_ms, "base_ejection_time_ms")?;
    let max_ejection_time = positive_millis(message.max_ejection_time_ms, "max_ejection_time_ms")?;
    if max_ejection_time < base_ejection_time {
        return Err(Invalid::new(
            "max_ejection_time_ms",
            format_args!(
                "{} is under base_ejection_time_ms {}",
                message.max_ejection_time_ms, message.base_ejection_time_ms
            ),
        ));
    }
    Ok(OutlierDetection {
        consecutive_5xx_errors: message.consecutive_5xx_errors,
        consecutive_gateway_errors: message.consecutive_gateway_errors,
        interval: positive_millis(message.interval_ms, "interval_ms")?,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: percent(message.max_ejection_percent, "max_ejection_percent")?,
        min_health_percent: percent(message.min_health_percent, "min_health_percent")?,
        failure_percentage: message
            .failure_percentage
            .as_ref()
            .map(|f| {
                Ok(FailurePercentage {
                    threshold: percent(f.threshold, "failure_percentage.threshold")?,
                    request_volume: f.request_volume,
                    minimum_hosts: f.minimum_hosts,
                })
            })
            .transpose()?,
    })
}

// ---- InboundPolicy ----

pub fn inbound_policy_to_message(policy: &InboundPolicy) -> wire::InboundPolicy {
    let limit = |limit: &Limit| wire::Limit {
        requests: limit.requests,
        period_ms: millis(limit.period),
        burst: limit.burst,
    };
    wire::InboundPolicy {
        namespace: policy.key.service.namespace.clone(),
        name: policy.key.service.name.clone(),
        port: u32::from(policy.key.port),
        limits: policy
            .limits
            .iter()
            .map(|l| wire::LocalRateLimit {
                source: l.source.clone(),
                http_matches: l.http_matches.iter().map(http_match_to_message).collect(),
                grpc_matches: l.grpc_matches.iter().map(grpc_match_to_message).collect(),
                total: l.total.as_ref().map(limit),
                per_identity: l.per_identity.as_ref().map(limit),
                overrides: l
                    .overrides
                    .iter()
                    .map(|o| wire::IdentityOverride {
                        spiffe_ids: o.clients.iter().map(ToString::to_string).collect(),
                        limit: Some(limit(&o.limit)),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn limit_from_message(message: &wire::Limit) -> Checked<Limit> {
    Ok(Limit {
        requests: message.requests,
        period: positive_millis(message.period_ms, "period_ms")?,
        burst: message.burst,
    })
}

fn inbound_policy_from_message(message: &wire::InboundPolicy) -> Result<InboundPolicy, RouteError> {
    let checked = || -> Checked<InboundPolicy> {
        Ok(InboundPolicy {
            key: PortKey {
                service: service_ref(&message.namespace, &message.name)?,
                port: port(message.port, "port")?,
            },
            limits: each(&message.limits, "limits", |l| {
                Ok(LocalRateLimit {
                    source: l.source.clone(),
                    http_matches: each(&l.http_matches, "http_matches", http_match_from_message)?,
                    grpc_matches: each(&l.grpc_matches, "grpc_matches", grpc_match_from_message)?,
                    total: l
                        .total
                        .as_ref()
                        .map(limit_from_message)
                        .transpose()
                        .within("total")?,
                    per_identity: l
                        .per_identity
                        .as_ref()
                        .map(limit_from_message)
                        .transpose()
                        .within("per_identity")?,
                    overrides: each(&l.overrides, "overrides", |o| {
                        Ok(IdentityOverride {
                            clients: each(&o.spiffe_ids, "spiffe_ids", |id| {
                                SpiffeId::parse(id)
                                    .map_err(|e| Invalid::new("", format_args!("{id:?}: {e}")))
                            })?
                            .into_iter()
                            .collect::<BTreeSet<_>>(),
                            limit: limit_from_message(required(o.limit.as_ref(), "limit")?)
                                .within("limit")?,
                        })
                    })?,
                })
            })?,
        })
    };
    checked().map_err(|invalid| {
        invalid.of_entry(format!(
            "{}/{}:{}",
            message.namespace, message.name, message.port
        ))
    })
}

#[cfg(test)]
mod tests;
