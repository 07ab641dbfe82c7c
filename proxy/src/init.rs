//! `sigil proxy init`: the iptables and ip6tables nat rules that send a pod's TCP traffic
//! through the proxy.
//!
//! The rule shape follows Istio's istio-iptables, so its behaviour and exclusions carry over;
//! both families get the same chains and rules (each with its own `--exclude-outbound-cidrs`):
//!
//! ```text
//! PREROUTING -p tcp -> SIGIL_INBOUND
//!     RETURN: the proxy's own ports, --exclude-inbound-ports
//!     the rest -> SIGIL_IN_REDIRECT: REDIRECT --to-ports <--inbound-port>
//! OUTPUT -p tcp -> SIGIL_OUTPUT
//!     RETURN: the proxy's uid, loopback, --exclude-outbound-cidrs, --exclude-outbound-ports
//!     the rest -> SIGIL_REDIRECT: REDIRECT --to-ports <--outbound-port>
//! ```
//!
//! Each family is applied as one `iptables-restore --noflush` (`ip6tables-restore`) transaction,
//! built from what `iptables-save -t nat` shows: sigil's old jumps are deleted and its chains
//! flushed in the same transaction that adds the new rules, so running init twice leaves exactly
//! the same rules and no moment exists with half of them. IPv4 goes first, then IPv6; a failure
//! in the second is fixed by running init again. `--cleanup` removes every `SIGIL_` chain and
//! every jump to one, in both families, and leaves other rules alone.
//!
//! IPv6 (`--ipv6`): with `auto` the IPv6 rules are installed iff the namespace has IPv6 (its
//! `disable_ipv6` sysctl exists and is 0), so IPv4-only namespaces behave as before IPv6 support.
//! The ip6tables command is the same backend as `--iptables` (`iptables-legacy` →
//! `ip6tables-legacy`), or `--ip6tables`. When the namespace has IPv6 and its rules cannot be
//! applied, init fails: a pod must not start with IPv6 bypassing the proxy, unless `--ipv6 off`
//! says so.

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use clap::{Args, ValueEnum};
use tracing::{info, warn};

use sigil_proxy_api::{INBOUND_PORT, OUTBOUND_PORT, PROXY_UID};

/// Inbound ports never redirected: the proxy's Prometheus port, so scrapers need no mTLS.
pub const DEFAULT_EXCLUDED_INBOUND_PORTS: &str = "15020";
/// The iptables command whose `-save` and `-restore` variants are run: the system's default
/// backend (nf_tables or legacy, as Debian's alternatives choose).
pub const DEFAULT_IPTABLES: &str = "iptables";
/// The IPv4 command's name, which the IPv6 one replaces to keep the backend.
const IPTABLES_NAME: &str = "iptables";
const IP6TABLES_NAME: &str = "ip6tables";
/// Present and `0` iff the network namespace has IPv6 (absent when the kernel runs with
/// `ipv6.disable=1`). /proc/sys/net is the reading process's own namespace.
const IPV6_SYSCTL: &str = "/proc/sys/net/ipv6/conf/all/disable_ipv6";

/// Every chain sigil owns starts with this; cleanup removes all of them, even ones an older
/// version created.
const CHAIN_PREFIX: &str = "SIGIL_";
const INBOUND_CHAIN: &str = "SIGIL_INBOUND";
const IN_REDIRECT_CHAIN: &str = "SIGIL_IN_REDIRECT";
const OUTPUT_CHAIN: &str = "SIGIL_OUTPUT";
const REDIRECT_CHAIN: &str = "SIGIL_REDIRECT";
/// Our chains, in the order they are declared.
const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];
const LOOPBACK_INTERFACE: &str = "lo";
/// `iptables-restore` flags: keep every rule we do not name; wait for the xtables lock rather
/// than fail when another tool holds it.
const RESTORE_ARGS: [&str; 2] = ["--noflush", "--wait"];
const SAVE_ARGS: [&str; 2] = ["-t", "nat"];
/// What iptables prints when it lacks privileges (nf_tables and legacy backends alike).
const PERMISSION_MARKERS: [&str; 2] = ["Permission denied", "must be root"];

