//! The proxy's command line, one definition for both binaries that carry it: `sigil proxy …`
//! and `sigil-proxy …` (the proxy alone, which injected sidecars run). It owns the subcommands
//! (`run`, `init`), the async runtime each wants, and the key exchange its connections offer.

use clap::Subcommand;
use sigil_identity::tls::KeyExchange;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::init::{InitConfig, InitError};
use crate::server::ProxyError;

#[derive(Subcommand, Debug)]
pub enum ProxyCommand {
    /// Run the proxy (see --help for transparent and explicit modes).
    Run(Box<ProxyConfig>),
    /// Install (or --cleanup) the iptables redirection in this network namespace.
    Init(InitConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Run(#[from] ProxyError),
    #[error(transparent)]
    Init(#[from] InitError),
}

impl ProxyCommand {
    /// The key exchange every connection of the process offers, to be set before any TLS
    /// configuration is built.
    pub fn key_exchange(&self) -> KeyExchange {
        match self {
            ProxyCommand::Run(config) => config.tls_key_exchange,
            ProxyCommand::Init(_) => KeyExchange::default(),
        }
    }

    /// The runtime for the command. The proxy sizes its workers to its CPU limit; one worker
    /// gets a single-threaded runtime, with no hand-off between threads.
    pub fn runtime(&self) -> tokio::runtime::Builder {
        match self {
            ProxyCommand::Run(config) if config.worker_threads() == 1 => {
                tokio::runtime::Builder::new_current_thread()
            }
            ProxyCommand::Run(config) => {
                let mut runtime = tokio::runtime::Builder::new_multi_thread();
                runtime.worker_threads(config.worker_threads());
                runtime
            }
            ProxyCommand::Init(_) => tokio::runtime::Builder::new_current_thread(),
        }
    }

    /// Runs the command to its end: `run` until `shutdown` turns true and the proxy drained.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), CommandError> {
        match self {
            ProxyCommand::Run(config) => Ok(crate::server::run(*config, shutdown).await?),
            ProxyCommand::Init(config) => Ok(crate::init::run(&config)?),
        }
    }
}
