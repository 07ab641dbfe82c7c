//! The Grafana dashboards of deploy/grafana/ (issue 16): they are dashboard JSON Grafana imports
//! (unique panel ids, a layout on its 24-column grid, a Prometheus data source variable every
//! query uses, no variable that is not defined), the ConfigMaps Grafana's dashboard sidecar loads
//! render with kustomize, and every query of every panel, and of every template variable, returns
//! data from a real Prometheus (Debian's) that scraped a running mesh.
//!
//! The mesh, as root in network namespaces this test creates and deletes (pass or fail), as in
//! tests/e2e/proxy_balance.rs:
//!
//! ```text
//!   pod web 198.18.42.1          pods api 198.18.42.11, .12
//!   HTTP/1.1 client (root)       app :8080: 500 on /fail, else 200
//!   sigil proxy (HTTPRoute api)  sigil proxy (DENY /admin; PERMISSIVE)
//!        │ eth0                        │ eth0
//!        └──────── br0 in C 198.18.42.100 ────────┘
//!                  Service demo/api at 198.19.42.10:80 (kube-proxy's rules)
//!                  Prometheus on 198.18.42.100:9090, relays to the CA's and agent's /metrics
//! ```
//!
//! The CA and the agent run in the host's namespace (loopback); Prometheus, in C, scrapes them
//! through TCP relays the test keeps in C. Every target gets the `namespace` and `pod` labels a
//! Kubernetes pod-role scrape gives it, pods named as a Deployment's and a DaemonSet's are, so
//! that the dashboards' workload (the pod name less the suffix Kubernetes generates) is checked
//! too. What the dashboards show is made to happen: requests with some 500s and some denied by
//! policy, a TLS handshake refused by a proxy, a signing request refused by the CA, and one the
//! agent could not make (the CA down while a new workload asked for its certificate).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sigil_test_harness::manifests::{kubernetes_schema_problems, kustomize, repo};
use sigil_test_harness::netns::{
    ClusterIpService, METRICS_PORT, Netns, Node, PodProxy, Prometheus, ScrapeTarget, connect_in,
    http_get_in, proxy_init, require_root,
};
use sigil_test_harness::{
    CaProcess, MeshHost, Proc, http_get, key_and_csr, metric, serve_h1_or_h2, sigil_proxy_exe,
    sign_request, state_dir_bundle,
};
use tokio::task::JoinHandle;

/// This test's namespaces are `sigil-dash-<pid>-{c,web,api1,api2}`.
const NETNS_PREFIX: &str = "sigil-dash";
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 42, 100);
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 42, 10), 80);
const APP_PORT: u16 = 8080;
const NAMESPACE: &str = "demo";
/// Where C relays Prometheus's scrapes to the CA's and the agent's metrics (their usual ports).
const CA_RELAY_PORT: u16 = 15014;
const AGENT_RELAY_PORT: u16 = 15021;
const CONTROL_PLANE_NAMESPACE: &str = "sigil-system";
const CA_POD: &str = "sigil-ca-6b7f9d8c5-r4t6x";
const AGENT_POD: &str = "sigil-agent-h7j2k";
/// A workload the CA was told it may issue, whose proxy starts while the CA is down.
const LATE_UID: u32 = 41424;
const LATE_ID: &str = "spiffe://cluster.local/ns/demo/sa/late";
/// Requests the web pod sends, a new connection every [`PER_CONNECTION`]; every
/// [`FAIL_EVERY`]th asks for /fail (500), every [`DENY_EVERY`]th for /admin (403). They are
/// [`PACE`] apart, so that they span several scrapes: `rate()` sees only what a counter gained
/// between two samples, never the value it was first scraped with.
const REQUESTS: usize = 300;
const PACE: Duration = Duration::from_millis(10);
const PER_CONNECTION: usize = 25;
const FAIL_EVERY: usize = 10;
const DENY_EVERY: usize = 30;
/// What `$__rate_interval` becomes: Grafana's own value for a 15 s scrape interval (4 × 15 s),
/// longer than this test, so every event it made is in the window.
const RATE_INTERVAL: &str = "1m";
const DASHBOARDS: [&str; 4] = ["mesh-overview", "workload", "identity", "data-plane"];
const PERMISSIVE: &str = "apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: permissive, namespace: demo}
spec: {mtls: {mode: PERMISSIVE}}
";
/// A producer route on the api Service sending all of its requests to it, so that the outbound
/// request metrics carry `route="demo/api"` for the workload dashboard's panels by route.
const API_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
";
/// The data source variable every panel and query variable must use.
const DATASOURCE: &str = "${datasource}";

