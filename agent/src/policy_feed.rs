//! The policy feed: the `AuthorizationPolicy` and `PeerAuthentication` objects that apply to a
//! workload, served on the agent socket as `sigil.policy.v1.PolicyDiscovery` to the bundled proxy
//! attested as that workload, so that proxies never talk to the Kubernetes API.
//!
//! The agent validates and compiles every object once, as it arrives
//! ([`sigil_policy::validate::object`]: its envelope — kind, namespace, name, creation time, uid
//! — and `spec`; status and the rest of the metadata dropped), and sends the compiled form
//! (`sigil.policy.v2`, [`sigil_proxy_api::policy`]); an object that does not validate is sent as
//! an invalid entry with its fail-closed stand-in, so that its workloads' proxies deny what it
//! would have governed. Selecting reads only `spec.selector.matchLabels`.
//!
//! Two sources ([`crate::object_source`]), merged by one task that owns all of the state and
//! publishes an immutable [`PolicySnapshot`] on a `watch` channel whenever the merged content
//! changes:
//! - Kubernetes (`--attestor k8s`): cluster-wide watches of `authorizationpolicies.sigil.dev` and
//!   `peerauthentications.sigil.dev` ([`VERSION`]). A resource whose CRD is not installed (its
//!   list is 404) counts as synced and empty, with a warning, and keeps being retried (with the
//!   watcher's backoff, at most 30 s apart), so that its objects apply once the CRD appears.
//! - `--policy-file` ([`PolicyFile`]): the same objects in a multi-document YAML file, re-read
//!   every [`FILE_POLL_INTERVAL`]; an invalid edit is logged and counted, and the last good
//!   objects stay. The route kinds in it are skipped here and read by [`crate::routes`].
//!
//! An object in both (same kind, namespace and name) is taken from the cluster. Nothing is
//! published until every source has delivered its initial state: a proxy given part of the
//! objects would let through what a missing DENY policy forbids.
//!
//! What applies to a workload ([`PolicySnapshot::select`]): the objects in its namespace and in
//! [`ROOT_NAMESPACE`] (mesh-wide) whose `spec.selector.matchLabels` is absent or empty, or all
//! match its labels. A workload's namespace and labels ([`Scope::of`]) are its pod's, followed
//! as they change, or, for the Unix attestor, the namespace of its `/ns/<ns>/sa/<sa>` ID and the
//! labels of its `--unix-map` entry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::Value;
use sigil_kube_watch::follow::WatchEvent;
use sigil_kube_watch::{POLL_INTERVAL, State, publish};
use sigil_policy::cluster;
use sigil_policy::envelope::{API_VERSION, GROUP, ROOT_NAMESPACE};
use sigil_policy::{Envelope, Kind, ObjectKey};
use sigil_proto::sigil::policy::v2::policy_discovery_server::{
    PolicyDiscovery, PolicyDiscoveryServer,
};
use sigil_proto::sigil::policy::v2::{self as wire, PolicySet, WatchPoliciesRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::attest::Workload;
use crate::attest::k8s::NodePods;
use crate::metrics::{ApiLabels, Metrics, OpenStream, SocketApi};
use crate::object_source::{self, ObjectFile, ObjectKind, ObjectSource};
use crate::peer::Workloads;
use crate::push_stream::{self, PushFeed, ResponseStream};

/// How often `--policy-file` is re-read.
pub const FILE_POLL_INTERVAL: Duration = POLL_INTERVAL;
/// What an operator is told when a policy resource is not served.
const CRDS_MISSING: &str = "install the sigil CRDs: kubectl apply -k deploy/";
/// The top-level fields of a policy file document: an object's envelope. `status` is allowed
/// (and dropped) so that objects copied from `kubectl get -o yaml` load.
const DOCUMENT_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];
const LABELS: ApiLabels = ApiLabels {
    api: SocketApi::Policy,
};

type ClusterEvent = (Kind, WatchEvent<DynamicObject>);
/// Policy objects by identity, so in the order they are sent in.
pub type Objects = object_source::Objects<Kind>;

/// Only shutdown ends a stream: clients retry, and reach the agent replacing this one.
impl From<PolicyError> for Status {
    fn from(e: PolicyError) -> Status {
        Status::unavailable(e.to_string())
    }
}

