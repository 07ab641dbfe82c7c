//! deploy/prometheus (the rules file, its unit tests, the scrape config of a plain Prometheus) and
//! deploy/overlays/prometheus-operator, checked by Prometheus's own tools (Debian's prometheus
//! package, which scripts/test installs): `promtool check rules` and `promtool test rules` on the
//! rules, `promtool check config` on the scrape config, and the real Prometheus relabelling the
//! targets Kubernetes discovery would give it for sigil's pods. Every metric the rules name is one
//! the CA, the agent or the proxy registers; the overlay renders, passes the manifest checks of
//! the other overlays, its Operator objects pass the Operator's own CRD schemas (v0.93.0,
//! vendored in tests/fixtures), it selects what it means to scrape, and its PrometheusRule is the
//! rules file.
//!
//! Debian builds Prometheus without Kubernetes service discovery (its client library's
//! dependencies are not packaged), so its promtool refuses `kubernetes_sd_configs`. The scrape
//! config is checked with that block swapped for a `file_sd_configs` listing the very targets
//! and `__meta_kubernetes_*` labels Prometheus's pod discovery makes of a pod (one target per
//! container port, init containers included, or one per container without ports), computed
//! here from the rendered manifests and a pod the real injector patched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sigil_test_harness::manifests::*;
use sigil_test_harness::netns::PROMETHEUS;

const PROMTOOL: &str = "/usr/bin/promtool";
/// The custom resources of the Prometheus Operator, which a plain cluster lacks (so they are in
/// the overlay, not the base).
const OPERATOR_API_VERSION: &str = "monitoring.coreos.com/v1";
/// The Prometheus Operator's CRDs of the kinds the overlay uses (from the repository's root).
const OPERATOR_CRDS: &str = "tests/fixtures/prometheus-operator/v0.93.0";

fn prometheus_dir() -> PathBuf {
    repo().join("deploy/prometheus")
}

fn overlay() -> Vec<Value> {
    kustomize(&repo().join("deploy/overlays/prometheus-operator"))
}

/// deploy/prometheus/rules.yaml.
fn rules_file() -> Value {
    let mut documents = yaml_file(&prometheus_dir().join("rules.yaml"));
    assert_eq!(documents.len(), 1);
    documents.remove(0)
}

fn rules(file: &Value) -> impl Iterator<Item = &Value> {
    file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules").iter())
}

/// Runs promtool with `args` in `dir`.
fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new(PROMTOOL)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (scripts/test installs Debian's prometheus package)")
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_cover_every_rule() {
    let dir = prometheus_dir();
    let checked = promtool(&dir, &["check", "rules", "rules.yaml"]);
    assert!(checked.status.success(), "{}", printed(&checked));
    let tested = promtool(&dir, &["test", "rules", "rules.test.yaml"]);
    assert!(tested.status.success(), "{}", printed(&tested));

    // Every alert is tested firing and not firing, every recording rule evaluated; every alert
    // says how bad it is and what to do.
    let file = rules_file();
    let tests = yaml_file(&dir.join("rules.test.yaml")).remove(0);
    assert_eq!(tests["rule_files"], json!(["rules.yaml"]));
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut evaluated = String::new();
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            match case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                true => firing.insert(name),
                false => quiet.insert(name),
            };
        }
        for case in test["promql_expr_test"].as_array().into_iter().flatten() {
            evaluated.push_str(case["expr"].as_str().unwrap());
            evaluated.push('\n');
        }
    }
    let mut alerts = 0;
    for rule in rules(&file) {
        if let Some(alert) = rule["alert"].as_str() {
            alerts += 1;
            assert!(firing.contains(alert), "{alert} is never tested firing");
            assert!(quiet.contains(alert), "{alert} is never tested not firing");
            assert!(
                ["critical", "warning", "info"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or_default()),
                "{alert}: severity"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| a.len() > 20),
                    "{alert}: no {annotation}"
                );
            }
        } else {
            let record = rule["record"].as_str().expect("a rule records or alerts");
            // Evaluated itself, or through an alert or an evaluated recording built on it.
            let covered = evaluated.contains(record)
                || rules(&file).any(|r| {
                    r["expr"].as_str().unwrap().contains(record)
                        && (r["alert"].is_string()
                            || r["record"].as_str().is_some_and(|r| evaluated.contains(r)))
                });
            assert!(covered, "the recording rule {record} is not tested");
        }
    }
    assert!(alerts >= 20, "{alerts} alerts");

    // The tests can fail: a page that needs twice the burn rate misses the 2 % failure test
    // (run with the page's tests only, to keep it quick).
    let scratch = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir.join("rules.yaml")).unwrap();
    assert!(text.contains("(14.4 * 0.001)"));
    std::fs::write(
        scratch.path().join("rules.yaml"),
        text.replace("(14.4 * 0.001)", "(28.8 * 0.001)"),
    )
    .unwrap();
    let mut page_tests = tests.clone();
    page_tests["tests"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t.to_string().contains("\"SigilWorkloadErrorBudgetBurn\""));
    std::fs::write(
        scratch.path().join("rules.test.yaml"),
        serde_json::to_vec(&page_tests).unwrap(),
    )
    .unwrap();
    let broken = promtool(scratch.path(), &["test", "rules", "rules.test.yaml"]);
    assert!(!broken.status.success(), "{}", printed(&broken));
    assert!(
        printed(&broken).contains("SigilWorkloadErrorBudgetBurn"),
        "{}",
        printed(&broken)
    );
}

