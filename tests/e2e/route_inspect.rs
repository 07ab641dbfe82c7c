//! `sigil inspect route` as operators run it: the real binary on an agent's policy file (two
//! HTTPRoutes on one Service, a producer route and a consumer route of the client's namespace,
//! beside an authorization policy it skips) and mesh file, with its first-line and exit-code
//! contract (0 routed, 1 NOT-FOUND, 2 usage or file error); and the same routes read from the
//! cluster (the Kubernetes API test double, through `KUBECONFIG`), its Services meshed or not as
//! an agent computes them from Services, EndpointSlices and labelled pods.

use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use sigil_proxy_api::{TLS_MODE_LABEL, TLS_MODE_MTLS};
use sigil_test_apiserver::{PodSpec, TestApiServer, parse_manifest};
use sigil_test_harness::sigil_exe;

const WEB_CLIENT: &str = "spiffe://cluster.local/ns/web/sa/front";
const SHOP_CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/orders";

const MESH: &str = "\
members:
- {ip: 198.18.61.2, id: spiffe://cluster.local/ns/shop/sa/reviews-v1}
- {ip: 198.18.61.3, id: spiffe://cluster.local/ns/shop/sa/reviews-v2}
- {ip: 198.18.61.4, id: spiffe://cluster.local/ns/shop/sa/reviews-v3}
services:
- namespace: shop
  name: reviews
  clusterIPs: [198.19.61.10]
  ports: [{name: http, port: 9080, targetPort: 8080}]
  endpoints: [{ip: 198.18.61.2}, {ip: 198.18.61.3}, {ip: 198.18.61.4}]
- namespace: shop
  name: reviews-v1
  clusterIPs: [198.19.61.11]
  ports: [{name: http, port: 9080, targetPort: 8080}]
  endpoints: [{ip: 198.18.61.2}]
- namespace: shop
  name: reviews-v2
  clusterIPs: [198.19.61.12]
  ports: [{name: http, port: 9080, targetPort: 8080}]
  endpoints: [{ip: 198.18.61.3}]
- namespace: shop
  name: reviews-v3
  clusterIPs: [198.19.61.13]
  ports: [{name: http, port: 9080, targetPort: 8080}]
  endpoints: [{ip: 198.18.61.4}]
";

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: [web]}
---
# Producer route: every client of shop/reviews without consumer routes.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /reviews}
    backendRefs:
    - {name: reviews-v1, port: 9080}
---
# Consumer route of namespace web: a canary on a header, /old redirected, the rest to v1.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: web}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, namespace: shop, port: 9080}
  rules:
  - name: canary
    matches:
    - path: {type: PathPrefix, value: /api}
      headers:
      - {name: x-canary, value: "1"}
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    backendRefs:
    - {name: reviews-v2, namespace: shop, port: 9080, weight: 90}
    - {name: reviews-v3, namespace: shop, port: 9080, weight: 10}
    timeouts: {request: 2s, backendRequest: 500ms}
  - matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - backendRefs:
    - {name: reviews-v1, namespace: shop, port: 9080}
"#;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or_default()
    }
}

async fn inspect(dir: &Path, policies: &str, args: &[&str]) -> Run {
    let policy_file = dir.join("policies.yaml");
    let mesh_file = dir.join("mesh.yaml");
    std::fs::write(&policy_file, policies).unwrap();
    std::fs::write(&mesh_file, MESH).unwrap();
    let mut command = tokio::process::Command::new(sigil_exe());
    command
        .args(["inspect", "route", "--policy-file"])
        .arg(&policy_file)
        .arg("--mesh-file")
        .arg(&mesh_file)
        .args(args);
    run(command).await
}

