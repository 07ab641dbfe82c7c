//! Per-request load balancing end to end (issue 14), as root, in network namespaces this test
//! creates and deletes (pass or fail), with a real Prometheus scraping the proxies. A client pod
//! A and backend pods B1..B4 on one node (C), a Service `demo/api` at cluster IP
//! 198.19.0.10:80 that C routes as kube-proxy's iptables mode does (a random backend per
//! connection), and the same Service in the agent's `--mesh-file`. It proves that:
//!
//! a. without proxies, one HTTP/2 connection and one HTTP/1.1 keep-alive connection to the
//!    cluster IP each land all their requests on one backend (kube-proxy balances connections:
//!    many connections do reach every backend);
//! b. with the proxies, the same two clients' requests are spread over the three backends
//!    (a third each, within [`SHARE_TOLERANCE`]), sent over mTLS to each endpoint, and the
//!    HTTP/1.1 client's requests reach the apps as HTTP/1.1;
//! c. a backend whose app answers 50 ms late gets a small share of concurrent requests;
//! d. while requests flow on long-lived connections, a backend marked terminating (then
//!    removed) gets no new request once what it had is answered, a backend added starts getting
//!    them, and no request fails;
//! e. every backend's proxy names A's identity as the peer of each request, and A's proxy names
//!    each backend's own identity;
//!
//! and that Prometheus, scraping every proxy's /metrics at `<pod IP>:15020`, counts outbound
//! requests by status exactly as the client received them, and computes a p99 latency from the
//! request duration histogram.
//!
//! ```text
//!   pod A 198.18.3.1            pods B1..B4 198.18.3.11..14
//!   hyper client (root)         app :8080 (HTTP/1.1 and h2c), answers its name
//!   sigil proxy (CLIENT)        sigil proxy (API_B1..API_B4), --access-log
//!        │ eth0                        │ eth0
//!        └────────── br0 in C 198.18.3.100 ──────────┘
//!                    KUBE-SVC/KUBE-SEP rules for 198.19.0.10:80 → B:8080
//!                    Prometheus on 198.18.3.100:9090
//! ```
//!
//! The CA and the agent (unix attestor: each pod's proxy uid is its own identity) run in the
//! host's namespace, as in tests/e2e/proxy_netns.rs. The apps and the client are sockets of the
//! test process created inside the pods' namespaces; the client makes exactly one connection
//! per run.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sigil_test_harness::netns::{
    ClusterIpService, METRICS_PORT, Netns, Node, PodProxy, Prometheus, connect_in, proxy_init,
    require_root,
};
use sigil_test_harness::{MeshHost, serve_h1_or_h2};
use tokio::task::JoinHandle;

/// This test's namespaces are `sigil-bal-<pid>-{c,a,b1..b4}`.
const NETNS_PREFIX: &str = "sigil-bal";
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 100);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
/// A's proxy uid, attested as [`CLIENT_ID`].
const A_UID: u32 = 41261;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// The Service's cluster IP (198.19.0.0/16, the second half of 198.18.0.0/15) and port.
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
/// The backends' app port, the Service's targetPort.
const APP_PORT: u16 = 8080;
/// The Service as the mesh file names it, and as the proxy's metrics label it.
const SERVICE: &str = "demo/api";
/// Requests per client in phases a and b.
const REQUESTS: usize = 3000;
/// Connections (one request each) that show the node's per-connection balancing in phase a.
const SPREAD_CONNECTIONS: usize = 60;
/// Requests in phase c, and how many are in flight at once.
const SLOW_REQUESTS: usize = 1000;
const IN_FLIGHT: usize = 8;
/// How late the slow backend's app answers in phase c.
const SLOW_DELAY: Duration = Duration::from_millis(50);
/// The most the slow backend may get in phase c.
const SLOW_MAX_SHARE: f64 = 0.15;
/// How far (in shares, i.e. percentage points / 100) each backend may be from a third in b.
const SHARE_TOLERANCE: f64 = 0.10;
/// Concurrent HTTP/2 requests of the steady load in phase d (besides one HTTP/1.1 client).
const STEADY_H2_WORKERS: usize = 3;

