//! Local rate limits (`RateLimitPolicy`): token buckets the inbound proxy takes a token from for
//! each HTTP request it has already authorized (a denied request never takes one), so a Service
//! port's limits hold per serving pod, as Envoy's and Linkerd's local limits do.
//!
//! Which limits apply: the agent sends, per Service port this workload serves, its
//! [`InboundPolicy`]; a connection is under it when its local address and port (the pod IP
//! and the port the client reached) are an endpoint address and target port of that Service in
//! the proxy's Service table, and a request when it matches one of the limit's HTTPRoute or
//! GRPCRoute matches (a limit without matches takes every request). A gRPC request is an HTTP
//! request too: HTTP matches (on its path `/<service>/<method>`) apply to it as well.
//!
//! Buckets of one limit: `total`, shared by every client; `identity`, one per client SPIFFE ID
//! (plaintext clients, let in by PERMISSIVE, share one "unauthenticated" bucket); an override
//! replaces `identity` for the clients it lists, which share its one bucket (as Linkerd's
//! overrides do). A request is admitted only if every applicable bucket of every applicable
//! limit has a token, and then takes one from each; a refused request takes none. Buckets refill
//! lazily, exactly (integer arithmetic in nanoseconds), and keep their state across route
//! updates for as long as their limit is unchanged; a changed limit starts full.
//!
//! Memory: per-identity buckets idle for [`IDLE_PERIODS`] periods (and at least the time to
//! refill from empty, so that forgetting a bucket never gives a client more than it had) are
//! dropped. At most [`MAX_IDENTITY_BUCKETS`] identities are held per limit: beyond that, clients
//! without a bucket of their own share one overflow bucket of the `identity` limit until idle
//! buckets are dropped, so a client rotating identities cannot grow the proxy's memory, and
//! gets no more than one identity's rate for all of them.
//!
//! A refused request is answered 429 with `Retry-After` (whole seconds until every bucket it
//! needs has a token, rounded up, at least 1) and `sigil-proxy-error: rate limited by
//! <namespace>/<policy>`; a gRPC request gets a trailers-only `grpc-status: 8`
//! (RESOURCE_EXHAUSTED, gRPC's 429) instead. Refusals are counted in
//! `sigil_proxy_rate_limited_total{service,policy,scope}` and logged at debug.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use sigil_identity::SpiffeId;
use sigil_proxy_api::routes::RouteTable;
use sigil_proxy_api::services::{ServiceKey, ServiceTable};
use sigil_route::compiled::{IdentityOverride, InboundPolicy, Limit, LocalRateLimit, PortKey};
use sigil_route::select::{self, RequestHead};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::metrics::{Metrics, RateLimitedLabels};
use crate::outbound::PROXY_ERROR_HEADER;

/// The most client identities one limit keeps a bucket for (beyond: one shared overflow
/// bucket). About 200 bytes each: under 1 MiB per limit.
pub const MAX_IDENTITY_BUCKETS: usize = 4096;
/// A client's bucket idle for this many periods is dropped (Linkerd and the design's choice).
pub const IDLE_PERIODS: u32 = 10;
/// With the map full, idle buckets are looked for at most this often: a client rotating
/// identities makes a full scan at most once a second.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// gRPC's RESOURCE_EXHAUSTED, its status for HTTP 429.
const GRPC_RESOURCE_EXHAUSTED: &str = "8";

/// The local rate limits of every Service port this workload serves, with their buckets; one
/// per proxy, shared by every inbound connection.
pub struct RateLimits {
    routes: watch::Receiver<Option<Arc<RouteTable>>>,
    services: watch::Receiver<Option<Arc<ServiceTable>>>,
    metrics: Arc<Metrics>,
    synced: Mutex<Synced>,
    /// `synced` holds limits: once none are in force they are dropped, so a limit that comes
    /// back starts full.
    holding: AtomicBool,
}

/// The limits in force, and the tables they were made from (compared by pointer on each
/// request: a new table rebuilds them).
#[derive(Default)]
struct Synced {
    routes: Option<Arc<RouteTable>>,
    services: Option<Arc<ServiceTable>>,
    active: Arc<Active>,
}

#[derive(Default)]
struct Active {
    /// The limits of the connections to each local address and port.
    by_local: HashMap<SocketAddr, Vec<Arc<ActiveLimit>>>,
    /// Every limit's buckets by where the limit comes from, carried over to the next table
    /// while the limit is unchanged.
    buckets: HashMap<BucketsKey, Arc<Buckets>>,
}

