//! Transparent interception end to end, as root, in network namespaces this test creates and
//! deletes (pass or fail): two "pods", each with `sigil proxy init` rules and a transparent
//! `sigil proxy run` as its own uid, a plain HTTP client in A and a plain HTTP server in B that
//! know nothing of TLS. It proves that:
//!
//! 1. A's app reaches B's app through both proxies over mutual TLS, and each proxy's access log
//!    names the other side's verified SPIFFE ID (B: source WEB; A: destination DB);
//! 2. what crosses the wire between the pods is TLS: with B's proxy replaced by a raw listener
//!    on its inbound port, the first bytes from A are a TLS ClientHello, never "GET /";
//! 3. STRICT (the default) refuses a plaintext client from outside the mesh (namespace C): the
//!    request fails, B's app sees nothing and B counts a `not_tls` handshake failure;
//! 4. PERMISSIVE lets that plaintext in with no identity, while A's requests still arrive over
//!    mTLS as WEB;
//! 5. a destination outside the mesh (the HTTP server in C) is passed through untouched;
//! 6. inbound connections go to the original destination (B's pod IP), as Istio's since 1.10,
//!    so a port B's app bound to 127.0.0.1 only is not reachable from the mesh (issue 11 item 7).
//! 7. a transparent proxy listens on both families: in a namespace of its own
//!    (`sigil-v6listen-<pid>-pod`, a veth with 198.18.23.1/24 and 2001:2:0:23::1/64),
//!    connections redirected by iptables and by ip6tables each reach it on their family's
//!    listener, and it reads each one's original destination (`SO_ORIGINAL_DST`,
//!    `IP6T_SO_ORIGINAL_DST`) and source without IPv4-mapped addresses.
//!
//! ```text
//!          pod A (netns)                           pod B (netns)
//!   app: python3 urllib, uid 41213              app: HTTP server 0.0.0.0:8080
//!     │ OUTPUT → :15001                           ▲ 127.0.0.1:8080
//!   sigil proxy, uid 41211 (WEB)                sigil proxy, uid 41212 (DB)
//!     │ mTLS (its uid is excluded)                ▲ PREROUTING → :15006
//!   eth0 198.18.0.1/24                          eth0 198.18.0.2/24
//!     │                                           │
//!     └──── veth-a ───────┐       ┌──────── veth-b┘
//!                       ┌─┴───────┴─┐
//!                       │ br0       │ netns C, 198.18.0.3/24: a plain HTTP server on :9090
//!                       └───────────┘ (not meshed), a plaintext client, and the reader of
//!                                     the proxies' /ready and /metrics on <pod IP>:15020
//! ```
//!
//! The CA and the agent (unix attestor: uid 41211 is WEB, 41212 is DB; `--mesh-file` lists A's
//! and B's addresses) run in the host's namespace; the proxies reach the agent through its Unix
//! socket, which is a path and so reachable from any network namespace. The HTTP clients are
//! Python's urllib run with `ip netns exec` and setpriv; the servers (B's app, C's server, the
//! raw listener) and the /ready and /metrics reader are sockets of the test process (root),
//! created by a thread that entered the namespace with setns(2): a socket stays in the
//! namespace it was created in. The namespaces, the two-pod network and the pods' proxies are
//! tests/harness/src/netns.rs's, shared with tests/e2e/policy_netns.rs and tests/e2e/proxy_init.rs.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use sigil_test_harness::netns::{
    Netns, PYTHON, PodNetwork, PodProxy, RecordingServer, require_root,
};
use sigil_test_harness::{DB_ID, MeshHost, WEB_ID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// This test's namespaces are `sigil-netns-<pid>-{a,b,c}`.
const NETNS_PREFIX: &str = "sigil-netns";
/// A's proxy: attested as WEB, excluded from A's redirection.
const WEB_UID: u32 = 41211;
/// B's proxy: attested as DB, excluded from B's redirection.
const DB_UID: u32 = 41212;
/// A's application: any uid but the proxy's is redirected.
const APP_UID: &str = "41213";
/// Addresses come from 198.18.0.0/15 (benchmarking), which no real network uses.
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// B's application port.
const APP_PORT: u16 = 8080;
/// A port of B's app bound to 127.0.0.1 only (a debug port, say).
const PRIVATE_PORT: u16 = 9001;
/// C's plain listener, outside the mesh.
const OUTSIDE_PORT: u16 = 9090;
/// sigil's default inbound listener.
const INBOUND_PORT: u16 = 15006;
const B_BODY: &str = "hello from b's app\n";
const C_BODY: &str = "hello from outside the mesh\n";
const NOT_TLS: &str =
    "sigil_proxy_tls_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"}";
