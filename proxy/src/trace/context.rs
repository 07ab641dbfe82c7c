//! Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (single `b3` and multi
//! `X-B3-*` headers), parsed strictly and written back with our span as the parent.

use http::HeaderMap;

/// A 16-byte trace id (a 64-bit B3 id is left-padded with zeros and re-emitted at its width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The context a request arrived with (the first valid of `traceparent`, `b3`, `X-B3-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// The caller's span; `None` for a B3 decision-only header.
    pub parent: Option<SpanId>,
    /// The caller's decision; `None` when deferred (B3 without `Sampled`).
    pub sampled: Option<bool>,
}

/// Reads the incoming context; invalid headers count as absent.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let _ = headers;
    unimplemented!("trace-core")
}