/// A limit's place: its Service port, its policy, and which of that policy's limits on the
/// port it is (a policy targeting several routes of one port gives one limit per route).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct BucketsKey {
    port: PortKey,
    source: String,
    nth: usize,
}

/// One limit of one Service port, as requests check it.
struct ActiveLimit {
    /// `<namespace>/<name>` of the Service: the metric's `service` label.
    service: String,
    policy: Arc<InboundPolicy>,
    /// Into `policy.limits`.
    index: usize,
    buckets: Arc<Buckets>,
}

impl ActiveLimit {
    fn limit(&self) -> &LocalRateLimit {
        &self.policy.limits[self.index]
    }
}

/// Which bucket refused a request: the metric's `scope` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Total,
    Identity,
    Override,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::Identity => "identity",
            Scope::Override => "override",
        }
    }
}

/// A request refused by a limit, and how to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// `<namespace>/<RateLimitPolicy name>`.
    pub policy: String,
    pub scope: Scope,
    /// Until every bucket the request needs has a token again.
    pub retry_after: Duration,
    /// Answered the gRPC way.
    pub grpc: bool,
}

impl Refusal {
    /// `Retry-After`: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs();
        let rounded = if self.retry_after.subsec_nanos() > 0 {
            secs.saturating_add(1)
        } else {
            secs
        };
        rounded.max(1)
    }

    /// The answer: 429 with `Retry-After`, or a trailers-only gRPC RESOURCE_EXHAUSTED; both
    /// name the policy in `sigil-proxy-error`.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let why = format!("rate limited by {}", self.policy);
        let mut response = if self.grpc {
            let mut response = Response::new(Full::new(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert(
                "grpc-status",
                http::HeaderValue::from_static(GRPC_RESOURCE_EXHAUSTED),
            );
            if let Ok(message) = http::HeaderValue::from_str(&why) {
                headers.insert("grpc-message", message);
            }
            response
        } else {
            let mut response = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            response
        };
        let headers = response.headers_mut();
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(self.retry_after_secs()),
        );
        if let Ok(value) = http::HeaderValue::from_str(&why) {
            headers.insert(PROXY_ERROR_HEADER, value);
        }
        response
    }
}

impl RateLimits {
    pub fn new(
        routes: watch::Receiver<Option<Arc<RouteTable>>>,
        services: watch::Receiver<Option<Arc<ServiceTable>>>,
        metrics: Arc<Metrics>,
    ) -> RateLimits {
        RateLimits {
            routes,
            services,
            metrics,
            synced: Mutex::default(),
            holding: AtomicBool::new(false),
        }
    }

    /// Takes a token for an authorized request on a connection to `local` from `client`
    /// (`None`: plaintext), or says why the request is refused (then nothing is taken).
    pub fn check(
        &self,
        local: SocketAddr,
        client: Option<&SpiffeId>,
        request: &RequestHead<'_>,
    ) -> Option<Refusal> {
        let active = self.active()?;
        let limits = active.by_local.get(&local)?;
        let now = Instant::now();
        let mut grpc = None;
        for (i, limit) in limits.iter().enumerate() {
            if !applies(limit.limit(), request, &mut grpc) {
                continue;
            }
            let Err(refused) = limit.buckets.take(client, now) else {
                continue;
            };
            // All or nothing: the limits that did admit the request get their tokens back.
            for earlier in &limits[..i] {
                if applies(earlier.limit(), request, &mut grpc) {
                    earlier.buckets.give_back(client);
                }
            }
            let refusal = Refusal {
                service: limit.service.clone(),
                policy: limit.limit().source.clone(),
                scope: refused.scope,
                retry_after: refused.wait,
                grpc: *grpc.get_or_insert_with(|| select::is_grpc(request.headers)),
            };
            self.metrics
                .rate_limited
                .get_or_create(&RateLimitedLabels {
                    service: refusal.service.clone(),
                    policy: refusal.policy.clone(),
                    scope: refusal.scope.as_str(),
                })
                .inc();
            debug!(
                service = %refusal.service,
                policy = %refusal.policy,
                scope = refusal.scope.as_str(),
                client = client.map(tracing::field::display),
                %local,
                path = request.path,
                retry_after_s = refusal.retry_after_secs(),
                "request rate limited"
            );
            return Some(refusal);
        }
        None
    }

