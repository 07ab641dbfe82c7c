//! Distributed tracing and the access log through the mesh (issue 16), as root, in network
//! namespaces this test creates and deletes (pass or fail). Two pods with transparent
//! `sigil proxy run`s (tests/harness/src/netns.rs), A's clients calling db's meshed Service by its
//! cluster IP (in the agent's `--mesh-file`, so A's outbound path is L7 and makes CLIENT spans;
//! B's inbound path makes SERVER spans), and an OTLP receiver in the node's namespace
//! (tests/harness/src/otlp.rs) that both proxies export to (`--trace-collector`, 200 ms batches)
//! and that the apps' OpenTelemetry SDK exports to as well. The real OpenTelemetry peers are two
//! small Python services instrumented with PyPI's SDK (tests/e2e/tracing_app.py). It proves that:
//!
//! 0. (`the_receiver_speaks_otlp_as_the_sdk_does`, no proxies) the receiver takes the SDK's
//!    OTLP/gRPC and OTLP/HTTP exports, and reads them as PyPI's `opentelemetry-proto` does: what
//!    the tests below see of the proxies' spans is what an OpenTelemetry Collector would see;
//! 1. (`w3c_b3_unsampled_and_sampled_access_log`, gRPC export, `--trace-sampling 0`,
//!    `--access-log-sampling 0.5`)
//!    - (a) a request of the SDK's client makes one trace of 4 spans, one parent→child chain: the
//!      app's CLIENT span → A's proxy's CLIENT span → B's proxy's SERVER span → the app's
//!      SERVER span, with the verified identities, the deciding policy and the status as
//!      attributes; both proxies' access lines carry the trace id and their own span id;
//!    - (b) B3 callers (a plain client sending one `b3` header with a 64-bit trace id, then
//!      `X-B3-*` headers) are continued: the proxies' spans have the padded trace id and the
//!      caller's span as parent, and B's app gets the same B3 format with B's proxy's span and
//!      continues the trace;
//!    - (c) an unsampled W3C request (`-00`) makes no proxy span and reaches the app with its
//!      `traceparent` unchanged; a request without context is a root sampled at the ratio, 0
//!      here: no span, and the app gets a `traceparent` with flags `00` (one decision for
//!      every hop);
//!    - (d) with `--access-log-sampling 0.5`, unsampled requests are logged by both proxies for
//!      exactly the same trace ids, about half of them (±15 %);
//!    - (e) a proxy's export batch, decoded by PyPI's `opentelemetry-proto` (not our generated
//!      types), holds the same spans the receiver decoded;
//! 2. (`http_protobuf_export_and_sampled_roots`, OTLP/HTTP, `--trace-sampling 1`) the same chain
//!    arrives over HTTP/protobuf, a raw HTTP batch decodes alike in Python, and a request
//!    without context becomes a root span of A's proxy, continued by B's and by the app;
//! 3. (`a_dead_or_hanging_collector_changes_nothing_for_requests`) with the collector gone, then
//!    accepting connections and never answering, every request still gets its 200 as fast as
//!    with a live collector (p99 within [`LATENCY_SLACK`]), and the proxies count the spans they
//!    drop (`sigil_proxy_trace_spans_dropped_total`: `export_failed`, then `queue_full` with a
//!    16-span queue).
//!
//! ```text
//!          pod A (netns)                            pod B (netns)
//!   tracing_app.py client (root),                tracing_app.py server :8080 (root)
//!     plain HTTP clients of the test               (or the harness's echo app in 3)
//!     │ OUTPUT → :15001                              ▲ PREROUTING → :15006
//!   sigil proxy, uid 41661 (web)                   sigil proxy, uid 41662 (db)
//!     │ mTLS to db's endpoint (B:8080)               ▲
//!   eth0 198.18.16.1/24                            eth0 198.18.16.2/24
//!     │ route 198.19.0.0/16 via C                    │
//!     └──── veth-a ───────┐          ┌──────── veth-b┘
//!                       ┌─┴──────────┴─┐
//!                       │ br0          │ netns C, 198.18.16.3: the OTLP receiver on :4317
//!                       └──────────────┘ (gRPC) and :4318 (HTTP); reads the proxies' /metrics
//! ```
//!
//! The proxies' exports leave their pods outside the mesh (their uid is exempt from the
//! redirection); the apps' exports pass through their pod's proxy as plain TCP (C is no member).
//! Each test has its own namespaces (`sigil-tr<case>-<pid>-{a,b,c}`), CA, agent, proxies and
//! receiver, so they run in parallel and fail apart.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sigil_proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceRequest;
use sigil_proto::opentelemetry::proto::trace::v1::span::SpanKind;
use sigil_test_harness::l7::{EchoApp, wait_for_output};
use sigil_test_harness::netns::{Netns, PodNetwork, PodProxy, connect_in, require_root};
use sigil_test_harness::otlp::{
    Keep, OTLP_GRPC_PORT, OTLP_HTTP_PORT, OtlpReceiver, ReceivedSpan, Transport, describe,
    otel_python, spans_of,
};
use sigil_test_harness::{DB_ID, MeshHost, Proc, WEB_ID};

