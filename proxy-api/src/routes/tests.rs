use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use sigil_identity::SpiffeId;
use sigil_proto::sigil::route::v1 as wire;
use sigil_route::RouteSet;
use sigil_route::compiled::{
    Backend, BackendPolicy, BackendTarget, Backends, FailurePercentage, Filter, GrpcMatch,
    GrpcRouteTable, HeaderMatch, HeaderModifier, HttpMatch, HttpRouteTable, IdentityOverride,
    InboundPolicy, Limit, LocalRateLimit, Mirror, OutlierDetection, PathMatch, PathModifier,
    PortKey, PortRoutes, QueryMatch, Redirect, RetryBudget, RetryPolicy, Rewrite, RouteKind,
    RouteOrigin, Rule, RuleRef, ServiceRef, Timeouts, ValueMatch, WeightedBackend,
};

use super::*;

fn service(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn port_key(namespace: &str, name: &str, port: u16) -> PortKey {
    PortKey {
        service: service(namespace, name),
        port,
    }
}

fn backend(name: &str, port: u16) -> Backend {
    Backend {
        service: service("shop", name),
        port,
        cluster_ips: Vec::new(),
    }
}

fn header(name: &str, value: &str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_bytes(name.as_bytes()).unwrap(),
        HeaderValue::from_str(value).unwrap(),
    )
}

fn rule_ref(kind: RouteKind, index: u32, name: Option<&str>) -> RuleRef {
    RuleRef {
        kind,
        namespace: "shop".into(),
        name: "reviews".into(),
        rule_index: index,
        rule_name: name.map(str::to_owned),
    }
}

fn header_match(name: &str, value: ValueMatch) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value,
    }
}

