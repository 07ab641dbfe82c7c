//! The rules of one route: its Service parents attached, each rule compiled or dropped with the
//! Gateway API's reason, each backendRef resolved. What the CRDs' CEL rules refuse is refused
//! here too, because the objects may come from a file or an API server that runs no CEL.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::annotations::RouteAnnotations;
use super::{Catalog, CheckedRoute, Problem, RuleOutcome};
use crate::compiled::{
    Backend, BackendTarget, Backends, Filter, GrpcMatch, HeaderMatch, HeaderModifier, HttpMatch,
    Mirror, PathMatch, PathModifier, PortKey, QueryMatch, Redirect, RetryPolicy, Rewrite,
    RouteKind, Rule, RuleRef, ServiceRef, Timeouts, ValueMatch, WeightedBackend,
};
use crate::model::{
    BackendObjectReference, BackendRef, GrpcRoute, GrpcRouteMatch, GrpcRouteRule, HeaderFilter,
    HttpRoute, HttpRouteMatch, HttpRouteRetry, HttpRouteRule, HttpRouteTimeouts, Meta,
    MirrorFilter, ParentReference, PathModifierSpec, RedirectFilter, RewriteFilter, RouteFilter,
    ValueMatchSpec, is_core_service, parse_duration,
};

const UNSUPPORTED: &str = "UnsupportedValue";
const INCOMPATIBLE: &str = "IncompatibleFilters";

/// Minimum wait before a retry when a route gives none: Envoy's default `base_interval` (the
/// proxy GEP-1731 was written against), so that a retry does not hit a backend that has just
/// failed within the same millisecond.
pub(crate) const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// What every check of one route reads.
struct RouteContext<'a> {
    kind: RouteKind,
    meta: &'a Meta,
    catalog: &'a Catalog,
}

pub(super) fn check_http_route<'a>(
    route: &'a HttpRoute,
    catalog: &'a Catalog,
) -> CheckedRoute<'a, HttpMatch> {
    // The CRD's default: one rule matching every request, with no backend (answered 500).
    let default_rule = [HttpRouteRule::default()];
    let rules = if route.spec.rules.is_empty() {
        &default_rule[..]
    } else {
        &route.spec.rules
    };
    check_route(
        &route.meta,
        catalog,
        &route.spec.hostnames,
        &route.spec.parent_refs,
        rules,
    )
}

pub(super) fn check_grpc_route<'a>(
    route: &'a GrpcRoute,
    catalog: &'a Catalog,
) -> CheckedRoute<'a, GrpcMatch> {
    check_route(
        &route.meta,
        catalog,
        &route.spec.hostnames,
        &route.spec.parent_refs,
        &route.spec.rules,
    )
}

fn check_route<'a, R: RuleSpec>(
    meta: &'a Meta,
    catalog: &'a Catalog,
    hostnames: &[String],
    parent_refs: &[ParentReference],
    rules: &[R],
) -> CheckedRoute<'a, R::Match> {
    let cx = RouteContext {
        kind: R::KIND,
        meta,
        catalog,
    };
    let mut notes = hostname_notes(hostnames);
    let annotations = RouteAnnotations::parse(&meta.annotations, cx.kind, &mut notes);
    let mut unresolved = Vec::new();
    let rules = (rules.iter().enumerate())
        .map(|(i, rule)| check_rule(&cx, i, rule, &annotations, &mut unresolved))
        .collect();
    CheckedRoute {
        kind: cx.kind,
        meta: cx.meta,
        parents: check_parents(&cx, parent_refs),
        rules,
        unresolved,
        notes,
    }
}

fn hostname_notes(hostnames: &[String]) -> Vec<String> {
    if hostnames.is_empty() {
        Vec::new()
    } else {
        vec!["spec.hostnames is not used for Service parents".to_owned()]
    }
}

// ---- parents ----

fn check_parents(
    cx: &RouteContext<'_>,
    parents: &[ParentReference],
) -> Vec<(usize, Result<Vec<PortKey>, Problem>)> {
    (parents.iter().enumerate())
        .filter(|(_, parent)| parent.is_service())
        .map(|(i, parent)| (i, attach(cx, &format!("spec.parentRefs[{i}]"), parent)))
        .collect()
}

