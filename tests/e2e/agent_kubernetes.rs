//! The node agent in Kubernetes mode, end to end: the CA authenticates the agent's pod-bound
//! token by TokenReview and grants it only identities of pods on its node; the agent watches its
//! node's pods (prefetching their identities) and attests a real process placed in a real
//! kubepods cgroup, which fetches its SVID with PyPI's `spiffe` client. The Kubernetes API is the
//! in-repo test double; everything else is real.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigil_test_apiserver::{PodSpec, TestApiServer};
use sigil_test_harness::*;

const WEB_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";

const CLIENT: &str = r#"
import json, sys
from spiffe import WorkloadApiClient
try:
    with WorkloadApiClient() as client:
        svid = client.fetch_x509_svid()
        print(json.dumps({"id": str(svid.spiffe_id)}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"#;

/// Runs the py-spiffe client, inside `cgroup` if given, and returns what it printed.
fn fetch_svid(dir: &Path, socket: &Path, cgroup: Option<&PodCgroup>) -> serde_json::Value {
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let mut client = Command::new("python3");
    client.arg(&script).env(
        "SPIFFE_ENDPOINT_SOCKET",
        format!("unix://{}", socket.display()),
    );
    let mut command = match cgroup {
        Some(cgroup) => cgroup.enter(&client),
        None => client,
    };
    let out = command.stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "client printed {stdout:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn a_process_in_a_pod_cgroup_gets_its_pods_identity_through_tokenreview_and_node_checks() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let agent_pod = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-a",
        "sigil-agent",
        "node-a",
    ));
    let web = server.add_pod(&PodSpec::new("demo", "web-1", "web", "node-a"));
    server.add_pod(&PodSpec::new("demo", "db-1", "db", "node-b"));

    let mut ca = CaProcess::start(dir.path(), Some(&kubeconfig), &[] as &[&str]);
    ca.wait_ready().await;
    let socket = dir.path().join("agent.sock");
    // Killed on drop, also when an assertion fails.
    let (agent, admin) = spawn_k8s_agent(
        dir.path(),
        &server,
        &kubeconfig,
        &ca,
        &agent_pod,
        "node-a",
        &socket,
    )
    .await;
    let logs = || agent.logs();

    // Once this node's pods are synced, the identities of the pods on node-a (web, and the agent's
    // own pod) are fetched before anyone asks; db, on node-b, is not.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        if metric(&metrics, "sigil_agent_identities") == 2.0
            && metrics.contains(&format!(
                "sigil_agent_cert_expiry_timestamp_seconds{{identity=\"{WEB_ID}\"}}"
            ))
        {
            assert!(
                !metrics.contains("sa/db"),
                "db's pod is on another node:\n{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web was not prefetched:\n{metrics}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A process in web-1's container cgroup is attested as web.
    let cgroup = PodCgroup::create(&web, "5a1b7e");
    let answer = fetch_svid(dir.path(), &socket, Some(&cgroup));
    assert_eq!(answer["id"], WEB_ID, "{answer}\n{}", logs());

    // A host process (no pod cgroup) gets nothing, and the agent says why.
    let answer = fetch_svid(dir.path(), &socket, None);
    assert!(answer["error"].is_string(), "{answer}");
    assert!(logs().contains("attestation failed"), "{}", logs());

    drop(agent);
    drop(cgroup);
}
