//! The transparent mesh over IPv6 (issue 17), as root, in network namespaces this test creates
//! and deletes (pass or fail): the tests of tests/e2e/proxy_netns.rs and an `ipBlocks` policy,
//! each on IPv6-only pods and on dual-stack pods (the latter over both families). It proves that:
//!
//! 1. a plain HTTP request from A's app to B's IPv6 address (and to a Service's IPv6 cluster IP)
//!    arrives at B's app over mTLS with A's identity: B's app gets A's SPIFFE ID in
//!    `x-forwarded-client-cert`, and B's access log names A's identity and A's IPv6 address as
//!    it is (not IPv4-mapped);
//! 2. what crosses the wire is TLS: with a raw listener in B's proxy's place, every connection
//!    from A starts with a ClientHello;
//! 3. STRICT refuses IPv6 plaintext from a client outside the mesh (pod U, no proxy), directly
//!    and through the cluster IP that the node routes with ip6tables as kube-proxy does;
//! 4. an `ipBlocks` / `notIpBlocks` policy on an IPv6 CIDR allows and denies as written, and an
//!    IPv4 block never matches an IPv6 caller (a dual-stack caller over IPv4 does match it);
//! 5. nothing bypasses the proxies over either family: from A, as root and as another uid, to
//!    B's IPv4 address, IPv6 address, IPv6 link-local address and IPv4-mapped IPv6 address, on
//!    B's app port and on a port nothing uses, every connection that reaches B is a ClientHello
//!    on B's inbound port (the link-local one never arrives: its original destination has no
//!    scope, though B's link-local address is reachable, as A's proxy uid shows), B's app and
//!    the other port see nothing, and `ip6tables-save -t nat` shows the `SIGIL_` chains in both
//!    pods.
//!
//! ```text
//!      pod A (netns)                               pod B (netns)
//!   client: test process (root) or python3 (uid)  app: HTTP on [::]:8080 (both families)
//!     │ OUTPUT → :15001                             ▲ PREROUTING → :15006
//!   sigil proxy, uid 41801 (WEB)                  sigil proxy, uid 41802 (DB)
//!   eth0 2001:2:0:10::a/64                        eth0 2001:2:0:10::b/64           (IPv6-only)
//!   eth0 198.18.11.10/24, 2001:2:0:11::a/64       eth0 198.18.11.11/24, 2001:2:0:11::b/64
//!     └──── veth-a ───────┐       ┌──────── veth-b ┘                               (dual-stack)
//!                       ┌─┴───────┴─┐
//!                       │ br0       │ netns C: 2001:2:0:10::1 (and 198.18.11.1); the cluster
//!                       └─────┬─────┘ IP [2001:2:0:ff::10]:80 (ip6tables DNAT to B), the reader
//!                             │       of the proxies' /metrics on [<pod IPv6>]:15020
//!                           veth-u ── pod U (::d, and 198.18.11.13): a plaintext client, no proxy
//! ```
//!
//! The policy tests add a third meshed pod O (OPS, `::c`) on 2001:2:0:12::/64 (and
//! 198.18.12.0/24 when dual-stack). The CA and the agent (unix attestor; `--mesh-file` lists
//! every pod address and the Service) run in the host's namespace, as in
//! tests/e2e/proxy_netns.rs; the namespaces, pods and proxies are tests/harness/src/netns.rs's.
//! On a host without IPv6 the tests say so and pass: IPv4-only hosts are the IPv4 tests' job.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sigil_test_harness::netns::{
    ClusterIpService, LinkAddrs, Netns, Node, PYTHON, PodProxy, RecordingServer, http_get_in,
    proxy_init, require_ipv6, require_root,
};
use sigil_test_harness::{DB_ID, MeshHost, WEB_ID, eventually, hex, serve_keep_alive, unhex};
use tokio::io::AsyncReadExt;

