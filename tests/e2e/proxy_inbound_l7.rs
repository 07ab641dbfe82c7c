//! The inbound proxy as the server side of proxy-to-proxy HTTP/2 (issue 14 items 2, 4, 5 and
//! 6, inbound half), with real processes: a Rust HTTP/2 client over mTLS with the web workload's
//! certificate plays the client pod's proxy. Requests marked `sigil-orig-proto: HTTP/1.1` reach
//! an HTTP/1.1-only application as HTTP/1.1 over a few reused connections, chunked bodies and
//! trailers intact; the golden metrics count them by status; a WebSocket from PyPI's
//! `websockets` works under an HTTP AuthorizationPolicy; a server-first application on an
//! --opaque-ports port greets its client without waiting for the detection timeout; gRPC keeps
//! HTTP/2 and is counted by its grpc-status.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use sigil_identity::tls::{CertifiedKey, ExpectedServer, client_config};
use sigil_identity::{SpiffeId, TrustBundle};
use sigil_test_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB_UID: u32 = 41601;
const DB_UID: u32 = 41602;

const DENY_ADMIN: &str = include_str!("../fixtures/deny-admin.yaml");

/// A CA and agent (serving `policies`), and the db proxy's inbound listener in front of `app`.
struct Inbound {
    host: MeshHost,
    proxy: ProxyProcess,
    listen: SocketAddr,
    /// The web workload's certificate and the mesh's trust bundle: what a client proxy has.
    web: CertifiedKey,
    bundle: TrustBundle,
}

async fn inbound(dir: &Path, policies: &[&str], app: SocketAddr, extra: &[&str]) -> Inbound {
    let policy_file = dir.join("policies.yaml");
    std::fs::write(&policy_file, policies.join("---\n")).unwrap();
    let agent_args = match policies {
        [] => vec![],
        _ => vec!["--policy-file", policy_file.to_str().unwrap()],
    };
    let host = MeshHost::start(
        dir,
        &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)],
        "1h",
        &agent_args,
    )
    .await;
    let (proxy, listen) = db_proxy(dir, &host, "proxy-db", app, extra).await;
    let web = host.offline.issue(WEB_ID, &dir.join("web-cert"));
    let bundle = state_dir_bundle(&host.offline.state);
    Inbound {
        host,
        proxy,
        listen,
        web,
        bundle,
    }
}

/// A db proxy named `name` with its inbound listener (returned) in front of `app`.
async fn db_proxy(
    dir: &Path,
    host: &MeshHost,
    name: &str,
    app: SocketAddr,
    extra: &[&str],
) -> (ProxyProcess, SocketAddr) {
    let listen = free_addr();
    let mut flags = args(&[
        "--explicit",
        "--agent-socket",
        host.socket.to_str().unwrap(),
        "--inbound-listen",
        &listen.to_string(),
        "--inbound-app",
        &app.to_string(),
    ]);
    flags.extend(args(extra));
    (spawn_proxy(dir, name, Some(DB_UID), &flags).await, listen)
}

