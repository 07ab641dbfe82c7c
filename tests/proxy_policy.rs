//! Authorization policies enforced by the bundled proxy, end to end with real processes: the
//! agent serves the policy file's objects over `sigil.policy.v1`, the proxy decides at
//! connection time (L4) and per HTTP/1.1 or HTTP/2 request (L7, 403 on deny), closes a
//! keep-alive connection that a policy change no longer allows, and answers kubelet probes under
//! deny-all.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const WEB_UID: u32 = 41401;
const DB_UID: u32 = 41402;

const DENY_ALL: &str = include_str!("fixtures/deny-all.yaml");

const ALLOW_WEB_ON_ALLOWED: &str = include_str!("fixtures/allow-web.yaml");

/// Replaces the policy file whole (the agent may read it at any moment).
fn write_policies(path: &Path, documents: &[&str]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, documents.join("---\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The web and db proxies with an agent serving `policies`, `app` behind the db proxy.
async fn start_pair(dir: &Path, policies: &Path, app: SocketAddr, db_args: &[&str]) -> ProxyPair {
    ProxyPair::start(
        dir,
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db: DB_ID,
            db_args,
            cert_ttl: "1h",
            agent_args: &["--policy-file", policies.to_str().unwrap()],
            app,
        },
    )
    .await
}

fn decisions(decision: &str, policy: &str, layer: &str) -> String {
    format!(
        "sigil_proxy_authz_decisions_total{{decision=\"{decision}\",policy=\"{policy}\",layer=\"{layer}\"}}"
    )
}

#[tokio::test]
async fn deny_all_then_an_allow_for_one_path_then_its_removal_closes_the_open_connection() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[DENY_ALL]);
    let app = http_app().await;
    let probe = format!("db-ready={}/healthz", app.port());
    let ProxyPair {
        host: _host,
        web,
        db,
        web_out,
        ..
    } = start_pair(dir.path(), &policies, app, &["--app-probe", &probe]).await;

    // 1. deny-all: the connection is refused at connection time, by that policy.
    let mut stream = TcpStream::connect(web_out).await.unwrap();
    assert_eq!(get_on(&mut stream, "/allowed").await, None);
    eventually("the denial in the db proxy's access log", || async {
        db.access_log().iter().any(|l| l["result"] == "denied")
    })
    .await;
    let line = db
        .access_log()
        .into_iter()
        .find(|l| l["result"] == "denied")
        .unwrap();
    assert_eq!(line["policy"], "default", "{line}");
    assert_eq!(line["source_identity"], WEB_ID);
    assert!(db.metric(&decisions("deny", "default", "l4")).await >= 1.0);

    // A kubelet-style probe (plaintext, no identity) still passes under deny-all.
    let (status, body) = http_get(db.metrics, "/app-health/db-ready").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(db.metrics, "/app-health/unknown").await.unwrap();
    assert_eq!(status, 404);

    // 2. An ALLOW for web on some paths: HTTP requests are decided one by one.
    write_policies(&policies, &[DENY_ALL, ALLOW_WEB_ON_ALLOWED]);
    eventually("the db proxy has the new policies", || async {
        db.metric("sigil_proxy_policy_updates_total").await >= 2.0
    })
    .await;
    let mut stream = TcpStream::connect(web_out).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/allowed").await,
        Some((200, "ok".to_string()))
    );
    assert_eq!(
        get_on(&mut stream, "/public/x").await,
        Some((200, "ok".to_string()))
    );
    let (status, body) = get_on(&mut stream, "/secret").await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied\n"));
    // The connection is still usable after a 403.
    assert_eq!(
        get_on(&mut stream, "/allowed").await,
        Some((200, "ok".to_string()))
    );
    assert!(db.metric(&decisions("allow", "demo/allow-web", "l7")).await >= 3.0);
    assert!(db.metric(&decisions("deny", "default", "l7")).await >= 1.0);
    eventually("the 403 in the access log", || async {
        db.access_log()
            .iter()
            .any(|l| l["kind"] == "http" && l["path"] == "/secret" && l["status"] == 403)
    })
    .await;

    // 3. Removing the ALLOW closes the open keep-alive connection soon after the change.
    let removed = Instant::now();
    write_policies(&policies, &[DENY_ALL]);
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open: {read:?}"
    );
    let closed_after = removed.elapsed();
    // The agent polls the file every second; the proxy acts on the update at once.
    assert!(
        closed_after < Duration::from_secs(3),
        "closed only after {closed_after:?}"
    );
    eventually("the closure in the access log", || async {
        db.access_log()
            .iter()
            .any(|l| l["result"] == "closed_by_policy")
    })
    .await;
    drop(web);
}

/// An HTTP/2 (h2c, prior knowledge, as gRPC speaks it) application answering `200 h2 ok`.
async fn h2_app() -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"h2 ok")),
                    ))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn http2_requests_are_decided_one_by_one_on_one_connection() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[DENY_ALL, ALLOW_WEB_ON_ALLOWED]);
    // Bound, not `..`: a dropped process is killed.
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        web_out,
        ..
    } = start_pair(dir.path(), &policies, h2_app().await, &[]).await;

    let stream = TcpStream::connect(web_out).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let get = |path: &'static str| {
        let mut sender = sender.clone();
        async move {
            let request = hyper::Request::get(format!("http://db{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).to_string())
        }
    };
    // Concurrent streams on the one connection, each decided on its own.
    let (allowed, denied, prefixed) =
        tokio::join!(get("/allowed"), get("/secret"), get("/public/a"));
    assert_eq!(allowed, (200, "h2 ok".to_string()));
    assert_eq!(denied, (403, "RBAC: access denied\n".to_string()));
    assert_eq!(prefixed, (200, "h2 ok".to_string()));
    assert!(db.metric(&decisions("allow", "demo/allow-web", "l7")).await >= 2.0);
    assert!(db.metric(&decisions("deny", "default", "l7")).await >= 1.0);
}
