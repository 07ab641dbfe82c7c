use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::*;
use crate::compiled::{
    Backends, GrpcMatch, GrpcRouteTable, HeaderMatch, HttpMatch, HttpRouteTable, PathMatch,
    QueryMatch, RouteKind, Rule, RuleRef, Timeouts, ValueMatch, regex_pattern,
};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn head<'a>(
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
) -> RequestHead<'a> {
    RequestHead {
        method,
        path,
        query,
        headers,
    }
}

fn path_only(m: PathMatch) -> HttpMatch {
    HttpMatch {
        path: Some(m),
        ..HttpMatch::default()
    }
}

fn path_is(m: &HttpMatch, path: &str) -> bool {
    let empty = HeaderMap::new();
    matches_http(m, &head(&Method::GET, path, None, &empty))
}

fn header(name: &str, value: ValueMatch) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value,
    }
}

fn exact(value: &str) -> ValueMatch {
    ValueMatch::Exact(value.to_owned())
}

#[test]
fn exact_path_matches_only_itself() {
    let m = path_only(PathMatch::Exact("/foo".into()));
    assert!(path_is(&m, "/foo"));
    assert!(!path_is(&m, "/foo/"));
    assert!(!path_is(&m, "/foo/bar"));
    assert!(!path_is(&m, "/fo"));
}

#[test]
fn path_prefix_is_element_wise() {
    let m = path_only(PathMatch::Prefix("/foo".into()));
    assert!(path_is(&m, "/foo"));
    assert!(path_is(&m, "/foo/"));
    assert!(path_is(&m, "/foo/bar"));
    assert!(!path_is(&m, "/foobar"));
    assert!(!path_is(&m, "/fo"));
    assert!(!path_is(&m, "/bar/foo"));
}

#[test]
fn path_prefix_ignores_a_trailing_slash() {
    let m = path_only(PathMatch::Prefix("/foo/".into()));
    assert!(path_is(&m, "/foo"));
    assert!(path_is(&m, "/foo/bar"));
    assert!(!path_is(&m, "/foobar"));
}

#[test]
fn slash_prefix_matches_every_path() {
    let m = path_only(PathMatch::Prefix("/".into()));
    for path in ["/", "/a", "/a/b/c", "/foo/"] {
        assert!(path_is(&m, path), "{path}");
    }
}

#[test]
fn no_path_matches_every_path() {
    assert!(path_is(&HttpMatch::default(), "/anything"));
}

#[test]
fn path_regex_matches_the_whole_path() {
    let m = path_only(PathMatch::regex("/v[0-9]+").unwrap());
    assert!(path_is(&m, "/v2"));
    assert!(!path_is(&m, "/v2/x"), "anchored at the end");
    assert!(!path_is(&m, "/x/v2"), "anchored at the start");
    // An alternation stays inside the anchors.
    let m = path_only(PathMatch::regex("/a|/b").unwrap());
    assert!(path_is(&m, "/b"));
    assert!(!path_is(&m, "/a/x"));
}

#[test]
fn regex_keeps_the_users_pattern() {
    let PathMatch::Regex(regex) = PathMatch::regex("/v[0-9]+").unwrap() else {
        unreachable!()
    };
    assert_eq!(regex.as_str(), "^(?:/v[0-9]+)$");
    assert_eq!(regex_pattern(&regex), "/v[0-9]+");
}

#[test]
fn regex_over_the_size_limit_is_refused() {
    assert!(ValueMatch::regex("a{1000}{1000}").is_err());
    assert!(ValueMatch::regex("(").is_err());
}

#[test]
fn method_must_be_equal() {
    let m = HttpMatch {
        method: Some(Method::POST),
        ..HttpMatch::default()
    };
    let empty = HeaderMap::new();
    assert!(matches_http(&m, &head(&Method::POST, "/", None, &empty)));
    assert!(!matches_http(&m, &head(&Method::GET, "/", None, &empty)));
}

#[test]
fn header_names_are_case_insensitive() {
    let m = HttpMatch {
        headers: vec![header("X-Canary", exact("1"))],
        ..HttpMatch::default()
    };
    let sent = headers(&[("x-CANARY", "1")]);
    assert!(matches_http(&m, &head(&Method::GET, "/", None, &sent)));
}

#[test]
fn header_values_are_exact_and_case_sensitive() {
    let m = HttpMatch {
        headers: vec![header("version", exact("One"))],
        ..HttpMatch::default()
    };
    for (value, matched) in [
        ("One", true),
        ("one", false),
        ("One ", false),
        ("On", false),
    ] {
        // HeaderValue trims nothing itself; a trailing space is part of the value here.
        let sent = headers(&[("version", value)]);
        assert_eq!(
            matches_http(&m, &head(&Method::GET, "/", None, &sent)),
            matched,
            "{value:?}"
        );
    }
}

