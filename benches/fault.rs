//! Fault benchmark (a program that prints numbers, not a test): a small mesh under constant load
//! through the faults a cluster inflicts on sigil, printing for each the requests sent, those
//! that failed, and how long failures went on after the fault ended.
//!
//! The mesh is the one of tests/e2e/proxy_explicit.rs (`ProxyPair` in tests/harness): a `sigil ca
//! serve` (state directory, client-certificate auth), one `sigil agent run --attestor unix`, and
//! two `sigil proxy run --explicit` processes running as two uids (so two identities, each
//! renewed by the agent): load → web proxy (plaintext in, mTLS out) → db proxy (mTLS in) → an
//! HTTP backend in this program. The load is `BENCH_FAULT_RATE` (40) requests/s, each on a new
//! connection, so every request is a new mTLS handshake between the proxies and fails once
//! either proxy's certificate has expired; a request fails if no `200 ok` is back within 2 s.
//!
//! Certificates live `BENCH_FAULT_TTL_SECS` (20) seconds and renew at half-life. The faults, in
//! order, each preceded by the load alone for a few seconds:
//!
//! 1. the CA process killed for 0.6 × TTL, then started again on the same address (the outage
//!    starts right after a renewal, so the held certificates outlive it: a CA outage is survived
//!    for TTL/2 at least, up to TTL when it starts just after a renewal);
//! 2. the same for 1.2 × TTL: the certificates expire during the outage, and requests fail
//!    from then until they are renewed after the CA's return;
//! 3. the agent killed (SIGKILL) and started again;
//! 4. the CA restarted as a rollout does it: SIGTERM (it serves on for its grace period, then
//!    exits), and a new process on the same address.
//!
//! "Recovery" is from the end of the fault (the CA or the agent ready again) to the last failed
//! request, 0 when no request failed after it. Needs root (the proxies run as two uids).
//!
//! Run: `cargo bench --bench fault`.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigil_test_harness::load::env_or;
use sigil_test_harness::{CaProcess, DB_ID, PairSpec, ProxyPair, http_app, request};

const WEB_UID: u32 = 41201;
const DB_UID: u32 = 41202;
/// A request with no answer within this long counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Load alone before each fault, and after its end.
const SETTLE: Duration = Duration::from_secs(5);

/// When each request was sent and whether it succeeded.
type Outcomes = Arc<Mutex<Vec<(Instant, bool)>>>;

/// Sends one request per `interval` on a new connection to `entry`, forever.
async fn load(entry: SocketAddr, interval: Duration, outcomes: Outcomes) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcomes = outcomes.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect(entry).await.ok()?;
                request(&mut stream).await.then_some(())
            };
            let ok = matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, attempt).await,
                Ok(Some(()))
            );
            outcomes.lock().expect("not poisoned").push((sent, ok));
        });
    }
}

/// One fault's numbers.
struct Row {
    fault: String,
    sent: usize,
    failed: usize,
    /// From the end of the fault to the last failure (zero if none came after it).
    recovery: Option<Duration>,
    /// From the start of the fault to the first failure.
    first_failure: Option<Duration>,
}

/// What happened to requests sent between `from` and `to` (the fault ran from `from` to
/// `fault_end`).
fn summarize(
    fault: String,
    outcomes: &Outcomes,
    from: Instant,
    fault_end: Instant,
    to: Instant,
) -> Row {
    let all = outcomes.lock().expect("not poisoned");
    let window: Vec<&(Instant, bool)> = all.iter().filter(|(t, _)| *t >= from && *t < to).collect();
    let failures: Vec<Instant> = window
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| *t)
        .collect();
    Row {
        fault,
        sent: window.len(),
        failed: failures.len(),
        recovery: failures
            .last()
            .map(|last| last.saturating_duration_since(fault_end)),
        first_failure: failures.first().map(|first| first.duration_since(from)),
    }
}

