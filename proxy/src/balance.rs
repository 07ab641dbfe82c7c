//! Load balancing over a meshed Service's endpoints, one balancer per (Service, Service port,
//! address family: a connection to a Service's IPv6 cluster IP goes to its IPv6 endpoints, as
//! kube-proxy sends it):
//! power of two choices over peak-EWMA latency (Linkerd's and Finagle's): each endpoint keeps an
//! exponentially weighted moving average of its response times that rises with a slower
//! response at once (at most [`PEAK_STEP`] times per response) and decays with [`DECAY`], and
//! its load is that average times its pending requests plus one. Of two endpoints drawn at
//! random the less loaded one is chosen.
//!
//! Where this differs from Linkerd's (10 s decay, peaks taken whole, loads compared exactly),
//! it is for clients that send one request at a time, where nothing is ever pending and the
//! estimates alone decide: there, one slow response (a pause, a delayed ACK: 40 ms beside 1 ms)
//! would keep an endpoint out for `DECAY × ln(40)`, over half a minute, and the noise of a busy
//! node would rank one of three equal endpoints first for long stretches (the netns test saw
//! one endpoint get 8% of the requests). Here a response raises an estimate by a quarter at
//! most ([`PEAK_STEP`]), a faster one pulls it by a fifth at least ([`PULL`]), estimates decay in
//! a second ([`DECAY`]), and loads within a factor of two ([`TIE`]) are left to the random
//! draw; an endpoint much slower than the others (50 ms beside 1 ms) is still passed over after
//! its second slow response, and one with two requests pending fewer still wins.
//!
//! The endpoints follow the Service table at once: an endpoint that takes new requests is
//! chosen from the next pick on; one that leaves, turns unready or terminating is never chosen
//! again, while what was sent to it finishes ([`Pending`] holds its own reference).
//!
//! Each balancer also follows its Service's `outlierDetection` (from the routes the agent sends,
//! [`outlier`]): the outcome of every request or connection is reported
//! ([`EndpointLoad::report`]), an endpoint that fails too often is ejected, and the two choices
//! are drawn among the endpoints not ejected (a probing one only while it has nothing pending).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use sigil_identity::SpiffeId;
use sigil_proxy_api::routes::RouteTable;
use sigil_proxy_api::services::{MeshService, ServiceKey, ServicePort, ServiceTable};
use sigil_route::{OutlierDetection, ServiceRef};
use tokio::sync::watch;

use crate::forward::Family;
use crate::metrics::{EndpointLabels, Metrics, ServiceLabels};

mod outlier;

/// How fast an endpoint's latency average forgets: a response this old weighs 1/e.
pub const DECAY: Duration = Duration::from_secs(1);
/// The most one slower response multiplies an endpoint's estimate by: less than [`TIE`]
/// absorbs, so that one response alone never sidelines an endpoint.
pub const PEAK_STEP: f64 = 1.25;
/// The least a faster response pulls an endpoint's estimate towards itself.
pub const PULL: f64 = 0.2;
const _: () = assert!(
    PEAK_STEP * (1.0 - TIE) < 1.0,
    "one response must stay within a tie"
);
/// The latency assumed of an endpoint before its first response when no endpoint of its
/// balancer has answered yet (Linkerd's default); otherwise it counts as the mean of those that
/// have, so that it is tried at once without being preferred.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Loads closer than this fraction are equal, and the random draw decides between them. With
/// a client that sends one request at a time nothing is ever pending, so the latency estimates
/// alone decide; compared exactly (or within a few percent), the noise between equal endpoints
/// (scheduling, a busy node) would rank one of three first for long stretches and give it two
/// thirds of the requests. An endpoint twice as fast still wins every comparison, as does one
/// with two requests pending fewer (`pending + 1` triples a load).
pub const TIE: f64 = 0.5;

/// One endpoint's address (pod IP and target port), identity and load.
#[derive(Debug)]
pub struct EndpointLoad {
    pub addr: SocketAddr,
    pub id: SpiffeId,
    pending: AtomicI64,
    rtt: Mutex<PeakEwma>,
    health: outlier::Health,
    /// Where outcomes are judged; gone once the balancer is.
    balancer: Weak<Balancer>,
}

