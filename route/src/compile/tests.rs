use std::time::Duration;

use super::*;
use crate::compiled::{Backend, HttpRouteTable, Limit, OutlierDetection, RetryPolicy, Timeouts};
use crate::model::tests::objects;
use crate::validate::tests::catalog;

fn trust_domain() -> TrustDomain {
    TrustDomain::new("td.test").unwrap()
}

fn compiled(yaml: &str) -> Compiled {
    let objects: RouteObjects = objects(yaml).into_iter().collect();
    compile(&objects, &catalog(), &trust_domain())
}

fn http_route(
    namespace: &str,
    name: &str,
    created: Option<&str>,
    parent: &str,
    rules: &str,
) -> String {
    let created = created
        .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n{created}spec:\n  parentRefs:\n  - {parent}\n  rules:\n{rules}"
    )
}

const ECHO_80: &str = "{group: \"\", kind: Service, name: echo, namespace: shop, port: 80}";

fn key(service: &str, port: u16) -> PortKey {
    let (namespace, name) = service.split_once('/').unwrap();
    PortKey {
        service: ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        port,
    }
}

/// Each entry of the table's order as `<route>[<rule>] <path> <method> h<headers> q<query>`.
fn order(table: &HttpRouteTable) -> Vec<String> {
    (table.order.iter())
        .map(|(rule, m)| {
            let source = &table.rules[*rule].source;
            let path = m.path.as_ref().map(ToString::to_string).unwrap_or_default();
            let method = m
                .method
                .as_ref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default();
            format!(
                "{}[{}] {path}{method} h{} q{}",
                source.route(),
                source.rule_index,
                m.headers.len(),
                m.query.len()
            )
        })
        .collect()
}

fn producer_http(compiled: &Compiled, service: &str, port: u16) -> Arc<HttpRouteTable> {
    let routes = &compiled.producer[&key(service, port)];
    assert_eq!(routes.origin, RouteOrigin::Producer);
    routes.http.clone().expect("an HTTP table")
}

