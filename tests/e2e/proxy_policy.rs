//! Authorization policies enforced by the bundled proxy, end to end with real processes: the
//! agent serves the policy file's objects over `sigil.policy.v2`, the proxy decides at
//! connection time (L4) and per HTTP/1.1 or HTTP/2 request (L7, 403 on deny), closes a
//! keep-alive connection that a policy change no longer allows, and answers kubelet probes under
//! deny-all.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sigil_test_harness::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const WEB_UID: u32 = 41401;
const DB_UID: u32 = 41402;

const DENY_ALL: &str = include_str!("../fixtures/deny-all.yaml");

const ALLOW_WEB_ON_ALLOWED: &str = include_str!("../fixtures/allow-web.yaml");

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

/// An HTTP/1.1 and HTTP/2 (h2c, told apart by the preface) application that answers every
/// request with its target (path and query) as the body, and the `x-forwarded-client-cert` it
/// received (if any) in `x-app-saw-xfcc`: what reached the application is what the test checks.
async fn target_echo_app() -> SocketAddr {
    h1_or_h2_app(|request| {
        let target = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let mut response =
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(target)));
        if let Some(xfcc) = request.headers().get("x-forwarded-client-cert") {
            response
                .headers_mut()
                .insert("x-app-saw-xfcc", xfcc.clone());
        }
        response
    })
    .await
}