/// Writes (or with --cleanup removes) the iptables and ip6tables nat rules that send a pod's
/// TCP traffic through the proxy: OUTPUT → --outbound-port, PREROUTING → --inbound-port.
/// Traffic of the proxy's own uid and on loopback is never redirected. Idempotent: running it
/// twice leaves the same rules. Needs NET_ADMIN and NET_RAW in the pod's network namespace.
#[derive(Args, Clone, Debug)]
pub struct InitConfig {
    /// The uid the proxy runs as; its own connections are not redirected. Must not be 0.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_uid: u32,

    /// Where inbound connections are redirected (the proxy's inbound listener).
    #[arg(long, default_value_t = INBOUND_PORT)]
    pub inbound_port: u16,

    /// Where outbound connections are redirected (the proxy's outbound listener).
    #[arg(long, default_value_t = OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Inbound destination ports left alone (comma-separated; give the flag no value to exclude
    /// none). The proxy's own ports are always left alone.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 0..,
        default_value = DEFAULT_EXCLUDED_INBOUND_PORTS
    )]
    pub exclude_inbound_ports: Vec<String>,

    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub exclude_outbound_ports: Vec<String>,

    /// Outbound destination CIDRs left alone, IPv4 or IPv6 (comma-separated, e.g.
    /// 169.254.169.254/32,fd00:ec2::254/128); each goes to its own family's rules.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub exclude_outbound_cidrs: Vec<String>,

    /// Remove sigil's chains and jumps (of both families) instead of installing them.
    #[arg(long)]
    pub cleanup: bool,

    /// Print the iptables-restore input instead of applying it, each family's after a
    /// `# <command>` comment line (reads the current rules when it may, so the text is exactly
    /// what would be applied).
    #[arg(long)]
    pub dry_run: bool,

    /// The iptables command: sigil runs `<IPTABLES>-save` and `<IPTABLES>-restore`, e.g.
    /// iptables-legacy or iptables-nft to choose a backend, or a full path.
    #[arg(long, default_value = DEFAULT_IPTABLES)]
    pub iptables: String,

    /// The ip6tables command, run as `<IP6TABLES>-save` and `<IP6TABLES>-restore`. Default:
    /// --iptables with `iptables` replaced by `ip6tables`, i.e. the same backend
    /// (iptables-nft → ip6tables-nft, /usr/sbin/iptables → /usr/sbin/ip6tables).
    #[arg(long)]
    pub ip6tables: Option<String>,

    /// IPv6 redirection. auto: when the namespace has IPv6; on: required (fails without IPv6);
    /// off: none, and IPv6 traffic then bypasses the proxy (no mTLS, no policy). With auto or
    /// on, init fails when IPv6 is present and its rules cannot be applied.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
}

/// Whether `sigil proxy init` installs IPv6 rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    /// When the network namespace has IPv6.
    Auto,
    /// Always; fails when the namespace has no IPv6.
    On,
    /// Never: IPv6 traffic bypasses the proxy.
    Off,
}

