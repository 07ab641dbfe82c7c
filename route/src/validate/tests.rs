use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::model::tests::objects;

/// One Service of a test catalog: `ports` as (name, port, appProtocol).
pub(crate) fn service(
    catalog: &mut Catalog,
    key: &str,
    ports: &[(&str, u16, Option<&str>)],
    meshed: bool,
    endpoint_ids: &[&str],
) {
    let (namespace, name) = key.split_once('/').unwrap();
    catalog.services.insert(
        ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        ServiceInfo {
            ports: (ports.iter())
                .map(|(name, port, app)| ServicePortInfo {
                    name: (*name).to_owned(),
                    port: *port,
                    app_protocol: app.map(str::to_owned),
                })
                .collect(),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1))],
            meshed,
            endpoint_ids: (endpoint_ids.iter())
                .map(|id| SpiffeId::parse(id).unwrap())
                .collect(),
        },
    );
}

/// shop/echo, shop/echo-v1, shop/echo-v2 (meshed, ports http 80 and grpc 7070), shop/legacy
/// (not meshed), shop/db (a mysql port), backends/payments (meshed, 8080).
pub(crate) fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    let web = [("http", 80, None), ("grpc", 7070, Some("grpc"))];
    for name in ["shop/echo", "shop/echo-v1", "shop/echo-v2"] {
        service(
            &mut catalog,
            name,
            &web,
            true,
            &["spiffe://td.test/ns/shop/sa/echo"],
        );
    }
    service(
        &mut catalog,
        "shop/legacy",
        &[("http", 80, None)],
        false,
        &[],
    );
    service(
        &mut catalog,
        "shop/db",
        &[("db", 3306, Some("mysql"))],
        true,
        &[],
    );
    service(
        &mut catalog,
        "backends/payments",
        &[("http", 8080, None)],
        true,
        &[],
    );
    catalog
}

fn all(yaml: &str) -> RouteObjects {
    objects(yaml).into_iter().collect()
}

/// The conditions of the first Service parent of the only route in `yaml`.
fn conditions(yaml: &str) -> Vec<Condition> {
    let verdicts = judge_routes(&all(yaml), &catalog());
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    verdicts[0].parents[0].conditions.clone()
}

fn summary(conditions: &[Condition]) -> Vec<(&'static str, bool, &'static str)> {
    (conditions.iter())
        .map(|c| (c.type_, c.status, c.reason))
        .collect()
}

fn route(parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs:\n{parent}\n  rules:\n{rules}"
    )
}

const ECHO: &str = "  - {group: \"\", kind: Service, name: echo, port: 80}";

const ACCEPTED: (&str, bool, &str) = ("Accepted", true, "Accepted");
const RESOLVED: (&str, bool, &str) = ("ResolvedRefs", true, "ResolvedRefs");

#[test]
fn valid_and_resolved() {
    let c = conditions(&route(
        ECHO,
        "  - backendRefs:\n    - {name: echo-v1, port: 80}\n",
    ));
    assert_eq!(summary(&c), [ACCEPTED, RESOLVED]);
    assert_eq!(c[0].message, "accepted by sigil");
}

#[test]
fn parent_service_not_found() {
    let parent = "  - {group: \"\", kind: Service, name: nope}";
    let c = conditions(&route(
        parent,
        "  - backendRefs:\n    - {name: echo-v1, port: 80}\n",
    ));
    assert_eq!(
        summary(&c),
        [("Accepted", false, "NoMatchingParent"), RESOLVED]
    );
    assert_eq!(
        c[0].message,
        "spec.parentRefs[0]: Service shop/nope not found"
    );
}

#[test]
fn port_or_section_name_matching_no_port() {
    for (parent, message) in [
        (
            "  - {group: \"\", kind: Service, name: echo, port: 81}",
            "spec.parentRefs[0]: port 81 matches no port of Service shop/echo",
        ),
        (
            "  - {group: \"\", kind: Service, name: echo, sectionName: admin}",
            "spec.parentRefs[0]: sectionName \"admin\" matches no port of Service shop/echo",
        ),
        (
            "  - {group: \"\", kind: Service, name: echo, port: 80, sectionName: grpc}",
            "spec.parentRefs[0]: port 80 and sectionName \"grpc\" matches no port of Service shop/echo",
        ),
    ] {
        let c = conditions(&route(parent, "  - {}\n"));
        assert_eq!(c[0].reason, "NoMatchingParent", "{parent}");
        assert_eq!(c[0].message, message);
    }
}

