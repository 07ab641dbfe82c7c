//! The benchmarks' load generation and measurement (benches/proxy.rs, benches/l7.rs): a
//! coordinated-omission-safe open loop on OS threads and a closed loop on tokio, over any client
//! that sends one request at a time on its connection; a hand-written HTTP/1.1 keep-alive client;
//! CPU seconds and memory of processes from /proc; quantiles; and the Envoy bootstrap pieces
//! both benches give their Envoys (SDS from the sigil agent, TLS 1.3 requiring peer SPIFFE IDs).

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cpu_seconds;

/// The environment variable `name` parsed, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds as milliseconds.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The `p` quantile of sorted `samples`, nearest rank.
pub fn quantile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
    sorted.get(i.min(sorted.len() - 1)).copied()
}

/// The median of `values` (the mean of the middle two of an even count); None without any.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Each column's median over the rounds of a bench's `BENCH_ROUNDS` (`rounds[r][c]`: column
/// `c`'s value in round `r`; rounds without a value are left out).
pub fn column_medians(rounds: &[Vec<Option<f64>>]) -> Vec<Option<f64>> {
    let columns = rounds.first().map_or(0, Vec::len);
    (0..columns)
        .map(|c| median(rounds.iter().filter_map(|round| round[c])))
        .collect()
}

/// One row of a bench's by-round output: each column's value in each round (`rounds[r][c]`),
/// then each of `ratios` (name, numerator column, denominator column) in each round, with the
/// median of those ratios.
pub fn print_round_row(
    headers: &[String],
    rounds: &[Vec<Option<f64>>],
    decimals: usize,
    ratios: &[(String, usize, usize)],
) {
    let width = headers
        .iter()
        .chain(ratios.iter().map(|(name, _, _)| name))
        .map(String::len)
        .max()
        .unwrap_or(0)
        + 2;
    let values = |cells: &[Option<f64>], decimals: usize| -> String {
        cells
            .iter()
            .map(|v| v.map_or(format!(" {:>9}", "-"), |v| format!(" {v:>9.decimals$}")))
            .collect()
    };
    for (c, header) in headers.iter().enumerate() {
        let cells: Vec<Option<f64>> = rounds.iter().map(|round| round[c]).collect();
        println!("  {header:width$}{}", values(&cells, decimals));
    }
    for (name, numerator, denominator) in ratios {
        let each: Vec<Option<f64>> = rounds
            .iter()
            .map(|round| Some(round[*numerator]? / round[*denominator]?))
            .collect();
        println!(
            "  {name:width$}{}   median {:.2}",
            values(&each, 2),
            median(each.iter().flatten().copied()).unwrap_or(f64::NAN)
        );
    }
}

/// ` (first: <error>)`, or nothing without an error.
pub fn first_error(error: &Option<String>) -> String {
    error
        .as_ref()
        .map_or(String::new(), |e| format!(" (first: {e})"))
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1, just enough for the benches: requests without bodies except POST /sink, responses
// with Content-Length.

/// Where the header block ends (after the blank line), if it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The Content-Length of a header block.
pub fn content_length(head: &[u8]) -> Option<u64> {
    std::str::from_utf8(head).ok()?.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// A response at the start of `buf`: None while its header block is incomplete, else its status
/// and total length (header block + body).
pub fn response_head(buf: &[u8]) -> Option<std::io::Result<(u16, usize)>> {
    let end = head_end(buf)?;
    let head = &buf[..end];
    let status = std::str::from_utf8(head)
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Some(match content_length(head) {
        Some(len) => Ok((status, end + len as usize)),
        None => Err(std::io::Error::other(format!(
            "response without Content-Length: {}",
            String::from_utf8_lossy(head)
        ))),
    })
}

/// A 429 answer: the server refused the request (a rate limit) and the connection stays usable.
/// The open loop counts it apart from errors and latencies and keeps the connection.
#[derive(Debug)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("status 429 (refused)")
    }
}

impl std::error::Error for Refused {}

/// Whether `e` is a [`Refused`] answer.
pub fn is_refused(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Refused>())
}

