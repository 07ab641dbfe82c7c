//! `sigil stat` against a live mesh (issue 16), as root, in network namespaces this test creates
//! and deletes (pass or fail): a client pod sends a known rate of HTTP/1.1 requests, one in
//! [`FAIL_EVERY`] of them to a path its server answers 500, through both pods' transparent
//! proxies, while a real Prometheus scrapes the proxies every second. The real `sigil stat`
//! binary, reading Prometheus (`--prometheus`) and reading the proxies' metrics endpoints
//! directly (`--metrics`), must print (`-o json`) the request rate and success rate the client
//! measured over the same window, within [`TOLERANCE`], per pod (the server's proxy), per
//! Service (the client's proxy, outbound) and per peer (the client's identity, as the server's
//! proxy saw it); latency percentiles and TCP connections must be there. Its tables are
//! printed; `--watch -o json` prints a document per interval. It must also say what to do when Prometheus is unreachable or a target is no proxy.
//!
//! ```text
//!   pod A 198.18.37.1                  pod B 198.18.37.2
//!   open-loop client (root)            app :8080, /fail → 500, else 200
//!   sigil proxy (CLIENT_ID)            sigil proxy (API_ID)
//!        │ eth0   → api's cluster IP 198.19.37.10:80 (known to A's proxy only)
//!        └──────── br0 in C 198.18.37.100 ────┘
//!                  Prometheus :9090, `sigil stat`
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use sigil_test_harness::load::{BlockingRequester, OpenLoop, open_loop, response_head};
use sigil_test_harness::netns::{
    Netns, Node, PROMETHEUS_PORT, PodProxy, Prometheus, in_netns, proxy_init, require_root,
};
use sigil_test_harness::{MeshHost, serve_h1_or_h2, sigil_exe};

/// This test's namespaces are `sigil-stat-<pid>-{c,a,b}`.
const NETNS_PREFIX: &str = "sigil-stat";
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 37, 100);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 37, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 37, 2);
const A_UID: u32 = 43701;
const B_UID: u32 = 43702;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const API_ID: &str = "spiffe://cluster.local/ns/demo/sa/api";
/// The Service `demo/api` (declared `http`) at its cluster IP, to B's app port.
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 37, 10), 80);
const APP_PORT: u16 = 8080;
/// Requests per second the client sends (open loop, over [`CONNECTIONS`] connections), for
/// [`LOAD`].
const RATE: u64 = 200;
const CONNECTIONS: usize = 4;
const LOAD: Duration = Duration::from_secs(12);
/// Every FAIL_EVERY-th request of a connection goes to `/fail`: a success rate of 80%.
const FAIL_EVERY: u64 = 5;
/// When the first `sigil stat` runs, after the load started: Prometheus's window then holds
/// only scrapes made under load.
const WARM_UP: Duration = Duration::from_secs(6);
/// `--window` of the Prometheus runs (a few of its 1 s scrapes) and of the direct scrapes.
const PROMETHEUS_WINDOW: Duration = Duration::from_secs(5);
const SCRAPE_WINDOW: Duration = Duration::from_secs(4);
/// Documents read from `sigil stat --watch -o json`.
const WATCHED: usize = 3;
/// How far `sigil stat`'s rates may be from the client's: ±10%.
const TOLERANCE: f64 = 0.10;