/// The ports of a Service parent: `port`, or the port named `sectionName`, or every port. A
/// parent in another namespace is a consumer route's and needs no ReferenceGrant (GAMMA).
fn attach(
    cx: &RouteContext<'_>,
    path: &str,
    parent: &ParentReference,
) -> Result<Vec<PortKey>, Problem> {
    const NO_PARENT: &str = "NoMatchingParent";
    let service = ServiceRef {
        namespace: (parent.namespace.clone()).unwrap_or_else(|| cx.meta.namespace.clone()),
        name: parent.name.clone(),
    };
    let Some(info) = cx.catalog.services.get(&service) else {
        return Err(Problem::new(
            NO_PARENT,
            path,
            format!("Service {service} not found"),
        ));
    };
    if !info.meshed {
        return Err(Problem::new(
            NO_PARENT,
            path,
            format!(
                "Service {service} is not in the sigil mesh; sigil routes apply to meshed Services"
            ),
        ));
    }
    let ports: Vec<PortKey> = (info.ports.iter())
        .filter(|p| parent.port.is_none_or(|want| want == p.port))
        .filter(|p| (parent.section_name.as_ref()).is_none_or(|want| *want == p.name))
        .map(|p| PortKey {
            service: service.clone(),
            port: p.port,
        })
        .collect();
    if ports.is_empty() {
        let mut wanted = Vec::new();
        if let Some(port) = parent.port {
            wanted.push(format!("port {port}"));
        }
        if let Some(name) = &parent.section_name {
            wanted.push(format!("sectionName {name:?}"));
        }
        return Err(Problem::new(
            NO_PARENT,
            path,
            format!(
                "{} matches no port of Service {service}",
                wanted.join(" and ")
            ),
        ));
    }
    Ok(ports)
}

// ---- backends ----

/// A backendRef's Service port, or why it does not resolve (the Gateway API's ResolvedRefs
/// reasons).
fn resolve_backend(
    cx: &RouteContext<'_>,
    path: &str,
    target: &BackendObjectReference,
) -> Result<Backend, Problem> {
    if !is_core_service(&target.group, &target.kind) {
        return Err(Problem::new(
            "InvalidKind",
            path,
            format!(
                "{}/{} is not a Service (group \"\", kind Service)",
                if target.group.is_empty() {
                    "core"
                } else {
                    &target.group
                },
                target.kind
            ),
        ));
    }
    let service = ServiceRef {
        namespace: (target.namespace.clone()).unwrap_or_else(|| cx.meta.namespace.clone()),
        name: target.name.clone(),
    };
    let not_found = |what: String| Problem::new("BackendNotFound", path, what);
    let Some(info) = cx.catalog.services.get(&service) else {
        return Err(not_found(format!("Service {service} not found")));
    };
    let Some(port) = target.port else {
        return Err(not_found(format!(
            "port is required to refer to Service {service}"
        )));
    };
    let Some(service_port) = info.ports.iter().find(|p| p.port == port) else {
        return Err(not_found(format!("port {port} is not a port of {service}")));
    };
    if let Some(protocol) = &service_port.app_protocol
        && is_opaque(protocol)
    {
        return Err(Problem::new(
            "UnsupportedProtocol",
            path,
            format!(
                "port {port} of {service} is declared opaque (appProtocol {protocol}); routes carry HTTP"
            ),
        ));
    }
    if !info.meshed && info.cluster_ips.is_empty() {
        return Err(not_found(format!(
            "Service {service} is neither in the sigil mesh nor has a cluster IP"
        )));
    }
    Ok(Backend {
        service,
        port,
        cluster_ips: if info.meshed {
            Vec::new()
        } else {
            info.cluster_ips.clone()
        },
    })
}

/// The `appProtocol` values sigil carries as bytes (README, "Protocols"): no HTTP request can be
/// routed to them.
fn is_opaque(app_protocol: &str) -> bool {
    matches!(
        app_protocol.to_ascii_lowercase().as_str(),
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis"
    )
}

