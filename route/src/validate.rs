//! The Gateway API's verdict on each route, per parent Service, and GEP-713's on sigil's policy
//! kinds: the conditions and reasons the CA writes in their status, computed by the same code
//! the agent uses to decide what reaches a proxy ([`crate::compile`]), so the status is what the
//! proxies do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use sigil_identity::SpiffeId;

use crate::compiled::{RouteKind, ServiceRef};
use crate::model::RouteObjects;

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
    /// `BackendNotFound`, `RefNotPermitted`, `InvalidKind`, `IncompatibleFilters`, ...).
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
    let _ = (objects, catalog);
    unimplemented!("contract: route-core helper")
}

/// Judges every BackendPolicy and RateLimitPolicy.
pub fn judge_policies(objects: &RouteObjects, catalog: &Catalog) -> Vec<PolicyVerdict> {
    let _ = (objects, catalog);
    unimplemented!("contract: route-core helper")
}