/// Sends `raw` bytes on a new connection to `addr` and reads until `responses` HTTP/1.1 status
/// lines came back (or the connection closed, or 5 s passed): their status codes, and the text.
async fn raw_http1(addr: SocketAddr, raw: &str, responses: usize) -> (Vec<u16>, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    let statuses = |text: &[u8]| -> Vec<u16> {
        String::from_utf8_lossy(text)
            .match_indices("HTTP/1.1 ")
            .filter_map(|(at, _)| {
                String::from_utf8_lossy(&text[at + 9..])
                    .get(..3)?
                    .parse()
                    .ok()
            })
            .collect()
    };
    while statuses(&text).len() < responses {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => text.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    (statuses(&text), String::from_utf8_lossy(&text).into_owned())
}

/// An HTTP/2 client on a new connection to `addr`.
async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// One HTTP/2 request built by `build` (a GET of `uri` unless it changes it): status and body.
async fn h2_send(
    sender: &hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    uri: &str,
    build: impl FnOnce(hyper::http::request::Builder) -> hyper::http::request::Builder,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut sender = sender.clone();
    let request = build(hyper::Request::get(uri))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

const DENY_ADMIN: &str = include_str!("../fixtures/deny-admin.yaml");

/// The status the proxy answers for a row of the normalization table, and the body (the target
/// the application received) when it forwards.
fn expected(case: &sigil_policy::path::TableCase) -> (u16, Option<&'static str>) {
    match case.verdict.as_str() {
        "400" => (400, None),
        "ALLOW default" => (200, case.forwarded),
        _ => (403, None),
    }
}

/// Issue 11 item 1 (CVE-2021-31920's class): with a DENY on `/admin` and `/admin/*`, every BASE
/// row of the shared normalization table, over HTTP/1.1 and HTTP/2, gets the table's verdict,
/// and an allowed request reaches the application with the normalized path.
#[tokio::test]
async fn paths_are_normalized_before_matching_and_the_normalized_path_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[DENY_ADMIN]);
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        web_out,
        ..
    } = start_pair(dir.path(), &policies, target_echo_app().await, &[]).await;

    let h2 = h2_client(web_out).await;
    let mut failures = Vec::new();
    let base = sigil_policy::path::PathNormalization::Base;
    for case in sigil_policy::path::table()
        .iter()
        .filter(|c| c.mode == base)
    {
        let (status, forwarded) = expected(case);
        let raw = format!("GET {} HTTP/1.1\r\nhost: db\r\n\r\n", case.target);
        let (statuses, text) = raw_http1(web_out, &raw, 1).await;
        let body_ok = forwarded.is_none_or(|f| text.ends_with(&format!("\r\n\r\n{f}")));
        if statuses.first() != Some(&status) || !body_ok {
            failures.push(format!(
                "HTTP/1.1 {}: want {status} {forwarded:?}, got {text:?}",
                case.target
            ));
        }
        let (got, body) = h2_send(&h2, &format!("http://db{}", case.target), |b| b).await;
        if got != status || forwarded.is_some_and(|f| body != f) {
            failures.push(format!(
                "HTTP/2 {}: want {status} {forwarded:?}, got {got} {body:?}",
                case.target
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Issue 11 item 4: a client's own x-forwarded-client-cert never reaches the application.
    let (statuses, text) = raw_http1(
        web_out,
        "GET /public HTTP/1.1\r\nhost: db\r\nx-forwarded-client-cert: URI=spiffe://cluster.local/ns/ops/sa/admin\r\n\r\n",
        1,
    )
    .await;
    assert_eq!(statuses, [200], "{text}");
    assert!(!text.contains("x-app-saw-xfcc"), "{text}");
    eventually("a 400 in the access log, with why", || async {
        db.access_log()
            .iter()
            .any(|l| l["status"] == 400 && l["path"] == "/admin;x")
    })
    .await;
}

const DENY_ADMIN_HOST_AND_DELETE: &str = "apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin-host, namespace: demo}
spec:
  action: DENY
  rules:
  - to: [{operation: {hosts: [admin.example.com, \"admin.example.com:*\"]}}]
  - to: [{operation: {methods: [DELETE]}}]
";

/// Issue 11 items 2 and 3: the Host the policy sees is the one the application gets. More than
/// one Host, a Host that disagrees with the absolute-form authority or with `:authority`, and
/// userinfo are refused with 400; one trailing dot is ignored; a method that is not upper-case
/// (on a pipelined HTTP/1.1 request, or in HTTP/2) is refused with 400 instead of slipping past
/// a DENY on `DELETE`.
#[tokio::test]
async fn ambiguous_hosts_and_lower_case_methods_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[DENY_ADMIN_HOST_AND_DELETE]);
    let ProxyPair {
        host: _host,
        web: _web,
        db: _db,
        web_out,
        ..
    } = start_pair(dir.path(), &policies, target_echo_app().await, &[]).await;

    let cases: &[(&str, &str, &[u16])] = &[
        (
            "plain",
            "GET / HTTP/1.1\r\nHost: public.example.com\r\n\r\n",
            &[200],
        ),
        (
            "denied host",
            "GET / HTTP/1.1\r\nHost: admin.example.com\r\n\r\n",
            &[403],
        ),
        ("DELETE", "DELETE / HTTP/1.1\r\nHost: db\r\n\r\n", &[403]),
        (
            "absolute form and a different Host",
            "GET http://public.example.com/ HTTP/1.1\r\nHost: admin.example.com\r\n\r\n",
            &[400],
        ),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: public.example.com\r\nHost: admin.example.com\r\n\r\n",
            &[400],
        ),
        (
            "trailing dot",
            "GET / HTTP/1.1\r\nHost: admin.example.com.\r\n\r\n",
            &[403],
        ),
        (
            "trailing dot and port",
            "GET / HTTP/1.1\r\nHost: admin.example.com.:8080\r\n\r\n",
            &[403],
        ),
        (
            "userinfo in the absolute form",
            "GET http://admin.example.com@public.example.com/ HTTP/1.1\r\nHost: admin.example.com@public.example.com\r\n\r\n",
            &[400],
        ),
        (
            "userinfo in Host",
            "GET / HTTP/1.1\r\nHost: x@admin.example.com\r\n\r\n",
            &[400],
        ),
        (
            "pipelined lower-case method",
            "GET / HTTP/1.1\r\nHost: db\r\n\r\ndelete / HTTP/1.1\r\nHost: db\r\n\r\n",
            &[200, 400],
        ),
    ];
    let mut failures = Vec::new();
    for (what, raw, want) in cases {
        let (statuses, text) = raw_http1(web_out, raw, want.len()).await;
        if statuses != *want {
            failures.push(format!("HTTP/1.1 {what}: want {want:?}, got {text:?}"));
        }
    }

    let h2 = h2_client(web_out).await;
    let h2_cases: Vec<(&str, &str, hyper::Method, Option<&str>, u16)> = vec![
        (
            "plain",
            "http://public.example.com/",
            hyper::Method::GET,
            None,
            200,
        ),
        (
            "denied :authority",
            "http://admin.example.com/",
            hyper::Method::GET,
            None,
            403,
        ),
        ("DELETE", "http://db/", hyper::Method::DELETE, None, 403),
        (
            "host header differs from :authority",
            "http://public.example.com/",
            hyper::Method::GET,
            Some("admin.example.com"),
            400,
        ),
        (
            "userinfo in :authority",
            "http://u@admin.example.com/",
            hyper::Method::GET,
            None,
            400,
        ),
        (
            "trailing dot",
            "http://admin.example.com./",
            hyper::Method::GET,
            None,
            403,
        ),
        (
            "lower-case method",
            "http://db/",
            hyper::Method::from_bytes(b"delete").unwrap(),
            None,
            400,
        ),
    ];
    for (what, uri, method, host, want) in h2_cases {
        let (got, body) = h2_send(&h2, uri, |b| {
            let b = b.method(method);
            match host {
                Some(host) => b.header("host", host),
                None => b,
            }
        })
        .await;
        if got != want {
            failures.push(format!("HTTP/2 {what}: want {want}, got {got} {body:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: default, namespace: demo}}
spec: {{mtls: {{mode: {mode}}}}}
"
    )
}

/// Issue 11 item 6: a plaintext connection opened while the port was PERMISSIVE is closed when
/// a PeerAuthentication makes it STRICT (as authorization is re-checked on every change), while
/// the mTLS connection next to it keeps working.
#[tokio::test]
async fn plaintext_connections_close_when_the_port_becomes_strict() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[&peer_authentication("PERMISSIVE")]);
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        web_out,
        db_in,
    } = start_pair(dir.path(), &policies, http_app().await, &[]).await;

    let mut plaintext = TcpStream::connect(db_in).await.unwrap();
    assert_eq!(get_on(&mut plaintext, "/").await, Some((200, "ok".into())));
    let mut mtls = TcpStream::connect(web_out).await.unwrap();
    assert_eq!(get_on(&mut mtls, "/").await, Some((200, "ok".into())));

    write_policies(&policies, &[&peer_authentication("STRICT")]);
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), plaintext.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the plaintext connection stayed open after STRICT: {read:?}"
    );
    assert_eq!(get_on(&mut mtls, "/").await, Some((200, "ok".into())));
    let mut again = TcpStream::connect(db_in).await.unwrap();
    assert_eq!(get_on(&mut again, "/").await, None);
    eventually("the closure in the access log", || async {
        db.access_log()
            .iter()
            .any(|l| l["result"] == "closed_by_policy" && l["security"] == "plaintext")
    })
    .await;
}

/// An HTTP/1.1 application answering `200 ok`, counting the connections that reach it.
async fn counting_http_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve_keep_alive(
                stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                |_| {},
            ));
        }
    });
    (addr, reached)
}