/// A backend pod: its name (what its app answers), address, proxy uid and identity.
#[derive(Clone, Copy)]
struct BackendSpec {
    name: &'static str,
    ip: Ipv4Addr,
    uid: u32,
    id: &'static str,
}

const BACKENDS: [BackendSpec; 4] = [
    BackendSpec {
        name: "b1",
        ip: Ipv4Addr::new(198, 18, 3, 11),
        uid: 41262,
        id: "spiffe://cluster.local/ns/demo/sa/api-b1",
    },
    BackendSpec {
        name: "b2",
        ip: Ipv4Addr::new(198, 18, 3, 12),
        uid: 41263,
        id: "spiffe://cluster.local/ns/demo/sa/api-b2",
    },
    BackendSpec {
        name: "b3",
        ip: Ipv4Addr::new(198, 18, 3, 13),
        uid: 41264,
        id: "spiffe://cluster.local/ns/demo/sa/api-b3",
    },
    BackendSpec {
        name: "b4",
        ip: Ipv4Addr::new(198, 18, 3, 14),
        uid: 41265,
        id: "spiffe://cluster.local/ns/demo/sa/api-b4",
    },
];

/// An endpoint of the Service in the mesh file.
#[derive(Clone, Copy)]
enum EndpointState {
    Ready,
    Terminating,
}

