//! Mesh membership: which IP addresses belong to meshed workloads and the SPIFFE IDs each one's
//! server may present, served on the agent socket as `sigil.mesh.v1.MeshDiscovery` so that the
//! bundled proxy can decide, per outbound connection, between originating mTLS (and checking the
//! peer's ID) and passing through.
//!
//! The sources, merged by one task that owns all of the state and publishes an immutable
//! [`MeshState`] on a `watch` channel whenever the merged content changes: the membership (a
//! [`MeshSnapshot`]) and, from the same sources and by the same rule, the meshed Services and
//! their endpoints (a [`ServiceTable`], served by [`crate::services`]), and the other Services
//! of Kubernetes with their cluster IPs and ports ([`UnmeshedService`], which routes may name as
//! backends, reached plainly):
//! - Kubernetes (`--attestor k8s`): a cluster-wide watch of the pods labelled
//!   [`TLS_MODE_LABEL`]`=`[`TLS_MODE_MTLS`]. Each pod's IPs map to its service account's
//!   identity. Host-network pods (their IP is the node's), finished pods and pods without an IP
//!   are left out; when two pods claim one IP, one of them is stale and the running, more
//!   recently created one is kept.
//! - Kubernetes Services and their EndpointSlices (cluster-wide watches of both): a Service with
//!   a cluster IP is a member at its cluster IPs when it has at least one endpoint address and
//!   every endpoint address in its slices (ready or not: the node may route to terminating ones)
//!   is itself a member (a labelled pod, or a mesh-file entry); the proxy connects to the cluster
//!   IP, the node's Service routing picks one endpoint, and that endpoint's server must prove one
//!   of the identities behind the Service, so the member carries all of them (several while,
//!   say, a Deployment changes its service account). A Service with any unmeshed endpoint (a
//!   rollout into a newly injected namespace, pods opted out of injection) is left out and
//!   logged: some of its endpoints speak plaintext, so its connections pass through. A meshed pod
//!   that is leaving (deleted, or finished) still counts for the Services whose slices list it
//!   as their endpoint (by `targetRef` UID) until they stop listing it: Kubernetes may deliver
//!   the pod's deletion before the slice update that drops its address, and in that gap the
//!   Service must not fall out of the mesh (its connections would go out in plaintext).
//!   The same rule puts a Service in the service table, headless ones included, each endpoint
//!   with the identity of the member (or leaving pod) at its address.
//! - `--mesh-file` ([`MeshFile`]): `{ip, id}` pairs, and optionally `services:` whose endpoints
//!   are among them, re-read every [`FILE_POLL_INTERVAL`]; an invalid edit is logged and counted,
//!   and the last good file stays. Its entries win over pods and Services on the same IP, and
//!   its Services over Kubernetes' of the same namespace and name: the operator named them
//!   explicitly.
//!
//! Nothing is published until every source has delivered its initial state: a proxy given half a
//! list would send plaintext to meshed peers missing from it.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use sigil_identity::spiffe::SpiffeIdError;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_kube_watch::follow::{self, Events, WatchEvent};
use sigil_kube_watch::{Listed, POLL_INTERVAL, PolledFile, State, publish};
use sigil_proto::sigil::mesh::v1::mesh_discovery_server::{MeshDiscovery, MeshDiscoveryServer};
use sigil_proto::sigil::mesh::v1::{MeshMembers, WatchMembersRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use sigil_proxy_api::mesh::{Member, MemberError, MeshSnapshot, parse_entries};
use sigil_proxy_api::routes::UnmeshedService;
use sigil_proxy_api::services::{Endpoint, MeshService, ServiceKey, ServicePort, ServiceTable};
use sigil_proxy_api::{OPAQUE_PORTS_ANNOTATION, TLS_MODE_LABEL, TLS_MODE_MTLS};

use crate::metrics::{ApiLabels, Metrics, OpenStream, SocketApi};
use crate::peer::Workloads;
use crate::push_stream::{self, PushFeed, ResponseStream};
use crate::services::{
    EndpointState, FileService, InvalidOpaquePorts, ServicesError, file_services,
    kube_service_entry, service_ports, slice_ports,
};

/// The source of the members read from `--mesh-file`.
pub const FILE_SOURCE: &str = "mesh-file";
/// How often `--mesh-file` is re-read.
pub const FILE_POLL_INTERVAL: Duration = POLL_INTERVAL;
/// What Kubernetes runs a pod as when it names no service account.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The label naming the Service an EndpointSlice belongs to (in the slice's namespace).
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// How many of a partly meshed Service's unmeshed endpoint addresses its log line names.
const LOGGED_UNMESHED: usize = 5;

/// An event of one of the Kubernetes watches.
enum KubeEvent {
    // Boxed: the objects are large, and an event is moved through the merged stream.
    Pod(Box<WatchEvent<Pod>>),
    Service(Box<WatchEvent<Service>>),
    EndpointSlice(Box<WatchEvent<EndpointSlice>>),
}

/// Only shutdown ends a stream: clients retry, and reach the agent replacing this one.
impl From<MeshError> for Status {
    fn from(e: MeshError) -> Status {
        Status::unavailable(e.to_string())
    }
}

/// Why a membership source or message is invalid, or a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("reading it: {0}")]
    Read(#[from] std::io::Error),
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error(transparent)]
    Service(#[from] ServicesError),
    #[error("pod {pod} has no valid identity: {reason}")]
    PodIdentity { pod: String, reason: SpiffeIdError },
    #[error("the agent is shutting down")]
    ShuttingDown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    members: Vec<FileEntry>,
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    ip: String,
    id: String,
}

/// What a mesh file lists, checked.
#[derive(Debug, PartialEq)]
struct FileContent {
    members: BTreeMap<IpAddr, SpiffeId>,
    services: Vec<MeshService>,
}

/// Parses and checks a mesh file: every IP and ID valid, IDs in `td`, no IP listed twice, and
/// its Services valid with members as endpoints.
fn parse_file(contents: &[u8], td: &TrustDomain) -> Result<FileContent, MeshError> {
    let file: FileYaml = serde_yaml::from_slice(contents)?;
    let entries = file
        .members
        .iter()
        .map(|entry| (entry.ip.as_str(), [entry.id.as_str()]));
    let members = parse_entries(entries, Some(td))?
        .into_iter()
        .filter_map(|(ip, mut ids)| Some((ip, ids.pop_first()?)))
        .collect();
    let services = file_services(&file.services, &members)?;
    Ok(FileContent { members, services })
}

/// `--mesh-file`: the last valid membership and Services listed in it, re-read every
/// [`FILE_POLL_INTERVAL`].
#[derive(Debug)]
pub struct MeshFile(PolledFile<FileContent>);

impl MeshFile {
    /// Reads and checks the file at start-up, where a missing or invalid file is an error.
    pub fn load(path: &Path, td: &TrustDomain) -> Result<MeshFile, MeshError> {
        PolledFile::load(path, |contents| parse_file(contents, td)).map(MeshFile)
    }

    fn members(&self) -> &BTreeMap<IpAddr, SpiffeId> {
        &self.0.value().members
    }

    /// The Services it lists, checked (`sigil inspect route` reads them too).
    pub fn services(&self) -> &[MeshService] {
        &self.0.value().services
    }
}

/// What the membership needs of one labelled pod that contributes to it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MeshPod {
    ips: Vec<IpAddr>,
    id: SpiffeId,
    /// `<namespace>/<name>`
    source: String,
    running: bool,
    created: Option<Time>,
}

