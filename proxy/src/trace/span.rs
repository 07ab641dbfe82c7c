//! A span while its request is in flight ([`ActiveSpan`]) and once it ended ([`SpanRecord`],
//! owned and compact, converted to OTLP only in the exporter). Attribute names follow the
//! OpenTelemetry semantic conventions for HTTP and RPC; sigil's own start with `sigil.`.

use std::time::SystemTime;

use super::context::{SpanId, TraceId};

/// Inbound requests make server spans, outbound requests client spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    Str(String),
    Int(i64),
}

/// A sampled request's span, from its head on.
#[derive(Debug)]
pub struct ActiveSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub attributes: Vec<(&'static str, AttributeValue)>,
}

impl ActiveSpan {
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// Adds (or replaces) an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<AttributeValue>) {
        let _ = (key, value.into());
        unimplemented!("trace-core")
    }
}

impl From<&str> for AttributeValue {
    fn from(value: &str) -> AttributeValue {
        AttributeValue::Str(value.to_owned())
    }
}

impl From<String> for AttributeValue {
    fn from(value: String) -> AttributeValue {
        AttributeValue::Str(value)
    }
}

impl From<i64> for AttributeValue {
    fn from(value: i64) -> AttributeValue {
        AttributeValue::Int(value)
    }
}

/// How a request ended, as its span records it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanOutcome {
    /// The HTTP status sent or received; `None` when there was no response.
    pub status: Option<u16>,
    pub grpc_status: Option<u32>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// `error.type` when the request failed without a status, or failed locally
    /// (`no_endpoints`, `upstream_failed`, `timeout`, `cancelled`, ...).
    pub error: Option<&'static str>,
}

/// An ended span, queued for export.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    /// OTLP's status: true for Error (semantic conventions decide per kind and status).
    pub error: bool,
}