/// The weighted backends of a rule: invalid ones become [`BackendTarget::Invalid`] (their
/// share is answered 500), weight-0 ones are left out.
fn backends(
    cx: &RouteContext<'_>,
    rule_path: &str,
    refs: &[BackendRef],
    problems: &mut Vec<Problem>,
    unresolved: &mut Vec<Problem>,
) -> Backends {
    let mut entries = Vec::new();
    for (k, backend) in refs.iter().enumerate() {
        let path = format!("{rule_path}.backendRefs[{k}]");
        let weight = u32::try_from(backend.weight)
            .ok()
            .filter(|w| *w <= 1_000_000);
        let Some(weight) = weight else {
            problems.push(Problem::new(
                UNSUPPORTED,
                &path,
                "weight must be 0 to 1000000",
            ));
            continue;
        };
        let mut filters = Vec::new();
        for (f, filter) in backend.filters.iter().enumerate() {
            let path = format!("{path}.filters[{f}]");
            match header_filter(&path, filter) {
                Ok(Some(header_filter)) => filters.push(header_filter),
                Ok(None) => problems.push(Problem::new(
                    UNSUPPORTED,
                    &path,
                    format!(
                        "filter type {:?} is not supported on a backendRef (RequestHeaderModifier and ResponseHeaderModifier are)",
                        filter.type_
                    ),
                )),
                Err(problem) => problems.push(problem),
            }
        }
        let target = match resolve_backend(cx, &path, &backend.target) {
            Ok(backend) => BackendTarget::Service(backend),
            Err(problem) => {
                let target = BackendTarget::Invalid(problem.message.clone());
                unresolved.push(problem);
                target
            }
        };
        if weight > 0 {
            entries.push(WeightedBackend {
                weight,
                target,
                filters,
            });
        }
    }
    Backends { entries }
}

// ---- rules ----

fn rule_ref(cx: &RouteContext<'_>, index: usize, name: &Option<String>) -> RuleRef {
    RuleRef {
        kind: cx.kind,
        namespace: cx.meta.namespace.clone(),
        name: cx.meta.name.clone(),
        rule_index: u32::try_from(index).unwrap_or(u32::MAX),
        rule_name: name.clone(),
    }
}

/// What [`check_rule`] reads of an HTTPRoute or a GRPCRoute rule, and the checks and
/// policies that only one kind has.
trait RuleSpec {
    const KIND: RouteKind;
    /// A match as the object spells it; its `Default` is the CRD's match for a rule without
    /// matches.
    type MatchSpec: Default;
    type Match;

    fn name(&self) -> &Option<String>;
    fn matches(&self) -> &[Self::MatchSpec];
    fn filters(&self) -> &[RouteFilter];
    fn backend_refs(&self) -> &[BackendRef];
    fn check_match(path: &str, m: &Self::MatchSpec) -> Result<Self::Match, Vec<Problem>>;
    /// The kind's own checks of the filters against the rule and its matches.
    fn check_filters(
        &self,
        path: &str,
        match_specs: &[Self::MatchSpec],
        filters: &[Filter],
        problems: &mut Vec<Problem>,
    );
    /// The rule's timeouts and retry policy.
    fn policies(
        &self,
        path: &str,
        annotations: &RouteAnnotations,
        problems: &mut Vec<Problem>,
    ) -> (Timeouts, Option<RetryPolicy>);
}