#[test]
fn parent_outside_the_mesh() {
    let parent = "  - {group: \"\", kind: Service, name: legacy}";
    let c = conditions(&route(parent, "  - {}\n"));
    assert_eq!(summary(&c)[0], ("Accepted", false, "NoMatchingParent"));
    assert!(
        c[0].message.contains("not in the sigil mesh"),
        "{}",
        c[0].message
    );
}

#[test]
fn gateway_parents_are_not_judged() {
    let parents = "  - {name: some-gateway}\n  - {group: \"\", kind: Service, name: echo}";
    let verdicts = judge_routes(&all(&route(parents, "  - {}\n")), &catalog());
    let indexes: Vec<usize> = verdicts[0].parents.iter().map(|p| p.parent_index).collect();
    assert_eq!(indexes, [1]);
}

/// Rules with a value sigil does not support, each with the message it gets.
const UNSUPPORTED_RULES: [(&str, &str); 6] = [
    (
        "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 305}\n",
        "spec.rules[0].filters[0].requestRedirect.statusCode: 305 is not one of 301, 302, 303, 307, 308",
    ),
    (
        "  - matches:\n    - path: {type: RegularExpression, value: \"(a\"}\n",
        "spec.rules[0].matches[0].path.value: not a valid RE2 regular expression",
    ),
    (
        // Lookaround is not RE2.
        "  - matches:\n    - headers:\n      - {type: RegularExpression, name: x, value: \"a(?=b)\"}\n",
        "spec.rules[0].matches[0].headers[0].value: not a valid RE2 regular expression",
    ),
    (
        "  - matches:\n    - path: {type: RegularExpression, value: \"\\\\w{1000}\\\\w{1000}\"}\n",
        "spec.rules[0].matches[0].path.value: not a valid RE2 regular expression within 64 KiB",
    ),
    (
        "  - filters:\n    - type: ExtensionRef\n      extensionRef: {group: example.com, kind: Thing, name: x}\n",
        "spec.rules[0].filters[0]: ExtensionRef filters are not supported by sigil",
    ),
    (
        "  - filters:\n    - type: CORS\n      cors: {allowOrigins: [\"*\"]}\n",
        "spec.rules[0].filters[0]: filter type \"CORS\" is not supported by sigil on a HTTPRoute rule",
    ),
];

#[test]
fn unsupported_value_in_every_rule() {
    for (rule, message) in UNSUPPORTED_RULES {
        let c = conditions(&route(ECHO, rule));
        assert_eq!(
            summary(&c),
            [("Accepted", false, "UnsupportedValue"), RESOLVED],
            "{rule}"
        );
        assert!(c[0].message.starts_with(message), "{}", c[0].message);
    }
}

#[test]
fn unsupported_value_in_some_rules() {
    let rules = format!(
        "  - backendRefs:\n    - {{name: echo-v1, port: 80}}\n{}",
        UNSUPPORTED_RULES[0].0
    );
    let c = conditions(&route(ECHO, &rules));
    assert_eq!(
        summary(&c),
        [
            ACCEPTED,
            RESOLVED,
            ("PartiallyInvalid", true, "UnsupportedValue")
        ]
    );
    assert_eq!(
        c[2].message,
        "Dropped Rules: spec.rules[1].filters[0].requestRedirect.statusCode: 305 is not one of 301, 302, 303, 307, 308"
    );
}

