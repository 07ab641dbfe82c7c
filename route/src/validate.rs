//! The Gateway API's verdict on each route, per parent Service, and GEP-713's on sigil's policy
//! kinds: the conditions and reasons the CA writes in their status, computed by the same code
//! the agent uses to decide what reaches a proxy ([`crate::compile`]), so the status is what the
//! proxies do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use sigil_identity::SpiffeId;

use crate::compiled::{GrpcMatch, HttpMatch, PortKey, RouteKind, Rule, ServiceRef};
use crate::model::{Meta, RouteObjects};

mod annotations;
mod policies;
mod rules;

pub(crate) use policies::{CheckedBackendPolicy, CheckedRateLimit, Client};

/// What the agent or the CA knows about the cluster's Services.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub services: BTreeMap<ServiceRef, ServiceInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub ports: Vec<ServicePortInfo>,
    /// Empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    /// Whether sigil balances it (every endpoint is a meshed workload); routes apply only to
    /// meshed parents.
    pub meshed: bool,
    /// The SPIFFE IDs of its endpoints (meshed Services), for inbound rate-limit scoping.
    pub endpoint_ids: BTreeSet<SpiffeId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// One condition as the Gateway API spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs` or `PartiallyInvalid`.
    pub type_: &'static str,
    pub status: bool,
    /// A Gateway API reason (`Accepted`, `NoMatchingParent`, `UnsupportedValue`,
    /// `BackendNotFound`, `InvalidKind`, `IncompatibleFilters`, ...).
    pub reason: &'static str,
    /// Each problem as `spec.rules[2].backendRefs[0]: Service demo/v3 not found`, joined by `; `.
    pub message: String,
}

/// The verdict on one `spec.parentRefs[i]` that is a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentVerdict {
    /// Index into `spec.parentRefs`.
    pub parent_index: usize,
    pub conditions: Vec<Condition>,
}

/// The verdict on one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteVerdict {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// One per Service parent; parents of other kinds (someone's Gateway) are not judged.
    pub parents: Vec<ParentVerdict>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    BackendPolicy,
    RateLimitPolicy,
}

/// The verdict on one sigil policy object: its `Accepted` condition (GEP-713 reasons
/// `Accepted`, `Invalid`, `TargetNotFound`, `Conflicted`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub accepted: Condition,
}

/// Judges every route.
pub fn judge_routes(objects: &RouteObjects, catalog: &Catalog) -> Vec<RouteVerdict> {
    let checked = check_routes(objects, catalog);
    let http = checked.http.iter().map(CheckedRoute::verdict);
    http.chain(checked.grpc.iter().map(CheckedRoute::verdict))
        .collect()
}

/// Judges every BackendPolicy and RateLimitPolicy.
pub fn judge_policies(objects: &RouteObjects, catalog: &Catalog) -> Vec<PolicyVerdict> {
    let routes = check_routes(objects, catalog);
    let backend = policies::check_backend_policies(objects, catalog);
    let rate = policies::check_rate_limits(objects, catalog, &routes);
    let backend = backend.iter().map(|p| p.verdict(PolicyKind::BackendPolicy));
    backend
        .chain(rate.iter().map(|p| p.verdict(PolicyKind::RateLimitPolicy)))
        .collect()
}

/// The longest condition message, as `policy_status.rs` cuts its messages.
const MAX_MESSAGE_CHARS: usize = 32768;

/// One reason a rule is dropped, a reference does not resolve, or a policy is refused:
/// `message` starts with the field path (`spec.rules[2].backendRefs[0]: ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub(crate) fn new(reason: &'static str, path: &str, what: impl std::fmt::Display) -> Problem {
        Problem {
            reason,
            message: format!("{path}: {what}"),
        }
    }
}

/// Several problems as one condition message: joined by `; `, cut to [`MAX_MESSAGE_CHARS`].
fn joined<'p>(prefix: &str, problems: impl IntoIterator<Item = &'p Problem>) -> String {
    let all: Vec<&str> = problems.into_iter().map(|p| p.message.as_str()).collect();
    let message = format!("{prefix}{}", all.join("; "));
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => message[..cut].to_owned(),
        None => message,
    }
}

/// A rule as kept (compiled, with its matches: the default match when it has none) or why it
/// is dropped.
pub(crate) type RuleOutcome<M> = Result<(Rule, Vec<M>), Vec<Problem>>;

