//! The bundled proxy in explicit mode (no iptables), as real processes: certificates from a real
//! agent over SDS, mutual TLS between two proxies with SPIFFE ID checks, PERMISSIVE and STRICT,
//! the agent going away, the drain on SIGTERM, and certificate rotation under load.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sigil_test_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB_UID: u32 = 41101;
const DB_UID: u32 = 41102;

/// Sends `message` and reads the same number of bytes back. The short messages are lines, as a
/// line-based protocol's are: a bare word with no line end could still open an HTTP request
/// line, and the inbound proxy takes it for HTTP when the client then goes quiet (SECURITY.md,
/// protocol detection).
async fn echo_through(addr: SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    echo_on(&mut stream, message).await
}

async fn echo_on(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(back)
}

/// web app → web proxy (outbound, expects `expect_db`) → db proxy (inbound, `db_args`) → echo.
async fn pair(dir: &std::path::Path, expect_db: &str, db_args: &[&str]) -> ProxyPair {
    pair_with(dir, expect_db, db_args, "1h", echo_app().await.0).await
}

async fn pair_with(
    dir: &std::path::Path,
    expect_db: &str,
    db_args: &[&str],
    cert_ttl: &str,
    app: SocketAddr,
) -> ProxyPair {
    ProxyPair::start(
        dir,
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db,
            db_args,
            cert_ttl,
            agent_args: &[],
            app,
        },
    )
    .await
}

