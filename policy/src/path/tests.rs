use super::*;
use crate::engine::{HttpRequest, Request, Workload};

const DENY_ADMIN: &str = include_str!("../../../tests/fixtures/deny-admin.yaml");

#[test]
fn the_table_holds_for_every_mode() {
    let set = crate::file::parse_policy_set(DENY_ADMIN).unwrap();
    let labels = Default::default();
    let workload = Workload {
        namespace: "demo",
        labels: &labels,
    };
    let headers = http::HeaderMap::new();
    let cases = table();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for case in &cases {
        let normalized = normalize_target(case.target, case.mode);
        assert_eq!(
            normalized.as_deref().ok(),
            case.forwarded,
            "{} {}: {normalized:?}",
            case.mode,
            case.target
        );
        let verdict = match &normalized {
            Err(_) => "400".to_owned(),
            Ok(target) => {
                let path = target.split('?').next().unwrap_or_default();
                let request = Request {
                    peer: None,
                    source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    destination_port: 8080,
                    http: Some(HttpRequest {
                        method: "GET",
                        path,
                        host: "db",
                        headers: &headers,
                    }),
                };
                set.evaluate(&workload, &request).to_string()
            }
        };
        assert_eq!(verdict, case.verdict, "{} {}", case.mode, case.target);
    }
}

#[test]
fn refusals_say_why() {
    let base = PathNormalization::Base;
    assert_eq!(normalize("/a%00", base), Err(PathError::EncodedNul));
    assert_eq!(normalize("/a%0g", base), Err(PathError::InvalidEscape));
    assert_eq!(normalize("/%c0%ae", base), Err(PathError::NotUtf8));
    assert_eq!(normalize("/a%2F", base), Err(PathError::EncodedSlash));
    assert_eq!(normalize("/a;b", base), Err(PathError::Parameter));
    assert_eq!(normalize("a/b", base), Err(PathError::NotAbsolute));
    // OPTIONS * and CONNECT's empty path are left alone.
    assert_eq!(normalize("*", base).unwrap(), "*");
    assert_eq!(normalize("", base).unwrap(), "");
    // Raw UTF-8 (which the http crate accepts) is kept as it is.
    assert_eq!(normalize("/caf\u{e9}/./x", base).unwrap(), "/caf\u{e9}/x");
}
