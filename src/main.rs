//! The `sigil` binary: parses the command line and hands off to the library crates.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sigil_agent::config::AgentConfig;
use sigil_base::bootstrap::{LogArgs, block_on, error_report, shutdown_signal};
use sigil_ca::cli::{CaCommand, InspectCertArgs};
use sigil_identity::tls::KeyExchange;
use sigil_proxy::cli::ProxyCommand;

/// sigil: workload identity and mutual TLS for Kubernetes.
///
/// One binary for every part: the CA (`sigil ca serve`), the node agent (`sigil agent run`), the
/// bundled proxy (`sigil proxy run`, `sigil proxy init`; also alone as `sigil-proxy`, which
/// injected sidecars run), and operator tools (`sigil inspect`, `sigil stat`). Logs are JSON
/// lines on stdout by default; set RUST_LOG (e.g. `info`, `sigil_ca=debug`) to change the level.
#[derive(Parser, Debug)]
#[command(name = "sigil", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The certificate authority: serve, and offline init / issue / rotate-root.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The node agent: attests workloads on this node and serves their certificates over
    /// Envoy SDS and the SPIFFE Workload API on a Unix socket.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The bundled proxy: `run` beside an application (mTLS in and out), `init` to install the
    /// iptables rules that send the pod's traffic through it. The same as the `sigil-proxy`
    /// binary, which injected sidecars run: it carries the proxy alone and maps less memory.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Look at what sigil issued.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Try sigil on this machine, no cluster and no root needed: runs a CA and a node agent (in
    /// this process), two toy services each behind a `sigil proxy` (mTLS, explicit mode) and an
    /// authorization policy, all on loopback; sends allowed and denied requests, rotates
    /// certificates under load, and prints a report of each step with the metrics that prove it.
    ///
    /// Only the report goes to stdout; the components' logs go to logs/ in the working directory
    /// (kept with --keep, or when a check fails). Exits 0 when every check passed, 1 when one
    /// failed (the report says which and why), 2 on bad flags.
    Demo(sigil_demo::DemoConfig),
    /// Live golden metrics of the mesh's proxies, like `linkerd viz stat`: success rate,
    /// requests/s, p50/p95/p99 latency and TCP connections per pod, Service or peer.
    ///
    /// Read from Prometheus (--prometheus) or straight from the proxies' metrics endpoints
    /// (--metrics). A request failed when it was answered 5xx or, for gRPC, with a grpc-status
    /// other than 0; latency runs from a request's head to its response's head. Exits 2, saying
    /// what to do, when a source cannot be read or holds no sigil proxy metrics.
    Stat(sigil_stat::StatArgs),
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Run the agent (see --help for every flag).
    Run(Box<AgentConfig>),
}

