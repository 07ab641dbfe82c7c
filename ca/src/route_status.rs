//! Status of the Gateway API routes whose parent is a Service (GAMMA) and of sigil's
//! `BackendPolicy` and `RateLimitPolicy`: the CA, the one sigil process that sees the whole
//! cluster, watches HTTPRoutes, GRPCRoutes, Services and the two sigil kinds,
//! judges them with `sigil_route::validate` (the code the node agents use to decide what reaches
//! a proxy, so the status is what the proxies do), and writes the verdicts.
//!
//! Routes: one `status.parents[]` entry per Service `parentRef`, with [`CONTROLLER_NAME`], the
//! `parentRef` copied exactly and the `Accepted`, `ResolvedRefs` (and `PartiallyInvalid`)
//! conditions. `RouteStatus.parents` is an atomic list shared with every other controller of the
//! route (an Istio or a Gateway implementation may write its own entries), so it is written by
//! GET, modify, and `replace_status` carrying the `resourceVersion` read — never by server-side
//! apply, which would make sigil own the whole list. Entries of other controllers are kept as
//! they are, in place; sigil's entries for parentRefs no longer in the spec are removed. A write
//! whose `resourceVersion` is outdated fails with 409 and is dropped: the change that outdated it
//! arrives as a watch event and everything is judged again.
//!
//! Policies: `status.conditions` holds one `Accepted` condition (GEP-713 reasons), written by
//! server-side apply as [`FIELD_MANAGER`] as `policy_status` does for sigil's other kinds: there
//! the list is keyed by `type` and sigil owns the object.
//!
//! Every condition carries `observedGeneration` and keeps its `lastTransitionTime` while its
//! status is unchanged; nothing is written when the status already says it, so a write's own
//! watch event writes nothing. Verdicts depend on other objects (a Service appearing resolves a
//! backend), so every event marks the view changed, and every object is judged again once
//! events settle ([`SETTLE`]) and every watch has listed.
//!
//! Which Services sigil meshes is decided by the node agents (a Service is meshed when every
//! endpoint is a sigil workload); the CA does not watch endpoints, so it treats every Service as
//! a possible parent: a route on a Service that is not (yet) fully meshed is reported `Accepted`
//! here, while the agents send it only once the Service is meshed.
//!
//! A resource whose CRD is not installed (its list is 404; a cluster without the Gateway API) is
//! logged once and treated as empty; the watcher keeps retrying it with backoff (at most 30 s
//! apart), and the other kinds are judged meanwhile. Failed writes are retried every
//! [`RETRY_INTERVAL`]. The CA's RBAC: `get`, `list`, `watch` on the routes and `get`, `update`
//! on their `/status`; `list`, `watch` on Services and the two sigil kinds, and
//! `patch` on the latter's `/status`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams, TypeMeta};
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use sigil_kube_watch::follow::{self, Events, Follower, WatchEvent};
use sigil_route::model::{GATEWAY_GROUP, RouteObject, RouteObjects, SIGIL_API_VERSION};
use sigil_route::validate::{
    self, Catalog, ParentVerdict, PolicyKind, PolicyVerdict, RouteVerdict, ServiceInfo,
    ServicePortInfo,
};
use sigil_route::{RouteKind, ServiceRef};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::conditions::{self, SEPARATOR, condition, status_of};
use crate::distribute::FIELD_MANAGER;

/// The `controllerName` of sigil's entries in a route's `status.parents`.
pub const CONTROLLER_NAME: &str = "sigil.dev/mesh";
/// How long after an event the objects are judged again, so a burst of events (a re-list, an
/// `kubectl apply` of many objects) is judged once.
pub const SETTLE: Duration = Duration::from_millis(200);
/// How often failed status writes are retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// The condition type of sigil's policy kinds.
pub const ACCEPTED: &str = "Accepted";
/// The status of a list of a resource that is not served, or of a write to an object since
/// deleted.
const NOT_FOUND: u16 = 404;
/// The status of a write whose resourceVersion precondition failed.
const CONFLICT: u16 = 409;
/// The Gateway API version sigil reads.
const GATEWAY_VERSION: &str = "v1";

