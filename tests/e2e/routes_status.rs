//! Route status as a user reads it: the real `sigil ca serve`, pointed at the Kubernetes API test
//! double with the Gateway API v1.6.1 standard-channel CRDs (vendored release install, see
//! tests/fixtures/gateway-api/v1.6.1/README.md) and sigil's CRDs installed, writes its verdicts
//! on HTTPRoutes and GRPCRoutes whose parent is a Service in `status.parents[]` entries of
//! controller `sigil.dev/mesh`, next to another controller's entry, which it leaves alone; and
//! the Accepted condition of sigil's BackendPolicy. The double neither prunes nor runs the CRDs'
//! CEL rules, so the routes here are judged exactly as written.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};
use sigil_test_apiserver::TestApiServer;
use sigil_test_harness::routes::{GATEWAY_API_CRDS, install_crds};
use sigil_test_harness::*;

const NS: &str = "shop";
const CONTROLLER: &str = "sigil.dev/mesh";
const FOREIGN: &str = "example.com/gateway-controller";
const WAIT: Duration = Duration::from_secs(20);

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn http_routes() -> ApiResource {
    resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
}

async fn create(server: &TestApiServer, resource: &ApiResource, object: Value) {
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    let namespace = object.metadata.namespace.clone().unwrap();
    Api::<DynamicObject>::namespaced_with(server.client(), &namespace, resource)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "ports": [{ "name": "http", "port": 80 }] },
    })
}

fn http_route(name: &str, parent: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": NS },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": parent, "port": 80 }],
            "rules": rules,
        },
    })
}

/// `kubectl get httproute <name> -o jsonpath='{.status.parents[?(@.controllerName=="sigil.dev/mesh")].conditions}'`
/// as `(type, status, reason)`.
fn sigil_conditions(object: &DynamicObject) -> Vec<(String, String, String)> {
    object
        .data
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|entry| entry["controllerName"] == CONTROLLER)
        .flat_map(|entry| entry["conditions"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            let field = |name: &str| c[name].as_str().unwrap_or_default().to_owned();
            (field("type"), field("status"), field("reason"))
        })
        .collect()
}

