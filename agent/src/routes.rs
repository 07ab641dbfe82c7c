//! The route feed: Gateway API HTTPRoutes and GRPCRoutes whose parent is a meshed Service
//! (GAMMA) and sigil's BackendPolicy and RateLimitPolicy,
//! compiled against the meshed Services ([`sigil_route::compile`]) and served on the agent
//! socket as `sigil.route.v1.RouteDiscovery` to attested workloads, each getting its own view
//! (consumer routes of its namespace, else the producer routes; the rate limits of the Service
//! ports it backs).
//!
//! One task owns the state and publishes an immutable [`RouteState`] on a `watch` channel
//! whenever its inputs change; the objects are compiled once per change, not per client. Its
//! inputs:
//! - the mesh membership task's [`MeshState`] (its meshed Services, and its unmeshed ones as
//!   plain backends, become the [`Catalog`] routes are judged against);
//! - Kubernetes (`--attestor k8s`): cluster-wide watches of the four kinds ([`RouteResource`]).
//!   The Gateway API CRDs are not part of a plain cluster, and an old sigil install may lack the
//!   sigil.dev ones: a kind whose list is 404 has no objects (logged once, at info, with what to
//!   install) and keeps being retried with the watcher's backoff (at most 30 s apart). Neither
//!   this task nor a missing CRD holds back the agent's readiness or its other feeds;
//! - `--policy-file` ([`RouteFile`]): the same kinds among the policies, re-read every
//!   [`FILE_POLL_INTERVAL`]; an invalid edit is logged and counted, and the last good objects
//!   stay. An object in both is taken from the cluster.
//!
//! The two object sources are [`crate::object_source`]'s, as the policy feed's are.
//!
//! Nothing is published before every source has delivered its initial state. Each
//! `WatchRoutes` stream sends its client's whole view first (`reset`), then only the entries
//! that changed ([`sigil_proxy_api::routes::update`]); a slow reader gets the newest state, not a
//! backlog.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;
use serde_json::{Map, Value};
use sigil_identity::TrustDomain;
use sigil_kube_watch::follow::{Events, WatchEvent};
use sigil_kube_watch::{POLL_INTERVAL, State, publish};
use sigil_proto::sigil::route::v1::route_discovery_server::{RouteDiscovery, RouteDiscoveryServer};
use sigil_proto::sigil::route::v1::{RouteUpdate, WatchRoutesRequest};
use sigil_route::ServiceRef;
use sigil_route::compile::{ClientScope, Compiled};
use sigil_route::model::{Meta, ModelError, RouteObject, RouteObjects};
use sigil_route::validate::{Catalog, ServiceInfo};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::mesh::{MeshState, StateFeed, Synced};
use crate::metrics::{Metrics, SocketApi};
use crate::object_source::{self, ObjectFile, ObjectKind, ObjectSource};
use crate::peer::Workloads;
use crate::push_stream::{self, ResponseStream};

/// How often `--policy-file` is re-read for routes.
pub const FILE_POLL_INTERVAL: Duration = POLL_INTERVAL;
/// What an operator is told when a Gateway API route kind is not served.
const GATEWAY_CRDS_MISSING: &str = "install the Gateway API CRDs (standard channel): kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.1/standard-install.yaml";
/// What an operator is told when a sigil.dev kind is not served.
const SIGIL_CRDS_MISSING: &str = "install the sigil CRDs: kubectl apply -k deploy/";

/// Only shutdown ends a stream: clients retry, and reach the agent replacing this one.
impl From<RouteError> for Status {
    fn from(e: RouteError) -> Status {
        Status::unavailable(e.to_string())
    }
}

