//! Printing a table for people (aligned columns, as `linkerd viz stat`) or JSON for scripts.

use crate::view::{Direction, Stats};

const HEADER: [&str; 7] = [
    "NAME",
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
    "TCP_CONN",
];

/// The table, a caption line first; `-` where there is nothing to show.
pub fn table(stats: &Stats) -> String {
    let direction = match stats.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    let by = format!("{:?}", stats.by).to_lowercase();
    let mut out = format!(
        "{direction} requests by {by}, last {}, from {}\n",
        duration(stats.window_seconds),
        stats.source
    );
    if stats.rows.is_empty() {
        out.push_str("no requests\n");
        return out;
    }
    let mut lines: Vec<[String; 7]> = vec![HEADER.map(str::to_owned)];
    for row in &stats.rows {
        lines.push([
            row.name.clone(),
            row.success_rate
                .map_or("-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
            format!("{:.1}", row.requests_per_second),
            latency(row.latency_p50_seconds),
            latency(row.latency_p95_seconds),
            latency(row.latency_p99_seconds),
            row.tcp_connections
                .map_or("-".to_owned(), |c| format!("{c:.0}")),
        ]);
    }
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|column| lines.iter().map(|l| l[column].len()).max().unwrap_or(0))
        .collect();
    for line in &lines {
        let mut text = format!("{:<width$}", line[0], width = widths[0]);
        for (cell, width) in line.iter().zip(&widths).skip(1) {
            text.push_str(&format!("  {cell:>width$}"));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// One JSON document on one line.
pub fn json(stats: &Stats) -> String {
    let mut text = serde_json::to_string(stats).expect("stats serialize");
    text.push('\n');
    text
}

/// `3.2ms`, `1.25s`, or `-`.
fn latency(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
        None => "-".to_owned(),
    }
}

/// `10s`, `1m`, `1m30s`, `2.5s`.
fn duration(seconds: f64) -> String {
    let whole = seconds.round() as u64;
    if (seconds - whole as f64).abs() > 0.05 {
        return format!("{seconds:.1}s");
    }
    match (whole / 60, whole % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{By, Row};

    fn row(name: &str, success: Option<f64>, rps: f64, p50: Option<f64>, tcp: Option<f64>) -> Row {
        Row {
            name: name.to_owned(),
            labels: Default::default(),
            success_rate: success,
            requests_per_second: rps,
            latency_p50_seconds: p50,
            latency_p95_seconds: p50.map(|p| p * 2.0),
            latency_p99_seconds: p50.map(|p| p * 400.0),
            tcp_connections: tcp,
        }
    }

    #[test]
    fn columns_align_and_missing_values_are_dashes() {
        let stats = Stats {
            source: "metrics a:15020 b:15020".to_owned(),
            by: By::Pod,
            direction: Direction::Inbound,
            window_seconds: 90.0,
            rows: vec![
                row("a:15020", Some(0.8), 200.04, Some(0.0031), Some(4.0)),
                row("longer-name:15020", None, 0.0, None, None),
            ],
        };
        assert_eq!(
            table(&stats),
            "inbound requests by pod, last 1m30s, from metrics a:15020 b:15020\n\
             NAME               SUCCESS    RPS  LATENCY_P50  LATENCY_P95  LATENCY_P99  TCP_CONN\n\
             a:15020             80.00%  200.0        3.1ms        6.2ms        1.24s         4\n\
             longer-name:15020        -    0.0            -            -            -         -\n"
        );
        let json: serde_json::Value = serde_json::from_str(&json(&stats)).unwrap();
        assert_eq!(json["rows"][0]["success_rate"], 0.8);
        assert_eq!(json["rows"][1]["success_rate"], serde_json::Value::Null);
        assert_eq!(json["by"], "pod");
        assert_eq!(json["direction"], "inbound");
        let empty = Stats {
            rows: vec![],
            ..stats
        };
        assert!(table(&empty).ends_with("no requests\n"));
    }
}
