//! Asking Prometheus: one instant query per column through `/api/v1/query`, `rate()` over the
//! window summed by the view's group labels, `histogram_quantile()` over the request duration
//! buckets.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sigil_proxy_api::metrics as names;

use crate::view::{By, GroupKey, Measured, QUANTILES, Stats, View, success_matchers};
use sigil_base::http_get::{self, GetError};

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error(
        "asking Prometheus at {url}: is the URL right and Prometheus up? (e.g. kubectl -n <namespace> port-forward svc/prometheus 9090)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: GetError,
    },
    #[error(
        "Prometheus at {url} answered {query:?} with {status} and no API answer: is it Prometheus's base URL?"
    )]
    NotTheApi {
        url: String,
        query: String,
        status: http::StatusCode,
    },
    #[error("Prometheus at {url} refused {query:?}: {error_type}: {error}")]
    Refused {
        url: String,
        query: String,
        error_type: String,
        error: String,
    },
    #[error(
        "Prometheus at {url} has no {prefix}_ series: it does not scrape the proxies yet (their \
         :15020/metrics; see deploy/ and README, Request metrics)",
        prefix = names::PREFIX
    )]
    NoProxySeries { url: String },
}

/// `/api/v1/query`'s answer.
#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct Data {
    result: Vec<VectorSample>,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    /// `[timestamp, "value"]`.
    value: (f64, String),
}

pub struct Prometheus {
    base: http::Uri,
    timeout: Duration,
}

impl Prometheus {
    pub fn new(base: http::Uri, timeout: Duration) -> Prometheus {
        Prometheus { base, timeout }
    }

    /// The table over the last `window`.
    pub async fn stats(&self, view: &View, window: Duration) -> Result<Stats, PrometheusError> {
        let range = format!("{}ms", window.as_millis());
        let by = view.group_labels().join(",");
        let selector = view.matchers();
        let mut measured: BTreeMap<GroupKey, Measured> = BTreeMap::new();
        let requests = names::REQUESTS_SERIES;
        let rates = self
            .query(&format!(
                "sum by ({by}) (rate({requests}{{{selector}}}[{range}]))"
            ))
            .await?;
        if rates.is_empty()
            && self
                .query(&format!("count({{__name__=~\"{}_.+\"}})", names::PREFIX))
                .await?
                .is_empty()
        {
            return Err(PrometheusError::NoProxySeries {
                url: self.base.to_string(),
            });
        }
        for (labels, value) in rates {
            measured
                .entry(view.key(&labels))
                .or_default()
                .requests_per_second = value;
        }
        let successes = self
            .query(&format!(
                "sum by ({by}) (rate({requests}{{{selector},{}}}[{range}]))",
                success_matchers()
            ))
            .await?;
        for (labels, value) in successes {
            measured
                .entry(view.key(&labels))
                .or_default()
                .successes_per_second = value;
        }
        for (i, q) in QUANTILES.iter().enumerate() {
            let latencies = self
                .query(&format!(
                    "histogram_quantile({q}, sum by ({by},le) (rate({}{{{selector}}}[{range}])))",
                    names::REQUEST_DURATION_BUCKET_SERIES
                ))
                .await?;
            for (labels, value) in latencies {
                // NaN: no request in the window.
                measured
                    .entry(view.key(&labels))
                    .or_default()
                    .latency_seconds[i] = value.is_finite().then_some(value);
            }
        }
        if view.by == By::Pod {
            let connections = self
                .query(&format!(
                    "sum by ({by}) ({}{{{selector}}})",
                    names::CONNECTIONS_ACTIVE_SERIES
                ))
                .await?;
            for (labels, value) in connections {
                measured
                    .entry(view.key(&labels))
                    .or_default()
                    .tcp_connections = Some(value);
            }
        }
        Ok(Stats::new(
            view,
            format!("prometheus {}", self.base),
            window.as_secs_f64(),
            measured,
        ))
    }

    /// An instant query's vector: each sample's labels and value.
    async fn query(
        &self,
        promql: &str,
    ) -> Result<Vec<(BTreeMap<String, String>, f64)>, PrometheusError> {
        let url = self.query_url(promql);
        let (status, body) = http_get::get(&url, self.timeout).await.map_err(|source| {
            PrometheusError::Unreachable {
                url: self.base.to_string(),
                source,
            }
        })?;
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| PrometheusError::NotTheApi {
                url: self.base.to_string(),
                query: promql.to_owned(),
                status,
            })?;
        match answer.data {
            Some(data) if answer.status == "success" => Ok(data
                .result
                .into_iter()
                .map(|s| {
                    (
                        s.metric,
                        sigil_base::exposition::parse_value(&s.value.1).unwrap_or(f64::NAN),
                    )
                })
                .collect()),
            _ => Err(PrometheusError::Refused {
                url: self.base.to_string(),
                query: promql.to_owned(),
                error_type: answer.error_type,
                error: answer.error,
            }),
        }
    }

    /// `<base>/api/v1/query?query=<promql>`, keeping a base path (a Prometheus served under a
    /// prefix).
    fn query_url(&self, promql: &str) -> http::Uri {
        let prefix = self.base.path().trim_end_matches('/');
        let query: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let authority = self
            .base
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default();
        format!("http://{authority}{prefix}/api/v1/query?query={query}")
            .parse()
            .expect("an http URL with an encoded query parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_go_under_the_base_path_encoded() {
        let prometheus = Prometheus::new(
            "http://198.18.0.9:9090/prom/".parse().unwrap(),
            Duration::from_secs(1),
        );
        assert_eq!(
            prometheus
                .query_url("sum(rate(x{a=\"b\"}[5m]))")
                .to_string(),
            "http://198.18.0.9:9090/prom/api/v1/query?query=sum%28rate%28x%7Ba%3D%22b%22%7D%5B5m%5D%29%29"
        );
    }

    #[test]
    fn answers_parse_and_nan_is_a_value() {
        let answer: Answer = serde_json::from_str(
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"instance":"a:1"},"value":[1700000000.5,"NaN"]},
                {"metric":{},"value":[1700000000.5,"2.5"]}]}}"#,
        )
        .unwrap();
        let data = answer.data.unwrap();
        assert_eq!(data.result[1].value.1, "2.5");
        assert_eq!(data.result[0].metric["instance"], "a:1");
        let refused: Answer = serde_json::from_str(
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap();
        assert_eq!(refused.error_type, "bad_data");
    }
}
