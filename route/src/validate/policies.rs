//! sigil's policy kinds judged (GEP-713 reasons on `Accepted`): `Invalid` for values sigil
//! refuses, `TargetNotFound` when no target exists (the policy applies once it does),
//! `Conflicted` when an older policy of the same kind already has the target (creation time,
//! then namespace/name, decides).

use std::collections::BTreeMap;
use std::time::Duration;

use sigil_identity::SpiffeId;

use super::{
    Catalog, CheckedRoutes, Condition, PolicyKind, PolicyVerdict, Problem, condition, joined,
};
use crate::compiled::{
    BackendPolicy, FailurePercentage, GrpcMatch, HttpMatch, Limit, OutlierDetection, PortKey,
    RetryBudget, ServiceRef,
};
use crate::model::{
    BackendPolicyObject, ClientRef, GATEWAY_GROUP, LimitSpec, Meta, PolicyTargetRef,
    RateLimitPolicyObject, RouteObjects, is_core_service, parse_duration,
};

const INVALID: &str = "Invalid";
const NOT_FOUND: &str = "TargetNotFound";
const CONFLICTED: &str = "Conflicted";

/// A BackendPolicy judged, and the policy of each Service it applies to.
#[derive(Debug)]
pub(crate) struct CheckedBackendPolicy<'a> {
    pub meta: &'a Meta,
    pub accepted: Condition,
    pub applies: Vec<BackendPolicy>,
}

/// One client of a rate-limit override, before the trust domain makes it a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Client {
    ServiceAccount { namespace: String, name: String },
    Id(SpiffeId),
}

/// Where a rate limit applies: a Service port, with the matches of the route it targets.
#[derive(Clone, Debug)]
pub(crate) struct RateLimitTarget {
    pub key: PortKey,
    pub http_matches: Vec<HttpMatch>,
    pub grpc_matches: Vec<GrpcMatch>,
}

/// A RateLimitPolicy judged, its limits, and where it applies.
#[derive(Debug)]
pub(crate) struct CheckedRateLimit<'a> {
    pub meta: &'a Meta,
    pub accepted: Condition,
    pub total: Option<Limit>,
    pub per_identity: Option<Limit>,
    pub overrides: Vec<(Vec<Client>, Limit)>,
    pub applies: Vec<RateLimitTarget>,
}

impl CheckedBackendPolicy<'_> {
    pub(super) fn verdict(&self, kind: PolicyKind) -> PolicyVerdict {
        policy_verdict(kind, self.meta, &self.accepted)
    }
}

impl CheckedRateLimit<'_> {
    pub(super) fn verdict(&self, kind: PolicyKind) -> PolicyVerdict {
        policy_verdict(kind, self.meta, &self.accepted)
    }
}

fn policy_verdict(kind: PolicyKind, meta: &Meta, accepted: &Condition) -> PolicyVerdict {
    PolicyVerdict {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        generation: meta.generation,
        accepted: accepted.clone(),
    }
}

