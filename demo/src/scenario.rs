//! The demo's steps, in order: start the CA, the agent, the backend application and the two
//! proxies; send allowed and denied traffic; rotate certificates under load. Each step prints
//! its line (and details) as it finishes and adds its checks.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::checks::{self, IdentityEvidence, Outcome, Serials};
use crate::components::{
    AGENT_ID, ALLOW_POLICY, Agent, BACKEND_ID, BACKEND_PROXY, Ca, ComponentError, FRONTEND_ID,
    FRONTEND_PROXY, Proxy, Workload, audit_grants, free_addr,
};
use crate::config::{DemoConfig, TRUST_DOMAIN};
use crate::report::{Check, Reporter, format_secs, metric_change, metric_value, short_serial};
use crate::scrape::{self, Metrics, ScrapeError, changes};
use crate::services::{self, Backend, Connection, ServiceError};
use crate::workdir::{Workdir, WorkdirError, current_uid};

/// Steps in the report.
pub const STEPS: usize = 6;
/// How long in-process components get to stop at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long log lines and counters may take to show what just happened.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the rotation step reads the proxies' certificates.
const CERT_POLL: Duration = Duration::from_millis(200);
/// Keep-alive connections sending requests during the rotation, and the pause between their
/// requests (a few hundred requests a second in all).
const KEEPALIVE_WORKERS: usize = 2;
const KEEPALIVE_PAUSE: Duration = Duration::from_millis(4);
/// The pause between new connections (one request each) during the rotation.
const NEW_CONNECTION_PAUSE: Duration = Duration::from_millis(40);
/// How many characters of the backend's answer the report quotes.
const QUOTE_CHARS: usize = 56;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Scrape(#[from] ScrapeError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Workdir(#[from] WorkdirError),
    #[error("{0}")]
    Unexpected(String),
}

/// Everything started so far, stopped by [`Running::stop`] (and the proxies killed on drop
/// whatever happens).
pub struct Running {
    shutdown: watch::Sender<bool>,
    ca: Option<Ca>,
    agent: Option<Agent>,
    backend_app: Option<Backend>,
    backend: Option<Proxy>,
    frontend: Option<Proxy>,
}

impl Running {
    pub fn new() -> Running {
        Running {
            shutdown: watch::channel(false).0,
            ca: None,
            agent: None,
            backend_app: None,
            backend: None,
            frontend: None,
        }
    }

    /// Kills the proxies, then stops the agent and the CA.
    pub async fn stop(mut self) {
        self.frontend.take();
        self.backend.take();
        self.backend_app.take();
        let _ = self.shutdown.send(true);
        if let Some(agent) = self.agent.take() {
            agent.stopped(STOP_TIMEOUT).await;
        }
        if let Some(ca) = self.ca.take() {
            ca.stopped(STOP_TIMEOUT).await;
        }
    }
}

impl Default for Running {
    fn default() -> Self {
        Running::new()
    }
}

/// The addresses traffic goes through.
struct Topology {
    /// The frontend proxy's outbound listener, where the frontend sends its requests.
    frontend_out: SocketAddr,
    /// The backend proxy's inbound (mTLS) listener.
    backend_in: SocketAddr,
}

/// Runs every step, stopping at the first that cannot go on; adds each check to `checks` as
/// it is made (so they survive an interruption).
pub async fn run<W: Write>(
    config: &DemoConfig,
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
    checks: &mut Vec<Check>,
) {
    if let Err((step, e)) = steps(config, workdir, report, running, checks).await {
        report.line(&format!("FAILED ({step}): {e}"));
        checks.push(Check::fail(step, e.to_string()));
    }
}

async fn steps<W: Write>(
    config: &DemoConfig,
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
    checks: &mut Vec<Check>,
) -> Result<(), (&'static str, StepError)> {
    let setup = |e: StepError| ("setup", e);
    start_ca(config, workdir, report, running)
        .await
        .map_err(setup)?;
    start_agent(config, workdir, report, running)
        .await
        .map_err(setup)?;
    let topology = start_services(workdir, report, running)
        .await
        .map_err(setup)?;
    checks.push(Check::pass(
        "setup",
        "CA, agent, backend app and both proxies ready",
    ));
    allowed(config, report, running, &topology, checks)
        .await
        .map_err(|e| ("allowed", e))?;
    denied(config, report, running, &topology, checks)
        .await
        .map_err(|e| ("denied", e))?;
    rotation(config, workdir, report, running, &topology, checks)
        .await
        .map_err(|e| ("rotated", e))?;
    Ok(())
}

