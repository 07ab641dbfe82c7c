use k8s_openapi::api::core::v1::{Pod, PodSpec as CorePodSpec, PodStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use sigil_identity::SpiffeId;
use sigil_proto::sigil::policy::v2::policy_discovery_client::PolicyDiscoveryClient;
use sigil_test_apiserver::{ServerOptions, TestApiServer};

use super::*;
use crate::attest::PodRef;
use crate::object_source::ClusterKind;
use crate::object_source::tests::{
    CRD_RETRY_WAIT, WAIT, failed_list, metrics, not_found, replace, until,
};
use crate::test_support::{BundleSource, TestAgent, TestCa, WEB_ID, this_uid};
use sigil_policy::envelope::VERSION;

const AP: Kind = Kind::AuthorizationPolicy;
const PA: Kind = Kind::PeerAuthentication;

fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An object with this selector (`None`: no selector) and otherwise an opaque spec.
fn object(
    kind: Kind,
    namespace: &str,
    name: &str,
    selector: Option<&[(&str, &str)]>,
) -> (ObjectKey, Arc<PolicyObject>) {
    let key = key(kind, namespace, name);
    let mut spec = json!({ "action": "ALLOW", "rules": [{}] });
    if let Some(selector) = selector {
        spec["selector"] = json!({ "matchLabels": labels(selector) });
    }
    let selector = match_labels(&spec).unwrap();
    let envelope = Envelope::new(kind, namespace, name);
    let object = PolicyObject::new(&envelope, spec, selector);
    (key, Arc::new(object))
}

fn snapshot(
    version: u64,
    objects: impl IntoIterator<Item = (ObjectKey, Arc<PolicyObject>)>,
) -> PolicySnapshot {
    PolicySnapshot {
        version,
        objects: objects.into_iter().collect(),
    }
}

fn keys<'a>(
    selected: impl IntoIterator<Item = (&'a ObjectKey, &'a Arc<PolicyObject>)>,
) -> Vec<String> {
    selected
        .into_iter()
        .map(|(key, _)| key.to_string())
        .collect()
}

/// The envelope sent for an object of the key's, with no creation time or uid.
fn sent_envelope(key: &ObjectKey) -> Option<wire::Envelope> {
    Some(wire::Envelope {
        kind: match key.kind {
            Kind::AuthorizationPolicy => wire::Kind::AuthorizationPolicy,
            Kind::PeerAuthentication => wire::Kind::PeerAuthentication,
        } as i32,
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        ..Default::default()
    })
}

fn object_keys(snapshot: &PolicySnapshot) -> Vec<String> {
    snapshot.objects.keys().map(ToString::to_string).collect()
}

// --- the policy file ---

const ALLOW_WEB: &str = "\
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: demo
  labels: {team: shop}
  annotations: {note: kept out}
spec:
  selector:
    matchLabels: {app: web}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/db]}}]
";