impl Inbound {
    /// mTLS to the listener as the web workload, requiring the db identity.
    async fn mtls(&self, listen: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config = client_config(
            Some(&self.web),
            &self.bundle,
            ExpectedServer::Spiffe(SpiffeId::parse(DB_ID).unwrap()),
            &[],
        )
        .unwrap();
        let tcp = TcpStream::connect(listen).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(listen.ip().into()), tcp)
            .await
            .unwrap()
    }

    /// One HTTP/2 connection over mTLS, as a peer proxy opens it.
    async fn h2(&self) -> hyper::client::conn::http2::SendRequest<TestBody> {
        let tls = self.mtls(self.listen).await;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        sender
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn full(body: &'static str) -> TestBody {
    Full::new(Bytes::from_static(body.as_bytes())).boxed()
}

/// A body of `chunks` sent one frame at a time, without a length (so HTTP/1.1 chunks it).
fn streamed(chunks: &[&'static str]) -> TestBody {
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// An HTTP/2 request for `path` carrying an HTTP/1.1 request, as a client pod's proxy sends it.
fn carried(path: &str, body: TestBody) -> hyper::Request<TestBody> {
    hyper::Request::post(format!("http://db.demo:8080{path}"))
        .header("sigil-orig-proto", "HTTP/1.1")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// An HTTP/1.1-only application (hyper's HTTP/1 server, no HTTP/2), counting the connections it
/// accepts. It answers with what it saw: the request's version, Host, whether a
/// `sigil-orig-proto` reached it, its `transfer-encoding` and the body's length;
/// `/trailers` answers a chunked body with a `x-checksum` trailer.
async fn http1_only_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        let seen = format!(
                            "{:?} host={} orig-proto={} te={} transfer-encoding={}",
                            request.version(),
                            header("host"),
                            header("sigil-orig-proto"),
                            header("te"),
                            header("transfer-encoding"),
                        );
                        let trailers = request.uri().path() == "/trailers";
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{seen} body={}", body.len());
                        let response = if trailers {
                            let mut trailer = hyper::HeaderMap::new();
                            trailer.insert("x-checksum", "abc123".parse().unwrap());
                            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                                Ok(Frame::data(Bytes::from(text))),
                                Ok(Frame::data(Bytes::from_static(b" and more"))),
                                Ok(Frame::trailers(trailer)),
                            ];
                            hyper::Response::builder()
                                .header("trailer", "x-checksum")
                                .header("x-app-hop", "1")
                                .header("connection", "x-app-hop")
                                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                                .unwrap()
                        } else {
                            hyper::Response::new(Full::new(Bytes::from(text)).boxed())
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// Sends `request`: the status, the body and the trailers.
async fn send(
    sender: &hyper::client::conn::http2::SendRequest<TestBody>,
    request: hyper::Request<TestBody>,
) -> (u16, String, Option<hyper::HeaderMap>, hyper::HeaderMap) {
    let mut sender = sender.clone();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    (status, body, trailers, headers)
}

/// The inbound request counter's series for `status`, which the proxy counts with `result`.
fn requests_series(status: u16, result: &str) -> String {
    format!(
        "sigil_proxy_requests_total{{direction=\"inbound\",service=\"\",route=\"\",peer_namespace=\"demo\",\
         peer_service_account=\"web\",status_class=\"{}xx\",status_code=\"{status}\",grpc_status=\"\",\
         result=\"{result}\"}}",
        status / 100
    )
}

#[tokio::test]
async fn http1_requests_carried_over_http2_reach_an_http1_app_over_few_reused_connections() {
    const REQUESTS: usize = 100;
    const CONCURRENCY: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let (app, accepted) = http1_only_app().await;
    // An HTTP policy: every request is decided on its own.
    let p = inbound(dir.path(), &[DENY_ADMIN], app, &[]).await;
    let h2 = p.h2().await;

    let started = Instant::now();
    let mut answers = Vec::new();
    for batch in 0..REQUESTS / CONCURRENCY {
        let sent = (0..CONCURRENCY).map(|i| {
            let body = if (batch + i) % 2 == 0 {
                full("0123456789")
            } else {
                streamed(&["01234", "56789"])
            };
            send(&h2, carried("/orders", body))
        });
        answers.extend(futures::future::join_all(sent).await);
    }
    let elapsed = started.elapsed();
    for (status, body, _, _) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(
            body.starts_with("HTTP/1.1 host=db.demo:8080 orig-proto=- te=trailers "),
            "{body}"
        );
        assert!(body.ends_with(" body=10"), "{body}");
    }
    // A body without a length reached the HTTP/1.1 application chunked.
    assert!(
        answers
            .iter()
            .any(|(_, body, _, _)| body.contains("transfer-encoding=chunked")),
        "{answers:?}"
    );
    let connections = accepted.load(Ordering::SeqCst);
    println!(
        "{REQUESTS} HTTP/1.1 requests over one HTTP/2 connection in {elapsed:?}: \
         {connections} application connections"
    );
    assert!(
        (1..=2 * CONCURRENCY).contains(&connections),
        "{connections} application connections for {REQUESTS} requests, {CONCURRENCY} at a time"
    );

    // Chunked response with a trailer, and the app's hop-by-hop headers stay on its hop.
    let (status, body, trailers, headers) =
        send(&h2, carried("/trailers", streamed(&["a", "b", "c"]))).await;
    assert_eq!(status, 200);
    assert!(body.ends_with("body=3 and more"), "{body}");
    assert_eq!(
        trailers.as_ref().and_then(|t| t.get("x-checksum")),
        Some(&hyper::header::HeaderValue::from_static("abc123")),
        "{trailers:?}"
    );
    assert!(!headers.contains_key("x-app-hop"), "{headers:?}");

    // Refused requests: 403 by the policy, 400 for a path that cannot be normalized.
    let (status, _, _, _) = send(&h2, carried("/admin", full(""))).await;
    assert_eq!(status, 403);
    let (status, _, _, _) = send(&h2, carried("/a%00b", full(""))).await;
    assert_eq!(status, 400);

    // The golden metrics: every request once, by status and by what the proxy did with it
    // (the refusals are its own answers, told from the application's by `result`).
    let proxy = &p.proxy;
    eventually("the requests counted by status and result", || async {
        proxy.metric(&requests_series(200, "allowed")).await == (REQUESTS + 1) as f64
            && proxy.metric(&requests_series(403, "denied")).await == 1.0
            && proxy.metric(&requests_series(400, "bad_request")).await == 1.0
    })
    .await;
    let peer = "direction=\"inbound\",service=\"\",route=\"\",peer_namespace=\"demo\",peer_service_account=\"web\"";
    assert_eq!(
        proxy
            .metric(&format!("sigil_proxy_request_body_bytes_total{{{peer}}}"))
            .await,
        (REQUESTS * 10 + 3) as f64
    );
    assert!(
        proxy
            .metric(&format!(
                "sigil_proxy_request_duration_seconds_count{{{peer},status_class=\"2xx\"}}"
            ))
            .await
            == (REQUESTS + 1) as f64
    );
    assert!(
        proxy
            .metric(&format!("sigil_proxy_response_body_bytes_total{{{peer}}}"))
            .await
            > 0.0
    );
    // Still one client connection: no reconnects behind the test's back.
    assert_eq!(
        proxy
            .metric("sigil_proxy_connections_opened_total{direction=\"inbound\",security=\"mtls\"}")
            .await,
        1.0
    );
    drop(p.host);
}

/// A WebSocket echo server from PyPI's `websockets` on `port`, as a child process.
fn websocket_server(dir: &Path, port: u16) -> Proc {
    let script = format!(
        "import asyncio\n\
         from websockets.asyncio.server import serve\n\
         async def echo(ws):\n\
         \x20   async for message in ws:\n\
         \x20       await ws.send('echo ' + message)\n\
         async def main():\n\
         \x20   async with serve(echo, '127.0.0.1', {port}) as server:\n\
         \x20       await server.serve_forever()\n\
         asyncio.run(main())\n"
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    Proc::spawn(cmd, dir.join("websocket-server.log"))
}

/// A `websockets` client: connects to `url`, sends `hello`, prints what came back, or the
/// HTTP status the handshake was refused with.
async fn websocket_client(url: &str) -> String {
    let script = "import asyncio, sys\n\
         from websockets.asyncio.client import connect\n\
         from websockets.exceptions import InvalidStatus\n\
         async def main():\n\
         \x20   try:\n\
         \x20       async with connect(sys.argv[1], open_timeout=5) as ws:\n\
         \x20           await ws.send('hello')\n\
         \x20           print(await asyncio.wait_for(ws.recv(), 5))\n\
         \x20   except InvalidStatus as e:\n\
         \x20       print('refused', e.response.status_code)\n\
         asyncio.run(main())\n";
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, url])
        .output()
        .await
        .expect("python3 runs (scripts/test installs websockets)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The WebSocket upgrade through the mesh with an HTTP (L7) AuthorizationPolicy in force: the
/// upgrade request is authorized, then relayed on an application connection of its own; the
/// policy's denied path refuses the handshake with 403.
#[tokio::test]
async fn a_websocket_passes_an_http_policy_and_a_denied_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = free_addr();
    let _server = websocket_server(dir.path(), app.port());
    eventually("the WebSocket server listening", || async {
        TcpStream::connect(app).await.is_ok()
    })
    .await;
    let policies = dir.path().join("policies.yaml");
    std::fs::write(&policies, DENY_ADMIN).unwrap();
    let ProxyPair {
        host: _host,
        web: _web,
        db,
        web_out,
        ..
    } = ProxyPair::start(
        dir.path(),
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db: DB_ID,
            db_args: &[],
            cert_ttl: "1h",
            agent_args: &["--policy-file", policies.to_str().unwrap()],
            app,
        },
    )
    .await;
    assert_eq!(
        websocket_client(&format!("ws://{web_out}/chat")).await,
        "echo hello"
    );
    assert_eq!(
        websocket_client(&format!("ws://{web_out}/admin")).await,
        "refused 403"
    );
    // Both decided per request, by the HTTP policy's rules.
    assert!(
        db.metric(
            "sigil_proxy_authz_decisions_total{decision=\"allow\",policy=\"default\",layer=\"l7\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        db.metric(
            "sigil_proxy_authz_decisions_total{decision=\"deny\",policy=\"demo/deny-admin\",layer=\"l7\"}"
        )
        .await
            >= 1.0
    );
}

/// A server-first application: writes a banner on accept, then echoes.
async fn banner_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 db ready\r\n").await;
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Reads the banner on a new mTLS connection to `listen`: how long it took after the handshake.
async fn banner_after(p: &Inbound, listen: SocketAddr) -> Duration {
    let mut tls = p.mtls(listen).await;
    let started = Instant::now();
    let mut banner = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut banner))
        .await
        .expect("the banner within 10 s")
        .unwrap();
    assert_eq!(&banner, b"220 db ready\r\n");
    started.elapsed()
}

