//! What counts as "behaved": each check turns what a step observed (answers, access-log fields,
//! metric deltas, serials over time) into a PASS or a FAIL with the reason.

use crate::report::Check;
use crate::services::{Answer, ORDERS_BODY};

/// The body the proxy answers a request denied by policy with.
pub const RBAC_DENIED: &str = "RBAC: access denied";
/// Renewals of each proxy's certificate the rotation step must see.
pub const MIN_RENEWALS: usize = 2;

/// A request's outcome as the frontend saw it (`Err` with the reason when it got no answer).
pub type Outcome = Result<Answer, String>;

/// Every allowed request got the backend's answer, and the backend proxy counted an ALLOW for
/// each.
pub fn allowed(outcomes: &[Outcome], allow_decisions: f64) -> Check {
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(a) if a.status == 200 && a.body == ORDERS_BODY))
        .count();
    let n = outcomes.len();
    if ok != n {
        return Check::fail(
            "allowed",
            format!(
                "{ok}/{n} GET /api/orders answered 200 by the backend; first problem: {}",
                first_problem(outcomes, |a| a.status == 200 && a.body == ORDERS_BODY)
            ),
        );
    }
    if allow_decisions < n as f64 {
        return Check::fail(
            "allowed",
            format!(
                "{n} requests answered, but the backend proxy counted only {allow_decisions} ALLOW decisions"
            ),
        );
    }
    Check::pass(
        "allowed",
        format!("{ok}/{n} GET /api/orders → 200 over mTLS, {allow_decisions} ALLOW decisions"),
    )
}

/// Both proxies hold the identity the attestor maps their executable to, and each side's access
/// log names the other's identity as verified in the handshake.
pub struct IdentityEvidence<'a> {
    pub frontend_cert: &'a str,
    pub backend_cert: &'a str,
    /// `source_identity` in the backend proxy's inbound access-log line.
    pub backend_saw: Option<&'a str>,
    /// `destination_identity` in the frontend proxy's outbound access-log line.
    pub frontend_saw: Option<&'a str>,
}

pub fn identities(expected_frontend: &str, expected_backend: &str, e: &IdentityEvidence) -> Check {
    let mut problems = Vec::new();
    if e.frontend_cert != expected_frontend {
        problems.push(format!(
            "the frontend proxy holds {:?}, not {expected_frontend}",
            e.frontend_cert
        ));
    }
    if e.backend_cert != expected_backend {
        problems.push(format!(
            "the backend proxy holds {:?}, not {expected_backend}",
            e.backend_cert
        ));
    }
    if e.backend_saw != Some(expected_frontend) {
        problems.push(format!(
            "the backend proxy's access log shows the caller as {:?}",
            e.backend_saw
        ));
    }
    if e.frontend_saw != Some(expected_backend) {
        problems.push(format!(
            "the frontend proxy's access log shows the server as {:?}",
            e.frontend_saw
        ));
    }
    if problems.is_empty() {
        Check::pass(
            "identities",
            "frontend → backend verified both ways (certificates and access logs agree)",
        )
    } else {
        Check::fail("identities", problems.join("; "))
    }
}

/// Every denied request got the proxy's 403, none reached the application, and the backend
/// proxy counted a DENY for each.
pub fn denied(outcomes: &[Outcome], reached_app: u64, deny_decisions: f64) -> Check {
    let is_rbac = |a: &Answer| a.status == 403 && a.body.trim_end() == RBAC_DENIED;
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(a) if is_rbac(a)))
        .count();
    let n = outcomes.len();
    if refused != n {
        return Check::fail(
            "denied",
            format!(
                "only {refused}/{n} requests outside the policy got 403 {RBAC_DENIED}; first problem: {}",
                first_problem(outcomes, is_rbac)
            ),
        );
    }
    if reached_app > 0 {
        return Check::fail(
            "denied",
            format!("{reached_app} denied requests reached the backend application"),
        );
    }
    if deny_decisions < n as f64 {
        return Check::fail(
            "denied",
            format!(
                "{n} requests got 403, but the backend proxy counted only {deny_decisions} DENY decisions"
            ),
        );
    }
    Check::pass(
        "denied",
        format!("{refused}/{n} requests outside the policy → 403 by the proxy, 0 reached the app"),
    )
}

