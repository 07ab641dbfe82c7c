//! The RBAC in deploy/ grants each part exactly what its code uses. The real `sigil ca serve`
//! (configured as the rendered Deployment configures it) and the real `sigil agent run`, each with
//! its own service account's token in its kubeconfig, run their real flows against the
//! Kubernetes API test double, which logs every request as the API server's authorizer would
//! see it (tests/kube-apiserver/src/request_log.rs): the CA creates its root Secret, publishes
//! the trust-bundle ConfigMaps, writes policy and route status, keeps the webhook's caBundle, reviews the
//! agent's token, and `sigil ca rotate-root` (run in a CA pod) updates the Secret; the agent
//! watches its node's pods, the mesh membership and the policies. Then, for each service
//! account, evaluated with Kubernetes' RBAC rules against the rendered ClusterRoles, Roles and
//! bindings: (1) every request is allowed; (2) every (group, resource, verb) granted was used,
//! every resourceName granted was asked for, and nothing granted more widely than the requests
//! needed (a rule without resourceNames whose requests all named one object, a ClusterRole whose
//! requests all stayed in one namespace). The plug-in CA overlay is checked the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use sigil_test_apiserver::{PodSpec, RequestRecord, ResourceAttributes, TestApiServer, TokenSpec};
use sigil_test_harness::manifests;
use sigil_test_harness::manifests::{find, kind, kustomize, name, namespace, of_kind, repo};
use sigil_test_harness::*;

/// The bearer tokens the two processes present (in their kubeconfigs); the double only logs
/// them. Named after the users their real tokens authenticate as.
const CA_USER: &str = "system:serviceaccount:sigil-system:sigil-ca";
const AGENT_USER: &str = "system:serviceaccount:sigil-system:sigil-agent";
/// How long the flows get to make every request the RBAC grants.
const COVERAGE_DEADLINE: Duration = Duration::from_secs(40);

/// One rule that applies to a service account, and where: `None` cluster-wide (a ClusterRole
/// bound by a ClusterRoleBinding), else only in that namespace (a RoleBinding).
#[derive(Clone, Debug)]
struct Grant {
    role: String,
    rule: Value,
    namespace: Option<String>,
}

/// The service account a workload's pods run as, `(namespace, name)`.
fn service_account(objects: &[Value], kind_: &str, name_: &str) -> (String, String) {
    let workload = find(objects, kind_, name_);
    let sa = workload["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    (namespace(workload).to_string(), sa.to_string())
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The rules that apply to the service account `(ns, sa)` through the bindings among `objects`.
fn grants(objects: &[Value], (ns, sa): (String, String)) -> Vec<Grant> {
    let is_subject = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == ns)
    };
    let mut grants = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| matches!(kind(o), "ClusterRoleBinding" | "RoleBinding"))
        .filter(|b| is_subject(b))
    {
        let role_ref = &binding["roleRef"];
        assert_eq!(role_ref["apiGroup"], "rbac.authorization.k8s.io");
        let role_kind = role_ref["kind"].as_str().unwrap();
        let role_name = role_ref["name"].as_str().unwrap();
        let scope = (kind(binding) == "RoleBinding").then(|| namespace(binding).to_string());
        let role = objects
            .iter()
            .find(|o| {
                kind(o) == role_kind
                    && name(o) == role_name
                    && (role_kind == "ClusterRole" || Some(namespace(o)) == scope.as_deref())
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} refers to a missing {role_kind} {role_name}",
                    name(binding)
                )
            });
        for rule in role["rules"].as_array().unwrap() {
            grants.push(Grant {
                role: format!("{role_kind} {role_name}"),
                rule: rule.clone(),
                namespace: scope.clone(),
            });
        }
    }
    grants
}