/// A meshed pod: its address, proxy uid and identity, and the pod name Kubernetes would give it.
#[derive(Clone, Copy)]
struct PodSpec {
    role: &'static str,
    ip: Ipv4Addr,
    uid: u32,
    id: &'static str,
    pod: &'static str,
}

const WEB: PodSpec = PodSpec {
    role: "web",
    ip: Ipv4Addr::new(198, 18, 42, 1),
    uid: 41421,
    id: "spiffe://cluster.local/ns/demo/sa/web",
    pod: "web-5d8b7c9f6d-x7k2p",
};
const APIS: [PodSpec; 2] = [
    PodSpec {
        role: "api1",
        ip: Ipv4Addr::new(198, 18, 42, 11),
        uid: 41422,
        id: "spiffe://cluster.local/ns/demo/sa/api",
        pod: "api-7f9c6d5b4-q2w4z",
    },
    PodSpec {
        role: "api2",
        ip: Ipv4Addr::new(198, 18, 42, 12),
        uid: 41423,
        id: "spiffe://cluster.local/ns/demo/sa/api",
        pod: "api-7f9c6d5b4-n8v5t",
    },
];

fn dashboard(name: &str) -> (String, Value) {
    let path = repo().join("deploy/grafana").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    (text, json)
}

/// Every panel, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// A query variable's query (a string, or Grafana's newer `{query: ...}` object).
fn variable_query(variable: &Value) -> &str {
    variable["query"]["query"]
        .as_str()
        .or(variable["query"].as_str())
        .unwrap_or("")
}

/// The names of the variables `text` refers to (`$name`, `${name}`), leaving out `$1`...
/// (label_replace's capture groups).
fn referenced_variables(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = match rest.strip_prefix('{') {
            Some(braced) => braced.chars().take_while(|c| *c != '}').collect(),
            None => rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect(),
        };
        if !name.is_empty() && !name.chars().all(|c| c.is_ascii_digit()) {
            names.push(name);
        }
    }
    names
}