/// Why `sigil proxy init` refused or failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "--proxy-uid 0 refused: the proxy's uid is exempt from redirection, so every process \
         running as root in the pod would bypass the proxy (no mTLS, no policy); run the proxy \
         as its own non-root uid (default {PROXY_UID})"
    )]
    RootProxyUid,
    #[error("{flag} {value:?}: not a port (1-65535)")]
    BadPort { flag: &'static str, value: String },
    #[error(
        "--inbound-port and --outbound-port are both {0}: they must differ, the proxy tells \
         inbound from outbound traffic by the port it arrives on"
    )]
    SamePorts(u16),
    #[error(
        "--exclude-outbound-cidrs {cidr:?}: expected a CIDR ADDRESS/PREFIX, IPv4 (prefix 0-32) \
         or IPv6 (prefix 0-128), e.g. 169.254.169.254/32 or fd00:ec2::254/128"
    )]
    BadCidr { cidr: String },
    #[error(
        "--iptables {iptables:?}: cannot tell the ip6tables command of the same backend (the \
         name does not start with \"iptables\"); give --ip6tables, or --ipv6 off to leave IPv6 \
         traffic unredirected"
    )]
    Ip6tablesUnknown { iptables: String },
    #[error(
        "--ipv6 on, but this network namespace has no IPv6 ({IPV6_SYSCTL} is absent or not 0); \
         use --ipv6 auto to install the IPv4 rules alone"
    )]
    Ipv6Absent,
    #[error("reading {IPV6_SYSCTL} to tell whether the namespace has IPv6: {0}")]
    Ipv6Sysctl(#[source] io::Error),
    #[error(
        "this network namespace has IPv6 but sigil's IPv6 redirection could not be applied, so \
         IPv6 traffic would bypass the proxy (no mTLS, no policy): {0}. Install ip6tables and \
         the ip6table_nat kernel module, point --ip6tables at the ip6tables command, or accept \
         the bypass with --ipv6 off"
    )]
    Ipv6Rules(#[source] Box<InitError>),
    #[error(
        "{program} not found: install iptables (Debian: apt-get install iptables), or point \
         --iptables (--ip6tables for IPv6) at it"
    )]
    IptablesMissing { program: String },
    #[error(
        "`{command}` was denied: sigil proxy init needs NET_ADMIN and NET_RAW in the pod's \
         network namespace (run it as root, with those capabilities added to the init \
         container's securityContext); iptables said: {stderr}"
    )]
    PermissionDenied { command: String, stderr: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the rules to stdout: {0}")]
    Print(#[source] io::Error),
}

/// Installs (or removes, with --cleanup) the redirection; with --dry-run prints the
/// iptables-restore input on stdout instead.
pub fn run(config: &InitConfig) -> Result<(), InitError> {
    run_to(config, Path::new(IPV6_SYSCTL), &mut io::stdout().lock())
}

/// [`run`], with the IPv6 sysctl to read and the dry run's output as arguments.
fn run_to(config: &InitConfig, ipv6_sysctl: &Path, out: &mut impl Write) -> Result<(), InitError> {
    let plan = Plan::new(config)?;
    let ipv4 = Iptables::new(&config.iptables);
    let ipv6 = Ipv6::resolve(config, ipv6_sysctl)?;
    if config.dry_run {
        let mut text = dry_run_section(&ipv4, &plan, Family::V4, config.cleanup);
        if let Ipv6::Install(ip6tables) = &ipv6 {
            text += &dry_run_section(ip6tables, &plan, Family::V6, config.cleanup);
        }
        return out.write_all(text.as_bytes()).map_err(InitError::Print);
    }
    let ipv4_state = apply(&ipv4, &plan, Family::V4, config.cleanup)?;
    let ipv6_state = match &ipv6 {
        Ipv6::Install(ip6tables) => Some(
            apply(ip6tables, &plan, Family::V6, config.cleanup)
                .map_err(|e| InitError::Ipv6Rules(Box::new(e)))?,
        ),
        Ipv6::Absent | Ipv6::Off => None,
    };
    let backend = |state: &NatState| state.generated_by.clone().unwrap_or("unknown".to_owned());
    let ip6tables = ipv6_state.as_ref().map(backend);
    if config.cleanup {
        info!(
            iptables = backend(&ipv4_state),
            ip6tables,
            ipv6 = ipv6.name(),
            removed_chains = ?ipv4_state.sigil_chains,
            removed_jumps = ?ipv4_state.jumps,
            removed_ipv6_chains = ?ipv6_state.as_ref().map(|s| &s.sigil_chains),
            removed_ipv6_jumps = ?ipv6_state.as_ref().map(|s| &s.jumps),
            "removed sigil's iptables redirection"
        );
    } else {
        let cidrs: Vec<String> = plan
            .exclude_outbound_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        info!(
            iptables = backend(&ipv4_state),
            ip6tables,
            ipv6 = ipv6.name(),
            proxy_uid = plan.proxy_uid,
            inbound_port = plan.inbound_port,
            outbound_port = plan.outbound_port,
            excluded_inbound_ports = ?plan.exclude_inbound_ports,
            excluded_outbound_ports = ?plan.exclude_outbound_ports,
            excluded_outbound_cidrs = ?cidrs,
            replaced_jumps = ipv4_state.jumps.len()
                + ipv6_state.as_ref().map_or(0, |s| s.jumps.len()),
            rules = ?plan.rules(Family::V4),
            ipv6_rules = ?ipv6_state.as_ref().map(|_| plan.rules(Family::V6)),
            "installed sigil's iptables redirection"
        );
    }
    Ok(())
}

/// Reads one family's nat table and applies the install (or cleanup) transaction; returns
/// what the table held before.
fn apply(
    iptables: &Iptables,
    plan: &Plan,
    family: Family,
    cleanup: bool,
) -> Result<NatState, InitError> {
    let state = iptables.nat_state()?;
    iptables.restore(&transaction(plan, &state, family, cleanup))?;
    Ok(state)
}

/// One family's part of a dry run: a comment naming the command, then its input.
fn dry_run_section(iptables: &Iptables, plan: &Plan, family: Family, cleanup: bool) -> String {
    // A dry run must work without root or iptables; it then shows the transaction for a
    // namespace with no sigil rules yet.
    let state = iptables.nat_state().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the current rules; showing a first install");
        NatState::default()
    });
    format!(
        "# {} {}\n{}",
        iptables.restore,
        RESTORE_ARGS.join(" "),
        transaction(plan, &state, family, cleanup)
    )
}

