use super::*;

const TD: &str = "cluster.local";

fn td() -> TrustDomain {
    TD.parse().unwrap()
}

fn endpoint(ip: &str, target: u16, sa: &str) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        ports: BTreeMap::from([("http".to_owned(), target)]),
        id: SpiffeId::parse(&format!("spiffe://{TD}/ns/demo/sa/{sa}")).unwrap(),
        ready: true,
        serving: true,
        terminating: false,
        node: Some("node-1".into()),
        zone: None,
        source: format!("demo/{sa}-{ip}"),
    }
}

fn service(name: &str, cluster_ip: &str, endpoints: Vec<Endpoint>) -> MeshService {
    MeshService {
        key: ServiceKey::new("demo", name),
        cluster_ips: vec![cluster_ip.parse().unwrap()],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http1,
            app_protocol: Some("http".into()),
        }],
        endpoints,
    }
}

#[test]
fn protocols_follow_app_protocol_then_the_port_name() {
    use Protocol::*;
    for (app_protocol, name, want) in [
        (Some("kubernetes.io/h2c"), "", Http2),
        (Some("grpc"), "tcp-x", Grpc),
        (Some("kubernetes.io/ws"), "", WebSocket),
        (Some("tcp"), "http", Opaque),
        (Some("HTTP"), "", Http1),
        // An appProtocol sigil does not know: the name decides.
        (Some("example.com/custom"), "http2-api", Http2),
        (None, "http-web", Http1),
        (None, "grpc", Grpc),
        (None, "tcp-db", Opaque),
        (None, "mysql", Opaque),
        (None, "web", Detect),
        (None, "", Detect),
        // A prefix is the part before the first '-', not any start.
        (None, "httpbin", Detect),
    ] {
        assert_eq!(
            Protocol::declared(app_protocol, name),
            want,
            "{app_protocol:?} {name}"
        );
    }
    let opaque: PortSet = "3306".parse().unwrap();
    assert_eq!(Protocol::Http1.with_opaque(3306, &opaque), Opaque);
    assert_eq!(Protocol::Http1.with_opaque(80, &opaque), Http1);
}

#[test]
fn a_table_survives_its_messages_and_updates_carry_only_changes() {
    let api = service(
        "api",
        "198.18.100.1",
        vec![endpoint("198.18.0.2", 8080, "api")],
    );
    let db = service(
        "db",
        "198.18.100.2",
        vec![endpoint("198.18.0.3", 5432, "db")],
    );
    let v1 = ServiceTable::new(1, [api.clone(), db.clone()]);
    let received = ServiceTable::default()
        .apply(&v1.full_update(), &td())
        .unwrap();
    assert_eq!(received, v1);
    assert_eq!(
        received
            .by_cluster_ip("198.18.100.1".parse().unwrap())
            .map(|s| &s.key),
        Some(&api.key)
    );
    assert_eq!(
        received.endpoint_protocol("198.18.0.2".parse().unwrap(), 8080),
        Some(Protocol::Http1)
    );

    // api gains an endpoint, db goes away.
    let mut api2 = api.clone();
    api2.endpoints.push(endpoint("198.18.0.4", 8080, "api"));
    let v2 = ServiceTable::new(2, [api2.clone()]);
    let update = v2.update_from(&v1).unwrap();
    assert!(!update.reset);
    assert_eq!(update.upserts.len(), 1);
    assert_eq!(update.removals, vec!["demo/db".to_owned()]);
    let received = received.apply(&update, &td()).unwrap();
    assert_eq!(received, v2);
    assert!(
        received
            .by_cluster_ip("198.18.100.2".parse().unwrap())
            .is_none()
    );
    // Nothing changed: nothing to send.
    assert!(ServiceTable::new(3, [api2]).update_from(&v2).is_none());
}

#[test]
fn a_bad_entry_refuses_the_whole_update() {
    let table = ServiceTable::new(1, [service("api", "198.18.100.1", vec![])]);
    let good = service(
        "web",
        "198.18.100.3",
        vec![endpoint("198.18.0.5", 80, "web")],
    );
    type Corrupt = Box<dyn Fn(&mut wire::MeshService)>;
    let cases: Vec<(Corrupt, &str)> = vec![
        (Box::new(|s| s.cluster_ips[0] = "nope".into()), "cluster IP"),
        (Box::new(|s| s.ports[0].port = 0), "not a port"),
        (
            Box::new(|s| s.endpoints[0].ip = "x".into()),
            "endpoint address",
        ),
        (
            Box::new(|s| s.endpoints[0].ports[0].port = 70000),
            "not a port",
        ),
        (
            Box::new(|s| s.endpoints[0].spiffe_id = "web".into()),
            "identity",
        ),
        (
            Box::new(|s| s.endpoints[0].spiffe_id = "spiffe://other.td/ns/a/sa/b".into()),
            "trust domain",
        ),
        (Box::new(|s| s.namespace.clear()), "namespace"),
    ];
    for (corrupt, why) in cases {
        let mut message = good.to_message();
        corrupt(&mut message);
        let update = wire::ServiceUpdate {
            version: 2,
            reset: false,
            upserts: vec![message],
            removals: vec![],
        };
        let e = table.apply(&update, &td()).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
    let update = wire::ServiceUpdate {
        version: 2,
        reset: false,
        upserts: vec![],
        removals: vec!["no-slash".into()],
    };
    assert!(table.apply(&update, &td()).is_err());
}

#[test]
fn terminating_and_unready_endpoints_take_no_new_requests() {
    let mut e = endpoint("198.18.0.2", 80, "api");
    assert!(e.takes_new_requests());
    e.terminating = true;
    assert!(!e.takes_new_requests());
    e.terminating = false;
    e.ready = false;
    assert!(!e.takes_new_requests());
}
