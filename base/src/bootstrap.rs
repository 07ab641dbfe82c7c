//! What every sigil binary (`sigil`, `sigil-proxy`) does around its command: the `--log-format`
//! flag, RUST_LOG's filter and the log subscriber, the async runtime, the shutdown signal, and
//! the one-line error report it prints before exiting 2.

use clap::{Args, ValueEnum};
use tokio::sync::watch;
use tracing_subscriber::filter::{ParseError, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "RUST_LOG={value:?} is not a log filter ({source}): give a level, target=level pairs \
         or both, comma-separated, e.g. `info` or `warn,sigil_proxy=debug`"
    )]
    LogFilter { value: String, source: ParseError },
}

/// Log format: json (one object per line, for collectors) or text (for people).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// The logging flags every binary takes before or after its subcommand.
#[derive(Args, Clone, Copy, Debug)]
pub struct LogArgs {
    /// Log format: json (one object per line, for collectors) or text (for people).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the process's log subscriber: [`log_filter`]'s filter, lines on standard output,
    /// or on standard error for a command whose answer is standard output.
    pub fn init(self, to_stderr: bool) -> Result<(), BootstrapError> {
        use tracing_subscriber::fmt::{layer, writer::BoxMakeWriter};
        let writer = if to_stderr {
            BoxMakeWriter::new(std::io::stderr)
        } else {
            BoxMakeWriter::new(std::io::stdout)
        };
        let subscriber = tracing_subscriber::registry().with(log_filter()?);
        match self.log_format {
            LogFormat::Json => subscriber
                .with(
                    layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_writer(writer),
                )
                .init(),
            LogFormat::Text => subscriber.with(layer().with_writer(writer)).init(),
        }
        Ok(())
    }
}

/// The log filter RUST_LOG names, `info` when it is unset or empty. Levels per target prefix
/// (`warn,sigil_proxy=debug`), not `EnvFilter`'s span and field directives: those compile
/// regular expressions at start, which kept 0.2–0.3 MiB more of each proxy resident
/// (BENCHMARKS.md, "Session 28").
pub fn log_filter() -> Result<Targets, BootstrapError> {
    parse_log_filter(std::env::var("RUST_LOG").ok().as_deref())
}

fn parse_log_filter(value: Option<&str>) -> Result<Targets, BootstrapError> {
    match value.map(str::trim) {
        None | Some("") => Ok(Targets::new().with_default(tracing::Level::INFO)),
        Some(value) => value.parse().map_err(|source| BootstrapError::LogFilter {
            value: value.to_string(),
            source,
        }),
    }
}

/// Flips to true on SIGTERM or Ctrl-C, so servers drain and exit. Call within the runtime.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown signal received");
        let _ = tx.send(true);
    });
    rx
}

/// Builds the runtime (with I/O and timers) and runs `main` on it to its exit code; 2, with the
/// reason on standard error, when the runtime cannot start.
pub fn block_on(
    mut runtime: tokio::runtime::Builder,
    main: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, `outer: inner: ...`, leaving out a cause whose text the
/// message already carries (many errors say their source in their own message).
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut report = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !report.contains(&text) {
            report.push_str(": ");
            report.push_str(&text);
        }
        cause = next.source();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says its source in its own message, and also returns it as its source.
    #[derive(Debug)]
    struct Embeds {
        source: std::io::Error,
    }

    impl std::fmt::Display for Embeds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading policy file p.yaml: {}", self.source)
        }
    }

    impl std::error::Error for Embeds {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    /// An error that leaves its source to the report.
    #[derive(Debug)]
    struct Wraps {
        source: std::io::Error,
    }

    impl std::fmt::Display for Wraps {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connecting")
        }
    }

    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn rust_log_takes_levels_per_target_and_refuses_anything_else() {
        use tracing::Level;
        use tracing::level_filters::LevelFilter;

        let default = parse_log_filter(None).unwrap();
        assert!(default.would_enable("sigil_proxy::inbound", &Level::INFO));
        assert!(!default.would_enable("sigil_proxy::inbound", &Level::DEBUG));
        assert_eq!(
            parse_log_filter(Some(" ")).unwrap().default_level(),
            Some(LevelFilter::INFO)
        );

        let targets = parse_log_filter(Some("warn,sigil_agent::certs=debug")).unwrap();
        assert!(targets.would_enable("sigil_agent::certs", &Level::DEBUG));
        assert!(!targets.would_enable("sigil_agent::server", &Level::INFO));
        assert!(targets.would_enable("h2::proto", &Level::WARN));

        for bad in ["sigil_proxy=loud", "info,=debug=x"] {
            let error = parse_log_filter(Some(bad)).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("RUST_LOG={bad:?} is not a log filter (")),
                "{error}"
            );
            assert!(error.contains("e.g. `info`"), "{error}");
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let embeds = Embeds {
            source: std::io::Error::other("no such file"),
        };
        assert_eq!(
            error_report(&embeds),
            "reading policy file p.yaml: no such file"
        );
        let wraps = Wraps {
            source: std::io::Error::other("refused"),
        };
        assert_eq!(error_report(&wraps), "connecting: refused");
    }
}
