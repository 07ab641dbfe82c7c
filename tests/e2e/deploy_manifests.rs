//! The Kubernetes manifests in deploy/: they render with the real kubectl's kustomize (the base
//! and the plug-in CA, Istio ambient and dual-stack overlays), every rendered object passes the API's own JSON schemas for
//! Kubernetes 1.30 and the newest version kubernetes-validate bundles (strict: no unknown
//! field), every custom-resource example passes sigil's CRD schemas and sigil's own validation,
//! and the manifests agree with the binary: each container's arguments and environment are
//! parsed by the real `sigil` into the ports, paths and names the manifests wire up (Services,
//! probes, volumes, the webhook, RBAC resource names). The Dockerfile is checked statically
//! (there is no Docker here).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sigil_policy::model::{Kind, Object};
use sigil_test_harness::manifests::*;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The oldest Kubernetes the manifests support.
const OLDEST_KUBERNETES: &str = "1.30";
const NAMESPACE: &str = "sigil-system";

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn base() -> Vec<Value> {
    kustomize(&deploy())
}

fn plugin_overlay() -> Vec<Value> {
    kustomize(&deploy().join("overlays/plugin-ca"))
}

fn istio_overlay() -> Vec<Value> {
    kustomize(&deploy().join("overlays/istio-ambient"))
}

fn dual_stack_overlay() -> Vec<Value> {
    kustomize(&deploy().join("overlays/dual-stack"))
}

/// Every object rendered, and the custom-resource kinds: the rendered CRDs.
fn crds(objects: &[Value]) -> Vec<Value> {
    of_kind(objects, "CustomResourceDefinition")
        .into_iter()
        .cloned()
        .collect()
}

/// The image every container of the base runs.
fn image() -> String {
    format!("sigil:{VERSION}")
}

/// What `sigil` makes of the container `container` of `workload`: its parsed configuration.
fn parsed_config(workload: &Value, container_name: &str) -> BTreeMap<String, String> {
    let container = container(workload, container_name);
    let parsed = parse_with_sigil(
        &args(container),
        &container_env(workload, container, "node-a"),
    );
    let config = parsed.config.unwrap_or_else(|| {
        panic!(
            "sigil did not accept the arguments of {} container {container_name}: {:?}\n\
             stdout: {}\nstderr: {}",
            describe(workload),
            args(container),
            parsed.stdout,
            parsed.stderr
        )
    });
    assert!(
        !parsed.stderr.contains("Usage:"),
        "argument error: {}",
        parsed.stderr
    );
    debug_fields(&config)
}

fn field<'a>(config: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    config
        .get(name)
        .unwrap_or_else(|| panic!("no field {name} in the parsed configuration: {config:?}"))
}

fn string_field(config: &BTreeMap<String, String>, name: &str) -> String {
    debug_string(field(config, name)).unwrap_or_else(|| panic!("{name} is not set: {config:?}"))
}

#[test]
fn base_and_overlay_render_and_pass_the_kubernetes_schemas() {
    let rendered = base();
    // deploy/ is the base in deploy/base, unchanged.
    assert_eq!(rendered, kustomize(&deploy().join("base")));
    let overlay = plugin_overlay();
    let istio = istio_overlay();
    let dual_stack = dual_stack_overlay();

    let expected: BTreeSet<(String, String, String)> = [
        ("Namespace", "", NAMESPACE),
        (
            "CustomResourceDefinition",
            "",
            "authorizationpolicies.sigil.dev",
        ),
        (
            "CustomResourceDefinition",
            "",
            "peerauthentications.sigil.dev",
        ),
        ("CustomResourceDefinition", "", "backendpolicies.sigil.dev"),
        (
            "CustomResourceDefinition",
            "",
            "ratelimitpolicies.sigil.dev",
        ),
        ("ServiceAccount", NAMESPACE, "sigil-ca"),
        ("ServiceAccount", NAMESPACE, "sigil-agent"),
        ("ClusterRole", "", "sigil-ca"),
        ("ClusterRoleBinding", "", "sigil-ca"),
        ("Role", NAMESPACE, "sigil-ca"),
        ("RoleBinding", NAMESPACE, "sigil-ca"),
        ("ClusterRole", "", "sigil-agent"),
        ("ClusterRoleBinding", "", "sigil-agent"),
        ("Deployment", NAMESPACE, "sigil-ca"),
        ("PodDisruptionBudget", NAMESPACE, "sigil-ca"),
        ("Service", NAMESPACE, "sigil-ca"),
        ("NetworkPolicy", NAMESPACE, "sigil-ca"),
        ("MutatingWebhookConfiguration", "", "sigil-injector"),
        ("DaemonSet", NAMESPACE, "sigil-agent"),
    ]
    .into_iter()
    .map(|(k, ns, n)| (k.to_string(), ns.to_string(), n.to_string()))
    .collect();
    for objects in [&rendered, &overlay, &istio, &dual_stack] {
        let found: BTreeSet<(String, String, String)> = objects
            .iter()
            .map(|o| {
                (
                    kind(o).to_string(),
                    namespace(o).to_string(),
                    name(o).to_string(),
                )
            })
            .collect();
        assert_eq!(found, expected);
        assert_eq!(found.len(), objects.len(), "an object rendered twice");
        let unlabelled = unlabelled_objects(objects);
        assert!(unlabelled.is_empty(), "{unlabelled:#?}");
    }

    // The API's schemas, strict, for the oldest supported and the newest known Kubernetes.
    let mut all = rendered.clone();
    all.extend(overlay);
    all.extend(istio);
    all.extend(dual_stack);
    let (latest, problems) = kubernetes_schema_problems(&all, &[OLDEST_KUBERNETES, "latest"]);
    assert!(
        latest.as_str() >= "1.35",
        "kubernetes-validate knows only up to {latest}"
    );
    assert!(problems.is_empty(), "{problems:#?}");

    // A misspelt field is caught (the check is strict), and so is an unknown kind.
    let mut typo = find(&rendered, "Service", "sigil-ca").clone();
    typo["spec"]["ports"][0]["targetport"] = json!(15012);
    let unknown = json!({"apiVersion": "v1", "kind": "Servise", "metadata": {"name": "x"}});
    let (_, problems) = kubernetes_schema_problems(&[typo, unknown], &[OLDEST_KUBERNETES]);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains("targetport"), "{problems:#?}");
}