fn unexpected(what: &str) -> StepError {
    StepError::Unexpected(what.to_string())
}

async fn start_ca<W: Write>(
    config: &DemoConfig,
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
) -> Result<(), StepError> {
    let started = Instant::now();
    let ca = Ca::start(&workdir.path, config.cert_ttl, running.shutdown.subscribe()).await?;
    let metrics = Metrics::scrape(ca.admin).await?;
    report.step("CA started (in this process)", started.elapsed());
    report.detail(&format!(
        "trust domain {TRUST_DOMAIN}, self-signed root serial {}, valid until {}",
        short_serial(&ca.root.serial_hex),
        ca.root.not_after.date()
    ));
    report.detail(&format!(
        "gRPC+TLS on {}, metrics on http://{}/metrics, state in ca-state/",
        ca.grpc, ca.admin
    ));
    report.detail(&format!(
        "agent client certificate issued offline: serial {}",
        short_serial(&ca.agent_cert_serial)
    ));
    report.detail(&metric_value(
        "sigil_ca_trust_bundle_roots",
        metrics.sum("sigil_ca_trust_bundle_roots", &[]),
    ));
    running.ca = Some(ca);
    Ok(())
}

async fn start_agent<W: Write>(
    config: &DemoConfig,
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
) -> Result<(), StepError> {
    let started = Instant::now();
    let ca = running.ca.as_ref().ok_or_else(|| unexpected("no CA"))?;
    let uid = current_uid()?;
    let workloads = [
        Workload {
            uid,
            path: workdir.link_self(FRONTEND_PROXY)?,
            id: FRONTEND_ID,
            app: "frontend",
        },
        Workload {
            uid,
            path: workdir.link_self(BACKEND_PROXY)?,
            id: BACKEND_ID,
            app: "backend",
        },
    ];
    let agent = Agent::start(
        &workdir.path,
        ca,
        &workloads,
        config.cert_ttl,
        running.shutdown.subscribe(),
    )
    .await?;
    report.step(
        "node agent started (in this process, unix attestor)",
        started.elapsed(),
    );
    report.detail(&format!(
        "socket run/agent.sock; certificates live {}, renewed at half-life",
        format_secs(config.cert_ttl)
    ));
    for w in &workloads {
        let name = w.path.file_name().unwrap_or_default().to_string_lossy();
        report.detail(&format!(
            "uid {} + bin/{name:<15} → {} (app={})",
            w.uid, w.id, w.app
        ));
    }
    report.detail(&format!(
        "policies.yaml: STRICT mTLS mesh-wide; {ALLOW_POLICY} lets only sa/frontend GET /api/* on app=backend"
    ));
    running.agent = Some(agent);
    Ok(())
}

/// A proxy's `/certs`: identity, serial and expiry.
#[derive(Clone, Debug)]
struct HeldCert {
    identity: String,
    serial: String,
    not_after_unix: i64,
    expires_in: i64,
}

async fn held_cert(proxy: &Proxy) -> Result<HeldCert, StepError> {
    let certs = scrape::get_json(proxy.admin, "/certs").await?;
    let text = |key: &str| certs[key].as_str().unwrap_or_default().to_string();
    Ok(HeldCert {
        identity: text("identity"),
        serial: text("serial"),
        not_after_unix: certs["not_after_unix"].as_i64().unwrap_or(0),
        expires_in: certs["expires_in_seconds"].as_i64().unwrap_or(0),
    })
}

