//! Typed policies on the agent→proxy wire (`sigil.policy.v2`), end to end with the real
//! binaries: the agent validates the policy file's objects and sends them compiled, each with its
//! envelope (creation time included), so the proxy picks the same winner among competing
//! PeerAuthentications as `sigil inspect policy` does (Istio's rule: the oldest, then the first
//! by name).

use std::path::Path;

use sigil_test_harness::*;
use tokio::net::TcpStream;

const WEB_UID: u32 = 41601;
const DB_UID: u32 = 41602;

/// Two namespace-wide PeerAuthentications in `demo` (the same scope, so they compete): the one
/// first by name is STRICT, the other PERMISSIVE; `permissive_created` decides which is older.
fn competing(strict_created: &str, permissive_created: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: a-strict, namespace: demo, creationTimestamp: \"{strict_created}\"}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: z-permissive, namespace: demo, creationTimestamp: \"{permissive_created}\"}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
"
    )
}

fn write_policies(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `sigil inspect policy`'s mTLS line for the db workload's `port`.
fn inspect_mtls(policies: &Path, port: u16) -> String {
    let out = std::process::Command::new(sigil_exe())
        .args(["inspect", "policy", "--policy-file"])
        .arg(policies)
        .args(["--namespace", "demo", "--labels", "app=db", "--port"])
        .arg(port.to_string())
        .args(["--from", "spiffe://cluster.local/ns/demo/sa/web"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
        .lines()
        .find(|line| line.starts_with("mtls:"))
        .unwrap_or_else(|| {
            panic!(
                "no mtls line: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned()
}

#[tokio::test]
async fn competing_peer_authentications_have_the_same_winner_in_the_proxy_and_in_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    // The PERMISSIVE one is older: it wins, though the STRICT one comes first by name.
    write_policies(
        &policies,
        &competing("2026-06-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    );
    let app = http_app().await;
    let ProxyPair {
        host: _host,
        web: _web,
        db: _db,
        web_out: _,
        db_in,
    } = ProxyPair::start(
        dir.path(),
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db: DB_ID,
            db_args: &[],
            cert_ttl: "1h",
            agent_args: &["--policy-file", policies.to_str().unwrap()],
            app,
        },
    )
    .await;

    let line = inspect_mtls(&policies, db_in.port());
    assert!(
        line.starts_with(&format!("mtls: PERMISSIVE on port {}", db_in.port()))
            && line.contains("PeerAuthentication demo/z-permissive"),
        "{line}"
    );
    // The proxy agrees: plaintext is accepted.
    let mut plaintext = TcpStream::connect(db_in).await.unwrap();
    assert_eq!(get_on(&mut plaintext, "/").await, Some((200, "ok".into())));

    // Now the STRICT one is older: both pick it.
    write_policies(
        &policies,
        &competing("2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"),
    );
    let line = inspect_mtls(&policies, db_in.port());
    assert!(
        line.starts_with(&format!("mtls: STRICT on port {}", db_in.port()))
            && line.contains("PeerAuthentication demo/a-strict"),
        "{line}"
    );
    eventually("the proxy refusing plaintext", || async {
        let mut plaintext = TcpStream::connect(db_in).await.unwrap();
        get_on(&mut plaintext, "/").await.is_none()
    })
    .await;
}