/// Every YAML file under deploy/ except the CRDs and kustomizations, and the shared policy
/// fixtures of the tests.
fn example_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy(), &mut files);
    files.retain(|p| {
        !p.starts_with(deploy().join("crds"))
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
    });
    let mut fixtures = Vec::new();
    walk(&repo().join("tests/fixtures"), &mut fixtures);
    fixtures.retain(|p| p.parent() == Some(&repo().join("tests/fixtures")));
    files.extend(fixtures);
    files.sort();
    files
}

#[test]
fn custom_resource_examples_pass_our_crd_schemas_and_sigil() {
    let crds = crds(&base());
    let mut custom = 0;
    let mut in_deploy = 0;
    let mut builtin = Vec::new();
    for file in example_files() {
        for object in yaml_file(&file) {
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            if !api_version.starts_with(&format!("{}/", sigil_policy::model::GROUP)) {
                // Kustomize's own configuration files are not Kubernetes objects.
                if !object["kind"].is_string() || object.get("images").is_some() {
                    continue;
                }
                // The Prometheus Operator's objects: no schema of theirs here; deploy_prometheus.rs
                // checks them by what they select.
                if api_version.starts_with("monitoring.coreos.com/") {
                    continue;
                }
                builtin.push(object);
                continue;
            }
            let where_ = format!("{}: {}", file.display(), describe(&object));
            let schema = crd_schema(&crds, api_version, kind(&object))
                .unwrap_or_else(|| panic!("{where_}: no CRD serves {api_version}"));
            assert_eq!(
                custom_resource_problems(&schema, &object),
                Vec::<String>::new(),
                "{where_}"
            );
            // And sigil accepts it as a policy (the CA would mark it Valid).
            let kind = Kind::from_name(kind(&object)).unwrap();
            let decoded = Object::decode(kind, object.clone()).unwrap();
            let valid = match decoded {
                Object::AuthorizationPolicy(p) => sigil_policy::validate::authorization_policy(&p)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Object::PeerAuthentication(p) => sigil_policy::validate::peer_authentication(&p)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            };
            assert_eq!(valid, Ok(()), "{where_}");
            custom += 1;
            in_deploy += usize::from(file.starts_with(deploy()));
        }
    }
    assert!(in_deploy >= 2, "deploy/ has {in_deploy} policy examples");
    assert!(custom >= in_deploy + 3, "{custom} policy examples in all");
    // The other objects of the examples (a namespace to mesh) pass the API's schemas.
    assert!(!builtin.is_empty());
    let (_, problems) = kubernetes_schema_problems(&builtin, &[OLDEST_KUBERNETES, "latest"]);
    assert!(problems.is_empty(), "{problems:#?}");

    // The check bites: a misspelt field and a bad enum value.
    let schema = crd_schema(&crds, "sigil.dev/v1alpha1", "PeerAuthentication").unwrap();
    let bad = json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "x", "namespace": "demo"}, "spec": {"mtls": {"mode": "strict"}, "mtsl": {}}});
    let problems = custom_resource_problems(&schema, &bad);
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[test]
fn container_arguments_are_what_the_binary_accepts() {
    let rendered = base();
    let overlay = plugin_overlay();
    let dual_stack = dual_stack_overlay();
    let workloads = [
        (find(&rendered, "Deployment", "sigil-ca"), "ca", "sigil CA"),
        (find(&overlay, "Deployment", "sigil-ca"), "ca", "sigil CA"),
        (
            find(&dual_stack, "Deployment", "sigil-ca"),
            "ca",
            "sigil CA",
        ),
        (
            find(&dual_stack, "DaemonSet", "sigil-agent"),
            "agent",
            "sigil agent",
        ),
        (
            find(&rendered, "DaemonSet", "sigil-agent"),
            "agent",
            "sigil agent",
        ),
    ];
    for (workload, container_name, _) in workloads {
        let container = container(workload, container_name);
        // The image's ENTRYPOINT is /sigil: the arguments start with the subcommand.
        assert_eq!(container.get("command"), None, "{}", describe(workload));
        let config = parsed_config(workload, container_name);
        assert_eq!(string_field(&config, "trust_domain"), "cluster.local");
    }
    // The check bites: an unknown flag is refused before anything starts.
    let ca = find(&rendered, "Deployment", "sigil-ca");
    let mut wrong = args(container(ca, "ca"));
    wrong.push("--no-such-flag".into());
    let refused = parse_with_sigil(&wrong, &[]);
    assert!(refused.config.is_none(), "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("unexpected argument '--no-such-flag'"),
        "{}",
        refused.stderr
    );
    // The overlay plugs in its Secret, the one its Role lets the CA read.
    let config = parsed_config(find(&overlay, "Deployment", "sigil-ca"), "ca");
    let role = find(&overlay, "Role", "sigil-ca");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                "resourceNames": [string_field(&config, "plugin_secret")]}])
    );
    assert_eq!(string_field(&config, "namespace"), NAMESPACE);
}

