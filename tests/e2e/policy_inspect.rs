//! `sigil inspect policy` as operators run it: the real binary, answering from a policy file and
//! from the Kubernetes API test double, with its first-line and exit-code contract (0 ALLOW,
//! 1 DENY, 2 usage or policy error).

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use sigil_test_apiserver::{PodSpec, TestApiServer};
use sigil_test_harness::sigil_exe;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

const POLICIES: &str = include_str!("../fixtures/inspect-policies.yaml");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or_default()
    }
}

async fn inspect(args: &[&str], kubeconfig: Option<&Path>) -> Run {
    let mut command = tokio::process::Command::new(sigil_exe());
    command.args(["inspect", "policy"]).args(args);
    if let Some(path) = kubeconfig {
        command.env("KUBECONFIG", path);
    }
    let out = command.output().await.expect("running sigil");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn policy_file(dir: &Path, text: &str) -> String {
    let path = dir.join("policies.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn answers_from_a_policy_file_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let file = policy_file(dir.path(), POLICIES);
    let web = [
        "--policy-file",
        &file,
        "--namespace",
        "demo",
        "--labels",
        "app=web",
    ];
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--from", CLIENT, "--port", "8080", "--method", "GET"],
            0,
            "ALLOW demo/allow-client",
        ),
        // The DENY rule's only field is HTTP-only: on plain TCP it matches every connection.
        (
            &["--from", CLIENT, "--port", "8080"],
            1,
            "DENY demo/deny-admin",
        ),
        (
            &[
                "--from",
                ADMIN,
                "--port",
                "8080",
                "--method",
                "GET",
                "--path",
                "/status/live",
            ],
            0,
            "ALLOW demo/allow-client",
        ),
        (
            &["--from", ADMIN, "--port", "8080", "--method", "POST"],
            1,
            "DENY default",
        ),
        (
            &["--from", CLIENT, "--port", "8080", "--path", "/admin/users"],
            1,
            "DENY demo/deny-admin",
        ),
        // STRICT refuses plaintext before authorization; the port-level PERMISSIVE lets it in,
        // and then no ALLOW rule matches a caller without identity.
        (&["--plaintext", "--port", "8080"], 1, "DENY demo/web"),
        (
            &["--plaintext", "--port", "9090", "--path", "/"],
            1,
            "DENY default",
        ),
        (
            &["--from", CLIENT, "--port", "9090", "--host", "web"],
            0,
            "ALLOW demo/allow-client",
        ),
    ];
    for (args, code, first) in cases {
        let mut all = web.to_vec();
        all.extend_from_slice(args);
        let run = inspect(&all, None).await;
        assert_eq!(
            (run.code, run.first_line()),
            (*code, *first),
            "{args:?}:\n{}{}",
            run.stdout,
            run.stderr
        );
    }

    // A workload no policy selects, in a namespace with none: allowed by default, and the
    // mTLS mode is sigil's default.
    let run = inspect(
        &[
            "--policy-file",
            &file,
            "--namespace",
            "other",
            "--labels",
            "",
            "--from",
            CLIENT,
            "--port",
            "80",
        ],
        None,
    )
    .await;
    assert_eq!(
        (run.code, run.first_line()),
        (0, "ALLOW default"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains(
            "mtls: STRICT on port 80 (sigil's default: no PeerAuthentication sets a mode); plaintext is refused"
        ),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn explains_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let file = policy_file(dir.path(), POLICIES);
    let run = inspect(
        &[
            "--policy-file",
            &file,
            "-n",
            "demo",
            "--labels",
            "app=web,tier=front",
            "--from",
            ADMIN,
            "--port",
            "9090",
            "--method",
            "POST",
            "--path",
            "/status",
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "DENY default",
            "reason: 1 ALLOW policy applies to the workload and none matched",
            "allow policies that apply: demo/allow-client",
            "audit: sigil-system/audit-ops",
            "mtls: PERMISSIVE on port 9090 (port-level PeerAuthentication demo/web); mTLS and plaintext are accepted",
        ],
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("request: HTTP on port 9090"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn usage_and_policy_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = policy_file(
        dir.path(),
        "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec:\n  rules:\n  - to: [{operation: {methods: [get]}}]\n",
    );
    let run = inspect(
        &[
            "--policy-file",
            &bad,
            "-n",
            "demo",
            "--labels",
            "",
            "--plaintext",
            "--port",
            "80",
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "{bad}: document 1 (AuthorizationPolicy): demo/bad: rules[0].to[0].operation.methods[0]: \"get\" must be upper case (GET)"
        )),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let good = policy_file(dir.path(), POLICIES);
    for args in [
        // Both a caller identity and --plaintext.
        vec![
            "--policy-file",
            &good,
            "-n",
            "demo",
            "--labels",
            "",
            "--plaintext",
            "--from",
            CLIENT,
            "--port",
            "80",
        ],
        // Neither --pod nor --labels.
        vec![
            "--policy-file",
            &good,
            "-n",
            "demo",
            "--plaintext",
            "--port",
            "80",
        ],
        // Not a port.
        vec![
            "--policy-file",
            &good,
            "-n",
            "demo",
            "--labels",
            "",
            "--plaintext",
            "--port",
            "0",
        ],
        // Not a SPIFFE ID.
        vec![
            "--policy-file",
            &good,
            "-n",
            "demo",
            "--labels",
            "",
            "--from",
            "cluster.local/ns/a/sa/b",
            "--port",
            "80",
        ],
        // Not labels.
        vec![
            "--policy-file",
            &good,
            "-n",
            "demo",
            "--labels",
            "app",
            "--plaintext",
            "--port",
            "80",
        ],
    ] {
        let run = inspect(&args, None).await;
        assert_eq!(run.code, 2, "{args:?}: {}{}", run.stdout, run.stderr);
    }

    let missing = dir.path().join("missing.yaml");
    let run = inspect(
        &[
            "--policy-file",
            missing.to_str().unwrap(),
            "-n",
            "demo",
            "--labels",
            "",
            "--plaintext",
            "--port",
            "80",
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("reading policy file"), "{}", run.stderr);
}

fn crd(kind: &str, plural: &str) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": { "name": format!("{plural}.sigil.dev") },
        "spec": {
            "group": "sigil.dev",
            "names": { "plural": plural, "singular": kind.to_lowercase(), "kind": kind, "listKind": format!("{kind}List") },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
            }]
        }
    }))
    .unwrap()
}

