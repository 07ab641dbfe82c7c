//! Meshed Services as the agent publishes them and the proxy balances over them: each Service's
//! cluster IPs, its ports with the protocol declared for each, and its endpoints (address, target
//! ports, the SPIFFE ID each must prove, EndpointSlice conditions, node and zone); the
//! `sigil.mesh.v1.ServiceDiscovery` wire form (a full set, then only the changes), checked
//! entry by entry on the way in.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use sigil_identity::spiffe::SpiffeIdError;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_proto::sigil::mesh::v1 as wire;

use crate::ports::PortSet;

/// Why a `ServiceUpdate` is refused, naming the Service and field.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service {0:?} is not <namespace>/<name>")]
    Key(String),
    #[error("{service}: cluster IP {value:?} is not an IP address")]
    ClusterIp { service: String, value: String },
    #[error("{service}: port {value} is not a port number (1-65535)")]
    Port { service: String, value: u32 },
    #[error("{service}: port {port} is listed twice")]
    DuplicatePort { service: String, port: u16 },
    #[error("{service}: endpoint address {value:?} is not an IP address")]
    EndpointIp { service: String, value: String },
    #[error("{service}: endpoint {ip} port {value} is not a port number (1-65535)")]
    EndpointPort {
        service: String,
        ip: IpAddr,
        value: u32,
    },
    #[error("{service}: endpoint {ip} identity {value:?}: {reason}")]
    EndpointId {
        service: String,
        ip: IpAddr,
        value: String,
        #[source]
        reason: SpiffeIdError,
    },
    #[error(
        "{service}: endpoint {ip} identity {id} is not a workload ID in trust domain {expected}"
    )]
    ForeignId {
        service: String,
        ip: IpAddr,
        id: String,
        expected: String,
    },
    #[error("{0} is both upserted and removed in one update")]
    UpsertedAndRemoved(String),
}

/// A Service's namespace and name: `<namespace>/<name>` in logs, labels and on the wire.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ServiceKey {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// The same Service as the routes name it.
impl From<&ServiceKey> for sigil_route::ServiceRef {
    fn from(key: &ServiceKey) -> sigil_route::ServiceRef {
        sigil_route::ServiceRef {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceKey {
    type Err = ServiceError;

    fn from_str(s: &str) -> Result<ServiceKey, ServiceError> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(ServiceKey::new(namespace, name))
            }
            _ => Err(ServiceError::Key(s.to_owned())),
        }
    }
}

/// How the traffic on a port is treated (see [`Protocol::declared`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Nothing declared: HTTP/1.x by its request line, HTTP/2 by its preface, else opaque TCP
    /// (falling back to opaque when the client sends nothing within the detection timeout).
    Detect,
    /// HTTP (no fallback to opaque, no waiting): the codec still follows the first bytes, so
    /// an HTTP/2 client on a port declared `http` is served as HTTP/2.
    Http1,
    /// HTTP/2 (h2c), likewise.
    Http2,
    /// gRPC: HTTP/2 whose responses carry `grpc-status`.
    Grpc,
    /// Bytes, balanced per connection; never waits for a client byte (server-first protocols
    /// such as MySQL and SMTP, and applications' own TLS).
    Opaque,
    /// HTTP/1.1 upgraded to WebSocket.
    WebSocket,
}

impl Protocol {
    /// The protocol declared for a Service port: its `appProtocol` first (Kubernetes' values
    /// and Istio's), else the prefix of its name before the first `-` (Istio's convention:
    /// `http-web`, `grpc`, `tcp-db`), else [`Protocol::Detect`]. Ports listed in the Service's
    /// [`crate::OPAQUE_PORTS_ANNOTATION`] are opaque whatever else says (see
    /// [`Protocol::with_opaque`]).
    pub fn declared(app_protocol: Option<&str>, port_name: &str) -> Protocol {
        if let Some(declared) = app_protocol.and_then(Protocol::of_name) {
            return declared;
        }
        let prefix = port_name.split('-').next().unwrap_or_default();
        Protocol::of_name(prefix).unwrap_or(Protocol::Detect)
    }

