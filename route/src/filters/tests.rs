use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::*;
use crate::compiled::{HeaderModifier, PathModifier, Redirect};

fn name(text: &str) -> HeaderName {
    HeaderName::from_bytes(text.as_bytes()).unwrap()
}

fn pair(header: &str, value: &str) -> (HeaderName, HeaderValue) {
    (name(header), HeaderValue::from_str(value).unwrap())
}

fn values(headers: &HeaderMap, header: &str) -> Vec<String> {
    headers
        .get_all(header)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[test]
fn set_replaces_every_value() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    let modifier = HeaderModifier {
        set: vec![pair("X-A", "3")],
        ..HeaderModifier::default()
    };
    modify_headers(&modifier, &mut headers);
    assert_eq!(values(&headers, "x-a"), ["3"]);
}

#[test]
fn add_appends_a_value() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("1"));
    let modifier = HeaderModifier {
        add: vec![pair("x-a", "2"), pair("x-new", "n")],
        ..HeaderModifier::default()
    };
    modify_headers(&modifier, &mut headers);
    assert_eq!(values(&headers, "x-a"), ["1", "2"]);
    assert_eq!(values(&headers, "x-new"), ["n"]);
}

#[test]
fn remove_removes_every_value_whatever_the_case() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    headers.append("x-b", HeaderValue::from_static("kept"));
    let modifier = HeaderModifier {
        remove: vec![name("X-A"), name("x-absent")],
        ..HeaderModifier::default()
    };
    modify_headers(&modifier, &mut headers);
    assert!(headers.get("x-a").is_none());
    assert_eq!(values(&headers, "x-b"), ["kept"]);
}

#[test]
fn set_then_add_then_remove() {
    // The same header in all three: add appends to what set wrote, remove wins.
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("old"));
    let modifier = HeaderModifier {
        set: vec![pair("x-a", "set"), pair("x-r", "set")],
        add: vec![pair("x-a", "added")],
        remove: vec![name("x-r")],
    };
    modify_headers(&modifier, &mut headers);
    assert_eq!(values(&headers, "x-a"), ["set", "added"]);
    assert!(headers.get("x-r").is_none());
}

/// conformance/tests/httproute-rewrite-path.go, the cases with RequestHeaderModifier: the
/// request's X-Header-Set is overwritten, X-Header-Add-Append gets a second value (read joined
/// as "append-val-1,header-val-2"), X-Header-Remove is gone.
#[test]
fn conformance_rewrite_path_and_modify_headers() {
    let mut headers = HeaderMap::new();
    headers.insert("x-header-remove", HeaderValue::from_static("remove-val"));
    headers.insert(
        "x-header-add-append",
        HeaderValue::from_static("append-val-1"),
    );
    headers.insert("x-header-set", HeaderValue::from_static("set-val"));
    let modifier = HeaderModifier {
        set: vec![pair("X-Header-Set", "set-overwrites-values")],
        add: vec![
            pair("X-Header-Add", "header-val-1"),
            pair("X-Header-Add-Append", "header-val-2"),
        ],
        remove: vec![name("X-Header-Remove")],
    };
    modify_headers(&modifier, &mut headers);
    assert_eq!(values(&headers, "x-header-add"), ["header-val-1"]);
    assert_eq!(
        values(&headers, "x-header-add-append").join(","),
        "append-val-1,header-val-2"
    );
    assert_eq!(values(&headers, "x-header-set"), ["set-overwrites-values"]);
    assert!(headers.get("x-header-remove").is_none());
    assert_eq!(
        rewrite_path(
            &PathModifier::ReplaceFullPath("/test".into()),
            "/full/rewrite-path-and-modify-headers/test",
            Some("/full/rewrite-path-and-modify-headers"),
        ),
        "/test"
    );
    assert_eq!(
        rewrite_path(
            &PathModifier::ReplacePrefixMatch("/prefix".into()),
            "/prefix/rewrite-path-and-modify-headers/one",
            Some("/prefix/rewrite-path-and-modify-headers"),
        ),
        "/prefix/one"
    );
}

fn prefix(replacement: &str) -> PathModifier {
    PathModifier::ReplacePrefixMatch(replacement.to_owned())
}