impl EndpointLoad {
    fn new(addr: SocketAddr, id: SpiffeId, balancer: Weak<Balancer>, now: Instant) -> EndpointLoad {
        EndpointLoad {
            addr,
            id,
            pending: AtomicI64::new(0),
            health: outlier::Health::default(),
            balancer,
            rtt: Mutex::new(PeakEwma {
                estimate_ns: DEFAULT_RTT.as_nanos() as f64,
                measured: false,
                updated: now,
            }),
        }
    }

    /// The latency estimate now (decayed for the time since the last response).
    pub fn estimate(&self) -> Duration {
        Duration::from_nanos(self.estimate_ns(Instant::now()) as u64)
    }

    fn estimate_ns(&self, now: Instant) -> f64 {
        self.rtt.lock().map_or(0.0, |mut rtt| rtt.decayed(now))
    }

    /// Requests (or opaque connections) sent here and not answered (or closed) yet.
    pub fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate as of `now` (None before the first response).
    fn measured_ns(&self, now: Instant) -> Option<f64> {
        let mut rtt = self.rtt.lock().ok()?;
        rtt.measured.then(|| rtt.decayed(now))
    }

    /// The latency estimate as of `now` (`unmeasured` before the first response) times the
    /// pending requests plus one.
    fn load(&self, now: Instant, unmeasured: &mut impl FnMut() -> f64) -> f64 {
        let estimate = self.measured_ns(now).unwrap_or_else(unmeasured);
        estimate * (self.pending().max(0) + 1) as f64
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        if let Ok(mut estimate) = self.rtt.lock() {
            estimate.observe(rtt, now);
        }
    }
}

/// The peak-EWMA latency estimate of one endpoint.
#[derive(Debug)]
struct PeakEwma {
    estimate_ns: f64,
    /// Whether a response was observed: the first one is taken whole.
    measured: bool,
    updated: Instant,
}

impl PeakEwma {
    /// The estimate decays towards zero as time passes (reads included, as Linkerd's does), so
    /// that an endpoint once slow is tried again after a while instead of never; a response
    /// slower than the estimate raises it at once (the peak), up to [`PEAK_STEP`] times; a
    /// faster one pulls it towards itself by the weight of the time since the last update, and
    /// at least by [`PULL`], so that the estimate follows an endpoint's typical latency rather
    /// than the worst of its recent responses.
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        if !self.measured {
            (self.estimate_ns, self.measured, self.updated) = (rtt_ns, true, now);
            return;
        }
        let weight = self.weight_since_update(now);
        let current = self.estimate_ns * weight;
        self.estimate_ns = if rtt_ns > current {
            rtt_ns.min(current * PEAK_STEP)
        } else {
            let pull = (1.0 - weight).max(PULL);
            current * (1.0 - pull) + rtt_ns * pull
        };
        self.updated = self.updated.max(now);
    }

    /// The estimate as of `now`, decayed for the time since the last update (and kept so).
    fn decayed(&mut self, now: Instant) -> f64 {
        self.estimate_ns *= self.weight_since_update(now);
        self.updated = self.updated.max(now);
        self.estimate_ns
    }

    fn weight_since_update(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }
}

/// What one request (or connection) to an endpoint came to, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not a failure.
    Success,
    /// A 5xx, or a gRPC status UNAVAILABLE, INTERNAL, DATA_LOSS or UNKNOWN; `gateway` for
    /// 502, 503 and 504.
    Failure { gateway: bool },
    /// No answer: connection or TLS failure, reset before the response head, or the attempt's
    /// timeout.
    NoAnswer,
}

impl Outcome {
    /// The outcome of a response with HTTP `status` and, for gRPC, `grpc_status` (as far as
    /// known: the header of a trailers-only response, or the trailer).
    pub fn of_response(status: u16, grpc_status: Option<u32>) -> Outcome {
        // UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS; DEADLINE_EXCEEDED and PERMISSION_DENIED
        // are more often the caller's doing than the endpoint's.
        const GRPC_FAILURES: [u32; 4] = [2, 13, 14, 15];
        match status {
            502..=504 => Outcome::Failure { gateway: true },
            500..=599 => Outcome::Failure { gateway: false },
            _ if grpc_status.is_some_and(|code| GRPC_FAILURES.contains(&code)) => {
                Outcome::Failure { gateway: false }
            }
            _ => Outcome::Success,
        }
    }
}

impl EndpointLoad {
    /// Counts an outcome in this endpoint's outlier detection (ejects it when its Service's
    /// policy says so). Called when the outcome is known: at the response head, or at the end
    /// of a gRPC response's trailers.
    pub fn report(&self, outcome: Outcome) {
        self.report_at(outcome, Instant::now());
    }