#[test]
fn incompatible_filters() {
    let redirect_and_rewrite = "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: a.example}\n    - type: URLRewrite\n      urlRewrite: {hostname: b.example}\n";
    let redirect_and_backends = "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: a.example}\n    backendRefs:\n    - {name: echo-v1, port: 80}\n";
    let twice = "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {remove: [a]}\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {remove: [b]}\n";
    for (rule, message) in [
        (
            redirect_and_rewrite,
            "spec.rules[0]: RequestRedirect and URLRewrite cannot be used in one rule",
        ),
        (
            redirect_and_backends,
            "spec.rules[0]: RequestRedirect cannot be used with backendRefs",
        ),
        (
            twice,
            "spec.rules[0].filters[1]: RequestHeaderModifier may appear only once in a rule",
        ),
    ] {
        let c = conditions(&route(ECHO, rule));
        assert_eq!(summary(&c)[0], ("Accepted", false, "IncompatibleFilters"));
        assert_eq!(c[0].message, message);
        let kept_too = format!("  - {{}}\n{rule}");
        let c = conditions(&route(ECHO, &kept_too));
        assert_eq!(c[0].reason, "Accepted");
        assert_eq!(
            summary(&c)[2],
            ("PartiallyInvalid", true, "IncompatibleFilters")
        );
    }
}

/// What the CRDs' CEL rules refuse, refused here (the test API server runs no CEL).
#[test]
fn crd_validation_rules() {
    for (rule, message) in [
        (
            "  - timeouts: {request: 1s, backendRequest: 2s}\n",
            "spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request",
        ),
        (
            "  - timeouts: {request: 1.5s}\n",
            "spec.rules[0].timeouts.request: \"1.5s\" is not a duration",
        ),
        (
            "  - matches:\n    - path: {type: Exact, value: /a}\n    filters:\n    - type: URLRewrite\n      urlRewrite:\n        path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}\n",
            "spec.rules[0]: ReplacePrefixMatch needs exactly one match, of type PathPrefix",
        ),
        (
            "  - matches:\n    - path: {value: /a}\n    - path: {value: /b}\n    filters:\n    - type: RequestRedirect\n      requestRedirect:\n        path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}\n",
            "spec.rules[0]: ReplacePrefixMatch needs exactly one match, of type PathPrefix",
        ),
        (
            "  - matches:\n    - headers:\n      - {name: \"bad header\", value: x}\n",
            "spec.rules[0].matches[0].headers[0].name: \"bad header\" is not a valid header name",
        ),
        (
            "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: \"a:b\", value: x}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name: \"a:b\" is not a valid header name",
        ),
        (
            "  - matches:\n    - path: {type: PathPrefix, value: foo}\n",
            "spec.rules[0].matches[0].path.value: must be an absolute path starting with /",
        ),
        (
            "  - matches:\n    - path: {type: Exact, value: /a/../b}\n",
            "spec.rules[0].matches[0].path.value: must not contain //, /./, /../, %2f, %2F or #",
        ),
        (
            "  - matches:\n    - method: FETCH\n",
            "spec.rules[0].matches[0].method: \"FETCH\" is not one of GET",
        ),
        (
            "  - filters:\n    - type: RequestMirror\n      requestMirror:\n        backendRef: {name: echo-v2, port: 80}\n        percent: 10\n        fraction: {numerator: 1}\n",
            "spec.rules[0].filters[0].requestMirror: only one of percent and fraction may be given",
        ),
        (
            "  - retry: {codes: [200]}\n",
            "spec.rules[0].retry.codes[0]: 200 is not a status code from 400 to 599",
        ),
    ] {
        let c = conditions(&route(ECHO, rule));
        assert_eq!(c[0].reason, "UnsupportedValue", "{rule}");
        assert!(c[0].message.starts_with(message), "{}", c[0].message);
    }
}