fn transaction(plan: &Plan, state: &NatState, family: Family, cleanup: bool) -> String {
    if cleanup {
        cleanup_transaction(state)
    } else {
        install_transaction(plan, state, family)
    }
}

/// An address family, whose rules are applied by its own command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// What init does about IPv6, decided from --ipv6 and the namespace.
#[derive(Debug)]
enum Ipv6 {
    /// The namespace has IPv6: its rules are applied with this command.
    Install(Iptables),
    /// The namespace has no IPv6, so nothing can bypass the proxy over it.
    Absent,
    /// --ipv6 off.
    Off,
}

impl Ipv6 {
    fn resolve(config: &InitConfig, sysctl: &Path) -> Result<Ipv6, InitError> {
        let present = ipv6_present(sysctl)?;
        match (config.ipv6, present) {
            (Ipv6Mode::Off, present) => {
                if present {
                    warn!(
                        "--ipv6 off: this network namespace has IPv6 and no IPv6 rules are \
                         installed, so IPv6 traffic bypasses the proxy (no mTLS, no policy)"
                    );
                }
                Ok(Ipv6::Off)
            }
            (Ipv6Mode::On, false) => Err(InitError::Ipv6Absent),
            (Ipv6Mode::Auto, false) => Ok(Ipv6::Absent),
            (Ipv6Mode::On | Ipv6Mode::Auto, true) => {
                let command = match &config.ip6tables {
                    Some(command) => command.clone(),
                    None => ip6tables_command(&config.iptables).ok_or_else(|| {
                        InitError::Ip6tablesUnknown {
                            iptables: config.iptables.clone(),
                        }
                    })?,
                };
                Ok(Ipv6::Install(Iptables::new(&command)))
            }
        }
    }

    /// For the log line.
    fn name(&self) -> &'static str {
        match self {
            Ipv6::Install(_) => "installed",
            Ipv6::Absent => "absent",
            Ipv6::Off => "off",
        }
    }
}

/// Whether the namespace has IPv6: the sysctl exists and is 0.
fn ipv6_present(sysctl: &Path) -> Result<bool, InitError> {
    match std::fs::read_to_string(sysctl) {
        Ok(value) => Ok(value.trim() == "0"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InitError::Ipv6Sysctl(e)),
    }
}

/// The ip6tables command of the same backend as `iptables`: its file name's `iptables` prefix
/// replaced by `ip6tables`, the directory kept; `None` when the name has no such prefix.
fn ip6tables_command(iptables: &str) -> Option<String> {
    let name_start = iptables.rfind('/').map_or(0, |slash| slash + 1);
    let (directory, name) = iptables.split_at(name_start);
    let backend = name.strip_prefix(IPTABLES_NAME)?;
    Some(format!("{directory}{IP6TABLES_NAME}{backend}"))
}

/// The validated flags.
#[derive(Debug)]
struct Plan {
    proxy_uid: u32,
    inbound_port: u16,
    outbound_port: u16,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<Cidr>,
}

impl Plan {
    fn new(config: &InitConfig) -> Result<Plan, InitError> {
        if config.proxy_uid == 0 {
            return Err(InitError::RootProxyUid);
        }
        let inbound_port = nonzero_port("--inbound-port", config.inbound_port)?;
        let outbound_port = nonzero_port("--outbound-port", config.outbound_port)?;
        if inbound_port == outbound_port {
            return Err(InitError::SamePorts(inbound_port));
        }
        let exclude_outbound_cidrs = dedup(
            non_empty(&config.exclude_outbound_cidrs)
                .map(Cidr::parse)
                .collect::<Result<_, _>>()?,
        );
        Ok(Plan {
            proxy_uid: config.proxy_uid,
            inbound_port,
            outbound_port,
            exclude_inbound_ports: parse_ports(
                "--exclude-inbound-ports",
                &config.exclude_inbound_ports,
            )?,
            exclude_outbound_ports: parse_ports(
                "--exclude-outbound-ports",
                &config.exclude_outbound_ports,
            )?,
            exclude_outbound_cidrs,
        })
    }