#[test]
fn a_good_file_parses_skipping_empty_documents() {
    let yaml = format!(
        "# the shop's policies\n---\n{ALLOW_WEB}---\n# nothing here\n---\n---\n\
             apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: sigil-system}}\n\
             spec: {{mtls: {{mode: STRICT}}}}\nstatus: {{observedGeneration: 3}}\n\
             ---\napiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: deny-all, namespace: demo}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: web, namespace: demo}}\n\
             spec: {{parentRefs: [{{kind: Service, name: web}}]}}\n\
             ---\napiVersion: sigil.dev/v1alpha1\nkind: BackendPolicy\n\
             metadata: {{name: web, namespace: demo}}\n"
    );
    // The route kinds are skipped here (the route feed reads them).
    let objects = parse_file(yaml.as_bytes()).unwrap();
    assert_eq!(
        objects.keys().cloned().collect::<Vec<_>>(),
        [
            key(AP, "demo", "allow-web"),
            key(AP, "demo", "deny-all"),
            key(PA, "sigil-system", "default"),
        ]
    );
    let allow_web = &objects[&key(AP, "demo", "allow-web")];
    assert_eq!(
        allow_web.spec(),
        &json!({
            "selector": { "matchLabels": { "app": "web" } },
            "action": "ALLOW",
            "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/demo/sa/db"] } }] }],
        })
    );
    // Sent compiled, under its envelope: the labels and annotations are dropped.
    let Some(wire::policy::Policy::AuthorizationPolicy(sent)) = &allow_web.wire().policy else {
        panic!(
            "sent as a valid AuthorizationPolicy: {:?}",
            allow_web.wire()
        );
    };
    assert_eq!(sent.envelope, sent_envelope(&key(AP, "demo", "allow-web")));
    assert_eq!(sent.action, wire::Action::Allow as i32);
    assert_eq!(
        sent.selector,
        [("app".to_string(), "web".to_string())].into()
    );
    assert_eq!(sent.rules.len(), 1);
    assert_eq!(allow_web.selector, Some(labels(&[("app", "web")])));
    // No spec is an empty spec (an ALLOW policy without rules); status is dropped.
    let deny_all = &objects[&key(AP, "demo", "deny-all")];
    assert_eq!(deny_all.spec(), &Value::Null);
    let Some(wire::policy::Policy::AuthorizationPolicy(sent)) = &deny_all.wire().policy else {
        panic!("sent as a valid AuthorizationPolicy: {:?}", deny_all.wire());
    };
    assert!(sent.rules.is_empty());
    assert_eq!(deny_all.selector, None);
    let strict = &objects[&key(PA, "sigil-system", "default")];
    assert_eq!(strict.spec(), &json!({ "mtls": { "mode": "STRICT" } }));
    let Some(wire::policy::Policy::PeerAuthentication(sent)) = &strict.wire().policy else {
        panic!("sent as a valid PeerAuthentication: {:?}", strict.wire());
    };
    assert_eq!(sent.mode, wire::MtlsMode::Strict as i32);

    for empty in ["", "---\n", "# no policies yet\n", "---\n---\n"] {
        assert!(
            parse_file(empty.as_bytes()).unwrap().is_empty(),
            "{empty:?}"
        );
    }
}

#[test]
fn a_bad_file_is_refused_naming_the_document_and_what_is_wrong() {
    let good = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n";
    let cases = [
            (
                "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: demo}\n".to_string(),
                "document 1: metadata.name is missing",
            ),
            (
                format!("{good}---\napiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: b}}\n"),
                "document 2: metadata.namespace is missing",
            ),
            (
                "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nspec: {}\n".into(),
                "document 1: metadata.name is missing",
            ),
            (
                "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: '', namespace: demo}\n".into(),
                "document 1: metadata.name must be a non-empty string",
            ),
            (
                "apiVersion: sigil.dev/v1alpha1\nmetadata: {name: a, namespace: demo}\n".into(),
                "document 1: kind is missing",
            ),
            (
                "apiVersion: sigil.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {name: a, namespace: demo}\n".into(),
                "document 1: kind \"RequestAuthentication\" is not AuthorizationPolicy or PeerAuthentication",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n".into(),
                "document 1: apiVersion is \"security.istio.io/v1\"; policies are sigil.dev/v1alpha1",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n".into(),
                "document 1: apiVersion is missing",
            ),
            (
                format!("{good}specs: {{action: DENY}}\n"),
                "document 1: unknown field `specs`; an object has apiVersion, kind, metadata and spec",
            ),
            ("- a\n- b\n".into(), "document 1: not a mapping"),
            (
                format!("{good}spec: {{selector: {{matchLabels: {{version: 2}}}}}}\n"),
                "document 1: spec.selector.matchLabels.version must be a string (quote it)",
            ),
            (
                format!("{good}spec: [ALLOW]\n"),
                "document 1: spec must be a mapping",
            ),
            (
                // Empty documents count: an editor's count of `---` finds the duplicate.
                format!("{good}---\n---\n{good}"),
                "document 3: AuthorizationPolicy demo/a is already document 1",
            ),
            ("kind: [".into(), "document 1: "),
        ];
    for (yaml, expected) in cases {
        let err = parse_file(yaml.as_bytes()).unwrap_err().to_string();
        assert!(
            err.starts_with(expected),
            "{yaml}\n  gave: {err}\n  want: {expected}"
        );
    }
}