    /// The limits in force, rebuilt if a table changed; `None` when no Service port this
    /// workload serves has a limit (the common case, without taking the lock).
    fn active(&self) -> Option<Arc<Active>> {
        let routes = self.routes.borrow().clone();
        if routes.as_ref().is_none_or(|t| t.routes.inbound.is_empty()) {
            if self.holding.swap(false, Ordering::Relaxed) {
                *lock(&self.synced) = Synced::default();
            }
            return None;
        }
        let services = self.services.borrow().clone();
        let mut synced = lock(&self.synced);
        self.holding.store(true, Ordering::Relaxed);
        if !same(&synced.routes, &routes) || !same(&synced.services, &services) {
            let active = Active::build(routes.as_deref(), services.as_deref(), &synced.active);
            *synced = Synced {
                routes,
                services,
                active: Arc::new(active),
            };
        }
        Some(synced.active.clone())
    }
}

fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent state (every update is one assignment).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `limit` applies to `request`; `grpc` caches whether the request is gRPC.
fn applies(limit: &LocalRateLimit, request: &RequestHead<'_>, grpc: &mut Option<bool>) -> bool {
    if limit.http_matches.is_empty() && limit.grpc_matches.is_empty() {
        return true;
    }
    limit
        .http_matches
        .iter()
        .any(|m| select::matches_http(m, request))
        || (!limit.grpc_matches.is_empty()
            && *grpc.get_or_insert_with(|| select::is_grpc(request.headers))
            && limit
                .grpc_matches
                .iter()
                .any(|m| select::matches_grpc(m, request)))
}

impl Active {
    /// The limits of `routes` at the endpoints `services` lists, each keeping the buckets it
    /// had in `previous` if its limit is unchanged.
    fn build(
        routes: Option<&RouteTable>,
        services: Option<&ServiceTable>,
        previous: &Active,
    ) -> Active {
        let mut active = Active::default();
        let (Some(routes), Some(services)) = (routes, services) else {
            return active;
        };
        for (key, policy) in &routes.routes.inbound {
            let service_key = ServiceKey::new(&key.service.namespace, &key.service.name);
            let Some(service) = services.get(&service_key) else {
                continue;
            };
            let Some(port) = service.port(key.port) else {
                continue;
            };
            let locals: Vec<SocketAddr> = service
                .endpoints
                .iter()
                .filter_map(|e| Some(SocketAddr::new(e.ip, e.target_port(port)?)))
                .collect();
            if locals.is_empty() {
                continue;
            }
            let mut per_source: HashMap<&str, usize> = HashMap::new();
            for (index, limit) in policy.limits.iter().enumerate() {
                let seen = per_source.entry(limit.source.as_str()).or_default();
                let buckets_key = BucketsKey {
                    port: key.clone(),
                    source: limit.source.clone(),
                    nth: *seen,
                };
                *seen += 1;
                let config = BucketConfig::of(limit);
                let buckets = match previous.buckets.get(&buckets_key) {
                    Some(kept) if kept.config == config => kept.clone(),
                    _ => Arc::new(Buckets::new(config)),
                };
                active.buckets.insert(buckets_key, buckets.clone());
                let limit = Arc::new(ActiveLimit {
                    service: key.service.to_string(),
                    policy: policy.clone(),
                    index,
                    buckets,
                });
                for local in &locals {
                    active
                        .by_local
                        .entry(*local)
                        .or_default()
                        .push(limit.clone());
                }
            }
        }
        active
    }
}

/// What a limit's buckets are made from: a change to any of it starts them afresh.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BucketConfig {
    total: Option<Limit>,
    per_identity: Option<Limit>,
    overrides: Vec<IdentityOverride>,
}

impl BucketConfig {
    fn of(limit: &LocalRateLimit) -> BucketConfig {
        BucketConfig {
            total: limit.total,
            per_identity: limit.per_identity,
            overrides: limit.overrides.clone(),
        }
    }
}

/// The buckets of one limit, behind one small lock: a request checks and takes from its total
/// and its client's bucket at once.
struct Buckets {
    config: BucketConfig,
    state: Mutex<BucketState>,
}