/// A's proxy: attested as web, excluded from A's redirection.
const WEB_UID: u32 = 41661;
/// B's proxy: attested as db, excluded from B's redirection.
const DB_UID: u32 = 41662;
/// Addresses come from 198.18.0.0/15 (benchmarking); they exist only in each test's namespaces.
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 3);
/// db's cluster IP and port, and the range A routes to C (so that the kernel lets A's clients
/// try it; A's proxy intercepts the connection).
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 16, 10), 80);
const SERVICE_RANGE: &str = "198.19.0.0/16";
/// B's app port, the Service's targetPort.
const APP_PORT: u16 = 8080;
/// The proxies' resource `service.name`: `{sa}.{ns}` of their SPIFFE IDs (the default).
const WEB_SERVICE_NAME: &str = "web.demo";
const DB_SERVICE_NAME: &str = "db.demo";
/// The Python apps' resource `service.name`.
const CLIENT_APP: &str = "tracing-client";
const SERVER_APP: &str = "tracing-server";
/// How long spans may take to reach the receiver (batches of 200 ms, plus a loaded machine).
const SPANS_WITHIN: Duration = Duration::from_secs(15);
/// How much slower than with a live collector the p99 may be with a dead or hanging one: far
/// below anything that waited on the exporter (its connect and export timeouts are seconds).
const LATENCY_SLACK: Duration = Duration::from_millis(100);

/// The tracing app's path (beside this file).
fn tracing_app() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e/tracing_app.py")
        .display()
        .to_string()
}

fn mesh_file() -> String {
    format!(
        "members:\n- {{ip: {A_IP}, id: \"{WEB_ID}\"}}\n- {{ip: {B_IP}, id: \"{DB_ID}\"}}\n\
         services:\n- namespace: demo\n  name: db\n  clusterIPs: [{}]\n  ports:\n  \
         - {{name: http, port: {}, targetPort: {APP_PORT}, appProtocol: http}}\n  \
         endpoints:\n  - {{ip: {B_IP}}}\n",
        SERVICE.ip(),
        SERVICE.port()
    )
}

/// B's application.
enum App {
    /// tracing_app.py's server (exports its own spans to the receiver's gRPC port).
    Python,
    /// The harness's echo app: no spans of its own (test 3 kills the collector).
    Echo,
}