/// Issue 11 item 13 (slowloris): connections that send half a request head (HTTP/1.1), or no
/// request after the HTTP/2 preface, hold no application connection and are closed after
/// --header-read-timeout; beyond
/// --max-inbound-connections new connections are closed at once and counted; a complete
/// request still gets through afterwards.
#[tokio::test]
async fn half_sent_request_heads_hold_no_app_connection_and_are_closed() {
    use tokio::io::AsyncWriteExt;
    const SLOW: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    // An HTTP policy, so that the proxy reads requests before deciding.
    write_policies(&policies, &[DENY_ADMIN]);
    let (app, reached) = counting_http_app().await;
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        db_in,
        ..
    } = start_pair(
        dir.path(),
        &policies,
        app,
        &[
            "--mtls-mode",
            "PERMISSIVE",
            "--header-read-timeout",
            "2s",
            "--max-inbound-connections",
            "10",
        ],
    )
    .await;

    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut stream = TcpStream::connect(db_in).await.unwrap();
        stream
            .write_all(b"GET /public HTTP/1.1\r\nHost: db\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    eventually("the connections over the limit counted", || async {
        db.metric("sigil_proxy_connections_over_limit_total").await >= 2.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "half-sent requests opened application connections"
    );
    // Every slow connection is closed by the proxy (over the limit at once, the others after
    // the header timeout).
    for (i, stream) in slow.iter_mut().enumerate() {
        let mut byte = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                match stream.read(&mut byte).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "slow connection {i} still open");
    }
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
    // HTTP/2 has no request-head timeout of its own: a client that sends the preface and
    // settings but no request is closed after the same timeout.
    let mut h2 = TcpStream::connect(db_in).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        let mut buf = [0u8; 256];
        while let Ok(n) = h2.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an HTTP/2 connection without a request stayed open"
    );
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
    let mut stream = TcpStream::connect(db_in).await.unwrap();
    assert_eq!(
        get_on(&mut stream, "/public").await,
        Some((200, "ok".into()))
    );
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Issue 11 items 4 and 9: with --forward-client-cert the application gets the verified
/// caller in x-forwarded-client-cert (Envoy's SANITIZE_SET: what the client sent is replaced,
/// and a plaintext caller gets none), and --access-log writes one line per allowed request with
/// the peer, method, host, normalized path, status, deciding policy and duration.
#[tokio::test]
async fn the_verified_peer_is_forwarded_and_every_request_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    write_policies(&policies, &[&peer_authentication("PERMISSIVE")]);
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        web_out,
        db_in,
    } = start_pair(
        dir.path(),
        &policies,
        target_echo_app().await,
        &["--forward-client-cert", "--access-log"],
    )
    .await;
    let forged = "GET /x/../public HTTP/1.1\r\nhost: db\r\nx-forwarded-client-cert: URI=spiffe://cluster.local/ns/ops/sa/admin\r\n\r\n";
    let (statuses, text) = raw_http1(web_out, forged, 1).await;
    assert_eq!(statuses, [200], "{text}");
    let want = format!("x-app-saw-xfcc: By={DB_ID};URI={WEB_ID}\r\n");
    assert!(text.contains(&want), "want {want:?} in {text:?}");
    // Plaintext: no verified peer, so no header, and the forged one is gone.
    let (statuses, text) = raw_http1(db_in, forged, 1).await;
    assert_eq!(statuses, [200], "{text}");
    assert!(!text.contains("x-app-saw-xfcc"), "{text}");

    eventually("the access-log line of the allowed request", || async {
        db.access_log().iter().any(|l| {
            l["kind"] == "http"
                && l["result"] == "allowed"
                && l["source_identity"] == WEB_ID
                && l["method"] == "GET"
                && l["authority"] == "db"
                && l["path"] == "/public"
                && l["status"] == 200
                && l["policy"] == "default"
                && l["total_ms"].as_f64().is_some()
                && l["duration_ms"].as_f64().is_some()
        })
    })
    .await;
}
