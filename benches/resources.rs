//! Resource benchmark (a program that prints numbers, not a test).
//!
//! Repeats the resource-exhaustion attacks of issue 11 against the `sigil` binary given as its
//! argument (so the same program measures an old build and a new one), each against a fresh
//! process, and prints that process's resident memory before the attack and its peak (VmHWM from
//! `/proc/<pid>/status`), next to half its memory limit in deploy/base, and how many calls a
//! legitimate client got answered while the attack was held:
//!
//! - 10a: 100 webhook connections (10 source addresses × 10) each sending all but the last byte
//!   of a 4 MiB AdmissionReview body; the API server (another address) posts a real review every
//!   250 ms;
//! - 10b: 20 gRPC connections × 100 streams, each holding all but the last byte of a 64 KiB
//!   request message, without credentials; an agent with its client certificate signs every
//!   250 ms, each time on a new connection;
//! - 11: 9,999 TLS connections to the gRPC port (40 source addresses) that never send the HTTP/2
//!   preface; the agent signs as in 10b;
//! - 12: 2,000 connections to the agent socket from one other process, each holding an
//!   unfinished 64 KiB header block; a workload fetches its SDS secret every 250 ms, each time on
//!   a new connection;
//! - 13: 300 plaintext connections (PERMISSIVE mTLS) to an inbound `sigil proxy run --explicit`
//!   with an HTTP policy, each sending half a request head and holding; a client (another
//!   address) GETs an allowed path every 250 ms, each time on a new connection. Also counts the
//!   connections the proxy opened to the application meanwhile. The proxy gets no flag beyond
//!   the old binary's, so both run with their defaults (what the injector deploys). The CA and
//!   agent are this build's.
//!
//! Run: `cargo bench --bench resources -- [path/to/sigil]` (default: this build's binary).
//! BENCH_ATTACKS=10a,10b,11,12,13 selects attacks; BENCH_HOLD_SECS=15 is how long each is held
//! after it is in place; BENCH_TLS_CONNECTIONS=9999.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_identity::TrustBundle;
use sigil_identity::tls::CertifiedKey;
use sigil_test_apiserver::TestApiServer;
use sigil_test_harness::load::env_or;
use sigil_test_harness::*;
use tokio::io::AsyncWriteExt;

const REVIEW: &str = include_str!("../tests/fixtures/admission/web-pod.review.json");
const WEBHOOK_NAME: &str = "sigil-ca.sigil-system.svc";
/// Half the memory limits in deploy/base (ca.yaml 512Mi, agent.yaml 256Mi), in MB.
const CA_BUDGET_MB: f64 = 256.0 * 1.048_576;
const AGENT_BUDGET_MB: f64 = 128.0 * 1.048_576;
/// Half the memory limit the injector gives the proxy sidecar (ca/src/inject.rs, 256Mi), in MB.
const PROXY_BUDGET_MB: f64 = 128.0 * 1.048_576;
const DENY_ADMIN: &str = include_str!("../tests/fixtures/deny-admin.yaml");

/// VmRSS and VmHWM of `pid`, in MB (10^6 bytes).
fn memory_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb * 1024.0 / 1e6)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One attack's outcome, as printed.
struct Row {
    attack: &'static str,
    process: &'static str,
    budget_mb: f64,
    before_mb: f64,
    peak_mb: f64,
    legit_ok: usize,
    legit_tried: usize,
    note: String,
}

/// Counts a legitimate client's calls: `call` every 250 ms until `stop`.
fn legit_loop<F, Fut>(stop: Arc<AtomicBool>, mut call: F) -> tokio::task::JoinHandle<(usize, usize)>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        let (mut ok, mut tried) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            tried += 1;
            if tokio::time::timeout(Duration::from_secs(5), call())
                .await
                .unwrap_or(false)
            {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (ok, tried)
    })
}