#[test]
fn the_ca_deployment_service_and_webhook_fit_the_binary() {
    let rendered = base();
    let deployment = find(&rendered, "Deployment", "sigil-ca");
    let ca = container(deployment, "ca");
    let config = parsed_config(deployment, "ca");
    let pod = &deployment["spec"]["template"];

    // Ports: gRPC, admin, webhook, as the CA binds them.
    let grpc = debug_port(field(&config, "listen"));
    let admin = debug_port(field(&config, "admin_addr"));
    let webhook_port = debug_port(field(&config, "webhook_addr"));
    assert_eq!((grpc, admin, webhook_port), (15012, 15014, 15017));
    assert_eq!(named_port(ca, "grpc"), grpc);
    assert_eq!(named_port(ca, "http-admin"), admin);
    assert_eq!(named_port(ca, "https-webhook"), webhook_port);
    assert_eq!(field(&config, "no_webhook"), "false");
    // Probes on the admin port (their paths answer on the running CA: tests/e2e/deploy_rbac.rs).
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        assert_eq!(ca[probe]["httpGet"]["path"], path);
        assert_eq!(
            container_port(ca, &ca[probe]["httpGet"]["port"]),
            Some(admin)
        );
    }
    // The Secret it keeps its root in, in its own namespace, is the one its Role names.
    assert_eq!(string_field(&config, "namespace"), namespace(deployment));
    let role = find(&rendered, "Role", "sigil-ca");
    assert_eq!(namespace(role), namespace(deployment));
    let secret = string_field(&config, "secret_name");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!([secret])),
        "{role}"
    );
    assert_eq!(field(&config, "plugin_secret"), "None");
    assert_eq!(field(&config, "state_dir"), "None");
    assert_eq!(field(&config, "auth"), "Tokenreview");
    // No audience besides sigil-ca, which is always accepted.
    assert!(debug_strings(field(&config, "audiences")).is_empty());
    // The agents it trusts are the DaemonSet's service account.
    let daemonset = find(&rendered, "DaemonSet", "sigil-agent");
    assert_eq!(
        field(&config, "trusted_agents"),
        format!(
            "[({:?}, {:?})]",
            namespace(daemonset),
            daemonset["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap()
        )
    );
    // Sidecars are injected with the CA's own image.
    assert_eq!(ca["image"], image());
    assert_eq!(string_field(&config, "proxy_image"), image());
    assert_eq!(pod["spec"]["serviceAccountName"], "sigil-ca");

    // The Service selects the CA's pods and reaches each port.
    let service = find(&rendered, "Service", "sigil-ca");
    let labels = &pod["metadata"]["labels"];
    let selector = service["spec"]["selector"].as_object().unwrap();
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "selector {key}");
    }
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"]
    );
    let service_ports: BTreeMap<u64, u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let target = container_port(ca, &p["targetPort"])
                .unwrap_or_else(|| panic!("Service port {p} reaches no container port"));
            (p["port"].as_u64().unwrap(), target)
        })
        .collect();
    assert_eq!(
        service_ports,
        BTreeMap::from([(grpc, grpc), (443, webhook_port), (admin, admin)])
    );
    // Agents find the CA by the Service's name, which its serving certificate carries.
    assert_eq!(
        sigil_ca::config::DEFAULT_SERVICE_NAME,
        format!("{}.{}.svc", name(service), namespace(service))
    );

    // The webhook: the CA's Service, path and port; the configuration the CA keeps the
    // caBundle of; the namespaces the CA itself refuses to inject are excluded.
    let webhook_config = find(&rendered, "MutatingWebhookConfiguration", "sigil-injector");
    assert_eq!(
        name(webhook_config),
        string_field(&config, "webhook_config")
    );
    let webhooks = webhook_config["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(
        webhook["clientConfig"],
        json!({"service": {"namespace": namespace(service), "name": name(service),
                           "path": sigil_ca::webhook::WEBHOOK_PATH, "port": 443}}),
        "no caBundle: the CA fills it in"
    );
    let excluded = debug_strings(field(&config, "inject_excluded_namespaces"));
    assert!(excluded.iter().any(|n| n == NAMESPACE));
    let inject = sigil_ca::inject::INJECT_KEY;
    assert_eq!(
        webhook["namespaceSelector"],
        json!({"matchLabels": {inject: "enabled"}, "matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded}]})
    );
    assert_eq!(
        webhook["objectSelector"],
        json!({"matchExpressions": [{"key": inject, "operator": "NotIn", "values": ["false"]}]})
    );
    let mut contract = webhook.clone();
    for key in ["clientConfig", "namespaceSelector", "objectSelector"] {
        contract.as_object_mut().unwrap().remove(key);
    }
    assert_eq!(
        contract,
        json!({
            "name": "inject.sigil.dev",
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "Never",
        })
    );
    // The CA's own namespace is never meshed.
    let ns = find(&rendered, "Namespace", NAMESPACE);
    assert!(ns["metadata"]["labels"].get(inject).is_none());
}

#[test]
fn the_agent_daemonset_fits_the_binary_and_the_injected_pods() {
    let rendered = base();
    let daemonset = find(&rendered, "DaemonSet", "sigil-agent");
    let agent = container(daemonset, "agent");
    let config = parsed_config(daemonset, "agent");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sigil-agent");
    assert_eq!(agent["image"], image());
    assert_eq!(field(&config, "attestor"), "K8s");
    assert_eq!(string_field(&config, "node_name"), "node-a", "NODE_NAME");
    assert_eq!(
        agent["env"],
        json!([{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    );
    assert_eq!(pod["hostPID"], true);
    assert_eq!(field(&config, "proc_root"), "\"/proc\"");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));

    // The admin port and probes.
    let admin = debug_port(field(&config, "admin_addr"));
    assert_eq!(admin, 15021);
    assert_eq!(named_port(agent, "http-admin"), admin);
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path);
        assert_eq!(
            container_port(agent, &agent[probe]["httpGet"]["port"]),
            Some(admin)
        );
    }

    // Files come from the volumes mounted where the agent looks.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let volume_for = |file: &str| -> (&Value, String) {
        let file = Path::new(file);
        let mount = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{} is on no volume", file.display()));
        let rest = file
            .strip_prefix(mount["mountPath"].as_str().unwrap())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        (volumes[mount["name"].as_str().unwrap()], rest)
    };
    // The socket: in the host directory the injected pods mount.
    let socket = string_field(&config, "socket");
    let (volume, file) = volume_for(&socket);
    assert_eq!(
        volume["hostPath"],
        json!({"path": sigil_proxy_api::AGENT_SOCKET_DIR, "type": "DirectoryOrCreate"})
    );
    assert_eq!(file, "agent.sock");
    assert_eq!(socket, sigil_proxy_api::AGENT_SOCKET);
    // The token: projected for the CA's audience.
    let (volume, file) = volume_for(&string_field(&config, "token_file"));
    assert_eq!(
        volume["projected"]["sources"],
        json!([{"serviceAccountToken": {"audience": sigil_ca::authn::DEFAULT_AUDIENCE,
                                        "expirationSeconds": 3600, "path": file}}])
    );
    // The bootstrap roots: the ConfigMap the CA publishes.
    let (volume, file) = volume_for(&string_field(&config, "ca_bundle"));
    assert_eq!(
        volume["configMap"],
        json!({"name": sigil_ca::distribute::CONFIGMAP_NAME})
    );
    assert_eq!(file, sigil_ca::distribute::CONFIGMAP_KEY);

    // The CA: its Service's gRPC port, under the name on its certificate.
    let service = find(&rendered, "Service", "sigil-ca");
    let grpc = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(
        string_field(&config, "ca_addr"),
        format!(
            "{}.{}.svc:{}",
            name(service),
            namespace(service),
            grpc["port"]
        )
    );
    assert_eq!(
        string_field(&config, "ca_name"),
        sigil_ca::config::DEFAULT_SERVICE_NAME
    );
}