impl MeshPod {
    /// Of two pods claiming one IP, the greater is kept: running before not, then the more
    /// recently created (the other is stale), then by name only so the choice is stable.
    fn rank(&self) -> (bool, Option<&Time>, &str) {
        (self.running, self.created.as_ref(), &self.source)
    }
}

/// The pod's contribution to the membership; `Ok(None)` for a pod that makes none: on the host
/// network (its IP is the node's, shared by everything there), finished, or without an IP yet.
fn mesh_pod(pod: &Pod, td: &TrustDomain) -> Result<Option<MeshPod>, MeshError> {
    let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
        return Ok(None);
    };
    let spec = pod.spec.as_ref();
    if spec.and_then(|spec| spec.host_network) == Some(true) {
        return Ok(None);
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|status| status.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let listed: Vec<&str> = status
        .and_then(|status| status.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
        .unwrap_or_default();
    // podIPs is the field; podIP (its first entry) is all that older kubelets set.
    let ips: Vec<IpAddr> = if listed.is_empty() {
        status
            .and_then(|status| status.pod_ip.as_deref())
            .into_iter()
            .collect()
    } else {
        listed
    }
    .into_iter()
    // The API server validates these; anything else cannot be routed to anyway.
    .filter_map(|ip| ip.parse().ok())
    .collect();
    if ips.is_empty() {
        return Ok(None);
    }
    let source = format!("{namespace}/{name}");
    let service_account = spec
        .and_then(|spec| spec.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    let id = SpiffeId::for_service_account(td, namespace, service_account).map_err(|reason| {
        MeshError::PodIdentity {
            pod: source.clone(),
            reason,
        }
    })?;
    Ok(Some(MeshPod {
        ips,
        id,
        source,
        running: phase == Some("Running"),
        created: pod.metadata.creation_timestamp.clone(),
    }))
}

/// A labelled pod's contribution, or none (logged) when it has no valid identity.
fn pod_contribution(pod: &Pod, td: &TrustDomain) -> Option<MeshPod> {
    mesh_pod(pod, td).unwrap_or_else(|e| {
        warn!(error = %e, "a pod labelled for the mesh is left out of it");
        None
    })
}

/// What the membership and the service table need of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KubeService {
    key: ServiceKey,
    /// Empty for a headless Service: its clients reach the endpoints' own IPs, members in their
    /// own right, so only the service table lists it.
    cluster_ips: Vec<IpAddr>,
    /// `<namespace>/service/<name>`, also the key of its EndpointSlices ([`MeshSlice::service`]).
    source: String,
    ports: Vec<ServicePort>,
    /// Its opaque-ports annotation, when that does not parse (ignored, logged once).
    invalid_opaque_ports: Option<InvalidOpaquePorts>,
}

/// The Service's contribution: `None` for one of type ExternalName. Its endpoints come from its
/// EndpointSlices, whether the control plane manages them (a selector) or not.
fn kube_service(service: &Service) -> Option<KubeService> {
    let (namespace, name) = (
        service.metadata.namespace.as_ref()?,
        service.metadata.name.as_ref()?,
    );
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let listed: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    // "None" (headless) does not parse.
    let cluster_ips: Vec<IpAddr> = listed.iter().filter_map(|ip| ip.parse().ok()).collect();
    let (ports, invalid_opaque_ports) = service_ports(service);
    Some(KubeService {
        key: ServiceKey::new(namespace, name),
        cluster_ips,
        source: service_key(namespace, name),
        ports,
        invalid_opaque_ports,
    })
}

fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/service/{name}")
}

