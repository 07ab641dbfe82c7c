use std::net::IpAddr;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::Event;
use serde_json::json;
use sigil_identity::SpiffeId;
use sigil_proto::sigil::route::v1::route_discovery_client::RouteDiscoveryClient;
use sigil_proto::sigil::route::v1::{PortRoutes, RouteOrigin as WireOrigin};
use sigil_proxy_api::routes::UnmeshedService;
use sigil_proxy_api::services::{Endpoint, MeshService, Protocol, ServiceKey, ServicePort};
use sigil_route::compiled::BackendTarget;
use sigil_test_apiserver::{ServerOptions, TestApiServer};

use super::*;
use crate::object_source::ClusterKind;
use crate::object_source::tests::{
    CRD_RETRY_WAIT, WAIT, failed_list, metrics, not_found, replace, until,
};
use crate::push_stream::PushFeed;
use crate::test_support::{BundleSource, TestAgent, TestCa, WEB_ID, td, this_uid};

const SHOP_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const OTHER_ID: &str = "spiffe://cluster.local/ns/other/sa/batch";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A meshed Service in `demo` with one port 80 and one endpoint.
fn mesh_service(name: &str, cluster_ip: &str, endpoint_ip: &str, id: &str) -> MeshService {
    MeshService {
        key: ServiceKey::new("demo", name),
        cluster_ips: vec![ip(cluster_ip)],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http1,
            app_protocol: None,
        }],
        endpoints: vec![Endpoint {
            ip: ip(endpoint_ip),
            ports: BTreeMap::from([("http".to_string(), 8080)]),
            id: id.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            zone: None,
            source: "mesh-file".into(),
        }],
    }
}

/// demo/web, demo/web-v2 and demo/api, each meshed.
fn mesh(version: u64) -> Arc<MeshState> {
    Arc::new(MeshState::new(
        version,
        BTreeMap::new(),
        [
            mesh_service("web", "198.19.0.10", "198.18.0.2", WEB_ID),
            mesh_service("web-v2", "198.19.0.11", "198.18.0.3", WEB_ID),
            mesh_service(
                "api",
                "198.19.0.12",
                "198.18.0.4",
                "spiffe://cluster.local/ns/demo/sa/api",
            ),
        ],
    ))
}

/// An HTTPRoute in `namespace` on Service demo/`parent` port 80, sending `/v2` to web-v2 and
/// the rest to `rest`.
fn http_route(namespace: &str, name: &str, parent: &str, rest: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, namespace: demo, port: 80}}]\n\
         \x20 rules:\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]\n\
         \x20   backendRefs: [{{name: web-v2, namespace: demo, port: 80}}]\n\
         \x20 - backendRefs: [{{name: {rest}, namespace: demo, port: 80}}]\n"
    )
}

const ALLOW_WEB: &str = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                         metadata: {name: allow-web, namespace: demo}\nspec: {action: ALLOW}\n";

