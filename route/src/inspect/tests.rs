use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::*;
use crate::compiled::{
    Backend, BackendPolicy, GrpcRouteTable, HeaderMatch, HttpRouteTable, PathMatch, Redirect,
    RetryBudget, Rewrite, RouteKind, Rule, ValueMatch, WeightedBackend,
};
use crate::validate::{ServiceInfo, ServicePortInfo};

fn service(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn reviews() -> PortKey {
    PortKey {
        service: service("shop", "reviews"),
        port: 9080,
    }
}

fn args(method: Method, path: &str, headers: &[(&str, &str)]) -> InspectRouteArgs {
    InspectRouteArgs {
        from: SpiffeId::parse("spiffe://cluster.local/ns/web/sa/front").unwrap(),
        to: reviews(),
        method,
        path: path.into(),
        path_normalization: PathNormalization::Base,
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect(),
        grpc: false,
        host: None,
        policy_file: Some(PathBuf::new()),
        mesh_file: Some(PathBuf::new()),
    }
}

fn scope() -> ClientScope {
    ClientScope {
        namespace: "web".into(),
        id: SpiffeId::parse("spiffe://cluster.local/ns/web/sa/front").unwrap(),
    }
}

fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    catalog.services.insert(
        service("shop", "reviews"),
        ServiceInfo {
            ports: vec![ServicePortInfo {
                name: "http".into(),
                port: 9080,
                app_protocol: None,
            }],
            cluster_ips: Vec::new(),
            meshed: true,
            endpoint_ids: BTreeSet::new(),
        },
    );
    catalog
}

fn source(index: u32, name: Option<&str>) -> RuleRef {
    RuleRef {
        kind: RouteKind::HttpRoute,
        namespace: "web".into(),
        name: "reviews-canary".into(),
        rule_index: index,
        rule_name: name.map(str::to_owned),
    }
}

fn to_service(name: &str, weight: u32) -> WeightedBackend {
    WeightedBackend {
        weight,
        target: BackendTarget::Service(Backend {
            service: service("shop", name),
            port: 9080,
            cluster_ips: Vec::new(),
        }),
        filters: Vec::new(),
    }
}

/// Consumer routes of `web` for shop/reviews:9080: a canary rule on a header, a redirect of
/// /old, and the rest to v1.
fn routes() -> RouteSet {
    let canary = Rule {
        source: source(0, Some("canary")),
        filters: vec![
            Filter::RequestHeaders(HeaderModifier {
                set: vec![(
                    HeaderName::from_static("x-route"),
                    HeaderValue::from_static("canary"),
                )],
                ..HeaderModifier::default()
            }),
            Filter::Rewrite(Rewrite {
                hostname: None,
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            }),
        ],
        backends: Backends {
            entries: vec![to_service("reviews-v2", 90), to_service("reviews-v3", 10)],
        },
        timeouts: Timeouts {
            request: Some(Duration::from_secs(2)),
            backend_request: Some(Duration::from_millis(500)),
            idle: None,
        },
        retry: Some(RetryPolicy {
            attempts: 2,
            http_codes: BTreeSet::from([503]),
            grpc_codes: BTreeSet::new(),
            backoff: Duration::from_millis(25),
            non_idempotent: false,
        }),
    };
    let moved = Rule {
        source: source(1, None),
        filters: vec![Filter::Redirect(Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            port: None,
            status: StatusCode::MOVED_PERMANENTLY,
        })],
        backends: Backends::default(),
        timeouts: Timeouts::default(),
        retry: None,
    };
    let rest = Rule {
        source: source(2, None),
        filters: Vec::new(),
        backends: Backends {
            entries: vec![to_service("reviews-v1", 1)],
        },
        timeouts: Timeouts::default(),
        retry: None,
    };
    let table = HttpRouteTable {
        rules: vec![canary, moved, rest],
        order: vec![
            (
                1,
                HttpMatch {
                    path: Some(PathMatch::Prefix("/old".into())),
                    ..HttpMatch::default()
                },
            ),
            (
                0,
                HttpMatch {
                    path: Some(PathMatch::Prefix("/api".into())),
                    headers: vec![HeaderMatch {
                        name: HeaderName::from_static("x-canary"),
                        value: ValueMatch::Exact("1".into()),
                    }],
                    ..HttpMatch::default()
                },
            ),
            (
                2,
                HttpMatch {
                    path: Some(PathMatch::Prefix("/api".into())),
                    ..HttpMatch::default()
                },
            ),
        ],
    };
    let mut set = RouteSet::default();
    set.ports.insert(
        reviews(),
        Arc::new(PortRoutes {
            key: reviews(),
            origin: RouteOrigin::Consumer,
            http: Some(Arc::new(table)),
            grpc: None,
        }),
    );
    set.backends.insert(
        service("shop", "reviews-v2"),
        Arc::new(BackendPolicy {
            service: service("shop", "reviews-v2"),
            source: "default".into(),
            outlier_detection: None,
            retry_budget: RetryBudget::default(),
        }),
    );
    set
}