/// The metric families each component serves, as the names Prometheus sees: a fresh registry
/// with the component's `Metrics` (what its server registers) and one sample in every family
/// (the text encoding leaves out empty ones), encoded; the `# TYPE` lines name each family
/// and its type, from which the sample names follow (`_total` for counters, `_bucket`, `_sum`,
/// `_count` for histograms).
fn served_metric_names() -> BTreeSet<String> {
    use prometheus_client::registry::Registry;
    let mut registry = Registry::default();

    {
        use sigil_ca::metrics::*;
        let ca = Metrics::new(&mut registry);
        ca.issued
            .get_or_create(&ApiLabels { api: Api::Sigil })
            .inc();
        ca.denied
            .get_or_create(&DenyLabels {
                api: Api::Sigil,
                reason: DenyReason::Internal,
            })
            .inc();
        ca.token_cache
            .get_or_create(&CacheLabels {
                result: CacheResult::Hit,
            })
            .inc();
        ca.injections
            .get_or_create(&InjectLabels {
                outcome: InjectOutcome::Injected,
                reason: None,
            })
            .inc();
        ca.connections_refused
            .get_or_create(&RefusedLabels {
                port: Port::Grpc,
                reason: RefusedReason::Evicted,
            })
            .inc();
        ca.webhook_bodies_refused
            .get_or_create(&BodyRefusedLabels {
                reason: BodyRefusedReason::ReadTimeout,
            })
            .inc();
    }
    {
        use sigil_agent::metrics::*;
        let agent = Metrics::new(&mut registry);
        let identity = IdentityLabels {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        };
        agent.cert_expiry.get_or_create(&identity).set(1);
        agent.csr_failures.get_or_create(&identity).inc();
        let api = ApiLabels {
            api: SocketApi::Sds,
        };
        agent.streams.get_or_create(&api).inc();
        agent.pushes.get_or_create(&api).inc();
        agent
            .connections_refused
            .get_or_create(&RefusedLabels {
                reason: RefusedReason::HeaderTimeout,
            })
            .inc();
    }
    {
        use sigil_proxy::metrics::*;
        use sigil_proxy::tls::HandshakeFailure;
        let proxy = Metrics::new(&mut registry);
        let connection = ConnectionLabels {
            direction: Direction::Inbound,
            security: Security::Mtls,
        };
        proxy.connections_opened.get_or_create(&connection).inc();
        proxy.connections_closed.get_or_create(&connection).inc();
        proxy.connections_active.get_or_create(&connection).inc();
        proxy
            .bytes
            .get_or_create(&BytesLabels {
                direction: Direction::Inbound,
                flow: Flow::DownstreamToUpstream,
            })
            .inc();
        proxy
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: Direction::Inbound,
                reason: HandshakeFailure::UnknownIssuer,
            })
            .inc();
        let direction = DirectionLabels {
            direction: Direction::Outbound,
        };
        proxy.upstream_failures.get_or_create(&direction).inc();
        proxy.idle_timeouts.get_or_create(&direction).inc();
        proxy.detect_timeouts.get_or_create(&direction).inc();
        proxy
            .authz_decisions
            .get_or_create(&AuthzLabels {
                decision: AuthzDecision::Deny,
                policy: "default".into(),
                layer: Layer::L7,
            })
            .inc();
        proxy.record_request(&RequestOutcome {
            peer: PeerLabels::new(Direction::Inbound, None, None),
            status: 200,
            grpc_status: None,
            result: "",
            duration: Duration::from_millis(1),
            request_bytes: 1,
            response_bytes: 1,
        });
        let service = ServiceLabels {
            service: "shop/api".into(),
        };
        proxy
            .balancer_endpoints
            .get_or_create(&EndpointLabels {
                service: "shop/api".into(),
                state: "ready",
            })
            .set(1);
        proxy.balancer_pending.get_or_create(&service).set(1);
        proxy.no_endpoints.get_or_create(&service).inc();
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            other => panic!("{family}: type {other}"),
        };
        names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    names
}

