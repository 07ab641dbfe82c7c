//! Distributed tracing: the proxy takes part in W3C Trace Context and B3 propagation, records a
//! server span (inbound) and a client span (outbound) per sampled request, and exports them over
//! OTLP from one task that the data path never waits on.
//!
//! [`Tracer`] is what the data path holds (cheap to clone; [`Tracer::disabled`] when no collector
//! is configured, which reads and writes no trace header). Per request:
//! `let mut trace = tracer.begin(kind, request.headers_mut())` reads the incoming context, decides
//! sampling and rewrites the propagation headers for the next hop; the code fills
//! `trace.span_mut()` with attributes as it learns them ([`span::attr`] names them), and calls
//! `trace.finish(..)` with a [`SpanOutcome`] where the request's metrics are recorded (its
//! response body's end); the span's status follows from the outcome ([`span::is_error`]).

pub mod context;
pub mod export;
pub mod sampler;
pub mod span;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::mpsc::error::TrySendError;

pub use context::{Incoming, SpanId, TraceId};
pub use export::{ExportProtocol, TraceMetrics};
pub use sampler::Sampler;
pub use span::{ActiveSpan, SpanKind, SpanOutcome, SpanRecord};

/// The tracing settings of `sigil proxy run` (parsed and checked in `config.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// `--trace-collector`: the OTLP endpoint (`http://host:4317` for gRPC, `http://host:4318`
    /// for HTTP, where `/v1/traces` is appended when the URL has no path).
    pub collector: http::Uri,
    /// `--trace-protocol`.
    pub protocol: ExportProtocol,
    /// `--trace-sampling`: the share of new traces (requests without a sampling decision) sampled.
    pub sampling: f64,
    /// `--trace-queue-size`: spans waiting for export; more are dropped and counted.
    pub queue_size: usize,
    /// `--trace-batch-size`: spans per export request.
    pub batch_size: usize,
    /// `--trace-batch-timeout`: how long the first span of a batch waits for the rest.
    pub batch_timeout: Duration,
    /// `--trace-export-timeout`: one export request's bound.
    pub export_timeout: Duration,
    /// `--trace-service-name`: the resource's `service.name` (default `{sa}.{ns}` of the proxy's
    /// SPIFFE ID).
    pub service_name: Option<String>,
}

/// What the data path holds: the sampler and the exporter's queue, or nothing when tracing is
/// off.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<TracerInner>>,
}

struct TracerInner {
    sampler: Sampler,
    queue: tokio::sync::mpsc::Sender<SpanRecord>,
    metrics: TraceMetrics,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Tracer {
    /// Tracing off: [`Tracer::begin`] reads and writes no header and no span is made.
    pub fn disabled() -> Tracer {
        Tracer { inner: None }
    }

    /// Tracing on: spans go to `queue` (the exporter task of [`export::start`] owns its receiver).
    pub fn new(
        sampler: Sampler,
        queue: tokio::sync::mpsc::Sender<SpanRecord>,
        metrics: TraceMetrics,
    ) -> Tracer {
        Tracer {
            inner: Some(Arc::new(TracerInner {
                sampler,
                queue,
                metrics,
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// One request's trace, from its head: reads the incoming context from `headers`, decides
    /// sampling (the parent's decision, else the ratio), and when the request is sampled opens a
    /// span of `kind` and rewrites every propagation header present with the new span as parent
    /// (a new root gets `traceparent`, sampled or not, so the next hops follow one decision).
    /// Unsampled requests with a context keep their headers untouched.
    pub fn begin(&self, kind: SpanKind, headers: &mut HeaderMap) -> RequestTrace {
        let Some(inner) = &self.inner else {
            return RequestTrace::none();
        };
        let extracted = context::extract(headers);
        let had_context = extracted.is_some();
        let incoming = extracted.unwrap_or_else(|| Incoming {
            trace_id: TraceId::random(),
            parent: None,
            sampled: None,
            debug: false,
            random: false,
            short_trace_id: false,
        });
        let sampled = inner.sampler.decide(incoming.trace_id, incoming.sampled);
        let root = incoming.parent.is_none();
        if !sampled && had_context {
            // The caller decided (or defers, and every proxy decides alike on the trace id):
            // nothing to add. A B3 decision without ids names no trace.
            return RequestTrace {
                trace_id: (!root).then_some(incoming.trace_id),
                parent_span_id: incoming.parent,
                sampled: false,
                span: None,
                tracer: Tracer::disabled(),
            };
        }
        let span_id = SpanId::random();
        let outgoing = context::Outgoing {
            trace_id: incoming.trace_id,
            span_id,
            parent: incoming.parent,
            sampled,
            debug: incoming.debug,
            random: incoming.random,
            short_trace_id: incoming.short_trace_id,
        };
        context::inject(headers, &outgoing, root);
        let span =
            sampled.then(|| ActiveSpan::start(incoming.trace_id, span_id, incoming.parent, kind));
        RequestTrace {
            trace_id: Some(incoming.trace_id),
            parent_span_id: incoming.parent,
            sampled,
            tracer: if sampled {
                self.clone()
            } else {
                Tracer::disabled()
            },
            span,
        }
    }

    /// Whether the access log writes an allowed request's line: sampled traces always, else the
    /// share `ratio` decided on the trace id (so both proxies of a request decide alike), else at
    /// random.
    pub fn log_sampled(&self, trace: &RequestTrace, ratio: f64) -> bool {
        match trace.trace_id {
            _ if trace.sampled => true,
            Some(trace_id) => Sampler::ratio_decision(trace_id, ratio),
            None => fastrand::f64() < ratio,
        }
    }
}

/// One request's part in a trace: the ids the access log prints and, when sampled, the span.
#[derive(Debug, Default)]
pub struct RequestTrace {
    /// The trace this request belongs to (incoming, or the root we started), if any.
    pub trace_id: Option<TraceId>,
    /// The caller's span (the parent of ours), if the request carried one.
    pub parent_span_id: Option<SpanId>,
    /// Whether the request is sampled.
    pub sampled: bool,
    span: Option<ActiveSpan>,
    tracer: Tracer,
}

impl RequestTrace {
    /// No trace (tracing off, or nothing to trace).
    pub fn none() -> RequestTrace {
        RequestTrace::default()
    }

    /// Our span's id when this request is sampled.
    pub fn span_id(&self) -> Option<SpanId> {
        self.span.as_ref().map(ActiveSpan::span_id)
    }

    /// The open span, to add attributes to; `None` when unsampled.
    pub fn span_mut(&mut self) -> Option<&mut ActiveSpan> {
        self.span.as_mut()
    }

    /// Ends the span (if any) with `outcome` and queues it for export without waiting: a full
    /// queue drops it and counts `trace_spans_dropped_total{reason="queue_full"}`.
    pub fn finish(&mut self, outcome: &SpanOutcome) {
        let (Some(span), Some(inner)) = (self.span.take(), &self.tracer.inner) else {
            return;
        };
        let metrics = &inner.metrics;
        // Counted before the send, so the exporter's decrement never comes first.
        metrics.queue_spans.inc();
        let reason = match inner.queue.try_send(span.end(outcome)) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "queue_full",
            Err(TrySendError::Closed(_)) => "shutdown",
        };
        metrics.queue_spans.dec();
        metrics
            .spans_dropped
            .get_or_create(&export::DropLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests;
