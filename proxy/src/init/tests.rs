use std::os::unix::process::ExitStatusExt;

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    init: InitConfig,
}

fn config(args: &[&str]) -> InitConfig {
    Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
        .unwrap()
        .init
}

fn rules(args: &[&str]) -> Vec<String> {
    Plan::new(&config(args)).unwrap().rules(Family::V4)
}

fn ipv6_rules(args: &[&str]) -> Vec<String> {
    Plan::new(&config(args)).unwrap().rules(Family::V6)
}

/// A `disable_ipv6` sysctl file holding `value`.
fn sysctl(value: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(value.as_bytes()).unwrap();
    file
}

/// The sysctl path of a namespace without IPv6 (kernel booted with ipv6.disable=1).
const NO_IPV6: &str = "/nonexistent/sigil-test/disable_ipv6";

fn error(args: &[&str]) -> String {
    Plan::new(&config(args)).unwrap_err().to_string()
}

const DEFAULT_TRANSACTION: &str = "\
*nat
:SIGIL_INBOUND - [0:0]
:SIGIL_IN_REDIRECT - [0:0]
:SIGIL_OUTPUT - [0:0]
:SIGIL_REDIRECT - [0:0]
-A SIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A SIGIL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A SIGIL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A SIGIL_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A SIGIL_INBOUND -j SIGIL_IN_REDIRECT
-A SIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A SIGIL_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SIGIL_OUTPUT -o lo -j RETURN
-A SIGIL_OUTPUT -j SIGIL_REDIRECT
-A PREROUTING -p tcp -j SIGIL_INBOUND
-A OUTPUT -p tcp -j SIGIL_OUTPUT
COMMIT
";

#[test]
fn default_flags_give_istio_shaped_rules() {
    let plan = Plan::new(&config(&[])).unwrap();
    assert_eq!(
        install_transaction(&plan, &NatState::default(), Family::V4),
        DEFAULT_TRANSACTION
    );
    // IPv6 gets the same chains and rules.
    assert_eq!(
        install_transaction(&plan, &NatState::default(), Family::V6),
        DEFAULT_TRANSACTION
    );
}

#[test]
fn ports_and_uid_flags_change_their_rules() {
    let rules = rules(&[
        "--proxy-uid",
        "2000",
        "--inbound-port",
        "7000",
        "--outbound-port",
        "7001",
    ]);
    for rule in [
        "-A SIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 7000",
        "-A SIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 7001",
        "-A SIGIL_INBOUND -p tcp -m tcp --dport 7000 -j RETURN",
        "-A SIGIL_INBOUND -p tcp -m tcp --dport 7001 -j RETURN",
        "-A SIGIL_OUTPUT -m owner --uid-owner 2000 -j RETURN",
    ] {
        assert!(
            rules.iter().any(|r| r == rule),
            "{rule} missing: {rules:#?}"
        );
    }
    assert!(!rules.iter().any(|r| r.contains("1500")));
}

#[test]
fn excluded_inbound_ports_return_before_the_redirect() {
    let rules = rules(&["--exclude-inbound-ports", "22,8443,22,15006"]);
    let inbound: Vec<&str> = rules
        .iter()
        .filter(|r| r.starts_with("-A SIGIL_INBOUND "))
        .map(String::as_str)
        .collect();
    assert_eq!(
        inbound,
        [
            "-A SIGIL_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
            "-A SIGIL_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
            "-A SIGIL_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A SIGIL_INBOUND -p tcp -m tcp --dport 8443 -j RETURN",
            "-A SIGIL_INBOUND -j SIGIL_IN_REDIRECT",
        ]
    );
}

#[test]
fn an_empty_inbound_exclusion_leaves_only_the_proxy_ports() {
    for args in [
        &["--exclude-inbound-ports"][..],
        &["--exclude-inbound-ports="][..],
    ] {
        let rules = rules(args);
        assert!(!rules.iter().any(|r| r.contains("15020")), "{args:?}");
        assert_eq!(
            rules.iter().filter(|r| r.contains("-j RETURN")).count(),
            4,
            "2 proxy ports, uid, loopback: {rules:#?}"
        );
    }
}

