//! Network namespaces for the end-to-end tests that run as root (tests/e2e/proxy_init.rs,
//! tests/e2e/proxy_netns.rs, tests/e2e/policy_netns.rs): namespaces this test process creates and
//! deletes on drop (pass or fail), commands run inside them (as root or as another uid), sockets
//! of the test process created inside them (clients, and servers that record what reaches them),
//! the two-pod network the transparent-proxy tests wire up, and a transparent `sigil proxy run`
//! in a pod.
//!
//! Each test module names its namespaces `<prefix of its own>-<pid>-<role of each test>`, so that
//! its tests run in parallel threads, beside the other modules' and beside another test process;
//! its addresses (from 198.18.0.0/15: 198.18.0.x for tests/e2e/proxy_netns.rs and
//! tests/e2e/proxy_init.rs, 198.18.1.x for tests/e2e/policy_netns.rs) exist only inside its
//! namespaces.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::{PodCgroup, Proc, metric, sigil_exe};

/// Debian's python3: unprivileged uids can run it (pyenv's lives under /root, mode 0700).
pub const PYTHON: &str = "/usr/bin/python3";
/// The prefix length of every address the tests put on a link (all of them share one /24).
pub const LINK_PREFIX: &str = "24";
/// sigil's default metrics port, which `proxy init` leaves alone.
pub const METRICS_PORT: u16 = 15020;

/// Panics with `why` unless the test runs as root (effective uid 0): these tests create network
/// namespaces and more, and say so rather than failing on the first `ip netns add`.
pub fn require_root(why: &str) {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    assert_eq!(euid, Some("0"), "{why}");
}

/// Runs a command to completion; panics with its output unless it succeeds. Returns stdout.
pub fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `f` on a thread of its own that has entered the network namespace `name`: sockets it
/// creates belong to that namespace for their whole life, whichever thread uses them later.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    let netns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // setns(2) moves only this thread, which ends right after `f`.
                rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            })
            .join()
            .unwrap()
    })
}