    /// One family's rules of our chains and the jumps into them, as `iptables-save` prints
    /// them (so they can be compared with its output), jumps last. Only the excluded CIDRs
    /// differ between the families.
    fn rules(&self, family: Family) -> Vec<String> {
        let mut rules = vec![format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        )];
        // Connections addressed to the proxy's own listeners must reach them as they are.
        let inbound_returns = dedup(
            [self.inbound_port, self.outbound_port]
                .into_iter()
                .chain(self.exclude_inbound_ports.iter().copied())
                .collect(),
        );
        rules.extend(
            inbound_returns
                .iter()
                .map(|port| format!("-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN")),
        );
        rules.push(format!("-A {INBOUND_CHAIN} -j {IN_REDIRECT_CHAIN}"));

        rules.push(format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        // The proxy's own connections (to the original destination, and to the application on
        // 127.0.0.1) must leave as they are, or they would loop back into it.
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        // Loopback covers 127.0.0.0/8, ::1 and the application calling its own pod IPs.
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -o {LOOPBACK_INTERFACE} -j RETURN"
        ));
        rules.extend(
            self.exclude_outbound_cidrs
                .iter()
                .filter(|cidr| Family::of(cidr.network) == family)
                .map(|cidr| format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN")),
        );
        rules.extend(
            self.exclude_outbound_ports
                .iter()
                .map(|port| format!("-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN")),
        );
        rules.push(format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}"));

        rules.push(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
        rules.push(format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"));
        rules
    }
}

fn nonzero_port(flag: &'static str, port: u16) -> Result<u16, InitError> {
    if port == 0 {
        return Err(InitError::BadPort {
            flag,
            value: port.to_string(),
        });
    }
    Ok(port)
}

/// Parses a port list; empty items are skipped so that templated flags such as
/// `--exclude-outbound-ports=` mean "none".
fn parse_ports(flag: &'static str, values: &[String]) -> Result<Vec<u16>, InitError> {
    let ports = non_empty(values)
        .map(|value| {
            value
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| InitError::BadPort {
                    flag,
                    value: value.to_owned(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(dedup(ports))
}

fn non_empty(values: &[String]) -> impl Iterator<Item = &str> {
    values.iter().map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// Removes repeats, keeping the first of each, so a repeated flag value adds no duplicate rule.
fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut unique = Vec::with_capacity(items.len());
    for item in items {
        if !unique.contains(&item) {
            unique.push(item);
        }
    }
    unique
}

/// An IPv4 or IPv6 network, its address masked to the prefix the way iptables stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, InitError> {
        let bad = || InitError::BadCidr {
            cidr: text.to_owned(),
        };
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address = address.parse::<IpAddr>().map_err(|_| bad())?;
        let max_prefix = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max_prefix)
            .ok_or_else(bad)?;
        let host_bits = u32::from(max_prefix - prefix);
        let network = match address {
            IpAddr::V4(address) => {
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(address) & mask))
            }
            IpAddr::V6(address) => {
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask))
            }
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// What `iptables-save -t nat` (or `ip6tables-save`) shows of sigil.
#[derive(Debug, Default, PartialEq)]
struct NatState {
    /// The `iptables-save` version line, e.g. `iptables-save v1.8.9 (nf_tables)` (the backend).
    generated_by: Option<String>,
    /// Every chain named `SIGIL_*`.
    sigil_chains: Vec<String>,
    /// Rules outside sigil's chains that jump to one, as `CHAIN RULE...` (the text after `-A`).
    jumps: Vec<String>,
}

impl NatState {
    fn parse(save: &str) -> NatState {
        let mut state = NatState::default();
        for line in save.lines() {
            if let Some(generated) = line.strip_prefix("# Generated by ") {
                let version = generated.split(" on ").next().unwrap_or(generated);
                state.generated_by.get_or_insert_with(|| version.to_owned());
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    state.sigil_chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let words = rule_words(rule);
                let chain = words.first().copied().unwrap_or_default();
                let jumps_to_sigil = words
                    .windows(2)
                    .any(|w| matches!(w[0], "-j" | "-g") && w[1].starts_with(CHAIN_PREFIX));
                if !chain.starts_with(CHAIN_PREFIX) && jumps_to_sigil {
                    state.jumps.push(rule.to_owned());
                }
            }
        }
        state
    }
}

/// Splits an `iptables-save` rule into words; a double-quoted string (a comment, say) stays one
/// word with its quotes, so text inside it is never taken for an option.
fn rule_words(rule: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in rule.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if let Some(begin) = start.take() {
                    words.push(&rule[begin..i]);
                }
                continue;
            }
            _ => {}
        }
        start.get_or_insert(i);
    }
    if let Some(begin) = start {
        words.push(&rule[begin..]);
    }
    words
}

