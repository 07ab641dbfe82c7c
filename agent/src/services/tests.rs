use std::time::Duration;

use sigil_proto::sigil::mesh::v1 as wire;
use sigil_proto::sigil::mesh::v1::service_discovery_client::ServiceDiscoveryClient;
use sigil_proxy_api::mesh::Member;
use sigil_proxy_api::services::ServiceTable;

use super::*;
use crate::push_stream::PushFeed;
use crate::test_support::{BundleSource, TestAgent, TestCa, WEB_ID, td, this_uid, uid_is_web};

const WAIT: Duration = Duration::from_secs(10);
const API_ID: &str = "spiffe://cluster.local/ns/demo/sa/api";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn k8s_service(annotation: Option<&str>) -> Service {
    let annotations = annotation
        .map(|value| serde_json::json!({OPAQUE_PORTS_ANNOTATION: value}))
        .unwrap_or(serde_json::json!({}));
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "api", "namespace": "demo", "annotations": annotations},
        "spec": {
            "clusterIP": "198.19.0.10",
            "ports": [
                {"name": "web", "port": 80, "targetPort": "http", "appProtocol": "kubernetes.io/h2c"},
                {"name": "grpc-api", "port": 9090, "protocol": "TCP"},
                {"name": "db", "port": 3306},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        },
    }))
    .unwrap()
}

#[test]
fn service_ports_carry_their_declared_protocols_and_the_opaque_annotation() {
    let port = |name: &str, number: u16, protocol: Protocol, app: Option<&str>| ServicePort {
        name: name.into(),
        port: number,
        protocol,
        app_protocol: app.map(Into::into),
    };
    // Without the annotation: appProtocol, then the name's prefix, else detected; UDP left out.
    let (ports, invalid) = service_ports(&k8s_service(None));
    assert_eq!(
        ports,
        [
            port("web", 80, Protocol::Http2, Some("kubernetes.io/h2c")),
            port("grpc-api", 9090, Protocol::Grpc, None),
            port("db", 3306, Protocol::Detect, None),
        ]
    );
    assert_eq!(invalid, None);

    // Listed as opaque: whatever else says.
    let (ports, invalid) = service_ports(&k8s_service(Some("3306, 9000-9100")));
    let protocols: Vec<Protocol> = ports.iter().map(|p| p.protocol).collect();
    assert_eq!(
        protocols,
        [Protocol::Http2, Protocol::Opaque, Protocol::Opaque]
    );
    assert_eq!(invalid, None);

    // Invalid: ignored, and reported for the log.
    let (ports, invalid) = service_ports(&k8s_service(Some("3306,mysql")));
    assert_eq!(ports, service_ports(&k8s_service(None)).0);
    assert_eq!(
        invalid,
        Some(InvalidOpaquePorts {
            value: "3306,mysql".into(),
            reason: "\"mysql\" is not a port (1-65535) or a range of ports (4000-4010)".into(),
        })
    );
}

#[test]
fn endpoint_conditions_take_kubernetes_defaults_and_ports_go_by_name() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "api-x", "namespace": "demo"},
        "addressType": "IPv4",
        "endpoints": [
            // No conditions at all: ready, so serving; not terminating.
            {"addresses": ["198.18.0.2"], "nodeName": "node-a", "zone": "zone-1"},
            // Not ready, serving unset: serving follows ready.
            {"addresses": ["198.18.0.3"], "conditions": {"ready": false}},
            // Terminating, still serving.
            {"addresses": ["198.18.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ],
        "ports": [
            {"name": "web", "port": 8080},
            {"name": "grpc-api", "port": 9091, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "any"},
        ],
    }))
    .unwrap();
    let states: Vec<EndpointState> = slice.endpoints.iter().map(EndpointState::of).collect();
    let state =
        |ready, serving, terminating, node: Option<&str>, zone: Option<&str>| EndpointState {
            ready,
            serving,
            terminating,
            node: node.map(Into::into),
            zone: zone.map(Into::into),
        };
    assert_eq!(
        states,
        [
            state(true, true, false, Some("node-a"), Some("zone-1")),
            state(false, false, false, None, None),
            state(false, true, true, None, None),
        ]
    );
    assert_eq!(
        slice_ports(&slice),
        BTreeMap::from([("web".into(), 8080), ("grpc-api".into(), 9091)])
    );
}