/// Why a status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RouteStatusError {
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Read {
        kind: Watched,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of {kind} {namespace}/{name}: {source}")]
    Write {
        kind: Watched,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl RouteStatusError {
    /// Whether the object changed (409) or went away (404) since it was judged: nothing to
    /// retry, its watch event brings the news.
    fn superseded(&self) -> bool {
        let (RouteStatusError::Read { source, .. } | RouteStatusError::Write { source, .. }) = self;
        matches!(source, kube::Error::Api(status) if [CONFLICT, NOT_FOUND].contains(&status.code))
    }
}

/// The kinds this controller watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watched {
    HttpRoute,
    GrpcRoute,
    BackendPolicy,
    RateLimitPolicy,
    Service,
}

impl Watched {
    pub const ALL: [Watched; 5] = [
        Watched::HttpRoute,
        Watched::GrpcRoute,
        Watched::BackendPolicy,
        Watched::RateLimitPolicy,
        Watched::Service,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            Watched::HttpRoute => "HTTPRoute",
            Watched::GrpcRoute => "GRPCRoute",
            Watched::BackendPolicy => "BackendPolicy",
            Watched::RateLimitPolicy => "RateLimitPolicy",
            Watched::Service => "Service",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Watched::HttpRoute => "httproutes",
            Watched::GrpcRoute => "grpcroutes",
            Watched::BackendPolicy => "backendpolicies",
            Watched::RateLimitPolicy => "ratelimitpolicies",
            Watched::Service => "services",
        }
    }

    /// The resource's group and version.
    fn group_version(self) -> (&'static str, &'static str) {
        match self {
            Watched::HttpRoute | Watched::GrpcRoute => (GATEWAY_GROUP, GATEWAY_VERSION),
            Watched::BackendPolicy | Watched::RateLimitPolicy => SIGIL_API_VERSION
                .split_once('/')
                .expect("sigil's apiVersion is group/version"),
            Watched::Service => ("", "v1"),
        }
    }

    pub fn api_resource(self) -> ApiResource {
        let (group, version) = self.group_version();
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: if group.is_empty() {
                version.to_owned()
            } else {
                format!("{group}/{version}")
            },
            kind: self.kind().to_owned(),
            plural: self.plural().to_owned(),
        }
    }

    fn route_kind(self) -> Option<RouteKind> {
        match self {
            Watched::HttpRoute => Some(RouteKind::HttpRoute),
            Watched::GrpcRoute => Some(RouteKind::GrpcRoute),
            _ => None,
        }
    }

    fn policy_kind(self) -> Option<PolicyKind> {
        match self {
            Watched::BackendPolicy => Some(PolicyKind::BackendPolicy),
            Watched::RateLimitPolicy => Some(PolicyKind::RateLimitPolicy),
            _ => None,
        }
    }
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// A watched object's kind, namespace and name.
type Key = (Watched, String, String);
type KindEvent = (Watched, WatchEvent<DynamicObject>);

/// Keeps the status of every route and sigil policy current, until the watch streams end (they
/// do not; the watchers retry with backoff and re-list when they must).
pub async fn run(client: kube::Client) {
    let events = events(client.clone());
    let mut writer = RouteStatusWriter::new(client);
    follow::follow(&mut writer, Some(events), std::future::pending()).await;
}

/// Every watched kind in every namespace, each event tagged with its kind.
fn events(client: kube::Client) -> Events<KindEvent> {
    follow::tagged(Watched::ALL.map(|kind| {
        let api = Api::all_with(client.clone(), &kind.api_resource());
        (kind, follow::watch(api, watcher::Config::default()))
    }))
}

impl Follower for RouteStatusWriter {
    type Event = KindEvent;

