//! The node agent's `sigil.mesh.v1.ServiceDiscovery`, end to end: the real `sigil agent run`
//! (Kubernetes attestor) against the Kubernetes API test double, read by the generated tonic
//! client from inside a pod's cgroup (this test binary, run again as a child in a `PodCgroup`, so
//! that the agent attests it as that pod), which applies every message to a `ServiceTable` as a
//! proxy does. A meshed Service's endpoints come from its EndpointSlices with each endpoint's
//! identity; an EndpointSlice change arrives as an upsert of that Service alone, its deletion as
//! a removal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use prost::Message;
use serde_json::{Value, json};
use sigil_proto::sigil::mesh::v1::{Protocol, ServiceUpdate};
use sigil_proxy_api::services::ServiceTable;
use sigil_proxy_api::{OPAQUE_PORTS_ANNOTATION, TLS_MODE_LABEL, TLS_MODE_MTLS};
use sigil_test_apiserver::{PodSpec, TestApiServer};
use sigil_test_harness::l7::peer_python;
use sigil_test_harness::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const NAMESPACE: &str = "demo";
const API_ID: &str = "spiffe://cluster.local/ns/demo/sa/api";
/// Longest wait for a message the agent owes the client.
const WAIT: Duration = Duration::from_secs(20);
/// The prefix of the child's lines carrying a message.
const UPDATE: &str = "UPDATE ";
/// The child: PyPI's grpcio following `WatchServices` on the agent socket (`argv[1]`), each
/// message printed as it came off the wire, in hex, for the test to decode.
const WATCH_SERVICES_PY: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
watch = channel.unary_stream("/sigil.mesh.v1.ServiceDiscovery/WatchServices")
for message in watch(b""):
    print("UPDATE " + message.hex(), flush=True)
"#;

/// A labelled (meshed) pod of `demo` on node-b with `ip` as its address.
fn meshed_pod(name: &str, ip: &str) -> PodSpec {
    PodSpec::new(NAMESPACE, name, "api", "node-b")
        .with_label(TLS_MODE_LABEL, TLS_MODE_MTLS)
        .with_ip(ip.parse::<std::net::IpAddr>().unwrap())
}

/// An endpoint of the api slice: `(address, pod, ready, serving, terminating)`.
type SliceEndpoint = (&'static str, &'static str, bool, bool, bool);

/// The api Service's EndpointSlice, as the EndpointSlice controller writes it.
fn api_slice(endpoints: &[SliceEndpoint]) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, pod, ready, serving, terminating)| {
            json!({
                "addresses": [address],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": "node-b",
                "zone": "zone-1",
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": "api-x7k2p",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": "api"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

/// The child ([`WATCH_SERVICES_PY`]) inside a pod's cgroup, its messages read line by line and
/// applied as the proxy applies them.
struct ServicesClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    table: ServiceTable,
    /// What else it printed (libtest's lines), for a failure's message.
    other: Vec<String>,
    stderr: PathBuf,
}

impl ServicesClient {
    fn start(dir: &Path, cgroup: &PodCgroup, socket: &Path) -> ServicesClient {
        let mut command = std::process::Command::new(peer_python());
        command.arg("-c").arg(WATCH_SERVICES_PY).arg(socket);
        let stderr = dir.join("client.log");
        let mut child = tokio::process::Command::from(cgroup.enter(&command))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        ServicesClient {
            child,
            lines,
            table: ServiceTable::default(),
            other: Vec::new(),
            stderr,
        }
    }

    /// Ends the client, so that its cgroup can go.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// The next message the client received, as it printed it.
    async fn next(&mut self, agent: &Proc) -> Value {
        let (lines, other) = (&mut self.lines, &mut self.other);
        let line = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                match line.strip_prefix(UPDATE) {
                    Some(update) => return Some(update.to_owned()),
                    None => other.push(line),
                }
            }
            None
        })
        .await;
        match line {
            Ok(Some(hex)) => {
                let bytes = unhex(&hex).expect("the agent writes whole bytes of hex");
                let update = ServiceUpdate::decode(bytes.as_slice()).unwrap();
                // Checked entry by entry as the proxy checks it.
                self.table = self.table.apply(&update, &td()).unwrap();
                update_json(&update)
            }
            _ => panic!(
                "no message from the agent ({line:?}); client:\n{}\n{}\nagent:\n{}",
                self.other.join("\n"),
                std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                agent.logs()
            ),
        }
    }
}