async fn create(
    server: &TestApiServer,
    kind: &str,
    plural: &str,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sigil.dev", "v1alpha1", kind),
        plural,
    );
    let api: Api<DynamicObject> = Api::namespaced_with(server.client(), namespace, &resource);
    let object = DynamicObject::new(name, &resource).data(json!({ "spec": spec }));
    api.create(&PostParams::default(), &object).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_cluster() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();

    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for (kind, plural) in [
        ("AuthorizationPolicy", "authorizationpolicies"),
        ("PeerAuthentication", "peerauthentications"),
    ] {
        crds.create(&PostParams::default(), &crd(kind, plural))
            .await
            .unwrap();
    }
    let mut web = PodSpec::new("demo", "web-0", "web", "node-a");
    web.labels.insert("app".into(), "web".into());
    server.add_pod(&web);
    server.add_pod(&PodSpec::new("demo", "db-0", "db", "node-a"));

    create(&server, "AuthorizationPolicy", "authorizationpolicies", "demo", "allow-client", json!({
        "selector": { "matchLabels": { "app": "web" } },
        "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/demo/sa/client"] } }] }]
    })).await;
    create(
        &server,
        "AuthorizationPolicy",
        "authorizationpolicies",
        "sigil-system",
        "deny-ops",
        json!({
            "action": "DENY",
            "rules": [{ "from": [{ "source": { "namespaces": ["ops"] } }] }]
        }),
    )
    .await;
    // Another namespace's policy must not be read into the answer.
    create(
        &server,
        "AuthorizationPolicy",
        "authorizationpolicies",
        "prod",
        "allow-nothing",
        json!({}),
    )
    .await;
    create(
        &server,
        "PeerAuthentication",
        "peerauthentications",
        "sigil-system",
        "mesh",
        json!({
            "mtls": { "mode": "PERMISSIVE" }
        }),
    )
    .await;

    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--pod", "web-0", "--from", CLIENT],
            0,
            "ALLOW demo/allow-client",
        ),
        (
            &["--pod", "web-0", "--from", ADMIN],
            1,
            "DENY sigil-system/deny-ops",
        ),
        (&["--pod", "web-0", "--plaintext"], 1, "DENY default"),
        (&["--pod", "db-0", "--plaintext"], 0, "ALLOW default"),
        (
            &["--labels", "app=web", "--from", CLIENT],
            0,
            "ALLOW demo/allow-client",
        ),
    ];
    for (args, code, first) in cases {
        let mut all = vec!["-n", "demo", "--port", "8080"];
        all.extend_from_slice(args);
        let run = inspect(&all, Some(&kubeconfig)).await;
        assert_eq!(
            (run.code, run.first_line()),
            (*code, *first),
            "{args:?}:\n{}{}",
            run.stdout,
            run.stderr
        );
    }
    let run = inspect(
        &[
            "-n",
            "demo",
            "--port",
            "8080",
            "--pod",
            "web-0",
            "--plaintext",
        ],
        Some(&kubeconfig),
    )
    .await;
    assert!(
        run.stdout.contains(
            "mtls: PERMISSIVE on port 8080 (mesh-wide PeerAuthentication sigil-system/mesh)"
        ),
        "{}",
        run.stdout
    );

    // A pod that does not exist, and an invalid policy in the cluster: errors, exit 2.
    let run = inspect(
        &[
            "-n",
            "demo",
            "--port",
            "8080",
            "--pod",
            "nope",
            "--plaintext",
        ],
        Some(&kubeconfig),
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("reading pod demo/nope"),
        "{}",
        run.stderr
    );
    create(
        &server,
        "AuthorizationPolicy",
        "authorizationpolicies",
        "demo",
        "typo",
        json!({
            "rules": [{ "from": [{ "source": { "principal": ["x"] } }] }]
        }),
    )
    .await;
    let run = inspect(
        &[
            "-n",
            "demo",
            "--port",
            "8080",
            "--pod",
            "web-0",
            "--plaintext",
        ],
        Some(&kubeconfig),
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("AuthorizationPolicy demo/typo in the cluster: rules[0].from[0].source.principal: unknown field `principal`"),
        "{}",
        run.stderr
    );
    server.shutdown().await;
}

