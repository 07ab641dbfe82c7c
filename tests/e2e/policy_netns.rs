//! Authorization policies end to end, as root, with the agent on the Kubernetes API test double:
//! two "pods" (network namespaces this test creates and deletes, pass or fail), each with
//! `sigil proxy init` rules and a transparent `sigil proxy run` started inside the pod's kubepods
//! cgroup, so that the agent (`--attestor k8s`) attests it as that pod and feeds it the
//! `AuthorizationPolicy` objects created through the Kubernetes API for the pod's namespace and
//! labels. It proves that:
//!
//! 0. with no policy, A's plain HTTP request reaches B's app (over mTLS, as `web`), also through
//!    db's Service: a cluster IP that the node (C) routes to B as kube-proxy does, and that the
//!    agent's membership maps to db's identity because its only endpoint (the EndpointSlice the
//!    test creates, as the endpoint controller would) is db-1's meshed IP;
//! 1. a deny-all (`spec: {}`) refuses A's connection at B's proxy (access log `result: denied`,
//!    metric `decision="deny"` by `default` at `l4`), and B's app sees nothing;
//! 2. an ALLOW for A's service account on `/allowed` (selecting B by its `app: db` label) makes
//!    B's proxy decide per request: on ONE keep-alive connection `/allowed` is 200 and `/other`
//!    is 403 `RBAC: access denied`, and the connection stays usable;
//! 3. deleting that ALLOW closes the open keep-alive connection from B's side within about a
//!    second of the delete call (access log `closed_by_policy`);
//! 4. under deny-all, a kubelet-style probe from the node (`/app-health/<name>` on B's metrics
//!    port) still gets B's app's 200, while a plain GET to B's app port is refused (STRICT).
//!
//! ```text
//!   host: test API server (127.0.0.1) ◄── kube client of the test (pods, AuthorizationPolicy)
//!         sigil ca serve (TokenReview)  ◄── sigil agent --attestor k8s --node-name node-1
//!                                            socket: <tmp>/run/agent.sock (a path: reachable
//!                                            from every netns)
//!
//!      pod demo/web-1 (netns A, sa web)           pod demo/db-1 (netns B, sa db)
//!   client: a socket of the test process (root)  app: HTTP/1.1 keep-alive on 0.0.0.0:8080
//!     │ OUTPUT → :15001 (only uid 41501 exempt)    ▲ 127.0.0.1:8080
//!   sigil proxy, uid 41501, web-1's cgroup       sigil proxy, uid 41502, db-1's cgroup,
//!     │ mTLS                                       ▲ --app-probe db-app=8080/healthz
//!     │                                            ▲ PREROUTING → :15006
//!   eth0 198.18.1.1/24                           eth0 198.18.1.2/24
//!     │                                            │
//!     └──── veth-a ───────┐       ┌──────── veth-b ┘
//!                       ┌─┴───────┴─┐
//!                       │ br0       │ netns C ("the node"), 198.18.1.3/24: the kubelet-style
//!                       └───────────┘ probe, the plaintext client, and the reader of the
//!                                     proxies' /ready and /metrics on <pod IP>:15020
//! ```
//!
//! The pods exist in the test API server (node-1, Running, labelled `sigil.dev/tls-mode: mtls`,
//! podIP = their namespace's address), so the agent's mesh membership maps A's and B's addresses
//! to `web` and `db`. Each proxy is placed in a pod's cgroup
//! (`/sys/fs/cgroup/pids/kubepods/burstable/pod<uid>/<container>`) by a shell that writes its own
//! PID to `cgroup.procs` and then execs `ip netns exec ... setpriv ... sigil proxy run`. The
//! servers and clients are sockets of the test process created by a thread that entered the
//! namespace with setns(2): a socket stays in the namespace it was created in. A's client runs as
//! root, which A's rules redirect like any uid but the proxy's.
//!
//! The namespaces, the two-pod network and the pods' proxies are tests/harness/src/netns.rs's
//! (shared with tests/e2e/proxy_netns.rs and tests/e2e/proxy_init.rs); `get_on` (shared with
//! tests/e2e/proxy_policy.rs), `PodCgroup` and `spawn_k8s_agent` (with
//! tests/e2e/agent_kubernetes.rs) are tests/harness's.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use sigil_proxy_api::{TLS_MODE_LABEL, TLS_MODE_MTLS};
use sigil_test_apiserver::{PodSpec, TestApiServer};
use sigil_test_harness::netns::{
    METRICS_PORT, Netns, PodNetwork, PodProxy, RecordingServer, connect_in, http_get_in,
    require_root,
};
use sigil_test_harness::{
    DB_ID, PodCgroup, WEB_ID, eventually, get_on, serve_keep_alive, start_k8s_mesh,
};
use tokio::io::AsyncReadExt;