/// The verdict of a valid policy of which `found` targets exist, which applies somewhere or
/// not (`applied`), and whose `taken` targets are already an older policy's: `Accepted`,
/// `TargetNotFound` or `Conflicted`.
fn placement(
    found: usize,
    applied: bool,
    taken: &[(String, String)],
    missing: &[Problem],
) -> Condition {
    let conflicts = || {
        (taken.iter())
            .map(|(target, owner)| format!("{target} already has {owner}, which is older"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if found == 0 {
        return condition("Accepted", false, NOT_FOUND, joined("", missing));
    }
    if !applied {
        return condition("Accepted", false, CONFLICTED, conflicts());
    }
    let mut notes = Vec::new();
    if !taken.is_empty() {
        notes.push(conflicts());
    }
    if !missing.is_empty() {
        notes.push(joined("", missing));
    }
    let message = if notes.is_empty() {
        "accepted by sigil".to_owned()
    } else {
        format!("accepted by sigil; {}", notes.join("; "))
    };
    condition("Accepted", true, "Accepted", message)
}

fn invalid(problems: &[Problem]) -> Condition {
    condition("Accepted", false, INVALID, joined("", problems))
}

/// Objects oldest first (GEP-713: the older policy wins a conflict), with their index.
fn by_age<T>(objects: &[T], meta: impl Fn(&T) -> &Meta) -> Vec<(usize, &T)> {
    let mut sorted: Vec<(usize, &T)> = objects.iter().enumerate().collect();
    sorted.sort_by(|a, b| meta(a.1).age_order(meta(b.1)));
    sorted
}

// ---- BackendPolicy ----

pub(super) fn check_backend_policies<'a>(
    objects: &'a RouteObjects,
    catalog: &Catalog,
) -> Vec<CheckedBackendPolicy<'a>> {
    let mut claimed: BTreeMap<ServiceRef, String> = BTreeMap::new();
    let mut checked: Vec<(usize, CheckedBackendPolicy<'a>)> = Vec::new();
    for (index, policy) in by_age(&objects.backend_policies, |p| &p.meta) {
        let meta = &policy.meta;
        let result = backend_spec(policy);
        let (outlier_detection, retry_budget) = match result {
            Ok(parsed) => parsed,
            Err(problems) => {
                checked.push((
                    index,
                    CheckedBackendPolicy {
                        meta,
                        accepted: invalid(&problems),
                        applies: Vec::new(),
                    },
                ));
                continue;
            }
        };
        let (mut applies, mut taken, mut missing, mut found) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        for (t, target) in policy.spec.target_refs.iter().enumerate() {
            let service = ServiceRef {
                namespace: meta.namespace.clone(),
                name: target.name.clone(),
            };
            if !catalog.services.contains_key(&service) {
                missing.push(Problem::new(
                    NOT_FOUND,
                    &format!("spec.targetRefs[{t}]"),
                    format!("Service {service} not found"),
                ));
                continue;
            }
            found += 1;
            if let Some(owner) = claimed.get(&service) {
                taken.push((
                    format!("Service {service}"),
                    format!("BackendPolicy {owner}"),
                ));
                continue;
            }
            claimed.insert(service.clone(), meta.key());
            applies.push(BackendPolicy {
                service,
                source: meta.key(),
                outlier_detection: outlier_detection.clone(),
                retry_budget: retry_budget.clone(),
            });
        }
        let accepted = placement(found, !applies.is_empty(), &taken, &missing);
        checked.push((
            index,
            CheckedBackendPolicy {
                meta,
                accepted,
                applies,
            },
        ));
    }
    checked.sort_by_key(|(index, _)| *index);
    checked.into_iter().map(|(_, c)| c).collect()
}

fn backend_spec(
    policy: &BackendPolicyObject,
) -> Result<(Option<OutlierDetection>, RetryBudget), Vec<Problem>> {
    let spec = &policy.spec;
    let mut problems = Vec::new();
    check_targets(&spec.target_refs, &mut problems, |t| {
        if !is_core_service(&t.group, &t.kind) {
            Some("only Services (group \"\", kind Service) can be targeted")
        } else if t.section_name.is_some() {
            Some("sectionName is not supported: a BackendPolicy applies to a whole Service")
        } else {
            None
        }
    });
    let mut duration = |path: &str, value: &Option<String>, default: Duration| match value {
        None => default,
        Some(v) => match parse_duration(v) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                problems.push(Problem::new(INVALID, path, "must be longer than 0s"));
                default
            }
            Err(e) => {
                problems.push(Problem::new(INVALID, path, e));
                default
            }
        },
    };
    let outlier = spec.outlier_detection.as_ref().map(|o| {
        let path = "spec.outlierDetection";
        let defaults = OutlierDetection::default();
        OutlierDetection {
            consecutive_5xx_errors: o
                .consecutive_5xx_errors
                .unwrap_or(defaults.consecutive_5xx_errors),
            consecutive_gateway_errors: o
                .consecutive_gateway_errors
                .unwrap_or(defaults.consecutive_gateway_errors),
            interval: duration(&format!("{path}.interval"), &o.interval, defaults.interval),
            base_ejection_time: duration(
                &format!("{path}.baseEjectionTime"),
                &o.base_ejection_time,
                defaults.base_ejection_time,
            ),
            max_ejection_time: duration(
                &format!("{path}.maxEjectionTime"),
                &o.max_ejection_time,
                defaults.max_ejection_time,
            ),
            max_ejection_percent: o
                .max_ejection_percent
                .unwrap_or(defaults.max_ejection_percent),
            min_health_percent: o.min_health_percent.unwrap_or(defaults.min_health_percent),
            failure_percentage: o.failure_percentage.as_ref().map(|f| FailurePercentage {
                // Envoy's defaults (outlier_detection.proto).
                threshold: f.threshold.unwrap_or(85),
                request_volume: f.request_volume.unwrap_or(50),
                minimum_hosts: f.minimum_hosts.unwrap_or(5),
            }),
        }
    });
    let budget = {
        let defaults = RetryBudget::default();
        let b = spec.retry_budget.clone().unwrap_or_default();
        let rate = b.min_retry_rate.unwrap_or_default();
        RetryBudget {
            percent: b.percent.unwrap_or(defaults.percent),
            interval: duration("spec.retryBudget.interval", &b.interval, defaults.interval),
            min_retries: rate.count.unwrap_or(defaults.min_retries),
            min_interval: duration(
                "spec.retryBudget.minRetryRate.interval",
                &rate.interval,
                defaults.min_interval,
            ),
        }
    };
    if let Some(o) = &outlier {
        let path = "spec.outlierDetection";
        for (field, value) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if value > 100 {
                problems.push(Problem::new(
                    INVALID,
                    &format!("{path}.{field}"),
                    "must be 0 to 100",
                ));
            }
        }
        if o.max_ejection_time < o.base_ejection_time {
            problems.push(Problem::new(
                INVALID,
                &format!("{path}.maxEjectionTime"),
                "must not be shorter than baseEjectionTime",
            ));
        }
        if let Some(f) = &o.failure_percentage
            && f.threshold > 100
        {
            problems.push(Problem::new(
                INVALID,
                &format!("{path}.failurePercentage.threshold"),
                "must be 0 to 100",
            ));
        }
    }
    if budget.percent > 100 {
        problems.push(Problem::new(
            INVALID,
            "spec.retryBudget.percent",
            "must be 0 to 100",
        ));
    }
    if problems.is_empty() {
        Ok((outlier, budget))
    } else {
        Err(problems)
    }
}

