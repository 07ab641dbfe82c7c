use std::time::{Duration, Instant};

use super::*;
use crate::source::scrape::TargetScrape;
use crate::view::{By, Direction};
use sigil_base::exposition::parse;

const BUCKETS: &str = "sigil_proxy_request_duration_seconds_bucket";

#[test]
fn a_counter_that_went_down_was_reset_and_counts_from_zero() {
    assert_eq!(counter_increase(Some(10.0), 25.0), 15.0);
    assert_eq!(counter_increase(None, 4.0), 4.0);
    assert_eq!(counter_increase(Some(100.0), 7.0), 7.0);
    assert_eq!(counter_increase(Some(5.0), 5.0), 0.0);
}

#[test]
fn quantiles_interpolate_within_the_bucket_of_the_rank() {
    // 100 observations: 50 up to 10 ms, 40 more up to 100 ms, 10 more up to 1 s.
    let buckets = [
        (0.01, 50.0),
        (0.1, 90.0),
        (1.0, 100.0),
        (f64::INFINITY, 100.0),
    ];
    let at = |q| histogram_quantile(q, &buckets).unwrap();
    assert!((at(0.5) - 0.01).abs() < 1e-12, "{}", at(0.5));
    // Rank 25 is halfway through the first bucket, which starts at 0.
    assert!((at(0.25) - 0.005).abs() < 1e-12);
    // Rank 70: 20 of the second bucket's 40, halfway from 10 to 100 ms.
    assert!((at(0.7) - 0.055).abs() < 1e-12);
    // Rank 99: 9 of the last finite bucket's 10, from 100 ms to 1 s.
    assert!((at(0.99) - 0.91).abs() < 1e-12);
    // Unsorted input is sorted first.
    let mut shuffled = buckets;
    shuffled.reverse();
    assert_eq!(histogram_quantile(0.7, &shuffled), Some(at(0.7)));
}

#[test]
fn a_rank_in_the_inf_bucket_is_the_largest_finite_bound_and_empty_is_none() {
    let buckets = [(0.1, 1.0), (1.0, 2.0), (f64::INFINITY, 10.0)];
    assert_eq!(histogram_quantile(0.99, &buckets), Some(1.0));
    assert_eq!(
        histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
        None
    );
    assert_eq!(
        histogram_quantile(0.5, &[(0.1, 1.0), (1.0, 1.0)]),
        None,
        "no +Inf"
    );
    assert_eq!(histogram_quantile(0.5, &[(f64::INFINITY, 3.0)]), None);
    // A bucket lower than the one before is raised to it.
    let dip = [(0.1, 10.0), (1.0, 9.0), (f64::INFINITY, 10.0)];
    assert_eq!(histogram_quantile(0.5, &dip), Some(0.05));
}

/// A snapshot of two targets (`a` and `b`) taken `at`, from their exposition texts.
fn snapshot(at: Instant, texts: [&str; 2]) -> Snapshot {
    Snapshot {
        at,
        targets: texts
            .iter()
            .zip(["a:15020", "b:15020"])
            .map(|(text, name)| TargetScrape::new(name, at, parse(text).unwrap()))
            .collect(),
    }
}

fn requests(direction: &str, peer: &str, class: &str, count: u64) -> String {
    format!(
        "sigil_proxy_requests_total{{direction=\"{direction}\",service=\"\",peer_namespace=\"demo\",\
         peer_service_account=\"{peer}\",status_class=\"{class}\",status_code=\"200\",grpc_status=\"\"}} {count}\n"
    )
}

/// Outbound requests to the Service demo/api answered `status` (`result` ok, or timeout for a
/// 504), through `route` ("": none).
fn routed(route: &str, status: u16, count: u64) -> String {
    let (class, result) = if status == 504 {
        ("5xx", "timeout")
    } else {
        ("2xx", "ok")
    };
    format!(
        "sigil_proxy_requests_total{{direction=\"outbound\",service=\"demo/api\",route=\"{route}\",\
         peer_namespace=\"demo\",peer_service_account=\"api\",status_class=\"{class}\",\
         status_code=\"{status}\",grpc_status=\"\",result=\"{result}\"}} {count}\n"
    )
}

