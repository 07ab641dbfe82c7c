//! What a stat table is: which requests (direction), what a row is (pod, Service, route or peer,
//! and the labels that key it), and the rows both sources produce.

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::Serialize;
use sigil_proxy_api::metrics as names;

/// The label Prometheus gives every series of a scrape target (`host:port`); the direct scrape
/// sets it too, to the address given.
pub const INSTANCE: &str = "instance";
/// The labels a Kubernetes scrape adds to the proxies' series (see README, Request metrics).
pub const NAMESPACE: &str = "namespace";
pub const POD: &str = "pod";

/// The quantiles of the latency columns.
pub const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Pod,
    Service,
    Route,
    Peer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    /// The value of the proxy's `direction` label.
    pub fn label_value(self) -> &'static str {
        match self {
            Direction::Inbound => names::DIRECTION_INBOUND,
            Direction::Outbound => names::DIRECTION_OUTBOUND,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "--by service counts the requests callers send to each Service (outbound): inbound \
         requests carry no Service; drop --direction inbound, or use --by pod or --by peer"
    )]
    ServiceIsOutbound,
    #[error(
        "--by route counts the requests callers send through each HTTPRoute or GRPCRoute \
         (outbound): inbound requests carry no route; drop --direction inbound"
    )]
    RouteIsOutbound,
}

/// A table's rows and the requests they count.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub by: By,
    pub direction: Direction,
}

impl View {
    pub fn new(by: By, direction: Option<Direction>) -> Result<View, ViewError> {
        let direction = match (by, direction) {
            (By::Service, Some(Direction::Inbound)) => return Err(ViewError::ServiceIsOutbound),
            (By::Service, _) => Direction::Outbound,
            (By::Route, Some(Direction::Inbound)) => return Err(ViewError::RouteIsOutbound),
            (By::Route, _) => Direction::Outbound,
            (_, direction) => direction.unwrap_or(Direction::Inbound),
        };
        Ok(View { by, direction })
    }

    /// The labels whose values key a row.
    pub fn group_labels(&self) -> &'static [&'static str] {
        match self.by {
            By::Pod => &[NAMESPACE, POD, INSTANCE],
            By::Service => &[names::SERVICE],
            By::Route => &[names::ROUTE, names::SERVICE],
            By::Peer => &[names::PEER_NAMESPACE, names::PEER_SERVICE_ACCOUNT],
        }
    }

    /// The key of a series' row: its values of [`View::group_labels`] (empty when missing).
    pub fn key(&self, labels: &BTreeMap<String, String>) -> GroupKey {
        GroupKey(
            self.group_labels()
                .iter()
                .map(|l| labels.get(*l).cloned().unwrap_or_default())
                .collect(),
        )
    }

    /// What a row is called: `namespace/pod` (else the instance), the Service, the route and
    /// the Service it served (`namespace/route namespace/service`; `-` for the route of requests
    /// no route served), or the peer's `namespace/service-account`; `-` for requests to no
    /// meshed Service or from a plaintext peer.
    pub fn row_name(&self, key: &GroupKey) -> String {
        let values: Vec<&str> = key.0.iter().map(String::as_str).collect();
        let name = match (self.by, values.as_slice()) {
            (By::Pod, [namespace, pod, _]) if !pod.is_empty() && !namespace.is_empty() => {
                format!("{namespace}/{pod}")
            }
            (By::Pod, [_, pod, _]) if !pod.is_empty() => (*pod).to_owned(),
            (By::Pod, [_, _, instance]) => (*instance).to_owned(),
            (By::Peer, [namespace, account]) if !namespace.is_empty() => {
                format!("{namespace}/{account}")
            }
            (By::Route, [route, service]) if !service.is_empty() => {
                let route = if route.is_empty() { "-" } else { route };
                format!("{route} {service}")
            }
            (_, values) => values.concat(),
        };
        if name.is_empty() {
            "-".to_owned()
        } else {
            name
        }
    }

    /// The PromQL label matchers of the requests counted (without braces).
    pub fn matchers(&self) -> String {
        format!("{}=\"{}\"", names::DIRECTION, self.direction.label_value())
    }
}

/// The values of a view's group labels, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey(pub Vec<String>);

/// Whether a request counted with these labels succeeded: not answered 5xx, and for gRPC with
/// grpc-status OK (as Linkerd counts a gRPC error a failure).
pub fn is_success(labels: &BTreeMap<String, String>) -> bool {
    let class = labels.get(names::STATUS_CLASS).map(String::as_str);
    let grpc = labels.get(names::GRPC_STATUS).map_or("", String::as_str);
    class != Some(names::STATUS_CLASS_SERVER_ERROR)
        && (grpc.is_empty() || grpc == names::GRPC_STATUS_OK)
}