#[test]
fn backend_references() {
    for (backend, reason, message) in [
        (
            "{name: v3, port: 80}",
            "BackendNotFound",
            "spec.rules[0].backendRefs[0]: Service shop/v3 not found",
        ),
        (
            "{name: echo-v1, port: 9}",
            "BackendNotFound",
            "spec.rules[0].backendRefs[0]: port 9 is not a port of shop/echo-v1",
        ),
        (
            "{name: echo-v1}",
            "BackendNotFound",
            "spec.rules[0].backendRefs[0]: port is required to refer to Service shop/echo-v1",
        ),
        (
            "{group: example.com, kind: Bucket, name: b}",
            "InvalidKind",
            "spec.rules[0].backendRefs[0]: example.com/Bucket is not a Service (group \"\", kind Service)",
        ),
        (
            "{name: payments, namespace: backends, port: 8080}",
            "RefNotPermitted",
            "spec.rules[0].backendRefs[0]: no ReferenceGrant in namespace backends lets a HTTPRoute in shop refer to Service backends/payments",
        ),
        (
            "{name: db, port: 3306}",
            "UnsupportedProtocol",
            "spec.rules[0].backendRefs[0]: port 3306 of shop/db is declared opaque (appProtocol mysql); routes carry HTTP",
        ),
    ] {
        let rules = format!("  - backendRefs:\n    - {backend}\n");
        let c = conditions(&route(ECHO, &rules));
        // The rule is kept: its share of requests is answered 500.
        assert_eq!(
            summary(&c),
            [ACCEPTED, ("ResolvedRefs", false, reason)],
            "{backend}"
        );
        assert_eq!(c[1].message, message);
    }
}

#[test]
fn reference_grant_permits_a_backend_in_another_namespace() {
    let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
                 metadata: {name: g, namespace: backends}\nspec:\n  from:\n  \
                 - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}\n  \
                 to:\n  - {group: \"\", kind: Service}\n";
    let rules = "  - backendRefs:\n    - {name: payments, namespace: backends, port: 8080}\n";
    let objects = all(&format!("{}{grant}", route(ECHO, rules)));
    let verdicts = judge_routes(&objects, &catalog());
    assert_eq!(
        summary(&verdicts[0].parents[0].conditions),
        [ACCEPTED, RESOLVED]
    );
}

/// GAMMA: a consumer route (its namespace is not the Service's) needs no ReferenceGrant for the
/// parent; its backends in the Service's namespace still do.
#[test]
fn consumer_route() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: c, namespace: web}\nspec:\n  parentRefs:\n  \
                - {group: \"\", kind: Service, name: echo, namespace: shop, port: 80}\n  rules:\n  \
                - backendRefs:\n    - {name: echo-v2, namespace: shop, port: 80}\n  \
                - filters:\n    - type: RequestHeaderModifier\n      \
                requestHeaderModifier: {set: [{name: x-consumer, value: web}]}\n";
    let c = conditions(yaml);
    assert_eq!(
        summary(&c),
        [ACCEPTED, ("ResolvedRefs", false, "RefNotPermitted")]
    );
}

#[test]
fn accepted_message_names_what_is_ignored() {
    let yaml = route(ECHO, "  - {}\n").replace(
        "metadata: {name: r, namespace: shop}",
        "metadata:\n  name: r\n  namespace: shop\n  annotations:\n    \
         retry.sigil.dev/limit: many\n    timeout.sigil.dev/total: 1s\n",
    ) + "  hostnames: [echo.example]\n";
    let c = conditions(&yaml);
    assert_eq!(summary(&c), [ACCEPTED, RESOLVED]);
    assert_eq!(
        c[0].message,
        "accepted by sigil; spec.hostnames is not used for Service parents; \
         annotation timeout.sigil.dev/total ignored: sigil reads no such annotation; \
         annotation retry.sigil.dev/limit ignored: \"many\" is not a number of retries"
    );
}

#[test]
fn grpc_rules() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
                metadata: {name: g, namespace: shop}\nspec:\n  parentRefs:\n  \
                - {group: \"\", kind: Service, name: echo, port: 7070}\n  rules:\n  \
                - matches:\n    - method: {service: grpc.health.v1.Health, method: Check}\n    \
                backendRefs:\n    - {name: echo-v1, port: 7070}\n  \
                - matches:\n    - method: {type: Exact, service: \"not a service\"}\n  \
                - matches:\n    - method: {type: Exact}\n  \
                - filters:\n    - type: URLRewrite\n      urlRewrite: {hostname: x}\n";
    let c = conditions(yaml);
    assert_eq!(
        summary(&c),
        [
            ACCEPTED,
            RESOLVED,
            ("PartiallyInvalid", true, "UnsupportedValue")
        ]
    );
    assert_eq!(
        c[2].message,
        "Dropped Rules: spec.rules[1].matches[0].method.service: \"not a service\" is not a gRPC service name; \
         spec.rules[2].matches[0].method: one or both of service and method must be given; \
         spec.rules[3].filters[0]: filter type \"URLRewrite\" is not supported by sigil on a GRPCRoute rule"
    );
}

