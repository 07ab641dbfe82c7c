use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use prometheus_client::registry::Registry;
use sigil_proxy_api::services::{Endpoint, Protocol};
use sigil_route::compiled::FailurePercentage;

use super::*;
use crate::metrics::EjectionLabels;

fn port() -> ServicePort {
    ServicePort {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Http1,
        app_protocol: None,
    }
}

fn endpoint(last: u8, ready: bool, terminating: bool) -> Endpoint {
    Endpoint {
        ip: IpAddr::from([198, 18, 0, last]),
        ports: BTreeMap::from([("http".to_owned(), 8080)]),
        id: format!("spiffe://cluster.local/ns/demo/sa/api-{last}")
            .parse()
            .unwrap(),
        ready,
        serving: ready,
        terminating,
        node: None,
        zone: None,
        source: "mesh-file".into(),
    }
}

fn service(endpoints: Vec<Endpoint>) -> Arc<MeshService> {
    Arc::new(MeshService {
        key: ServiceKey::new("demo", "api"),
        cluster_ips: vec![IpAddr::from([198, 19, 0, 10])],
        ports: vec![port()],
        endpoints,
    })
}

fn balancer(endpoints: Vec<Endpoint>) -> (Balancers, Arc<Balancer>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let balancers = Balancers::new(metrics.clone());
    let balancer = balancers.get(&service(endpoints), &port(), Family::V4);
    (balancers, balancer, metrics)
}

/// Picks `n` times, each request answered after the latency `rtt` gives its endpoint (simulated:
/// the observation is made directly), and counts the picks per endpoint's last address byte.
fn picks(balancer: &Balancer, n: usize, rtt: impl Fn(&EndpointLoad) -> Duration) -> [usize; 256] {
    let mut counts = [0; 256];
    for _ in 0..n {
        let pending = balancer.pick().expect("a ready endpoint");
        let endpoint = pending.endpoint().clone();
        let IpAddr::V4(ip) = endpoint.addr.ip() else {
            unreachable!()
        };
        counts[ip.octets()[3] as usize] += 1;
        endpoint.observe(rtt(&endpoint), Instant::now());
        drop(pending);
    }
    counts
}

#[test]
fn a_fast_endpoint_gets_far_more_than_a_slow_one() {
    let (_balancers, balancer, _) =
        balancer(vec![endpoint(1, true, false), endpoint(2, true, false)]);
    let counts = picks(&balancer, 2000, |e| {
        if e.addr.ip() == IpAddr::from([198, 18, 0, 2]) {
            Duration::from_millis(51)
        } else {
            Duration::from_millis(1)
        }
    });
    assert!(counts[1] > 1950, "fast {} slow {}", counts[1], counts[2]);
    assert!(counts[2] >= 1, "the slow one was measured at least once");
}

#[test]
fn equal_endpoints_share_evenly() {
    let (_balancers, balancer, _) = balancer(vec![
        endpoint(1, true, false),
        endpoint(2, true, false),
        endpoint(3, true, false),
    ]);
    // No latency observed: every endpoint keeps the default estimate.
    let mut counts = [0usize; 256];
    for _ in 0..3000 {
        let pending = balancer.pick().unwrap();
        let IpAddr::V4(ip) = pending.endpoint().addr.ip() else {
            unreachable!()
        };
        counts[ip.octets()[3] as usize] += 1;
    }
    for last in 1..=3 {
        assert!(
            (900..=1100).contains(&counts[last]),
            "endpoint {last}: {} of 3000 ({:?})",
            counts[last],
            &counts[1..=3]
        );
    }
}