#[test]
fn rows_per_route_and_the_requests_no_route_served() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(10);
    // Through demo/api-canary: 300 answered, 100 cut by its timeout; 50 no route served; the
    // second proxy sends 200 more through the route.
    let a0 = format!(
        "{}{}",
        routed("demo/api-canary", 200, 0),
        routed("", 200, 0)
    );
    let a1 = format!(
        "{}{}{}",
        routed("demo/api-canary", 200, 300),
        routed("demo/api-canary", 504, 100),
        routed("", 200, 50)
    );
    let b1 = routed("demo/api-canary", 200, 200);
    let before = snapshot(t0, [&a0, ""]);
    let now = snapshot(t1, [&a1, &b1]);
    let table = stats(
        &View::new(By::Route, None).unwrap(),
        &before,
        &now,
        String::new(),
    );
    let rows: Vec<(&str, f64, Option<f64>)> = table
        .rows
        .iter()
        .map(|r| (r.name.as_str(), r.requests_per_second, r.success_rate))
        .collect();
    assert_eq!(
        rows,
        [
            ("- demo/api", 5.0, Some(1.0)),
            ("demo/api-canary demo/api", 60.0, Some(500.0 / 600.0)),
        ]
    );
    assert_eq!(table.rows[1].labels["route"], "demo/api-canary");
    assert_eq!(table.rows[1].labels["service"], "demo/api");
}

fn histogram(direction: &str, peer: &str, counts: [u64; 3]) -> String {
    ["0.01", "0.1", "+Inf"]
        .iter()
        .zip(counts)
        .map(|(le, count)| {
            format!(
                "{BUCKETS}{{le=\"{le}\",direction=\"{direction}\",service=\"\",\
                 peer_namespace=\"demo\",peer_service_account=\"{peer}\",status_class=\"2xx\"}} {count}\n"
            )
        })
        .collect()
}

#[test]
fn rates_success_rates_and_latency_per_row_from_two_scrapes() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(10);
    // a: 1000 inbound requests from web (100 of them 5xx, a series that appears only in the
    // second scrape); b restarted between the scrapes (its counters went down: reset).
    let a0 = format!(
        "{}{}{}sigil_proxy_connections_active{{direction=\"inbound\",security=\"mtls\"}} 3\n",
        requests("inbound", "web", "2xx", 500),
        requests("outbound", "web", "2xx", 9999),
        histogram("inbound", "web", [400, 500, 500]),
    );
    let a1 = format!(
        "{}{}{}{}sigil_proxy_connections_active{{direction=\"inbound\",security=\"mtls\"}} 4\n\
         sigil_proxy_connections_active{{direction=\"inbound\",security=\"plaintext\"}} 1\n",
        requests("inbound", "web", "2xx", 1400),
        requests("inbound", "web", "5xx", 100),
        requests("outbound", "web", "2xx", 99999),
        histogram("inbound", "web", [400, 1400, 1500]),
    );
    let b0 = requests("inbound", "cron", "2xx", 7000);
    let b1 = requests("inbound", "cron", "2xx", 50);
    let before = snapshot(t0, [&a0, &b0]);
    let now = snapshot(t1, [&a1, &b1]);

    let view = View::new(By::Pod, None).unwrap();
    let table = stats(&view, &before, &now, "test".to_owned());
    assert_eq!(table.window_seconds, 10.0);
    let names: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a:15020", "b:15020"]);
    let a = &table.rows[0];
    assert_eq!(a.requests_per_second, 100.0);
    assert_eq!(a.success_rate, Some(0.9));
    assert_eq!(a.tcp_connections, Some(5.0));
    // 1000 new observations: 0 up to 10 ms, 900 up to 100 ms, 100 above.
    assert!((a.latency_p50_seconds.unwrap() - (0.01 + 0.09 * 500.0 / 900.0)).abs() < 1e-9);
    assert_eq!(a.latency_p99_seconds, Some(0.1));
    let b = &table.rows[1];
    assert_eq!(b.requests_per_second, 5.0, "reset: 50 new requests in 10 s");
    assert_eq!(b.success_rate, Some(1.0));
    assert_eq!(b.latency_p50_seconds, None);

    // By peer, over both proxies; outbound only has a's 9000 more.
    let peers = stats(
        &View::new(By::Peer, None).unwrap(),
        &before,
        &now,
        String::new(),
    );
    let rows: Vec<(&str, f64)> = peers
        .rows
        .iter()
        .map(|r| (r.name.as_str(), r.requests_per_second))
        .collect();
    assert_eq!(rows, [("demo/cron", 5.0), ("demo/web", 100.0)]);
    assert_eq!(
        peers.rows[0].tcp_connections, None,
        "connections are per pod"
    );
    let outbound = stats(
        &View::new(By::Peer, Some(Direction::Outbound)).unwrap(),
        &before,
        &now,
        String::new(),
    );
    assert_eq!(outbound.rows.len(), 1);
    assert_eq!(outbound.rows[0].requests_per_second, 9000.0);
}