#[derive(Subcommand, Debug)]
enum InspectCommand {
    /// Print a certificate chain's identity, validity and every departure from sigil's profile;
    /// exits 1 if anything is wrong.
    Cert(InspectCertArgs),
    /// List the identities a node agent holds, their serials and when each renews (run as root
    /// on the node).
    Agent {
        /// The agent's socket.
        #[arg(long, default_value = sigil_proxy_api::AGENT_SOCKET)]
        socket: std::path::PathBuf,
    },
    /// Would this connection or request be allowed, and by which policy? Prints `ALLOW` or
    /// `DENY` and the deciding policy (`namespace/name` or `default`) on the first line, then
    /// why; exits 0 for ALLOW, 1 for DENY, 2 for a usage or policy error.
    Policy(sigil_policy::inspect::InspectPolicyArgs),
    /// Which route, rule, filters and backends a request from a client to a Service port takes,
    /// and why each other rule was not taken, from the agent's --policy-file and --mesh-file,
    /// or without them from the cluster (the agent's and the proxy's own code). The first line is the answer: `ROUTE <kind>
    /// <namespace>/<name> rule <n>`, `REDIRECT <status> <location>`, `NO-ROUTE` (the Service is
    /// balanced as without routes) or `NOT-FOUND` (the proxy answers 404); exits 0, or 1 for
    /// NOT-FOUND, 2 for a usage or file error.
    Route(sigil_route::inspect::InspectRouteArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo keeps stdout for its report and logs to files of its own.
    if !matches!(cli.command, Command::Demo(_))
        && let Err(e) = cli.log.init(matches!(cli.command, Command::Inspect(_)))
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Before any TLS configuration: every connection of the process, sigil's own and the
    // Kubernetes client's, uses the key exchange the component was given.
    let key_exchange = match &cli.command {
        Command::Ca(CaCommand::Serve(config)) => config.tls_key_exchange,
        Command::Agent(AgentCommand::Run(config)) => config.tls_key_exchange,
        Command::Proxy(command) => command.key_exchange(),
        _ => KeyExchange::default(),
    };
    if let Err(e) = sigil_identity::tls::use_key_exchange(key_exchange) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match &cli.command {
        Command::Proxy(command) => command.runtime(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    block_on(runtime, run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let result: anyhow::Result<bool> = match cli.command {
        Command::Ca(command) => sigil_ca::cli::run(command, shutdown_signal())
            .await
            .map(|()| true)
            .map_err(Into::into),
        Command::Agent(AgentCommand::Run(config)) => {
            sigil_agent::server::run(*config, shutdown_signal())
                .await
                .map(|()| true)
                .map_err(Into::into)
        }
        Command::Proxy(command) => command
            .run(shutdown_signal())
            .await
            .map(|()| true)
            .map_err(Into::into),
        Command::Inspect(InspectCommand::Agent { socket }) => {
            sigil_agent::admin_api::list_identities(&socket)
                .await
                .map(|list| {
                    sigil_agent::admin_api::print_identities(
                        &list,
                        std::time::SystemTime::now(),
                        &mut Stdout::new(),
                    );
                    true
                })
                .map_err(Into::into)
        }
        Command::Inspect(InspectCommand::Cert(args)) => {
            sigil_ca::cli::inspect_cert(&args, &mut Stdout::new()).map_err(Into::into)
        }
        Command::Demo(config) => sigil_demo::run(config, shutdown_signal())
            .await
            .map_err(Into::into),
        Command::Stat(args) => sigil_stat::run(&args, &mut Stdout::new())
            .await
            .map(|()| true)
            .map_err(Into::into),
        Command::Inspect(InspectCommand::Policy(args)) => {
            sigil_policy::inspect::run(&args, &mut Stdout::new())
                .await
                .map_err(Into::into)
        }
        Command::Inspect(InspectCommand::Route(args)) => inspect_route(&args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", error_report(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

/// How long `sigil inspect route` waits for the cluster's Services and routes to be listed.
const INSPECT_ROUTE_LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `sigil inspect route`: the route objects of the policy file and the Services of the mesh file
/// (checked as the agent checks it, in the client's trust domain), or without them the
/// cluster's as an agent sees them; then the answer.
async fn inspect_route(args: &sigil_route::inspect::InspectRouteArgs) -> anyhow::Result<bool> {
    let td = args.from.trust_domain();
    let (objects, catalog) = match (&args.policy_file, &args.mesh_file) {
        (Some(policy_file), Some(mesh_file)) => {
            let mesh = sigil_agent::mesh::MeshFile::load(mesh_file, td)
                .with_context(|| format!("mesh file {}", mesh_file.display()))?;
            // The mesh file lists meshed Services only (every endpoint a member).
            let catalog = sigil_proxy_api::routes::catalog(mesh.services(), []);
            (
                sigil_route::inspect::read_route_documents(policy_file)?,
                catalog,
            )
        }
        // clap makes each of the files require the other.
        _ => {
            let inputs =
                sigil_agent::routes::cluster_inputs(td.clone(), INSPECT_ROUTE_LIST_WAIT).await?;
            (inputs.route_objects(), inputs.catalog())
        }
    };
    Ok(sigil_route::inspect::run(
        args,
        &objects,
        &catalog,
        &mut Stdout::new(),
    )?)
}

/// Standard output for commands that print an answer. Once the reader has gone (`sigil inspect
/// ... | head`), the rest of the answer is dropped rather than failing the command: its exit
/// code still says what it decided.
struct Stdout {
    inner: std::io::Stdout,
    reader_gone: bool,
}

impl Stdout {
    fn new() -> Self {
        Stdout {
            inner: std::io::stdout(),
            reader_gone: false,
        }
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.reader_gone {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.reader_gone = true;
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.inner.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.reader_gone = true;
                Ok(())
            }
            other => other,
        }
    }
}
