//! The report on stdout: one progress line per step as it finishes (with details indented under
//! it), then a summary with PASS/FAIL per check. Lines are flushed as they are written.

use std::io::Write;
use std::time::Duration;

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// What was observed (when passed) or what went wrong (when failed).
    pub detail: String,
}

impl Check {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            passed: true,
            detail: detail.into(),
        }
    }

    pub fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            passed: false,
            detail: detail.into(),
        }
    }
}

/// Writes the report as the demo goes.
pub struct Reporter<W: Write> {
    out: W,
    steps: usize,
    step: usize,
}

/// Width of the step titles, so the timings line up.
const TITLE_WIDTH: usize = 52;

impl<W: Write> Reporter<W> {
    pub fn new(out: W, steps: usize) -> Self {
        Reporter {
            out,
            steps,
            step: 0,
        }
    }

    /// A line as is.
    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// `[n/N] title   1.2s` (the next step); `took` is how long the step took.
    pub fn step(&mut self, title: &str, took: Duration) {
        self.step += 1;
        let line = format_step(self.step, self.steps, title, took);
        self.line(&line);
    }

    /// `[n/N] title ...` for a long step whose details follow as they happen.
    pub fn step_started(&mut self, title: &str) {
        self.step += 1;
        let line = format!("[{}/{}] {title} ...", self.step, self.steps);
        self.line(&line);
    }

    /// A detail under the current step.
    pub fn detail(&mut self, text: &str) {
        self.line(&format!("      {text}"));
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

pub fn format_step(step: usize, steps: usize, title: &str, took: Duration) -> String {
    format!(
        "[{step}/{steps}] {title:<TITLE_WIDTH$} {}",
        format_secs(took)
    )
}

pub fn format_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The first 8 hex digits of a serial: enough to tell certificates apart in the report.
pub fn short_serial(serial: &str) -> &str {
    serial.get(..8).unwrap_or(serial)
}

/// `name{labels} before → after (+delta)` for one metric series.
pub fn metric_change(series: &str, before: f64, after: f64) -> String {
    let delta = after - before;
    let sign = if delta >= 0.0 { "+" } else { "" };
    format!(
        "{series} {} → {} ({sign}{})",
        number(before),
        number(after),
        number(delta)
    )
}

/// `name{labels} value`.
pub fn metric_value(series: &str, value: f64) -> String {
    format!("{series} {}", number(value))
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// The summary: every check, then the verdict and, on failure, where to look.
pub fn summary(checks: &[Check], took: Duration, kept: Option<&str>) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let failed = checks.iter().filter(|c| !c.passed).count();
    let mut text = String::from("\nSummary\n");
    for check in checks {
        text.push_str(&format!(
            "  {}  {:<width$}  {}\n",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        ));
    }
    if failed == 0 && !checks.is_empty() {
        text.push_str(&format!(
            "Result: PASS, all {} checks in {}\n",
            checks.len(),
            format_secs(took)
        ));
    } else {
        let names: Vec<&str> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        text.push_str(&format!(
            "Result: FAIL, {failed} of {} checks failed ({}) in {}\n",
            checks.len(),
            names.join(", "),
            format_secs(took)
        ));
    }
    if let Some(dir) = kept {
        text.push_str(&format!(
            "State, policy and component logs kept in {dir} (logs/<component>.log)\n"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_numbered_and_timings_line_up() {
        let mut reporter = Reporter::new(Vec::new(), 2);
        reporter.step("CA started", Duration::from_millis(340));
        reporter.detail("root abc");
        reporter.step_started("rotating");
        let text = String::from_utf8(reporter.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("[1/2] CA started "), "{text}");
        assert!(lines[0].ends_with(" 0.3s"), "{text}");
        assert_eq!(lines[0].len(), format_step(1, 2, "x", Duration::ZERO).len());
        assert_eq!(lines[1], "      root abc");
        assert_eq!(lines[2], "[2/2] rotating ...");
    }

    #[test]
    fn metric_changes_show_the_delta() {
        assert_eq!(
            metric_change("x_total{a=\"b\"}", 3.0, 10.0),
            "x_total{a=\"b\"} 3 → 10 (+7)"
        );
        assert_eq!(metric_change("x", 5.0, 5.0), "x 5 → 5 (+0)");
        assert_eq!(metric_value("g", 1.5), "g 1.500");
    }

    #[test]
    fn serials_are_shortened_safely() {
        assert_eq!(short_serial("0123456789abcdef"), "01234567");
        assert_eq!(short_serial("abc"), "abc");
    }

    #[test]
    fn the_summary_passes_only_when_every_check_passed() {
        let pass = [
            Check::pass("allowed", "10/10"),
            Check::pass("rotated", "3 renewals"),
        ];
        let text = summary(&pass, Duration::from_secs(12), None);
        assert!(text.contains("  PASS  allowed  10/10\n"), "{text}");
        assert!(
            text.contains("Result: PASS, all 2 checks in 12.0s"),
            "{text}"
        );
        assert!(!text.contains("kept"));

        let fail = [
            Check::pass("allowed", "10/10"),
            Check::fail("rotated", "frontend renewed once (need 2)"),
        ];
        let text = summary(&fail, Duration::from_secs(12), Some("/tmp/x"));
        assert!(
            text.contains("  FAIL  rotated  frontend renewed once"),
            "{text}"
        );
        assert!(
            text.contains("Result: FAIL, 1 of 2 checks failed (rotated)"),
            "{text}"
        );
        assert!(text.contains("kept in /tmp/x"), "{text}");

        let text = summary(&[], Duration::ZERO, None);
        assert!(
            text.contains("Result: FAIL"),
            "no checks is not a pass: {text}"
        );
    }
}