/// Whether `rule` covers the resource request, as Kubernetes' RBAC authorizer decides
/// (`RuleAllows`: verbs, API groups, resources with `*` and `*/subresource`, resourceNames).
fn rule_allows(rule: &Value, request: &ResourceAttributes) -> bool {
    let has =
        |field: &str, value: &str| strings(&rule[field]).iter().any(|v| v == "*" || v == value);
    let resource = request.resource_path();
    let resource_matches = strings(&rule["resources"]).iter().any(|r| {
        r == "*"
            || *r == resource
            || (!request.subresource.is_empty() && *r == format!("*/{}", request.subresource))
    });
    let names = strings(&rule["resourceNames"]);
    has("verbs", &request.verb)
        && has("apiGroups", &request.api_group)
        && resource_matches
        && (names.is_empty() || names.contains(&request.name))
}

fn grant_allows(grant: &Grant, request: &ResourceAttributes) -> bool {
    grant
        .namespace
        .as_ref()
        .is_none_or(|ns| *ns == request.namespace)
        && rule_allows(&grant.rule, request)
}

/// Non-resource requests every authenticated user may make (the default ClusterRoles
/// system:discovery and system:public-info-viewer).
fn default_non_resource_allowed(record: &RequestRecord) -> bool {
    let path = record.path.as_str();
    record.method == "GET"
        && (matches!(
            path,
            "/api"
                | "/apis"
                | "/version"
                | "/version/"
                | "/healthz"
                | "/livez"
                | "/readyz"
                | "/openapi"
        ) || ["/api/", "/apis/", "/openapi/"]
            .iter()
            .any(|prefix| path.starts_with(prefix)))
}

fn show(request: &ResourceAttributes) -> String {
    format!(
        "{} {}{}{}{}",
        request.verb,
        if request.api_group.is_empty() {
            String::new()
        } else {
            format!("{}/", request.api_group)
        },
        request.resource_path(),
        if request.namespace.is_empty() {
            String::new()
        } else {
            format!(" in {}", request.namespace)
        },
        if request.name.is_empty() {
            String::new()
        } else {
            format!(" named {}", request.name)
        },
    )
}

/// What is wrong with `grants` for the requests `records` (one service account's): requests they
/// do not allow, and grants wider than the requests.
fn rbac_problems(grants: &[Grant], records: &[RequestRecord]) -> (Vec<String>, Vec<String>) {
    let mut denied = BTreeSet::new();
    let mut checks: Vec<ResourceAttributes> = Vec::new();
    for record in records {
        if record.resource.is_none() {
            if !default_non_resource_allowed(record) {
                denied.insert(format!("{} {} (non-resource)", record.method, record.path));
            }
            continue;
        }
        for check in record.authorizations() {
            if !grants.iter().any(|g| grant_allows(g, &check)) {
                denied.insert(show(&check));
            }
            checks.push(check);
        }
    }
    let mut unused = Vec::new();
    for grant in grants {
        let rule = &grant.rule;
        let matched: Vec<&ResourceAttributes> =
            checks.iter().filter(|c| grant_allows(grant, c)).collect();
        for field in ["verbs", "apiGroups", "resources", "resourceNames"] {
            if strings(&rule[field]).iter().any(|v| v.contains('*')) {
                unused.push(format!("{}: a wildcard in {field}: {rule}", grant.role));
            }
        }
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let used: Vec<&&ResourceAttributes> = matched
                        .iter()
                        .filter(|c| {
                            c.api_group == group && c.resource_path() == resource && c.verb == verb
                        })
                        .collect();
                    let group_ = if group.is_empty() {
                        String::new()
                    } else {
                        format!("{group}/")
                    };
                    let what = format!("{verb} {group_}{resource} ({})", grant.role);
                    if used.is_empty() {
                        unused.push(format!("{what}: granted, never used"));
                        continue;
                    }
                    // A rule without resourceNames whose requests all named one object could
                    // name it (create by POST never names one, so it is never flagged).
                    let names: BTreeSet<&str> = used.iter().map(|c| c.name.as_str()).collect();
                    if strings(&rule["resourceNames"]).is_empty()
                        && names.len() == 1
                        && !names.contains("")
                    {
                        unused.push(format!(
                            "{what}: could be limited to resourceNames {names:?}"
                        ));
                    }
                    // A ClusterRole whose requests all stayed in one namespace could be a Role.
                    let namespaces: BTreeSet<&str> =
                        used.iter().map(|c| c.namespace.as_str()).collect();
                    if grant.namespace.is_none()
                        && namespaces.len() == 1
                        && !namespaces.contains("")
                    {
                        unused.push(format!("{what}: only used in namespace {namespaces:?}"));
                    }
                }
            }
        }
        for resource_name in strings(&rule["resourceNames"]) {
            if !matched.iter().any(|c| c.name == resource_name) {
                unused.push(format!(
                    "{}: resourceName {resource_name} never asked for: {rule}",
                    grant.role
                ));
            }
        }
    }
    (denied.into_iter().collect(), unused)
}