fn check_rule<R: RuleSpec>(
    cx: &RouteContext<'_>,
    index: usize,
    rule: &R,
    annotations: &RouteAnnotations,
    unresolved: &mut Vec<Problem>,
) -> RuleOutcome<R::Match> {
    let path = format!("spec.rules[{index}]");
    let mut problems = Vec::new();
    let default_match = [R::MatchSpec::default()];
    let match_specs = if rule.matches().is_empty() {
        &default_match[..]
    } else {
        rule.matches()
    };
    let mut matches = Vec::new();
    for (j, m) in match_specs.iter().enumerate() {
        match R::check_match(&format!("{path}.matches[{j}]"), m) {
            Ok(m) => matches.push(m),
            Err(mut p) => problems.append(&mut p),
        }
    }
    let filters = rule_filters(
        cx,
        &path,
        rule.filters(),
        R::KIND,
        &mut problems,
        unresolved,
    );
    rule.check_filters(&path, match_specs, &filters, &mut problems);
    let backends = backends(cx, &path, rule.backend_refs(), &mut problems, unresolved);
    let (timeouts, retry) = rule.policies(&path, annotations, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok((
        Rule {
            source: rule_ref(cx, index, rule.name()),
            filters,
            backends,
            timeouts,
            retry,
        },
        matches,
    ))
}

impl RuleSpec for HttpRouteRule {
    const KIND: RouteKind = RouteKind::HttpRoute;
    /// PathPrefix `/`.
    type MatchSpec = HttpRouteMatch;
    type Match = HttpMatch;

    fn name(&self) -> &Option<String> {
        &self.name
    }

    fn matches(&self) -> &[HttpRouteMatch] {
        &self.matches
    }

    fn filters(&self) -> &[RouteFilter] {
        &self.filters
    }

    fn backend_refs(&self) -> &[BackendRef] {
        &self.backend_refs
    }

    fn check_match(path: &str, m: &HttpRouteMatch) -> Result<HttpMatch, Vec<Problem>> {
        http_match(path, m)
    }

    fn check_filters(
        &self,
        path: &str,
        match_specs: &[HttpRouteMatch],
        filters: &[Filter],
        problems: &mut Vec<Problem>,
    ) {
        let has = |type_: &str| self.filters.iter().any(|f| f.type_ == type_);
        if has("RequestRedirect") && has("URLRewrite") {
            problems.push(Problem::new(
                INCOMPATIBLE,
                path,
                "RequestRedirect and URLRewrite cannot be used in one rule",
            ));
        }
        if has("RequestRedirect") && !self.backend_refs.is_empty() {
            problems.push(Problem::new(
                INCOMPATIBLE,
                path,
                "RequestRedirect cannot be used with backendRefs",
            ));
        }
        let replaces_prefix = filters.iter().any(|f| {
            let modifier = match f {
                Filter::Redirect(r) => r.path.as_ref(),
                Filter::Rewrite(r) => r.path.as_ref(),
                _ => None,
            };
            matches!(modifier, Some(PathModifier::ReplacePrefixMatch(_)))
        });
        if replaces_prefix && !(match_specs.len() == 1 && match_specs[0].path.type_ == "PathPrefix")
        {
            problems.push(Problem::new(
                UNSUPPORTED,
                path,
                "ReplacePrefixMatch needs exactly one match, of type PathPrefix",
            ));
        }
    }

    fn policies(
        &self,
        path: &str,
        annotations: &RouteAnnotations,
        problems: &mut Vec<Problem>,
    ) -> (Timeouts, Option<RetryPolicy>) {
        let timeouts = http_timeouts(path, self.timeouts.as_ref(), annotations, problems);
        let retry = http_retry(path, self.retry.as_ref(), annotations, problems);
        (timeouts, retry)
    }
}

/// A GRPCRoute has no filter combination to refuse, and its timeouts and retry policy come
/// from the annotations only.
impl RuleSpec for GrpcRouteRule {
    const KIND: RouteKind = RouteKind::GrpcRoute;
    /// Every request.
    type MatchSpec = GrpcRouteMatch;
    type Match = GrpcMatch;

    fn name(&self) -> &Option<String> {
        &self.name
    }

    fn matches(&self) -> &[GrpcRouteMatch] {
        &self.matches
    }

    fn filters(&self) -> &[RouteFilter] {
        &self.filters
    }

    fn backend_refs(&self) -> &[BackendRef] {
        &self.backend_refs
    }

    fn check_match(path: &str, m: &GrpcRouteMatch) -> Result<GrpcMatch, Vec<Problem>> {
        grpc_match(path, m)
    }

    fn check_filters(&self, _: &str, _: &[GrpcRouteMatch], _: &[Filter], _: &mut Vec<Problem>) {}

    fn policies(
        &self,
        _: &str,
        annotations: &RouteAnnotations,
        _: &mut Vec<Problem>,
    ) -> (Timeouts, Option<RetryPolicy>) {
        (annotations.timeouts, annotations.retry.clone())
    }
}

/// An HTTPRoute rule's `timeouts`, else the annotations'; the idle timeout always from
/// `timeout.sigil.dev/idle`.
fn http_timeouts(
    path: &str,
    timeouts: Option<&HttpRouteTimeouts>,
    annotations: &RouteAnnotations,
    problems: &mut Vec<Problem>,
) -> Timeouts {
    match timeouts {
        Some(t) => {
            let request = field_duration(&format!("{path}.timeouts.request"), &t.request, problems);
            let backend_request = field_duration(
                &format!("{path}.timeouts.backendRequest"),
                &t.backend_request,
                problems,
            );
            if let (Some(request), Some(backend)) = (request, backend_request)
                && !request.is_zero()
                && backend > request
            {
                problems.push(Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.timeouts.backendRequest"),
                    "must not be longer than timeouts.request",
                ));
            }
            Timeouts {
                request: request.filter(|d| !d.is_zero()),
                backend_request: backend_request.filter(|d| !d.is_zero()),
                idle: annotations.timeouts.idle,
            }
        }
        None => annotations.timeouts,
    }
}