#[test]
fn a_missing_header_does_not_match() {
    let m = HttpMatch {
        headers: vec![header("x-a", exact(""))],
        ..HttpMatch::default()
    };
    let sent = headers(&[("x-b", "")]);
    let request = head(&Method::GET, "/", None, &sent);
    assert_eq!(
        mismatch_http(&m, &request),
        Some(Mismatch::HeaderMissing { name: "x-a".into() })
    );
}

#[test]
fn repeated_header_values_are_joined_with_commas() {
    let sent = headers(&[("x-env", "a"), ("x-env", "b")]);
    let request = head(&Method::GET, "/", None, &sent);
    let joined = HttpMatch {
        headers: vec![header("x-env", exact("a,b"))],
        ..HttpMatch::default()
    };
    assert!(matches_http(&joined, &request));
    let first_only = HttpMatch {
        headers: vec![header("x-env", exact("a"))],
        ..HttpMatch::default()
    };
    assert!(!matches_http(&first_only, &request));
    let regex = HttpMatch {
        headers: vec![header("x-env", ValueMatch::regex("a,.*").unwrap())],
        ..HttpMatch::default()
    };
    assert!(matches_http(&regex, &request));
}

#[test]
fn header_regex_matches_the_whole_value() {
    let m = HttpMatch {
        headers: vec![header("x-v", ValueMatch::regex("v[12]").unwrap())],
        ..HttpMatch::default()
    };
    for (value, matched) in [("v1", true), ("v2", true), ("v12", false), ("xv1", false)] {
        let sent = headers(&[("x-v", value)]);
        assert_eq!(
            matches_http(&m, &head(&Method::GET, "/", None, &sent)),
            matched,
            "{value}"
        );
    }
}

#[test]
fn every_header_of_a_match_must_match() {
    let m = HttpMatch {
        headers: vec![header("x-a", exact("1")), header("x-b", exact("2"))],
        ..HttpMatch::default()
    };
    let both = headers(&[("x-a", "1"), ("x-b", "2")]);
    let one = headers(&[("x-a", "1")]);
    assert!(matches_http(&m, &head(&Method::GET, "/", None, &both)));
    assert!(!matches_http(&m, &head(&Method::GET, "/", None, &one)));
}

fn query_is(m: &HttpMatch, query: Option<&str>) -> bool {
    let empty = HeaderMap::new();
    matches_http(m, &head(&Method::GET, "/", query, &empty))
}

#[test]
fn query_parameter_uses_the_first_occurrence() {
    let m = HttpMatch {
        query: vec![QueryMatch {
            name: "animal".into(),
            value: exact("whale"),
        }],
        ..HttpMatch::default()
    };
    assert!(query_is(&m, Some("animal=whale")));
    assert!(query_is(&m, Some("color=blue&animal=whale")));
    assert!(query_is(&m, Some("animal=whale&animal=dolphin")));
    assert!(!query_is(&m, Some("animal=dolphin&animal=whale")));
    assert!(!query_is(&m, Some("animal=whales")));
    assert!(
        !query_is(&m, Some("Animal=whale")),
        "names are case-sensitive"
    );
    assert!(!query_is(&m, None));
}

#[test]
fn query_parameter_names_and_values_are_percent_decoded() {
    let m = HttpMatch {
        query: vec![QueryMatch {
            name: "a b".into(),
            value: exact("x&y"),
        }],
        ..HttpMatch::default()
    };
    assert!(query_is(&m, Some("a%20b=x%26y")));
    assert!(
        !query_is(&m, Some("a+b=x%26y")),
        "+ is not a space outside forms"
    );
}

#[test]
fn query_parameter_without_value_is_empty() {
    let m = HttpMatch {
        query: vec![QueryMatch {
            name: "debug".into(),
            value: exact(""),
        }],
        ..HttpMatch::default()
    };
    assert!(query_is(&m, Some("debug")));
    assert!(query_is(&m, Some("debug=")));
    assert!(!query_is(&m, Some("debug=1")));
}

#[test]
fn query_regex_matches_the_whole_value() {
    let m = HttpMatch {
        query: vec![QueryMatch {
            name: "id".into(),
            value: ValueMatch::regex("[0-9]+").unwrap(),
        }],
        ..HttpMatch::default()
    };
    assert!(query_is(&m, Some("id=42")));
    assert!(!query_is(&m, Some("id=42a")));
}