/// Why the route documents of a policy file are invalid, or the cluster's routes could not be
/// read ([`cluster_inputs`]).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "the cluster's Services and route objects were not all listed within {0:?}: is the API server reachable, and may this user list and watch them?"
    )]
    NotListed(Duration),
    #[error("reading it: {0}")]
    Read(#[from] std::io::Error),
    /// `document` counts from 1, empty documents included, as an editor would.
    #[error("document {document}: {reason}")]
    Document { document: usize, reason: String },
    #[error("document {document}: {source}")]
    Object {
        document: usize,
        // Boxed: it names the field, and errors are moved through every `Result` here.
        #[source]
        source: Box<ModelError>,
    },
    #[error("document {document}: {key} is already document {first}")]
    Duplicate {
        document: usize,
        key: ObjectKey,
        first: usize,
    },
}

/// The kinds the route feed reads, each a Kubernetes resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteResource {
    HttpRoute,
    GrpcRoute,
    BackendPolicy,
    RateLimitPolicy,
}

impl RouteResource {
    pub const ALL: [RouteResource; 4] = [
        RouteResource::HttpRoute,
        RouteResource::GrpcRoute,
        RouteResource::BackendPolicy,
        RouteResource::RateLimitPolicy,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            RouteResource::HttpRoute => "HTTPRoute",
            RouteResource::GrpcRoute => "GRPCRoute",
            RouteResource::BackendPolicy => "BackendPolicy",
            RouteResource::RateLimitPolicy => "RateLimitPolicy",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            RouteResource::HttpRoute => "httproutes",
            RouteResource::GrpcRoute => "grpcroutes",
            RouteResource::BackendPolicy => "backendpolicies",
            RouteResource::RateLimitPolicy => "ratelimitpolicies",
        }
    }

    /// The group and the version watched.
    fn group_version(self) -> (&'static str, &'static str) {
        match self {
            RouteResource::HttpRoute | RouteResource::GrpcRoute => {
                (sigil_route::model::GATEWAY_GROUP, "v1")
            }
            RouteResource::BackendPolicy | RouteResource::RateLimitPolicy => {
                ("sigil.dev", "v1alpha1")
            }
        }
    }

    fn api_resource(self) -> ApiResource {
        let (group, version) = self.group_version();
        let gvk = GroupVersionKind::gvk(group, version, self.kind());
        ApiResource::from_gvk_with_plural(&gvk, self.plural())
    }

    fn of(object: &RouteObject) -> RouteResource {
        match object {
            RouteObject::HttpRoute(_) => RouteResource::HttpRoute,
            RouteObject::GrpcRoute(_) => RouteResource::GrpcRoute,
            RouteObject::BackendPolicy(_) => RouteResource::BackendPolicy,
            RouteObject::RateLimitPolicy(_) => RouteResource::RateLimitPolicy,
        }
    }

    /// What an operator installs to have this kind served.
    fn install_hint(self) -> &'static str {
        match self.group_version().0 {
            "sigil.dev" => SIGIL_CRDS_MISSING,
            _ => GATEWAY_CRDS_MISSING,
        }
    }
}

impl fmt::Display for RouteResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// What names an object: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub resource: RouteResource,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.resource, self.namespace, self.name)
    }
}

fn meta(object: &RouteObject) -> &Meta {
    match object {
        RouteObject::HttpRoute(o) => &o.meta,
        RouteObject::GrpcRoute(o) => &o.meta,
        RouteObject::BackendPolicy(o) => &o.meta,
        RouteObject::RateLimitPolicy(o) => &o.meta,
    }
}

/// One object as read, and what it was read from: two are the same when what sigil reads of
/// them is (a status written by the CA is no change).
#[derive(Clone, Debug)]
pub struct Stored {
    written: Value,
    object: RouteObject,
}

impl PartialEq for Stored {
    fn eq(&self, other: &Stored) -> bool {
        self.written == other.written
    }
}

impl Stored {
    /// Reads `written`; `Ok(None)` when it is none of the route kinds.
    fn read(written: Value) -> Result<Option<(ObjectKey, Stored)>, ModelError> {
        let Some(object) = RouteObject::from_json(written.clone())? else {
            return Ok(None);
        };
        let meta = meta(&object);
        let key = ObjectKey {
            resource: RouteResource::of(&object),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        };
        Ok(Some((key, Stored { written, object })))
    }
}

