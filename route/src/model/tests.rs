use std::time::Duration;

use super::*;

/// Every document of a multi-document YAML text, read as the policy file reads it.
pub(crate) fn objects(yaml: &str) -> Vec<RouteObject> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value = Value::deserialize(doc).expect("YAML");
            RouteObject::from_json(value)
                .expect("object reads")
                .expect("one of the route kinds")
        })
        .collect()
}

fn one(yaml: &str) -> RouteObject {
    objects(yaml).pop().expect("one document")
}

fn error(yaml: &str) -> String {
    let value: Value = serde_yaml::from_str(yaml).expect("YAML");
    RouteObject::from_json(value)
        .expect_err("refused")
        .to_string()
}

// Shape of upstream conformance/tests/mesh/httproute-redirect-path.yaml.
const REDIRECT_PATH: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-redirect-path
  namespace: gateway-conformance-mesh
  creationTimestamp: "2026-12-01T10:00:00Z"
  generation: 3
  resourceVersion: "123"
  uid: 0b8c6f0e-0000-4000-8000-000000000000
  annotations:
    timeout.sigil.dev/idle: 30s
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 80
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /original-prefix
    filters:
    - type: RequestRedirect
      requestRedirect:
        path:
          type: ReplacePrefixMatch
          replacePrefixMatch: /replacement-prefix
  - matches:
    - path:
        type: PathPrefix
        value: /full-path-and-status
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: example.org
        path:
          type: ReplaceFullPath
          replaceFullPath: /replacement-full
        statusCode: 301
status:
  parents: []
"#;

#[test]
fn http_route_with_metadata_and_redirects() {
    let RouteObject::HttpRoute(route) = one(REDIRECT_PATH) else {
        panic!("not an HTTPRoute");
    };
    assert_eq!(
        route.meta.key(),
        "gateway-conformance-mesh/mesh-redirect-path"
    );
    assert_eq!(route.meta.generation, Some(3));
    assert_eq!(
        route.meta.creation_timestamp.map(|t| t.as_second()),
        Some(1_796_119_200)
    );
    assert_eq!(route.meta.annotations["timeout.sigil.dev/idle"], "30s");
    let parent = &route.spec.parent_refs[0];
    assert!(parent.is_service());
    assert_eq!((parent.name.as_str(), parent.port), ("echo", Some(80)));
    let rule = &route.spec.rules[0];
    assert_eq!(rule.matches[0].path.type_, "PathPrefix");
    assert_eq!(rule.matches[0].path.value, "/original-prefix");
    let redirect = rule.filters[0].request_redirect.as_ref().unwrap();
    assert_eq!(redirect.status_code, 302, "the CRD's default");
    let path = redirect.path.as_ref().unwrap();
    assert_eq!(path.type_, "ReplacePrefixMatch");
    assert_eq!(
        path.replace_prefix_match.as_deref(),
        Some("/replacement-prefix")
    );
    let redirect = route.spec.rules[1].filters[0]
        .request_redirect
        .as_ref()
        .unwrap();
    assert_eq!(redirect.status_code, 301);
    assert_eq!(redirect.hostname.as_deref(), Some("example.org"));
}

#[test]
fn crd_defaults_are_applied() {
    let RouteObject::HttpRoute(route) = one(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs:
  - name: some-gateway
  rules:
  - matches:
    - headers:
      - name: x-canary
        value: "1"
      queryParams:
      - name: v
        value: "2"
        type: RegularExpression
      method: GET
    backendRefs:
    - name: echo-v1
      port: 8080
    - name: echo-v2
      namespace: other
      port: 8080
      weight: 0
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          remove: [server]
    timeouts:
      request: 10s
      backendRequest: 2s
    retry:
      codes: [503, 502]
      attempts: 3
      backoff: 100ms
"#)
    else {
        panic!("not an HTTPRoute");
    };
    let parent = &route.spec.parent_refs[0];
    assert_eq!(
        (parent.group.as_str(), parent.kind.as_str()),
        (GATEWAY_GROUP, "Gateway")
    );
    assert!(!parent.is_service());
    let rule = &route.spec.rules[0];
    let m = &rule.matches[0];
    assert_eq!(m.path, HttpPathMatch::default());
    assert_eq!(
        (m.path.type_.as_str(), m.path.value.as_str()),
        ("PathPrefix", "/")
    );
    assert_eq!(m.headers[0].type_, "Exact");
    assert_eq!(m.query_params[0].type_, "RegularExpression");
    assert_eq!(m.method.as_deref(), Some("GET"));
    let b = &rule.backend_refs[0];
    assert_eq!(
        (b.target.group.as_str(), b.target.kind.as_str(), b.weight),
        ("", "Service", 1)
    );
    assert_eq!(b.target.port, Some(8080));
    let b = &rule.backend_refs[1];
    assert_eq!(
        (b.target.namespace.as_deref(), b.weight),
        (Some("other"), 0)
    );
    assert_eq!(b.filters[0].type_, "ResponseHeaderModifier");
    let timeouts = rule.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request.as_deref(), Some("10s"));
    assert_eq!(timeouts.backend_request.as_deref(), Some("2s"));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.as_slice(), retry.attempts),
        (&[503, 502][..], Some(3))
    );
    assert_eq!(retry.backoff.as_deref(), Some("100ms"));
}

