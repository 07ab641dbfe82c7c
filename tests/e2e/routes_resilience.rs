//! Failure handling of routes with real processes (issue 15), as root in network namespaces:
//! real sigil proxies, a real agent serving routes, `BackendPolicy` and `RateLimitPolicy` from
//! its `--policy-file`, echo backends whose faults the test turns on and off, `curl` as the
//! client, and the proxies' own /metrics. Sub-cases, in sequence on one topology:
//!
//! 1. retries hide 50% failures — when the operator allows the load: the route retries 503s
//!    and the Service's `BackendPolicy` sets `retryBudget.percent: 100` (a 20% budget cannot
//!    hide a 50% failure rate: hiding it takes about one retry per request);
//! 2. an outage stays within the **default** budget (20% of requests + 3/s over 10 s): retries
//!    never multiply the load on a Service that is down;
//! 3. an endpoint that always fails is ejected after `consecutive5xxErrors` failures, its
//!    ejection grows on the next one (`baseEjectionTime` × n), and it is readmitted by a
//!    successful probe once fixed (counted in `sigil_proxy_endpoint_*`);
//! 4. a route `timeouts.request` answers 504 in time, counted as such;
//! 5. a local rate limit admits R/s (+ burst) within 10% and answers the rest 429 with
//!    `Retry-After`, counted in `sigil_proxy_rate_limited_total`;
//! 6. a per-identity override gives its client its own rate while others get `identity`'s;
//! 7. a mirror gets copies of about the configured share, and its slowness never reaches the
//!    client.
//!
//! ```text
//!   clients a, b 198.18.61.1-2 (ns demo, two identities)   backends (proxy + echo :8080)
//!   flaky 198.18.60.201 → f1 f2    trio 198.18.60.202 → t1 t2 t3    limited 198.18.60.203 → l1
//!   shadow 198.18.60.204 → m1      node C 198.18.61.100
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use sigil_test_harness::netns::require_root;
use sigil_test_harness::routes::{
    DELAY_HEADER, HTTP_PORT, ManyAnswer, PodSpec, RoutesMesh, ServiceSpec, count_by_pod,
};

/// This module's namespaces are `sigil-rr-<pid>-*`.
const NETNS_PREFIX: &str = "sigil-rr";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 61, 100);
const FLAKY: &str = "198.18.60.201";
const TRIO: &str = "198.18.60.202";
const LIMITED: &str = "198.18.60.203";

const fn pod(name: &'static str, last: u8, id: &'static str) -> PodSpec {
    PodSpec {
        name,
        ip: Ipv4Addr::new(198, 18, 61, last),
        uid: 41700 + last as u32,
        id,
    }
}

const CLIENT_A: PodSpec = pod("a", 1, "spiffe://cluster.local/ns/demo/sa/client");
const CLIENT_B: PodSpec = pod("b", 2, "spiffe://cluster.local/ns/demo/sa/batch");
const BACKENDS: [PodSpec; 7] = [
    pod("f1", 11, "spiffe://cluster.local/ns/demo/sa/flaky"),
    pod("f2", 12, "spiffe://cluster.local/ns/demo/sa/flaky"),
    pod("t1", 21, "spiffe://cluster.local/ns/demo/sa/trio"),
    pod("t2", 22, "spiffe://cluster.local/ns/demo/sa/trio"),
    pod("t3", 23, "spiffe://cluster.local/ns/demo/sa/trio"),
    pod("l1", 31, "spiffe://cluster.local/ns/demo/sa/limited"),
    pod("m1", 41, "spiffe://cluster.local/ns/demo/sa/shadow"),
];

fn service(name: &'static str, ip: &str, endpoints: &[&'static str]) -> ServiceSpec {
    ServiceSpec {
        namespace: "demo",
        name,
        cluster_ip: ip.parse().unwrap(),
        ports: vec![("http", 80, HTTP_PORT, "http")],
        endpoints: endpoints.to_vec(),
    }
}

fn case(name: &str) {
    println!("== {name}");
}

/// Requests the echoes of `pods` have seen, in all.
fn seen(mesh: &RoutesMesh, pods: &[&str]) -> usize {
    pods.iter().map(|p| mesh.echo(p).count()).sum()
}

