//! The policy CRDs (`deploy/crds/`): their names, versions and columns; that their schemas are
//! structural; that they accept the policies sigil's tests and Istio's documentation use and
//! refuse malformed ones (checked with a JSON-schema validator, as the API server would check
//! the OpenAPI schema); and that they agree with the Rust model in `policy/src/model.rs`, field
//! for field and value for value.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use sigil_policy::model::{self, Kind, Object};
use sigil_test_apiserver::parse_manifest;

const AP_CRD: &str = include_str!("../../deploy/crds/authorizationpolicies.sigil.dev.yaml");
const PA_CRD: &str = include_str!("../../deploy/crds/peerauthentications.sigil.dev.yaml");
const BACKEND_POLICY_CRD: &str = include_str!("../../deploy/crds/backendpolicies.sigil.dev.yaml");
const RATE_LIMIT_POLICY_CRD: &str =
    include_str!("../../deploy/crds/ratelimitpolicies.sigil.dev.yaml");
const KUSTOMIZATION: &str = include_str!("../../deploy/crds/kustomization.yaml");
const MODEL: &str = include_str!("../../policy/src/model.rs");
/// Istio's short names for its own AuthorizationPolicy and PeerAuthentication: ours must differ
/// so that both can be installed.
const ISTIO_SHORT_NAMES: [&str; 2] = ["ap", "pa"];

fn only(text: &str) -> Value {
    let mut objects = parse_manifest(text).unwrap();
    assert_eq!(objects.len(), 1);
    objects.remove(0)
}

fn crd(kind: Kind) -> Value {
    only(match kind {
        Kind::AuthorizationPolicy => AP_CRD,
        Kind::PeerAuthentication => PA_CRD,
    })
}