/// Polls `check` until it holds or [`SETTLE_TIMEOUT`] passes; returns whether it held.
async fn settle<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_services<W: Write>(
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
) -> Result<Topology, StepError> {
    let started = Instant::now();
    let agent = running
        .agent
        .as_ref()
        .ok_or_else(|| unexpected("no agent"))?;
    let (socket, agent_admin) = (agent.socket.clone(), agent.admin);
    let backend_app = Backend::start().await?;
    let app = backend_app.addr;
    running.backend_app = Some(backend_app);
    let topology = Topology {
        frontend_out: free_addr()?,
        backend_in: free_addr()?,
    };
    let bin = |name: &str| -> PathBuf { workdir.path.join("bin").join(name) };
    let backend = Proxy::start(
        BACKEND_PROXY,
        &bin(BACKEND_PROXY),
        &workdir.logs(),
        &socket,
        &[
            "--inbound-listen".into(),
            topology.backend_in.to_string(),
            "--inbound-app".into(),
            app.to_string(),
        ],
    )
    .await?;
    let backend = running.backend.insert(backend);
    let frontend = Proxy::start(
        FRONTEND_PROXY,
        &bin(FRONTEND_PROXY),
        &workdir.logs(),
        &socket,
        &[
            "--outbound-listen".into(),
            topology.frontend_out.to_string(),
            "--outbound-upstream".into(),
            topology.backend_in.to_string(),
            "--outbound-identity".into(),
            BACKEND_ID.into(),
        ],
    )
    .await?;
    let frontend = running.frontend.insert(frontend);
    // Ready means certificate and bundle; the policies come on their own stream.
    let backend_metrics = backend.metrics;
    let has_policies = settle(|| async move {
        Metrics::scrape(backend_metrics)
            .await
            .is_ok_and(|m| m.sum("sigil_proxy_policy_updates_total", &[]) >= 1.0)
    })
    .await;
    if !has_policies {
        return Err(unexpected(
            "the backend proxy never received its policies from the agent",
        ));
    }
    let (front_cert, back_cert) = (held_cert(frontend).await?, held_cert(backend).await?);
    let ca_admin = running.ca.as_ref().map(|ca| ca.admin);
    let ca_metrics = match ca_admin {
        Some(addr) => Metrics::scrape(addr).await?,
        None => Metrics::default(),
    };
    let agent_metrics = Metrics::scrape(agent_admin).await?;
    report.step(
        "backend app and both proxies ready (explicit mode)",
        started.elapsed(),
    );
    report.detail(&format!(
        "frontend (this process) → {} frontend-proxy [pid {}] ══mTLS══▶ {} backend-proxy [pid {}] → {app} backend app",
        topology.frontend_out, frontend.pid, topology.backend_in, backend.pid
    ));
    for (name, cert) in [(FRONTEND_PROXY, &front_cert), (BACKEND_PROXY, &back_cert)] {
        report.detail(&format!(
            "{name:<14} holds {}  serial {}  expires in {}s",
            cert.identity,
            short_serial(&cert.serial),
            cert.expires_in
        ));
    }
    report.detail(&format!(
        "{}, {} (the agent's own, frontend, backend)",
        metric_value(
            "sigil_ca_certs_issued_total",
            ca_metrics.sum("sigil_ca_certs_issued_total", &[]),
        ),
        metric_value(
            "sigil_agent_identities",
            agent_metrics.sum("sigil_agent_identities", &[]),
        )
    ));
    Ok(topology)
}

fn proxies(running: &mut Running) -> Result<(&mut Proxy, &mut Proxy), StepError> {
    match (running.frontend.as_mut(), running.backend.as_mut()) {
        (Some(f), Some(b)) => Ok((f, b)),
        _ => Err(unexpected("the proxies are not running")),
    }
}