fn members() -> BTreeMap<IpAddr, SpiffeId> {
    BTreeMap::from([
        (ip("198.18.0.2"), API_ID.parse().unwrap()),
        (ip("198.18.0.4"), WEB_ID.parse().unwrap()),
    ])
}

fn parse(yaml: &str) -> Result<Vec<MeshService>, ServicesError> {
    let services: Vec<FileService> = serde_yaml::from_str(yaml).unwrap();
    file_services(&services, &members())
}

#[test]
fn the_mesh_files_services_take_their_endpoints_identities_from_the_members() {
    let services = parse(
        r#"
- namespace: demo
  name: api
  clusterIPs: [198.19.0.10, "2001:2::10"]
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: db, port: 3306}
  opaquePorts: "3306"
  endpoints:
  - {ip: 198.18.0.2}
  - {ip: 198.18.0.4, ready: false, terminating: true}
- {namespace: demo, name: headless}
"#,
    )
    .unwrap();
    let endpoint = |address: &str, id: &str, ready: bool, terminating: bool| Endpoint {
        ip: ip(address),
        ports: BTreeMap::from([("http".into(), 8080), ("db".into(), 3306)]),
        id: id.parse().unwrap(),
        ready,
        serving: ready,
        terminating,
        node: None,
        zone: None,
        source: FILE_SOURCE.into(),
    };
    assert_eq!(
        services,
        [
            MeshService {
                key: ServiceKey::new("demo", "api"),
                cluster_ips: vec![ip("198.19.0.10"), ip("2001:2::10")],
                ports: vec![
                    ServicePort {
                        name: "http".into(),
                        port: 80,
                        protocol: Protocol::Http1,
                        app_protocol: Some("http".into()),
                    },
                    ServicePort {
                        name: "db".into(),
                        port: 3306,
                        protocol: Protocol::Opaque,
                        app_protocol: None,
                    },
                ],
                endpoints: vec![
                    endpoint("198.18.0.2", API_ID, true, false),
                    endpoint("198.18.0.4", WEB_ID, false, true),
                ],
            },
            MeshService {
                key: ServiceKey::new("demo", "headless"),
                cluster_ips: vec![],
                ports: vec![],
                endpoints: vec![],
            },
        ]
    );
}

