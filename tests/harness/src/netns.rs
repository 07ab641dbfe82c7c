//! Network namespaces for the end-to-end tests that run as root (tests/e2e/proxy_init.rs,
//! tests/e2e/proxy_netns.rs, tests/e2e/policy_netns.rs, tests/e2e/proxy_balance.rs): namespaces
//! this test process creates and deletes on drop (pass or fail), commands run inside them (as
//! root or as another uid), sockets of the test process created inside them (clients, and
//! servers that record what reaches them), a node (namespace C, with a bridge) that pods are
//! plugged into, the two-pod network the transparent-proxy tests wire up, a Service's cluster IP
//! routed by the node as kube-proxy does, a transparent `sigil proxy run` in a pod, and a real
//! Prometheus scraping the proxies (and whatever else a test gives it).
//!
//! Each test module names its namespaces `<prefix of its own>-<pid>-<role of each test>`, so that
//! its tests run in parallel threads, beside the other modules' and beside another test process;
//! its addresses (from 198.18.0.0/15: 198.18.0.x for tests/e2e/proxy_netns.rs and
//! tests/e2e/proxy_init.rs, 198.18.1.x and 198.18.2.x for tests/e2e/policy_netns.rs, 198.18.3.x
//! and 198.19.0.x for tests/e2e/proxy_balance.rs, 198.18.42.x and 198.19.42.x for
//! tests/e2e/observability_dashboards.rs) exist only inside its namespaces.
//!
//! IPv6 (issue 17): nodes and pods may be IPv6-only or dual-stack ([`LinkAddrs`]), with
//! addresses from 2001:2::/48 (RFC 5180's benchmarking range), a /64 per test module:
//! 2001:2:0:10::/64 (IPv6-only pods) and 2001:2:0:11::/64 with 198.18.11.0/24 (dual-stack pods)
//! for tests/e2e/proxy_ipv6.rs, 2001:2:0:12::/64 with 198.18.12.0/24 for its policy tests,
//! 2001:2:0:20::/64 for tests/e2e/proxy_init.rs, and 2001:2:0:ff::/64 for IPv6 cluster IPs. Duplicate address detection is off in every namespace
//! (and addresses are added `nodad`): a tentative address cannot be bound or connected from for
//! the second or two DAD takes, which would make every test wait or flake.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::{PodCgroup, Proc, metric, sigil_exe, sigil_proxy_exe};

/// Debian's python3: unprivileged uids can run it (pyenv's lives under /root, mode 0700).
pub const PYTHON: &str = "/usr/bin/python3";
/// The prefix length of every IPv4 address the tests put on a link (all of them share one /24).
pub const LINK_PREFIX: &str = "24";
/// The prefix length of every IPv6 address the tests put on a link (all of them share one /64).
pub const LINK_PREFIX_V6: &str = "64";
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

/// Whether this host's network namespaces have IPv6 (the kernel was not booted with
/// `ipv6.disable=1`); if not, says on stderr that `test` is skipped and why. The IPv6 tests
/// return early when this is false: IPv4-only hosts exist, and the IPv4 tests cover them.
pub fn require_ipv6(test: &str) -> bool {
    let present = Path::new("/proc/sys/net/ipv6").exists();
    if !present {
        eprintln!("skipping {test}: this host has no IPv6 (/proc/sys/net/ipv6 is absent)");
    }
    present
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
    let socket = in_netns(name, || match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    })?;
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