/// Why a policy file is invalid, or a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading it: {0}")]
    Read(#[from] std::io::Error),
    /// `document` counts from 1, empty documents included, as an editor would.
    #[error("document {document}: {reason}")]
    Document { document: usize, reason: String },
    #[error("document {document}: {key} is already document {first}")]
    Duplicate {
        document: usize,
        key: ObjectKey,
        first: usize,
    },
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// One policy object: the spec the user wrote, and what is sent for it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    /// `spec.selector.matchLabels`; `None` (absent or empty) selects every workload in scope.
    selector: Option<BTreeMap<String, String>>,
    /// As written (null: none), for telling a changed object from an unchanged one.
    spec: Value,
    /// Compiled, or invalid with its stand-in; made once here rather than for every stream it
    /// is sent on.
    wire: wire::Policy,
}

impl PolicyObject {
    fn new(envelope: &Envelope, spec: Value, selector: Option<BTreeMap<String, String>>) -> Self {
        let checked = sigil_policy::validate::object(envelope, &spec);
        if let Err(invalid) = &checked {
            debug!(object = %envelope.key, problem = %invalid.reason, "a policy is invalid; its workloads' proxies enforce a fail-closed stand-in");
        }
        let wire = sigil_proxy_api::policy::to_wire(&checked);
        PolicyObject {
            selector,
            spec,
            wire,
        }
    }

    /// The spec as written (null: none).
    pub fn spec(&self) -> &Value {
        &self.spec
    }

    /// What is sent to proxies.
    pub fn wire(&self) -> &wire::Policy {
        &self.wire
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_none_or(|selector| {
            selector
                .iter()
                .all(|(name, value)| labels.get(name) == Some(value))
        })
    }
}

/// `spec.selector.matchLabels`, `None` if absent or empty; `Err` says what is malformed.
fn match_labels(spec: &Value) -> Result<Option<BTreeMap<String, String>>, String> {
    let selector = match spec {
        Value::Null => return Ok(None),
        Value::Object(spec) => spec.get("selector"),
        _ => return Err("spec must be a mapping".into()),
    };
    let labels = match selector {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(selector)) => selector.get("matchLabels"),
        Some(_) => return Err("spec.selector must be a mapping".into()),
    };
    let labels = match labels {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(labels)) => labels,
        Some(_) => return Err("spec.selector.matchLabels must be a mapping".into()),
    };
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(name, value)| match value {
            Value::String(value) => Ok((name.clone(), value.clone())),
            _ => Err(format!(
                "spec.selector.matchLabels.{name} must be a string (quote it)"
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok((!labels.is_empty()).then_some(labels))
}

/// What selects policies for a workload: its namespace (empty when it has none: then only the
/// mesh-wide objects apply) and its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl Scope {
    /// The scope of an attested workload now, whichever attestor attested it: a pod's namespace
    /// and current labels, from this node's pods (`pods`); else the namespace of an
    /// `/ns/<ns>/sa/<sa>` ID and the labels attested (the Unix attestor's entry's). `None` while
    /// a pod is not among this node's pods: it has left them, and its proxy is going with it.
    pub fn of(workload: &Workload, pods: Option<&NodePods>) -> Option<Scope> {
        match &workload.pod {
            Some(pod) => {
                let current = pods?.get(&pod.uid)?;
                Some(Scope {
                    namespace: pod.namespace.clone(),
                    labels: current.labels.clone(),
                })
            }
            None => Some(Scope {
                namespace: workload
                    .id
                    .service_account()
                    .map(|(namespace, _)| namespace.to_string())
                    .unwrap_or_default(),
                labels: workload.labels.clone(),
            }),
        }
    }
}

/// Every policy object at one point in time; never changed once published.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySnapshot {
    /// 0 until every source has synced (the objects are not known yet), then one more with every
    /// published change.
    pub version: u64,
    pub objects: Objects,
}

impl PolicySnapshot {
    /// Whether every source has delivered its initial state.
    pub fn is_synced(&self) -> bool {
        self.version > 0
    }