#[test]
fn mismatch_names_the_first_failing_part() {
    let m = HttpMatch {
        path: Some(PathMatch::Prefix("/api".into())),
        method: Some(Method::POST),
        headers: vec![header("x-a", exact("1"))],
        query: vec![QueryMatch {
            name: "q".into(),
            value: exact("1"),
        }],
    };
    let sent = headers(&[("x-a", "2")]);
    let mismatch = |method: &Method, path: &str, query: Option<&str>, h: &HeaderMap| {
        mismatch_http(&m, &head(method, path, query, h)).map(|m| m.to_string())
    };
    assert_eq!(
        mismatch(&Method::GET, "/web", None, &sent).as_deref(),
        Some("path /web does not match PathPrefix /api")
    );
    assert_eq!(
        mismatch(&Method::GET, "/api/x", None, &sent).as_deref(),
        Some("method GET is not POST")
    );
    assert_eq!(
        mismatch(&Method::POST, "/api/x", None, &sent).as_deref(),
        Some("header x-a: \"2\" does not match x-a=1")
    );
    let good = headers(&[("x-a", "1")]);
    assert_eq!(
        mismatch(&Method::POST, "/api/x", Some("q=2"), &good).as_deref(),
        Some("query parameter q=\"2\" does not match q=1")
    );
    assert_eq!(mismatch(&Method::POST, "/api/x", Some("q=1"), &good), None);
}

fn rule(index: u32) -> Rule {
    Rule {
        source: RuleRef {
            kind: RouteKind::HttpRoute,
            namespace: "ns".into(),
            name: "r".into(),
            rule_index: index,
            rule_name: None,
        },
        filters: Vec::new(),
        backends: Backends::default(),
        timeouts: Timeouts {
            request: Some(Duration::from_secs(u64::from(index) + 1)),
            ..Timeouts::default()
        },
        retry: None,
    }
}

/// A table in the order the agent sorts (longest prefix, then headers, ...); the matcher takes
/// the first entry that matches, whatever the rule index.
fn table() -> HttpRouteTable {
    HttpRouteTable {
        rules: vec![rule(0), rule(1), rule(2), rule(3)],
        order: vec![
            (2, path_only(PathMatch::Exact("/api/v2".into()))),
            (
                1,
                HttpMatch {
                    path: Some(PathMatch::Prefix("/api/".into())),
                    headers: vec![header("x-canary", exact("1"))],
                    ..HttpMatch::default()
                },
            ),
            (0, path_only(PathMatch::Prefix("/api".into()))),
            (
                3,
                HttpMatch {
                    method: Some(Method::DELETE),
                    ..HttpMatch::default()
                },
            ),
            (1, path_only(PathMatch::Prefix("/".into()))),
        ],
    }
}

#[test]
fn select_http_takes_the_first_matching_entry() {
    let table = table();
    let canary = headers(&[("x-canary", "1")]);
    let none = HeaderMap::new();
    // (method, path, headers) -> (entry, rule, matched prefix)
    let cases = [
        (Method::GET, "/api/v2", &canary, 0, 2, None),
        (Method::GET, "/api/v2/x", &canary, 1, 1, Some("/api/")),
        (Method::GET, "/api", &canary, 1, 1, Some("/api/")),
        (Method::GET, "/api/x", &none, 2, 0, Some("/api")),
        (Method::DELETE, "/apix", &none, 3, 3, None),
        (Method::DELETE, "/api/x", &none, 2, 0, Some("/api")),
        (Method::GET, "/apix", &canary, 4, 1, Some("/")),
    ];
    for (method, path, sent, entry, rule_index, prefix) in cases {
        let selected = select_rule(&table, &head(&method, path, None, sent)).unwrap();
        assert_eq!(
            (selected.entry, selected.rule_index, selected.matched_prefix),
            (entry, rule_index, prefix),
            "{method} {path}"
        );
        assert_eq!(
            selected.rule.source.rule_index as usize, rule_index,
            "the rule is the one the entry names"
        );
    }
}

#[test]
fn select_http_without_a_matching_entry_is_none() {
    let table = HttpRouteTable {
        rules: vec![rule(0)],
        order: vec![(0, path_only(PathMatch::Exact("/a".into())))],
    };
    let none = HeaderMap::new();
    assert!(select_rule(&table, &head(&Method::GET, "/b", None, &none)).is_none());
}