/// An HTTPRoute rule's `retry` (GEP-1731: `attempts` 1 when not given, backoff
/// [`DEFAULT_RETRY_BACKOFF`]), else the annotations'.
fn http_retry(
    path: &str,
    retry: Option<&HttpRouteRetry>,
    annotations: &RouteAnnotations,
    problems: &mut Vec<Problem>,
) -> Option<RetryPolicy> {
    match retry {
        Some(retry) => {
            let path = format!("{path}.retry");
            let attempts = match retry.attempts.map(u32::try_from) {
                None => 1,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    problems.push(Problem::new(
                        UNSUPPORTED,
                        &format!("{path}.attempts"),
                        "must not be negative",
                    ));
                    0
                }
            };
            let mut http_codes = BTreeSet::new();
            for (c, code) in retry.codes.iter().enumerate() {
                match u16::try_from(*code) {
                    Ok(code @ 400..=599) => {
                        http_codes.insert(code);
                    }
                    _ => problems.push(Problem::new(
                        UNSUPPORTED,
                        &format!("{path}.codes[{c}]"),
                        format!("{code} is not a status code from 400 to 599"),
                    )),
                }
            }
            let backoff = field_duration(&format!("{path}.backoff"), &retry.backoff, problems);
            (attempts > 0).then(|| RetryPolicy {
                attempts,
                http_codes,
                grpc_codes: BTreeSet::new(),
                backoff: backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
                non_idempotent: annotations.non_idempotent,
            })
        }
        None => annotations.retry.clone(),
    }
}

/// A duration field: `None` when absent; a problem when not GEP-2257.
fn field_duration(
    path: &str,
    value: &Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    let value = value.as_ref()?;
    parse_duration(value)
        .map_err(|e| problems.push(Problem::new(UNSUPPORTED, path, e)))
        .ok()
}

// ---- matches ----

fn http_match(path: &str, m: &HttpRouteMatch) -> Result<HttpMatch, Vec<Problem>> {
    let mut problems = Vec::new();
    let path_path = format!("{path}.path");
    let value = &m.path.value;
    let path_match = match m.path.type_.as_str() {
        "Exact" | "PathPrefix" => match path_value_problem(value) {
            Some(why) => {
                problems.push(Problem::new(
                    UNSUPPORTED,
                    &format!("{path_path}.value"),
                    why,
                ));
                None
            }
            None if m.path.type_ == "Exact" => Some(PathMatch::Exact(value.clone())),
            None => Some(PathMatch::Prefix(value.clone())),
        },
        "RegularExpression" => match PathMatch::regex(value) {
            Ok(regex) => Some(regex),
            Err(e) => {
                problems.push(Problem::new(
                    UNSUPPORTED,
                    &format!("{path_path}.value"),
                    regex_problem(e),
                ));
                None
            }
        },
        other => {
            problems.push(Problem::new(
                UNSUPPORTED,
                &format!("{path_path}.type"),
                format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
            ));
            None
        }
    };
    let headers = header_matches(&format!("{path}.headers"), &m.headers, &mut problems);
    let mut query = Vec::new();
    let mut seen = BTreeSet::new();
    for (q, spec) in m.query_params.iter().enumerate() {
        let path = format!("{path}.queryParams[{q}]");
        if spec.name.is_empty() {
            problems.push(Problem::new(
                UNSUPPORTED,
                &format!("{path}.name"),
                "must not be empty",
            ));
            continue;
        }
        // "only the first entry with an equivalent name MUST be considered"
        if !seen.insert(spec.name.clone()) {
            continue;
        }
        if let Some(value) = value_match(&path, spec, &mut problems) {
            query.push(QueryMatch {
                name: spec.name.clone(),
                value,
            });
        }
    }
    let method = match &m.method {
        None => None,
        Some(name) => {
            const METHODS: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if METHODS.contains(&name.as_str()) {
                Method::from_bytes(name.as_bytes()).ok()
            } else {
                problems.push(Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.method"),
                    format!("{name:?} is not one of {}", METHODS.join(", ")),
                ));
                None
            }
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(HttpMatch {
        path: path_match,
        headers,
        query,
        method,
    })
}

/// Why an Exact or PathPrefix value is refused (the CRD's CEL rules on `HTTPPathMatch`).
fn path_value_problem(value: &str) -> Option<&'static str> {
    if !value.starts_with('/') {
        return Some("must be an absolute path starting with /");
    }
    if value.len() > 1024 {
        return Some("must be at most 1024 characters");
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Some("must not contain //, /./, /../, %2f, %2F or #");
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return Some("must not end with /.. or /.");
    }
    None
}

