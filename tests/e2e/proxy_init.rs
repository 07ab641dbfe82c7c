//! `sigil proxy init` for real, as root, each test in network namespaces of its own (deleted
//! at the end, pass or fail): the rules it installs with the nf_tables and the legacy backends,
//! in iptables and in ip6tables (the same backend, derived from --iptables), that a second run
//! changes nothing, that --cleanup removes all of sigil's rules and nothing else (twice in a row
//! too), that --dry-run prints exactly what would be applied and changes nothing; that
//! connections really are redirected over IPv4 and IPv6, outbound and inbound (from a second
//! namespace over a veth pair), except for the proxy's uid and the excluded ports and CIDRs of
//! each family, with the original destination readable through SO_ORIGINAL_DST and
//! IP6T_SO_ORIGINAL_DST as the proxy reads it; and that init fails closed when the namespace has
//! IPv6 and ip6tables cannot be run, unless --ipv6 off (which warns), while a namespace without
//! IPv6 needs no ip6tables. The namespaces are tests/harness/src/netns.rs's, shared with
//! tests/e2e/proxy_netns.rs and tests/e2e/policy_netns.rs. IPv6 addresses: 2001:2:0:20::/64.

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};

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
/// The same for IPv6.
const FOREIGN_RULE_V6: [&str; 6] = ["-A", "OUTPUT", "-d", "2001:2:0:20::ff/128", "-j", "RETURN"];
/// IPv6 addresses from 2001:2:0:20::/64 (2001:2::/48 is for benchmarking).
const POD_IP6: &str = "2001:2:0:20::1";
const PEER_IP6: &str = "2001:2:0:20::2";
const LINK_PREFIX_V6: &str = "64";
/// Part of the link the pod is told to leave alone.
const EXCLUDED_CIDR6: &str = "2001:2:0:20::100/120";
const PEER_EXCLUDED_IP6: &str = "2001:2:0:20::102";
/// What the warning of --ipv6 off says.
const IPV6_BYPASS_WARNING: &str = "IPv6 traffic bypasses the proxy";

/// Serves `LABEL=PORT` listeners on every IPv4 and every IPv6 address (one socket per family,
/// as the proxy listens); each connection gets back its listener's label and the connection's
/// original destination (SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for IPv6, as the proxy
/// reads them), then is closed.
const LISTENER: &str = r#"
import selectors, socket, struct, sys
SO_ORIGINAL_DST = IP6T_SO_ORIGINAL_DST = 80
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    label, port = spec.split("=")
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, int(port)))
        s.listen(16)
        sel.register(s, selectors.EVENT_READ, label)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        try:
            if conn.family == socket.AF_INET6:
                # struct sockaddr_in6: family, port, flow info, address, scope id.
                raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
                host = "[%s]" % socket.inet_ntop(socket.AF_INET6, raw[8:24])
            else:
                raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                host = socket.inet_ntoa(raw[4:8])
            dst = "%s:%d" % (host, struct.unpack("!H", raw[2:4])[0])
        except OSError:  # no connection tracking in this namespace: nothing was rewritten
            host, port = conn.getsockname()[:2]
            dst = ("[%s]:%d" if conn.family == socket.AF_INET6 else "%s:%d") % (host, port)
        conn.sendall(("%s %s" % (key.data, dst)).encode())
        conn.close()
"#;

/// Connects to each `HOST:PORT` argument (`[IPV6]:PORT` for IPv6) and prints
/// `HOST:PORT -> ANSWER` (or the error).
const CLIENT: &str = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as c:
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
    /// `sigil proxy init ARGS` in the namespace, whether it succeeds or not.
    fn try_init(&self, args: &[&str]) -> Output;
    /// The nat table as `<iptables>-save` shows it, without its timestamped comments.
    fn nat(&self, iptables: &str) -> String;
    /// Runs the client script as `uid` and returns its `TARGET -> ANSWER` lines.
    fn connect(&self, uid: &str, targets: &[String]) -> Vec<String>;
}

impl InitNetns for Netns {
    fn init(&self, args: &[&str]) -> String {
        self.run(&[&[sigil_exe(), "proxy", "init"], args].concat())
    }