/// `sigil ca serve` from `binary` on fresh loopback ports, waited for until ready.
async fn start_ca(
    binary: &Path,
    dir: &Path,
    kubeconfig: Option<&Path>,
    extra: &[String],
) -> (Proc, SocketAddr, SocketAddr) {
    let (grpc, admin, webhook) = (free_addr(), free_addr(), free_addr());
    let mut cmd = Command::new(binary);
    cmd.args(["ca", "serve", "--listen", &grpc.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--webhook-addr", &webhook.to_string()])
        .args(["--server-name", "localhost"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("KUBECONFIG");
    if let Some(path) = kubeconfig {
        cmd.env("KUBECONFIG", path);
    }
    let ca = Proc::spawn(cmd, dir.join(format!("ca-{}.log", grpc.port())));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "CA never ready:\n{}", ca.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (ca, grpc, webhook)
}

/// The agent's legitimate call: a new connection, and a Sign of its own identity.
async fn agent_signs(grpc: SocketAddr, bundle: &TrustBundle, agent: &CertifiedKey) -> bool {
    let Ok(channel) =
        sigil_agent::ca_channel::connect(&grpc.to_string(), "localhost", bundle, Some(agent)).await
    else {
        return false;
    };
    let mut client =
        sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(
            channel,
        );
    let (_, csr) = key_and_csr();
    client.sign(sign_request(csr, 600, "", None)).await.is_ok()
}

/// Samples VmRSS while an attack is held, and VmHWM at the end.
async fn hold_and_measure(pid: u32) -> f64 {
    let hold = Duration::from_secs(env_or("BENCH_HOLD_SECS", 15u64));
    tokio::time::sleep(hold).await;
    memory_mb(pid).1
}

async fn webhook_bodies(binary: &Path, dir: &Path) -> Row {
    let server = TestApiServer::start().await;
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let (ca, _, webhook) = start_ca(
        binary,
        dir,
        Some(&kubeconfig),
        &args(&["--proxy-image", "registry.example/sigil:0.1.0"]),
    )
    .await;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(server.client(), "sigil-system");
    let roots = secrets.get("sigil-ca").await.unwrap().data.unwrap()["root-cert.pem"]
        .0
        .clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = ca.child.id();
    let before = memory_mb(pid).0;

    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_loop(stop.clone(), {
        let roots = roots.clone();
        move || {
            let roots = roots.clone();
            async move { post_review(webhook, &roots, REVIEW.as_bytes().to_vec()).await == Some(200) }
        }
    });
    let refused = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for source in 0..10u8 {
        for _ in 0..10 {
            let (roots, refused) = (roots.clone(), refused.clone());
            attackers.push(tokio::spawn(async move {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + source));
                let Ok(tcp) = tcp_from(ip, webhook).await else { return None };
                let Ok(mut tls) = tls_without_client_cert(tcp, WEBHOOK_NAME, &roots, &[]).await else { return None };
                let length = 4 << 20;
                let mut bytes = format!(
                    "POST /inject HTTP/1.1\r\nhost: {WEBHOOK_NAME}:443\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
                ).into_bytes();
                bytes.resize(bytes.len() + length - 1, b' ');
                if tls.write_all(&bytes).await.is_err() {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Some(tls)
            }));
        }
    }
    let peak = hold_and_measure(pid).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, tried) = legit.await.unwrap();
    drop(attackers);
    Row {
        attack: "10a webhook: 100 × 4 MiB bodies",
        process: "CA",
        budget_mb: CA_BUDGET_MB,
        before_mb: before,
        peak_mb: peak,
        legit_ok: ok,
        legit_tried: tried,
        note: format!(
            "{} bodies cut off while sent",
            refused.load(Ordering::Relaxed)
        ),
    }
}

/// POSTs an AdmissionReview to the webhook as the API server does; its status.
async fn post_review(addr: SocketAddr, roots: &[u8], body: Vec<u8>) -> Option<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tls_without_client_cert(tcp, WEBHOOK_NAME, roots, &[])
        .await
        .ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .ok()?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/inject?timeout=10s")
        .header("host", format!("{WEBHOOK_NAME}:443"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// An offline CA (state directory, client-certificate auth) and its agent's credential.
async fn offline_ca(
    binary: &Path,
    dir: &Path,
) -> (Proc, SocketAddr, TrustBundle, CertifiedKey, Vec<u8>) {
    let offline = OfflineCa::init(dir, &[WEB_ID]);
    let (ca, grpc, _) = start_ca(binary, dir, None, &offline.serve_args()).await;
    let bundle = state_dir_bundle(&offline.state);
    let agent = offline.issue(AGENT_ID, &dir.join("agent"));
    let roots = std::fs::read(offline.state.join("root-cert.pem")).unwrap();
    (ca, grpc, bundle, agent, roots)
}

async fn grpc_streams(binary: &Path, dir: &Path) -> Row {
    let (ca, grpc, bundle, agent, roots) = offline_ca(binary, dir).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = ca.child.id();
    let before = memory_mb(pid).0;
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_loop(stop.clone(), {
        let (bundle, agent) = (bundle.clone(), agent.clone());
        move || {
            let (bundle, agent) = (bundle.clone(), agent.clone());
            async move { agent_signs(grpc, &bundle, &agent).await }
        }
    });
    let answered = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..20 {
        let Ok(tcp) = tcp_from("127.0.0.3".parse().unwrap(), grpc).await else {
            continue;
        };
        let Ok(tls) = tls_without_client_cert(tcp, "localhost", &roots, &[b"h2"]).await else {
            continue;
        };
        let Ok((sender, connection)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await
        else {
            continue;
        };
        tokio::spawn(connection);
        for _ in 0..100 {
            let (tx, rx) =
                futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
            let mut message = vec![0u8, 0, 1, 0, 0];
            message.resize(5 + 65_535, 0);
            let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(message))));
            let request =
                hyper::Request::post("https://localhost/sigil.ca.v1.CertificateAuthority/Sign")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(StreamBody::new(rx))
                    .unwrap();
            let (mut sender, answered) = (sender.clone(), answered.clone());
            held.push(tokio::spawn(async move {
                if sender.ready().await.is_ok() && sender.send_request(request).await.is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                tx
            }));
        }
    }
    let peak = hold_and_measure(pid).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, tried) = legit.await.unwrap();
    drop(held);
    Row {
        attack: "10b gRPC: 20 conn × 100 unfinished 64 KiB",
        process: "CA",
        budget_mb: CA_BUDGET_MB,
        before_mb: before,
        peak_mb: peak,
        legit_ok: ok,
        legit_tried: tried,
        note: format!(
            "{} of 2,000 streams answered before their message was complete",
            answered.load(Ordering::Relaxed)
        ),
    }
}

async fn tls_without_preface(binary: &Path, dir: &Path) -> Row {
    let (ca, grpc, bundle, agent, roots) = offline_ca(binary, dir).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = ca.child.id();
    let before = memory_mb(pid).0;
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_loop(stop.clone(), {
        let (bundle, agent) = (bundle.clone(), agent.clone());
        move || {
            let (bundle, agent) = (bundle.clone(), agent.clone());
            async move { agent_signs(grpc, &bundle, &agent).await }
        }
    });
    let total = env_or("BENCH_TLS_CONNECTIONS", 9_999usize);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(256));
    let established = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..total {
        let permit = handshakes.clone().acquire_owned().await.unwrap();
        let (roots, established) = (roots.clone(), established.clone());
        held.push(tokio::spawn(async move {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % 40) as u8));
            let tcp = tcp_from(ip, grpc).await.ok()?;
            let tls = tls_without_client_cert(tcp, "localhost", &roots, &[b"h2"])
                .await
                .ok();
            drop(permit);
            if tls.is_some() {
                established.fetch_add(1, Ordering::Relaxed);
            }
            tls
        }));
    }
    let opening = started.elapsed();
    let peak = hold_and_measure(pid).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, tried) = legit.await.unwrap();
    drop(held);
    Row {
        attack: "11 TLS: 9,999 conn, no preface",
        process: "CA",
        budget_mb: CA_BUDGET_MB,
        before_mb: before,
        peak_mb: peak,
        legit_ok: ok,
        legit_tried: tried,
        note: format!(
            "{} of {total} handshakes completed (opened in {:.0} s)",
            established.load(Ordering::Relaxed),
            opening.as_secs_f64()
        ),
    }
}