// Shape of upstream conformance/tests/mesh/grpcroute-request-mirror.yaml, plus method matches.
#[test]
fn grpc_route_with_mirror_and_methods() {
    let RouteObject::GrpcRoute(route) = one(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: mesh-grpc-request-mirror
  namespace: gateway-conformance-mesh
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 7070
  rules:
  - matches:
    - headers:
      - name: x-mirror-only
        value: "true"
    - method:
        service: grpc.health.v1.Health
    - method:
        type: RegularExpression
        method: "Get.*"
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef:
          name: echo-v2
          port: 7070
        fraction:
          numerator: 1
    backendRefs:
    - name: echo-v1
      port: 7070
"#)
    else {
        panic!("not a GRPCRoute");
    };
    let rule = &route.spec.rules[0];
    assert_eq!(rule.matches[0].headers[0].name, "x-mirror-only");
    assert_eq!(rule.matches[0].method, None);
    let method = rule.matches[1].method.as_ref().unwrap();
    assert_eq!(method.type_, "Exact");
    assert_eq!(method.service.as_deref(), Some("grpc.health.v1.Health"));
    assert_eq!(method.method, None);
    assert_eq!(
        rule.matches[2].method.as_ref().unwrap().type_,
        "RegularExpression"
    );
    let mirror = rule.filters[0].request_mirror.as_ref().unwrap();
    assert_eq!(mirror.backend_ref.name, "echo-v2");
    assert_eq!(
        mirror.fraction,
        Some(Fraction {
            numerator: 1,
            denominator: 100
        })
    );
    assert_eq!(rule.backend_refs[0].target.port, Some(7070));
}

#[test]
fn reference_grant_permits_only_what_it_names() {
    let RouteObject::ReferenceGrant(grant) = one(r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-shop, namespace: backends}
spec:
  from:
  - group: gateway.networking.k8s.io
    kind: HTTPRoute
    namespace: shop
  to:
  - group: ""
    kind: Service
    name: payments
"#)
    else {
        panic!("not a ReferenceGrant");
    };
    assert!(grant.permits_service("HTTPRoute", "shop", "payments"));
    assert!(!grant.permits_service("GRPCRoute", "shop", "payments"));
    assert!(!grant.permits_service("HTTPRoute", "web", "payments"));
    assert!(!grant.permits_service("HTTPRoute", "shop", "orders"));
}

// design-15.md §3.1 and §3.2, as written there.
#[test]
fn sigil_policies_as_the_design_shows_them() {
    let all = objects(
        r#"
apiVersion: sigil.dev/v1alpha1
kind: BackendPolicy
metadata:
  name: reviews
  namespace: bookinfo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: reviews
  outlierDetection:
    consecutive5xxErrors: 5
    consecutiveGatewayErrors: 0
    interval: 10s
    baseEjectionTime: 30s
    maxEjectionTime: 300s
    maxEjectionPercent: 10
    minHealthPercent: 0
    failurePercentage:
      threshold: 50
      requestVolume: 20
      minimumHosts: 1
  retryBudget:
    percent: 20
    interval: 10s
    minRetryRate:
      count: 3
      interval: 1s
---
apiVersion: sigil.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: ratings
  namespace: bookinfo
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: ratings
    sectionName: http
  total:
    requests: 100
    period: 1s
    burst: 100
  identity:
    requests: 20
  overrides:
  - requests: 50
    clients:
    - serviceAccount: bookinfo/productpage
    - spiffeId: spiffe://cluster.local/ns/batch/sa/reporter
"#,
    );
    let [
        RouteObject::BackendPolicy(backend),
        RouteObject::RateLimitPolicy(limit),
    ] = &all[..]
    else {
        panic!("{all:?}");
    };
    let spec = &backend.spec;
    assert_eq!(spec.target_refs[0].kind, "Service");
    let outlier = spec.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx_errors, Some(5));
    assert_eq!(outlier.max_ejection_time.as_deref(), Some("300s"));
    assert_eq!(
        outlier.failure_percentage.as_ref().unwrap().minimum_hosts,
        Some(1)
    );
    let budget = spec.retry_budget.as_ref().unwrap();
    assert_eq!(budget.min_retry_rate.as_ref().unwrap().count, Some(3));
    let spec = &limit.spec;
    assert_eq!(spec.target_refs[0].section_name.as_deref(), Some("http"));
    assert_eq!(spec.total.as_ref().unwrap().burst, Some(100));
    assert_eq!(spec.identity.as_ref().unwrap().period, None);
    assert_eq!(spec.overrides[0].limit.requests, 50);
    assert_eq!(
        spec.overrides[0].clients[0].service_account.as_deref(),
        Some("bookinfo/productpage")
    );
    let collected: RouteObjects = all.into_iter().collect();
    assert_eq!(collected.backend_policies.len(), 1);
    assert_eq!(collected.rate_limit_policies.len(), 1);
}