/// One line per distinct request, with a count, for failure messages.
fn summary(records: &[RequestRecord]) -> String {
    let mut lines: BTreeMap<String, usize> = BTreeMap::new();
    for record in records {
        let line = match &record.resource {
            Some(attributes) => format!("{} -> {}", show(attributes), record.status),
            None => format!("{} {} -> {}", record.method, record.path, record.status),
        };
        *lines.entry(line).or_default() += 1;
    }
    lines
        .into_iter()
        .map(|(line, n)| format!("  {n:>4} x {line}\n"))
        .collect()
}

fn records_of(server: &TestApiServer, user: &str) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.token.as_deref() == Some(user))
        .collect()
}

/// Waits until the requests of each `(user, grants)` leave nothing granted unused (or the
/// deadline passes), then asserts that nothing was denied and nothing is granted beyond use.
async fn assert_exact_rbac(server: &TestApiServer, subjects: &[(&str, Vec<Grant>)]) {
    let deadline = Instant::now() + COVERAGE_DEADLINE;
    loop {
        let mut covered = true;
        let mut failures = String::new();
        for (user, grants) in subjects {
            let records = records_of(server, user);
            let (denied, unused) = rbac_problems(grants, &records);
            covered &= unused.is_empty();
            if records.is_empty() {
                failures += &format!(
                    "{user} made no request (does its client send the kubeconfig's token?)\n"
                );
            } else if !denied.is_empty() || !unused.is_empty() {
                failures += &format!(
                    "{user}:\nrequests the RBAC does not allow: {denied:#?}\n\
                     grants beyond what the code uses: {unused:#?}\nits requests:\n{}\n",
                    summary(&records)
                );
            }
        }
        if covered || Instant::now() > deadline {
            assert!(failures.is_empty(), "{failures}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A kubeconfig for the test server whose user presents `token`.
fn kubeconfig(server: &TestApiServer, dir: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("{}.kubeconfig", token.rsplit(':').next().unwrap()));
    std::fs::write(
        &path,
        format!(
            "# Points at sigil-test-apiserver, a TEST DOUBLE of the Kubernetes API server.\n\
             apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: sa\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: sa\n    namespace: default\n\
             current-context: test\n",
            server.url()
        ),
    )
    .unwrap();
    path
}

/// Creates `object` through the API, as `kubectl apply` of the manifests would.
async fn create(client: &kube::Client, object: &Value, plural: &str) {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind(object)),
        plural,
    );
    let api: Api<DynamicObject> = match namespace(object) {
        "" => Api::all_with(client.clone(), &resource),
        ns => Api::namespaced_with(client.clone(), ns, &resource),
    };
    let typed: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &typed)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", manifests::describe(object)));
}