/// Issue 11 item 1: `--path` goes through the proxy's normalization (`--path-normalization`,
/// BASE by default) before matching, and the output says so; every row of the shared table
/// gets the verdict the proxy gives it (a path the proxy refuses with 400 is `DENY invalid-path`).
#[tokio::test]
async fn paths_are_normalized_as_the_proxy_does() {
    let dir = tempfile::tempdir().unwrap();
    let file = policy_file(dir.path(), include_str!("../fixtures/deny-admin.yaml"));
    let mut failures = Vec::new();
    for case in sigil_policy::path::table() {
        let mode = case.mode.to_string();
        let run = inspect(
            &[
                "--policy-file",
                &file,
                "--namespace",
                "demo",
                "--labels",
                "",
                "--from",
                CLIENT,
                "--port",
                "8080",
                "--path-normalization",
                &mode,
                "--path",
                case.target,
            ],
            None,
        )
        .await;
        let (want_line, want_code) = match case.verdict.as_str() {
            "400" => ("DENY invalid-path", 1),
            "ALLOW default" => ("ALLOW default", 0),
            other => (other, 1),
        };
        let explained = match case.forwarded {
            Some(forwarded) => run.stdout.contains(&format!(
                "path: {} normalized ({mode}) to {forwarded}",
                case.target
            )),
            None => run.stdout.contains("the proxy answers 400"),
        };
        if run.first_line() != want_line || run.code != want_code || !explained {
            failures.push(format!(
                "{mode} {}: want {want_line:?}, got code {} {:?} {:?}",
                case.target, run.code, run.stdout, run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What a user sees when something is wrong: each reason once, in plain words, and an answer
/// piped into a reader that stops early (`| head`) ends with the answer's exit code, not a panic.
#[tokio::test]
async fn errors_read_once_and_a_closed_pipe_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let run = inspect(
        &[
            "--policy-file",
            missing.to_str().unwrap(),
            "-n",
            "demo",
            "--labels",
            "",
            "--plaintext",
            "--port",
            "80",
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 2);
    assert_eq!(
        run.stderr.matches("No such file or directory").count(),
        1,
        "the cause is said once: {}",
        run.stderr
    );

    // The reader is gone before sigil writes its answer.
    let file = policy_file(dir.path(), POLICIES);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(sigil_exe())
        .args(["inspect", "policy", "--policy-file", &file, "-n", "demo"])
        .args(["--labels", "app=web", "--from", CLIENT, "--port", "8080"])
        .args(["--method", "GET"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ALLOW, as without the pipe: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