    fn try_init(&self, args: &[&str]) -> Output {
        self.command(&[&[sigil_exe(), "proxy", "init"], args].concat())
            .output()
            .expect("running sigil proxy init")
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

/// The sigil lines `iptables-save -t nat` (`ip6tables-save`) shows for the flags of
/// `rules_cycle`, in its order, with the excluded CIDR of that family.
fn expected_sigil_lines(excluded_cidr: &str) -> String {
    format!(
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
-A SIGIL_OUTPUT -d {excluded_cidr} -j RETURN
-A SIGIL_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A SIGIL_OUTPUT -j SIGIL_REDIRECT
-A SIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 15001
"
    )
}

fn sigil_lines(nat: &str) -> String {
    nat.lines()
        .filter(|line| line.contains("SIGIL_"))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// A dry run's sections: each `# COMMAND` comment line with the transaction after it.
fn dry_run_sections(dry: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in dry.lines() {
        match (line.strip_prefix("# "), sections.last_mut()) {
            (Some(command), _) => sections.push((command.to_owned(), String::new())),
            (None, Some((_, body))) => *body += &format!("{line}\n"),
            (None, None) => panic!("the dry run does not start with its command: {dry}"),
        }
    }
    sections
}

/// Install, reinstall, dry runs and cleanups with one backend, IPv4 and IPv6 at once (the
/// namespace has IPv6, so `--ipv6 auto` installs both with the same backend).
fn rules_cycle(iptables: &str) {
    require_root(ROOT);
    let ip6tables = iptables.replacen("iptables", "ip6tables", 1);
    let netns = Netns::new(NETNS_PREFIX, iptables);
    netns.run(&[&[iptables, "-w", "-t", "nat"][..], &FOREIGN_RULE].concat());
    netns.run(
        &[
            &[ip6tables.as_str(), "-w", "-t", "nat"][..],
            &FOREIGN_RULE_V6,
        ]
        .concat(),
    );
    let nat = || (netns.nat(iptables), netns.nat(&ip6tables));
    let before = nat();
    let flags = [
        "--iptables",
        iptables,
        "--exclude-inbound-ports",
        "22",
        "--exclude-outbound-ports",
        "5432",
        "--exclude-outbound-cidrs",
        "169.254.169.254/32,2001:2:0:20::fe/128",
    ];
    let restore = |command: &str| format!("{command}-restore --noflush --wait");

    // A dry run prints both transactions, IPv4 first, and changes nothing.
    let dry = netns.init(&[&flags[..], &["--dry-run"]].concat());
    let sections = dry_run_sections(&dry);
    let commands: Vec<&str> = sections.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(commands, [restore(iptables), restore(&ip6tables)], "{dry}");
    for ((_, body), (cidr, other)) in sections.iter().zip([
        ("169.254.169.254/32", "2001:2:0:20::fe/128"),
        ("2001:2:0:20::fe/128", "169.254.169.254/32"),
    ]) {
        assert!(body.starts_with("*nat\n:SIGIL_INBOUND - [0:0]\n"), "{dry}");
        assert!(
            body.ends_with("-A OUTPUT -p tcp -j SIGIL_OUTPUT\nCOMMIT\n"),
            "{dry}"
        );
        assert!(!body.contains("-D "), "nothing to replace yet: {dry}");
        assert!(body.contains(&format!("-d {cidr} -j RETURN")), "{dry}");
        assert!(!body.contains(other), "each family its own CIDRs: {dry}");
    }
    assert_eq!(nat(), before, "--dry-run changed the rules");

    let log = netns.init(&flags);
    assert!(
        log.contains("installed sigil's iptables redirection"),
        "{log}"
    );
    assert!(log.contains(r#""ipv6":"installed""#), "{log}");
    let installed = nat();
    assert_eq!(
        sigil_lines(&installed.0),
        expected_sigil_lines("169.254.169.254/32"),
        "{}",
        installed.0
    );
    assert_eq!(
        sigil_lines(&installed.1),
        expected_sigil_lines("2001:2:0:20::fe/128"),
        "{}",
        installed.1
    );
    assert!(
        installed.0.contains(&FOREIGN_RULE.join(" ")),
        "{installed:?}"
    );
    assert!(
        installed.1.contains(&FOREIGN_RULE_V6.join(" ")),
        "{installed:?}"
    );

    netns.init(&flags);
    assert_eq!(nat(), installed, "a second run changed the rules");

    let dry = netns.init(&[&flags[..], &["--dry-run"]].concat());
    for (command, body) in dry_run_sections(&dry) {
        assert!(
            body.contains(
                "-D PREROUTING -p tcp -j SIGIL_INBOUND\n-D OUTPUT -p tcp -j SIGIL_OUTPUT\n"
            ),
            "a reinstall replaces the old jumps ({command}): {dry}"
        );
    }
    assert_eq!(nat(), installed, "--dry-run changed the rules");

    netns.init(&["--iptables", iptables, "--cleanup"]);
    assert_eq!(nat(), before, "--cleanup left something");
    netns.init(&["--iptables", iptables, "--cleanup"]);
    assert_eq!(nat(), before, "a second --cleanup changed something");
    assert_eq!(
        netns.init(&["--iptables", iptables, "--cleanup", "--dry-run"]),
        format!(
            "# {}\n*nat\nCOMMIT\n# {}\n*nat\nCOMMIT\n",
            restore(iptables),
            restore(&ip6tables)
        )
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
fn with_ipv6_present_init_fails_closed_unless_ipv6_is_off_and_without_ipv6_needs_no_ip6tables() {
    require_root(ROOT);
    let netns = Netns::new(NETNS_PREFIX, "v6-missing");
    let missing = [
        "--iptables",
        "iptables-nft",
        "--ip6tables",
        "/nonexistent/sigil-test/ip6tables",
    ];
    let output = |out: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    let failed = netns.try_init(&missing);
    let message = output(&failed);
    assert!(!failed.status.success(), "{message}");
    for part in [
        "IPv6 traffic would bypass the proxy",
        "/nonexistent/sigil-test/ip6tables-save not found",
        "--ipv6 off",
    ] {
        assert!(message.contains(part), "{part:?} missing: {message}");
    }

    let off = netns.init(&[&missing[..], &["--ipv6", "off"]].concat());
    assert!(off.contains(IPV6_BYPASS_WARNING), "{off}");
    assert!(off.contains(r#""ipv6":"off""#), "{off}");
    assert!(
        sigil_lines(&netns.nat("iptables-nft")).contains("-A OUTPUT -p tcp -j SIGIL_OUTPUT"),
        "IPv4 is still redirected"
    );
    assert_eq!(
        sigil_lines(&netns.nat("ip6tables-nft")),
        "",
        "no IPv6 rules"
    );
    netns.init(&[&missing[..], &["--ipv6", "off", "--cleanup"]].concat());

    // A namespace without IPv6 behaves as before IPv6 support: no ip6tables needed, no warning;
    // but --ipv6 on refuses it.
    netns.run(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
    let absent = netns.init(&missing);
    assert!(absent.contains(r#""ipv6":"absent""#), "{absent}");
    assert!(!absent.contains(IPV6_BYPASS_WARNING), "{absent}");
    let on = netns.try_init(&[&missing[..], &["--ipv6", "on"]].concat());
    assert!(!on.status.success());
    assert!(
        output(&on).contains("--ipv6 on, but this network namespace has no IPv6"),
        "{}",
        output(&on)
    );
}

#[test]
fn connections_are_redirected_except_the_proxy_uid_and_exclusions_over_both_families() {
    require_root(ROOT);
    let pod = Netns::new(NETNS_PREFIX, "pod");
    let peer = Netns::new(NETNS_PREFIX, "peer");
    // A veth pair: eth0 in the pod, eth0 in the peer, one /24 and one /64 between them.
    pod.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    for (netns, addresses, addresses6) in [
        (&pod, &[POD_IP][..], &[POD_IP6][..]),
        (
            &peer,
            &[PEER_IP, PEER_EXCLUDED_IP][..],
            &[PEER_IP6, PEER_EXCLUDED_IP6][..],
        ),
    ] {
        for address in addresses {
            let cidr = format!("{address}/{LINK_PREFIX}");
            netns.run(&["ip", "addr", "add", &cidr, "dev", "eth0"]);
        }
        for address in addresses6 {
            let cidr = format!("{address}/{LINK_PREFIX_V6}");
            netns.run(&["ip", "-6", "addr", "add", &cidr, "dev", "eth0", "nodad"]);
        }
        netns.run(&["ip", "link", "set", "eth0", "up"]);
    }
    pod.run(&["ip", "route", "add", EXCLUDED_CIDR, "dev", "eth0"]);

    pod.init(&[
        "--exclude-outbound-ports",
        EXCLUDED_OUTBOUND_PORT,
        "--exclude-outbound-cidrs",
        &format!("{EXCLUDED_CIDR},{EXCLUDED_CIDR6}"),
    ]);

    let inbound = format!("inbound={INBOUND_PORT}");
    let outbound = format!("outbound={OUTBOUND_PORT}");
    let metrics = format!("metrics={METRICS_PORT}");
    let _pod_listener = Listener::start(&pod, &[&inbound, &outbound, &metrics]);
    let excluded_port = format!("peer={EXCLUDED_OUTBOUND_PORT}");
    let _peer_listener = Listener::start(&peer, &["peer=80", &excluded_port]);

    for (peer_ip, peer_excluded_ip, pod_ip, loopback) in [
        (PEER_IP, PEER_EXCLUDED_IP, POD_IP, "127.0.0.1"),
        (PEER_IP6, PEER_EXCLUDED_IP6, POD_IP6, "::1"),
    ] {
        let host = |ip: &str| {
            if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_owned()
            }
        };
        let (peer_ip, peer_excluded_ip, pod_ip, loopback) = (
            host(peer_ip),
            host(peer_excluded_ip),
            host(pod_ip),
            host(loopback),
        );
        let app_targets = [
            format!("{peer_ip}:80"),
            format!("{peer_ip}:{EXCLUDED_OUTBOUND_PORT}"),
            format!("{peer_excluded_ip}:80"),
        ];
        assert_eq!(
            pod.connect("0", &app_targets),
            [
                format!("{peer_ip}:80 -> outbound {peer_ip}:80"),
                format!(
                    "{peer_ip}:{EXCLUDED_OUTBOUND_PORT} -> peer {peer_ip}:{EXCLUDED_OUTBOUND_PORT}"
                ),
                format!("{peer_excluded_ip}:80 -> peer {peer_excluded_ip}:80"),
            ],
            "outbound, as an application (root)"
        );
        assert_eq!(
            pod.connect(PROXY_UID, &[format!("{peer_ip}:80")]),
            [format!("{peer_ip}:80 -> peer {peer_ip}:80")],
            "the proxy's own uid is not redirected"
        );
        assert_eq!(
            pod.connect("0", &[format!("{loopback}:{METRICS_PORT}")]),
            [format!(
                "{loopback}:{METRICS_PORT} -> metrics {loopback}:{METRICS_PORT}"
            )],
            "loopback is not redirected"
        );

        let peer_targets = [
            format!("{pod_ip}:8080"),
            format!("{pod_ip}:{METRICS_PORT}"),
            format!("{pod_ip}:{OUTBOUND_PORT}"),
            format!("{pod_ip}:{INBOUND_PORT}"),
        ];
        assert_eq!(
            peer.connect("0", &peer_targets),
            [
                format!("{pod_ip}:8080 -> inbound {pod_ip}:8080"),
                format!("{pod_ip}:{METRICS_PORT} -> metrics {pod_ip}:{METRICS_PORT}"),
                format!("{pod_ip}:{OUTBOUND_PORT} -> outbound {pod_ip}:{OUTBOUND_PORT}"),
                format!("{pod_ip}:{INBOUND_PORT} -> inbound {pod_ip}:{INBOUND_PORT}"),
            ],
            "inbound, from another host"
        );
    }
}