/// A cluster as `kubectl apply -k` of `rendered` leaves it (the objects the code reads: the
/// CRDs, the namespace, the webhook configuration), with the example policies, a second
/// meshed namespace, and pods: the agent's and a meshed web pod on node-a, a db pod on node-b.
async fn cluster(rendered: &[Value]) -> (TestApiServer, Pod, Pod) {
    let server = TestApiServer::start().await;
    let client = server.client();
    for crd in of_kind(rendered, "CustomResourceDefinition") {
        create(&client, crd, "customresourcedefinitions").await;
    }
    create(
        &client,
        find(rendered, "Namespace", "sigil-system"),
        "namespaces",
    )
    .await;
    create(
        &client,
        find(rendered, "MutatingWebhookConfiguration", "sigil-injector"),
        "mutatingwebhookconfigurations",
    )
    .await;
    for object in manifests::yaml_file(&repo().join("deploy/examples/mesh-demo.yaml")) {
        let plural = match kind(&object) {
            "Namespace" => "namespaces",
            "AuthorizationPolicy" => "authorizationpolicies",
            "PeerAuthentication" => "peerauthentications",
            other => panic!("unexpected {other} in the examples"),
        };
        create(&client, &object, plural).await;
    }
    create(
        &client,
        &json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-all", "namespace": "shop"}, "spec": {}}),
        "authorizationpolicies",
    )
    .await;
    create(
        &client,
        &json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "PeerAuthentication",
                "metadata": {"name": "db-strict", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}}),
        "peerauthentications",
    )
    .await;
    create(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        "namespaces",
    )
    .await;
    // The Gateway API (standard channel, as the README installs it) with a route of each kind
    // on a Service, and sigil's traffic policies: the CA writes their status.
    let gateway_api = manifests::yaml_file(&repo().join(routes::GATEWAY_API_CRDS));
    for crd in of_kind(&gateway_api, "CustomResourceDefinition") {
        create(&client, crd, "customresourcedefinitions").await;
    }
    // Two of each, in two namespaces with two names, so the test sees that the grants must be
    // cluster-wide and for any name.
    for (ns, name) in [("demo", "web"), ("shop", "db")] {
        let metadata = json!({"name": name, "namespace": ns});
        create(
            &client,
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
                    "spec": {"ports": [{"name": "http", "port": 80}]}}),
            "services",
        )
        .await;
        let spec = json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
            "rules": [{"backendRefs": [{"name": name, "port": 80}]}],
        });
        for (kind_, plural) in [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")] {
            create(
                &client,
                &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind_,
                        "metadata": metadata, "spec": spec}),
                plural,
            )
            .await;
        }
        let target = json!([{"group": "", "kind": "Service", "name": name}]);
        create(
            &client,
            &json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "BackendPolicy",
                    "metadata": metadata, "spec": {"targetRefs": target}}),
            "backendpolicies",
        )
        .await;
        create(
            &client,
            &json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "RateLimitPolicy",
                    "metadata": metadata,
                    "spec": {"targetRefs": target, "total": {"requests": 100}}}),
            "ratelimitpolicies",
        )
        .await;
    }
    let agent = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-x7k2p",
        "sigil-agent",
        "node-a",
    ));
    let mut web = PodSpec::new("demo", "web-1", "web", "node-a");
    web.labels
        .insert(sigil_proxy_api::TLS_MODE_LABEL.into(), "mtls".into());
    let web = server.add_pod(&web);
    server.add_pod(&PodSpec::new("shop", "db-1", "db", "node-b"));
    (server, agent, web)
}

/// The CA's arguments in the rendered Deployment after `ca serve` (the CaProcess adds loopback
/// addresses for this test: --listen, --admin-addr, --webhook-addr).
fn ca_args(rendered: &[Value]) -> Vec<String> {
    let deployment = find(rendered, "Deployment", "sigil-ca");
    let args = manifests::args(manifests::container(deployment, "ca"));
    assert_eq!(args[..2], ["ca", "serve"]);
    args[2..].to_vec()
}

/// `GET path` on `admin` answers 200 for each probe of `container`.
async fn assert_probes_answer(container: &Value, admin: SocketAddr) {
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        let (status, body) = http_get(admin, path).await.unwrap();
        assert_eq!(status, 200, "{} {probe} {path}: {body}", container["name"]);
    }
}

/// Waits until every namespace has the trust-bundle ConfigMap.
async fn wait_for_configmaps(server: &TestApiServer, namespaces: &[&str]) {
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(server.client(), ns);
        eventually(&format!("ConfigMap sigil-ca-root in {ns}"), || {
            let api = api.clone();
            async move {
                api.get_opt(sigil_ca::distribute::CONFIGMAP_NAME)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            }
        })
        .await;
    }
}

