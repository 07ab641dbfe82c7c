//! `sigil stat`'s command line.

use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};
use sigil_base::flags::parse_duration;

use crate::client::{UrlError, parse_http_url};
use crate::view::{By, Direction};

const EXAMPLES: &str = "\
Examples:
  # Each pod's inbound requests, from the cluster's Prometheus (port-forwarded)
  kubectl -n monitoring port-forward svc/prometheus 9090 &
  sigil stat --prometheus http://127.0.0.1:9090
  # Calls to each meshed Service as their callers' proxies see them, redrawn every 2 s
  sigil stat --prometheus http://127.0.0.1:9090 --by service --watch
  # The same per HTTPRoute or GRPCRoute that served them
  sigil stat --prometheus http://127.0.0.1:9090 --by route
  # Straight from two proxies' metrics ports, no Prometheus: who calls them, over 10 s
  sigil stat --metrics 198.18.0.2:15020 198.18.0.3:15020 --by peer
  # For scripts: one JSON document (a line per refresh with --watch)
  sigil stat --metrics 127.0.0.1:15020 -o json";

/// `sigil stat`'s flags (its description is the subcommand's, in src/main.rs).
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["prometheus", "metrics"])))]
#[command(after_help = EXAMPLES)]
pub struct StatArgs {
    /// Read from this Prometheus (its base URL, http://host:port[/prefix]) with PromQL: rate()
    /// and histogram_quantile() over --window. Rows per pod use the `namespace` and `pod`
    /// labels the scrape adds (see README), else `instance`.
    #[arg(long, value_name = "URL", value_parser = parse_prometheus_url)]
    pub prometheus: Option<http::Uri>,
    /// Read straight from these proxies' metrics endpoints (HOST:PORT, the proxy's
    /// --metrics-addr, :15020 in a pod; or a full http:// URL): scraped once, then again
    /// --window later; rates and quantiles come from the increases in between. Rows per pod
    /// are named by the address given.
    #[arg(long, value_name = "HOST:PORT", num_args = 1.., value_parser = parse_metrics_target)]
    pub metrics: Vec<MetricsTarget>,
    /// What a row is: `pod` (each proxy), `service` (the destination Service of outbound
    /// requests, summed over every caller's proxy), `route` (the HTTPRoute or GRPCRoute that
    /// served outbound requests and their Service, `namespace/route namespace/service`; `-`
    /// for the requests no route served) or `peer` (the workload on the other side, from its
    /// verified SPIFFE ID: namespace/service-account; `-` for plaintext).
    #[arg(long, value_enum, default_value_t = By::Pod)]
    pub by: By,
    /// Which requests: those the proxies received for their workload (`inbound`) or sent for
    /// it (`outbound`). Default: outbound with --by service or route (the only way a Service
    /// or route is known), else inbound.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
    /// How far back rates, success rates and latencies reach (e.g. 30s, 5m). Default: 1m from
    /// Prometheus (it needs two scrapes within it), 10s from --metrics (the first table comes
    /// after it).
    #[arg(long, value_parser = parse_duration)]
    pub window: Option<Duration>,
    /// Keep redrawing (clear the screen, print the table) every --interval until interrupted;
    /// a source that cannot be read ends it, saying why.
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// With --watch: how often to refresh.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// `table` for people, `json` for scripts (one document; with --watch one per line).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long to wait for Prometheus or a proxy to answer.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A proxy's metrics endpoint: as given (it names the pod's row) and the URL scraped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsTarget {
    pub name: String,
    pub url: http::Uri,
}

fn parse_prometheus_url(s: &str) -> Result<http::Uri, UrlError> {
    parse_http_url(s)
}

/// `HOST:PORT` means `http://HOST:PORT/metrics`.
fn parse_metrics_target(s: &str) -> Result<MetricsTarget, UrlError> {
    let url = if s.contains("://") {
        parse_http_url(s)?
    } else {
        parse_http_url(&format!("http://{s}/metrics"))?
    };
    Ok(MetricsTarget {
        name: s.to_owned(),
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        stat: StatArgs,
    }

    #[test]
    fn one_source_is_required_and_host_port_means_its_metrics_path() {
        assert!(Cli::try_parse_from(["stat"]).is_err());
        assert!(
            Cli::try_parse_from(["stat", "--prometheus", "http://p:9090", "--metrics", "a:1"])
                .is_err()
        );
        let cli =
            Cli::try_parse_from(["stat", "--metrics", "198.18.0.2:15020", "[2001:2::1]:15020"])
                .unwrap();
        let urls: Vec<String> = cli.stat.metrics.iter().map(|t| t.url.to_string()).collect();
        assert_eq!(
            urls,
            [
                "http://198.18.0.2:15020/metrics",
                "http://[2001:2::1]:15020/metrics"
            ]
        );
        assert_eq!(cli.stat.metrics[0].name, "198.18.0.2:15020");
        assert!(Cli::try_parse_from(["stat", "--prometheus", "https://p"]).is_err());
    }
}
