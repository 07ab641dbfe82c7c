//! The mesh the demo runs: the CA and the node agent in this process (configured by parsing the
//! same flags `sigil ca serve` and `sigil agent run` take), and the two proxies as child
//! processes of this executable, each from its own path in the working directory so the agent's
//! unix attestor gives them different identities.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use sigil_agent::config::AgentConfig;
use sigil_ca::config::CaConfig;
use sigil_ca::source::{bundle_pem, offline_authority};
use sigil_ca::state::{CaState, unix_now};
use sigil_ca::store::StateStore;
use sigil_identity::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::TRUST_DOMAIN;
use crate::scrape;

/// The node agent's own identity (its client certificate, issued offline).
pub const AGENT_ID: &str = "spiffe://demo.sigil.dev/ns/sigil-system/sa/sigil-agent";
pub const FRONTEND_ID: &str = "spiffe://demo.sigil.dev/ns/demo/sa/frontend";
pub const BACKEND_ID: &str = "spiffe://demo.sigil.dev/ns/demo/sa/backend";
/// The proxies' executables in `bin/` (and their log names in `logs/`).
pub const FRONTEND_PROXY: &str = "frontend-proxy";
pub const BACKEND_PROXY: &str = "backend-proxy";
/// Lifetime of the agent's own client certificate (it renews it itself at half of it).
const AGENT_CERT_TTL: Duration = Duration::from_secs(3600);
/// How long each component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of a failed child's log quoted in the error.
const LOG_TAIL_LINES: usize = 8;