/// A's proxy: attested as WEB, excluded from A's redirection.
const WEB_UID: u32 = 41801;
/// B's proxy: attested as DB.
const DB_UID: u32 = 41802;
/// O's proxy (the policy tests' second caller): attested as OPS.
const OPS_UID: u32 = 41803;
/// An application uid in A: redirected like any uid but the proxy's.
const APP_UID: &str = "41804";
const OPS_ID: &str = "spiffe://cluster.local/ns/demo/sa/ops";
/// B's application port.
const APP_PORT: u16 = 8080;
/// A port of B that nothing listens on but the test's bypass detector.
const UNUSED_PORT: u16 = 47123;
/// sigil's default inbound listener.
const INBOUND_PORT: u16 = 15006;
/// B's Service: an IPv6 cluster IP from 2001:2:0:ff::/64, port 80 → B's app port.
const CLUSTER_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10);
const SERVICE_PORT: u16 = 80;
const B_BODY: &str = "hello from b's app\n";
const NOT_TLS: &str =
    "sigil_proxy_tls_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"}";

/// Where a test's pods are: its namespaces' prefix, and the node's and pods' addresses.
struct Topology {
    /// Namespaces `<prefix>-<pid>-<role>`, a prefix per test (each test has its own node C).
    prefix: &'static str,
    c: LinkAddrs,
    a: LinkAddrs,
    b: LinkAddrs,
    /// The policy tests' second caller, or the mesh tests' unmeshed client U.
    o: LinkAddrs,
}

const fn v6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, net, 0, 0, 0, host)
}

const IPV6_ONLY: Topology = Topology {
    prefix: "sigil-v6only",
    c: LinkAddrs::v6(v6(0x10, 1)),
    a: LinkAddrs::v6(v6(0x10, 0xa)),
    b: LinkAddrs::v6(v6(0x10, 0xb)),
    o: LinkAddrs::v6(v6(0x10, 0xd)),
};

const DUAL_STACK: Topology = Topology {
    prefix: "sigil-v6dual",
    c: LinkAddrs::dual(Ipv4Addr::new(198, 18, 11, 1), v6(0x11, 1)),
    a: LinkAddrs::dual(Ipv4Addr::new(198, 18, 11, 10), v6(0x11, 0xa)),
    b: LinkAddrs::dual(Ipv4Addr::new(198, 18, 11, 11), v6(0x11, 0xb)),
    o: LinkAddrs::dual(Ipv4Addr::new(198, 18, 11, 13), v6(0x11, 0xd)),
};

const POLICY_IPV6_ONLY: Topology = Topology {
    prefix: "sigil-v6pol",
    c: LinkAddrs::v6(v6(0x12, 1)),
    a: LinkAddrs::v6(v6(0x12, 0xa)),
    b: LinkAddrs::v6(v6(0x12, 0xb)),
    o: LinkAddrs::v6(v6(0x12, 0xc)),
};

const POLICY_DUAL_STACK: Topology = Topology {
    prefix: "sigil-v6pold",
    c: LinkAddrs::dual(Ipv4Addr::new(198, 18, 12, 1), v6(0x12, 1)),
    a: LinkAddrs::dual(Ipv4Addr::new(198, 18, 12, 10), v6(0x12, 0xa)),
    b: LinkAddrs::dual(Ipv4Addr::new(198, 18, 12, 11), v6(0x12, 0xb)),
    o: LinkAddrs::dual(Ipv4Addr::new(198, 18, 12, 12), v6(0x12, 0xc)),
};

/// A node's or pod's IPv6 address (every one of these tests has one).
fn ipv6(addrs: LinkAddrs) -> Ipv6Addr {
    addrs
        .v6
        .expect("every pod of these tests has an IPv6 address")
}

/// Skips (true) unless the host has IPv6; panics unless the test runs as root.
fn skip(test: &str) -> bool {
    require_root(
        "this test creates network namespaces, installs ip6tables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    !require_ipv6(test)
}

/// The mesh file: each pod's addresses are its identity's; B's Service has the IPv6 cluster IP
/// and B's endpoints of both families (a dual-stack pod's), of which a caller of the IPv6
/// cluster IP must be sent to the IPv6 one.
fn write_mesh_file(path: &Path, pods: &[(LinkAddrs, &str)], b: LinkAddrs) {
    let mut yaml = String::from("members:\n");
    for (addrs, id) in pods {
        for ip in addrs.ips() {
            yaml.push_str(&format!("- {{ip: \"{ip}\", id: \"{id}\"}}\n"));
        }
    }
    yaml.push_str(&format!(
        "services:\n\
         - namespace: demo\n  \
           name: db\n  \
           clusterIPs: [\"{CLUSTER_IP}\"]\n  \
           ports:\n  \
           - {{name: http, port: {SERVICE_PORT}, targetPort: {APP_PORT}, appProtocol: http}}\n  \
           endpoints:\n"
    ));
    for ip in b.ips() {
        yaml.push_str(&format!("  - {{ip: \"{ip}\"}}\n"));
    }
    std::fs::write(path, yaml).unwrap();
}

/// B's application on [::]:`port` (both families): answers every request with [`B_BODY`],
/// recording each request head.
fn b_app(b: &Netns) -> RecordingServer {
    RecordingServer::serve(b.listen_dual(APP_PORT), |stream, seen| async move {
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{B_BODY}",
            B_BODY.len()
        );
        serve_keep_alive(stream, answer.as_bytes(), |head| {
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(head).into_owned());
        })
        .await;
    })
}