fn statuses(answers: &[ManyAnswer]) -> std::collections::BTreeMap<u16, usize> {
    let mut by_status = std::collections::BTreeMap::new();
    for answer in answers {
        *by_status.entry(answer.status).or_default() += 1;
    }
    by_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_retry_eject_time_out_rate_limit_and_mirror_with_real_processes() {
    require_root(
        "this test creates network namespaces, installs iptables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    let started = Instant::now();
    let mesh = RoutesMesh::start(
        NETNS_PREFIX,
        NODE_IP,
        &[CLIENT_A, CLIENT_B],
        &BACKENDS,
        vec![
            service("flaky", FLAKY, &["f1", "f2"]),
            service("trio", TRIO, &["t1", "t2", "t3"]),
            service("limited", LIMITED, &["l1"]),
            service("shadow", "198.18.60.204", &["m1"]),
        ],
    )
    .await;
    println!("topology up in {:?}", started.elapsed());

    retries_hide_half_failures(&mesh).await;
    outage_stays_within_default_budget(&mesh).await;
    ejection_and_readmission(&mesh).await;
    route_timeout(&mesh).await;
    rate_limit(&mesh).await;
    per_identity_override(&mesh).await;
    mirror(&mesh).await;
    println!("all resilience sub-cases passed in {:?}", started.elapsed());
}

const RETRY_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: flaky
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: flaky
  rules:
  - backendRefs:
    - name: flaky
      port: 80
    retry:
      codes: [503]
      attempts: 8
      backoff: 1ms
"#;

/// Requests of sub-cases 1 and 2.
const RETRY_REQUESTS: usize = 1000;

async fn retries_hide_half_failures(mesh: &RoutesMesh) {
    case(
        "1. retries hide 50% failures (route: codes [503], attempts 8; BackendPolicy \
         retryBudget.percent 100, minRetryRate 100/s; outlier detection off)",
    );
    let policy = format!(
        r#"{RETRY_ROUTE}---
apiVersion: sigil.dev/v1alpha1
kind: BackendPolicy
metadata:
  name: flaky
  namespace: demo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: flaky
  outlierDetection:
    consecutive5xxErrors: 0
  retryBudget:
    percent: 100
    interval: 10s
    minRetryRate:
      count: 100
      interval: 1s
"#
    );
    mesh.apply(&policy, &["a"]).await;
    for backend in ["f1", "f2"] {
        mesh.echo(backend).faults.fail(50, 503);
    }
    let before = seen(mesh, &["f1", "f2"]);
    let answers = mesh
        .client("a")
        .curl_many(&[], &format!("http://{FLAKY}/"), RETRY_REQUESTS)
        .await;
    let attempts = seen(mesh, &["f1", "f2"]) - before;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let success = ok as f64 / RETRY_REQUESTS as f64;
    println!(
        "  {RETRY_REQUESTS} GETs, each attempt failing 50%: {:.1}% succeeded (theory \
         1 - 0.5^9 = 99.8%); attempts/requests {:.2} (theory 2.0); statuses {:?}",
        100.0 * success,
        attempts as f64 / RETRY_REQUESTS as f64,
        statuses(&answers)
    );
    let sent = mesh
        .metric(
            "a",
            "sigil_proxy_retries_total",
            &[("service", "demo/flaky"), ("outcome", "sent")],
        )
        .await;
    println!("  sigil_proxy_retries_total{{outcome=\"sent\"}} {sent}");
    assert!(
        success >= 0.99,
        "retries must hide a 50% failure rate: {:.2}% succeeded{}",
        100.0 * success,
        mesh.recent_logs()
    );
    assert_eq!(
        sent as usize,
        attempts - RETRY_REQUESTS,
        "every retry the echoes saw is counted as sent"
    );
}

async fn outage_stays_within_default_budget(mesh: &RoutesMesh) {
    case(
        "2. an outage stays within the default retry budget (no BackendPolicy: 20% of \
         requests + 3/s over 10 s)",
    );
    mesh.apply(RETRY_ROUTE, &["a"]).await;
    for backend in ["f1", "f2"] {
        mesh.echo(backend).faults.fail(100, 503);
    }
    let before = seen(mesh, &["f1", "f2"]);
    let exhausted_before = mesh
        .metric(
            "a",
            "sigil_proxy_retries_total",
            &[("service", "demo/flaky"), ("outcome", "budget_exhausted")],
        )
        .await;
    let started = Instant::now();
    let answers = mesh
        .client("a")
        .curl_many(&[], &format!("http://{FLAKY}/"), RETRY_REQUESTS)
        .await;
    let took = started.elapsed();
    let attempts = seen(mesh, &["f1", "f2"]) - before;
    let retries = attempts - RETRY_REQUESTS;
    // Within one 10 s window: 20% of the originals plus 3/s × 10 s; a longer run adds 3/s of
    // its own; +1 for the one request in flight when the window is judged.
    let window = took.as_secs_f64().max(10.0).ceil();
    let bound = (0.2 * RETRY_REQUESTS as f64 + 3.0 * window + 1.0) as usize;
    let exhausted = mesh
        .metric(
            "a",
            "sigil_proxy_retries_total",
            &[("service", "demo/flaky"), ("outcome", "budget_exhausted")],
        )
        .await
        - exhausted_before;
    println!(
        "  {RETRY_REQUESTS} GETs in {took:?} against a Service answering 503 to all: \
         attempts/requests {:.2}, {retries} retries (bound {bound} = 20% × \
         {RETRY_REQUESTS} + 3/s × {window} s + 1), {exhausted} refused by the budget; \
         statuses {:?}",
        attempts as f64 / RETRY_REQUESTS as f64,
        statuses(&answers)
    );
    assert!(
        answers.iter().all(|a| a.status == 503),
        "the client gets the backend's own answer: {:?}",
        statuses(&answers)
    );
    assert!(
        retries <= bound,
        "{retries} retries, the default budget allows {bound}{}",
        mesh.recent_logs()
    );
    assert!(
        retries > 0,
        "the budget's minimum still lets a few retries through"
    );
    assert!(
        exhausted > 0.0,
        "refused retries are counted as budget_exhausted"
    );
    for backend in ["f1", "f2"] {
        mesh.echo(backend).faults.fail(0, 200);
    }
}

async fn ejection_and_readmission(mesh: &RoutesMesh) {
    case(
        "3. ejection after 3 consecutive 500s, growing ejection time, readmission by a probe \
         (BackendPolicy consecutive5xxErrors 3, baseEjectionTime 300ms, interval 200ms)",
    );
    mesh.apply(
        r#"apiVersion: sigil.dev/v1alpha1
kind: BackendPolicy
metadata:
  name: trio
  namespace: demo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: trio
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 200ms
    baseEjectionTime: 300ms
    maxEjectionPercent: 50
"#,
        &["a"],
    )
    .await;
    mesh.echo("t3").faults.fail(100, 500);
    let a = mesh.client("a");
    let url = format!("http://{TRIO}/");
    let eject_series = |reason| [("service", "demo/trio"), ("reason", reason)];
    // Steady traffic until t3 has failed 3 times, been ejected, and failed two probes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.echo("t3").count() < 5 {
        assert!(
            Instant::now() < deadline,
            "t3 got {} requests in 10 s of traffic{}",
            mesh.echo("t3").count(),
            mesh.recent_logs()
        );
        a.curl_many(&[], &url, 25).await;
    }
    let times: Vec<Instant> = mesh.echo("t3").seen().iter().map(|s| s.at).collect();
    // A probe goes out with the first request the balancer gives t3 after the ejection ends,
    // so each gap is at least the ejection time (base × n), not exactly it.
    let (first_ejection, second_ejection) = (times[3] - times[2], times[4] - times[3]);
    let ejections = mesh
        .metric(
            "a",
            "sigil_proxy_endpoint_ejections_total",
            &eject_series("consecutive"),
        )
        .await;
    let ejected_now = mesh
        .metric(
            "a",
            "sigil_proxy_balancer_endpoints",
            &[("service", "demo/trio"), ("state", "ejected")],
        )
        .await;
    println!(
        "  t3 (always 500): requests at +0, {:?}, {:?}, then a probe after {first_ejection:?} \
         and another after {second_ejection:?}; ejections_total {ejections}, ejected now \
         {ejected_now}",
        times[1] - times[0],
        times[2] - times[0],
    );
    assert!(
        first_ejection >= Duration::from_millis(300),
        "no traffic to t3 for baseEjectionTime after its 3rd failure: {first_ejection:?}"
    );
    assert!(
        second_ejection >= Duration::from_millis(600),
        "the second ejection lasts base × 2: {second_ejection:?} (the first {first_ejection:?})"
    );
    assert!(
        ejections >= 2.0,
        "ejections_total {ejections}{}",
        mesh.recent_logs()
    );

    mesh.echo("t3").faults.fail(0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        a.curl_many(&[], &url, 25).await;
        let readmitted = mesh
            .metric(
                "a",
                "sigil_proxy_endpoint_readmissions_total",
                &[("service", "demo/trio")],
            )
            .await;
        if readmitted >= 1.0 {
            println!("  t3 fixed: readmitted (readmissions_total {readmitted})");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "t3 never readmitted after it was fixed{}",
            mesh.recent_logs()
        );
    }
    let before = mesh.echo("t3").count();
    let answers = a.curl_many(&[], &url, 60).await;
    println!("  after readmission, by pod: {:?}", count_by_pod(&answers));
    assert!(
        answers.iter().all(|a| a.status == 200),
        "{:?}",
        statuses(&answers)
    );
    assert!(mesh.echo("t3").count() > before, "t3 gets traffic again");
}

async fn route_timeout(mesh: &RoutesMesh) {
    case("4. route timeouts.request 200ms against a backend answering after 2 s → 504");
    mesh.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: flaky-timeout
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: flaky
  rules:
  - backendRefs:
    - name: flaky
      port: 80
    timeouts:
      request: 200ms
"#,
        &["a"],
    )
    .await;
    let a = mesh.client("a");
    let delay = format!("{DELAY_HEADER}: 2000");
    let started = Instant::now();
    let answer = a.curl(&["-H", &delay], &format!("http://{FLAKY}/")).await;
    let took = started.elapsed();
    let counted = mesh
        .metric(
            "a",
            "sigil_proxy_requests_total",
            &[
                ("direction", "outbound"),
                ("route", "demo/flaky-timeout"),
                ("status_code", "504"),
                ("result", "timeout"),
            ],
        )
        .await;
    println!(
        "  {} after {took:?} (curl included), sigil-proxy-error {:?}; requests_total \
         {{direction=\"outbound\",route=\"demo/flaky-timeout\",status_code=\"504\",\
         result=\"timeout\"}} {counted}",
        answer.status,
        answer.headers.get("sigil-proxy-error")
    );
    assert_eq!(answer.status, 504, "{answer:?}{}", mesh.recent_logs());
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(600),
        "504 after {took:?}"
    );
    assert_eq!(
        counted, 1.0,
        "the timeout is counted as status 504, result timeout"
    );
}