fn inspect(set: &RouteSet, args: &InspectRouteArgs) -> (bool, String) {
    let mut out = Vec::new();
    let routed = answer(set, &catalog(), &scope(), args, &mut out).unwrap();
    (routed, String::from_utf8(out).unwrap())
}

#[test]
fn selected_rule_with_filters_backends_timeouts_retry_and_the_others() {
    let (routed, text) = inspect(
        &routes(),
        &args(Method::GET, "/api/items?page=2", &[("x-canary", "1")]),
    );
    assert!(routed);
    assert_eq!(
        text,
        "ROUTE HTTPRoute web/reviews-canary rule 0
service: shop/reviews port 9080
client: spiffe://cluster.local/ns/web/sa/front (namespace web)
request: GET /api/items?page=2 (HTTP)
routes: consumer routes of namespace web (they replace the producer routes of shop for this client)
selected: HTTPRoute web/reviews-canary rule 0 \"canary\" match (PathPrefix /api, header x-canary=1)
  filters:   RequestHeaderModifier set x-route=canary; URLRewrite ReplacePrefixMatch /v2
             (upstream path /v2/items)
  backends:  shop/reviews-v2:9080 weight 90 (90%), shop/reviews-v3:9080 weight 10 (10%)
  timeouts:  request 2s, backendRequest 500ms
  retry:     attempts 2 on 503, connection errors; backoff 25ms; non-idempotent methods only when the request never reached the endpoint
  policy:    shop/reviews-v2 (default): retry budget 20% over 10s + 3 per 1s; no outlier detection
  policy:    shop/reviews-v3: default retry budget, no outlier detection
not selected (in precedence order):
  1. HTTPRoute web/reviews-canary rule 1 match (PathPrefix /old) — path /api/items does not match PathPrefix /old
  3. HTTPRoute web/reviews-canary rule 2 match (PathPrefix /api) — matches too, but a match before it in precedence order is taken
"
    );
}

#[test]
fn without_the_header_the_next_entry_is_taken_and_the_mismatch_said() {
    let (routed, text) = inspect(&routes(), &args(Method::GET, "/api/items", &[]));
    assert!(routed);
    assert!(
        text.starts_with("ROUTE HTTPRoute web/reviews-canary rule 2\n"),
        "{text}"
    );
    assert!(
        text.contains("  2. HTTPRoute web/reviews-canary rule 0 \"canary\" match (PathPrefix /api, header x-canary=1) — header x-canary is missing\n"),
        "{text}"
    );
    assert!(
        text.contains("  backends:  shop/reviews-v1:9080 weight 1 (100%)\n"),
        "{text}"
    );
    assert!(
        text.contains("  timeouts:  none\n  retry:     none\n"),
        "{text}"
    );
}