/// Sends `requests` on one keep-alive connection: each `(method, path)` in turn.
async fn send_all(addr: SocketAddr, requests: &[(&str, &str)]) -> Vec<Outcome> {
    let mut connection = match Connection::open(addr).await {
        Ok(c) => c,
        Err(e) => return requests.iter().map(|_| Err(e.to_string())).collect(),
    };
    let mut outcomes = Vec::new();
    for (method, path) in requests {
        outcomes.push(
            connection
                .send(method, path)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    outcomes
}

/// An identity without `spiffe://<trust domain>/`.
fn short_id(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or(id, |(_, path)| path)
}

fn quote(text: &str) -> String {
    let text = text.trim_end();
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The first access-log record of `proxy` with `direction` that names `field`.
fn access_field(proxy: &Proxy, direction: &str, field: &str) -> Option<String> {
    proxy
        .access_log()
        .iter()
        .filter(|l| l["direction"] == direction)
        .find_map(|l| l[field].as_str().map(str::to_string))
}

async fn allowed<W: Write>(
    config: &DemoConfig,
    report: &mut Reporter<W>,
    running: &mut Running,
    topology: &Topology,
    checks: &mut Vec<Check>,
) -> Result<(), StepError> {
    let started = Instant::now();
    let (frontend, backend) = proxies(running)?;
    let before = (
        Metrics::scrape(frontend.metrics).await?,
        Metrics::scrape(backend.metrics).await?,
    );
    let requests = vec![("GET", "/api/orders"); config.requests as usize];
    // One keep-alive connection, closed at the end so both proxies write its access-log line.
    let outcomes = send_all(topology.frontend_out, &requests).await;
    let (frontend, backend) = (&*frontend, &*backend);
    settle(|| async {
        access_field(backend, "inbound", "source_identity").is_some()
            && access_field(frontend, "outbound", "destination_identity").is_some()
    })
    .await;
    let backend_saw = access_field(backend, "inbound", "source_identity");
    let frontend_saw = access_field(frontend, "outbound", "destination_identity");
    let after = (
        Metrics::scrape(frontend.metrics).await?,
        Metrics::scrape(backend.metrics).await?,
    );
    let (front_cert, back_cert) = (held_cert(frontend).await?, held_cert(backend).await?);
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(a) if a.status == 200))
        .count();
    report.step(
        &format!("allowed: GET /api/orders → 200 ({ok}/{})", outcomes.len()),
        started.elapsed(),
    );
    if let Some(Ok(answer)) = outcomes.first() {
        report.detail(&format!(
            "answered by the backend app: {}",
            quote(&answer.body)
        ));
    }
    report.detail(&format!(
        "frontend ({FRONTEND_ID}) → backend ({BACKEND_ID}): verified both ways"
    ));
    report.detail(&format!(
        "  backend-proxy access log:  source_identity {}",
        backend_saw.as_deref().unwrap_or("(none)")
    ));
    report.detail(&format!(
        "  frontend-proxy access log: destination_identity {}",
        frontend_saw.as_deref().unwrap_or("(none)")
    ));
    let decision = "sigil_proxy_authz_decisions_total";
    for (proxy, before, after, name) in [
        (BACKEND_PROXY, &before.1, &after.1, decision),
        (
            BACKEND_PROXY,
            &before.1,
            &after.1,
            "sigil_proxy_connections_opened_total",
        ),
        (
            FRONTEND_PROXY,
            &before.0,
            &after.0,
            "sigil_proxy_connections_opened_total",
        ),
    ] {
        for (series, old, new) in changes(before, after, name) {
            report.detail(&format!("{proxy}: {}", metric_change(&series, old, new)));
        }
    }
    let allow = |m: &Metrics| {
        m.sum(
            decision,
            &[
                ("decision", "allow"),
                ("policy", ALLOW_POLICY),
                ("layer", "l7"),
            ],
        )
    };
    checks.push(checks::allowed(
        &outcomes,
        allow(&after.1) - allow(&before.1),
    ));
    checks.push(checks::identities(
        FRONTEND_ID,
        BACKEND_ID,
        &IdentityEvidence {
            frontend_cert: &front_cert.identity,
            backend_cert: &back_cert.identity,
            backend_saw: backend_saw.as_deref(),
            frontend_saw: frontend_saw.as_deref(),
        },
    ));
    Ok(())
}

async fn denied<W: Write>(
    config: &DemoConfig,
    report: &mut Reporter<W>,
    running: &mut Running,
    topology: &Topology,
    checks: &mut Vec<Check>,
) -> Result<(), StepError> {
    let started = Instant::now();
    let seen = running
        .backend_app
        .as_ref()
        .map(|app| app.seen.clone())
        .ok_or_else(|| unexpected("no backend app"))?;
    let (_, backend) = proxies(running)?;
    let backend = &*backend;
    let before = Metrics::scrape(backend.metrics).await?;
    let reached_before = seen.count("POST", "/api/orders") + seen.count("GET", "/admin");
    let requests: Vec<(&str, &str)> = (0..config.requests)
        .map(|i| {
            if i % 2 == 0 {
                ("POST", "/api/orders")
            } else {
                ("GET", "/admin")
            }
        })
        .collect();
    let outcomes = send_all(topology.frontend_out, &requests).await;
    let reached = seen.count("POST", "/api/orders") + seen.count("GET", "/admin") - reached_before;
    let mid = Metrics::scrape(backend.metrics).await?;
    let received = services::plaintext_attempt(topology.backend_in).await?;
    let failures = "sigil_proxy_tls_handshake_failures_total";
    let inbound_failures = |m: &Metrics| m.sum(failures, &[("direction", "inbound")]);
    let mid_failures = inbound_failures(&mid);
    let backend_metrics = backend.metrics;
    settle(|| async move {
        Metrics::scrape(backend_metrics)
            .await
            .is_ok_and(|m| inbound_failures(&m) > mid_failures)
    })
    .await;
    let after = Metrics::scrape(backend.metrics).await?;

    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(a) if a.status == 403))
        .count();
    report.step(
        &format!(
            "denied: requests outside the policy → 403 ({refused}/{})",
            outcomes.len()
        ),
        started.elapsed(),
    );
    for (method, path) in [("POST", "/api/orders"), ("GET", "/admin")] {
        let answers: Vec<&Outcome> = requests
            .iter()
            .zip(&outcomes)
            .filter(|((m, p), _)| *m == method && *p == path)
            .map(|(_, o)| o)
            .collect();
        if let Some(first) = answers.first() {
            let what = match first {
                Ok(a) => format!("{} {}", a.status, quote(&a.body)),
                Err(e) => format!("no answer: {e}"),
            };
            report.detail(&format!(
                "{:<16} → {what} (×{})",
                format!("{method} {path}"),
                answers.len()
            ));
        }
    }
    report.detail(&format!(
        "the backend app saw {reached} of them: the backend proxy answered, by policy"
    ));
    report.detail(&format!(
        "plaintext straight to backend-proxy (no client certificate) → {}",
        checks::describe_plaintext_answer(&received)
    ));
    let decisions = "sigil_proxy_authz_decisions_total";
    for (series, old, new) in changes(&before, &mid, decisions) {
        report.detail(&format!(
            "backend-proxy: {}",
            metric_change(&series, old, new)
        ));
    }
    for (series, old, new) in changes(&mid, &after, failures) {
        report.detail(&format!(
            "backend-proxy: {}",
            metric_change(&series, old, new)
        ));
    }
    let deny = |m: &Metrics| m.sum(decisions, &[("decision", "deny"), ("layer", "l7")]);
    checks.push(checks::denied(
        &outcomes,
        reached,
        deny(&mid) - deny(&before),
    ));
    checks.push(checks::plaintext(
        &received,
        inbound_failures(&after) - mid_failures,
    ));
    Ok(())
}