/// A raw listener on [::]:`port` (both families) in B: records, per connection, its peer and
/// its first bytes in hex (the first TLS record, then whatever comes before 300 ms of silence).
fn raw_listener(b: &Netns, port: u16) -> RecordingServer {
    RecordingServer::serve(b.listen_dual(port), |mut stream, seen| async move {
        let peer = stream
            .peer_addr()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let silence = tokio::time::Instant::now() + Duration::from_millis(300);
            let until = if bytes.is_empty() { deadline } else { silence };
            match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        seen.lock().unwrap().push(format!("{peer} {}", hex(&bytes)));
    })
}

/// Whether a raw listener's record (`peer hex`) is a TLS ClientHello: a handshake record
/// (0x16 0x03 ..) whose first message is a ClientHello (0x01), and nothing but whole TLS records
/// after it, so no plaintext request. (Searching the bytes for "GET" instead fails now and then:
/// a ClientHello's 1.4 KB of random key shares holds those three bytes about once in 6,000.)
fn is_client_hello(record: &str) -> bool {
    let hex = record.rsplit(' ').next().unwrap_or_default();
    let Some(bytes) = unhex(hex) else {
        return false;
    };
    if bytes.len() <= 5 || bytes[..2] != [0x16, 0x03] || bytes[5] != 0x01 {
        return false;
    }
    // TLS records back to back: content type 20-23, version 3.x, a length within the limit.
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let [kind, 0x03, _, high, low, ..] = *rest else {
            return false;
        };
        let length = usize::from(u16::from_be_bytes([high, low]));
        if !(0x14..=0x17).contains(&kind) || length > (1 << 14) + 256 || rest.len() < 5 + length {
            return false;
        }
        rest = &rest[5 + length..];
    }
    true
}