fn schema(kind: Kind) -> Value {
    crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The API server's check of an object against the schema, short of pruning (see
/// [`unknown_fields`]): OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions. A draft 4
/// validator ignores the `x-kubernetes-*` keywords; of ours, only the conditions' list-map
/// (one condition per type) adds a check, which these tests do not need.
fn schema_errors(kind: Kind, object: &Value) -> Vec<String> {
    let validator = jsonschema::draft4::options()
        .should_validate_formats(true)
        .build(&schema(kind))
        .unwrap();
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The fields of `object` that the schema does not declare: what the API server prunes (with a
/// warning) or, with strict field validation (kubectl's default), refuses.
fn unknown_fields(schema: &Value, object: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match object {
        Value::Object(map) => {
            for (name, value) in map {
                let field = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                match (
                    schema["properties"].get(name),
                    schema.get("additionalProperties"),
                ) {
                    (Some(property), _) | (None, Some(property)) => {
                        unknown_fields(property, value, &field, out)
                    }
                    (None, None) if path == "metadata" => {}
                    (None, None) => out.push(field),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// What sigil makes of an object the API server stored: its validation problems, if any.
fn sigil_problems(kind: Kind, object: &Value) -> Option<String> {
    let decoded = Object::decode(kind, object.clone());
    let checked = decoded.and_then(|object| match object {
        Object::AuthorizationPolicy(p) => sigil_policy::validate::authorization_policy(&p)
            .map(drop)
            .map_err(|e| e.to_string()),
        Object::PeerAuthentication(p) => sigil_policy::validate::peer_authentication(&p)
            .map(drop)
            .map_err(|e| e.to_string()),
    });
    checked.err()
}

fn kind_of(object: &Value) -> Kind {
    Kind::from_name(object["kind"].as_str().unwrap()).unwrap()
}

/// Where `a` and `b` first differ, as a JSON pointer; numbers compare by value (the typed
/// schema's `minimum` is a float, written back as `0.0`).
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .find_map(|key| match (a.get(key), b.get(key)) {
                    (Some(a), Some(b)) => first_difference(a, b, &format!("{path}/{key}")),
                    _ => Some(format!("{path}/{key}")),
                })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, &format!("{path}/{i}"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        _ => Some(path.to_owned()),
    }
}

#[test]
fn names_versions_scope_subresources_and_columns() {
    let kustomization = only(KUSTOMIZATION);
    assert_eq!(
        kustomization["resources"],
        json!([
            "authorizationpolicies.sigil.dev.yaml",
            "peerauthentications.sigil.dev.yaml",
            "backendpolicies.sigil.dev.yaml",
            "ratelimitpolicies.sigil.dev.yaml"
        ])
    );
    let mut short_names = BTreeSet::new();
    for (kind, first_column) in [
        (Kind::AuthorizationPolicy, ("Action", ".spec.action")),
        (Kind::PeerAuthentication, ("Mode", ".spec.mtls.mode")),
    ] {
        let crd = crd(kind);
        // Every field is one the API knows: the typed CRD serializes back to the same document.
        let typed: CustomResourceDefinition = serde_json::from_value(crd.clone()).unwrap();
        let round_trip = serde_json::to_value(&typed).unwrap();
        assert_eq!(first_difference(&crd, &round_trip, ""), None, "{kind}");

        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(
            crd["metadata"]["name"],
            format!("{}.{}", kind.plural(), model::GROUP)
        );
        let spec = &crd["spec"];
        assert_eq!(spec["group"], model::GROUP);
        assert_eq!(spec["scope"], "Namespaced");
        let names = &spec["names"];
        assert_eq!(names["kind"], kind.name());
        assert_eq!(names["listKind"], format!("{}List", kind.name()));
        assert_eq!(names["plural"], kind.plural());
        assert_eq!(names["singular"], kind.name().to_lowercase());
        assert_eq!(names["categories"], json!(["sigil"]));
        for short in names["shortNames"].as_array().unwrap() {
            let short = short.as_str().unwrap();
            assert!(!ISTIO_SHORT_NAMES.contains(&short), "{short} is Istio's");
            assert!(short_names.insert(short.to_owned()), "{short} twice");
        }

        let versions = spec["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1);
        let version = &versions[0];
        assert_eq!(version["name"], model::VERSION);
        assert_eq!(
            (&version["served"], &version["storage"]),
            (&json!(true), &json!(true))
        );
        assert_eq!(version["subresources"], json!({ "status": {} }));
        let columns: Vec<(&str, &str, &str)> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let field = |name: &str| c[name].as_str().unwrap();
                (field("name"), field("type"), field("jsonPath"))
            })
            .collect();
        assert_eq!(
            columns,
            [
                (first_column.0, "string", first_column.1),
                (
                    "Valid",
                    "string",
                    r#".status.conditions[?(@.type=="Valid")].status"#
                ),
                (
                    "Warnings",
                    "string",
                    r#".status.conditions[?(@.type=="Warnings")].status"#
                ),
                ("Age", "date", ".metadata.creationTimestamp"),
            ]
        );
    }
    // One status schema, the standard condition list, in both.
    let status = |kind| schema(kind)["properties"]["status"].clone();
    let ap_status = status(Kind::AuthorizationPolicy);
    let mut pa_status = status(Kind::PeerAuthentication);
    pa_status["properties"]["conditions"]["description"] =
        ap_status["properties"]["conditions"]["description"].clone();
    assert_eq!(ap_status, pa_status);
    let conditions = &ap_status["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    assert_eq!(
        conditions["items"]["required"],
        json!(["type", "status", "reason", "message", "lastTransitionTime"])
    );
}

/// Problems that would make the API server refuse a schema: not structural (every node typed,
/// `properties` and `additionalProperties` not together, no `additionalProperties: false`,
/// arrays with `items`), metadata constrained beyond `type: object`, references, or list-map
/// keys that are not required.
fn structural_problems(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(node) = schema.as_object() else {
        out.push(format!("{path}: not a schema"));
        return;
    };
    let typed = node.get("type").and_then(Value::as_str);
    let untyped_ok = schema["x-kubernetes-int-or-string"] == true
        || schema["x-kubernetes-preserve-unknown-fields"] == true;
    if typed.is_none() && !untyped_ok {
        out.push(format!("{path}: no type"));
    }
    for banned in ["$ref", "definitions", "dependencies", "patternProperties"] {
        if node.contains_key(banned) {
            out.push(format!("{path}: {banned}"));
        }
    }
    if node.contains_key("properties") && node.contains_key("additionalProperties") {
        out.push(format!("{path}: properties and additionalProperties"));
    }
    if node.get("additionalProperties") == Some(&json!(false)) {
        out.push(format!("{path}: additionalProperties: false"));
    }
    if typed == Some("array") && !node.contains_key("items") {
        out.push(format!("{path}: array without items"));
    }
    if let Some(keys) = node
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
    {
        for key in keys {
            if !schema["items"]["required"]
                .as_array()
                .is_some_and(|r| r.contains(key))
            {
                out.push(format!("{path}: list-map key {key} not required"));
            }
        }
    }
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let path = format!("{path}.{name}");
            if path == ".metadata" && property != &json!({ "type": "object" }) {
                out.push(format!("{path}: only `type: object` is allowed"));
            }
            structural_problems(property, &path, out);
        }
    }
    for child in ["items", "additionalProperties"] {
        if let Some(sub) = node.get(child).filter(|s| s.is_object()) {
            structural_problems(sub, &format!("{path}.{child}"), out);
        }
    }
}

#[test]
fn schemas_are_structural() {
    for kind in Kind::ALL {
        let mut problems = Vec::new();
        structural_problems(&schema(kind), "", &mut problems);
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
    }
    // The traffic-policy kinds (issue 15) too.
    for (name, text) in [
        ("BackendPolicy", BACKEND_POLICY_CRD),
        ("RateLimitPolicy", RATE_LIMIT_POLICY_CRD),
    ] {
        let crd = only(text);
        let mut problems = Vec::new();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        structural_problems(schema, "", &mut problems);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
    }
}

/// Every policy sigil's own tests apply (the shared fixtures) and the examples below.
fn valid_policies() -> String {
    [
        include_str!("../fixtures/deny-all.yaml"),
        include_str!("../fixtures/allow-web.yaml"),
        include_str!("../fixtures/inspect-policies.yaml"),
        OWN_EXAMPLES,
    ]
    .join("---\n")
}

/// Policies from policy/src/file.rs's tests and from Istio's documentation with the apiVersion
/// changed; [`valid_policies`] adds the fixtures the other tests use.
const OWN_EXAMPLES: &str = r#"
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: sigil-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: web-ports, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    9090: {mode: DISABLE}
    "9091": {mode: PERMISSIVE}
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector:
    matchLabels: {app: httpbin, version: v1}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["dev"]}
    to:
    - operation: {methods: ["GET"]}
    when:
    - key: request.headers[version]
      values: ["v1", "v2"]
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["foo"]}}]
    to: [{operation: {notPaths: ["/healthz"], notPorts: ["15021"], hosts: ["httpbin.foo:*"], notMethods: ["HEAD"], notHosts: ["*.internal"]}}]
    when:
    - key: source.ip
      notValues: ["10.1.2.3/32"]
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules:
  - {}
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: ALLOW
  rules:
  - from:
    - source: {ipBlocks: ["10.0.0.0/8", "fd00::/8"], notIpBlocks: ["10.9.0.0/16"]}
    - source: {serviceAccounts: ["foo/sleep"], notServiceAccounts: ["foo/other"]}
    - source: {notPrincipals: ["cluster.local/ns/foo/sa/blocked"], principals: ["*"]}
    to:
    - operation: {ports: ["9000", "9001"]}
    when:
    - key: destination.port
      values: ["9000"]
    - key: source.namespace
      values: ["foo"]
    - key: source.principal
      notValues: ["*/sa/blocked"]
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: sigil-system}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: UNSET}
  portLevelMtls:
    8080: {mode: DISABLE}
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: empty, namespace: foo}
"#;

