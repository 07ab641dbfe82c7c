use super::*;
use crate::conditions::{CUT, MAX_MESSAGE_LEN, bounded};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use prometheus_client::registry::Registry;
use serde_json::Value;
use sigil_test_apiserver::{ServerOptions, TestApiServer, parse_manifest};

const AP: Kind = Kind::AuthorizationPolicy;
const PA: Kind = Kind::PeerAuthentication;
const CRDS: [&str; 2] = [
    include_str!("../../../deploy/crds/authorizationpolicies.sigil.dev.yaml"),
    include_str!("../../../deploy/crds/peerauthentications.sigil.dev.yaml"),
];
const WAIT: Duration = Duration::from_secs(10);
/// The watcher's longest backoff (30 s) and then some: how long a CRD installed late may take.
const CRD_RETRY_WAIT: Duration = Duration::from_secs(40);
const HTTP_RULES: &str = r#"{"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}"#;

fn key(kind: Kind, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: "demo".into(),
        name: name.into(),
    }
}

fn object(key: &ObjectKey, spec: Value) -> DynamicObject {
    DynamicObject::new(&key.name, &api_resource(key.kind))
        .within(&key.namespace)
        .data(json!({ "spec": spec }))
}

fn time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap())
}

fn parsed(json: &str) -> Value {
    serde_json::from_str(json).unwrap()
}

#[test]
fn verdicts_are_the_validation_of_what_the_proxies_get() {
    let ap = key(AP, "p");
    let verdict_of = |spec: Value| verdict(&ap, &object(&ap, spec));
    assert_eq!(
        verdict_of(
            json!({ "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/a/sa/b"] } }] }] })
        ),
        Verdict::Valid {
            warnings: vec![],
            http_fields: false
        }
    );
    assert_eq!(
            verdict_of(parsed(HTTP_RULES)),
            Verdict::Valid {
                warnings: vec!["rules[0]: uses HTTP fields (methods); on non-HTTP connections they never match in ALLOW and always match in DENY: in this ALLOW policy the rule never matches them".into()],
                http_fields: true
            }
        );
    assert_eq!(
            verdict_of(json!({ "action": "DENY" })),
            Verdict::Invalid(vec!["rules: a DENY policy without rules never matches; add `rules: [{}]` to deny every request".into()])
        );
    // Fields the schema would have pruned are still refused if they get here (an older CRD).
    let Verdict::Invalid(problems) =
        verdict_of(json!({ "rules": [{ "from": [{ "source": { "principal": [] } }] }] }))
    else {
        panic!("an unknown field is invalid");
    };
    assert!(
        problems[0].starts_with("rules[0].from[0].source.principal: unknown field"),
        "{problems:?}"
    );
    // Status and server-written metadata are not the policy's business.
    let mut with_status = object(&ap, json!({ "rules": [{}] }));
    with_status.metadata.generation = Some(3);
    with_status.data["status"] = json!({ "conditions": [{ "type": "Other" }] });
    assert!(matches!(verdict(&ap, &with_status), Verdict::Valid { .. }));
    let pa = key(PA, "p");
    let no_spec = DynamicObject::new("p", &api_resource(PA)).within("demo");
    assert!(matches!(verdict(&pa, &no_spec), Verdict::Valid { .. }));
}

#[test]
fn conditions_keep_their_transition_time_until_their_status_changes() {
    let valid = Verdict::Valid {
        warnings: vec![],
        http_fields: false,
    };
    let first = conditions(&valid, Some(1), &[], &time(100));
    assert_eq!(
        serde_json::to_value(&first).unwrap(),
        json!([
            { "type": "Valid", "status": "True", "reason": "Valid", "message": "The policy is valid",
              "observedGeneration": 1, "lastTransitionTime": "1970-01-01T00:01:40Z" },
            { "type": "Warnings", "status": "False", "reason": "NoWarnings", "message": "No warnings",
              "observedGeneration": 1, "lastTransitionTime": "1970-01-01T00:01:40Z" },
        ])
    );
    // A new generation, same verdict: only observedGeneration changes.
    let second = conditions(&valid, Some(2), &first, &time(200));
    assert_eq!(second[0].last_transition_time, time(100));
    assert_eq!(second[0].observed_generation, Some(2));

    let warned = Verdict::Valid {
        warnings: vec!["a".into(), "b".into()],
        http_fields: false,
    };
    let third = conditions(&warned, Some(3), &second, &time(300));
    assert_eq!(third[0].last_transition_time, time(100), "still valid");
    assert_eq!(
        (third[1].status.as_str(), third[1].reason.as_str()),
        ("True", "Warnings")
    );
    assert_eq!(third[1].message, "a; b");
    assert_eq!(third[1].last_transition_time, time(300));

    let invalid = Verdict::Invalid(vec!["x: bad".into(), "y: worse".into()]);
    let fourth = conditions(&invalid, Some(4), &third, &time(400));
    assert_eq!(
        (fourth[0].status.as_str(), fourth[0].reason.as_str()),
        ("False", "Invalid")
    );
    assert_eq!(fourth[0].message, "x: bad; y: worse");
    assert_eq!(fourth[0].last_transition_time, time(400));
    assert_eq!(
        (fourth[1].status.as_str(), fourth[1].reason.as_str()),
        ("Unknown", "Invalid")
    );
}