/// Writes the mesh file (every pod a member; the Service with `endpoints`) by replacing it, so
/// that the agent never reads half of it.
fn write_mesh_file(path: &Path, endpoints: &[(BackendSpec, EndpointState)]) {
    let mut yaml = format!("members:\n- {{ip: {A_IP}, id: \"{CLIENT_ID}\"}}\n");
    for backend in BACKENDS {
        yaml.push_str(&format!(
            "- {{ip: {}, id: \"{}\"}}\n",
            backend.ip, backend.id
        ));
    }
    yaml.push_str(&format!(
        "services:\n\
         - namespace: demo\n  \
           name: api\n  \
           clusterIPs: [{}]\n  \
           ports:\n  \
           - {{name: http, port: {}, targetPort: {APP_PORT}, appProtocol: http}}\n  \
           endpoints:\n",
        CLUSTER_IP.ip(),
        CLUSTER_IP.port()
    ));
    for (backend, state) in endpoints {
        match state {
            EndpointState::Ready => yaml.push_str(&format!("  - {{ip: {}}}\n", backend.ip)),
            EndpointState::Terminating => yaml.push_str(&format!(
                "  - {{ip: {}, ready: false, terminating: true}}\n",
                backend.ip
            )),
        }
    }
    let next = path.with_extension("next");
    std::fs::write(&next, yaml).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// What a backend's app has seen: connections accepted, requests by HTTP version.
#[derive(Clone, Debug, Default)]
struct AppRecord {
    connections: usize,
    versions: BTreeMap<String, usize>,
}

impl AppRecord {
    fn requests(&self) -> usize {
        self.versions.values().sum()
    }
}

/// A backend's application on `0.0.0.0:8080` in its pod: HTTP/1.1 and h2c on one port, every
/// answer `200` with the app's name as the body, after a delay the test can change. Stops
/// accepting on drop.
struct NamedApp {
    delay_ms: Arc<AtomicU64>,
    record: Arc<Mutex<AppRecord>>,
    task: JoinHandle<()>,
}

impl NamedApp {
    fn start(pod: &Netns, name: &'static str) -> NamedApp {
        let listener = pod.listen(APP_PORT);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let record = Arc::new(Mutex::new(AppRecord::default()));
        let (delay, seen) = (delay_ms.clone(), record.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // As Go's and most servers' sockets: no Nagle delay on small answers.
                let _ = stream.set_nodelay(true);
                seen.lock().unwrap().connections += 1;
                let (delay, seen) = (delay.clone(), seen.clone());
                tokio::spawn(serve_h1_or_h2(stream, move |request| {
                    *seen
                        .lock()
                        .unwrap()
                        .versions
                        .entry(format!("{:?}", request.version()))
                        .or_default() += 1;
                    let delay = Duration::from_millis(delay.load(Ordering::Relaxed));
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        hyper::Response::new(Full::new(Bytes::from_static(name.as_bytes())))
                    }
                }));
            }
        });
        NamedApp {
            delay_ms,
            record,
            task,
        }
    }

    fn record(&self) -> AppRecord {
        self.record.lock().unwrap().clone()
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for NamedApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Tells the steady load's workers to stop when dropped: when phase d ends, or fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A backend pod with its app and (from phase b) its proxy.
struct Backend {
    spec: BackendSpec,
    pod: Netns,
    app: NamedApp,
    proxy: Option<PodProxy>,
}

/// Which HTTP version the client speaks to the cluster IP.
#[derive(Clone, Copy, Debug)]
enum Http {
    H1,
    H2,
}

/// A client on exactly one TCP connection from A to the cluster IP (HTTP/1.1 keep-alive, or
/// HTTP/2 with prior knowledge); clones share the connection (HTTP/1.1 requests take turns).
#[derive(Clone)]
enum Client {
    H1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One request's result: the backend that answered, or what went wrong; and its latency.
struct Outcome {
    answer: Result<String, String>,
    latency: Duration,
}

impl Client {
    async fn connect(a: &Netns, http: Http) -> Client {
        let stream = connect_in(&a.name, CLUSTER_IP.into())
            .await
            .unwrap_or_else(|e| panic!("connecting from A to {CLUSTER_IP}: {e}"));
        // As Go's and most HTTP clients' sockets: no Nagle delay on small requests.
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let io = TokioIo::new(stream);
        match http {
            Http::H1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("HTTP/1.1 handshake");
                tokio::spawn(connection);
                Client::H1(Arc::new(tokio::sync::Mutex::new(sender)))
            }
            Http::H2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .expect("HTTP/2 handshake");
                tokio::spawn(connection);
                Client::H2(sender)
            }
        }
    }

    /// One GET; Ok(the body) on a 200, else Err(status and body, or the error). `statuses`
    /// counts every answer, whatever its status.
    async fn get(&self, statuses: &Mutex<BTreeMap<u16, u64>>) -> Outcome {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let response = match self {
                Client::H1(sender) => {
                    let mut sender = sender.lock().await;
                    let request = hyper::Request::get("/")
                        .header("host", CLUSTER_IP.ip().to_string())
                        .body(Empty::new())
                        .unwrap();
                    sender.ready().await.map_err(|e| e.to_string())?;
                    sender.send_request(request).await
                }
                Client::H2(sender) => {
                    let request = hyper::Request::get(format!("http://{}/", CLUSTER_IP.ip()))
                        .body(Empty::new())
                        .unwrap();
                    sender.clone().send_request(request).await
                }
            }
            .map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            *statuses.lock().unwrap().entry(status).or_default() += 1;
            let headers = format!("{:?}", response.headers());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{status}, body: {e:?}"))?
                .to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            if status == 200 {
                Ok(body)
            } else {
                Err(format!("{status} {headers} {body}"))
            }
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()));
        Outcome {
            answer,
            latency: started.elapsed(),
        }
    }

    /// `count` GETs, `in_flight` at a time.
    async fn load(
        &self,
        count: usize,
        in_flight: usize,
        statuses: &Mutex<BTreeMap<u16, u64>>,
    ) -> Vec<Outcome> {
        futures::stream::iter(0..count)
            .map(|_| self.get(statuses))
            .buffer_unordered(in_flight)
            .collect()
            .await
    }
}

