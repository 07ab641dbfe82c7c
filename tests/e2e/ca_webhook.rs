//! The injection webhook as the API server meets it: a real `sigil ca serve` on the Kubernetes
//! API test double keeps the MutatingWebhookConfiguration's caBundle current, and answers
//! AdmissionReview documents over HTTPS that verify against that caBundle under the Service's
//! DNS name, exactly as the API server calls a webhook.

use std::net::SocketAddr;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use sigil_test_apiserver::TestApiServer;
use sigil_test_harness::admission::apply;
use sigil_test_harness::*;
use sigil_test_harness::{admission, manifests};

const REVIEW: &str = include_str!("../fixtures/admission/web-pod.review.json");
const INJECTED: &str = include_str!("../fixtures/admission/web-pod.injected.json");
const IMAGE: &str = "registry.example/sigil:0.1.0";
const SERVICE_NAME: &str = "sigil-ca.sigil-system.svc";

/// The webhook configuration as an operator applies it: no caBundle (the CA fills it in).
fn webhook_configuration() -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "sigil-injector"},
        "webhooks": [{
            "name": "inject.sigil.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {"service": {"namespace": "sigil-system", "name": "sigil-ca", "path": "/inject", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"sigil.dev/inject": "enabled"}},
        }],
    }))
    .unwrap()
}

async fn ca_bundle(api: &Api<MutatingWebhookConfiguration>) -> Option<Vec<u8>> {
    let object = api.get("sigil-injector").await.ok()?;
    let webhook = object.webhooks?.into_iter().next()?;
    webhook.client_config.ca_bundle.map(|b| b.0)
}

/// POSTs `body` to the webhook over TLS, trusting only `ca_bundle` for the Service's name, as the
/// API server does. Returns the status and body.
async fn post(addr: SocketAddr, ca_bundle: &[u8], body: Vec<u8>) -> (u16, Vec<u8>) {
    admission::post(
        addr,
        SERVICE_NAME,
        443,
        "/inject?timeout=10s",
        ca_bundle,
        body,
    )
    .await
}