/// What the membership and the service table need of one EndpointSlice: its Service, its ports
/// and every endpoint address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MeshSlice {
    /// The Service's [`KubeService::source`].
    service: String,
    /// The target port of each Service port, by name, at every endpoint of this slice.
    ports: BTreeMap<String, u16>,
    /// Every address of every endpoint, ready or not (the node may route to serving,
    /// terminating endpoints).
    addresses: Vec<EndpointAddress>,
}

/// One endpoint address of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointAddress {
    /// In the slice's textual form: one that does not parse as an IP cannot be a member, and so
    /// keeps the Service out.
    address: String,
    /// The UID of the pod behind it (`targetRef`), to recognise a pod that is leaving.
    pod_uid: Option<String>,
    /// Its endpoint's conditions, node and zone.
    state: EndpointState,
}

/// The slice's contribution: `None` for one that belongs to no Service (no
/// [`SERVICE_NAME_LABEL`]) or lists FQDNs (the node's Service routing ignores those).
fn mesh_slice(slice: &EndpointSlice) -> Option<MeshSlice> {
    let namespace = slice.metadata.namespace.as_ref()?;
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    if slice.address_type == "FQDN" {
        return None;
    }
    let addresses = slice
        .endpoints
        .iter()
        .flat_map(|endpoint| {
            let pod_uid = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| target.uid.clone());
            let state = EndpointState::of(endpoint);
            endpoint
                .addresses
                .iter()
                .map(move |address| EndpointAddress {
                    address: address.clone(),
                    pod_uid: pod_uid.clone(),
                    state: state.clone(),
                })
        })
        .collect();
    Some(MeshSlice {
        service: service_key(namespace, service),
        ports: slice_ports(slice),
        addresses,
    })
}

/// The Kubernetes sources' state, each watch's as delivered.
#[derive(Debug, Default)]
struct KubeState {
    pods: Listed<String, MeshPod>,
    services: Listed<String, KubeService>,
    slices: Listed<String, MeshSlice>,
    /// Meshed pods that left (deleted, finished, or gone from a re-list), by UID, kept while an
    /// EndpointSlice still names them as an endpoint: they count for those Services only, not
    /// as members at their own IPs (which a new pod may take).
    leaving: BTreeMap<String, MeshPod>,
}

impl KubeState {
    fn synced(&self) -> bool {
        self.pods.synced && self.services.synced && self.slices.synced
    }

    /// Follows one event of the meshed pods' watch, remembering the pods whose contribution it
    /// ends; returns whether the membership may have changed.
    fn on_pod_event(&mut self, event: Event<Pod>, td: &TrustDomain) -> bool {
        let ending: Vec<(String, MeshPod)> = match &event {
            Event::Apply(pod) | Event::Delete(pod) => pod
                .metadata
                .uid
                .as_ref()
                .and_then(|uid| Some((uid.clone(), self.pods.items.get(uid)?.clone())))
                .into_iter()
                .collect(),
            // A re-list replaces the whole list: whatever it lacks has left.
            Event::InitDone => self
                .pods
                .items
                .iter()
                .map(|(uid, pod)| (uid.clone(), pod.clone()))
                .collect(),
            Event::Init | Event::InitApply(_) => Vec::new(),
        };
        let mut changed = self
            .pods
            .on_event(event, "meshed pods", |pod| pod_contribution(pod, td));
        for (uid, pod) in ending {
            if !self.pods.items.contains_key(&uid) {
                debug!(pod = %pod.source, "a meshed pod left; it counts for the Services still listing it");
                self.leaving.insert(uid, pod);
                changed = true;
            }
        }
        let pods = &self.pods.items;
        self.leaving.retain(|uid, _| !pods.contains_key(uid));
        self.forget_left_pods();
        changed
    }

