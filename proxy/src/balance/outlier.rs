//! Outlier detection (circuit breaking) per endpoint of a balancer, by the backend Service's
//! `outlierDetection` (Istio's DestinationRule fields, Envoy's rules): an endpoint is ejected
//! — given no new requests — after `consecutive5xxErrors` failures or
//! `consecutiveGatewayErrors` gateway errors in a row (at once), or, judged every `interval`,
//! when its failures reach `failurePercentage.threshold` percent of at least `requestVolume`
//! requests (if `minimumHosts` endpoints had that volume). An ejection is refused when
//! `maxEjectionPercent` of the endpoints are already out, and always when it would leave none.
//! An ejected endpoint stays out for `baseEjectionTime × n` (n: times ejected, less one per
//! `interval` spent healthy; capped by `maxEjectionTime`), then probes: it is given one request
//! at a time until one succeeds (readmitted) or fails (ejected again, n + 1). Below
//! `minHealthPercent` healthy endpoints, the ejected ones are used again (Istio's panic).
//!
//! Counting is atomic per endpoint; the balancer's lock is taken only for a change of state
//! (ejection, readmission) and for the judgement each `interval`, which the balancer runs at a
//! pick once the interval has passed (no timer task: an idle balancer has nothing to judge; the
//! intervals it spent idle count at its next pick, each one off an active endpoint's n).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sigil_route::OutlierDetection;
use tracing::{info, warn};

use super::{EndpointLoad, Outcome};
use crate::metrics::{EjectionLabels, Metrics, ServiceLabels};

/// Why an endpoint was ejected (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `consecutive5xxErrors` failures in a row, or a failed probe.
    Consecutive,
    /// `consecutiveGatewayErrors` gateway errors (502, 503, 504, no answer) in a row, or a
    /// failed probe that was one.
    Gateway,
    /// The failure percentage of the last interval.
    Rate,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Consecutive => "consecutive",
            Reason::Gateway => "gateway",
            Reason::Rate => "rate",
        }
    }
}

/// An endpoint takes requests.
const ACTIVE: u8 = 0;
/// An endpoint gets no new requests until its ejection time is over.
const EJECTED: u8 = 1;
/// An endpoint whose ejection time is over: one request at a time until one succeeds.
const PROBING: u8 = 2;

/// What a reported outcome asks of the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `first`: the count just reached the threshold (a refusal is logged only then, not
    /// again for each further failure, each of which is judged again).
    Eject {
        reason: Reason,
        first: bool,
    },
    Readmit,
}

/// One endpoint's failure counts and ejection state.
#[derive(Debug, Default)]
pub struct Health {
    mode: AtomicU8,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    window_requests: AtomicU32,
    window_failures: AtomicU32,
    /// Changed only under the balancer's lock.
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    /// n: times ejected, less one per interval spent healthy.
    times: u32,
    until: Option<Instant>,
}

impl Health {
    /// Whether the endpoint takes new requests as any other (neither ejected nor probing).
    pub fn is_active(&self) -> bool {
        self.mode.load(Ordering::Relaxed) == ACTIVE
    }

    /// Whether the balancer may send this endpoint a new request, `pending` being its requests
    /// not answered yet: always when active, one at a time when probing, never when ejected.
    pub fn available(&self, pending: i64) -> bool {
        match self.mode.load(Ordering::Relaxed) {
            ACTIVE => true,
            PROBING => pending <= 0,
            _ => false,
        }
    }