/// At least one target, each acceptable to `refuse`.
fn check_targets(
    targets: &[PolicyTargetRef],
    problems: &mut Vec<Problem>,
    refuse: impl Fn(&PolicyTargetRef) -> Option<&'static str>,
) {
    if targets.is_empty() {
        problems.push(Problem::new(
            INVALID,
            "spec.targetRefs",
            "at least one target is required",
        ));
    }
    for (t, target) in targets.iter().enumerate() {
        if let Some(why) = refuse(target) {
            problems.push(Problem::new(INVALID, &format!("spec.targetRefs[{t}]"), why));
        }
    }
}

// ---- RateLimitPolicy ----

struct Limits {
    total: Option<Limit>,
    per_identity: Option<Limit>,
    overrides: Vec<(Vec<Client>, Limit)>,
}

pub(super) fn check_rate_limits<'a>(
    objects: &'a RouteObjects,
    catalog: &Catalog,
    routes: &CheckedRoutes<'_>,
) -> Vec<CheckedRateLimit<'a>> {
    // (target kind/name, port) -> the policy that has it.
    let mut claimed: BTreeMap<(String, PortKey), String> = BTreeMap::new();
    let mut checked: Vec<(usize, CheckedRateLimit<'a>)> = Vec::new();
    for (index, policy) in by_age(&objects.rate_limit_policies, |p| &p.meta) {
        let meta = &policy.meta;
        let limits = match rate_spec(policy) {
            Ok(limits) => limits,
            Err(problems) => {
                checked.push((
                    index,
                    CheckedRateLimit {
                        meta,
                        accepted: invalid(&problems),
                        total: None,
                        per_identity: None,
                        overrides: Vec::new(),
                        applies: Vec::new(),
                    },
                ));
                continue;
            }
        };
        let (mut applies, mut taken, mut missing, mut found) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        for (t, target) in policy.spec.target_refs.iter().enumerate() {
            let path = format!("spec.targetRefs[{t}]");
            let places = match rate_target(catalog, routes, &meta.namespace, target) {
                Ok(places) => places,
                Err(why) => {
                    missing.push(Problem::new(NOT_FOUND, &path, why));
                    continue;
                }
            };
            found += 1;
            let name = format!("{} {}/{}", target.kind, meta.namespace, target.name);
            for place in places {
                let claim = (name.clone(), place.key.clone());
                match claimed.get(&claim) {
                    Some(owner) => taken.push((
                        format!("{name} port {}", place.key.port),
                        format!("RateLimitPolicy {owner}"),
                    )),
                    None => {
                        claimed.insert(claim, meta.key());
                        applies.push(place);
                    }
                }
            }
        }
        let accepted = placement(found, !applies.is_empty(), &taken, &missing);
        checked.push((
            index,
            CheckedRateLimit {
                meta,
                accepted,
                total: limits.total,
                per_identity: limits.per_identity,
                overrides: limits.overrides,
                applies,
            },
        ));
    }
    checked.sort_by_key(|(index, _)| *index);
    checked.into_iter().map(|(_, c)| c).collect()
}

