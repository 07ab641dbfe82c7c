//! Real clients of the real `sigil agent run`: py-spiffe (PyPI's `spiffe`) and the Rust `spiffe`
//! crate over the SPIFFE Workload API, and 200 concurrent Envoy-style SDS streams that must all
//! receive a rotation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use sigil_proxy_api::sds::TYPE_URL;
use sigil_test_harness::*;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const CERT_TTL: &str = "4s";
/// Longest wait for anything the agent owes a client (a first answer or a rotation).
const WAIT: Duration = Duration::from_secs(15);

/// A CA (state directory, client-certificate auth, a static entry letting the agent issue `web`)
/// and `sigil agent run` in front of it, attesting with the unix attestor: uid 0 (this test, and
/// the Python child it runs) is `web`.
struct Agent {
    process: Proc,
    socket: PathBuf,
    admin: SocketAddr,
    /// The CA's roots (DER), as the bundle every client must receive.
    roots: Vec<Vec<u8>>,
    _ca: CaProcess,
}

impl Agent {
    async fn start(dir: &Path) -> Agent {
        let offline = OfflineCa::init(dir, &[WEB_ID]);
        let state = offline.state.clone();
        let serve_args = [offline.serve_args(), vec!["--max-ttl".into(), "24h".into()]].concat();
        let mut ca = CaProcess::start(dir, None, &serve_args);
        ca.wait_ready().await;
        let agent_cert = dir.join("agent-cert");
        offline.issue(AGENT_ID, &agent_cert);
        let map = dir.join("workloads.yaml");
        std::fs::write(&map, format!("workloads:\n- {{uid: 0, id: {WEB_ID}}}\n")).unwrap();
        let socket = dir.join("agent.sock");
        let admin = free_addr();
        let args = unix_agent_args(
            ca.grpc,
            &offline,
            &agent_cert,
            &map,
            &socket,
            admin,
            CERT_TTL,
        );
        let process = spawn_agent(&args, dir.join("agent.log"), admin).await;
        let roots = state_dir_bundle(&state)
            .roots
            .iter()
            .map(|r| r.to_vec())
            .collect();
        Agent {
            process,
            socket,
            admin,
            roots,
            _ca: ca,
        }
    }

    /// One HTTP/2 connection to the agent socket.
    async fn connection(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to the agent socket")
    }

    async fn metric(&self, series: &str) -> f64 {
        let (status, text) = http_get(self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200, "{text}");
        metric(&text, series)
    }
}

/// py-spiffe, found through SPIFFE_ENDPOINT_SOCKET as any workload would: fetches the SVID and
/// bundles, then watches for the renewed SVID the agent pushes, then fetches once more. One JSON
/// object per line; serials in lowercase hex.
///
/// No workaround for grpc-core's `:authority`: since grpc 1.57 it sends the %-encoded socket path
/// on a `unix:` target (grpc/grpc#38142), which h2 alone rejects (hyperium/h2#487); the agent's
/// socket adapter (`sigil_agent::h2_authority`) must accept it as a user's client sends it.
const PY_SPIFFE_CLIENT: &str = r#"
import json, sys, threading
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import TrustDomain, WorkloadApiClient

def serial(svid):
    return format(svid.leaf.serial_number, "x")

def emit(**fields):
    print(json.dumps(fields), flush=True)

with WorkloadApiClient(default_timeout=10) as client:
    svid = client.fetch_x509_svid()
    bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain("cluster.local"))
    first = serial(svid)
    emit(event="fetched", spiffe_id=str(svid.spiffe_id), serial=first,
         chain_length=len(svid.cert_chain),
         bundle_roots=sorted(c.public_bytes(Encoding.DER).hex() for c in bundle.x509_authorities))

    pushed, outcome = threading.Event(), {}
    def on_success(context):
        got = context.default_svid
        if serial(got) != first and not pushed.is_set():
            outcome.update(spiffe_id=str(got.spiffe_id), serial=serial(got))
            pushed.set()
    def on_error(error):
        outcome.update(error=str(error))
        pushed.set()
    watch = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    if not pushed.wait(10):
        emit(event="error", error="no renewed SVID pushed within 10 s")
        sys.exit(1)
    watch.cancel()
    if "error" in outcome:
        emit(event="error", error=outcome["error"])
        sys.exit(1)
    emit(event="pushed", **outcome)

    again = client.fetch_x509_svid()
    emit(event="refetched", spiffe_id=str(again.spiffe_id), serial=serial(again))
"#;