/// Istio policies the API server stores (their fields are declared) and sigil refuses with a
/// status condition naming the field, rather than the field being pruned and the policy
/// silently meaning something else (a targetRef dropped would widen it to the namespace).
const REFUSED_BY_SIGIL: [(&str, &str); 4] = [
    (
        "kind: AuthorizationPolicy\nspec: {action: CUSTOM, provider: {name: my-ext-authz}, rules: [{}]}",
        "action: CUSTOM",
    ),
    (
        "kind: AuthorizationPolicy\nspec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}], rules: [{}]}",
        "targetRefs: not supported",
    ),
    (
        "kind: AuthorizationPolicy\nspec: {targetRef: {kind: Gateway, name: gw}, rules: [{}]}",
        "targetRef: not supported",
    ),
    (
        "kind: AuthorizationPolicy\nspec: {rules: [{from: [{source: {requestPrincipals: ['*'], notRemoteIpBlocks: [1.2.3.4]}}]}]}",
        "rules[0].from[0].source.requestPrincipals: not supported",
    ),
];

fn with_envelope(text: &str) -> Value {
    let mut object = only(text);
    object["apiVersion"] = json!(model::API_VERSION);
    object["metadata"] = json!({ "name": "p", "namespace": "demo" });
    object
}

#[test]
fn valid_policies_pass_the_schema_and_sigil() {
    let policies = parse_manifest(&valid_policies()).unwrap();
    assert_eq!(policies.len(), 15);
    for policy in &policies {
        let kind = kind_of(policy);
        let name = &policy["metadata"]["name"];
        assert_eq!(schema_errors(kind, policy), Vec::<String>::new(), "{name}");
        let mut unknown = Vec::new();
        unknown_fields(&schema(kind), policy, "", &mut unknown);
        assert_eq!(unknown, Vec::<String>::new(), "{name}");
        assert_eq!(sigil_problems(kind, policy), None, "{name}");
    }
    for (text, problem) in REFUSED_BY_SIGIL {
        let policy = with_envelope(text);
        let kind = kind_of(&policy);
        assert_eq!(schema_errors(kind, &policy), Vec::<String>::new(), "{text}");
        let mut unknown = Vec::new();
        unknown_fields(&schema(kind), &policy, "", &mut unknown);
        assert_eq!(unknown, Vec::<String>::new(), "{text}");
        let problems = sigil_problems(kind, &policy).unwrap_or_default();
        assert!(problems.contains(problem), "{text}: {problems}");
    }
}