#[test]
fn long_messages_are_cut_to_what_a_condition_holds() {
    let problems = vec!["é".repeat(MAX_MESSAGE_LEN)];
    let [valid, _] = conditions(&Verdict::Invalid(problems), None, &[], &time(0));
    assert!(valid.message.len() <= MAX_MESSAGE_LEN);
    assert!(valid.message.ends_with(CUT));
    assert_eq!(bounded("short".into()), "short");
}

// --- against the test API server, with the real CRDs ---

async fn install_crds(server: &TestApiServer) {
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for text in CRDS {
        for crd in parse_manifest(text).unwrap() {
            let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
    }
}

fn api(server: &TestApiServer, key: &ObjectKey) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), &key.namespace, &api_resource(key.kind))
}

async fn create(server: &TestApiServer, key: &ObjectKey, spec: Value) {
    api(server, key)
        .create(&PostParams::default(), &object(key, spec))
        .await
        .unwrap();
}

/// Polls the object until `done` holds for its (Valid, Warnings) conditions.
async fn until(
    server: &TestApiServer,
    key: &ObjectKey,
    wait: Duration,
    done: impl Fn(&DynamicObject, &Condition, &Condition) -> bool,
) -> (DynamicObject, Condition, Condition) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let object = api(server, key).get(&key.name).await.unwrap();
        let current = current_conditions(&object);
        let find = |t: &str| current.iter().find(|c| c.type_ == t).cloned();
        if let (Some(valid), Some(warnings)) = (find(VALID), find(WARNINGS))
            && done(&object, &valid, &warnings)
        {
            return (object, valid, warnings);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never reached the expected status: {:?}",
            object.data.get("status")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status(condition: &Condition) -> (&str, &str) {
    (&condition.status, &condition.reason)
}

fn new_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&mut Registry::default()))
}