/// The accepted count a token bucket of `rate`/s with `burst` allows over `seconds`.
fn allowed(rate: f64, burst: f64, seconds: f64) -> f64 {
    burst + rate * seconds
}

async fn rate_limit(mesh: &RoutesMesh) {
    case("5. RateLimitPolicy total 20/s burst 20 on `limited`, 3 s of 60 rps → 429s");
    mesh.apply(
        r#"apiVersion: sigil.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: limited
  namespace: demo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: limited
  total:
    requests: 20
    period: 1s
    burst: 20
"#,
        &["l1"],
    )
    .await;
    let started = Instant::now();
    let answers = mesh
        .client("a")
        .curl_many(&["--rate", "60/s"], &format!("http://{LIMITED}/"), 180)
        .await;
    let took = started.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|a| a.status == 200).count() as f64;
    let limited: Vec<&ManyAnswer> = answers.iter().filter(|a| a.status == 429).collect();
    let want = allowed(20.0, 20.0, took);
    let counted = mesh
        .metric(
            "l1",
            "sigil_proxy_rate_limited_total",
            &[
                ("service", "demo/limited"),
                ("policy", "demo/limited"),
                ("scope", "total"),
            ],
        )
        .await;
    println!(
        "  180 requests in {took:.2} s: {ok} admitted (20 + 20/s × {took:.2} s = {want:.0} \
         ± 10%), {} refused with 429 (Retry-After e.g. {:?}); rate_limited_total {counted}",
        limited.len(),
        limited.first().and_then(|a| a.retry_after.clone())
    );
    assert_eq!(
        ok as usize + limited.len(),
        180,
        "only 200s and 429s: {:?}",
        statuses(&answers)
    );
    assert!(
        (ok - want).abs() <= 0.1 * want,
        "{ok} admitted, want {want:.0} ± 10%{}",
        mesh.recent_logs()
    );
    assert!(
        limited.iter().all(|a| a
            .retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1))),
        "every 429 says Retry-After in whole seconds: {limited:?}"
    );
    assert_eq!(counted as usize, limited.len(), "every 429 is counted");
}

