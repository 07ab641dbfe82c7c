//! What every sigil binary (`sigil`, `sigil-proxy`) does around its command: the `--log-format`
//! flag and the log subscriber, the async runtime, the shutdown signal, and the one-line error
//! report it prints before exiting 2.

use clap::{Args, ValueEnum};
use tokio::sync::watch;

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
    /// Installs the process's log subscriber: RUST_LOG's filter (default `info`), lines on
    /// standard output, or on standard error for a command whose answer is standard output.
    pub fn init(self, to_stderr: bool) {
        use tracing_subscriber::fmt::writer::BoxMakeWriter;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let writer = if to_stderr {
            BoxMakeWriter::new(std::io::stderr)
        } else {
            BoxMakeWriter::new(std::io::stdout)
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer);
        match self.log_format {
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .init(),
            LogFormat::Text => builder.init(),
        }
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