#[test]
fn a_missing_or_invalid_file_at_start_up_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = PolicyFile::load(&dir.path().join("absent.yaml")).unwrap_err();
    assert!(matches!(missing, PolicyError::Read(_)), "{missing:?}");
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, "apiVersion: v1\nkind: ConfigMap\n").unwrap();
    let invalid = PolicyFile::load(&path).unwrap_err();
    assert!(
        matches!(invalid, PolicyError::Document { document: 1, .. }),
        "{invalid:?}"
    );
}

/// The file source alone, on paused time: each poll is exactly one FILE_POLL_INTERVAL.
#[tokio::test(start_paused = true)]
async fn the_file_is_reloaded_on_change_and_a_bad_edit_keeps_the_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, ALLOW_WEB).unwrap();
    let metrics = metrics();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: None,
        file: Some(PolicyFile::load(&path).unwrap()),
    };
    let rx = spawn(sources, metrics.clone(), shutdown);
    let first = until(&rx, WAIT, PolicySnapshot::is_synced).await;
    assert_eq!(first.version, 1);
    assert_eq!(object_keys(&first), ["AuthorizationPolicy demo/allow-web"]);
    assert_eq!(metrics.policy_objects.get(), 1);

    // Invalid, then unreadable: logged and counted once each, the objects kept.
    replace(&path, format!("{ALLOW_WEB}---\nkind: PeerAuthentication\n"));
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(metrics.policy_file_reload_failures.get(), 1);
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(metrics.policy_file_reload_failures.get(), 2);
    assert_eq!(*rx.borrow(), first, "nothing published");

    // A valid edit is published within one poll; the same objects rewritten are not a change.
    let edit = format!(
        "{ALLOW_WEB}---\napiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: demo}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    );
    replace(&path, &edit);
    let written = tokio::time::Instant::now();
    let second = until(&rx, WAIT, |snapshot| snapshot.version == 2).await;
    assert!(written.elapsed() <= FILE_POLL_INTERVAL);
    assert_eq!(
        object_keys(&second),
        [
            "AuthorizationPolicy demo/allow-web",
            "PeerAuthentication demo/default"
        ]
    );
    assert_eq!(metrics.policy_objects.get(), 2);
    replace(&path, format!("# same objects\n{edit}"));
    tokio::time::sleep(FILE_POLL_INTERVAL * 3).await;
    assert_eq!(rx.borrow().version, 2);
    assert_eq!(metrics.policy_file_reload_failures.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_sources_no_policies_are_published_and_shutdown_ends_it() {
    let (stop, shutdown) = watch::channel(false);
    let mut rx = spawn(Sources::default(), metrics(), shutdown);
    let snapshot = until(&rx, WAIT, PolicySnapshot::is_synced).await;
    assert!(snapshot.objects.is_empty());
    rx.borrow_and_update();
    stop.send_replace(true);
    assert!(rx.changed().await.is_err(), "the sender is gone");
}

// --- selection ---

#[test]
fn selection_takes_the_namespace_s_and_the_mesh_wide_objects_whose_selector_matches() {
    let web = [("app", "web")];
    let snapshot = snapshot(
        1,
        [
            object(AP, "demo", "namespace-wide", None),
            object(AP, "demo", "web", Some(&web)),
            object(AP, "demo", "db", Some(&[("app", "db")])),
            object(
                AP,
                "demo",
                "web-v2",
                Some(&[("app", "web"), ("version", "v2")]),
            ),
            object(AP, "demo", "empty-selector", Some(&[])),
            object(AP, "shop", "other-namespace", None),
            object(AP, ROOT_NAMESPACE, "mesh-wide", None),
            object(AP, ROOT_NAMESPACE, "mesh-web", Some(&web)),
            object(AP, ROOT_NAMESPACE, "mesh-db", Some(&[("app", "db")])),
            object(PA, "demo", "strict", None),
            object(PA, "shop", "permissive", None),
            object(PA, ROOT_NAMESPACE, "default", None),
        ],
    );
    let scope = |namespace: &str, pairs: &[(&str, &str)]| Scope {
        namespace: namespace.into(),
        labels: labels(pairs),
    };
    let cases: [(&str, Scope, &[&str]); 5] = [
        (
            "web v1 in demo",
            scope("demo", &[("app", "web"), ("version", "v1")]),
            &[
                "AuthorizationPolicy demo/empty-selector",
                "AuthorizationPolicy demo/namespace-wide",
                "AuthorizationPolicy demo/web",
                "AuthorizationPolicy sigil-system/mesh-web",
                "AuthorizationPolicy sigil-system/mesh-wide",
                "PeerAuthentication demo/strict",
                "PeerAuthentication sigil-system/default",
            ],
        ),
        (
            "unlabelled in demo",
            scope("demo", &[]),
            &[
                "AuthorizationPolicy demo/empty-selector",
                "AuthorizationPolicy demo/namespace-wide",
                "AuthorizationPolicy sigil-system/mesh-wide",
                "PeerAuthentication demo/strict",
                "PeerAuthentication sigil-system/default",
            ],
        ),
        (
            "web in another namespace",
            scope("shop", &web),
            &[
                "AuthorizationPolicy shop/other-namespace",
                "AuthorizationPolicy sigil-system/mesh-web",
                "AuthorizationPolicy sigil-system/mesh-wide",
                "PeerAuthentication shop/permissive",
                "PeerAuthentication sigil-system/default",
            ],
        ),
        (
            "no namespace: only mesh-wide",
            scope("", &web),
            &[
                "AuthorizationPolicy sigil-system/mesh-web",
                "AuthorizationPolicy sigil-system/mesh-wide",
                "PeerAuthentication sigil-system/default",
            ],
        ),
        (
            "in the root namespace, each object once",
            scope(ROOT_NAMESPACE, &[("app", "db")]),
            &[
                "AuthorizationPolicy sigil-system/mesh-db",
                "AuthorizationPolicy sigil-system/mesh-wide",
                "PeerAuthentication sigil-system/default",
            ],
        ),
    ];
    for (what, scope, expected) in cases {
        assert_eq!(keys(snapshot.select(&scope)), expected, "{what}");
    }
}

fn node_pod(uid: &str, labels: &BTreeMap<String, String>, phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid.into()),
            namespace: Some("demo".into()),
            name: Some("web-1".into()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(CorePodSpec {
            service_account_name: Some("web".into()),
            ..CorePodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        }),
    }
}

fn pod_workload(uid: &str) -> Workload {
    Workload {
        id: WEB_ID.parse().unwrap(),
        pod: Some(PodRef {
            namespace: "demo".into(),
            name: "web-1".into(),
            uid: uid.into(),
        }),
        labels: labels(&[("app", "web")]),
    }
}

#[test]
fn a_workload_s_scope_comes_from_its_pod_or_its_id_and_entry() {
    let mut pods = NodePods::default();
    pods.apply(&node_pod(
        "uid-1",
        &labels(&[("app", "web"), ("v", "2")]),
        "Running",
    ));
    let pod = pod_workload("uid-1");
    assert_eq!(
        Scope::of(&pod, Some(&pods)),
        Some(Scope {
            namespace: "demo".into(),
            labels: labels(&[("app", "web"), ("v", "2")]),
        }),
        "the pod's labels now, not those attested"
    );
    assert_eq!(Scope::of(&pod_workload("uid-gone"), Some(&pods)), None);
    assert_eq!(Scope::of(&pod, None), None);

    let unix = |id: &str| Workload {
        id: SpiffeId::parse(id).unwrap(),
        pod: None,
        labels: labels(&[("app", "db")]),
    };
    assert_eq!(
        Scope::of(&unix("spiffe://cluster.local/ns/shop/sa/db"), None),
        Some(Scope {
            namespace: "shop".into(),
            labels: labels(&[("app", "db")]),
        })
    );
    assert_eq!(
        Scope::of(&unix("spiffe://cluster.local/vm/db"), Some(&pods)),
        Some(Scope {
            namespace: String::new(),
            labels: labels(&[("app", "db")]),
        }),
        "an ID without a namespace"
    );
}

/// One stream for a pod, driven directly: its set follows its labels, and only changes to
/// what applies to it are sent.
#[tokio::test(start_paused = true)]
async fn a_pod_gets_a_new_set_when_its_labels_change_and_only_then() {
    let objects = [
        object(AP, "demo", "namespace-wide", None),
        object(AP, "demo", "web", Some(&[("app", "web")])),
        object(AP, "demo", "db", Some(&[("app", "db")])),
    ];
    let (policies_tx, policies) = watch::channel(Arc::new(snapshot(1, objects.clone())));
    let web = labels(&[("app", "web")]);
    let (pods_tx, pods) = watch::channel(NodePods::default());
    pods_tx.send_modify(|pods| pods.apply(&node_pod("uid-1", &web, "Pending")));
    let metrics = metrics();
    let mut feed = Feed {
        workload: pod_workload("uid-1"),
        policies,
        pods: Some(pods),
        sent: None,
        version: 0,
        pushes: Counter::default(),
        _open: OpenStream::new(&metrics, SocketApi::Policy),
    };
    let json = |i: usize| objects[i].1.wire().clone();

    let first = feed.next_message().await.unwrap();
    assert_eq!(
        first,
        PolicySet {
            version: 1,
            namespace: "demo".into(),
            labels: web.clone().into_iter().collect(),
            policies: vec![json(0), json(1)],
        }
    );
    let quiet = Duration::from_secs(5);
    // The pod starts running: a pod update that changes nothing here.
    pods_tx.send_modify(|pods| pods.apply(&node_pod("uid-1", &web, "Running")));
    assert!(
        tokio::time::timeout(quiet, feed.next_message())
            .await
            .is_err()
    );

    let db = labels(&[("app", "db")]);
    pods_tx.send_modify(|pods| pods.apply(&node_pod("uid-1", &db, "Running")));
    let relabelled = feed.next_message().await.unwrap();
    assert_eq!(relabelled.version, 2);
    assert_eq!(relabelled.policies, [json(2), json(0)], "sorted by name");
    assert_eq!(relabelled.labels, db.clone().into_iter().collect());

    // A policy that does not apply to it changes; then one that does.
    let mut changed = snapshot(2, objects.clone());
    changed.objects.extend([object(
        AP,
        "demo",
        "web",
        Some(&[("app", "web"), ("v", "2")]),
    )]);
    policies_tx.send_replace(Arc::new(changed.clone()));
    assert!(
        tokio::time::timeout(quiet, feed.next_message())
            .await
            .is_err()
    );
    changed.version = 3;
    changed
        .objects
        .extend([object(AP, "demo", "db", Some(&[]))]);
    let extra = changed.objects[&key(AP, "demo", "db")].wire().clone();
    policies_tx.send_replace(Arc::new(changed));
    let updated = feed.next_message().await.unwrap();
    assert_eq!(updated.version, 3);
    assert_eq!(updated.policies, [extra, json(0)]);

    // The pod leaves the node: nothing more is sent for it.
    pods_tx.send_modify(|pods| pods.delete(&node_pod("uid-1", &db, "Running")));
    assert!(
        tokio::time::timeout(quiet, feed.next_message())
            .await
            .is_err()
    );
    drop(policies_tx);
    assert!(matches!(
        feed.next_message().await,
        Err(PolicyError::ShuttingDown)
    ));
}

// --- the Kubernetes source, against the test API server ---

fn crd(kind: Kind) -> CustomResourceDefinition {
    object_source::tests::crd(GROUP, VERSION, kind.plural(), kind.name())
}

async fn install_crds(server: &TestApiServer) {
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for kind in Kind::ALL {
        crds.create(&PostParams::default(), &crd(kind))
            .await
            .unwrap();
    }
}

fn cluster_api(server: &TestApiServer, kind: Kind, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), namespace, &cluster::api_resource(kind))
}