async fn run(mut command: tokio::process::Command) -> Run {
    let out = command.output().await.expect("running sigil");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn consumer_routes_replace_producer_routes_for_their_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let to = ["--to", "reviews.shop:9080"];
    let canary = inspect(
        dir.path(),
        POLICIES,
        &[
            &[
                "--from",
                WEB_CLIENT,
                "--path",
                "/api/items",
                "--header",
                "x-canary=1",
            ],
            &to[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(canary.code, 0, "{}{}", canary.stdout, canary.stderr);
    assert_eq!(
        canary.first_line(),
        "ROUTE HTTPRoute web/reviews-canary rule 0"
    );
    for line in [
        "routes: consumer routes of namespace web (they replace the producer routes of shop for this client)",
        "selected: HTTPRoute web/reviews-canary rule 0 \"canary\" match (PathPrefix /api, header x-canary=1)",
        "             (upstream path /v2/items)",
        "  backends:  shop/reviews-v2:9080 weight 90 (90%), shop/reviews-v3:9080 weight 10 (10%)",
        "  timeouts:  request 2s, backendRequest 500ms",
        "  2. HTTPRoute web/reviews-canary rule 1 match (PathPrefix /old) — path /api/items does not match PathPrefix /old",
        "status: HTTPRoute web/reviews-canary parentRefs[0]: Accepted=True, ResolvedRefs=True",
    ] {
        assert!(
            canary.stdout.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            canary.stdout
        );
    }

    // Without the header the canary's match fails, and says why.
    let plain = inspect(
        dir.path(),
        POLICIES,
        &[&["--from", WEB_CLIENT, "--path", "/api/items"], &to[..]].concat(),
    )
    .await;
    assert_eq!(plain.code, 0, "{}{}", plain.stdout, plain.stderr);
    assert_eq!(
        plain.first_line(),
        "ROUTE HTTPRoute web/reviews-canary rule 2"
    );
    assert!(
        plain.stdout.contains("— header x-canary is missing\n"),
        "{}",
        plain.stdout
    );

    let redirect = inspect(
        dir.path(),
        POLICIES,
        &[&["--from", WEB_CLIENT, "--path", "/old/a?b=1"], &to[..]].concat(),
    )
    .await;
    assert_eq!(redirect.code, 0, "{}{}", redirect.stdout, redirect.stderr);
    assert_eq!(
        redirect.first_line(),
        "REDIRECT 301 http://reviews.shop:9080/new/a?b=1"
    );

    // A client of another namespace gets the producer route, which has no rule for /api.
    let producer = inspect(
        dir.path(),
        POLICIES,
        &[&["--from", SHOP_CLIENT, "--path", "/reviews/7"], &to[..]].concat(),
    )
    .await;
    assert_eq!(producer.code, 0, "{}{}", producer.stdout, producer.stderr);
    assert_eq!(producer.first_line(), "ROUTE HTTPRoute shop/reviews rule 0");
    assert!(
        producer
            .stdout
            .contains("  backends:  shop/reviews-v1:9080 weight 1 (100%)\n"),
        "{}",
        producer.stdout
    );
    let not_found = inspect(
        dir.path(),
        POLICIES,
        &[
            &[
                "--from",
                SHOP_CLIENT,
                "--path",
                "/api/items",
                "--header",
                "x-canary=1",
            ],
            &to[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        not_found.code, 1,
        "{}{}",
        not_found.stdout, not_found.stderr
    );
    assert_eq!(not_found.first_line(), "NOT-FOUND");
    assert!(
        not_found
            .stdout
            .contains("  1. HTTPRoute shop/reviews rule 0 match (PathPrefix /reviews) — path /api/items does not match PathPrefix /reviews\n"),
        "{}",
        not_found.stdout
    );
}

#[tokio::test]
async fn a_service_port_without_routes_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let none = inspect(
        dir.path(),
        POLICIES,
        &[
            "--from",
            WEB_CLIENT,
            "--to",
            "reviews-v1.shop:9080",
            "--path",
            "/api",
        ],
    )
    .await;
    assert_eq!(none.code, 0, "{}{}", none.stdout, none.stderr);
    assert_eq!(none.first_line(), "NO-ROUTE");

    let broken = format!(
        "{POLICIES}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: bad, namespace: web}}\nspec: {{rules: 7}}\n"
    );
    let bad = inspect(
        dir.path(),
        &broken,
        &["--from", WEB_CLIENT, "--to", "reviews.shop:9080"],
    )
    .await;
    assert_eq!(bad.code, 2, "{}{}", bad.stdout, bad.stderr);
    assert!(bad.stdout.is_empty(), "{}", bad.stdout);
    assert!(bad.stderr.contains("document 4"), "{}", bad.stderr);

    let usage = inspect(
        dir.path(),
        POLICIES,
        &["--from", WEB_CLIENT, "--to", "reviews:9080"],
    )
    .await;
    assert_eq!(usage.code, 2, "{}{}", usage.stdout, usage.stderr);
    assert!(
        usage.stderr.contains("<service>.<namespace>:<port>"),
        "{}",
        usage.stderr
    );
}

/// A pod of shop at `ip`, meshed (labelled for mTLS) or not.
fn shop_pod(name: &str, service_account: &str, ip: &str, meshed: bool) -> PodSpec {
    let spec = PodSpec::new("shop", name, service_account, "node-a")
        .with_ip(ip.parse::<std::net::IpAddr>().unwrap());
    if meshed {
        spec.with_label(TLS_MODE_LABEL, TLS_MODE_MTLS)
    } else {
        spec
    }
}

/// Service shop/`name` at `cluster_ip`, port http 9080, and its EndpointSlice of `pods`
/// (name, address).
async fn add_service(server: &TestApiServer, name: &str, cluster_ip: &str, pods: &[(&str, &str)]) {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "shop" },
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{ "name": "http", "port": 9080, "targetPort": 8080 }],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(server.client(), "shop")
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(pod, address)| {
            json!({
                "addresses": [address],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod },
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{name}-x7k2p"),
            "namespace": "shop",
            "labels": { "kubernetes.io/service-name": name },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(server.client(), "shop")
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
}

/// `sigil inspect route` without files: the cluster of `kubeconfig`.
async fn inspect_cluster(kubeconfig: &Path, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(sigil_exe());
    command
        .args(["inspect", "route"])
        .args(args)
        .env("KUBECONFIG", kubeconfig);
    run(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_cluster() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();

    // The Services and members of MESH, and shop/ratings, whose one endpoint is not meshed.
    for (pod, account, ip) in [
        ("reviews-v1-0", "reviews-v1", "198.18.61.2"),
        ("reviews-v2-0", "reviews-v2", "198.18.61.3"),
        ("reviews-v3-0", "reviews-v3", "198.18.61.4"),
    ] {
        server.add_pod(&shop_pod(pod, account, ip, true));
    }
    server.add_pod(&shop_pod("ratings-0", "ratings", "198.18.61.5", false));
    add_service(
        &server,
        "reviews",
        "198.19.61.10",
        &[
            ("reviews-v1-0", "198.18.61.2"),
            ("reviews-v2-0", "198.18.61.3"),
            ("reviews-v3-0", "198.18.61.4"),
        ],
    )
    .await;
    for (version, cluster_ip, address) in [
        ("v1", "198.19.61.11", "198.18.61.2"),
        ("v2", "198.19.61.12", "198.18.61.3"),
        ("v3", "198.19.61.13", "198.18.61.4"),
    ] {
        let name = format!("reviews-{version}");
        add_service(
            &server,
            &name,
            cluster_ip,
            &[(&format!("{name}-0"), address)],
        )
        .await;
    }
    add_service(
        &server,
        "ratings",
        "198.19.61.14",
        &[("ratings-0", "198.18.61.5")],
    )
    .await;
    // POLICIES' routes (its authorization policy is not the route feed's).
    let http_routes = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    for document in parse_manifest(POLICIES).unwrap() {
        if document["kind"] != "HTTPRoute" {
            continue;
        }
        let route: DynamicObject = serde_json::from_value(document).unwrap();
        let namespace = route.metadata.namespace.clone().unwrap();
        Api::<DynamicObject>::namespaced_with(server.client(), &namespace, &http_routes)
            .create(&PostParams::default(), &route)
            .await
            .unwrap();
    }

    // Each answer is the files' answer, word for word: the consumer route's canary, and the
    // producer route for another namespace's client.
    let canary = [
        "--from",
        WEB_CLIENT,
        "--to",
        "reviews.shop:9080",
        "--path",
        "/api/items",
        "--header",
        "x-canary=1",
    ];
    let producer = [
        "--from",
        SHOP_CLIENT,
        "--to",
        "reviews.shop:9080",
        "--path",
        "/reviews/7",
    ];
    for (args, first_line) in [
        (&canary[..], "ROUTE HTTPRoute web/reviews-canary rule 0"),
        (&producer[..], "ROUTE HTTPRoute shop/reviews rule 0"),
    ] {
        let cluster = inspect_cluster(&kubeconfig, args).await;
        assert_eq!(cluster.code, 0, "{}{}", cluster.stdout, cluster.stderr);
        assert_eq!(cluster.first_line(), first_line, "{}", cluster.stdout);
        let files = inspect(dir.path(), POLICIES, args).await;
        assert_eq!(cluster.stdout, files.stdout);
    }

    // A Service with an endpoint outside the mesh takes no routes, and says why.
    let ratings = inspect_cluster(
        &kubeconfig,
        &["--from", WEB_CLIENT, "--to", "ratings.shop:9080"],
    )
    .await;
    assert_eq!(ratings.code, 0, "{}{}", ratings.stdout, ratings.stderr);
    assert_eq!(ratings.first_line(), "NO-ROUTE");
    assert!(
        ratings
            .stdout
            .contains("service: shop/ratings port 9080 (not fully meshed"),
        "{}",
        ratings.stdout
    );

    // One file without the other is a usage error.
    let usage = inspect_cluster(
        &kubeconfig,
        &[
            "--from",
            WEB_CLIENT,
            "--to",
            "reviews.shop:9080",
            "--policy-file",
            "p.yaml",
        ],
    )
    .await;
    assert_eq!(usage.code, 2, "{}{}", usage.stdout, usage.stderr);
    assert!(usage.stderr.contains("--mesh-file"), "{}", usage.stderr);
}