/// Route objects by kind, namespace and name.
pub type Objects = object_source::Objects<RouteResource>;

/// Reads the route documents of a policy file, skipping the others (policies, read by
/// [`crate::policy_feed`]); `Err` names the first invalid route document.
fn parse_file(contents: &[u8]) -> Result<Objects, RouteError> {
    let mut objects = Objects::new();
    let mut documents = HashMap::new();
    for (index, document) in serde_yaml::Deserializer::from_slice(contents).enumerate() {
        let number = index + 1;
        let value = Value::deserialize(document).map_err(|e| RouteError::Document {
            document: number,
            reason: e.to_string(),
        })?;
        let Value::Object(mut fields) = value else {
            // Empty documents are skipped; other non-objects are the policy reader's to refuse.
            continue;
        };
        // Copied from `kubectl get -o yaml`: what the API server wrote is not the user's.
        fields.remove("status");
        let read = Stored::read(Value::Object(fields)).map_err(|source| RouteError::Object {
            document: number,
            source: Box::new(source),
        })?;
        let Some((key, stored)) = read else {
            continue;
        };
        if let Some(first) = documents.insert(key.clone(), number) {
            return Err(RouteError::Duplicate {
                document: number,
                key,
                first,
            });
        }
        objects.insert(key, stored);
    }
    Ok(objects)
}

/// `--policy-file`'s route documents: the last valid ones, re-read every
/// [`FILE_POLL_INTERVAL`].
pub type RouteFile = ObjectFile<RouteResource>;

/// The route kinds, read from the cluster with [`cluster_object`] and from a file with
/// [`parse_file`].
impl ObjectKind for RouteResource {
    type Key = ObjectKey;
    type Object = Stored;
    type FileError = RouteError;

    const ALL: &'static [RouteResource] = &RouteResource::ALL;
    const NOUN: &'static str = "route";

    fn api_resource(self) -> ApiResource {
        RouteResource::api_resource(self)
    }

    fn cluster_key(self, object: &DynamicObject) -> Option<ObjectKey> {
        cluster_key(self, object)
    }

    fn cluster_object(self, object: &DynamicObject) -> Option<Stored> {
        cluster_object(self, object).map(|(_, stored)| stored)
    }

    fn log_not_served(self) {
        let (group, _) = self.group_version();
        info!(resource = %self, resource_name = %format!("{}.{group}", self.plural()), "the route resource is not served (no CRD); until it is there are no objects of this kind. To use it: {}", self.install_hint());
    }

    fn parse_file(contents: &[u8]) -> Result<Objects, RouteError> {
        parse_file(contents)
    }
}

/// What is read of a cluster object: its kind (from the resource watched, whatever the list
/// said), the metadata sigil uses, and its spec.
fn cluster_written(resource: RouteResource, object: &DynamicObject) -> Option<Value> {
    let meta = &object.metadata;
    let mut metadata = Map::new();
    metadata.insert("namespace".into(), meta.namespace.clone()?.into());
    metadata.insert("name".into(), meta.name.clone()?.into());
    if let Some(time) = &meta.creation_timestamp {
        metadata.insert("creationTimestamp".into(), serde_json::to_value(time).ok()?);
    }
    if let Some(generation) = meta.generation {
        metadata.insert("generation".into(), generation.into());
    }
    if let Some(annotations) = &meta.annotations {
        metadata.insert(
            "annotations".into(),
            serde_json::to_value(annotations).ok()?,
        );
    }
    let (group, version) = resource.group_version();
    let mut fields = Map::new();
    fields.insert("apiVersion".into(), format!("{group}/{version}").into());
    fields.insert("kind".into(), resource.kind().into());
    fields.insert("metadata".into(), Value::Object(metadata));
    if let Some(spec) = object.data.get("spec") {
        fields.insert("spec".into(), spec.clone());
    }
    Some(Value::Object(fields))
}