    /// Follows one event of the EndpointSlices' watch; returns whether the membership may have
    /// changed.
    fn on_slice_event(&mut self, event: Event<EndpointSlice>) -> bool {
        let changed = self.slices.on_event(event, "endpoint slices", mesh_slice);
        self.forget_left_pods();
        changed
    }

    /// Forgets the leaving pods no slice names any more: what held them is gone for good.
    fn forget_left_pods(&mut self) {
        if self.leaving.is_empty() {
            return;
        }
        let named: BTreeSet<&str> = self
            .slices
            .items
            .values()
            .flat_map(|slice| &slice.addresses)
            .filter_map(|address| address.pod_uid.as_deref())
            .collect();
        self.leaving.retain(|uid, _| named.contains(uid.as_str()));
    }

    /// The leaving pod behind `address`, if the slice names one at an IP it had.
    fn leaving_pod(&self, address: &EndpointAddress, ip: IpAddr) -> Option<&MeshPod> {
        let pod = self.leaving.get(address.pod_uid.as_deref()?)?;
        pod.ips.contains(&ip).then_some(pod)
    }
}

/// Two or more claims on one IP, and which one was kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Conflict {
    ip: IpAddr,
    kept: String,
    ignored: Vec<String>,
}

/// A Service left out of the membership because some of its endpoint addresses (and not all)
/// are not meshed: connections to it pass through as plaintext.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PartlyMeshed {
    service: String,
    /// How many of its endpoint addresses are not members.
    unmeshed: usize,
    /// The first few of them, sorted, for the log.
    examples: Vec<String>,
}

/// One member per IP from the pods (the best-ranked claim), recording the conflicts.
fn pod_members<'a>(
    pods: impl IntoIterator<Item = &'a MeshPod>,
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<IpAddr, Member> {
    let mut claims: BTreeMap<IpAddr, Vec<&MeshPod>> = BTreeMap::new();
    for pod in pods {
        for ip in &pod.ips {
            claims.entry(*ip).or_default().push(pod);
        }
    }
    let mut members = BTreeMap::new();
    for (ip, mut claimants) in claims {
        claimants.sort_by(|a, b| b.rank().cmp(&a.rank()));
        let Some((kept, ignored)) = claimants.split_first() else {
            continue;
        };
        if !ignored.is_empty() {
            conflicts.push(Conflict {
                ip,
                kept: kept.source.clone(),
                ignored: ignored.iter().map(|pod| pod.source.clone()).collect(),
            });
        }
        members.insert(ip, Member::single(kept.id.clone(), kept.source.clone()));
    }
    members
}

/// One endpoint address of a meshed Service, and what vouches for it.
struct MeshedAddress<'a> {
    ip: IpAddr,
    address: &'a EndpointAddress,
    slice: &'a MeshSlice,
    /// The identity it must prove: its member's (a pod's or the file's, one each), or that of the
    /// meshed pod leaving from it.
    id: &'a SpiffeId,
    /// The member's or leaving pod's source: `<namespace>/<pod>` or `mesh-file`.
    source: &'a str,
}

