//! A span while its request is in flight ([`ActiveSpan`]) and once it ended ([`SpanRecord`],
//! owned and compact, converted to OTLP only in the exporter). Attribute names follow the
//! OpenTelemetry semantic conventions for HTTP and RPC; sigil's own start with `sigil.`.
//!
//! The data path names the request ([`ActiveSpan::describe`]), adds what it learns with
//! [`ActiveSpan::set`] and ends the span with a [`SpanOutcome`]; the semantic conventions'
//! status rules (which outcomes are errors, per span kind) live here, in [`ActiveSpan::end`].

use std::time::{Instant, SystemTime};

use super::context::{SpanId, TraceId};

/// Attribute names (semantic conventions 1.45: HTTP spans, and RPC spans for gRPC).
pub mod attr {
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    pub const HTTP_REQUEST_METHOD_ORIGINAL: &str = "http.request.method_original";
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    pub const HTTP_REQUEST_BODY_SIZE: &str = "http.request.body.size";
    pub const HTTP_RESPONSE_BODY_SIZE: &str = "http.response.body.size";
    pub const URL_SCHEME: &str = "url.scheme";
    pub const URL_PATH: &str = "url.path";
    pub const URL_FULL: &str = "url.full";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
    pub const ERROR_TYPE: &str = "error.type";
    pub const RPC_SYSTEM_NAME: &str = "rpc.system.name";
    pub const RPC_METHOD: &str = "rpc.method";
    pub const RPC_RESPONSE_STATUS_CODE: &str = "rpc.response.status_code";
    /// The verified SPIFFE ID of the side that sent the request.
    pub const SIGIL_SOURCE_IDENTITY: &str = "sigil.source.identity";
    /// The verified SPIFFE ID of the side that served it.
    pub const SIGIL_DESTINATION_IDENTITY: &str = "sigil.destination.identity";
    /// The deciding AuthorizationPolicy (`ns/name`) or `default`.
    pub const SIGIL_POLICY: &str = "sigil.policy";
    /// `allow` or `deny`.
    pub const SIGIL_AUTHZ: &str = "sigil.authz";
    /// The route (HTTPRoute/GRPCRoute rule) that sent the request, when one did.
    pub const SIGIL_ROUTE: &str = "sigil.route";
    /// The outbound Service (`ns/name:port`).
    pub const SIGIL_SERVICE: &str = "sigil.service";
    /// How the request crossed to the other side: `mtls` (inbound from a verified client,
    /// outbound to a mesh endpoint) or `plaintext` (inbound under PERMISSIVE or DISABLE, outbound
    /// to a route's backend outside the mesh).
    pub const SIGIL_SECURITY: &str = "sigil.security";
}

/// The semantic conventions' version the attribute names follow (`ScopeSpans.schema_url`).
pub const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.45.0";

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
    /// The monotonic start, so the span's duration survives wall clock steps.
    started: Instant,
}