#[test]
fn pending_requests_count_in_the_load() {
    let (_balancers, balancer, metrics) =
        balancer(vec![endpoint(1, true, false), endpoint(2, true, false)]);
    let held: Vec<Pending> = (0..5)
        .map(|_| balancer.pick().unwrap())
        .filter(|p| p.endpoint().addr.ip() == IpAddr::from([198, 18, 0, 1]))
        .collect();
    let busy = held.len();
    let pending_gauge = || {
        metrics
            .balancer_pending
            .get_or_create(&ServiceLabels {
                service: "demo/api".into(),
            })
            .get()
    };
    assert_eq!(pending_gauge(), busy as i64);
    if busy >= 2 {
        // Same latency: the endpoint with pending requests loses every comparison.
        for _ in 0..200 {
            let pending = balancer.pick().unwrap();
            assert_eq!(pending.endpoint().addr.ip(), IpAddr::from([198, 18, 0, 2]));
        }
    }
    drop(held);
    assert_eq!(pending_gauge(), 0);
    // Many held on one endpoint: new picks avoid it.
    let first = balancer.pick().unwrap();
    let loaded = first.endpoint().addr;
    let held: Vec<Pending> = (0..10)
        .filter_map(|_| balancer.pick())
        .filter(|p| p.endpoint().addr == loaded)
        .collect();
    for _ in 0..100 {
        assert_ne!(balancer.pick().unwrap().endpoint().addr, loaded);
    }
    drop((first, held));
}

#[test]
fn terminating_unready_and_removed_endpoints_get_nothing_new_but_finish() {
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let balancers = Balancers::new(metrics.clone());
    let gauge = |state| {
        metrics
            .balancer_endpoints
            .get_or_create(&EndpointLabels {
                service: "demo/api".into(),
                state,
            })
            .get()
    };
    let before = service(vec![
        endpoint(1, true, false),
        endpoint(2, true, false),
        endpoint(3, true, true),
        endpoint(4, false, false),
    ]);
    let balancer = balancers.get(&before, &port(), Family::V4);
    assert_eq!(balancer.ready().len(), 2);
    assert_eq!(gauge("ready"), 2);
    // Hold a request on each ready endpoint, then remove 2.
    let mut in_flight = Vec::new();
    while in_flight.len() < 2 {
        let pending = balancer.pick().unwrap();
        if !in_flight
            .iter()
            .any(|p: &Pending| p.endpoint().addr == pending.endpoint().addr)
        {
            in_flight.push(pending);
        }
    }
    let after = service(vec![endpoint(1, true, false), endpoint(3, true, true)]);
    let balancer = balancers.get(&after, &port(), Family::V4);
    for _ in 0..500 {
        let pending = balancer.pick().unwrap();
        assert_eq!(pending.endpoint().addr.ip(), IpAddr::from([198, 18, 0, 1]));
    }
    assert_eq!((gauge("ready"), gauge("draining")), (1, 1));
    // The removed endpoint's request is still counted until it is answered.
    let removed = in_flight
        .iter()
        .find(|p| p.endpoint().addr.ip() == IpAddr::from([198, 18, 0, 2]))
        .unwrap();
    assert_eq!(removed.endpoint().pending(), 1);
    drop(in_flight);
    drop(balancer.pick());
    assert_eq!((gauge("ready"), gauge("draining")), (1, 0));
    // A new endpoint is used from the next picks on.
    let grown = service(vec![endpoint(1, true, false), endpoint(5, true, false)]);
    let balancer = balancers.get(&grown, &port(), Family::V4);
    let counts = picks(&balancer, 100, |_| Duration::from_millis(1));
    assert!(counts[5] > 0, "{:?}", &counts[..6]);
    // Nothing ready: no pick.
    let none = service(vec![endpoint(1, false, false), endpoint(5, true, true)]);
    assert!(balancers.get(&none, &port(), Family::V4).pick().is_none());
}