#[tokio::test]
async fn two_proxies_carry_bytes_over_mtls_and_each_logs_the_other_identity() {
    let dir = tempfile::tempdir().unwrap();
    let p = pair(dir.path(), DB_ID, &[]).await;

    let message = b"hello through two proxies".repeat(1000);
    let back = echo_through(p.web_out, &message).await.unwrap();
    assert_eq!(back, message);

    // Each side's access log names the other's verified identity.
    eventually("access-log lines on both proxies", || async {
        !p.db.access_log().is_empty() && !p.web.access_log().is_empty()
    })
    .await;
    let db_line = &p.db.access_log()[0];
    assert_eq!(db_line["direction"], "inbound", "{db_line}");
    assert_eq!(db_line["security"], "mtls");
    assert_eq!(db_line["source_identity"], WEB_ID);
    assert_eq!(db_line["destination_identity"], DB_ID);
    assert_eq!(db_line["result"], "ok");
    assert_eq!(db_line["bytes_received"], message.len() as u64);
    assert_eq!(db_line["bytes_sent"], message.len() as u64);
    let web_line = &p.web.access_log()[0];
    assert_eq!(web_line["direction"], "outbound", "{web_line}");
    assert_eq!(web_line["source_identity"], WEB_ID);
    assert_eq!(web_line["destination_identity"], DB_ID);

    // Admin and metrics.
    let certs = p.db.certs().await;
    assert_eq!(certs["identity"], DB_ID, "{certs}");
    assert!(certs["expires_in_seconds"].as_i64().unwrap() > 3000);
    assert_eq!(certs["roots"].as_array().unwrap().len(), 1);
    // The PEM endpoints feed `sigil inspect cert` (README's cluster quickstart does this through
    // `kubectl port-forward`): the chain the proxy presents verifies against its bundle.
    for (path, file) in [
        ("/certs/chain.pem", "db-chain.pem"),
        ("/certs/bundle.pem", "db-bundle.pem"),
    ] {
        let (status, pem) = http_get(p.db.admin, path).await.unwrap();
        assert_eq!(status, 200, "{path}: {pem}");
        std::fs::write(dir.path().join(file), pem).unwrap();
    }
    let report = sigil(&[
        "inspect",
        "cert",
        dir.path().join("db-chain.pem").to_str().unwrap(),
        "--bundle",
        dir.path().join("db-bundle.pem").to_str().unwrap(),
    ]);
    assert!(report.contains(DB_ID), "{report}");
    assert_eq!(
        p.db.metric(
            "sigil_proxy_connections_opened_total{direction=\"inbound\",security=\"mtls\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        p.db.metric(
            "sigil_proxy_bytes_total{direction=\"inbound\",flow=\"downstream_to_upstream\"}"
        )
        .await,
        message.len() as f64
    );
    assert_eq!(p.db.metric("sigil_proxy_sds_connected").await, 1.0);
    assert!(
        p.db.metric("sigil_proxy_cert_expiry_timestamp_seconds")
            .await
            > 1.7e9
    );
    let (status, config) = http_get(p.web.admin, "/config").await.unwrap();
    assert_eq!(status, 200);
    assert!(config.contains(DB_ID), "{config}");
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_before_any_byte_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    // The web proxy expects WEB_ID from the upstream, which is the db proxy (DB_ID).
    let p = pair(dir.path(), WEB_ID, &[]).await;
    assert!(echo_through(p.web_out, b"secret\n").await.is_err());
    eventually("the refusal in the web proxy's access log", || async {
        !p.web.access_log().is_empty()
    })
    .await;
    let line = &p.web.access_log()[0];
    assert_eq!(line["result"], "wrong_identity", "{line}");
    assert!(line["detail"].as_str().unwrap().contains(DB_ID), "{line}");
    assert_eq!(
        p.web
            .metric("sigil_proxy_tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_identity\"}")
            .await,
        1.0
    );
    // Nothing reached the app: the db proxy saw a handshake but forwarded nothing.
    eventually("the db proxy's line", || async {
        !p.db.access_log().is_empty()
    })
    .await;
    let db_line = &p.db.access_log()[0];
    assert_eq!(db_line["bytes_received"], 0, "{db_line}");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_lets_it_in_without_identity() {
    let dir = tempfile::tempdir().unwrap();
    let p = pair(dir.path(), DB_ID, &[]).await;
    // STRICT (the default): plaintext straight to the db proxy is closed, nothing reaches the app.
    assert!(
        echo_through(p.db_in, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_err()
    );
    eventually("the refusal", || async { !p.db.access_log().is_empty() }).await;
    assert_eq!(p.db.access_log()[0]["result"], "not_tls");
    assert_eq!(
        p.db.metric(
            "sigil_proxy_tls_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"}"
        )
        .await,
        1.0
    );
    drop(p);

    let dir = tempfile::tempdir().unwrap();
    let p = pair(dir.path(), DB_ID, &["--mtls-mode", "PERMISSIVE"]).await;
    // Plaintext passes, with no identity...
    assert_eq!(echo_through(p.db_in, b"plain\n").await.unwrap(), b"plain\n");
    // ...and mTLS still works, with one.
    assert_eq!(echo_through(p.web_out, b"tls\n").await.unwrap(), b"tls\n");
    eventually("two lines", || async { p.db.access_log().len() == 2 }).await;
    let lines = p.db.access_log();
    let plain = lines.iter().find(|l| l["security"] == "plaintext").unwrap();
    assert!(plain["source_identity"].is_null(), "{plain}");
    let tls = lines.iter().find(|l| l["security"] == "mtls").unwrap();
    assert_eq!(tls["source_identity"], WEB_ID);
    // A server-first protocol (the client waits for the server to speak) is plaintext too.
    let mut silent = TcpStream::connect(p.db_in).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(echo_on(&mut silent, b"late\n").await.unwrap(), b"late\n");
}

#[tokio::test]
async fn the_proxy_keeps_its_certificate_while_the_agent_is_away_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pair(dir.path(), DB_ID, &[]).await;
    let mut open = TcpStream::connect(p.web_out).await.unwrap();
    assert_eq!(echo_on(&mut open, b"before\n").await.unwrap(), b"before\n");

    p.host.stop_agent();
    eventually("the proxies notice the agent is gone", || async {
        p.db.metric("sigil_proxy_sds_connected").await == 0.0
    })
    .await;
    // Live and new connections both work on the certificate already held.
    assert_eq!(echo_on(&mut open, b"during\n").await.unwrap(), b"during\n");
    assert_eq!(echo_through(p.web_out, b"new\n").await.unwrap(), b"new\n");
    let (status, _) = http_get(p.db.admin, "/ready").await.unwrap();
    assert_eq!(status, 200, "a held certificate keeps the proxy ready");
    assert!(p.db.logs().contains("lost the agent's SDS stream"));

    p.host.start_agent("agent-2.log").await;
    eventually("the proxies reconnect", || async {
        p.db.metric("sigil_proxy_sds_connected").await == 1.0
            && p.web.metric("sigil_proxy_sds_connected").await == 1.0
    })
    .await;
    assert!(p.db.metric("sigil_proxy_sds_reconnects_total").await >= 1.0);
    assert_eq!(echo_on(&mut open, b"after\n").await.unwrap(), b"after\n");
}

