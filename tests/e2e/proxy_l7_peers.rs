//! Real peers through the L7 data plane (issue 14's "Real peers"), as root, in network namespaces
//! this test creates and deletes (pass or fail): each test wires two pods with transparent
//! `sigil proxy run`s (tests/harness/src/netns.rs), and A's clients call db's meshed Service by
//! its cluster IP, which only A's proxy knows (from the agent's `--mesh-file` `services:`): the
//! proxy balances to the endpoint (B's pod IP and the port's targetPort) over mTLS requiring db's
//! own identity. It proves that:
//!
//! 1. PyPI's `grpcio` client and server (generic handlers, bytes in and out) work through the
//!    mesh on a port declared `grpc`: unary (with request metadata answered in initial
//!    metadata, and a 256 KiB message), client streaming, server streaming (100 messages in
//!    order), bidirectional streaming that interleaves (each answer read before the next
//!    request is sent), and a call ending with a non-OK status whose code, details and
//!    trailing metadata (text and binary) arrive intact;
//! 2. PyPI's `websockets` client and server work through the mesh on a port declared
//!    `kubernetes.io/ws` while B enforces an L7 AuthorizationPolicy (ALLOW web on `/ws`): text
//!    and binary messages echo both ways, and an upgrade to a denied path gets 403 and never
//!    reaches B's app;
//! 3. Debian's `curl` with `--http1.1` and with `--http2-prior-knowledge` on a port declared
//!    `http`: status, body and Host arrive; an upload of unknown length (`-T -`, chunked on
//!    HTTP/1.1) is echoed with its exact length; HEAD gets GET's headers and no body (on
//!    HTTP/1.1 the next request on the same connection is intact; on HTTP/2 curl would refuse a
//!    DATA frame); `Expect: 100-continue` with a 4 KiB body gets its 100 and the echo; B's app
//!    gets HTTP/1.1 requests as HTTP/1.1 with curl's Host and never sees `sigil-orig-proto`;
//! 4. a server-first protocol (an SMTP-like banner) on a port the Service declares opaque (and
//!    B's proxy has in `--opaque-ports`) reaches a client that only reads in well under the
//!    500 ms detection timeout (asserted < 300 ms, printed);
//! 5. in each case B's proxy access log (`--access-log`) names A's SPIFFE ID as the peer; and
//!    the HTTP cases were carried request by request by A's L7 outbound path: A's golden
//!    request counters for db's Service, with db (the endpoint's own identity) as the peer,
//!    count them (the gRPC calls exactly, by `grpc_status`).
//!
//! ```text
//!          pod A (netns)                            pod B (netns)
//!   clients: grpcio, websockets (root),          apps: grpcio, websockets (root),
//!     curl (uid 41703), a banner reader            an h1/h2c echo app, a banner server
//!     │ OUTPUT → :15001                              ▲ PREROUTING → :15006
//!   sigil proxy, uid 41701 (WEB)                   sigil proxy, uid 41702 (DB), --access-log
//!     │ mTLS to db's endpoint (B:targetPort)         ▲
//!   eth0 198.18.14.1/24                            eth0 198.18.14.2/24
//!     │ route 198.19.0.0/16 via C                    │
//!     └──── veth-a ───────┐          ┌──────── veth-b┘
//!                       ┌─┴──────────┴─┐
//!                       │ br0          │ netns C, 198.18.14.3/24: reads the proxies' /ready;
//!                       └──────────────┘ forwards nothing (the cluster IP exists only in A's
//!                                        proxy's Service table)
//! ```
//!
//! The Python peers run as root with the interpreter `scripts/test` installs grpcio and
//! websockets into (pyenv's, under /root, which other uids cannot enter): root's traffic is
//! redirected like any uid but the proxy's. Each test has its own namespaces
//! (`sigil-l7<case>-<pid>-{a,b,c}`), CA, agent and proxies, so the four run in parallel and fail
//! apart.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_test_harness::l7::{EchoApp, HELLO_BODY, peer_python, wait_for_output};
use sigil_test_harness::netns::{
    PodNetwork, PodProxy, RecordingServer, connect_in, http_get_in, require_root,
};
use sigil_test_harness::{DB_ID, MeshHost, Proc, WEB_ID};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A's proxy: attested as WEB, excluded from A's redirection.
const WEB_UID: u32 = 41701;
/// B's proxy: attested as DB, excluded from B's redirection.
const DB_UID: u32 = 41702;
/// curl's uid in A: any uid but the proxy's is redirected.
const APP_UID: &str = "41703";
/// Addresses come from 198.18.0.0/15 (benchmarking); they exist only in each test's namespaces.
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 14, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 14, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 14, 3);
/// db's cluster IP, and the range A routes to C (so that the kernel lets A's clients try it).
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 14, 10);
const SERVICE_RANGE: &str = "198.19.0.0/16";
const NAMESPACE: &str = "demo";