/// The TLS record type of an alert: what a TLS server may answer a plaintext client with.
const TLS_ALERT: u8 = 0x15;

/// What came back to a plaintext client, in words.
pub fn describe_plaintext_answer(received: &[u8]) -> String {
    match received {
        [] => "closed without a byte".into(),
        [TLS_ALERT, ..] => "a TLS alert, then closed; no HTTP answer".into(),
        _ if received.starts_with(b"HTTP/") => {
            let text = String::from_utf8_lossy(received);
            format!("answered: {}", text.lines().next().unwrap_or_default())
        }
        _ => format!("{} bytes that are not HTTP, then closed", received.len()),
    }
}

/// A plaintext connection straight to the backend proxy got no HTTP answer and was counted as a
/// refused handshake.
pub fn plaintext(received: &[u8], refused_handshakes: f64) -> Check {
    if received.starts_with(b"HTTP/") {
        return Check::fail(
            "plaintext",
            format!(
                "a client without a certificate was {}",
                describe_plaintext_answer(received)
            ),
        );
    }
    if refused_handshakes < 1.0 {
        return Check::fail(
            "plaintext",
            "the backend proxy did not count the plaintext connection as a refused handshake",
        );
    }
    Check::pass(
        "plaintext",
        "a client without a certificate was refused (STRICT mTLS)",
    )
}

/// Serials a proxy presented, in the order they were seen.
pub struct Serials<'a> {
    pub proxy: &'a str,
    pub seen: &'a [String],
}

impl Serials<'_> {
    pub fn renewals(&self) -> usize {
        self.seen.len().saturating_sub(1)
    }
}

/// Each proxy's certificate was renewed at least [`MIN_RENEWALS`] times, and new connections
/// kept succeeding after every certificate in use at the start had expired.
pub fn rotated(serials: &[Serials], new_connections_after_expiry: u64) -> Check {
    let short: Vec<String> = serials
        .iter()
        .filter(|s| s.renewals() < MIN_RENEWALS)
        .map(|s| format!("the {} proxy renewed {} time(s)", s.proxy, s.renewals()))
        .collect();
    if !short.is_empty() {
        return Check::fail(
            "rotated",
            format!("{} (need {MIN_RENEWALS} each)", short.join(", ")),
        );
    }
    if new_connections_after_expiry == 0 {
        return Check::fail(
            "rotated",
            "no new connection succeeded after the first certificates expired",
        );
    }
    let counts: Vec<String> = serials
        .iter()
        .map(|s| format!("{} {}", s.proxy, s.renewals()))
        .collect();
    Check::pass(
        "rotated",
        format!(
            "renewals: {}; {new_connections_after_expiry} new connections after the first certificates expired",
            counts.join(", ")
        ),
    )
}

/// No allowed request failed while certificates rotated.
pub fn under_load(ok: u64, failed: u64, first_failure: Option<&str>) -> Check {
    if ok == 0 {
        return Check::fail("no failures", "no request succeeded during the rotation");
    }
    if failed > 0 {
        return Check::fail(
            "no failures",
            format!(
                "{failed} of {} requests failed during the rotation; first: {}",
                ok + failed,
                first_failure.unwrap_or("?")
            ),
        );
    }
    Check::pass(
        "no failures",
        format!("{ok} requests during the rotation, 0 failed"),
    )
}

