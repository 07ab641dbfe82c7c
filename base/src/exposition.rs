//! A parser of Prometheus's text exposition format (and of OpenMetrics text, which sigil's
//! components serve): the samples of a `/metrics` page, name, labels and value. Comments
//! (`# HELP`, `# TYPE`, `# EOF`), timestamps and exemplars are skipped: readers (`sigil stat`,
//! the demo's report) compare scrapes by their own times.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Every sample of `text`, in order.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|reason| ParseError {
            line: index + 1,
            reason,
            text: line.to_owned(),
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

/// One sample line (trimmed, not empty, not a comment), or why it is not one.
pub fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if name_end == 0 {
        return Err("no metric name");
    }
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    // The value, then an optional timestamp, then (OpenMetrics) an optional `# {...}` exemplar.
    let rest = rest.split(" # ").next().unwrap_or_default();
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = parse_value(value).ok_or("a value that is not a number")?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `name="value",...}` into `labels`; returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("a label without '='")?;
        let label = rest[..eq].trim();
        if label.is_empty()
            || !label
                .chars()
                .enumerate()
                .all(|(i, c)| is_name_char(c, i == 0))
        {
            return Err("a label name that is not one");
        }
        let after_eq = rest[eq + 1..].trim_start();
        let quoted = after_eq
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("an unknown escape in a label value"),
                },
                Some((_, c)) => value.push(c),
                None => return Err("a label value without its closing quote"),
            }
        };
        labels.insert(label.to_owned(), value);
        rest = quoted[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_escapes_timestamps_and_exemplars() {
        let text = "# HELP sigil_proxy_requests HTTP requests\n\
                    # TYPE sigil_proxy_requests counter\n\
                    sigil_proxy_requests_total{direction=\"inbound\",service=\"\",status_code=\"500\"} 7\n\
                    \n\
                    up 1 1700000000000\n\
                    weird{path=\"a\\\"b\\\\c\\nd\",} 2.5e3\n\
                    le_inf_bucket{le=\"+Inf\"} +Inf\n\
                    x_total{a=\"1\"} 3 # {trace_id=\"abc\"} 1.0\n\
                    # EOF\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].name, "sigil_proxy_requests_total");
        assert_eq!(samples[0].labels["direction"], "inbound");
        assert_eq!(samples[0].labels["service"], "");
        assert_eq!(samples[0].labels["status_code"], "500");
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].name, "up");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[1].value, 1.0);
        assert_eq!(samples[2].labels["path"], "a\"b\\c\nd");
        assert_eq!(samples[2].value, 2500.0);
        assert_eq!(samples[3].value, f64::INFINITY);
        assert_eq!(samples[4].value, 3.0);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        for bad in [
            "{a=\"1\"} 1",
            "x{a=1} 1",
            "x{a=\"1} 1",
            "x{a=\"\\t\"} 1",
            "x{=\"1\"} 1",
            "x 1x",
            "x",
        ] {
            let e = parse(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
        }
    }

    #[test]
    fn the_proxys_own_exposition_parses() {
        // What prometheus-client (the proxy's encoder) writes, histogram and all.
        let mut registry = prometheus_client::registry::Registry::default();
        let histogram = prometheus_client::metrics::histogram::Histogram::new([0.01, 0.1]);
        histogram.observe(0.05);
        registry.register_with_unit(
            "sigil_proxy_request_duration",
            "d",
            prometheus_client::registry::Unit::Seconds,
            histogram,
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples = parse(&text).unwrap();
        let buckets: Vec<(&str, f64)> = samples
            .iter()
            .filter(|s| s.name == "sigil_proxy_request_duration_seconds_bucket")
            .map(|s| (s.labels["le"].as_str(), s.value))
            .collect();
        assert_eq!(buckets, [("0.01", 0.0), ("0.1", 1.0), ("+Inf", 1.0)]);
    }
}