const PLAINTEXT_OPENED: &str =
    "sigil_proxy_connections_opened_total{direction=\"inbound\",security=\"plaintext\"}";
/// GETs `argv[1]` with no proxy settings (urllib would honour `http_proxy`) and prints the body;
/// fails on anything but a 2xx HTTP answer.
const HTTP_CLIENT: &str = r#"
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as answer:
    sys.stdout.write(answer.read().decode())
"#;
/// What this test does in a namespace beyond sigil_test_harness::netns.
trait PlainHttpClient {
    /// A plain HTTP client (Python's urllib, which knows nothing of the mesh) run as `uid`
    /// inside the namespace: the body on a 2xx answer, else the client's error.
    async fn http_client(&self, uid: &str, url: &str) -> Result<String, String>;
}

impl PlainHttpClient for Netns {
    async fn http_client(&self, uid: &str, url: &str) -> Result<String, String> {
        let mut command = tokio::process::Command::from(
            self.command_as(uid, &[PYTHON, "-I", "-c", HTTP_CLIENT, url]),
        );
        let out = command
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {PYTHON}: {e}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// A plain HTTP server in a namespace: answers every request with a fixed body and closes,
/// recording each connection's request head (empty if the client sent none). Stopped on drop.
fn http_app(netns: &Netns, port: u16, body: &'static str) -> RecordingServer {
    RecordingServer::start(netns, port, move |mut stream, seen| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        seen.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
}

/// Accepts one connection and returns what it sent: its first TLS record (5-byte header and
/// the length it announces), then whatever else arrives before 300 ms of silence.
async fn first_bytes(listener: TcpListener) -> Vec<u8> {
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut bytes = vec![0u8; 5];
    let header = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut bytes)).await;
    if !matches!(header, Ok(Ok(_))) {
        return bytes;
    }
    let announced = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
    let mut record = vec![0u8; announced];
    if let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut record)).await
    {
        bytes.extend_from_slice(&record);
    }
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    bytes
}

/// A line's field as text (access-log fields are strings or null).
fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line[name].as_str().unwrap_or_default()
}