    /// The objects that apply to a workload in `scope`, in (kind, namespace, name) order.
    pub fn select(&self, scope: &Scope) -> Vec<(&ObjectKey, &Arc<PolicyObject>)> {
        let mut namespaces = BTreeSet::from([ROOT_NAMESPACE, scope.namespace.as_str()]);
        namespaces.remove("");
        let mut selected = Vec::new();
        // The keys sort by kind, then namespace: one range per (kind, namespace) rather than a
        // pass over every object in the cluster.
        for kind in Kind::ALL {
            for namespace in &namespaces {
                let first = ObjectKey {
                    kind,
                    namespace: (*namespace).to_string(),
                    name: String::new(),
                };
                selected.extend(
                    self.objects
                        .range(first..)
                        .take_while(|(key, _)| key.kind == kind && key.namespace == *namespace)
                        .filter(|(_, object)| object.selects(&scope.labels)),
                );
            }
        }
        selected
    }
}

/// Reads a policy file's documents into objects; `Err` names the first invalid document.
fn parse_file(contents: &[u8]) -> Result<Objects, PolicyError> {
    let mut objects = Objects::new();
    let mut documents = HashMap::new();
    for (index, document) in serde_yaml::Deserializer::from_slice(contents).enumerate() {
        let number = index + 1;
        let invalid = |reason: String| PolicyError::Document {
            document: number,
            reason,
        };
        let value = Value::deserialize(document).map_err(|e| invalid(e.to_string()))?;
        // Between two `---`, or only comments: nothing to load.
        if value.is_null() {
            continue;
        }
        // Routes and traffic policies share the file; the route feed reads them.
        let Some((key, object)) = file_object(value).map_err(invalid)? else {
            continue;
        };
        if let Some(first) = documents.insert(key.clone(), number) {
            return Err(PolicyError::Duplicate {
                document: number,
                key,
                first,
            });
        }
        objects.insert(key, Arc::new(object));
    }
    Ok(objects)
}

/// One document of a policy file: a whole object, checked as far as the agent reads it;
/// `None` for one of the route kinds ([`sigil_policy::file::ROUTE_KINDS`]), which
/// [`crate::routes`] reads.
fn file_object(document: Value) -> Result<Option<(ObjectKey, PolicyObject)>, String> {
    let Value::Object(mut fields) = document else {
        return Err(
            "not a mapping; each document is one object (apiVersion, kind, metadata, spec)".into(),
        );
    };
    if let (Some(Value::String(api_version)), Some(Value::String(kind))) =
        (fields.get("apiVersion"), fields.get("kind"))
        && sigil_policy::file::is_route_kind(api_version, kind)
    {
        return Ok(None);
    }
    if let Some(unknown) = fields
        .keys()
        .find(|field| !DOCUMENT_FIELDS.contains(&field.as_str()))
    {
        return Err(format!(
            "unknown field `{unknown}`; an object has apiVersion, kind, metadata and spec"
        ));
    }
    let api_version = required(fields.get("apiVersion"), "apiVersion")?;
    if api_version != API_VERSION {
        return Err(format!(
            "apiVersion is {api_version:?}; policies are {API_VERSION}"
        ));
    }
    let kind = required(fields.get("kind"), "kind")?;
    let kind = Kind::from_name(kind)
        .ok_or_else(|| format!("kind {kind:?} is not AuthorizationPolicy or PeerAuthentication"))?;
    let metadata = fields.get("metadata");
    let optional = |field| {
        metadata
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    // The name is checked first: a document with no metadata is told its name is missing.
    let name = required(metadata.and_then(|m| m.get("name")), "metadata.name")?;
    let namespace = required(
        metadata.and_then(|m| m.get("namespace")),
        "metadata.namespace",
    )?;
    let envelope = Envelope {
        creation_timestamp: optional("creationTimestamp"),
        uid: optional("uid"),
        ..Envelope::new(kind, namespace, name)
    };
    let spec = fields.remove("spec").unwrap_or(Value::Null);
    let selector = match_labels(&spec)?;
    let object = PolicyObject::new(&envelope, spec, selector);
    Ok(Some((envelope.key, object)))
}

/// The non-empty string at `value`, or what is wrong with it.
fn required<'a>(value: Option<&'a Value>, what: &str) -> Result<&'a str, String> {
    match value {
        None | Some(Value::Null) => Err(format!("{what} is missing")),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(format!("{what} must be a non-empty string")),
    }
}