    fn report_at(&self, outcome: Outcome, now: Instant) {
        let Some(balancer) = self.balancer.upgrade() else {
            return;
        };
        if let Some(verdict) = self.health.count(outcome, &balancer.limits) {
            balancer.judge(self, verdict, now);
        }
    }
}

/// A request (or opaque connection) sent to an endpoint: counted in its load until the
/// response head arrives ([`Pending::answered`]) or it is dropped.
#[derive(Debug)]
pub struct Pending {
    endpoint: Arc<EndpointLoad>,
    sent: Instant,
    gauge: Gauge,
}

impl Pending {
    pub fn endpoint(&self) -> &Arc<EndpointLoad> {
        &self.endpoint
    }

    /// The response head arrived: its latency since the pick feeds the endpoint's estimate.
    pub fn answered(self) {
        let sent = self.sent;
        self.answered_since(sent);
    }

    /// The response head arrived to a request written at `sent` (after waiting for a
    /// connection, which is not the endpoint's latency).
    pub fn answered_since(self, sent: Instant) {
        let now = Instant::now();
        self.endpoint
            .observe(now.saturating_duration_since(sent), now);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// The balancer of one Service port.
#[derive(Debug)]
pub struct Balancer {
    pub service: ServiceKey,
    /// The family of the cluster IP dialled: only its endpoints are chosen.
    family: Family,
    /// Given to its endpoints, which report to it.
    me: Weak<Balancer>,
    state: Mutex<BalancerState>,
    limits: outlier::Limits,
    events: outlier::Events,
    pending_gauge: Gauge,
    ready_gauge: Gauge,
    draining_gauge: Gauge,
    ejected_gauge: Gauge,
}

#[derive(Debug)]
struct BalancerState {
    /// The Service as last synced with (compared by pointer: the table never changes one).
    synced: Option<Arc<MeshService>>,
    /// Endpoints that take new requests.
    ready: Vec<Arc<EndpointLoad>>,
    /// Endpoints that left the ready set with requests still pending (for the gauge).
    draining: Vec<Arc<EndpointLoad>>,
    reported_ready: i64,
    reported_draining: i64,
    outlier: outlier::Detector,
}

impl Balancer {
    fn new(service: ServiceKey, family: Family, metrics: &Metrics) -> Arc<Balancer> {
        let label = service.to_string();
        let endpoints = |state| {
            metrics
                .balancer_endpoints
                .get_or_create(&EndpointLabels {
                    service: label.clone(),
                    state,
                })
                .clone()
        };
        Arc::new_cyclic(|me| Balancer {
            me: me.clone(),
            limits: outlier::Limits::default(),
            events: outlier::Events::new(&label, metrics),
            pending_gauge: metrics
                .balancer_pending
                .get_or_create(&ServiceLabels {
                    service: label.clone(),
                })
                .clone(),
            ready_gauge: endpoints("ready"),
            draining_gauge: endpoints("draining"),
            ejected_gauge: endpoints("ejected"),
            service,
            family,
            state: Mutex::new(BalancerState {
                synced: None,
                ready: Vec::new(),
                draining: Vec::new(),
                reported_ready: 0,
                reported_draining: 0,
                outlier: outlier::Detector::new(Instant::now()),
            }),
        })
    }

    /// Takes the Service's outlier detection policy (None: no endpoint is ejected).
    pub fn set_policy(&self, policy: Option<&OutlierDetection>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let state = &mut *state;
        state
            .outlier
            .set_policy(policy, &self.limits, &state.ready, Instant::now());
        self.report(state);
    }

    /// Acts on what an outcome reported by `endpoint` asks for.
    fn judge(&self, endpoint: &EndpointLoad, verdict: outlier::Verdict, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let state = &mut *state;
        state
            .outlier
            .apply(endpoint, verdict, &state.ready, now, &self.events);
        self.report(state);
    }

    /// Takes `service`'s endpoints at `port` as they are now (a no-op if it is the Service
    /// synced last).
    pub fn sync(&self, service: &Arc<MeshService>, port: &ServicePort) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state
            .synced
            .as_ref()
            .is_some_and(|synced| Arc::ptr_eq(synced, service))
        {
            return;
        }
        let now = Instant::now();
        let mut previous: HashMap<(SocketAddr, SpiffeId), Arc<EndpointLoad>> = state
            .ready
            .drain(..)
            .map(|load| ((load.addr, load.id.clone()), load))
            .collect();
        let mut ready = Vec::new();
        // Of this family only: no fallback to the other one, which a pod of a single family
        // could not reach (a dual-stack pod could; kube-proxy does not either).
        let endpoints = service.endpoints.iter().filter(|endpoint| {
            endpoint.takes_new_requests() && Family::of(endpoint.ip) == self.family
        });
        for endpoint in endpoints {
            let Some(target) = endpoint.target_port(port) else {
                continue;
            };
            let key = (SocketAddr::new(endpoint.ip, target), endpoint.id.clone());
            let load = previous.remove(&key).unwrap_or_else(|| {
                Arc::new(EndpointLoad::new(
                    key.0,
                    key.1.clone(),
                    self.me.clone(),
                    now,
                ))
            });
            ready.push(load);
        }
        state.draining.extend(previous.into_values());
        state.ready = ready;
        state.synced = Some(service.clone());
        let state = &mut *state;
        state.outlier.recount(&state.ready);
        self.report(state);
    }

    /// The endpoint for a new request or connection, counted as pending; None if no endpoint
    /// takes new requests.
    pub fn pick(&self) -> Option<Pending> {
        self.pick_at(Instant::now())
    }

    fn pick_at(&self, now: Instant) -> Option<Pending> {
        let mut state = self.state.lock().ok()?;
        let state = &mut *state;
        state.outlier.tick(&state.ready, now, &self.events);
        let chosen = choose(&state.outlier.candidates(&state.ready), now);
        // Draining endpoints are forgotten once their last request is done.
        self.report(state);
        let endpoint = chosen?;
        // Counted before the lock is let go: a probing endpoint takes one request at a time.
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        self.pending_gauge.inc();
        Some(Pending {
            endpoint,
            sent: now,
            gauge: self.pending_gauge.clone(),
        })
    }

    /// The Service or its port is gone: no endpoint takes new requests; what was sent finishes.
    fn clear(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let ready = std::mem::take(&mut state.ready);
        state.draining.extend(ready);
        state.synced = None;
        let state = &mut *state;
        state.outlier.recount(&state.ready);
        self.report(state);
    }

    /// The endpoints that take new requests now.
    pub fn ready(&self) -> Vec<Arc<EndpointLoad>> {
        self.state
            .lock()
            .map(|state| state.ready.clone())
            .unwrap_or_default()
    }

    fn report(&self, state: &mut BalancerState) {
        state.draining.retain(|load| load.pending() > 0);
        let (ready, draining) = (state.ready.len() as i64, state.draining.len() as i64);
        // Deltas: the gauges are per Service, shared by its ports' balancers.
        self.ready_gauge.inc_by(ready - state.reported_ready);
        self.draining_gauge
            .inc_by(draining - state.reported_draining);
        state.reported_ready = ready;
        state.reported_draining = draining;
        state.outlier.report(&self.ejected_gauge);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            self.ready_gauge.dec_by(state.reported_ready);
            self.draining_gauge.dec_by(state.reported_draining);
            self.ejected_gauge.dec_by(state.outlier.reported());
        }
    }
}