#[tokio::test]
async fn the_base_rbac_grants_exactly_what_the_ca_and_agent_use() {
    let rendered = kustomize(&repo().join("deploy"));
    let (server, agent_pod, _web) = cluster(&rendered).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_kubeconfig = kubeconfig(&server, dir.path(), CA_USER);
    let agent_kubeconfig = kubeconfig(&server, dir.path(), AGENT_USER);

    // The CA, as the Deployment runs it.
    let mut ca = CaProcess::start(dir.path(), Some(&ca_kubeconfig), &ca_args(&rendered));
    ca.wait_ready().await;
    wait_for_configmaps(&server, &["sigil-system", "demo", "shop"]).await;

    // The agent, with its token (the CA reviews it) and its own kubeconfig.
    let socket = dir.path().join("agent.sock");
    let (agent, agent_admin) = spawn_k8s_agent(
        dir.path(),
        &server,
        &agent_kubeconfig,
        &ca,
        &agent_pod,
        "node-a",
        &socket,
    )
    .await;
    wait_agent_ready(&agent, agent_admin, "").await;

    // An operator rotates the root from a CA pod (with the CA's service account).
    let rotated = tokio::process::Command::new(sigil_exe())
        .args(["ca", "rotate-root", "--propagation", "1s"])
        .env("KUBECONFIG", &ca_kubeconfig)
        .env_remove("POD_NAMESPACE")
        .output()
        .await
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );

    // The probes of the manifests answer on the running processes.
    assert_probes_answer(
        manifests::container(find(&rendered, "Deployment", "sigil-ca"), "ca"),
        ca.admin,
    )
    .await;
    assert_probes_answer(
        manifests::container(find(&rendered, "DaemonSet", "sigil-agent"), "agent"),
        agent_admin,
    )
    .await;

    assert_exact_rbac(
        &server,
        &[
            (
                CA_USER,
                grants(
                    &rendered,
                    service_account(&rendered, "Deployment", "sigil-ca"),
                ),
            ),
            (
                AGENT_USER,
                grants(
                    &rendered,
                    service_account(&rendered, "DaemonSet", "sigil-agent"),
                ),
            ),
        ],
    )
    .await;
    drop(agent);
    drop(ca);
}

/// An operator's offline root and intermediate in Istio's cacerts layout, made with openssl.
fn plugin_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::write(
        dir.join("ext.cnf"),
        "[req]\ndistinguished_name=dn\n[dn]\n[root]\nbasicConstraints=critical,CA:TRUE\n\
         keyUsage=critical,keyCertSign,cRLSign\n[inter]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n\
         keyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectAltName=URI:spiffe://cluster.local\n",
    )
    .unwrap();
    let script = "set -e
openssl ecparam -name prime256v1 -genkey -noout -out root-key.pem
openssl req -x509 -new -key root-key.pem -subj '/O=operator/CN=offline root' -days 30 \
  -config ext.cnf -extensions root -out root-cert.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
openssl req -new -key ca-key.pem -subj '/O=operator/CN=cluster intermediate' -config ext.cnf -out ca.csr
openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -days 10 \
  -extfile ext.cnf -extensions inter -out ca-cert.pem 2>/dev/null
cat ca-cert.pem root-cert.pem > cert-chain.pem";
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]
    .into_iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