#[test]
fn workloads_are_highly_available_and_locked_down() {
    let rendered = base();
    let deployment = find(&rendered, "Deployment", "sigil-ca");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let pdb = find(&rendered, "PodDisruptionBudget", "sigil-ca");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"], deployment["spec"]["selector"],
        "the budget covers the CA's pods"
    );
    let ca_pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(ca_pod["securityContext"]["runAsNonRoot"], true);
    assert!(ca_pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0);

    let daemonset = find(&rendered, "DaemonSet", "sigil-agent");
    for (workload, name_, root) in [(deployment, "ca", false), (daemonset, "agent", true)] {
        let c = container(workload, name_);
        let security = &c["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name_}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name_}");
        assert_eq!(
            security["capabilities"],
            json!({"drop": ["ALL"]}),
            "{name_}"
        );
        assert_eq!(security.get("privileged"), None, "{name_}");
        assert_eq!(security["runAsUser"] == 0, root, "{name_}");
        for resource in ["cpu", "memory"] {
            assert!(c["resources"]["requests"][resource].is_string(), "{name_}");
        }
        assert!(c["resources"]["limits"]["memory"].is_string(), "{name_}");
        assert_eq!(
            workload["spec"]["template"]["spec"]["securityContext"]["seccompProfile"],
            json!({"type": "RuntimeDefault"})
        );
    }
    // The agent's hostPID and hostPath need the privileged Pod Security level in its namespace.
    let ns = find(&rendered, "Namespace", NAMESPACE);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