/// A GET from the test process (root, so redirected in a pod) in `netns`: the body if the
/// answer is a 200, else what happened.
async fn get(netns: &Netns, ip: IpAddr, port: u16, path: &str) -> Result<String, String> {
    match http_get_in(&netns.name, SocketAddr::new(ip, port), path).await {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("status {status}: {body}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A pod's link-local address on eth0 (`fe80::…`), which the kernel made.
fn link_local(pod: &Netns) -> Ipv6Addr {
    let out = pod.run(&[
        "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
    ]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on {}'s eth0: {out}", pod.name))
}

/// Connects to each `host port` pair (any address syntax Python's getaddrinfo takes, scoped
/// link-local included), in parallel, sends a plaintext request and waits up to 3 s for
/// anything back; prints one line per target. Failing to connect is an expected outcome.
const CONNECT_ALL: &str = r#"
import socket, sys
from concurrent.futures import ThreadPoolExecutor
def attempt(target):
    host, port = target
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.settimeout(3)
            s.connect(addr)
            s.sendall(b"GET /bypass HTTP/1.0\r\n\r\n")
            answer = s.recv(100)
        return f"{host} {port}: connected, answered {answer!r}"
    except OSError as e:
        return f"{host} {port}: {e!r}"
targets = list(zip(sys.argv[1::2], sys.argv[2::2]))
with ThreadPoolExecutor(len(targets)) as pool:
    for line in pool.map(attempt, targets):
        print(line)
"#;

/// The mesh tests (1, 2, 3 and 5) on one topology's pods.
async fn mesh_over(topology: Topology) {
    let dir = tempfile::tempdir().unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    write_mesh_file(
        &mesh_file,
        &[(topology.a, WEB_ID), (topology.b, DB_ID)],
        topology.b,
    );
    let host = MeshHost::start(
        dir.path(),
        &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)],
        "1h",
        &["--mesh-file", mesh_file.to_str().unwrap()],
    )
    .await;
    let node = Node::new_dual(topology.prefix, topology.c);
    let a = node.add_pod_addrs("a", topology.a);
    proxy_init(&a, WEB_UID);
    let b = node.add_pod_addrs("b", topology.b);
    proxy_init(&b, DB_UID);
    let u = node.add_pod_addrs("u", topology.o);
    let c = &node.c;
    let (a_v6, b_v6, c_v6) = (ipv6(topology.a), ipv6(topology.b), ipv6(topology.c));
    let _service = ClusterIpService::new(
        &node,
        "DB",
        SocketAddr::new(CLUSTER_IP.into(), SERVICE_PORT),
        APP_PORT,
        &[b_v6],
    );

    let app = b_app(&b);
    let a_proxy = PodProxy::start(
        &a,
        a_v6,
        None,
        WEB_UID,
        &host.socket,
        &[],
        dir.path().join("proxy-a.log"),
        c,
    )
    .await;
    let b_proxy = PodProxy::start(
        &b,
        b_v6,
        None,
        DB_UID,
        &host.socket,
        &["--forward-client-cert", "--access-log"],
        dir.path().join("proxy-b.log"),
        c,
    )
    .await;
    a_proxy.wait_for_services(1).await;

    // 1. Plain HTTP from A to each of B's addresses (and to the IPv6 cluster IP) arrives over
    // mTLS with A's identity and A's address of that family, as it is.
    let mut targets: Vec<(IpAddr, u16)> = topology
        .b
        .ips()
        .into_iter()
        .map(|ip| (ip, APP_PORT))
        .collect();
    targets.push((CLUSTER_IP.into(), SERVICE_PORT));
    for (i, &(ip, port)) in targets.iter().enumerate() {
        let answer = get(&a, ip, port, "/hello").await;
        assert_eq!(
            answer.as_deref(),
            Ok(B_BODY),
            "A → {ip}:{port}:\nA:\n{}\nB:\n{}",
            a_proxy.logs(),
            b_proxy.logs()
        );
        let heads = app.requests();
        assert_eq!(heads.len(), i + 1, "{heads:?}");
        let xfcc = format!("x-forwarded-client-cert: by={DB_ID};uri={WEB_ID}\r\n").to_lowercase();
        assert!(
            heads[i].to_lowercase().contains(&xfcc),
            "B's app did not get A's identity: {}",
            heads[i]
        );
        // A dials B's address of the family it was asked (the cluster IP is IPv6).
        let source_ip = match ip {
            IpAddr::V4(_) => IpAddr::from(topology.a.v4.unwrap()),
            IpAddr::V6(_) => IpAddr::from(a_v6),
        };
        let wanted = |l: &Value| {
            l["kind"] == "http"
                && l["source_ip"] == source_ip.to_string()
                && l["source_identity"] == WEB_ID
                && l["status"] == 200
        };
        eventually(
            &format!("B's access line for A's request to {ip}"),
            || async {
                b_proxy.access_log().iter().filter(|l| wanted(l)).count()
                    == targets[..=i]
                        .iter()
                        .filter(|(t, _)| t.is_ipv4() == ip.is_ipv4())
                        .count()
            },
        )
        .await;
    }
    let connections: Vec<Value> = b_proxy
        .access_log()
        .into_iter()
        .filter(|l| l["kind"].is_null() && l["security"] == "mtls")
        .collect();
    let from_a_v6 = format!("[{a_v6}]:");
    assert!(
        connections.iter().any(|l| {
            l["source"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&from_a_v6)
                && l["source_identity"] == WEB_ID
                && l["destination"] == format!("[{b_v6}]:{APP_PORT}")
        }),
        "no mTLS connection from {a_v6} to [{b_v6}]:{APP_PORT} as WEB in B's log:\n{connections:#?}"
    );

    // 3. STRICT: plaintext from U (a pod without proxy) to each of B's addresses and to the
    // IPv6 cluster IP (which C DNATs to B, masquerading as C) is refused before B's app sees
    // it; B's log names each caller's address of the family it used, as it is.
    let before = app.requests().len();
    let mut callers: Vec<String> = Vec::new();
    for &(ip, port) in &targets {
        let refused = get(&u, ip, port, "/plaintext").await;
        assert!(refused.is_err(), "STRICT let plaintext to {ip}:{port} in");
        let caller = match ip {
            IpAddr::V4(_) => IpAddr::from(topology.o.v4.unwrap()),
            IpAddr::V6(_) if ip == IpAddr::from(CLUSTER_IP) => c_v6.into(),
            IpAddr::V6(_) => ipv6(topology.o).into(),
        };
        callers.push(caller.to_string());
    }
    callers.sort();
    let not_tls_lines = || {
        let mut refused: Vec<String> = b_proxy
            .access_log()
            .into_iter()
            .filter(|l| l["result"] == "not_tls" && l["source_identity"].is_null())
            .filter_map(|l| {
                let source: SocketAddr = l["source"].as_str()?.parse().ok()?;
                Some(source.ip().to_string())
            })
            .collect();
        refused.sort();
        refused
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while not_tls_lines().len() < callers.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(not_tls_lines(), callers, "B:\n{}", b_proxy.logs());
    assert_eq!(b_proxy.metric(NOT_TLS).await, callers.len() as f64);
    assert_eq!(app.requests().len(), before, "B's app saw plaintext");

    // 5. (and 2.) Nothing bypasses the proxies: with raw listeners in B's proxy's place (its
    // inbound port) and on a port nothing uses, connect from A to every kind of address of B
    // on both ports, as root and as another uid. Every arrival is a ClientHello on B's inbound
    // port; the link-local address (no scope in the original destination) never arrives.
    drop(b_proxy);
    let inbound = raw_listener(&b, INBOUND_PORT);
    let unused = raw_listener(&b, UNUSED_PORT);
    let b_link_local = format!("{}%eth0", link_local(&b));
    let mut hosts = vec![b_v6.to_string(), b_link_local.clone()];
    if let Some(b_v4) = topology.b.v4 {
        hosts.push(b_v4.to_string());
        hosts.push(b_v4.to_ipv6_mapped().to_string());
    }
    let (app_port, unused_port) = (APP_PORT.to_string(), UNUSED_PORT.to_string());
    let mut argv = vec![PYTHON, "-I", "-c", CONNECT_ALL];
    for host in &hosts {
        for port in [&app_port, &unused_port] {
            argv.push(host);
            argv.push(port);
        }
    }
    let mut root = tokio::process::Command::from(a.command_as("0", &argv));
    let mut other = tokio::process::Command::from(a.command_as(APP_UID, &argv));
    let (root, other) = tokio::join!(root.output(), other.output());
    let mut report = String::new();
    for (who, out) in [("root", root), (APP_UID, other)] {
        let out = out.unwrap();
        assert!(out.status.success(), "{who}: {out:?}");
        report.push_str(&format!(
            "as {who}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    // Two ports and two uids per address that arrives: all but the link-local one.
    let arriving = 2 * 2 * (hosts.len() - 1);
    eventually(
        "every attempt but the link-local ones at B's inbound port",
        || async { inbound.requests().len() >= arriving },
    )
    .await;
    // Time for anything late (a retry, a bypass) to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let arrivals = inbound.requests();
    assert_eq!(
        arrivals.len(),
        arriving,
        "{arrivals:#?}\n{report}\nA:\n{}",
        a_proxy.logs()
    );
    assert!(
        arrivals.iter().all(|r| is_client_hello(r)),
        "not all ClientHellos: {arrivals:#?}\n{report}"
    );
    assert!(
        unused.requests().is_empty(),
        "B's unused port was reached: {:?}\n{report}",
        unused.requests()
    );
    assert_eq!(
        app.requests().len(),
        before,
        "B's app was reached: {:?}\n{report}",
        app.requests()
    );
    // B's link-local address is reachable (so its attempts were stopped, not lost): A's
    // proxy's uid, which A's rules exempt, reaches B over it in plaintext.
    let mut exempt = tokio::process::Command::from(a.command_as(
        &WEB_UID.to_string(),
        &[PYTHON, "-I", "-c", CONNECT_ALL, &b_link_local, &unused_port],
    ));
    let exempt = exempt.output().await.unwrap();
    eventually("the exempt uid's link-local connection at B", || async {
        inbound.requests().len() > arriving
    })
    .await;
    let last = inbound.requests().pop().unwrap();
    // "GET /bypass" in hex: plaintext, as sent.
    assert!(
        last.contains("474554202f627970617373"),
        "{last}: {exempt:?}"
    );
    for pod in [&a, &b] {
        let rules = pod.run(&["ip6tables-save", "-t", "nat"]);
        for chain in ["SIGIL_INBOUND", "SIGIL_OUTPUT", "SIGIL_REDIRECT"] {
            assert!(
                rules.contains(&format!(":{chain} ")),
                "{}'s ip6tables have no {chain}:\n{rules}",
                pod.name
            );
        }
    }
}

#[tokio::test]
async fn ipv6_only_pods_talk_mtls_and_nothing_bypasses_the_proxies() {
    if skip("proxy_ipv6::ipv6_only_pods_talk_mtls_and_nothing_bypasses_the_proxies") {
        return;
    }
    mesh_over(IPV6_ONLY).await;
}

#[tokio::test]
async fn dual_stack_pods_talk_mtls_over_both_families_and_nothing_bypasses_the_proxies() {
    if skip(
        "proxy_ipv6::dual_stack_pods_talk_mtls_over_both_families_and_nothing_bypasses_the_proxies",
    ) {
        return;
    }
    mesh_over(DUAL_STACK).await;
}

/// An ALLOW policy for every workload in `demo` with one `source` (`ipBlocks` or
/// `notIpBlocks`, with `cidrs`).
fn allow_from(field: &str, cidrs: &[String]) -> String {
    let cidrs: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "apiVersion: sigil.dev/v1alpha1\n\
         kind: AuthorizationPolicy\n\
         metadata: {{name: by-address, namespace: demo}}\n\
         spec:\n  \
           action: ALLOW\n  \
           rules:\n  \
           - from: [{{source: {{{field}: [{}]}}}}]\n",
        cidrs.join(", ")
    )
}

/// Replaces the policy file whole (the agent may read it at any moment).
fn write_policy(path: &Path, policy: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, policy).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Test 4 on one topology's pods: A (WEB) and O (OPS) call B under `ipBlocks` policies.
async fn ip_blocks_over(topology: Topology) {
    let dir = tempfile::tempdir().unwrap();
    let (a_v6, b_v6, o_v6) = (ipv6(topology.a), ipv6(topology.b), ipv6(topology.o));
    let mesh_file = dir.path().join("mesh.yaml");
    write_mesh_file(
        &mesh_file,
        &[
            (topology.a, WEB_ID),
            (topology.b, DB_ID),
            (topology.o, OPS_ID),
        ],
        topology.b,
    );
    let policies = dir.path().join("policies.yaml");
    write_policy(&policies, &allow_from("ipBlocks", &[format!("{a_v6}/128")]));
    let host = MeshHost::start(
        dir.path(),
        &[(WEB_UID, WEB_ID), (DB_UID, DB_ID), (OPS_UID, OPS_ID)],
        "1h",
        &[
            "--mesh-file",
            mesh_file.to_str().unwrap(),
            "--policy-file",
            policies.to_str().unwrap(),
        ],
    )
    .await;
    let node = Node::new_dual(topology.prefix, topology.c);
    let mut pods = Vec::new();
    for (role, addrs, uid, ip) in [
        ("a", topology.a, WEB_UID, a_v6),
        ("b", topology.b, DB_UID, b_v6),
        ("o", topology.o, OPS_UID, o_v6),
    ] {
        let pod = node.add_pod_addrs(role, addrs);
        proxy_init(&pod, uid);
        let proxy = PodProxy::start(
            &pod,
            ip,
            None,
            uid,
            &host.socket,
            &[],
            dir.path().join(format!("proxy-{role}.log")),
            &node.c,
        )
        .await;
        pods.push((pod, proxy));
    }
    let [(a, _a_proxy), (b, b_proxy), (o, _o_proxy)] = <[_; 3]>::try_from(pods).ok().unwrap();
    let _app = b_app(&b);
    b_proxy.wait_for_policies(1, "the ipBlocks ALLOW").await;
    let b_ip: IpAddr = b_v6.into();

    // ipBlocks [A/128]: A is allowed, O (another meshed pod, same network) is denied.
    assert_eq!(get(&a, b_ip, APP_PORT, "/").await.as_deref(), Ok(B_BODY));
    assert!(get(&o, b_ip, APP_PORT, "/").await.is_err(), "O allowed");
    let denied = |source: Ipv6Addr| {
        let from = format!("[{source}]:");
        b_proxy.access_log().into_iter().any(|l| {
            l["result"] == "denied" && l["source"].as_str().unwrap_or_default().starts_with(&from)
        })
    };
    eventually("O's denial in B's access log", || async { denied(o_v6) }).await;

    // notIpBlocks [A/128]: the mirror image.
    let updates = b_proxy.metric("sigil_proxy_policy_updates_total").await;
    write_policy(
        &policies,
        &allow_from("notIpBlocks", &[format!("{a_v6}/128")]),
    );
    eventually("B has the notIpBlocks policy", || async {
        b_proxy.metric("sigil_proxy_policy_updates_total").await > updates
    })
    .await;
    assert!(get(&a, b_ip, APP_PORT, "/").await.is_err(), "A allowed");
    assert_eq!(get(&o, b_ip, APP_PORT, "/").await.as_deref(), Ok(B_BODY));
    eventually("A's denial in B's access log", || async { denied(a_v6) }).await;

    // An IPv4 block that holds every IPv4 address never matches an IPv6 caller; a dual-stack
    // caller over IPv4 matches it.
    let updates = b_proxy.metric("sigil_proxy_policy_updates_total").await;
    write_policy(&policies, &allow_from("ipBlocks", &["0.0.0.0/0".into()]));
    eventually("B has the IPv4 block", || async {
        b_proxy.metric("sigil_proxy_policy_updates_total").await > updates
    })
    .await;
    for (pod, who) in [(&a, "A"), (&o, "O")] {
        assert!(
            get(pod, b_ip, APP_PORT, "/").await.is_err(),
            "{who} over IPv6 matched an IPv4 block"
        );
    }
    if let Some(b_v4) = topology.b.v4 {
        assert_eq!(
            get(&a, b_v4.into(), APP_PORT, "/").await.as_deref(),
            Ok(B_BODY),
            "A over IPv4 did not match 0.0.0.0/0"
        );
    }
}

#[tokio::test]
async fn ip_blocks_on_an_ipv6_cidr_allow_and_deny_as_written_on_ipv6_only_pods() {
    if skip("proxy_ipv6::ip_blocks_on_an_ipv6_cidr_allow_and_deny_as_written_on_ipv6_only_pods") {
        return;
    }
    ip_blocks_over(POLICY_IPV6_ONLY).await;
}

#[tokio::test]
async fn ip_blocks_on_an_ipv6_cidr_allow_and_deny_as_written_on_dual_stack_pods() {
    if skip("proxy_ipv6::ip_blocks_on_an_ipv6_cidr_allow_and_deny_as_written_on_dual_stack_pods") {
        return;
    }
    ip_blocks_over(POLICY_DUAL_STACK).await;
}

/// The ClientHello check accepts whole TLS records only, whatever their random bytes hold: a
/// real hybrid ClientHello (from a CI run) whose key share holds the bytes "GET" passes; the
/// same followed by a plaintext request, a plaintext request alone, or a cut record do not.
#[test]
fn client_hellos_are_told_from_plaintext_by_their_records() {
    let hello = include_str!("../fixtures/tls/client-hello-x25519mlkem768.hex").trim();
    assert!(
        hello.contains("474554"),
        "the fixture holds \"GET\" by chance"
    );
    let peer = "[2001:2:0:11::a]:50226";
    assert!(is_client_hello(&format!("{peer} {hello}")));
    let get = hex(b"GET / HTTP/1.1\r\n\r\n");
    assert!(!is_client_hello(&format!("{peer} {hello}{get}")));
    assert!(!is_client_hello(&format!("{peer} {get}")));
    assert!(!is_client_hello(&format!(
        "{peer} {}",
        &hello[..hello.len() - 2]
    )));
}