/// The read side of a keep-alive client connection: bytes received and not yet consumed.
pub struct Responses {
    buf: Vec<u8>,
    pub len: usize,
}

impl Default for Responses {
    fn default() -> Self {
        Responses::new()
    }
}

impl Responses {
    pub fn new() -> Responses {
        Responses {
            buf: vec![0; 16 * 1024],
            len: 0,
        }
    }

    /// Takes one complete response off the front: Some(Ok) for a 200, None if more bytes are
    /// needed.
    pub fn take(&mut self) -> Option<std::io::Result<()>> {
        let (status, total) = match response_head(&self.buf[..self.len])? {
            Ok(head) => head,
            Err(e) => return Some(Err(e)),
        };
        if total > self.buf.len() {
            self.buf.resize(total, 0);
        }
        if self.len < total {
            return None;
        }
        self.buf.copy_within(total..self.len, 0);
        self.len -= total;
        Some(if status == 200 {
            Ok(())
        } else if status == 429 {
            Err(std::io::Error::other(Refused))
        } else {
            Err(std::io::Error::other(format!("status {status}")))
        })
    }

    pub fn spare(&mut self) -> &mut [u8] {
        if self.len == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        &mut self.buf[self.len..]
    }

    pub fn filled(&mut self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.len += n;
        Ok(())
    }
}

/// A client that sends one request at a time on its connection, blocking (the open loop's).
pub trait BlockingRequester: Sized {
    /// One request and its whole answer; Ok only for a successful answer.
    fn request(&mut self) -> std::io::Result<()>;
}

/// A client that sends one request at a time on its connection, on tokio (the closed loop's).
pub trait AsyncRequester: Sized + Send + 'static {
    /// One request and its whole answer; Ok only for a successful answer.
    fn request(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// A blocking HTTP/1.1 keep-alive client sending one fixed request (the open-loop threads).
pub struct SyncClient {
    stream: std::net::TcpStream,
    request: &'static [u8],
    responses: Responses,
}

impl SyncClient {
    /// A client on `stream` sending `request`; sends it once untimed (it pays for the new
    /// connection: the mTLS handshake of a proxy behind).
    pub fn new(stream: std::net::TcpStream, request: &'static [u8]) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut client = SyncClient {
            stream,
            request,
            responses: Responses::new(),
        };
        match client.get() {
            // A rate-limited server may refuse this one; the connection is fine.
            Err(e) if !is_refused(&e) => Err(e),
            _ => Ok(client),
        }
    }

    /// [`SyncClient::new`] on a new connection to `addr`.
    pub fn connect(addr: SocketAddr, request: &'static [u8]) -> std::io::Result<Self> {
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        SyncClient::new(stream, request)
    }

    pub fn get(&mut self) -> std::io::Result<()> {
        self.stream.write_all(self.request)?;
        loop {
            if let Some(result) = self.responses.take() {
                return result;
            }
            let n = self.stream.read(self.responses.spare())?;
            self.responses.filled(n)?;
        }
    }
}

impl BlockingRequester for SyncClient {
    fn request(&mut self) -> std::io::Result<()> {
        self.get()
    }
}

/// An HTTP/1.1 keep-alive client on tokio sending a fixed request (closed loop, connection
/// rate).
pub struct AsyncClient {
    pub stream: tokio::net::TcpStream,
    pub responses: Responses,
    get: &'static [u8],
}

impl AsyncClient {
    /// A client on `stream` whose [`AsyncRequester::request`] sends `get`.
    pub fn new(stream: tokio::net::TcpStream, get: &'static [u8]) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(AsyncClient {
            stream,
            responses: Responses::new(),
            get,
        })
    }

    pub async fn connect(addr: SocketAddr, get: &'static [u8]) -> std::io::Result<Self> {
        AsyncClient::new(tokio::net::TcpStream::connect(addr).await?, get)
    }

    /// Sends `request` and reads one answer.
    pub async fn send(&mut self, request: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(request).await?;
        loop {
            if let Some(result) = self.responses.take() {
                return result;
            }
            let n = self.stream.read(self.responses.spare()).await?;
            self.responses.filled(n)?;
        }
    }
}

