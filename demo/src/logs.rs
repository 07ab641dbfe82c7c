//! Where the in-process components' logs go: JSON lines in the working directory (`ca.log` for
//! the CA and its audit trail, `agent.log` for the agent and everything else), so that stdout
//! carries only the report.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::Metadata;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Filter(#[from] sigil_base::bootstrap::BootstrapError),
}

pub const CA_LOG: &str = "ca.log";
pub const AGENT_LOG: &str = "agent.log";

/// Whether an event belongs in the CA's log.
pub fn is_ca_target(target: &str) -> bool {
    target.starts_with("sigil_ca") || target == "sigil_audit"
}

fn create(dir: &Path, name: &str) -> Result<File, LogError> {
    let path = dir.join(name);
    File::create(&path).map_err(|source| LogError::Create { path, source })
}

/// Sends this process's logs to `dir/ca.log` and `dir/agent.log` (filtered as RUST_LOG says,
/// [`sigil_base::bootstrap::log_filter`]). A no-op if a global subscriber is installed already
/// (as in tests).
pub fn install(dir: &Path) -> Result<(), LogError> {
    let ca = create(dir, CA_LOG)?;
    let agent = create(dir, AGENT_LOG)?;
    let filter = sigil_base::bootstrap::log_filter()?;
    let _ = Registry::default()
        .with(filter)
        .with(json(ca).with_filter(FilterFn::new(|m: &Metadata<'_>| is_ca_target(m.target()))))
        .with(json(agent).with_filter(FilterFn::new(|m: &Metadata<'_>| !is_ca_target(m.target()))))
        .try_init();
    Ok(())
}

/// JSON lines into `file`, as `sigil --log-format json` writes them on stdout.
fn json<S>(file: File) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_writer(Mutex::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_log_takes_the_ca_and_its_audit_trail() {
        assert!(is_ca_target("sigil_ca::server"));
        assert!(is_ca_target("sigil_audit"));
        assert!(!is_ca_target("sigil_agent::certs"));
        assert!(!is_ca_target("h2::proto"));
    }
}