async fn per_identity_override(mesh: &RoutesMesh) {
    case(
        "6. per-identity limits: identity 10/s for every client, override 30/s for \
         demo/batch (client b); both send 60 rps for 2 s",
    );
    mesh.apply(
        r#"apiVersion: sigil.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: limited
  namespace: demo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: limited
  total:
    requests: 200
  identity:
    requests: 10
  overrides:
  - requests: 30
    clients:
    - spiffeId: spiffe://cluster.local/ns/demo/sa/batch
"#,
        &["l1"],
    )
    .await;
    let url = format!("http://{LIMITED}/");
    let started = Instant::now();
    let (from_a, from_b) = tokio::join!(
        mesh.client("a").curl_many(&["--rate", "60/s"], &url, 120),
        mesh.client("b").curl_many(&["--rate", "60/s"], &url, 120),
    );
    let took = started.elapsed().as_secs_f64();
    let ok = |answers: &[ManyAnswer]| answers.iter().filter(|a| a.status == 200).count() as f64;
    let (want_a, want_b) = (allowed(10.0, 10.0, took), allowed(30.0, 30.0, took));
    println!(
        "  {took:.2} s: a admitted {} (want {want_a:.0}), b admitted {} (want {want_b:.0}); \
         statuses a {:?}, b {:?}",
        ok(&from_a),
        ok(&from_b),
        statuses(&from_a),
        statuses(&from_b)
    );
    for (who, got, want) in [("a", ok(&from_a), want_a), ("b", ok(&from_b), want_b)] {
        assert!(
            (got - want).abs() <= 0.15 * want + 2.0,
            "{who}: {got} admitted, want {want:.0}{}",
            mesh.recent_logs()
        );
    }
    let by_scope = |scope| [("service", "demo/limited"), ("scope", scope)];
    let identity = mesh
        .metric(
            "l1",
            "sigil_proxy_rate_limited_total",
            &by_scope("identity"),
        )
        .await;
    let overridden = mesh
        .metric(
            "l1",
            "sigil_proxy_rate_limited_total",
            &by_scope("override"),
        )
        .await;
    println!("  rate_limited_total identity {identity}, override {overridden}");
    assert_eq!(identity as usize, 120 - ok(&from_a) as usize, "a's 429s");
    assert_eq!(overridden as usize, 120 - ok(&from_b) as usize, "b's 429s");
}