#[test]
fn a_bad_services_section_is_refused_naming_the_entry_and_field() {
    let cases = [
        (
            "[{namespace: demo, name: api, endpoints: [{ip: 198.18.0.9}]}]",
            "services[0] demo/api: endpoints[0].ip 198.18.0.9 is not in members",
        ),
        (
            "[{namespace: demo, name: api, endpoints: [{ip: 198.18.0.2}, {ip: 198.18.0.2}]}]",
            "services[0] demo/api: endpoints[1].ip 198.18.0.2 is listed twice",
        ),
        (
            "[{namespace: demo, name: api, endpoints: [{ip: nope}]}]",
            "services[0] demo/api: endpoints[0].ip \"nope\" is not an IP address",
        ),
        (
            "[{namespace: demo, name: api, clusterIPs: [198.19.0.300]}]",
            "services[0] demo/api: clusterIPs: \"198.19.0.300\" is not an IP address",
        ),
        (
            "[{namespace: demo, name: api, ports: [{name: a, port: 70000}]}]",
            "services[0] demo/api: ports[0].port: 70000 is not a port number (1-65535)",
        ),
        (
            "[{namespace: demo, name: api, ports: [{name: a, port: 80, targetPort: 0}]}]",
            "services[0] demo/api: ports[0].targetPort: 0 is not a port number (1-65535)",
        ),
        (
            "[{namespace: demo, name: api, ports: [{name: a, port: 80}, {name: b, port: 80}]}]",
            "services[0] demo/api: ports[1] repeats the name \"b\" or the port 80",
        ),
        (
            "[{namespace: demo, name: api, opaquePorts: \"x\"}]",
            "services[0] demo/api: opaquePorts: \"x\" is not a port",
        ),
        (
            "[{namespace: demo, name: api}, {namespace: demo, name: db}, {namespace: demo, name: api}]",
            "services[2] demo/api is already services[0]",
        ),
        (
            "[{namespace: demo, name: \"a/b\"}]",
            "services[0]: namespace \"demo\" and name \"a/b\" must be non-empty",
        ),
    ];
    for (yaml, expected) in cases {
        let err = parse(yaml).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{yaml}\n  gave: {err}\n  want: {expected}"
        );
    }
    let unknown = serde_yaml::from_str::<Vec<FileService>>(
        "[{namespace: demo, name: api, endpoints: [{ip: 198.18.0.2, weight: 3}]}]",
    )
    .unwrap_err()
    .to_string();
    assert!(
        unknown.contains("unknown field `weight`, expected one of `ip`, `ready`, `terminating`"),
        "{unknown}"
    );
}

// --- the gRPC service on a real socket ---

impl TestAgent {
    async fn services_client(&self) -> ServiceDiscoveryClient<tonic::transport::Channel> {
        ServiceDiscoveryClient::new(self.channel().await)
    }
}

async fn serve(unix_map: &str) -> TestAgent {
    TestAgent::serve(
        SocketApi::Services,
        TestCa::prepare().await,
        Duration::from_secs(3600),
        unix_map,
        BundleSource::Test,
    )
    .await
}

fn mesh_service(name: &str, cluster_ip: &str, endpoints: &[(&str, bool)]) -> MeshService {
    MeshService {
        key: ServiceKey::new("demo", name),
        cluster_ips: vec![ip(cluster_ip)],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http1,
            app_protocol: Some("http".into()),
        }],
        endpoints: endpoints
            .iter()
            .map(|(address, ready)| Endpoint {
                ip: ip(address),
                ports: BTreeMap::from([("http".into(), 8080)]),
                id: API_ID.parse().unwrap(),
                ready: *ready,
                serving: *ready,
                terminating: !*ready,
                node: Some("node-a".into()),
                zone: None,
                source: format!("demo/{name}-{address}"),
            })
            .collect(),
    }
}

fn state(version: u64, members: &[&str], services: &[&MeshService]) -> Arc<MeshState> {
    let members = members
        .iter()
        .map(|address| {
            (
                ip(address),
                Member::single(API_ID.parse().unwrap(), FILE_SOURCE),
            )
        })
        .collect();
    Arc::new(MeshState::new(
        version,
        members,
        services.iter().map(|s| (*s).clone()),
    ))
}

async fn next(stream: &mut tonic::Streaming<ServiceUpdate>) -> ServiceUpdate {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no message in time")
        .unwrap()
        .expect("the stream ended")
}