fn key(resource: RouteResource, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        resource,
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn documents(docs: &[&str]) -> String {
    docs.join("---\n")
}

fn port_key(update: &PortRoutes) -> String {
    format!("{}/{}:{}", update.namespace, update.name, update.port)
}

fn upserted_ports(update: &RouteUpdate) -> Vec<String> {
    update.port_upserts.iter().map(port_key).collect()
}

fn scope(id: &str) -> ClientScope {
    ClientScope::of(&id.parse::<SpiffeId>().unwrap())
}

// --- the policy file's route documents ---

#[test]
fn the_policy_file_s_route_documents_are_read_beside_its_policies() {
    let yaml = documents(&[
        "# routes and policies\n",
        ALLOW_WEB,
        &http_route("demo", "web", "web", "web"),
        "apiVersion: sigil.dev/v1alpha1\nkind: BackendPolicy\n\
         metadata: {name: web, namespace: demo}\n\
         spec: {targetRefs: [{group: \"\", kind: Service, name: web}]}\nstatus: {ancestors: []}\n",
    ]);
    let objects = parse_file(yaml.as_bytes()).unwrap();
    assert_eq!(
        objects.keys().cloned().collect::<Vec<_>>(),
        [
            key(RouteResource::HttpRoute, "demo", "web"),
            key(RouteResource::BackendPolicy, "demo", "web"),
        ]
    );
    let route = &objects[&key(RouteResource::HttpRoute, "demo", "web")];
    assert!(matches!(&route.object, RouteObject::HttpRoute(r) if r.spec.rules.len() == 2));
    assert!(
        objects[&key(RouteResource::BackendPolicy, "demo", "web")]
            .written
            .get("status")
            .is_none(),
        "what the API server wrote is dropped"
    );
    for empty in ["", "---\n", ALLOW_WEB] {
        assert!(
            parse_file(empty.as_bytes()).unwrap().is_empty(),
            "{empty:?}"
        );
    }
}

#[test]
fn a_bad_route_document_is_refused_naming_the_document_and_field() {
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
               metadata: {name: web, namespace: demo}\nspec: {rules: 3}\n";
    let err = parse_file(documents(&[ALLOW_WEB, bad]).as_bytes()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("document 2: HTTPRoute demo/web: spec.rules"),
        "{message}"
    );
    let route = http_route("demo", "web", "web", "web");
    let err = parse_file(documents(&[&route, ALLOW_WEB, &route]).as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 3: HTTPRoute demo/web is already document 1"
    );
    let no_namespace =
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\n";
    let err = parse_file(no_namespace.as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 1: object without metadata.namespace"
    );
}

// --- the route task ---

#[tokio::test]
async fn routes_wait_for_the_mesh_then_follow_the_file_and_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(
        &path,
        documents(&[ALLOW_WEB, &http_route("demo", "web", "web", "web")]),
    )
    .unwrap();
    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(MeshState::default()));
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: None,
        file: Some(RouteFile::load(&path).unwrap()),
    };
    let metrics = metrics();
    let rx = spawn(td(), sources, mesh_rx, metrics.clone(), shutdown);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !rx.borrow().is_synced(),
        "routes are not judged before the Services are known"
    );
    mesh_tx.send_replace(mesh(1));
    let synced = until(&rx, WAIT, RouteState::is_synced).await;
    assert_eq!(synced.version, 1);
    let web_80 = sigil_route::PortKey {
        service: ServiceRef {
            namespace: "demo".into(),
            name: "web".into(),
        },
        port: 80,
    };
    assert_eq!(
        synced.compiled().producer.keys().collect::<Vec<_>>(),
        [&web_80]
    );
    assert_eq!(synced.inputs().services.len(), 3);

    // A mesh state that changes nothing routes use (members) is no new version.
    let mut members = BTreeMap::new();
    members.insert(
        ip("198.18.0.9"),
        sigil_proxy_api::mesh::Member::single(WEB_ID.parse().unwrap(), "mesh-file"),
    );
    let services: Vec<MeshService> = mesh(1)
        .services()
        .services()
        .map(|s| (**s).clone())
        .collect();
    mesh_tx.send_replace(Arc::new(MeshState::new(2, members, services)));
    // A route added to the file is.
    replace(
        &path,
        documents(&[
            ALLOW_WEB,
            &http_route("demo", "web", "web", "web"),
            &http_route("demo", "api", "api", "api"),
        ]),
    );
    let edited = until(&rx, WAIT, |state| state.inputs().objects.len() == 2).await;
    assert_eq!(edited.version, 2, "the members' change made no version");
    assert_eq!(edited.compiled().producer.len(), 2);
    // A Service going away is a change.
    mesh_tx.send_replace(Arc::new(MeshState::new(
        3,
        BTreeMap::new(),
        [mesh_service("web", "198.19.0.10", "198.18.0.2", WEB_ID)],
    )));
    let fewer = until(&rx, WAIT, |state| state.version == 3).await;
    assert_eq!(fewer.inputs().services.len(), 1);

    // An invalid edit keeps the last good routes, and is counted.
    replace(
        &path,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x}\n",
    );
    tokio::time::sleep(FILE_POLL_INTERVAL * 2).await;
    assert_eq!(rx.borrow().version, 3);
    assert_eq!(rx.borrow().inputs().objects.len(), 2);
    assert!(metrics.policy_file_reload_failures.get() >= 1);
}