/// Requests per backend (by the name it answered), and the failures.
fn tally(outcomes: &[Outcome]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut by_backend = BTreeMap::new();
    let mut failures = Vec::new();
    for outcome in outcomes {
        match &outcome.answer {
            Ok(name) => *by_backend.entry(name.clone()).or_default() += 1,
            Err(why) => failures.push(why.clone()),
        }
    }
    (by_backend, failures)
}

/// Prints `backend → requests (share)` for one run, with each backend's latencies as the client
/// saw them: its first request's (which may include connecting to it), median and slowest.
fn print_table(title: &str, by_backend: &BTreeMap<String, usize>, outcomes: &[Outcome]) {
    let total: usize = by_backend.values().sum();
    println!("{title}: {total} requests");
    println!("  backend  requests   share     first       p50       max");
    for (backend, count) in by_backend {
        let latencies: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.answer.as_deref() == Ok(backend.as_str()))
            .collect();
        let first = latencies.first().map(|o| o.latency).unwrap_or_default();
        let max = latencies
            .iter()
            .map(|o| o.latency)
            .max()
            .unwrap_or_default();
        let median = quantile(&latencies, 0.5);
        println!(
            "  {backend:<7}  {count:>8}  {:>5.1}%  {:>8.2?}  {:>8.2?}  {:>8.2?}",
            100.0 * *count as f64 / total.max(1) as f64,
            first,
            median,
            max
        );
    }
}

/// The latency at quantile `q` of the outcomes.
fn quantile<O: std::borrow::Borrow<Outcome>>(outcomes: &[O], q: f64) -> Duration {
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.borrow().latency).collect();
    latencies.sort();
    let index = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
    latencies.get(index).copied().unwrap_or_default()
}

/// The last `count` lines of a log that are not access-log lines (those are thousands).
fn tail(log: &str, count: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("\"sigil_access\""))
        .collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// What every failure message ends with: the recent log lines of the agent and every proxy.
fn recent_logs(host: &MeshHost, a_proxy: Option<&PodProxy>, backends: &[Backend]) -> String {
    let mut out = format!("\n--- agent:\n{}", tail(&host.agent.logs(), 30));
    if let Some(proxy) = a_proxy {
        out.push_str(&format!("\n--- A's proxy:\n{}", tail(&proxy.logs(), 40)));
    }
    for backend in backends {
        if let Some(proxy) = &backend.proxy {
            out.push_str(&format!(
                "\n--- {}'s proxy:\n{}",
                backend.spec.name,
                tail(&proxy.logs(), 20)
            ));
        }
    }
    out
}