/// `--policy-file`: the last valid objects in it, re-read every [`FILE_POLL_INTERVAL`].
pub type PolicyFile = ObjectFile<Kind>;

/// The policy kinds, read from the cluster with [`cluster`] and from a file with
/// [`parse_file`].
impl ObjectKind for Kind {
    type Key = ObjectKey;
    type Object = Arc<PolicyObject>;
    type FileError = PolicyError;

    const ALL: &'static [Kind] = &Kind::ALL;
    const NOUN: &'static str = "policy";

    fn api_resource(self) -> ApiResource {
        cluster::api_resource(self)
    }

    fn cluster_key(self, object: &DynamicObject) -> Option<ObjectKey> {
        cluster_key(self, object)
    }

    fn cluster_object(self, object: &DynamicObject) -> Option<Arc<PolicyObject>> {
        cluster_object(self, object).map(|(_, object)| object)
    }

    fn log_not_served(self) {
        warn!(kind = %self, resource = %format!("{}.{GROUP}", self.plural()), "the policy resource is not served (no CRD); {CRDS_MISSING}. Until then there are no cluster policies of this kind");
    }

    fn parse_file(contents: &[u8]) -> Result<Objects, PolicyError> {
        parse_file(contents)
    }
}

/// What names a cluster object (see [`cluster::envelope`]).
fn cluster_key(kind: Kind, object: &DynamicObject) -> Option<ObjectKey> {
    cluster::envelope(kind, object).map(|envelope| envelope.key)
}

/// What is kept of a cluster object (see the module doc).
fn cluster_object(kind: Kind, object: &DynamicObject) -> Option<(ObjectKey, Arc<PolicyObject>)> {
    let envelope = cluster::envelope(kind, object)?;
    let spec = cluster::spec(object).clone();
    // The CRD's schema makes this a map of strings. If it is not, the object still goes to
    // every workload it could select, as an invalid entry their proxies enforce fail-closed,
    // rather than the agent silently dropping a policy.
    let selector = match_labels(&spec).unwrap_or_else(|reason| {
        warn!(object = %envelope.key, %reason, "policy has a malformed selector; sending it to every workload in its namespace");
        None
    });
    let object = PolicyObject::new(&envelope, spec, selector);
    Some((envelope.key, Arc::new(object)))
}

/// Where policies come from.
#[derive(Default)]
pub struct Sources {
    /// The cluster-wide watches of the policy resources, with this client (`--attestor k8s`).
    pub kubernetes: Option<kube::Client>,
    /// `--policy-file`, loaded at start-up.
    pub file: Option<PolicyFile>,
}

