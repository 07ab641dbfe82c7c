//! Reading the components' admin endpoints: a plain HTTP/1.1 GET, and their `/metrics` pages as
//! samples (parsed by `sigil_base::exposition`) that can be summed by name and labels.

use std::net::SocketAddr;
use std::time::Duration;

use sigil_base::exposition::{self, Sample};
use sigil_base::http_get::{self, GetError};

/// How long one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET http://{addr}{path}")]
    Http {
        addr: SocketAddr,
        path: String,
        #[source]
        source: GetError,
    },
    #[error("GET http://{addr}{path}: status {status}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        body: String,
    },
    #[error("GET http://{addr}{path}: not JSON: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
}

/// GET `path` on `addr`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ScrapeError> {
    let url: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .expect("an address and an absolute path make a URL");
    let (status, body) =
        http_get::get(&url, TIMEOUT)
            .await
            .map_err(|source| ScrapeError::Http {
                addr,
                path: path.to_string(),
                source,
            })?;
    Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
}

/// GET `path` and require 200.
pub async fn get_ok(addr: SocketAddr, path: &str) -> Result<String, ScrapeError> {
    match get(addr, path).await? {
        (200, body) => Ok(body),
        (status, body) => Err(ScrapeError::Status {
            addr,
            path: path.to_string(),
            status,
            body,
        }),
    }
}

/// GET `path` as JSON (200 only).
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, ScrapeError> {
    let body = get_ok(addr, path).await?;
    serde_json::from_str(&body).map_err(|source| ScrapeError::Json {
        addr,
        path: path.to_string(),
        source,
    })
}

/// Whether `path` answers 200 now.
pub async fn is_ok(addr: SocketAddr, path: &str) -> bool {
    matches!(get(addr, path).await, Ok((200, _)))
}

/// A scrape of one `/metrics` endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Scrapes `http://addr/metrics`.
    pub async fn scrape(addr: SocketAddr) -> Result<Metrics, ScrapeError> {
        Ok(Metrics::parse(&get_ok(addr, "/metrics").await?))
    }

    /// Parses the text exposition format; lines that do not parse are skipped.
    pub fn parse(text: &str) -> Metrics {
        Metrics {
            samples: text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .filter_map(|line| exposition::parse_sample(line).ok())
                .collect(),
        }
    }

    /// The sum of every sample named `name` whose labels include all of `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// `name{k="v",...}` as Prometheus prints it (labels in name order).
fn series(sample: &Sample) -> String {
    if sample.labels.is_empty() {
        return sample.name.clone();
    }
    let labels: Vec<String> = sample
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    format!("{}{{{}}}", sample.name, labels.join(","))
}

/// The series named `name` whose value differs between two scrapes (absent counts as 0), with
/// their values before and after, in series order.
pub fn changes(before: &Metrics, after: &Metrics, name: &str) -> Vec<(String, f64, f64)> {
    let mut changed: Vec<(String, f64, f64)> = after
        .samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| {
            let old = before
                .samples
                .iter()
                .find(|b| b.name == s.name && b.labels == s.labels)
                .map_or(0.0, |b| b.value);
            (old != s.value).then(|| (series(s), old, s.value))
        })
        .collect();
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sigil_proxy_authz_decisions Authorization decisions.
# TYPE sigil_proxy_authz_decisions counter
sigil_proxy_authz_decisions_total{decision="allow",policy="demo/frontend-reads-orders",layer="l7"} 12
sigil_proxy_authz_decisions_total{decision="deny",policy="default",layer="l7"} 3
sigil_proxy_authz_decisions_total{decision="deny",policy="default",layer="l4"} 1
sigil_agent_identities 2
odd{detail="a \"quoted\", comma}"} 1.5e0
# EOF
"#;

    #[test]
    fn sums_by_name_and_a_subset_of_labels() {
        let m = Metrics::parse(TEXT);
        let name = "sigil_proxy_authz_decisions_total";
        assert_eq!(m.sum(name, &[("decision", "deny")]), 4.0);
        assert_eq!(m.sum(name, &[("decision", "deny"), ("layer", "l7")]), 3.0);
        assert_eq!(m.sum(name, &[]), 16.0);
        assert_eq!(m.sum(name, &[("decision", "audit")]), 0.0);
        assert_eq!(m.sum("sigil_agent_identities", &[]), 2.0);
        assert_eq!(m.sum("missing", &[]), 0.0);
    }

    #[test]
    fn label_values_may_hold_escaped_quotes_commas_and_braces() {
        let m = Metrics::parse(TEXT);
        let odd = m.samples.iter().find(|s| s.name == "odd").unwrap();
        assert_eq!(odd.labels["detail"], "a \"quoted\", comma}");
        assert_eq!(odd.value, 1.5);
    }

    #[test]
    fn changes_list_the_series_that_moved() {
        let before = Metrics::parse("a_total{x=\"1\"} 1\na_total{x=\"2\"} 5\nb 1\n");
        let after =
            Metrics::parse("a_total{x=\"1\"} 1\na_total{x=\"2\"} 7\na_total{x=\"3\"} 2\nb 2\n");
        assert_eq!(
            changes(&before, &after, "a_total"),
            vec![
                ("a_total{x=\"2\"}".to_string(), 5.0, 7.0),
                ("a_total{x=\"3\"}".to_string(), 0.0, 2.0),
            ]
        );
        assert_eq!(
            changes(&before, &after, "b"),
            vec![("b".to_string(), 1.0, 2.0)]
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let m = Metrics::parse("no_value\nbad{x=\"1\" 2\nok 1\n");
        assert_eq!(m.samples.len(), 1);
        assert_eq!(m.sum("ok", &[]), 1.0);
    }
}