/// The `iptables-restore --noflush` input that replaces whatever sigil had installed with the
/// plan's rules of `family`: declaring a chain creates it or flushes it, old jumps are deleted, chains of
/// older versions that we no longer use are removed.
fn install_transaction(plan: &Plan, state: &NatState, family: Family) -> String {
    let stale: Vec<&str> = state
        .sigil_chains
        .iter()
        .map(String::as_str)
        .filter(|chain| !CHAINS.contains(chain))
        .collect();
    let mut lines = vec!["*nat".to_owned()];
    lines.extend(CHAINS.iter().map(|chain| format!(":{chain} - [0:0]")));
    lines.extend(state.jumps.iter().map(|jump| format!("-D {jump}")));
    lines.extend(stale.iter().map(|chain| format!("-F {chain}")));
    lines.extend(stale.iter().map(|chain| format!("-X {chain}")));
    lines.extend(plan.rules(family));
    lines.push("COMMIT".to_owned());
    lines.join("\n") + "\n"
}

/// The `iptables-restore --noflush` input that removes every jump into sigil's chains, then
/// the chains (flushed first, since a chain with rules cannot be deleted).
fn cleanup_transaction(state: &NatState) -> String {
    let mut lines = vec!["*nat".to_owned()];
    lines.extend(state.jumps.iter().map(|jump| format!("-D {jump}")));
    lines.extend(state.sigil_chains.iter().map(|chain| format!("-F {chain}")));
    lines.extend(state.sigil_chains.iter().map(|chain| format!("-X {chain}")));
    lines.push("COMMIT".to_owned());
    lines.join("\n") + "\n"
}

/// The `-save` and `-restore` commands of one iptables backend and family.
#[derive(Debug)]
struct Iptables {
    save: String,
    restore: String,
}

impl Iptables {
    fn new(command: &str) -> Iptables {
        Iptables {
            save: format!("{command}-save"),
            restore: format!("{command}-restore"),
        }
    }

    fn nat_state(&self) -> Result<NatState, InitError> {
        run_command(&self.save, &SAVE_ARGS, None).map(|out| NatState::parse(&out))
    }

    fn restore(&self, transaction: &str) -> Result<(), InitError> {
        run_command(&self.restore, &RESTORE_ARGS, Some(transaction)).map(drop)
    }
}

/// Runs `program args`, feeding `stdin` if given; returns its stdout.
fn run_command(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let command_line = [program]
        .iter()
        .chain(args)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let io_error = |source: io::Error| InitError::Io {
        command: command_line.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => InitError::IptablesMissing {
                program: program.to_owned(),
            },
            _ => io_error(e),
        })?;
    // Closing stdin (dropping it) ends the input. A write error is reported only if the
    // command succeeded anyway: when it failed, its stderr says why, not our broken pipe.
    let written = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(input)) => pipe.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let output = child.wait_with_output().map_err(io_error)?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if !output.status.success() {
        return Err(command_failed(command_line, output.status, stderr));
    }
    written.map_err(io_error)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn command_failed(command: String, status: ExitStatus, stderr: String) -> InitError {
    if PERMISSION_MARKERS
        .iter()
        .any(|marker| stderr.contains(marker))
    {
        InitError::PermissionDenied { command, stderr }
    } else {
        InitError::Failed {
            command,
            status,
            stderr,
        }
    }
}

#[cfg(test)]
mod tests;