/// Polls the object until `done` holds for it.
async fn until(
    server: &TestApiServer,
    resource: &ApiResource,
    name: &str,
    ca: &CaProcess,
    done: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    let api = Api::<DynamicObject>::namespaced_with(server.client(), NS, resource);
    let deadline = Instant::now() + WAIT;
    loop {
        let object = api.get(name).await.unwrap();
        if done(&object) {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never got the expected status: {:?}\n{}",
            object.data.get("status"),
            ca.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn has(conditions: &[(String, String, String)], type_: &str, status: &str, reason: &str) -> bool {
    conditions
        .iter()
        .any(|(t, s, r)| t == type_ && s == status && r == reason)
}

#[tokio::test]
async fn the_ca_writes_route_and_policy_status() {
    let server = TestApiServer::start().await;
    install_crds(
        &server,
        &[
            GATEWAY_API_CRDS,
            "deploy/crds/backendpolicies.sigil.dev.yaml",
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let services = resource("", "v1", "Service", "services");
    for name in ["reviews", "reviews-v2"] {
        create(&server, &services, service(name)).await;
    }
    let routes = http_routes();
    // A route another controller already reports on: its entry must survive sigil's writes.
    let mut valid = http_route(
        "valid",
        "reviews",
        json!([{ "backendRefs": [{ "name": "reviews-v2", "port": 80 }] }]),
    );
    create(&server, &routes, valid.clone()).await;
    let api = Api::<DynamicObject>::namespaced_with(server.client(), NS, &routes);
    let mut with_foreign = api.get("valid").await.unwrap();
    let foreign = json!({
        "parentRef": { "group": "", "kind": "Service", "name": "reviews", "port": 80 },
        "controllerName": FOREIGN,
        "conditions": [{ "type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
            "message": "not ours", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1 }],
    });
    with_foreign.data["status"] = json!({ "parents": [foreign.clone()] });
    api.replace_status("valid", &PostParams::default(), &with_foreign)
        .await
        .unwrap();
    let cases = [
        (
            "no-parent",
            http_route(
                "no-parent",
                "missing",
                json!([{ "backendRefs": [{ "name": "reviews-v2", "port": 80 }] }]),
            ),
            ("Accepted", "False", "NoMatchingParent"),
        ),
        (
            "backend-missing",
            http_route(
                "backend-missing",
                "reviews",
                json!([{ "backendRefs": [{ "name": "nowhere", "port": 80 }] }]),
            ),
            ("ResolvedRefs", "False", "BackendNotFound"),
        ),
        (
            "cross-namespace",
            http_route(
                "cross-namespace",
                "reviews",
                json!([{ "backendRefs": [{ "name": "x", "namespace": "other", "port": 80 }] }]),
            ),
            // No ReferenceGrant is needed (GEP-1294); the Service does not exist.
            ("ResolvedRefs", "False", "BackendNotFound"),
        ),
        (
            "incompatible",
            http_route(
                "incompatible",
                "reviews",
                json!([{ "filters": [
                    { "type": "RequestRedirect", "requestRedirect": { "statusCode": 301 } },
                    { "type": "URLRewrite", "urlRewrite": { "hostname": "example.com" } },
                ] }]),
            ),
            ("Accepted", "False", "IncompatibleFilters"),
        ),
    ];
    for (_, object, _) in &cases {
        create(&server, &routes, object.clone()).await;
    }
    create(
        &server,
        &resource("sigil.dev", "v1alpha1", "BackendPolicy", "backendpolicies"),
        json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "BackendPolicy",
            "metadata": { "name": "reviews", "namespace": NS },
            "spec": { "targetRefs": [{ "group": "", "kind": "Service", "name": "reviews" }],
                      "outlierDetection": { "consecutive5xxErrors": 3 } },
        }),
    )
    .await;

    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &[] as &[&str]);
    ca.wait_ready().await;

    println!("case valid, beside another controller's entry");
    let object = until(&server, &routes, "valid", &ca, |o| {
        let c = sigil_conditions(o);
        has(&c, "Accepted", "True", "Accepted") && has(&c, "ResolvedRefs", "True", "ResolvedRefs")
    })
    .await;
    let parents = object.data["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(
        parents[0], foreign,
        "the other controller's entry is untouched"
    );
    assert_eq!(parents[1]["parentRef"], valid["spec"]["parentRefs"][0]);

    for (name, _, (type_, status, reason)) in &cases {
        println!("case {name}: {type_}={status}/{reason}");
        until(&server, &routes, name, &ca, |o| {
            has(&sigil_conditions(o), type_, status, reason)
        })
        .await;
    }

    println!("case BackendPolicy accepted");
    until(
        &server,
        &resource("sigil.dev", "v1alpha1", "BackendPolicy", "backendpolicies"),
        "reviews",
        &ca,
        |o| {
            o.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Accepted" && c["status"] == "True")
        },
    )
    .await;

    // The parent moved to another Service: sigil's entry follows, the foreign one stays.
    println!("case parentRef changed");
    valid["spec"]["parentRefs"][0]["name"] = json!("reviews-v2");
    let mut current = api.get("valid").await.unwrap();
    current.data["spec"] = valid["spec"].clone();
    api.replace("valid", &PostParams::default(), &current)
        .await
        .unwrap();
    let object = until(&server, &routes, "valid", &ca, |o| {
        o.data["status"]["parents"]
            .as_array()
            .is_some_and(|p| p.iter().any(|e| e["parentRef"]["name"] == "reviews-v2"))
    })
    .await;
    let parents = object.data["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0], foreign);
    assert_eq!(parents[1]["controllerName"], CONTROLLER);
    assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 2);
}