/// An HTTPRoute table with every field set somewhere.
fn http_table() -> HttpRouteTable {
    let modifier = HeaderModifier {
        set: vec![header("x-route", "canary")],
        add: vec![header("x-add", "1"), header("x-add", "2")],
        remove: vec![HeaderName::from_static("x-drop")],
    };
    let canary = Rule {
        source: rule_ref(RouteKind::HttpRoute, 0, Some("canary")),
        filters: vec![
            Filter::RequestHeaders(modifier.clone()),
            Filter::ResponseHeaders(HeaderModifier {
                remove: vec![HeaderName::from_static("server")],
                ..HeaderModifier::default()
            }),
            Filter::Rewrite(Rewrite {
                hostname: Some("reviews.internal".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            }),
            Filter::Mirror(Mirror {
                backend: Backend {
                    cluster_ips: vec!["198.18.40.7".parse().unwrap(), "2001:2::7".parse().unwrap()],
                    ..backend("shadow", 8080)
                },
                numerator: 1,
                denominator: 10,
            }),
        ],
        backends: Backends {
            entries: vec![
                WeightedBackend {
                    weight: 90,
                    target: BackendTarget::Service(backend("reviews-v2", 9080)),
                    filters: vec![Filter::RequestHeaders(modifier)],
                },
                WeightedBackend {
                    weight: 10,
                    target: BackendTarget::Invalid("BackendNotFound: shop/reviews-v9".into()),
                    filters: Vec::new(),
                },
            ],
        },
        timeouts: Timeouts {
            request: Some(Duration::from_secs(2)),
            backend_request: Some(Duration::from_millis(500)),
            idle: Some(Duration::from_secs(60)),
        },
        retry: Some(RetryPolicy {
            attempts: 2,
            http_codes: BTreeSet::from([502, 503]),
            grpc_codes: BTreeSet::from([14]),
            backoff: Duration::from_millis(25),
            non_idempotent: true,
        }),
    };
    let redirect = Rule {
        source: rule_ref(RouteKind::HttpRoute, 1, None),
        filters: vec![Filter::Redirect(Redirect {
            scheme: Some("https".into()),
            hostname: Some("example.org".into()),
            path: Some(PathModifier::ReplaceFullPath("/moved".into())),
            port: Some(8443),
            status: StatusCode::PERMANENT_REDIRECT,
        })],
        backends: Backends::default(),
        timeouts: Timeouts::default(),
        retry: None,
    };
    HttpRouteTable {
        rules: vec![canary, redirect],
        order: vec![
            (
                0,
                HttpMatch {
                    path: Some(PathMatch::Prefix("/api".into())),
                    headers: vec![
                        header_match("x-canary", ValueMatch::Exact("1".into())),
                        header_match("x-env", ValueMatch::regex("dev|test").unwrap()),
                    ],
                    query: vec![
                        QueryMatch {
                            name: "debug".into(),
                            value: ValueMatch::Exact("on".into()),
                        },
                        QueryMatch {
                            name: "id".into(),
                            value: ValueMatch::regex("[0-9]+").unwrap(),
                        },
                    ],
                    method: Some(Method::POST),
                },
            ),
            (
                1,
                HttpMatch {
                    path: Some(PathMatch::Exact("/old".into())),
                    ..HttpMatch::default()
                },
            ),
            (
                1,
                HttpMatch {
                    path: Some(PathMatch::regex("/v[0-9]+/old").unwrap()),
                    ..HttpMatch::default()
                },
            ),
            (0, HttpMatch::default()),
        ],
    }
}

fn grpc_table() -> GrpcRouteTable {
    GrpcRouteTable {
        rules: vec![Rule {
            source: rule_ref(RouteKind::GrpcRoute, 0, Some("hello")),
            filters: vec![Filter::RequestHeaders(HeaderModifier {
                set: vec![header("x-grpc", "1")],
                ..HeaderModifier::default()
            })],
            backends: Backends {
                entries: vec![WeightedBackend {
                    weight: 1,
                    target: BackendTarget::Service(backend("greeter", 50051)),
                    filters: Vec::new(),
                }],
            },
            timeouts: Timeouts {
                request: Some(Duration::from_secs(1)),
                ..Timeouts::default()
            },
            retry: Some(RetryPolicy {
                attempts: 3,
                http_codes: BTreeSet::new(),
                grpc_codes: BTreeSet::from([4, 14]),
                backoff: Duration::from_millis(50),
                non_idempotent: false,
            }),
        }],
        order: vec![
            (
                0,
                GrpcMatch {
                    service: Some(ValueMatch::Exact("helloworld.Greeter".into())),
                    method: Some(ValueMatch::regex("Say.*").unwrap()),
                    headers: vec![header_match("x-tenant", ValueMatch::Exact("a".into()))],
                },
            ),
            (0, GrpcMatch::default()),
        ],
    }
}

fn limit(requests: u32) -> Limit {
    Limit {
        requests,
        period: Duration::from_secs(1),
        burst: requests * 2,
    }
}

/// A RouteSet with every field of every type set somewhere.
fn rich_set() -> RouteSet {
    let mut set = RouteSet::default();
    let reviews = port_key("shop", "reviews", 9080);
    set.ports.insert(
        reviews.clone(),
        Arc::new(PortRoutes {
            key: reviews,
            origin: RouteOrigin::Consumer,
            http: Some(Arc::new(http_table())),
            grpc: Some(Arc::new(grpc_table())),
        }),
    );
    let web = port_key("web", "front", 80);
    set.ports.insert(
        web.clone(),
        Arc::new(PortRoutes {
            key: web,
            origin: RouteOrigin::Producer,
            http: Some(Arc::new(http_table())),
            grpc: None,
        }),
    );
    set.backends.insert(
        service("shop", "reviews-v2"),
        Arc::new(BackendPolicy {
            service: service("shop", "reviews-v2"),
            source: "shop/reviews".into(),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: 7,
                consecutive_gateway_errors: 3,
                interval: Duration::from_secs(5),
                base_ejection_time: Duration::from_secs(15),
                max_ejection_time: Duration::from_secs(120),
                max_ejection_percent: 50,
                min_health_percent: 20,
                failure_percentage: Some(FailurePercentage {
                    threshold: 85,
                    request_volume: 50,
                    minimum_hosts: 3,
                }),
            }),
            retry_budget: RetryBudget {
                percent: 25,
                interval: Duration::from_secs(20),
                min_retries: 5,
                min_interval: Duration::from_millis(500),
            },
        }),
    );
    set.backends.insert(
        service("shop", "greeter"),
        Arc::new(BackendPolicy {
            service: service("shop", "greeter"),
            source: "default".into(),
            outlier_detection: None,
            retry_budget: RetryBudget::default(),
        }),
    );
    let inbound = port_key("shop", "reviews", 9080);
    set.inbound.insert(
        inbound.clone(),
        Arc::new(InboundPolicy {
            key: inbound,
            limits: vec![
                LocalRateLimit {
                    source: "shop/reviews-limit".into(),
                    http_matches: vec![HttpMatch {
                        path: Some(PathMatch::Prefix("/api".into())),
                        method: Some(Method::GET),
                        ..HttpMatch::default()
                    }],
                    grpc_matches: vec![GrpcMatch {
                        service: Some(ValueMatch::Exact("helloworld.Greeter".into())),
                        ..GrpcMatch::default()
                    }],
                    total: Some(limit(100)),
                    per_identity: Some(limit(10)),
                    overrides: vec![IdentityOverride {
                        clients: BTreeSet::from([
                            SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap(),
                            SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/batch").unwrap(),
                        ]),
                        limit: limit(50),
                    }],
                },
                LocalRateLimit {
                    source: "shop/all".into(),
                    http_matches: Vec::new(),
                    grpc_matches: Vec::new(),
                    total: None,
                    per_identity: Some(limit(1)),
                    overrides: Vec::new(),
                },
            ],
        }),
    );
    set
}