#[tokio::test]
async fn sigterm_drains_live_connections_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pair(dir.path(), DB_ID, &["--drain-timeout", "20s"]).await;
    let mut open = TcpStream::connect(p.web_out).await.unwrap();
    assert_eq!(echo_on(&mut open, b"before\n").await.unwrap(), b"before\n");
    eventually("the db proxy holds the connection", || async {
        p.db.metric("sigil_proxy_connections_active{direction=\"inbound\",security=\"mtls\"}")
            .await
            == 1.0
    })
    .await;

    p.db.terminate();
    eventually("the db proxy reports not ready", || async {
        !matches!(http_get(p.db.admin, "/ready").await, Ok((200, _)))
    })
    .await;
    // The live connection still works; a new one is refused by the db proxy.
    assert_eq!(echo_on(&mut open, b"during\n").await.unwrap(), b"during\n");
    assert!(echo_through(p.web_out, b"new\n").await.is_err());
    assert!(
        p.db.proc.child.try_wait().unwrap().is_none(),
        "exited early"
    );
    // Closing the last connection lets it exit, long before the drain timeout.
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = p.db.proc.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not exit:\n{}", p.db.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.db.logs().contains("proxy stopped"));
}

#[tokio::test]
async fn certificates_rotating_every_few_seconds_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    // 4 s certificates are renewed about every 2 s.
    let p = pair_with(dir.path(), DB_ID, &[], "4s", http_app().await).await;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + Duration::from_secs(9);
    let mut clients = Vec::new();
    // Keep-alive connections, opened before any rotation and used across all of them...
    for _ in 0..4 {
        let (ok, failed, addr) = (ok.clone(), failed.clone(), p.web_out);
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            while Instant::now() < until {
                let counter = if request(&mut stream).await {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // ...and a new connection (new handshakes on both hops) per request.
    for _ in 0..2 {
        let (ok, failed, addr) = (ok.clone(), failed.clone(), p.web_out);
        clients.push(tokio::spawn(async move {
            while Instant::now() < until {
                let good = match TcpStream::connect(addr).await {
                    Ok(mut stream) => request(&mut stream).await,
                    Err(_) => false,
                };
                let counter = if good { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Meanwhile, record the serials both proxies present.
    let (mut web_serials, mut db_serials) = (BTreeSet::new(), BTreeSet::new());
    while Instant::now() < until {
        for (proxy, serials) in [(&p.web, &mut web_serials), (&p.db, &mut db_serials)] {
            if let Some(serial) = proxy.certs().await["serial"].as_str() {
                serials.insert(serial.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 1000, "only {ok} requests");
    assert!(
        web_serials.len() >= 3 && db_serials.len() >= 3,
        "expected at least two rotations on each side: web {web_serials:?}, db {db_serials:?}"
    );
    assert!(p.db.metric("sigil_proxy_cert_updates_total").await >= 3.0);
}
