//! From every object to what each client's proxy uses: rules kept by [`crate::validate`],
//! attached to their parent Service ports, producer or consumer routes chosen per client
//! namespace, every (rule, match) sorted by the Gateway API's precedence, backend policies with
//! their defaults, and rate limits per Service port. Computed once per change ([`compile`]);
//! each client's [`RouteSet`] is then a selection of shared entries ([`Compiled::view`]).
//!
//! Precedence (`HTTPRouteRule.Matches` and `GRPCRouteRule.Matches` in the Gateway API): an
//! HTTP match ranks by Exact path (longer first), then RegularExpression path (the spec leaves
//! its place to the implementation: sigil puts it after Exact and before every PathPrefix,
//! longer pattern first), then PathPrefix (more characters first), then having a method, then
//! more header matches, then more query matches; a gRPC match by more characters in its
//! service, then in its method, then more header matches. Hostnames never differ (they are not
//! used for Service parents). Ties go to the older route (creation time; objects from a file
//! have none and come after), then `{namespace}/{name}`, then rule order, then match order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sigil_identity::{SpiffeId, TrustDomain};

use crate::compiled::{
    BackendPolicy, BackendTarget, Filter, GrpcMatch, HttpMatch, IdentityOverride, InboundPolicy,
    LocalRateLimit, PathMatch, PortKey, PortRoutes, RetryBudget, RouteOrigin, RouteSet, RouteTable,
    ServiceRef, ValueMatch, WeightedBackend, regex_pattern,
};
use crate::model::RouteObjects;
use crate::validate::{Catalog, CheckedRoute, Client, check_policies, check_routes};

/// Who a client is, for its view: its namespace picks consumer routes, its identity the Service
/// ports whose rate limits its inbound side enforces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientScope {
    pub namespace: String,
    pub id: SpiffeId,
}

impl ClientScope {
    /// The scope of the workload `id`: its namespace is the `ns` segment of its SPIFFE ID (none,
    /// for another shape of ID: only producer routes apply to it).
    pub fn of(id: &SpiffeId) -> ClientScope {
        ClientScope {
            namespace: id
                .service_account()
                .map(|(namespace, _)| namespace.to_owned())
                .unwrap_or_default(),
            id: id.clone(),
        }
    }
}

/// Everything compiled, for every client.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Producer routes of each Service port that has any.
    pub producer: BTreeMap<PortKey, Arc<PortRoutes>>,
    /// Consumer routes, by client namespace, then Service port.
    pub consumer: BTreeMap<String, BTreeMap<PortKey, Arc<PortRoutes>>>,
    pub backends: BTreeMap<ServiceRef, Arc<BackendPolicy>>,
    pub inbound: BTreeMap<PortKey, Arc<InboundPolicy>>,
    /// Which Service ports in `inbound` each identity backs.
    pub inbound_by_id: BTreeMap<SpiffeId, Vec<PortKey>>,
}

/// The routes attached to one Service port for one audience, as indexes into the checked
/// routes.
#[derive(Default)]
struct Attached {
    http: BTreeSet<usize>,
    grpc: BTreeSet<usize>,
}

/// The routes attached to each Service port: producer routes (in the Service's namespace) for
/// every client, consumer routes for the clients of their own namespace.
#[derive(Default)]
struct Audiences {
    producer: BTreeMap<PortKey, Attached>,
    consumer: BTreeMap<(String, PortKey), Attached>,
}

impl Audiences {
    /// Where a route in `namespace` attached to `key` goes.
    fn of(&mut self, namespace: &str, key: PortKey) -> &mut Attached {
        if key.service.namespace == namespace {
            self.producer.entry(key).or_default()
        } else {
            self.consumer
                .entry((namespace.to_owned(), key))
                .or_default()
        }
    }
}