/// A network namespace of this test process, `<prefix>-<pid>-<role>`, with its loopback up and
/// (where the host has IPv6) duplicate address detection and ICMPv6 redirects off; deleted on
/// drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str, role: &str) -> Netns {
        let name = format!("{prefix}-{}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        if Path::new("/proc/sys/net/ipv6").exists() {
            // Before any interface exists, so that every one (link-local addresses included)
            // inherits `default`; a redirect from the node would reroute pod-to-pod traffic.
            netns.run(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.default.accept_redirects=0",
            ]);
        }
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
        self.listen_on(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
    }

    /// A listener on `addr` inside the namespace (an IPv6 one accepts IPv6 only).
    pub fn listen_on(&self, addr: SocketAddr) -> TcpListener {
        self.bind_listener(addr, true)
    }

    /// A listener on [::]:`port` inside the namespace that accepts both families (IPv4 callers
    /// appear as IPv4-mapped addresses), as a dual-stack application's would.
    pub fn listen_dual(&self, port: u16) -> TcpListener {
        self.bind_listener(
            SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into(),
            false,
        )
    }

    fn bind_listener(&self, addr: SocketAddr, v6_only: bool) -> TcpListener {
        let socket = in_netns(&self.name, || -> io::Result<TcpSocket> {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => {
                    let socket = TcpSocket::new_v6()?;
                    // Explicit either way: `net.ipv6.bindv6only` decides otherwise.
                    socket2::SockRef::from(&socket).set_only_v6(v6_only)?;
                    socket
                }
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            Ok(socket)
        })
        .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", self.name));
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
        Self::serve(netns.listen(port), handle)
    }

    /// [`RecordingServer::start`] on a listener of the caller's (an IPv6 or dual-stack one:
    /// [`Netns::listen_on`], [`Netns::listen_dual`]).
    pub fn serve<H, F>(listener: TcpListener, handle: H) -> RecordingServer
    where
        H: Fn(TcpStream, Arc<Mutex<Vec<String>>>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
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

/// A namespace's addresses on its link: an IPv4 one, an IPv6 one, or both (dual-stack).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl LinkAddrs {
    pub const fn v4(ip: Ipv4Addr) -> LinkAddrs {
        LinkAddrs {
            v4: Some(ip),
            v6: None,
        }
    }

    pub const fn v6(ip: Ipv6Addr) -> LinkAddrs {
        LinkAddrs {
            v4: None,
            v6: Some(ip),
        }
    }

    pub const fn dual(v4: Ipv4Addr, v6: Ipv6Addr) -> LinkAddrs {
        LinkAddrs {
            v4: Some(v4),
            v6: Some(v6),
        }
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        let v4 = self.v4.map(IpAddr::from);
        let v6 = self.v6.map(IpAddr::from);
        v4.into_iter().chain(v6).collect()
    }

    /// `ip addr add` and `ip route add default` in `netns` on `dev`, with `gateway`'s addresses
    /// (if given) as the default routes of each family.
    fn configure(&self, netns: &Netns, dev: &str, gateway: Option<LinkAddrs>) {
        if let Some(ip) = self.v4 {
            let cidr = format!("{ip}/{LINK_PREFIX}");
            netns.run(&["ip", "addr", "add", &cidr, "dev", dev]);
        }
        if let Some(ip) = self.v6 {
            let cidr = format!("{ip}/{LINK_PREFIX_V6}");
            netns.run(&["ip", "-6", "addr", "add", &cidr, "dev", dev, "nodad"]);
        }
        netns.run(&["ip", "link", "set", dev, "up"]);
        let Some(gateway) = gateway else { return };
        if let (Some(_), Some(via)) = (self.v4, gateway.v4) {
            netns.run(&["ip", "route", "add", "default", "via", &via.to_string()]);
        }
        if let (Some(_), Some(via)) = (self.v6, gateway.v6) {
            netns.run(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &via.to_string(),
            ]);
        }
    }
}

/// The "node" the pods of a test are plugged into: namespace C with a bridge `br0` that has
/// addresses of its own (the pods' default gateway in each family). Each pod is a namespace
/// with an `eth0` (a veth whose peer, `veth-<role>`, is plugged into `br0`) holding its
/// addresses on the bridge's /24 and /64, and default routes via C's addresses.
pub struct Node {
    pub c: Netns,
    pub addrs: LinkAddrs,
    prefix: String,
}

impl Node {
    /// Namespace `<prefix>-<pid>-c`, its bridge holding `ip`.
    pub fn new(prefix: &str, ip: Ipv4Addr) -> Node {
        Node::new_dual(prefix, LinkAddrs::v4(ip))
    }

    /// Namespace `<prefix>-<pid>-c`, its bridge holding `addrs` (IPv4, IPv6 or both).
    pub fn new_dual(prefix: &str, addrs: LinkAddrs) -> Node {
        let c = Netns::new(prefix, "c");
        c.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        addrs.configure(&c, "br0", None);
        Node {
            c,
            addrs,
            prefix: prefix.to_owned(),
        }
    }

    /// A pod `<prefix>-<pid>-<role>` at `ip`, plugged into the bridge (no `proxy init` rules
    /// yet: see [`proxy_init`]).
    pub fn add_pod(&self, role: &str, ip: Ipv4Addr) -> Netns {
        self.add_pod_addrs(role, LinkAddrs::v4(ip))
    }