/// This test's namespaces are `sigil-polns-<pid>-{a,b,c}`.
const NETNS_PREFIX: &str = "sigil-polns";
/// A's proxy (web-1's sidecar), exempt from A's redirection.
const WEB_UID: u32 = 41501;
/// B's proxy (db-1's sidecar), exempt from B's redirection.
const DB_UID: u32 = 41502;
/// Addresses come from 198.18.0.0/15 (benchmarking), which no real network uses.
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
/// db's Service, routed by the node (C) to B's app port.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
const SERVICE_PORT: u16 = 80;
const NAMESPACE: &str = "demo";
const NODE: &str = "node-1";
/// B's application port.
const APP_PORT: u16 = 8080;
/// The probe B's proxy answers as /app-health/db-app, by asking 127.0.0.1:8080/healthz.
const PROBE: &str = "db-app";
const PROBE_ARG: &str = "db-app=8080/healthz";
/// What B's app answers to every request.
const APP_BODY: &str = "ok";
/// How soon a revoked keep-alive connection must be closed, from the delete call (the product
/// aims at about a second; the rest is headroom for a busy 2-core CI machine).
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// B's application: an HTTP/1.1 keep-alive server on 0.0.0.0:`port` in `netns` answering
/// `200 ok` to every request, recording each request line (`GET /path HTTP/1.x`). Stopped on
/// drop.
fn http_app(netns: &Netns, port: u16) -> RecordingServer {
    RecordingServer::start(netns, port, |stream, seen| async move {
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
             content-length: {}\r\n\r\n{APP_BODY}",
            APP_BODY.len()
        );
        serve_keep_alive(stream, answer.as_bytes(), |head| {
            let line = String::from_utf8_lossy(head)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            seen.lock().unwrap().push(line);
        })
        .await;
    })
}

fn decisions(decision: &str, policy: &str, layer: &str) -> String {
    format!(
        "sigil_proxy_authz_decisions_total{{decision=\"{decision}\",policy=\"{policy}\",layer=\"{layer}\"}}"
    )
}

/// A running meshed pod labelled `app: {app}`, at `ip`.
fn meshed_pod(name: &str, sa: &str, app: &str, ip: Ipv4Addr) -> PodSpec {
    PodSpec::new(NAMESPACE, name, sa, NODE)
        .with_label(TLS_MODE_LABEL, TLS_MODE_MTLS)
        .with_label("app", app)
        .with_ip(ip)
}

/// `authorizationpolicies.sigil.dev` in the test namespace.
fn authorization_policies(server: &TestApiServer) -> (Api<DynamicObject>, ApiResource) {
    let gvk = GroupVersionKind::gvk("sigil.dev", "v1alpha1", "AuthorizationPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    (
        Api::namespaced_with(server.client(), NAMESPACE, &resource),
        resource,
    )
}

