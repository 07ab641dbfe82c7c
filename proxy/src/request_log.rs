//! What the proxy says about each HTTP request: its span's attributes of the request head
//! ([`describe_head`]) and its line in the access log.
//!
//! The access log (target `sigil_access`, `kind: http`): one JSON line per HTTP
//! request, inbound and outbound alike and with the same fields, written where the request's
//! metrics are recorded (when its response body ends, so bytes, trailers and the whole duration
//! are known). Denied, malformed (400) and requests the proxy failed itself are always written;
//! allowed ones with --access-log, the share --access-log-sampling picks
//! ([`Tracer::log_sampled`]: traced requests always, others decided on their trace id, so both
//! proxies of a request log the same requests).
//!
//! Also where a request's trace begins ([`begin`]): with a collector the [`Tracer`] reads and
//! rewrites the propagation headers; without one, the access log still prints the ids of an
//! incoming context (read only: headers are never written then).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use tracing::info;

use crate::metrics::Direction;
use crate::trace::span::attr;
use crate::trace::{ActiveSpan, RequestTrace, SpanKind, Tracer, context};

/// One request's line.
#[derive(Debug)]
pub struct RequestLine<'a> {
    pub direction: Direction,
    pub trace: &'a RequestTrace,
    pub source_ip: IpAddr,
    /// The verified SPIFFE IDs of the caller and the callee, where known.
    pub source_identity: Option<&'a str>,
    pub destination_identity: Option<&'a str>,
    pub method: &'a str,
    pub authority: &'a str,
    /// The path without its query (queries carry tokens and personal data).
    pub path: &'a str,
    /// Outbound: the route (`namespace/name`) whose rule served the request.
    pub route: Option<&'a str>,
    /// Outbound: the meshed Service (`namespace/name`).
    pub service: Option<&'a str>,
    /// The status sent to the client (0: none, the client went away first).
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// `allowed`/`ok`, or what went wrong (`denied`, `bad_request`, `upstream_failed`, ...).
    pub result: &'a str,
    /// Inbound: the deciding policy (`namespace/name` or `default`).
    pub policy: Option<&'a str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// From the request head to the response head...
    pub duration: Duration,
    /// ...and to the end of the response body.
    pub total: Duration,
    /// Where the request went: the endpoint (outbound) or the application (inbound).
    pub upstream: Option<SocketAddr>,
    /// The TLS key exchange of the connection the request came on (inbound mTLS).
    pub key_exchange: Option<&'a str>,
    /// Why a refused or failed request was refused or failed.
    pub detail: Option<&'a str>,
}

impl RequestLine<'_> {
    pub fn write(&self) {
        info!(
            target: "sigil_access",
            kind = "http",
            direction = self.direction.as_str(),
            trace_id = self.trace.trace_id.map(display),
            span_id = self.trace.span_id().map(display),
            parent_span_id = self.trace.parent_span_id.map(display),
            sampled = self.trace.sampled,
            source_ip = %self.source_ip,
            source_identity = self.source_identity,
            destination_identity = self.destination_identity,
            method = self.method,
            authority = self.authority,
            path = self.path,
            route = self.route,
            service = self.service,
            status = self.status,
            grpc_status = self.grpc_status,
            result = self.result,
            policy = self.policy,
            request_bytes = self.request_bytes,
            response_bytes = self.response_bytes,
            duration_ms = self.duration.as_secs_f64() * 1e3,
            total_ms = self.total.as_secs_f64() * 1e3,
            upstream = self.upstream.map(display),
            key_exchange = self.key_exchange,
            detail = self.detail,
        );
    }
}

/// Whether a request's line is written: `always` (refused or failed by the proxy), else with
/// the access log on (`ratio`: --access-log-sampling) if the request is picked.
pub fn wanted(tracer: &Tracer, trace: &RequestTrace, ratio: Option<f64>, always: bool) -> bool {
    always || ratio.is_some_and(|ratio| ratio >= 1.0 || tracer.log_sampled(trace, ratio))
}

/// One request's trace from its head. With a collector, [`Tracer::begin`] (which continues or
/// starts the trace and rewrites the propagation headers for the next hop); without one and
/// with the access log on (`logged`), the incoming context's ids, read only, for the log line;
/// else nothing.
pub fn begin(
    tracer: &Tracer,
    kind: SpanKind,
    headers: &mut HeaderMap,
    logged: bool,
) -> RequestTrace {
    if tracer.enabled() {
        return tracer.begin(kind, headers);
    }
    let mut trace = RequestTrace::none();
    if logged && let Some(incoming) = context::extract(headers) {
        trace.trace_id = Some(incoming.trace_id);
        trace.parent_span_id = incoming.parent;
    }
    trace
}

/// Names `span` after the request ([`ActiveSpan::describe`]) and sets the attributes of its
/// head (OpenTelemetry semantic conventions for HTTP). `path` is the path without its query,
/// `authority` the request's (Host or `:authority`).
pub fn describe_head<B>(
    span: &mut ActiveSpan,
    request: &http::Request<B>,
    path: &str,
    authority: &str,
) {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    span.describe(request.method(), path, grpc);
    span.set(attr::URL_SCHEME, "http");
    span.set(attr::URL_PATH, path);
    if let Ok(authority) = authority.parse::<http::uri::Authority>() {
        span.set(attr::SERVER_ADDRESS, authority.host());
        if let Some(port) = authority.port_u16() {
            span.set(attr::SERVER_PORT, i64::from(port));
        }
    }
    let version = match request.version() {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        _ => "3",
    };
    span.set(attr::NETWORK_PROTOCOL_VERSION, version);
}

/// Sets the address of the other side of the hop (`network.peer.*`).
pub fn describe_peer(span: &mut ActiveSpan, peer: SocketAddr) {
    span.set(attr::NETWORK_PEER_ADDRESS, peer.ip().to_string());
    span.set(attr::NETWORK_PEER_PORT, i64::from(peer.port()));
}

#[cfg(test)]
mod tests;