/// Issue 14 item 2: a server-first protocol on a port in --opaque-ports greets its client at
/// once; on a port without a declared protocol it waits for the detection timeout, which is
/// counted.
#[tokio::test]
async fn a_server_first_app_on_an_opaque_port_speaks_without_waiting_for_detection() {
    const DETECT: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let app = banner_app().await;
    let detect = format!("{}ms", DETECT.as_millis());
    // The listener's port is the one the mode rules and --opaque-ports see: learn it first.
    let opaque_listen = free_addr();
    let opaque_port = opaque_listen.port().to_string();
    let p = inbound(dir.path(), &[], app, &["--detect-timeout", &detect]).await;
    let mut flags = args(&[
        "--explicit",
        "--agent-socket",
        p.host.socket.to_str().unwrap(),
        "--inbound-listen",
        &opaque_listen.to_string(),
        "--inbound-app",
        &app.to_string(),
        "--detect-timeout",
        &detect,
        "--opaque-ports",
    ]);
    flags.push(format!("1,{opaque_port}"));
    let opaque = spawn_proxy(dir.path(), "proxy-db-opaque", Some(DB_UID), &flags).await;

    let at_once = banner_after(&p, opaque_listen).await;
    let detected = banner_after(&p, p.listen).await;
    println!("banner: {at_once:?} on the opaque port, {detected:?} with detection ({DETECT:?})");
    assert!(
        at_once < DETECT / 4,
        "the opaque port's banner took {at_once:?}"
    );
    assert!(
        detected >= DETECT - Duration::from_millis(50),
        "the banner came before the detection timeout: {detected:?}"
    );
    let timeouts = "sigil_proxy_protocol_detect_timeouts_total{direction=\"inbound\"}";
    assert_eq!(p.proxy.metric(timeouts).await, 1.0);
    assert_eq!(opaque.metric(timeouts).await, 0.0);
    // Both then carry the bytes both ways.
    let mut tls = p.mtls(opaque_listen).await;
    let mut banner = [0u8; 14];
    tls.read_exact(&mut banner).await.unwrap();
    tls.write_all(b"PING\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    tls.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"PING\r\n");
}

/// deploy/examples/hpa-requests-per-second.yaml (its objects pass the API's schemas in
/// tests/e2e/deploy_manifests.rs) fits together and reads a metric the proxy serves: the
/// adapter's rule selects the proxy's request counter with the labels it has, and the autoscaler
/// asks for the metric the rule names.
#[test]
fn the_autoscaling_example_reads_the_proxys_request_counter() {
    use sigil_test_harness::manifests::{repo, yaml_file};
    let objects = yaml_file(&repo().join("deploy/examples/hpa-requests-per-second.yaml"));
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "HorizontalPodAutoscaler"]);
    let config =
        sigil_test_apiserver::parse_manifest(objects[0]["data"]["config.yaml"].as_str().unwrap())
            .unwrap();
    let rule = &config[0]["rules"][0];
    let hpa = &objects[1]["spec"];
    assert_eq!(
        hpa["metrics"][0]["pods"]["metric"]["name"],
        rule["name"]["as"]
    );
    assert_eq!(hpa["metrics"][0]["type"], "Pods");
    assert_eq!(hpa["scaleTargetRef"]["kind"], "Deployment");
    let series_query = rule["seriesQuery"].as_str().unwrap();
    assert!(
        series_query.starts_with("sigil_proxy_requests_total{direction=\"inbound\""),
        "{series_query}"
    );
    // The counter exists under that name, with a `direction` label, in the proxy's registry.
    use sigil_proxy::metrics::*;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.record_request(&RequestOutcome {
        peer: PeerLabels::new(Direction::Inbound, None, None),
        status: 200,
        grpc_status: None,
        result: "",
        duration: Duration::from_millis(1),
        request_bytes: 0,
        response_bytes: 0,
    });
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("sigil_proxy_requests_total{direction=\"inbound\","),
        "{text}"
    );
}