#[tokio::test]
async fn an_attested_caller_gets_every_service_then_only_what_changed() {
    let mut agent = serve(&uid_is_web(this_uid())).await;
    let mut stream = agent
        .services_client()
        .await
        .watch_services(WatchServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    // Not synced yet: nothing is sent until it is.
    let mut first = Box::pin(stream.message());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut first)
            .await
            .is_err()
    );
    let api = mesh_service("api", "198.19.0.10", &[("198.18.0.2", true)]);
    let db = mesh_service("db", "198.19.0.11", &[("198.18.0.3", true)]);
    agent
        .mesh_tx
        .send_replace(state(1, &["198.18.0.2"], &[&api, &db]));
    let reset = tokio::time::timeout(WAIT, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        reset,
        ServiceUpdate {
            version: 1,
            reset: true,
            upserts: vec![api.to_message(), db.to_message()],
            removals: vec![],
        }
    );
    let held = ServiceTable::default().apply(&reset, &td()).unwrap();
    assert_eq!(held.get(&api.key).map(|s| &**s), Some(&api));
    assert_eq!(agent.streams_open(), 1);

    // The membership alone changes: nothing for this stream. Then one endpoint of api stops
    // being ready and one is added: api alone is sent, whole.
    agent
        .mesh_tx
        .send_replace(state(2, &["198.18.0.2", "198.18.0.3"], &[&api, &db]));
    let api_changed = mesh_service(
        "api",
        "198.19.0.10",
        &[("198.18.0.2", false), ("198.18.0.5", true)],
    );
    agent
        .mesh_tx
        .send_replace(state(3, &["198.18.0.2"], &[&api_changed, &db]));
    let update = next(&mut stream).await;
    assert_eq!(
        update,
        ServiceUpdate {
            version: 3,
            reset: false,
            upserts: vec![api_changed.to_message()],
            removals: vec![],
        }
    );
    let held = held.apply(&update, &td()).unwrap();
    assert_eq!(held.get(&api.key).map(|s| &**s), Some(&api_changed));

    // db goes.
    agent
        .mesh_tx
        .send_replace(state(4, &["198.18.0.2"], &[&api_changed]));
    let update = next(&mut stream).await;
    assert_eq!(
        (update.reset, update.upserts.as_slice(), update.removals),
        (
            false,
            &[] as &[wire::MeshService],
            vec!["demo/db".to_owned()]
        )
    );
    assert_eq!(agent.pushes(), 3);

    // The agent stops: the stream ends with a status clients retry on.
    agent.mesh_tx = watch::channel(Arc::new(MeshState::default())).0;
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unavailable);
    assert_eq!(end.message(), "the agent is shutting down");
    assert_eq!(agent.pushes(), 3);
}

/// A reader that does not keep up: the changes it missed arrive as one message, from what it
/// holds to the newest table.
#[tokio::test]
async fn a_slow_reader_gets_the_newest_table_not_a_backlog() {
    let metrics =
        crate::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default());
    let api = mesh_service("api", "198.19.0.10", &[("198.18.0.2", true)]);
    let db = mesh_service("db", "198.19.0.11", &[("198.18.0.3", true)]);
    let web = mesh_service("web", "198.19.0.12", &[("198.18.0.6", true)]);
    let (tx, rx) = watch::channel(state(1, &[], &[&api, &db]));
    let mut feed = feed(rx, &metrics);
    assert!(feed.next_message().await.unwrap().reset);
    tx.send_replace(state(2, &[], &[&api]));
    tx.send_replace(state(3, &[], &[&api, &db]));
    tx.send_replace(state(4, &[], &[&api, &web]));
    let update = feed.next_message().await.unwrap();
    assert_eq!(
        (
            update.version,
            update.reset,
            update.upserts,
            update.removals
        ),
        (4, false, vec![web.to_message()], vec!["demo/db".to_owned()])
    );
    // Back to what it holds: nothing to send.
    tx.send_replace(state(5, &[], &[&api]));
    tx.send_replace(state(6, &[], &[&api, &web]));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), feed.next_message())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_unattested_caller_is_refused() {
    let uid = this_uid();
    let agent = serve(&format!(
        "workloads:\n- {{uid: {uid}, path: /usr/bin/not-this-test, id: {WEB_ID}}}\n"
    ))
    .await;
    agent.mesh_tx.send_replace(state(1, &[], &[]));
    let refused = agent
        .services_client()
        .await
        .watch_services(WatchServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(refused.message(), "caller could not be attested");
    assert_eq!(agent.metrics.attestation_failures.get(), 1);
    assert_eq!(agent.streams_open(), 0);
}