/// A route task's state with no source but `file`, for [`state`].
fn store(file: Option<RouteFile>) -> RouteStore {
    RouteStore {
        td: td(),
        mesh: None,
        source: ObjectSource::new(false, file, metrics().policy_file_reload_failures.clone()),
        last: None,
    }
}

/// The state `store` publishes next when its objects are these documents, over [`mesh`].
fn state(store: &mut RouteStore, version: u64, docs: &[&str]) -> Arc<RouteState> {
    let objects = parse_file(documents(docs).as_bytes()).unwrap();
    let inputs = RouteInputs {
        objects,
        services: services(&mesh(1)),
    };
    let content = store.compile(inputs);
    store.last = Some(content.clone());
    Arc::new(store.snapshot(version, content))
}

async fn next(feed: &mut StateFeed<RouteState, RouteUpdate>) -> RouteUpdate {
    tokio::time::timeout(WAIT, feed.next_message())
        .await
        .expect("no message")
        .unwrap()
}

async fn nothing(feed: &mut StateFeed<RouteState, RouteUpdate>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(200), feed.next_message())
            .await
            .is_err(),
        "nothing is sent"
    );
}

#[tokio::test]
async fn each_client_gets_its_namespace_s_consumer_routes_else_the_producer_s_then_only_changes() {
    let producer = http_route("demo", "web", "web", "web");
    let consumer = http_route("shop", "web-for-shop", "web", "web-v2");
    let api = http_route("demo", "api", "api", "api");
    let mut store = store(None);
    let first = state(&mut store, 1, &[&producer, &consumer, &api]);
    let (tx, rx) = watch::channel(first);
    let metrics = metrics();
    let mut shop = feed(rx.clone(), &metrics, scope(SHOP_ID));
    let mut other = feed(rx.clone(), &metrics, scope(OTHER_ID));

    // Reset first, with the whole view.
    let shop_first = next(&mut shop).await;
    assert!(shop_first.reset);
    assert_eq!(shop_first.version, 1);
    assert_eq!(upserted_ports(&shop_first), ["demo/api:80", "demo/web:80"]);
    let origin = |update: &RouteUpdate, key: &str| {
        update
            .port_upserts
            .iter()
            .find(|p| port_key(p) == key)
            .map(|p| p.origin)
            .unwrap()
    };
    assert_eq!(
        origin(&shop_first, "demo/web:80"),
        WireOrigin::Consumer as i32
    );
    assert_eq!(
        origin(&shop_first, "demo/api:80"),
        WireOrigin::Producer as i32
    );
    let other_first = next(&mut other).await;
    assert!(other_first.reset);
    assert_eq!(upserted_ports(&other_first), ["demo/api:80", "demo/web:80"]);
    assert_eq!(
        origin(&other_first, "demo/web:80"),
        WireOrigin::Producer as i32
    );

    // The api route changes: both get that entry only.
    let api_moved = http_route("demo", "api", "api", "web");
    tx.send_replace(state(&mut store, 2, &[&producer, &consumer, &api_moved]));
    for feed in [&mut shop, &mut other] {
        let update = next(feed).await;
        assert!(!update.reset);
        assert_eq!(update.version, 2);
        assert_eq!(upserted_ports(&update), ["demo/api:80"]);
        assert!(update.port_removals.is_empty());
    }

    // The consumer route goes: shop falls back to the producer's; the others see no change.
    tx.send_replace(state(&mut store, 3, &[&producer, &api_moved]));
    let update = next(&mut shop).await;
    assert_eq!(upserted_ports(&update), ["demo/web:80"]);
    assert_eq!(origin(&update, "demo/web:80"), WireOrigin::Producer as i32);
    nothing(&mut other).await;

    // The api route goes: removed for both.
    tx.send_replace(state(&mut store, 4, &[&producer]));
    for feed in [&mut shop, &mut other] {
        let update = next(feed).await;
        assert!(update.port_upserts.is_empty());
        assert_eq!(update.port_removals, ["demo/api:80"]);
    }

    // A new stream starts with a reset of the current view.
    let mut late = feed(rx, &metrics, scope(SHOP_ID));
    let update = next(&mut late).await;
    assert!(update.reset);
    assert_eq!(update.version, 4);
    assert_eq!(upserted_ports(&update), ["demo/web:80"]);
}

