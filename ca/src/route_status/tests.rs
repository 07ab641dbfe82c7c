use super::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use sigil_test_apiserver::{ServerOptions, TestApiServer, parse_manifest};

/// The Gateway API's standard channel, as `kubectl apply` installs it (tests/fixtures/README).
const GATEWAY_API: &str =
    include_str!("../../../tests/fixtures/gateway-api/v1.6.1/standard-install.yaml");
const SIGIL_CRDS: [&str; 2] = [
    include_str!("../../../deploy/crds/backendpolicies.sigil.dev.yaml"),
    include_str!("../../../deploy/crds/ratelimitpolicies.sigil.dev.yaml"),
];
const WAIT: Duration = Duration::from_secs(10);
/// The watcher's longest backoff (30 s) and then some: how long a CRD installed late may take.
const CRD_RETRY_WAIT: Duration = Duration::from_secs(40);
const NS: &str = "shop";
const OTHER_NS: &str = "web";
/// Another controller's entry in `status.parents`, which sigil must leave alone.
const FOREIGN: &str = "istio.io/mesh-controller";

fn time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap())
}

fn service_parent(name: &str) -> Value {
    json!({ "group": "", "kind": "Service", "name": name })
}

fn accepted(status: bool, reason: &'static str) -> validate::Condition {
    validate::Condition {
        type_: "Accepted",
        status,
        reason,
        message: format!("accepted is {status}"),
    }
}

fn verdict(parent_index: usize, conditions: Vec<validate::Condition>) -> ParentVerdict {
    ParentVerdict {
        parent_index,
        conditions,
    }
}

fn foreign_entry(name: &str) -> Value {
    json!({
        "parentRef": service_parent(name),
        "controllerName": FOREIGN,
        "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1 }],
    })
}

#[test]
fn merging_keeps_other_controllers_entries_and_drops_parents_no_longer_judged() {
    let refs = [service_parent("a"), service_parent("b")];
    let first = merged_parents(
        &[foreign_entry("a")],
        &refs,
        &[
            verdict(0, vec![accepted(true, "Accepted")]),
            verdict(1, vec![accepted(false, "NoMatchingParent")]),
        ],
        Some(1),
        &time(100),
    );
    assert_eq!(first.len(), 3);
    assert_eq!(
        first[0],
        foreign_entry("a"),
        "the foreign entry stays first"
    );
    assert_eq!(first[1]["parentRef"], refs[0]);
    assert_eq!(first[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(first[2]["parentRef"], refs[1]);
    assert_eq!(first[2]["conditions"][0]["reason"], "NoMatchingParent");
    assert_eq!(first[2]["conditions"][0]["observedGeneration"], 1);

    // The same verdict again, later: nothing changes (times kept), so nothing is written.
    let object = |parents: &[Value]| {
        DynamicObject::new("r", &Watched::HttpRoute.api_resource())
            .within(NS)
            .data(json!({ "status": { "parents": parents } }))
    };
    let again = merged_parents(
        &first,
        &refs,
        &[
            verdict(0, vec![accepted(true, "Accepted")]),
            verdict(1, vec![accepted(false, "NoMatchingParent")]),
        ],
        Some(1),
        &time(200),
    );
    assert_eq!(again, first);
    assert!(!changes(&object(&first), &again));

    // Generation 2: parent b removed from the spec, a's Accepted now False; another
    // controller appended an entry after sigil's meanwhile.
    let mut current = first.clone();
    current.push(foreign_entry("z"));
    let second = merged_parents(
        &current,
        &refs[..1],
        &[verdict(0, vec![accepted(false, "UnsupportedValue")])],
        Some(2),
        &time(300),
    );
    assert!(changes(&object(&current), &second));
    assert_eq!(second.len(), 3);
    assert_eq!(second[0], foreign_entry("a"));
    assert_eq!(second[1]["parentRef"], refs[0]);
    assert_eq!(second[1]["conditions"][0]["status"], "False");
    assert_eq!(second[1]["conditions"][0]["observedGeneration"], 2);
    assert_eq!(
        second[1]["conditions"][0]["lastTransitionTime"],
        json!(time(300)),
        "the status changed: a new transition time"
    );
    assert_eq!(
        second[2],
        foreign_entry("z"),
        "b's sigil entry is gone, z stays"
    );

    // A status-preserving change (a new generation, same verdict) keeps the transition time.
    let third = merged_parents(
        &second,
        &refs[..1],
        &[verdict(0, vec![accepted(false, "UnsupportedValue")])],
        Some(3),
        &time(400),
    );
    assert_eq!(
        third[1]["conditions"][0]["lastTransitionTime"],
        json!(time(300))
    );
    assert_eq!(third[1]["conditions"][0]["observedGeneration"], 3);

    // No Service parent left: sigil's entries go, the others stay.
    let none = merged_parents(&third, &[], &[], Some(4), &time(500));
    assert_eq!(none, vec![foreign_entry("a"), foreign_entry("z")]);
}

#[test]
fn a_parent_named_twice_has_one_entry_and_only_service_parents_are_ours() {
    let refs = [service_parent("a"), service_parent("a")];
    let merged = merged_parents(
        &[],
        &refs,
        &[
            verdict(0, vec![accepted(true, "Accepted")]),
            verdict(1, vec![accepted(true, "Accepted")]),
        ],
        None,
        &time(1),
    );
    assert_eq!(merged.len(), 1);
    assert!(is_service(
        &json!({ "group": "", "kind": "Service", "name": "a" })
    ));
    assert!(is_service(
        &json!({ "group": "core", "kind": "Service", "name": "a" })
    ));
    // The Gateway API's defaults: group gateway.networking.k8s.io, kind Gateway.
    assert!(!is_service(&json!({ "kind": "Service", "name": "a" })));
    assert!(!is_service(&json!({ "group": "", "name": "a" })));
}

// --- against the test API server, with the vendored Gateway API CRDs and sigil's ---

async fn install(server: &TestApiServer, manifests: &[&str]) {
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for text in manifests {
        for document in parse_manifest(text).unwrap() {
            if document["kind"] != "CustomResourceDefinition" {
                continue; // the install's ValidatingAdmissionPolicy
            }
            let crd: CustomResourceDefinition = serde_json::from_value(document).unwrap();
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
    }
}

async fn create_service(server: &TestApiServer, namespace: &str, name: &str, ports: Value) {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "ports": ports },
    }))
    .unwrap();
    Api::<Service>::namespaced(server.client(), namespace)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
}