/// Who connects in a cluster, as NetworkPolicy sees it.
enum Peer<'a> {
    Pod {
        namespace: &'a Value,
        labels: Value,
        ip: &'a str,
    },
    /// A host-network process or a managed control plane: the API server calling the webhook.
    Host { ip: &'a str },
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let (net, len) = cidr.split_once('/').unwrap();
    let (net, len): (std::net::IpAddr, u32) = (net.parse().unwrap(), len.parse().unwrap());
    match (ip, net) {
        (std::net::IpAddr::V4(ip), std::net::IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (std::net::IpAddr::V6(ip), std::net::IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The ports of `container` (in a pod labelled `target_labels`) that the NetworkPolicies among
/// `objects` in `policy_namespace` admit `peer` to, by the NetworkPolicy rules (ipBlocks applied
/// to pod addresses too, as Calico and Cilium do). `None`: no policy selects the pod.
fn admitted_ports(
    objects: &[Value],
    policy_namespace: &str,
    target_labels: &Value,
    container: &Value,
    peer: &Peer,
) -> Option<BTreeSet<u64>> {
    let policies: Vec<&Value> = of_kind(objects, "NetworkPolicy")
        .into_iter()
        .filter(|p| namespace(p) == policy_namespace)
        .filter(|p| selects(&p["spec"]["podSelector"], target_labels))
        .collect();
    if policies.is_empty() {
        return None;
    }
    let mut admitted = BTreeSet::new();
    for rule in policies
        .iter()
        .flat_map(|p| p["spec"]["ingress"].as_array().into_iter().flatten())
    {
        let from = rule["from"].as_array().cloned().unwrap_or_default();
        let peer_matches = |from: &Value| {
            if let Some(block) = from.get("ipBlock") {
                let ip = match peer {
                    Peer::Pod { ip, .. } | Peer::Host { ip } => ip,
                };
                return in_cidr(ip, block["cidr"].as_str().unwrap())
                    && !block["except"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| in_cidr(ip, e.as_str().unwrap()));
            }
            let Peer::Pod {
                namespace: ns,
                labels,
                ..
            } = peer
            else {
                return false;
            };
            let ns_labels = &ns["metadata"]["labels"];
            let ns_ok = match from.get("namespaceSelector") {
                Some(selector) => selects(selector, ns_labels),
                None => ns["metadata"]["name"] == policy_namespace,
            };
            ns_ok
                && from
                    .get("podSelector")
                    .is_none_or(|selector| selects(selector, labels))
        };
        if from.is_empty() || from.iter().any(peer_matches) {
            for port in rule["ports"].as_array().into_iter().flatten() {
                admitted.insert(
                    container_port(container, &port["port"])
                        .unwrap_or_else(|| panic!("{port} is no port of the container")),
                );
            }
        }
    }
    Some(admitted)
}

/// The NetworkPolicy lets only the node agents reach the CA's signing port; the webhook and the
/// metrics stay open to every source, since the API server's and the kubelet's addresses depend
/// on the CNI (SECURITY.md, "What the cluster grants each part").
#[test]
fn the_network_policy_admits_only_agents_to_signing() {
    let rendered = base();
    let deployment = find(&rendered, "Deployment", "sigil-ca");
    let ca = container(deployment, "ca");
    let ca_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let config = parsed_config(deployment, "ca");
    let grpc = debug_port(field(&config, "listen"));
    let admin = debug_port(field(&config, "admin_addr"));
    let webhook = debug_port(field(&config, "webhook_addr"));
    // The API server sets this label on every namespace.
    let with_name_label = |ns: &Value| {
        let mut ns = ns.clone();
        let name = ns["metadata"]["name"].clone();
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        ns
    };
    let sigil_system = with_name_label(find(&rendered, "Namespace", NAMESPACE));
    let demo = with_name_label(&json!({"metadata": {"name": "demo", "labels": {}}}));
    let agent_labels = find(&rendered, "DaemonSet", "sigil-agent")["spec"]["template"]["metadata"]
        ["labels"]
        .clone();
    let cases = [
        (
            "a node agent",
            Peer::Pod {
                namespace: &sigil_system,
                labels: agent_labels.clone(),
                ip: "10.244.1.5",
            },
            vec![grpc, admin, webhook],
        ),
        (
            "an application pod",
            Peer::Pod {
                namespace: &demo,
                labels: json!({"app": "web"}),
                ip: "10.244.2.7",
            },
            vec![admin, webhook],
        ),
        (
            "a pod wearing the agent's labels in its own namespace",
            Peer::Pod {
                namespace: &demo,
                labels: agent_labels,
                ip: "10.244.2.8",
            },
            vec![admin, webhook],
        ),
        (
            "the API server (host network)",
            Peer::Host { ip: "198.18.0.10" },
            vec![webhook, admin],
        ),
        (
            "the API server over IPv6",
            Peer::Host { ip: "2001:2::10" },
            vec![webhook, admin],
        ),
    ];
    for (who, peer, expected) in cases {
        let admitted = admitted_ports(&rendered, NAMESPACE, ca_labels, ca, &peer)
            .expect("a NetworkPolicy selects the CA's pods");
        assert_eq!(
            admitted,
            expected.into_iter().collect::<BTreeSet<_>>(),
            "{who}"
        );
    }
}

/// deploy/overlays/istio-ambient makes sigil Istio's CA: ztunnel's tokens (audience istio-ca) are
/// accepted and sigil's own agents' still are, ztunnel may ask for the identities of the pods on
/// its node, and its pods may reach the signing port; its root patch points at the ConfigMap the
/// CA publishes.
#[test]
fn the_istio_overlay_lets_ztunnel_in_and_keeps_sigils_agents_working() {
    let istio = istio_overlay();
    let deployment = find(&istio, "Deployment", "sigil-ca");
    let config = parsed_config(deployment, "ca");
    assert_eq!(debug_strings(field(&config, "audiences")), ["istio-ca"]);
    assert_eq!(
        field(&config, "trusted_agents"),
        r#"[("sigil-system", "sigil-agent"), ("istio-system", "ztunnel")]"#
    );
    let grpc = debug_port(field(&config, "listen"));
    let ca = container(deployment, "ca");
    let ca_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let namespace_named = |name: &str| json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}});
    let (istio_system, sigil_system) =
        (namespace_named("istio-system"), namespace_named(NAMESPACE));
    let agent_labels =
        find(&istio, "DaemonSet", "sigil-agent")["spec"]["template"]["metadata"]["labels"].clone();
    for (who, peer) in [
        (
            "ztunnel",
            Peer::Pod {
                namespace: &istio_system,
                labels: json!({"app": "ztunnel", "sidecar.istio.io/inject": "false"}),
                ip: "10.244.1.9",
            },
        ),
        (
            "sigil's agent",
            Peer::Pod {
                namespace: &sigil_system,
                labels: agent_labels,
                ip: "10.244.1.5",
            },
        ),
    ] {
        let admitted = admitted_ports(&istio, NAMESPACE, ca_labels, ca, &peer).unwrap();
        assert!(admitted.contains(&grpc), "{who}: {admitted:?}");
    }

    let patch = yaml_file(&deploy().join("overlays/istio-ambient/ztunnel-root.yaml"));
    let volumes = &patch[0]["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["configMap"]["name"],
        sigil_ca::distribute::CONFIGMAP_NAME
    );
}

/// A kustomization beside none of ours that uses deploy/ as its base with an `images:` override,
/// as an operator's overlay would.
fn render_with_image_override(images: Value) -> Vec<Value> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let from = dir.path().canonicalize().unwrap();
    let to = deploy().canonicalize().unwrap();
    // kustomize wants a relative path to a base.
    let ups = from.components().count() - 1;
    let relative = format!(
        "{}{}",
        "../".repeat(ups),
        to.strip_prefix("/").unwrap().display()
    );
    let kustomization = json!({"resources": [relative], "images": images});
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        serde_json::to_string(&kustomization).unwrap(),
    )
    .unwrap();
    kustomize(dir.path())
}