/// One route judged against the cluster: the Service ports each Service parent attaches to,
/// each rule kept or dropped, the references that did not resolve. [`judge_routes`] turns it
/// into conditions, [`crate::compile`] into tables: one judgement for both.
#[derive(Debug)]
pub(crate) struct CheckedRoute<'a, M> {
    pub kind: RouteKind,
    pub meta: &'a Meta,
    /// One per `spec.parentRefs[i]` that is a Service: its ports, or why it does not attach.
    pub parents: Vec<(usize, Result<Vec<PortKey>, Problem>)>,
    /// One per rule, in spec order (an HTTPRoute without rules has the CRD's default rule).
    pub rules: Vec<RuleOutcome<M>>,
    /// backendRefs and mirror backendRefs that did not resolve (the rule is kept).
    pub unresolved: Vec<Problem>,
    /// What sigil ignores, said in the `Accepted` message (hostnames, bad annotations).
    pub notes: Vec<String>,
}

impl<M> CheckedRoute<'_, M> {
    /// The kept rules with their index in the spec.
    pub(crate) fn kept(&self) -> impl Iterator<Item = (usize, &Rule, &[M])> {
        self.rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|(rule, m)| (i, rule, m.as_slice())))
    }

    /// Every Service port the route attaches to, once each (none when no rule is kept).
    pub(crate) fn attached_ports(&self) -> BTreeSet<PortKey> {
        if self.kept().next().is_none() {
            return BTreeSet::new();
        }
        let ports = self.parents.iter().filter_map(|(_, p)| p.as_ref().ok());
        ports.flatten().cloned().collect()
    }

    fn verdict(&self) -> RouteVerdict {
        RouteVerdict {
            kind: self.kind,
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
            generation: self.meta.generation,
            parents: self
                .parents
                .iter()
                .map(|(index, attached)| ParentVerdict {
                    parent_index: *index,
                    conditions: self.conditions(attached),
                })
                .collect(),
        }
    }

    fn conditions(&self, attached: &Result<Vec<PortKey>, Problem>) -> Vec<Condition> {
        let kept = self.kept().count();
        let dropped: Vec<&Problem> = self
            .rules
            .iter()
            .filter_map(|r| r.as_ref().err())
            .flatten()
            .collect();
        let accepted = match attached {
            Err(problem) => condition("Accepted", false, problem.reason, problem.message.clone()),
            Ok(_) if kept == 0 && !dropped.is_empty() => condition(
                "Accepted",
                false,
                dropped[0].reason,
                joined("", dropped.iter().copied()),
            ),
            Ok(_) => {
                let message = if self.notes.is_empty() {
                    "accepted by sigil".to_owned()
                } else {
                    format!("accepted by sigil; {}", self.notes.join("; "))
                };
                condition("Accepted", true, "Accepted", message)
            }
        };
        let resolved = match self.unresolved.first() {
            None => condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backendRef resolved".to_owned(),
            ),
            Some(first) => condition(
                "ResolvedRefs",
                false,
                first.reason,
                joined("", &self.unresolved),
            ),
        };
        let mut conditions = vec![accepted, resolved];
        if attached.is_ok() && kept > 0 && !dropped.is_empty() {
            conditions.push(condition(
                "PartiallyInvalid",
                true,
                dropped[0].reason,
                joined("Dropped Rules: ", dropped.iter().copied()),
            ));
        }
        conditions
    }
}

pub(crate) fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
) -> Condition {
    Condition {
        type_,
        status,
        reason,
        message,
    }
}

/// Every route judged.
pub(crate) struct CheckedRoutes<'a> {
    pub http: Vec<CheckedRoute<'a, HttpMatch>>,
    pub grpc: Vec<CheckedRoute<'a, GrpcMatch>>,
}

pub(crate) fn check_routes<'a>(
    objects: &'a RouteObjects,
    catalog: &'a Catalog,
) -> CheckedRoutes<'a> {
    CheckedRoutes {
        http: (objects.http_routes.iter())
            .map(|route| rules::check_http_route(route, catalog))
            .collect(),
        grpc: (objects.grpc_routes.iter())
            .map(|route| rules::check_grpc_route(route, catalog))
            .collect(),
    }
}

/// Every policy judged, for [`crate::compile`].
pub(crate) fn check_policies<'a>(
    objects: &'a RouteObjects,
    catalog: &Catalog,
    routes: &CheckedRoutes<'_>,
) -> (Vec<CheckedBackendPolicy<'a>>, Vec<CheckedRateLimit<'a>>) {
    (
        policies::check_backend_policies(objects, catalog),
        policies::check_rate_limits(objects, catalog, routes),
    )
}

#[cfg(test)]
pub(crate) mod tests;
