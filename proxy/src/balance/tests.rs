use std::collections::BTreeMap;
use std::net::IpAddr;

use prometheus_client::registry::Registry;
use sigil_proxy_api::services::{Endpoint, Protocol};

use super::*;

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
    let balancer = balancers.get(&service(endpoints), &port());
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
    let balancer = balancers.get(&before, &port());
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
    let balancer = balancers.get(&after, &port());
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
    let balancer = balancers.get(&grown, &port());
    let counts = picks(&balancer, 100, |_| Duration::from_millis(1));
    assert!(counts[5] > 0, "{:?}", &counts[..6]);
    // Nothing ready: no pick.
    let none = service(vec![endpoint(1, false, false), endpoint(5, true, true)]);
    assert!(balancers.get(&none, &port()).pick().is_none());
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