impl AsyncRequester for AsyncClient {
    async fn request(&mut self) -> std::io::Result<()> {
        let get = self.get;
        self.send(get).await
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// CPU seconds used so far by the proxies (summed), the backends (summed), this process (the
/// load generator) and the whole machine, and the seconds the hypervisor ran other guests while
/// this machine had work (steal).
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub proxies: f64,
    pub backend: f64,
    pub loadgen: f64,
    pub machine: f64,
    pub stolen: f64,
}

impl Cpu {
    pub fn now(proxies: &[u32], backends: &[u32]) -> Cpu {
        let (machine, stolen) = machine_seconds();
        Cpu {
            proxies: proxies.iter().map(|&pid| cpu_seconds(pid)).sum(),
            backend: backends.iter().map(|&pid| cpu_seconds(pid)).sum(),
            loadgen: cpu_seconds(std::process::id()),
            machine,
            stolen,
        }
    }

    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            proxies: self.proxies - before.proxies,
            backend: self.backend - before.backend,
            loadgen: self.loadgen - before.loadgen,
            machine: self.machine - before.machine,
            stolen: self.stolen - before.stolen,
        }
    }

    /// CPU used by everything else on the machine (the agent and the CA, which are idle, and
    /// whatever else runs there): what disturbs the numbers, with [`Cpu::stolen`].
    pub fn others(&self) -> f64 {
        (self.machine - self.proxies - self.backend - self.loadgen).max(0.0)
    }
}

/// Busy CPU seconds of the whole machine since boot (all CPUs), and the seconds stolen from it
/// by the hypervisor, from /proc/stat.
fn machine_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let seconds = |i: usize| fields.get(i).copied().unwrap_or(0.0) / 100.0; // USER_HZ
    // user nice system idle iowait irq softirq steal: busy is all but idle, iowait and steal.
    let busy = [0, 1, 2, 5, 6].into_iter().map(seconds).sum();
    (busy, seconds(7))
}

/// Resident and peak resident memory of a process (KiB), from /proc.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub struct OpenLoop {
    /// Request latencies from the intended send time, sorted (ns).
    pub latencies: Vec<u64>,
    /// How late the threads sent after the moment they meant to (ns, sorted).
    pub lag: Vec<u64>,
    pub errors: u64,
    /// Answers that were [`Refused`] (not errors, not in `latencies`).
    pub refused: u64,
    /// Requests scheduled but not sent because the run overran by more than its length.
    pub unsent: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub cpu: Cpu,
}

/// What one open-loop connection's thread measured.
#[derive(Default)]
struct OpenLoopThread {
    latencies: Vec<u64>,
    lag: Vec<u64>,
    errors: u64,
    refused: u64,
    unsent: u64,
    first_error: Option<String>,
}

/// One open-loop connection's thread: connects, waits for the common start, then sends on the
/// schedule.
fn open_loop_connection<C: BlockingRequester>(
    connect: impl Fn() -> std::io::Result<C>,
    index: usize,
    connections: usize,
    rate: u64,
    length: Duration,
    barriers: (Arc<Barrier>, Arc<Barrier>, Arc<OnceLock<Instant>>),
) -> OpenLoopThread {
    let (ready, go, start) = barriers;
    let mut client = connect();
    ready.wait();
    go.wait();
    let start = *start.get().expect("start time set before the go barrier");
    let end = start + length;
    let give_up = end + length;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let mut intended = start + Duration::from_secs_f64(index as f64 / rate as f64);
    let mut out = OpenLoopThread::default();
    let mut free_at = start;
    while intended < end {
        let now = Instant::now();
        if now > give_up {
            out.unsent += 1;
            intended += interval;
            continue;
        }
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let sent = Instant::now();
        out.lag.push(
            sent.saturating_duration_since(intended.max(free_at))
                .as_nanos() as u64,
        );
        let result = match &mut client {
            Ok(c) => c.request(),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        free_at = Instant::now();
        match result {
            Ok(()) => out
                .latencies
                .push(free_at.duration_since(intended).as_nanos() as u64),
            Err(e) if is_refused(&e) => out.refused += 1,
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                client = connect();
            }
        }
        intended += interval;
    }
    out
}