/// Waits until the web proxy has put a new certificate in use (so an outage starting now meets
/// a certificate with its whole lifetime ahead).
async fn wait_for_renewal(pair: &ProxyPair, ttl: Duration) {
    let series = "sigil_proxy_cert_updates_total";
    let before = pair.web.metric(series).await;
    let deadline = Instant::now() + ttl;
    while pair.web.metric(series).await <= before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill_ca(ca: &mut CaProcess, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &ca.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
    let _ = ca.child.wait();
}

async fn start_ca(pair: &mut ProxyPair, dir: &std::path::Path) {
    let (grpc, admin) = (pair.host.ca.grpc, pair.host.ca.admin);
    pair.host.ca = CaProcess::start_on(dir, None, &pair.host.offline.serve_args(), grpc, admin);
    pair.host.ca.wait_ready().await;
}

fn main() -> ExitCode {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building the bench's runtime")
        .block_on(bench())
}

async fn bench() -> ExitCode {
    let ttl = Duration::from_secs(env_or("BENCH_FAULT_TTL_SECS", 20));
    let rate: u32 = env_or("BENCH_FAULT_RATE", 40);
    let settings: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let command: Vec<String> = std::env::args().collect();
    println!(
        "Fault benchmark: CA, agent and two explicit proxies on loopback, under constant load"
    );
    println!("command: {} {}", settings.join(" "), command.join(" "));
    println!(
        "certificates {} s (BENCH_FAULT_TTL_SECS), renewed at half-life; {rate} requests/s (BENCH_FAULT_RATE), each a new mTLS connection between the proxies; failed = no 200 within {} s\n",
        ttl.as_secs(),
        REQUEST_TIMEOUT.as_secs()
    );

    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let mut pair = ProxyPair::start(
        dir.path(),
        PairSpec {
            uids: (WEB_UID, DB_UID),
            expect_db: DB_ID,
            db_args: &[],
            cert_ttl: &format!("{}s", ttl.as_secs()),
            agent_args: &[],
            app: http_app().await,
        },
    )
    .await;
    let outcomes: Outcomes = Arc::default();
    let load_task = tokio::spawn(load(
        pair.web_out,
        Duration::from_secs(1) / rate,
        outcomes.clone(),
    ));
    let mut rows = Vec::new();

    for factor in [0.6, 1.2] {
        tokio::time::sleep(SETTLE).await;
        wait_for_renewal(&pair, ttl).await;
        let start = Instant::now();
        kill_ca(&mut pair.host.ca, "-KILL");
        tokio::time::sleep(ttl.mul_f64(factor)).await;
        start_ca(&mut pair, dir.path()).await;
        let end = Instant::now();
        tokio::time::sleep(SETTLE).await;
        rows.push(summarize(
            format!(
                "CA down {factor} × TTL ({:.0} s, from a renewal)",
                ttl.mul_f64(factor).as_secs_f64()
            ),
            &outcomes,
            start,
            end,
            Instant::now(),
        ));
    }

    tokio::time::sleep(SETTLE).await;
    let start = Instant::now();
    pair.host.stop_agent();
    pair.host.start_agent("agent-restarted.log").await;
    let end = Instant::now();
    tokio::time::sleep(SETTLE).await;
    rows.push(summarize(
        format!(
            "agent killed and restarted (back in {:.1} s)",
            (end - start).as_secs_f64()
        ),
        &outcomes,
        start,
        end,
        Instant::now(),
    ));

    tokio::time::sleep(SETTLE).await;
    let start = Instant::now();
    kill_ca(&mut pair.host.ca, "-TERM");
    start_ca(&mut pair, dir.path()).await;
    let end = Instant::now();
    tokio::time::sleep(SETTLE).await;
    rows.push(summarize(
        format!(
            "CA restarted: SIGTERM, exit, start (back in {:.1} s)",
            (end - start).as_secs_f64()
        ),
        &outcomes,
        start,
        end,
        Instant::now(),
    ));
    load_task.abort();

    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "| fault | requests sent | failed | first failure after the fault began | recovery (fault end → last failure) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.fault,
            row.sent,
            row.failed,
            secs(row.first_failure),
            secs(row.recovery)
        );
    }
    let expired = (
        pair.web.metric("sigil_proxy_cert_expired_total").await,
        pair.db.metric("sigil_proxy_cert_expired_total").await,
    );
    println!(
        "\nsigil_proxy_cert_expired_total: web {}, db {} (certificates that expired in use)",
        expired.0, expired.1
    );
    ExitCode::SUCCESS
}