#[test]
fn excluded_outbound_ports_and_cidrs_return_before_the_redirect() {
    let args = [
        "--exclude-outbound-ports",
        "5432,,6379",
        "--exclude-outbound-cidrs",
        "169.254.169.254/32, 198.18.7.9/15,2001:2:0:20::7/64,198.18.0.0/15,fd00:ec2::254/128",
    ];
    let outbound = |rules: Vec<String>| -> Vec<String> {
        rules
            .into_iter()
            .filter(|r| r.starts_with("-A SIGIL_OUTPUT "))
            .collect()
    };
    assert_eq!(
        outbound(rules(&args)),
        [
            "-A SIGIL_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A SIGIL_OUTPUT -o lo -j RETURN",
            "-A SIGIL_OUTPUT -d 169.254.169.254/32 -j RETURN",
            // Host bits are masked off as iptables does, and the repeat is dropped.
            "-A SIGIL_OUTPUT -d 198.18.0.0/15 -j RETURN",
            "-A SIGIL_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A SIGIL_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
            "-A SIGIL_OUTPUT -j SIGIL_REDIRECT",
        ]
    );
    // Each family's rules get its own CIDRs only; ports apply to both.
    assert_eq!(
        outbound(ipv6_rules(&args)),
        [
            "-A SIGIL_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A SIGIL_OUTPUT -o lo -j RETURN",
            "-A SIGIL_OUTPUT -d 2001:2:0:20::/64 -j RETURN",
            "-A SIGIL_OUTPUT -d fd00:ec2::254/128 -j RETURN",
            "-A SIGIL_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A SIGIL_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
            "-A SIGIL_OUTPUT -j SIGIL_REDIRECT",
        ]
    );
}

#[test]
fn cidr_prefixes_mask_like_iptables() {
    for (text, shown) in [
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("203.0.113.77/24", "203.0.113.0/24"),
        ("203.0.113.77/32", "203.0.113.77/32"),
        ("203.0.113.77/1", "128.0.0.0/1"),
        ("::/0", "::/0"),
        ("2001:2:0:20:ab::1/64", "2001:2:0:20::/64"),
        ("2001:2:0:20::1/128", "2001:2:0:20::1/128"),
        ("2001:2:0:20::1/1", "::/1"),
        ("ffff::1/1", "8000::/1"),
        (
            "2001:0002:0000:0020:0000:0000:0000:00ff/120",
            "2001:2:0:20::/120",
        ),
    ] {
        assert_eq!(Cidr::parse(text).unwrap().to_string(), shown, "{text}");
    }
}

#[test]
fn invalid_input_is_refused_with_a_reason() {
    assert!(error(&["--proxy-uid", "0"]).contains("every process running as root"));
    assert!(error(&["--inbound-port", "0"]).contains("--inbound-port \"0\": not a port"));
    assert!(error(&["--outbound-port", "0"]).contains("--outbound-port \"0\": not a port"));
    assert!(error(&["--outbound-port", "15006"]).contains("both 15006: they must differ"));
    assert!(
        error(&["--exclude-inbound-ports", "80,0"])
            .contains("--exclude-inbound-ports \"0\": not a port")
    );
    assert!(
        error(&["--exclude-outbound-ports", "http"])
            .contains("--exclude-outbound-ports \"http\": not a port")
    );
    assert!(
        error(&["--exclude-outbound-ports", "65536"])
            .contains("--exclude-outbound-ports \"65536\": not a port")
    );
    for cidr in [
        "10.0.0.1",
        "10.0.0.0/33",
        "10.0.0/8",
        "example.com/32",
        "10.0.0.0/x",
        "2001:2:0:20::/129",
        "2001:2:0:20::",
        "2001:2:0:20:::/64",
        "[2001:2:0:20::]/64",
    ] {
        assert!(
            error(&["--exclude-outbound-cidrs", cidr])
                .contains("expected a CIDR ADDRESS/PREFIX, IPv4 (prefix 0-32) or IPv6"),
            "{cidr}"
        );
    }
}

const SAVE_WITH_SIGIL: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 23 03:10:02 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KEEP_ME - [0:0]
:SIGIL_INBOUND - [0:0]
:SIGIL_OLD - [0:0]
:SIGIL_OUTPUT - [0:0]
-A PREROUTING -p tcp -j SIGIL_INBOUND
-A OUTPUT -d 192.0.2.1/32 -j RETURN
-A OUTPUT -p tcp -j SIGIL_OUTPUT
-A OUTPUT -p tcp -j SIGIL_OUTPUT
-A OUTPUT -m comment --comment \"not -j SIGIL_X\" -j KEEP_ME
-A KEEP_ME -g SIGIL_OLD
-A SIGIL_INBOUND -j SIGIL_OLD
-A SIGIL_OUTPUT -j RETURN
COMMIT
# Completed on Mon Nov 23 03:10:02 2026
";