/// A TCP connection from inside the namespace `name`.
pub async fn connect_in(name: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = in_netns(name, TcpSocket::new_v4)?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A minimal HTTP/1.0 GET from inside the namespace `name` (HTTP/1.0: no chunked answer).
/// Status 0 if the connection closed without an answer.
pub async fn http_get_in(name: &str, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = connect_in(name, addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timed out"))??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// A network namespace of this test process, `<prefix>-<pid>-<role>`, with its loopback up;
/// deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str, role: &str) -> Netns {
        let name = format!("{prefix}-{}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// `program args` inside the namespace.
    pub fn command(&self, program_and_args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .args(program_and_args);
        command
    }

    /// `program args` inside the namespace as `uid` (and its gid, with no supplementary groups).
    pub fn command_as(&self, uid: &str, program_and_args: &[&str]) -> Command {
        let mut command =
            self.command(&["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        command.args(program_and_args);
        command
    }

    /// Runs `program args` inside the namespace to completion (see [`run`]).
    pub fn run(&self, program_and_args: &[&str]) -> String {
        run(&mut self.command(program_and_args))
    }

    /// A listener on 0.0.0.0:`port` inside the namespace.
    pub fn listen(&self, port: u16) -> TcpListener {
        let socket = in_netns(&self.name, || -> io::Result<TcpSocket> {
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
            Ok(socket)
        })
        .unwrap_or_else(|e| panic!("binding port {port} in {}: {e}", self.name));
        socket.listen(64).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !matches!(deleted, Ok(status) if status.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// A server of the test process inside a namespace (a test's application, or a server outside
/// the mesh): listens on 0.0.0.0:`port` there and hands each connection, with a shared record, to
/// `handle` on a task of its own; `requests` reads what the handlers recorded. Stops accepting on
/// drop.
pub struct RecordingServer {
    requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RecordingServer {
    pub fn start<H, F>(netns: &Netns, port: u16, handle: H) -> RecordingServer
    where
        H: Fn(TcpStream, Arc<Mutex<Vec<String>>>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = netns.listen(port);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream, seen.clone()));
            }
        });
        RecordingServer { requests, task }
    }

    /// What the connections' handlers recorded so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two pods and the "node" between them, as the transparent-proxy tests wire them: namespace C
/// holds a bridge `br0` with an address of its own; pods A and B each have an `eth0` (a veth
/// whose peer, `veth-a` or `veth-b`, is plugged into `br0`) with their address, and
/// `sigil proxy init` rules that exempt their proxy's uid. All addresses share one /24.
pub struct PodNetwork {
    pub a: Netns,
    pub b: Netns,
    pub c: Netns,
}

impl PodNetwork {
    /// Namespaces `<prefix>-<pid>-{a,b,c}`; `pods` are A's and B's (address, proxy uid).
    pub fn new(prefix: &str, c_ip: Ipv4Addr, pods: [(Ipv4Addr, u32); 2]) -> PodNetwork {
        let c = Netns::new(prefix, "c");
        let c_cidr = format!("{c_ip}/{LINK_PREFIX}");
        c.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        c.run(&["ip", "addr", "add", &c_cidr, "dev", "br0"]);
        c.run(&["ip", "link", "set", "br0", "up"]);
        let a = Netns::new(prefix, "a");
        let b = Netns::new(prefix, "b");
        let [(a_ip, a_uid), (b_ip, b_uid)] = pods;
        for (pod, ip, port, uid) in [(&a, a_ip, "veth-a", a_uid), (&b, b_ip, "veth-b", b_uid)] {
            pod.run(&[
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &c.name,
            ]);
            let cidr = format!("{ip}/{LINK_PREFIX}");
            pod.run(&["ip", "addr", "add", &cidr, "dev", "eth0"]);
            pod.run(&["ip", "link", "set", "eth0", "up"]);
            c.run(&["ip", "link", "set", port, "master", "br0"]);
            c.run(&["ip", "link", "set", port, "up"]);
            pod.run(&[
                sigil_exe(),
                "proxy",
                "init",
                "--proxy-uid",
                &uid.to_string(),
            ]);
        }
        PodNetwork { a, b, c }
    }
}

/// A transparent `sigil proxy run` in a pod's namespace (and, if given, a container cgroup of
/// the pod, for the Kubernetes attestor), as the pod's proxy uid; killed on drop. Its /ready
/// and /metrics (on the pod's address, port 15020) are read from `observer`.
pub struct PodProxy {
    pub proc: Proc,
    pub metrics: SocketAddr,
    observer: String,
}

impl PodProxy {
    /// Starts the proxy and waits up to 30 s for its /ready (panicking with its log if it
    /// exits first).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        pod: &Netns,
        pod_ip: Ipv4Addr,
        cgroup: Option<&PodCgroup>,
        uid: u32,
        agent_socket: &Path,
        extra_args: &[&str],
        log: PathBuf,
        observer: &Netns,
    ) -> PodProxy {
        let uid = uid.to_string();
        let metrics_addr = format!("0.0.0.0:{METRICS_PORT}");
        let mut command = pod.command_as(
            &uid,
            &[
                sigil_exe(),
                "proxy",
                "run",
                "--agent-socket",
                agent_socket.to_str().unwrap(),
                "--metrics-addr",
                &metrics_addr,
            ],
        );
        command.args(extra_args);
        if let Some(cgroup) = cgroup {
            command = cgroup.enter(&command);
        }
        command.env("RUST_LOG", "info");
        let mut proxy = PodProxy {
            proc: Proc::spawn(command, log),
            metrics: SocketAddrV4::new(pod_ip, METRICS_PORT).into(),
            observer: observer.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            http_get_in(&proxy.observer, proxy.metrics, "/ready").await,
            Ok((200, _))
        ) {
            if let Some(status) = proxy.proc.child.try_wait().unwrap() {
                panic!(
                    "the proxy in {} exited ({status}):\n{}",
                    pod.name,
                    proxy.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the proxy in {} never became ready:\n{}",
                pod.name,
                proxy.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The JSON log lines so far, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect()
    }

    /// The access-log lines (target `sigil_access`) so far.
    pub fn access_log(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v["target"] == "sigil_access")
            .collect()
    }

    /// Waits until the access log has `count` lines, and returns them.
    pub async fn access_lines(&self, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access_log();
            if lines.len() >= count {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} access-log lines, got {}:\n{}",
                lines.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last "policies updated" line: the policy set the proxy enforces now.
    pub fn last_policy_update(&self) -> Option<Value> {
        self.log_lines()
            .into_iter()
            .rfind(|v| v["message"] == "policies updated")
    }

    /// Waits until the proxy enforces `count` authorization policies.
    pub async fn wait_for_policies(&self, count: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = self.last_policy_update();
            if last.as_ref().and_then(|l| l["policies"].as_u64()) == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy never got {what} ({count} policies); last update: {last:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One sample of the proxy's /metrics, read from the observer's namespace.
    pub async fn metric(&self, series: &str) -> f64 {
        let (status, text) = http_get_in(&self.observer, self.metrics, "/metrics")
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        metric(&text, series)
    }
}