/// Requests made during the rotation.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    keepalive_ok: AtomicU64,
    new_connection_ok: AtomicU64,
    /// New connections that succeeded after every certificate in use at the start had expired.
    new_after_expiry: AtomicU64,
    /// Keep-alive connections opened again after one broke.
    reopened: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Load {
    fn outcome(&self, outcome: &Outcome) -> bool {
        match outcome {
            Ok(a) if a.status == 200 && a.body == services::ORDERS_BODY => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let why = match other {
                    Ok(a) => format!("{} {}", a.status, quote(&a.body)),
                    Err(e) => e.clone(),
                };
                self.first_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(why);
                false
            }
        }
    }
}

/// Sends GET /api/orders on one keep-alive connection until `until`, opening it again if it
/// breaks.
async fn keepalive_worker(addr: SocketAddr, load: Arc<Load>, until: Instant) {
    let mut connection: Option<Connection> = None;
    let mut opened_once = false;
    while Instant::now() < until {
        let conn = match connection.as_mut() {
            Some(c) => c,
            None => match Connection::open(addr).await {
                Ok(c) => {
                    if opened_once {
                        load.reopened.fetch_add(1, Ordering::Relaxed);
                    }
                    opened_once = true;
                    connection.insert(c)
                }
                Err(e) => {
                    load.outcome(&Err(e.to_string()));
                    tokio::time::sleep(KEEPALIVE_PAUSE).await;
                    continue;
                }
            },
        };
        let outcome = conn
            .send("GET", "/api/orders")
            .await
            .map_err(|e| e.to_string());
        if load.outcome(&outcome) {
            load.keepalive_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            connection = None;
        }
        tokio::time::sleep(KEEPALIVE_PAUSE).await;
    }
}