    /// Counts `outcome` (atomically, no lock) and says whether the balancer must act on it.
    pub fn count(&self, outcome: Outcome, limits: &Limits) -> Option<Verdict> {
        let (failure, gateway) = match outcome {
            // Envoy's rule: only 5xx (and no answer) are failures; a rate limit's refusal is not.
            Outcome::Success | Outcome::Refused => (false, false),
            Outcome::Failure { gateway } => (true, gateway),
            Outcome::NoAnswer => (true, true),
        };
        self.window_requests.fetch_add(1, Ordering::Relaxed);
        let (in_row, gateway_in_row) = if failure {
            self.window_failures.fetch_add(1, Ordering::Relaxed);
            let in_row = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            // Envoy's rule: a 5xx that is not a gateway error ends a row of gateway errors.
            let gateway_in_row = if gateway {
                self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                0
            };
            (in_row, gateway_in_row)
        } else {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            (0, 0)
        };
        let gateway_limit = limits.consecutive_gateway.load(Ordering::Relaxed);
        let limit = limits.consecutive_5xx.load(Ordering::Relaxed);
        match self.mode.load(Ordering::Relaxed) {
            PROBING if !failure => Some(Verdict::Readmit),
            PROBING => Some(Verdict::Eject {
                reason: if gateway && gateway_limit > 0 {
                    Reason::Gateway
                } else {
                    Reason::Consecutive
                },
                first: true,
            }),
            ACTIVE if gateway_limit > 0 && gateway_in_row >= gateway_limit => {
                Some(Verdict::Eject {
                    reason: Reason::Gateway,
                    first: gateway_in_row == gateway_limit,
                })
            }
            ACTIVE if limit > 0 && in_row >= limit => Some(Verdict::Eject {
                reason: Reason::Consecutive,
                first: in_row == limit,
            }),
            // Ejected: answers to requests sent before the ejection change nothing.
            _ => None,
        }
    }

    /// Back to active, every count at 0.
    fn reset(&self) {
        self.mode.store(ACTIVE, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.window_requests.store(0, Ordering::Relaxed);
        self.window_failures.store(0, Ordering::Relaxed);
        if let Ok(mut ejection) = self.ejection.lock() {
            *ejection = Ejection::default();
        }
    }

    /// The times ejected (n) now.
    #[cfg(test)]
    pub fn times(&self) -> u32 {
        self.ejection.lock().map_or(0, |ejection| ejection.times)
    }
}

/// The consecutive-failure thresholds of a balancer's policy, read without its lock by every
/// report (0: off, as with no policy).
#[derive(Debug, Default)]
pub struct Limits {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
}

impl Limits {
    /// The failures in a row that eject (0: off).
    #[cfg(test)]
    pub fn consecutive_5xx(&self) -> u32 {
        self.consecutive_5xx.load(Ordering::Relaxed)
    }

    fn set(&self, policy: Option<&OutlierDetection>) {
        let (in_row, gateway) = policy.map_or((0, 0), |p| {
            (p.consecutive_5xx_errors, p.consecutive_gateway_errors)
        });
        self.consecutive_5xx.store(in_row, Ordering::Relaxed);
        self.consecutive_gateway.store(gateway, Ordering::Relaxed);
    }
}

/// A balancer's counters of ejections and readmissions, and its Service's name for the logs.
#[derive(Debug)]
pub struct Events {
    service: String,
    consecutive: Counter,
    gateway: Counter,
    rate: Counter,
    readmissions: Counter,
}

impl Events {
    pub fn new(service: &str, metrics: &Metrics) -> Events {
        let ejections = |reason: Reason| {
            metrics
                .endpoint_ejections
                .get_or_create(&EjectionLabels {
                    service: service.to_owned(),
                    reason: reason.label(),
                })
                .clone()
        };
        Events {
            service: service.to_owned(),
            consecutive: ejections(Reason::Consecutive),
            gateway: ejections(Reason::Gateway),
            rate: ejections(Reason::Rate),
            readmissions: metrics
                .endpoint_readmissions
                .get_or_create(&ServiceLabels {
                    service: service.to_owned(),
                })
                .clone(),
        }
    }

    fn ejected(&self, reason: Reason) {
        match reason {
            Reason::Consecutive => &self.consecutive,
            Reason::Gateway => &self.gateway,
            Reason::Rate => &self.rate,
        }
        .inc();
    }
}

/// An ejection asked for, and why (for the metrics and the log).
struct Cause {
    reason: Reason,
    /// The counts that led to it.
    counts: String,
    /// Whether a refusal is logged (not for each further failure of an endpoint refused once).
    log_refusal: bool,
}

/// A balancer's policy and ejection bookkeeping, kept under the balancer's lock.
#[derive(Debug)]
pub struct Detector {
    policy: Option<OutlierDetection>,
    /// When the failure percentages were last judged and the ejection counts last decayed.
    judged: Instant,
    /// Ready endpoints ejected or probing.
    held_out: usize,
    /// `held_out` as last added to the Service's ejected gauge.
    reported: i64,
}

impl Detector {
    pub fn new(now: Instant) -> Detector {
        Detector {
            policy: None,
            judged: now,
            held_out: 0,
            reported: 0,
        }
    }