    /// A pod `<prefix>-<pid>-<role>` with `addrs` on its `eth0` (an IPv6-only pod has no IPv4
    /// address but loopback's), plugged into the bridge.
    pub fn add_pod_addrs(&self, role: &str, addrs: LinkAddrs) -> Netns {
        let pod = Netns::new(&self.prefix, role);
        let (port, node) = (format!("veth-{role}"), &self.c.name);
        pod.run(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", node,
        ]);
        addrs.configure(&pod, "eth0", Some(self.addrs));
        self.c.run(&["ip", "link", "set", &port, "master", "br0"]);
        self.c.run(&["ip", "link", "set", &port, "up"]);
        pod
    }
}

/// Installs `sigil proxy init`'s rules in a pod: its TCP goes through its proxy, whose uid is
/// exempt.
pub fn proxy_init(pod: &Netns, proxy_uid: u32) {
    pod.run(&[
        sigil_exe(),
        "proxy",
        "init",
        "--proxy-uid",
        &proxy_uid.to_string(),
    ]);
}

/// Two pods and the [`Node`] between them, as the transparent-proxy tests wire them: pods A and
/// B with `sigil proxy init` rules that exempt their proxy's uid, plugged into C's bridge
/// (`veth-a`, `veth-b`).
pub struct PodNetwork {
    pub a: Netns,
    pub b: Netns,
    pub c: Netns,
}

impl PodNetwork {
    /// Namespaces `<prefix>-<pid>-{a,b,c}`; `pods` are A's and B's (address, proxy uid).
    pub fn new(prefix: &str, c_ip: Ipv4Addr, pods: [(Ipv4Addr, u32); 2]) -> PodNetwork {
        let node = Node::new(prefix, c_ip);
        let [(a_ip, a_uid), (b_ip, b_uid)] = pods;
        let a = node.add_pod("a", a_ip);
        proxy_init(&a, a_uid);
        let b = node.add_pod("b", b_ip);
        proxy_init(&b, b_uid);
        PodNetwork { a, b, c: node.c }
    }
}

/// A Service's cluster IP as kube-proxy's iptables mode (with `--masquerade-all`) makes it on a
/// node, in C: `PREROUTING` → `KUBE-SERVICES` → the Service's `KUBE-SVC-` chain, which marks
/// the connection for masquerading (so the backend's answers return through C, where conntrack
/// undoes the DNAT) and picks one `KUBE-SEP-` chain per connection with `-m statistic --mode
/// random --probability` rules (1/n, then 1/(n-1)... then the last unconditionally), each
/// DNAT'ing to one backend's `podIP:targetPort`. Changing the backends rewrites the Service's
/// chains in one `iptables-restore` transaction, as kube-proxy does. An IPv6 cluster IP is made
/// the same way with ip6tables (kube-proxy runs one proxier per family), its backends being
/// IPv6 addresses.
pub struct ClusterIpService<'a> {
    node: &'a Netns,
    name: String,
    cluster_ip: IpAddr,
    target_port: u16,
    backends: Mutex<Vec<IpAddr>>,
}

/// kube-proxy's mark bit for connections to masquerade.
const MASQ_MARK: &str = "0x4000";

