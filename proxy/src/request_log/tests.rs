//! The access-log line's fields (as the proxy's JSON logger writes them), which requests are
//! logged, and what a trace reads and writes with and without a collector.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::*;
use crate::trace::{Sampler, SpanOutcome, TraceMetrics};

/// The log lines written while `f` runs, as the proxy's JSON logger writes them (flattened).
fn lines_of(f: impl FnOnce()) -> Vec<serde_json::Value> {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn tracer() -> (
    Tracer,
    tokio::sync::mpsc::Receiver<crate::trace::SpanRecord>,
) {
    let (queue, spans) = tokio::sync::mpsc::channel(16);
    let tracer = Tracer::new(Sampler { ratio: 0.0 }, queue, TraceMetrics::default());
    (tracer, spans)
}

fn headers(traceparent: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", traceparent.parse().unwrap());
    headers
}

const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn line<'a>(trace: &'a RequestTrace) -> RequestLine<'a> {
    RequestLine {
        direction: Direction::Outbound,
        trace,
        source_ip: "198.18.0.1".parse().unwrap(),
        source_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
        destination_identity: Some("spiffe://cluster.local/ns/shop/sa/api"),
        method: "POST",
        authority: "api.shop:8080",
        path: "/orders",
        route: Some("shop/api-v2"),
        service: Some("shop/api"),
        status: 200,
        grpc_status: Some(0),
        result: "ok",
        policy: None,
        request_bytes: 12,
        response_bytes: 345,
        duration: Duration::from_millis(3),
        total: Duration::from_millis(7),
        upstream: Some("198.18.0.2:8080".parse().unwrap()),
        key_exchange: Some("X25519MLKEM768"),
        detail: None,
    }
}