    async fn on_event(&mut self, (kind, event): KindEvent) {
        RouteStatusWriter::on_event(self, kind, event);
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(SETTLE)
    }

    async fn on_tick(&mut self) {
        if self.retry_at.is_some_and(|at| at <= Instant::now()) {
            self.retry_at = None;
            self.changed = true;
        }
        if self.changed && self.complete() {
            self.changed = false;
            self.reconcile().await;
        }
    }
}

/// The watches' consumer: the objects as last seen, and what is judged from them.
struct RouteStatusWriter {
    client: kube::Client,
    objects: BTreeMap<Key, DynamicObject>,
    /// Kinds whose initial list is done (or is 404: not served, so empty).
    listed: BTreeSet<Watched>,
    /// Kinds being re-listed, with the objects seen so far: judging waits for them.
    relisting: HashMap<Watched, BTreeSet<Key>>,
    /// Kinds whose CRD the last list found missing, so that is logged once.
    missing: BTreeSet<Watched>,
    /// Whether something changed since everything was last judged.
    changed: bool,
    /// When to judge again after a failed write.
    retry_at: Option<Instant>,
}

impl RouteStatusWriter {
    fn new(client: kube::Client) -> Self {
        RouteStatusWriter {
            client,
            objects: BTreeMap::new(),
            listed: BTreeSet::new(),
            relisting: HashMap::new(),
            missing: BTreeSet::new(),
            changed: false,
            retry_at: None,
        }
    }

    /// Whether the view is whole: every kind listed, none being re-listed.
    fn complete(&self) -> bool {
        self.listed.len() == Watched::ALL.len() && self.relisting.is_empty()
    }

    fn on_event(&mut self, kind: Watched, event: WatchEvent<DynamicObject>) {
        match event {
            Ok(Event::Apply(object)) => self.store(kind, object),
            Ok(Event::InitApply(object)) => {
                if let Some(key) = key_of(kind, &object) {
                    self.relisting.entry(kind).or_default().insert(key);
                }
                self.store(kind, object);
            }
            Ok(Event::Delete(object)) => {
                if let Some(key) = key_of(kind, &object) {
                    self.objects.remove(&key);
                    self.changed = true;
                }
            }
            Ok(Event::Init) => {
                self.relisting.insert(kind, BTreeSet::new());
            }
            Ok(Event::InitDone) => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                self.objects
                    .retain(|key, _| key.0 != kind || seen.contains(key));
                self.listed.insert(kind);
                self.changed = true;
                if self.missing.remove(&kind) {
                    info!(%kind, "the resource is served now; writing its status");
                }
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == NOT_FOUND =>
            {
                // Not served: there are none, and the watcher keeps trying.
                self.relisting.remove(&kind);
                self.objects.retain(|key, _| key.0 != kind);
                self.listed.insert(kind);
                self.changed = true;
                if self.missing.insert(kind) {
                    let (group, _) = kind.group_version();
                    warn!(%kind, resource = %format!("{}.{group}", kind.plural()), "the resource is not served (no CRD); judging without it until it is installed");
                }
            }
            Err(e) => warn!(%kind, error = %e, "route status watch failed; retrying"),
        }
    }

    fn store(&mut self, kind: Watched, mut object: DynamicObject) {
        let Some(key) = key_of(kind, &object) else {
            return;
        };
        let resource = kind.api_resource();
        // List items of built-in kinds come without apiVersion and kind.
        object.types = Some(TypeMeta {
            api_version: resource.api_version,
            kind: resource.kind,
        });
        self.objects.insert(key, object);
        self.changed = true;
    }