/// A cluster object, read; `None` (logged) when it cannot be: the CRD's schema should have
/// refused it, and what is not understood is not sent.
fn cluster_object(resource: RouteResource, object: &DynamicObject) -> Option<(ObjectKey, Stored)> {
    let written = cluster_written(resource, object)?;
    match Stored::read(written) {
        Ok(read) => read,
        Err(e) => {
            warn!(%resource, error = %e, "an object cannot be read; it is left out of the routes");
            None
        }
    }
}

fn cluster_key(resource: RouteResource, object: &DynamicObject) -> Option<ObjectKey> {
    Some(ObjectKey {
        resource,
        namespace: object.metadata.namespace.clone()?,
        name: object.metadata.name.clone()?,
    })
}

/// An input of the route task.
pub enum RouteEvent {
    /// The mesh membership task published.
    Mesh(Arc<MeshState>),
    // Boxed: the objects are large, and an event is moved through the merged stream.
    Cluster(RouteResource, Box<WatchEvent<DynamicObject>>),
}

/// Where the route objects come from.
#[derive(Default)]
pub struct Sources {
    /// The cluster-wide watches of the four kinds, with this client (`--attestor k8s`).
    pub kubernetes: Option<kube::Client>,
    /// `--policy-file`'s route documents, loaded at start-up.
    pub file: Option<RouteFile>,
}

/// What the route task's output is computed from: the objects and the Services, compared to
/// tell whether anything changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteInputs {
    pub objects: Objects,
    pub services: BTreeMap<ServiceRef, ServiceInfo>,
}

impl RouteInputs {
    /// The objects, as [`sigil_route::compile`] takes them.
    pub fn route_objects(&self) -> RouteObjects {
        (self.objects.values())
            .map(|stored| stored.object.clone())
            .collect()
    }

    /// The Services, as [`sigil_route::compile`] takes them.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            services: self.services.clone(),
        }
    }
}

/// The inputs and what they compile to; two are the same when their inputs are.
#[derive(Clone, Debug, Default)]
pub struct RouteContent {
    pub inputs: RouteInputs,
    pub compiled: Compiled,
}

impl PartialEq for RouteContent {
    fn eq(&self, other: &RouteContent) -> bool {
        self.inputs == other.inputs
    }
}

/// What the route task publishes: 0 until every source has synced, then one more with every
/// change of its inputs, compiled once for every client.
#[derive(Debug, Default)]
pub struct RouteState {
    pub version: u64,
    pub content: RouteContent,
}

impl RouteState {
    pub fn inputs(&self) -> &RouteInputs {
        &self.content.inputs
    }

    pub fn compiled(&self) -> &Compiled {
        &self.content.compiled
    }
}

impl Synced for RouteState {
    fn is_synced(&self) -> bool {
        self.version > 0
    }
}

/// The Services routes are judged against: the meshed ones, with their ports and the SPIFFE IDs
/// of their endpoints, and the unmeshed ones (backends only), with their ports and cluster IPs.
fn services(mesh: &MeshState) -> BTreeMap<ServiceRef, ServiceInfo> {
    sigil_proxy_api::routes::catalog(
        mesh.services().services().map(|service| &**service),
        mesh.unmeshed_services(),
    )
    .services
}