#[test]
fn a_client_s_namespace_is_the_ns_segment_of_its_id() {
    assert_eq!(scope(SHOP_ID).namespace, "shop");
    assert_eq!(scope("spiffe://cluster.local/host/db1").namespace, "");
}

// --- backends outside the mesh ---

/// demo/legacy, a Service outside the mesh with one port 80.
fn unmeshed_service(name: &str, cluster_ips: &[&str]) -> UnmeshedService {
    UnmeshedService {
        key: ServiceKey::new("demo", name),
        cluster_ips: cluster_ips.iter().map(|a| ip(a)).collect(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http1,
            app_protocol: None,
        }],
    }
}

/// [`mesh`] with these unmeshed Services.
fn mesh_with_unmeshed(version: u64, unmeshed: Vec<UnmeshedService>) -> Arc<MeshState> {
    let services: Vec<MeshService> = mesh(version)
        .services()
        .services()
        .map(|s| (**s).clone())
        .collect();
    Arc::new(MeshState::new(version, BTreeMap::new(), services).with_unmeshed(unmeshed))
}

/// The targets of the rules of the producer route on demo/web:80, in spec order.
fn web_targets(state: &RouteContent) -> Vec<Vec<BackendTarget>> {
    let web_80 = sigil_route::PortKey {
        service: ServiceRef {
            namespace: "demo".into(),
            name: "web".into(),
        },
        port: 80,
    };
    let routes = state
        .compiled
        .producer
        .get(&web_80)
        .expect("routes on web:80");
    let table = routes.http.as_ref().expect("an HTTP table");
    table
        .rules
        .iter()
        .map(|rule| {
            (rule.backends.entries.iter())
                .map(|backend| backend.target.clone())
                .collect()
        })
        .collect()
}

fn legacy_backend(cluster_ips: &[&str]) -> BackendTarget {
    BackendTarget::Service(sigil_route::compiled::Backend {
        service: ServiceRef {
            namespace: "demo".into(),
            name: "legacy".into(),
        },
        port: 80,
        cluster_ips: cluster_ips.iter().map(|a| ip(a)).collect(),
    })
}

/// Whether the routes' `ResolvedRefs` condition is true, as the CA would write it.
fn refs_resolved(content: &RouteContent) -> Vec<bool> {
    let objects: RouteObjects = (content.inputs.objects.values())
        .map(|stored| stored.object.clone())
        .collect();
    let catalog = Catalog {
        services: content.inputs.services.clone(),
    };
    sigil_route::validate::judge_routes(&objects, &catalog)
        .iter()
        .flat_map(|verdict| &verdict.parents)
        .flat_map(|parent| &parent.conditions)
        .filter(|condition| condition.type_ == "ResolvedRefs")
        .map(|condition| condition.status)
        .collect()
}