impl ActiveSpan {
    /// A span starting now, named `HTTP` until [`ActiveSpan::describe`] names it.
    pub fn start(
        trace_id: TraceId,
        span_id: SpanId,
        parent: Option<SpanId>,
        kind: SpanKind,
    ) -> ActiveSpan {
        ActiveSpan {
            trace_id,
            span_id,
            parent,
            kind,
            name: "HTTP".to_owned(),
            start: SystemTime::now(),
            attributes: Vec::with_capacity(16),
            started: Instant::now(),
        }
    }

    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// Adds (or replaces) an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<AttributeValue>) {
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) => *existing = value,
            None => self.attributes.push((key, value)),
        }
    }

    /// Names the span after the request: `{METHOD}` (never the path, which is unbounded), or
    /// for gRPC `{package.Service}/{Method}` from the path; sets `http.request.method` (an
    /// unknown method is `_OTHER`, the span `HTTP`, the method in
    /// `http.request.method_original`) and for gRPC `rpc.system.name` and `rpc.method`.
    pub fn describe(&mut self, method: &http::Method, path: &str, grpc: bool) {
        if KNOWN_METHODS.contains(&method.as_str()) {
            self.name = method.as_str().to_owned();
            self.set(attr::HTTP_REQUEST_METHOD, method.as_str());
        } else {
            self.name = "HTTP".to_owned();
            self.set(attr::HTTP_REQUEST_METHOD, "_OTHER");
            self.set(attr::HTTP_REQUEST_METHOD_ORIGINAL, method.as_str());
        }
        if grpc && let Some(rpc_method) = grpc_method(path) {
            self.name = rpc_method.to_owned();
            self.set(attr::RPC_SYSTEM_NAME, "grpc");
            self.set(attr::RPC_METHOD, rpc_method);
        }
    }

    /// Ends the span with `outcome`: its status and error attributes per the semantic
    /// conventions (see [`is_error`]), sizes, and the end time.
    pub fn end(mut self, outcome: &SpanOutcome) -> SpanRecord {
        if let Some(status) = outcome.status {
            self.set(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status));
        }
        if let Some(code) = outcome.grpc_status {
            self.set(attr::RPC_RESPONSE_STATUS_CODE, grpc_status_name(code));
        }
        self.set(
            attr::HTTP_REQUEST_BODY_SIZE,
            i64::try_from(outcome.request_bytes).unwrap_or(i64::MAX),
        );
        self.set(
            attr::HTTP_RESPONSE_BODY_SIZE,
            i64::try_from(outcome.response_bytes).unwrap_or(i64::MAX),
        );
        let error = is_error(self.kind, outcome);
        if error {
            // The local reason, else the code that made it an error.
            let error_type = match (outcome.error, outcome.grpc_status, outcome.status) {
                (Some(local), _, _) => local.to_owned(),
                (None, Some(code), _) => grpc_status_name(code).to_owned(),
                (None, None, Some(status)) => status.to_string(),
                (None, None, None) => "_OTHER".to_owned(),
            };
            self.set(attr::ERROR_TYPE, error_type);
        }
        SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            kind: self.kind,
            name: self.name,
            start: self.start,
            end: self.start + self.started.elapsed(),
            attributes: self.attributes,
            error,
        }
    }
}

/// The methods semantic conventions name spans by (RFC 9110's and PATCH); others are `_OTHER`.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// `package.Service/Method` of a gRPC path `/package.Service/Method`.
fn grpc_method(path: &str) -> Option<&str> {
    let method = path.strip_prefix('/')?;
    let (service, name) = method.split_once('/')?;
    (!service.is_empty() && !name.is_empty() && !name.contains('/')).then_some(method)
}

/// Whether a span ends as Error (semantic conventions):
/// - a local failure (`error`: no endpoint, upstream failed, timeout, cancelled): both kinds;
/// - gRPC (a `grpc-status` was seen): the server for UNKNOWN, DEADLINE_EXCEEDED,
///   UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS, the client for anything but OK;
/// - HTTP: the server for 5xx only (a 4xx, our 403 included, is the caller's error), the
///   client for 4xx and 5xx.
pub fn is_error(kind: SpanKind, outcome: &SpanOutcome) -> bool {
    if outcome.error.is_some() {
        return true;
    }
    if let Some(code) = outcome.grpc_status {
        return match kind {
            SpanKind::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            SpanKind::Client => code != 0,
        };
    }
    match (kind, outcome.status) {
        (_, None) => false,
        (SpanKind::Server, Some(status)) => status >= 500,
        (SpanKind::Client, Some(status)) => status >= 400,
    }
}

/// gRPC's status code names, as `rpc.response.status_code` reads.
fn grpc_status_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|code| NAMES.get(code))
        .copied()
        .unwrap_or("_OTHER")
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

#[cfg(test)]
impl SpanRecord {
    /// The value of the attribute `key`, if the span has it.
    pub(crate) fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, value)| value)
    }
}

#[cfg(test)]
mod tests;