#[test]
fn long_messages_are_cut() {
    let rules: String = (0..16)
        .map(|_| format!("  - matches:\n    - method: FETCH{}\n", "X".repeat(3000)))
        .collect();
    let c = conditions(&route(ECHO, &rules));
    assert_eq!(c[0].message.chars().count(), MAX_MESSAGE_CHARS);
}

// ---- policies ----

fn policy_verdicts(yaml: &str) -> Vec<(String, bool, &'static str, String)> {
    (judge_policies(&all(yaml), &catalog()).into_iter())
        .map(|v| {
            let c = v.accepted;
            (v.name, c.status, c.reason, c.message)
        })
        .collect()
}

fn backend_policy(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: sigil.dev/v1alpha1\nkind: BackendPolicy\nmetadata:\n  name: {name}\n  \
         namespace: shop\n  creationTimestamp: \"{created}\"\nspec:\n{spec}"
    )
}

#[test]
fn backend_policy_verdicts() {
    let target =
        |name: &str| format!("  targetRefs:\n  - {{group: \"\", kind: Service, name: {name}}}\n");
    let yaml = [
        // Newer than `old`, same target: Conflicted.
        backend_policy("new", "2026-02-01T00:00:00Z", &target("echo")),
        backend_policy("old", "2026-01-01T00:00:00Z", &target("echo")),
        backend_policy("missing", "2026-01-01T00:00:00Z", &target("nope")),
        backend_policy(
            "invalid",
            "2026-01-01T00:00:00Z",
            &format!(
                "{}  outlierDetection: {{interval: \"10\", maxEjectionPercent: 101}}\n  retryBudget: {{percent: 200}}\n",
                target("echo-v1")
            ),
        ),
        backend_policy(
            "wrong-kind",
            "2026-01-01T00:00:00Z",
            "  targetRefs:\n  - {group: apps, kind: Deployment, name: echo}\n",
        ),
    ]
    .concat();
    assert_eq!(
        policy_verdicts(&yaml),
        [
            (
                "new".to_owned(),
                false,
                "Conflicted",
                "Service shop/echo already has BackendPolicy shop/old, which is older".to_owned()
            ),
            ("old".to_owned(), true, "Accepted", "accepted by sigil".to_owned()),
            (
                "missing".to_owned(),
                false,
                "TargetNotFound",
                "spec.targetRefs[0]: Service shop/nope not found".to_owned()
            ),
            (
                "invalid".to_owned(),
                false,
                "Invalid",
                "spec.outlierDetection.interval: \"10\" is not a duration like 10s, 250ms or 1m30s (GEP-2257); \
                 spec.outlierDetection.maxEjectionPercent: must be 0 to 100; spec.retryBudget.percent: must be 0 to 100"
                    .to_owned()
            ),
            (
                "wrong-kind".to_owned(),
                false,
                "Invalid",
                "spec.targetRefs[0]: only Services (group \"\", kind Service) can be targeted".to_owned()
            ),
        ]
    );
}

fn rate_limit(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: sigil.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata:\n  name: {name}\n  \
         namespace: shop\n  creationTimestamp: \"{created}\"\nspec:\n{spec}"
    )
}