#[tokio::test]
async fn the_ca_keeps_the_ca_bundle_and_injects_over_https() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .create(&PostParams::default(), &webhook_configuration())
        .await
        .unwrap();

    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &["--proxy-image", IMAGE]);
    ca.wait_ready().await;

    // The caBundle becomes the CA's trust bundle (the roots it publishes in sigil-ca-root).
    eventually("the CA fills in the webhook caBundle", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    let bundle = ca_bundle(&configs).await.unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(server.client(), "sigil-system");
    let secret = secrets.get("sigil-ca").await.unwrap();
    assert_eq!(
        bundle,
        secret.data.unwrap()["root-cert.pem"].0,
        "caBundle is the CA's root bundle"
    );

    // A pod created by a Deployment: the patch gives exactly the expected pod.
    let review: Value = serde_json::from_str(REVIEW).unwrap();
    let (status, body) = post(ca.webhook, &bundle, REVIEW.as_bytes().to_vec()).await;
    assert_eq!(status, 200);
    let response: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true);
    let expected: Value = serde_json::from_str(INJECTED).unwrap();
    assert_eq!(apply(&review, &response), expected);

    // Host-network pods and pods in excluded namespaces are admitted unchanged.
    for (what, change) in [
        ("host network", json!({"spec": {"hostNetwork": true}})),
        (
            "excluded namespace",
            json!({"metadata": {"namespace": "kube-system"}}),
        ),
    ] {
        let mut review = review.clone();
        json_patch::merge(&mut review["request"]["object"], &change);
        if what == "excluded namespace" {
            review["request"]["namespace"] = json!("kube-system");
        }
        let (status, body) = post(ca.webhook, &bundle, serde_json::to_vec(&review).unwrap()).await;
        assert_eq!(status, 200, "{what}");
        let response: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(response["response"]["allowed"], true, "{what}");
        assert!(
            response["response"]["patch"].is_null(),
            "{what}: {response}"
        );
        assert_eq!(
            apply(&review, &response),
            review["request"]["object"],
            "{what}"
        );
    }

    // Malformed reviews get an error response, and the server carries on.
    for garbage in [
        b"not json at all".to_vec(),
        br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
    ] {
        let (status, body) = post(ca.webhook, &bundle, garbage).await;
        assert_eq!(status, 200);
        let response: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(response["response"]["allowed"], false);
        assert!(
            response["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with("sigil injector: ")
        );
    }
    // A body far larger than any the API server sends is refused before it is read: the answer
    // comes while the client has sent only the head (a client still writing the body may see
    // the connection closed instead, which is why the test does not send it).
    let tcp = tcp_from("127.0.0.1".parse().unwrap(), ca.webhook)
        .await
        .unwrap();
    let mut oversized = tls_without_client_cert(tcp, SERVICE_NAME, &bundle, &[])
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut oversized, &partial_review(5 << 20, 0))
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut oversized, &mut answer),
    )
    .await
    .expect("a 5 MiB body is refused before it is read")
    .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
    let (status, _) = post(ca.webhook, &bundle, REVIEW.as_bytes().to_vec()).await;
    assert_eq!(status, 200, "the webhook still answers");
    assert!(
        ca.child.try_wait().unwrap().is_none(),
        "the CA is still running"
    );

    // A client that connects and says nothing is cut off, so idle connections cannot use up the
    // webhook's connection slots (with failurePolicy Fail, that would block pod creation).
    let mut idle = admission::connect(ca.webhook, SERVICE_NAME, &bundle).await;
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut idle, &mut byte),
    )
    .await
    .expect("an idle connection is closed by the webhook");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(9),
        "closed after {waited:?}, before the header read timeout"
    );

    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_injections_total{outcome=\"injected\",reason=\"\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_injections_total{outcome=\"skipped\",reason=\"host_network\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_injections_total{outcome=\"malformed\",reason=\"\"}"
        ),
        2.0
    );

    // Re-applying the manifest (no caBundle) is repaired by the CA.
    let mut reapplied = configs.get("sigil-injector").await.unwrap();
    for webhook in reapplied.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = None;
    }
    configs
        .replace("sigil-injector", &PostParams::default(), &reapplied)
        .await
        .unwrap();
    eventually("the CA restores the caBundle", || async {
        ca_bundle(&configs).await.as_deref() == Some(bundle.as_slice())
    })
    .await;
}

/// Two CA replicas whose trust bundles differ (one has seen a root rotation, the other not yet:
/// up to the reload interval in a cluster, held here with a reload interval of an hour) used to
/// rewrite the caBundle to their own view in turn, without end. Now the replica missing a root
/// adds it, the other leaves the extra root alone, and the writes stop.
#[tokio::test]
async fn two_replicas_with_different_bundle_views_write_the_ca_bundle_a_bounded_number_of_times() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .create(&PostParams::default(), &webhook_configuration())
        .await
        .unwrap();
    let older = OfflineCa::init(&dir.path().join("older"), &[]);
    let newer_state = dir.path().join("newer-state");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&older.state)
        .arg(&newer_state)
        .status()
        .unwrap();
    assert!(copied.success());
    sigil(&[
        "ca",
        "rotate-root",
        "--state-dir",
        newer_state.to_str().unwrap(),
        "--propagation",
        "1h",
    ]);
    let older_bundle = state_dir_bundle(&older.state);
    let newer_bundle = state_dir_bundle(&newer_state);
    assert_eq!((older_bundle.roots.len(), newer_bundle.roots.len()), (1, 2));
    let replica = |state: &std::path::Path| {
        CaProcess::start(
            dir.path(),
            Some(&kubeconfig),
            &[
                "--state-dir",
                state.to_str().unwrap(),
                "--reload-interval",
                "1h",
                "--no-root-configmaps",
                "--proxy-image",
                IMAGE,
            ],
        )
    };
    let mut a = replica(&older.state);
    let mut b = replica(&newer_state);
    a.wait_ready().await;
    b.wait_ready().await;

    // The caBundle ends up trusting both views: both roots.
    let roots = |bundle: Option<Vec<u8>>| {
        let text = String::from_utf8(bundle.unwrap_or_default()).unwrap();
        sigil_identity::TrustBundle::from_pem(td(), &text)
            .map(|b| b.roots)
            .unwrap_or_default()
    };
    eventually("the caBundle holds both roots", || async {
        roots(ca_bundle(&configs).await) == newer_bundle.roots
    })
    .await;
    // And stays so, with no more writes. Both replicas may start from a view of no caBundle,
    // but a write holds only if the webhook's clientConfig is still the one it was planned from:
    // the later of two such writes fails, and its replica finds the other's bundle enough or adds
    // its root to it. At most one write for each of the two views, then none.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(roots(ca_bundle(&configs).await), newer_bundle.roots);
    let writes = |text: String| metric(&text, "sigil_ca_webhook_ca_bundle_writes_total");
    let (a_writes, b_writes) = (writes(a.metrics().await), writes(b.metrics().await));
    println!("caBundle writes: older view {a_writes}, newer view {b_writes}");
    assert!(
        a_writes + b_writes <= 2.0,
        "{a_writes} + {b_writes} writes for one difference of views"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let later = writes(a.metrics().await) + writes(b.metrics().await);
    assert_eq!(later, a_writes + b_writes, "the replicas keep writing");
}