/// Where a target puts the limits: its Service ports (a Service, one port by `sectionName`), or
/// the ports a route attaches to, with the route's matches. The error says why there is none.
fn rate_target(
    catalog: &Catalog,
    routes: &CheckedRoutes<'_>,
    namespace: &str,
    target: &PolicyTargetRef,
) -> Result<Vec<RateLimitTarget>, String> {
    if is_core_service(&target.group, &target.kind) {
        let service = ServiceRef {
            namespace: namespace.to_owned(),
            name: target.name.clone(),
        };
        let Some(info) = catalog.services.get(&service) else {
            return Err(format!("Service {service} not found"));
        };
        if !info.meshed {
            return Err(format!(
                "Service {service} is not in the sigil mesh; its endpoints have no proxy to limit"
            ));
        }
        let ports: Vec<RateLimitTarget> = (info.ports.iter())
            .filter(|p| (target.section_name.as_ref()).is_none_or(|name| *name == p.name))
            .map(|p| RateLimitTarget {
                key: PortKey {
                    service: service.clone(),
                    port: p.port,
                },
                http_matches: Vec::new(),
                grpc_matches: Vec::new(),
            })
            .collect();
        if ports.is_empty() {
            return Err(format!(
                "Service {service} has no port named {:?}",
                target.section_name.as_deref().unwrap_or_default()
            ));
        }
        return Ok(ports);
    }
    let named = |meta: &Meta| meta.namespace == namespace && meta.name == target.name;
    let (ports, http_matches, grpc_matches) = match target.kind.as_str() {
        "HTTPRoute" => {
            let Some(route) = routes.http.iter().find(|r| named(r.meta)) else {
                return Err(format!("HTTPRoute {namespace}/{} not found", target.name));
            };
            let matches = route
                .kept()
                .flat_map(|(_, _, m)| m.iter().cloned())
                .collect();
            (route.attached_ports(), matches, Vec::new())
        }
        "GRPCRoute" => {
            let Some(route) = routes.grpc.iter().find(|r| named(r.meta)) else {
                return Err(format!("GRPCRoute {namespace}/{} not found", target.name));
            };
            let matches = route
                .kept()
                .flat_map(|(_, _, m)| m.iter().cloned())
                .collect();
            (route.attached_ports(), Vec::new(), matches)
        }
        other => return Err(format!("a {other} cannot be targeted")),
    };
    if ports.is_empty() {
        return Err(format!(
            "{} {namespace}/{} attaches to no meshed Service port",
            target.kind, target.name
        ));
    }
    Ok((ports.into_iter())
        .map(|key| RateLimitTarget {
            key,
            http_matches: http_matches.clone(),
            grpc_matches: grpc_matches.clone(),
        })
        .collect())
}