/// The table of `HTTPPathModifier.ReplacePrefixMatch` in apis/v1/httproute_types.go, row by row.
#[test]
fn replace_prefix_match_spec_table() {
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, matched, replacement, expected) in table {
        assert_eq!(
            rewrite_path(&prefix(replacement), path, Some(matched)),
            expected,
            "{path} matched {matched} replaced by {replacement:?}"
        );
    }
}

#[test]
fn replace_prefix_match_of_the_slash_prefix() {
    // PathPrefix `/` matches everything: the replacement is put in front, without `//`.
    assert_eq!(rewrite_path(&prefix("/v2"), "/a/b", Some("/")), "/v2/a/b");
    assert_eq!(rewrite_path(&prefix("/"), "/a/b", Some("/")), "/a/b");
    assert_eq!(rewrite_path(&prefix("/"), "/", Some("/")), "/");
    assert_eq!(rewrite_path(&prefix("/v2"), "/", Some("/")), "/v2/");
}

#[test]
fn replace_prefix_match_with_slash_never_makes_a_double_slash() {
    for (path, matched, expected) in [
        ("/foo/bar", "/foo", "/bar"),
        ("/foo/bar", "/foo/", "/bar"),
        ("/foo/", "/foo/", "/"),
        ("/foo", "/foo/", "/"),
    ] {
        assert_eq!(
            rewrite_path(&prefix("/"), path, Some(matched)),
            expected,
            "{path}"
        );
    }
}

#[test]
fn replace_prefix_match_without_a_prefix_leaves_the_path() {
    assert_eq!(rewrite_path(&prefix("/xyz"), "/foo/bar", None), "/foo/bar");
    // A prefix the path does not have element-wise (cannot come from select) changes nothing.
    assert_eq!(
        rewrite_path(&prefix("/xyz"), "/foobar", Some("/foo")),
        "/foobar"
    );
}

#[test]
fn replace_full_path_replaces_everything() {
    let full = PathModifier::ReplaceFullPath("/one".into());
    assert_eq!(
        rewrite_path(&full, "/full/one/two", Some("/full/one")),
        "/one"
    );
    assert_eq!(rewrite_path(&full, "/x", None), "/one");
}

/// conformance/tests/httproute-rewrite-path.go (the URLRewrite cases).
#[test]
fn conformance_rewrite_path() {
    let cases = [
        (prefix("/one"), "/prefix/one/two", "/prefix/one", "/one/two"),
        (
            prefix("/"),
            "/strip-prefix/three",
            "/strip-prefix",
            "/three",
        ),
        (prefix("/"), "/strip-prefix", "/strip-prefix", "/"),
        (
            PathModifier::ReplaceFullPath("/one".into()),
            "/full/one/two",
            "/full/one",
            "/one",
        ),
    ];
    for (modifier, path, matched, expected) in cases {
        assert_eq!(
            rewrite_path(&modifier, path, Some(matched)),
            expected,
            "{path}"
        );
    }
}

/// A request to a Service port, as the conformance suite's requests to a Gateway listener.
fn request<'a>(path: &'a str, port: u16, scheme: &'a str) -> RequestUrl<'a> {
    RequestUrl {
        scheme,
        host: "echo.gateway-conformance-infra",
        port,
        path,
        query: None,
    }
}

fn to(
    scheme: Option<&str>,
    hostname: Option<&str>,
    port: Option<u16>,
    path: Option<PathModifier>,
    status: u16,
) -> Redirect {
    Redirect {
        scheme: scheme.map(str::to_owned),
        hostname: hostname.map(str::to_owned),
        path,
        port,
        status: StatusCode::from_u16(status).unwrap(),
    }
}

fn location(r: &Redirect, req: &RequestUrl<'_>, matched: Option<&str>) -> (u16, String) {
    let target = redirect(r, req, matched);
    (target.status.as_u16(), target.location)
}

const HOST: &str = "echo.gateway-conformance-infra";