    /// Judges every object and writes each status that does not say the verdict.
    async fn reconcile(&mut self) {
        let (verdicts, unreadable) = judge(&self.objects);
        let now = Time(Timestamp::now());
        let mut failed = false;
        for (key, object) in &self.objects {
            let result = if key.0.route_kind().is_some() {
                let parents = verdicts
                    .routes
                    .get(key)
                    .map(|verdict| verdict.parents.clone())
                    .or_else(|| {
                        unreadable
                            .get(key)
                            .map(|problem| unreadable_route(object, problem))
                    })
                    .unwrap_or_default();
                self.write_route(key, object, &parents, &now).await
            } else if key.0.policy_kind().is_some() {
                let accepted = verdicts.policies.get(key).map_or_else(
                    || {
                        unreadable.get(key).map(|problem| validate::Condition {
                            type_: ACCEPTED,
                            status: false,
                            reason: "Invalid",
                            message: problem.clone(),
                        })
                    },
                    |verdict| Some(verdict.accepted.clone()),
                );
                match accepted {
                    Some(accepted) => self.write_policy(key, object, &accepted, &now).await,
                    None => Ok(()),
                }
            } else {
                Ok(())
            };
            match result {
                Ok(()) => {}
                Err(e) if e.superseded() => debug!(error = %e, "dropped"),
                Err(e) => {
                    warn!(error = %e, "will retry");
                    failed = true;
                }
            }
        }
        if failed {
            self.retry_at = Some(Instant::now() + RETRY_INTERVAL);
        }
    }