fn regex_problem(e: regex::Error) -> String {
    let detail = e
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!("not a valid RE2 regular expression within 64 KiB compiled: {detail}")
}

/// Header matches; of several entries with one name (case-insensitive), only the first counts
/// (the Gateway API's rule).
fn header_matches(
    path: &str,
    specs: &[ValueMatchSpec],
    problems: &mut Vec<Problem>,
) -> Vec<HeaderMatch> {
    let mut headers = Vec::new();
    let mut seen = HashSet::new();
    for (h, spec) in specs.iter().enumerate() {
        let path = format!("{path}[{h}]");
        let Ok(name) = HeaderName::from_bytes(spec.name.as_bytes()) else {
            problems.push(Problem::new(
                UNSUPPORTED,
                &format!("{path}.name"),
                format!("{:?} is not a valid header name", spec.name),
            ));
            continue;
        };
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(value) = value_match(&path, spec, problems) {
            headers.push(HeaderMatch { name, value });
        }
    }
    headers
}

fn value_match(
    path: &str,
    spec: &ValueMatchSpec,
    problems: &mut Vec<Problem>,
) -> Option<ValueMatch> {
    match spec.type_.as_str() {
        "Exact" => Some(ValueMatch::Exact(spec.value.clone())),
        "RegularExpression" => ValueMatch::regex(&spec.value)
            .map_err(|e| {
                problems.push(Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.value"),
                    regex_problem(e),
                ))
            })
            .ok(),
        other => {
            problems.push(Problem::new(
                UNSUPPORTED,
                &format!("{path}.type"),
                format!("{other:?} is not Exact or RegularExpression"),
            ));
            None
        }
    }
}

fn grpc_match(path: &str, m: &GrpcRouteMatch) -> Result<GrpcMatch, Vec<Problem>> {
    let mut problems = Vec::new();
    let (mut service, mut method) = (None, None);
    if let Some(spec) = &m.method {
        let path = format!("{path}.method");
        if spec.service.is_none() && spec.method.is_none() {
            problems.push(Problem::new(
                UNSUPPORTED,
                &path,
                "one or both of service and method must be given",
            ));
        }
        let part = |field: &str,
                    value: &Option<String>,
                    valid: fn(&str) -> bool,
                    problems: &mut Vec<Problem>| {
            let value = value.as_ref()?;
            let path = format!("{path}.{field}");
            match spec.type_.as_str() {
                "Exact" if valid(value) => Some(ValueMatch::Exact(value.clone())),
                "Exact" => {
                    problems.push(Problem::new(
                        UNSUPPORTED,
                        &path,
                        format!("{value:?} is not a gRPC {field} name"),
                    ));
                    None
                }
                "RegularExpression" => ValueMatch::regex(value)
                    .map_err(|e| problems.push(Problem::new(UNSUPPORTED, &path, regex_problem(e))))
                    .ok(),
                other => {
                    problems.push(Problem::new(
                        UNSUPPORTED,
                        &format!("{path}.type"),
                        format!("{other:?} is not Exact or RegularExpression"),
                    ));
                    None
                }
            }
        };
        service = part("service", &spec.service, is_grpc_service, &mut problems);
        method = part("method", &spec.method, is_grpc_method, &mut problems);
    }
    let headers = header_matches(&format!("{path}.headers"), &m.headers, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(GrpcMatch {
        service,
        method,
        headers,
    })
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The CRD's pattern for an Exact service: dot-separated identifiers, an optional leading dot.
fn is_grpc_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    s.split('.').all(is_identifier)
}

fn is_grpc_method(s: &str) -> bool {
    is_identifier(s)
}

// ---- filters ----

/// The filters of a rule in spec order. A mirror whose backendRef does not resolve is left out
/// (and reported in ResolvedRefs); the rule is kept.
fn rule_filters(
    cx: &RouteContext<'_>,
    rule_path: &str,
    specs: &[RouteFilter],
    kind: RouteKind,
    problems: &mut Vec<Problem>,
    unresolved: &mut Vec<Problem>,
) -> Vec<Filter> {
    let allowed: &[&str] = match kind {
        RouteKind::HttpRoute => &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestRedirect",
            "URLRewrite",
            "RequestMirror",
        ],
        RouteKind::GrpcRoute => &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
        ],
    };
    let mut filters = Vec::new();
    let mut seen = BTreeSet::new();
    for (f, spec) in specs.iter().enumerate() {
        let path = format!("{rule_path}.filters[{f}]");
        if spec.type_ == "ExtensionRef" {
            problems.push(Problem::new(
                UNSUPPORTED,
                &path,
                "ExtensionRef filters are not supported by sigil",
            ));
            continue;
        }
        if !allowed.contains(&spec.type_.as_str()) {
            problems.push(Problem::new(
                UNSUPPORTED,
                &path,
                format!(
                    "filter type {:?} is not supported by sigil on a {kind} rule",
                    spec.type_
                ),
            ));
            continue;
        }
        // Only RequestMirror may repeat (the CRDs' CEL rules).
        if spec.type_ != "RequestMirror" && !seen.insert(spec.type_.clone()) {
            problems.push(Problem::new(
                INCOMPATIBLE,
                &path,
                format!("{} may appear only once in a rule", spec.type_),
            ));
            continue;
        }
        let filter = match spec.type_.as_str() {
            "RequestRedirect" => required(&path, "requestRedirect", &spec.request_redirect)
                .and_then(|r| redirect(&format!("{path}.requestRedirect"), r).map(Filter::Redirect))
                .map(Some),
            "URLRewrite" => required(&path, "urlRewrite", &spec.url_rewrite)
                .and_then(|r| rewrite(&format!("{path}.urlRewrite"), r).map(Filter::Rewrite))
                .map(Some),
            "RequestMirror" => required(&path, "requestMirror", &spec.request_mirror)
                .and_then(|m| mirror(cx, &format!("{path}.requestMirror"), m, unresolved)),
            _ => header_filter(&path, spec),
        };
        match filter {
            Ok(Some(filter)) => filters.push(filter),
            Ok(None) => {}
            Err(problem) => problems.push(problem),
        }
    }
    filters
}

