//! `sigil demo`: runs a whole sigil mesh on loopback (a CA and a node agent in this process, two
//! toy services each behind a `sigil proxy` child process, an authorization policy), sends
//! allowed and denied traffic, rotates certificates under load, and prints a report with the
//! metrics that prove each step. Needs nothing but the `sigil` binary, and no root.
#![forbid(unsafe_code)]

pub mod checks;
pub mod components;
pub mod config;
pub mod logs;
pub mod report;
pub mod scenario;
pub mod scrape;
pub mod services;
pub mod workdir;

use std::time::Instant;

use tokio::sync::watch;

pub use config::DemoConfig;
use report::{Check, Reporter};
use workdir::Workdir;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Workdir(#[from] workdir::WorkdirError),
    #[error(transparent)]
    Logs(#[from] logs::LogError),
}

/// Runs the demo, printing the report on stdout. `Ok(true)` when every check passed,
/// `Ok(false)` when one failed (the report says which and why, and the working directory is
/// kept); `Err` when it could not start at all (bad flags, no working directory). Stops early,
/// failing, when `shutdown` flips to true (Ctrl-C, SIGTERM).
pub async fn run(
    config: DemoConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<bool, DemoError> {
    config.validate()?;
    let started = Instant::now();
    let workdir = Workdir::create(config.dir.as_deref())?;
    logs::install(&workdir.logs())?;
    let mut report = Reporter::new(std::io::stdout(), scenario::STEPS);
    report
        .line("sigil demo: a CA, a node agent and two services behind sigil proxies, on loopback");
    report.line(&format!(
        "  working directory {} ({}); component logs in its logs/",
        workdir.path.display(),
        if workdir.is_temporary() && !config.keep {
            "removed at the end unless a check fails; --keep keeps it"
        } else {
            "kept"
        }
    ));
    report.line("");

    let mut running = scenario::Running::new();
    let mut checks = Vec::new();
    let stopped = tokio::select! {
        () = scenario::run(&config, &workdir, &mut report, &mut running, &mut checks) => false,
        () = interrupted(&mut shutdown) => true,
    };
    if stopped {
        report.line("      interrupted");
        checks.push(Check::fail(
            "interrupted",
            "stopped by a signal before the end",
        ));
    }
    running.stop().await;

    let passed = !checks.is_empty() && checks.iter().all(|c| c.passed);
    let path = workdir.path.display().to_string();
    let kept = workdir.finish(config.keep || !passed);
    report.line(&report::summary(
        &checks,
        started.elapsed(),
        kept.then_some(path.as_str()),
    ));
    Ok(passed)
}

/// Resolves once `shutdown` is true (never if its sender goes away).
async fn interrupted(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