/// The one rule of which Services are meshed, for both the membership and the service table:
/// each Service with at least one endpoint address whose endpoint addresses are all members of
/// `members` (as it stands on entry: pods and file, not other Services) or meshed pods on their
/// way out, with those addresses, sorted by Service. Services with some unmeshed endpoints are
/// recorded. Cost: one lookup per endpoint address.
fn meshed_services<'k: 'a, 'a>(
    kube: &'k KubeState,
    members: &'a BTreeMap<IpAddr, Member>,
    partly_meshed: &mut Vec<PartlyMeshed>,
) -> Vec<(&'k KubeService, Vec<MeshedAddress<'a>>)> {
    let mut slices: HashMap<&str, Vec<&MeshSlice>> = HashMap::new();
    for slice in kube.slices.items.values() {
        slices.entry(&slice.service).or_default().push(slice);
    }
    let mut services: Vec<&'k KubeService> = kube.services.items.values().collect();
    services.sort_by(|a, b| a.source.cmp(&b.source));
    let mut found = Vec::new();
    for service in services {
        let mut meshed = Vec::new();
        let mut unmeshed = BTreeSet::new();
        let addresses = slices
            .get(service.source.as_str())
            .into_iter()
            .flatten()
            .flat_map(|slice| slice.addresses.iter().map(move |address| (*slice, address)));
        for (slice, address) in addresses {
            let ip: Option<IpAddr> = address.address.parse().ok();
            let member = ip.and_then(|ip| Some((ip, members.get(&ip)?)));
            let vouched = match member {
                Some((ip, member)) => member
                    .ids
                    .first()
                    .map(|id| (ip, id, member.source.as_str())),
                None => ip.and_then(|ip| {
                    let pod = kube.leaving_pod(address, ip)?;
                    Some((ip, &pod.id, pod.source.as_str()))
                }),
            };
            match vouched {
                Some((ip, id, source)) => meshed.push(MeshedAddress {
                    ip,
                    address,
                    slice,
                    id,
                    source,
                }),
                None => {
                    unmeshed.insert(address.address.as_str());
                }
            }
        }
        if !unmeshed.is_empty() {
            // A Service none of whose endpoints is meshed is simply outside the mesh.
            if !meshed.is_empty() {
                partly_meshed.push(PartlyMeshed {
                    service: service.source.clone(),
                    unmeshed: unmeshed.len(),
                    examples: unmeshed
                        .iter()
                        .take(LOGGED_UNMESHED)
                        .map(|a| a.to_string())
                        .collect(),
                });
            }
            continue;
        }
        if meshed.is_empty() {
            // No endpoints: nothing to require yet.
            continue;
        }
        found.push((service, meshed));
    }
    found
}

/// The meshed Services (see [`meshed_services`]) as table entries, and members for their
/// cluster IPs (on IPs not already taken), carrying the union of their endpoints' IDs.
fn service_members(
    kube: &KubeState,
    members: &mut BTreeMap<IpAddr, Member>,
    notes: &mut MergeNotes,
) -> Vec<MeshService> {
    let meshed = meshed_services(kube, members, &mut notes.partly_meshed);
    let mut entries = Vec::with_capacity(meshed.len());
    let mut claims = Vec::new();
    for (service, addresses) in meshed {
        if let Some(invalid) = &service.invalid_opaque_ports {
            notes
                .invalid_opaque_ports
                .push((service.key.clone(), invalid.clone()));
        }
        let ids: BTreeSet<SpiffeId> = addresses.iter().map(|a| a.id.clone()).collect();
        claims.push((service, ids));
        let endpoints = addresses.iter().map(|a| Endpoint {
            ip: a.ip,
            ports: a.slice.ports.clone(),
            id: a.id.clone(),
            ready: a.address.state.ready,
            serving: a.address.state.serving,
            terminating: a.address.state.terminating,
            node: a.address.state.node.clone(),
            zone: a.address.state.zone.clone(),
            source: a.source.to_owned(),
        });
        entries.push(kube_service_entry(
            service.key.clone(),
            service.cluster_ips.clone(),
            service.ports.clone(),
            endpoints,
        ));
    }
    for (service, ids) in claims {
        for ip in &service.cluster_ips {
            match members.entry(*ip) {
                Entry::Vacant(entry) => {
                    entry.insert(Member {
                        ids: ids.clone(),
                        source: service.source.clone(),
                    });
                }
                Entry::Occupied(entry) => notes.conflicts.push(Conflict {
                    ip: *ip,
                    kept: entry.get().source.clone(),
                    ignored: vec![service.source.clone()],
                }),
            }
        }
    }
    entries
}

/// What [`merge`] found besides the members and Services, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
struct MergeNotes {
    conflicts: Vec<Conflict>,
    partly_meshed: Vec<PartlyMeshed>,
    /// Meshed Services whose opaque-ports annotation was ignored.
    invalid_opaque_ports: Vec<(ServiceKey, InvalidOpaquePorts)>,
}

/// What [`merge`] found: the membership, the meshed Services and the unmeshed ones.
#[derive(Debug, Default)]
struct Merged {
    members: BTreeMap<IpAddr, Member>,
    services: Vec<MeshService>,
    unmeshed: Vec<UnmeshedService>,
}