/// The metric names (`sigil_...`) and recorded series names (`level:metric:operation`) in a
/// PromQL expression, outside its string literals.
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut recorded = BTreeSet::new();
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    for token in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if token.contains(':') {
            recorded.insert(token.to_string());
        } else if token.starts_with("sigil_") {
            metrics.insert(token.to_string());
        }
    }
    (metrics, recorded)
}

#[test]
fn every_metric_the_rules_use_is_one_the_components_serve() {
    let served = served_metric_names();
    // The encoding names what the code registers: spot checks of each component and type.
    for name in [
        "sigil_ca_sign_denied_total",
        "sigil_ca_root_expiry_timestamp_seconds",
        "sigil_agent_cert_expiry_timestamp_seconds",
        "sigil_agent_csr_duration_seconds_bucket",
        "sigil_proxy_requests_total",
        "sigil_proxy_request_duration_seconds_bucket",
        "sigil_proxy_sds_connected",
    ] {
        assert!(served.contains(name), "{name} not in {served:#?}");
    }

    let file = rules_file();
    let recorded: BTreeSet<String> = rules(&file)
        .filter_map(|r| r["record"].as_str().map(String::from))
        .collect();
    let mut used = BTreeSet::new();
    for rule in rules(&file) {
        let expr = rule["expr"].as_str().unwrap();
        let (metrics, recordings) = names_in(expr);
        for name in &metrics {
            assert!(
                served.contains(name),
                "{} uses {name}, which no component serves (served: {served:#?})",
                rule["record"].as_str().or(rule["alert"].as_str()).unwrap()
            );
        }
        for name in &recordings {
            assert!(recorded.contains(name), "{expr}: {name} is not recorded");
        }
        used.extend(metrics);
    }
    // The parse found the metrics of every component.
    for prefix in ["sigil_ca_", "sigil_agent_", "sigil_proxy_"] {
        assert!(
            used.iter().filter(|n| n.starts_with(prefix)).count() >= 2,
            "{prefix}: {used:?}"
        );
    }
    // ...and would catch a misnamed one.
    assert!(!served.contains("sigil_ca_certs_issued"));
    assert!(!served.contains("sigil_proxy_request_duration_bucket"));
}

#[test]
fn the_prometheus_rule_carries_exactly_the_rules_file() {
    let rendered = overlay();
    let rule = find(&rendered, "PrometheusRule", "sigil");
    assert_eq!(rule["apiVersion"], OPERATOR_API_VERSION);
    assert_eq!(namespace(rule), "sigil-system");
    let file = rules_file();
    assert_eq!(
        rule["spec"],
        json!({"groups": file["groups"]}),
        "deploy/overlays/prometheus-operator/prometheus-rule.yaml differs from \
         deploy/prometheus/rules.yaml: regenerate it (its header says how)"
    );
}