/// Compiles every object against the cluster's Services. `trust_domain` turns the service
/// accounts of rate-limit overrides into SPIFFE IDs.
pub fn compile(objects: &RouteObjects, catalog: &Catalog, trust_domain: &TrustDomain) -> Compiled {
    let routes = check_routes(objects, catalog);
    let (backend_policies, rate_limits) = check_policies(objects, catalog, &routes);

    // Step 2 and 4: each route on its parents' ports, as producer (the Service's namespace) or
    // consumer (the route's namespace, for clients there).
    let mut audiences = Audiences::default();
    for (i, route) in routes.http.iter().enumerate() {
        for key in route.attached_ports() {
            audiences.of(&route.meta.namespace, key).http.insert(i);
        }
    }
    for (i, route) in routes.grpc.iter().enumerate() {
        for key in route.attached_ports() {
            audiences.of(&route.meta.namespace, key).grpc.insert(i);
        }
    }
    let port_routes = |key: PortKey, origin: RouteOrigin, attached: Attached| {
        let http = (!attached.http.is_empty())
            .then(|| Arc::new(ordered(&routes.http, &attached.http, http_rank)));
        let grpc = (!attached.grpc.is_empty())
            .then(|| Arc::new(ordered(&routes.grpc, &attached.grpc, grpc_rank)));
        Arc::new(PortRoutes {
            key,
            origin,
            http,
            grpc,
        })
    };
    let mut compiled = Compiled::default();
    for (key, attached) in audiences.producer {
        let routes = port_routes(key.clone(), RouteOrigin::Producer, attached);
        compiled.producer.insert(key, routes);
    }
    for ((namespace, key), attached) in audiences.consumer {
        let routes = port_routes(key.clone(), RouteOrigin::Consumer, attached);
        compiled
            .consumer
            .entry(namespace)
            .or_default()
            .insert(key, routes);
    }

    // Backend policies: every Service a route attaches to or sends to, and every Service a
    // BackendPolicy applies to; the retry budget's defaults for the rest.
    let mut services: BTreeSet<ServiceRef> = BTreeSet::new();
    for route in &routes.http {
        services.extend(route.attached_ports().into_iter().map(|k| k.service));
        for (_, rule, _) in route.kept() {
            services.extend(backend_services(&rule.filters, &rule.backends.entries));
        }
    }
    for route in &routes.grpc {
        services.extend(route.attached_ports().into_iter().map(|k| k.service));
        for (_, rule, _) in route.kept() {
            services.extend(backend_services(&rule.filters, &rule.backends.entries));
        }
    }
    for service in services {
        let policy = BackendPolicy {
            service: service.clone(),
            source: "default".to_owned(),
            outlier_detection: None,
            retry_budget: RetryBudget::default(),
        };
        compiled.backends.insert(service, Arc::new(policy));
    }
    for policy in backend_policies.into_iter().flat_map(|p| p.applies) {
        compiled
            .backends
            .insert(policy.service.clone(), Arc::new(policy));
    }

    // Rate limits per Service port, oldest policy first.
    let mut rate_limits = rate_limits;
    rate_limits.sort_by(|a, b| a.meta.age_order(b.meta));
    let mut inbound: BTreeMap<PortKey, Vec<LocalRateLimit>> = BTreeMap::new();
    for policy in &rate_limits {
        let overrides: Vec<IdentityOverride> = (policy.overrides.iter())
            .map(|(clients, limit)| IdentityOverride {
                clients: clients
                    .iter()
                    .filter_map(|c| spiffe_id(c, trust_domain))
                    .collect(),
                limit: *limit,
            })
            .collect();
        for target in &policy.applies {
            inbound
                .entry(target.key.clone())
                .or_default()
                .push(LocalRateLimit {
                    source: policy.meta.key(),
                    http_matches: target.http_matches.clone(),
                    grpc_matches: target.grpc_matches.clone(),
                    total: policy.total,
                    per_identity: policy.per_identity,
                    overrides: overrides.clone(),
                });
        }
    }
    for (key, limits) in inbound {
        if let Some(info) = catalog.services.get(&key.service) {
            for id in &info.endpoint_ids {
                compiled
                    .inbound_by_id
                    .entry(id.clone())
                    .or_default()
                    .push(key.clone());
            }
        }
        let policy = InboundPolicy {
            key: key.clone(),
            limits,
        };
        compiled.inbound.insert(key, Arc::new(policy));
    }
    compiled
}

