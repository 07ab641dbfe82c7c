use super::*;

fn authz(spec: &str) -> Result<AuthzPolicy, ValidationError> {
    let text = format!(
        "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-web, namespace: demo}}\nspec: {spec}\n"
    );
    let object: model::AuthorizationPolicy =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{spec}: {e}"));
    authorization_policy(&object)
}

fn peer(spec: &str) -> Result<PeerAuthnPolicy, ValidationError> {
    let text = format!(
        "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: web, namespace: demo}}\nspec: {spec}\n"
    );
    let object: model::PeerAuthentication =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{spec}: {e}"));
    peer_authentication(&object)
}

fn errors<T: fmt::Debug>(result: Result<T, ValidationError>) -> Vec<String> {
    match result {
        Ok(v) => panic!("expected errors, got {v:?}"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

fn source(source: &str) -> String {
    format!("{{rules: [{{from: [{{source: {source}}}]}}]}}")
}

fn operation(operation: &str) -> String {
    format!("{{rules: [{{to: [{{operation: {operation}}}]}}]}}")
}

fn when(condition: &str) -> String {
    format!("{{rules: [{{when: [{condition}]}}]}}")
}

/// (spec, the one problem it must produce, without the `demo/allow-web: ` prefix).
fn authz_errors() -> Vec<(String, &'static str)> {
    vec![
        (
            source("{principals: [cluster.local/ns/a/sa/b], serviceAccounts: [a/b]}"),
            "rules[0].from[0].source: use either principals or serviceAccounts, not both",
        ),
        (
            source("{notNamespaces: [a], notServiceAccounts: [a/b]}"),
            "rules[0].from[0].source: use either namespaces or serviceAccounts, not both",
        ),
        (
            operation("{ports: [\"80\", \"443\", \"70000\"]}"),
            "rules[0].to[0].operation.ports[2]: \"70000\" is not a port (1-65535)",
        ),
        (
            operation("{notPorts: [http]}"),
            "rules[0].to[0].operation.notPorts[0]: \"http\" is not a port (1-65535)",
        ),
        (
            operation("{ports: [\"*\"]}"),
            "rules[0].to[0].operation.ports[0]: \"*\" is not a port (1-65535)",
        ),
        (
            operation("{methods: [get]}"),
            "rules[0].to[0].operation.methods[0]: \"get\" must be upper case (GET)",
        ),
        (
            source("{ipBlocks: [10.0.0.0/33]}"),
            "rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block (e.g. 10.0.0.0/8)",
        ),
        (
            source("{notIpBlocks: [10.0.0.300]}"),
            "rules[0].from[0].source.notIpBlocks[0]: \"10.0.0.300\" is not an IP address or CIDR block (e.g. 10.0.0.0/8)",
        ),
        (
            source("{principals: [demo/web]}"),
            "rules[0].from[0].source.principals[0]: \"demo/web\" is not a principal: write <trust-domain>/ns/<namespace>/sa/<service-account> (e.g. cluster.local/ns/demo/sa/web), a spiffe:// ID, or a prefix*, *suffix or * pattern; for <namespace>/<service-account> use serviceAccounts",
        ),
        (
            source("{notPrincipals: [web]}"),
            "rules[0].from[0].source.notPrincipals[0]: \"web\" is not a principal: write <trust-domain>/ns/<namespace>/sa/<service-account> (e.g. cluster.local/ns/demo/sa/web), a spiffe:// ID, or a prefix*, *suffix or * pattern",
        ),
        (
            source("{principals: [\"spiffe://Cluster.local/ns/a/sa/b\"]}"),
            "rules[0].from[0].source.principals[0]: \"spiffe://Cluster.local/ns/a/sa/b\" is not a principal (trust domain must be lowercase (found 'C')): write <trust-domain>/ns/<namespace>/sa/<service-account> (e.g. cluster.local/ns/demo/sa/web), a spiffe:// ID, or a prefix*, *suffix or * pattern",
        ),
        (
            source("{principals: [\"cluster.local/*/sa/*\"]}"),
            "rules[0].from[0].source.principals[0]: \"cluster.local/*/sa/*\": `*` may appear once, at the start (suffix match) or the end (prefix match)",
        ),
        (
            source("{namespaces: [Demo]}"),
            "rules[0].from[0].source.namespaces[0]: \"Demo\" is not a namespace name (lower-case letters, digits and '-')",
        ),
        (
            source("{serviceAccounts: [web]}"),
            "rules[0].from[0].source.serviceAccounts[0]: \"web\" is not <namespace>/<service-account> (e.g. demo/web)",
        ),
        (
            source("{serviceAccounts: [\"demo/*\"]}"),
            "rules[0].from[0].source.serviceAccounts[0]: \"demo/*\": serviceAccounts match exactly; for patterns use principals or namespaces",
        ),
        (
            source("{namespaces: [\"\"]}"),
            "rules[0].from[0].source.namespaces[0]: empty value",
        ),
        (
            source("{requestPrincipals: [\"issuer/sub\"]}"),
            "rules[0].from[0].source.requestPrincipals: not supported by sigil (JWT request identities need RequestAuthentication, which sigil does not have); use principals for peer identities",
        ),
        (
            source("{remoteIpBlocks: [1.2.3.4]}"),
            "rules[0].from[0].source.remoteIpBlocks: not supported by sigil (it does not trust X-Forwarded-For); use ipBlocks",
        ),
        (
            source("{}"),
            "rules[0].from[0].source: must set at least one field (omit `from` to match any source)",
        ),
        (
            "{rules: [{from: []}]}".into(),
            "rules[0].from: must not be empty (omit it to match any source)",
        ),
        (
            "{rules: [{from: [{}]}]}".into(),
            "rules[0].from[0]: source is required",
        ),
        (
            "{rules: [{to: []}]}".into(),
            "rules[0].to: must not be empty (omit it to match any operation)",
        ),
        (
            "{rules: [{to: [{}]}]}".into(),
            "rules[0].to[0]: operation is required",
        ),
        (
            operation("{}"),
            "rules[0].to[0].operation: must set at least one field (omit `to` to match any operation)",
        ),
        (
            operation("{paths: [\"/api/{*}/x\"]}"),
            "rules[0].to[0].operation.paths[0]: \"/api/{*}/x\": path templates ({*}, {**}) are not supported by sigil; use prefix* or *suffix",
        ),
        (
            operation("{paths: [\"/a?b=1\"]}"),
            "rules[0].to[0].operation.paths[0]: \"/a?b=1\": paths are matched without the query string; drop the '?...'",
        ),
        (
            operation("{notPaths: [\"api/*\"]}"),
            "rules[0].to[0].operation.notPaths[0]: \"api/*\" must start with '/'",
        ),
        (
            operation("{hosts: [\"a*b\"]}"),
            "rules[0].to[0].operation.hosts[0]: \"a*b\": `*` may appear once, at the start (suffix match) or the end (prefix match)",
        ),
        (
            when("{key: \"request.auth.claims[iss]\", values: [x]}"),
            "rules[0].when[0].key: key \"request.auth.claims[iss]\" is not supported by sigil (supported: source.ip, source.namespace, source.principal, destination.port, request.headers[<name>])",
        ),
        (
            when("{key: source.user, values: [x]}"),
            "rules[0].when[0].key: unknown key \"source.user\" (supported: source.ip, source.namespace, source.principal, destination.port, request.headers[<name>])",
        ),
        (
            when("{key: \"\", values: [x]}"),
            "rules[0].when[0].key: key is required (one of source.ip, source.namespace, source.principal, destination.port, request.headers[<name>])",
        ),
        (
            when("{key: source.ip}"),
            "rules[0].when[0]: \"source.ip\": set values or notValues",
        ),
        (
            when("{key: \"request.headers[bad header]\", values: [x]}"),
            "rules[0].when[0].key: \"bad header\" is not an HTTP header name",
        ),
        (
            when("{key: destination.port, values: [\"0\"]}"),
            "rules[0].when[0].values[0]: \"0\" is not a port (1-65535)",
        ),
        (
            when("{key: source.ip, notValues: [nope]}"),
            "rules[0].when[0].notValues[0]: \"nope\" is not an IP address or CIDR block (e.g. 10.0.0.0/8)",
        ),
        (
            "{action: DENY}".into(),
            "rules: a DENY policy without rules never matches; add `rules: [{}]` to deny every request",
        ),
        (
            "{action: DENY, rules: []}".into(),
            "rules: a DENY policy without rules never matches; add `rules: [{}]` to deny every request",
        ),
        (
            "{action: CUSTOM, rules: [{}]}".into(),
            "action: CUSTOM (external authorization) is not supported by sigil; use ALLOW, DENY or AUDIT",
        ),
        (
            "{provider: {name: x}, rules: [{}]}".into(),
            "provider: not supported by sigil (it belongs to Istio's CUSTOM action)",
        ),
        (
            "{targetRefs: [{kind: Service, name: web}], rules: [{}]}".into(),
            "targetRefs: not supported by sigil; use selector.matchLabels",
        ),
        (
            "{selector: {matchLabels: {\"\": x}}, rules: [{}]}".into(),
            "selector.matchLabels: empty label key",
        ),
    ]
}

#[test]
fn authorization_policy_errors_name_the_policy_and_field() {
    let mut failures = Vec::new();
    for (spec, want) in authz_errors() {
        let want = format!("demo/allow-web: {want}");
        match authz(&spec) {
            Ok(_) => failures.push(format!("{spec}: accepted, want {want}")),
            Err(e) => {
                let got: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
                if got != [want.clone()] {
                    failures.push(format!("{spec}:\n  got  {got:?}\n  want {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_problem_is_reported_and_displayed_one_per_line() {
    let err =
        authz("{action: CUSTOM, rules: [{to: [{operation: {ports: [\"0\"], methods: [post]}}]}]}")
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "demo/allow-web: action: CUSTOM (external authorization) is not supported by sigil; use ALLOW, DENY or AUDIT\n\
         demo/allow-web: rules[0].to[0].operation.ports[0]: \"0\" is not a port (1-65535)\n\
         demo/allow-web: rules[0].to[0].operation.methods[0]: \"post\" must be upper case (POST)"
    );
}

#[test]
fn header_problems() {
    let object = model::AuthorizationPolicy {
        api_version: "security.istio.io/v1".into(),
        kind: "PeerAuthentication".into(),
        metadata: model::ObjectMeta::default(),
        spec: model::AuthorizationPolicySpec::default(),
        status: None,
    };
    assert_eq!(
        errors(authorization_policy(&object)),
        [
            "<no namespace>/<no name>: apiVersion: \"security.istio.io/v1\" is not sigil.dev/v1alpha1 (an Istio policy works once its apiVersion is changed)",
            "<no namespace>/<no name>: kind: \"PeerAuthentication\" is not AuthorizationPolicy",
            "<no namespace>/<no name>: metadata.name: required",
            "<no namespace>/<no name>: metadata.namespace: required (sigil-system for mesh-wide policies)",
        ]
    );
}

#[test]
fn accepted_forms() {
    for spec in [
        "{}",
        "{rules: [{}]}",
        "{action: AUDIT, rules: [{}]}",
        "{selector: {}, rules: [{}]}",
        &source(
            "{principals: [\"spiffe://example.org/vm/builder\", \"*\", \"cluster.local/ns/a/*\", \"*/sa/b\"]}",
        ),
        &source(
            "{namespaces: [\"a*\", \"*b\", prod], ipBlocks: [10.0.0.1, \"fd00::/8\", 10.1.2.3/8]}",
        ),
        &source("{serviceAccounts: [demo/web.v1], notServiceAccounts: [demo/db]}"),
        &operation(
            "{hosts: [\"*.example.com\", \"WEB:*\"], methods: [GET, \"*\"], paths: [\"/\", \"*.css\", \"/pkg.Svc/*\"]}",
        ),
        &when("{key: \"request.headers[x-b3-traceid]\", values: [\"*\"], notValues: [\"0*\"]}"),
    ] {
        if let Err(e) = authz(spec) {
            panic!("{spec} rejected: {e}");
        }
    }
}

fn warnings(spec: &str) -> Vec<String> {
    authz(spec)
        .unwrap_or_else(|e| panic!("{spec}: {e}"))
        .warnings()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn policies_say_whether_they_need_http() {
    assert!(!authz(&operation("{ports: [\"80\"]}")).unwrap().uses_http());
    assert!(authz(&operation("{notPaths: [/a]}")).unwrap().uses_http());
    assert!(
        authz(&when("{key: \"request.headers[x]\", values: [a]}"))
            .unwrap()
            .uses_http()
    );
    assert!(!authz("{rules: [{}]}").unwrap().uses_http());
}

#[test]
fn surprising_but_valid_policies_warn() {
    assert_eq!(
        warnings(&operation("{methods: [GET], paths: [/a]}")),
        [
            "rules[0]: uses HTTP fields (methods/paths); on non-HTTP connections they never match in ALLOW and always match in DENY: in this ALLOW policy the rule never matches them"
        ]
    );
    assert_eq!(
        warnings("{action: DENY, rules: [{when: [{key: \"request.headers[x]\", values: [a]}]}]}"),
        [
            "rules[0]: uses HTTP fields (headers); on non-HTTP connections they never match in ALLOW and always match in DENY: they are ignored there, so the rule matches every such connection its other fields match (state the ports to limit it)"
        ]
    );
    assert_eq!(
        warnings(&source("{notPrincipals: [cluster.local/ns/a/sa/b]}")),
        [
            "rules[0].from[0].source: not* identity fields also match plaintext peers (no identity); add principals: [\"*\"] to require one"
        ]
    );
    assert!(
        warnings(&source(
            "{principals: [\"*\"], notPrincipals: [cluster.local/ns/a/sa/b]}"
        ))
        .is_empty()
    );
    assert_eq!(
        warnings(&operation("{hosts: [web.demo, \"api:*\"]}"))[0],
        "rules[0].to[0].operation.hosts[0]: \"web.demo\" matches only a Host header without a port; add \"web.demo:*\" to match it with any port"
    );
    assert_eq!(
        warnings("{}"),
        [
            "rules: no rules: this ALLOW policy matches nothing, so it denies every request to the workloads it selects that no other ALLOW policy allows"
        ]
    );
    assert_eq!(
        warnings("{action: AUDIT}"),
        ["rules: no rules: this AUDIT policy matches nothing"]
    );
    assert_eq!(
        warnings("{selector: {matchLabels: {app: \"web*\"}}, rules: [{}]}"),
        [
            "selector.matchLabels.app: \"web*\" is compared literally; label selectors have no wildcards"
        ]
    );
    assert!(warnings(&source("{principals: [cluster.local/ns/a/sa/b]}")).is_empty());
}

#[test]
fn peer_authentication_errors_and_warnings() {
    assert_eq!(
        errors(peer(
            "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"
        )),
        [
            "demo/web: portLevelMtls: needs a selector: port-level mTLS applies only to selected workloads (as in Istio)"
        ]
    );
    assert_eq!(
        errors(peer(
            "{selector: {matchLabels: {}}, portLevelMtls: {8080: {mode: DISABLE}}}"
        )),
        [
            "demo/web: portLevelMtls: needs a selector: port-level mTLS applies only to selected workloads (as in Istio)"
        ]
    );
    assert_eq!(
        errors(peer(
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {}}"
        )),
        ["demo/web: portLevelMtls: must list at least one port"]
    );
    assert_eq!(
        errors(peer(
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {70000: {mode: DISABLE}, x: {}}}"
        )),
        [
            "demo/web: portLevelMtls.70000: \"70000\" is not a port (1-65535)",
            "demo/web: portLevelMtls.x: \"x\" is not a port (1-65535)",
        ]
    );
    let ok = peer("{selector: {matchLabels: {app: web}}, mtls: {}, portLevelMtls: {\"9090\": {mode: UNSET}, 80: {mode: STRICT}}}").unwrap();
    assert_eq!(ok.mode, None);
    assert_eq!(ok.ports, [(80, Some(MtlsMode::Strict)), (9090, None)]);

    let text = "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: w, namespace: sigil-system}\nspec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}\n";
    let object: model::PeerAuthentication = serde_yaml::from_str(text).unwrap();
    let root = peer_authentication(&object).unwrap();
    assert_eq!(
        root.warnings()[0].to_string(),
        "selector: a PeerAuthentication with a selector in the root namespace sigil-system is ignored (as in Istio); put it in the workloads' namespace"
    );
}

#[test]
fn a_policy_set_reports_every_invalid_object() {
    let good: model::AuthorizationPolicy = serde_yaml::from_str(
        "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec: {rules: [{}]}\n",
    )
    .unwrap();
    let mut bad = good.clone();
    bad.metadata.name = "b".into();
    bad.spec.action = Some(Action::Custom);
    let mut bad_peer: model::PeerAuthentication = serde_yaml::from_str(
        "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: c, namespace: demo}\nspec: {portLevelMtls: {80: {}}}\n",
    )
    .unwrap();
    bad_peer.metadata.namespace = Some("demo".into());
    let objects = [
        model::Object::AuthorizationPolicy(good.clone()),
        model::Object::AuthorizationPolicy(bad),
        model::Object::PeerAuthentication(bad_peer),
    ];
    let err = policy_set(&objects).unwrap_err();
    let policies: Vec<&str> = err.problems.iter().map(|p| p.policy.as_str()).collect();
    assert_eq!(policies, ["demo/b", "demo/c"]);
    let set = policy_set(&[model::Object::AuthorizationPolicy(good)]).unwrap();
    assert_eq!(set.authorization_policies().count(), 1);
}