/// The membership from every source: the pods', the file's entries over them, then the
/// Services' (whose endpoints are looked up among those) where the IP is not taken; the
/// meshed Services, the file's over Kubernetes' of the same name; and every other Service of
/// Kubernetes (routes may send to those, plainly, at their cluster IPs), sorted by key.
fn merge(kube: Option<&KubeState>, file: Option<&MeshFile>) -> (Merged, MergeNotes) {
    let mut notes = MergeNotes::default();
    let mut members = kube
        .map(|kube| pod_members(kube.pods.items.values(), &mut notes.conflicts))
        .unwrap_or_default();
    for (ip, id) in file.map(MeshFile::members).into_iter().flatten() {
        let member = Member::single(id.clone(), FILE_SOURCE);
        match members.entry(*ip) {
            Entry::Vacant(entry) => {
                entry.insert(member);
            }
            Entry::Occupied(mut entry) => {
                let pod = entry.insert(member);
                notes.conflicts.push(Conflict {
                    ip: *ip,
                    kept: FILE_SOURCE.into(),
                    ignored: vec![pod.source],
                });
            }
        }
    }
    let kube_services = kube
        .map(|kube| service_members(kube, &mut members, &mut notes))
        .unwrap_or_default();
    let mut services: BTreeMap<ServiceKey, MeshService> = kube_services
        .into_iter()
        .map(|service| (service.key.clone(), service))
        .collect();
    for service in file.map(MeshFile::services).into_iter().flatten() {
        services.insert(service.key.clone(), service.clone());
    }
    let mut unmeshed: Vec<UnmeshedService> = kube
        .into_iter()
        .flat_map(|kube| kube.services.items.values())
        .filter(|service| !services.contains_key(&service.key))
        .map(|service| UnmeshedService {
            key: service.key.clone(),
            cluster_ips: service.cluster_ips.clone(),
            ports: service.ports.clone(),
        })
        .collect();
    unmeshed.sort_by(|a, b| a.key.cmp(&b.key));
    let merged = Merged {
        members,
        services: services.into_values().collect(),
        unmeshed,
    };
    (merged, notes)
}

/// Where the membership comes from.
#[derive(Default)]
pub struct Sources {
    /// The cluster-wide watches of labelled pods, Services and EndpointSlices, with this client
    /// (`--attestor k8s`).
    pub kubernetes: Option<kube::Client>,
    /// `--mesh-file`, loaded at start-up.
    pub file: Option<MeshFile>,
}

/// What the membership task publishes: the membership (served by `WatchMembers`), the meshed
/// Services (`WatchServices`) and the unmeshed ones (only the route feed reads them), computed
/// together from the same sources and versioned together: 0 until every source has synced,
/// then one more with every change of any (each stream skips the versions that change nothing
/// it serves).
#[derive(Debug, Default)]
pub struct MeshState(MeshContent);

/// What a [`MeshState`] holds.
#[derive(Debug, Default)]
struct MeshContent {
    members: MeshSnapshot,
    services: ServiceTable,
    /// Sorted by key.
    unmeshed: Vec<UnmeshedService>,
}

/// The publisher's test for a change: the members and Services, meshed or not, not the
/// versions it gives them.
impl PartialEq for MeshContent {
    fn eq(&self, other: &MeshContent) -> bool {
        self.members.members == other.members.members
            && self.services.services().eq(other.services.services())
            && self.unmeshed == other.unmeshed
    }
}

impl MeshState {
    pub fn new(
        version: u64,
        members: BTreeMap<IpAddr, Member>,
        services: impl IntoIterator<Item = MeshService>,
    ) -> MeshState {
        MeshState(MeshContent {
            members: MeshSnapshot { version, members },
            services: ServiceTable::new(version, services),
            unmeshed: Vec::new(),
        })
    }

    /// This state with the unmeshed Services `unmeshed`.
    pub fn with_unmeshed(mut self, mut unmeshed: Vec<UnmeshedService>) -> MeshState {
        unmeshed.sort_by(|a, b| a.key.cmp(&b.key));
        self.0.unmeshed = unmeshed;
        self
    }

    pub fn version(&self) -> u64 {
        self.0.members.version
    }

    /// Whether every source has delivered its initial state.
    pub fn is_synced(&self) -> bool {
        self.version() > 0
    }

    /// The membership, at this state's version.
    pub fn members(&self) -> &MeshSnapshot {
        &self.0.members
    }

    /// The meshed Services, at this state's version.
    pub fn services(&self) -> &ServiceTable {
        &self.0.services
    }

    /// The Services of Kubernetes that are not meshed, sorted by key: routes' backends only.
    pub fn unmeshed_services(&self) -> &[UnmeshedService] {
        &self.0.unmeshed
    }
}