async fn mirror(mesh: &RoutesMesh) {
    case("7. RequestMirror 50% to a shadow answering after 2 s: the client never waits for it");
    mesh.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: flaky-mirror
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: flaky
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef:
          name: shadow
          port: 80
        percent: 50
    backendRefs:
    - name: flaky
      port: 80
"#,
        &["a"],
    )
    .await;
    mesh.echo("m1").faults.delay(Duration::from_secs(2));
    let before = mesh.echo("m1").count();
    let answers = mesh
        .client("a")
        .curl_many(&[], &format!("http://{FLAKY}/"), 200)
        .await;
    let mut times: Vec<Duration> = answers.iter().map(|a| a.time).collect();
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    // The copies go out beside the primaries; wait (8 s at most) for the share to be reached.
    let deadline = Instant::now() + Duration::from_secs(8);
    while mesh.echo("m1").count() - before < 70 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy counts a copy once the shadow has answered it (2 s later): wait for every copy
    // the shadow saw to be counted, and none to be lost on the way.
    let outcomes = async || {
        let mut counts = Vec::new();
        for outcome in ["sent", "dropped", "failed"] {
            let labels = [("service", "demo/shadow"), ("outcome", outcome)];
            let count = mesh
                .metric("a", "sigil_proxy_mirrored_requests_total", &labels)
                .await;
            counts.push((outcome, count as usize));
        }
        counts
    };
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut counted = outcomes().await;
    while counted.iter().map(|(_, n)| n).sum::<usize>() < mesh.echo("m1").count() - before
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        counted = outcomes().await;
    }
    let copies = mesh.echo("m1").count() - before;
    let share = copies as f64 / 200.0;
    println!(
        "  200 GETs: p99 {p99:?}, answered by {:?}; the shadow saw {copies} copies \
         ({:.0}%); mirrored_requests_total by outcome {counted:?}",
        count_by_pod(&answers),
        100.0 * share
    );
    assert!(
        answers
            .iter()
            .all(|a| a.status == 200 && a.pod.starts_with('f')),
        "every answer is the primary's: {:?}",
        count_by_pod(&answers)
    );
    assert!(
        p99 < Duration::from_millis(50),
        "the mirror's 2 s never reach the client: {p99:?}"
    );
    assert!(
        (0.35..=0.65).contains(&share),
        "the shadow saw {copies} of 200 copies, want about 50%{}",
        mesh.recent_logs()
    );
    assert_eq!(
        counted,
        [("sent", copies), ("dropped", 0), ("failed", 0)],
        "every copy the shadow saw is counted as sent, none lost"
    );
    mesh.echo("m1").faults.delay(Duration::ZERO);
}