/// Of two endpoints of `endpoints` drawn at random, the less loaded one.
fn choose(endpoints: &[Arc<EndpointLoad>], now: Instant) -> Option<Arc<EndpointLoad>> {
    match endpoints.len() {
        0 => None,
        1 => Some(endpoints[0].clone()),
        n => {
            let (a, b) = two_distinct(n);
            let (a, b) = (&endpoints[a], &endpoints[b]);
            // An endpoint not measured yet counts as the mean of those measured: tried at once,
            // not preferred (at the default beside endpoints measured faster it would lose every
            // comparison until its estimate decayed).
            let mut mean = None;
            let mut unmeasured = || {
                *mean.get_or_insert_with(|| {
                    let measured: Vec<f64> = endpoints
                        .iter()
                        .filter_map(|e| e.measured_ns(now))
                        .collect();
                    if measured.is_empty() {
                        DEFAULT_RTT.as_nanos() as f64
                    } else {
                        measured.iter().sum::<f64>() / measured.len() as f64
                    }
                })
            };
            // `a` is as random as `b`: a tie goes to the draw.
            let (load_a, load_b) = (a.load(now, &mut unmeasured), b.load(now, &mut unmeasured));
            Some(if load_b < load_a * (1.0 - TIE) { b } else { a }.clone())
        }
    }
}