fn reset(set: &RouteSet, version: u64) -> wire::RouteUpdate {
    update(None, set, version).expect("a reset is always sent")
}

#[test]
fn rich_route_set_round_trips() {
    let set = rich_set();
    let message = reset(&set, 7);
    assert!(message.reset);
    assert_eq!(message.version, 7);
    assert_eq!(message.port_upserts.len(), 2);
    assert_eq!(message.backend_upserts.len(), 2);
    assert_eq!(message.inbound_upserts.len(), 1);
    let table = RouteTable::default().apply(&message).unwrap();
    assert_eq!(table.version, 7);
    // Every field survives: the compiled types compare through their Debug form (regexes print
    // their anchored pattern), and the wire form of what came back is the wire form sent.
    assert_eq!(format!("{:?}", table.routes), format!("{set:?}"));
    assert_eq!(reset(&table.routes, 7), message);
}

#[test]
fn round_trip_survives_protobuf_encoding() {
    use prost::Message;
    let message = reset(&rich_set(), 1);
    let decoded = wire::RouteUpdate::decode(message.encode_to_vec().as_slice()).unwrap();
    let table = RouteTable::default().apply(&decoded).unwrap();
    assert_eq!(format!("{:?}", table.routes), format!("{:?}", rich_set()));
}

#[test]
fn regexes_travel_as_the_users_pattern_and_come_back_anchored() {
    let message = reset(&rich_set(), 1);
    let http = message.port_upserts[0].http.as_ref().unwrap();
    let path = http.order[2]
        .r#match
        .as_ref()
        .unwrap()
        .path
        .as_ref()
        .unwrap();
    assert_eq!(
        path.kind,
        Some(wire::path_match::Kind::Regex("/v[0-9]+/old".into()))
    );
    let table = RouteTable::default().apply(&message).unwrap();
    let routes = &table.routes.ports[&port_key("shop", "reviews", 9080)];
    let Some(PathMatch::Regex(regex)) = &routes.http.as_ref().unwrap().order[2].1.path else {
        panic!("a regex path match")
    };
    assert!(regex.is_match("/v2/old"));
    assert!(!regex.is_match("/v2/old/x"), "matches the whole path only");
}

#[test]
fn zero_timeouts_are_no_timeouts() {
    let mut message = reset(&rich_set(), 1);
    let rule = &mut message.port_upserts[0].http.as_mut().unwrap().rules[0];
    rule.timeouts = Some(wire::Timeouts {
        request_ms: Some(0),
        backend_request_ms: None,
        idle_ms: Some(0),
    });
    let table = RouteTable::default().apply(&message).unwrap();
    let routes = &table.routes.ports[&port_key("shop", "reviews", 9080)];
    assert_eq!(
        routes.http.as_ref().unwrap().rules[0].timeouts,
        Timeouts::default()
    );
}

/// `reviews` port message of the rich set, to break one field of.
fn with_broken(break_it: impl FnOnce(&mut wire::RouteUpdate)) -> Result<RouteTable, RouteError> {
    let mut message = reset(&rich_set(), 2);
    message.reset = false;
    break_it(&mut message);
    let before = RouteTable::default().apply(&reset(&rich_set(), 1)).unwrap();
    before.apply(&message)
}

fn http_of(message: &mut wire::RouteUpdate) -> &mut wire::HttpRouteTable {
    message.port_upserts[0].http.as_mut().unwrap()
}

fn refused(break_it: impl FnOnce(&mut wire::RouteUpdate), key: &str, field_and_reason: &str) {
    match with_broken(break_it) {
        Err(RouteError::Entry { key: k, message }) => {
            assert_eq!(k, key);
            assert!(
                message.contains(field_and_reason),
                "{message:?} should contain {field_and_reason:?}"
            );
        }
        other => panic!("expected refusal naming {key}, got {other:?}"),
    }
}