fn rate_spec(policy: &RateLimitPolicyObject) -> Result<Limits, Vec<Problem>> {
    let spec = &policy.spec;
    let mut problems = Vec::new();
    check_targets(&spec.target_refs, &mut problems, |t| {
        let route = t.group == GATEWAY_GROUP && (t.kind == "HTTPRoute" || t.kind == "GRPCRoute");
        if is_core_service(&t.group, &t.kind) || route && t.section_name.is_none() {
            None
        } else if route {
            Some("sectionName is not supported on a route target")
        } else {
            Some(
                "only Services (group \"\", kind Service) and HTTPRoutes or GRPCRoutes (group gateway.networking.k8s.io) can be targeted",
            )
        }
    });
    if spec.total.is_none() && spec.identity.is_none() && spec.overrides.is_empty() {
        problems.push(Problem::new(
            INVALID,
            "spec",
            "one of total, identity or overrides is required",
        ));
    }
    let total = (spec.total.as_ref()).and_then(|l| limit("spec.total", l, &mut problems));
    let per_identity =
        (spec.identity.as_ref()).and_then(|l| limit("spec.identity", l, &mut problems));
    let mut within_total = |path: &str, l: &Limit| {
        if let Some(total) = &total
            && rate_above(l, total)
        {
            problems.push(Problem::new(
                INVALID,
                path,
                "must not allow more requests than total",
            ));
        }
    };
    if let Some(l) = &per_identity {
        within_total("spec.identity", l);
    }
    let mut overrides = Vec::new();
    for (o, spec) in spec.overrides.iter().enumerate() {
        let path = format!("spec.overrides[{o}]");
        let Some(l) = limit(&path, &spec.limit, &mut problems) else {
            continue;
        };
        let mut within = |l: &Limit| {
            if let Some(total) = &total
                && rate_above(l, total)
            {
                problems.push(Problem::new(
                    INVALID,
                    &path,
                    "must not allow more requests than total",
                ));
            }
        };
        within(&l);
        if spec.clients.is_empty() {
            problems.push(Problem::new(
                INVALID,
                &format!("{path}.clients"),
                "at least one client is required",
            ));
        }
        let clients = (spec.clients.iter().enumerate())
            .filter_map(|(c, client)| {
                let path = format!("{path}.clients[{c}]");
                self::client(&policy.meta.namespace, client)
                    .map_err(|why| problems.push(Problem::new(INVALID, &path, why)))
                    .ok()
            })
            .collect();
        overrides.push((clients, l));
    }
    if problems.is_empty() {
        Ok(Limits {
            total,
            per_identity,
            overrides,
        })
    } else {
        Err(problems)
    }
}

/// Whether `a` lets more requests through per unit of time than `b`.
fn rate_above(a: &Limit, b: &Limit) -> bool {
    u128::from(a.requests) * b.period.as_nanos() > u128::from(b.requests) * a.period.as_nanos()
}

fn limit(path: &str, spec: &LimitSpec, problems: &mut Vec<Problem>) -> Option<Limit> {
    let before = problems.len();
    if spec.requests == 0 {
        problems.push(Problem::new(
            INVALID,
            &format!("{path}.requests"),
            "must be at least 1",
        ));
    }
    let period = match &spec.period {
        None => Duration::from_secs(1),
        Some(p) => match parse_duration(p) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                problems.push(Problem::new(
                    INVALID,
                    &format!("{path}.period"),
                    "must be longer than 0s",
                ));
                Duration::ZERO
            }
            Err(e) => {
                problems.push(Problem::new(INVALID, &format!("{path}.period"), e));
                Duration::ZERO
            }
        },
    };
    if spec.burst == Some(0) {
        problems.push(Problem::new(
            INVALID,
            &format!("{path}.burst"),
            "must be at least 1",
        ));
    }
    (problems.len() == before).then(|| Limit {
        requests: spec.requests,
        period,
        burst: spec.burst.unwrap_or(spec.requests),
    })
}

/// `serviceAccount: <namespace>/<name>` (a bare name: the policy's namespace) or
/// `spiffeId: spiffe://...`, exactly one.
fn client(namespace: &str, client: &ClientRef) -> Result<Client, String> {
    match (&client.service_account, &client.spiffe_id) {
        (Some(account), None) => {
            let (ns, name) = account.split_once('/').unwrap_or((namespace, account));
            if is_dns_label(ns) && is_dns_subdomain(name) {
                Ok(Client::ServiceAccount {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            } else {
                Err(format!(
                    "serviceAccount {account:?} is not <namespace>/<name>"
                ))
            }
        }
        (None, Some(id)) => SpiffeId::parse(id)
            .map(Client::Id)
            .map_err(|e| format!("spiffeId {id:?}: {e}")),
        _ => Err("exactly one of serviceAccount and spiffeId is required".to_owned()),
    }
}

/// A Kubernetes namespace name (RFC 1123 label).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes service account name (RFC 1123 subdomain).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