/// The gRPC case: Service port 9000 (declared `grpc`) → B's grpcio server on 50051.
const GRPC_SERVICE_PORT: u16 = 9000;
const GRPC_PORT: u16 = 50051;
/// The WebSocket case: Service port 80 (declared `kubernetes.io/ws`) → B's server on 8765.
const WS_SERVICE_PORT: u16 = 80;
const WS_PORT: u16 = 8765;
/// The curl case: Service port 80 (declared `http`) → B's echo app on 8080.
const HTTP_SERVICE_PORT: u16 = 80;
const HTTP_PORT: u16 = 8080;
/// The server-first case: port 2525 on both sides, opaque in the Service and on B's proxy.
const BANNER_PORT: u16 = 2525;
const BANNER: &str = "220 db.demo ESMTP ready";
/// The proxies' default `--detect-timeout` is 500 ms: the banner must come well before it.
const BANNER_WITHIN: Duration = Duration::from_millis(300);

/// B's grpcio server: service `sigil.test.Peers` with bytes in and out (no codegen).
const GRPC_SERVER: &str = r#"
import sys, grpc
from concurrent import futures

def unary(request, context):
    tag = dict(context.invocation_metadata()).get("x-request-tag", "")
    context.send_initial_metadata((("x-echo-tag", tag),))
    return b"echo:" + request

def client_stream(requests, context):
    parts = [r for r in requests]
    return ("%d messages, %d bytes" % (len(parts), sum(len(p) for p in parts))).encode()

def server_stream(request, context):
    for i in range(int(request.decode())):
        yield ("message-%03d" % i).encode()

def bidi(requests, context):
    for r in requests:
        yield b"bidi:" + r

def fail(request, context):
    context.set_trailing_metadata((("sigil-detail", "kept"), ("sigil-detail-bin", b"\x00\x01\xff")))
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("precondition failed: " + request.decode())
    return b""

handler = grpc.method_handlers_generic_handler("sigil.test.Peers", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print("serving", flush=True)
server.wait_for_termination()
"#;

/// A's grpcio client: every call kind against `argv[1]`, results as one JSON line. The first
/// call waits for the channel (A's proxy may get db's Service just after it is ready).
const GRPC_CLIENT: &str = r#"
import json, queue, sys, time, grpc

options = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
out = {}
with grpc.insecure_channel(sys.argv[1], options=options) as channel:
    method = lambda kind, name: getattr(channel, kind)("/sigil.test.Peers/" + name)
    unary = method("unary_unary", "Unary")
    started = time.monotonic()
    answer, call = unary.with_call(b"hello", timeout=15, wait_for_ready=True,
                                   metadata=(("x-request-tag", "tag-1"),))
    out["first_call_ms"] = round((time.monotonic() - started) * 1000)
    out["unary"] = answer.decode()
    out["initial_metadata"] = dict(call.initial_metadata())
    large = bytes(range(256)) * 1024
    out["large_echoed"] = unary(large, timeout=10) == b"echo:" + large

    client_stream = method("stream_unary", "ClientStream")
    out["client_stream"] = client_stream(iter([b"x" * n for n in (1, 10, 100, 1000)]), timeout=10).decode()

    server_stream = method("unary_stream", "ServerStream")
    out["server_stream"] = [m.decode() for m in server_stream(b"100", timeout=10)]

    # Interleaved: each request is sent only once the previous answer is back.
    pending = queue.Queue()
    def requests():
        while (item := pending.get()) is not None:
            yield item
    answers = method("stream_stream", "Bidi")(requests(), timeout=10)
    bidi = []
    for i in range(5):
        pending.put(("ping-%d" % i).encode())
        bidi.append(next(answers).decode())
    pending.put(None)
    out["bidi"] = bidi
    out["bidi_rest"] = [m.decode() for m in answers]

    try:
        method("unary_unary", "Fail")(b"db is read-only", timeout=10)
        out["fail"] = "no error"
    except grpc.RpcError as error:
        out["fail"] = {
            "code": error.code().name,
            "details": error.details(),
            "trailing": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in error.trailing_metadata()},
        }