/// One route with every match kind in one rule each, listed worst first.
#[test]
fn http_precedence_within_a_route() {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /}}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}, method: GET}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}, method: GET, headers: [{name: x, value: \"1\"}]}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: \"1\"}, {name: y, value: \"2\"}]}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}, queryParams: [{name: q, value: \"1\"}]}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /a}, method: GET, headers: [{name: x, value: \"1\"}], queryParams: [{name: q, value: \"1\"}]}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /abc/def}}]\n\
                 \x20 - matches: [{path: {type: RegularExpression, value: /r.*}}]\n\
                 \x20 - matches: [{path: {type: RegularExpression, value: /longer.*}}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /a}}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /abcdef}}]\n";
    let compiled = compiled(&http_route("shop", "r", None, ECHO_80, rules));
    assert_eq!(
        order(&producer_http(&compiled, "shop/echo", 80)),
        [
            // Exact first, longer first.
            "shop/r[11] Exact /abcdef h0 q0",
            "shop/r[10] Exact /a h0 q0",
            // Then regexes (sigil's choice), longer pattern first.
            "shop/r[9] RegularExpression /longer.* h0 q0",
            "shop/r[8] RegularExpression /r.* h0 q0",
            // Then prefixes, longer first.
            "shop/r[7] PathPrefix /abc/def h0 q0",
            // At one prefix: a method first, then more headers, then more query params.
            "shop/r[6] PathPrefix /a GET h1 q1",
            "shop/r[3] PathPrefix /a GET h1 q0",
            "shop/r[2] PathPrefix /a GET h0 q0",
            "shop/r[4] PathPrefix /a h2 q0",
            "shop/r[5] PathPrefix /a h0 q1",
            "shop/r[1] PathPrefix /a h0 q0",
            "shop/r[0] PathPrefix / h0 q0",
        ]
    );
}

#[test]
fn ties_go_to_the_older_route_then_namespace_and_name_then_rule_and_match_order() {
    let same = "  - matches: [{path: {value: /x}}, {path: {value: /y}}]\n  - matches: [{path: {value: /x}}]\n";
    let yaml = [
        http_route("shop", "b-file", None, ECHO_80, same),
        http_route("shop", "a-file", None, ECHO_80, same),
        http_route("shop", "new", Some("2026-06-01T00:00:00Z"), ECHO_80, same),
        http_route("shop", "old", Some("2026-01-01T00:00:00Z"), ECHO_80, same),
    ]
    .concat();
    let compiled = compiled(&yaml);
    let table = producer_http(&compiled, "shop/echo", 80);
    assert_eq!(
        order(&table),
        [
            // /x and /y tie (same prefix length): the older route, then namespace/name,
            // then rule order, then match order.
            "shop/old[0] PathPrefix /x h0 q0",
            "shop/old[0] PathPrefix /y h0 q0",
            "shop/old[1] PathPrefix /x h0 q0",
            "shop/new[0] PathPrefix /x h0 q0",
            "shop/new[0] PathPrefix /y h0 q0",
            "shop/new[1] PathPrefix /x h0 q0",
            // Without creation timestamps (a file): after those with, by namespace/name.
            "shop/a-file[0] PathPrefix /x h0 q0",
            "shop/a-file[0] PathPrefix /y h0 q0",
            "shop/a-file[1] PathPrefix /x h0 q0",
            "shop/b-file[0] PathPrefix /x h0 q0",
            "shop/b-file[0] PathPrefix /y h0 q0",
            "shop/b-file[1] PathPrefix /x h0 q0",
        ]
    );
    // Rules are stored oldest route first, each route's rules in order.
    let sources: Vec<String> = (table.rules.iter())
        .map(|r| format!("{}[{}]", r.source.route(), r.source.rule_index))
        .collect();
    assert_eq!(
        sources,
        [
            "shop/old[0]",
            "shop/old[1]",
            "shop/new[0]",
            "shop/new[1]",
            "shop/a-file[0]",
            "shop/a-file[1]",
            "shop/b-file[0]",
            "shop/b-file[1]"
        ]
    );
}

#[test]
fn a_rule_without_matches_matches_every_path() {
    let compiled = compiled(&http_route("shop", "r", None, ECHO_80, "  - {}\n"));
    assert_eq!(
        order(&producer_http(&compiled, "shop/echo", 80)),
        ["shop/r[0] PathPrefix / h0 q0"]
    );
}

fn grpc_route(name: &str, annotations: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: {name}\n  \
         namespace: shop\n  annotations: {{{annotations}}}\nspec:\n  parentRefs:\n  \
         - {{group: \"\", kind: Service, name: echo, port: 7070}}\n  rules:\n{rules}"
    )
}

#[test]
fn grpc_precedence() {
    let rules = "  - {}\n\
                 \x20 - matches: [{headers: [{name: a, value: \"1\"}, {name: b, value: \"2\"}]}]\n\
                 \x20 - matches: [{method: {method: Get}}]\n\
                 \x20 - matches: [{method: {method: GetLonger}}]\n\
                 \x20 - matches: [{method: {service: pkg.Svc}}]\n\
                 \x20 - matches: [{method: {service: pkg.Svc, method: Get}}]\n\
                 \x20 - matches: [{method: {service: pkg.LongerSvc}}]\n";
    let compiled = compiled(&grpc_route("g", "", rules));
    let routes = &compiled.producer[&key("shop/echo", 7070)];
    assert!(routes.http.is_none(), "no HTTPRoute on this port");
    let table = routes.grpc.as_ref().unwrap();
    let order: Vec<u32> = (table.order.iter())
        .map(|(rule, _)| table.rules[*rule].source.rule_index)
        .collect();
    // Longer service first, then longer method, then more headers; a rule without matches
    // matches every request and comes last.
    assert_eq!(order, [6, 5, 4, 3, 2, 1, 0]);
}

#[test]
fn http_and_grpc_tables_on_one_port_stay_apart() {
    let yaml = http_route(
        "shop",
        "h",
        None,
        "{group: \"\", kind: Service, name: echo}",
        "  - backendRefs: [{name: echo-v1, port: 80}]\n",
    ) + &grpc_route("g", "", "  - backendRefs: [{name: echo-v1, port: 7070}]\n");
    let compiled = compiled(&yaml);
    // No port on the parentRef: every port of the Service.
    let http_only = &compiled.producer[&key("shop/echo", 80)];
    assert!(http_only.http.is_some() && http_only.grpc.is_none());
    let both = &compiled.producer[&key("shop/echo", 7070)];
    assert_eq!(both.http.as_ref().unwrap().rules.len(), 1);
    assert_eq!(both.grpc.as_ref().unwrap().rules.len(), 1);
}

#[test]
fn section_name_attaches_to_one_port() {
    let yaml = http_route(
        "shop",
        "h",
        None,
        "{group: \"\", kind: Service, name: echo, sectionName: grpc}",
        "  - {}\n",
    );
    let compiled = compiled(&yaml);
    assert_eq!(
        compiled.producer.keys().collect::<Vec<_>>(),
        [&key("shop/echo", 7070)]
    );
}

fn client(namespace: &str) -> ClientScope {
    ClientScope {
        namespace: namespace.to_owned(),
        id: SpiffeId::parse(&format!("spiffe://td.test/ns/{namespace}/sa/default")).unwrap(),
    }
}

/// GAMMA: consumer routes in N replace the producer routes for clients in N only; routes in a
/// third namespace apply to nobody else.
#[test]
fn producer_and_consumer_routes() {
    let rules = "  - backendRefs: [{name: echo-v1, namespace: shop, port: 80}]\n";
    let yaml = [
        http_route("shop", "producer", None, ECHO_80, rules),
        http_route("web", "consumer", None, ECHO_80, rules),
    ]
    .concat();
    let compiled = compiled(&yaml);
    let port = key("shop/echo", 80);
    let source = |view: &RouteSet| {
        let routes = &view.ports[&port];
        let rule = &routes.http.as_ref().unwrap().rules[0];
        (routes.origin, rule.source.route())
    };
    for namespace in ["shop", "other"] {
        assert_eq!(
            source(&compiled.view(&client(namespace))),
            (RouteOrigin::Producer, "shop/producer".to_owned()),
            "{namespace}"
        );
    }
    assert_eq!(
        source(&compiled.view(&client("web"))),
        (RouteOrigin::Consumer, "web/consumer".to_owned())
    );
    // A consumer route alone: producer clients see no route at all for the port.
    let compiled = self::compiled(&http_route("web", "consumer", None, ECHO_80, rules));
    assert!(compiled.view(&client("other")).ports.is_empty());
    assert!(compiled.view(&client("shop")).ports.is_empty());
    assert_eq!(compiled.view(&client("web")).ports.len(), 1);
}

#[test]
fn routes_without_valid_rules_or_parents_attach_nothing() {
    let yaml = [
        http_route(
            "shop",
            "bad",
            None,
            ECHO_80,
            "  - matches: [{method: FETCH}]\n",
        ),
        http_route(
            "shop",
            "legacy",
            None,
            "{group: \"\", kind: Service, name: legacy}",
            "  - {}\n",
        ),
        http_route("shop", "gateway", None, "{name: some-gateway}", "  - {}\n"),
    ]
    .concat();
    let compiled = compiled(&yaml);
    assert!(compiled.producer.is_empty() && compiled.consumer.is_empty());
    assert!(compiled.backends.is_empty());
}

#[test]
fn backends_and_mirrors() {
    let rules = "  - filters:\n    - type: RequestMirror\n      requestMirror:\n        \
                 backendRef: {name: echo-v2, port: 80}\n        percent: 25\n    \
                 backendRefs:\n    - {name: echo-v1, port: 80, weight: 90}\n    \
                 - {name: legacy, port: 80, weight: 10}\n    - {name: echo-v2, port: 80, weight: 0}\n    \
                 - {name: v3, port: 80}\n";
    let compiled = compiled(&http_route("shop", "r", None, ECHO_80, rules));
    let table = producer_http(&compiled, "shop/echo", 80);
    let rule = &table.rules[0];
    let backend = |name: &str, cluster_ips: Vec<std::net::IpAddr>| Backend {
        service: ServiceRef {
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        },
        port: 80,
        cluster_ips,
    };
    let entries: Vec<(u32, BackendTarget)> = (rule.backends.entries.iter())
        .map(|e| (e.weight, e.target.clone()))
        .collect();
    assert_eq!(
        entries,
        [
            (90, BackendTarget::Service(backend("echo-v1", Vec::new()))),
            // Outside the mesh: reached at its cluster IP.
            (
                10,
                BackendTarget::Service(backend("legacy", vec!["198.18.200.1".parse().unwrap()]))
            ),
            // Weight 0 left out; the missing Service answered 500 for its share.
            (
                1,
                BackendTarget::Invalid(
                    "spec.rules[0].backendRefs[3]: Service shop/v3 not found".to_owned()
                )
            ),
        ]
    );
    let [Filter::Mirror(mirror)] = &rule.filters[..] else {
        panic!("{:?}", rule.filters);
    };
    assert_eq!(
        (mirror.backend.clone(), mirror.numerator, mirror.denominator),
        (backend("echo-v2", Vec::new()), 25, 100)
    );
    // Every Service a parent, a backend or a mirror, with the default policy.
    let services: Vec<String> = compiled.backends.keys().map(ToString::to_string).collect();
    assert_eq!(
        services,
        ["shop/echo", "shop/echo-v1", "shop/echo-v2", "shop/legacy"]
    );
    let policy = &compiled.backends[&backend("echo", Vec::new()).service];
    assert_eq!(policy.source, "default");
    assert_eq!(
        (
            policy.outlier_detection.clone(),
            policy.retry_budget.clone()
        ),
        (None, RetryBudget::default())
    );
}

#[test]
fn backend_policy_fills_defaults_and_reaches_services_without_routes() {
    let yaml = "apiVersion: sigil.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: p, namespace: backends}\n\
                spec:\n  targetRefs:\n  - {group: \"\", kind: Service, name: payments}\n  \
                outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 300ms, maxEjectionTime: 3s}\n  \
                retryBudget: {percent: 100}\n";
    let compiled = compiled(yaml);
    let policy = &compiled.backends[&key("backends/payments", 0).service];
    assert_eq!(policy.source, "backends/p");
    assert_eq!(
        policy.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx_errors: 3,
            base_ejection_time: Duration::from_millis(300),
            max_ejection_time: Duration::from_secs(3),
            ..OutlierDetection::default()
        })
    );
    assert_eq!(
        policy.retry_budget,
        RetryBudget {
            percent: 100,
            ..RetryBudget::default()
        }
    );
    // Every client gets every backend policy.
    assert_eq!(compiled.view(&client("web")).backends.len(), 1);
}