impl ClusterIpService<'_> {
    /// The Service `name` (upper case, it names the chains) at `cluster_ip` (IPv4 or IPv6) in
    /// the node's namespace, sent to `backends` (of the same family) on `target_port`; turns on
    /// forwarding of that family in C.
    pub fn new<'a, A: Copy + Into<IpAddr>>(
        node: &'a Node,
        name: &str,
        cluster_ip: impl Into<SocketAddr>,
        target_port: u16,
        backends: &[A],
    ) -> ClusterIpService<'a> {
        let cluster_ip = cluster_ip.into();
        let c = &node.c;
        let (forwarding, host_prefix) = match cluster_ip {
            SocketAddr::V4(_) => ("net.ipv4.ip_forward=1", 32),
            SocketAddr::V6(_) => ("net.ipv6.conf.all.forwarding=1", 128),
        };
        c.run(&["sysctl", "-q", "-w", forwarding]);
        let service = ClusterIpService {
            node: c,
            name: name.to_owned(),
            cluster_ip: cluster_ip.ip(),
            target_port,
            backends: Mutex::new(Vec::new()),
        };
        let svc = service.svc_chain();
        let rules = format!(
            "*nat\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-MARK-MASQ - [0:0]\n\
             :KUBE-POSTROUTING - [0:0]\n\
             :{svc} - [0:0]\n\
             -A PREROUTING -j KUBE-SERVICES\n\
             -A OUTPUT -j KUBE-SERVICES\n\
             -A POSTROUTING -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n\
             -A KUBE-POSTROUTING -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j MASQUERADE\n\
             -A KUBE-SERVICES -d {ip}/{host_prefix} -p tcp --dport {port} -j {svc}\n\
             COMMIT\n",
            ip = cluster_ip.ip(),
            port = cluster_ip.port(),
        );
        restore(c, cluster_ip.ip(), &rules);
        service.set_backends(backends);
        service
    }

    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", self.name)
    }

    /// A backend's chain, named by its address's last 32 bits (chain names are 28 characters
    /// at most, so not the whole of an IPv6 address).
    fn sep_chain(&self, backend: IpAddr) -> String {
        let low_bits = match backend {
            IpAddr::V4(ip) => u32::from(ip),
            IpAddr::V6(ip) => u128::from(ip) as u32,
        };
        format!("KUBE-SEP-{}-{low_bits:08X}", self.name)
    }

    /// Sends new connections to `backends` (of the cluster IP's family) from now on
    /// (established ones keep theirs).
    pub fn set_backends<A: Copy + Into<IpAddr>>(&self, backends: &[A]) {
        let backends: Vec<IpAddr> = backends.iter().map(|&b| b.into()).collect();
        assert!(
            backends
                .iter()
                .all(|b| b.is_ipv4() == self.cluster_ip.is_ipv4()),
            "backends {backends:?} of another family than the cluster IP {}",
            self.cluster_ip
        );
        let mut current = self.backends.lock().unwrap();
        let svc = self.svc_chain();
        let mut chains = format!("*nat\n:{svc} - [0:0]\n");
        let mut rules = format!("-A {svc} -j KUBE-MARK-MASQ\n");
        for (i, backend) in backends.iter().enumerate() {
            let sep = self.sep_chain(*backend);
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = backends.len() - i;
            if left > 1 {
                let probability = 1.0 / left as f64;
                rules.push_str(&format!(
                    "-A {svc} -m statistic --mode random --probability {probability:.11} -j {sep}\n"
                ));
            } else {
                rules.push_str(&format!("-A {svc} -j {sep}\n"));
            }
            rules.push_str(&format!(
                "-A {sep} -p tcp -j DNAT --to-destination {}\n",
                SocketAddr::new(*backend, self.target_port)
            ));
        }
        // Chains of backends that are gone: flushed by being declared, then deleted.
        let stale: Vec<String> = current
            .iter()
            .filter(|b| !backends.contains(b))
            .map(|b| self.sep_chain(*b))
            .collect();
        for sep in &stale {
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            rules.push_str(&format!("-X {sep}\n"));
        }
        restore(
            self.node,
            self.cluster_ip,
            &format!("{chains}{rules}COMMIT\n"),
        );
        *current = backends;
    }
}