#[test]
fn the_latency_estimate_takes_peaks_at_once_and_decays() {
    let start = Instant::now();
    let mut ewma = PeakEwma {
        estimate_ns: DEFAULT_RTT.as_nanos() as f64,
        measured: true,
        updated: start,
    };
    // A slower response raises the estimate by PEAK_STEP at most; the next ones reach it.
    ewma.observe(Duration::from_millis(100), start);
    assert_eq!(ewma.estimate_ns, 30e6 * PEAK_STEP);
    while ewma.estimate_ns < 100e6 {
        ewma.observe(Duration::from_millis(100), start);
    }
    assert_eq!(ewma.estimate_ns, 100e6);
    // A faster response DECAY later: weight 1/e on the old estimate.
    ewma.observe(Duration::from_millis(10), start + DECAY);
    // (The old estimate first decays to now, towards zero, then the response pulls it up.)
    let e = std::f64::consts::E;
    let expected = 100e6 / (e * e) + 10e6 * (1.0 - 1.0 / e);
    assert!((ewma.estimate_ns - expected).abs() < 1.0);
}

#[test]
fn one_slow_response_alone_does_not_sideline_an_endpoint() {
    let (_balancers, balancer, _) =
        balancer(vec![endpoint(1, true, false), endpoint(2, true, false)]);
    let start = Instant::now();
    // Both measured at 1 ms.
    for load in balancer.ready() {
        *load.rtt.lock().unwrap() = PeakEwma {
            estimate_ns: 1e6,
            measured: true,
            updated: start,
        };
    }
    let spiked = balancer.ready()[0].clone();
    spiked.observe(Duration::from_millis(40), start);
    // Within the tie of the others, not forty times theirs...
    assert!(spiked.estimate_ns(start) <= 1e6 * PEAK_STEP + 1.0);
    // ...and below the others (still answering in 1 ms) once a second has passed without a
    // response of its own.
    let later = start + DECAY;
    let other = balancer.ready()[1].clone();
    *other.rtt.lock().unwrap() = PeakEwma {
        estimate_ns: 1e6,
        measured: true,
        updated: later,
    };
    assert!(spiked.estimate_ns(later) < other.estimate_ns(later));
}

#[test]
fn an_endpoint_not_measured_yet_counts_as_the_mean_of_those_measured() {
    let (_balancers, balancer, _) = balancer(vec![
        endpoint(1, true, false),
        endpoint(2, true, false),
        endpoint(3, true, false),
    ]);
    // One endpoint answers in 1 ms; the others, at the 30 ms default, would lose every
    // comparison to it. Counted as its mean, they share the requests from the start.
    let counts = picks(&balancer, 300, |_| Duration::from_millis(1));
    for last in 1..=3 {
        assert!(
            (60..=140).contains(&counts[last]),
            "endpoint {last}: {:?}",
            &counts[1..=3]
        );
    }
}

// Outlier detection: time is injected (`pick_at`, `report_at`), so ejection times of minutes
// take no time.

/// Istio's defaults but 3 failures in a row and any share of the endpoints ejected.
fn policy() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: 3,
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    }
}

/// A balancer over `n` endpoints (198.18.0.1 and on) following `policy`, with its endpoints.
fn guarded(
    n: u8,
    policy: Option<&OutlierDetection>,
) -> (
    Balancers,
    Arc<Balancer>,
    Arc<Metrics>,
    Vec<Arc<EndpointLoad>>,
) {
    let (balancers, balancer, metrics) =
        balancer((1..=n).map(|last| endpoint(last, true, false)).collect());
    balancer.set_policy(policy);
    let ready = balancer.ready();
    (balancers, balancer, metrics, ready)
}

fn report(endpoint: &EndpointLoad, outcome: Outcome, times: usize, now: Instant) {
    for _ in 0..times {
        endpoint.report_at(outcome, now);
    }
}

const FAILURE: Outcome = Outcome::Failure { gateway: false };
const GATEWAY: Outcome = Outcome::Failure { gateway: true };

/// The last address bytes of the endpoints 300 picks at `now` chose (each answered at once).
fn chosen(balancer: &Balancer, now: Instant) -> BTreeSet<u8> {
    (0..300)
        .map(|_| {
            let pending = balancer.pick_at(now).expect("an endpoint");
            let IpAddr::V4(ip) = pending.endpoint().addr.ip() else {
                unreachable!()
            };
            ip.octets()[3]
        })
        .collect()
}