#[test]
fn redirect_rule_prints_the_location() {
    let (routed, text) = inspect(&routes(), &args(Method::GET, "/old/x?a=1", &[]));
    assert!(routed);
    assert!(
        text.starts_with("REDIRECT 301 https://reviews.shop/new/x?a=1\n"),
        "{text}"
    );
    assert!(
        !text.contains("backends:"),
        "a redirect has no backends: {text}"
    );
}

#[test]
fn the_path_is_normalized_before_matching() {
    let (_, text) = inspect(&routes(), &args(Method::GET, "/x/../old/%61", &[]));
    assert!(
        text.starts_with("REDIRECT 301 https://reviews.shop/new/a\n"),
        "{text}"
    );
    assert!(
        text.contains("request: GET /old/a (HTTP), normalized (BASE) from /x/../old/%61\n"),
        "{text}"
    );
}

#[test]
fn no_matching_rule_is_not_found() {
    let (routed, text) = inspect(&routes(), &args(Method::GET, "/web", &[]));
    assert!(!routed);
    assert!(text.starts_with("NOT-FOUND\n"), "{text}");
    assert!(text.contains("the proxy answers 404"), "{text}");
    assert_eq!(
        text.matches(" — path /web does not match").count(),
        3,
        "{text}"
    );
}

#[test]
fn a_port_without_routes_is_balanced_as_before() {
    let (routed, text) = inspect(&RouteSet::default(), &args(Method::GET, "/", &[]));
    assert!(routed);
    assert!(text.starts_with("NO-ROUTE\n"), "{text}");
    assert!(
        text.contains("the proxy balances over the Service itself"),
        "{text}"
    );
}

#[test]
fn grpc_requests_use_the_grpc_table() {
    let mut set = routes();
    let mut port = PortRoutes::clone(&set.ports[&reviews()]);
    port.grpc = Some(Arc::new(GrpcRouteTable {
        rules: vec![Rule {
            source: RuleRef {
                kind: RouteKind::GrpcRoute,
                namespace: "shop".into(),
                name: "greeter".into(),
                rule_index: 0,
                rule_name: None,
            },
            filters: Vec::new(),
            backends: Backends {
                entries: vec![to_service("greeter-v2", 1)],
            },
            timeouts: Timeouts::default(),
            retry: None,
        }],
        order: vec![(
            0,
            GrpcMatch {
                service: Some(ValueMatch::Exact("hello.Greeter".into())),
                ..GrpcMatch::default()
            },
        )],
    }));
    set.ports.insert(reviews(), Arc::new(port));
    let mut grpc = args(Method::POST, "/hello.Greeter/SayHello", &[]);
    grpc.grpc = true;
    let (routed, text) = inspect(&set, &grpc);
    assert!(routed);
    assert!(
        text.starts_with("ROUTE GRPCRoute shop/greeter rule 0\n"),
        "{text}"
    );
    assert!(
        text.contains("request: POST /hello.Greeter/SayHello (gRPC)\n"),
        "{text}"
    );
    grpc.path = "/other.Svc/M".into();
    let (routed, text) = inspect(&set, &grpc);
    assert!(!routed);
    assert!(
        text.contains("  1. GRPCRoute shop/greeter rule 0 match (service=hello.Greeter) — service other.Svc does not match service=hello.Greeter\n"),
        "{text}"
    );
}

#[test]
fn a_service_not_in_the_mesh_file_is_said() {
    let mut unknown = args(Method::GET, "/", &[]);
    unknown.to.service.name = "ghost".into();
    let (_, text) = inspect(&RouteSet::default(), &unknown);
    assert!(
        text.contains("service: shop/ghost port 9080 (not a meshed Service in --mesh-file"),
        "{text}"
    );
}

#[test]
fn to_is_service_dot_namespace_colon_port() {
    assert_eq!(parse_port_key("reviews.shop:9080").unwrap(), reviews());
    for bad in [
        "reviews:9080",
        "reviews.shop",
        "reviews.shop:0",
        ".shop:1",
        "a.b.c:1",
        "reviews.shop:x",
    ] {
        assert!(parse_port_key(bad).is_err(), "{bad}");
    }
}