/// conformance/tests/httproute-redirect-port.go.
#[test]
fn conformance_redirect_port() {
    let cases = [
        (
            "/port",
            to(None, None, Some(8083), None, 302),
            302,
            format!("http://{HOST}:8083/port"),
        ),
        (
            "/port-and-host",
            to(None, Some("example.org"), Some(8083), None, 302),
            302,
            "http://example.org:8083/port-and-host".to_owned(),
        ),
        (
            "/port-and-status",
            to(None, None, Some(8083), None, 301),
            301,
            format!("http://{HOST}:8083/port-and-status"),
        ),
        (
            "/port-and-host-and-status",
            to(None, Some("example.org"), Some(8083), None, 302),
            302,
            "http://example.org:8083/port-and-host-and-status".to_owned(),
        ),
    ];
    for (path, r, status, expected) in cases {
        assert_eq!(
            location(&r, &request(path, 80, "http"), None),
            (status, expected)
        );
    }
}

/// conformance/tests/httproute-redirect-scheme.go: https without a port goes to 443, left out.
#[test]
fn conformance_redirect_scheme() {
    let cases = [
        (
            "/scheme",
            to(Some("https"), None, None, None, 302),
            302,
            format!("https://{HOST}/scheme"),
        ),
        (
            "/scheme-and-host",
            to(Some("https"), Some("example.org"), None, None, 302),
            302,
            "https://example.org/scheme-and-host".to_owned(),
        ),
        (
            "/scheme-and-status",
            to(Some("https"), None, None, None, 301),
            301,
            format!("https://{HOST}/scheme-and-status"),
        ),
        (
            "/scheme-and-host-and-status",
            to(Some("https"), Some("example.org"), None, None, 302),
            302,
            "https://example.org/scheme-and-host-and-status".to_owned(),
        ),
    ];
    for (path, r, status, expected) in cases {
        assert_eq!(
            location(&r, &request(path, 80, "http"), None),
            (status, expected)
        );
    }
}

/// conformance/tests/httproute-redirect-port-and-scheme.go: the three listeners (http 80,
/// http 8080, https 443) and every combination of scheme and port the test sends.
#[test]
fn conformance_redirect_port_and_scheme() {
    let org = Some("example.org");
    // (listener scheme, listener port, path, redirect scheme, redirect port, Location)
    let cases = [
        (
            "http",
            80,
            "/scheme-nil-and-port-nil",
            None,
            None,
            "http://example.org",
        ),
        (
            "http",
            80,
            "/scheme-nil-and-port-80",
            None,
            Some(80),
            "http://example.org",
        ),
        (
            "http",
            80,
            "/scheme-nil-and-port-8080",
            None,
            Some(8080),
            "http://example.org:8080",
        ),
        (
            "http",
            80,
            "/scheme-https-and-port-nil",
            Some("https"),
            None,
            "https://example.org",
        ),
        (
            "http",
            80,
            "/scheme-https-and-port-443",
            Some("https"),
            Some(443),
            "https://example.org",
        ),
        (
            "http",
            80,
            "/scheme-https-and-port-8443",
            Some("https"),
            Some(8443),
            "https://example.org:8443",
        ),
        (
            "http",
            8080,
            "/scheme-nil-and-port-nil",
            None,
            None,
            "http://example.org:8080",
        ),
        (
            "http",
            8080,
            "/scheme-nil-and-port-80",
            None,
            Some(80),
            "http://example.org",
        ),
        (
            "http",
            8080,
            "/scheme-https-and-port-nil",
            Some("https"),
            None,
            "https://example.org",
        ),
        (
            "https",
            443,
            "/scheme-nil-and-port-nil",
            None,
            None,
            "https://example.org",
        ),
        (
            "https",
            443,
            "/scheme-nil-and-port-443",
            None,
            Some(443),
            "https://example.org",
        ),
        (
            "https",
            443,
            "/scheme-nil-and-port-8443",
            None,
            Some(8443),
            "https://example.org:8443",
        ),
        (
            "https",
            443,
            "/scheme-http-and-port-nil",
            Some("http"),
            None,
            "http://example.org",
        ),
        (
            "https",
            443,
            "/scheme-http-and-port-80",
            Some("http"),
            Some(80),
            "http://example.org",
        ),
        (
            "https",
            443,
            "/scheme-http-and-port-8080",
            Some("http"),
            Some(8080),
            "http://example.org:8080",
        ),
    ];
    for (listener_scheme, listener_port, path, scheme, port, origin) in cases {
        let r = to(scheme, org, port, None, 302);
        assert_eq!(
            location(&r, &request(path, listener_port, listener_scheme), None),
            (302, format!("{origin}{path}")),
            "{listener_scheme}:{listener_port} {path}"
        );
    }
}