/// `text` with every variable replaced by its value in `values` (`$1`... left as they are).
fn substitute(text: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (name, len) = match rest.strip_prefix('{') {
            Some(braced) => {
                let name: String = braced.chars().take_while(|c| *c != '}').collect();
                let len = name.len() + 2;
                (name, len)
            }
            None => {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let len = name.len();
                (name, len)
            }
        };
        match values.get(&name) {
            Some(value) => {
                out.push_str(value);
                rest = &rest[len..];
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
    out
}

/// What Grafana needs to import `dashboard` and lay it out, and what the queries need to run:
/// one line per problem found.
fn structure_problems(name: &str, dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |what: String| problems.push(format!("{name}: {what}"));
    if dashboard["schemaVersion"].as_u64().unwrap_or(0) < 36 {
        problem(format!("schemaVersion {}", dashboard["schemaVersion"]));
    }
    for field in ["uid", "title"] {
        if dashboard[field].as_str().unwrap_or("").is_empty() {
            problem(format!("no {field}"));
        }
    }
    let variables = variables(dashboard);
    let mut defined: BTreeSet<String> = ["__rate_interval", "__interval", "__range"]
        .map(String::from)
        .into();
    for variable in &variables {
        let var_name = variable["name"].as_str().unwrap_or("").to_owned();
        if !defined.insert(var_name.clone()) {
            problem(format!("variable {var_name:?} defined twice"));
        }
        if variable["type"] == "query" && variable["datasource"]["uid"] != DATASOURCE {
            problem(format!("variable {var_name} does not use {DATASOURCE}"));
        }
    }
    if !variables.iter().any(|v| {
        v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
    }) {
        problem("no Prometheus data source variable named datasource".to_owned());
    }
    for variable in &variables {
        for used in referenced_variables(variable_query(variable)) {
            if !defined.contains(&used) {
                problem(format!(
                    "variable {} uses undefined ${used}",
                    variable["name"]
                ));
            }
        }
    }
    let mut ids = BTreeSet::new();
    let mut placed: Vec<(String, [u64; 4])> = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("").to_owned();
        match panel["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            id => problem(format!("panel {title:?}: id {id:?} missing or not unique")),
        }
        let grid = &panel["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|f| grid[f].as_u64());
        match (h, w, x, y) {
            (Some(h), Some(w), Some(x), Some(y)) if h > 0 && w > 0 && x + w <= 24 => {
                for (other, [oh, ow, ox, oy]) in &placed {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problem(format!("panels {title:?} and {other:?} overlap"));
                    }
                }
                placed.push((title.clone(), [h, w, x, y]));
            }
            _ => problem(format!("panel {title:?}: gridPos {grid}")),
        }
        let kind = panel["type"].as_str().unwrap_or("");
        if kind == "row" {
            continue;
        }
        if !["timeseries", "stat", "table"].contains(&kind) {
            problem(format!("panel {title:?}: type {kind:?}"));
        }
        if title.is_empty() {
            problem(format!("panel {}: no title", panel["id"]));
        }
        if panel["datasource"]["uid"] != DATASOURCE {
            problem(format!("panel {title:?} does not use {DATASOURCE}"));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problem(format!("panel {title:?}: no query"));
        }
        let mut ref_ids = BTreeSet::new();
        for target in &targets {
            if !ref_ids.insert(target["refId"].to_string()) {
                problem(format!("panel {title:?}: refId {} twice", target["refId"]));
            }
            if target["datasource"]["uid"] != DATASOURCE {
                problem(format!(
                    "panel {title:?}: a query does not use {DATASOURCE}"
                ));
            }
            let expr = target["expr"].as_str().unwrap_or("");
            if expr.is_empty() {
                problem(format!("panel {title:?}: a query without expr"));
            }
            for used in referenced_variables(expr) {
                if !defined.contains(&used) {
                    problem(format!("panel {title:?} uses undefined ${used}"));
                }
            }
        }
    }
    problems
}

#[test]
fn dashboards_are_grafana_json_and_configmaps_for_grafanas_sidecar() {
    let mut uids = BTreeSet::new();
    for name in DASHBOARDS {
        let (_, json) = dashboard(name);
        let problems = structure_problems(name, &json);
        assert!(problems.is_empty(), "{problems:#?}");
        assert!(
            uids.insert(json["uid"].to_string()),
            "{name}: uid {}",
            json["uid"]
        );
        println!("{name}: {} panels", panels(&json).len());
    }

    // The check bites: a panel id twice, a panel off the grid, an undefined variable.
    let (_, mut broken) = dashboard("workload");
    let first_id = broken["panels"][0]["id"].clone();
    broken["panels"][1]["id"] = first_id;
    broken["panels"][2]["gridPos"]["x"] = json!(20);
    broken["panels"][3]["targets"][0]["expr"] = json!("up{pod=\"$undefined\"}");
    let problems = structure_problems("broken", &broken);
    assert_eq!(problems.len(), 3, "{problems:#?}");

    let objects = kustomize(&repo().join("deploy/grafana"));
    assert_eq!(objects.len(), DASHBOARDS.len(), "{objects:#?}");
    for name in DASHBOARDS {
        let config_map = objects
            .iter()
            .find(|o| o["metadata"]["name"] == format!("sigil-dashboard-{name}").as_str())
            .unwrap_or_else(|| panic!("no ConfigMap for {name}"));
        assert_eq!(config_map["kind"], "ConfigMap");
        assert_eq!(config_map["metadata"]["namespace"], CONTROL_PLANE_NAMESPACE);
        assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
        let (text, _) = dashboard(name);
        assert_eq!(
            config_map["data"][format!("{name}.json")].as_str(),
            Some(text.as_str()),
            "{name}.json in its ConfigMap"
        );
    }
    let (_, problems) = kubernetes_schema_problems(&objects, &["1.30", "latest"]);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The api pods' application: 500 for /fail, else 200.
fn start_app(pod: &Netns) -> JoinHandle<()> {
    let listener = pod.listen(APP_PORT);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_h1_or_h2(stream, |request| async move {
                let status = if request.uri().path() == "/fail" {
                    500
                } else {
                    200
                };
                hyper::Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"api")))
                    .unwrap()
            }));
        }
    })
}