async fn create(server: &TestApiServer, kind: Kind, namespace: &str, name: &str, spec: Value) {
    let mut object =
        DynamicObject::new(name, &cluster::api_resource(kind)).data(json!({ "spec": spec }));
    object.metadata.labels = Some(labels(&[("team", "shop")]));
    cluster_api(server, kind, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

fn spec_of(snapshot: &PolicySnapshot, key: &ObjectKey) -> Option<Value> {
    snapshot
        .objects
        .get(key)
        .map(|object| object.spec().clone())
}

#[tokio::test]
async fn cluster_policies_follow_creates_updates_and_deletes_and_win_over_the_file() {
    let server = TestApiServer::start().await;
    install_crds(&server).await;
    create(
        &server,
        AP,
        "demo",
        "allow-web",
        json!({ "action": "ALLOW", "rules": [{}] }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(
        &path,
        "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: allow-web, namespace: demo}\nspec: {action: DENY}\n\
             ---\napiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: file-only, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n",
    )
    .unwrap();

    let metrics = metrics();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(server.client()),
        file: Some(PolicyFile::load(&path).unwrap()),
    };
    let rx = spawn(sources, metrics.clone(), shutdown);
    let synced = until(&rx, WAIT, PolicySnapshot::is_synced).await;
    let allow_web = key(AP, "demo", "allow-web");
    assert_eq!(
        object_keys(&synced),
        [
            "AuthorizationPolicy demo/allow-web",
            "PeerAuthentication demo/file-only"
        ]
    );
    // The cluster's object, as the user wrote it, and sent compiled under its envelope:
    // its creation time and uid kept, no labels, resourceVersion...
    let object = &synced.objects[&allow_web];
    assert_eq!(object.spec(), &json!({ "action": "ALLOW", "rules": [{}] }));
    let Some(wire::policy::Policy::AuthorizationPolicy(sent)) = &object.wire().policy else {
        panic!("sent as a valid AuthorizationPolicy: {:?}", object.wire());
    };
    let envelope = sent.envelope.clone().unwrap();
    assert_eq!(
        (envelope.namespace.as_str(), envelope.name.as_str()),
        ("demo", "allow-web")
    );
    assert!(!envelope.creation_timestamp.is_empty());
    assert!(!envelope.uid.is_empty());
    assert_eq!(metrics.policy_objects.get(), 2);

    // A status write changes nothing that is sent.
    let aps = cluster_api(&server, AP, "demo");
    aps.patch_status(
        "allow-web",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "observedGeneration": 1 } })),
    )
    .await
    .unwrap();
    // A spec change is.
    aps.patch(
        "allow-web",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "action": "AUDIT" } })),
    )
    .await
    .unwrap();
    let updated = until(&rx, WAIT, |s| s.version > synced.version).await;
    assert_eq!(
        updated.version,
        synced.version + 1,
        "the status write was not published"
    );
    assert_eq!(
        spec_of(&updated, &allow_web),
        Some(json!({ "action": "AUDIT", "rules": [{}] }))
    );

    create(
        &server,
        PA,
        ROOT_NAMESPACE,
        "default",
        json!({ "mtls": { "mode": "STRICT" } }),
    )
    .await;
    let grown = until(&rx, WAIT, |s| s.objects.len() == 3).await;
    assert_eq!(
        spec_of(&grown, &key(PA, ROOT_NAMESPACE, "default")),
        Some(json!({ "mtls": { "mode": "STRICT" } }))
    );
    assert_eq!(metrics.policy_objects.get(), 3);

    // Deleted from the cluster: the file's object of that name applies again.
    aps.delete("allow-web", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = until(&rx, WAIT, |s| {
        spec_of(s, &allow_web) == Some(json!({ "action": "DENY" }))
    })
    .await;
    assert_eq!(deleted.objects.len(), 3);
}

