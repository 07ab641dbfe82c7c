//! Reading the proxies' `/metrics` pages directly: every target at once, each sample labelled
//! with its target (`instance`, as Prometheus labels it) and the time it was read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sigil_proxy_api::metrics as names;

use crate::config::MetricsTarget;
use crate::view::INSTANCE;
use sigil_base::exposition::{self, ParseError, Sample};
use sigil_base::http_get::{self, GetError};

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(
        "scraping {target}: is it a proxy's metrics address (--metrics-addr, port 15020 in a \
         pod) reachable from here? (e.g. kubectl port-forward pod/<pod> 15020)"
    )]
    Unreachable {
        target: String,
        #[source]
        source: GetError,
    },
    #[error("scraping {target}: answered {status}, not its metrics (is the path right?)")]
    Status {
        target: String,
        status: http::StatusCode,
    },
    #[error("scraping {target}: not the Prometheus text format")]
    Parse {
        target: String,
        #[source]
        source: ParseError,
    },
    #[error(
        "{target} serves no {prefix}_ metrics: it is not a sigil proxy's metrics endpoint (the \
         proxy serves them on --metrics-addr, port 15020 in a pod)",
        prefix = names::PREFIX
    )]
    NotAProxy { target: String },
}

/// One target's page.
pub struct TargetScrape {
    pub at: Instant,
    pub samples: Vec<Sample>,
}

impl TargetScrape {
    /// `samples` read from `target` at `at`, each labelled `instance="<target>"`.
    pub fn new(target: &str, at: Instant, mut samples: Vec<Sample>) -> TargetScrape {
        for sample in &mut samples {
            sample.labels.insert(INSTANCE.to_owned(), target.to_owned());
        }
        TargetScrape { at, samples }
    }

    /// The samples by name and labels, to find a series' earlier value.
    pub fn index(&self) -> BTreeMap<(&str, &BTreeMap<String, String>), f64> {
        self.samples
            .iter()
            .map(|s| ((s.name.as_str(), &s.labels), s.value))
            .collect()
    }
}

/// Every target's page, in the order of the targets.
pub struct Snapshot {
    pub at: Instant,
    pub targets: Vec<TargetScrape>,
}

pub struct Scraper {
    targets: Vec<MetricsTarget>,
    timeout: Duration,
}

impl Scraper {
    pub fn new(targets: Vec<MetricsTarget>, timeout: Duration) -> Scraper {
        Scraper { targets, timeout }
    }

    /// What the stats say they were read from.
    pub fn source(&self) -> String {
        let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        format!("metrics {}", names.join(" "))
    }

    /// Every target now, concurrently; the first failure fails it.
    pub async fn scrape(&self) -> Result<Snapshot, ScrapeError> {
        let at = Instant::now();
        let pages = futures::future::join_all(self.targets.iter().map(|t| self.scrape_one(t)));
        let targets = pages.await.into_iter().collect::<Result<_, _>>()?;
        Ok(Snapshot { at, targets })
    }

    async fn scrape_one(&self, target: &MetricsTarget) -> Result<TargetScrape, ScrapeError> {
        let name = || target.name.clone();
        let started = Instant::now();
        let (status, body) = http_get::get(&target.url, self.timeout)
            .await
            .map_err(|source| ScrapeError::Unreachable {
                target: name(),
                source,
            })?;
        // The page is a moment between asking and the answer.
        let at = started + started.elapsed() / 2;
        if !status.is_success() {
            return Err(ScrapeError::Status {
                target: name(),
                status,
            });
        }
        let samples = exposition::parse(&String::from_utf8_lossy(&body)).map_err(|source| {
            ScrapeError::Parse {
                target: name(),
                source,
            }
        })?;
        let prefix = format!("{}_", names::PREFIX);
        if !samples.iter().any(|s| s.name.starts_with(&prefix)) {
            return Err(ScrapeError::NotAProxy { target: name() });
        }
        Ok(TargetScrape::new(&target.name, at, samples))
    }
}
