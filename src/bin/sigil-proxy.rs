//! The `sigil-proxy` binary: the bundled proxy alone, as injected sidecars run it.

use std::process::ExitCode;

use clap::Parser;
use sigil_base::bootstrap::{LogArgs, block_on, error_report, shutdown_signal};
use sigil_proxy::cli::ProxyCommand;

/// sigil-proxy: sigil's bundled proxy alone (the same as `sigil proxy`).
///
/// `sigil-proxy run` sits beside an application and makes its TCP traffic mutual TLS, with the
/// certificates, policies and endpoints of the node agent; `sigil-proxy init` installs the
/// iptables rules that send a pod's traffic through it. This binary carries none of the CA's,
/// the agent's or the Kubernetes client's code, so each proxy maps less memory than `sigil proxy
/// run` would. Logs are JSON lines on stdout by default; set RUST_LOG (e.g. `info`,
/// `sigil_proxy=debug`) to change the level.
#[derive(Parser, Debug)]
#[command(name = "sigil-proxy", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: ProxyCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.log.init(false) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Before any TLS configuration is built.
    if let Err(e) = sigil_identity::tls::use_key_exchange(cli.command.key_exchange()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = cli.command.runtime();
    block_on(runtime, async move {
        match cli.command.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", error_report(&e));
                ExitCode::from(2)
            }
        }
    })
}
