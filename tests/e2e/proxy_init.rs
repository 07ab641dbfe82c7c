//! `sigil proxy init` for real, as root, each test in network namespaces of its own (deleted
//! at the end, pass or fail): the rules it installs with the nf_tables and the legacy iptables
//! backends, that a second run changes nothing, that --cleanup removes all of sigil's rules and
//! nothing else (twice in a row too), that --dry-run prints exactly what would be applied and
//! changes nothing; and that connections really are redirected, outbound and inbound (from a
//! second namespace over a veth pair), except for the proxy's uid and the excluded ports and
//! CIDRs, with the original destination readable through SO_ORIGINAL_DST as the proxy reads it.
//! The namespaces are tests/harness/src/netns.rs's, shared with tests/e2e/proxy_netns.rs and
//! tests/e2e/policy_netns.rs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use sigil_test_harness::netns::{LINK_PREFIX, Netns, PYTHON, require_root, run};
use sigil_test_harness::sigil_exe;

/// This test's namespaces are `sigil-init-<pid>-<role>`.
const NETNS_PREFIX: &str = "sigil-init";
/// Why these tests must run as root.
const ROOT: &str = "these tests create network namespaces and install iptables rules: run them as \
                    root (CI does)";
const PROXY_UID: &str = "1337";
/// Addresses come from 198.18.0.0/15 (benchmarking), which no real network uses.
const POD_IP: &str = "198.18.0.1";
const PEER_IP: &str = "198.18.0.2";
/// A second peer address, in a range the pod is told to leave alone.
const EXCLUDED_CIDR: &str = "198.19.0.0/16";
const PEER_EXCLUDED_IP: &str = "198.19.0.2";
const EXCLUDED_OUTBOUND_PORT: &str = "9999";
/// sigil's defaults, which the functional test relies on.
const INBOUND_PORT: &str = "15006";
const OUTBOUND_PORT: &str = "15001";
const METRICS_PORT: &str = "15020";
/// A rule that is not sigil's, which sigil must leave alone (192.0.2.0/24 is TEST-NET-1).
const FOREIGN_RULE: [&str; 6] = ["-A", "OUTPUT", "-d", "192.0.2.1/32", "-j", "RETURN"];

/// Serves `LABEL=PORT` listeners on every address; each connection gets back its listener's
/// label and the connection's original destination (SO_ORIGINAL_DST, as the proxy reads it),
/// then is closed.
const LISTENER: &str = r#"
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    label, port = spec.split("=")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ, label)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        try:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            dst = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
        except OSError:  # no connection tracking in this namespace: nothing was rewritten
            dst = "%s:%d" % conn.getsockname()
        conn.sendall(("%s %s" % (key.data, dst)).encode())
        conn.close()
"#;

/// Connects to each `HOST:PORT` argument and prints `HOST:PORT -> ANSWER` (or the error).
const CLIENT: &str = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as c:
            answer = b""
            while chunk := c.recv(256):
                answer += chunk
            answer = answer.decode()
    except OSError as e:
        answer = "error " + type(e).__name__
    print(target, "->", answer, flush=True)
"#;

/// What these tests do in a namespace beyond sigil_test_harness::netns.
trait InitNetns {
    /// `sigil proxy init ARGS` in the namespace; its stdout.
    fn init(&self, args: &[&str]) -> String;
    /// The nat table as `<iptables>-save` shows it, without its timestamped comments.
    fn nat(&self, iptables: &str) -> String;
    /// Runs the client script as `uid` and returns its `TARGET -> ANSWER` lines.
    fn connect(&self, uid: &str, targets: &[String]) -> Vec<String>;
}

impl InitNetns for Netns {
    fn init(&self, args: &[&str]) -> String {
        self.run(&[&[sigil_exe(), "proxy", "init"], args].concat())
    }

