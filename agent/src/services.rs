//! Meshed Services for per-request load balancing: what the membership task ([`crate::mesh`])
//! keeps of each Kubernetes Service and EndpointSlice beyond membership (ports with their
//! declared protocols, endpoint conditions, node and zone), the mesh file's `services:` section,
//! and `sigil.mesh.v1.ServiceDiscovery`, which serves the resulting
//! [`ServiceTable`] to attested workloads: the whole table first, then only what changed.
//!
//! Which Services are in the table, and each endpoint's identity, is the membership's rule
//! (`mesh::meshed_services`): a Service is served when it has at least one endpoint address
//! and every one of them is meshed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use serde::Deserialize;
use sigil_identity::SpiffeId;
use sigil_proto::sigil::mesh::v1::service_discovery_server::{
    ServiceDiscovery, ServiceDiscoveryServer,
};
use sigil_proto::sigil::mesh::v1::{ServiceUpdate, WatchServicesRequest};
use sigil_proxy_api::OPAQUE_PORTS_ANNOTATION;
use sigil_proxy_api::ports::{PortSet, PortSetError};
use sigil_proxy_api::services::{Endpoint, MeshService, Protocol, ServiceKey, ServicePort};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::mesh::{FILE_SOURCE, MeshState, StateFeed};
use crate::metrics::{Metrics, SocketApi};
use crate::peer::Workloads;
use crate::push_stream::{self, ResponseStream};

/// The only transport the proxy carries; a Service's UDP and SCTP ports are not its business.
const TCP: &str = "TCP";

/// Why the mesh file's `services:` section is invalid (naming the entry and field).
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error(
        "services[{index}]: namespace {namespace:?} and name {name:?} must be non-empty, without '/'"
    )]
    Key {
        index: usize,
        namespace: String,
        name: String,
    },
    #[error("services[{index}] {service} is already services[{first}]")]
    Duplicate {
        index: usize,
        first: usize,
        service: ServiceKey,
    },
    #[error("services[{index}] {service}: clusterIPs: {value:?} is not an IP address")]
    ClusterIp {
        index: usize,
        service: ServiceKey,
        value: String,
    },
    #[error(
        "services[{index}] {service}: ports[{port}].{field}: {value} is not a port number (1-65535)"
    )]
    Port {
        index: usize,
        service: ServiceKey,
        port: usize,
        field: &'static str,
        value: u32,
    },
    #[error(
        "services[{index}] {service}: ports[{port}] repeats the name {name:?} or the port {number}"
    )]
    DuplicatePort {
        index: usize,
        service: ServiceKey,
        port: usize,
        name: String,
        number: u16,
    },
    #[error("services[{index}] {service}: opaquePorts: {source}")]
    OpaquePorts {
        index: usize,
        service: ServiceKey,
        #[source]
        source: PortSetError,
    },
    #[error("services[{index}] {service}: endpoints[{endpoint}].ip {value:?} is not an IP address")]
    EndpointIp {
        index: usize,
        service: ServiceKey,
        endpoint: usize,
        value: String,
    },
    #[error(
        "services[{index}] {service}: endpoints[{endpoint}].ip {ip} is not in members (an endpoint's identity is its member's)"
    )]
    NotAMember {
        index: usize,
        service: ServiceKey,
        endpoint: usize,
        ip: IpAddr,
    },
    #[error("services[{index}] {service}: endpoints[{endpoint}].ip {ip} is listed twice")]
    DuplicateEndpoint {
        index: usize,
        service: ServiceKey,
        endpoint: usize,
        ip: IpAddr,
    },
}

// --- Kubernetes ---

/// A Service's [`OPAQUE_PORTS_ANNOTATION`] that does not parse: ignored (the Service is still
/// served), and logged once.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct InvalidOpaquePorts {
    pub(crate) value: String,
    pub(crate) reason: String,
}