fn hex(der: &[u8]) -> String {
    der.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn py_spiffe_and_the_rust_spiffe_crate_get_webs_svid_and_py_spiffe_receives_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path()).await;
    let script = dir.path().join("py_spiffe_client.py");
    std::fs::write(&script, PY_SPIFFE_CLIENT).unwrap();

    let started = Instant::now();
    let python = tokio::process::Command::new("python3")
        .arg(&script)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", agent.socket.display()),
        )
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), python)
        .await
        .expect("the py-spiffe client finished within 30 s")
        .expect("python3 runs (scripts/test installs spiffe==0.3.2)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let diagnostics = format!(
        "py-spiffe client ({}):\n--- stdout\n{stdout}\n--- stderr\n{}\n--- agent\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.process.logs()
    );
    assert!(out.status.success(), "{diagnostics}");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {diagnostics}")))
        .collect();
    let [fetched, pushed, refetched] = events.as_slice() else {
        panic!("expected three events: {diagnostics}");
    };
    assert_eq!(fetched["event"], "fetched");
    assert_eq!(pushed["event"], "pushed");
    assert_eq!(refetched["event"], "refetched");

    for event in &events {
        assert_eq!(event["spiffe_id"], WEB_ID, "{diagnostics}");
    }
    // Leaf and intermediates: the CA here signs from its root, so the chain is the leaf alone.
    assert_eq!(fetched["chain_length"], 1, "{diagnostics}");
    let expected_roots: Vec<String> = {
        let mut roots: Vec<String> = agent.roots.iter().map(|r| hex(r)).collect();
        roots.sort();
        roots
    };
    assert_eq!(
        fetched["bundle_roots"],
        serde_json::json!(expected_roots),
        "the bundle is the CA's roots"
    );
    let first = fetched["serial"].as_str().unwrap();
    assert!(!first.is_empty(), "{diagnostics}");
    assert_ne!(
        pushed["serial"], first,
        "the watch received a renewed SVID: {diagnostics}"
    );
    assert_ne!(
        refetched["serial"], first,
        "a later fetch returns the renewed SVID: {diagnostics}"
    );
    println!(
        "py-spiffe: {WEB_ID}, serial {first} -> pushed {} -> refetched {} in {:?}",
        pushed["serial"].as_str().unwrap_or_default(),
        refetched["serial"].as_str().unwrap_or_default(),
        started.elapsed()
    );

    // The Rust `spiffe` crate, from the same real agent binary, sees the same identity and roots.
    let client =
        spiffe::WorkloadApiClient::connect_to(format!("unix://{}", agent.socket.display()))
            .await
            .expect("the spiffe crate connects");
    let svid = client
        .fetch_x509_svid()
        .await
        .expect("the spiffe crate fetches an SVID");
    assert_eq!(svid.spiffe_id().to_string(), WEB_ID);
    assert_eq!(svid.spiffe_id().to_string(), fetched["spiffe_id"]);
    let bundles = client
        .fetch_x509_bundles()
        .await
        .expect("the spiffe crate fetches bundles");
    let bundle = bundles
        .get(&spiffe::TrustDomain::new("cluster.local").unwrap())
        .expect("our trust domain's bundle");
    let crate_roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(crate_roots, agent.roots);
}

/// One StreamSecrets stream, held as Envoy holds it: every response is ACKed.
struct SdsStream {
    requests: UnboundedSender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

fn request_default(version_info: &str, response_nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version_info.into(),
        resource_names: vec!["default".into()],
        type_url: TYPE_URL.into(),
        response_nonce: response_nonce.into(),
        ..Default::default()
    }
}

impl SdsStream {
    async fn open(connection: Channel) -> Result<SdsStream, String> {
        let (requests, rx) = unbounded();
        requests
            .unbounded_send(request_default("", ""))
            .map_err(|e| e.to_string())?;
        let responses = SecretDiscoveryServiceClient::new(connection)
            .stream_secrets(rx)
            .await
            .map_err(|s| format!("StreamSecrets refused: {s:?}"))?
            .into_inner();
        Ok(SdsStream {
            requests,
            responses,
        })
    }

    /// The next response, ACKed: the serial (hex) of the leaf it carries.
    async fn next_serial(&mut self) -> Result<String, String> {
        let response = match tokio::time::timeout(WAIT, self.responses.message()).await {
            Err(_) => return Err(format!("nothing received within {WAIT:?}")),
            Ok(Err(status)) => return Err(format!("the stream failed: {status:?}")),
            Ok(Ok(None)) => return Err("the stream ended".into()),
            Ok(Ok(Some(response))) => response,
        };
        let serial = leaf_serial(&response)?;
        self.requests
            .unbounded_send(request_default(&response.version_info, &response.nonce))
            .map_err(|e| format!("ACK not sent: {e}"))?;
        Ok(serial)
    }
}