#[test]
fn explain_http_gives_every_entry_in_order() {
    let table = table();
    let none = HeaderMap::new();
    let verdicts = explain(&table, &head(&Method::GET, "/api/x", None, &none));
    let summary: Vec<_> = verdicts
        .iter()
        .map(|v| {
            (
                v.entry,
                v.rule_index,
                v.mismatch.as_ref().map(|m| m.to_string()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                0,
                2,
                Some("path /api/x does not match Exact /api/v2".to_owned())
            ),
            (1, 1, Some("header x-canary is missing".to_owned())),
            (2, 0, None),
            (3, 3, Some("method GET is not DELETE".to_owned())),
            (4, 1, None),
        ]
    );
    let first = verdicts.iter().position(|v| v.mismatch.is_none());
    let selected = select_rule(&table, &head(&Method::GET, "/api/x", None, &none)).unwrap();
    assert_eq!(first, Some(selected.entry));
}

fn grpc_rule(index: u32) -> Rule {
    Rule {
        source: RuleRef {
            kind: RouteKind::GrpcRoute,
            namespace: "ns".into(),
            name: "g".into(),
            rule_index: index,
            rule_name: None,
        },
        filters: Vec::new(),
        backends: Backends::default(),
        timeouts: Timeouts::default(),
        retry: None,
    }
}

fn grpc_is(m: &GrpcMatch, path: &str) -> bool {
    let empty = HeaderMap::new();
    matches_grpc(m, &head(&Method::POST, path, None, &empty))
}

#[test]
fn grpc_service_and_method_are_matched_separately() {
    let both = GrpcMatch {
        service: Some(exact("helloworld.Greeter")),
        method: Some(exact("SayHello")),
        headers: Vec::new(),
    };
    assert!(grpc_is(&both, "/helloworld.Greeter/SayHello"));
    assert!(!grpc_is(&both, "/helloworld.Greeter/SayGoodbye"));
    assert!(!grpc_is(&both, "/other.Greeter/SayHello"));
    let service = GrpcMatch {
        service: Some(exact("helloworld.Greeter")),
        ..GrpcMatch::default()
    };
    assert!(grpc_is(&service, "/helloworld.Greeter/Anything"));
    let method = GrpcMatch {
        method: Some(exact("SayHello")),
        ..GrpcMatch::default()
    };
    assert!(grpc_is(&method, "/any.Service/SayHello"));
    let regex = GrpcMatch {
        service: Some(ValueMatch::regex(r"helloworld\..*").unwrap()),
        ..GrpcMatch::default()
    };
    assert!(grpc_is(&regex, "/helloworld.Greeter/SayHello"));
    assert!(!grpc_is(&regex, "/x.helloworld.Greeter/SayHello"));
}

#[test]
fn grpc_path_of_another_shape_matches_only_a_match_naming_neither() {
    let service = GrpcMatch {
        service: Some(exact("a")),
        ..GrpcMatch::default()
    };
    for path in ["/", "/a", "/a/", "//m", "/a/b/c"] {
        assert!(!grpc_is(&service, path), "{path}");
    }
    assert!(grpc_is(&GrpcMatch::default(), "/a/b/c"));
    let empty = HeaderMap::new();
    assert_eq!(
        mismatch_grpc(&service, &head(&Method::POST, "/a", None, &empty))
            .unwrap()
            .to_string(),
        "path is not /<service>/<method>, wanted service=a"
    );
}

#[test]
fn grpc_headers_must_match() {
    let m = GrpcMatch {
        headers: vec![header("x-tenant", exact("a"))],
        ..GrpcMatch::default()
    };
    let sent = headers(&[("X-Tenant", "a")]);
    assert!(matches_grpc(&m, &head(&Method::POST, "/s/m", None, &sent)));
    let other = headers(&[("x-tenant", "b")]);
    assert!(!matches_grpc(
        &m,
        &head(&Method::POST, "/s/m", None, &other)
    ));
}

#[test]
fn select_grpc_takes_the_first_matching_entry() {
    let table = GrpcRouteTable {
        rules: vec![grpc_rule(0), grpc_rule(1)],
        order: vec![
            (
                1,
                GrpcMatch {
                    service: Some(exact("s.A")),
                    method: Some(exact("Get")),
                    headers: Vec::new(),
                },
            ),
            (
                0,
                GrpcMatch {
                    service: Some(exact("s.A")),
                    ..GrpcMatch::default()
                },
            ),
        ],
    };
    let empty = HeaderMap::new();
    let pick = |path| {
        select_rule(&table, &head(&Method::POST, path, None, &empty))
            .map(|s| (s.entry, s.rule_index, s.matched_prefix))
    };
    assert_eq!(pick("/s.A/Get"), Some((0, 1, None)));
    assert_eq!(pick("/s.A/Put"), Some((1, 0, None)));
    assert_eq!(pick("/s.B/Get"), None);
    let verdicts = explain(&table, &head(&Method::POST, "/s.B/Get", None, &empty));
    assert_eq!(
        verdicts[0].mismatch.as_ref().unwrap().to_string(),
        "service s.B does not match service=s.A"
    );
}

#[test]
fn grpc_is_recognized_by_content_type() {
    for (content_type, grpc) in [
        ("application/grpc", true),
        ("application/grpc+proto", true),
        ("application/grpc+json", true),
        ("Application/GRPC", true),
        ("application/grpc;charset=utf-8", true),
        ("application/grpc-web", false),
        ("application/grpcx", false),
        ("application/json", false),
    ] {
        let sent = headers(&[("content-type", content_type)]);
        assert_eq!(is_grpc(&sent), grpc, "{content_type}");
    }
    assert!(!is_grpc(&HeaderMap::new()));
}