#[test]
fn a_backend_outside_the_mesh_is_reached_at_its_cluster_ips_and_follows_the_mesh_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, http_route("demo", "web", "web", "legacy")).unwrap();
    let mut store = store(Some(RouteFile::load(&path).unwrap()));
    let legacy_ips = ["198.19.0.20", "2001:2::20"];

    // Before: the route feed knew no unmeshed Service, and its share was answered 500.
    assert!(store.on_event(RouteEvent::Mesh(mesh(1))));
    let content = store.content();
    assert!(matches!(
        web_targets(&content)[1][..],
        [BackendTarget::Invalid(_)]
    ));
    assert_eq!(refs_resolved(&content), [false]);

    // Outside the mesh: a plain connection to one of its cluster IPs.
    let unmeshed = vec![unmeshed_service("legacy", &legacy_ips)];
    assert!(store.on_event(RouteEvent::Mesh(mesh_with_unmeshed(2, unmeshed.clone()))));
    let content = store.content();
    let targets = web_targets(&content);
    assert_eq!(targets[1], [legacy_backend(&legacy_ips)]);
    // Its parent is meshed web; web-v2 stays a meshed backend, balanced by the proxy.
    assert_eq!(
        targets[0],
        [BackendTarget::Service(sigil_route::compiled::Backend {
            service: ServiceRef {
                namespace: "demo".into(),
                name: "web-v2".into(),
            },
            port: 80,
            cluster_ips: vec![],
        })]
    );
    assert_eq!(refs_resolved(&content), [true]);
    let info = &content.inputs.services[&ServiceRef {
        namespace: "demo".into(),
        name: "legacy".into(),
    }];
    assert!(!info.meshed && info.endpoint_ids.is_empty());

    // The same state again is no change.
    assert!(!store.on_event(RouteEvent::Mesh(mesh_with_unmeshed(3, unmeshed))));

    // Its cluster IPs changing is one.
    let moved = vec![unmeshed_service("legacy", &["198.19.0.21"])];
    assert!(store.on_event(RouteEvent::Mesh(mesh_with_unmeshed(4, moved.clone()))));
    assert_eq!(
        web_targets(&store.content())[1],
        [legacy_backend(&["198.19.0.21"])]
    );

    // Becoming meshed is one: now balanced over its endpoints.
    let mut services: Vec<MeshService> = mesh(5)
        .services()
        .services()
        .map(|s| (**s).clone())
        .collect();
    services.push(mesh_service("legacy", "198.19.0.21", "198.18.0.5", WEB_ID));
    assert!(store.on_event(RouteEvent::Mesh(Arc::new(MeshState::new(
        5,
        BTreeMap::new(),
        services
    )))));
    let content = store.content();
    assert_eq!(web_targets(&content)[1], [legacy_backend(&[])]);
    assert_eq!(refs_resolved(&content), [true]);

    // And leaving the mesh again.
    assert!(store.on_event(RouteEvent::Mesh(mesh_with_unmeshed(6, moved))));
    assert_eq!(
        web_targets(&store.content())[1],
        [legacy_backend(&["198.19.0.21"])]
    );

    // A headless Service outside the mesh has no address to reach: still not found.
    let headless = vec![unmeshed_service("legacy", &[])];
    assert!(store.on_event(RouteEvent::Mesh(mesh_with_unmeshed(7, headless))));
    let content = store.content();
    assert!(matches!(
        web_targets(&content)[1][..],
        [BackendTarget::Invalid(_)]
    ));
    assert_eq!(refs_resolved(&content), [false]);
}

// --- the Kubernetes source, against the test API server ---

#[test]
fn a_missing_crd_is_an_empty_synced_kind_until_it_is_listed() {
    let http = RouteResource::HttpRoute;
    let mut state = ClusterKind::default();
    assert!(!state.on_event(http, Ok(Event::Init)));
    assert!(state.on_event(http, not_found()), "synced: publish");
    assert!(state.listed.synced && state.missing && state.listed.items.is_empty());
    assert!(
        !state.on_event(http, not_found()),
        "still missing: no change"
    );

    let route = DynamicObject::new("web", &http.api_resource())
        .within("demo")
        .data(json!({ "spec": { "parentRefs": [{ "kind": "Service", "name": "web" }] }, "status": { "parents": [] } }));
    assert!(!state.on_event(http, Ok(Event::Init)));
    assert!(!state.on_event(http, Ok(Event::InitApply(route.clone()))));
    assert!(state.on_event(http, Ok(Event::InitDone)));
    assert!(!state.missing);
    assert_eq!(
        state.listed.items.keys().collect::<Vec<_>>(),
        [&key(http, "demo", "web")]
    );
    // The CA writing the route's status is no change.
    let with_status = route
        .clone()
        .data(json!({ "spec": { "parentRefs": [{ "kind": "Service", "name": "web" }] }, "status": { "parents": [{ "controllerName": "sigil.dev/mesh" }] } }));
    assert!(!state.on_event(http, Ok(Event::Apply(with_status))));
    // Forbidden (no RBAC for it) is not taken to mean none.
    let mut unsynced = ClusterKind::default();
    assert!(!unsynced.on_event(http, failed_list("forbidden", "Forbidden", 403)));
    assert!(!unsynced.listed.synced);
}