/// The attacking process of 12: `count` connections to `socket`, each with an unfinished
/// 64 KiB header block, held until its stdin closes.
const HEADER_FLOOD: &str = r#"
import socket, struct, sys
path, count = sys.argv[1], int(sys.argv[2])
def frame(length, kind):
    return struct.pack(">I", length)[1:] + bytes([kind, 0]) + struct.pack(">I", 1)
block = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
for i in range(4):
    block += frame(16384, 1 if i == 0 else 9) + b"\x40" * 16384
held, refused = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.settimeout(2)
        s.sendall(block)
        held.append(s)
    except OSError:
        refused += 1
print(f"{len(held)} {refused}", flush=True)
sys.stdin.read()
"#;

async fn agent_headers(binary: &Path, dir: &Path) -> Row {
    let offline = OfflineCa::init(dir, &[WEB_ID]);
    let (_ca, grpc, _) = start_ca(
        binary,
        dir,
        None,
        &[offline.serve_args(), args(&["--max-ttl", "24h"])].concat(),
    )
    .await;
    let agent_cert = dir.join("agent-cert");
    offline.issue(AGENT_ID, &agent_cert);
    let map = dir.join("workloads.yaml");
    std::fs::write(&map, format!("workloads:\n- {{uid: 0, id: {WEB_ID}}}\n")).unwrap();
    let socket = dir.join("agent.sock");
    let admin = free_addr();
    let agent_args = unix_agent_args(grpc, &offline, &agent_cert, &map, &socket, admin, "1h");
    let mut cmd = Command::new(binary);
    cmd.args(&agent_args).env("RUST_LOG", "warn");
    let agent = Proc::spawn(cmd, dir.join("agent.log"));
    wait_agent_ready(&agent, admin, "").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = agent.child.id();
    let before = memory_mb(pid).0;

    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_loop(stop.clone(), {
        let socket = socket.clone();
        move || {
            let socket = socket.clone();
            async move { fetch_secret(&socket).await }
        }
    });
    let mut flood = tokio::process::Command::new("python3")
        .args(["-c", HEADER_FLOOD])
        .arg(&socket)
        .arg("2000")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(flood.stdout.take().unwrap()),
        &mut line,
    )
    .await
    .unwrap();
    let peak = hold_and_measure(pid).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, tried) = legit.await.unwrap();
    drop(flood);
    let mut counts = line.split_whitespace();
    Row {
        attack: "12 agent: 2,000 × unfinished 64 KiB header",
        process: "agent",
        budget_mb: AGENT_BUDGET_MB,
        before_mb: before,
        peak_mb: peak,
        legit_ok: ok,
        legit_tried: tried,
        note: format!(
            "{} connections sent their block, {} refused while sending",
            counts.next().unwrap_or("?"),
            counts.next().unwrap_or("?")
        ),
    }
}