    /// Writes the route's sigil entries of `status.parents` if they do not say `parents`.
    async fn write_route(
        &self,
        key: &Key,
        object: &DynamicObject,
        parents: &[ParentVerdict],
        now: &Time,
    ) -> Result<(), RouteStatusError> {
        let generation = object.metadata.generation;
        let desired = |object: &DynamicObject| {
            merged_parents(
                &current_parents(object),
                &parent_refs(object),
                parents,
                generation,
                now,
            )
        };
        if !changes(object, &desired(object)) {
            return Ok(());
        }
        let (kind, namespace, name) = key;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &kind.api_resource());
        // The list is shared: modify what is there now, and write with its resourceVersion.
        let mut fresh = api
            .get(name)
            .await
            .map_err(|source| RouteStatusError::Read {
                kind: *kind,
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
        if fresh.metadata.generation != generation {
            // The spec changed since it was judged: its watch event brings it.
            return Ok(());
        }
        let merged = desired(&fresh);
        if !changes(&fresh, &merged) {
            return Ok(());
        }
        match fresh.data.get_mut("status") {
            Some(Value::Object(status)) => {
                status.insert("parents".into(), Value::Array(merged));
            }
            _ => fresh.data["status"] = json!({ "parents": merged }),
        }
        api.replace_status(name, &PostParams::default(), &fresh)
            .await
            .map_err(|source| RouteStatusError::Write {
                kind: *kind,
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
        info!(object = %format!("{kind} {namespace}/{name}"), parents = %summary(parents), "route status written");
        Ok(())
    }

    /// Writes the policy's `Accepted` condition if it is not current.
    async fn write_policy(
        &self,
        key: &Key,
        object: &DynamicObject,
        accepted: &validate::Condition,
        now: &Time,
    ) -> Result<(), RouteStatusError> {
        let current = conditions::parse(object.data.pointer("/status/conditions"));
        let desired = to_condition(accepted, object.metadata.generation, &current, now);
        if current.contains(&desired) {
            return Ok(());
        }
        let (kind, namespace, name) = key;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &kind.api_resource());
        let mut apply = json!({
            "apiVersion": SIGIL_API_VERSION,
            "kind": kind.kind(),
            "metadata": { "name": name, "namespace": namespace },
            "status": { "conditions": [desired] },
        });
        if let Some(version) = &object.metadata.resource_version {
            apply["metadata"]["resourceVersion"] = json!(version);
        }
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(apply),
        )
        .await
        .map_err(|source| RouteStatusError::Write {
            kind: *kind,
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
        info!(object = %format!("{kind} {namespace}/{name}"), accepted = accepted.status, reason = accepted.reason, message = %accepted.message, "policy status written");
        Ok(())
    }
}

/// The verdicts of one judgement, by object.
#[derive(Default)]
struct Verdicts {
    routes: HashMap<Key, RouteVerdict>,
    policies: HashMap<Key, PolicyVerdict>,
}

/// Judges every route and policy in `objects`; objects that cannot be read are returned apart,
/// with why.
fn judge(objects: &BTreeMap<Key, DynamicObject>) -> (Verdicts, HashMap<Key, String>) {
    let mut unreadable = HashMap::new();
    let mut readable = Vec::new();
    let mut catalog = Catalog::default();
    for (key, object) in objects {
        if key.0 == Watched::Service {
            if let Some((service, info)) = service_info(key, object) {
                catalog.services.insert(service, info);
            }
            continue;
        }
        let json = serde_json::to_value(object).unwrap_or(Value::Null);
        match RouteObject::from_json(json) {
            Ok(Some(object)) => readable.push(object),
            Ok(None) => {}
            Err(e) => {
                unreadable.insert(key.clone(), e.to_string());
            }
        }
    }
    let route_objects: RouteObjects = readable.into_iter().collect();
    let mut verdicts = Verdicts::default();
    for verdict in validate::judge_routes(&route_objects, &catalog) {
        let kind = match verdict.kind {
            RouteKind::HttpRoute => Watched::HttpRoute,
            RouteKind::GrpcRoute => Watched::GrpcRoute,
        };
        let key = (kind, verdict.namespace.clone(), verdict.name.clone());
        verdicts.routes.insert(key, verdict);
    }
    for verdict in validate::judge_policies(&route_objects, &catalog) {
        let kind = match verdict.kind {
            PolicyKind::BackendPolicy => Watched::BackendPolicy,
            PolicyKind::RateLimitPolicy => Watched::RateLimitPolicy,
        };
        let key = (kind, verdict.namespace.clone(), verdict.name.clone());
        verdicts.policies.insert(key, verdict);
    }
    (verdicts, unreadable)
}

/// What `validate` needs to know of a Service. Every Service counts as meshed (see the module
/// doc); its endpoints' identities matter only to the agents.
fn service_info(key: &Key, object: &DynamicObject) -> Option<(ServiceRef, ServiceInfo)> {
    let spec: ServiceSpec = serde_json::from_value(object.data.get("spec")?.clone()).ok()?;
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|port| {
            Some(ServicePortInfo {
                name: port.name.unwrap_or_default(),
                port: u16::try_from(port.port).ok()?,
                app_protocol: port.app_protocol,
            })
        })
        .collect();
    let cluster_ips = spec
        .cluster_ips
        .or_else(|| spec.cluster_ip.map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect::<Vec<IpAddr>>();
    let service = ServiceRef {
        namespace: key.1.clone(),
        name: key.2.clone(),
    };
    let info = ServiceInfo {
        ports,
        cluster_ips,
        meshed: true,
        endpoint_ids: BTreeSet::new(),
    };
    Some((service, info))
}

/// The verdict on a route that cannot be read: each Service parent is not accepted, saying why.
fn unreadable_route(object: &DynamicObject, problem: &str) -> Vec<ParentVerdict> {
    parent_refs(object)
        .iter()
        .enumerate()
        .filter(|(_, parent)| is_service(parent))
        .map(|(parent_index, _)| ParentVerdict {
            parent_index,
            conditions: vec![validate::Condition {
                type_: ACCEPTED,
                status: false,
                reason: "UnsupportedValue",
                message: problem.to_owned(),
            }],
        })
        .collect()
}

/// Whether a parentRef names a Service (the Gateway API defaults an absent group to its own and
/// an absent kind to `Gateway`).
fn is_service(parent: &Value) -> bool {
    let group = parent
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or(GATEWAY_GROUP);
    let kind = parent
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Gateway");
    matches!(group, "" | "core") && kind == "Service"
}

fn key_of(kind: Watched, object: &DynamicObject) -> Option<Key> {
    Some((
        kind,
        object.metadata.namespace.clone()?,
        object.metadata.name.clone()?,
    ))
}

fn parent_refs(object: &DynamicObject) -> Vec<Value> {
    object
        .data
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn current_parents(object: &DynamicObject) -> Vec<Value> {
    object
        .data
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether writing `merged` as the object's `status.parents` changes what it says.
fn changes(object: &DynamicObject, merged: &[Value]) -> bool {
    let current: Vec<Value> = current_parents(object).iter().map(normalized).collect();
    current != merged
}

fn is_ours(entry: &Value) -> bool {
    entry.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
}

/// A sigil entry as [`merged_parents`] writes it (its conditions parsed and serialized again, so
/// the comparison does not depend on how the server spells them); other entries as they are.
fn normalized(entry: &Value) -> Value {
    if !is_ours(entry) {
        return entry.clone();
    }
    parent_entry(
        entry.get("parentRef").cloned().unwrap_or(Value::Null),
        &conditions::parse(entry.get("conditions")),
    )
}

fn parent_entry(parent_ref: Value, conditions: &[Condition]) -> Value {
    json!({
        "parentRef": parent_ref,
        "controllerName": CONTROLLER_NAME,
        "conditions": conditions,
    })
}

/// `current` (a route's `status.parents`) with sigil's entries replaced by `verdicts`: other
/// controllers' entries stay as they are and where they are, sigil's entry of each judged
/// parentRef is updated in place or appended, and sigil's entries of parentRefs no longer
/// judged are removed. Conditions keep their `lastTransitionTime` while their status is
/// unchanged.
fn merged_parents(
    current: &[Value],
    parent_refs: &[Value],
    verdicts: &[ParentVerdict],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Value> {
    let mut desired: Vec<(Value, Value)> = Vec::new();
    for verdict in verdicts {
        let Some(parent_ref) = parent_refs.get(verdict.parent_index) else {
            continue;
        };
        // The same parentRef twice in the spec has one entry.
        if desired.iter().any(|(r, _)| r == parent_ref) {
            continue;
        }
        let existing = current
            .iter()
            .find(|e| is_ours(e) && e.get("parentRef") == Some(parent_ref))
            .map(|e| conditions::parse(e.get("conditions")))
            .unwrap_or_default();
        let conditions: Vec<Condition> = verdict
            .conditions
            .iter()
            .map(|c| to_condition(c, generation, &existing, now))
            .collect();
        desired.push((
            parent_ref.clone(),
            parent_entry(parent_ref.clone(), &conditions),
        ));
    }
    let mut used = vec![false; desired.len()];
    let mut merged = Vec::with_capacity(current.len().max(desired.len()));
    for entry in current {
        if !is_ours(entry) {
            merged.push(entry.clone());
            continue;
        }
        let place = desired
            .iter()
            .enumerate()
            .position(|(i, (r, _))| !used[i] && entry.get("parentRef") == Some(r));
        if let Some(i) = place {
            used[i] = true;
            merged.push(desired[i].1.clone());
        }
    }
    for (i, (_, entry)) in desired.into_iter().enumerate() {
        if !used[i] {
            merged.push(entry);
        }
    }
    merged
}

fn to_condition(
    verdict: &validate::Condition,
    generation: Option<i64>,
    current: &[Condition],
    now: &Time,
) -> Condition {
    condition(
        verdict.type_,
        (
            status_of(verdict.status),
            verdict.reason,
            verdict.message.clone(),
        ),
        generation,
        current,
        now,
    )
}

/// For the log: each judged parent's conditions as `Type=Status/Reason`.
fn summary(parents: &[ParentVerdict]) -> String {
    parents
        .iter()
        .map(|parent| {
            let conditions: Vec<String> = parent
                .conditions
                .iter()
                .map(|c| format!("{}={}/{}", c.type_, status_of(c.status), c.reason))
                .collect();
            format!(
                "parentRefs[{}]: {}",
                parent.parent_index,
                conditions.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join(SEPARATOR)
}

#[cfg(test)]
mod tests;