fn images_of(objects: &[Value]) -> (Vec<String>, String) {
    let mut images = Vec::new();
    for workload in objects
        .iter()
        .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet"))
    {
        for c in workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            images.push(c["image"].as_str().unwrap().to_string());
        }
    }
    let deployment = find(objects, "Deployment", "sigil-ca");
    let proxy_image = container(deployment, "ca")["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SIGIL_PROXY_IMAGE")
        .and_then(|e| e["value"].as_str())
        .unwrap()
        .to_string();
    (images, proxy_image)
}

#[test]
fn one_image_for_everything_and_the_proxy_image_follows_overrides() {
    // The base: the crate's version, everywhere (and the CA's default proxy image).
    assert_eq!(image(), sigil_ca::inject::DEFAULT_PROXY_IMAGE);
    let (images, proxy) = images_of(&base());
    assert_eq!(images, [image(), image()]);
    assert_eq!(proxy, image());
    for (override_, expected) in [
        (
            json!([{"name": "sigil", "newName": "registry.example/mesh/sigil", "newTag": "v9"}]),
            "registry.example/mesh/sigil:v9".to_string(),
        ),
        (
            json!([{"name": "sigil", "newName": "registry.example/sigil",
                    "digest": format!("sha256:{}", "ab".repeat(32))}]),
            format!("registry.example/sigil@sha256:{}", "ab".repeat(32)),
        ),
    ] {
        let (images, proxy) = images_of(&render_with_image_override(override_));
        assert_eq!(images, [expected.clone(), expected.clone()]);
        assert_eq!(proxy, expected, "SIGIL_PROXY_IMAGE follows the CA's image");
    }
}

