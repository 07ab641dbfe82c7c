//! Node agent benchmark (a program that prints numbers, not a test).
//!
//! Runs the real `sigil agent run` and `sigil ca serve` binaries and measures, over the agent's
//! Unix socket with Envoy's SDS protocol (StreamSecrets):
//!
//! 1. the time from a new stream's first request to its `default` secret, for an identity the
//!    agent does not hold yet (attestation, key generation, CSR and the CA round trip) and for
//!    one it holds (cache hit). Each sample is a separate client process running as its own uid,
//!    which the agent's unix attestor maps to its own SPIFFE ID (so this needs root);
//! 2. how one certificate rotation fans out to 1,000 open, ACKing streams of one identity, with
//!    one connection per stream and with 100 streams per connection, dated from the CA's audit
//!    line and the agent's log line for the renewed serial;
//! 3. the agent's memory: idle, with those 1,000 streams, and (Kubernetes attestor, against the
//!    in-repo API test double) with 1,000 identities prefetched for 1,000 pods on its node.
//!
//! The clients run on the same 2 cores as the agent and the CA, so delivery spreads include the
//! clients' own decoding and ACKs; the agent's CPU per push is read from /proc to separate them.
//!
//! Run: `cargo bench --bench agent_sds` (BENCH_SAMPLES=50 and BENCH_STREAMS=1000 by default).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use futures::StreamExt;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use sigil_test_apiserver::{PodSpec, TestApiServer, TokenSpec};
use sigil_test_harness::load::env_or;
use sigil_test_harness::{CaProcess, cpu_seconds, free_addr, http_get, metric, sigil_exe};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const AGENT_ID: &str = "spiffe://cluster.local/ns/sigil-system/sa/sigil-agent";
/// The identity the bench process itself (its uid) is attested as: the fan-out streams.
const FANOUT_ID: &str = "spiffe://cluster.local/ns/bench/sa/fanout";
/// Uids of the client processes of item 1; the first one warms up and is not counted.
const FIRST_UID: u32 = 42000;
/// Set in a client process of item 1: the agent socket; the process then only runs the client.
const CLIENT_SOCKET_ENV: &str = "SIGIL_BENCH_SDS_SOCKET";
/// The SPIFFE ID the client process must receive.
const CLIENT_EXPECT_ENV: &str = "SIGIL_BENCH_SDS_EXPECT";
const FANOUT_TTL: &str = "6s";

