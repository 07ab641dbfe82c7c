//! `sigil stat`: the mesh's golden metrics in a terminal, as `linkerd viz stat` shows them: per
//! pod (each proxy), per destination Service or per peer workload, the success rate, requests
//! per second, p50/p95/p99 latency and (per pod) open TCP connections, over a recent window.
//!
//! Two sources give the same table ([`view::Stats`]): Prometheus, asked with PromQL over its
//! HTTP API ([`source::prometheus`]: `rate()` and `histogram_quantile()`), or the proxies'
//! `/metrics` scraped directly, twice a window apart ([`source::scrape`]), the rates and
//! quantiles computed here ([`compute`]) from counter and bucket increases as Prometheus would.
//! [`render`] prints a table or JSON; `--watch` redraws every interval. The metric and label
//! names are the proxy's own ([`sigil_proxy_api::metrics`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod compute;
pub mod config;
pub mod render;
pub mod source;
pub mod view;

use std::collections::VecDeque;
use std::io::Write;
use std::time::Duration;

pub use config::StatArgs;

use crate::config::Output;
use crate::source::prometheus::{Prometheus, PrometheusError};
use crate::source::scrape::{ScrapeError, Scraper, Snapshot};
use crate::view::{View, ViewError};

/// The window rates are computed over when `--window` is not given, reading Prometheus: a few
/// scrapes at the usual 15 s to 30 s scrape intervals.
pub const DEFAULT_PROMETHEUS_WINDOW: Duration = Duration::from_secs(60);
/// The window when scraping the proxies directly: the first table comes after it.
pub const DEFAULT_SCRAPE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error(transparent)]
    View(#[from] ViewError),
    #[error(transparent)]
    Prometheus(#[from] PrometheusError),
    #[error(transparent)]
    Scrape(#[from] ScrapeError),
    #[error("writing the output")]
    Write(#[source] std::io::Error),
}

/// Prints the stats once, or with `--watch` every `--interval` until interrupted.
pub async fn run(args: &StatArgs, out: &mut impl Write) -> Result<(), StatError> {
    let view = View::new(args.by, args.direction)?;
    if let Some(url) = &args.prometheus {
        let prometheus = Prometheus::new(url.clone(), args.timeout);
        let window = args.window.unwrap_or(DEFAULT_PROMETHEUS_WINDOW);
        loop {
            let stats = prometheus.stats(&view, window).await?;
            show(args, &stats, out)?;
            if !args.watch {
                return Ok(());
            }
            tokio::time::sleep(args.interval).await;
        }
    }
    let scraper = Scraper::new(args.metrics.clone(), args.timeout);
    let window = args.window.unwrap_or(DEFAULT_SCRAPE_WINDOW);
    // Past scrapes, oldest first: each table compares the newest with the newest one at least a
    // window older (or the oldest there is).
    let mut history: VecDeque<Snapshot> = VecDeque::from([scraper.scrape().await?]);
    tokio::time::sleep(window).await;
    loop {
        let now = scraper.scrape().await?;
        while history.len() > 1 && now.at.duration_since(history[1].at) >= window {
            history.pop_front();
        }
        let stats = compute::stats(&view, &history[0], &now, scraper.source());
        show(args, &stats, out)?;
        if !args.watch {
            return Ok(());
        }
        history.push_back(now);
        tokio::time::sleep(args.interval).await;
    }
}

/// One table (after clearing the screen, with `--watch`) or one JSON document per line.
fn show(args: &StatArgs, stats: &view::Stats, out: &mut impl Write) -> Result<(), StatError> {
    let text = match args.output {
        Output::Table if args.watch => format!("\x1b[2J\x1b[H{}", render::table(stats)),
        Output::Table => render::table(stats),
        Output::Json => render::json(stats),
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(StatError::Write)
}