/// The workspace's `rust-version` and members, and the bench targets the root manifest
/// declares (files a build needs even though it does not build them).
fn workspace_layout() -> (String, Vec<String>) {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let quoted = |line: &str| -> Vec<String> {
        line.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "src/main.rs".to_string(),
        // Its link flags (packed relocations) are part of what the image ships.
        ".cargo/config.toml".to_string(),
    ];
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap();
    needed.extend(quoted(members).into_iter().filter(|m| m != "."));
    let mut in_bench = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if in_bench && let Some(name) = line.strip_prefix("name = ") {
            needed.push(format!("benches/{}.rs", name.trim_matches('"')));
        }
    }
    (rust_version, needed)
}

/// Whether a .dockerignore pattern excludes `path` (Go filepath.Match per component, and a
/// match of a directory excludes what is under it).
fn ignored(pattern: &str, path: &str) -> bool {
    fn matches(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((prefix, rest)) => {
                name.starts_with(prefix)
                    && (0..=name.len() - prefix.len())
                        .any(|i| matches(rest, &name[prefix.len() + i..]))
            }
        }
    }
    let pattern: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    path.len() >= pattern.len()
        && pattern
            .iter()
            .zip(&path)
            .all(|(p, segment)| matches(p, segment))
}

#[test]
fn the_dockerfile_builds_one_image_of_the_static_sigil_binaries() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let instructions = dockerfile_instructions(&text);
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a run stage");
    let build = &instructions[stages[0]..stages[1]];
    let run = &instructions[stages[1]..];

    // Build: Rust new enough for the workspace, the locked `sigil` and `sigil-proxy` binaries,
    // static.
    let (from, stage_name) = build[0].1.split_once(" AS ").unwrap();
    // Debian's Rust: glibc, linked statically below.
    let rust = from
        .strip_prefix("rust:")
        .and_then(|tag| tag.strip_suffix("-bookworm"))
        .unwrap_or_else(|| panic!("build stage from {from}"));
    let (rust_version, needed) = workspace_layout();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        version(rust) >= version(&rust_version),
        "rust {rust} < the workspace's rust-version {rust_version}"
    );
    let build_text: String = build
        .iter()
        .map(|(i, rest)| format!("{i} {rest}\n"))
        .collect();
    for part in [
        "COPY . .",
        "target=\"$(uname -m)-unknown-linux-gnu\"",
        "cargo build --profile dist --locked --target \"$target\"",
        "--bin sigil --bin sigil-proxy",
        "cp \"target/$target/dist/sigil\" /sigil",
        "cp \"target/$target/dist/sigil-proxy\" /sigil-proxy",
    ] {
        assert!(build_text.contains(part), "{part:?} not in\n{build_text}");
    }
    // Static through the target's own rustflags: with --target given they stay off the build
    // scripts and proc-macros (which cannot be static) and are joined to .cargo/config.toml's
    // link flags, which RUSTFLAGS would replace.
    assert!(
        build_text.contains(
            "--config \"target.$target.rustflags = ['-C', 'target-feature=+crt-static']\""
        ),
        "{build_text}"
    );
    assert!(!build_text.contains("RUSTFLAGS"), "{build_text}");

    // Run: the binaries at /sigil, run as the entrypoint, and at the path the injector runs the
    // proxy from, as a non-root user by default, with the iptables that `sigil proxy init` runs.
    assert!(
        run.contains(&("COPY".into(), format!("--from={stage_name} /sigil /sigil"))),
        "{run:?}"
    );
    let proxy = sigil_ca::inject::PROXY_COMMAND;
    assert!(
        run.contains(&(
            "COPY".into(),
            format!("--from={stage_name} {proxy} {proxy}")
        )),
        "{run:?}"
    );
    assert!(
        run.contains(&("ENTRYPOINT".into(), r#"["/sigil"]"#.into())),
        "{run:?}"
    );
    assert!(
        !run.iter().any(|(i, _)| i == "CMD"),
        "arguments come from the pods"
    );
    let user = run
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, u)| u.clone())
        .unwrap();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0);
    let iptables = sigil_proxy::init::DEFAULT_IPTABLES;
    assert!(
        run.iter().any(|(i, rest)| i == "RUN"
            && rest.contains("apk add")
            && rest.split_whitespace().any(|w| w == iptables)),
        "{iptables}-save and {iptables}-restore are installed: {run:?}"
    );
    assert!(
        text.contains(&format!("-t sigil:{VERSION} .")),
        "the documented build command tags the manifests' image"
    );

    // The build context (the repository) keeps everything cargo needs and drops target/.
    let patterns: Vec<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(patterns.iter().any(|p| ignored(p, "target/debug/sigil")));
    for path in &needed {
        assert!(repo().join(path).exists(), "{path}");
        for pattern in &patterns {
            assert!(!ignored(pattern, path), "{pattern} excludes {path}");
        }
    }
}

