//! Issue 11's last gaps, end to end through the real `sigil` processes (CA, agent, proxies in
//! explicit mode, mTLS between a web proxy and a db proxy):
//! - item 4: with no HTTP policy, no access log and no `--forward-client-cert`, a client's own
//!   `x-forwarded-client-cert` still never reaches the application, however the request comes
//!   (HTTP/1.1, HTTP/2, an extension method, empty lines first, after waiting out the protocol
//!   detection), while a server-first protocol (the application greets first) and other bytes
//!   pass as they are;
//! - item 5: a policy the proxy cannot compile denies in its namespace, and a workload of
//!   another namespace is unaffected;
//! - item 21: `--app-probe ...#Name=value` sends the pod's probe headers to the application.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sigil_test_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB_UID: u32 = 41901;
const DB_UID: u32 = 41902;
const OTHER_UID: u32 = 41903;
const OTHER_ID: &str = "spiffe://cluster.local/ns/other/sa/api";

/// What a client forges: an identity the mesh never verified.
const FORGED: &str =
    "By=spiffe://evil.example/ns/x/sa/y;URI=spiffe://cluster.local/ns/ops/sa/admin";

/// The web and db proxies with no policies and no flags but explicit mode's, `app` behind db.
async fn plain_pair(dir: &Path, app: SocketAddr, db_args: &[&str]) -> ProxyPair {
    ProxyPair::start(
        dir,
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db: DB_ID,
            db_args,
            cert_ttl: "1h",
            agent_args: &[],
            app,
        },
    )
    .await
}

/// An HTTP/1.1 and HTTP/2 (h2c, told apart by the preface) application that answers every
/// request `200` with the `x-forwarded-client-cert` it received as the body, or `none`.
async fn xfcc_echo_app() -> SocketAddr {
    h1_or_h2_app(|request| {
        let saw = match request.headers().get("x-forwarded-client-cert") {
            Some(value) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            None => "none".to_owned(),
        };
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(saw)))
    })
    .await
}

/// Issue 11 item 4: the db proxy runs without an HTTP policy, an access log or
/// `--forward-client-cert`, so nothing asks it to look at HTTP; a client behind the web proxy
/// (mTLS between them) sends a forged `x-forwarded-client-cert` every way it can think of, and
/// the application never sees it, while every request still gets through.
#[tokio::test]
async fn a_forged_client_cert_header_never_reaches_the_app_without_http_policies() {
    let dir = tempfile::tempdir().unwrap();
    let ProxyPair {
        host: _host,
        web: _web,
        db: _db,
        web_out,
        ..
    } = plain_pair(dir.path(), xfcc_echo_app().await, &[]).await;

    let request = |method: &str, prefix: &str| {
        format!(
            "{prefix}{method} / HTTP/1.1\r\nhost: db\r\nx-forwarded-client-cert: {FORGED}\r\n\r\n"
        )
    };
    for (case, raw, wait_first) in [
        ("HTTP/1.1 GET", request("GET", ""), Duration::ZERO),
        // A method no list of standard ones has (the application serves it all the same).
        ("an extension method", request("PURGE", ""), Duration::ZERO),
        // Servers skip empty lines before the request line (RFC 9112 section 2.2).
        (
            "empty lines first",
            request("GET", "\r\n\r\n"),
            Duration::ZERO,
        ),
        // Sent only after the proxy stopped waiting for the client's first bytes.
        (
            "after waiting out the detection",
            request("GET", ""),
            Duration::from_millis(1500),
        ),
    ] {
        let mut stream = TcpStream::connect(web_out).await.unwrap();
        tokio::time::sleep(wait_first).await;
        stream.write_all(raw.as_bytes()).await.unwrap();
        let answer = read_response(&mut stream).await;
        assert_eq!(answer, Some((200, "none".to_owned())), "{case}");
        // The next request on the same connection too.
        stream
            .write_all(request("GET", "").as_bytes())
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert_eq!(
            answer,
            Some((200, "none".to_owned())),
            "{case}, second request"
        );
    }

    // HTTP/2 (prior knowledge, as gRPC speaks it).
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = TcpStream::connect(web_out).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("http://db/")
        .header("x-forwarded-client-cert", FORGED)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("no HTTP/2 answer within 5 s")
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), "none", "HTTP/2");
}

