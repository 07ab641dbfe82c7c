use http::HeaderValue;
use tokio::sync::mpsc;

use super::*;
use crate::trace::export::DropLabels;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn tracer(ratio: f64, capacity: usize) -> (Tracer, mpsc::Receiver<SpanRecord>, TraceMetrics) {
    let (queue, spans) = mpsc::channel(capacity);
    let metrics = TraceMetrics::default();
    (
        Tracer::new(Sampler { ratio }, queue, metrics.clone()),
        spans,
        metrics,
    )
}

fn with(name: &'static str, value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_str(value).unwrap());
    headers
}

fn dropped(metrics: &TraceMetrics, reason: &'static str) -> u64 {
    metrics
        .spans_dropped
        .get_or_create(&DropLabels { reason })
        .get()
}

#[test]
fn a_disabled_tracer_reads_and_writes_nothing() {
    let mut headers = with("traceparent", &format!("00-{TRACE}-{PARENT}-01"));
    let before = headers.clone();
    let mut trace = Tracer::disabled().begin(SpanKind::Server, &mut headers);
    assert_eq!(headers, before);
    assert_eq!((trace.trace_id, trace.sampled), (None, false));
    assert!(trace.span_mut().is_none());
    trace.finish(&SpanOutcome::default());
    let mut empty = HeaderMap::new();
    Tracer::disabled().begin(SpanKind::Client, &mut empty);
    assert!(empty.is_empty());
}

#[test]
fn a_sampled_root_gets_a_span_and_a_traceparent() {
    let (tracer, mut spans, metrics) = tracer(1.0, 4);
    let mut headers = HeaderMap::new();
    let mut trace = tracer.begin(SpanKind::Client, &mut headers);
    let (trace_id, span_id) = (trace.trace_id.unwrap(), trace.span_id().unwrap());
    assert!(trace.sampled);
    assert_eq!(trace.parent_span_id, None);
    assert_eq!(
        headers["traceparent"],
        format!("00-{trace_id}-{span_id}-01")
    );
    trace
        .span_mut()
        .unwrap()
        .describe(&http::Method::GET, "/", false);
    trace.finish(&SpanOutcome {
        status: Some(200),
        ..SpanOutcome::default()
    });
    assert_eq!(metrics.queue_spans.get(), 1);
    let record = spans.try_recv().unwrap();
    assert_eq!(
        (record.trace_id, record.span_id, record.parent, record.kind),
        (trace_id, span_id, None, SpanKind::Client)
    );
    assert_eq!(record.name, "GET");
    assert!(!record.error);
    // Finishing twice sends nothing more.
    trace.finish(&SpanOutcome::default());
    assert!(spans.try_recv().is_err());
}

#[test]
fn an_unsampled_root_still_passes_its_decision_on() {
    let (tracer, mut spans, _) = tracer(0.0, 4);
    let mut headers = HeaderMap::new();
    let mut trace = tracer.begin(SpanKind::Client, &mut headers);
    assert!(!trace.sampled);
    assert!(trace.span_id().is_none());
    let value = headers["traceparent"].to_str().unwrap().to_owned();
    assert!(value.starts_with(&format!("00-{}-", trace.trace_id.unwrap())));
    assert!(value.ends_with("-00"));
    trace.finish(&SpanOutcome::default());
    assert!(spans.try_recv().is_err());
}

#[test]
fn a_sampled_caller_is_continued() {
    let (tracer, mut spans, _) = tracer(0.0, 4);
    let mut headers = with("traceparent", &format!("00-{TRACE}-{PARENT}-01"));
    headers.insert("tracestate", HeaderValue::from_static("vendor=opaque"));
    let mut trace = tracer.begin(SpanKind::Server, &mut headers);
    let ours = trace.span_id().unwrap();
    assert_eq!(trace.trace_id.unwrap().to_string(), TRACE);
    assert_eq!(trace.parent_span_id.unwrap().to_string(), PARENT);
    assert_eq!(headers["traceparent"], format!("00-{TRACE}-{ours}-01"));
    assert_eq!(headers["tracestate"], "vendor=opaque");
    trace.finish(&SpanOutcome {
        status: Some(503),
        ..SpanOutcome::default()
    });
    let record = spans.try_recv().unwrap();
    assert_eq!(record.parent.unwrap().to_string(), PARENT);
    assert_eq!(record.kind, SpanKind::Server);
    assert!(record.error);
}

