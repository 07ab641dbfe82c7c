//! The mesh the route tests run in (tests/e2e/routes_gamma.rs, tests/e2e/routes_resilience.rs):
//! one node, client pods and backend pods each with a transparent `sigil proxy run`, a CA and an
//! agent whose `--mesh-file` holds the Services and whose `--policy-file` holds the routes and
//! policies a test writes between its cases (Gateway API and sigil.dev objects as YAML, exactly
//! as a user writes them); backends run [`RouteEcho`], an echo application with fault knobs;
//! clients are real ones: `curl` (HTTP/1.1 and h2c) and PyPI's `grpcio`.
//!
//! Waiting for a policy change is done on the proxies' own word (their "routes updated" log line
//! with the version of the table they switched to), never with a fixed sleep.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use sigil_test_apiserver::{TestApiServer, parse_manifest};

use crate::l7::peer_python;
use crate::netns::{Netns, Node, PodProxy, http_get_in, proxy_init};
use crate::{MeshHost, serve_h1_or_h2};

/// The port every [`RouteEcho`] serves HTTP/1.1 and h2c on (the Services' HTTP targetPort).
pub const HTTP_PORT: u16 = 8080;
/// The port every [`RouteEcho`] serves gRPC on (the Services' gRPC targetPort).
pub const GRPC_PORT: u16 = 7070;
/// A request header that makes [`RouteEcho`] wait this many milliseconds before answering.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";

/// A pod of the test: its role (namespace name suffix and what its echo answers as `pod`), its
/// address, its proxy's uid and the SPIFFE ID that uid is attested as.
#[derive(Clone, Copy, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    pub uid: u32,
    pub id: &'static str,
}

/// A Service of the mesh file: `ports` are (name, port, targetPort, appProtocol); `endpoints`
/// name backend pods.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<(&'static str, u16, u16, &'static str)>,
    pub endpoints: Vec<&'static str>,
}

/// What [`RouteEcho`] does to the requests it gets, changed by the test at any time.
#[derive(Debug, Default)]
pub struct Faults {
    /// Percentage of requests answered with `fail_status` (chosen at random per request).
    pub fail_percent: AtomicU32,
    pub fail_status: AtomicU32,
    /// Delay before every answer.
    pub delay_ms: AtomicU64,
}

impl Faults {
    /// Fails `percent`% of requests with `status` from now on (0: none).
    pub fn fail(&self, percent: u32, status: u16) {
        self.fail_status.store(u32::from(status), Ordering::Relaxed);
        self.fail_percent.store(percent, Ordering::Relaxed);
    }

    /// Answers every request `delay` late from now on.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

/// One request as it reached a [`RouteEcho`].
#[derive(Clone, Debug)]
pub struct EchoSeen {
    pub method: String,
    /// Path and query, as received.
    pub path: String,
    pub host: String,
    /// Names lower-case, repeated values joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub at: Instant,
}

/// A backend pod's application: HTTP/1.1 and h2c on [`HTTP_PORT`], and gRPC on [`GRPC_PORT`]
/// (any method, bytes in and out, answered with `grpc-status: 0`). Every answer is one JSON line
/// (for gRPC: the message) saying which pod answered and what the request looked like there:
/// `{"pod", "method", "path", "host", "headers"}`; [`Faults`] make it fail or answer late, and
/// the request header [`DELAY_HEADER`] delays one request. Stops on drop.
pub struct RouteEcho {
    pub faults: Arc<Faults>,
    seen: Arc<Mutex<Vec<EchoSeen>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RouteEcho {
    pub fn start(pod: &Netns, name: &'static str) -> RouteEcho {
        let faults = Arc::new(Faults::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = [HTTP_PORT, GRPC_PORT]
            .into_iter()
            .map(|port| {
                let listener = pod.listen(port);
                let (faults, seen) = (faults.clone(), seen.clone());
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let _ = stream.set_nodelay(true);
                        let (faults, seen) = (faults.clone(), seen.clone());
                        tokio::spawn(serve_h1_or_h2(stream, move |request| {
                            echo(name, request, faults.clone(), seen.clone())
                        }));
                    }
                })
            })
            .collect();
        RouteEcho {
            faults,
            seen,
            tasks,
        }
    }