/// An application that greets every connection with `220 ready` (as SMTP or MySQL servers do)
/// and then echoes what it gets.
async fn greeting_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(b"220 ready\r\n").await.is_err() {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Reads exactly `want.len()` bytes within 5 s.
async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("nothing within 5 s")
        .unwrap();
    got
}

/// Telling HTTP from other bytes on every connection must not break what is not HTTP: a
/// server-first protocol's client, which sends nothing until greeted, gets the greeting (after
/// at most the detection wait, not a hang) and a session; a client-first binary protocol and a
/// text command that looks a little like a request line pass as they are, at once.
#[tokio::test]
async fn server_first_and_other_protocols_pass_as_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ProxyPair {
        host: _host,
        web: _web,
        db: _db,
        web_out,
        ..
    } = plain_pair(dir.path(), greeting_echo_app().await, &[]).await;

    let started = Instant::now();
    let mut stream = TcpStream::connect(web_out).await.unwrap();
    assert_eq!(read_exactly(&mut stream, 11).await, b"220 ready\r\n");
    let greeted = started.elapsed();
    assert!(
        greeted < Duration::from_secs(3),
        "greeted after {greeted:?}"
    );
    stream.write_all(b"EHLO web\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 10).await, b"EHLO web\r\n");
    // A later command shaped like a request line is the protocol's, not HTTP: the application
    // spoke first.
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(
        read_exactly(&mut stream, 18).await,
        b"GET / HTTP/1.1\r\n\r\n"
    );

    for first in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        b"SET key value\r\n",
    ] {
        let mut stream = TcpStream::connect(web_out).await.unwrap();
        stream.write_all(first).await.unwrap();
        let mut expected = b"220 ready\r\n".to_vec();
        expected.extend_from_slice(first);
        assert_eq!(
            read_exactly(&mut stream, expected.len()).await,
            expected,
            "{first:?}"
        );
    }
}

/// Issue 11 item 5: the agent's policy file holds an AuthorizationPolicy for namespace `demo`
/// with an action the proxy does not know. The db proxy (in `demo`) cannot compile it and
/// denies: mTLS from web and plaintext alike are refused. The api proxy, in namespace `other`,
/// is unaffected by it.
#[tokio::test]
async fn a_policy_the_proxy_cannot_compile_denies_in_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    std::fs::write(
        &policies,
        "apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: from-the-future, namespace: demo}
spec:
  action: QUARANTINE
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/web]}}]
",
    )
    .unwrap();
    let host = MeshHost::start(
        dir.path(),
        &[(WEB_UID, WEB_ID), (DB_UID, DB_ID), (OTHER_UID, OTHER_ID)],
        "1h",
        &["--policy-file", policies.to_str().unwrap()],
    )
    .await;
    let socket = host.socket.to_str().unwrap().to_owned();
    let app = http_app().await;
    let inbound = |uid: u32, name: &'static str| {
        let (dir, socket) = (dir.path().to_owned(), socket.clone());
        async move {
            let listen = free_addr();
            let proxy = spawn_proxy(
                &dir,
                name,
                Some(uid),
                &args(&[
                    "--explicit",
                    "--agent-socket",
                    &socket,
                    "--inbound-listen",
                    &listen.to_string(),
                    "--inbound-app",
                    &app.to_string(),
                    "--mtls-mode",
                    "PERMISSIVE",
                ]),
            )
            .await;
            (proxy, listen)
        }
    };
    let (db, db_in) = inbound(DB_UID, "proxy-db").await;
    let (other, other_in) = inbound(OTHER_UID, "proxy-other").await;
    let web_out = free_addr();
    let _web = spawn_proxy(
        dir.path(),
        "proxy-web",
        Some(WEB_UID),
        &args(&[
            "--explicit",
            "--agent-socket",
            &socket,
            "--outbound-listen",
            &web_out.to_string(),
            "--outbound-upstream",
            &db_in.to_string(),
            "--outbound-identity",
            DB_ID,
        ]),
    )
    .await;

    // The workload of another namespace answers, so the application and the mesh work.
    let mut stream = TcpStream::connect(other_in).await.unwrap();
    assert_eq!(get_on(&mut stream, "/").await, Some((200, "ok".into())));
    // The db workload refuses everyone: the web peer over mTLS, and a plaintext client.
    for (how, addr) in [("mTLS from web", web_out), ("plaintext", db_in)] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let answer = get_on(&mut stream, "/").await;
        assert!(
            matches!(answer, None | Some((403, _))),
            "{how}: {answer:?}\n{}",
            db.logs()
        );
    }
    eventually("the rejected policy counted by the db proxy", || async {
        db.metric("sigil_proxy_policies_rejected").await >= 1.0
    })
    .await;
    assert_eq!(other.metric("sigil_proxy_policies_rejected").await, 0.0);
}