fn set(lasts: &[u8]) -> BTreeSet<u8> {
    lasts.iter().copied().collect()
}

fn ejections(metrics: &Metrics, reason: &'static str) -> u64 {
    metrics
        .endpoint_ejections
        .get_or_create(&EjectionLabels {
            service: "demo/api".into(),
            reason,
        })
        .get()
}

fn readmissions(metrics: &Metrics) -> u64 {
    metrics
        .endpoint_readmissions
        .get_or_create(&ServiceLabels {
            service: "demo/api".into(),
        })
        .get()
}

fn ejected_gauge(metrics: &Metrics) -> i64 {
    metrics
        .balancer_endpoints
        .get_or_create(&EndpointLabels {
            service: "demo/api".into(),
            state: "ejected",
        })
        .get()
}

#[test]
fn failures_in_a_row_eject_at_once_and_a_success_resets_the_count() {
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy()));
    let now = Instant::now();
    report(&ready[0], FAILURE, 2, now);
    report(&ready[0], Outcome::Success, 1, now);
    report(&ready[0], FAILURE, 2, now);
    assert!(ready[0].health.is_active(), "2 in a row after a success");
    assert_eq!(chosen(&balancer, now), set(&[1, 2, 3]));
    report(&ready[0], FAILURE, 1, now);
    assert!(!ready[0].health.is_active(), "the third in a row ejects");
    assert_eq!(chosen(&balancer, now), set(&[2, 3]));
    assert_eq!(ejections(&metrics, "consecutive"), 1);
    assert_eq!(ejected_gauge(&metrics), 1);
    // A connection failure is a failure too.
    report(&ready[1], Outcome::NoAnswer, 3, now);
    assert!(!ready[1].health.is_active());
    assert_eq!(ejections(&metrics, "consecutive"), 2);
}

#[test]
fn gateway_errors_in_a_row_eject_and_other_failures_break_the_row() {
    let policy = OutlierDetection {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 2,
        ..policy()
    };
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy));
    let now = Instant::now();
    report(&ready[0], FAILURE, 10, now);
    assert!(ready[0].health.is_active(), "500s are not gateway errors");
    report(&ready[0], GATEWAY, 1, now);
    report(&ready[0], FAILURE, 1, now);
    report(&ready[0], GATEWAY, 1, now);
    assert!(ready[0].health.is_active(), "a 500 ended the row");
    report(&ready[0], Outcome::NoAnswer, 1, now);
    assert!(
        !ready[0].health.is_active(),
        "a 502 then no answer: 2 in a row"
    );
    assert_eq!(ejections(&metrics, "gateway"), 1);
    assert_eq!(ejections(&metrics, "consecutive"), 0);
    assert_eq!(chosen(&balancer, now), set(&[2, 3]));
}

#[test]
fn the_failure_percentage_of_an_interval_ejects_once_enough_endpoints_had_the_volume() {
    let policy = OutlierDetection {
        consecutive_5xx_errors: 0,
        failure_percentage: Some(FailurePercentage {
            threshold: 50,
            request_volume: 10,
            minimum_hosts: 2,
        }),
        ..policy()
    };
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy));
    let start = Instant::now();
    let interval = policy.interval;
    // First interval: half of 10 fail (never twice in a row), but only one endpoint has the
    // volume.
    let half_failing = |now| {
        for _ in 0..5 {
            ready[0].report_at(FAILURE, now);
            ready[0].report_at(Outcome::Success, now);
        }
    };
    half_failing(start);
    report(&ready[1], Outcome::Success, 9, start);
    assert_eq!(chosen(&balancer, start + interval), set(&[1, 2, 3]));
    assert!(ready[0].health.is_active(), "minimumHosts not reached");
    // Second interval: two endpoints have the volume; judged only when it is over.
    half_failing(start + interval);
    report(&ready[1], FAILURE, 4, start + interval);
    report(&ready[1], Outcome::Success, 6, start + interval);
    balancer.pick_at(start + interval + interval / 2);
    assert!(
        ready[0].health.is_active(),
        "judged at the end of the interval"
    );
    assert_eq!(chosen(&balancer, start + interval * 2), set(&[2, 3]));
    assert!(ready[1].health.is_active(), "40% is below the threshold");
    assert_eq!(ejections(&metrics, "rate"), 1);
    // The counts start again each interval: 5 failures of 10 then 0 of 10 eject no one.
    report(&ready[1], FAILURE, 1, start + interval * 2);
    report(&ready[1], Outcome::Success, 9, start + interval * 2);
    report(&ready[2], Outcome::Success, 10, start + interval * 2);
    balancer.pick_at(start + interval * 3);
    assert!(ready[1].health.is_active());
    assert_eq!(ejections(&metrics, "rate"), 1);
}