/// A Service's TCP ports, each with its declared protocol: its `appProtocol`, else its name's
/// prefix, opaque whatever those say when [`OPAQUE_PORTS_ANNOTATION`] lists it. An annotation
/// that does not parse is returned, and ignored.
pub(crate) fn service_ports(service: &Service) -> (Vec<ServicePort>, Option<InvalidOpaquePorts>) {
    let annotation = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(OPAQUE_PORTS_ANNOTATION));
    let (opaque, invalid) = match annotation.map(|value| (value, value.parse::<PortSet>())) {
        None => (PortSet::default(), None),
        Some((_, Ok(ports))) => (ports, None),
        Some((value, Err(e))) => (
            PortSet::default(),
            Some(InvalidOpaquePorts {
                value: value.clone(),
                reason: e.to_string(),
            }),
        ),
    };
    let ports = service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().unwrap_or(TCP) == TCP)
        .filter_map(|port| {
            // The API server validates it; anything else cannot be connected to anyway.
            let number = u16::try_from(port.port).ok().filter(|p| *p != 0)?;
            let name = port.name.clone().unwrap_or_default();
            let declared = Protocol::declared(port.app_protocol.as_deref(), &name);
            Some(ServicePort {
                protocol: declared.with_opaque(number, &opaque),
                name,
                port: number,
                app_protocol: port.app_protocol.clone(),
            })
        })
        .collect();
    (ports, invalid)
}

/// The target port of each of a slice's TCP ports, by the Service port's name (empty for a
/// Service's one unnamed port). A port without a number ("every port") gives none.
pub(crate) fn slice_ports(slice: &EndpointSlice) -> BTreeMap<String, u16> {
    slice
        .ports
        .iter()
        .flatten()
        .filter(|port| port.protocol.as_deref().unwrap_or(TCP) == TCP)
        .filter_map(|port| {
            let number = u16::try_from(port.port?).ok().filter(|p| *p != 0)?;
            Some((port.name.clone().unwrap_or_default(), number))
        })
        .collect()
}

/// An EndpointSlice endpoint's conditions, node and zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointState {
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
    pub(crate) node: Option<String>,
    pub(crate) zone: Option<String>,
}

impl EndpointState {
    /// With Kubernetes' meaning of an unset condition: ready unless said otherwise, serving as
    /// ready is, terminating only when said.
    pub(crate) fn of(endpoint: &SliceEndpoint) -> EndpointState {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        EndpointState {
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node: endpoint.node_name.clone(),
            zone: endpoint.zone.clone(),
        }
    }
}

/// The table's entry for a Kubernetes Service whose endpoint addresses are all meshed: one
/// endpoint per address, sorted by address. An address two slices list (while one replaces the
/// other) is one endpoint, the one taking new requests if either does.
pub(crate) fn kube_service_entry(
    key: ServiceKey,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    endpoints: impl IntoIterator<Item = Endpoint>,
) -> MeshService {
    let mut endpoints: Vec<Endpoint> = endpoints.into_iter().collect();
    endpoints.sort_by(|a, b| {
        a.ip.cmp(&b.ip)
            .then(b.takes_new_requests().cmp(&a.takes_new_requests()))
    });
    endpoints.dedup_by(|later, kept| later.ip == kept.ip);
    MeshService {
        key,
        cluster_ips,
        ports,
        endpoints,
    }
}

// --- the mesh file ---

/// One entry of the mesh file's `services:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct FileService {
    namespace: String,
    name: String,
    /// Empty: headless.
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<FilePort>,
    #[serde(default)]
    opaque_ports: Option<String>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePort {
    #[serde(default)]
    name: String,
    port: u32,
    /// Default: `port`.
    #[serde(default)]
    target_port: Option<u32>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    ip: String,
    #[serde(default = "ready_by_default")]
    ready: bool,
    #[serde(default)]
    terminating: bool,
}

fn ready_by_default() -> bool {
    true
}

/// The mesh file's Services, checked: addresses and ports valid, no Service, port or endpoint
/// twice, and every endpoint a member (its identity is that member's, in `members`). Served as
/// written, endpoints or not: the operator named them.
pub(crate) fn file_services(
    services: &[FileService],
    members: &BTreeMap<IpAddr, SpiffeId>,
) -> Result<Vec<MeshService>, ServicesError> {
    let mut seen: BTreeMap<ServiceKey, usize> = BTreeMap::new();
    let mut checked = Vec::with_capacity(services.len());
    for (index, service) in services.iter().enumerate() {
        let key = ServiceKey::new(&service.namespace, &service.name);
        let valid_part = |part: &str| !part.is_empty() && !part.contains('/');
        if !valid_part(&key.namespace) || !valid_part(&key.name) {
            return Err(ServicesError::Key {
                index,
                namespace: key.namespace,
                name: key.name,
            });
        }
        if let Some(first) = seen.insert(key.clone(), index) {
            return Err(ServicesError::Duplicate {
                index,
                first,
                service: key,
            });
        }
        checked.push(file_service(index, key, service, members)?);
    }
    Ok(checked)
}