#[tokio::test]
async fn without_the_crds_the_cluster_has_no_policies_until_they_are_installed() {
    let server = TestApiServer::start_with(ServerOptions {
        serve_undefined_resources: false,
        ..ServerOptions::default()
    })
    .await;
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(server.client()),
        file: None,
    };
    let rx = spawn(sources, metrics(), shutdown);
    let synced = until(&rx, WAIT, PolicySnapshot::is_synced).await;
    assert!(synced.objects.is_empty(), "ready, with no cluster policies");

    install_crds(&server).await;
    create(
        &server,
        AP,
        "demo",
        "deny-all",
        json!({ "action": "DENY", "rules": [{}] }),
    )
    .await;
    let installed = until(&rx, CRD_RETRY_WAIT, |s| !s.objects.is_empty()).await;
    assert_eq!(
        object_keys(&installed),
        ["AuthorizationPolicy demo/deny-all"]
    );
}

#[test]
fn a_missing_crd_is_an_empty_synced_source_until_it_is_listed() {
    let mut state = ClusterKind::default();
    assert!(!state.on_event(AP, Ok(Event::Init)));
    assert!(state.on_event(AP, not_found()), "synced: publish");
    assert!(state.listed.synced && state.missing && state.listed.items.is_empty());
    // The watcher retries: still missing is no change (and not warned about again).
    assert!(!state.on_event(AP, Ok(Event::Init)));
    assert!(!state.on_event(AP, not_found()));

    // The CRD is installed.
    let resource = cluster::api_resource(AP);
    let deny = DynamicObject::new("deny-all", &resource)
        .within("demo")
        .data(json!({ "spec": { "action": "DENY" } }));
    assert!(!state.on_event(AP, Ok(Event::Init)));
    assert!(!state.on_event(AP, Ok(Event::InitApply(deny.clone()))));
    assert!(state.on_event(AP, Ok(Event::InitDone)));
    assert!(!state.missing);
    assert_eq!(state.listed.items.len(), 1);
    assert!(
        !state.on_event(AP, Ok(Event::Apply(deny.clone()))),
        "unchanged"
    );
    // Other failures change nothing: without permission to list, say, the policies are
    // not known, and not taken to be none.
    assert!(!state.on_event(AP, Err(watcher::Error::NoResourceVersion)));
    assert!(!state.on_event(AP, failed_list("forbidden", "Forbidden", 403)));
    assert_eq!(state.listed.items.len(), 1);
    // The CRD is deleted, and its objects with it; the 404 came as plain text, which the
    // client could not parse as a Status.
    let plain_404 = failed_list("404 page not found", "Failed to parse error data", 404);
    assert!(state.on_event(AP, plain_404));
    assert!(state.missing && state.listed.items.is_empty());
    let mut unsynced = ClusterKind::default();
    assert!(!unsynced.on_event(AP, failed_list("forbidden", "Forbidden", 403)));
    assert!(!unsynced.listed.synced);
}