fn required<'s, T>(path: &str, field: &str, value: &'s Option<T>) -> Result<&'s T, Problem> {
    value.as_ref().ok_or_else(|| {
        Problem::new(
            UNSUPPORTED,
            &format!("{path}.{field}"),
            "must be given for this filter type",
        )
    })
}

/// A RequestHeaderModifier or ResponseHeaderModifier filter; `None` for another type.
fn header_filter(path: &str, spec: &RouteFilter) -> Result<Option<Filter>, Problem> {
    match spec.type_.as_str() {
        "RequestHeaderModifier" => {
            let h = required(path, "requestHeaderModifier", &spec.request_header_modifier)?;
            header_modifier(&format!("{path}.requestHeaderModifier"), h)
                .map(|m| Some(Filter::RequestHeaders(m)))
        }
        "ResponseHeaderModifier" => {
            let h = required(
                path,
                "responseHeaderModifier",
                &spec.response_header_modifier,
            )?;
            header_modifier(&format!("{path}.responseHeaderModifier"), h)
                .map(|m| Some(Filter::ResponseHeaders(m)))
        }
        _ => Ok(None),
    }
}

fn header_modifier(path: &str, spec: &HeaderFilter) -> Result<HeaderModifier, Problem> {
    let name = |path: &str, name: &str, seen: &mut HashSet<HeaderName>| {
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            Problem::new(
                UNSUPPORTED,
                path,
                format!("{name:?} is not a valid header name"),
            )
        })?;
        if !seen.insert(parsed.clone()) {
            return Err(Problem::new(
                UNSUPPORTED,
                path,
                format!("header {name:?} is named twice"),
            ));
        }
        Ok(parsed)
    };
    let pairs = |field: &str, list: &[crate::model::HeaderNameValue]| {
        let mut seen = HashSet::new();
        (list.iter().enumerate())
            .map(|(i, h)| {
                let path = format!("{path}.{field}[{i}]");
                let header = name(&format!("{path}.name"), &h.name, &mut seen)?;
                let value = HeaderValue::from_str(&h.value).map_err(|_| {
                    Problem::new(
                        UNSUPPORTED,
                        &format!("{path}.value"),
                        "not a valid header value",
                    )
                })?;
                Ok((header, value))
            })
            .collect::<Result<Vec<_>, Problem>>()
    };
    let mut seen = HashSet::new();
    let remove = (spec.remove.iter().enumerate())
        .map(|(i, h)| name(&format!("{path}.remove[{i}]"), h, &mut seen))
        .collect::<Result<Vec<_>, Problem>>()?;
    Ok(HeaderModifier {
        set: pairs("set", &spec.set)?,
        add: pairs("add", &spec.add)?,
        remove,
    })
}