/// Starts the task that keeps every policy object, which stops when `shutdown` turns true or its
/// sender is dropped (ending every `WatchPolicies` stream). The receiver holds version 0 until
/// every source has synced.
pub fn spawn(
    sources: Sources,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<PolicySnapshot>> {
    let events = sources.kubernetes.map(object_source::cluster_events);
    let store = PolicyStore {
        source: ObjectSource::new(
            events.is_some(),
            sources.file,
            metrics.policy_file_reload_failures.clone(),
        ),
        metrics,
    };
    publish::spawn("policy feed", store, events, shutdown)
}

/// The policy task's state: it alone reads the sources and publishes.
struct PolicyStore {
    source: ObjectSource<Kind>,
    metrics: Arc<Metrics>,
}

impl State for PolicyStore {
    type Event = ClusterEvent;
    type Content = Objects;
    type Snapshot = PolicySnapshot;

    fn has_file(&self) -> bool {
        self.source.has_file()
    }

    fn synced(&self) -> bool {
        self.source.synced()
    }

    fn on_event(&mut self, (kind, event): ClusterEvent) -> bool {
        self.source.on_event(kind, event)
    }

    async fn poll_file(&mut self) -> bool {
        self.source.poll_file().await
    }

    /// The merged objects, logging the overlaps not logged yet.
    fn content(&mut self) -> Objects {
        self.source.merged()
    }

    fn published(snapshot: &PolicySnapshot) -> (u64, &Objects) {
        (snapshot.version, &snapshot.objects)
    }

    fn snapshot(&self, version: u64, objects: Objects) -> PolicySnapshot {
        self.metrics.policy_objects.set(objects.len() as i64);
        if version == 1 {
            info!(objects = objects.len(), "policies synced");
        } else {
            debug!(version, objects = objects.len(), "policies changed");
        }
        PolicySnapshot { version, objects }
    }
}

/// `sigil.policy.v2.PolicyDiscovery`: to each attested workload, the policies that apply to it.
pub struct PolicyApi {
    workloads: Workloads,
    policies: watch::Receiver<Arc<PolicySnapshot>>,
    /// This node's pods, whose labels select policies (`--attestor k8s`).
    pods: Option<watch::Receiver<NodePods>>,
}

impl PolicyApi {
    pub fn new(
        workloads: Workloads,
        policies: watch::Receiver<Arc<PolicySnapshot>>,
        pods: Option<watch::Receiver<NodePods>>,
    ) -> Self {
        PolicyApi {
            workloads,
            policies,
            pods,
        }
    }

    pub fn into_service(self) -> PolicyDiscoveryServer<PolicyApi> {
        PolicyDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl PolicyDiscovery for PolicyApi {
    type WatchPoliciesStream = ResponseStream<PolicySet>;

    async fn watch_policies(
        &self,
        request: Request<WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        // A workload's policies are only ever sent to that workload's proxy.
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, "policy stream opened");
        let feed = Feed {
            workload,
            policies: self.policies.clone(),
            pods: self.pods.clone(),
            sent: None,
            version: 0,
            pushes: self.workloads.metrics.pushes.get_or_create(&LABELS).clone(),
            _open: OpenStream::new(&self.workloads.metrics, SocketApi::Policy),
        };
        Ok(Response::new(push_stream::into_stream(feed)))
    }
}

/// What a set was made of, to tell whether the next one differs.
#[derive(Debug, PartialEq)]
struct Selected {
    scope: Scope,
    objects: Vec<Arc<PolicyObject>>,
}

/// One `WatchPolicies` stream.
struct Feed {
    workload: Workload,
    policies: watch::Receiver<Arc<PolicySnapshot>>,
    /// `None` for the Unix attestor, and once the pod watch has stopped.
    pods: Option<watch::Receiver<NodePods>>,
    /// What the last set sent was made of.
    sent: Option<Selected>,
    /// The last set's version: the sets sent on this stream so far.
    version: u64,
    pushes: Counter,
    _open: OpenStream,
}

impl PushFeed for Feed {
    type Message = PolicySet;
    type Error = PolicyError;

    /// The next set: the workload's as soon as the policies are synced, then after each change
    /// to the objects that apply to it or to its namespace and labels. The receivers always hold
    /// the newest state, so a slow reader gets the latest set, not a backlog.
    async fn next_message(&mut self) -> Result<PolicySet, PolicyError> {
        loop {
            let snapshot = self.policies.borrow_and_update().clone();
            let scope = {
                let pods = self.pods.as_mut().map(|pods| pods.borrow_and_update());
                Scope::of(&self.workload, pods.as_deref())
            };
            if snapshot.is_synced()
                && let Some(scope) = scope
            {
                let objects = snapshot
                    .select(&scope)
                    .into_iter()
                    .map(|(_, object)| object.clone())
                    .collect();
                let selected = Selected { scope, objects };
                if self.sent.as_ref() != Some(&selected) {
                    self.version += 1;
                    let message = PolicySet {
                        version: self.version,
                        namespace: selected.scope.namespace.clone(),
                        labels: selected.scope.labels.clone().into_iter().collect(),
                        policies: selected
                            .objects
                            .iter()
                            .map(|object| object.wire().clone())
                            .collect(),
                    };
                    self.sent = Some(selected);
                    return Ok(message);
                }
            }
            self.changed().await?;
        }
    }

    fn pushes(&self) -> &Counter {
        &self.pushes
    }
}

impl Feed {
    /// Waits for the policies or this node's pods to change.
    async fn changed(&mut self) -> Result<(), PolicyError> {
        let pods = self.pods.as_mut();
        let pods_changed = async move {
            match pods {
                Some(pods) => pods.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let pods_open = tokio::select! {
            changed = self.policies.changed() => {
                changed.map_err(|_| PolicyError::ShuttingDown)?;
                true
            }
            open = pods_changed => open,
        };
        if !pods_open {
            // The pod watch only stops with the agent, which ends this stream next.
            self.pods = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