/// Checks a response carries `default` as web's certificate, and returns its leaf's serial.
fn leaf_serial(response: &DiscoveryResponse) -> Result<String, String> {
    if response.type_url != TYPE_URL || response.nonce.is_empty() {
        return Err(format!(
            "type_url {:?}, nonce {:?}",
            response.type_url, response.nonce
        ));
    }
    let [resource] = response.resources.as_slice() else {
        return Err(format!("{} resources, not 1", response.resources.len()));
    };
    let any = prost_types::Any {
        type_url: resource.type_url.clone(),
        value: resource.value.clone(),
    };
    let secret: Secret = any.to_msg().map_err(|e| format!("not a Secret: {e}"))?;
    let Some(secret::Type::TlsCertificate(certificate)) = secret.r#type else {
        return Err(format!("{:?} is not a TLS certificate", secret.name));
    };
    if secret.name != "default" {
        return Err(format!("secret named {:?}", secret.name));
    }
    let chain = certificate
        .certificate_chain
        .and_then(|source| source.specifier)
        .ok_or("no certificate chain")?;
    let envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(chain) =
        chain
    else {
        return Err("the chain is not inline bytes".into());
    };
    let blocks = pem::parse_many(&chain).map_err(|e| format!("chain PEM: {e}"))?;
    let leaf = blocks.first().ok_or("an empty chain")?;
    let report =
        sigil_identity::profile::inspect_cert(leaf.contents()).map_err(|e| format!("leaf: {e}"))?;
    match report.spiffe_id {
        Some(id) if id.to_string() == WEB_ID => Ok(report.serial_hex),
        other => Err(format!("the leaf is {other:?}, not {WEB_ID}")),
    }
}

/// What one stream saw: the first certificate, then the next one pushed, and when.
struct Observed {
    stream: usize,
    first: String,
    rotated: String,
    rotated_at: Instant,
}

const CONNECTIONS: usize = 10;
const STREAMS_PER_CONNECTION: usize = 20;
const STREAMS: usize = CONNECTIONS * STREAMS_PER_CONNECTION;