/// A running pod of `workload`'s template (a Deployment's or DaemonSet's), owned by `owner`
/// (kind, name) as its controller, with the pod IP `ip`.
fn pod_of(workload: &Value, owner: (&str, &str), pod_name: &str, ip: &str) -> Value {
    let template = &workload["spec"]["template"];
    json!({
        "metadata": {
            "name": pod_name,
            "namespace": namespace(workload),
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
            "ownerReferences": [{"kind": owner.0, "name": owner.1, "controller": true}],
        },
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip},
    })
}

/// The web pod of tests/fixtures/admission as the real injector patched it, with `annotations`
/// of its own, named `pod_name` at `ip`.
fn injected_pod(annotations: Value, pod_name: &str, ip: &str) -> Value {
    let mut review: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/admission/web-pod.review.json"))
            .unwrap(),
    )
    .unwrap();
    review["request"]["object"]["metadata"]["annotations"] = annotations;
    let config = sigil_ca::inject::InjectConfig {
        image: "sigil:test".into(),
        proxy_uid: sigil_proxy_api::PROXY_UID,
        excluded_namespaces: BTreeSet::new(),
        trace_collector: None,
    };
    let (response, _, _) = sigil_ca::inject::review(&serde_json::to_vec(&review).unwrap(), &config);
    let mut pod = sigil_test_harness::admission::apply(&review, &response);
    pod["metadata"]["name"] = json!(pod_name);
    pod["status"] = json!({"phase": "Running", "podIP": ip});
    pod
}

/// `__meta_kubernetes_pod_label_<name>`: Prometheus's label-name sanitizing.
fn sanitized(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn address(ip: &str, port: Option<u64>) -> String {
    match (ip.contains(':'), port) {
        (true, Some(port)) => format!("[{ip}]:{port}"),
        (false, Some(port)) => format!("{ip}:{port}"),
        (_, None) => ip.to_string(),
    }
}

/// The targets Prometheus's Kubernetes pod discovery makes of `pod`, as file_sd target groups:
/// one per container port (init containers after the others), one per container without ports,
/// each with the pod's and the container's `__meta_kubernetes_*` labels.
fn discovered_targets(pod: &Value) -> Vec<Value> {
    let meta = &pod["metadata"];
    let ip = pod["status"]["podIP"].as_str().unwrap();
    let mut labels = BTreeMap::from([
        (
            "__meta_kubernetes_namespace".to_string(),
            json!(namespace(pod)),
        ),
        ("__meta_kubernetes_pod_name".into(), json!(name(pod))),
        ("__meta_kubernetes_pod_ip".into(), json!(ip)),
        (
            "__meta_kubernetes_pod_phase".into(),
            pod["status"]["phase"].clone(),
        ),
        ("__meta_kubernetes_pod_ready".into(), json!("true")),
    ]);
    for (kind, prefix) in [
        ("labels", "__meta_kubernetes_pod_label_"),
        ("annotations", "__meta_kubernetes_pod_annotation_"),
    ] {
        for (key, value) in meta[kind].as_object().into_iter().flatten() {
            labels.insert(format!("{prefix}{}", sanitized(key)), value.clone());
        }
    }
    if let Some(owner) = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["controller"] == true)
    {
        labels.insert(
            "__meta_kubernetes_pod_controller_kind".into(),
            owner["kind"].clone(),
        );
        labels.insert(
            "__meta_kubernetes_pod_controller_name".into(),
            owner["name"].clone(),
        );
    }
    let spec = &pod["spec"];
    let containers = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c, false));
    let init = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c, true));
    let mut targets = Vec::new();
    for (container, is_init) in containers.chain(init) {
        let mut container_labels = labels.clone();
        container_labels.insert(
            "__meta_kubernetes_pod_container_name".into(),
            container["name"].clone(),
        );
        container_labels.insert(
            "__meta_kubernetes_pod_container_init".into(),
            json!(is_init.to_string()),
        );
        let ports = container["ports"].as_array().cloned().unwrap_or_default();
        if ports.is_empty() {
            targets.push(json!({"targets": [address(ip, None)], "labels": container_labels}));
        }
        for port in ports {
            let number = port["containerPort"].as_u64().unwrap();
            let mut port_labels = container_labels.clone();
            port_labels.insert(
                "__meta_kubernetes_pod_container_port_name".into(),
                json!(port["name"].as_str().unwrap_or_default()),
            );
            port_labels.insert(
                "__meta_kubernetes_pod_container_port_number".into(),
                json!(number.to_string()),
            );
            port_labels.insert(
                "__meta_kubernetes_pod_container_port_protocol".into(),
                json!(port["protocol"].as_str().unwrap_or("TCP")),
            );
            targets.push(json!({"targets": [address(ip, Some(number))], "labels": port_labels}));
        }
    }
    targets
}