/// deploy/overlays/dual-stack: the CA and the agents listen on `[::]` (both families) at the
/// base's ports, and the CA's Service asks for a cluster IP of each family; nothing else differs
/// from the base.
#[test]
fn the_dual_stack_overlay_listens_on_both_families_at_the_bases_ports() {
    let rendered = base();
    let dual_stack = dual_stack_overlay();
    let listeners: [(&str, &str, &str, &[&str]); 2] = [
        (
            "Deployment",
            "sigil-ca",
            "ca",
            &["listen", "admin_addr", "webhook_addr"],
        ),
        ("DaemonSet", "sigil-agent", "agent", &["admin_addr"]),
    ];
    for (kind_, name_, container_name, fields) in listeners {
        let before = parsed_config(find(&rendered, kind_, name_), container_name);
        let after = parsed_config(find(&dual_stack, kind_, name_), container_name);
        for f in fields {
            let base_addr = field(&before, f);
            assert!(
                base_addr.starts_with("0.0.0.0:"),
                "{name_} {f}: {base_addr}"
            );
            assert_eq!(
                field(&after, f),
                format!("[::]:{}", debug_port(base_addr)),
                "{name_} {f}"
            );
        }
        let changed: Vec<&String> = before
            .keys()
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert_eq!(changed.len(), fields.len(), "{name_}: {changed:?}");
    }
    let service = find(&dual_stack, "Service", "sigil-ca");
    assert_eq!(service["spec"]["ipFamilyPolicy"], "PreferDualStack");

    // Without those changes, the overlay is the base.
    let mut undone = dual_stack.clone();
    for object in &mut undone {
        let (object_kind, object_name) = (kind(object).to_string(), name(object).to_string());
        match (object_kind.as_str(), object_name.as_str()) {
            ("Service", "sigil-ca") => {
                object["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("ipFamilyPolicy");
            }
            ("Deployment", "sigil-ca") | ("DaemonSet", "sigil-agent") => {
                object["spec"]["template"]["spec"]["containers"][0]["args"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|arg| !arg.as_str().unwrap_or_default().contains("=[::]:"));
            }
            _ => {}
        }
    }
    let key = |o: &Value| {
        (
            kind(o).to_string(),
            namespace(o).to_string(),
            name(o).to_string(),
        )
    };
    let (mut undone, mut rendered) = (undone, rendered);
    undone.sort_by_key(key);
    rendered.sort_by_key(key);
    assert_eq!(undone, rendered);
}