#[tokio::test]
async fn conditions_follow_the_policies_and_are_written_only_when_they_change() {
    let server = TestApiServer::start().await;
    install_crds(&server).await;
    let metrics = new_metrics();
    tokio::spawn(run(server.client(), metrics.clone()));

    let good = key(AP, "good");
    create(
            &server,
            &good,
            json!({ "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/demo/sa/web"] } }] }] }),
        )
        .await;
    let (_, valid, warnings) = until(&server, &good, WAIT, |_, _, _| true).await;
    assert_eq!(status(&valid), ("True", "Valid"));
    assert_eq!(status(&warnings), ("False", "NoWarnings"));
    assert_eq!(valid.observed_generation, Some(1));

    let bad = key(AP, "bad");
    create(
            &server,
            &bad,
            json!({ "rules": [{ "from": [{ "source": {
                "principals": ["cluster.local/ns/demo/sa/web"], "serviceAccounts": ["demo/web"] } }] }] }),
        )
        .await;
    let (_, valid, warnings) = until(&server, &bad, WAIT, |_, _, _| true).await;
    assert_eq!(status(&valid), ("False", "Invalid"));
    assert_eq!(
        valid.message,
        "rules[0].from[0].source: use either principals or serviceAccounts, not both"
    );
    assert_eq!(status(&warnings), ("Unknown", "Invalid"));

    let http = key(AP, "http");
    create(&server, &http, parsed(HTTP_RULES)).await;
    let (_, valid, warnings) = until(&server, &http, WAIT, |_, _, _| true).await;
    assert_eq!(status(&valid), ("True", "Valid"));
    assert_eq!(status(&warnings), ("True", "HttpFieldsOnTcp"));
    assert!(
        warnings
            .message
            .starts_with("rules[0]: uses HTTP fields (methods)"),
        "{}",
        warnings.message
    );

    // A PeerAuthentication with a selector in the root namespace is ignored: a warning.
    let in_root = ObjectKey {
        namespace: "sigil-system".into(),
        ..key(PA, "root-selector")
    };
    create(
        &server,
        &in_root,
        json!({ "selector": { "matchLabels": { "app": "web" } }, "mtls": { "mode": "STRICT" } }),
    )
    .await;
    let (_, valid, warnings) = until(&server, &in_root, WAIT, |_, _, _| true).await;
    assert_eq!(status(&valid), ("True", "Valid"));
    assert_eq!(status(&warnings), ("True", "Warnings"));
    assert!(
        warnings.message.starts_with("selector: "),
        "{}",
        warnings.message
    );

    // The fix: a new generation, valid, with a new transition time.
    let (before, old_valid, _) = until(&server, &bad, WAIT, |_, _, _| true).await;
    api(&server, &bad)
            .patch(
                "bad",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "rules": [{ "from": [{ "source": { "serviceAccounts": ["demo/web"] } }] }] } })),
            )
            .await
            .unwrap();
    let (fixed, valid, warnings) =
        until(&server, &bad, WAIT, |_, valid, _| valid.status == "True").await;
    assert_eq!(before.metadata.generation, Some(1));
    assert_eq!(fixed.metadata.generation, Some(2));
    assert_eq!(valid.observed_generation, Some(2));
    assert_eq!(warnings.observed_generation, Some(2));
    assert_eq!(status(&warnings), ("False", "NoWarnings"));
    assert!(valid.last_transition_time >= old_valid.last_transition_time);

    // Nothing changed: a second writer (another CA replica, or this one re-listing) that
    // sees the objects as they are now writes nothing.
    let writes = metrics.policy_status_writes.get();
    let revision = server.resource_version();
    let replica_metrics = new_metrics();
    let mut replica = StatusWriter::new(server.client(), replica_metrics.clone());
    for kind in Kind::ALL {
        let all: Api<DynamicObject> = Api::all_with(server.client(), &api_resource(kind));
        for object in all.list(&Default::default()).await.unwrap() {
            replica.on_event(kind, Ok(Event::InitApply(object))).await;
        }
    }
    assert_eq!(replica_metrics.policy_status_writes.get(), 0);
    assert_eq!(
        server.resource_version(),
        revision,
        "no write reached the server"
    );

    // A change that leaves the verdict as it was (a label) writes nothing either: the next
    // write is the new object's alone. And a writer judging the version before that change
    // (as if its status were missing, so it would write) fails the resourceVersion
    // precondition: dropped, not counted as a failure, not retried.
    let mut stale = api(&server, &good).get("good").await.unwrap();
    api(&server, &good)
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "web" } } })),
        )
        .await
        .unwrap();
    stale.data["status"] = Value::Null;
    replica.on_event(AP, Ok(Event::Apply(stale))).await;
    assert_eq!(replica_metrics.policy_status_writes.get(), 0);
    assert_eq!(replica_metrics.policy_status_write_failures.get(), 0);
    assert!(replica.pending.is_empty());
    let after = key(AP, "after");
    create(&server, &after, json!({ "rules": [{}] })).await;
    until(&server, &after, WAIT, |_, _, _| true).await;
    assert_eq!(metrics.policy_status_writes.get(), writes + 1);
    assert_eq!(metrics.policy_status_write_failures.get(), 0);
}

#[tokio::test]
async fn without_the_crds_conditions_are_written_once_they_are_installed() {
    let server = TestApiServer::start_with(ServerOptions {
        serve_undefined_resources: false,
        ..ServerOptions::default()
    })
    .await;
    tokio::spawn(run(server.client(), new_metrics()));
    // Let the first lists fail.
    tokio::time::sleep(Duration::from_millis(200)).await;
    install_crds(&server).await;
    let late = key(PA, "late");
    create(&server, &late, json!({ "mtls": { "mode": "PERMISSIVE" } })).await;
    let (_, valid, _) = until(&server, &late, CRD_RETRY_WAIT, |_, _, _| true).await;
    assert_eq!(status(&valid), ("True", "Valid"));
}