#[test]
fn max_ejection_percent_bounds_ejections() {
    let policy = OutlierDetection {
        max_ejection_percent: 10,
        ..policy()
    };
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy));
    let now = Instant::now();
    report(&ready[0], FAILURE, 3, now);
    assert!(!ready[0].health.is_active(), "0% ejected before: allowed");
    report(&ready[1], FAILURE, 3, now);
    assert!(ready[1].health.is_active(), "33% ejected before: refused");
    // Refused, it is judged again at its next failure (and refused again).
    report(&ready[1], FAILURE, 1, now);
    assert!(ready[1].health.is_active());
    assert_eq!(ejections(&metrics, "consecutive"), 1);
    assert_eq!(ejected_gauge(&metrics), 1);
    assert_eq!(chosen(&balancer, now), set(&[2, 3]));
}

#[test]
fn the_last_endpoint_taking_requests_is_never_ejected() {
    let (_balancers, balancer, metrics, ready) = guarded(2, Some(&policy()));
    let now = Instant::now();
    report(&ready[0], FAILURE, 3, now);
    report(&ready[1], FAILURE, 30, now);
    assert!(!ready[0].health.is_active());
    assert!(ready[1].health.is_active());
    assert_eq!(ejections(&metrics, "consecutive"), 1);
    assert_eq!(chosen(&balancer, now), set(&[2]));
    // Alone, an endpoint cannot be ejected at all.
    let (_balancers, balancer, _, ready) = guarded(1, Some(&policy()));
    report(&ready[0], FAILURE, 30, now);
    assert!(ready[0].health.is_active());
    assert_eq!(chosen(&balancer, now), set(&[1]));
}

#[test]
fn below_min_health_percent_ejected_endpoints_are_used_again() {
    let policy = OutlierDetection {
        min_health_percent: 60,
        ..policy()
    };
    let (_balancers, balancer, _, ready) = guarded(4, Some(&policy));
    let now = Instant::now();
    report(&ready[0], FAILURE, 3, now);
    assert_eq!(chosen(&balancer, now), set(&[2, 3, 4]), "75% healthy");
    report(&ready[1], FAILURE, 3, now);
    assert!(!ready[1].health.is_active(), "ejected, though in panic");
    assert_eq!(
        chosen(&balancer, now),
        set(&[1, 2, 3, 4]),
        "50% healthy: panic"
    );
}

/// Whether `balancer` picks `endpoint` at `now` (in 300 picks, each answered at once).
fn offered(balancer: &Balancer, endpoint: &EndpointLoad, now: Instant) -> bool {
    (0..300).any(|_| balancer.pick_at(now).unwrap().endpoint().addr == endpoint.addr)
}