fn crd(resource: RouteResource) -> CustomResourceDefinition {
    let (group, version) = resource.group_version();
    object_source::tests::crd(group, version, resource.plural(), resource.kind())
}

#[tokio::test]
async fn without_the_gateway_api_crds_routes_are_synced_and_empty_until_they_are_installed() {
    let server = TestApiServer::start_with(ServerOptions {
        serve_undefined_resources: false,
        ..ServerOptions::default()
    })
    .await;
    let (_mesh_tx, mesh_rx) = watch::channel(mesh(1));
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(server.client()),
        file: None,
    };
    let rx = spawn(td(), sources, mesh_rx, metrics(), shutdown);
    let synced = until(&rx, WAIT, RouteState::is_synced).await;
    assert!(synced.inputs().objects.is_empty());
    assert!(synced.compiled().producer.is_empty());

    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    crds.create(&PostParams::default(), &crd(RouteResource::HttpRoute))
        .await
        .unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        server.client(),
        "demo",
        &RouteResource::HttpRoute.api_resource(),
    );
    let route: Value = serde_yaml::from_str(&http_route("demo", "web", "web", "web")).unwrap();
    let object = DynamicObject::new("web", &RouteResource::HttpRoute.api_resource())
        .data(json!({ "spec": route["spec"] }));
    api.create(&PostParams::default(), &object).await.unwrap();
    let installed = until(&rx, CRD_RETRY_WAIT, |state| {
        !state.inputs().objects.is_empty()
    })
    .await;
    assert_eq!(
        installed.inputs().objects.keys().collect::<Vec<_>>(),
        [&key(RouteResource::HttpRoute, "demo", "web")]
    );
    assert_eq!(installed.compiled().producer.len(), 1);
}

// --- the gRPC service on a real socket ---

async fn serve(unix_map: &str) -> TestAgent {
    let ca = TestCa::prepare().await;
    TestAgent::serve(
        SocketApi::Routes,
        ca,
        Duration::from_secs(3600),
        unix_map,
        BundleSource::Test,
    )
    .await
}

#[tokio::test]
async fn an_attested_caller_gets_its_view_and_an_unattested_one_is_refused() {
    let uid = this_uid();
    let agent = serve(&format!("workloads:\n- {{uid: {uid}, id: {SHOP_ID}}}\n")).await;
    agent.route_tx.send_replace(state(
        &mut store(None),
        1,
        &[
            &http_route("demo", "web", "web", "web"),
            &http_route("shop", "web-for-shop", "web", "web-v2"),
        ],
    ));
    let mut client = RouteDiscoveryClient::new(agent.channel().await);
    let mut stream = client
        .watch_routes(WatchRoutesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.reset);
    assert_eq!(upserted_ports(&first), ["demo/web:80"]);
    assert_eq!(first.port_upserts[0].origin, WireOrigin::Consumer as i32);
    assert_eq!(agent.streams_open(), 1);
    assert_eq!(agent.pushes(), 1);

    let refused = serve(&format!(
        "workloads:\n- {{uid: {uid}, path: /usr/bin/not-this-test, id: {SHOP_ID}}}\n"
    ))
    .await;
    let err = RouteDiscoveryClient::new(refused.channel().await)
        .watch_routes(WatchRoutesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}