fn path_modifier(path: &str, spec: &PathModifierSpec) -> Result<PathModifier, Problem> {
    match spec.type_.as_str() {
        "ReplaceFullPath" => spec
            .replace_full_path
            .clone()
            .map(PathModifier::ReplaceFullPath)
            .ok_or_else(|| {
                Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.replaceFullPath"),
                    "must be given for type ReplaceFullPath",
                )
            }),
        "ReplacePrefixMatch" => spec
            .replace_prefix_match
            .clone()
            .map(PathModifier::ReplacePrefixMatch)
            .ok_or_else(|| {
                Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.replacePrefixMatch"),
                    "must be given for type ReplacePrefixMatch",
                )
            }),
        other => Err(Problem::new(
            UNSUPPORTED,
            &format!("{path}.type"),
            format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn redirect(path: &str, spec: &RedirectFilter) -> Result<Redirect, Problem> {
    if let Some(scheme) = &spec.scheme
        && scheme != "http"
        && scheme != "https"
    {
        return Err(Problem::new(
            UNSUPPORTED,
            &format!("{path}.scheme"),
            format!("{scheme:?} is not http or https"),
        ));
    }
    let port = match spec.port {
        None => None,
        Some(port) => Some(u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| {
            Problem::new(
                UNSUPPORTED,
                &format!("{path}.port"),
                format!("{port} is not a port"),
            )
        })?),
    };
    let status = match spec.status_code {
        301 | 302 | 303 | 307 | 308 => u16::try_from(spec.status_code)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok()),
        _ => None,
    };
    let status = status.ok_or_else(|| {
        Problem::new(
            UNSUPPORTED,
            &format!("{path}.statusCode"),
            format!("{} is not one of 301, 302, 303, 307, 308", spec.status_code),
        )
    })?;
    Ok(Redirect {
        scheme: spec.scheme.clone(),
        hostname: spec.hostname.clone(),
        path: spec
            .path
            .as_ref()
            .map(|p| path_modifier(&format!("{path}.path"), p))
            .transpose()?,
        port,
        status,
    })
}

fn rewrite(path: &str, spec: &RewriteFilter) -> Result<Rewrite, Problem> {
    Ok(Rewrite {
        hostname: spec.hostname.clone(),
        path: spec
            .path
            .as_ref()
            .map(|p| path_modifier(&format!("{path}.path"), p))
            .transpose()?,
    })
}

/// A mirror, `None` when its backendRef does not resolve (reported in `unresolved`).
fn mirror(
    cx: &RouteContext<'_>,
    path: &str,
    spec: &MirrorFilter,
    unresolved: &mut Vec<Problem>,
) -> Result<Option<Filter>, Problem> {
    let (numerator, denominator) = match (spec.percent, &spec.fraction) {
        (Some(_), Some(_)) => {
            return Err(Problem::new(
                UNSUPPORTED,
                path,
                "only one of percent and fraction may be given",
            ));
        }
        (Some(percent), None) => match u32::try_from(percent) {
            Ok(p @ 0..=100) => (p, 100),
            _ => {
                return Err(Problem::new(
                    UNSUPPORTED,
                    &format!("{path}.percent"),
                    "must be 0 to 100",
                ));
            }
        },
        (None, Some(fraction)) => {
            match (
                u32::try_from(fraction.numerator),
                u32::try_from(fraction.denominator),
            ) {
                (Ok(n), Ok(d)) if d > 0 && n <= d => (n, d),
                _ => {
                    return Err(Problem::new(
                        UNSUPPORTED,
                        &format!("{path}.fraction"),
                        "needs 0 <= numerator <= denominator and denominator > 0",
                    ));
                }
            }
        }
        (None, None) => (1, 1),
    };
    match resolve_backend(cx, &format!("{path}.backendRef"), &spec.backend_ref) {
        Ok(backend) => Ok(Some(Filter::Mirror(Mirror {
            backend,
            numerator,
            denominator,
        }))),
        Err(problem) => {
            unresolved.push(problem);
            Ok(None)
        }
    }
}