#[test]
fn ejection_time_grows_with_each_ejection_up_to_the_maximum() {
    let policy = OutlierDetection {
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(70),
        ..policy()
    };
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy));
    let failing = &ready[0];
    let mut at = Instant::now();
    report(failing, FAILURE, 3, at);
    // 30 s, then a failed probe 60 s, then 90 s capped to 70 s, then 70 s.
    for (times, seconds) in [(1, 30), (2, 60), (3, 70), (4, 70)] {
        assert_eq!(failing.health.times(), times);
        let out = Duration::from_secs(seconds);
        assert!(!offered(
            &balancer,
            failing,
            at + out - Duration::from_millis(1)
        ));
        at += out;
        assert!(offered(&balancer, failing, at), "probing after {seconds} s");
        report(failing, FAILURE, 1, at);
        assert!(!failing.health.is_active(), "a failed probe ejects again");
    }
    assert_eq!(ejections(&metrics, "consecutive"), 5);
    assert_eq!(readmissions(&metrics), 0);
    assert_eq!(ejected_gauge(&metrics), 1);
}

#[test]
fn a_probing_endpoint_gets_one_request_at_a_time_until_one_succeeds() {
    let (_balancers, balancer, metrics, ready) = guarded(3, Some(&policy()));
    let probing = &ready[0];
    let start = Instant::now();
    report(probing, FAILURE, 3, start);
    let at = start + policy().base_ejection_time;
    let probe = (0..300)
        .map(|_| balancer.pick_at(at).unwrap())
        .find(|pending| pending.endpoint().addr == probing.addr)
        .expect("the probing endpoint is offered");
    assert!(!offered(&balancer, probing, at), "one probe at a time");
    assert_eq!(
        ejected_gauge(&metrics),
        1,
        "probing still counts as ejected"
    );
    probing.report_at(Outcome::Success, at);
    drop(probe);
    assert!(probing.health.is_active());
    assert_eq!(readmissions(&metrics), 1);
    assert_eq!(ejected_gauge(&metrics), 0);
    // Readmitted: it takes many requests at once again.
    let held: Vec<Pending> = (0..300)
        .map(|_| balancer.pick_at(at).unwrap())
        .filter(|pending| pending.endpoint().addr == probing.addr)
        .collect();
    assert!(held.len() >= 2, "{} requests", held.len());
}

#[test]
fn each_healthy_interval_takes_one_off_the_ejection_count() {
    let (_balancers, balancer, _, ready) = guarded(3, Some(&policy()));
    let endpoint = &ready[0];
    let interval = policy().interval;
    let mut at = Instant::now();
    // Ejected twice in a row: n = 2.
    report(endpoint, FAILURE, 3, at);
    at += policy().base_ejection_time;
    balancer.pick_at(at);
    report(endpoint, FAILURE, 1, at);
    at += policy().base_ejection_time * 2;
    balancer.pick_at(at);
    report(endpoint, Outcome::Success, 1, at);
    assert!(endpoint.health.is_active());
    assert_eq!(endpoint.health.times(), 2);
    // Judged once per interval while traffic flows.
    at += interval;
    balancer.pick_at(at);
    assert_eq!(endpoint.health.times(), 1);
    // Ejected again now it is out for base × 2, not base × 3.
    report(endpoint, FAILURE, 3, at);
    assert_eq!(endpoint.health.times(), 2);
    let out = policy().base_ejection_time * 2;
    assert!(!offered(
        &balancer,
        endpoint,
        at + out - Duration::from_millis(1)
    ));
    assert!(offered(&balancer, endpoint, at + out));
    // Readmitted and healthy for two intervals: back to 0.
    report(endpoint, Outcome::Success, 1, at + out);
    balancer.pick_at(at + out + interval);
    balancer.pick_at(at + out + interval * 2);
    assert_eq!(endpoint.health.times(), 0);
}

#[test]
fn without_a_policy_no_endpoint_is_ejected() {
    let (_balancers, balancer, metrics, ready) = guarded(3, None);
    let now = Instant::now();
    report(&ready[0], Outcome::NoAnswer, 100, now);
    report(&ready[1], GATEWAY, 100, now);
    assert!(ready.iter().all(|endpoint| endpoint.health.is_active()));
    assert_eq!(
        chosen(&balancer, now + Duration::from_secs(60)),
        set(&[1, 2, 3])
    );
    for reason in ["consecutive", "gateway", "rate"] {
        assert_eq!(ejections(&metrics, reason), 0);
    }
}