#[tokio::test]
async fn kubernetes_policies_deny_allow_per_path_and_revoke_open_connections_between_netns_pods() {
    require_root(
        "this test creates network namespaces and kubepods cgroups, installs iptables rules and \
         runs processes as other uids: run it as root (CI does)",
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The proxies' uids reach the agent socket through here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The cluster: the agent's own pod, and the two meshed pods on node-1.
    let server = TestApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let agent_pod = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-1",
        "sigil-agent",
        NODE,
    ));
    let web_pod = server.add_pod(&meshed_pod("web-1", "web", "web", A_IP));
    let db_pod = server.add_pod(&meshed_pod("db-1", "db", "db", B_IP));

    // The CA (TokenReview against the test server) and the node agent in Kubernetes mode.
    let mesh = start_k8s_mesh(dir.path(), &server, &kubeconfig, &agent_pod, NODE).await;

    // The network: C holds the bridge both pods are plugged into, with an address of its own.
    let PodNetwork { a, b, c } =
        PodNetwork::new(NETNS_PREFIX, C_IP, [(A_IP, WEB_UID), (B_IP, DB_UID)]);

    // The pods' processes: B's app, and each pod's proxy in a container cgroup of its pod.
    let b_app = http_app(&b, APP_PORT);
    let a_cgroup = PodCgroup::create(&web_pod, "a11ce");
    let b_cgroup = PodCgroup::create(&db_pod, "b0b");
    let a_proxy = PodProxy::start(
        &a,
        A_IP,
        Some(&a_cgroup),
        WEB_UID,
        &mesh.socket,
        &[],
        dir.path().join("proxy-a.log"),
        &c,
    )
    .await;
    let b_proxy = PodProxy::start(
        &b,
        B_IP,
        Some(&b_cgroup),
        DB_UID,
        &mesh.socket,
        &["--app-probe", PROBE_ARG],
        dir.path().join("proxy-b.log"),
        &c,
    )
    .await;
    let logs = || {
        format!(
            "\n--- A's proxy:\n{}\n--- B's proxy:\n{}\n--- agent:\n{}",
            a_proxy.logs(),
            b_proxy.logs(),
            mesh.agent.logs()
        )
    };
    // Attested as their pods: the policy feed scopes each to its pod's namespace.
    for proxy in [&a_proxy, &b_proxy] {
        proxy
            .wait_for_policies(0, "its initial (empty) policy set")
            .await;
        let update = proxy.last_policy_update().unwrap();
        assert_eq!(update["namespace"], NAMESPACE, "{update}");
    }
    let b_app_addr: SocketAddr = SocketAddrV4::new(B_IP, APP_PORT).into();
    println!("set up in {:?}", started.elapsed());

    // 0. No policy yet: A's plain request reaches B's app, over mTLS as web.
    let mut stream = connect_in(&a.name, b_app_addr).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/").await,
        Some((200, APP_BODY.to_string())),
        "A to B without policies{}",
        logs()
    );
    drop(stream);
    eventually("B's access log names web as the source", || async {
        b_proxy
            .access_log()
            .iter()
            .any(|l| l["security"] == "mtls" && l["source_identity"] == WEB_ID)
    })
    .await;
    let a_line = a_proxy
        .access_log()
        .into_iter()
        .find(|l| l["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no outbound line in A's access log{}", logs()));
    assert_eq!(a_line["destination_identity"], DB_ID, "{a_line}");
    assert_eq!(b_app.requests(), ["GET / HTTP/1.1"]);

    // 0b. Through a Service: A connects to db's cluster IP; the node (C) routes it to B as
    // kube-proxy would (DNAT, and masquerade so B's answers return through it). A's proxy finds
    // the cluster IP in the membership (its EndpointSlice lists only B, db-1's meshed IP) and
    // speaks mTLS to whatever pod is behind it, requiring db's identity.
    c.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let service_ip = SERVICE_IP.to_string();
    let b_target = format!("{B_IP}:{APP_PORT}");
    c.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &service_ip,
        "-p",
        "tcp",
        "--dport",
        &SERVICE_PORT.to_string(),
        "-j",
        "DNAT",
        "--to-destination",
        &b_target,
    ]);
    c.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "MASQUERADE",
    ]);
    a.run(&[
        "ip",
        "route",
        "add",
        &format!("{service_ip}/32"),
        "via",
        &C_IP.to_string(),
    ]);
    let services: Api<Service> = Api::namespaced(server.client(), NAMESPACE);
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "db", "namespace": NAMESPACE },
        "spec": {
            "selector": { "app": "db" },
            "clusterIP": service_ip,
            "clusterIPs": [service_ip],
            "ports": [{ "port": SERVICE_PORT, "targetPort": APP_PORT }],
        },
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .expect("creating the db Service");
    // What the endpoint controller does for the Service's selector (the double has none).
    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), NAMESPACE);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": "db-x7k2p",
            "namespace": NAMESPACE,
            "labels": { "kubernetes.io/service-name": "db" },
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [B_IP.to_string()],
            "conditions": { "ready": true },
            "targetRef": { "kind": "Pod", "namespace": NAMESPACE, "name": "db-1" },
        }],
        "ports": [{ "port": APP_PORT, "protocol": "TCP" }],
    }))
    .unwrap();
    slices
        .create(&PostParams::default(), &slice)
        .await
        .expect("creating the db Service's EndpointSlice");
    let service_addr: SocketAddr = SocketAddrV4::new(SERVICE_IP, SERVICE_PORT).into();
    // Until A's proxy has the new membership the connection passes through as plaintext, and
    // B's STRICT proxy refuses it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = connect_in(&a.name, service_addr).await.unwrap();
        if get_on(&mut stream, "/via-service").await == Some((200, APP_BODY.to_string())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never reached B through the Service{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The attempts before the membership arrived are logged as passthrough "ok" too (B's proxy
    // closed them): the one that got through is the mTLS line, logged when it closes.
    let service_line = || {
        a_proxy.access_log().into_iter().rfind(|l| {
            l["destination"] == service_addr.to_string()
                && l["result"] == "ok"
                && l["security"] == "mtls"
        })
    };
    eventually(
        "A's access log has the connection to the Service",
        || async { service_line().is_some() },
    )
    .await;
    let via_service = service_line().unwrap();
    assert_eq!(via_service["security"], "mtls", "{via_service}");
    assert_eq!(via_service["destination_identity"], DB_ID, "{via_service}");
    assert_eq!(
        b_app.requests().last().map(String::as_str),
        Some("GET /via-service HTTP/1.1")
    );
    let seen_before_policies = b_app.requests().len();

    // 1. deny-all in demo: A's connection is refused by B's proxy, at connection time.
    let (policies, resource) = authorization_policies(&server);
    let deny_all = DynamicObject::new("deny-all", &resource)
        .within(NAMESPACE)
        .data(json!({ "spec": {} }));
    policies
        .create(&PostParams::default(), &deny_all)
        .await
        .expect("creating deny-all");
    b_proxy.wait_for_policies(1, "deny-all").await;
    let mut stream = connect_in(&a.name, b_app_addr).await.unwrap();
    let answer = get_on(&mut stream, "/").await;
    assert_eq!(answer, None, "deny-all let A in{}", logs());
    drop(stream);
    eventually("the denial in B's access log", || async {
        b_proxy.access_log().iter().any(|l| l["result"] == "denied")
    })
    .await;
    let denied = b_proxy
        .access_log()
        .into_iter()
        .find(|l| l["result"] == "denied")
        .unwrap();
    assert_eq!(denied["policy"], "default", "{denied}");
    assert_eq!(denied["source_identity"], WEB_ID, "{denied}");
    assert!(
        b_proxy.metric(&decisions("deny", "default", "l4")).await >= 1.0,
        "no l4 deny counted{}",
        logs()
    );
    assert_eq!(
        b_app.requests().len(),
        seen_before_policies,
        "B's app saw a denied request"
    );

    // 2. An ALLOW for web's service account on /allowed, selecting B by its pod's label.
    let allow_web = DynamicObject::new("allow-web", &resource)
        .within(NAMESPACE)
        .data(json!({ "spec": {
            "selector": { "matchLabels": { "app": "db" } },
            "action": "ALLOW",
            "rules": [{
                "from": [{ "source": { "principals": ["cluster.local/ns/demo/sa/web"] } }],
                "to": [{ "operation": { "methods": ["GET"], "paths": ["/allowed"] } }],
            }],
        } }));
    policies
        .create(&PostParams::default(), &allow_web)
        .await
        .expect("creating allow-web");
    b_proxy.wait_for_policies(2, "deny-all and allow-web").await;
    let a_update = a_proxy.last_policy_update().unwrap();
    assert_eq!(
        a_update["policies"], 1,
        "allow-web selects app=db only, yet A got it: {a_update}"
    );
    let mut stream = connect_in(&a.name, b_app_addr).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/allowed").await,
        Some((200, APP_BODY.to_string())),
        "/allowed{}",
        logs()
    );
    let (status, body) = get_on(&mut stream, "/other")
        .await
        .unwrap_or_else(|| panic!("/other: the connection closed{}", logs()));
    assert_eq!(
        (status, body.trim_end()),
        (403, "RBAC: access denied"),
        "/other"
    );
    // Still the same, usable connection after a 403.
    assert_eq!(
        get_on(&mut stream, "/allowed").await,
        Some((200, APP_BODY.to_string())),
        "/allowed after the 403{}",
        logs()
    );
    assert_eq!(
        b_app.requests()[seen_before_policies..],
        ["GET /allowed HTTP/1.1", "GET /allowed HTTP/1.1"],
        "B's app saw the denied /other"
    );
    assert!(
        b_proxy
            .metric(&decisions("allow", "demo/allow-web", "l7"))
            .await
            >= 2.0
    );
    assert!(b_proxy.metric(&decisions("deny", "default", "l7")).await >= 1.0);
    eventually("the 403 in B's access log", || async {
        b_proxy
            .access_log()
            .iter()
            .any(|l| l["kind"] == "http" && l["path"] == "/other" && l["status"] == 403)
    })
    .await;

    // 3. Deleting the ALLOW closes the open keep-alive connection, from B's side.
    let deleted = Instant::now();
    policies
        .delete("allow-web", &DeleteParams::default())
        .await
        .expect("deleting allow-web");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
    let closed_after = deleted.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open after the ALLOW was deleted: {read:?}{}",
        logs()
    );
    println!("the revoked keep-alive connection was closed {closed_after:?} after the delete");
    assert!(
        closed_after < CLOSE_WITHIN,
        "closed only {closed_after:?} after the delete{}",
        logs()
    );
    eventually("the closure in B's access log", || async {
        b_proxy
            .access_log()
            .iter()
            .any(|l| l["result"] == "closed_by_policy")
    })
    .await;
    b_proxy.wait_for_policies(1, "deny-all alone").await;

    // 4. Under deny-all, a kubelet-style probe from the node reaches B's app through the
    // metrics port, while plaintext to the app port is refused (STRICT).
    let probe = SocketAddrV4::new(B_IP, METRICS_PORT).into();
    let (status, body) = http_get_in(&c.name, probe, &format!("/app-health/{PROBE}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "the probe under deny-all: {body}{}", logs());
    assert_eq!(
        b_app.requests().last().map(String::as_str),
        Some("GET /healthz HTTP/1.1"),
        "the probe did not reach B's app"
    );
    let requests_before = b_app.requests().len();
    let plain = http_get_in(&c.name, b_app_addr, "/").await;
    assert!(
        matches!(plain, Err(_) | Ok((0, _))),
        "plaintext from the node reached B's app: {plain:?}"
    );
    eventually("the not_tls refusal in B's access log", || async {
        b_proxy.access_log().iter().any(|l| {
            l["result"] == "not_tls"
                && l["source"]
                    .as_str()
                    .is_some_and(|source| source.starts_with(&format!("{C_IP}:")))
        })
    })
    .await;
    assert_eq!(b_app.requests().len(), requests_before);

    println!("passed in {:?}", started.elapsed());
    // Proxies first (they are in the pods' cgroups), then the cgroups, namespaces and the rest.
    drop(a_proxy);
    drop(b_proxy);
    drop(a_cgroup);
    drop(b_cgroup);
}