    /// `protocol`, unless `port` is listed as opaque.
    pub fn with_opaque(self, port: u16, opaque_ports: &PortSet) -> Protocol {
        if opaque_ports.contains(port) {
            Protocol::Opaque
        } else {
            self
        }
    }

    fn of_name(name: &str) -> Option<Protocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" | "http1" | "kubernetes.io/http" => Protocol::Http1,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "kubernetes.io/ws" | "ws" => Protocol::WebSocket,
            // The application's own TLS (wss and https included) is bytes to the mesh.
            "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
                Protocol::Opaque
            }
            _ => return None,
        })
    }

    /// Whether the traffic is HTTP (no detection, no opaque fallback).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http1 | Protocol::Http2 | Protocol::Grpc | Protocol::WebSocket
        )
    }

    fn to_wire(self) -> wire::Protocol {
        match self {
            Protocol::Detect => wire::Protocol::Detect,
            Protocol::Http1 => wire::Protocol::Http1,
            Protocol::Http2 => wire::Protocol::Http2,
            Protocol::Grpc => wire::Protocol::Grpc,
            Protocol::Opaque => wire::Protocol::Opaque,
            Protocol::WebSocket => wire::Protocol::Websocket,
        }
    }

    /// An unknown value (a newer agent) is detected: the safe reading for every protocol.
    fn from_wire(value: i32) -> Protocol {
        match wire::Protocol::try_from(value) {
            Ok(wire::Protocol::Http1) => Protocol::Http1,
            Ok(wire::Protocol::Http2) => Protocol::Http2,
            Ok(wire::Protocol::Grpc) => Protocol::Grpc,
            Ok(wire::Protocol::Opaque) => Protocol::Opaque,
            Ok(wire::Protocol::Websocket) => Protocol::WebSocket,
            Ok(wire::Protocol::Detect) | Err(_) => Protocol::Detect,
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty when the Service has one unnamed port.
    pub name: String,
    /// The port clients connect to on a cluster IP.
    pub port: u16,
    pub protocol: Protocol,
    /// As written, for logs.
    pub app_protocol: Option<String>,
}

/// One endpoint of a Service: a meshed pod (or mesh-file host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The target port of each Service port here, by the Service port's name.
    pub ports: BTreeMap<String, u16>,
    /// The identity its proxy must prove.
    pub id: SpiffeId,
    /// Gets new requests.
    pub ready: bool,
    /// May finish what it has (EndpointSlice `serving`).
    pub serving: bool,
    /// Going away: no new requests, whatever `ready` says.
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `<namespace>/<pod>` or `mesh-file`, for logs.
    pub source: String,
}

impl Endpoint {
    /// Where this endpoint takes the Service's `port`: the target port of the port's name.
    pub fn target_port(&self, port: &ServicePort) -> Option<u16> {
        self.ports.get(&port.name).copied()
    }

    /// Whether new requests and connections may go here.
    pub fn takes_new_requests(&self) -> bool {
        self.ready && !self.terminating
    }
}