#[test]
fn a_line_has_the_same_fields_both_ways_and_the_traces_ids() {
    let (tracer, _spans) = tracer();
    let mut sampled = headers(SAMPLED);
    let mut trace = tracer.begin(SpanKind::Client, &mut sampled);
    let span_id = trace
        .span_id()
        .expect("a sampled caller: a span")
        .to_string();
    let lines = lines_of(|| line(&trace).write());
    let [written] = &lines[..] else {
        panic!("one line: {lines:?}")
    };
    let fields: std::collections::BTreeSet<&str> = written
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected = [
        "timestamp",
        "level",
        "target",
        "kind",
        "direction",
        "trace_id",
        "span_id",
        "parent_span_id",
        "sampled",
        "source_ip",
        "source_identity",
        "destination_identity",
        "method",
        "authority",
        "path",
        "route",
        "service",
        "status",
        "grpc_status",
        "result",
        "request_bytes",
        "response_bytes",
        "duration_ms",
        "total_ms",
        "upstream",
        "key_exchange",
    ];
    assert_eq!(fields, expected.into(), "{written}");
    assert_eq!(written["target"], "sigil_access");
    assert_eq!(written["kind"], "http");
    assert_eq!(written["direction"], "outbound");
    assert_eq!(written["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(written["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(written["span_id"], span_id.as_str());
    assert_eq!(written["sampled"], true);
    assert_eq!(written["upstream"], "198.18.0.2:8080");
    assert_eq!(
        (written["status"].as_u64(), written["grpc_status"].as_u64()),
        (Some(200), Some(0))
    );
    assert_eq!(written["duration_ms"], 3.0);
    assert_eq!(written["total_ms"], 7.0);
    trace.finish(&SpanOutcome::default());

    // No trace, nothing known of the other side: those fields are left out, not empty.
    let none = RequestTrace::none();
    let bare = RequestLine {
        direction: Direction::Inbound,
        destination_identity: None,
        route: None,
        service: None,
        grpc_status: None,
        upstream: None,
        key_exchange: None,
        result: "denied",
        status: 403,
        policy: Some("shop/deny-all"),
        detail: Some("denied by shop/deny-all"),
        ..line(&none)
    };
    let lines = lines_of(|| bare.write());
    let written = &lines[0];
    for absent in [
        "trace_id",
        "span_id",
        "parent_span_id",
        "route",
        "upstream",
        "grpc_status",
    ] {
        assert!(written.get(absent).is_none(), "{absent} in {written}");
    }
    assert_eq!(written["sampled"], false);
    assert_eq!(written["direction"], "inbound");
    assert_eq!(written["policy"], "shop/deny-all");
    assert_eq!(written["detail"], "denied by shop/deny-all");
}

#[test]
fn refused_and_failed_requests_are_always_logged_allowed_ones_as_sampled() {
    let (tracer, _spans) = tracer();
    let disabled = Tracer::disabled();
    let none = RequestTrace::none();
    for t in [&tracer, &disabled] {
        // Without --access-log only what must be seen.
        assert!(wanted(t, &none, None, true));
        assert!(!wanted(t, &none, None, false));
        // With it: all at 1, none at 0.
        assert!(wanted(t, &none, Some(1.0), false));
        assert!(!wanted(t, &none, Some(0.0), false) || none.sampled);
        assert!(wanted(t, &none, Some(0.0), true));
    }
    // A traced request is logged whatever the share.
    let mut sampled = headers(SAMPLED);
    let mut trace = tracer.begin(SpanKind::Server, &mut sampled);
    assert!(trace.sampled);
    assert!(wanted(&tracer, &trace, Some(0.0), false));
    trace.finish(&SpanOutcome::default());
    // Unsampled traces are picked on their id: the same on every proxy, about the share.
    let mut picked = 0;
    // From 1: the all-zero trace id is invalid and would be replaced by a random one.
    for n in 1..=2000u32 {
        let id = format!(
            "00-{:032x}-00f067aa0ba902b7-00",
            u128::from(n).wrapping_mul(0x9e3779b97f4a7c15f39cc0605cedc835)
        );
        let mut first = headers(&id);
        let mut second = headers(&id);
        let a = tracer.begin(SpanKind::Server, &mut first);
        let b = begin(&disabled, SpanKind::Client, &mut second, true);
        let decision = wanted(&tracer, &a, Some(0.25), false);
        assert_eq!(decision, wanted(&disabled, &b, Some(0.25), false), "{id}");
        picked += u32::from(decision);
    }
    assert!((400..600).contains(&picked), "{picked} of 2000 at 0.25");
}

#[test]
fn without_a_collector_the_log_reads_the_context_and_nothing_is_written() {
    let disabled = Tracer::disabled();
    let mut carried = headers(SAMPLED);
    let before = carried.clone();
    let trace = begin(&disabled, SpanKind::Server, &mut carried, true);
    assert_eq!(carried, before, "headers untouched");
    assert_eq!(
        trace.trace_id.map(|id| id.to_string()).as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(
        trace.parent_span_id.map(|id| id.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(trace.span_id(), None);
    // No access log: not even read.
    let trace = begin(&disabled, SpanKind::Server, &mut carried, false);
    assert_eq!(trace.trace_id, None);
    // No context: a root only with a collector, which then tells the next hop.
    let mut bare = HeaderMap::new();
    assert_eq!(
        begin(&disabled, SpanKind::Client, &mut bare, true).trace_id,
        None
    );
    assert!(bare.is_empty());
    let (tracer, _spans) = tracer();
    let trace = begin(&tracer, SpanKind::Client, &mut bare, true);
    assert!(trace.trace_id.is_some());
    assert!(bare.contains_key("traceparent"), "{bare:?}");
}

#[test]
fn spans_are_named_by_method_or_grpc_method_never_by_path() {
    let (tracer, _spans) = tracer();
    let describe = |request: http::Request<()>| {
        let mut headers = headers(SAMPLED);
        let mut trace = tracer.begin(SpanKind::Server, &mut headers);
        let span = trace.span_mut().unwrap();
        let path = request.uri().path().to_owned();
        describe_head(span, &request, &path, "api.shop:8080");
        let described = (span.name.clone(), span.attributes.clone());
        trace.finish(&SpanOutcome::default());
        described
    };
    let text = |v: &str| crate::trace::span::AttributeValue::Str(v.into());
    let (name, attributes) = describe(http::Request::get("/users/42").body(()).unwrap());
    assert_eq!(name, "GET");
    assert!(attributes.contains(&("url.path", text("/users/42"))));
    assert!(attributes.contains(&("server.address", text("api.shop"))));
    assert!(attributes.contains(&("server.port", crate::trace::span::AttributeValue::Int(8080))));
    let (name, attributes) = describe(
        http::Request::builder()
            .method("PURGE")
            .uri("/cache")
            .body(())
            .unwrap(),
    );
    assert_eq!(name, "HTTP");
    assert!(attributes.contains(&("http.request.method", text("_OTHER"))));
    assert!(attributes.contains(&("http.request.method_original", text("PURGE"))));
    let (name, attributes) = describe(
        http::Request::post("/shop.Orders/Place")
            .version(http::Version::HTTP_2)
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap(),
    );
    assert_eq!(name, "shop.Orders/Place");
    assert!(attributes.contains(&("rpc.system.name", text("grpc"))));
    assert!(attributes.contains(&("rpc.method", text("shop.Orders/Place"))));
    assert!(attributes.contains(&("network.protocol.version", text("2"))));
}