#[test]
fn one_bad_entry_refuses_the_update_whole() {
    const REVIEWS: &str = "shop/reviews:9080";
    refused(
        |m| {
            http_of(m).order[0].r#match.as_mut().unwrap().path = Some(wire::PathMatch {
                kind: Some(wire::path_match::Kind::Regex("(".into())),
            })
        },
        REVIEWS,
        "http.order[0].match.path.regex: \"(\"",
    );
    refused(
        |m| {
            http_of(m).order[0].r#match.as_mut().unwrap().headers[1].value =
                Some(wire::ValueMatch {
                    kind: Some(wire::value_match::Kind::Regex("a{1000}{1000}".into())),
                })
        },
        REVIEWS,
        "http.order[0].match.headers[1].value.regex",
    );
    refused(
        |m| http_of(m).order[0].r#match.as_mut().unwrap().headers[0].name = "bad header".into(),
        REVIEWS,
        "http.order[0].match.headers[0].name: \"bad header\" is not a header name",
    );
    refused(
        |m| http_of(m).order[0].r#match.as_mut().unwrap().method = "GE T".into(),
        REVIEWS,
        "http.order[0].match.method",
    );
    refused(
        |m| http_of(m).order[1].rule = 2,
        REVIEWS,
        "http.order[1].rule: 2 is out of range (2 rules)",
    );
    refused(
        |m| http_of(m).order[1].r#match = None,
        REVIEWS,
        "http.order[1].match: missing",
    );
    refused(
        |m| {
            http_of(m).order[1].r#match.as_mut().unwrap().path =
                Some(wire::PathMatch { kind: None })
        },
        REVIEWS,
        "http.order[1].match.path: missing",
    );
    refused(
        |m| http_of(m).order[0].r#match.as_mut().unwrap().query_params[0].value = None,
        REVIEWS,
        "http.order[0].match.query_params[0].value: missing",
    );
    refused(
        |m| {
            let wire::http_filter::Filter::RequestRedirect(redirect) =
                http_of(m).rules[1].filters[0].filter.as_mut().unwrap()
            else {
                unreachable!()
            };
            redirect.status_code = 200;
        },
        REVIEWS,
        "http.rules[1].filters[0].request_redirect.status_code: 200 is not 301, 302, 303, 307 or 308",
    );
    refused(
        |m| {
            let wire::http_filter::Filter::RequestRedirect(redirect) =
                http_of(m).rules[1].filters[0].filter.as_mut().unwrap()
            else {
                unreachable!()
            };
            redirect.port = Some(70000);
        },
        REVIEWS,
        "http.rules[1].filters[0].request_redirect.port: 70000 is not a port",
    );
    refused(
        |m| http_of(m).rules[0].filters[1].filter = None,
        REVIEWS,
        "http.rules[0].filters[1]: missing",
    );
    refused(
        |m| {
            let wire::http_filter::Filter::RequestMirror(mirror) =
                http_of(m).rules[0].filters[3].filter.as_mut().unwrap()
            else {
                unreachable!()
            };
            mirror.denominator = 0;
        },
        REVIEWS,
        "http.rules[0].filters[3].request_mirror.denominator: is 0",
    );
    refused(
        |m| {
            let wire::http_filter::Filter::RequestHeaderModifier(modifier) =
                http_of(m).rules[0].filters[0].filter.as_mut().unwrap()
            else {
                unreachable!()
            };
            modifier.add[1].value = "a\nb".into();
        },
        REVIEWS,
        "http.rules[0].filters[0].request_header_modifier.add[1].value",
    );
    refused(
        |m| http_of(m).rules[0].backends[0].weight = 0,
        REVIEWS,
        "http.rules[0].backends[0].weight: is 0",
    );
    refused(
        |m| http_of(m).rules[0].backends[1].target = None,
        REVIEWS,
        "http.rules[0].backends[1].target: missing",
    );
    refused(
        |m| {
            let Some(wire::weighted_backend::Target::Backend(backend)) =
                http_of(m).rules[0].backends[0].target.as_mut()
            else {
                unreachable!()
            };
            backend.port = 0;
        },
        REVIEWS,
        "http.rules[0].backends[0].backend.port: 0 is not a port",
    );
    refused(
        |m| {
            http_of(m).rules[0]
                .retry
                .as_mut()
                .unwrap()
                .http_codes
                .push(200)
        },
        REVIEWS,
        "http.rules[0].retry.http_codes[2]: 200 is not a status 400-599",
    );
    refused(
        |m| http_of(m).rules[0].source.as_mut().unwrap().kind = 0,
        REVIEWS,
        "http.rules[0].source.kind: 0 is not HTTP_ROUTE or GRPC_ROUTE",
    );
    refused(
        |m| m.port_upserts[0].origin = wire::RouteOrigin::Unspecified as i32,
        REVIEWS,
        "origin: 0 is not PRODUCER or CONSUMER",
    );
    refused(
        |m| m.port_upserts[0].origin = 9,
        REVIEWS,
        "origin: 9 is not PRODUCER or CONSUMER",
    );
    refused(
        |m| {
            m.port_upserts[0].grpc.as_mut().unwrap().order[0]
                .r#match
                .as_mut()
                .unwrap()
                .service = Some(wire::ValueMatch { kind: None })
        },
        REVIEWS,
        "grpc.order[0].match.service: missing",
    );
    refused(
        |m| m.port_upserts[0].port = 0,
        "shop/reviews:0",
        "port: 0 is not a port (1-65535)",
    );
    refused(
        |m| m.port_upserts[0].port = 65536,
        "shop/reviews:65536",
        "port: 65536 is not a port (1-65535)",
    );
    refused(
        |m| {
            m.backend_upserts[1]
                .outlier_detection
                .as_mut()
                .unwrap()
                .max_ejection_percent = 101
        },
        "shop/reviews-v2",
        "outlier_detection.max_ejection_percent: 101 is over 100",
    );
    refused(
        |m| m.backend_upserts[0].retry_budget = None,
        "shop/greeter",
        "retry_budget: missing",
    );
    refused(
        |m| m.inbound_upserts[0].limits[0].overrides[0].spiffe_ids[1] = "web".into(),
        "shop/reviews:9080",
        "limits[0].overrides[0].spiffe_ids[1]: \"web\"",
    );
    refused(
        |m| {
            m.inbound_upserts[0].limits[1]
                .per_identity
                .as_mut()
                .unwrap()
                .period_ms = 0
        },
        "shop/reviews:9080",
        "limits[1].per_identity.period_ms: is 0",
    );
    refused(
        |m| m.port_removals.push("shop/reviews".into()),
        "shop/reviews",
        "removal key is not <namespace>/<service>:<port>",
    );
    refused(
        |m| m.backend_removals.push("reviews".into()),
        "reviews",
        "removal key is not <namespace>/<service>",
    );
}