fn bench_id(index: u32) -> String {
    format!("spiffe://cluster.local/ns/bench/sa/w-{index}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p` quantile of `samples` (sorted here), nearest rank.
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).saturating_sub(1);
    samples
        .get(i.min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn sigil(args: &[&str]) {
    let out = Command::new(sigil_exe()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sigil {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resident and peak resident memory of a process, from /proc.
#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}

/// A `sigil agent run` child process; killed on drop. Logs (JSON lines) go to `log`.
struct Agent {
    child: Child,
    admin: SocketAddr,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts an agent with `args` added to the socket, admin and CA flags.
    fn start(
        dir: &Path,
        name: &str,
        ca: &CaProcess,
        bundle: &Path,
        args: &[OsString],
        kubeconfig: Option<&Path>,
    ) -> Agent {
        let socket = dir.join(format!("{name}-run")).join("agent.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        // The client processes of item 1 run as other uids and must reach the socket.
        std::fs::set_permissions(
            socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let admin = free_addr();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(sigil_exe());
        cmd.args(["agent", "run", "--ca", &ca.grpc.to_string()])
            .args(["--ca-name", "localhost", "--admin-addr", &admin.to_string()])
            .arg("--ca-bundle")
            .arg(bundle)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            // Renewals are logged at debug with their serial: item 2 dates the rotation by it.
            .env("RUST_LOG", "info,sigil_agent::certs=debug")
            .env_remove("KUBECONFIG")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        if let Some(path) = kubeconfig {
            cmd.env("KUBECONFIG", path);
        }
        Agent {
            child: cmd.spawn().expect("spawning sigil agent run"),
            admin,
            socket,
            log,
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited early ({status}):\n{}", self.logs());
            }
            if let Ok((200, _)) = http_get(self.admin, "/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent never became ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn memory(&self) -> Memory {
        Memory::of(self.child.id())
    }

    async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// When the agent published the certificate with `serial` (its debug "certificate issued").
    fn issued_at(&self, serial: &str) -> Option<SystemTime> {
        log_time(&self.logs(), |line| {
            line["message"] == "certificate issued" && same_serial(&line["serial"], serial)
        })
    }
}

fn same_serial(value: &serde_json::Value, serial: &str) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.trim_start_matches('0') == serial.trim_start_matches('0'))
}

/// The timestamp of the first JSON log line matching `wanted`.
fn log_time(logs: &str, wanted: impl Fn(&serde_json::Value) -> bool) -> Option<SystemTime> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|line| wanted(line))
        .and_then(|line| {
            time::OffsetDateTime::parse(
                line["timestamp"].as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
        })
        .map(SystemTime::from)
}

type SdsClient = SecretDiscoveryServiceClient<Channel>;

/// One HTTP/2 connection to the agent socket, as one Envoy holds it.
async fn sds_client(socket: &Path) -> Result<SdsClient, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

fn sds_request(version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec!["default".into()],
        type_url: TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// A new StreamSecrets stream asking for `default`: the request is queued before the call, as
/// Envoy sends it with the stream's headers.
async fn open_stream(
    client: &mut SdsClient,
) -> Result<
    (
        UnboundedSender<DiscoveryRequest>,
        Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let (requests, rx) = unbounded();
    requests
        .unbounded_send(sds_request("", ""))
        .expect("receiver held");
    let responses = client.stream_secrets(rx).await?.into_inner();
    Ok((requests, responses))
}

/// The leaf certificate (DER) in a response's `default` secret.
fn leaf_of(response: &DiscoveryResponse) -> Result<Vec<u8>, String> {
    let any = response.resources.first().ok_or("no resources")?;
    let secret: Secret = prost_types::Any {
        type_url: any.type_url.clone(),
        value: any.value.clone(),
    }
    .to_msg()
    .map_err(|e| format!("decoding the secret: {e}"))?;
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        return Err("not a TLS certificate".into());
    };
    let chain = match tls.certificate_chain.and_then(|c| c.specifier) {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        _ => return Err("no inline certificate chain".into()),
    };
    let blocks = pem::parse_many(chain).map_err(|e| e.to_string())?;
    Ok(blocks.first().ok_or("empty chain")?.contents().to_vec())
}

/// The client process of item 1: on one connection, a stream for an identity the agent does not
/// hold yet, then (the first still open) a second one, answered from the agent's cache. Prints
/// both times in nanoseconds.
fn client_process(socket: PathBuf, expect: String) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = async {
        let mut client = sds_client(&socket).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let (_first_requests, mut first) =
            open_stream(&mut client).await.map_err(|e| e.to_string())?;
        let new = first.message().await.map_err(|e| e.to_string())?;
        let new_took = started.elapsed();
        let new = new.ok_or("the first stream ended")?;
        let id =
            sigil_identity::profile::leaf_spiffe_id(&leaf_of(&new)?).map_err(|e| e.to_string())?;
        if id.to_string() != expect {
            return Err(format!("got {id}, expected {expect}"));
        }
        let started = Instant::now();
        let (_second_requests, mut second) =
            open_stream(&mut client).await.map_err(|e| e.to_string())?;
        let held = second.message().await.map_err(|e| e.to_string())?;
        let held_took = started.elapsed();
        if held.ok_or("the second stream ended")?.version_info != new.version_info {
            return Err("the second stream got another certificate".into());
        }
        Ok::<_, String>((new_took, held_took))
    };
    match runtime.block_on(async { tokio::time::timeout(Duration::from_secs(20), run).await }) {
        Ok(Ok((new, held))) => {
            println!("{} {}", new.as_nanos(), held.as_nanos());
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("SDS client: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("SDS client: timed out");
            std::process::ExitCode::FAILURE
        }
    }
}

/// This executable, copied where the unprivileged client uids can run it.
fn client_executable(dir: &Path) -> PathBuf {
    let target = dir.join("agent_sds_client");
    std::fs::copy(std::env::current_exe().unwrap(), &target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    target
}

/// Runs one client process as `uid`: (time to a new identity's secret, time to a held one's).
async fn run_client(exe: &Path, socket: &Path, uid: u32) -> (Duration, Duration) {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env(CLIENT_SOCKET_ENV, socket)
        .env(CLIENT_EXPECT_ENV, bench_id(uid - FIRST_UID))
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("client process timed out")
        .expect("spawning the client process");
    assert!(
        out.status.success(),
        "client uid {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut numbers = text
        .split_whitespace()
        .map(|n| Duration::from_nanos(n.parse().unwrap()));
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Item 1: first secret for a new identity vs a held one, `samples` client processes in turn.
async fn first_secret(agent: &Agent, exe: &Path, samples: u32) {
    // Warm-up (page cache, the agent's CA connection), not counted.
    run_client(exe, &agent.socket, FIRST_UID).await;
    let before = agent.metrics().await;
    let (mut new, mut held) = (Vec::new(), Vec::new());
    for i in 1..=samples {
        let (n, h) = run_client(exe, &agent.socket, FIRST_UID + i).await;
        new.push(n);
        held.push(h);
    }
    let after = agent.metrics().await;
    let csr_sum = metric(&after, "sigil_agent_csr_duration_seconds_sum")
        - metric(&before, "sigil_agent_csr_duration_seconds_sum");
    let csr_count = metric(&after, "sigil_agent_csr_duration_seconds_count")
        - metric(&before, "sigil_agent_csr_duration_seconds_count");

    println!(
        "\n1. first SDS request → `default` secret ({samples} client processes, each its own uid and identity, one at a time)"
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8}",
        "case", "p50 ms", "p99 ms", "max ms"
    );
    for (label, samples) in [
        ("new identity (attest+key+CSR+CA)", &mut new),
        ("identity already held (cache hit)", &mut held),
    ] {
        println!(
            "{:<44} {:>8.2} {:>8.2} {:>8.2}",
            label,
            ms(percentile(samples, 0.50)),
            ms(percentile(samples, 0.99)),
            ms(percentile(samples, 1.0)),
        );
    }
    let (keygen, csr) = key_and_csr_cost();
    println!(
        "breakdown: agent→CA Sign round trip {:.2} ms mean over {csr_count:.0} signs (agent's csr_duration); P-256 key generation {:.3} ms, CSR {:.3} ms (one core, in-process)",
        1000.0 * csr_sum / csr_count.max(1.0),
        ms(keygen),
        ms(csr)
    );
}

/// Single-core cost of what the agent does before the CA round trip: a P-256 key and its CSR.
fn key_and_csr_cost() -> (Duration, Duration) {
    let rounds = 200;
    let started = Instant::now();
    let keys: Vec<_> = (0..rounds)
        .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .collect();
    let keygen = started.elapsed() / rounds;
    let started = Instant::now();
    for key in &keys {
        sigil_identity::csr::build_csr(key).unwrap();
    }
    (keygen, started.elapsed() / rounds)
}

/// One response received on one fan-out stream.
struct Receipt {
    stream: usize,
    at: SystemTime,
    response: DiscoveryResponse,
}

/// One fan-out stream: ACKs every response (as Envoy does) and reports when each arrived.
async fn hold_stream(
    stream: usize,
    mut client: SdsClient,
    receipts: mpsc::UnboundedSender<Receipt>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let (requests, mut responses) = open_stream(&mut client).await.map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            message = responses.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Err("stream ended".into()),
                    Err(status) => return Err(status.to_string()),
                };
                let at = SystemTime::now();
                let _ = requests.unbounded_send(sds_request(&response.version_info, &response.nonce));
                let _ = receipts.send(Receipt { stream, at, response });
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// What one rotation's delivery to every stream looked like.
struct FanOut {
    connections: usize,
    streams_rss: Memory,
    delivered: usize,
    ca_to_agent: Option<Duration>,
    agent_to_first: Option<Duration>,
    agent_to_last: Option<Duration>,
    /// Agent CPU from "every stream served" to the end of the rotation, per stream.
    cpu_per_push: Duration,
    /// Each stream's arrival after the first stream's.
    spread: Vec<Duration>,
}

/// Item 2: `streams` streams for one identity, `per_connection` on each HTTP/2 connection (one
/// connection per Envoy, which opens a stream per secret name on it); waits for the first
/// rotation after all have their first certificate and times its delivery.
async fn fan_out(agent: &Agent, ca: &CaProcess, streams: usize, per_connection: usize) -> FanOut {
    let connections = streams.div_ceil(per_connection);
    let clients: Vec<SdsClient> = futures::stream::iter(0..connections)
        .map(|_| sds_client(&agent.socket))
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("connecting to the agent socket");
    let (receipts_tx, mut receipts) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let client = clients[i % connections].clone();
            tokio::spawn(hold_stream(i, client, receipts_tx.clone(), stop_rx.clone()))
        })
        .collect();
    drop(receipts_tx);

    // Every stream's first certificate.
    let mut first_version: HashMap<usize, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while first_version.len() < streams {
        let receipt = tokio::time::timeout_at(deadline, receipts.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {streams} streams got a certificate:\n{}",
                    first_version.len(),
                    agent.logs()
                )
            })
            .expect("all streams ended");
        first_version
            .entry(receipt.stream)
            .or_insert(receipt.response.version_info);
    }
    let streams_rss = agent.memory();
    let cpu_before = cpu_seconds(agent.child.id());

    // The first version no stream started with is the rotation to time; all its receipts.
    let mut rotation: Option<(String, DiscoveryResponse)> = None;
    let mut arrivals: Vec<SystemTime> = Vec::new();
    let old_versions: HashSet<String> = first_version.into_values().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while arrivals.len() < streams {
        let Ok(Some(receipt)) = tokio::time::timeout_at(deadline, receipts.recv()).await else {
            break;
        };
        let version = &receipt.response.version_info;
        match &rotation {
            None if !old_versions.contains(version) => {
                arrivals.push(receipt.at);
                rotation = Some((version.clone(), receipt.response));
            }
            Some((v, _)) if v == version => arrivals.push(receipt.at),
            _ => {}
        }
    }
    let cpu = cpu_seconds(agent.child.id()) - cpu_before;
    let _ = stop_tx.send(true);
    for task in tasks {
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stream task did not stop")
        {
            eprintln!("a fan-out stream failed: {e}");
        }
    }

    let (_, response) = rotation.expect("no rotation within 15 s");
    let serial = sigil_identity::profile::inspect_cert(&leaf_of(&response).unwrap())
        .unwrap()
        .serial_hex;
    let first = arrivals.iter().min().copied().unwrap();
    let last = arrivals.iter().max().copied().unwrap();
    let published = agent.issued_at(&serial);
    let signed = log_time(&ca.logs(), |line| {
        line["target"] == "sigil_audit" && same_serial(&line["serial"], &serial)
    });
    let since = |later: SystemTime, earlier: Option<SystemTime>| {
        earlier.and_then(|e| later.duration_since(e).ok())
    };
    FanOut {
        connections,
        streams_rss,
        delivered: arrivals.len(),
        ca_to_agent: published.and_then(|p| since(p, signed)),
        agent_to_first: since(first, published),
        agent_to_last: since(last, published),
        cpu_per_push: Duration::from_secs_f64(cpu / streams as f64),
        spread: arrivals
            .iter()
            .map(|a| a.duration_since(first).unwrap_or_default())
            .collect(),
    }
}

fn print_fan_out(streams: usize, runs: &mut [FanOut]) {
    let show = |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.1}", ms(d)));
    println!(
        "\n2. one rotation fanned out to {streams} SDS streams of one identity (cert TTL {FANOUT_TTL}, every response ACKed)"
    );
    println!(
        "{:<24} {:>9} {:>8} {:>8} {:>8} | {:>7} {:>7} {:>7} | {:>8}",
        "layout", "delivered", "CA→agent", "→first", "→last", "p50", "p99", "max", "CPU/push"
    );
    for f in runs {
        println!(
            "{:<24} {:>9} {:>8} {:>8} {:>8} | {:>7.1} {:>7.1} {:>7.1} | {:>6.0}µs",
            format!("{} conn × {}", f.connections, streams / f.connections),
            format!("{}/{streams}", f.delivered),
            show(f.ca_to_agent),
            show(f.agent_to_first),
            show(f.agent_to_last),
            ms(percentile(&mut f.spread, 0.50)),
            ms(percentile(&mut f.spread, 0.99)),
            ms(percentile(&mut f.spread, 1.0)),
            f.cpu_per_push.as_secs_f64() * 1e6,
        );
    }
    println!(
        "(ms. CA→agent: the CA's audit line for the renewed serial to the agent's \"certificate issued\" line; →first/→last: from that line to the first/last stream receiving it; p50/p99/max: each stream's arrival after the first stream's; CPU/push: agent CPU over the rotation ÷ streams, /proc has 10 ms resolution)"
    );
}

/// The unix-attestor agent of items 1 and 2, with its CA (client-certificate auth).
struct UnixSetup {
    ca: CaProcess,
    bundle: PathBuf,
    agent_args: Vec<OsString>,
}

async fn unix_setup(dir: &Path, samples: u32) -> UnixSetup {
    let state = dir.join("state");
    sigil(&["ca", "init", "--state-dir", state.to_str().unwrap()]);
    let ids: Vec<String> = (0..=samples).map(bench_id).collect();
    std::fs::write(
        dir.join("entries.yaml"),
        format!(
            "agents:\n- id: {AGENT_ID}\n  may_issue: [{FANOUT_ID}, {}]\n",
            ids.join(", ")
        ),
    )
    .unwrap();
    let mut ca = CaProcess::start(
        dir,
        None,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--auth",
            "certs",
            "--static-entries",
            dir.join("entries.yaml").to_str().unwrap(),
            // One agent signs for every identity here: the agent is measured, not the CA's
            // per-caller budget (500 a second by default).
            "--max-signs-per-caller",
            "0",
        ],
    );
    ca.wait_ready().await;
    let agent_cert = dir.join("agent-cert");
    sigil(&[
        "ca",
        "issue",
        "--state-dir",
        state.to_str().unwrap(),
        "--id",
        AGENT_ID,
        "--ttl",
        "1h",
        "--out-dir",
        agent_cert.to_str().unwrap(),
    ]);
    let own_uid = std::fs::metadata("/proc/self").unwrap().uid();
    let mut map = format!("workloads:\n- {{uid: {own_uid}, id: {FANOUT_ID}}}\n");
    for i in 0..=samples {
        map.push_str(&format!(
            "- {{uid: {}, id: {}}}\n",
            FIRST_UID + i,
            bench_id(i)
        ));
    }
    std::fs::write(dir.join("workloads.yaml"), map).unwrap();
    let agent_args = [
        "--attestor".into(),
        "unix".into(),
        "--unix-map".into(),
        dir.join("workloads.yaml").into_os_string(),
        "--client-cert".into(),
        agent_cert.join("cert.pem").into_os_string(),
        "--client-key".into(),
        agent_cert.join("key.pem").into_os_string(),
        // This one process plays 1,000 Envoys, with up to a connection each.
        "--max-connections-per-process".into(),
        "2000".into(),
    ]
    .to_vec();
    UnixSetup {
        ca,
        bundle: state.join("root-cert.pem"),
        agent_args,
    }
}

/// Item 3's results.
struct Prefetch {
    idle: Memory,
    full: Memory,
    /// Adding the pods to the API test double.
    pods_added: Duration,
    /// From the first pod added to every identity's certificate held.
    all_issued: Duration,
    /// The agent's mean Sign round trip while prefetching.
    mean_sign: Duration,
}

/// Item 3: the Kubernetes attestor with `pods` pods (each its own service account) on its node.
async fn kubernetes_memory(dir: &Path, pods: usize) -> Prefetch {
    let server = TestApiServer::start().await;
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let agent_pod = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-x",
        "sigil-agent",
        "node-a",
    ));
    let mut ca = CaProcess::start(
        dir,
        Some(&kubeconfig),
        // The agent's 1,000 identities at once, beyond the default per-caller budget (500).
        &[
            "--auth",
            "tokenreview",
            "--no-root-configmaps",
            "--max-signs-per-caller",
            "0",
        ],
    );
    ca.wait_ready().await;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(server.client(), "sigil-system");
    let root = secrets.get("sigil-ca").await.unwrap().data.unwrap()["root-cert.pem"]
        .0
        .clone();
    let bundle = dir.join("k8s-root-cert.pem");
    std::fs::write(&bundle, root).unwrap();
    let token = dir.join("token");
    std::fs::write(
        &token,
        server.issue_token(&TokenSpec::for_pod(&agent_pod, "sigil-ca")),
    )
    .unwrap();
    let args: Vec<OsString> = [
        "--attestor".into(),
        "k8s".into(),
        "--node-name".into(),
        "node-a".into(),
        "--token-file".into(),
        token.into_os_string(),
        "--cert-ttl".into(),
        "1h".into(),
    ]
    .to_vec();
    let mut agent = Agent::start(dir, "agent-k8s", &ca, &bundle, &args, Some(&kubeconfig));
    agent.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = agent.memory();

    let started = Instant::now();
    for i in 0..pods {
        server.add_pod(&PodSpec::new(
            "bench",
            &format!("pod-{i}"),
            &format!("sa-{i}"),
            "node-a",
        ));
    }
    let pods_added = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = agent.metrics().await;
        let identities = metric(&metrics, "sigil_agent_identities");
        let issued = metrics
            .lines()
            .filter(|l| l.starts_with("sigil_agent_cert_expiry_timestamp_seconds{"))
            .count();
        if identities as usize >= pods && issued >= pods {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{issued} of {pods} identities issued after 60 s (identities {identities}):\n{}",
            agent
                .logs()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_issued = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = agent.metrics().await;
    let mean_sign = metric(&metrics, "sigil_agent_csr_duration_seconds_sum")
        / metric(&metrics, "sigil_agent_csr_duration_seconds_count").max(1.0);
    Prefetch {
        idle,
        full: agent.memory(),
        pods_added,
        all_issued,
        mean_sign: Duration::from_secs_f64(mean_sign),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() -> std::process::ExitCode {
    if let (Some(socket), Ok(expect)) = (
        std::env::var_os(CLIENT_SOCKET_ENV),
        std::env::var(CLIENT_EXPECT_ENV),
    ) {
        // A client process of item 1 (this executable re-run as another uid).
        return client_process(socket.into(), expect);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
    std::process::ExitCode::SUCCESS
}

async fn bench() {
    let samples = env_or("BENCH_SAMPLES", 50u32);
    let streams = env_or("BENCH_STREAMS", 1000usize);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "Node agent benchmark: real `sigil agent run` and `sigil ca serve` on {cores} cores shared with the clients"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let setup = unix_setup(dir.path(), samples).await;
    let is_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let agent_args = |ttl: &str| {
        [
            setup.agent_args.clone(),
            vec!["--cert-ttl".into(), ttl.into()],
        ]
        .concat()
    };
    let mut agent = Agent::start(
        dir.path(),
        "agent-unix",
        &setup.ca,
        &setup.bundle,
        &agent_args("1h"),
        None,
    );
    agent.wait_ready().await;
    if is_root {
        let exe = client_executable(dir.path());
        first_secret(&agent, &exe, samples).await;
    } else {
        println!("\n1. skipped: running clients as other uids needs root");
    }
    drop(agent);

    // Item 2, each layout on a fresh agent so that its memory is that layout's alone.
    let mut unix_idle = None;
    let mut runs = Vec::new();
    for per_connection in [1, 100] {
        let mut agent = Agent::start(
            dir.path(),
            &format!("agent-fanout-{per_connection}"),
            &setup.ca,
            &setup.bundle,
            &agent_args(FANOUT_TTL),
            None,
        );
        agent.wait_ready().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        unix_idle.get_or_insert(agent.memory());
        runs.push(fan_out(&agent, &setup.ca, streams, per_connection).await);
    }
    let unix_idle = unix_idle.unwrap();
    print_fan_out(streams, &mut runs);
    drop(setup);

    let prefetch = kubernetes_memory(dir.path(), streams).await;
    let (k8s_idle, k8s_full) = (prefetch.idle, prefetch.full);
    println!(
        "\n3. agent memory (VmRSS / VmHWM from /proc/<pid>/status); {streams} pods added in {:.0} ms, all {streams} identities issued {:.2} s after the first ({:.0}/s, mean Sign round trip {:.2} ms, {} in flight at most)",
        ms(prefetch.pods_added),
        prefetch.all_issued.as_secs_f64(),
        streams as f64 / prefetch.all_issued.as_secs_f64(),
        ms(prefetch.mean_sign),
        sigil_agent::certs::DEFAULT_MAX_CONCURRENT_FETCHES
    );
    println!("{:<52} {:>10} {:>10}", "agent", "RSS MiB", "HWM MiB");
    let rows = std::iter::once((
        "unix attestor, idle (own certificate only)".to_string(),
        unix_idle,
    ))
    .chain(runs.iter().map(|f| {
        (
            format!(
                "unix attestor, {streams} SDS streams on {} conn",
                f.connections
            ),
            f.streams_rss,
        )
    }))
    .chain([
        (
            "k8s attestor, idle (node watch, no workload pods)".to_string(),
            k8s_idle,
        ),
        (format!("k8s attestor, {streams} identities held"), k8s_full),
    ]);
    for (label, m) in rows {
        println!(
            "{:<52} {:>10.1} {:>10.1}",
            label,
            mib(m.rss_kib),
            mib(m.hwm_kib)
        );
    }
    let per_stream = |f: &FanOut| {
        f.streams_rss.rss_kib.saturating_sub(unix_idle.rss_kib) as f64 / streams as f64
    };
    println!(
        "=> per SDS stream: {:.1} KiB with its own connection, {:.1} KiB sharing one; per identity (key, certificate, worker, pod): {:.1} KiB",
        per_stream(&runs[0]),
        per_stream(&runs[1]),
        k8s_full.rss_kib.saturating_sub(k8s_idle.rss_kib) as f64 / streams as f64
    );
}
