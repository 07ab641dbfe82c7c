//! A route's backend outside the mesh, as root in network namespaces with the agent on the
//! Kubernetes API test double (only Kubernetes tells the agent about Services that are not
//! meshed): an HTTPRoute on the meshed Service `front` sends every request to the Service
//! `plain`, whose only endpoint is a pod without a proxy. The client's proxy reaches `plain` at
//! its cluster IP in plaintext (the node picks the endpoint, as kube-proxy does) instead of
//! answering 500, and the answer comes back to the client.
//!
//! ```text
//!   pod demo/web-1 (netns a, 198.18.62.1)      pod demo/plain-1 (netns u, 198.18.62.3)
//!   curl → sigil proxy (uid 41801,              echo :8080, no proxy, not a mesh member
//!          web-1's cgroup, --attestor k8s)        ▲
//!     │ plaintext to plain 198.18.63.11:80        │ DNAT (kube-proxy's chains)
//!     └──────────── br0 in C 198.18.62.100 ───────┘
//!   front 198.18.63.10:80 → demo/front-1 198.18.62.2 (a meshed pod in the API only: the route
//!   sends nothing there, and nothing listens on it)
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use sigil_proxy_api::{TLS_MODE_LABEL, TLS_MODE_MTLS};
use sigil_test_apiserver::{PodSpec, TestApiServer};
use sigil_test_harness::netns::{ClusterIpService, Node, PodProxy, proxy_init, require_root};
use sigil_test_harness::routes::{
    GATEWAY_API_CRDS, HTTP_PORT, MeshPod, PodSpec as MeshPodSpec, RouteEcho, install_crds,
};
use sigil_test_harness::{PodCgroup, start_k8s_mesh};

/// This module's namespaces are `sigil-ru-<pid>-*`.
const NETNS_PREFIX: &str = "sigil-ru";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 62, 100);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 62, 1);
const FRONT_POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 62, 2);
const PLAIN_POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 62, 3);
const FRONT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 63, 10);
const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 63, 11);
const CLIENT_UID: u32 = 41801;
const NAMESPACE: &str = "demo";
const NODE: &str = "node-1";

/// A running meshed pod on the node at `ip`.
fn meshed_pod(name: &str, sa: &str, ip: Ipv4Addr) -> PodSpec {
    PodSpec::new(NAMESPACE, name, sa, NODE)
        .with_label(TLS_MODE_LABEL, TLS_MODE_MTLS)
        .with_ip(ip)
}

/// The Service `name` at `cluster_ip`, port 80 to the endpoint `endpoint`'s 8080, with the
/// EndpointSlice the endpoint controller would write (the double has none).
async fn add_service(server: &TestApiServer, name: &str, cluster_ip: Ipv4Addr, endpoint: Ipv4Addr) {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": {
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "ports": [{ "name": "http", "port": 80, "targetPort": HTTP_PORT, "appProtocol": "http" }],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(server.client(), NAMESPACE)
        .create(&PostParams::default(), &service)
        .await
        .unwrap_or_else(|e| panic!("creating the Service {name}: {e}"));
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{name}-x7k2p"),
            "namespace": NAMESPACE,
            "labels": { "kubernetes.io/service-name": name },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [endpoint.to_string()], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": HTTP_PORT, "protocol": "TCP" }],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(server.client(), NAMESPACE)
        .create(&PostParams::default(), &slice)
        .await
        .unwrap_or_else(|e| panic!("creating {name}'s EndpointSlice: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_backend_outside_the_mesh_is_reached_at_its_cluster_ip_in_plaintext() {
    require_root(
        "this test creates network namespaces and kubepods cgroups, installs iptables rules and \
         runs processes as other uids: run it as root (CI does)",
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The proxy's uid reaches the agent socket through here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let server = TestApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    install_crds(&server, &[GATEWAY_API_CRDS]).await;
    let agent_pod = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-1",
        "sigil-agent",
        NODE,
    ));
    let client_pod = server.add_pod(&meshed_pod("web-1", "web", CLIENT_IP));
    server.add_pod(&meshed_pod("front-1", "front", FRONT_POD_IP));
    // front: meshed (its only endpoint a meshed pod); plain: not (its endpoint is no pod of the
    // mesh).
    add_service(&server, "front", FRONT_IP, FRONT_POD_IP).await;
    add_service(&server, "plain", PLAIN_IP, PLAIN_POD_IP).await;
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    let routes: Api<DynamicObject> = Api::namespaced_with(
        server.client(),
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(&gvk, "httproutes"),
    );
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": "front-to-plain", "namespace": NAMESPACE },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "front", "port": 80 }],
            "rules": [{ "backendRefs": [{ "name": "plain", "port": 80 }] }],
        },
    }))
    .unwrap();
    routes
        .create(&PostParams::default(), &route)
        .await
        .expect("creating the HTTPRoute");

    let mesh = start_k8s_mesh(dir.path(), &server, &kubeconfig, &agent_pod, NODE).await;

    let node = Node::new(NETNS_PREFIX, NODE_IP);
    let plain_pod = node.add_pod("u", PLAIN_POD_IP);
    let plain_echo = RouteEcho::start(&plain_pod, "plain-1");
    let _plain = ClusterIpService::new(
        &node,
        "PLAIN",
        SocketAddrV4::new(PLAIN_IP, 80),
        HTTP_PORT,
        &[PLAIN_POD_IP],
    );
    let client_netns = node.add_pod("a", CLIENT_IP);
    proxy_init(&client_netns, CLIENT_UID);
    let cgroup = PodCgroup::create(&client_pod, "a11ce");
    let proxy = PodProxy::start(
        &client_netns,
        CLIENT_IP,
        Some(&cgroup),
        CLIENT_UID,
        &mesh.socket,
        &[],
        dir.path().join("proxy-a.log"),
        &node.c,
    )
    .await;
    let client = MeshPod {
        spec: MeshPodSpec {
            name: "a",
            ip: CLIENT_IP,
            uid: CLIENT_UID,
            id: "spiffe://cluster.local/ns/demo/sa/web",
        },
        netns: client_netns,
        proxy,
        echo: None,
    };
    println!("set up in {:?}", started.elapsed());

    // The route reaches the proxy with the mesh state: until then front has no endpoint that
    // answers, and requests fail.
    let url = format!("http://{FRONT_IP}/through-front?q=1");
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let answer = client.curl(&[], &url).await;
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let logs = || {
        format!(
            "\n--- client proxy:\n{}\n--- agent:\n{}",
            client.proxy.logs(),
            mesh.agent.logs()
        )
    };
    println!("  {url}: {} from {:?}", answer.status, answer.pod());
    assert_eq!(answer.status, 200, "{answer:?}{}", logs());
    // plain's pod has no proxy and its echo speaks no TLS: its answer means plaintext, and
    // front's pod (where the request would go without the route) answers nothing.
    assert_eq!(
        answer.pod(),
        "plain-1",
        "answered by plain's pod: {answer:?}"
    );
    let seen = plain_echo.seen();
    let request = seen
        .iter()
        .find(|s| s.path == "/through-front?q=1")
        .unwrap_or_else(|| panic!("plain's pod never saw the request: {seen:?}{}", logs()));
    assert_eq!(request.method, "GET", "{request:?}");
    println!("all done in {:?}", started.elapsed());
}