fn with_annotations(route: String, annotations: &str) -> String {
    route.replace(
        "  namespace: shop\n",
        &format!("  namespace: shop\n  annotations: {{{annotations}}}\n"),
    )
}

#[test]
fn http_timeouts_and_retries_fields_win_over_annotations() {
    let rules = "  - matches: [{path: {value: /field}}]\n    timeouts: {request: 2s, backendRequest: 500ms}\n    \
                 retry: {codes: [503]}\n\
                 \x20 - matches: [{path: {value: /annotated}}]\n\
                 \x20 - matches: [{path: {value: /zero}}]\n    timeouts: {request: 0s}\n    retry: {attempts: 0}\n";
    let annotations = "timeout.sigil.dev/idle: 30s, timeout.sigil.dev/request: 5s, retry.sigil.dev/limit: \"3\", \
                       retry.sigil.dev/http: \"5xx,429\", retry.sigil.dev/backoff: 100ms, retry.sigil.dev/non-idempotent: \"true\"";
    let yaml = with_annotations(http_route("shop", "r", None, ECHO_80, rules), annotations);
    let compiled = compiled(&yaml);
    let table = producer_http(&compiled, "shop/echo", 80);
    let rule = |index: u32| {
        table
            .rules
            .iter()
            .find(|r| r.source.rule_index == index)
            .unwrap()
    };
    let idle = Some(Duration::from_secs(30));
    assert_eq!(
        rule(0).timeouts,
        Timeouts {
            request: Some(Duration::from_secs(2)),
            backend_request: Some(Duration::from_millis(500)),
            idle
        }
    );
    assert_eq!(
        rule(0).retry,
        Some(RetryPolicy {
            attempts: 1,
            http_codes: [503].into(),
            grpc_codes: [].into(),
            backoff: Duration::from_millis(25),
            non_idempotent: true,
        })
    );
    assert_eq!(
        rule(1).timeouts,
        Timeouts {
            request: Some(Duration::from_secs(5)),
            backend_request: None,
            idle
        }
    );
    let mut codes: std::collections::BTreeSet<u16> = (500..=599).collect();
    codes.insert(429);
    assert_eq!(
        rule(1).retry,
        Some(RetryPolicy {
            attempts: 3,
            http_codes: codes,
            grpc_codes: [].into(),
            backoff: Duration::from_millis(100),
            non_idempotent: true,
        })
    );
    // 0s: no timeout; attempts 0: no retries.
    assert_eq!(
        rule(2).timeouts,
        Timeouts {
            request: None,
            backend_request: None,
            idle
        }
    );
    assert_eq!(rule(2).retry, None);
}