/// Waits until A's proxy has `ready` ready endpoints for the Service and, if given, `draining`
/// draining ones.
async fn wait_for_endpoints(
    a_proxy: &PodProxy,
    ready: f64,
    draining: Option<f64>,
    what: &str,
    logs: impl Fn() -> String,
) {
    let ready_series =
        format!("sigil_proxy_balancer_endpoints{{service=\"{SERVICE}\",state=\"ready\"}}");
    let draining_series =
        format!("sigil_proxy_balancer_endpoints{{service=\"{SERVICE}\",state=\"draining\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = (
            a_proxy.metric(&ready_series).await,
            a_proxy.metric(&draining_series).await,
        );
        if now.0 == ready && draining.is_none_or(|draining| now.1 == draining) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: A's proxy never had {ready} ready and {draining:?} draining endpoints of \
             {SERVICE} (has {now:?}){}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until Prometheus has scraped A's proxy after the last request: its outbound requests
/// by status equal what the client received, and (each backend proxy counting what it
/// answered) so do the inbound ones; then checks that it computes a p99 latency. Prints both.
async fn check_prometheus(
    prometheus: &Prometheus,
    received: &BTreeMap<u16, u64>,
    logs: impl Fn() -> String,
) {
    let expected: BTreeMap<String, f64> = received
        .iter()
        .map(|(status, count)| (status.to_string(), *count as f64))
        .collect();
    let by_status = |direction: &'static str| async move {
        prometheus
            .query(&format!(
                "sum by (status_code) (sigil_proxy_requests_total{{direction=\"{direction}\"}})"
            ))
            .await
            .into_iter()
            .map(|(labels, value)| {
                (
                    labels["status_code"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    value,
                )
            })
            .collect::<BTreeMap<String, f64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let outbound = by_status("outbound").await;
        let inbound = by_status("inbound").await;
        if outbound == expected && inbound == expected {
            println!("Prometheus: requests by status, outbound and inbound: {outbound:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus's requests by status: outbound {outbound:?}, inbound {inbound:?}; the \
             client received {expected:?}{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let p99 = prometheus
        .query(
            "histogram_quantile(0.99, sum by (le) \
             (rate(sigil_proxy_request_duration_seconds_bucket[1m])))",
        )
        .await;
    assert!(
        matches!(p99.as_slice(), [(_, value)] if value.is_finite() && *value > 0.0),
        "Prometheus's p99 request duration: {p99:?}{}",
        logs()
    );
    println!("Prometheus: p99 request duration {:.4} s", p99[0].1);
}

/// Stable order of counts by backend name, including backends that got none.
fn counts_of(backends: &[Backend], records: &[AppRecord]) -> BTreeMap<String, usize> {
    backends
        .iter()
        .zip(records)
        .map(|(b, r)| (b.spec.name.to_owned(), r.requests()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_balance_each_request_over_a_services_endpoints() {
    require_root(
        "this test creates network namespaces, installs iptables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    let initial: Vec<(BackendSpec, EndpointState)> = BACKENDS[..3]
        .iter()
        .map(|b| (*b, EndpointState::Ready))
        .collect();
    write_mesh_file(&mesh_file, &initial);
    let node = Node::new(NETNS_PREFIX, C_IP);
    let a = node.add_pod("a", A_IP);
    let mut backends: Vec<Backend> = BACKENDS
        .iter()
        .map(|spec| {
            let pod = node.add_pod(spec.name, spec.ip);
            let app = NamedApp::start(&pod, spec.name);
            Backend {
                spec: *spec,
                pod,
                app,
                proxy: None,
            }
        })
        .collect();
    let service = ClusterIpService::new(
        &node,
        "API",
        CLUSTER_IP,
        APP_PORT,
        &BACKENDS[..3].iter().map(|b| b.ip).collect::<Vec<_>>(),
    );

    // a. No proxies yet (no `proxy init` rules either): the node's DNAT picks a backend per
    // connection, so each client's one connection sends all of its requests to one backend.
    let unproxied = Mutex::new(BTreeMap::new());
    for http in [Http::H2, Http::H1] {
        let before: Vec<AppRecord> = backends.iter().map(|b| b.app.record()).collect();
        let client = Client::connect(&a, http).await;
        let outcomes = client.load(REQUESTS, 1, &unproxied).await;
        drop(client);
        let (by_backend, failures) = tally(&outcomes);
        print_table(
            &format!("a. without proxies, {http:?}"),
            &by_backend,
            &outcomes,
        );
        assert!(failures.is_empty(), "{http:?}: {failures:?}");
        assert_eq!(
            by_backend.values().copied().collect::<Vec<_>>(),
            [REQUESTS],
            "{http:?} without proxies: one connection, one backend"
        );
        let connections: usize = backends
            .iter()
            .zip(&before)
            .map(|(b, before)| b.app.record().connections - before.connections)
            .sum();
        assert_eq!(connections, 1, "{http:?}: the apps accepted {connections}");
    }
    // The node does balance connections: many of them reach every backend.
    let mut outcomes = Vec::new();
    for _ in 0..SPREAD_CONNECTIONS {
        outcomes.push(Client::connect(&a, Http::H1).await.get(&unproxied).await);
    }
    let (by_connection, failures) = tally(&outcomes);
    print_table(
        "a. without proxies, one request per HTTP/1.1 connection",
        &by_connection,
        &outcomes,
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by_connection.len(), 3, "{by_connection:?}");

    // The mesh: a CA, and an agent that attests every pod's proxy by its uid and serves the
    // Service from the mesh file.
    let mut workloads = vec![(A_UID, CLIENT_ID)];
    workloads.extend(BACKENDS.iter().map(|b| (b.uid, b.id)));
    let host = MeshHost::start(
        dir.path(),
        &workloads,
        "1h",
        &["--mesh-file", mesh_file.to_str().unwrap()],
    )
    .await;

    // The proxies: every pod's TCP goes through its own, which the agent attests by uid.
    proxy_init(&a, A_UID);
    for backend in &backends {
        proxy_init(&backend.pod, backend.spec.uid);
    }
    let a_proxy = PodProxy::start(
        &a,
        A_IP,
        None,
        A_UID,
        &host.socket,
        &["--access-log"],
        dir.path().join("proxy-a.log"),
        &node.c,
    )
    .await;
    for backend in &mut backends {
        backend.proxy = Some(
            PodProxy::start(
                &backend.pod,
                backend.spec.ip,
                None,
                backend.spec.uid,
                &host.socket,
                &["--access-log"],
                dir.path().join(format!("proxy-{}.log", backend.spec.name)),
                &node.c,
            )
            .await,
        );
    }
    let mut scraped = vec![SocketAddr::from(SocketAddrV4::new(A_IP, METRICS_PORT))];
    scraped.extend(
        BACKENDS
            .iter()
            .map(|b| SocketAddr::from(SocketAddrV4::new(b.ip, METRICS_PORT))),
    );
    let prometheus = Prometheus::start(&node.c, C_IP, &scraped, dir.path()).await;
    let logs = || recent_logs(&host, Some(&a_proxy), &backends);
    // A's proxy balances the cluster IP once it has the Service from the agent.
    a_proxy.wait_for_services(1).await;

    // b. The same two clients through the proxies: each request is balanced on its own. How
    // evenly (here) and how well away from a slow backend (c) are measurements: the ones that
    // miss are reported together at the end, after every phase's table.
    let mut unmet: Vec<String> = Vec::new();
    let received = Mutex::new(BTreeMap::new());
    for http in [Http::H2, Http::H1] {
        let before: Vec<AppRecord> = backends.iter().map(|b| b.app.record()).collect();
        let started = Instant::now();
        let client = Client::connect(&a, http).await;
        let outcomes = client.load(REQUESTS, 1, &received).await;
        drop(client);
        let (by_backend, failures) = tally(&outcomes);
        print_table(
            &format!(
                "b. through the proxies, {http:?} (p50 {:?}, p99 {:?}, {:?} in all)",
                quantile(&outcomes, 0.5),
                quantile(&outcomes, 0.99),
                started.elapsed()
            ),
            &by_backend,
            &outcomes,
        );
        let after: Vec<AppRecord> = backends.iter().map(|b| b.app.record()).collect();
        for ((backend, before), after) in backends.iter().zip(&before).zip(&after) {
            println!(
                "  {}'s app: {} new connections, requests by version {:?} (before {:?})",
                backend.spec.name,
                after.connections - before.connections,
                after.versions,
                before.versions
            );
        }
        assert!(failures.is_empty(), "{http:?}: {failures:?}{}", logs());
        for backend in &BACKENDS[..3] {
            let share = *by_backend.get(backend.name).unwrap_or(&0) as f64 / REQUESTS as f64;
            if (share - 1.0 / 3.0).abs() > SHARE_TOLERANCE {
                unmet.push(format!(
                    "b. {http:?}: {} got {:.1}% of the requests, not a third ±{:.0} points: \
                     {by_backend:?}",
                    backend.name,
                    share * 100.0,
                    SHARE_TOLERANCE * 100.0
                ));
            }
        }
        assert_eq!(by_backend.get("b4"), None, "b4 is not an endpoint yet");
        if let Http::H1 = http {
            let h1: usize = before
                .iter()
                .zip(&after)
                .map(|(before, after)| {
                    after.versions.get("HTTP/1.1").copied().unwrap_or(0)
                        - before.versions.get("HTTP/1.1").copied().unwrap_or(0)
                })
                .sum();
            assert_eq!(
                h1, REQUESTS,
                "the apps should get HTTP/1.1 as the client sent it"
            );
        }
    }
    let so_far = received.lock().unwrap().clone();
    check_prometheus(&prometheus, &so_far, logs).await;

    // c. B3's app answers 50 ms late: the balancer's latency estimate keeps most requests away.
    backends[2].app.set_delay(SLOW_DELAY);
    let client = Client::connect(&a, Http::H2).await;
    let outcomes = client.load(SLOW_REQUESTS, IN_FLIGHT, &received).await;
    drop(client);
    backends[2].app.set_delay(Duration::ZERO);
    let (by_backend, failures) = tally(&outcomes);
    print_table(
        &format!(
            "c. b3 50 ms slow, {IN_FLIGHT} in flight (client p50 {:?}, p99 {:?})",
            quantile(&outcomes, 0.5),
            quantile(&outcomes, 0.99)
        ),
        &by_backend,
        &outcomes,
    );
    assert!(failures.is_empty(), "{failures:?}{}", logs());
    let slow_share = *by_backend.get("b3").unwrap_or(&0) as f64 / SLOW_REQUESTS as f64;
    if slow_share >= SLOW_MAX_SHARE {
        unmet.push(format!(
            "c. the slow backend got {:.1}% of the requests (at most {:.0}% expected): \
             {by_backend:?}",
            slow_share * 100.0,
            SLOW_MAX_SHARE * 100.0
        ));
    }
    let so_far = received.lock().unwrap().clone();
    check_prometheus(&prometheus, &so_far, logs).await;

    // d. Under a steady load, B2 leaves the Service (terminating, then gone) and B4 joins it.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let received = Arc::new(received);
    let mut workers = Vec::new();
    let h2 = Client::connect(&a, Http::H2).await;
    let h1 = Client::connect(&a, Http::H1).await;
    for client in std::iter::repeat_n(h2, STEADY_H2_WORKERS).chain([h1]) {
        let (stop, received) = (stop.0.clone(), received.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let outcome = client.get(&received).await;
                // A failure fails the test: the first is enough (a broken connection would fail
                // every request at once, in a loop that never yields).
                let failed = outcome.answer.is_err();
                outcomes.push(outcome);
                if failed {
                    break;
                }
            }
            outcomes
        }));
    }
    let at_start: Vec<AppRecord> = backends.iter().map(|b| b.app.record()).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let [b1, b2, b3, b4] = BACKENDS;
    write_mesh_file(
        &mesh_file,
        &[
            (b1, EndpointState::Ready),
            (b2, EndpointState::Terminating),
            (b3, EndpointState::Ready),
        ],
    );
    service.set_backends(&[b1.ip, b3.ip]);
    // Terminating: no new request goes to B2 once what it has is answered (no longer draining).
    wait_for_endpoints(&a_proxy, 2.0, Some(0.0), "B2 terminating", logs).await;
    let b2_when_terminating = backends[1].app.record().requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    write_mesh_file(
        &mesh_file,
        &[
            (b1, EndpointState::Ready),
            (b3, EndpointState::Ready),
            (b4, EndpointState::Ready),
        ],
    );
    service.set_backends(&[b1.ip, b3.ip, b4.ip]);
    wait_for_endpoints(&a_proxy, 3.0, Some(0.0), "B2 gone, B4 added", logs).await;
    let b4_when_added = backends[3].app.record().requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(stop);
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.unwrap());
    }
    let (by_backend, failures) = tally(&outcomes);
    print_table(
        "d. steady load while b2 leaves and b4 joins (answers by backend)",
        &by_backend,
        &outcomes,
    );
    let at_end: Vec<AppRecord> = backends.iter().map(|b| b.app.record()).collect();
    let b2_after_terminating = at_end[1].requests() - b2_when_terminating;
    let b4_after_added = at_end[3].requests() - b4_when_added;
    println!(
        "  b2 after it was terminating (then gone): {b2_after_terminating}; b4 after it was \
         added: {b4_after_added}; \
         apps' counts at start {:?}, at end {:?}",
        counts_of(&backends, &at_start),
        counts_of(&backends, &at_end)
    );
    assert!(
        failures.is_empty(),
        "failed requests: {failures:?}{}",
        logs()
    );
    assert!(
        b4_after_added > 0,
        "b4 got no request after it was added: {by_backend:?}{}",
        logs()
    );
    assert_eq!(
        b2_after_terminating,
        0,
        "b2 got new requests after it was marked terminating (and then removed){}",
        logs()
    );
    let received = received.lock().unwrap().clone();
    check_prometheus(&prometheus, &received, logs).await;

    // e. Identities: each backend's proxy saw A's identity on every request; A's proxy logged
    // each request it sent to a backend with that backend's own identity, proven by its
    // certificate, and as many as the backend's proxy logged.
    let a_requests: Vec<Value> = a_proxy
        .access_log()
        .into_iter()
        .filter(|l| l["kind"] == "http" && l["direction"] == "outbound")
        .collect();
    for backend in &backends {
        let proxy = backend.proxy.as_ref().unwrap();
        let served: Vec<Value> = proxy
            .access_log()
            .into_iter()
            .filter(|l| l["kind"] == "http")
            .collect();
        let others: Vec<&Value> = served
            .iter()
            .filter(|l| l["source_identity"] != CLIENT_ID)
            .collect();
        assert!(
            others.is_empty(),
            "{}'s proxy logged requests from another peer than A: {others:?}",
            backend.spec.name
        );
        let upstream = format!("{}:{APP_PORT}", backend.spec.ip);
        let sent: Vec<&Value> = a_requests
            .iter()
            .filter(|l| l["upstream"] == upstream.as_str())
            .collect();
        let misnamed: Vec<&&Value> = sent
            .iter()
            .filter(|l| l["destination_identity"] != backend.spec.id)
            .collect();
        assert!(
            misnamed.is_empty(),
            "A's proxy logged requests to {upstream} with another identity than {}: {misnamed:?}",
            backend.spec.id
        );
        // Each line names the key exchange of the pooled connection the request went out on.
        let not_hybrid: Vec<&&Value> = sent
            .iter()
            .filter(|l| l["key_exchange"] != "X25519MLKEM768")
            .collect();
        assert!(
            not_hybrid.is_empty(),
            "A's proxy logged requests to {upstream} without the hybrid key exchange: \
             {not_hybrid:?}"
        );
        println!(
            "e. {}: its proxy logged {} requests, all from {CLIENT_ID}; A's proxy logged {} \
             to {upstream}, all to {}",
            backend.spec.name,
            served.len(),
            sent.len(),
            backend.spec.id
        );
        assert!(
            !served.is_empty(),
            "{}'s proxy logged no request{}",
            backend.spec.name,
            logs()
        );
        assert_eq!(
            sent.len(),
            served.len(),
            "requests A's proxy sent to {} and requests its proxy logged",
            backend.spec.name
        );
    }
    assert!(
        unmet.is_empty(),
        "balance expectations not met:\n{}{}",
        unmet.join("\n"),
        logs()
    );
}