/// Sends one GET /api/orders per new connection until `until`.
async fn new_connection_worker(
    addr: SocketAddr,
    load: Arc<Load>,
    until: Instant,
    expired_at: SystemTime,
) {
    while Instant::now() < until {
        let outcome = services::request_once(addr, "GET", "/api/orders")
            .await
            .map_err(|e| e.to_string());
        if load.outcome(&outcome) {
            load.new_connection_ok.fetch_add(1, Ordering::Relaxed);
            if SystemTime::now() > expired_at {
                load.new_after_expiry.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(NEW_CONNECTION_PAUSE).await;
    }
}

async fn rotation<W: Write>(
    config: &DemoConfig,
    workdir: &Workdir,
    report: &mut Reporter<W>,
    running: &mut Running,
    topology: &Topology,
    checks: &mut Vec<Check>,
) -> Result<(), StepError> {
    let started = Instant::now();
    let ca_admin = running
        .ca
        .as_ref()
        .map(|c| c.admin)
        .ok_or_else(|| unexpected("no CA"))?;
    let agent_admin = running
        .agent
        .as_ref()
        .map(|a| a.admin)
        .ok_or_else(|| unexpected("no agent"))?;
    let (frontend, backend) = proxies(running)?;
    report.step_started(&format!(
        "rotation: certificates living {} renewed under load for {}",
        format_secs(config.cert_ttl),
        format_secs(config.rotation_window)
    ));
    let scrape_all = |f: SocketAddr, b: SocketAddr| async move {
        Ok::<_, ScrapeError>((
            Metrics::scrape(ca_admin).await?,
            Metrics::scrape(agent_admin).await?,
            Metrics::scrape(f).await?,
            Metrics::scrape(b).await?,
        ))
    };
    let before = scrape_all(frontend.metrics, backend.metrics).await?;
    let ca_log = workdir.logs().join(crate::logs::CA_LOG);
    let grants = || audit_grants(&std::fs::read_to_string(&ca_log).unwrap_or_default());
    let grants_before = grants();
    let initial = [held_cert(frontend).await?, held_cert(backend).await?];
    let expired_at = UNIX_EPOCH
        + Duration::from_secs(
            initial
                .iter()
                .map(|c| c.not_after_unix.max(0) as u64)
                .max()
                .unwrap_or(0),
        );
    let mut serials: [Vec<String>; 2] = initial.clone().map(|c| vec![c.serial]);

    let until = Instant::now() + config.rotation_window;
    let load = Arc::new(Load::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..KEEPALIVE_WORKERS {
        workers.spawn(keepalive_worker(topology.frontend_out, load.clone(), until));
    }
    workers.spawn(new_connection_worker(
        topology.frontend_out,
        load.clone(),
        until,
        expired_at,
    ));

    while Instant::now() < until {
        tokio::time::sleep(CERT_POLL).await;
        for (i, proxy) in [&mut *frontend, &mut *backend].into_iter().enumerate() {
            proxy.check_running()?;
            let Ok(cert) = held_cert(proxy).await else {
                continue;
            };
            let seen = &mut serials[i];
            if seen.last() != Some(&cert.serial) {
                report.detail(&format!(
                    "+{:<5} {:<14} renewed: serial {} → {} (expires in {}s); {} requests ok so far",
                    format_secs(started.elapsed()),
                    proxy.name,
                    seen.last().map(|s| short_serial(s)).unwrap_or("?"),
                    short_serial(&cert.serial),
                    cert.expires_in,
                    load.ok.load(Ordering::Relaxed),
                ));
                seen.push(cert.serial);
            }
        }
    }
    while workers.join_next().await.is_some() {}
    let after = scrape_all(frontend.metrics, backend.metrics).await?;

    let ok = load.ok.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let first_failure = load
        .first_failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    report.detail(&format!(
        "requests: {ok} ok, {failed} failed ({} on {KEEPALIVE_WORKERS} keep-alive connections, reopened {} times; {} on new connections, {} after the first certificates expired)",
        load.keepalive_ok.load(Ordering::Relaxed),
        load.reopened.load(Ordering::Relaxed),
        load.new_connection_ok.load(Ordering::Relaxed),
        load.new_after_expiry.load(Ordering::Relaxed),
    ));
    for (name, seen) in [FRONTEND_PROXY, BACKEND_PROXY].iter().zip(&serials) {
        let chain: Vec<&str> = seen.iter().map(|s| short_serial(s)).collect();
        report.detail(&format!("{name:<14} serials: {}", chain.join(" → ")));
    }
    let (ca0, agent0, front0, back0) = &before;
    let (ca1, agent1, front1, back1) = &after;
    let series: [(&str, &Metrics, &Metrics, &str); 7] = [
        ("CA", ca0, ca1, "sigil_ca_certs_issued_total"),
        (
            "agent",
            agent0,
            agent1,
            "sigil_agent_csr_duration_seconds_count",
        ),
        ("agent", agent0, agent1, "sigil_agent_csr_failures_total"),
        (
            FRONTEND_PROXY,
            front0,
            front1,
            "sigil_proxy_cert_updates_total",
        ),
        (
            BACKEND_PROXY,
            back0,
            back1,
            "sigil_proxy_cert_updates_total",
        ),
        (
            FRONTEND_PROXY,
            front0,
            front1,
            "sigil_proxy_tls_handshake_failures_total",
        ),
        (
            BACKEND_PROXY,
            back0,
            back1,
            "sigil_proxy_tls_handshake_failures_total",
        ),
    ];
    for (who, old, new, name) in series {
        let (b, a) = (old.sum(name, &[]), new.sum(name, &[]));
        report.detail(&format!("{who}: {}", metric_change(name, b, a)));
    }
    let granted: Vec<String> = grants()
        .into_iter()
        .map(|(id, n)| (id.clone(), n - grants_before.get(&id).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .map(|(id, n)| {
            let own = if id == AGENT_ID {
                " (the agent's own)"
            } else {
                ""
            };
            format!("{} +{n}{own}", short_id(&id))
        })
        .collect();
    report.detail(&format!(
        "CA audit log, certificates granted meanwhile: {}",
        granted.join(", ")
    ));
    report.line(&format!("      done in {}", format_secs(started.elapsed())));
    checks.push(checks::rotated(
        &[
            Serials {
                proxy: "frontend",
                seen: &serials[0],
            },
            Serials {
                proxy: "backend",
                seen: &serials[1],
            },
        ],
        load.new_after_expiry.load(Ordering::Relaxed),
    ));
    checks.push(checks::under_load(ok, failed, first_failure.as_deref()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_drop_the_scheme_and_trust_domain() {
        assert_eq!(short_id(FRONTEND_ID), "ns/demo/sa/frontend");
        assert_eq!(short_id("not an id"), "not an id");
    }

    #[test]
    fn quotes_are_cut_on_a_character_boundary() {
        assert_eq!(quote("short\n"), "short");
        let long = "é".repeat(QUOTE_CHARS + 3);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().count(), QUOTE_CHARS + 1);
        assert!(quoted.ends_with('…'));
    }

    #[test]
    fn the_load_counts_only_the_backend_answer_as_success() {
        let load = Load::default();
        let good = Ok(services::Answer {
            status: 200,
            body: services::ORDERS_BODY.into(),
        });
        assert!(load.outcome(&good));
        assert!(!load.outcome(&Err("reset".into())));
        assert!(!load.outcome(&Ok(services::Answer {
            status: 503,
            body: "upstream".into(),
        })));
        assert_eq!(load.ok.load(Ordering::Relaxed), 1);
        assert_eq!(load.failed.load(Ordering::Relaxed), 2);
        assert_eq!(
            load.first_failure.lock().unwrap().as_deref(),
            Some("reset"),
            "the first failure is kept"
        );
    }
}