/// One test's mesh. Fields drop in order: the proxies, the app, the receiver, the namespaces,
/// the agent and CA, the files.
struct Mesh {
    a_proxy: PodProxy,
    b_proxy: PodProxy,
    /// tracing_app.py's server, or
    server_app: Option<Proc>,
    /// the echo app.
    _echo_app: Option<EchoApp>,
    receiver: OtlpReceiver,
    net: PodNetwork,
    host: MeshHost,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// Both proxies get `--access-log`, `--trace-collector` (the receiver's gRPC port, or its
    /// HTTP port with `--trace-protocol http/protobuf` in `proxy_args`), 200 ms batches, and
    /// `proxy_args`.
    async fn start(prefix: &str, app: App, http_export: bool, proxy_args: &[&str]) -> Mesh {
        require_root(
            "this test creates network namespaces, installs iptables rules in them and runs \
             processes as other uids: run it as root (CI does)",
        );
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, mesh_file()).unwrap();
        let host = MeshHost::start(
            dir.path(),
            &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)],
            "1h",
            &["--mesh-file", mesh.to_str().unwrap()],
        )
        .await;
        let net = PodNetwork::new(prefix, C_IP, [(A_IP, WEB_UID), (B_IP, DB_UID)]);
        net.a.run(&[
            "ip",
            "route",
            "add",
            SERVICE_RANGE,
            "via",
            &C_IP.to_string(),
        ]);
        let receiver =
            OtlpReceiver::start(&net.c, OTLP_GRPC_PORT, OTLP_HTTP_PORT, Keep::Everything);
        let collector = if http_export {
            format!("http://{C_IP}:{OTLP_HTTP_PORT}")
        } else {
            format!("http://{C_IP}:{OTLP_GRPC_PORT}")
        };
        let mut args = vec![
            "--access-log",
            "--trace-collector",
            &collector,
            "--trace-batch-timeout",
            "200ms",
        ];
        args.extend(proxy_args);
        let (server_app, echo_app) = match app {
            App::Python => {
                let (script, port) = (tracing_app(), APP_PORT.to_string());
                let grpc_collector = format!("http://{C_IP}:{OTLP_GRPC_PORT}");
                let mut command = net.b.command(&[
                    otel_python(),
                    "-u",
                    &script,
                    "server",
                    SERVER_APP,
                    &port,
                    &grpc_collector,
                ]);
                // The server continues W3C and both B3 formats.
                command.env("OTEL_PROPAGATORS", "tracecontext,b3,b3multi");
                let mut server = Proc::spawn(command, dir.path().join("server-app.log"));
                wait_for_output(&mut server, "serving").await;
                (Some(server), None)
            }
            App::Echo => (None, Some(EchoApp::start(&net.b, APP_PORT))),
        };
        let a_proxy = PodProxy::start(
            &net.a,
            A_IP,
            None,
            WEB_UID,
            &host.socket,
            &args,
            dir.path().join("proxy-a.log"),
            &net.c,
        )
        .await;
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
        a_proxy.wait_for_services(1).await;
        let mesh = Mesh {
            a_proxy,
            b_proxy,
            server_app,
            _echo_app: echo_app,
            receiver,
            net,
            host,
            dir,
        };
        println!("{prefix}: set up in {:?}", started.elapsed());
        mesh
    }

    /// Both proxies', the agent's and B's Python app's logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "\n--- A's proxy:\n{}\n--- B's proxy:\n{}\n--- agent:\n{}\n--- B's app:\n{}",
            self.a_proxy.logs(),
            self.b_proxy.logs(),
            self.host.agent.logs(),
            self.server_app.as_ref().map(Proc::logs).unwrap_or_default()
        )
    }

    /// A plain HTTP/1.1 client in A (a socket of this process, as root: redirected to A's
    /// proxy) on one keep-alive connection to db's Service.
    async fn client(&self) -> Client {
        let stream = connect_in(&self.net.a.name, SERVICE.into())
            .await
            .unwrap_or_else(|e| panic!("connecting from A to {SERVICE}: {e}"));
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        Client { sender }
    }

    /// Runs tracing_app.py's client in A (as root) for one GET of db's Service; its JSON.
    async fn python_client(&self) -> Value {
        let (script, url) = (tracing_app(), format!("http://{SERVICE}/"));
        let collector = format!("http://{C_IP}:{OTLP_GRPC_PORT}");
        let command = self.net.a.command(&[
            otel_python(),
            "-u",
            &script,
            "client",
            CLIENT_APP,
            &url,
            &collector,
        ]);
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::from(command).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("the Python client ran for over 60 s{}", self.logs()))
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the Python client failed ({}):\n{stdout}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the Python client's output is not JSON ({e}): {stdout}"))
    }

    /// Waits until the receiver has `count` spans of `trace_id`, and returns them.
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<ReceivedSpan> {
        self.receiver
            .wait_for(
                &format!("{count} spans of trace {trace_id}"),
                SPANS_WITHIN,
                |spans| spans.iter().filter(|s| s.trace_id() == trace_id).count() >= count,
            )
            .await
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect()
    }

    /// Waits (10 s at most) for an access-log line of `proxy` with `trace_id`.
    async fn access_line(&self, proxy: &PodProxy, which: &str, trace_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = proxy
                .access_log()
                .into_iter()
                .find(|l| l["trace_id"] == trace_id)
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{which}'s access log has no line of trace {trace_id}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The W3C chain (1a, 2): the SDK's client through both proxies to the SDK's server.
    async fn assert_w3c_chain(&self, transport: Transport) {
        let client = self.python_client().await;
        assert_eq!(client["status"], 200, "{client}");
        assert_eq!(client["sampled"], true, "{client}");
        let trace_id = client["trace_id"].as_str().unwrap().to_owned();
        let spans = self.trace(&trace_id, 4).await;
        let all = describe(&spans);
        assert_eq!(spans.len(), 4, "one span per hop:\n{all}");
        let app_client = one(&spans, CLIENT_APP, SpanKind::Client);
        assert_eq!(app_client.span_id(), client["span_id"], "{all}");
        assert_eq!(
            app_client.parent_span_id(),
            "",
            "the app's span is the root:\n{all}"
        );
        let (outbound, inbound) = proxy_chain(&spans, &app_client.span_id());
        assert_eq!(
            client["server"]["parent_span_id"],
            inbound.span_id(),
            "{client}"
        );
        assert_traceparent(
            &client["server"]["headers"]["traceparent"],
            &trace_id,
            &inbound.span_id(),
            true,
        );
        for (span, which) in [(outbound, "A's proxy"), (inbound, "B's proxy")] {
            assert_eq!(
                span.transport, transport,
                "{which}'s span came over {transport:?}"
            );
            assert_eq!(span.span.name, "GET", "{which}'s span: {span:?}");
            assert_eq!(
                span.attribute("http.request.method").as_deref(),
                Some("GET"),
                "{which}: {span:?}"
            );
            assert_eq!(
                span.attribute("http.response.status_code").as_deref(),
                Some("200"),
                "{which}: {span:?}"
            );
            assert_eq!(
                span.attribute("sigil.source.identity").as_deref(),
                Some(WEB_ID),
                "{which}: {span:?}"
            );
            assert_eq!(
                span.attribute("sigil.destination.identity").as_deref(),
                Some(DB_ID),
                "{which}: {span:?}"
            );
            assert_eq!(
                span.attribute("sigil.security").as_deref(),
                Some("mtls"),
                "{which}: {span:?}"
            );
            assert!(
                span.span.start_time_unix_nano > 0
                    && span.span.end_time_unix_nano >= span.span.start_time_unix_nano,
                "{which}: {span:?}"
            );
        }
        assert!(
            inbound
                .attribute("sigil.policy")
                .is_some_and(|p| !p.is_empty()),
            "B's proxy names the deciding policy: {inbound:?}"
        );
        assert!(
            outbound
                .attribute("sigil.service")
                .is_some_and(|s| s.starts_with("demo/db")),
            "A's proxy names the Service: {outbound:?}"
        );
        let a_line = self
            .access_line(&self.a_proxy, "A's proxy", &trace_id)
            .await;
        assert_eq!(a_line["span_id"], outbound.span_id(), "{a_line}");
        let b_line = self
            .access_line(&self.b_proxy, "B's proxy", &trace_id)
            .await;
        assert_eq!(b_line["span_id"], inbound.span_id(), "{b_line}");
        assert_eq!(b_line["parent_span_id"], outbound.span_id(), "{b_line}");
        println!("one trace over {transport:?}:\n{all}A: {a_line}\nB: {b_line}");
    }
}