/// Starts the task that keeps the routes, which stops when `shutdown` turns true or its sender
/// is dropped (ending every `WatchRoutes` stream). The receiver holds version 0 until the mesh
/// state and every source have synced.
pub fn spawn(
    td: TrustDomain,
    sources: Sources,
    mesh: watch::Receiver<Arc<MeshState>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<RouteState>> {
    let mesh_events = WatchStream::new(mesh).map(RouteEvent::Mesh).boxed();
    let cluster_events = sources.kubernetes.map(cluster_events);
    let source = ObjectSource::new(
        cluster_events.is_some(),
        sources.file,
        metrics.policy_file_reload_failures.clone(),
    );
    let events = match cluster_events {
        Some(cluster_events) => futures::stream::select(mesh_events, cluster_events).boxed(),
        None => mesh_events,
    };
    let store = RouteStore {
        td,
        mesh: None,
        source,
        last: None,
    };
    publish::spawn("route feed", store, Some(events), shutdown)
}

/// The route objects and the Services of the cluster as an agent sees them, for `sigil inspect
/// route`: connected through `KUBECONFIG` or the in-cluster config, an agent's mesh and route
/// tasks follow the cluster until both have listed everything (at most `wait`), then stop.
pub async fn cluster_inputs(td: TrustDomain, wait: Duration) -> Result<RouteInputs, RouteError> {
    let client = kube::Client::try_default()
        .await
        .map_err(RouteError::Client)?;
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    // Dropped on return, which stops both tasks.
    let (_stop, shutdown) = watch::channel(false);
    let mesh = crate::mesh::spawn(
        td.clone(),
        crate::mesh::Sources {
            kubernetes: Some(client.clone()),
            file: None,
        },
        metrics.clone(),
        shutdown.clone(),
    );
    let sources = Sources {
        kubernetes: Some(client),
        file: None,
    };
    let mut state = spawn(td, sources, mesh, metrics, shutdown);
    let synced = tokio::time::timeout(wait, state.wait_for(|state| state.is_synced())).await;
    match synced {
        Ok(Ok(state)) => Ok(state.inputs().clone()),
        _ => Err(RouteError::NotListed(wait)),
    }
}

/// The watches of the four kinds in every namespace ([`object_source::cluster_events`]), as
/// route task inputs.
fn cluster_events(client: kube::Client) -> Events<RouteEvent> {
    object_source::cluster_events(client)
        .map(|(resource, event)| RouteEvent::Cluster(resource, Box::new(event)))
        .boxed()
}

/// The route task's state: it alone reads the sources and publishes.
struct RouteStore {
    /// Whose SPIFFE IDs rate-limit overrides name.
    td: TrustDomain,
    /// The Services of the mesh state last received; `None` until the first synced one.
    mesh: Option<BTreeMap<ServiceRef, ServiceInfo>>,
    source: ObjectSource<RouteResource>,
    /// What was compiled last, whose unchanged entries the next compilation keeps.
    last: Option<RouteContent>,
}

impl State for RouteStore {
    type Event = RouteEvent;
    type Content = RouteContent;
    type Snapshot = RouteState;

    fn has_file(&self) -> bool {
        self.source.has_file()
    }

    fn synced(&self) -> bool {
        self.mesh.is_some() && self.source.synced()
    }

    fn on_event(&mut self, event: RouteEvent) -> bool {
        match event {
            RouteEvent::Mesh(state) => {
                if !state.is_synced() {
                    return false;
                }
                let services = services(&state);
                let changed = self.mesh.as_ref() != Some(&services);
                self.mesh = Some(services);
                changed
            }
            RouteEvent::Cluster(resource, event) => self.source.on_event(resource, *event),
        }
    }

    async fn poll_file(&mut self) -> bool {
        self.source.poll_file().await
    }

    /// The merged objects and the Services, compiled (unless they are what was compiled last),
    /// logging the overlaps not logged yet.
    fn content(&mut self) -> RouteContent {
        let objects = self.source.merged();
        let inputs = RouteInputs {
            objects,
            services: self.mesh.clone().unwrap_or_default(),
        };
        if let Some(last) = &self.last
            && last.inputs == inputs
        {
            return last.clone();
        }
        let content = self.compile(inputs);
        self.last = Some(content.clone());
        content
    }

    fn published(state: &RouteState) -> (u64, &RouteContent) {
        (state.version, &state.content)
    }

    fn snapshot(&self, version: u64, content: RouteContent) -> RouteState {
        let objects = content.inputs.objects.len();
        let ports = content.compiled.producer.len();
        if version == 1 {
            info!(objects, producer_ports = ports, "routes synced");
        } else {
            debug!(version, objects, producer_ports = ports, "routes changed");
        }
        RouteState { version, content }
    }
}

impl RouteStore {
    /// Compiles `inputs` for every client. Entries that come out as they were last time keep
    /// their `Arc`s, so that streams send only what changed (they compare by pointer).
    fn compile(&self, inputs: RouteInputs) -> RouteContent {
        let mut compiled =
            sigil_route::compile::compile(&inputs.route_objects(), &inputs.catalog(), &self.td);
        if let Some(last) = &self.last {
            keep_unchanged(&last.compiled, &mut compiled);
        }
        RouteContent { inputs, compiled }
    }
}

/// Puts `previous`'s `Arc` in place of every entry of `current` that is the same on the wire.
fn keep_unchanged(previous: &Compiled, current: &mut Compiled) {
    use sigil_proxy_api::routes::{
        backend_policy_to_message, inbound_policy_to_message, port_routes_to_message,
    };
    keep_same(
        &previous.producer,
        &mut current.producer,
        port_routes_to_message,
    );
    for (namespace, ports) in &mut current.consumer {
        if let Some(before) = previous.consumer.get(namespace) {
            keep_same(before, ports, port_routes_to_message);
        }
    }
    keep_same(
        &previous.backends,
        &mut current.backends,
        backend_policy_to_message,
    );
    keep_same(
        &previous.inbound,
        &mut current.inbound,
        inbound_policy_to_message,
    );
}

fn keep_same<K: Ord, T, M: PartialEq>(
    previous: &BTreeMap<K, Arc<T>>,
    current: &mut BTreeMap<K, Arc<T>>,
    message: impl Fn(&T) -> M,
) {
    for (key, entry) in current.iter_mut() {
        if let Some(before) = previous.get(key)
            && message(before) == message(entry)
        {
            *entry = before.clone();
        }
    }
}

/// `sigil.route.v1.RouteDiscovery`: to each attested workload, its view of the routes.
pub struct RoutesApi {
    workloads: Workloads,
    state: watch::Receiver<Arc<RouteState>>,
}

impl RoutesApi {
    pub fn new(workloads: Workloads, state: watch::Receiver<Arc<RouteState>>) -> Self {
        RoutesApi { workloads, state }
    }

    pub fn into_service(self) -> RouteDiscoveryServer<RoutesApi> {
        RouteDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl RouteDiscovery for RoutesApi {
    type WatchRoutesStream = ResponseStream<RouteUpdate>;

    async fn watch_routes(
        &self,
        request: Request<WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        // Routes name Services and identities: only attested callers learn them.
        let workload = self.workloads.attest(&request).await?;
        let scope = ClientScope::of(&workload.id);
        info!(identity = %workload.id, namespace = %scope.namespace, "route stream opened");
        Ok(Response::new(push_stream::into_stream(feed(
            self.state.clone(),
            &self.workloads.metrics,
            scope,
        ))))
    }
}

/// One `WatchRoutes` stream: the client's whole view at once (once synced), then the entries
/// that changed in it, skipping the states that changed nothing it uses.
fn feed(
    state: watch::Receiver<Arc<RouteState>>,
    metrics: &Metrics,
    scope: ClientScope,
) -> StateFeed<RouteState, RouteUpdate> {
    StateFeed::new(state, metrics, SocketApi::Routes, move |sent, state| {
        let previous = sent.map(|sent| sent.compiled().view(&scope));
        let current = state.compiled().view(&scope);
        sigil_proxy_api::routes::update(previous.as_ref(), &current, state.version)
    })
}

#[cfg(test)]
mod tests;