/// An HTTP/1.1 application answering `200 ok`, counting the connections that reach it.
async fn counting_http_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve_keep_alive(
                stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                |_| {},
            ));
        }
    });
    (addr, reached)
}

async fn proxy_slowloris(binary: &Path, dir: &Path) -> Row {
    let policies = dir.join("policies.yaml");
    std::fs::write(&policies, DENY_ADMIN).unwrap();
    // The proxy runs as this process's uid (root in the benchmark's setting), attested as db.
    let host = MeshHost::start(
        dir,
        &[(0, DB_ID)],
        "1h",
        &["--policy-file", policies.to_str().unwrap()],
    )
    .await;
    let (app, reached) = counting_http_app().await;
    let inbound = free_addr();
    let proxy = spawn_proxy_from(
        binary,
        dir,
        "proxy-db",
        None,
        &args(&[
            "--explicit",
            "--agent-socket",
            host.socket.to_str().unwrap(),
            "--inbound-listen",
            &inbound.to_string(),
            "--inbound-app",
            &app.to_string(),
            "--mtls-mode",
            "PERMISSIVE",
        ]),
    )
    .await;
    let mut probe = tcp_from("127.0.0.2".parse().unwrap(), inbound)
        .await
        .unwrap();
    assert_eq!(
        get_on(&mut probe, "/public").await,
        Some((200, "ok".into())),
        "the proxy does not serve:\n{}",
        proxy.logs()
    );
    drop(probe);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = proxy.proc.child.id();
    let before = memory_mb(pid).0;
    let app_before = reached.load(Ordering::Relaxed);

    let stop = Arc::new(AtomicBool::new(false));
    let legit = legit_loop(stop.clone(), move || async move {
        let Ok(mut stream) = tcp_from("127.0.0.2".parse().unwrap(), inbound).await else {
            return false;
        };
        get_on(&mut stream, "/public").await == Some((200, "ok".into()))
    });
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let sent = async {
            let mut stream = tcp_from("127.0.0.20".parse().unwrap(), inbound).await?;
            stream
                .write_all(b"GET /public HTTP/1.1\r\nHost: db\r\nX-Slow: ")
                .await?;
            Ok::<_, std::io::Error>(stream)
        };
        match sent.await {
            Ok(stream) => held.push(stream),
            Err(_) => refused += 1,
        }
    }
    let peak = hold_and_measure(pid).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, tried) = legit.await.unwrap();
    let app_connections = reached.load(Ordering::Relaxed) - app_before;
    drop(held);
    Row {
        attack: "13 proxy: 300 × half a request head",
        process: "proxy",
        budget_mb: PROXY_BUDGET_MB,
        before_mb: before,
        peak_mb: peak,
        legit_ok: ok,
        legit_tried: tried,
        note: format!(
            "{app_connections} app connections opened during the attack ({tried} legitimate requests, {refused} attack connections refused)"
        ),
    }
}

