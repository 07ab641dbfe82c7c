//! The arithmetic of the direct scrape, as Prometheus does it: a counter's increase between
//! two scrapes (a counter that went down was reset, and counts from zero), rates per second of
//! each target's own elapsed time, and `histogram_quantile` over buckets' increases.

use std::collections::BTreeMap;

use sigil_proxy_api::metrics as names;

use crate::source::scrape::Snapshot;
use crate::view::{By, GroupKey, Measured, QUANTILES, Stats, View, is_success};
use sigil_base::exposition::{Sample, parse_value};

/// How much a counter grew from `before` (None: the series did not exist yet, so it started
/// from zero) to `now`. A counter lower than before was reset (the process restarted): all of
/// `now` is new, as Prometheus's `rate()` counts it.
pub fn counter_increase(before: Option<f64>, now: f64) -> f64 {
    match before {
        Some(before) if now >= before => now - before,
        _ => now,
    }
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count) buckets, by
/// Prometheus's `histogram_quantile`: the bucket the rank falls in, interpolated linearly
/// within it (from 0 for the first bucket); the largest finite bound if it falls in `+Inf`.
/// None without observations, without a `+Inf` bucket, or with fewer than two buckets.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.len() < 2 || buckets.last()?.0 != f64::INFINITY {
        return None;
    }
    // Counts that went down between buckets (increases of series scraped apart, or a reset of
    // some of them) are raised to keep the histogram cumulative, as Prometheus does.
    for i in 1..buckets.len() {
        buckets[i].1 = buckets[i].1.max(buckets[i - 1].1);
    }
    let observations = buckets.last()?.1;
    if observations <= 0.0 {
        return None;
    }
    let mut rank = q.clamp(0.0, 1.0) * observations;
    let b = buckets.iter().position(|(_, count)| *count >= rank)?;
    if b == buckets.len() - 1 {
        return Some(buckets[b - 1].0);
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return Some(buckets[0].0);
    }
    let (mut start, end, mut count) = (0.0, buckets[b].0, buckets[b].1);
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    Some(start + (end - start) * (rank / count))
}

/// Per row: requests and successes per second, bucket increases per second (by upper bound,
/// as written), and open connections.
#[derive(Default)]
struct Sums {
    requests: f64,
    successes: f64,
    buckets: BTreeMap<String, f64>,
    connections: Option<f64>,
}

/// The table from two snapshots of the same targets, `before` older than `now`. A target
/// scraped only in `now` counts nothing (no baseline) but its connections.
pub fn stats(view: &View, before: &Snapshot, now: &Snapshot, source: String) -> Stats {
    let mut sums: BTreeMap<GroupKey, Sums> = BTreeMap::new();
    let direction = view.direction.label_value();
    for (target, after) in now.targets.iter().enumerate() {
        let in_direction =
            |s: &&Sample| s.labels.get(names::DIRECTION).map(String::as_str) == Some(direction);
        if view.by == By::Pod {
            for sample in after.samples.iter().filter(in_direction) {
                if sample.name == names::CONNECTIONS_ACTIVE_SERIES {
                    *sums
                        .entry(view.key(&sample.labels))
                        .or_default()
                        .connections
                        .get_or_insert(0.0) += sample.value;
                }
            }
        }
        let Some(earlier) = before.targets.get(target) else {
            continue;
        };
        let elapsed = after.at.duration_since(earlier.at).as_secs_f64();
        if elapsed <= 0.0 {
            continue;
        }
        let baseline = earlier.index();
        for sample in after.samples.iter().filter(in_direction) {
            let increase = |s: &Sample| {
                counter_increase(
                    baseline.get(&(s.name.as_str(), &s.labels)).copied(),
                    s.value,
                ) / elapsed
            };
            if sample.name == names::REQUESTS_SERIES {
                let row = sums.entry(view.key(&sample.labels)).or_default();
                let rate = increase(sample);
                row.requests += rate;
                if is_success(&sample.labels) {
                    row.successes += rate;
                }
            } else if sample.name == names::REQUEST_DURATION_BUCKET_SERIES
                && let Some(le) = sample.labels.get("le")
            {
                let row = sums.entry(view.key(&sample.labels)).or_default();
                *row.buckets.entry(le.clone()).or_default() += increase(sample);
            }
        }
    }
    let measured = sums
        .into_iter()
        .map(|(key, sums)| {
            let buckets: Vec<(f64, f64)> = sums
                .buckets
                .iter()
                .filter_map(|(le, rate)| Some((parse_value(le)?, *rate)))
                .collect();
            let measured = Measured {
                requests_per_second: sums.requests,
                successes_per_second: sums.successes,
                latency_seconds: QUANTILES.map(|q| histogram_quantile(q, &buckets)),
                tcp_connections: sums.connections,
            };
            (key, measured)
        })
        .collect();
    let window = now.at.duration_since(before.at).as_secs_f64();
    Stats::new(view, source, window, measured)
}

#[cfg(test)]
mod tests;