#[test]
fn malformed_policies_are_refused_by_the_schema() {
    let refused = [
        (
            "kind: AuthorizationPolicy\nspec: {action: deny}",
            "/spec/action",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {action: PERMIT}",
            "/spec/action",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {selector: app=web}",
            "/spec/selector",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {selector: {matchLabels: {app: 1}}}",
            "/spec/selector/matchLabels/app",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {rules: {}}",
            "/spec/rules",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {rules: [{to: [{operation: {ports: [8080]}}]}]}",
            "/spec/rules/0/to/0/operation/ports/0",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {rules: [{to: [{operation: {ports: [{port: '8080'}]}}]}]}",
            "/spec/rules/0/to/0/operation/ports/0",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {rules: [{from: [{source: {principals: a}}]}]}",
            "/spec/rules/0/from/0/source/principals",
        ),
        (
            "kind: AuthorizationPolicy\nspec: {rules: [{when: [{values: [a]}]}]}",
            "/spec/rules/0/when/0",
        ),
        (
            "kind: PeerAuthentication\nspec: {mtls: {mode: strict}}",
            "/spec/mtls/mode",
        ),
        (
            "kind: PeerAuthentication\nspec: {mtls: STRICT}",
            "/spec/mtls",
        ),
        (
            "kind: PeerAuthentication\nspec: {portLevelMtls: {8080: {mode: OFF}}}",
            "/spec/portLevelMtls/8080/mode",
        ),
        (
            "kind: PeerAuthentication\nspec: {portLevelMtls: {8080: STRICT}}",
            "/spec/portLevelMtls/8080",
        ),
        (
            "kind: PeerAuthentication\nstatus: {conditions: [{type: Valid, status: Maybe, reason: Valid, message: '', lastTransitionTime: '2026-01-01T00:00:00Z'}]}",
            "/status/conditions/0/status",
        ),
        (
            "kind: PeerAuthentication\nstatus: {conditions: [{type: Valid, status: 'True', reason: Valid, message: '', lastTransitionTime: yesterday}]}",
            "/status/conditions/0/lastTransitionTime",
        ),
        (
            "kind: PeerAuthentication\nstatus: {conditions: [{type: Valid, status: 'True', reason: not valid, message: '', lastTransitionTime: '2026-01-01T00:00:00Z'}]}",
            "/status/conditions/0/reason",
        ),
    ];
    for (text, path) in refused {
        let object = with_envelope(text);
        let errors = schema_errors(kind_of(&object), &object);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{path}: "))),
            "{text}: {errors:?}"
        );
    }
}