/// 1e, 2, 0: the first export batch (over `transport`) of one of `services`, decoded by PyPI's
/// opentelemetry-proto, holds the spans the receiver decoded from the same bytes.
fn assert_python_decodes_a_batch(
    receiver: &OtlpReceiver,
    dir: &Path,
    transport: Transport,
    services: &[&str],
) {
    let raw = receiver
        .raw_exports()
        .into_iter()
        .find(|raw| {
            raw.transport == transport
                && spans_of(&decode(&raw.bytes), transport)
                    .iter()
                    .any(|s| services.contains(&s.service.as_str()))
        })
        .unwrap_or_else(|| panic!("no export batch of {services:?} over {transport:?}"));
    let ours: Vec<Value> = spans_of(&decode(&raw.bytes), transport)
        .iter()
        .map(span_json)
        .collect();
    let file = dir.join(format!("batch-{transport:?}.pb"));
    std::fs::write(&file, &raw.bytes).unwrap();
    let out = std::process::Command::new(otel_python())
        .args([&tracing_app(), "decode", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "decoding with opentelemetry-proto failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!theirs.is_empty());
    assert_eq!(
        sorted(theirs),
        sorted(ours),
        "opentelemetry-proto and the receiver read a {transport:?} batch of {services:?} differently"
    );
}

fn decode(bytes: &Bytes) -> ExportTraceServiceRequest {
    prost::Message::decode(bytes.clone()).expect("an ExportTraceServiceRequest")
}

/// A span as tracing_app.py's `decode` prints one.
fn span_json(span: &ReceivedSpan) -> Value {
    let attributes: serde_json::Map<String, Value> = span
        .span
        .attributes
        .iter()
        .map(|kv| {
            let text = span.attribute(&kv.key).unwrap_or_default();
            (kv.key.clone(), Value::String(text))
        })
        .collect();
    json!({
        "service": span.service,
        "trace_id": span.trace_id(),
        "span_id": span.span_id(),
        "parent_span_id": span.parent_span_id(),
        "name": span.span.name,
        "kind": span.span.kind,
        "attributes": attributes,
    })
}

fn sorted(mut spans: Vec<Value>) -> Vec<Value> {
    spans.sort_by_key(|s| s["span_id"].as_str().unwrap_or_default().to_owned());
    spans
}

/// `seen` is a version-00 `traceparent` of `trace_id` with `parent` as the parent span and the
/// sampled flag as `sampled` (the other flags are the caller's: the SDK sets W3C level 2's
/// random-trace-id flag, which the proxies keep).
fn assert_traceparent(seen: &Value, trace_id: &str, parent: &str, sampled: bool) {
    let text = seen.as_str().unwrap_or_default();
    let fields: Vec<&str> = text.split('-').collect();
    let flags = fields.get(3).and_then(|f| u8::from_str_radix(f, 16).ok());
    assert!(
        fields.len() == 4
            && fields[..3] == ["00", trace_id, parent]
            && flags.map(|f| f & 1 == 1) == Some(sampled),
        "the app got traceparent {seen}, not 00-{trace_id}-{parent}-(sampled: {sampled})"
    );
}

/// The proxies' spans (A's, B's) of a request through both, after checking that they and B's
/// app's span form a chain, A's a child of `caller` (`""`: a root).
fn proxy_chain<'a>(
    spans: &'a [ReceivedSpan],
    caller: &str,
) -> (&'a ReceivedSpan, &'a ReceivedSpan) {
    let all = describe(spans);
    let outbound = one(spans, WEB_SERVICE_NAME, SpanKind::Client);
    let inbound = one(spans, DB_SERVICE_NAME, SpanKind::Server);
    let app_server = one(spans, SERVER_APP, SpanKind::Server);
    assert_eq!(
        outbound.parent_span_id(),
        caller,
        "A's proxy's parent:\n{all}"
    );
    assert_eq!(inbound.parent_span_id(), outbound.span_id(), "{all}");
    assert_eq!(app_server.parent_span_id(), inbound.span_id(), "{all}");
    (outbound, inbound)
}

/// The one span of `spans` from `service` of `kind`.
fn one<'a>(spans: &'a [ReceivedSpan], service: &str, kind: SpanKind) -> &'a ReceivedSpan {
    let matching: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.span.kind() == kind)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {kind:?} span of {service}:\n{}",
        describe(spans)
    );
    matching[0]
}