#[test]
fn grpc_timeouts_and_retries_from_annotations() {
    let annotations = "timeout.sigil.dev/request: 1s, timeout.sigil.dev/backend-request: 300ms, \
                       retry.sigil.dev/grpc: \"unavailable,DEADLINE_EXCEEDED,8\"";
    let compiled = compiled(&grpc_route("g", annotations, "  - {}\n"));
    let table = compiled.producer[&key("shop/echo", 7070)]
        .grpc
        .clone()
        .unwrap();
    let rule = &table.rules[0];
    assert_eq!(
        rule.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(1)),
            backend_request: Some(Duration::from_millis(300)),
            idle: None
        }
    );
    assert_eq!(
        rule.retry,
        Some(RetryPolicy {
            attempts: 1,
            http_codes: [].into(),
            grpc_codes: [4, 8, 14].into(),
            backoff: Duration::from_millis(25),
            non_idempotent: false,
        })
    );
    // A limit alone retries UNAVAILABLE.
    let compiled = self::compiled(&grpc_route("g", "retry.sigil.dev/limit: \"2\"", "  - {}\n"));
    let table = compiled.producer[&key("shop/echo", 7070)]
        .grpc
        .clone()
        .unwrap();
    let retry = table.rules[0].retry.clone().unwrap();
    assert_eq!((retry.attempts, retry.grpc_codes), (2, [14].into()));
}