    /// Takes `policy` (None: no ejection; every endpoint is readmitted, silently, since the
    /// policy that ejected it is gone). A changed policy keeps the ejections made under the
    /// previous one until they expire; a first one starts from zero counts (not from what was
    /// counted while nothing judged them).
    pub fn set_policy(
        &mut self,
        policy: Option<&OutlierDetection>,
        limits: &Limits,
        ready: &[Arc<EndpointLoad>],
        now: Instant,
    ) {
        if self.policy.as_ref() == policy {
            return;
        }
        let first = self.policy.is_none();
        if first {
            self.judged = now;
        }
        limits.set(policy);
        self.policy = policy.cloned();
        if first || policy.is_none() {
            for endpoint in ready {
                endpoint.health.reset();
            }
        }
        self.recount(ready);
    }

    /// The endpoints of `ready` the balancer may pick from now: the available ones, or all of
    /// them when fewer than `minHealthPercent` are healthy or none is available.
    pub fn candidates<'a>(
        &self,
        ready: &'a [Arc<EndpointLoad>],
    ) -> std::borrow::Cow<'a, [Arc<EndpointLoad>]> {
        let Some(policy) = &self.policy else {
            return ready.into();
        };
        if self.held_out == 0 {
            return ready.into();
        }
        let healthy = ready.len() - self.held_out;
        if (healthy as u64) * 100 < u64::from(policy.min_health_percent) * ready.len() as u64 {
            return ready.into();
        }
        let available: Vec<_> = ready
            .iter()
            .filter(|endpoint| endpoint.health.available(endpoint.pending()))
            .cloned()
            .collect();
        if available.is_empty() {
            return ready.into();
        }
        available.into()
    }

    /// Turns ejected endpoints whose time is over into probing ones and, once `interval` has
    /// passed, judges the failure percentages of the interval and decays the ejection counts.
    pub fn tick(&mut self, ready: &[Arc<EndpointLoad>], now: Instant, events: &Events) {
        let Some(policy) = &self.policy else {
            return;
        };
        if self.held_out > 0 {
            for endpoint in ready {
                let health = &endpoint.health;
                if health.mode.load(Ordering::Relaxed) != EJECTED {
                    continue;
                }
                let over = health
                    .ejection
                    .lock()
                    .is_ok_and(|ejection| ejection.until.is_none_or(|until| until <= now));
                if over {
                    health.mode.store(PROBING, Ordering::Relaxed);
                }
            }
        }
        let interval = policy.interval.max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.judged);
        if elapsed < interval {
            return;
        }
        let intervals = (elapsed.as_nanos() / interval.as_nanos()).min(u128::from(u32::MAX)) as u32;
        self.judged = interval
            .checked_mul(intervals)
            .and_then(|judged| self.judged.checked_add(judged))
            .unwrap_or(now);
        // Envoy's multiplier decay: one less per interval spent healthy.
        for endpoint in ready.iter().filter(|e| e.health.is_active()) {
            if let Ok(mut ejection) = endpoint.health.ejection.lock() {
                ejection.times = ejection.times.saturating_sub(intervals);
            }
        }
        let windows: Vec<(&Arc<EndpointLoad>, u32, u32)> = ready
            .iter()
            .map(|endpoint| {
                let health = &endpoint.health;
                (
                    endpoint,
                    health.window_requests.swap(0, Ordering::Relaxed),
                    health.window_failures.swap(0, Ordering::Relaxed),
                )
            })
            .collect();
        let Some(rate) = policy.failure_percentage.clone() else {
            return;
        };
        let judged: Vec<_> = windows
            .into_iter()
            .filter(|(endpoint, requests, _)| {
                endpoint.health.is_active() && *requests >= rate.request_volume.max(1)
            })
            .collect();
        if (judged.len() as u64) < u64::from(rate.minimum_hosts) {
            return;
        }
        for (endpoint, requests, failures) in judged {
            if u64::from(failures) * 100 >= u64::from(rate.threshold) * u64::from(requests) {
                let cause = Cause {
                    reason: Reason::Rate,
                    counts: format!("{failures} failures in {requests} requests"),
                    log_refusal: true,
                };
                self.eject(endpoint, &cause, ready, now, events);
            }
        }
    }

    /// Acts on a verdict of [`Health::count`] for `endpoint`.
    pub fn apply(
        &mut self,
        endpoint: &EndpointLoad,
        verdict: Verdict,
        ready: &[Arc<EndpointLoad>],
        now: Instant,
        events: &Events,
    ) {
        let health = &endpoint.health;
        match verdict {
            Verdict::Eject { reason, first } => {
                let cause = Cause {
                    reason,
                    counts: format!(
                        "{} failures in a row, {} gateway errors in a row",
                        health.consecutive_5xx.load(Ordering::Relaxed),
                        health.consecutive_gateway.load(Ordering::Relaxed)
                    ),
                    log_refusal: first,
                };
                self.eject(endpoint, &cause, ready, now, events);
            }
            Verdict::Readmit => {
                // Another report may have acted first.
                if health
                    .mode
                    .compare_exchange(PROBING, ACTIVE, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    return;
                }
                let times = health.ejection.lock().map_or(0, |ejection| ejection.times);
                info!(
                    service = %events.service,
                    endpoint = %endpoint.addr,
                    identity = %endpoint.id,
                    times_ejected = times,
                    "endpoint readmitted: a probe request succeeded"
                );
                events.readmissions.inc();
                self.recount(ready);
            }
        }
    }

    /// Ejects `endpoint` unless the bound refuses it (an active endpoint) or it is ejected
    /// already; a probing one is ejected again for longer.
    fn eject(
        &mut self,
        endpoint: &EndpointLoad,
        cause: &Cause,
        ready: &[Arc<EndpointLoad>],
        now: Instant,
        events: &Events,
    ) {
        let Some(policy) = &self.policy else {
            return;
        };
        let health = &endpoint.health;
        let in_ready = ready.iter().any(|e| std::ptr::eq(&**e, endpoint));
        match health.mode.load(Ordering::Relaxed) {
            // A draining endpoint gets no new requests anyway.
            _ if !in_ready => return,
            EJECTED => return,
            ACTIVE => {
                let total = ready.len() as u64;
                let held_out = self.held_out as u64;
                // Envoy's rule: allowed while fewer than maxEjectionPercent are out before it;
                // and never the last endpoint taking requests.
                let refused = if total - held_out <= 1 {
                    Some("it is the last endpoint taking requests")
                } else if held_out * 100 >= u64::from(policy.max_ejection_percent) * total {
                    Some("maxEjectionPercent of the endpoints are ejected already")
                } else {
                    None
                };
                if let Some(why) = refused {
                    if !cause.log_refusal {
                        return;
                    }
                    warn!(
                        service = %events.service,
                        endpoint = %endpoint.addr,
                        identity = %endpoint.id,
                        reason = cause.reason.label(),
                        counts = %cause.counts,
                        ejected = held_out,
                        endpoints = total,
                        "endpoint not ejected: {why}"
                    );
                    return;
                }
            }
            _ => {}
        }
        let Ok(mut ejection) = health.ejection.lock() else {
            return;
        };
        ejection.times = ejection.times.saturating_add(1);
        let cap = policy.max_ejection_time.max(policy.base_ejection_time);
        let duration = policy
            .base_ejection_time
            .saturating_mul(ejection.times)
            .min(cap);
        ejection.until = Some(now + duration);
        let times = ejection.times;
        drop(ejection);
        health.mode.store(EJECTED, Ordering::Relaxed);
        health.consecutive_5xx.store(0, Ordering::Relaxed);
        health.consecutive_gateway.store(0, Ordering::Relaxed);
        self.recount(ready);
        events.ejected(cause.reason);
        warn!(
            service = %events.service,
            endpoint = %endpoint.addr,
            identity = %endpoint.id,
            reason = cause.reason.label(),
            counts = %cause.counts,
            times_ejected = times,
            duration_ms = duration.as_millis() as u64,
            ejected = self.held_out,
            endpoints = ready.len(),
            "endpoint ejected"
        );
    }

    /// Counts the ready endpoints held out (after the ready set or a state changed).
    pub fn recount(&mut self, ready: &[Arc<EndpointLoad>]) {
        self.held_out = ready.iter().filter(|e| !e.health.is_active()).count();
    }

    /// Brings the Service's ejected gauge (shared by its ports' balancers) to this count.
    pub fn report(&mut self, gauge: &Gauge) {
        let held_out = self.held_out as i64;
        gauge.inc_by(held_out - self.reported);
        self.reported = held_out;
    }

    /// What this balancer last added to the ejected gauge (taken back when it is dropped).
    pub fn reported(&self) -> i64 {
        self.reported
    }
}