/// Starts the task that keeps the membership and the meshed Services, which stops when
/// `shutdown` turns true or its sender is dropped (ending every `WatchMembers` and
/// `WatchServices` stream). The receiver holds version 0 until every source has synced.
pub fn spawn(
    td: TrustDomain,
    sources: Sources,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<MeshState>> {
    let events = sources.kubernetes.map(kube_events);
    let membership = Membership {
        td,
        kube: events.as_ref().map(|_| KubeState::default()),
        file: sources.file,
        logged_conflicts: BTreeSet::new(),
        logged_partly_meshed: BTreeSet::new(),
        logged_invalid_opaque_ports: BTreeSet::new(),
        metrics,
    };
    publish::spawn("mesh membership", membership, events, shutdown)
}

/// The watches of every pod labelled for mTLS, every Service and every EndpointSlice, in every
/// namespace, as one stream. The watchers retry with backoff and re-list when they must.
fn kube_events(client: kube::Client) -> Events<KubeEvent> {
    let labelled = watcher::Config::default().labels(&format!("{TLS_MODE_LABEL}={TLS_MODE_MTLS}"));
    let pods = follow::watch(Api::all(client.clone()), labelled)
        .map(|event| KubeEvent::Pod(Box::new(event)));
    let services = follow::watch(Api::all(client.clone()), watcher::Config::default())
        .map(|event| KubeEvent::Service(Box::new(event)));
    let slices = follow::watch(Api::all(client), watcher::Config::default())
        .map(|event| KubeEvent::EndpointSlice(Box::new(event)));
    futures::stream::select(pods, futures::stream::select(services, slices)).boxed()
}

/// The membership task's state: it alone reads the sources and publishes.
struct Membership {
    td: TrustDomain,
    /// `Some` when the Kubernetes source is on.
    kube: Option<KubeState>,
    file: Option<MeshFile>,
    /// Conflicts already logged, so a lasting one is logged once rather than on every change.
    logged_conflicts: BTreeSet<Conflict>,
    /// The partly meshed Services already logged, likewise (by name: their unmeshed endpoints
    /// change as a rollout proceeds).
    logged_partly_meshed: BTreeSet<String>,
    /// The ignored opaque-ports annotations already logged, likewise.
    logged_invalid_opaque_ports: BTreeSet<(ServiceKey, InvalidOpaquePorts)>,
    metrics: Arc<Metrics>,
}

impl State for Membership {
    type Event = KubeEvent;
    type Content = MeshContent;
    type Snapshot = MeshState;

    fn has_file(&self) -> bool {
        self.file.is_some()
    }

    fn synced(&self) -> bool {
        self.kube.as_ref().is_none_or(KubeState::synced)
    }

    fn on_event(&mut self, event: KubeEvent) -> bool {
        let Some(kube) = self.kube.as_mut() else {
            return false;
        };
        let td = &self.td;
        match event {
            KubeEvent::Pod(event) => match *event {
                Ok(event) => kube.on_pod_event(event, td),
                Err(e) => {
                    warn!(error = %e, "meshed pod watch failed; retrying");
                    false
                }
            },
            KubeEvent::Service(event) => match *event {
                Ok(event) => kube.services.on_event(event, "services", kube_service),
                Err(e) => {
                    warn!(error = %e, "service watch failed; retrying");
                    false
                }
            },
            KubeEvent::EndpointSlice(event) => match *event {
                Ok(event) => kube.on_slice_event(event),
                Err(e) => {
                    warn!(error = %e, "endpoint slice watch failed; retrying");
                    false
                }
            },
        }
    }

    async fn poll_file(&mut self) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let td = &self.td;
        let reloaded = file.0.poll(|contents| parse_file(contents, td)).await;
        let path = file.0.path().display();
        match reloaded {
            Ok(false) => false,
            Ok(true) => {
                info!(%path, members = file.members().len(), services = file.services().len(), "mesh file reloaded");
                true
            }
            Err(e) => {
                self.metrics.mesh_file_reload_failures.inc();
                error!(%path, error = %e, "mesh file is unreadable or invalid; keeping its last good members and services");
                false
            }
        }
    }

    /// The merged membership and Services (unversioned), logging the conflicts, partly meshed
    /// Services and ignored annotations not logged yet.
    fn content(&mut self) -> MeshContent {
        let (merged, notes) = merge(self.kube.as_ref(), self.file.as_ref());
        self.log_new(notes);
        MeshState::new(0, merged.members, merged.services)
            .with_unmeshed(merged.unmeshed)
            .0
    }

    fn published(state: &MeshState) -> (u64, &MeshContent) {
        (state.version(), &state.0)
    }

    fn snapshot(&self, version: u64, mut content: MeshContent) -> MeshState {
        content.members.version = version;
        content.services.version = version;
        let (members, services) = (
            content.members.members.len(),
            content.services.services().count(),
        );
        self.metrics.mesh_members.set(members as i64);
        self.metrics.mesh_services.set(services as i64);
        if version == 1 {
            info!(members, services, "mesh membership synced");
        } else {
            debug!(version, members, services, "mesh membership changed");
        }
        MeshState(content)
    }
}