/// `rate` requests/s for `length`, spread evenly over `connections` connections (one OS thread
/// each, made by `connect`), latency counted from each request's intended send time; CPU of
/// `pids` (the proxies) and `backends` over the phase.
pub fn open_loop<C, F>(
    connect: F,
    rate: u64,
    connections: usize,
    length: Duration,
    pids: &[u32],
    backends: &[u32],
) -> OpenLoop
where
    C: BlockingRequester,
    F: Fn() -> std::io::Result<C> + Clone + Send + 'static,
{
    let ready = Arc::new(Barrier::new(connections + 1));
    let go = Arc::new(Barrier::new(connections + 1));
    let start = Arc::new(OnceLock::new());
    let threads: Vec<_> = (0..connections)
        .map(|i| {
            let barriers = (ready.clone(), go.clone(), start.clone());
            let connect = connect.clone();
            std::thread::spawn(move || {
                open_loop_connection(connect, i, connections, rate, length, barriers)
            })
        })
        .collect();
    ready.wait();
    let before = Cpu::now(pids, backends);
    let _ = start.set(Instant::now() + Duration::from_millis(5));
    go.wait();
    let mut result = OpenLoop {
        latencies: Vec::new(),
        lag: Vec::new(),
        errors: 0,
        refused: 0,
        unsent: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        cpu: Cpu::default(),
    };
    for thread in threads {
        let t = thread.join().expect("an open-loop thread panicked");
        result.latencies.extend(t.latencies);
        result.lag.extend(t.lag);
        result.errors += t.errors;
        result.refused += t.refused;
        result.unsent += t.unsent;
        result.first_error = result.first_error.or(t.first_error);
    }
    let started = *start.get().expect("start time set");
    result.elapsed = started.elapsed();
    result.cpu = Cpu::now(pids, backends).since(before);
    result.latencies.sort_unstable();
    result.lag.sort_unstable();
    result
}

pub struct ClosedLoop {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latencies: Vec<u64>,
    pub elapsed: Duration,
    pub cpu: Cpu,
}

/// `connections` connections (made by `connect`, each warmed by one untimed request) each
/// sending its next request when the previous answer arrives, for `length`.
pub async fn closed_loop<C, F, Fut>(
    connect: F,
    connections: usize,
    length: Duration,
    pids: &[u32],
    backends: &[u32],
) -> ClosedLoop
where
    C: AsyncRequester,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = std::io::Result<C>> + Send,
{
    // Connect and warm every connection first: handshakes are not part of the rate.
    let mut clients = Vec::new();
    for _ in 0..connections {
        let mut client = connect()
            .await
            .expect("connecting a closed-loop connection");
        client
            .request()
            .await
            .expect("the first request of a closed-loop connection");
        clients.push(client);
    }
    let before = Cpu::now(pids, backends);
    let start = Instant::now();
    let end = start + length;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let connect = connect.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    match client.request().await {
                        Ok(()) => latencies.push(sent.elapsed().as_nanos() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            match connect().await {
                                Ok(c) => client = c,
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut result = ClosedLoop {
        requests: 0,
        errors: 0,
        first_error: None,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        cpu: Cpu::default(),
    };
    for task in tasks {
        let (latencies, errors, first_error) = task.await.expect("a closed-loop task panicked");
        result.latencies.extend(latencies);
        result.errors += errors;
        result.first_error = result.first_error.or(first_error);
    }
    result.elapsed = start.elapsed();
    result.cpu = Cpu::now(pids, backends).since(before);
    result.requests = result.latencies.len() as u64;
    result.latencies.sort_unstable();
    result
}

// ---------------------------------------------------------------------------------------------
// Envoy bootstrap pieces.

/// SDS over the `sds-grpc` cluster (the sigil agent's socket).
pub fn sds_config() -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]
        }
    })
}