/// Routes giving demo/api `outlier_detection`.
fn routes(outlier_detection: Option<OutlierDetection>) -> Arc<RouteTable> {
    let service = ServiceRef {
        namespace: "demo".into(),
        name: "api".into(),
    };
    let policy = sigil_route::BackendPolicy {
        service: service.clone(),
        source: "demo/api".into(),
        outlier_detection,
        retry_budget: sigil_route::RetryBudget::default(),
    };
    let mut table = RouteTable::default();
    table.routes.backends.insert(service, Arc::new(policy));
    Arc::new(table)
}

#[tokio::test]
async fn a_policy_from_the_routes_applies_to_existing_and_new_balancers_and_follows_changes() {
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let balancers = Arc::new(Balancers::new(metrics.clone()));
    let api = service((1..=3).map(|last| endpoint(last, true, false)).collect());
    let balancer = balancers.get(&api, &port(), Family::V4);
    let ready = balancer.ready();
    let (services_tx, services_rx) = watch::channel(None);
    let (routes_tx, routes_rx) = watch::channel(None);
    let following = tokio::spawn(balancers.clone().follow(services_rx, routes_rx));
    let now = Instant::now();
    report(&ready[0], FAILURE, 5, now);
    assert!(ready[0].health.is_active(), "no routes yet: no policy");
    let two_in_a_row = OutlierDetection {
        consecutive_5xx_errors: 2,
        ..policy()
    };
    routes_tx.send_replace(Some(routes(Some(two_in_a_row.clone()))));
    // The follower runs on this thread: let it take the table.
    while balancer.limits.consecutive_5xx() != 2 {
        tokio::task::yield_now().await;
    }
    report(&ready[0], FAILURE, 2, now);
    assert!(!ready[0].health.is_active(), "the policy applies");
    // A balancer made later (another port) takes the current policy.
    let other = ServicePort {
        name: "admin".into(),
        port: 81,
        ..port()
    };
    let mut admin = (*api).clone();
    admin.ports.push(other.clone());
    for endpoint in &mut admin.endpoints {
        endpoint.ports.insert("admin".into(), 9090);
    }
    let later = balancers.get(&Arc::new(admin), &other, Family::V4);
    let later_ready = later.ready();
    report(&later_ready[0], FAILURE, 2, now);
    assert!(!later_ready[0].health.is_active());
    // The policy removed: ejected endpoints are taken back, nothing is ejected any more.
    routes_tx.send_replace(Some(routes(None)));
    while balancer.limits.consecutive_5xx() != 0 {
        tokio::task::yield_now().await;
    }
    assert!(ready[0].health.is_active());
    assert!(later_ready[0].health.is_active());
    assert_eq!(ejected_gauge(&metrics), 0);
    report(&ready[1], FAILURE, 10, now);
    assert!(ready[1].health.is_active());
    assert_eq!(chosen(&balancer, now), set(&[1, 2, 3]));
    drop(services_tx);
    following.await.unwrap();
}

#[test]
fn responses_are_classed_as_istio_and_the_design_say() {
    let cases = [
        (200, None, Outcome::Success),
        (404, None, Outcome::Success),
        (500, None, FAILURE),
        (501, None, FAILURE),
        (502, None, GATEWAY),
        (503, None, GATEWAY),
        (504, None, GATEWAY),
        // gRPC: UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS fail; DEADLINE_EXCEEDED and
        // PERMISSION_DENIED do not (the caller's doing as often as not).
        (200, Some(0), Outcome::Success),
        (200, Some(2), FAILURE),
        (200, Some(13), FAILURE),
        (200, Some(14), FAILURE),
        (200, Some(15), FAILURE),
        (200, Some(4), Outcome::Success),
        (200, Some(7), Outcome::Success),
    ];
    for (status, grpc_status, outcome) in cases {
        assert_eq!(
            Outcome::of_response(status, grpc_status),
            outcome,
            "{status} {grpc_status:?}"
        );
    }
}