/// The PromQL matchers of [`is_success`]'s requests.
pub fn success_matchers() -> String {
    format!(
        "{}!=\"{}\",{}=~\"|{}\"",
        names::STATUS_CLASS,
        names::STATUS_CLASS_SERVER_ERROR,
        names::GRPC_STATUS,
        names::GRPC_STATUS_OK
    )
}

/// What a source measured for one row, per second over the window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub requests_per_second: f64,
    pub successes_per_second: f64,
    /// At [`QUANTILES`]; None without requests in the window.
    pub latency_seconds: [Option<f64>; 3],
    /// Per pod only: the proxy's open connections in the view's direction.
    pub tcp_connections: Option<f64>,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub name: String,
    /// The group labels' values.
    pub labels: BTreeMap<String, String>,
    /// Of the requests in the window; null without any.
    pub success_rate: Option<f64>,
    pub requests_per_second: f64,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p95_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    /// Per pod only.
    pub tcp_connections: Option<f64>,
}

/// A whole table: what it counts and its rows, by name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// `prometheus <url>` or `metrics <target>...`.
    pub source: String,
    pub by: By,
    pub direction: Direction,
    pub window_seconds: f64,
    pub rows: Vec<Row>,
}

impl Stats {
    pub fn new(
        view: &View,
        source: String,
        window_seconds: f64,
        measured: BTreeMap<GroupKey, Measured>,
    ) -> Stats {
        let mut rows: Vec<Row> = measured
            .into_iter()
            .map(|(key, m)| {
                let [p50, p95, p99] = m.latency_seconds;
                Row {
                    name: view.row_name(&key),
                    labels: view
                        .group_labels()
                        .iter()
                        .map(|l| (*l).to_owned())
                        .zip(key.0)
                        .filter(|(_, v)| !v.is_empty())
                        .collect(),
                    success_rate: (m.requests_per_second > 0.0)
                        .then(|| (m.successes_per_second / m.requests_per_second).min(1.0)),
                    requests_per_second: m.requests_per_second,
                    latency_p50_seconds: p50,
                    latency_p95_seconds: p95,
                    latency_p99_seconds: p99,
                    tcp_connections: m.tcp_connections,
                }
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Stats {
            source,
            by: view.by,
            direction: view.direction,
            window_seconds,
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn rows_are_named_by_what_the_labels_carry() {
        let pod = View::new(By::Pod, None).unwrap();
        assert_eq!(pod.direction, Direction::Inbound);
        let k8s = labels(&[
            ("namespace", "shop"),
            ("pod", "web-1"),
            ("instance", "198.18.0.2:15020"),
        ]);
        assert_eq!(pod.row_name(&pod.key(&k8s)), "shop/web-1");
        let bare = labels(&[("instance", "198.18.0.2:15020")]);
        assert_eq!(pod.row_name(&pod.key(&bare)), "198.18.0.2:15020");
        let peer = View::new(By::Peer, Some(Direction::Outbound)).unwrap();
        let from = labels(&[("peer_namespace", "shop"), ("peer_service_account", "web")]);
        assert_eq!(peer.row_name(&peer.key(&from)), "shop/web");
        assert_eq!(peer.row_name(&peer.key(&labels(&[]))), "-");
        let service = View::new(By::Service, None).unwrap();
        assert_eq!(service.direction, Direction::Outbound);
        assert!(View::new(By::Service, Some(Direction::Inbound)).is_err());
        let route = View::new(By::Route, None).unwrap();
        assert_eq!(route.direction, Direction::Outbound);
        assert!(View::new(By::Route, Some(Direction::Inbound)).is_err());
        let routed = labels(&[("route", "shop/api-canary"), ("service", "shop/api")]);
        assert_eq!(
            route.row_name(&route.key(&routed)),
            "shop/api-canary shop/api"
        );
        let unrouted = labels(&[("service", "shop/api")]);
        assert_eq!(route.row_name(&route.key(&unrouted)), "- shop/api");
        assert_eq!(route.row_name(&route.key(&labels(&[]))), "-");
    }

    #[test]
    fn a_5xx_or_a_grpc_error_is_a_failure() {
        assert!(is_success(&labels(&[
            ("status_class", "2xx"),
            ("grpc_status", "")
        ])));
        assert!(is_success(&labels(&[("status_class", "4xx")])));
        assert!(!is_success(&labels(&[("status_class", "5xx")])));
        assert!(is_success(&labels(&[
            ("status_class", "2xx"),
            ("grpc_status", "0")
        ])));
        assert!(!is_success(&labels(&[
            ("status_class", "2xx"),
            ("grpc_status", "14")
        ])));
    }
}