#[tokio::test]
async fn transparent_proxies_carry_a_plain_http_request_over_mtls_between_two_pods() {
    require_root(
        "this test creates network namespaces, installs iptables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "members:\n- {{ip: {A_IP}, id: \"{WEB_ID}\"}}\n- {{ip: {B_IP}, id: \"{DB_ID}\"}}\n"
        ),
    )
    .unwrap();
    let host = MeshHost::start(
        dir.path(),
        &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)],
        "1h",
        &["--mesh-file", mesh_file.to_str().unwrap()],
    )
    .await;

    // C holds the bridge both pods are plugged into, with an address of its own.
    let PodNetwork { a, b, c } =
        PodNetwork::new(NETNS_PREFIX, C_IP, [(A_IP, WEB_UID), (B_IP, DB_UID)]);

    let b_app = http_app(&b, APP_PORT, B_BODY);
    let a_proxy = PodProxy::start(
        &a,
        A_IP,
        None,
        WEB_UID,
        &host.socket,
        &[],
        dir.path().join("proxy-a.log"),
        &c,
    )
    .await;
    let b_proxy = PodProxy::start(
        &b,
        B_IP,
        None,
        DB_UID,
        &host.socket,
        &[],
        dir.path().join("proxy-b-strict.log"),
        &c,
    )
    .await;
    let b_url = format!("http://{B_IP}:{APP_PORT}/hello");

    // 1. A plain HTTP request from A's app arrives at B's app over mTLS, both identities checked.
    let answer = a.http_client(APP_UID, &b_url).await;
    assert_eq!(
        answer.as_deref(),
        Ok(B_BODY),
        "A's app through both proxies:\nA:\n{}\nB:\n{}",
        a_proxy.logs(),
        b_proxy.logs()
    );
    let requests = b_app.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /hello HTTP/1.1\r\n"),
        "{requests:?}"
    );
    let b_line = &b_proxy.access_lines(1).await[0];
    assert_eq!(b_line["direction"], "inbound", "{b_line}");
    assert_eq!(b_line["security"], "mtls", "{b_line}");
    assert_eq!(b_line["source_identity"], WEB_ID, "{b_line}");
    assert_eq!(b_line["destination_identity"], DB_ID, "{b_line}");
    assert_eq!(
        b_line["destination"],
        format!("{B_IP}:{APP_PORT}"),
        "{b_line}"
    );
    assert!(
        field(b_line, "source").starts_with(&format!("{A_IP}:")),
        "{b_line}"
    );
    assert_eq!(b_line["result"], "ok", "{b_line}");
    let a_line = &a_proxy.access_lines(1).await[0];
    assert_eq!(a_line["direction"], "outbound", "{a_line}");
    assert_eq!(a_line["security"], "mtls", "{a_line}");
    assert_eq!(a_line["source_identity"], WEB_ID, "{a_line}");
    assert_eq!(a_line["destination_identity"], DB_ID, "{a_line}");
    assert_eq!(
        a_line["destination"],
        format!("{B_IP}:{APP_PORT}"),
        "{a_line}"
    );
    assert_eq!(a_line["result"], "ok", "{a_line}");

    // 6. A port B's app bound to loopback only stays private: B's proxy forwards to B's pod
    // IP, where nothing listens on it, not to 127.0.0.1.
    let private = sigil_test_harness::netns::in_netns(&b.name, || {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, PRIVATE_PORT))
    })
    .unwrap();
    private.set_nonblocking(true).unwrap();
    let private = TcpListener::from_std(private).unwrap();
    let private_seen = tokio::spawn(async move { private.accept().await.is_ok() });
    let reached = a
        .http_client(APP_UID, &format!("http://{B_IP}:{PRIVATE_PORT}/debug"))
        .await;
    assert!(
        reached.is_err(),
        "a loopback-only port was reachable from the mesh: {reached:?}"
    );
    assert!(
        !private_seen.is_finished(),
        "the loopback-only listener got a connection"
    );
    private_seen.abort();
    let b_line = &b_proxy.access_lines(2).await[1];
    // The request's own line: B's proxy answered 502 because nothing listens on the pod's
    // address at that port.
    assert_eq!(b_line["result"], "upstream_failed", "{b_line}");
    assert_eq!(b_line["status"], 502, "{b_line}");
    assert!(
        b_line["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("connecting to the application")),
        "{b_line}"
    );
    // Then the connection's line.
    let b_line = &b_proxy.access_lines(3).await[2];
    assert_eq!(b_line["result"], "upstream_connect_failed", "{b_line}");

    // 3. STRICT: plaintext from C (no proxy there) is refused before B's app sees anything.
    let refused = c.http_client("0", &b_url).await;
    assert!(refused.is_err(), "STRICT let plaintext in: {refused:?}");
    let b_line = &b_proxy.access_lines(4).await[3];
    assert_eq!(b_line["result"], "not_tls", "{b_line}");
    assert!(
        field(b_line, "source").starts_with(&format!("{C_IP}:")),
        "{b_line}"
    );
    assert!(b_line["source_identity"].is_null(), "{b_line}");
    assert_eq!(b_proxy.metric(NOT_TLS).await, 1.0);
    assert_eq!(
        b_app.requests().len(),
        1,
        "B's app saw the plaintext request"
    );

    // 5. A destination outside the mesh is passed through, plaintext and untouched.
    let c_app = http_app(&c, OUTSIDE_PORT, C_BODY);
    let c_url = format!("http://{C_IP}:{OUTSIDE_PORT}/outside");
    assert_eq!(a.http_client(APP_UID, &c_url).await.as_deref(), Ok(C_BODY));
    let requests = c_app.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /outside HTTP/1.1\r\n"),
        "{requests:?}"
    );
    assert!(
        requests[0].contains(&format!("\r\nHost: {C_IP}:{OUTSIDE_PORT}\r\n")),
        "{requests:?}"
    );
    let a_line = &a_proxy.access_lines(3).await[2];
    assert_eq!(a_line["direction"], "outbound", "{a_line}");
    assert_eq!(a_line["security"], "passthrough", "{a_line}");
    assert_eq!(
        a_line["destination"],
        format!("{C_IP}:{OUTSIDE_PORT}"),
        "{a_line}"
    );
    assert!(a_line["destination_identity"].is_null(), "{a_line}");
    assert_eq!(a_line["result"], "ok", "{a_line}");

    // 2. On the wire: with a raw listener where B's iptables send inbound connections, what
    // A's pod sends is a TLS ClientHello, not the request.
    drop(b_proxy);
    let wire = tokio::spawn(first_bytes(b.listen(INBOUND_PORT)));
    let failed = a.http_client(APP_UID, &b_url).await;
    assert!(failed.is_err(), "no TLS server, yet: {failed:?}");
    let bytes = tokio::time::timeout(Duration::from_secs(10), wire)
        .await
        .expect("nothing reached B's inbound port")
        .unwrap();
    assert!(bytes.len() > 5, "{bytes:02x?}");
    assert_eq!(
        bytes[..2],
        [0x16, 0x03],
        "not a TLS handshake record: {bytes:02x?}"
    );
    assert_eq!(bytes[5], 0x01, "not a ClientHello: {bytes:02x?}");
    assert!(
        !bytes.windows(5).any(|w| w == b"GET /"),
        "plaintext on the wire: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(b_app.requests().len(), 1);

    // 4. PERMISSIVE: the same plaintext request gets in, with no identity; A's still uses mTLS.
    let b_proxy = PodProxy::start(
        &b,
        B_IP,
        None,
        DB_UID,
        &host.socket,
        &["--mtls-mode", "PERMISSIVE"],
        dir.path().join("proxy-b-permissive.log"),
        &c,
    )
    .await;
    assert_eq!(
        c.http_client("0", &b_url).await.as_deref(),
        Ok(B_BODY),
        "PERMISSIVE refused plaintext:\n{}",
        b_proxy.logs()
    );
    let plain = &b_proxy.access_lines(1).await[0];
    assert_eq!(plain["security"], "plaintext", "{plain}");
    assert!(plain["source_identity"].is_null(), "{plain}");
    assert!(
        field(plain, "source").starts_with(&format!("{C_IP}:")),
        "{plain}"
    );
    assert_eq!(plain["result"], "ok", "{plain}");
    assert_eq!(b_proxy.metric(PLAINTEXT_OPENED).await, 1.0);
    assert_eq!(a.http_client(APP_UID, &b_url).await.as_deref(), Ok(B_BODY));
    let meshed = &b_proxy.access_lines(2).await[1];
    assert_eq!(meshed["security"], "mtls", "{meshed}");
    assert_eq!(meshed["source_identity"], WEB_ID, "{meshed}");
    assert_eq!(b_app.requests().len(), 3);
}