/// README's "Request metrics" section: every metric it names is one the proxy registers (with
/// the suffix Prometheus gives its type), and every PromQL example parses (`promtool check
/// rules`, Debian's prometheus package, which scripts/test installs).
#[test]
fn the_readme_request_metrics_name_real_metrics_and_their_promql_parses() {
    use sigil_test_harness::manifests::repo;
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("\n### Request metrics\n")
        .expect("README.md has a Request metrics section");
    let section = &readme[start + 1..];
    let section = &section[..section[4..]
        .find("\n### ")
        .map_or(section.len(), |end| end + 4)];

    // A sample in every family (empty ones are not printed).
    use sigil_proxy::metrics::*;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let peer = PeerLabels::new(Direction::Inbound, None, None);
    metrics.record_request(&RequestOutcome {
        peer,
        status: 200,
        grpc_status: None,
        result: "",
        duration: Duration::from_millis(1),
        request_bytes: 1,
        response_bytes: 1,
    });
    let service = || ServiceLabels {
        service: "shop/api".into(),
    };
    metrics
        .balancer_endpoints
        .get_or_create(&EndpointLabels {
            service: "shop/api".into(),
            state: "ready",
        })
        .set(1);
    metrics.balancer_pending.get_or_create(&service()).set(1);
    metrics.no_endpoints.get_or_create(&service()).inc();
    metrics
        .endpoint_ejections
        .get_or_create(&EjectionLabels {
            service: "shop/api".into(),
            reason: "consecutive",
        })
        .inc();
    metrics
        .endpoint_readmissions
        .get_or_create(&service())
        .inc();
    metrics
        .detect_timeouts
        .get_or_create(&DirectionLabels {
            direction: Direction::Inbound,
        })
        .inc();
    metrics
        .retries
        .get_or_create(&RetryLabels {
            service: "shop/api".into(),
            route: "shop/api".into(),
            outcome: sigil_proxy::outbound::RetryOutcome::Sent,
        })
        .inc();
    metrics
        .mirrored_requests
        .get_or_create(&MirrorLabels {
            service: "shop/api".into(),
            outcome: "sent",
        })
        .inc();
    metrics
        .rate_limited
        .get_or_create(&RateLimitedLabels {
            service: "shop/api".into(),
            policy: "shop/limit".into(),
            scope: "total",
        })
        .inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let registered = |name: &str| {
        ["_total", "_bucket", "_count", "_sum", ""]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| text.contains(&format!("# TYPE {base} ")))
            })
    };
    let names: std::collections::BTreeSet<&str> = section
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("sigil_proxy_"))
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        assert!(
            registered(name),
            "README names {name}, which the proxy does not serve"
        );
    }

    let block = section
        .split("```promql\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a promql block");
    // One query per line; indented lines continue the previous one.
    let mut queries: Vec<String> = Vec::new();
    for line in block.lines().filter(|l| !l.trim_start().starts_with('#')) {
        match queries.last_mut() {
            Some(query) if line.starts_with(' ') => query.push_str(line),
            _ => queries.push(line.to_owned()),
        }
    }
    assert!(queries.len() >= 5, "{queries:#?}");
    let rules: String = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                "  - record: readme:query_{i}\n    expr: '{}'\n",
                q.replace('\'', "''")
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("readme-rules.yaml");
    std::fs::write(&file, format!("groups:\n- name: readme\n  rules:\n{rules}")).unwrap();
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (scripts/test installs prometheus)");
    assert!(
        checked.status.success(),
        "{}{}\n{rules}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// An HTTP/2-only (h2c) application answering like a gRPC server: `grpc-status` in the
/// trailers, or (for `/trailers-only`) in the headers of a response without a body; the
/// version it saw in `x-app-version`.
async fn grpc_like_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                        let version = format!("{:?}", request.version());
                        let response = hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-app-version", version);
                        let response = if request.uri().path() == "/trailers-only" {
                            response
                                .header("grpc-status", "5")
                                .body(Full::new(Bytes::new()).boxed())
                        } else {
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                                Ok(Frame::trailers(trailers)),
                            ];
                            response.body(StreamBody::new(futures::stream::iter(frames)).boxed())
                        };
                        Ok::<_, std::convert::Infallible>(response.unwrap())
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Requests without `sigil-orig-proto` keep their version: gRPC (HTTP/2) reaches an h2c
/// application as HTTP/2 with its trailers, and the golden metrics take the gRPC status from
/// the trailers, or from the headers of a trailers-only response.
#[tokio::test]
async fn grpc_keeps_http2_and_is_counted_by_its_grpc_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = inbound(dir.path(), &[], grpc_like_app().await, &[]).await;
    let h2 = p.h2().await;
    let call = |path: &str| {
        hyper::Request::post(format!("http://api.shop:50051{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full("\0\0\0\0\x02hi"))
            .unwrap()
    };
    for _ in 0..3 {
        let (status, body, trailers, headers) = send(&h2, call("/shop.Api/Get")).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-app-version"], "HTTP/2.0");
        assert_eq!(body, "\0\0\0\0\x02hi");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }
    let (status, _, trailers, headers) = send(&h2, call("/trailers-only")).await;
    assert_eq!(
        (status, &headers["grpc-status"]),
        (200, &"5".parse::<hyper::header::HeaderValue>().unwrap())
    );
    assert!(trailers.is_none());

    let series = |grpc: &str| {
        format!(
            "sigil_proxy_requests_total{{direction=\"inbound\",service=\"\",route=\"\",peer_namespace=\"demo\",\
             peer_service_account=\"web\",status_class=\"2xx\",status_code=\"200\",grpc_status=\"{grpc}\",\
             result=\"allowed\"}}"
        )
    };
    let proxy = &p.proxy;
    eventually("the calls counted by gRPC status", || async {
        proxy.metric(&series("0")).await == 3.0 && proxy.metric(&series("5")).await == 1.0
    })
    .await;
}