#[test]
fn an_unsampled_caller_is_left_alone() {
    let (tracer, mut spans, _) = tracer(1.0, 4);
    for mut headers in [
        with("traceparent", &format!("00-{TRACE}-{PARENT}-00")),
        with("b3", &format!("{TRACE}-{PARENT}-0")),
    ] {
        let before = headers.clone();
        let mut trace = tracer.begin(SpanKind::Server, &mut headers);
        assert_eq!(headers, before);
        assert!(!trace.sampled);
        assert_eq!(trace.trace_id.unwrap().to_string(), TRACE);
        assert_eq!(trace.parent_span_id.unwrap().to_string(), PARENT);
        trace.finish(&SpanOutcome::default());
    }
    // A decision without ids names no trace.
    let mut headers = with("b3", "0");
    let trace = tracer.begin(SpanKind::Server, &mut headers);
    assert_eq!(headers["b3"], "0");
    assert_eq!((trace.trace_id, trace.sampled), (None, false));
    assert!(spans.try_recv().is_err());
}

#[test]
fn a_deferred_b3_caller_gets_our_decision() {
    let (sampling, mut spans, _) = tracer(1.0, 4);
    let mut headers = with("b3", &format!("{TRACE}-{PARENT}"));
    let mut trace = sampling.begin(SpanKind::Server, &mut headers);
    let ours = trace.span_id().unwrap();
    assert_eq!(headers["b3"], format!("{TRACE}-{ours}-1-{PARENT}"));
    assert!(!headers.contains_key("traceparent"));
    trace.finish(&SpanOutcome::default());
    assert!(spans.try_recv().is_ok());

    let (not_sampling, _, _) = tracer(0.0, 4);
    let mut headers = with("b3", &format!("{TRACE}-{PARENT}"));
    let before = headers.clone();
    let trace = not_sampling.begin(SpanKind::Server, &mut headers);
    assert_eq!(headers, before);
    assert!(!trace.sampled);
}

#[test]
fn a_full_queue_drops_and_counts() {
    let (tracer, mut spans, metrics) = tracer(1.0, 1);
    for _ in 0..3 {
        tracer
            .begin(SpanKind::Server, &mut HeaderMap::new())
            .finish(&SpanOutcome::default());
    }
    assert_eq!(dropped(&metrics, "queue_full"), 2);
    assert_eq!(metrics.queue_spans.get(), 1);
    spans.close();
    assert!(spans.try_recv().is_ok());
    tracer
        .begin(SpanKind::Server, &mut HeaderMap::new())
        .finish(&SpanOutcome::default());
    assert_eq!(dropped(&metrics, "shutdown"), 1);
}

#[test]
fn the_access_log_follows_the_trace() {
    let (tracer, _spans, _) = tracer(0.0, 4);
    let sampled = RequestTrace {
        sampled: true,
        ..RequestTrace::none()
    };
    assert!(tracer.log_sampled(&sampled, 0.0));
    let mut headers = with("traceparent", &format!("00-{TRACE}-{PARENT}-00"));
    let unsampled = tracer.begin(SpanKind::Server, &mut headers);
    let decision = Sampler::ratio_decision(unsampled.trace_id.unwrap(), 0.5);
    assert!((0..10).all(|_| tracer.log_sampled(&unsampled, 0.5) == decision));
    assert!(tracer.log_sampled(&unsampled, 1.0));
    assert!(!tracer.log_sampled(&unsampled, 0.0));
    let untraced = RequestTrace::none();
    assert!(Tracer::disabled().log_sampled(&untraced, 1.0));
    assert!(!Tracer::disabled().log_sampled(&untraced, 0.0));
}