/// conformance/tests/httproute-redirect-host-and-status.go.
#[test]
fn conformance_redirect_host_and_status() {
    let r = to(None, Some("example.org"), None, None, 302);
    assert_eq!(
        location(&r, &request("/hostname-redirect", 80, "http"), None),
        (302, "http://example.org/hostname-redirect".to_owned())
    );
    let r = to(None, Some("example.org"), None, None, 301);
    assert_eq!(
        location(&r, &request("/host-and-status", 80, "http"), None),
        (301, "http://example.org/host-and-status".to_owned())
    );
}

/// conformance/tests/httproute-redirect-path.go.
#[test]
fn conformance_redirect_path() {
    let full = |p: &str| Some(PathModifier::ReplaceFullPath(p.to_owned()));
    let replace = || Some(prefix("/replacement-prefix"));
    let org = Some("example.org");
    let cases = [
        (
            "/original-prefix/lemon",
            "/original-prefix",
            to(None, None, None, replace(), 302),
            302,
            format!("http://{HOST}/replacement-prefix/lemon"),
        ),
        (
            "/full/path/original",
            "/full",
            to(None, None, None, full("/full-path-replacement"), 302),
            302,
            format!("http://{HOST}/full-path-replacement"),
        ),
        (
            "/path-and-host",
            "/path-and-host",
            to(None, org, None, replace(), 302),
            302,
            "http://example.org/replacement-prefix".to_owned(),
        ),
        (
            "/path-and-status",
            "/path-and-status",
            to(None, None, None, replace(), 301),
            301,
            format!("http://{HOST}/replacement-prefix"),
        ),
        (
            "/full-path-and-host",
            "/full-path-and-host",
            to(None, org, None, full("/replacement-full"), 302),
            302,
            "http://example.org/replacement-full".to_owned(),
        ),
        (
            "/full-path-and-status",
            "/full-path-and-status",
            to(None, None, None, full("/replacement-full"), 301),
            301,
            format!("http://{HOST}/replacement-full"),
        ),
    ];
    for (path, matched, r, status, expected) in cases {
        assert_eq!(
            location(&r, &request(path, 80, "http"), Some(matched)),
            (status, expected),
            "{path}"
        );
    }
}

/// conformance/tests/httproute-303-redirect.go, -307-, -308-: the status is the filter's.
#[test]
fn conformance_redirect_status_codes() {
    for (path, status) in [
        ("/see-other", 303),
        ("/temporary", 307),
        ("/permanent", 308),
    ] {
        let r = to(None, None, None, None, status);
        assert_eq!(
            location(&r, &request(path, 80, "http"), None),
            (status, format!("http://{HOST}{path}"))
        );
    }
}

#[test]
fn redirect_keeps_the_query() {
    let r = to(Some("https"), None, None, Some(prefix("/new")), 301);
    let req = RequestUrl {
        query: Some("a=1&b=%20"),
        ..request("/old/x", 8080, "http")
    };
    assert_eq!(
        location(&r, &req, Some("/old")),
        (301, format!("https://{HOST}/new/x?a=1&b=%20"))
    );
}

#[test]
fn redirect_brackets_an_ipv6_host() {
    let r = to(None, None, None, None, 302);
    let req = RequestUrl {
        host: "2001:2::1",
        ..request("/", 8080, "http")
    };
    assert_eq!(location(&r, &req, None).1, "http://[2001:2::1]:8080/");
}

#[test]
fn redirect_to_another_scheme_without_a_well_known_port_keeps_the_requests() {
    let r = to(Some("ftp"), None, None, None, 302);
    assert_eq!(
        location(&r, &request("/f", 8080, "http"), None).1,
        format!("ftp://{HOST}:8080/f")
    );
}