/// Answers the client received so far, by kind.
#[derive(Default)]
struct Answers {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// An HTTP/1.1 keep-alive client in A sending `GET /` and, every [`FAIL_EVERY`]-th request,
/// `GET /fail`; counts their answers (200 and 500, as asked) in [`Answers`].
struct StatClient {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    sent: u64,
    answers: Arc<Answers>,
}

impl StatClient {
    fn connect(a: &str, answers: Arc<Answers>) -> std::io::Result<StatClient> {
        let stream = in_netns(a, || {
            std::net::TcpStream::connect_timeout(&CLUSTER_IP.into(), Duration::from_secs(5))
        })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(StatClient {
            stream,
            buf: Vec::new(),
            sent: 0,
            answers,
        })
    }
}

impl BlockingRequester for StatClient {
    fn request(&mut self) -> std::io::Result<()> {
        use std::io::{Read, Write};
        self.sent += 1;
        let fail = self.sent.is_multiple_of(FAIL_EVERY);
        let path = if fail { "/fail" } else { "/" };
        write!(self.stream, "GET {path} HTTP/1.1\r\nHost: api.demo\r\n\r\n")?;
        let mut chunk = [0u8; 4096];
        let status = loop {
            if let Some(head) = response_head(&self.buf) {
                let (status, total) = head?;
                if self.buf.len() >= total {
                    self.buf.drain(..total);
                    break status;
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        match (fail, status) {
            (false, 200) => self.answers.ok.fetch_add(1, Ordering::Relaxed),
            (true, 500) => self.answers.failed.fetch_add(1, Ordering::Relaxed),
            _ => {
                return Err(std::io::Error::other(format!(
                    "GET {path}: status {status}"
                )));
            }
        };
        Ok(())
    }
}

/// The client's answer counts sampled every 50 ms: what it generated over any window.
#[derive(Clone, Default)]
struct ClientLog(Arc<Mutex<Vec<(Instant, u64, u64)>>>);

impl ClientLog {
    fn start(answers: Arc<Answers>) -> (ClientLog, tokio::task::JoinHandle<()>) {
        let log = ClientLog::default();
        let samples = log.0.clone();
        let task = tokio::spawn(async move {
            loop {
                samples.lock().unwrap().push((
                    Instant::now(),
                    answers.ok.load(Ordering::Relaxed),
                    answers.failed.load(Ordering::Relaxed),
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (log, task)
    }

    /// The counts at the last sample taken by `at`.
    fn at(&self, at: Instant) -> (Instant, u64, u64) {
        let samples = self.0.lock().unwrap();
        *samples
            .iter()
            .rev()
            .find(|(t, _, _)| *t <= at)
            .unwrap_or(&samples[0])
    }

    /// Requests per second and success rate the client got from `from` to `to`.
    fn between(&self, from: Instant, to: Instant) -> (f64, f64) {
        let (t0, ok0, failed0) = self.at(from);
        let (t1, ok1, failed1) = self.at(to);
        let (ok, failed) = ((ok1 - ok0) as f64, (failed1 - failed0) as f64);
        let seconds = t1.duration_since(t0).as_secs_f64();
        ((ok + failed) / seconds, ok / (ok + failed))
    }
}

/// B's application: 500 on `/fail`, else 200.
fn start_app(b: &Netns) -> tokio::task::JoinHandle<()> {
    let listener = b.listen(APP_PORT);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_h1_or_h2(stream, |request| {
                let status = if request.uri().path() == "/fail" {
                    500
                } else {
                    200
                };
                async move {
                    hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(b"api\n")))
                        .unwrap()
                }
            }));
        }
    })
}

/// One run of `sigil stat <args>` in C: its exit status, stdout and stderr, and when it
/// started and ended.
struct StatRun {
    args: String,
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    started: Instant,
    ended: Instant,
}

async fn sigil_stat(c: &Netns, args: &[&str]) -> StatRun {
    let mut command = c.command(&[sigil_exe(), "stat"]);
    command.args(args);
    let started = Instant::now();
    let out = tokio::process::Command::from(command)
        .output()
        .await
        .expect("running sigil stat");
    StatRun {
        args: args.join(" "),
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        started,
        ended: Instant::now(),
    }
}

/// The first `count` lines `sigil stat <args> --watch` prints (within 10 s); then kills it.
async fn watch_lines(c: &Netns, args: &[&str], count: usize) -> Vec<String> {
    use tokio::io::AsyncBufReadExt;
    let mut command = c.command(&[sigil_exe(), "stat", "--watch"]);
    command.args(args).stdout(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .expect("running sigil stat --watch");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            Ok(Ok(Some(line))) => out.push(line),
            other => panic!("sigil stat --watch {args:?} after {out:?}: {other:?}"),
        }
    }
    out
}

/// The row `name` of a `-o json` run.
fn row(run: &StatRun, name: &str) -> Value {
    assert!(run.success, "sigil stat {}: {}", run.args, run.stderr);
    let stats: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("sigil stat {}: {e}: {}", run.args, run.stdout));
    stats["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("sigil stat {}: no row {name}: {stats}", run.args))
        .clone()
}

/// Checks a row's rate and success rate against the client's over `window`, within
/// [`TOLERANCE`], and that it has latencies (and, if `connections`, TCP connections). Prints
/// both.
fn check(
    run: &StatRun,
    name: &str,
    client: (f64, f64),
    connections: bool,
    unmet: &mut Vec<String>,
) {
    let row = row(run, name);
    let rps = row["requests_per_second"].as_f64().unwrap_or(f64::NAN);
    let success = row["success_rate"].as_f64().unwrap_or(f64::NAN);
    let (client_rps, client_success) = client;
    println!(
        "sigil stat {}: {name}: {rps:.1} req/s, success {:.2}% (client: {client_rps:.1} req/s, \
         {:.2}%), p50/p95/p99 {} / {} / {} s, TCP {}",
        run.args,
        success * 100.0,
        client_success * 100.0,
        row["latency_p50_seconds"],
        row["latency_p95_seconds"],
        row["latency_p99_seconds"],
        row["tcp_connections"]
    );
    for (what, got, want) in [
        ("requests/s", rps, client_rps),
        ("success rate", success, client_success),
    ] {
        // NaN (no such value) is out of tolerance too.
        let within = (got - want).abs() <= want * TOLERANCE;
        if !within {
            unmet.push(format!(
                "sigil stat {}: {name}'s {what} {got} is not the client's {want} ±{}%",
                run.args,
                TOLERANCE * 100.0
            ));
        }
    }
    let latencies: Vec<f64> = ["p50", "p95", "p99"]
        .iter()
        .filter_map(|q| row[format!("latency_{q}_seconds")].as_f64())
        .collect();
    assert!(
        latencies.len() == 3 && latencies[0] > 0.0 && latencies.windows(2).all(|w| w[0] <= w[1]),
        "sigil stat {}: {name}'s latencies: {row}",
        run.args
    );
    if connections {
        assert!(
            row["tcp_connections"].as_f64() >= Some(1.0),
            "sigil stat {}: {name} shows no TCP connection: {row}",
            run.args
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_stat_prints_the_rates_and_success_rates_the_client_generated() {
    require_root(
        "this test creates network namespaces, installs iptables rules in them and runs \
         processes as other uids: run it as root (CI does)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "members:\n\
             - {{ip: {A_IP}, id: \"{CLIENT_ID}\"}}\n\
             - {{ip: {B_IP}, id: \"{API_ID}\"}}\n\
             services:\n\
             - namespace: demo\n  \
               name: api\n  \
               clusterIPs: [{}]\n  \
               ports:\n  \
               - {{name: http, port: {}, targetPort: {APP_PORT}, appProtocol: http}}\n  \
               endpoints:\n  \
               - {{ip: {B_IP}}}\n",
            CLUSTER_IP.ip(),
            CLUSTER_IP.port()
        ),
    )
    .unwrap();
    let node = Node::new(NETNS_PREFIX, C_IP);
    let a = node.add_pod("a", A_IP);
    let b = node.add_pod("b", B_IP);
    let app = start_app(&b);
    let host = MeshHost::start(
        dir.path(),
        &[(A_UID, CLIENT_ID), (B_UID, API_ID)],
        "1h",
        &["--mesh-file", mesh_file.to_str().unwrap()],
    )
    .await;
    proxy_init(&a, A_UID);
    proxy_init(&b, B_UID);
    let a_proxy = PodProxy::start(
        &a,
        A_IP,
        None,
        A_UID,
        &host.socket,
        &[],
        dir.path().join("proxy-a.log"),
        &node.c,
    )
    .await;
    let b_proxy = PodProxy::start(
        &b,
        B_IP,
        None,
        B_UID,
        &host.socket,
        &[],
        dir.path().join("proxy-b.log"),
        &node.c,
    )
    .await;
    let (a_metrics, b_metrics) = (a_proxy.metrics.to_string(), b_proxy.metrics.to_string());
    let prometheus = Prometheus::start(
        &node.c,
        C_IP,
        &[a_proxy.metrics, b_proxy.metrics],
        dir.path(),
    )
    .await;
    let prometheus_url = format!("http://{}", prometheus.addr);
    // A's proxy balances the cluster IP once it has the Service from the agent.
    a_proxy.wait_for_services(1).await;

    // Errors say what to do: no Prometheus there, or a target that is no proxy (Prometheus's
    // own /metrics).
    let dead = sigil_stat(&node.c, &["--prometheus", &format!("http://{C_IP}:9")]).await;
    assert!(
        dead.code == Some(2) && dead.stderr.contains("is the URL right and Prometheus up?"),
        "sigil stat at no Prometheus: {:?} {}",
        dead.code,
        dead.stderr
    );
    let not_a_proxy = format!("{C_IP}:{PROMETHEUS_PORT}");
    let wrong = sigil_stat(&node.c, &["--metrics", &not_a_proxy, "--window", "1s"]).await;
    assert!(
        wrong.code == Some(2)
            && wrong
                .stderr
                .contains("not a sigil proxy's metrics endpoint"),
        "sigil stat at Prometheus's own /metrics: {:?} {}",
        wrong.code,
        wrong.stderr
    );
    println!("sigil stat errors:\n  {}  {}", dead.stderr, wrong.stderr);

    // Prometheus applies its targets a few seconds after it starts: the load starts once it
    // scrapes both proxies, so that its windows hold only samples of the load.
    let deadline = Instant::now() + Duration::from_secs(20);
    while prometheus.query("up == 1").await.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped both proxies: {:?}",
            prometheus.query("up").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The load: RATE requests/s from A to the Service for LOAD, while the client's counts are
    // sampled.
    let answers = Arc::new(Answers::default());
    let (client_log, sampler) = ClientLog::start(answers.clone());
    let load = {
        let (a_name, answers) = (a.name.clone(), answers.clone());
        tokio::task::spawn_blocking(move || {
            open_loop(
                move || StatClient::connect(&a_name, answers.clone()),
                RATE,
                CONNECTIONS,
                LOAD,
                &[],
                &[],
            )
        })
    };
    tokio::time::sleep(WARM_UP).await;

    let window = |d: Duration| format!("{}s", d.as_secs());
    let (prometheus_window, scrape_window) = (window(PROMETHEUS_WINDOW), window(SCRAPE_WINDOW));
    let from_prometheus = |by: &'static str, output: &'static str| {
        let args = [
            "--prometheus",
            prometheus_url.as_str(),
            "--by",
            by,
            "--window",
            prometheus_window.as_str(),
            "-o",
            output,
        ];
        let c = &node.c;
        async move { sigil_stat(c, &args).await }
    };
    let prometheus_by_pod = from_prometheus("pod", "json").await;
    let prometheus_by_service = from_prometheus("service", "json").await;
    let prometheus_table = from_prometheus("pod", "table").await;
    let from_proxies = |by: &'static str, output: &'static str| {
        let args = [
            "--metrics",
            a_metrics.as_str(),
            b_metrics.as_str(),
            "--by",
            by,
            "--window",
            scrape_window.as_str(),
            "-o",
            output,
        ];
        let c = &node.c;
        async move { sigil_stat(c, &args).await }
    };
    let watch_args = [
        "--metrics",
        b_metrics.as_str(),
        "--window",
        "1s",
        "--interval",
        "1s",
        "-o",
        "json",
    ];
    let (proxies_by_pod, proxies_by_peer, proxies_table, watched) = tokio::join!(
        from_proxies("pod", "json"),
        from_proxies("peer", "json"),
        from_proxies("service", "table"),
        watch_lines(&node.c, &watch_args, WATCHED),
    );
    let result: OpenLoop = load.await.unwrap();
    sampler.abort();
    drop(app);
    println!(
        "client: {} answered, {} errors, {} unsent in {:?} ({} ok, {} 500s); first error {:?}",
        result.latencies.len(),
        result.errors,
        result.unsent,
        result.elapsed,
        answers.ok.load(Ordering::Relaxed),
        answers.failed.load(Ordering::Relaxed),
        result.first_error
    );
    for run in [&prometheus_table, &proxies_table] {
        assert!(run.success, "sigil stat {}: {}", run.args, run.stderr);
        println!("$ sigil stat {}\n{}", run.args, run.stdout);
    }
    assert_eq!(
        result.errors,
        0,
        "the client's requests failed: {:?}\n--- A's proxy:\n{}\n--- B's proxy:\n{}",
        result.first_error,
        a_proxy.logs(),
        b_proxy.logs()
    );

    // What the client generated over each run's window: Prometheus's ends when it is asked;
    // the direct scrape spans the run.
    let prometheus_client =
        |run: &StatRun| client_log.between(run.ended - PROMETHEUS_WINDOW, run.ended);
    let scrape_client = |run: &StatRun| client_log.between(run.started, run.ended);
    let mut unmet = Vec::new();
    // Prometheus names B's proxy by its target, as the direct scrape does.
    check(
        &prometheus_by_pod,
        &b_metrics,
        prometheus_client(&prometheus_by_pod),
        true,
        &mut unmet,
    );
    check(
        &prometheus_by_service,
        "demo/api",
        prometheus_client(&prometheus_by_service),
        false,
        &mut unmet,
    );
    check(
        &proxies_by_pod,
        &b_metrics,
        scrape_client(&proxies_by_pod),
        true,
        &mut unmet,
    );
    check(
        &proxies_by_peer,
        "demo/client",
        scrape_client(&proxies_by_peer),
        false,
        &mut unmet,
    );
    // --watch redraws: a JSON document per interval, each with the load in it.
    for line in &watched {
        let stats: Value = serde_json::from_str(line).unwrap();
        let rps = stats["rows"][0]["requests_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(rps > 0.0, "sigil stat --watch printed {line}");
    }
    println!(
        "sigil stat --watch {}: {} documents",
        watch_args.join(" "),
        watched.len()
    );
    assert!(unmet.is_empty(), "{}", unmet.join("\n"));
}