/// deploy/prometheus/scrape-config.yaml with each job's Kubernetes pod discovery replaced by a
/// file_sd of `targets`, and rules.yaml beside it, in `dir`. It scrapes only hourly: the targets
/// are not there to answer, and the first scrape falls anywhere in the hour.
fn config_with_file_discovery(dir: &Path, targets: &[Value]) -> PathBuf {
    let mut config = yaml_file(&prometheus_dir().join("scrape-config.yaml")).remove(0);
    assert_eq!(config["rule_files"], json!(["rules.yaml"]));
    config["global"]["scrape_interval"] = json!("1h");
    let jobs = config["scrape_configs"].as_array_mut().unwrap();
    assert_eq!(jobs.len(), 2);
    let targets_file = dir.join("pods.json");
    std::fs::write(&targets_file, serde_json::to_vec(targets).unwrap()).unwrap();
    for job in jobs.iter_mut() {
        let job = job.as_object_mut().unwrap();
        let discovery = job
            .remove("kubernetes_sd_configs")
            .expect("kubernetes_sd_configs");
        assert_eq!(discovery, json!([{"role": "pod"}]), "{:?}", job["job_name"]);
        job.insert(
            "file_sd_configs".into(),
            json!([{"files": [targets_file.display().to_string()]}]),
        );
    }
    // JSON is YAML: Prometheus reads it as it is.
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::copy(prometheus_dir().join("rules.yaml"), dir.join("rules.yaml")).unwrap();
    path
}

/// `GET url` with curl (scripts/test installs it): the body, if it answered 200.
fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .expect("curl runs");
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap())
}