/// The first outcome that is not as expected, described.
fn first_problem(outcomes: &[Outcome], good: impl Fn(&Answer) -> bool) -> String {
    outcomes
        .iter()
        .find_map(|o| match o {
            Ok(a) if good(a) => None,
            Ok(a) => Some(format!("{} {:?}", a.status, a.body.trim_end())),
            Err(e) => Some(e.clone()),
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Outcome {
        Ok(Answer {
            status,
            body: body.into(),
        })
    }

    #[test]
    fn allowed_needs_every_answer_from_the_app_and_the_decisions() {
        let good = vec![answer(200, ORDERS_BODY); 3];
        assert!(allowed(&good, 3.0).passed);
        let check = allowed(&good, 2.0);
        assert!(
            !check.passed && check.detail.contains("only 2 ALLOW"),
            "{check:?}"
        );
        let mut bad = good.clone();
        bad[1] = answer(403, "RBAC: access denied\n");
        let check = allowed(&bad, 3.0);
        assert!(!check.passed, "{check:?}");
        assert!(
            check.detail.contains("2/3") && check.detail.contains("403"),
            "{check:?}"
        );
        bad[1] = Err("connection reset".into());
        assert!(allowed(&bad, 3.0).detail.contains("connection reset"));
    }

    #[test]
    fn denied_needs_the_proxy_403_and_nothing_at_the_app() {
        let good = vec![answer(403, "RBAC: access denied\n"); 2];
        assert!(denied(&good, 0, 2.0).passed);
        assert!(
            !denied(&good, 1, 2.0).passed,
            "a denied request reached the app"
        );
        assert!(!denied(&good, 0, 1.0).passed);
        let from_app = vec![answer(200, "backend admin panel"), good[0].clone()];
        let check = denied(&from_app, 0, 2.0);
        assert!(!check.passed && check.detail.contains("1/2"), "{check:?}");
    }

    #[test]
    fn identities_must_match_on_both_sides() {
        let evidence = IdentityEvidence {
            frontend_cert: "spiffe://t/f",
            backend_cert: "spiffe://t/b",
            backend_saw: Some("spiffe://t/f"),
            frontend_saw: Some("spiffe://t/b"),
        };
        assert!(identities("spiffe://t/f", "spiffe://t/b", &evidence).passed);
        let unseen = IdentityEvidence {
            backend_saw: None,
            ..evidence
        };
        let check = identities("spiffe://t/f", "spiffe://t/b", &unseen);
        assert!(
            !check.passed && check.detail.contains("caller as None"),
            "{check:?}"
        );
    }

    #[test]
    fn plaintext_must_be_refused_and_counted() {
        assert!(plaintext(b"", 1.0).passed);
        assert!(plaintext(&[0x15, 3, 3, 0, 2, 2, 0x32], 1.0).passed);
        assert!(!plaintext(b"", 0.0).passed);
        let check = plaintext(b"HTTP/1.1 200 OK\r\n\r\n", 1.0);
        assert!(
            !check.passed && check.detail.contains("200 OK"),
            "{check:?}"
        );
        assert_eq!(
            describe_plaintext_answer(&[0x15, 3, 3, 0, 2, 2, 0x32]),
            "a TLS alert, then closed; no HTTP answer"
        );
        assert_eq!(describe_plaintext_answer(b""), "closed without a byte");
        assert_eq!(
            describe_plaintext_answer(b"junk"),
            "4 bytes that are not HTTP, then closed"
        );
    }

    #[test]
    fn rotation_needs_two_renewals_per_proxy_and_connections_after_expiry() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let ok = [
            Serials {
                proxy: "frontend",
                seen: &three,
            },
            Serials {
                proxy: "backend",
                seen: &three,
            },
        ];
        let check = rotated(&ok, 5);
        assert!(check.passed, "{check:?}");
        assert!(check.detail.contains("frontend 2, backend 2"), "{check:?}");
        assert!(!rotated(&ok, 0).passed);
        let short = [
            Serials {
                proxy: "frontend",
                seen: &three,
            },
            Serials {
                proxy: "backend",
                seen: &two,
            },
        ];
        let check = rotated(&short, 5);
        assert!(
            !check.passed && check.detail.contains("backend proxy renewed 1"),
            "{check:?}"
        );
    }

    #[test]
    fn any_failure_under_load_fails() {
        assert!(under_load(100, 0, None).passed);
        let check = under_load(99, 1, Some("timeout"));
        assert!(
            !check.passed && check.detail.contains("1 of 100") && check.detail.contains("timeout")
        );
        assert!(!under_load(0, 0, None).passed);
    }
}