/// A plain HTTP/1.1 client on one connection (no SDK: the test writes the trace headers).
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    /// One GET with `headers`: the status, the body and how long it took.
    async fn get(&mut self, headers: &[(&str, &str)]) -> (u16, Bytes, Duration) {
        let started = Instant::now();
        let mut request = hyper::Request::get("/").header("host", "db.demo");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            self.sender.ready().await?;
            let response = self
                .sender
                .send_request(request.body(Empty::new()).unwrap())
                .await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await
        .expect("no answer within 10 s")
        .expect("the request failed");
        (answer.0, answer.1, started.elapsed())
    }

    /// One GET to tracing_app.py's server: the status and its JSON answer.
    async fn get_json(&mut self, headers: &[(&str, &str)]) -> (u16, Value) {
        let (status, body, _) = self.get(headers).await;
        let answer = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "B's app answered {status} and not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, answer)
    }
}

/// Trace and span ids for the plain clients: distinct, and spread like random ones (SplitMix64
/// from a fixed seed, so a run's ids, and what a ratio decides on them, are the same every time).
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn trace_id(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }

    fn span_id(&mut self) -> String {
        format!("{:016x}", self.next())
    }
}

/// A sampled W3C request from a plain client and the spans it made (both proxies' and the
/// app's): once they are in, so are those of every request answered before it.
async fn barrier(mesh: &Mesh, client: &mut Client, ids: &mut Ids) {
    let trace_id = ids.trace_id();
    let traceparent = format!("00-{trace_id}-{}-01", ids.span_id());
    let (status, _) = client.get_json(&[("traceparent", &traceparent)]).await;
    assert_eq!(status, 200);
    mesh.trace(&trace_id, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_speaks_otlp_as_the_sdk_does() {
    require_root("this test creates a network namespace: run it as root (CI does)");
    let dir = tempfile::tempdir().unwrap();
    let netns = Netns::new("sigil-tr0", "c");
    let receiver = OtlpReceiver::start(&netns, OTLP_GRPC_PORT, OTLP_HTTP_PORT, Keep::Everything);
    let script = tracing_app();
    let (port, grpc) = (
        APP_PORT.to_string(),
        format!("http://127.0.0.1:{OTLP_GRPC_PORT}"),
    );
    let mut server = Proc::spawn(
        netns.command(&[
            otel_python(),
            "-u",
            &script,
            "server",
            SERVER_APP,
            &port,
            &grpc,
        ]),
        dir.path().join("server-app.log"),
    );
    wait_for_output(&mut server, "serving").await;
    let (url, http) = (
        format!("http://127.0.0.1:{APP_PORT}/"),
        format!("http://127.0.0.1:{OTLP_HTTP_PORT}/v1/traces"),
    );
    let out = netns
        .command(&[
            otel_python(),
            "-u",
            &script,
            "client",
            CLIENT_APP,
            &url,
            &http,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client: Value = serde_json::from_str(stdout.trim()).unwrap();
    let trace_id = client["trace_id"].as_str().unwrap().to_owned();
    let spans = receiver
        .wait_for(
            "the client's and the server's spans",
            SPANS_WITHIN,
            |spans| spans.iter().filter(|s| s.trace_id() == trace_id).count() == 2,
        )
        .await;
    let app_client = one(&spans, CLIENT_APP, SpanKind::Client);
    let app_server = one(&spans, SERVER_APP, SpanKind::Server);
    assert_eq!(app_client.transport, Transport::HttpProtobuf);
    assert_eq!(app_server.transport, Transport::Grpc);
    assert_eq!(app_client.span_id(), client["span_id"]);
    assert_eq!(
        app_server.parent_span_id(),
        app_client.span_id(),
        "{}",
        describe(&spans)
    );
    for transport in [Transport::Grpc, Transport::HttpProtobuf] {
        let apps = [CLIENT_APP, SERVER_APP];
        assert_python_decodes_a_batch(&receiver, dir.path(), transport, &apps);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w3c_b3_unsampled_and_sampled_access_log() {
    let mesh = Mesh::start(
        "sigil-tr1",
        App::Python,
        false,
        &["--trace-sampling", "0", "--access-log-sampling", "0.5"],
    )
    .await;

    // a. The SDK's W3C trace through both proxies.
    mesh.assert_w3c_chain(Transport::Grpc).await;
    let mut ids = Ids(16);
    let mut client = mesh.client().await;

    // b. A B3 single-header caller with a 64-bit trace id.
    let (short_trace, caller) = (format!("{:016x}", ids.next()), ids.span_id());
    let b3 = format!("{short_trace}-{caller}-1");
    let (status, app) = client.get_json(&[("b3", &b3)]).await;
    assert_eq!(status, 200, "{app}");
    let padded = format!("{:0>32}", short_trace);
    let spans = mesh.trace(&padded, 3).await;
    let (_, inbound) = proxy_chain(&spans, &caller);
    let seen = app["headers"]["b3"].as_str().unwrap_or_default();
    let fields: Vec<&str> = seen.split('-').collect();
    assert!(
        fields.len() >= 3
            && fields[0] == short_trace
            && fields[1] == inbound.span_id()
            && fields[2] == "1",
        "B's app got b3 {seen:?}, not {short_trace}-{}-1: {app}",
        inbound.span_id()
    );
    assert_eq!(
        app["trace_id"], padded,
        "the app continued the B3 trace: {app}"
    );

    // b. An X-B3-* caller.
    let (trace_id, caller) = (ids.trace_id(), ids.span_id());
    let (status, app) = client
        .get_json(&[
            ("x-b3-traceid", &trace_id),
            ("x-b3-spanid", &caller),
            ("x-b3-sampled", "1"),
        ])
        .await;
    assert_eq!(status, 200, "{app}");
    let spans = mesh.trace(&trace_id, 3).await;
    let (outbound, inbound) = proxy_chain(&spans, &caller);
    let headers = &app["headers"];
    assert_eq!(headers["x-b3-traceid"], trace_id, "{app}");
    assert_eq!(headers["x-b3-spanid"], inbound.span_id(), "{app}");
    assert_eq!(headers["x-b3-parentspanid"], outbound.span_id(), "{app}");
    assert_eq!(headers["x-b3-sampled"], "1", "{app}");

    // c. Unsampled (-00), and a root at ratio 0: no proxy span; one decision for every hop.
    let unsampled = ids.trace_id();
    let traceparent = format!("00-{unsampled}-{}-00", ids.span_id());
    let (status, app) = client.get_json(&[("traceparent", &traceparent)]).await;
    assert_eq!(status, 200, "{app}");
    assert_eq!(
        app["headers"]["traceparent"], traceparent,
        "untouched: {app}"
    );
    assert_eq!(app["sampled"], false, "{app}");
    let (status, app) = client.get_json(&[]).await;
    assert_eq!(status, 200, "{app}");
    let root = app["headers"]["traceparent"].as_str().unwrap_or_default();
    let root_fields: Vec<&str> = root.split('-').collect();
    assert!(
        root_fields.len() == 4 && root_fields[0] == "00" && root_fields[3] == "00",
        "A's proxy starts an unsampled root and says so downstream: {app}"
    );
    let root_trace = root_fields[1].to_owned();
    barrier(&mesh, &mut client, &mut ids).await;
    for trace_id in [&unsampled, &root_trace] {
        let spans = mesh.receiver.spans();
        assert!(
            !spans.iter().any(|s| &s.trace_id() == trace_id),
            "trace {trace_id} was not sampled:\n{}",
            describe(&spans)
        );
    }

    // d. Access-log sampling: unsampled requests, logged by both proxies alike.
    const REQUESTS: usize = 400;
    let mut sent = BTreeSet::new();
    for _ in 0..REQUESTS {
        let trace_id = ids.trace_id();
        let traceparent = format!("00-{trace_id}-{}-00", ids.span_id());
        let (status, _, _) = client.get(&[("traceparent", &traceparent)]).await;
        assert_eq!(status, 200);
        sent.insert(trace_id);
    }
    // Sampled requests are always logged: once the barrier's lines are in, so are the others.
    let trace_id = ids.trace_id();
    let traceparent = format!("00-{trace_id}-{}-01", ids.span_id());
    assert_eq!(client.get(&[("traceparent", &traceparent)]).await.0, 200);
    mesh.access_line(&mesh.a_proxy, "A's proxy", &trace_id)
        .await;
    mesh.access_line(&mesh.b_proxy, "B's proxy", &trace_id)
        .await;
    let logged = |proxy: &PodProxy| -> BTreeSet<String> {
        proxy
            .access_log()
            .iter()
            .filter_map(|l| l["trace_id"].as_str())
            .filter(|t| sent.contains(*t))
            .map(str::to_owned)
            .collect()
    };
    let (by_a, by_b) = (logged(&mesh.a_proxy), logged(&mesh.b_proxy));
    println!(
        "access-log sampling 0.5: A logged {} and B {} of {REQUESTS} unsampled requests",
        by_a.len(),
        by_b.len()
    );
    assert_eq!(by_a, by_b, "both proxies log the same requests");
    let expected = REQUESTS as f64 * 0.5;
    assert!(
        (by_a.len() as f64 - expected).abs() <= expected * 0.15,
        "{} of {REQUESTS} logged at 0.5",
        by_a.len()
    );

    // e. A batch as PyPI's opentelemetry-proto reads it.
    let proxies = [WEB_SERVICE_NAME, DB_SERVICE_NAME];
    assert_python_decodes_a_batch(&mesh.receiver, mesh.dir.path(), Transport::Grpc, &proxies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_and_sampled_roots() {
    let mesh = Mesh::start(
        "sigil-tr2",
        App::Python,
        true,
        &["--trace-protocol", "http/protobuf", "--trace-sampling", "1"],
    )
    .await;
    mesh.assert_w3c_chain(Transport::HttpProtobuf).await;

    // A request without context is a root of A's proxy (ratio 1), continued by B's and the app.
    let mut client = mesh.client().await;
    let (status, app) = client.get_json(&[]).await;
    assert_eq!(status, 200, "{app}");
    let trace_id = app["trace_id"].as_str().unwrap().to_owned();
    let spans = mesh.trace(&trace_id, 3).await;
    let (_, inbound) = proxy_chain(&spans, "");
    assert_traceparent(
        &app["headers"]["traceparent"],
        &trace_id,
        &inbound.span_id(),
        true,
    );
    assert_eq!(app["sampled"], true, "{app}");

    let proxies = [WEB_SERVICE_NAME, DB_SERVICE_NAME];
    assert_python_decodes_a_batch(
        &mesh.receiver,
        mesh.dir.path(),
        Transport::HttpProtobuf,
        &proxies,
    );
}

/// `count` requests (at least) on `client`, until `done` holds or 20 s passed: all must get
/// 200; their p99 latency.
async fn requests_until(
    mesh: &Mesh,
    client: &mut Client,
    count: usize,
    what: &str,
    mut done: impl AsyncFnMut() -> bool,
) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut latencies = Vec::new();
    loop {
        for _ in 0..count {
            let (status, body, latency) = client.get(&[]).await;
            assert_eq!(
                status,
                200,
                "{what}: {}{}",
                String::from_utf8_lossy(&body),
                mesh.logs()
            );
            latencies.push(latency);
        }
        if done().await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never done{}",
            mesh.logs()
        );
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!("{what}: {} requests, all 200, p99 {p99:?}", latencies.len());
    p99
}

/// The sum over both proxies of one series.
async fn both(mesh: &Mesh, series: &str) -> f64 {
    mesh.a_proxy.metric(series).await + mesh.b_proxy.metric(series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hanging_collector_changes_nothing_for_requests() {
    const EXPORT_FAILED: &str = "sigil_proxy_trace_spans_dropped_total{reason=\"export_failed\"}";
    const QUEUE_FULL: &str = "sigil_proxy_trace_spans_dropped_total{reason=\"queue_full\"}";
    const EXPORTED: &str = "sigil_proxy_trace_spans_exported_total";
    let mut mesh = Mesh::start(
        "sigil-tr3",
        App::Echo,
        false,
        &[
            "--trace-sampling",
            "1",
            "--trace-queue-size",
            "16",
            "--trace-export-timeout",
            "5s",
        ],
    )
    .await;
    let mut client = mesh.client().await;

    // A live collector: the baseline.
    let live = requests_until(&mesh, &mut client, 500, "live collector", async || {
        both(&mesh, EXPORTED).await > 0.0
    })
    .await;

    // Dead: nothing listens.
    mesh.receiver.stop();
    let before = both(&mesh, EXPORT_FAILED).await;
    let dead = requests_until(&mesh, &mut client, 500, "dead collector", async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        both(&mesh, EXPORT_FAILED).await > before
    })
    .await;
    assert!(
        dead <= live + LATENCY_SLACK,
        "p99 {dead:?} with a dead collector, {live:?} with a live one"
    );

    // Hanging: connections accepted, never answered; the 16-span queue overflows while an
    // export waits.
    mesh.receiver.black_hole(&mesh.net.c);
    let before = both(&mesh, QUEUE_FULL).await;
    let hanging = requests_until(&mesh, &mut client, 500, "hanging collector", async || {
        both(&mesh, QUEUE_FULL).await > before
    })
    .await;
    assert!(
        hanging <= live + LATENCY_SLACK,
        "p99 {hanging:?} with a hanging collector, {live:?} with a live one"
    );
    println!(
        "dropped: export_failed {}, queue_full {}",
        both(&mesh, EXPORT_FAILED).await,
        both(&mesh, QUEUE_FULL).await
    );
}