    /// The requests so far, in the order they were answered (delayed ones when they arrived).
    pub fn seen(&self) -> Vec<EchoSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests it has seen.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for RouteEcho {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A random number below 100 (the std hasher's random keys: no dependency for a coin).
fn percent_draw() -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (std::collections::hash_map::RandomState::new().hash_one(n) % 100) as u32
}

async fn echo(
    pod: &'static str,
    request: Request<Incoming>,
    faults: Arc<Faults>,
    seen: Arc<Mutex<Vec<EchoSeen>>>,
) -> Response<BoxBody<Bytes, std::convert::Infallible>> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let host = headers
        .get("host")
        .cloned()
        .or_else(|| request.uri().authority().map(ToString::to_string))
        .unwrap_or_default();
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), ToString::to_string);
    let grpc = headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/grpc"));
    seen.lock().unwrap().push(EchoSeen {
        method: method.clone(),
        path: path.clone(),
        host: host.clone(),
        headers: headers.clone(),
        at: Instant::now(),
    });
    let _ = request.into_body().collect().await;
    let delay = headers
        .get(DELAY_HEADER)
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| faults.delay_ms.load(Ordering::Relaxed));
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let answer =
        json!({"pod": pod, "method": method, "path": path, "host": host, "headers": headers});
    let fails = percent_draw() < faults.fail_percent.load(Ordering::Relaxed);
    if grpc {
        // Length-prefixed message, then the status in trailers (grpc-status 14, UNAVAILABLE,
        // when failing: what an overloaded server answers).
        let message = answer.to_string();
        let mut data = vec![0u8];
        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
        data.extend_from_slice(message.as_bytes());
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert(
            "grpc-status",
            if fails { "14" } else { "0" }.parse().unwrap(),
        );
        let body = Full::new(Bytes::from(data)).with_trailers(async { Some(Ok(trailers)) });
        return Response::builder()
            .header("content-type", "application/grpc")
            .header("x-echo-pod", pod)
            .body(BoxBody::new(body))
            .unwrap();
    }
    let status = if fails {
        faults.fail_status.load(Ordering::Relaxed) as u16
    } else {
        200
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-echo-pod", pod)
        .body(BoxBody::new(Full::new(Bytes::from(format!("{answer}\n")))))
        .unwrap()
}

/// A pod with its namespace, its proxy and (for backends) its echo.
pub struct MeshPod {
    pub spec: PodSpec,
    pub netns: Netns,
    pub proxy: PodProxy,
    pub echo: Option<RouteEcho>,
}

/// The running mesh of a route test. Created once per test module; cases change the policy
/// file with [`RoutesMesh::apply`].
pub struct RoutesMesh {
    pub dir: tempfile::TempDir,
    pub node: Node,
    pub host: MeshHost,
    pub clients: Vec<MeshPod>,
    pub backends: Vec<MeshPod>,
    pub services: Vec<ServiceSpec>,
    policy_file: PathBuf,
}

/// The mesh file for `pods` and `services`.
fn mesh_file(pods: &[PodSpec], services: &[ServiceSpec]) -> String {
    let mut yaml = String::from("members:\n");
    for pod in pods {
        yaml.push_str(&format!("- {{ip: {}, id: \"{}\"}}\n", pod.ip, pod.id));
    }
    yaml.push_str("services:\n");
    for service in services {
        let ip_of = |name: &str| {
            pods.iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no pod {name}"))
                .ip
        };
        yaml.push_str(&format!(
            "- namespace: {}\n  name: {}\n  clusterIPs: [{}]\n  ports:\n",
            service.namespace, service.name, service.cluster_ip
        ));
        for (name, port, target, protocol) in &service.ports {
            yaml.push_str(&format!(
                "  - {{name: {name}, port: {port}, targetPort: {target}, appProtocol: {protocol}}}\n"
            ));
        }
        yaml.push_str("  endpoints:\n");
        for endpoint in &service.endpoints {
            yaml.push_str(&format!("  - {{ip: {}}}\n", ip_of(endpoint)));
        }
    }
    yaml
}