print(json.dumps(out), flush=True)
"#;

/// B's websockets server: greets each connection with its path, then echoes every message;
/// prints each connection's path (what reached the app).
const WS_SERVER: &str = r#"
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    print("connection " + ws.request.path, flush=True)
    await ws.send("hello " + ws.request.path)
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "0.0.0.0", int(sys.argv[1])) as server:
        print("serving", flush=True)
        await server.serve_forever()

asyncio.run(main())
"#;

/// A's websockets client: echoes on `argv[1]`, then an upgrade to `argv[2]`; one JSON line.
const WS_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

async def main(allowed, denied):
    out = {}
    async with connect(allowed, proxy=None, open_timeout=10, compression=None) as ws:
        out["greeting"] = await ws.recv()
        echoed = []
        for i in range(5):
            await ws.send("text-%d " % i * (i + 1))
            echoed.append(await ws.recv())
        out["echoed"] = echoed
        binary = bytes(range(256)) * 256
        await ws.send(binary)
        out["binary_echoed"] = await ws.recv() == binary
    try:
        async with connect(denied, proxy=None, open_timeout=10) as ws:
            out["denied"] = "opened: " + await ws.recv()
    except InvalidStatus as error:
        out["denied"] = error.response.status_code
        out["denied_body"] = error.response.body.decode(errors="replace")
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

/// ALLOW web on `/ws` (GET, as every upgrade is): anything else to B is denied.
const ALLOW_WEB_ON_WS: &str = "apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web-ws, namespace: demo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/web]}}]
    to: [{operation: {methods: [GET], paths: [/ws]}}]
";

/// The agent's mesh file: A and B as members, db's Service with `ports` (YAML lines, indented
/// by two, `opaquePorts` too if any) and B as its one endpoint.
fn mesh_file(service_ports: &str) -> String {
    format!(
        "members:\n- {{ip: {A_IP}, id: \"{WEB_ID}\"}}\n- {{ip: {B_IP}, id: \"{DB_ID}\"}}\n\
         services:\n- namespace: {NAMESPACE}\n  name: db\n  clusterIPs: [{SERVICE_IP}]\n\
         {service_ports}  endpoints:\n  - {{ip: {B_IP}}}\n"
    )
}

/// One test's mesh: the CA and agent (unix attestor, the mesh file, a policy file if any), the
/// two pods with their proxies (B's with `--access-log`). Fields drop in order: the proxies,
/// the namespaces, the agent and CA, the files.
struct Mesh {
    a_proxy: PodProxy,
    b_proxy: PodProxy,
    net: PodNetwork,
    host: MeshHost,
    dir: tempfile::TempDir,
    started: Instant,
}