#[tokio::test]
async fn two_hundred_concurrent_sds_streams_all_receive_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path()).await;
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(agent.connection().await);
    }

    // Each stream reports its first serial, then what the next push brought (or why it failed),
    // and stays open until `close` so that the gauge is read with all of them open.
    let started = Instant::now();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (close, close_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for stream in 0..STREAMS {
        let connection = connections[stream % CONNECTIONS].clone();
        let (first_tx, seen_tx) = (first_tx.clone(), seen_tx.clone());
        let mut close_rx = close_rx.clone();
        tasks.push(tokio::spawn(async move {
            let observe = async {
                let mut sds = SdsStream::open(connection).await?;
                let first = sds.next_serial().await?;
                let _ = first_tx.send(());
                let rotated = sds.next_serial().await?;
                let seen = Observed {
                    stream,
                    first,
                    rotated,
                    rotated_at: Instant::now(),
                };
                Ok::<_, String>((sds, seen))
            };
            match observe.await {
                Ok((sds, seen)) => {
                    let _ = seen_tx.send(Ok(seen));
                    let _ = close_rx.wait_for(|close| *close).await;
                    drop(sds);
                }
                Err(e) => {
                    let _ = seen_tx.send(Err(format!("stream {stream}: {e}")));
                }
            }
        }));
    }
    drop((first_tx, seen_tx));

    let mut answered = 0;
    while answered < STREAMS {
        match tokio::time::timeout(WAIT, first_rx.recv()).await {
            Ok(Some(())) => answered += 1,
            _ => break,
        }
    }
    let all_answered = started.elapsed();
    let open = agent.metric("sigil_agent_streams{api=\"sds\"}").await;

    let (mut observed, mut failures) = (Vec::new(), Vec::new());
    while observed.len() + failures.len() < STREAMS {
        match tokio::time::timeout(WAIT, seen_rx.recv()).await {
            Ok(Some(Ok(seen))) => observed.push(seen),
            Ok(Some(Err(e))) => failures.push(e),
            Ok(None) | Err(_) => break,
        }
    }
    close.send(true).unwrap();
    for task in tasks {
        task.await.expect("stream task");
    }
    assert!(
        failures.is_empty(),
        "{} of {STREAMS} streams failed, e.g. {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        agent.process.logs()
    );
    assert_eq!(
        answered,
        STREAMS,
        "streams answered\n{}",
        agent.process.logs()
    );
    assert_eq!(open, STREAMS as f64, "the agent counts every open stream");
    assert_eq!(
        observed.len(),
        STREAMS,
        "streams that received a rotation\n{}",
        agent.process.logs()
    );
    for seen in &observed {
        assert_ne!(
            seen.rotated, seen.first,
            "stream {} was pushed the certificate it had",
            seen.stream
        );
    }
    // One identity, one certificate at a time: every stream saw the same one first and the same
    // renewed one next (else the streams straddled a rotation while opening).
    let first = &observed[0].first;
    let rotated = &observed[0].rotated;
    assert!(
        observed
            .iter()
            .all(|s| &s.first == first && &s.rotated == rotated),
        "streams disagree on the certificate sequence (opening took {all_answered:?})"
    );
    let earliest = observed.iter().map(|s| s.rotated_at).min().unwrap();
    let latest = observed.iter().map(|s| s.rotated_at).max().unwrap();
    println!(
        "{STREAMS} SDS streams on {CONNECTIONS} connections answered within {all_answered:?}; \
         all rotated {first} -> {rotated}; spread between the first and last stream receiving \
         the rotation: {:?} (rotation reached the first stream {:?} after start)",
        latest - earliest,
        earliest - started
    );

    // Closed streams leave the gauge.
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.metric("sigil_agent_streams{api=\"sds\"}").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the stream gauge did not drop to 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client's side of opening an HTTP/2 connection: the preface and an empty SETTINGS frame.
const H2_OPENING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// An HTTP/2 frame header: `length`, `frame_type`, no flags, stream 1.
fn frame_header(length: usize, frame_type: u8) -> Vec<u8> {
    let mut header = (length as u32).to_be_bytes()[1..].to_vec();
    header.extend_from_slice(&[frame_type, 0, 0, 0, 0, 1]);
    header
}

/// A header block of `size` bytes (HEADERS then CONTINUATION frames of 16 KiB) that never ends.
fn unfinished_header_block(size: usize) -> Vec<u8> {
    let mut bytes = H2_OPENING.to_vec();
    let mut left = size;
    let mut frame_type = 0x1;
    while left > 0 {
        let length = left.min(16 * 1024);
        bytes.extend(frame_header(length, frame_type));
        bytes.resize(bytes.len() + length, 0x40);
        left -= length;
        frame_type = 0x9;
    }
    bytes
}

/// Attack: 2,000 connections to the agent socket, each holding an unfinished 64 KiB header block,
/// took the agent from 19 to 243 MB (its limit is 256 Mi), stopping rotation for the node. Now a
/// header block is refused beyond what h2 would accept decoded (16 KiB), one that is not
/// finished 10 s after it started closes its connection, one process may hold at most
/// `--max-connections-per-process` (128) connections, and the agent serves SDS afterwards.
#[tokio::test]
async fn unfinished_header_blocks_and_connection_floods_are_bounded() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path()).await;

    let mut oversized = UnixStream::connect(&agent.socket).await.unwrap();
    // The agent may close the connection before it has read all of it.
    let _ = oversized
        .write_all(&unfinished_header_block(64 * 1024))
        .await;
    let (closed, _) = closed_within(&mut oversized, Duration::from_secs(5)).await;
    assert!(closed, "a 64 KiB header block is still buffered");

    let started = Instant::now();
    let mut unfinished = UnixStream::connect(&agent.socket).await.unwrap();
    unfinished
        .write_all(&unfinished_header_block(8 * 1024))
        .await
        .unwrap();
    let (closed, _) = closed_within(&mut unfinished, Duration::from_secs(20)).await;
    assert!(closed, "an unfinished header block is waited for forever");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed too early"
    );

    let mut flood = Vec::new();
    for _ in 0..138 {
        let mut connection = UnixStream::connect(&agent.socket).await.unwrap();
        let _ = connection.write_all(H2_OPENING).await;
        flood.push(connection);
    }
    let mut refused = 0;
    for connection in &mut flood {
        let mut byte = [0u8; 1];
        // The agent answers an accepted connection with its SETTINGS; a refused one is closed.
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(connection, &mut byte),
        )
        .await
        .expect("every connection is answered or closed");
        if matches!(read, Ok(0) | Err(_)) {
            refused += 1;
        }
    }
    assert_eq!(refused, 10, "one process holds at most 128 connections");
    drop(flood);

    // Their slots are given back as the agent sees them close, and it serves again.
    let deadline = Instant::now() + WAIT;
    let mut sds = loop {
        match SdsStream::open(agent.connection().await).await {
            Ok(sds) => break sds,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sds.next_serial().await.unwrap();
    assert!(
        agent
            .metric("sigil_agent_connections_refused_total{reason=\"per_process_limit\"}")
            .await
            >= 10.0
    );
}