/// The authorization policy the demo installs: mesh-wide STRICT mTLS, and the backend takes
/// only `GET /api/*` from the frontend's identity (everything else is denied).
pub const POLICIES: &str = "\
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: sigil-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-reads-orders, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [demo.sigil.dev/ns/demo/sa/frontend]}}]
    to: [{operation: {methods: [GET], paths: [/api/*]}}]
";
/// The deciding policy's name in metrics and access logs.
pub const ALLOW_POLICY: &str = "demo/frontend-reads-orders";

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA state: {0}")]
    State(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("CA state: the trust bundle has no root")]
    NoRoot,
    #[error("{what} flags: {reason}")]
    Flags { what: &'static str, reason: String },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("the CA stopped: {0}")]
    CaStopped(String),
    #[error("the agent stopped: {0}")]
    AgentStopped(String),
    #[error("{what} not ready after {READY_TIMEOUT:?}{detail}")]
    NotReady { what: String, detail: String },
    #[error("starting {name} ({path}): {source}{hint}")]
    Spawn {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{name} exited ({status}); last lines of {log}:\n{tail}")]
    Exited {
        name: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
}

/// A failure of the CA's state or of issuing from it, with its source kept.
fn state(e: impl std::error::Error + Send + Sync + 'static) -> ComponentError {
    ComponentError::State(Box::new(e))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ComponentError + '_ {
    move |source| ComponentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), ComponentError> {
    std::fs::write(path, contents).map_err(io(path))
}

/// A loopback address nobody listens on, for a component told its address before it starts.
pub fn free_addr() -> Result<SocketAddr, ComponentError> {
    sigil_base::ports::unused_loopback_addr().map_err(ComponentError::Port)
}

/// A duration as a flag value the CA's and agent's parsers take.
pub fn duration_flag(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Parses `args` as the flags of a command whose arguments are `T`, with the same validation
/// as on the command line.
fn parse_flags<T: clap::Args>(what: &'static str, args: &[String]) -> Result<T, ComponentError> {
    #[derive(Parser)]
    struct Flags<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    Flags::<T>::try_parse_from(std::iter::once(what.to_string()).chain(args.iter().cloned()))
        .map(|f| f.inner)
        .map_err(|e| ComponentError::Flags {
            what,
            reason: e.to_string().trim().to_string(),
        })
}

/// Waits until `http://addr/ready` answers 200, or `stopped` says the component died.
async fn wait_ready(
    what: &str,
    addr: SocketAddr,
    mut stopped: impl FnMut() -> Option<ComponentError>,
) -> Result<(), ComponentError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(e) = stopped() {
            return Err(e);
        }
        if scrape::is_ok(addr, "/ready").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ComponentError::NotReady {
                what: what.to_string(),
                detail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the report says about the root.
#[derive(Clone, Debug)]
pub struct RootInfo {
    pub serial_hex: String,
    pub not_after: time::OffsetDateTime,
}

/// The CA, serving in this process.
pub struct Ca {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    pub root: RootInfo,
    /// The agent's client certificate, key and the bundle, as `sigil ca issue` writes them.
    pub agent_cert_dir: PathBuf,
    pub agent_cert_serial: String,
    task: JoinHandle<Result<(), sigil_ca::server::ServeError>>,
}

impl Ca {
    /// `sigil ca init` (a self-signed root in `dir/ca-state`), `sigil ca issue` of the agent's
    /// client certificate, a static-entries file letting the agent issue the two workload
    /// identities, then `sigil ca serve --auth certs` on free loopback ports.
    pub async fn start(
        dir: &Path,
        cert_ttl: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Ca, ComponentError> {
        let td = TrustDomain::new(TRUST_DOMAIN).map_err(state)?;
        let state_dir = dir.join("ca-state");
        let store = StateStore::Dir(state_dir.clone());
        let fresh = CaState::new_self_signed(&td, unix_now()).map_err(state)?;
        let pem = bundle_pem(&fresh, unix_now()).map_err(state)?;
        store.create_if_absent(&fresh, &pem).await.map_err(state)?;

        let agent_cert_dir = dir.join("agent-cert");
        let issued = issue(&store, &td, AGENT_ID, AGENT_CERT_TTL, &agent_cert_dir).await?;
        let entries = dir.join("static-entries.yaml");
        write(
            &entries,
            &format!("agents:\n- id: {AGENT_ID}\n  may_issue: [{FRONTEND_ID}, {BACKEND_ID}]\n"),
        )?;

        let (grpc, admin) = (free_addr()?, free_addr()?);
        let args: Vec<String> = [
            "--trust-domain",
            TRUST_DOMAIN,
            "--state-dir",
            &path_flag(&state_dir),
            "--auth",
            "certs",
            "--static-entries",
            &path_flag(&entries),
            "--listen",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--server-name",
            "localhost",
            "--default-ttl",
            &duration_flag(cert_ttl),
            "--no-root-configmaps",
            // No Service routes to it: nothing to serve on for after the signal.
            "--shutdown-grace",
            "0s",
        ]
        .map(String::from)
        .to_vec();
        let config: CaConfig = parse_flags("sigil ca serve", &args)?;
        let mut task = tokio::spawn(sigil_ca::server::serve(config, shutdown));
        let ready = wait_ready("the CA", admin, || {
            task.is_finished()
                .then(|| ComponentError::CaStopped(String::new()))
        })
        .await;
        if let Err(e) = ready {
            if task.is_finished() {
                return Err(ComponentError::CaStopped(why_stopped(&mut task).await));
            }
            return Err(e);
        }
        Ok(Ca {
            grpc,
            admin,
            state_dir,
            root: issued.root,
            agent_cert_dir,
            agent_cert_serial: issued.serial_hex,
            task,
        })
    }

    /// Waits for the CA to stop (after the shutdown signal), for at most `timeout`.
    pub async fn stopped(self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.task).await;
    }
}

/// Why an in-process component's task ended.
async fn why_stopped<E: std::fmt::Display>(task: &mut JoinHandle<Result<(), E>>) -> String {
    match task.await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => "it returned without an error".into(),
        Err(e) => e.to_string(),
    }
}

fn path_flag(path: &Path) -> String {
    path.display().to_string()
}

/// What one offline issuance produced.
struct Issued {
    serial_hex: String,
    root: RootInfo,
}

/// As `sigil ca issue`: a key and a certificate for `id` from the state's active signer, written
/// to `out` as cert.pem, key.pem (mode 0600) and bundle.pem.
async fn issue(
    store: &StateStore,
    td: &TrustDomain,
    id: &str,
    ttl: Duration,
    out: &Path,
) -> Result<Issued, ComponentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let id = SpiffeId::parse(id).map_err(state)?;
    let authority = offline_authority(store, td).await.map_err(state)?;
    let signer = authority.signer().map_err(state)?;
    let key = sigil_ca::source::generate_key().map_err(state)?;
    let issued = signer
        .sign_leaf(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            sigil_identity::profile::KeyKind::EcdsaP256,
            &id,
            ttl,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(state)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let chain: String = std::iter::once(&issued.leaf)
        .chain(signer.intermediates.iter())
        .map(|c| sigil_identity::bundle::certificate_to_pem(c))
        .collect();
    write(&out.join("cert.pem"), &chain)?;
    let key_path = out.join("key.pem");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut f| f.write_all(key.serialize_pem().as_bytes()))
        .map_err(io(&key_path))?;
    write(&out.join("bundle.pem"), &authority.roots_pem().concat())?;
    let root = authority
        .bundle
        .roots
        .first()
        .map(|r| sigil_identity::profile::inspect_cert(r))
        .transpose()
        .map_err(state)?
        .ok_or(ComponentError::NoRoot)?;
    Ok(Issued {
        serial_hex: issued.serial_hex,
        root: RootInfo {
            serial_hex: root.serial_hex,
            not_after: root.not_after,
        },
    })
}

/// One workload of the unix attestor's map.
#[derive(Clone, Debug)]
pub struct Workload {
    pub uid: u32,
    pub path: PathBuf,
    pub id: &'static str,
    pub app: &'static str,
}

/// The `--unix-map` file: each workload by uid and executable path, with its `app` label.
pub fn unix_map(workloads: &[Workload]) -> String {
    let mut yaml = String::from("workloads:\n");
    for w in workloads {
        yaml.push_str(&format!(
            "- {{uid: {}, path: {:?}, id: {:?}, labels: {{app: {}}}}}\n",
            w.uid,
            w.path.display().to_string(),
            w.id,
            w.app
        ));
    }
    yaml
}

/// The node agent, running in this process.
pub struct Agent {
    pub socket: PathBuf,
    pub admin: SocketAddr,
    pub policy_file: PathBuf,
    task: JoinHandle<Result<(), sigil_agent::server::AgentError>>,
}

impl Agent {
    /// `sigil agent run --attestor unix` against `ca`, with the demo's policies.
    pub async fn start(
        dir: &Path,
        ca: &Ca,
        workloads: &[Workload],
        cert_ttl: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Agent, ComponentError> {
        let map = dir.join("workloads.yaml");
        write(&map, &unix_map(workloads))?;
        let policy_file = dir.join("policies.yaml");
        write(&policy_file, POLICIES)?;
        let socket = dir.join("run").join("agent.sock");
        let admin = free_addr()?;
        let certs = &ca.agent_cert_dir;
        let args: Vec<String> = [
            "--trust-domain",
            TRUST_DOMAIN,
            "--ca",
            &ca.grpc.to_string(),
            "--ca-name",
            "localhost",
            "--ca-bundle",
            &path_flag(&ca.state_dir.join("root-cert.pem")),
            "--client-cert",
            &path_flag(&certs.join("cert.pem")),
            "--client-key",
            &path_flag(&certs.join("key.pem")),
            "--socket",
            &path_flag(&socket),
            "--attestor",
            "unix",
            "--unix-map",
            &path_flag(&map),
            "--policy-file",
            &path_flag(&policy_file),
            "--admin-addr",
            &admin.to_string(),
            "--cert-ttl",
            &duration_flag(cert_ttl),
        ]
        .map(String::from)
        .to_vec();
        let config: AgentConfig = parse_flags("sigil agent run", &args)?;
        let mut task = tokio::spawn(sigil_agent::server::run(config, shutdown));
        let ready = wait_ready("the agent", admin, || {
            task.is_finished()
                .then(|| ComponentError::AgentStopped(String::new()))
        })
        .await;
        if let Err(e) = ready {
            if task.is_finished() {
                return Err(ComponentError::AgentStopped(why_stopped(&mut task).await));
            }
            return Err(e);
        }
        Ok(Agent {
            socket,
            admin,
            policy_file,
            task,
        })
    }

    pub async fn stopped(self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.task).await;
    }
}

/// A `sigil proxy run` child process; killed when dropped.
pub struct Proxy {
    pub name: &'static str,
    pub pid: u32,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Runs `exe proxy run --explicit --agent-socket ... <args>` with its output in
    /// `logs/<name>.log`, and waits until it is ready (certificate and bundle from the agent).
    pub async fn start(
        name: &'static str,
        exe: &Path,
        logs: &Path,
        agent_socket: &Path,
        args: &[String],
    ) -> Result<Proxy, ComponentError> {
        let (admin, metrics) = (free_addr()?, free_addr()?);
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(io(&log))?;
        let err = out.try_clone().map_err(io(&log))?;
        let child = Command::new(exe)
            .args(["--log-format", "json", "proxy", "run", "--explicit"])
            .arg("--agent-socket")
            .arg(agent_socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--concurrency", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ComponentError::Spawn {
                name,
                path: exe.to_path_buf(),
                hint: if source.kind() == std::io::ErrorKind::PermissionDenied {
                    " (is the temporary directory mounted noexec? try --dir)"
                } else {
                    ""
                },
                source,
            })?;
        let mut proxy = Proxy {
            name,
            pid: child.id(),
            admin,
            metrics,
            log,
            child,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            proxy.check_running()?;
            if scrape::is_ok(admin, "/ready").await {
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                return Err(ComponentError::NotReady {
                    what: format!("the {name}"),
                    detail: format!("; last lines of {}:\n{}", proxy.log.display(), proxy.tail()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error if the process has exited.
    pub fn check_running(&mut self) -> Result<(), ComponentError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ComponentError::Exited {
                name: self.name,
                status: status.to_string(),
                log: self.log.clone(),
                tail: self.tail(),
            }),
            _ => Ok(()),
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// The access-log lines (target `sigil_access`) written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        access_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// How many certificates the CA's audit log (target `sigil_audit`) says it granted, by the
/// identity requested.
pub fn audit_grants(log: &str) -> BTreeMap<String, u64> {
    let mut grants = BTreeMap::new();
    for record in log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["target"] == "sigil_audit" && v["granted"] == true)
    {
        if let Some(id) = record["requested"].as_str() {
            *grants.entry(id.to_string()).or_default() += 1;
        }
    }
    grants
}

/// The access-log records among JSON log lines.
pub fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["target"] == "sigil_access")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_in_the_trust_domain_and_the_policy_names_the_frontend() {
        let prefix = format!("spiffe://{TRUST_DOMAIN}/");
        for id in [AGENT_ID, FRONTEND_ID, BACKEND_ID] {
            assert!(id.starts_with(&prefix), "{id}");
            SpiffeId::parse(id).unwrap();
        }
        let principal = FRONTEND_ID.trim_start_matches("spiffe://");
        assert!(POLICIES.contains(&format!("principals: [{principal}]")));
        let (ns, name) = ALLOW_POLICY.split_once('/').unwrap();
        assert!(POLICIES.contains(&format!("name: {name}, namespace: {ns}")));
    }

    #[test]
    fn the_unix_map_names_uid_path_id_and_app_label() {
        let yaml = unix_map(&[Workload {
            uid: 1000,
            path: "/tmp/d/bin/frontend-proxy".into(),
            id: FRONTEND_ID,
            app: "frontend",
        }]);
        assert_eq!(
            yaml,
            format!(
                "workloads:\n- {{uid: 1000, path: \"/tmp/d/bin/frontend-proxy\", id: \"{FRONTEND_ID}\", labels: {{app: frontend}}}}\n"
            )
        );
    }

    #[test]
    fn flags_are_validated_by_the_real_parsers() {
        let err = parse_flags::<CaConfig>("sigil ca serve", &["--default-ttl".into(), "6x".into()])
            .err()
            .unwrap();
        assert!(err.to_string().contains("unknown unit"), "{err}");
        assert_eq!(duration_flag(Duration::from_millis(6500)), "6500ms");
    }

    #[test]
    fn audit_grants_count_granted_requests_by_identity() {
        let log = r#"{"target":"sigil_audit","requested":"spiffe://t/a","granted":true}
{"target":"sigil_audit","requested":"spiffe://t/a","granted":true}
{"target":"sigil_audit","requested":"spiffe://t/b","granted":false,"reason":"permission_denied"}
{"target":"sigil_ca::server","message":"listening"}
"#;
        let grants = audit_grants(log);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants["spiffe://t/a"], 2);
    }

    #[test]
    fn access_lines_are_the_sigil_access_records() {
        let log = "{\"target\":\"sigil_proxy::server\",\"message\":\"ready\"}\nnot json\n{\"target\":\"sigil_access\",\"result\":\"ok\"}\n";
        let lines = access_lines(log);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["result"], "ok");
    }
}