/// Two different indexes below `n` (n ≥ 2), uniformly.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = random_below(n);
    let mut b = random_below(n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// A random number below `n`, from a per-thread SplitMix64 sequence seeded once by the OS
/// (through `RandomState`): not for secrets, ample for choosing endpoints.
pub(crate) fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(RandomState::new().build_hasher().finish());
    }
    let next = STATE.with(|state| {
        let seed = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(seed);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    });
    (next % n as u64) as usize
}

/// Every balancer of this proxy, by Service, Service port and family, made on first use.
pub struct Balancers {
    metrics: Arc<Metrics>,
    by_port: Mutex<HashMap<(ServiceKey, u16, Family), Arc<Balancer>>>,
    /// The routes last received, for the outlier detection policy of balancers made later.
    routes: Mutex<Option<Arc<RouteTable>>>,
}

/// The outlier detection policy `routes` gives `service`.
fn policy_of<'a>(
    routes: &'a Option<Arc<RouteTable>>,
    service: &ServiceKey,
) -> Option<&'a OutlierDetection> {
    routes
        .as_ref()?
        .routes
        .backends
        .get(&ServiceRef::from(service))?
        .outlier_detection
        .as_ref()
}

impl Balancers {
    pub fn new(metrics: Arc<Metrics>) -> Balancers {
        Balancers {
            metrics,
            by_port: Mutex::default(),
            routes: Mutex::default(),
        }
    }

    /// The balancer of `service`'s `port` over its endpoints of `family` (the dialled cluster
    /// IP's), synced with `service` as it is now.
    pub fn get(
        &self,
        service: &Arc<MeshService>,
        port: &ServicePort,
        family: Family,
    ) -> Arc<Balancer> {
        let balancer = {
            let mut by_port = self.by_port.lock().unwrap_or_else(|e| e.into_inner());
            by_port
                .entry((service.key.clone(), port.port, family))
                .or_insert_with(|| {
                    let balancer = Balancer::new(service.key.clone(), family, &self.metrics);
                    let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                    balancer.set_policy(policy_of(&routes, &service.key));
                    balancer
                })
                .clone()
        };
        balancer.sync(service, port);
        balancer
    }

    /// Keeps every balancer in step with the Service table for the life of the process, so
    /// that the requests of connections open for long (one HTTP/2 connection can carry all of
    /// an application's requests) see endpoints come and go at once: each balancer takes its
    /// Service's endpoints from every new table, and one whose Service or port is gone is
    /// cleared and forgotten (its connections' next requests get 503). Each balancer also
    /// takes its Service's outlier detection policy from every new route table.
    pub async fn follow(
        self: Arc<Self>,
        mut services: watch::Receiver<Option<Arc<ServiceTable>>>,
        mut routes: watch::Receiver<Option<Arc<RouteTable>>>,
    ) {
        let current = routes.borrow_and_update().clone();
        self.set_routes(current);
        let mut routes_open = true;
        loop {
            tokio::select! {
                changed = services.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let table = services.borrow_and_update().clone();
                    if let Some(table) = table {
                        self.sync_all(&table);
                    }
                }
                changed = routes.changed(), if routes_open => match changed {
                    Ok(()) => {
                        let table = routes.borrow_and_update().clone();
                        self.set_routes(table);
                    }
                    // The routes keep their last state; the endpoints are still followed.
                    Err(_) => routes_open = false,
                },
            }
        }
    }

    /// Gives every balancer its Service's outlier detection policy from `routes` (None: the
    /// routes are not known yet, so no policy).
    fn set_routes(&self, routes: Option<Arc<RouteTable>>) {
        *self.routes.lock().unwrap_or_else(|e| e.into_inner()) = routes.clone();
        let by_port = self.by_port.lock().unwrap_or_else(|e| e.into_inner());
        for ((key, _, _), balancer) in by_port.iter() {
            balancer.set_policy(policy_of(&routes, key));
        }
    }

    fn sync_all(&self, table: &ServiceTable) {
        let mut by_port = self.by_port.lock().unwrap_or_else(|e| e.into_inner());
        by_port.retain(|(key, number, _), balancer| {
            let found = table
                .get(key)
                .and_then(|service| Some((service, service.port(*number)?)));
            match found {
                Some((service, port)) => {
                    balancer.sync(service, port);
                    true
                }
                None => {
                    balancer.clear();
                    false
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;