/// The injected pod is one a Kubernetes 1.30 (and the newest bundled) API server accepts:
/// strict schema validation with kubernetes-validate, which scripts/test installs.
#[test]
fn the_injected_pod_is_a_valid_pod_for_kubernetes_1_30_and_later() {
    let mut pod: Value = serde_json::from_str(INJECTED).unwrap();
    // The API server names generateName pods before validating them.
    pod["metadata"]["name"] = json!("web-7d9f8b6c5-x2x9q");
    let (_, problems) = manifests::kubernetes_schema_problems(&[pod], &["1.30", "latest"]);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A request head for `/inject` announcing a body of `length` bytes, followed by `sent` of them.
fn partial_review(length: usize, sent: usize) -> Vec<u8> {
    let mut bytes = format!(
        "POST /inject?timeout=10s HTTP/1.1\r\nhost: {SERVICE_NAME}:443\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
    .into_bytes();
    bytes.resize(bytes.len() + sent, b' ');
    bytes
}

/// Attack: 100 connections each sending a 4 MiB body took the CA from 20 to 441 MB (its limit
/// is 512 Mi). Now one source may have at most 8 MiB of bodies in flight (a further one is
/// answered 429 before it is read), every body must arrive within 10 s (else 408), and the API
/// server, elsewhere, is answered meanwhile.
#[tokio::test]
async fn webhook_bodies_in_flight_are_bounded_per_source_and_timed_out() {
    use tokio::io::AsyncWriteExt;

    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .create(&PostParams::default(), &webhook_configuration())
        .await
        .unwrap();
    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &["--proxy-image", IMAGE]);
    ca.wait_ready().await;
    eventually("the CA fills in the webhook caBundle", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    let bundle = ca_bundle(&configs).await.unwrap();
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();

    let full = 4 << 20;
    let mut trickling = Vec::new();
    for _ in 0..2 {
        let tcp = tcp_from(attacker, ca.webhook).await.unwrap();
        let mut tls = tls_without_client_cert(tcp, SERVICE_NAME, &bundle, &[])
            .await
            .unwrap();
        tls.write_all(&partial_review(full, 1 << 20)).await.unwrap();
        trickling.push(tls);
    }
    // Give the webhook the time to start reading both bodies.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let tcp = tcp_from(attacker, ca.webhook).await.unwrap();
    let mut third = tls_without_client_cert(tcp, SERVICE_NAME, &bundle, &[])
        .await
        .unwrap();
    third.write_all(&partial_review(full, 0)).await.unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut third, &mut answer),
    )
    .await
    .expect("a third 4 MiB body from one source is refused before it is read")
    .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 429");

    // The API server (another address) is answered meanwhile.
    let (status, _) = post(ca.webhook, &bundle, REVIEW.as_bytes().to_vec()).await;
    assert_eq!(status, 200);

    // The trickling bodies are cut off 10 s after their head.
    for tls in &mut trickling {
        let (closed, received) = closed_within(tls, std::time::Duration::from_secs(20)).await;
        assert!(
            closed,
            "a body that never completes is still being waited for"
        );
        assert!(
            received.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_webhook_bodies_refused_total{reason=\"per_source_limit\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_webhook_bodies_refused_total{reason=\"read_timeout\"}"
        ),
        2.0
    );
}

/// What a pod author sees from the real webhook: a pod that would reach the agent's socket
/// directory through the injector's volume is refused with the reason; a probe the injector
/// cannot rewrite gets a warning in plain words; a probe's own headers travel to the proxy that
/// makes the probe.
#[tokio::test]
async fn hostile_pods_are_refused_and_probes_keep_their_headers() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .create(&PostParams::default(), &webhook_configuration())
        .await
        .unwrap();
    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &["--proxy-image", IMAGE]);
    ca.wait_ready().await;
    eventually("the CA fills in the webhook caBundle", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    let bundle = ca_bundle(&configs).await.unwrap();
    let review: Value = serde_json::from_str(REVIEW).unwrap();
    let webhook = ca.webhook;
    let answer = |review: Value| {
        let bundle = bundle.clone();
        async move {
            let (status, body) = post(webhook, &bundle, serde_json::to_vec(&review).unwrap()).await;
            assert_eq!(status, 200);
            serde_json::from_slice::<Value>(&body).unwrap()["response"].clone()
        }
    };

    // The app mounts the agent's socket directory writable: after injection it could replace
    // agent.sock and feed every proxy on the node its own certificates and policies.
    for (what, change, reason) in [
        (
            "a mount of the injector's volume",
            json!({"spec": {"containers": [{"name": "web", "volumeMounts": [
                {"name": "sigil-agent", "mountPath": "/run/sigil"}]}]}}),
            "container \"web\" mounts volume \"sigil-agent\", which the sigil injector reserves \
             for the proxy",
        ),
        (
            "a volume of the injector's name",
            json!({"spec": {"volumes": [{"name": "sigil-agent",
                "hostPath": {"path": "/run/sigil", "type": "Directory"}}]}}),
            "the pod defines volume \"sigil-agent\", a name the sigil injector reserves",
        ),
    ] {
        let mut hostile = review.clone();
        let object = &mut hostile["request"]["object"];
        if let Some(mounts) = change["spec"]["containers"][0].get("volumeMounts") {
            object["spec"]["containers"][0]["volumeMounts"] = mounts.clone();
        } else {
            object["spec"]["volumes"] = change["spec"]["volumes"].clone();
        }
        let response = answer(hostile).await;
        assert_eq!(response["allowed"], false, "{what}: {response}");
        let message = response["status"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{what}: {message}");
    }

    // A probe on a port name the container does not declare: a warning a person can read.
    // A probe with its own headers: they reach the proxy's --app-probe flag.
    let mut odd = review.clone();
    let web = &mut odd["request"]["object"]["spec"]["containers"][0];
    web["startupProbe"] = json!({"httpGet": {"path": "/up", "port": "admin"}});
    web["livenessProbe"]["httpGet"]["httpHeaders"] =
        json!([{"name": "Host", "value": "shop.example"}]);
    let response = answer(odd.clone()).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(
        response["warnings"],
        json!([
            "sigil: the startup probe of container \"web\" names port \"admin\", which the \
             container does not declare; not rewritten"
        ])
    );
    let pod = apply(&odd, &json!({"response": response}));
    let args = pod["spec"]["initContainers"][1]["args"].as_array().unwrap();
    assert!(
        args.contains(&json!("web-live=8080/healthz#Host=shop.example")),
        "{args:?}"
    );
}