#[test]
fn an_entry_both_upserted_and_removed_is_refused() {
    let result = with_broken(|m| m.port_removals.push("shop/reviews:9080".into()));
    assert!(
        matches!(&result, Err(RouteError::UpsertedAndRemoved(key)) if key == "shop/reviews:9080"),
        "{result:?}"
    );
}

#[test]
fn the_unbroken_update_is_accepted() {
    // The control for the refusals above: the same update, not broken, applies.
    let table = with_broken(|_| ()).unwrap();
    assert_eq!(table.version, 2);
    assert_eq!(format!("{:?}", table.routes), format!("{:?}", rich_set()));
}

#[test]
fn reset_replaces_everything() {
    let before = RouteTable::default().apply(&reset(&rich_set(), 1)).unwrap();
    let mut only_web = RouteSet::default();
    let web = port_key("web", "front", 80);
    only_web
        .ports
        .insert(web.clone(), rich_set().ports[&web].clone());
    let after = before.apply(&reset(&only_web, 2)).unwrap();
    assert_eq!(after.routes.ports.keys().collect::<Vec<_>>(), vec![&web]);
    assert!(after.routes.backends.is_empty());
    assert!(after.routes.inbound.is_empty());
}

#[test]
fn unchanged_set_sends_nothing() {
    let set = rich_set();
    let same = set.clone();
    assert!(update(Some(&set), &same, 2).is_none());
}