#[test]
fn rate_limit_policy_verdicts() {
    let service =
        "  targetRefs:\n  - {group: \"\", kind: Service, name: echo, sectionName: http}\n";
    let yaml = [
        route(ECHO, "  - {}\n"),
        rate_limit("by-service", "2026-01-01T00:00:00Z", &format!("{service}  total: {{requests: 100}}\n")),
        rate_limit("later", "2026-03-01T00:00:00Z", &format!("{service}  total: {{requests: 5}}\n")),
        rate_limit(
            "by-route",
            "2026-01-01T00:00:00Z",
            "  targetRefs:\n  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}\n  identity: {requests: 5}\n",
        ),
        rate_limit(
            "no-port",
            "2026-01-01T00:00:00Z",
            "  targetRefs:\n  - {group: \"\", kind: Service, name: echo, sectionName: admin}\n  total: {requests: 1}\n",
        ),
        rate_limit(
            "too-generous",
            "2026-01-01T00:00:00Z",
            "  targetRefs:\n  - {group: \"\", kind: Service, name: echo-v1}\n  \
             total: {requests: 10, period: 1s}\n  identity: {requests: 1, period: 50ms}\n  \
             overrides:\n  - requests: 5\n    clients:\n    - {serviceAccount: \"Bad/Name\"}\n    - {}\n",
        ),
    ]
    .concat();
    assert_eq!(
        policy_verdicts(&yaml),
        [
            ("by-service".to_owned(), true, "Accepted", "accepted by sigil".to_owned()),
            (
                "later".to_owned(),
                false,
                "Conflicted",
                "Service shop/echo port 80 already has RateLimitPolicy shop/by-service, which is older".to_owned()
            ),
            ("by-route".to_owned(), true, "Accepted", "accepted by sigil".to_owned()),
            (
                "no-port".to_owned(),
                false,
                "TargetNotFound",
                "spec.targetRefs[0]: Service shop/echo has no port named \"admin\"".to_owned()
            ),
            (
                "too-generous".to_owned(),
                false,
                "Invalid",
                "spec.identity: must not allow more requests than total; \
                 spec.overrides[0].clients[0]: serviceAccount \"Bad/Name\" is not <namespace>/<name>; \
                 spec.overrides[0].clients[1]: exactly one of serviceAccount and spiffeId is required"
                    .to_owned()
            ),
        ]
    );
}

#[test]
fn annotation_values_that_are_ignored() {
    let parse = |kind: RouteKind, pairs: &[(&str, &str)]| {
        let annotations = (pairs.iter())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut notes = Vec::new();
        let parsed = annotations::RouteAnnotations::parse(&annotations, kind, &mut notes);
        (parsed, notes)
    };
    let (parsed, notes) = parse(
        RouteKind::HttpRoute,
        &[
            ("timeout.sigil.dev/request", "1s"),
            ("timeout.sigil.dev/backend-request", "2s"),
            ("retry.sigil.dev/grpc", "unavailable"),
            ("retry.sigil.dev/http", "5xx,600"),
            ("retry.sigil.dev/non-idempotent", "yes"),
        ],
    );
    assert_eq!(
        notes,
        [
            "annotation timeout.sigil.dev/backend-request ignored: longer than timeout.sigil.dev/request",
            "annotation retry.sigil.dev/grpc ignored: it is not read on a HTTPRoute",
            "annotation retry.sigil.dev/http ignored: \"600\": codes must be from 400 to 599",
            "annotation retry.sigil.dev/non-idempotent ignored: \"yes\" is not \"true\" or \"false\"",
        ]
    );
    assert_eq!(parsed.timeouts.backend_request, None);
    // No valid retry annotation of the route's kind: no retries.
    assert_eq!(parsed.retry, None);
    let (parsed, notes) = parse(
        RouteKind::GrpcRoute,
        &[
            ("retry.sigil.dev/grpc", "unavailable, 99"),
            ("retry.sigil.dev/limit", "0"),
        ],
    );
    assert_eq!(
        notes,
        [
            "annotation retry.sigil.dev/grpc ignored: \"99\" is not a gRPC status name or number from 1 to 16"
        ]
    );
    // A limit of 0 turns retries off.
    assert_eq!(parsed.retry, None);
    let (parsed, notes) = parse(
        RouteKind::HttpRoute,
        &[
            ("retry.sigil.dev/http", "429, 500-503"),
            ("retry.sigil.dev/non-idempotent", "true"),
        ],
    );
    assert!(notes.is_empty(), "{notes:?}");
    let retry = parsed.retry.unwrap();
    assert_eq!(retry.http_codes, [429, 500, 501, 502, 503].into());
    assert!(retry.non_idempotent && parsed.non_idempotent);
}