/// A message as a test compares it, with every field it carries.
fn update_json(update: &ServiceUpdate) -> Value {
    let upserts: Vec<Value> = update
        .upserts
        .iter()
        .map(|service| {
            let ports: Vec<Value> = service
                .ports
                .iter()
                .map(|port| json!({"name": port.name, "port": port.port, "protocol": port.protocol, "appProtocol": port.app_protocol}))
                .collect();
            let endpoints: Vec<Value> = service
                .endpoints
                .iter()
                .map(|endpoint| {
                    let ports: BTreeMap<&str, u32> = endpoint
                        .ports
                        .iter()
                        .map(|port| (port.name.as_str(), port.port))
                        .collect();
                    json!({
                        "ip": endpoint.ip,
                        "ports": ports,
                        "id": endpoint.spiffe_id,
                        "ready": endpoint.ready,
                        "serving": endpoint.serving,
                        "terminating": endpoint.terminating,
                        "node": endpoint.node,
                        "zone": endpoint.zone,
                        "source": endpoint.source,
                    })
                })
                .collect();
            json!({
                "service": format!("{}/{}", service.namespace, service.name),
                "clusterIPs": service.cluster_ips,
                "ports": ports,
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({
        "version": update.version,
        "reset": update.reset,
        "upserts": upserts,
        "removals": update.removals,
    })
}

/// The one Service of `update`'s upserts named `demo/api`.
fn api_service(update: &Value) -> &Value {
    let upserts = update["upserts"].as_array().unwrap();
    let api: Vec<&Value> = upserts
        .iter()
        .filter(|service| service["service"] == "demo/api")
        .collect();
    assert_eq!(api.len(), 1, "{update}");
    api[0]
}

fn endpoint(address: &str, pod: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "ip": address,
        "ports": {"http": 8080},
        "id": API_ID,
        "ready": ready,
        "serving": serving,
        "terminating": terminating,
        "node": "node-b",
        "zone": "zone-1",
        "source": format!("{NAMESPACE}/{pod}"),
    })
}

#[tokio::test]
async fn services_from_endpoint_slices_then_only_their_changes() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let agent_pod = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-a",
        "sigil-agent",
        "node-a",
    ));
    // The client's pod, on the agent's node.
    let web = server.add_pod(&PodSpec::new(NAMESPACE, "web-1", "web", "node-a"));
    server.add_pod(&meshed_pod("api-1", "198.18.0.2"));
    server.add_pod(&meshed_pod("api-2", "198.18.0.3"));
    let services: Api<Service> = Api::namespaced(server.client(), NAMESPACE);
    // Its opaque-ports annotation does not parse: ignored (the port stays HTTP), logged once.
    let service: Service = serde_json::from_value(json!({
        "metadata": {
            "name": "api",
            "namespace": NAMESPACE,
            "annotations": {OPAQUE_PORTS_ANNOTATION: "mysql"},
        },
        "spec": {
            "clusterIP": "198.19.0.10",
            "clusterIPs": ["198.19.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}],
        },
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), NAMESPACE);
    slices
        .create(
            &PostParams::default(),
            &api_slice(&[
                ("198.18.0.2", "api-1", true, true, false),
                ("198.18.0.3", "api-2", true, true, false),
            ]),
        )
        .await
        .unwrap();

    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &[] as &[&str]);
    ca.wait_ready().await;
    let socket = dir.path().join("agent.sock");
    let (agent, admin) = spawn_k8s_agent(
        dir.path(),
        &server,
        &kubeconfig,
        &ca,
        &agent_pod,
        "node-a",
        &socket,
    )
    .await;
    wait_agent_ready(&agent, admin, "").await;

    let cgroup = PodCgroup::create(&web, "c11e47");
    let mut client = ServicesClient::start(dir.path(), &cgroup, &socket);

    // First: every meshed Service, with each endpoint's identity.
    let reset = client.next(&agent).await;
    assert_eq!(reset["reset"], true, "{reset}");
    assert_eq!(
        *api_service(&reset),
        json!({
            "service": "demo/api",
            "clusterIPs": ["198.19.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": Protocol::Http1 as i32, "appProtocol": "http"}],
            "endpoints": [
                endpoint("198.18.0.2", "api-1", true, true, false),
                endpoint("198.18.0.3", "api-2", true, true, false),
            ],
        })
    );
    println!("first message: {reset}");

    // A rollout step: api-1 is terminating and a new meshed pod is added. Only the slice change
    // changes the Service (the new pod alone changes only the membership). Kubernetes lists a
    // pod in a slice only once it is ready, long after its creation; the agent's two watches
    // keep no order between them, so the test waits for the pod to be a member first (else the
    // slice would name an address not meshed yet, and the Service would rightly drop out).
    let members = || async {
        let text = http_get(admin, "/metrics").await.unwrap().1;
        metric(&text, "sigil_agent_mesh_members")
    };
    let before = members().await;
    server.add_pod(&meshed_pod("api-3", "198.18.0.4"));
    eventually("the new pod is a mesh member", || async {
        members().await > before
    })
    .await;
    let changed = api_slice(&[
        ("198.18.0.2", "api-1", false, true, true),
        ("198.18.0.3", "api-2", true, true, false),
        ("198.18.0.4", "api-3", true, true, false),
    ]);
    slices
        .patch(
            "api-x7k2p",
            &PatchParams::default(),
            &Patch::Merge(&json!({"endpoints": changed.endpoints})),
        )
        .await
        .unwrap();
    let update = client.next(&agent).await;
    assert_eq!(update["reset"], false, "{update}");
    assert_eq!(update["removals"], json!([]), "{update}");
    assert_eq!(
        update["upserts"],
        json!([{
            "service": "demo/api",
            "clusterIPs": ["198.19.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": Protocol::Http1 as i32, "appProtocol": "http"}],
            "endpoints": [
                endpoint("198.18.0.2", "api-1", false, true, true),
                endpoint("198.18.0.3", "api-2", true, true, false),
                endpoint("198.18.0.4", "api-3", true, true, false),
            ],
        }]),
        "just that Service"
    );
    assert!(update["version"].as_u64() > reset["version"].as_u64());
    let warnings = agent
        .logs()
        .matches("annotation is invalid; it is ignored")
        .count();
    assert_eq!(warnings, 1, "once, not on every change:\n{}", agent.logs());

    // The Service is deleted: a removal.
    services
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    let removal = client.next(&agent).await;
    assert_eq!(
        (&removal["reset"], &removal["upserts"], &removal["removals"]),
        (&json!(false), &json!([]), &json!(["demo/api"])),
        "{removal}"
    );

    let metrics = http_get(admin, "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, "sigil_agent_pushes_total{api=\"services\"}"),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sigil_agent_streams{api=\"services\"}"),
        1.0
    );
    assert_eq!(metric(&metrics, "sigil_agent_mesh_services"), 0.0);
    client.stop().await;
    drop(agent);
    drop(cgroup);
}