#[test]
fn only_entries_with_another_arc_are_sent() {
    let previous = rich_set();
    let mut current = previous.clone();
    let reviews = port_key("shop", "reviews", 9080);
    // Equal content, a new Arc: the agent rebuilt it, so it is sent.
    let rebuilt = PortRoutes::clone(&current.ports[&reviews]);
    current.ports.insert(reviews.clone(), Arc::new(rebuilt));
    let greeter = service("shop", "greeter");
    let mut policy = BackendPolicy::clone(&current.backends[&greeter]);
    policy.retry_budget.percent = 50;
    current.backends.insert(greeter.clone(), Arc::new(policy));

    let message = update(Some(&previous), &current, 3).unwrap();
    assert!(!message.reset);
    assert_eq!(message.version, 3);
    let ports: Vec<_> = message
        .port_upserts
        .iter()
        .map(|p| format!("{}/{}:{}", p.namespace, p.name, p.port))
        .collect();
    assert_eq!(ports, ["shop/reviews:9080"]);
    let backends: Vec<_> = message
        .backend_upserts
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    assert_eq!(backends, ["greeter"]);
    assert!(message.inbound_upserts.is_empty());
    assert!(message.port_removals.is_empty());

    let table = RouteTable::default().apply(&reset(&previous, 1)).unwrap();
    let applied = table.apply(&message).unwrap();
    assert_eq!(applied.routes.backends[&greeter].retry_budget.percent, 50);
    assert_eq!(format!("{:?}", applied.routes), format!("{current:?}"));
}

#[test]
fn removed_entries_are_sent_as_keys() {
    let previous = rich_set();
    let mut current = previous.clone();
    current.ports.remove(&port_key("web", "front", 80));
    current.backends.remove(&service("shop", "reviews-v2"));
    current.inbound.clear();
    let message = update(Some(&previous), &current, 4).unwrap();
    assert_eq!(message.port_removals, ["web/front:80"]);
    assert_eq!(message.backend_removals, ["shop/reviews-v2"]);
    assert_eq!(message.inbound_removals, ["shop/reviews:9080"]);
    assert!(message.port_upserts.is_empty() && message.backend_upserts.is_empty());

    let table = RouteTable::default().apply(&reset(&previous, 1)).unwrap();
    let applied = table.apply(&message).unwrap();
    assert_eq!(format!("{:?}", applied.routes), format!("{current:?}"));
}

#[test]
fn a_refused_update_leaves_the_table_as_it_was() {
    let table = RouteTable::default().apply(&reset(&rich_set(), 1)).unwrap();
    let mut message = reset(&RouteSet::default(), 2);
    message.port_removals.push("web/front:80".into());
    message.backend_removals.push("not a key".into());
    message.reset = false;
    assert!(table.apply(&message).is_err());
    // apply returns a new table; the proxy keeps using `table`, which still has every entry.
    assert_eq!(table.routes.ports.len(), 2);
    assert_eq!(table.version, 1);
}

#[test]
fn the_catalog_holds_meshed_and_unmeshed_services_the_meshed_winning() {
    use crate::services::{Endpoint, Protocol};
    let port = ServicePort {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Http1,
        app_protocol: Some("http".into()),
    };
    let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
    let web = MeshService {
        key: ServiceKey::new("demo", "web"),
        cluster_ips: vec!["198.19.0.10".parse().unwrap()],
        ports: vec![port.clone()],
        endpoints: vec![Endpoint {
            ip: "198.18.0.2".parse().unwrap(),
            ports: [("http".to_string(), 8080)].into(),
            id: id.clone(),
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            zone: None,
            source: "mesh-file".into(),
        }],
    };
    let unmeshed = |name: &str, ip: &str| UnmeshedService {
        key: ServiceKey::new("demo", name),
        cluster_ips: vec![ip.parse().unwrap()],
        ports: vec![port.clone()],
    };
    // A stale unmeshed entry of web (the agent never sends one) loses to the meshed one.
    let catalog = super::catalog(
        [&web],
        &[
            unmeshed("legacy", "198.19.0.20"),
            unmeshed("web", "198.19.0.99"),
        ],
    );
    let web_info = &catalog.services[&service("demo", "web")];
    assert!(web_info.meshed);
    assert_eq!(web_info.endpoint_ids, BTreeSet::from([id]));
    assert_eq!(web_info.cluster_ips, web.cluster_ips);
    let legacy = &catalog.services[&service("demo", "legacy")];
    assert_eq!(
        *legacy,
        ServiceInfo {
            ports: vec![ServicePortInfo {
                name: "http".into(),
                port: 80,
                app_protocol: Some("http".into()),
            }],
            cluster_ips: vec!["198.19.0.20".parse().unwrap()],
            meshed: false,
            endpoint_ids: BTreeSet::new(),
        }
    );
    assert_eq!(catalog.services.len(), 2);
}