/// Relays every connection to `port` in `netns` to `to` (from the host's namespace): how
/// Prometheus in the node's namespace reaches the CA's and the agent's loopback metrics.
fn relay(netns: &Netns, port: u16, to: SocketAddr) -> JoinHandle<()> {
    let listener = netns.listen(port);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// The web pod's requests to the Service, over HTTP/1.1 connections of [`PER_CONNECTION`]
/// requests each: the statuses it got, by code.
async fn load(web: &Netns) -> BTreeMap<u16, usize> {
    let mut statuses = BTreeMap::new();
    for first in (0..REQUESTS).step_by(PER_CONNECTION) {
        let stream = connect_in(&web.name, CLUSTER_IP.into())
            .await
            .unwrap_or_else(|e| panic!("connecting from web to {CLUSTER_IP}: {e}"));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        let connection = tokio::spawn(connection);
        for i in first..(first + PER_CONNECTION).min(REQUESTS) {
            let path = if i % DENY_EVERY == DENY_EVERY - 1 {
                "/admin"
            } else if i % FAIL_EVERY == FAIL_EVERY - 1 {
                "/fail"
            } else {
                "/"
            };
            let request = hyper::Request::get(path)
                .header("host", "api.demo")
                .body(Empty::<Bytes>::new())
                .unwrap();
            sender.ready().await.expect("connection ready");
            let response = sender.send_request(request).await.expect("a response");
            *statuses.entry(response.status().as_u16()).or_default() += 1;
            response.into_body().collect().await.expect("a body");
            tokio::time::sleep(PACE).await;
        }
        drop(sender);
        let _ = connection.await;
    }
    statuses
}

/// Waits until Prometheus has scraped every target (`up` is 1 for all `count` of them).
async fn wait_for_targets(prometheus: &Prometheus, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = prometheus.query("up == 1").await;
        if up.len() == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus scrapes {} of {count} targets: {up:?}\n{}",
            up.len(),
            prometheus.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When the CA process Prometheus scraped last started (its `process_start_time_seconds`).
async fn ca_start_time(prometheus: &Prometheus) -> Option<f64> {
    let samples = prometheus
        .query("process_start_time_seconds{job=\"sigil-ca\"}")
        .await;
    samples.first().map(|(_, start)| *start)
}

/// The values a query variable takes: `label_values(selector, label)` as Grafana asks
/// Prometheus for them, or `query_result(expr)` with a `/label="([^"]+)"/` regex (the one form
/// the dashboards use, which picks one label's values out of each result line).
async fn variable_values(
    prometheus: &Prometheus,
    variable: &Value,
    values: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let query = substitute(variable_query(variable), values);
    let (promql, label) = if let Some(args) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        let (selector, label) = args
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let label = label.trim().to_owned();
        (format!("count by ({label}) ({selector})"), label)
    } else if let Some(expr) = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
    {
        let regex = variable["regex"].as_str().unwrap_or("");
        let label = regex
            .strip_prefix('/')
            .and_then(|r| r.strip_suffix("=\"([^\"]+)\"/"))
            .unwrap_or_else(|| panic!("a query_result regex this test reads: {regex:?}"));
        (expr.to_owned(), label.to_owned())
    } else {
        panic!("a variable query this test runs: {query}");
    };
    prometheus
        .query(&promql)
        .await
        .iter()
        .filter_map(|(labels, _)| labels[&label].as_str().map(str::to_owned))
        .collect()
}

/// Every assignment of values to `dashboard`'s variables that its variable queries give (in
/// order, each query with the values of the variables before it), constants as they are and
/// `$__rate_interval` as [`RATE_INTERVAL`]. Panics if a query variable has no value.
async fn assignments(prometheus: &Prometheus, dashboard: &Value) -> Vec<BTreeMap<String, String>> {
    let mut assignments = vec![BTreeMap::from([(
        "__rate_interval".to_owned(),
        RATE_INTERVAL.to_owned(),
    )])];
    for variable in variables(dashboard) {
        let name = variable["name"].as_str().unwrap().to_owned();
        let mut next = Vec::new();
        for assignment in &assignments {
            let values: BTreeSet<String> = match variable["type"].as_str() {
                Some("constant") => BTreeSet::from([variable_query(variable).to_owned()]),
                Some("query") => variable_values(prometheus, variable, assignment).await,
                _ => continue,
            };
            assert!(
                !values.is_empty(),
                "{}: variable {name} has no value for {assignment:?}",
                dashboard["title"]
            );
            for value in values {
                let mut with = assignment.clone();
                with.insert(name.clone(), value);
                next.push(with);
            }
        }
        if !next.is_empty() {
            assignments = next;
        }
    }
    assignments
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_scraped_mesh() {
    require_root(
        "this test creates network namespaces, installs iptables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<&PodSpec> = std::iter::once(&WEB).chain(&APIS).collect();
    let mut yaml = String::from("members:\n");
    for pod in &specs {
        yaml.push_str(&format!("- {{ip: {}, id: \"{}\"}}\n", pod.ip, pod.id));
    }
    yaml.push_str(&format!(
        "services:\n- namespace: {NAMESPACE}\n  name: api\n  clusterIPs: [{}]\n  ports:\n  \
         - {{name: http, port: {}, targetPort: {APP_PORT}, appProtocol: http}}\n  endpoints:\n",
        CLUSTER_IP.ip(),
        CLUSTER_IP.port()
    ));
    for api in &APIS {
        yaml.push_str(&format!("  - {{ip: {}}}\n", api.ip));
    }
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, yaml).unwrap();
    let policy_file = dir.path().join("policies.yaml");
    // DENY /admin, PERMISSIVE (sigil's default is STRICT) to let plaintext in, and a route.
    std::fs::write(
        &policy_file,
        format!(
            "{}---\n{PERMISSIVE}---\n{API_ROUTE}",
            include_str!("../fixtures/deny-admin.yaml")
        ),
    )
    .unwrap();

    let node = Node::new(NETNS_PREFIX, C_IP);
    let web = node.add_pod(WEB.role, WEB.ip);
    let apis: Vec<Netns> = APIS.iter().map(|a| node.add_pod(a.role, a.ip)).collect();
    let _apps: Vec<JoinHandle<()>> = apis.iter().map(start_app).collect();
    let _service = ClusterIpService::new(&node, "API", CLUSTER_IP, APP_PORT, &APIS.map(|a| a.ip));
    let mut workloads: Vec<(u32, &str)> = specs.iter().map(|p| (p.uid, p.id)).collect();
    workloads.push((LATE_UID, LATE_ID));
    let mut host = MeshHost::start(
        dir.path(),
        &workloads,
        "1h",
        &[
            "--mesh-file",
            mesh_file.to_str().unwrap(),
            "--policy-file",
            policy_file.to_str().unwrap(),
        ],
    )
    .await;
    let mut proxies = Vec::new();
    for (pod, spec) in std::iter::once(&web).chain(&apis).zip(&specs) {
        proxy_init(pod, spec.uid);
        proxies.push(
            PodProxy::start(
                pod,
                spec.ip,
                None,
                spec.uid,
                &host.socket,
                &[],
                dir.path().join(format!("proxy-{}.log", spec.role)),
                &node.c,
            )
            .await,
        );
    }
    let _relays = [
        relay(&node.c, CA_RELAY_PORT, host.ca.admin),
        relay(&node.c, AGENT_RELAY_PORT, host.agent_admin),
    ];
    let pod_labels: Vec<[(&str, &str); 2]> = specs
        .iter()
        .map(|p| [("namespace", NAMESPACE), ("pod", p.pod)])
        .collect();
    let mut targets: Vec<ScrapeTarget> = specs
        .iter()
        .zip(&pod_labels)
        .map(|(p, labels)| ScrapeTarget {
            job: "sigil-proxy",
            addr: SocketAddrV4::new(p.ip, METRICS_PORT).into(),
            labels,
        })
        .collect();
    let ca_labels = [("namespace", CONTROL_PLANE_NAMESPACE), ("pod", CA_POD)];
    let agent_labels = [("namespace", CONTROL_PLANE_NAMESPACE), ("pod", AGENT_POD)];
    targets.push(ScrapeTarget {
        job: "sigil-ca",
        addr: SocketAddrV4::new(C_IP, CA_RELAY_PORT).into(),
        labels: &ca_labels,
    });
    targets.push(ScrapeTarget {
        job: "sigil-agent",
        addr: SocketAddrV4::new(C_IP, AGENT_RELAY_PORT).into(),
        labels: &agent_labels,
    });
    let prometheus = Prometheus::start_scraping(&node.c, C_IP, &targets, dir.path()).await;
    wait_for_targets(&prometheus, targets.len()).await;
    println!("mesh up and scraped after {:?}", started.elapsed());

    // The agent cannot sign for a workload that starts while the CA is down (and counts it);
    // the CA comes back where the agent expects it and the workload gets its certificate.
    let first_ca = ca_start_time(&prometheus).await;
    assert!(first_ca.is_some(), "Prometheus has no start time of the CA");
    let _ = host.ca.child.kill();
    let _ = host.ca.child.wait();
    let mut late_command = web.command_as(
        &LATE_UID.to_string(),
        &[
            sigil_proxy_exe(),
            "run",
            "--explicit",
            "--agent-socket",
            host.socket.to_str().unwrap(),
            "--inbound-listen",
            "127.0.0.1:17006",
            "--inbound-app",
            "127.0.0.1:17080",
            "--metrics-addr",
            "127.0.0.1:17020",
            "--admin-addr",
            "127.0.0.1:17000",
        ],
    );
    late_command.env("RUST_LOG", "info");
    let _late = Proc::spawn(late_command, dir.path().join("proxy-late.log"));
    let failure = format!("sigil_agent_csr_failures_total{{identity=\"{LATE_ID}\"}}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = http_get(host.agent_admin, "/metrics").await.unwrap();
        if metric(&text, &failure) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never counted a failed signing request for {LATE_ID}:\n{}",
            host.agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let serve_args = host.offline.serve_args();
    host.ca = CaProcess::start_on(dir.path(), None, &serve_args, host.ca.grpc, host.ca.admin);
    host.ca.wait_ready().await;
    // The new CA's series must be scraped before it signs, or its latency histogram would be
    // first seen with its observations in it and show no rate.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = ca_start_time(&prometheus).await;
        if scraped.is_some() && scraped != first_ca {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the restarted CA"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The CA refuses a signing request without credentials.
    let bundle = state_dir_bundle(&host.offline.state);
    let (_, csr) = key_and_csr();
    let refused = host
        .ca
        .client(&bundle, None)
        .await
        .sign(sign_request(csr, 0, "", None))
        .await;
    assert!(
        refused.is_err(),
        "an anonymous Sign was answered: {refused:?}"
    );

    // A proxy refuses a TLS client without a certificate of the mesh.
    let s_client = node
        .c
        .command(&[
            "timeout",
            "5",
            "openssl",
            "s_client",
            "-connect",
            &format!("{}:{APP_PORT}", APIS[0].ip),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    println!(
        "openssl s_client without a certificate: {}",
        s_client.status
    );

    // The requests: some answered 500 by the app, some 403 by the policy; and, before and
    // after them, a plaintext request from outside the mesh to each api pod (PERMISSIVE lets
    // it in), so that inbound connections by security rise while Prometheus watches.
    let plaintext = || async {
        for api in &APIS {
            let addr = SocketAddrV4::new(api.ip, APP_PORT).into();
            let answer = http_get_in(&node.c.name, addr, "/").await;
            assert!(
                matches!(answer, Ok((200, _))),
                "plaintext GET from C to {addr}: {answer:?}"
            );
        }
    };
    plaintext().await;
    let statuses = load(&web).await;
    plaintext().await;
    println!("web's requests by status: {statuses:?}");
    let denied = REQUESTS / DENY_EVERY;
    let failed = (0..REQUESTS)
        .filter(|i| i % FAIL_EVERY == FAIL_EVERY - 1 && i % DENY_EVERY != DENY_EVERY - 1)
        .count();
    assert_eq!(
        statuses,
        BTreeMap::from([
            (200, REQUESTS - denied - failed),
            (403, denied),
            (500, failed)
        ])
    );
    // Two scrapes of every target after the last request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_for_targets(&prometheus, targets.len()).await;

    // The workload variable names the Deployments of the pods (their names less the suffixes).
    let (_, workload_dashboard) = dashboard("workload");
    let workloads: BTreeSet<String> = assignments(&prometheus, &workload_dashboard)
        .await
        .iter()
        .filter(|a| a["namespace"] == NAMESPACE)
        .map(|a| a["workload"].clone())
        .collect();
    assert_eq!(workloads, BTreeSet::from(["api".into(), "web".into()]));

    // Every query of every panel returns at least one series with a number, for some values of
    // the dashboard's variables.
    let mut empty = Vec::new();
    let mut queries = 0;
    for name in DASHBOARDS {
        let (_, json) = dashboard(name);
        let assignments = assignments(&prometheus, &json).await;
        for panel in panels(&json) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                queries += 1;
                let mut answered = false;
                for assignment in &assignments {
                    let promql = substitute(expr, assignment);
                    let result = prometheus.query(&promql).await;
                    if result.iter().any(|(_, value)| value.is_finite()) {
                        answered = true;
                        break;
                    }
                }
                if !answered {
                    empty.push(format!(
                        "{name} / {}: {expr}",
                        panel["title"].as_str().unwrap_or("")
                    ));
                }
            }
        }
    }
    // The check bites: a misspelt metric, and a workload's name where a pod's is wanted.
    for wrong in [
        "sum(rate(sigil_proxy_request_total[1m]))",
        "count(sigil_proxy_sds_connected{pod=\"web\"})",
    ] {
        let result = prometheus.query(wrong).await;
        assert!(result.is_empty(), "{wrong}: {result:?}");
    }
    println!(
        "{queries} dashboard queries run against Prometheus, {} without data; {:?} in all",
        empty.len(),
        started.elapsed()
    );
    assert!(
        empty.is_empty(),
        "queries that returned no data:\n{}\nproxy logs:\n{}",
        empty.join("\n"),
        proxies
            .iter()
            .map(PodProxy::logs)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