/// A workload's legitimate call: a new connection to the agent socket, and FetchSecrets.
async fn fetch_secret(socket: &Path) -> bool {
    let socket = socket.to_path_buf();
    let Ok(channel) = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
    else {
        return false;
    };
    SecretDiscoveryServiceClient::new(channel)
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: sigil_proxy_api::sds::TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .is_ok_and(|r| !r.into_inner().resources.is_empty())
}

#[tokio::main]
async fn main() {
    let binary: PathBuf = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or_else(|| PathBuf::from(sigil_exe()), PathBuf::from);
    let attacks = std::env::var("BENCH_ATTACKS").unwrap_or_else(|_| "10a,10b,11,12,13".into());
    println!(
        "Resource benchmark: {} (hold {} s per attack, {} cores)",
        binary.display(),
        env_or("BENCH_HOLD_SECS", 15u64),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let counter = AtomicU64::new(0);
    let mut rows = Vec::new();
    for attack in attacks.split(',') {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(format!(
            "{attack}-{}",
            counter.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let row = match attack {
            "10a" => webhook_bodies(&binary, &dir).await,
            "10b" => grpc_streams(&binary, &dir).await,
            "11" => tls_without_preface(&binary, &dir).await,
            "12" => agent_headers(&binary, &dir).await,
            "13" => proxy_slowloris(&binary, &dir).await,
            other => panic!("unknown attack {other:?} (10a, 10b, 11, 12, 13)"),
        };
        println!(
            "{:<44} {:<6} before {:>6.1} MB  peak {:>6.1} MB  (half its limit: {:>5.1} MB)  legitimate calls ok {}/{}  — {}",
            row.attack,
            row.process,
            row.before_mb,
            row.peak_mb,
            row.budget_mb,
            row.legit_ok,
            row.legit_tried,
            row.note
        );
        rows.push(row);
    }
    let over: Vec<&str> = rows
        .iter()
        .filter(|r| r.peak_mb > r.budget_mb)
        .map(|r| r.attack)
        .collect();
    println!(
        "=> over half the memory limit: {}",
        if over.is_empty() {
            "none".into()
        } else {
            over.join(", ")
        }
    );
}