struct BucketState {
    total: Option<Bucket>,
    identities: HashMap<SpiffeId, Bucket>,
    unauthenticated: Option<Bucket>,
    /// Shared by the clients that found the identity map full.
    overflow: Option<Bucket>,
    /// One per override, shared by its clients; created on first use.
    overrides: Vec<Option<Bucket>>,
    /// When idle identity buckets were last dropped.
    swept: Instant,
}

/// The bucket a client's requests take from besides the total.
#[derive(Clone, Copy, Debug)]
enum ClientBucket {
    None,
    Identity,
    Override(usize),
}

/// Why [`Buckets::take`] refused.
#[derive(Debug)]
struct Refused {
    scope: Scope,
    wait: Duration,
}

impl Buckets {
    fn new(config: BucketConfig) -> Buckets {
        let overrides = vec![None; config.overrides.len()];
        Buckets {
            config,
            state: Mutex::new(BucketState {
                total: None,
                identities: HashMap::new(),
                unauthenticated: None,
                overflow: None,
                overrides,
                swept: Instant::now(),
            }),
        }
    }

    fn client_bucket(&self, client: Option<&SpiffeId>) -> (ClientBucket, Option<Rate>) {
        if let Some(id) = client
            && let Some(i) = self
                .config
                .overrides
                .iter()
                .position(|o| o.clients.contains(id))
        {
            return (
                ClientBucket::Override(i),
                Some(Rate::of(&self.config.overrides[i].limit)),
            );
        }
        match self.config.per_identity {
            Some(limit) => (ClientBucket::Identity, Some(Rate::of(&limit))),
            None => (ClientBucket::None, None),
        }
    }

    /// Takes a token from the total and from the client's bucket, or from neither.
    fn take(&self, client: Option<&SpiffeId>, now: Instant) -> Result<(), Refused> {
        let (which, client_rate) = self.client_bucket(client);
        let total_rate = self.config.total.map(|l| Rate::of(&l));
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let total = total_rate.map(|rate| {
            let bucket = state.total.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            (bucket, rate)
        });
        let own = match (which, client_rate) {
            (ClientBucket::None, _) | (_, None) => None,
            (ClientBucket::Override(i), Some(rate)) => {
                let bucket = state.overrides[i].get_or_insert_with(|| Bucket::full(rate, now));
                Some((bucket, rate, Scope::Override))
            }
            (ClientBucket::Identity, Some(rate)) => Some((
                identity_bucket(
                    &mut state.identities,
                    &mut state.unauthenticated,
                    &mut state.overflow,
                    &mut state.swept,
                    client,
                    rate,
                    now,
                ),
                rate,
                Scope::Identity,
            )),
        };
        let own = own.map(|(bucket, rate, scope)| {
            bucket.refill(rate, now);
            (bucket, rate, scope)
        });
        let total_wait = total.as_ref().map_or(Duration::ZERO, |(b, r)| b.wait(*r));
        let own_wait = own.as_ref().map_or(Duration::ZERO, |(b, r, _)| b.wait(*r));
        if total_wait.is_zero() && own_wait.is_zero() {
            if let Some((bucket, rate)) = total {
                bucket.take(rate);
            }
            if let Some((bucket, rate, _)) = own {
                bucket.take(rate);
            }
            return Ok(());
        }
        let scope = match &own {
            Some((_, _, scope)) if total_wait.is_zero() => *scope,
            _ => Scope::Total,
        };
        Err(Refused {
            scope,
            wait: total_wait.max(own_wait),
        })
    }

    /// Returns the token [`Buckets::take`] took for `client` (another limit refused the
    /// request).
    fn give_back(&self, client: Option<&SpiffeId>) {
        let (which, client_rate) = self.client_bucket(client);
        let mut state = lock(&self.state);
        if let (Some(limit), Some(bucket)) = (self.config.total, state.total.as_mut()) {
            bucket.give_back(Rate::of(&limit));
        }
        let bucket = match (which, client) {
            (ClientBucket::None, _) => None,
            (ClientBucket::Override(i), _) => state.overrides[i].as_mut(),
            (ClientBucket::Identity, None) => state.unauthenticated.as_mut(),
            (ClientBucket::Identity, Some(id)) => match state.identities.get_mut(id) {
                Some(bucket) => Some(bucket),
                None => state.overflow.as_mut(),
            },
        };
        if let (Some(bucket), Some(rate)) = (bucket, client_rate) {
            bucket.give_back(rate);
        }
    }

    #[cfg(test)]
    fn identities_held(&self) -> usize {
        lock(&self.state).identities.len()
    }
}