/// One meshed Service, whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshService {
    pub key: ServiceKey,
    /// Empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl MeshService {
    /// The Service port `port` (a port clients connect to on a cluster IP).
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn to_message(&self) -> wire::MeshService {
        wire::MeshService {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            cluster_ips: self.cluster_ips.iter().map(ToString::to_string).collect(),
            ports: self
                .ports
                .iter()
                .map(|port| wire::ServicePort {
                    name: port.name.clone(),
                    port: port.port.into(),
                    protocol: port.protocol.to_wire().into(),
                    app_protocol: port.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|endpoint| wire::Endpoint {
                    ip: endpoint.ip.to_string(),
                    ports: endpoint
                        .ports
                        .iter()
                        .map(|(name, port)| wire::EndpointPort {
                            name: name.clone(),
                            port: (*port).into(),
                        })
                        .collect(),
                    spiffe_id: endpoint.id.to_string(),
                    ready: endpoint.ready,
                    serving: endpoint.serving,
                    terminating: endpoint.terminating,
                    node: endpoint.node.clone().unwrap_or_default(),
                    zone: endpoint.zone.clone().unwrap_or_default(),
                    source: endpoint.source.clone(),
                })
                .collect(),
        }
    }

    /// A Service off the wire, checked: addresses, ports, and workload IDs in `trust_domain`.
    pub fn from_message(
        message: &wire::MeshService,
        trust_domain: &TrustDomain,
    ) -> Result<MeshService, ServiceError> {
        let key = ServiceKey::new(&message.namespace, &message.name);
        if key.namespace.is_empty() || key.name.is_empty() {
            return Err(ServiceError::Key(key.to_string()));
        }
        let cluster_ips = message
            .cluster_ips
            .iter()
            .map(|ip| {
                ip.parse().map_err(|_| ServiceError::ClusterIp {
                    service: key.to_string(),
                    value: ip.clone(),
                })
            })
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let mut ports: Vec<ServicePort> = Vec::with_capacity(message.ports.len());
        for port in &message.ports {
            let number = port_number(port.port).ok_or_else(|| ServiceError::Port {
                service: key.to_string(),
                value: port.port,
            })?;
            if ports.iter().any(|p| p.port == number) {
                return Err(ServiceError::DuplicatePort {
                    service: key.to_string(),
                    port: number,
                });
            }
            ports.push(ServicePort {
                name: port.name.clone(),
                port: number,
                protocol: Protocol::from_wire(port.protocol),
                app_protocol: Some(port.app_protocol.clone()).filter(|a| !a.is_empty()),
            });
        }
        let endpoints = message
            .endpoints
            .iter()
            .map(|endpoint| endpoint_from_message(&key, endpoint, trust_domain))
            .collect::<Result<_, _>>()?;
        Ok(MeshService {
            key,
            cluster_ips,
            ports,
            endpoints,
        })
    }
}

fn port_number(value: u32) -> Option<u16> {
    u16::try_from(value).ok().filter(|port| *port != 0)
}