/// The real Prometheus, on loopback, relabels the targets its Kubernetes pod discovery would
/// find for sigil's pods: every injected proxy by its named port (also when the pod's own
/// scrape annotations point at its app), the CA and the agents by their annotations, no proxy
/// twice; each with the namespace, pod and workload labels the rules group by.
#[test]
fn the_scrape_config_passes_promtool_and_finds_proxies_ca_and_agents() {
    let base = kustomize(&repo().join("deploy"));
    let ca = pod_of(
        find(&base, "Deployment", "sigil-ca"),
        ("ReplicaSet", "sigil-ca-6b8f9d7c4"),
        "sigil-ca-6b8f9d7c4-h2x9q",
        "127.0.207.2",
    );
    let mut ca = ca;
    ca["metadata"]["labels"]["pod-template-hash"] = json!("6b8f9d7c4");
    // An IPv6 pod: the address is bracketed.
    let agent = pod_of(
        find(&base, "DaemonSet", "sigil-agent"),
        ("DaemonSet", "sigil-agent"),
        "sigil-agent-7xk2p",
        "::1",
    );
    let web = injected_pod(Value::Null, "web-7d9f8b6c5-abcde", "127.0.207.3");
    let annotated = injected_pod(
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9100"}),
        "web-7d9f8b6c5-fghij",
        "127.0.207.4",
    );
    assert_eq!(
        web["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    assert_eq!(
        annotated["metadata"]["annotations"]["prometheus.io/port"],
        "9100"
    );
    let mut bare = pod_of(
        find(&base, "Deployment", "sigil-ca"),
        ("ReplicaSet", "other-5c6d7"),
        "other-5c6d7-zzzzz",
        "127.0.207.5",
    );
    bare["metadata"]["annotations"] = json!({});
    let targets: Vec<Value> = [&ca, &agent, &web, &annotated, &bare]
        .into_iter()
        .flat_map(discovered_targets)
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let config = config_with_file_discovery(dir.path(), &targets);
    let checked = promtool(dir.path(), &["check", "config", "prometheus.yml"]);
    assert!(checked.status.success(), "{}", printed(&checked));
    assert!(
        printed(&checked).contains("rules.yaml"),
        "{}",
        printed(&checked)
    );

    // The real Prometheus: its targets API shows what the relabelling made of them (the pods'
    // addresses are loopback ones).
    let port = sigil_test_harness::free_addr().port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prometheus = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus runs (scripts/test installs Debian's prometheus package)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let active = loop {
        let targets = curl(&format!("http://127.0.0.1:{port}/api/v1/targets"))
            .and_then(|body| serde_json::from_str::<Value>(&body).ok());
        let active = targets
            .as_ref()
            .and_then(|t| t["data"]["activeTargets"].as_array().cloned())
            .unwrap_or_default();
        if active.len() >= 5 || Instant::now() > deadline {
            break active;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let found: BTreeSet<(String, String, String, String, String)> = active
        .iter()
        .map(|t| {
            let labels = &t["labels"];
            let text = |key: &str| labels[key].as_str().unwrap_or_default().to_string();
            (
                t["scrapePool"].as_str().unwrap().to_string(),
                t["scrapeUrl"].as_str().unwrap().to_string(),
                text("namespace"),
                text("pod"),
                text("workload"),
            )
        })
        .collect();
    assert_eq!(
        active.len(),
        found.len(),
        "a target found twice: {active:#?}"
    );
    let expected: BTreeSet<(String, String, String, String, String)> = [
        (
            "sigil-proxies",
            "http://127.0.207.3:15020/metrics",
            "shop",
            "web-7d9f8b6c5-abcde",
            "web",
        ),
        (
            "sigil-proxies",
            "http://127.0.207.4:15020/metrics",
            "shop",
            "web-7d9f8b6c5-fghij",
            "web",
        ),
        (
            "kubernetes-pods",
            "http://127.0.207.4:9100/metrics",
            "shop",
            "web-7d9f8b6c5-fghij",
            "web",
        ),
        (
            "kubernetes-pods",
            "http://127.0.207.2:15014/metrics",
            "sigil-system",
            "sigil-ca-6b8f9d7c4-h2x9q",
            "sigil-ca",
        ),
        (
            "kubernetes-pods",
            "http://[::1]:15021/metrics",
            "sigil-system",
            "sigil-agent-7xk2p",
            "sigil-agent",
        ),
    ]
    .into_iter()
    .map(|(a, b, c, d, e)| (a.into(), b.into(), c.into(), d.into(), e.into()))
    .collect();
    assert_eq!(
        found,
        expected,
        "prometheus log: {}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}

#[test]
fn the_prometheus_operator_overlay_renders_and_scrapes_what_it_means_to() {
    let rendered = overlay();
    let base = kustomize(&repo().join("deploy"));
    let (operator, kubernetes): (Vec<Value>, Vec<Value>) = rendered
        .iter()
        .cloned()
        .partition(|o| o["apiVersion"] == OPERATOR_API_VERSION);

    // The base, unchanged (so its manifest and RBAC tests hold for it), plus the Operator's
    // objects; every object labelled as sigil's.
    let sorted = |objects: &[Value]| {
        let mut described: Vec<String> = objects
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        described.sort();
        described
    };
    assert_eq!(sorted(&kubernetes), sorted(&base));
    let kinds: BTreeSet<(String, String)> = operator
        .iter()
        .map(|o| (kind(o).to_string(), name(o).to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("PodMonitor", "sigil-proxies"),
        ("PodMonitor", "sigil-agent"),
        ("ServiceMonitor", "sigil-ca"),
        ("PrometheusRule", "sigil"),
    ]
    .into_iter()
    .map(|(k, n)| (k.into(), n.into()))
    .collect();
    assert_eq!(kinds, expected);
    let unlabelled = unlabelled_objects(&rendered);
    assert!(unlabelled.is_empty(), "{unlabelled:#?}");
    for object in &operator {
        assert_eq!(namespace(object), "sigil-system", "{}", describe(object));
    }
    // The API's schemas, strict: kubernetes-validate's for the built-in kinds, the Operator's own
    // CRDs (vendored) for its kinds, undeclared fields refused as strict field validation does.
    let (_, problems) = kubernetes_schema_problems(&kubernetes, &["1.30", "latest"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let crds: Vec<Value> = ["podmonitors", "prometheusrules", "servicemonitors"]
        .iter()
        .flat_map(|plural| {
            yaml_file(&repo().join(format!(
                "{OPERATOR_CRDS}/monitoring.coreos.com_{plural}.yaml"
            )))
        })
        .collect();
    let schema_of = |object: &Value| {
        crd_schema(&crds, OPERATOR_API_VERSION, kind(object))
            .unwrap_or_else(|| panic!("no Operator CRD serves {}", describe(object)))
    };
    for object in &operator {
        let problems = custom_resource_problems(&schema_of(object), object);
        assert!(problems.is_empty(), "{}: {problems:#?}", describe(object));
    }
    // The check bites: a misspelt field and a wrong type are refused.
    let mut misspelt = find(&rendered, "PodMonitor", "sigil-proxies").clone();
    misspelt["spec"]["podMetricsEndpoints"][0]["portName"] = json!("metrics");
    misspelt["spec"]["namespaceSelector"]["any"] = json!("yes");
    let problems = custom_resource_problems(&schema_of(&misspelt), &misspelt);
    assert!(
        problems.iter().any(|p| p.contains("portName"))
            && problems.iter().any(|p| p.contains("any")),
        "{problems:#?}"
    );

    // The proxies' PodMonitor selects injected pods in any namespace, at the port the injector
    // names, and not the control plane's pods.
    let proxies = find(&rendered, "PodMonitor", "sigil-proxies");
    assert_eq!(proxies["spec"]["namespaceSelector"], json!({"any": true}));
    let endpoint = &proxies["spec"]["podMetricsEndpoints"][0];
    let pod = injected_pod(Value::Null, "web-7d9f8b6c5-abcde", "127.0.207.3");
    assert!(selects(
        &proxies["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == sigil_ca::inject::PROXY_CONTAINER)
        .unwrap();
    assert_eq!(
        named_port(proxy, endpoint["port"].as_str().unwrap()),
        u64::from(sigil_proxy_api::METRICS_PORT)
    );
    assert_eq!(endpoint["path"], "/metrics");
    let ca = find(&rendered, "Deployment", "sigil-ca");
    let agent = find(&rendered, "DaemonSet", "sigil-agent");
    for workload in [ca, agent] {
        assert!(!selects(
            &proxies["spec"]["selector"],
            &workload["spec"]["template"]["metadata"]["labels"]
        ));
    }
    // Its workload relabelling is the plain scrape config's, in the Operator's spelling.
    let plain = yaml_file(&prometheus_dir().join("scrape-config.yaml")).remove(0);
    let plain_workload: Vec<Value> = plain["scrape_configs"][0]["relabel_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["target_label"] == "workload")
        .map(|r| {
            let mut operator_form = json!({
                "sourceLabels": r["source_labels"],
                "targetLabel": "workload",
            });
            if let Some(regex) = r.get("regex") {
                operator_form["regex"] = regex.clone();
            }
            operator_form
        })
        .collect();
    assert_eq!(endpoint["relabelings"], json!(plain_workload));

    // The agent's PodMonitor: its pods, at the port the agent serves /metrics on.
    let agent_monitor = find(&rendered, "PodMonitor", "sigil-agent");
    assert!(selects(
        &agent_monitor["spec"]["selector"],
        &agent["spec"]["template"]["metadata"]["labels"]
    ));
    let agent_endpoint = &agent_monitor["spec"]["podMetricsEndpoints"][0];
    let agent_container = &agent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        named_port(agent_container, agent_endpoint["port"].as_str().unwrap()),
        agent["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    );

    // The CA's ServiceMonitor: the Service sigil-ca, whose named port reaches the CA's metrics.
    let ca_monitor = find(&rendered, "ServiceMonitor", "sigil-ca");
    let service = find(&rendered, "Service", "sigil-ca");
    assert!(selects(
        &ca_monitor["spec"]["selector"],
        &service["metadata"]["labels"]
    ));
    let port_name = ca_monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port_name)
        .unwrap_or_else(|| panic!("Service sigil-ca has no port {port_name}"));
    let ca_container = container(ca, "ca");
    assert_eq!(
        container_port(ca_container, &service_port["targetPort"]),
        ca["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .ok()
    );
}