/// TLS 1.3, `default` and `ROOTCA` over SDS, the peer's SPIFFE ID required to be one of
/// `peer_ids`; Envoy's default key exchange groups unless `curves` names some.
pub fn envoy_common_tls(curves: &[String], peer_ids: &[&str]) -> Value {
    let mut params = json!({
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3"
    });
    if !curves.is_empty() {
        params["ecdh_curves"] = json!(curves);
    }
    let matchers: Vec<Value> = peer_ids
        .iter()
        .map(|id| json!({"san_type": "URI", "matcher": {"exact": id}}))
        .collect();
    json!({
        "tls_params": params,
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config()}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": matchers},
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config()}
        }
    })
}

/// The static cluster `sds-grpc`: HTTP/2 to the agent's socket.
pub fn envoy_sds_cluster(socket: &Path) -> Value {
    json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": "sds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_take_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&samples, 0.5), Some(50));
        assert_eq!(quantile(&samples, 0.99), Some(99));
        assert_eq!(quantile(&samples, 1.0), Some(100));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    /// Feeds `bytes` to a [`Responses`] `chunk` bytes at a time; the outcomes of `take` as they
    /// complete.
    fn feed(bytes: &[u8], chunk: usize) -> Vec<Result<(), String>> {
        let mut responses = Responses::new();
        let mut outcomes = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            // As a read does: at most what the buffer has room for.
            let spare = responses.spare();
            let n = chunk.min(spare.len()).min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            responses.filled(n).unwrap();
            rest = &rest[n..];
            while let Some(outcome) = responses.take() {
                outcomes.push(outcome.map_err(|e| e.to_string()));
            }
        }
        assert_eq!(responses.len, 0, "bytes left over");
        outcomes
    }

    #[test]
    fn a_429_is_refused_not_an_error_and_the_next_answer_follows() {
        let mut responses = Responses::new();
        let bytes = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n\
HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        responses.spare()[..bytes.len()].copy_from_slice(bytes);
        responses.filled(bytes.len()).unwrap();
        let refused = responses.take().unwrap().unwrap_err();
        assert!(is_refused(&refused), "{refused}");
        let failed = responses.take().unwrap().unwrap_err();
        assert!(!is_refused(&failed), "a 503 is an error: {failed}");
        assert!(responses.take().unwrap().is_ok());
        assert!(responses.take().is_none());
    }

    #[test]
    fn pipelined_responses_are_taken_one_by_one_whatever_the_reads() {
        let body = vec![b'x'; 20_000];
        let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        bytes.extend_from_slice(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n");
        bytes.extend_from_slice(&body);
        for chunk in [1, 7, 4096, bytes.len()] {
            assert_eq!(
                feed(&bytes, chunk),
                [Ok(()), Err("status 503".to_owned()), Ok(())],
                "reads of {chunk} bytes"
            );
        }
    }

    #[test]
    fn a_response_without_content_length_is_an_error() {
        let mut responses = Responses::new();
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        responses.spare()[..bytes.len()].copy_from_slice(bytes);
        responses.filled(bytes.len()).unwrap();
        let error = responses.take().unwrap().unwrap_err();
        assert!(
            error.to_string().contains("without Content-Length"),
            "{error}"
        );
    }

    #[test]
    fn envoy_tls_requires_every_given_peer_id_as_an_alternative() {
        let tls = envoy_common_tls(&["X25519".to_owned()], &["spiffe://a/x", "spiffe://a/y"]);
        let matchers = &tls["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"];
        assert_eq!(matchers.as_array().map(Vec::len), Some(2));
        assert_eq!(matchers[1]["matcher"]["exact"], "spiffe://a/y");
        assert_eq!(tls["tls_params"]["ecdh_curves"][0], "X25519");
        assert!(
            envoy_common_tls(&[], &["spiffe://a/x"])["tls_params"]
                .get("ecdh_curves")
                .is_none()
        );
    }
}