#[test]
fn a_cluster_object_with_a_malformed_selector_goes_to_its_whole_namespace() {
    let resource = cluster::api_resource(AP);
    let object = DynamicObject::new("odd", &resource)
        .within("demo")
        .data(json!({ "spec": { "selector": { "matchLabels": { "version": 2 } } } }));
    let (key, object) = cluster_object(AP, &object).unwrap();
    assert_eq!(key, self::key(AP, "demo", "odd"));
    assert!(object.selects(&BTreeMap::new()));
    assert_eq!(
        object.spec(),
        &json!({ "selector": { "matchLabels": { "version": 2 } } }),
    );
    // Sent as invalid, for the proxies to enforce its stand-in in the whole namespace.
    let Some(wire::policy::Policy::Invalid(sent)) = &object.wire().policy else {
        panic!("sent as invalid: {:?}", object.wire());
    };
    assert!(sent.selector.is_empty());
    assert_eq!(sent.stand_in, wire::StandIn::AllowNothing as i32);
}

#[tokio::test]
async fn nothing_is_published_before_the_cluster_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, ALLOW_WEB).unwrap();
    let server = TestApiServer::start().await;
    let client = server.client();
    server.shutdown().await;
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: Some(client),
        file: Some(PolicyFile::load(&path).unwrap()),
    };
    let rx = spawn(sources, metrics(), shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !rx.borrow().is_synced(),
        "the file alone is not every policy"
    );
}