#[test]
fn other_kinds_and_versions_are_not_ours() {
    for (api_version, kind) in [
        ("v1", "Service"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1alpha2", "GRPCRoute"),
        ("sigil.dev/v1alpha1", "AuthorizationPolicy"),
        ("example.com/v1", "HTTPRoute"),
    ] {
        let value = serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": "x", "namespace": "y"},
        });
        assert!(
            RouteObject::from_json(value).unwrap().is_none(),
            "{api_version} {kind}"
        );
    }
    assert!(
        RouteObject::from_json(serde_json::json!({"kind": "HTTPRoute"}))
            .unwrap()
            .is_none()
    );
}

#[test]
fn errors_name_the_object_and_the_field() {
    let message = error(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  rules:
  - backendRefs:
    - name: echo
      port: 70000
"#,
    );
    assert!(
        message.starts_with("HTTPRoute shop/r: spec.rules[0].backendRefs[0]"),
        "{message}"
    );
    let message = error(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  rules:
  - matches:
    - method: {service: 7}
"#,
    );
    assert!(
        message.starts_with("GRPCRoute shop/g: spec.rules[0].matches[0].method.service: "),
        "{message}"
    );
    let message = error(
        r#"
apiVersion: sigil.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: rl, namespace: shop}
spec:
  total: {period: 1s}
"#,
    );
    assert!(
        message.starts_with("RateLimitPolicy shop/rl: spec.total: "),
        "{message}"
    );
    assert!(message.contains("requests"), "{message}");
    let message =
        error("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n");
    assert_eq!(message, "object without metadata.namespace");
    let message = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: r, namespace: n, creationTimestamp: yesterday}\n",
    );
    assert!(
        message.starts_with("HTTPRoute n/r: metadata.creationTimestamp: "),
        "{message}"
    );
}

#[test]
fn an_object_without_spec_has_an_empty_one() {
    let RouteObject::HttpRoute(route) = one(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: n}\n",
    ) else {
        panic!("not an HTTPRoute");
    };
    assert_eq!(route.spec, HttpRouteSpec::default());
}

#[test]
fn age_order_is_oldest_then_namespace_and_name() {
    let meta = |ns: &str, name: &str, t: Option<&str>| Meta {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        creation_timestamp: t.map(|t| t.parse().unwrap()),
        generation: None,
        annotations: BTreeMap::new(),
    };
    let old = meta("z", "z", Some("2026-01-01T00:00:00Z"));
    let new = meta("a", "a", Some("2026-06-01T00:00:00Z"));
    let file_a = meta("a", "b", None);
    let file_b = meta("b", "a", None);
    let mut all = vec![file_b.clone(), new.clone(), file_a.clone(), old.clone()];
    all.sort_by(Meta::age_order);
    assert_eq!(all, vec![old, new, file_a, file_b]);
}

#[test]
fn gep_2257_durations() {
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(
        parse_duration("1h1m1s1ms"),
        Ok(Duration::from_millis(3_661_001))
    );
    assert_eq!(parse_duration("99999s"), Ok(Duration::from_secs(99_999)));
    for bad in [
        "",
        "10",
        "1.5s",
        "-1s",
        "100000s",
        "1d",
        "1h1m1s1ms1h",
        "s",
        "10 s",
        "1S",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}
