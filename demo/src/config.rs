//! `sigil demo` flags, their defaults (named consts) and the checks made before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sigil_base::flags::parse_duration;

/// Lifetime of the workload certificates: short, so several renewals happen during the demo,
/// with seconds to spare before expiry on a busy machine.
pub const DEFAULT_CERT_TTL: &str = "8s";
/// How long traffic flows while certificates rotate.
pub const DEFAULT_ROTATION_WINDOW: &str = "12s";
/// Requests sent in each of the allowed and denied steps.
pub const DEFAULT_REQUESTS: u32 = 10;
/// The shortest certificate lifetime the demo accepts: the agent refuses a certificate with less
/// than 2 s left and renews at half the lifetime, so below this renewals race expiry.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(4);
/// The rotation window must be this many certificate lifetimes long: the agent renews at half
/// the lifetime (± 5 %), so two renewals need a little over one lifetime, plus the renewal itself.
pub const MIN_WINDOW_PER_TTL: f64 = 1.5;
/// The trust domain of every identity in the demo.
pub const TRUST_DOMAIN: &str = "demo.sigil.dev";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--cert-ttl {given:?} is too short: at least {}s (the agent renews at half the lifetime \
         and refuses certificates with under 2s left)",
        MIN_CERT_TTL.as_secs()
    )]
    CertTtlTooShort { given: Duration },
    #[error(
        "--rotation-window {window:?} cannot show two renewals of certificates living {ttl:?}: \
         make it at least {needed:?} (or shorten --cert-ttl)"
    )]
    WindowTooShort {
        window: Duration,
        ttl: Duration,
        needed: Duration,
    },
    #[error("--requests must be at least 1")]
    NoRequests,
}

/// Runs a CA, a node agent, two toy services each behind a `sigil proxy` in explicit mode, and
/// an authorization policy, all on loopback; sends allowed and denied traffic, rotates
/// certificates under load, and prints a report with the metrics that prove each step.
#[derive(Args, Clone, Debug)]
pub struct DemoConfig {
    /// Lifetime of the workload certificates (the agent renews them at half of it).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_CERT_TTL)]
    pub cert_ttl: Duration,

    /// How long to keep traffic flowing while certificates rotate (at least 1.5 × --cert-ttl).
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_ROTATION_WINDOW)]
    pub rotation_window: Duration,

    /// Requests sent in each of the allowed and denied steps.
    #[arg(long, default_value_t = DEFAULT_REQUESTS)]
    pub requests: u32,

    /// Keep the working directory (CA state, policy file, component logs) and print its path;
    /// it is always kept when a check fails.
    #[arg(long)]
    pub keep: bool,

    /// Work in this directory (created if missing, must be empty; never removed) instead of a
    /// fresh temporary one. Use it where the temporary directory does not allow executing files.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl DemoConfig {
    /// Refuses combinations that could not show what the demo is for.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_ttl < MIN_CERT_TTL {
            return Err(ConfigError::CertTtlTooShort {
                given: self.cert_ttl,
            });
        }
        let needed = self.cert_ttl.mul_f64(MIN_WINDOW_PER_TTL);
        if self.rotation_window < needed {
            return Err(ConfigError::WindowTooShort {
                window: self.rotation_window,
                ttl: self.cert_ttl,
                needed,
            });
        }
        if self.requests == 0 {
            return Err(ConfigError::NoRequests);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoConfig,
    }

    fn parse(args: &[&str]) -> DemoConfig {
        Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))
            .unwrap()
            .demo
    }

    #[test]
    fn the_defaults_are_valid() {
        let config = parse(&[]);
        assert_eq!(config.cert_ttl, Duration::from_secs(8));
        assert_eq!(config.rotation_window, Duration::from_secs(12));
        assert!(!config.keep && config.dir.is_none());
        config.validate().unwrap();
    }

    #[test]
    fn a_ttl_below_the_minimum_is_refused_with_the_reason() {
        let err = parse(&["--cert-ttl", "1s"]).validate().unwrap_err();
        assert!(matches!(err, ConfigError::CertTtlTooShort { .. }));
        let text = err.to_string();
        assert!(
            text.contains("--cert-ttl") && text.contains("at least 4s"),
            "{text}"
        );
    }

    #[test]
    fn the_window_must_fit_two_renewals() {
        let err = parse(&["--cert-ttl", "10s", "--rotation-window", "10s"])
            .validate()
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::WindowTooShort {
                window: Duration::from_secs(10),
                ttl: Duration::from_secs(10),
                needed: Duration::from_secs(15),
            }
        );
        parse(&["--cert-ttl", "10s", "--rotation-window", "15s"])
            .validate()
            .unwrap();
        assert_eq!(
            parse(&["--requests", "0"]).validate(),
            Err(ConfigError::NoRequests)
        );
    }
}