/// Item 7: `sigil proxy run` (no agent: outbound connections are refused for want of mesh
/// membership, and the access-log line of each refusal names its source and original
/// destination) in a namespace where iptables and ip6tables redirect 198.18.23.0/24 and
/// 2001:2:0:23::/64 to its outbound port.
#[tokio::test]
async fn a_transparent_proxy_reads_the_original_destination_of_both_families() {
    require_root("creating network namespaces and ip6tables rules");
    let pod = Netns::new("sigil-v6listen", "pod");
    // A veth pair with both ends in the namespace: a route to each family's /24 and /64.
    pod.run(&[
        "ip", "link", "add", "v6l0", "type", "veth", "peer", "name", "v6l1",
    ]);
    for link in ["v6l0", "v6l1"] {
        pod.run(&["ip", "link", "set", link, "up"]);
    }
    pod.run(&["ip", "addr", "add", "198.18.23.1/24", "dev", "v6l0"]);
    pod.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:2:0:23::1/64",
        "dev",
        "v6l0",
        "nodad",
    ]);
    for (tables, net) in [
        ("iptables", "198.18.23.0/24"),
        ("ip6tables", "2001:2:0:23::/64"),
    ] {
        pod.run(&[
            tables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            net,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = pod.command(&[
        sigil_test_harness::sigil_proxy_exe(),
        "run",
        "--agent-socket",
        "/nonexistent/agent.sock",
    ]);
    command.env("RUST_LOG", "info");
    let proxy = sigil_test_harness::Proc::spawn(command, dir.path().join("proxy.log"));
    let lines = || -> Vec<Value> {
        proxy
            .logs()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    let listening = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["message"] == "outbound listener")
            .filter_map(|l| l["addr"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listening(&lines()).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no outbound listeners:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listening(&lines()), ["0.0.0.0:15001", "[::]:15001"]);

    for (source, destination) in [
        ("198.18.23.1", "198.18.23.2:8080"),
        ("2001:2:0:23::1", "[2001:2:0:23::2]:8080"),
    ] {
        let destination: std::net::SocketAddr = destination.parse().unwrap();
        let socket = sigil_test_harness::netns::in_netns(&pod.name, || {
            if destination.is_ipv6() {
                tokio::net::TcpSocket::new_v6()
            } else {
                tokio::net::TcpSocket::new_v4()
            }
        })
        .unwrap();
        let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(destination))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connecting to {destination} (redirected): {e}"));
        let local = stream.local_addr().unwrap();
        // The proxy closes it: no mesh membership yet.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let line = loop {
            let found = lines()
                .into_iter()
                .find(|l| l["target"] == "sigil_access" && l["source"] == local.to_string());
            if let Some(line) = found {
                break line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no access-log line for {local}:\n{}",
                proxy.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let fields = &line;
        assert_eq!(fields["direction"], "outbound", "{line}");
        assert_eq!(fields["destination"], destination.to_string(), "{line}");
        // Found by its source: the client's own address, not IPv4-mapped.
        assert_eq!(local.ip(), source.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(fields["result"], "no_mesh_membership", "{line}");
    }
}