#[tokio::test]
async fn the_plugin_ca_overlay_grants_exactly_what_the_ca_uses() {
    let base = kustomize(&repo().join("deploy"));
    let rendered = kustomize(&repo().join("deploy/overlays/plugin-ca"));
    // The overlay changes only the CA: the agent's RBAC (checked above) is the base's.
    for object in ["ClusterRole", "ClusterRoleBinding"] {
        assert_eq!(
            find(&rendered, object, "sigil-agent"),
            find(&base, object, "sigil-agent")
        );
    }
    let (server, _agent, web) = cluster(&rendered).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_kubeconfig = kubeconfig(&server, dir.path(), CA_USER);

    // The operator's Secret, named as the overlay's CA arguments name it.
    let args = ca_args(&rendered);
    let secret_name = args
        .iter()
        .find_map(|a| a.strip_prefix("--plugin-secret="))
        .expect("the overlay sets --plugin-secret");
    let files = plugin_files(dir.path());
    let data: BTreeMap<&String, String> = files
        .iter()
        .map(|(k, v)| (k, String::from_utf8(v.clone()).unwrap()))
        .collect();
    create(
        &server.client(),
        &json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": secret_name, "namespace": "sigil-system"}, "stringData": data}),
        "secrets",
    )
    .await;

    let mut ca = CaProcess::start(dir.path(), Some(&ca_kubeconfig), &args);
    ca.wait_ready().await;
    wait_for_configmaps(&server, &["sigil-system", "demo", "shop"]).await;
    // A workload's token is reviewed, and it gets a certificate from the plugged-in intermediate.
    let bundle = sigil_identity::TrustBundle::from_pem(
        td(),
        std::str::from_utf8(&files["root-cert.pem"]).unwrap(),
    )
    .unwrap();
    let token = server.issue_token(&TokenSpec::for_pod(&web, sigil_ca::authn::DEFAULT_AUDIENCE));
    let (_key, csr) = key_and_csr();
    let response = ca
        .client(&bundle, None)
        .await
        .sign(sign_request(csr, 3600, "", Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.intermediates.len(),
        1,
        "signed by the intermediate"
    );

    assert_exact_rbac(
        &server,
        &[(
            CA_USER,
            grants(
                &rendered,
                service_account(&rendered, "Deployment", "sigil-ca"),
            ),
        )],
    )
    .await;
    drop(ca);
}

#[test]
fn rbac_rules_match_as_kubernetes_matches_them() {
    let request = |verb: &str, group: &str, resource: &str, sub: &str, ns: &str, name: &str| {
        ResourceAttributes {
            verb: verb.into(),
            api_group: group.into(),
            api_version: "v1".into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    };
    let rule = json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["sigil-ca"],
                      "verbs": ["get", "update", "create"]});
    assert!(rule_allows(
        &rule,
        &request("get", "", "secrets", "", "a", "sigil-ca")
    ));
    assert!(!rule_allows(
        &rule,
        &request("get", "", "secrets", "", "a", "other")
    ));
    assert!(!rule_allows(
        &rule,
        &request("delete", "", "secrets", "", "a", "sigil-ca")
    ));
    assert!(!rule_allows(
        &rule,
        &request("get", "apps", "secrets", "", "a", "sigil-ca")
    ));
    // A create by POST names nothing, so resourceNames never allow it; list and watch name an
    // object only through a metadata.name field selector.
    assert!(!rule_allows(
        &rule,
        &request("create", "", "secrets", "", "a", "")
    ));
    assert!(!rule_allows(
        &rule,
        &request("list", "", "secrets", "", "a", "")
    ));
    // Subresources are named with their resource; `*/status` matches any status.
    let status = json!({"apiGroups": ["sigil.dev"], "resources": ["authorizationpolicies/status"],
                        "verbs": ["patch"]});
    let patch_status = request(
        "patch",
        "sigil.dev",
        "authorizationpolicies",
        "status",
        "d",
        "p",
    );
    assert!(rule_allows(&status, &patch_status));
    assert!(!rule_allows(
        &status,
        &request("patch", "sigil.dev", "authorizationpolicies", "", "d", "p")
    ));
    let any_status = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
    assert!(rule_allows(&any_status, &patch_status));
    assert!(!rule_allows(
        &any_status,
        &request("patch", "sigil.dev", "authorizationpolicies", "", "d", "p")
    ));
    // A RoleBinding's rules hold in its namespace only.
    let grant = Grant {
        role: "Role r".into(),
        rule,
        namespace: Some("a".into()),
    };
    assert!(grant_allows(
        &grant,
        &request("get", "", "secrets", "", "a", "sigil-ca")
    ));
    assert!(!grant_allows(
        &grant,
        &request("get", "", "secrets", "", "b", "sigil-ca")
    ));
}