impl Mesh {
    async fn start(
        prefix: &str,
        service_ports: &str,
        policies: Option<&str>,
        b_args: &[&str],
    ) -> Mesh {
        require_root(
            "this test creates network namespaces, installs iptables rules in them and runs \
             processes as other uids: run it as root (CI does)",
        );
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, mesh_file(service_ports)).unwrap();
        let mut agent_args = vec!["--mesh-file", mesh.to_str().unwrap()];
        let policy_file = dir.path().join("policies.yaml");
        if let Some(policies) = policies {
            std::fs::write(&policy_file, policies).unwrap();
            agent_args.extend(["--policy-file", policy_file.to_str().unwrap()]);
        }
        let host = MeshHost::start(
            dir.path(),
            &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)],
            "1h",
            &agent_args,
        )
        .await;
        let net = PodNetwork::new(prefix, C_IP, [(A_IP, WEB_UID), (B_IP, DB_UID)]);
        // Nothing routes the cluster IP: A's kernel only needs a route to try the connection,
        // which A's proxy intercepts.
        net.a.run(&[
            "ip",
            "route",
            "add",
            SERVICE_RANGE,
            "via",
            &C_IP.to_string(),
        ]);
        let a_proxy = PodProxy::start(
            &net.a,
            A_IP,
            None,
            WEB_UID,
            &host.socket,
            &[],
            dir.path().join("proxy-a.log"),
            &net.c,
        )
        .await;
        let mut args = vec!["--access-log"];
        args.extend(b_args);
        let b_proxy = PodProxy::start(
            &net.b,
            B_IP,
            None,
            DB_UID,
            &host.socket,
            &args,
            dir.path().join("proxy-b.log"),
            &net.c,
        )
        .await;
        println!("{prefix}: set up in {:?}", started.elapsed());
        Mesh {
            a_proxy,
            b_proxy,
            net,
            host,
            dir,
            started,
        }
    }

    /// Both proxies' and the agent's logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "\n--- A's proxy:\n{}\n--- B's proxy:\n{}\n--- agent:\n{}",
            self.a_proxy.logs(),
            self.b_proxy.logs(),
            self.host.agent.logs()
        )
    }

    fn service(&self, port: u16) -> SocketAddr {
        SocketAddrV4::new(SERVICE_IP, port).into()
    }

    /// A Python peer (script `source`, with `args`) in B, as root, logging to `<name>.log`;
    /// returned once it printed `serving`.
    async fn python_server_in_b(&self, name: &str, source: &str, args: &[&str]) -> Proc {
        let mut program = vec![peer_python(), "-u", "-c", source];
        program.extend(args);
        let mut server = Proc::spawn(
            self.net.b.command(&program),
            self.dir.path().join(format!("{name}.log")),
        );
        wait_for_output(&mut server, "serving").await;
        server
    }

    /// Runs `program` in A (as `uid`, or root) to completion, with `stdin`; panics with the
    /// logs if it does not finish within 60 s.
    async fn run_in_a(&self, uid: Option<&str>, program: &[&str], stdin: &[u8]) -> Output {
        let command = match uid {
            Some(uid) => self.net.a.command_as(uid, program),
            None => self.net.a.command(program),
        };
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {program:?}: {e}"));
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_vec();
        let feed = tokio::spawn(async move {
            let _ = input.write_all(&stdin).await;
        });
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{program:?} ran for over 60 s{}", self.logs()))
            .unwrap();
        let _ = feed.await;
        output
    }

    /// A Python client (script `source`, with `args`) in A as root that prints one JSON line.
    async fn python_client_in_a(&self, source: &str, args: &[&str]) -> Value {
        let mut program = vec![peer_python(), "-u", "-c", source];
        program.extend(args);
        let out = self.run_in_a(None, &program, b"").await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the client in A failed ({}):\n{stdout}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the client's output is not JSON ({e}): {stdout}"))
    }

    /// Waits (15 s at most) until A's proxy routes HTTP to db's Service on `port`: a GET of
    /// `path` from A gets any HTTP answer. Before A's proxy has the Service, the connection is
    /// passed through to the cluster IP, which nothing answers.
    async fn wait_routed(&self, port: u16, path: &str) {
        let service = self.service(port);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match http_get_in(&self.net.a.name, service, path).await {
                Ok((status, _)) if status != 0 => break,
                answer => assert!(
                    Instant::now() < deadline,
                    "A never got an HTTP answer from db's Service on {service}: {answer:?}{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "db's Service on port {port} routed {:?} after the start",
            self.started.elapsed()
        );
    }

    /// A's golden request counters for db's Service with db as the peer (the endpoint's own
    /// identity, which A's proxy checked): the sum of the `sigil_proxy_requests_total` samples
    /// that also have every label of `labels`, and every such line (for failure messages).
    async fn a_requests_to_db(&self, labels: &[(&str, &str)]) -> (f64, Vec<String>) {
        let (status, text) = http_get_in(&self.net.c.name, self.a_proxy.metrics, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("A's /metrics: {e}"));
        assert_eq!(status, 200, "A's /metrics: {text}");
        let to_db: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("sigil_proxy_requests_total{"))
            .filter(|l| {
                [
                    ("direction", "outbound"),
                    ("service", "demo/db"),
                    ("peer_namespace", NAMESPACE),
                    ("peer_service_account", "db"),
                ]
                .iter()
                .all(|(name, value)| l.contains(&format!("{name}=\"{value}\"")))
            })
            .map(str::to_owned)
            .collect();
        let sum = to_db
            .iter()
            .filter(|l| {
                labels
                    .iter()
                    .all(|(name, value)| l.contains(&format!("{name}=\"{value}\"")))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        (sum, to_db)
    }

    /// Waits (5 s at most: a request is counted when its response ends) until A counted
    /// exactly `expected` requests to db with `labels`.
    async fn assert_a_counted(&self, labels: &[(&str, &str)], expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (count, lines) = self.a_requests_to_db(labels).await;
            if count == expected {
                println!("A's requests to db's Service:\n  {}", lines.join("\n  "));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "A's proxy counted {count} requests to db with {labels:?}, not {expected}; its \
                 request counters:\n  {}{}",
                lines.join("\n  "),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (10 s at most) for a line of B's access log that `matches` and checks it names
    /// A's SPIFFE ID as the peer.
    async fn assert_b_saw_web(&self, what: &str, matches: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            if let Some(line) = self.b_proxy.access_log().into_iter().find(&matches) {
                break line;
            }
            assert!(
                Instant::now() < deadline,
                "no access-log line in B for {what}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(line["source_identity"], WEB_ID, "{what}: {line}");
        println!("B's access log for {what}: {line}");
    }
}

#[tokio::test]
async fn grpcio_unary_and_streaming_calls_and_error_trailers_cross_a_meshed_service() {
    let ports = format!(
        "  ports:\n  - {{name: grpc, port: {GRPC_SERVICE_PORT}, targetPort: {GRPC_PORT}, \
         appProtocol: grpc}}\n"
    );
    let mesh = Mesh::start("sigil-l7grpc", &ports, None, &[]).await;
    let _server = mesh
        .python_server_in_b("grpc-server", GRPC_SERVER, &[&GRPC_PORT.to_string()])
        .await;
    let target = format!("ipv4:{}", mesh.service(GRPC_SERVICE_PORT));
    let out = mesh.python_client_in_a(GRPC_CLIENT, &[&target]).await;
    println!(
        "grpcio through the mesh: first call after {} ms (waiting for the channel)",
        out["first_call_ms"]
    );
    let logs = || mesh.logs();

    assert_eq!(out["unary"], "echo:hello", "unary: {out}{}", logs());
    assert_eq!(
        out["initial_metadata"]["x-echo-tag"], "tag-1",
        "the request's metadata or the answer's initial metadata was lost: {out}"
    );
    assert_eq!(out["large_echoed"], true, "a 256 KiB unary message: {out}");
    assert_eq!(
        out["client_stream"], "4 messages, 1111 bytes",
        "client streaming: {out}"
    );
    let expected: Vec<String> = (0..100).map(|i| format!("message-{i:03}")).collect();
    assert_eq!(
        out["server_stream"],
        serde_json::json!(expected),
        "server streaming: 100 messages in order"
    );
    let bidi: Vec<String> = (0..5).map(|i| format!("bidi:ping-{i}")).collect();
    assert_eq!(out["bidi"], serde_json::json!(bidi), "bidi: {out}");
    assert_eq!(out["bidi_rest"], serde_json::json!([]), "bidi: {out}");
    assert_eq!(
        out["fail"],
        serde_json::json!({
            "code": "FAILED_PRECONDITION",
            "details": "precondition failed: db is read-only",
            "trailing": { "sigil-detail": "kept", "sigil-detail-bin": "0001ff" },
        }),
        "the failed call's status, details and trailing metadata{}",
        logs()
    );

    // Each call was one request of A's L7 outbound path, to db's endpoint as db.
    mesh.assert_a_counted(&[("grpc_status", "0")], 5.0).await;
    mesh.assert_a_counted(&[("grpc_status", "9")], 1.0).await;

    mesh.assert_b_saw_web("the gRPC unary call", |l| {
        l["kind"] == "http" && l["path"] == "/sigil.test.Peers/Unary"
    })
    .await;
}

#[tokio::test]
async fn websockets_echo_through_a_meshed_service_under_an_l7_policy_that_denies_other_paths() {
    let ports = format!(
        "  ports:\n  - {{name: http-ws, port: {WS_SERVICE_PORT}, targetPort: {WS_PORT}, \
         appProtocol: kubernetes.io/ws}}\n"
    );
    let mesh = Mesh::start("sigil-l7ws", &ports, Some(ALLOW_WEB_ON_WS), &[]).await;
    mesh.b_proxy.wait_for_policies(1, "allow-web-ws").await;
    let server = mesh
        .python_server_in_b("ws-server", WS_SERVER, &[&WS_PORT.to_string()])
        .await;
    // A path the policy denies: B's proxy answers it, B's app never sees it.
    mesh.wait_routed(WS_SERVICE_PORT, "/probe").await;
    let service = mesh.service(WS_SERVICE_PORT);
    let out = mesh
        .python_client_in_a(
            WS_CLIENT,
            &[
                &format!("ws://{service}/ws"),
                &format!("ws://{service}/admin"),
            ],
        )
        .await;
    println!("websockets through the mesh: {out}");
    assert_eq!(out["greeting"], "hello /ws", "{out}{}", mesh.logs());
    let echoed: Vec<String> = (0..5).map(|i| format!("text-{i} ").repeat(i + 1)).collect();
    assert_eq!(out["echoed"], serde_json::json!(echoed), "{out}");
    assert_eq!(out["binary_echoed"], true, "a 64 KiB binary message: {out}");
    assert_eq!(
        out["denied"],
        403,
        "the upgrade to a denied path: {out}{}",
        mesh.logs()
    );
    let app_saw: Vec<String> = server
        .logs()
        .lines()
        .filter_map(|l| l.strip_prefix("connection ").map(str::to_owned))
        .collect();
    assert_eq!(app_saw, ["/ws"], "what reached B's websockets server");

    // The probe's and the denied upgrade's 403s, and the upgrade, were requests of A's L7
    // outbound path, answered through B's proxy.
    mesh.assert_a_counted(&[("status_code", "403")], 2.0).await;
    mesh.assert_a_counted(&[("status_code", "101")], 1.0).await;

    mesh.assert_b_saw_web("the allowed upgrade", |l| {
        l["kind"] == "http" && l["path"] == "/ws" && l["result"] == "allowed"
    })
    .await;
    mesh.assert_b_saw_web("the denied upgrade", |l| {
        l["kind"] == "http" && l["path"] == "/admin" && l["result"] == "denied"
    })
    .await;
}

/// curl's answer (`-i`): the final response's status line, headers (names lower-case) and body,
/// after any interim (1xx) responses.
#[derive(Debug)]
struct CurlAnswer {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Interim responses' status lines (e.g. `HTTP/1.1 100 Continue`).
    interim: Vec<String>,
}

impl CurlAnswer {
    fn parse(mut stdout: &[u8]) -> Option<CurlAnswer> {
        let mut interim = Vec::new();
        loop {
            let end = stdout.windows(4).position(|w| w == b"\r\n\r\n")?;
            let head = String::from_utf8_lossy(&stdout[..end]).into_owned();
            let rest = &stdout[end + 4..];
            let mut lines = head.split("\r\n");
            // curl prints HTTP/2's status line with a trailing space.
            let status_line = lines.next()?.trim_end().to_owned();
            let code = status_line.split_whitespace().nth(1)?;
            if code.starts_with('1') {
                interim.push(status_line);
                stdout = rest;
                continue;
            }
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Some(CurlAnswer {
                status_line,
                headers,
                body: rest.to_vec(),
                interim,
            });
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Mesh {
    /// Debian's curl in A as the app uid (`-sS -i`, no proxy settings, 20 s at most) with
    /// `args` and `stdin`: its answer and its stderr.
    async fn curl(&self, args: &[&str], stdin: &[u8]) -> (CurlAnswer, String) {
        let mut program = vec!["curl", "-sS", "-i", "--noproxy", "*", "--max-time", "20"];
        program.extend(args);
        let out = self.run_in_a(Some(APP_UID), &program, stdin).await;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{program:?} failed ({}): {stderr}{}",
            out.status,
            self.logs()
        );
        let answer = CurlAnswer::parse(&out.stdout).unwrap_or_else(|| {
            panic!(
                "{program:?}: no HTTP answer in {:?}{}",
                String::from_utf8_lossy(&out.stdout),
                self.logs()
            )
        });
        (answer, stderr)
    }
}

#[tokio::test]
async fn curl_http1_and_http2_prior_knowledge_bodies_head_and_expect_continue_cross_a_meshed_service()
 {
    let ports = format!(
        "  ports:\n  - {{name: http, port: {HTTP_SERVICE_PORT}, targetPort: {HTTP_PORT}, \
         appProtocol: http}}\n"
    );
    let mesh = Mesh::start("sigil-l7curl", &ports, None, &[]).await;
    let app = EchoApp::start(&mesh.net.b, HTTP_PORT);
    mesh.wait_routed(HTTP_SERVICE_PORT, "/probe").await;
    let base = format!("http://{}", mesh.service(HTTP_SERVICE_PORT));
    let hello = format!("{base}/hello");
    let echo = format!("{base}/echo");
    // An upload of unknown length (curl streams stdin: chunked on HTTP/1.1).
    let upload: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("line {i:05} of the upload\n").into_bytes())
        .collect();

    for (version, flag, status_line) in [
        ("HTTP/1.1", "--http1.1", "HTTP/1.1 200 OK"),
        ("HTTP/2", "--http2-prior-knowledge", "HTTP/2 200"),
    ] {
        let (get, _) = mesh.curl(&[flag, &hello], b"").await;
        assert_eq!(get.status_line, status_line, "{version} GET: {get:?}");
        assert_eq!(
            get.body,
            HELLO_BODY.as_bytes(),
            "{version} GET body{}",
            mesh.logs()
        );
        assert_eq!(get.header("x-app"), Some("b"), "{version} GET: {get:?}");

        let (put, stderr) = mesh.curl(&[flag, "-v", "-T", "-", &echo], &upload).await;
        assert_eq!(put.status_line, status_line, "{version} upload: {put:?}");
        if flag == "--http1.1" {
            assert!(
                stderr.contains("> Transfer-Encoding: chunked"),
                "curl did not send the upload chunked: {stderr}"
            );
        }
        assert_eq!(
            put.header("x-received-length"),
            Some(upload.len().to_string().as_str()),
            "{version} upload: what B's app received{}",
            mesh.logs()
        );
        assert!(
            put.body == upload,
            "{version} upload: the echo differs ({} bytes back of {})",
            put.body.len(),
            upload.len()
        );

        // HEAD: headers with GET's length and no body. On HTTP/1.1 a GET follows on the same
        // connection, which a body after the HEAD answer would break; on HTTP/2 a body is a
        // DATA frame curl refuses (and curl 7.88 cannot reuse a prior-knowledge connection).
        let mut args = vec![flag, "-I", &hello];
        if flag == "--http1.1" {
            args.extend(["--next", "-sS", "-i", "--noproxy", "*", flag, &hello]);
        }
        let (head, stderr) = mesh.curl(&args, b"").await;
        assert_eq!(head.status_line, status_line, "{version} HEAD: {head:?}");
        assert_eq!(
            head.header("content-length"),
            Some(HELLO_BODY.len().to_string().as_str()),
            "{version} HEAD: {head:?}"
        );
        if flag == "--http1.1" {
            let after_head = CurlAnswer::parse(&head.body).unwrap_or_else(|| {
                panic!("{version}: no answer to the GET after HEAD: {head:?}\n{stderr}")
            });
            assert_eq!(
                after_head.status_line, status_line,
                "{version} GET after HEAD"
            );
            assert_eq!(
                after_head.body,
                HELLO_BODY.as_bytes(),
                "{version} GET after HEAD: a HEAD body leaked into it?\n{stderr}"
            );
        } else {
            assert!(head.body.is_empty(), "{version} HEAD with a body: {head:?}");
        }
    }

    // Expect: 100-continue with a 4 KiB body: curl waits (up to 5 s) for the 100 before it.
    let body = vec![b'e'; 4096];
    let started = Instant::now();
    let (expect, stderr) = mesh
        .curl(
            &[
                "--http1.1",
                "-v",
                "--expect100-timeout",
                "5",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                "@-",
                &echo,
            ],
            &body,
        )
        .await;
    let took = started.elapsed();
    println!(
        "Expect: 100-continue answered in {took:?}: {:?}",
        expect.interim
    );
    assert_eq!(
        expect.interim,
        ["HTTP/1.1 100 Continue"],
        "no 100 Continue: {stderr}{}",
        mesh.logs()
    );
    assert_eq!(expect.status_line, "HTTP/1.1 200 OK", "{expect:?}");
    assert_eq!(expect.body, body, "the body sent after the 100");
    assert!(
        took < Duration::from_secs(4),
        "curl waited out its 5 s: {took:?}"
    );

    // What B's app got: the Host the client sent, HTTP/1.1 requests as HTTP/1.1, and never the
    // proxies' own header.
    let seen: Vec<_> = app
        .seen()
        .into_iter()
        .filter(|r| r.path != "/probe")
        .collect();
    println!("B's app saw:");
    for request in &seen {
        println!(
            "  {} {} {} host={} te={:?} length={:?} body={}",
            request.method,
            request.path,
            request.version,
            request.host,
            request.headers.get("transfer-encoding"),
            request.headers.get("content-length"),
            request.body_len
        );
    }
    assert_eq!(seen.len(), 8, "requests that reached B's app: {seen:#?}");
    for request in &seen {
        // Port 80: curl's Host is the cluster IP alone.
        assert_eq!(
            request.host,
            SERVICE_IP.to_string(),
            "the Host curl sent: {request:?}"
        );
        assert!(
            !request.headers.contains_key("sigil-orig-proto"),
            "the proxies' header reached the app: {request:?}"
        );
    }
    // The HTTP/1.1 requests: GET, PUT, HEAD, GET, then (after HTTP/2's GET, PUT, HEAD) the
    // Expect POST.
    for request in seen[..4].iter().chain(&seen[7..]) {
        assert_eq!(request.version, "HTTP/1.1", "{request:?}");
    }

    // Every curl request (and the probe) was a request of A's L7 outbound path.
    let answered = app.seen().len() as f64;
    mesh.assert_a_counted(&[("status_code", "200")], answered)
        .await;

    mesh.assert_b_saw_web("curl's GET", |l| {
        l["kind"] == "http" && l["path"] == "/hello" && l["result"] == "allowed"
    })
    .await;
}

#[tokio::test]
async fn a_server_first_protocol_on_an_opaque_port_gets_its_banner_before_the_detection_timeout() {
    // Named `smtp` and with no appProtocol, the port would be detected: only `opaquePorts` (and
    // B's --opaque-ports) spare it the wait for a client byte that never comes.
    let ports = format!(
        "  ports:\n  - {{name: smtp, port: {BANNER_PORT}, targetPort: {BANNER_PORT}}}\n  \
         opaquePorts: \"{BANNER_PORT}\"\n"
    );
    let opaque = BANNER_PORT.to_string();
    let mesh = Mesh::start("sigil-l7bann", &ports, None, &["--opaque-ports", &opaque]).await;
    // Writes the banner on accept, then answers QUIT; records what the client said.
    let app = RecordingServer::start(&mesh.net.b, BANNER_PORT, |mut stream, seen| async move {
        if stream
            .write_all(format!("{BANNER}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut lines = BufReader::new(&mut stream).lines();
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
        {
            seen.lock().unwrap().push(line);
            let _ = stream.write_all(b"221 bye\r\n").await;
        }
    });
    let service = mesh.service(BANNER_PORT);

    /// Connects from A and only reads: how long the banner took, and whether QUIT got its 221.
    async fn read_banner(mesh: &Mesh, service: SocketAddr) -> Result<(Duration, String), String> {
        let started = Instant::now();
        let mut stream = connect_in(&mesh.net.a.name, service)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut reader = BufReader::new(&mut stream);
        let mut banner = String::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut banner))
            .await
            .map_err(|_| "no banner within 5 s".to_string())?
            .map_err(|e| format!("reading the banner: {e}"))?;
        let took = started.elapsed();
        if banner.is_empty() {
            return Err("closed before the banner".into());
        }
        stream
            .write_all(b"QUIT\r\n")
            .await
            .map_err(|e| format!("QUIT: {e}"))?;
        let mut bye = String::new();
        let mut reader = BufReader::new(&mut stream);
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut bye))
            .await
            .map_err(|_| "no answer to QUIT".to_string())?
            .map_err(|e| format!("reading the answer to QUIT: {e}"))?;
        Ok((took, format!("{}|{}", banner.trim_end(), bye.trim_end())))
    }

    // Until A's proxy has db's Service the connection goes nowhere: wait for a first banner.
    let deadline = Instant::now() + Duration::from_secs(15);
    let first = loop {
        match read_banner(&mesh, service).await {
            Ok(first) => break first,
            Err(e) => assert!(
                Instant::now() < deadline,
                "never got the banner through db's Service: {e}{}",
                mesh.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("first banner after {:?} (set-up included)", first.0);
    // Fresh connections, each a new mTLS connection to B (opaque traffic is per connection).
    let mut times = Vec::new();
    for _ in 0..3 {
        let (took, exchange) = read_banner(&mesh, service)
            .await
            .unwrap_or_else(|e| panic!("banner: {e}{}", mesh.logs()));
        assert_eq!(exchange, format!("{BANNER}|221 bye"), "{}", mesh.logs());
        times.push(took);
    }
    println!("banner through the mesh in {times:?} (detection timeout: 500 ms)");
    for took in &times {
        assert!(
            *took < BANNER_WITHIN,
            "a banner took {took:?} (>= {BANNER_WITHIN:?}): the connection waited for \
             detection? all: {times:?}{}",
            mesh.logs()
        );
    }
    assert_eq!(app.requests().len(), 4, "{:?}", app.requests());
    assert!(
        app.requests().iter().all(|l| l == "QUIT"),
        "{:?}",
        app.requests()
    );

    mesh.assert_b_saw_web("the opaque connection", |l| {
        l["direction"] == "inbound"
            && l["destination"] == format!("{B_IP}:{BANNER_PORT}")
            && l["security"] == "mtls"
    })
    .await;
}