#[test]
fn rate_limits_per_port_and_identity() {
    let yaml = http_route(
        "shop",
        "r",
        None,
        ECHO_80,
        "  - matches: [{path: {value: /api}}]\n",
    ) + "---\napiVersion: sigil.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: svc, namespace: shop}\n\
           spec:\n  targetRefs:\n  - {group: \"\", kind: Service, name: echo, sectionName: http}\n  \
           total: {requests: 100}\n  identity: {requests: 10, period: 1s, burst: 20}\n  overrides:\n  \
           - requests: 50\n    clients:\n    - {serviceAccount: web/frontend}\n    \
           - {spiffeId: \"spiffe://other.test/ns/batch/sa/reporter\"}\n\
           ---\napiVersion: sigil.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: api, namespace: shop}\n\
           spec:\n  targetRefs:\n  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n  \
           total: {requests: 5, period: 1m}\n";
    let compiled = compiled(&yaml);
    let port = key("shop/echo", 80);
    assert_eq!(compiled.inbound.keys().collect::<Vec<_>>(), [&port]);
    let limits = &compiled.inbound[&port].limits;
    assert_eq!(limits.len(), 2);
    let by_service = limits.iter().find(|l| l.source == "shop/svc").unwrap();
    assert!(by_service.http_matches.is_empty() && by_service.grpc_matches.is_empty());
    assert_eq!(
        by_service.total,
        Some(Limit {
            requests: 100,
            period: Duration::from_secs(1),
            burst: 100
        })
    );
    assert_eq!(
        by_service.per_identity,
        Some(Limit {
            requests: 10,
            period: Duration::from_secs(1),
            burst: 20
        })
    );
    let clients: Vec<String> = by_service.overrides[0]
        .clients
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        clients,
        [
            "spiffe://other.test/ns/batch/sa/reporter",
            "spiffe://td.test/ns/web/sa/frontend"
        ]
    );
    let by_route = limits.iter().find(|l| l.source == "shop/api").unwrap();
    let paths: Vec<String> = (by_route.http_matches.iter())
        .map(|m| m.path.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(paths, ["PathPrefix /api"]);
    assert_eq!(by_route.total.unwrap().period, Duration::from_secs(60));
    // Only the identity behind shop/echo enforces them.
    let echo = ClientScope {
        namespace: "shop".to_owned(),
        id: SpiffeId::parse("spiffe://td.test/ns/shop/sa/echo").unwrap(),
    };
    assert_eq!(
        compiled.view(&echo).inbound.keys().collect::<Vec<_>>(),
        [&port]
    );
    assert!(compiled.view(&client("shop")).inbound.is_empty());
}