/// Replaces `path` with `contents` in one rename, so that the agent never reads half of it.
fn replace_file(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

impl RoutesMesh {
    /// Namespaces `<prefix>-<pid>-*`: the node at `node_ip`, the `clients` (proxies only) and
    /// the `backends` (proxy and [`RouteEcho`] each), the CA and agent in the host's namespace,
    /// the policy file empty; waits until every client proxy has the Services.
    pub async fn start(
        prefix: &str,
        node_ip: Ipv4Addr,
        clients: &[PodSpec],
        backends: &[PodSpec],
        services: Vec<ServiceSpec>,
    ) -> RoutesMesh {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<PodSpec> = clients.iter().chain(backends).copied().collect();
        let mesh = dir.path().join("mesh.yaml");
        replace_file(&mesh, &mesh_file(&all, &services));
        let policy_file = dir.path().join("policy.yaml");
        replace_file(&policy_file, "");
        let node = Node::new(prefix, node_ip);
        let workloads: Vec<(u32, &str)> = all.iter().map(|p| (p.uid, p.id)).collect();
        let host = MeshHost::start(
            dir.path(),
            &workloads,
            "1h",
            &[
                "--mesh-file",
                mesh.to_str().unwrap(),
                "--policy-file",
                policy_file.to_str().unwrap(),
            ],
        )
        .await;
        let mut started = Vec::new();
        for spec in &all {
            let netns = node.add_pod(spec.name, spec.ip);
            let echo = backends
                .iter()
                .any(|b| b.name == spec.name)
                .then(|| RouteEcho::start(&netns, spec.name));
            proxy_init(&netns, spec.uid);
            let proxy = PodProxy::start(
                &netns,
                spec.ip,
                None,
                spec.uid,
                &host.socket,
                &[],
                dir.path().join(format!("proxy-{}.log", spec.name)),
                &node.c,
            )
            .await;
            started.push(MeshPod {
                spec: *spec,
                netns,
                proxy,
                echo,
            });
        }
        let backends_started = started.split_off(clients.len());
        let mesh = RoutesMesh {
            dir,
            node,
            host,
            clients: started,
            backends: backends_started,
            services,
            policy_file,
        };
        for client in &mesh.clients {
            client
                .proxy
                .wait_for_services(mesh.services.len() as u64)
                .await;
        }
        mesh
    }

    pub fn client(&self, name: &str) -> &MeshPod {
        self.clients
            .iter()
            .find(|c| c.spec.name == name)
            .unwrap_or_else(|| panic!("no client {name}"))
    }

    pub fn backend(&self, name: &str) -> &MeshPod {
        self.backends
            .iter()
            .find(|c| c.spec.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The echo of backend pod `name`.
    pub fn echo(&self, name: &str) -> &RouteEcho {
        self.backend(name).echo.as_ref().unwrap()
    }

    /// Writes `yaml` as the whole policy file and waits (15 s at most) until every proxy of
    /// `wait_for` (pod names) has taken a routes update after this write: the agent re-reads the
    /// file every second and pushes each client only what changed for it, so `wait_for` names
    /// the proxies this change reaches.
    pub async fn apply(&self, yaml: &str, wait_for: &[&str]) {
        let before: Vec<(String, usize)> = wait_for
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    self.pod(name).proxy_routes_updates().len(),
                )
            })
            .collect();
        replace_file(&self.policy_file, yaml);
        let deadline = Instant::now() + Duration::from_secs(15);
        for (name, count) in before {
            let pod = self.pod(&name);
            while pod.proxy_routes_updates().len() <= count {
                assert!(
                    Instant::now() < deadline,
                    "{name}'s proxy took no routes update after the policy file changed to:\n\
                     {yaml}\n{}",
                    self.recent_logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// [`metric_sum`] over the /metrics of pod `name`'s proxy (read from the node).
    pub async fn metric(&self, name: &str, series: &str, labels: &[(&str, &str)]) -> f64 {
        let pod = self.pod(name);
        let (status, text) = http_get_in(&self.node.c.name, pod.proxy.metrics, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("reading {name}'s proxy /metrics: {e}"));
        assert_eq!(status, 200, "{text}");
        metric_sum(&text, series, labels)
    }

    pub fn pod(&self, name: &str) -> &MeshPod {
        self.clients
            .iter()
            .chain(&self.backends)
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The last lines (access log excluded) of the agent's and every proxy's log.
    pub fn recent_logs(&self) -> String {
        let tail = |log: String, count: usize| {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("\"sigil_access\""))
                .collect();
            lines[lines.len().saturating_sub(count)..].join("\n")
        };
        let mut out = format!("\n--- agent:\n{}", tail(self.host.agent.logs(), 20));
        for pod in self.clients.iter().chain(&self.backends) {
            out.push_str(&format!(
                "\n--- {}'s proxy:\n{}",
                pod.spec.name,
                tail(pod.proxy.logs(), 12)
            ));
        }
        out
    }
}

impl MeshPod {
    /// The proxy's "routes updated" log lines so far (one per route table it switched to).
    pub fn proxy_routes_updates(&self) -> Vec<Value> {
        self.proxy
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "routes updated")
            .collect()
    }

    /// One `curl` inside this pod (through its proxy, as root): `args` before the URL.
    pub async fn curl(&self, args: &[&str], url: &str) -> CurlAnswer {
        let mut command = self.netns.command(&[
            "curl",
            "--silent",
            "--show-error",
            "--include",
            "--max-time",
            "10",
        ]);
        command.args(args).arg(url);
        let out = tokio::process::Command::from(command)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running a command in {}: {e}", self.spec.name));
        CurlAnswer::parse(&String::from_utf8_lossy(&out.stdout), &out.stderr)
    }

    /// `count` requests to `url` over one keep-alive connection (one `curl`, `args` given once,
    /// e.g. `--rate 60/s`), each answer's status, answering pod (from a [`RouteEcho`] JSON
    /// body), `Retry-After` and time.
    pub async fn curl_many(&self, args: &[&str], url: &str, count: usize) -> Vec<ManyAnswer> {
        let mut command = self.netns.command(&[
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--write-out",
            "\n%{http_code} %{time_total} [%header{retry-after}]\n",
        ]);
        command.args(args);
        for _ in 0..count {
            command.arg(url);
        }
        let out = tokio::process::Command::from(command)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running curl in {}: {e}", self.spec.name));
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.stderr.is_empty() {
            println!(
                "  curl in {} said: {}",
                self.spec.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut answers = Vec::new();
        let mut pod = String::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Ok(body) = serde_json::from_str::<Value>(line)
                && body.is_object()
            {
                pod = body["pod"].as_str().unwrap_or_default().to_owned();
                continue;
            }
            let mut fields = line.splitn(3, ' ');
            let (Some(status), Some(seconds), Some(retry_after)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(status), Ok(seconds)) = (status.parse::<u16>(), seconds.parse::<f64>()) else {
                continue;
            };
            let retry_after = retry_after.trim_start_matches('[').trim_end_matches(']');
            answers.push(ManyAnswer {
                status,
                pod: std::mem::take(&mut pod),
                retry_after: (!retry_after.is_empty()).then(|| retry_after.to_owned()),
                time: Duration::from_secs_f64(seconds),
            });
        }
        assert_eq!(
            answers.len(),
            count,
            "curl answered {} of {count}: {}\n{text}",
            answers.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        answers
    }

    /// Runs `script` (Python with `grpcio`) inside this pod with `args`; its stdout, panicking
    /// with its output unless it exits 0.
    pub async fn python(&self, script: &str, args: &[&str]) -> String {
        let mut command = self.netns.command(&[peer_python(), "-c", script]);
        command.args(args);
        let out = tokio::process::Command::from(command)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running a command in {}: {e}", self.spec.name));
        assert!(
            out.status.success(),
            "python in {} failed: {}{}",
            self.spec.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `calls` unary gRPC calls of `method` (`/pkg.Service/Method`) to `target` with
    /// `metadata`, by PyPI's grpcio on one channel: per call, the status code name and the
    /// answer (the echo's JSON when OK).
    pub async fn grpc_calls(
        &self,
        target: &str,
        method: &str,
        metadata: &[(&str, &str)],
        calls: usize,
    ) -> Vec<(String, Value)> {
        let metadata = serde_json::to_string(metadata).unwrap();
        let out = self
            .python(
                GRPC_CLIENT,
                &[target, method, &metadata, &calls.to_string()],
            )
            .await;
        out.lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("grpc client line {line:?}: {e}"));
                (
                    v["code"].as_str().unwrap_or_default().to_owned(),
                    v["answer"].clone(),
                )
            })
            .collect()
    }
}

/// grpcio client: argv = target, method, metadata (JSON list of pairs), calls. One JSON line
/// per call: `{"code": "OK", "answer": <the echo's JSON>}` or the error code and details.
const GRPC_CLIENT: &str = r#"
import json, sys, grpc
target, method, metadata, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
options = [("grpc.enable_http_proxy", 0)]
with grpc.insecure_channel(target, options=options) as channel:
    grpc.channel_ready_future(channel).result(timeout=10)
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    for _ in range(calls):
        try:
            answer = call(b"ping", metadata=[tuple(m) for m in metadata], timeout=10)
            print(json.dumps({"code": "OK", "answer": json.loads(answer)}), flush=True)
        except grpc.RpcError as error:
            print(json.dumps({"code": error.code().name, "answer": error.details()}), flush=True)
"#;

/// One answer `curl --include` printed: status, headers (names lower-case, the last response's
/// when curl followed), body; or curl's error.
#[derive(Debug)]
pub struct CurlAnswer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
    pub error: String,
}

impl CurlAnswer {
    fn parse(out: &str, stderr: &[u8]) -> CurlAnswer {
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        CurlAnswer {
            status,
            headers,
            body: body.to_owned(),
            error: String::from_utf8_lossy(stderr).into_owned(),
        }
    }

    /// The echo's JSON answer (`Value::Null` if the body is not one).
    pub fn echo(&self) -> Value {
        serde_json::from_str(self.body.trim()).unwrap_or(Value::Null)
    }

    /// The pod whose echo answered ("" if none did).
    pub fn pod(&self) -> String {
        self.echo()["pod"].as_str().unwrap_or_default().to_owned()
    }
}

/// One answer of [`MeshPod::curl_many`].
#[derive(Clone, Debug)]
pub struct ManyAnswer {
    pub status: u16,
    /// The pod whose echo answered ("" if none did).
    pub pod: String,
    pub retry_after: Option<String>,
    /// From sending the request to the end of its answer, as curl measured it.
    pub time: Duration,
}

/// The `(pod name, count)` of answers, for printing and checking shares.
pub fn count_by_pod(answers: &[ManyAnswer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.pod.clone()).or_default() += 1;
    }
    counts
}

/// The sum of the samples of `name` whose labels include every one of `labels`, in Prometheus
/// text `text` (label order and the other labels do not matter).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            (series_name == name).then_some(())?;
            let set = rest.strip_suffix('}')?;
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The Gateway API release the tests install (standard channel), vendored from its tag.
pub const GATEWAY_API_CRDS: &str = "tests/fixtures/gateway-api/v1.6.1/standard-install.yaml";

/// Creates in `server` every CustomResourceDefinition of the manifests at `files` (paths from
/// the repository's root), as `kubectl apply` would before the objects that use them.
pub async fn install_crds(server: &TestApiServer, files: &[&str]) {
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for file in files {
        let text = std::fs::read_to_string(crate::manifests::repo().join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        for document in parse_manifest(&text).unwrap() {
            if document["kind"] == "CustomResourceDefinition" {
                let crd: CustomResourceDefinition = serde_json::from_value(document).unwrap();
                crds.create(&PostParams::default(), &crd)
                    .await
                    .unwrap_or_else(|e| panic!("creating a CRD of {file}: {e}"));
            }
        }
    }
}