#[test]
fn misspelt_fields_are_unknown_to_the_schema() {
    // The schema is structural without additionalProperties: false (not allowed there), so a
    // misspelt field does not fail validation: the API server refuses it under strict field
    // validation (kubectl's default) and otherwise drops it with a warning.
    let typo = with_envelope(
        "kind: AuthorizationPolicy\nspec: {rules: [{from: [{source: {principal: [cluster.local/ns/a/sa/b]}}]}], acton: DENY}",
    );
    let mut unknown = Vec::new();
    unknown_fields(&schema(Kind::AuthorizationPolicy), &typo, "", &mut unknown);
    unknown.sort();
    assert_eq!(
        unknown,
        ["spec.acton", "spec.rules[0].from[0].source.principal"]
    );
    // If one gets through all the same (an outdated CRD), sigil refuses the object, naming it.
    let problems = sigil_problems(Kind::AuthorizationPolicy, &typo).unwrap();
    assert!(
        problems.contains("unknown field `acton`")
            || problems.contains("unknown field `principal`"),
        "{problems}"
    );
}

/// The model's structs, from `policy/src/model.rs`'s text: name → (field name as serialized,
/// whether it has `#[serde(default)]`). Every struct there renames its fields camelCase (checked).
fn model_structs() -> BTreeMap<String, Vec<(String, bool)>> {
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, bool)>)> = None;
    let mut attributes = String::new();
    let mut defaulted = false;
    for line in MODEL.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let Some(name) = rest.strip_suffix(" {") else {
                continue; // a tuple struct (PortKey)
            };
            assert!(
                attributes.contains("rename_all = \"camelCase\""),
                "{name} is not camelCase"
            );
            current = Some((name.to_owned(), Vec::new()));
        } else if line == "}" {
            if let Some((name, fields)) = current.take() {
                structs.insert(name, fields);
            }
        } else if line.starts_with("#[") {
            attributes.push_str(line);
            defaulted |= line == "#[serde(default)]";
            continue;
        } else if let (Some((_, fields)), Some(field)) =
            (current.as_mut(), line.strip_prefix("pub "))
            && let Some((name, _)) = field.split_once(':')
        {
            fields.push((camel_case(name), defaulted));
        }
        if !line.starts_with("///") {
            attributes.clear();
            defaulted = false;
        }
    }
    structs
}

fn camel_case(snake: &str) -> String {
    let mut parts = snake.split('_');
    let mut out = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        let mut chars = part.chars();
        out.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        out.push_str(chars.as_str());
    }
    out
}