fn endpoint_from_message(
    service: &ServiceKey,
    endpoint: &wire::Endpoint,
    trust_domain: &TrustDomain,
) -> Result<Endpoint, ServiceError> {
    let ip: IpAddr = endpoint.ip.parse().map_err(|_| ServiceError::EndpointIp {
        service: service.to_string(),
        value: endpoint.ip.clone(),
    })?;
    let ports = endpoint
        .ports
        .iter()
        .map(|port| {
            let number = port_number(port.port).ok_or_else(|| ServiceError::EndpointPort {
                service: service.to_string(),
                ip,
                value: port.port,
            })?;
            Ok((port.name.clone(), number))
        })
        .collect::<Result<_, ServiceError>>()?;
    let id = SpiffeId::parse(&endpoint.spiffe_id).map_err(|reason| ServiceError::EndpointId {
        service: service.to_string(),
        ip,
        value: endpoint.spiffe_id.clone(),
        reason,
    })?;
    if id.is_trust_domain_id() || id.trust_domain() != trust_domain {
        return Err(ServiceError::ForeignId {
            service: service.to_string(),
            ip,
            id: id.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    let text = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    Ok(Endpoint {
        ip,
        ports,
        id,
        ready: endpoint.ready,
        serving: endpoint.serving,
        terminating: endpoint.terminating,
        node: text(&endpoint.node),
        zone: text(&endpoint.zone),
        source: endpoint.source.clone(),
    })
}

/// Every meshed Service at one point in time, never changed once published; with indexes by
/// cluster IP and by endpoint address and port.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    /// 0 until the agent's sources have synced, then one more with every published change.
    pub version: u64,
    services: BTreeMap<ServiceKey, Arc<MeshService>>,
    by_cluster_ip: HashMap<IpAddr, ServiceKey>,
    /// The protocol declared for a port at an endpoint address (a client that dials a pod IP
    /// directly, e.g. through a headless Service, and the inbound side of that pod).
    by_endpoint: HashMap<(IpAddr, u16), Protocol>,
}

impl PartialEq for ServiceTable {
    fn eq(&self, other: &ServiceTable) -> bool {
        self.version == other.version && self.services == other.services
    }
}

impl ServiceTable {
    /// A table of `services` (later ones win a cluster IP claimed twice; the agent never sends
    /// such).
    pub fn new(version: u64, services: impl IntoIterator<Item = MeshService>) -> ServiceTable {
        let services = services
            .into_iter()
            .map(|service| (service.key.clone(), Arc::new(service)))
            .collect();
        ServiceTable::indexed(version, services)
    }

    fn indexed(version: u64, services: BTreeMap<ServiceKey, Arc<MeshService>>) -> ServiceTable {
        let mut by_cluster_ip = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for (key, service) in &services {
            for ip in &service.cluster_ips {
                by_cluster_ip.insert(*ip, key.clone());
            }
            for endpoint in &service.endpoints {
                for port in &service.ports {
                    if let Some(target) = endpoint.target_port(port) {
                        by_endpoint.insert((endpoint.ip, target), port.protocol);
                    }
                }
            }
        }
        ServiceTable {
            version,
            services,
            by_cluster_ip,
            by_endpoint,
        }
    }

    /// Whether the agent's sources have synced.
    pub fn is_synced(&self) -> bool {
        self.version > 0
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<MeshService>> {
        self.services.values()
    }

    pub fn get(&self, key: &ServiceKey) -> Option<&Arc<MeshService>> {
        self.services.get(key)
    }

    /// The Service behind a cluster IP.
    pub fn by_cluster_ip(&self, ip: IpAddr) -> Option<&Arc<MeshService>> {
        self.services.get(self.by_cluster_ip.get(&ip)?)
    }

    /// The protocol declared for `port` at the endpoint address `ip`, if a Service lists it.
    pub fn endpoint_protocol(&self, ip: IpAddr, port: u16) -> Option<Protocol> {
        self.by_endpoint.get(&(ip, port)).copied()
    }

    /// The message a new stream starts with: everything.
    pub fn full_update(&self) -> wire::ServiceUpdate {
        wire::ServiceUpdate {
            version: self.version,
            reset: true,
            upserts: self.services.values().map(|s| s.to_message()).collect(),
            removals: Vec::new(),
        }
    }

    /// The message that takes a proxy holding `previous` to this table; None if nothing
    /// changed.
    pub fn update_from(&self, previous: &ServiceTable) -> Option<wire::ServiceUpdate> {
        let upserts: Vec<wire::MeshService> = self
            .services
            .iter()
            .filter(|(key, service)| previous.services.get(*key) != Some(*service))
            .map(|(_, service)| service.to_message())
            .collect();
        let removals: Vec<String> = previous
            .services
            .keys()
            .filter(|key| !self.services.contains_key(*key))
            .map(ToString::to_string)
            .collect();
        if upserts.is_empty() && removals.is_empty() {
            return None;
        }
        Some(wire::ServiceUpdate {
            version: self.version,
            reset: false,
            upserts,
            removals,
        })
    }

    /// The table after `update` (for the proxy's side of the stream), every entry checked: a
    /// message with one bad entry is refused whole, and the caller keeps this table.
    pub fn apply(
        &self,
        update: &wire::ServiceUpdate,
        trust_domain: &TrustDomain,
    ) -> Result<ServiceTable, ServiceError> {
        let mut services = if update.reset {
            BTreeMap::new()
        } else {
            self.services.clone()
        };
        let removals = update
            .removals
            .iter()
            .map(|key| key.parse())
            .collect::<Result<Vec<ServiceKey>, _>>()?;
        let upserts = update
            .upserts
            .iter()
            .map(|service| MeshService::from_message(service, trust_domain))
            .collect::<Result<Vec<_>, _>>()?;
        for key in removals {
            if upserts.iter().any(|service| service.key == key) {
                return Err(ServiceError::UpsertedAndRemoved(key.to_string()));
            }
            services.remove(&key);
        }
        for service in upserts {
            services.insert(service.key.clone(), Arc::new(service));
        }
        Ok(ServiceTable::indexed(update.version, services))
    }
}

#[cfg(test)]
mod tests;