// --- the gRPC service on a real socket ---

impl TestAgent {
    async fn policy_client(&self) -> PolicyDiscoveryClient<tonic::transport::Channel> {
        PolicyDiscoveryClient::new(self.channel().await)
    }

    /// Serves what the policy task publishes from now on.
    fn follow(&self, mut policies: watch::Receiver<Arc<PolicySnapshot>>) {
        let tx = self.policy_tx.clone();
        tokio::spawn(async move {
            loop {
                tx.send_replace(policies.borrow_and_update().clone());
                if policies.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn serve(unix_map: &str) -> TestAgent {
    let ca = TestCa::prepare().await;
    TestAgent::serve(
        SocketApi::Policy,
        ca,
        Duration::from_secs(3600),
        unix_map,
        BundleSource::Test,
    )
    .await
}

const MESH_STRICT: &str = "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\n\
                               metadata: {name: default, namespace: sigil-system}\n\
                               spec: {mtls: {mode: STRICT}}\n";

#[tokio::test]
async fn an_attested_caller_gets_its_set_then_each_change_to_it_once() {
    let uid = this_uid();
    let agent = serve(&format!(
        "workloads:\n- {{uid: {uid}, id: {WEB_ID}, labels: {{app: web}}}}\n"
    ))
    .await;
    let mut client = agent.policy_client().await;
    let mut stream = client
        .watch_policies(WatchPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    // Not synced yet: nothing is sent until it is.
    let mut first = Box::pin(stream.message());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut first)
            .await
            .is_err()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    let not_web = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                       metadata: {name: db, namespace: demo}\n\
                       spec: {selector: {matchLabels: {app: db}}, action: DENY}\n";
    std::fs::write(&path, format!("{ALLOW_WEB}---\n{not_web}")).unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let sources = Sources {
        kubernetes: None,
        file: Some(PolicyFile::load(&path).unwrap()),
    };
    let policies = spawn(sources, metrics(), shutdown);
    agent.follow(policies.clone());
    let message = tokio::time::timeout(WAIT, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let allow_web = policies.borrow().objects[&key(AP, "demo", "allow-web")]
        .wire()
        .clone();
    assert_eq!(
        message,
        PolicySet {
            version: 1,
            namespace: "demo".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            policies: vec![allow_web.clone()],
        }
    );
    assert_eq!(agent.streams_open(), 1);

    // A policy that applies to it appears: sent within a poll of the file.
    replace(
        &path,
        format!("{ALLOW_WEB}---\n{not_web}---\n{MESH_STRICT}"),
    );
    let written = std::time::Instant::now();
    let message = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        written.elapsed() < FILE_POLL_INTERVAL + Duration::from_millis(500),
        "{:?}",
        written.elapsed()
    );
    assert_eq!(message.version, 2);
    let mesh_strict = policies.borrow().objects[&key(PA, ROOT_NAMESPACE, "default")]
        .wire()
        .clone();
    assert_eq!(message.policies, [allow_web, mesh_strict]);

    // One that does not apply to it changes: nothing is sent.
    let audit = not_web.replace("DENY", "AUDIT");
    replace(&path, format!("{ALLOW_WEB}---\n{audit}---\n{MESH_STRICT}"));
    until(&policies, WAIT, |s| s.version == 3).await;
    assert!(
        tokio::time::timeout(FILE_POLL_INTERVAL, stream.message())
            .await
            .is_err()
    );
    assert_eq!(agent.pushes(), 2);
}

#[tokio::test]
async fn an_unattested_caller_is_refused() {
    let uid = this_uid();
    let agent = serve(&format!(
        "workloads:\n- {{uid: {uid}, path: /usr/bin/not-this-test, id: {WEB_ID}}}\n"
    ))
    .await;
    agent.policy_tx.send_replace(Arc::new(snapshot(1, [])));
    let refused = agent
        .policy_client()
        .await
        .watch_policies(WatchPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(refused.message(), "caller could not be attested");
    assert_eq!(agent.metrics.attestation_failures.get(), 1);
    assert_eq!(agent.streams_open(), 0);
}