fn api(server: &TestApiServer, kind: Watched, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), namespace, &kind.api_resource())
}

async fn create(server: &TestApiServer, kind: Watched, namespace: &str, name: &str, spec: Value) {
    let object = DynamicObject::new(name, &kind.api_resource())
        .within(namespace)
        .data(json!({ "spec": spec }));
    api(server, kind, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

/// An HTTPRoute on Service `parent` port 80 with `rules`.
fn route_spec(parent: &str, rules: Value) -> Value {
    json!({
        "parentRefs": [{ "group": "", "kind": "Service", "name": parent, "port": 80 }],
        "rules": rules,
    })
}

fn backend(name: &str, port: u16) -> Value {
    json!({ "name": name, "port": port })
}

/// `(status, reason)` of each condition of sigil's entry for parent 0, by type.
type Seen = BTreeMap<String, (String, String, String)>;

fn sigil_conditions(object: &DynamicObject) -> Option<Seen> {
    let entry = current_parents(object).into_iter().find(is_ours)?;
    Some(
        conditions::parse(entry.get("conditions"))
            .into_iter()
            .map(|c| (c.type_, (c.status, c.reason, c.message)))
            .collect(),
    )
}

/// Polls the route until sigil's entry satisfies `done`.
async fn until_route(
    server: &TestApiServer,
    kind: Watched,
    namespace: &str,
    name: &str,
    wait: Duration,
    done: impl Fn(&Seen) -> bool,
) -> (DynamicObject, Seen) {
    let deadline = Instant::now() + wait;
    loop {
        let object = api(server, kind, namespace).get(name).await.unwrap();
        if let Some(seen) = sigil_conditions(&object)
            && done(&seen)
        {
            return (object, seen);
        }
        assert!(
            Instant::now() < deadline,
            "{kind} {namespace}/{name} never reached the expected status: {:?}",
            object.data.get("status")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is(seen: &Seen, type_: &str, status: &str, reason: &str) -> bool {
    seen.get(type_)
        .is_some_and(|(s, r, _)| s == status && r == reason)
}

/// Polls the policy until its Accepted condition has `status` and `reason`; returns the message.
async fn until_policy(
    server: &TestApiServer,
    kind: Watched,
    name: &str,
    status: &str,
    reason: &str,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let object = api(server, kind, NS).get(name).await.unwrap();
        let current = conditions::parse(object.data.pointer("/status/conditions"));
        if let Some(c) = current.iter().find(|c| c.type_ == ACCEPTED)
            && c.status == status
            && c.reason == reason
        {
            assert_eq!(c.observed_generation, object.metadata.generation);
            return c.message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{kind} {NS}/{name} never got Accepted={status}/{reason}: {:?}",
            object.data.get("status")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each row of design-15 §4.2, through the running controller: the route's entry says what the
/// Gateway API says for that situation.
#[tokio::test]
async fn each_situation_gets_the_gateway_api_conditions() {
    let server = TestApiServer::start().await;
    install(&server, &[GATEWAY_API]).await;
    install(&server, &SIGIL_CRDS).await;
    let http80 = json!([{ "name": "http", "port": 80 }]);
    create_service(&server, NS, "reviews", http80.clone()).await;
    create_service(&server, NS, "reviews-v2", http80.clone()).await;
    create_service(&server, OTHER_NS, "ratings", http80.clone()).await;
    tokio::spawn(run(server.client()));
    let route = Watched::HttpRoute;
    let one_backend = |name: &str| json!([{ "backendRefs": [backend(name, 80)] }]);

    // (name, spec, in namespace, expected Accepted, ResolvedRefs, PartiallyInvalid)
    type Expect = Option<(&'static str, &'static str)>;
    let redirect = json!({ "type": "RequestRedirect", "requestRedirect": { "statusCode": 305 } });
    let good_redirect =
        json!({ "type": "RequestRedirect", "requestRedirect": { "statusCode": 301 } });
    let rewrite = json!({ "type": "URLRewrite", "urlRewrite": { "hostname": "example.com" } });
    let rows: Vec<(&str, Value, &str, Expect, Expect, Expect)> = vec![
        (
            "valid",
            route_spec("reviews", one_backend("reviews-v2")),
            NS,
            Some(("True", "Accepted")),
            Some(("True", "ResolvedRefs")),
            None,
        ),
        (
            "no-parent",
            route_spec("missing", one_backend("reviews-v2")),
            NS,
            Some(("False", "NoMatchingParent")),
            None,
            None,
        ),
        (
            "no-such-port",
            json!({
                "parentRefs": [{ "group": "", "kind": "Service", "name": "reviews", "port": 9 }],
                "rules": one_backend("reviews-v2"),
            }),
            NS,
            Some(("False", "NoMatchingParent")),
            None,
            None,
        ),
        (
            "no-such-section",
            json!({
                "parentRefs": [{ "group": "", "kind": "Service", "name": "reviews", "sectionName": "grpc" }],
                "rules": one_backend("reviews-v2"),
            }),
            NS,
            Some(("False", "NoMatchingParent")),
            None,
            None,
        ),
        (
            "unsupported-everywhere",
            route_spec("reviews", json!([{ "filters": [redirect.clone()] }])),
            NS,
            Some(("False", "UnsupportedValue")),
            None,
            None,
        ),
        (
            "unsupported-somewhere",
            route_spec(
                "reviews",
                json!([
                    { "matches": [{ "path": { "type": "PathPrefix", "value": "/a" } }], "filters": [redirect] },
                    { "backendRefs": [backend("reviews-v2", 80)] },
                ]),
            ),
            NS,
            Some(("True", "Accepted")),
            None,
            Some(("True", "UnsupportedValue")),
        ),
        (
            "incompatible",
            route_spec("reviews", json!([{ "filters": [good_redirect, rewrite] }])),
            NS,
            Some(("False", "IncompatibleFilters")),
            None,
            None,
        ),
        (
            "backend-missing",
            route_spec("reviews", one_backend("nowhere")),
            NS,
            Some(("True", "Accepted")),
            Some(("False", "BackendNotFound")),
            None,
        ),
        (
            "backend-port",
            route_spec(
                "reviews",
                json!([{ "backendRefs": [backend("reviews-v2", 9)] }]),
            ),
            NS,
            Some(("True", "Accepted")),
            Some(("False", "BackendNotFound")),
            None,
        ),
        (
            "backend-kind",
            route_spec(
                "reviews",
                json!([{ "backendRefs": [{ "group": "example.com", "kind": "Bucket", "name": "b" }] }]),
            ),
            NS,
            Some(("True", "Accepted")),
            Some(("False", "InvalidKind")),
            None,
        ),
        (
            "cross-namespace",
            route_spec(
                "reviews",
                json!([{ "backendRefs": [{ "name": "ratings", "namespace": OTHER_NS, "port": 80 }] }]),
            ),
            // Mesh routes need no ReferenceGrant (GEP-1294).
            NS,
            Some(("True", "Accepted")),
            Some(("True", "ResolvedRefs")),
            None,
        ),
        (
            // A consumer route: in the client's namespace, on a Service of another (GAMMA).
            "consumer",
            json!({
                "parentRefs": [{ "group": "", "kind": "Service", "name": "ratings",
                                 "namespace": OTHER_NS, "port": 80 }],
                "rules": [{ "backendRefs": [{ "name": "ratings", "namespace": OTHER_NS, "port": 80 }] }],
            }),
            NS,
            Some(("True", "Accepted")),
            Some(("True", "ResolvedRefs")),
            None,
        ),
    ];
    for (name, spec, namespace, _, _, _) in &rows {
        create(&server, route, namespace, name, spec.clone()).await;
    }
    let expect = |seen: &Seen, type_: &str, expected: &Expect| match expected {
        Some((status, reason)) => is(seen, type_, status, reason),
        None => true,
    };
    for (name, _, namespace, accepted, resolved, partial) in &rows {
        println!("case {name}");
        let (object, seen) = until_route(&server, route, namespace, name, WAIT, |seen| {
            expect(seen, "Accepted", accepted)
                && expect(seen, "ResolvedRefs", resolved)
                && expect(seen, "PartiallyInvalid", partial)
        })
        .await;
        if partial.is_none() {
            assert!(!seen.contains_key("PartiallyInvalid"), "{name}: {seen:?}");
        } else {
            let (_, _, message) = &seen["PartiallyInvalid"];
            assert!(message.starts_with("Dropped Rule"), "{name}: {message}");
        }
        let entry = current_parents(&object).into_iter().find(is_ours).unwrap();
        assert_eq!(
            entry["parentRef"], object.data["spec"]["parentRefs"][0],
            "{name}: parentRef copied exactly"
        );
        for condition in conditions::parse(entry.get("conditions")) {
            assert_eq!(condition.observed_generation, Some(1), "{name}");
        }
    }

    // A Service appearing resolves its backend.
    println!("case backend-missing after the Service exists");
    create_service(&server, NS, "nowhere", http80).await;
    until_route(&server, route, NS, "backend-missing", WAIT, |seen| {
        is(seen, "ResolvedRefs", "True", "ResolvedRefs")
    })
    .await;

    // A GRPCRoute is judged the same way.
    println!("case grpc");
    create(
        &server,
        Watched::GrpcRoute,
        NS,
        "grpc",
        route_spec("reviews", one_backend("reviews-v2")),
    )
    .await;
    until_route(&server, Watched::GrpcRoute, NS, "grpc", WAIT, |seen| {
        is(seen, "Accepted", "True", "Accepted") && is(seen, "ResolvedRefs", "True", "ResolvedRefs")
    })
    .await;

    // sigil's policy kinds: GEP-713 reasons on Accepted.
    let target = |name: &str| json!([{ "group": "", "kind": "Service", "name": name }]);
    println!("case policies");
    create(
        &server,
        Watched::BackendPolicy,
        NS,
        "reviews",
        json!({ "targetRefs": target("reviews"), "outlierDetection": { "consecutive5xxErrors": 3 } }),
    )
    .await;
    until_policy(
        &server,
        Watched::BackendPolicy,
        "reviews",
        "True",
        "Accepted",
    )
    .await;
    create(
        &server,
        Watched::BackendPolicy,
        NS,
        "nowhere",
        json!({ "targetRefs": target("not-a-service") }),
    )
    .await;
    until_policy(
        &server,
        Watched::BackendPolicy,
        "nowhere",
        "False",
        "TargetNotFound",
    )
    .await;
    create(
        &server,
        Watched::BackendPolicy,
        NS,
        "reviews-again",
        json!({ "targetRefs": target("reviews") }),
    )
    .await;
    until_policy(
        &server,
        Watched::BackendPolicy,
        "reviews-again",
        "False",
        "Conflicted",
    )
    .await;
    create(
        &server,
        Watched::RateLimitPolicy,
        NS,
        "too-generous",
        json!({ "targetRefs": target("reviews"), "total": { "requests": 10 }, "identity": { "requests": 20 } }),
    )
    .await;
    let message = until_policy(
        &server,
        Watched::RateLimitPolicy,
        "too-generous",
        "False",
        "Invalid",
    )
    .await;
    assert!(message.contains("identity"), "{message}");
    create(
        &server,
        Watched::RateLimitPolicy,
        NS,
        "ratings",
        json!({ "targetRefs": target("reviews-v2"), "total": { "requests": 100 } }),
    )
    .await;
    until_policy(
        &server,
        Watched::RateLimitPolicy,
        "ratings",
        "True",
        "Accepted",
    )
    .await;
}

/// The write itself, with verdicts given: other controllers' entries survive, sigil's entry of
/// a parentRef removed from the spec goes, and nothing is written when nothing changed.
#[tokio::test]
async fn writes_keep_foreign_entries_clean_up_and_happen_only_on_change() {
    let server = TestApiServer::start().await;
    install(&server, &[GATEWAY_API]).await;
    let writer = RouteStatusWriter::new(server.client());
    let routes = api(&server, Watched::HttpRoute, NS);
    create(
        &server,
        Watched::HttpRoute,
        NS,
        "r",
        json!({ "parentRefs": [service_parent("a"), service_parent("b")] }),
    )
    .await;
    // Another controller wrote its entry first.
    let mut object = routes.get("r").await.unwrap();
    object.data["status"] = json!({ "parents": [foreign_entry("a")] });
    routes
        .replace_status("r", &PostParams::default(), &object)
        .await
        .unwrap();
    let key = (Watched::HttpRoute, NS.to_owned(), "r".to_owned());
    let both = [
        verdict(0, vec![accepted(true, "Accepted")]),
        verdict(1, vec![accepted(true, "Accepted")]),
    ];
    let object = routes.get("r").await.unwrap();
    writer
        .write_route(&key, &object, &both, &time(10))
        .await
        .unwrap();
    let written = routes.get("r").await.unwrap();
    let parents = current_parents(&written);
    assert_eq!(parents.len(), 3);
    assert_eq!(parents[0], foreign_entry("a"));

    // Unchanged: no write reaches the server.
    let revision = server.resource_version();
    writer
        .write_route(&key, &written, &both, &time(20))
        .await
        .unwrap();
    assert_eq!(server.resource_version(), revision, "nothing written");

    // Parent b removed from the spec (generation 2).
    routes
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "parentRefs": [service_parent("a")] } })),
        )
        .await
        .unwrap();
    let changed = routes.get("r").await.unwrap();
    writer
        .write_route(&key, &changed, &both[..1], &time(30))
        .await
        .unwrap();
    let parents = current_parents(&routes.get("r").await.unwrap());
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0], foreign_entry("a"));
    assert_eq!(parents[1]["parentRef"], service_parent("a"));
    assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 2);
    assert_eq!(
        parents[1]["conditions"][0]["lastTransitionTime"],
        json!(time(10)),
        "Accepted stayed True"
    );

    // A verdict on a generation the server has moved past is not written (its event follows).
    let revision = server.resource_version();
    writer
        .write_route(&key, &object, &both, &time(40))
        .await
        .unwrap();
    assert_eq!(server.resource_version(), revision);

    // Conflicts and vanished objects are superseded, not retried.
    let mut stale = routes.get("r").await.unwrap();
    routes
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "web" } } })),
        )
        .await
        .unwrap();
    stale.data["status"] = json!({ "parents": [] });
    let conflict = routes
        .replace_status("r", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    let error = RouteStatusError::Write {
        kind: Watched::HttpRoute,
        namespace: NS.into(),
        name: "r".into(),
        source: conflict,
    };
    assert!(error.superseded(), "{error}");
    let gone = (Watched::HttpRoute, NS.to_owned(), "gone".to_owned());
    let mut ghost = object.clone();
    ghost.metadata.name = Some("gone".into());
    ghost.data["status"] = Value::Null;
    let error = writer
        .write_route(&gone, &ghost, &both, &time(50))
        .await
        .unwrap_err();
    assert!(error.superseded(), "{error}");
}