/// The SPIFFE ID of an override's client. A service account whose names make no SPIFFE ID
/// (only possible past the ID's length limit) is left out: it names no workload sigil issues.
fn spiffe_id(client: &Client, trust_domain: &TrustDomain) -> Option<SpiffeId> {
    match client {
        Client::Id(id) => Some(id.clone()),
        Client::ServiceAccount { namespace, name } => {
            SpiffeId::for_service_account(trust_domain, namespace, name).ok()
        }
    }
}

/// The Services a rule sends requests or mirror copies to.
fn backend_services<'r>(
    filters: &'r [Filter],
    backends: &'r [WeightedBackend],
) -> impl Iterator<Item = ServiceRef> + 'r {
    let mirrors = filters.iter().filter_map(|f| match f {
        Filter::Mirror(m) => Some(m.backend.service.clone()),
        _ => None,
    });
    let targets = backends.iter().filter_map(|b| match &b.target {
        BackendTarget::Service(backend) => Some(backend.service.clone()),
        BackendTarget::Invalid(_) => None,
    });
    mirrors.chain(targets)
}

/// The rules of the `attached` routes (oldest route first, then `{namespace}/{name}`, each
/// route's kept rules in order) and every (rule, match) sorted by `rank`: a stable sort over
/// entries already in route, rule and match order, so that ties keep that order.
fn ordered<M: Clone, K: Ord>(
    routes: &[CheckedRoute<'_, M>],
    attached: &BTreeSet<usize>,
    rank: fn(&M) -> K,
) -> RouteTable<M> {
    let mut by_age: Vec<&CheckedRoute<'_, M>> = attached.iter().map(|&i| &routes[i]).collect();
    by_age.sort_by(|a, b| a.meta.age_order(b.meta));
    let mut rules = Vec::new();
    let mut order = Vec::new();
    for route in by_age {
        for (_, rule, matches) in route.kept() {
            let index = rules.len();
            rules.push(rule.clone());
            order.extend(matches.iter().map(|m| (index, m.clone())));
        }
    }
    order.sort_by_cached_key(|(_, m)| rank(m));
    RouteTable { rules, order }
}

/// The HTTP precedence key, smaller first (see the module doc).
fn http_rank(
    m: &HttpMatch,
) -> (
    u8,
    Reverse<usize>,
    Reverse<bool>,
    Reverse<usize>,
    Reverse<usize>,
) {
    let (class, length) = match &m.path {
        Some(PathMatch::Exact(path)) => (0, path.len()),
        Some(PathMatch::Regex(regex)) => (1, regex_pattern(regex).len()),
        Some(PathMatch::Prefix(prefix)) => (2, prefix.len()),
        None => (2, 0),
    };
    (
        class,
        Reverse(length),
        Reverse(m.method.is_some()),
        Reverse(m.headers.len()),
        Reverse(m.query.len()),
    )
}

/// The gRPC precedence key, smaller first (see the module doc).
fn grpc_rank(m: &GrpcMatch) -> (Reverse<usize>, Reverse<usize>, Reverse<usize>) {
    let chars = |v: &Option<ValueMatch>| match v {
        Some(ValueMatch::Exact(s)) => s.len(),
        Some(ValueMatch::Regex(r)) => regex_pattern(r).len(),
        None => 0,
    };
    (
        Reverse(chars(&m.service)),
        Reverse(chars(&m.method)),
        Reverse(m.headers.len()),
    )
}

impl Compiled {
    /// What one client uses: the producer routes of every Service port, replaced port by port
    /// by the consumer routes of the client's namespace; the policy of every backend Service
    /// (all of them: a client may call any Service, and plain balancing without routes ejects
    /// and budgets too); the rate limits of the Service ports its identity backs.
    pub fn view(&self, client: &ClientScope) -> RouteSet {
        let mut ports = self.producer.clone();
        if let Some(consumer) = self.consumer.get(&client.namespace) {
            ports.extend(consumer.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let inbound = (self.inbound_by_id.get(&client.id).into_iter().flatten())
            .filter_map(|key| Some((key.clone(), self.inbound.get(key)?.clone())))
            .collect();
        RouteSet {
            ports,
            backends: self.backends.clone(),
            inbound,
        }
    }
}

#[cfg(test)]
mod tests;