/// The `#[serde(rename = "...")]` values of a model enum.
fn model_enum(name: &str) -> BTreeSet<String> {
    let body = MODEL
        .split(&format!("pub enum {name} {{"))
        .nth(1)
        .and_then(|rest| rest.split("\n}").next())
        .unwrap_or_else(|| panic!("enum {name} not in model.rs"));
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("#[serde(rename = \""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect()
}

fn schema_enum(kind: Kind, pointer: &str) -> BTreeSet<String> {
    schema(kind)
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{kind}: no enum at {pointer}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// How the model and the schemas are compared: each struct of `policy/src/model.rs` (read from
/// its source text, as `pub field:` lines) is mapped to where it appears in the schemas, and
/// its fields must be exactly the `properties` there, those without `#[serde(default)]`
/// exactly the `required` ones (the envelope's excepted: the API server guarantees apiVersion,
/// kind and metadata). Each enum's serialized names must be exactly the schema's `enum`. A struct
/// added to the model without a place here fails the test.
#[test]
fn the_schemas_and_the_rust_model_agree() {
    use Kind::{AuthorizationPolicy as AP, PeerAuthentication as PA};
    const SPEC: &str = "/properties/spec";
    const RULE: &str = "/properties/spec/properties/rules/items";
    const FROM: &str = "/properties/spec/properties/rules/items/properties/from/items";
    const TO: &str = "/properties/spec/properties/rules/items/properties/to/items";
    let places: &[(&str, &[(Kind, String)])] = &[
        ("AuthorizationPolicy", &[(AP, String::new())]),
        ("PeerAuthentication", &[(PA, String::new())]),
        ("AuthorizationPolicySpec", &[(AP, SPEC.into())]),
        ("PeerAuthenticationSpec", &[(PA, SPEC.into())]),
        (
            "WorkloadSelector",
            &[
                (AP, format!("{SPEC}/properties/selector")),
                (PA, format!("{SPEC}/properties/selector")),
            ],
        ),
        ("Rule", &[(AP, RULE.into())]),
        ("From", &[(AP, FROM.into())]),
        ("Source", &[(AP, format!("{FROM}/properties/source"))]),
        ("To", &[(AP, TO.into())]),
        ("Operation", &[(AP, format!("{TO}/properties/operation"))]),
        (
            "Condition",
            &[(AP, format!("{RULE}/properties/when/items"))],
        ),
        (
            "Mtls",
            &[
                (PA, format!("{SPEC}/properties/mtls")),
                (
                    PA,
                    format!("{SPEC}/properties/portLevelMtls/additionalProperties"),
                ),
            ],
        ),
    ];
    let structs = model_structs();
    let mapped: BTreeSet<&str> = places.iter().map(|(name, _)| *name).collect();
    let unmapped: Vec<&String> = structs
        .keys()
        .filter(|name| *name != "ObjectMeta" && !mapped.contains(name.as_str()))
        .collect();
    assert!(
        unmapped.is_empty(),
        "model structs with no place in the schemas: {unmapped:?}"
    );
    for (name, locations) in places {
        let fields = &structs[*name];
        let model_fields: BTreeSet<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
        let model_required: BTreeSet<&str> = fields
            .iter()
            .filter(|(_, defaulted)| !defaulted)
            .map(|(f, _)| f.as_str())
            .collect();
        for (kind, pointer) in *locations {
            let schema = schema(*kind);
            let node = schema
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{kind}: nothing at {pointer}"));
            let properties: BTreeSet<&str> = node["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{kind} {pointer}: no properties"))
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(model_fields, properties, "{name} at {kind} {pointer:?}");
            if !pointer.is_empty() {
                let required: BTreeSet<&str> = node["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                assert_eq!(model_required, required, "{name} at {kind} {pointer:?}");
            }
        }
    }
    assert_eq!(
        model_enum("Action"),
        schema_enum(AP, &format!("{SPEC}/properties/action/enum"))
    );
    for pointer in [
        "/properties/mtls/properties/mode/enum",
        "/properties/portLevelMtls/additionalProperties/properties/mode/enum",
    ] {
        assert_eq!(
            model_enum("MtlsModeSpec"),
            schema_enum(PA, &format!("{SPEC}{pointer}"))
        );
    }
}