    fn nat(&self, iptables: &str) -> String {
        self.run(&[&format!("{iptables}-save"), "-t", "nat"])
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    fn connect(&self, uid: &str, targets: &[String]) -> Vec<String> {
        let mut command = vec![PYTHON, "-I", "-c", CLIENT];
        command.extend(targets.iter().map(String::as_str));
        run(&mut self.command_as(uid, &command))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The LISTENER script running in a namespace; killed on drop (before its namespace goes).
struct Listener {
    child: Child,
}

impl Listener {
    fn start(netns: &Netns, specs: &[&str]) -> Listener {
        let mut child = netns
            .command(&[&[PYTHON, "-I", "-c", LISTENER], specs].concat())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {PYTHON}: {e}"));
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let listener = Listener { child };
        assert_eq!(ready, "ready\n", "the listener {specs:?} did not start");
        listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sigil lines `iptables-save -t nat` shows for the flags of `rules_cycle`, in its order.
fn expected_sigil_lines() -> String {
    "\
:SIGIL_INBOUND - [0:0]
:SIGIL_IN_REDIRECT - [0:0]
:SIGIL_OUTPUT - [0:0]
:SIGIL_REDIRECT - [0:0]
-A PREROUTING -p tcp -j SIGIL_INBOUND
-A OUTPUT -p tcp -j SIGIL_OUTPUT
-A SIGIL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A SIGIL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A SIGIL_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A SIGIL_INBOUND -j SIGIL_IN_REDIRECT
-A SIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A SIGIL_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SIGIL_OUTPUT -o lo -j RETURN
-A SIGIL_OUTPUT -d 169.254.169.254/32 -j RETURN
-A SIGIL_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A SIGIL_OUTPUT -j SIGIL_REDIRECT
-A SIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 15001
"
    .to_owned()
}

fn sigil_lines(nat: &str) -> String {
    nat.lines()
        .filter(|line| line.contains("SIGIL_"))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Install, reinstall, dry runs and cleanups with one iptables backend.
fn rules_cycle(iptables: &str) {
    require_root(ROOT);
    let netns = Netns::new(NETNS_PREFIX, iptables);
    netns.run(&[&[iptables, "-w", "-t", "nat"][..], &FOREIGN_RULE].concat());
    let before = netns.nat(iptables);
    let flags = [
        "--iptables",
        iptables,
        "--exclude-inbound-ports",
        "22",
        "--exclude-outbound-ports",
        "5432",
        "--exclude-outbound-cidrs",
        "169.254.169.254/32",
    ];

    // A dry run prints the whole transaction and changes nothing.
    let dry = netns.init(&[&flags[..], &["--dry-run"]].concat());
    assert!(dry.starts_with("*nat\n:SIGIL_INBOUND - [0:0]\n"), "{dry}");
    assert!(
        dry.ends_with("-A OUTPUT -p tcp -j SIGIL_OUTPUT\nCOMMIT\n"),
        "{dry}"
    );
    assert!(!dry.contains("-D "), "nothing to replace yet: {dry}");
    assert_eq!(netns.nat(iptables), before, "--dry-run changed the rules");

    let log = netns.init(&flags);
    assert!(
        log.contains("installed sigil's iptables redirection"),
        "{log}"
    );
    let installed = netns.nat(iptables);
    assert_eq!(
        sigil_lines(&installed),
        expected_sigil_lines(),
        "{installed}"
    );
    let foreign = FOREIGN_RULE.join(" ");
    assert!(installed.contains(&foreign), "{installed}");

    netns.init(&flags);
    assert_eq!(
        netns.nat(iptables),
        installed,
        "a second run changed the rules"
    );

    let dry = netns.init(&[&flags[..], &["--dry-run"]].concat());
    assert!(
        dry.contains("-D PREROUTING -p tcp -j SIGIL_INBOUND\n-D OUTPUT -p tcp -j SIGIL_OUTPUT\n"),
        "a reinstall replaces the old jumps: {dry}"
    );
    assert_eq!(
        netns.nat(iptables),
        installed,
        "--dry-run changed the rules"
    );

    netns.init(&["--iptables", iptables, "--cleanup"]);
    assert_eq!(netns.nat(iptables), before, "--cleanup left something");
    netns.init(&["--iptables", iptables, "--cleanup"]);
    assert_eq!(
        netns.nat(iptables),
        before,
        "a second --cleanup changed something"
    );
    assert_eq!(
        netns.init(&["--iptables", iptables, "--cleanup", "--dry-run"]),
        "*nat\nCOMMIT\n"
    );
}

#[test]
fn rules_are_idempotent_and_cleanup_removes_only_sigil_nf_tables() {
    rules_cycle("iptables-nft");
}

#[test]
fn rules_are_idempotent_and_cleanup_removes_only_sigil_legacy() {
    rules_cycle("iptables-legacy");
}

#[test]
fn connections_are_redirected_except_the_proxy_uid_and_exclusions() {
    require_root(ROOT);
    let pod = Netns::new(NETNS_PREFIX, "pod");
    let peer = Netns::new(NETNS_PREFIX, "peer");
    // A veth pair: eth0 in the pod, eth0 in the peer, one /24 between them.
    pod.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    for (netns, addresses) in [
        (&pod, &[POD_IP][..]),
        (&peer, &[PEER_IP, PEER_EXCLUDED_IP][..]),
    ] {
        for address in addresses {
            let cidr = format!("{address}/{LINK_PREFIX}");
            netns.run(&["ip", "addr", "add", &cidr, "dev", "eth0"]);
        }
        netns.run(&["ip", "link", "set", "eth0", "up"]);
    }
    pod.run(&["ip", "route", "add", EXCLUDED_CIDR, "dev", "eth0"]);

    pod.init(&[
        "--exclude-outbound-ports",
        EXCLUDED_OUTBOUND_PORT,
        "--exclude-outbound-cidrs",
        EXCLUDED_CIDR,
    ]);

    let inbound = format!("inbound={INBOUND_PORT}");
    let outbound = format!("outbound={OUTBOUND_PORT}");
    let metrics = format!("metrics={METRICS_PORT}");
    let _pod_listener = Listener::start(&pod, &[&inbound, &outbound, &metrics]);
    let excluded_port = format!("peer={EXCLUDED_OUTBOUND_PORT}");
    let _peer_listener = Listener::start(&peer, &["peer=80", &excluded_port]);

    let app_targets = [
        format!("{PEER_IP}:80"),
        format!("{PEER_IP}:{EXCLUDED_OUTBOUND_PORT}"),
        format!("{PEER_EXCLUDED_IP}:80"),
    ];
    assert_eq!(
        pod.connect("0", &app_targets),
        [
            format!("{PEER_IP}:80 -> outbound {PEER_IP}:80"),
            format!(
                "{PEER_IP}:{EXCLUDED_OUTBOUND_PORT} -> peer {PEER_IP}:{EXCLUDED_OUTBOUND_PORT}"
            ),
            format!("{PEER_EXCLUDED_IP}:80 -> peer {PEER_EXCLUDED_IP}:80"),
        ],
        "outbound, as an application (root)"
    );
    assert_eq!(
        pod.connect(PROXY_UID, &[format!("{PEER_IP}:80")]),
        [format!("{PEER_IP}:80 -> peer {PEER_IP}:80")],
        "the proxy's own uid is not redirected"
    );
    assert_eq!(
        pod.connect("0", &[format!("127.0.0.1:{METRICS_PORT}")]),
        [format!(
            "127.0.0.1:{METRICS_PORT} -> metrics 127.0.0.1:{METRICS_PORT}"
        )],
        "loopback is not redirected"
    );

    let peer_targets = [
        format!("{POD_IP}:8080"),
        format!("{POD_IP}:{METRICS_PORT}"),
        format!("{POD_IP}:{OUTBOUND_PORT}"),
        format!("{POD_IP}:{INBOUND_PORT}"),
    ];
    assert_eq!(
        peer.connect("0", &peer_targets),
        [
            format!("{POD_IP}:8080 -> inbound {POD_IP}:8080"),
            format!("{POD_IP}:{METRICS_PORT} -> metrics {POD_IP}:{METRICS_PORT}"),
            format!("{POD_IP}:{OUTBOUND_PORT} -> outbound {POD_IP}:{OUTBOUND_PORT}"),
            format!("{POD_IP}:{INBOUND_PORT} -> inbound {POD_IP}:{INBOUND_PORT}"),
        ],
        "inbound, from another host"
    );
}