#[test]
fn the_saved_state_lists_sigil_chains_and_the_jumps_into_them() {
    assert_eq!(
        NatState::parse(SAVE_WITH_SIGIL),
        NatState {
            generated_by: Some("iptables-save v1.8.9 (nf_tables)".to_owned()),
            sigil_chains: vec![
                "SIGIL_INBOUND".to_owned(),
                "SIGIL_OLD".to_owned(),
                "SIGIL_OUTPUT".to_owned(),
            ],
            jumps: vec![
                "PREROUTING -p tcp -j SIGIL_INBOUND".to_owned(),
                "OUTPUT -p tcp -j SIGIL_OUTPUT".to_owned(),
                "OUTPUT -p tcp -j SIGIL_OUTPUT".to_owned(),
                "KEEP_ME -g SIGIL_OLD".to_owned(),
            ],
        }
    );
}

#[test]
fn rule_words_keep_quoted_strings_whole() {
    assert_eq!(
        rule_words(r#"OUTPUT -m comment --comment "a \"-j SIGIL_X\" b"  -j KEEP_ME"#),
        [
            "OUTPUT",
            "-m",
            "comment",
            "--comment",
            r#""a \"-j SIGIL_X\" b""#,
            "-j",
            "KEEP_ME"
        ]
    );
}

#[test]
fn reinstalling_replaces_old_jumps_and_drops_stale_chains_in_one_transaction() {
    let plan = Plan::new(&config(&[])).unwrap();
    let transaction = install_transaction(&plan, &NatState::parse(SAVE_WITH_SIGIL), Family::V4);
    let expected = DEFAULT_TRANSACTION.replace(
        ":SIGIL_REDIRECT - [0:0]\n",
        ":SIGIL_REDIRECT - [0:0]\n\
             -D PREROUTING -p tcp -j SIGIL_INBOUND\n\
             -D OUTPUT -p tcp -j SIGIL_OUTPUT\n\
             -D OUTPUT -p tcp -j SIGIL_OUTPUT\n\
             -D KEEP_ME -g SIGIL_OLD\n\
             -F SIGIL_OLD\n\
             -X SIGIL_OLD\n",
    );
    assert_eq!(transaction, expected);
}

#[test]
fn cleanup_removes_jumps_then_flushes_and_deletes_every_sigil_chain() {
    assert_eq!(
        cleanup_transaction(&NatState::parse(SAVE_WITH_SIGIL)),
        "\
*nat
-D PREROUTING -p tcp -j SIGIL_INBOUND
-D OUTPUT -p tcp -j SIGIL_OUTPUT
-D OUTPUT -p tcp -j SIGIL_OUTPUT
-D KEEP_ME -g SIGIL_OLD
-F SIGIL_INBOUND
-F SIGIL_OLD
-F SIGIL_OUTPUT
-X SIGIL_INBOUND
-X SIGIL_OLD
-X SIGIL_OUTPUT
COMMIT
"
    );
    assert_eq!(cleanup_transaction(&NatState::default()), "*nat\nCOMMIT\n");
}

#[test]
fn a_missing_iptables_says_how_to_install_it() {
    let missing = "/nonexistent/sigil-test/iptables";
    let err = run_to(
        &config(&["--iptables", missing]),
        Path::new(NO_IPV6),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(matches!(err, InitError::IptablesMissing { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{missing}-save not found")),
        "{message}"
    );
    assert!(message.contains("apt-get install iptables"), "{message}");
}

/// A dry run's output with `args` in a namespace whose IPv6 sysctl is `ipv6_sysctl`.
fn dry_run(args: &[&str], ipv6_sysctl: &Path) -> String {
    let mut out = Vec::new();
    let dry = config(&[&["--dry-run"], args].concat());
    run_to(&dry, ipv6_sysctl, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn a_dry_run_needs_no_iptables_and_shows_each_family_present() {
    let missing = ["--iptables", "/nonexistent/sigil-test/iptables"];
    let ipv4_section = format!(
        "# /nonexistent/sigil-test/iptables-restore --noflush --wait\n{DEFAULT_TRANSACTION}"
    );
    let ipv6_section = format!(
        "# /nonexistent/sigil-test/ip6tables-restore --noflush --wait\n{DEFAULT_TRANSACTION}"
    );
    // Without IPv6 in the namespace (or with it disabled), as before IPv6 support.
    assert_eq!(dry_run(&missing, Path::new(NO_IPV6)), ipv4_section);
    assert_eq!(dry_run(&missing, sysctl("1\n").path()), ipv4_section);
    // With IPv6: both, IPv4 first, with the same backend's ip6tables.
    let ipv6 = sysctl("0\n");
    assert_eq!(
        dry_run(&missing, ipv6.path()),
        format!("{ipv4_section}{ipv6_section}")
    );
    assert_eq!(
        dry_run(&[&missing[..], &["--ipv6", "on"]].concat(), ipv6.path()),
        format!("{ipv4_section}{ipv6_section}")
    );
    assert_eq!(
        dry_run(&[&missing[..], &["--ipv6", "off"]].concat(), ipv6.path()),
        ipv4_section
    );
    // --ip6tables chooses the command; cleanup covers both families.
    let cleanup = dry_run(
        &[&missing[..], &["--ip6tables", "/opt/x/ip6", "--cleanup"]].concat(),
        ipv6.path(),
    );
    assert_eq!(
        cleanup,
        "# /nonexistent/sigil-test/iptables-restore --noflush --wait\n*nat\nCOMMIT\n\
         # /opt/x/ip6-restore --noflush --wait\n*nat\nCOMMIT\n"
    );
}

#[test]
fn ip6tables_is_the_same_backend_as_iptables() {
    for (iptables, ip6tables) in [
        ("iptables", Some("ip6tables")),
        ("iptables-legacy", Some("ip6tables-legacy")),
        ("iptables-nft", Some("ip6tables-nft")),
        ("/usr/sbin/iptables", Some("/usr/sbin/ip6tables")),
        (
            "/usr/sbin/iptables-legacy",
            Some("/usr/sbin/ip6tables-legacy"),
        ),
        (
            "/opt/iptables/bin/iptables-nft",
            Some("/opt/iptables/bin/ip6tables-nft"),
        ),
        ("xtables-nft-multi", None),
        ("/opt/iptables/bin/xt", None),
    ] {
        assert_eq!(
            ip6tables_command(iptables).as_deref(),
            ip6tables,
            "{iptables}"
        );
    }
}

#[test]
fn ipv6_mode_follows_the_namespace_unless_told() {
    let (present, disabled) = (sysctl("0\n"), sysctl("1\n"));
    let resolve = |args: &[&str], sysctl: &Path| Ipv6::resolve(&config(args), sysctl);
    for sysctl in [Path::new(NO_IPV6), disabled.path()] {
        assert!(matches!(resolve(&[], sysctl), Ok(Ipv6::Absent)));
        assert!(matches!(resolve(&["--ipv6", "off"], sysctl), Ok(Ipv6::Off)));
        let on = resolve(&["--ipv6", "on"], sysctl).unwrap_err().to_string();
        assert!(
            on.contains("--ipv6 on, but this network namespace has no IPv6"),
            "{on}"
        );
    }
    let install = |args: &[&str]| match resolve(args, present.path()) {
        Ok(Ipv6::Install(ip6tables)) => (ip6tables.save, ip6tables.restore),
        other => panic!("{args:?}: {other:?}"),
    };
    let derived = (
        "ip6tables-nft-save".to_owned(),
        "ip6tables-nft-restore".to_owned(),
    );
    assert_eq!(install(&["--iptables", "iptables-nft"]), derived);
    assert_eq!(
        install(&["--iptables", "iptables-nft", "--ipv6", "on"]),
        derived
    );
    assert_eq!(
        install(&["--iptables", "xt", "--ip6tables", "/opt/ip6tables"]),
        (
            "/opt/ip6tables-save".to_owned(),
            "/opt/ip6tables-restore".to_owned()
        )
    );
    assert!(matches!(
        resolve(&["--ipv6", "off"], present.path()),
        Ok(Ipv6::Off)
    ));
    let unknown = resolve(&["--iptables", "xt"], present.path())
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("give --ip6tables, or --ipv6 off"),
        "{unknown}"
    );
}

#[test]
fn an_ipv6_failure_says_the_pod_would_bypass_the_proxy_and_names_ipv6_off() {
    let missing = InitError::IptablesMissing {
        program: "ip6tables-save".to_owned(),
    };
    let err = InitError::Ipv6Rules(Box::new(missing));
    let message = err.to_string();
    assert!(
        message.contains("IPv6 traffic would bypass the proxy"),
        "{message}"
    );
    assert!(message.contains("ip6tables-save not found"), "{message}");
    assert!(message.contains("--ipv6 off"), "{message}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn iptables_failures_keep_its_stderr_and_name_the_capabilities_when_denied() {
    let status = ExitStatus::from_raw(4 << 8);
    let denied = command_failed(
        "iptables-save -t nat".to_owned(),
        status,
        "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: \
             Permission denied (you must be root)"
            .to_owned(),
    )
    .to_string();
    assert!(denied.contains("needs NET_ADMIN and NET_RAW"), "{denied}");
    assert!(
        denied.contains("generation id: Permission denied"),
        "{denied}"
    );

    let failed = command_failed(
        "iptables-restore --noflush --wait".to_owned(),
        status,
        "iptables-restore: line 3 failed".to_owned(),
    )
    .to_string();
    assert!(!failed.contains("NET_ADMIN"), "{failed}");
    assert!(
        failed.contains("`iptables-restore --noflush --wait` failed"),
        "{failed}"
    );
    assert!(failed.contains("line 3 failed"), "{failed}");
}