/// Applies `rules` (iptables-restore syntax) for `family`'s table (iptables or ip6tables) in the
/// namespace without flushing the rest.
fn restore(netns: &Netns, family: IpAddr, rules: &str) {
    use std::io::Write;
    let command = match family {
        IpAddr::V4(_) => "iptables-restore",
        IpAddr::V6(_) => "ip6tables-restore",
    };
    let mut child = netns
        .command(&[command, "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {command}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{command} in {} failed ({}): {}\n{rules}",
        netns.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A transparent `sigil-proxy run` in a pod's namespace (and, if given, a container cgroup of
/// the pod, for the Kubernetes attestor), as the pod's proxy uid; killed on drop. Its /ready
/// and /metrics (on the pod's address, port 15020: an IPv4 or an IPv6 one) are read from
/// `observer`.
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
        pod_ip: impl Into<IpAddr>,
        cgroup: Option<&PodCgroup>,
        uid: u32,
        agent_socket: &Path,
        extra_args: &[&str],
        log: PathBuf,
        observer: &Netns,
    ) -> PodProxy {
        let uid = uid.to_string();
        let pod_ip = pod_ip.into();
        // The pod address's family's wildcard: `[::]` takes IPv4 too (IPV6_V6ONLY is off by
        // default), and an IPv4 pod keeps the address the IPv4-only tests always gave.
        let metrics_addr = match pod_ip {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, METRICS_PORT)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, METRICS_PORT)),
        }
        .to_string();
        let mut command = pod.command_as(
            &uid,
            &[
                sigil_proxy_exe(),
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
            metrics: SocketAddr::new(pod_ip, METRICS_PORT),
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

    /// Waits (10 s at most) until the proxy has at least `count` meshed Services from the
    /// agent: before, its connections to a cluster IP pass through unbalanced.
    pub async fn wait_for_services(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_lines().iter().any(|l| {
            l["message"] == "meshed Services updated" && l["services"].as_u64() >= Some(count)
        }) {
            assert!(
                Instant::now() < deadline,
                "the proxy never got {count} Service(s) from the agent:\n{}",
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

/// Debian's Prometheus server (scripts/test installs it).
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
/// The port Prometheus serves its API on, on the address it is given.
pub const PROMETHEUS_PORT: u16 = 9090;

/// A real Prometheus server inside a namespace (the node's, usually), scraping `/metrics` of
/// its targets every second, with its configuration and storage under a directory of the test;
/// killed on drop. Its HTTP API is queried from the same namespace.
pub struct Prometheus {
    pub proc: Proc,
    pub addr: SocketAddr,
    netns: String,
}

/// One `/metrics` endpoint for [`Prometheus::start_scraping`]: the job it belongs to and the
/// labels its series get, as Kubernetes service discovery and relabelling would give a pod's
/// (`namespace`, `pod`).
pub struct ScrapeTarget<'a> {
    pub job: &'a str,
    pub addr: SocketAddr,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Prometheus {
    /// Starts Prometheus on `ip`:9090 in `netns`, scraping `targets` as job `sigil-proxy` with no
    /// labels of their own, and waits up to 20 s for its /-/ready.
    pub async fn start(netns: &Netns, ip: Ipv4Addr, targets: &[SocketAddr], dir: &Path) -> Self {
        let targets: Vec<ScrapeTarget> = targets
            .iter()
            .map(|&addr| ScrapeTarget {
                job: "sigil-proxy",
                addr,
                labels: &[],
            })
            .collect();
        Self::start_scraping(netns, ip, &targets, dir).await
    }

    /// [`Prometheus::start`] with each target's job and labels.
    pub async fn start_scraping(
        netns: &Netns,
        ip: Ipv4Addr,
        targets: &[ScrapeTarget<'_>],
        dir: &Path,
    ) -> Self {
        let config = dir.join("prometheus.yml");
        let mut yaml = String::from(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n\
             scrape_configs:\n",
        );
        let mut jobs: Vec<&str> = targets.iter().map(|t| t.job).collect();
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
            yaml.push_str(&format!("- job_name: {job}\n  static_configs:\n"));
            for target in targets.iter().filter(|t| t.job == job) {
                let labels: Vec<String> = target
                    .labels
                    .iter()
                    .map(|(name, value)| format!("{name}: \"{value}\""))
                    .collect();
                yaml.push_str(&format!(
                    "  - {{targets: [\"{}\"], labels: {{{}}}}}\n",
                    target.addr,
                    labels.join(", ")
                ));
            }
        }
        std::fs::write(&config, yaml).unwrap();
        let addr = SocketAddr::from(SocketAddrV4::new(ip, PROMETHEUS_PORT));
        let storage = dir.join("prometheus-data");
        let command = netns.command(&[
            PROMETHEUS,
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", storage.display()),
            &format!("--web.listen-address={addr}"),
            "--log.level=warn",
        ]);
        let prometheus = Prometheus {
            proc: Proc::spawn(command, dir.join("prometheus.log")),
            addr,
            netns: netns.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(
            http_get_in(&prometheus.netns, addr, "/-/ready").await,
            Ok((200, _))
        ) {
            assert!(
                Instant::now() < deadline,
                "Prometheus never became ready:\n{}",
                prometheus.proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// An instant query through `/api/v1/query`: the result vector's samples as (labels,
    /// value). Panics with Prometheus's answer unless it succeeded.
    pub async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get_in(&self.netns, self.addr, &path)
            .await
            .unwrap_or_else(|e| panic!("querying Prometheus for {promql}: {e}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus's answer to {promql} ({status}): {e}: {body}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: no result vector: {answer}"))
            .iter()
            .map(|sample| {
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: a sample without a value: {answer}"));
                (sample["metric"].clone(), value)
            })
            .collect()
    }
}

/// `text` as a URL query value: every byte but the unreserved ones percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