impl Membership {
    fn log_new(&mut self, notes: MergeNotes) {
        let mut partly_meshed = BTreeSet::new();
        for service in notes.partly_meshed {
            if !self.logged_partly_meshed.contains(&service.service) {
                warn!(
                    service = %service.service,
                    unmeshed = service.unmeshed,
                    examples = ?service.examples,
                    "a Service has endpoints outside the mesh; it is not meshed (connections to it pass through as plaintext, unbalanced by the proxies) until all of them are"
                );
            }
            partly_meshed.insert(service.service);
        }
        self.logged_partly_meshed = partly_meshed;
        let invalid: BTreeSet<(ServiceKey, InvalidOpaquePorts)> =
            notes.invalid_opaque_ports.into_iter().collect();
        for (service, annotation) in invalid.difference(&self.logged_invalid_opaque_ports) {
            warn!(
                %service,
                value = %annotation.value,
                error = %annotation.reason,
                "a Service's {OPAQUE_PORTS_ANNOTATION} annotation is invalid; it is ignored (the Service's ports keep their declared protocols)"
            );
        }
        self.logged_invalid_opaque_ports = invalid;
        let current: BTreeSet<Conflict> = notes.conflicts.into_iter().collect();
        for conflict in current.difference(&self.logged_conflicts) {
            warn!(
                ip = %conflict.ip,
                kept = %conflict.kept,
                ignored = ?conflict.ignored,
                "several mesh members claim one IP; keeping the mesh file's entry, else the running, most recently created pod (the others are likely stale)"
            );
        }
        self.logged_conflicts = current;
    }
}

/// `sigil.mesh.v1.MeshDiscovery`: the membership, to attested workloads.
pub struct MeshApi {
    workloads: Workloads,
    state: watch::Receiver<Arc<MeshState>>,
}

impl MeshApi {
    pub fn new(workloads: Workloads, state: watch::Receiver<Arc<MeshState>>) -> Self {
        MeshApi { workloads, state }
    }

    pub fn into_service(self) -> MeshDiscoveryServer<MeshApi> {
        MeshDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl MeshDiscovery for MeshApi {
    type WatchMembersStream = ResponseStream<MeshMembers>;

    async fn watch_members(
        &self,
        request: Request<WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        // Only attested callers learn which addresses are which workloads.
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, "mesh membership stream opened");
        let feed = StateFeed::new(
            self.state.clone(),
            &self.workloads.metrics,
            SocketApi::Mesh,
            |sent, state| {
                let unchanged =
                    sent.is_some_and(|sent| sent.members().members == state.members().members);
                (!unchanged).then(|| state.members().to_message())
            },
        );
        Ok(Response::new(push_stream::into_stream(feed)))
    }
}

/// A published state that says whether its sources have all delivered their initial state:
/// nothing is streamed before then.
pub(crate) trait Synced: Send + Sync + 'static {
    fn is_synced(&self) -> bool;
}

impl Synced for MeshState {
    fn is_synced(&self) -> bool {
        MeshState::is_synced(self)
    }
}

/// The message that takes a client holding the first state (None: nothing yet) to the second;
/// None if this stream's part did not change. A closure, so that a stream can capture what it
/// serves to whom (the routes' client scope).
pub(crate) type StateMessage<S, M> = Box<dyn Fn(Option<&S>, &S) -> Option<M> + Send + Sync>;

/// One stream of a part of a published state (`WatchMembers`, `WatchServices`, `WatchRoutes`):
/// its first message once the sources have synced, then one for each state that changed that
/// part. The receiver always holds the newest state, so a slow reader gets the latest, not a
/// backlog.
pub(crate) struct StateFeed<S, M> {
    state: watch::Receiver<Arc<S>>,
    /// Whether the state has not been looked at yet: the first message goes out without
    /// waiting for a change.
    unseen: bool,
    /// What the client holds: the state of the last message sent.
    sent: Option<Arc<S>>,
    message: StateMessage<S, M>,
    pushes: Counter,
    _open: OpenStream,
}

impl<S, M> StateFeed<S, M> {
    pub(crate) fn new(
        state: watch::Receiver<Arc<S>>,
        metrics: &Metrics,
        api: SocketApi,
        message: impl Fn(Option<&S>, &S) -> Option<M> + Send + Sync + 'static,
    ) -> StateFeed<S, M> {
        StateFeed {
            state,
            unseen: true,
            sent: None,
            message: Box::new(message),
            pushes: metrics.pushes.get_or_create(&ApiLabels { api }).clone(),
            _open: OpenStream::new(metrics, api),
        }
    }
}

impl<S: Synced, M: Send + 'static> PushFeed for StateFeed<S, M> {
    type Message = M;
    type Error = MeshError;

    async fn next_message(&mut self) -> Result<M, MeshError> {
        loop {
            if !self.unseen {
                self.state
                    .changed()
                    .await
                    .map_err(|_| MeshError::ShuttingDown)?;
            }
            self.unseen = false;
            let state = self.state.borrow_and_update().clone();
            if !state.is_synced() {
                continue;
            }
            if let Some(message) = (self.message)(self.sent.as_deref(), &state) {
                self.sent = Some(state);
                return Ok(message);
            }
        }
    }

    fn pushes(&self) -> &Counter {
        &self.pushes
    }
}

#[cfg(test)]
mod tests;