/// The `identity` bucket of `client`: its own, the unauthenticated one, or (the map full) the
/// overflow one. Drops idle buckets first when it is time.
fn identity_bucket<'a>(
    identities: &'a mut HashMap<SpiffeId, Bucket>,
    unauthenticated: &'a mut Option<Bucket>,
    overflow: &'a mut Option<Bucket>,
    swept: &mut Instant,
    client: Option<&SpiffeId>,
    rate: Rate,
    now: Instant,
) -> &'a mut Bucket {
    let Some(id) = client else {
        return unauthenticated.get_or_insert_with(|| Bucket::full(rate, now));
    };
    let idle = rate.idle_after();
    let since = now.saturating_duration_since(*swept);
    if since >= idle || (identities.len() >= MAX_IDENTITY_BUCKETS && since >= FULL_SWEEP_INTERVAL) {
        identities.retain(|_, bucket| !bucket.idle(now, idle));
        if overflow
            .as_ref()
            .is_some_and(|bucket| bucket.idle(now, idle))
        {
            *overflow = None;
        }
        *swept = now;
    }
    if identities.len() < MAX_IDENTITY_BUCKETS || identities.contains_key(id) {
        return identities
            .entry(id.clone())
            .or_insert_with(|| Bucket::full(rate, now));
    }
    overflow.get_or_insert_with(|| Bucket::full(rate, now))
}

/// A [`Limit`] in the units buckets count in: one token is `period_ns` units, and a bucket
/// gains `requests` units per nanosecond, so refilling is exact whatever the rate.
#[derive(Clone, Copy, Debug)]
struct Rate {
    requests: u128,
    period_ns: u128,
    burst: u128,
}

impl Rate {
    fn of(limit: &Limit) -> Rate {
        Rate {
            requests: u128::from(limit.requests),
            period_ns: limit.period.as_nanos().max(1),
            burst: u128::from(limit.burst),
        }
    }

    fn capacity(self) -> u128 {
        self.burst * self.period_ns
    }

    /// How long a client's bucket is kept unused: [`IDLE_PERIODS`] periods, and at least the
    /// time it takes to refill from empty, by when dropping it loses nothing.
    fn idle_after(self) -> Duration {
        let periods = self.period_ns * u128::from(IDLE_PERIODS);
        let refill = match self.requests {
            0 => 0,
            requests => self.capacity().div_ceil(requests),
        };
        nanos(periods.max(refill))
    }
}

fn nanos(ns: u128) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A token bucket: its level in [`Rate`] units when last refilled.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: u128,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            level: rate.capacity(),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        if now > self.at {
            let gained = (now - self.at).as_nanos().saturating_mul(rate.requests);
            self.level = self.level.saturating_add(gained).min(rate.capacity());
            self.at = now;
        }
    }

    /// How long until the bucket has a token (zero: it has one). A limit of zero requests never
    /// refills: a period is as good an answer as any.
    fn wait(&self, rate: Rate) -> Duration {
        if self.level >= rate.period_ns {
            return Duration::ZERO;
        }
        match rate.requests {
            0 => nanos(rate.period_ns),
            requests => nanos((rate.period_ns - self.level).div_ceil(requests)),
        }
    }

    fn take(&mut self, rate: Rate) {
        self.level -= rate.period_ns;
    }

    fn give_back(&mut self, rate: Rate) {
        self.level = (self.level + rate.period_ns).min(rate.capacity());
    }

    /// Unused for `idle` (see [`Rate::idle_after`]).
    fn idle(&self, now: Instant, idle: Duration) -> bool {
        now.saturating_duration_since(self.at) >= idle
    }
}

/// The limits as one inbound connection checks them: its local address and its client.
#[derive(Clone)]
pub struct ConnectionLimits {
    limits: Arc<RateLimits>,
    local: SocketAddr,
    client: Option<SpiffeId>,
}

impl ConnectionLimits {
    pub fn new(limits: Arc<RateLimits>, local: SocketAddr, client: Option<SpiffeId>) -> Self {
        ConnectionLimits {
            limits,
            local,
            client,
        }
    }

    /// See [`RateLimits::check`].
    pub fn check(&self, request: &RequestHead<'_>) -> Option<Refusal> {
        self.limits.check(self.local, self.client.as_ref(), request)
    }
}

impl fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("local", &self.local)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