fn file_service(
    index: usize,
    key: ServiceKey,
    service: &FileService,
    members: &BTreeMap<IpAddr, SpiffeId>,
) -> Result<MeshService, ServicesError> {
    let cluster_ips = service
        .cluster_ips
        .iter()
        .map(|ip| {
            ip.parse().map_err(|_| ServicesError::ClusterIp {
                index,
                service: key.clone(),
                value: ip.clone(),
            })
        })
        .collect::<Result<Vec<IpAddr>, _>>()?;
    let opaque = match &service.opaque_ports {
        Some(ports) => ports
            .parse::<PortSet>()
            .map_err(|source| ServicesError::OpaquePorts {
                index,
                service: key.clone(),
                source,
            })?,
        None => PortSet::default(),
    };
    let mut ports = Vec::with_capacity(service.ports.len());
    let mut target_ports = BTreeMap::new();
    for (position, port) in service.ports.iter().enumerate() {
        let number = |field: &'static str, value: u32| {
            u16::try_from(value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ServicesError::Port {
                    index,
                    service: key.clone(),
                    port: position,
                    field,
                    value,
                })
        };
        let service_port = number("port", port.port)?;
        let target = number("targetPort", port.target_port.unwrap_or(port.port))?;
        let repeated = ports
            .iter()
            .any(|p: &ServicePort| p.name == port.name || p.port == service_port);
        if repeated {
            return Err(ServicesError::DuplicatePort {
                index,
                service: key.clone(),
                port: position,
                name: port.name.clone(),
                number: service_port,
            });
        }
        target_ports.insert(port.name.clone(), target);
        ports.push(ServicePort {
            name: port.name.clone(),
            port: service_port,
            protocol: Protocol::declared(port.app_protocol.as_deref(), &port.name)
                .with_opaque(service_port, &opaque),
            app_protocol: port.app_protocol.clone(),
        });
    }
    let mut addresses = BTreeSet::new();
    let mut endpoints = Vec::with_capacity(service.endpoints.len());
    for (position, endpoint) in service.endpoints.iter().enumerate() {
        let ip: IpAddr = endpoint.ip.parse().map_err(|_| ServicesError::EndpointIp {
            index,
            service: key.clone(),
            endpoint: position,
            value: endpoint.ip.clone(),
        })?;
        let id = members.get(&ip).ok_or_else(|| ServicesError::NotAMember {
            index,
            service: key.clone(),
            endpoint: position,
            ip,
        })?;
        if !addresses.insert(ip) {
            return Err(ServicesError::DuplicateEndpoint {
                index,
                service: key.clone(),
                endpoint: position,
                ip,
            });
        }
        endpoints.push(Endpoint {
            ip,
            ports: target_ports.clone(),
            id: id.clone(),
            ready: endpoint.ready,
            serving: endpoint.ready,
            terminating: endpoint.terminating,
            node: None,
            zone: None,
            source: FILE_SOURCE.into(),
        });
    }
    Ok(MeshService {
        key,
        cluster_ips,
        ports,
        endpoints,
    })
}

// --- the gRPC service ---

/// `sigil.mesh.v1.ServiceDiscovery`: the meshed Services, to attested workloads.
pub struct ServicesApi {
    workloads: Workloads,
    state: watch::Receiver<Arc<MeshState>>,
}

impl ServicesApi {
    pub fn new(workloads: Workloads, state: watch::Receiver<Arc<MeshState>>) -> Self {
        ServicesApi { workloads, state }
    }

    pub fn into_service(self) -> ServiceDiscoveryServer<ServicesApi> {
        ServiceDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl ServiceDiscovery for ServicesApi {
    type WatchServicesStream = ResponseStream<ServiceUpdate>;

    async fn watch_services(
        &self,
        request: Request<WatchServicesRequest>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        // Only attested callers learn which addresses are which workloads.
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, "service discovery stream opened");
        let feed = feed(self.state.clone(), &self.workloads.metrics);
        Ok(Response::new(push_stream::into_stream(feed)))
    }
}

/// One `WatchServices` stream: the whole table at once (once synced), then what changed since
/// the last message, skipping the states that changed nothing here.
fn feed(
    state: watch::Receiver<Arc<MeshState>>,
    metrics: &Metrics,
) -> StateFeed<MeshState, ServiceUpdate> {
    StateFeed::new(
        state,
        metrics,
        SocketApi::Services,
        |sent, state| match sent {
            None => Some(state.services().full_update()),
            Some(sent) => state.services().update_from(sent.services()),
        },
    )
}

#[cfg(test)]
mod tests;
