use super::*;

fn span(kind: SpanKind) -> ActiveSpan {
    ActiveSpan::start(TraceId([1; 16]), SpanId([2; 8]), Some(SpanId([3; 8])), kind)
}

#[test]
fn spans_are_named_by_method_or_grpc_method() {
    let mut get = span(SpanKind::Server);
    get.describe(&http::Method::GET, "/users/42?x=1", false);
    assert_eq!(get.name, "GET");
    let mut other = span(SpanKind::Server);
    other.describe(&http::Method::from_bytes(b"PURGE").unwrap(), "/", false);
    assert_eq!(other.name, "HTTP");
    let record = other.end(&SpanOutcome::default());
    assert_eq!(
        record.attribute(attr::HTTP_REQUEST_METHOD),
        Some(&"_OTHER".into())
    );
    assert_eq!(
        record.attribute(attr::HTTP_REQUEST_METHOD_ORIGINAL),
        Some(&"PURGE".into())
    );
    let mut grpc = span(SpanKind::Client);
    grpc.describe(&http::Method::POST, "/echo.v1.Echo/Say", true);
    assert_eq!(grpc.name, "echo.v1.Echo/Say");
    let record = grpc.end(&SpanOutcome {
        status: Some(200),
        grpc_status: Some(0),
        ..SpanOutcome::default()
    });
    assert_eq!(
        record.attribute(attr::RPC_SYSTEM_NAME),
        Some(&"grpc".into())
    );
    assert_eq!(
        record.attribute(attr::RPC_METHOD),
        Some(&"echo.v1.Echo/Say".into())
    );
    assert_eq!(
        record.attribute(attr::RPC_RESPONSE_STATUS_CODE),
        Some(&"OK".into())
    );
    // A gRPC path that names no method keeps the HTTP name.
    let mut odd = span(SpanKind::Client);
    odd.describe(&http::Method::POST, "/only", true);
    assert_eq!(odd.name, "POST");
}

#[test]
fn set_replaces_an_attribute() {
    let mut span = span(SpanKind::Server);
    span.set(attr::SIGIL_POLICY, "default");
    span.set(attr::SIGIL_POLICY, "ns/allow-a");
    span.set(attr::SERVER_PORT, 8080);
    let record = span.end(&SpanOutcome::default());
    let policies: Vec<_> = record
        .attributes
        .iter()
        .filter(|(k, _)| *k == attr::SIGIL_POLICY)
        .collect();
    assert_eq!(policies, [&(attr::SIGIL_POLICY, "ns/allow-a".into())]);
    assert_eq!(
        record.attribute(attr::SERVER_PORT),
        Some(&AttributeValue::Int(8080))
    );
}

#[test]
fn status_follows_the_semantic_conventions() {
    use SpanKind::{Client, Server};
    let http = |status| SpanOutcome {
        status: Some(status),
        ..SpanOutcome::default()
    };
    let grpc = |code| SpanOutcome {
        status: Some(200),
        grpc_status: Some(code),
        ..SpanOutcome::default()
    };
    let local = |error| SpanOutcome {
        error: Some(error),
        ..SpanOutcome::default()
    };
    // (kind, outcome, error?, error.type)
    let cases = [
        (Server, http(200), false, None),
        (Server, http(403), false, None),
        (Server, http(404), false, None),
        (Server, http(500), true, Some("500")),
        (Server, http(503), true, Some("503")),
        (Client, http(302), false, None),
        (Client, http(404), true, Some("404")),
        (Client, http(503), true, Some("503")),
        (Client, local("no_endpoints"), true, Some("no_endpoints")),
        (Server, local("cancelled"), true, Some("cancelled")),
        (
            Client,
            SpanOutcome {
                error: Some("timeout"),
                ..http(504)
            },
            true,
            Some("timeout"),
        ),
        (Server, grpc(0), false, None),
        (Server, grpc(5), false, None),
        (Server, grpc(7), false, None),
        (Server, grpc(2), true, Some("UNKNOWN")),
        (Server, grpc(4), true, Some("DEADLINE_EXCEEDED")),
        (Server, grpc(12), true, Some("UNIMPLEMENTED")),
        (Server, grpc(13), true, Some("INTERNAL")),
        (Server, grpc(14), true, Some("UNAVAILABLE")),
        (Server, grpc(15), true, Some("DATA_LOSS")),
        (Client, grpc(0), false, None),
        (Client, grpc(5), true, Some("NOT_FOUND")),
        (Client, grpc(99), true, Some("_OTHER")),
        (Server, SpanOutcome::default(), false, None),
    ];
    for (kind, outcome, error, error_type) in cases {
        let record = span(kind).end(&outcome);
        assert_eq!(record.error, error, "{kind:?} {outcome:?}");
        assert_eq!(
            record.attribute(attr::ERROR_TYPE),
            error_type.map(AttributeValue::from).as_ref(),
            "{kind:?} {outcome:?}"
        );
    }
}

#[test]
fn end_records_sizes_status_and_time() {
    let span = span(SpanKind::Client);
    let start = span.start;
    let record = span.end(&SpanOutcome {
        status: Some(201),
        request_bytes: 12,
        response_bytes: 345,
        ..SpanOutcome::default()
    });
    assert_eq!(
        record.attribute(attr::HTTP_RESPONSE_STATUS_CODE),
        Some(&AttributeValue::Int(201))
    );
    assert_eq!(
        record.attribute(attr::HTTP_REQUEST_BODY_SIZE),
        Some(&AttributeValue::Int(12))
    );
    assert_eq!(
        record.attribute(attr::HTTP_RESPONSE_BODY_SIZE),
        Some(&AttributeValue::Int(345))
    );
    assert_eq!(record.start, start);
    assert!(record.end >= record.start);
    assert_eq!(record.parent, Some(SpanId([3; 8])));
}
