//! The node agent's `sigil.route.v1.RouteDiscovery`, end to end: the real `sigil agent run`
//! (Unix attestor, `--mesh-file` with meshed Services, `--policy-file` holding an HTTPRoute
//! beside an AuthorizationPolicy), read by PyPI's grpcio on the agent socket, each message
//! applied to a `RouteTable` as the proxy applies it. The first message is the client's whole
//! view (`reset`); editing the file sends only the Service port whose route changed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prost::Message;
use sigil_proto::sigil::route::v1::{RouteOrigin, RouteUpdate};
use sigil_proxy_api::routes::RouteTable;
use sigil_route::{BackendTarget, PortKey, ServiceRef};
use sigil_test_harness::l7::peer_python;
use sigil_test_harness::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// The client's identity: a workload of `demo`, so the producer routes of `demo` apply to it.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// Longest wait for a message the agent owes the client.
const WAIT: Duration = Duration::from_secs(20);
const UPDATE: &str = "UPDATE ";
/// The child: grpcio following `WatchRoutes` on the agent socket (`argv[1]`), each message
/// printed as it came off the wire, in hex.
const WATCH_ROUTES_PY: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
watch = channel.unary_stream("/sigil.route.v1.RouteDiscovery/WatchRoutes")
for message in watch(b""):
    print("UPDATE " + message.hex(), flush=True)
"#;

/// Two meshed Services of `demo` (api and api-v2), each with one endpoint, port 80.
const MESH_FILE: &str = "members:
- {ip: 198.18.0.2, id: \"spiffe://cluster.local/ns/demo/sa/api\"}
- {ip: 198.18.0.3, id: \"spiffe://cluster.local/ns/demo/sa/api\"}
services:
- namespace: demo
  name: api
  clusterIPs: [198.19.0.10]
  ports: [{name: http, port: 80, targetPort: 8080}]
  endpoints: [{ip: 198.18.0.2}]
- namespace: demo
  name: api-v2
  clusterIPs: [198.19.0.11]
  ports: [{name: http, port: 80, targetPort: 8080}]
  endpoints: [{ip: 198.18.0.3}]
";

const ALLOW_ALL: &str = "apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: demo}
spec: {action: ALLOW, rules: [{}]}
";

/// An HTTPRoute on Service `parent` sending `/v2` to api-v2 and the rest to api.
fn route(parent: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {parent}, namespace: demo}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: api-v2, port: 80}}]
  - backendRefs: [{{name: api, port: 80}}]
"
    )
}

/// Replaces the file whole, never seen half-written by a poll.
fn replace(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The child ([`WATCH_ROUTES_PY`]), its messages applied as the proxy applies them.
struct RoutesClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    table: RouteTable,
    stderr: PathBuf,
}

impl RoutesClient {
    fn start(dir: &Path, socket: &Path) -> RoutesClient {
        let stderr = dir.join("client.log");
        let mut child = tokio::process::Command::new(peer_python())
            .arg("-c")
            .arg(WATCH_ROUTES_PY)
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        RoutesClient {
            child,
            lines,
            table: RouteTable::default(),
            stderr,
        }
    }

    /// The next message the client received, applied to its table.
    async fn next(&mut self, agent: &Proc) -> RouteUpdate {
        let lines = &mut self.lines;
        let line = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(update) = line.strip_prefix(UPDATE) {
                    return Some(update.to_owned());
                }
            }
            None
        })
        .await;
        let Ok(Some(hex)) = line else {
            panic!(
                "no message from the agent ({line:?}); client:\n{}\nagent:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                agent.logs()
            );
        };
        let bytes = unhex(&hex).expect("the agent writes whole bytes of hex");
        let update = RouteUpdate::decode(bytes.as_slice()).unwrap();
        // Checked entry by entry as the proxy checks it.
        self.table = self.table.apply(&update).unwrap();
        update
    }
}

fn port(name: &str) -> PortKey {
    PortKey {
        service: ServiceRef {
            namespace: "demo".into(),
            name: name.into(),
        },
        port: 80,
    }
}

/// The Services the HTTP rules of `key`'s table send to, rule by rule.
fn rule_backends(table: &RouteTable, key: &PortKey) -> Vec<Vec<String>> {
    let routes = &table.routes.ports[key];
    let http = routes.http.as_ref().expect("an HTTP table");
    http.rules
        .iter()
        .map(|rule| {
            rule.backends
                .entries
                .iter()
                .map(|entry| match &entry.target {
                    BackendTarget::Service(backend) => {
                        format!("{}:{}", backend.service, backend.port)
                    }
                    BackendTarget::Invalid(why) => format!("invalid: {why}"),
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn routes_from_the_policy_file_reach_the_client_then_only_their_changes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, MESH_FILE).unwrap();
    let policies = dir.join("policies.yaml");
    std::fs::write(&policies, format!("{ALLOW_ALL}---\n{}", route("api"))).unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let host = MeshHost::start(
        dir,
        &[(uid, CLIENT_ID)],
        "1h",
        &[
            "--mesh-file",
            mesh.to_str().unwrap(),
            "--policy-file",
            policies.to_str().unwrap(),
        ],
    )
    .await;
    let mut client = RoutesClient::start(dir, &host.socket);

    let first = client.next(&host.agent).await;
    assert!(first.reset, "{first:?}");
    assert_eq!(first.port_upserts.len(), 1, "{first:?}");
    assert_eq!(
        (
            first.port_upserts[0].name.as_str(),
            first.port_upserts[0].port,
            first.port_upserts[0].origin
        ),
        ("api", 80, RouteOrigin::Producer as i32)
    );
    assert_eq!(
        rule_backends(&client.table, &port("api")),
        [vec!["demo/api-v2:80"], vec!["demo/api:80"]]
    );

    // A second route, on api-v2: only it is sent.
    replace(
        &policies,
        &format!("{ALLOW_ALL}---\n{}---\n{}", route("api"), route("api-v2")),
    );
    let second = client.next(&host.agent).await;
    assert!(!second.reset);
    let upserted: Vec<&str> = second
        .port_upserts
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(upserted, ["api-v2"], "{second:?}");
    assert!(second.port_removals.is_empty());
    assert_eq!(client.table.routes.ports.len(), 2);

    // The first route goes: only its removal is sent; the policy stays untouched.
    replace(&policies, &format!("{ALLOW_ALL}---\n{}", route("api-v2")));
    let third = client.next(&host.agent).await;
    assert!(third.port_upserts.is_empty(), "{third:?}");
    assert_eq!(third.port_removals, ["demo/api:80"]);
    assert_eq!(
        client.table.routes.ports.keys().collect::<Vec<_>>(),
        [&port("api-v2")]
    );
    let _ = client.child.kill().await;
}