/// An application whose `/healthz` answers 200 only to a request carrying the pod's probe
/// headers (`Host: shop.example`, `X-Probe-Token: s3cret`), and 401 to anything else.
async fn header_checking_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let ok = head.starts_with("get /healthz ")
                    && head.contains("\r\nhost: shop.example\r\n")
                    && head.contains("\r\nx-probe-token: s3cret\r\n");
                let answer: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                } else {
                    b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

/// Issue 11 item 21: a probe whose pod spec sets `httpHeaders` reaches the application with
/// them (`--app-probe NAME=PORT/PATH#Header=value`, as the injector writes it), so a kubelet
/// GET of `/app-health/<container>-<kind>` on the proxy's metrics port succeeds; the same probe
/// without the headers fails, which shows the application does check them.
#[tokio::test]
async fn probe_headers_reach_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let app = header_checking_app().await;
    let with_headers = format!(
        "db-ready={}/healthz#Host=shop.example#X-Probe-Token=s3cret",
        app.port()
    );
    let without = format!("db-live={}/healthz", app.port());
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        ..
    } = plain_pair(
        dir.path(),
        app,
        &["--app-probe", &with_headers, "--app-probe", &without],
    )
    .await;
    let (status, body) = http_get(db.metrics, "/app-health/db-ready").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", db.logs());
    let (status, body) = http_get(db.metrics, "/app-health/db-live").await.unwrap();
    assert_ne!(status, 200, "{body}");
}

/// An application that switches every request to an echo protocol (`101`, `upgrade: echo`), as
/// a WebSocket server does, and then echoes what it gets.
async fn upgrading_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => head.push(byte[0]),
                    }
                }
                let switch = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
                if stream.write_all(switch).await.is_err() {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Now that every HTTP connection is parsed, an HTTP/1.1 Upgrade (WebSocket) must still work:
/// the `101` comes back and then the connection carries the new protocol's bytes both ways.
#[tokio::test]
async fn upgraded_connections_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let ProxyPair {
        host: _host,
        web: _web,
        db: _db,
        web_out,
        ..
    } = plain_pair(dir.path(), upgrading_echo_app().await, &[]).await;
    let mut stream = TcpStream::connect(web_out).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nhost: db\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = read_exactly(&mut stream, 1).await;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    for message in [&b"hello over the tunnel"[..], b"GET / HTTP/1.1\r\n\r\n"] {
        stream.write_all(message).await.unwrap();
        assert_eq!(read_exactly(&mut stream, message.len()).await, message);
    }
}