/// Without the Gateway API installed, sigil's policies are judged at once, and routes are once
/// the CRDs arrive.
#[tokio::test]
async fn without_the_gateway_api_policies_are_judged_and_routes_once_it_is_installed() {
    let server = TestApiServer::start_with(ServerOptions::default()).await;
    install(&server, &SIGIL_CRDS).await;
    create_service(
        &server,
        NS,
        "reviews",
        json!([{ "name": "http", "port": 80 }]),
    )
    .await;
    tokio::spawn(run(server.client()));
    create(
        &server,
        Watched::BackendPolicy,
        NS,
        "reviews",
        json!({ "targetRefs": [{ "group": "", "kind": "Service", "name": "reviews" }] }),
    )
    .await;
    until_policy(
        &server,
        Watched::BackendPolicy,
        "reviews",
        "True",
        "Accepted",
    )
    .await;

    install(&server, &[GATEWAY_API]).await;
    create(
        &server,
        Watched::HttpRoute,
        NS,
        "late",
        route_spec(
            "reviews",
            json!([{ "backendRefs": [backend("reviews", 80)] }]),
        ),
    )
    .await;
    until_route(
        &server,
        Watched::HttpRoute,
        NS,
        "late",
        CRD_RETRY_WAIT,
        |seen| is(seen, "Accepted", "True", "Accepted"),
    )
    .await;
}
