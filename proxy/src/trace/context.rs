//! Trace context on the wire: W3C `traceparent`/`tracestate` and B3 (single `b3` and multi
//! `X-B3-*` headers), parsed strictly and written back with our span as the parent.
//!
//! Extraction takes the first valid of `traceparent`, `b3`, `X-B3-*` (Linkerd's order); an
//! invalid header counts as absent. Injection rewrites every format the request carried, so a
//! caller speaking B3 and an app speaking W3C both see our span; `tracestate` passes untouched
//! (we add no entry) unless its `traceparent` was invalid, which drops both.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// W3C trace flags we keep: `sampled` and level 2's `random` (the others are dropped).
const FLAG_SAMPLED: u8 = 0x01;
const FLAG_RANDOM: u8 = 0x02;

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

impl TraceId {
    /// A new random trace id (never all zeros, which W3C and B3 read as absent).
    pub fn random() -> TraceId {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }

    /// The low 64 bits, as B3 writes a 64-bit trace id.
    fn low_half(&self) -> &[u8] {
        &self.0[8..]
    }
}

impl SpanId {
    /// A new random span id (never all zeros).
    pub fn random() -> SpanId {
        loop {
            let id = fastrand::u64(..).to_be_bytes();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
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
    /// B3 debug (`d`, `X-B3-Flags: 1`): sampled, and propagated as debug.
    pub debug: bool,
    /// W3C level 2's random flag: the trace id's low 56 bits are random.
    pub random: bool,
    /// The trace id came as a 64-bit B3 id (B3 headers get it back at that width).
    pub short_trace_id: bool,
}

/// What we send on: the trace, our span as the parent of the next hop, the decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub trace_id: TraceId,
    /// Our span (or, for an unsampled root, an id the next hop takes as its parent).
    pub span_id: SpanId,
    /// The caller's span: B3's `ParentSpanId`.
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub debug: bool,
    pub random: bool,
    pub short_trace_id: bool,
}

/// Reads the incoming context; invalid headers count as absent.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    traceparent(headers)
        .or_else(|| b3_single(headers))
        .or_else(|| b3_multi(headers))
}

/// Writes `context` into every propagation format `headers` carries, valid or not (so no hop
/// sees two traces); `traceparent` is written too when `root` (a trace we start, or a B3
/// decision without ids). A `tracestate` without a valid `traceparent` is removed when we
/// write one.
pub fn inject(headers: &mut HeaderMap, context: &Outgoing, root: bool) {
    if root || headers.contains_key(TRACEPARENT) {
        // A `tracestate` belongs to its valid `traceparent`; without one it describes no
        // trace we continue.
        if traceparent(headers).is_none() {
            headers.remove(TRACESTATE);
        }
        headers.insert(TRACEPARENT, header(write_traceparent(context)));
    }
    if headers.contains_key(B3) {
        headers.insert(B3, header(write_b3(context)));
    }
    if [&B3_TRACE_ID, &B3_SPAN_ID, &B3_SAMPLED, &B3_FLAGS]
        .iter()
        .any(|name| headers.contains_key(*name))
    {
        headers.insert(B3_TRACE_ID, header(b3_trace_id(context)));
        headers.insert(B3_SPAN_ID, header(hex(&context.span_id.0)));
        match context.parent {
            Some(parent) => headers.insert(B3_PARENT_SPAN_ID, header(hex(&parent.0))),
            None => headers.remove(B3_PARENT_SPAN_ID),
        };
        // Debug implies sampled, and B3 asks not to send both.
        if context.debug {
            headers.insert(B3_FLAGS, HeaderValue::from_static("1"));
            headers.remove(B3_SAMPLED);
        } else {
            headers.remove(B3_FLAGS);
            let sampled = if context.sampled { "1" } else { "0" };
            headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
        }
    }
}

fn header(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("hex and dashes are a valid header value")
}

fn write_traceparent(context: &Outgoing) -> String {
    let mut flags = 0;
    if context.sampled {
        flags |= FLAG_SAMPLED;
    }
    if context.random {
        flags |= FLAG_RANDOM;
    }
    format!("00-{}-{}-{flags:02x}", context.trace_id, context.span_id)
}

fn write_b3(context: &Outgoing) -> String {
    let decision = match (context.debug, context.sampled) {
        (true, _) => "d",
        (false, true) => "1",
        (false, false) => "0",
    };
    let mut value = format!(
        "{}-{}-{decision}",
        b3_trace_id(context),
        hex(&context.span_id.0)
    );
    if let Some(parent) = context.parent {
        value.push('-');
        value.push_str(&hex(&parent.0));
    }
    value
}

fn b3_trace_id(context: &Outgoing) -> String {
    if context.short_trace_id {
        hex(context.trace_id.low_half())
    } else {
        context.trace_id.to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one header named `name`, if there is exactly one.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h [u8]> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    values.next().is_none().then_some(value.as_bytes())
}

/// Lowercase hex only (W3C and B3 both say so), into `N` bytes.
fn parse_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn nonzero_trace_id(id: [u8; 16]) -> Option<TraceId> {
    (id != [0; 16]).then_some(TraceId(id))
}

fn nonzero_span_id(id: [u8; 8]) -> Option<SpanId> {
    (id != [0; 8]).then_some(SpanId(id))
}

/// A 128-bit (32 hex) or 64-bit (16 hex, left-padded) B3 trace id, and whether it was short.
fn b3_trace(text: &[u8]) -> Option<(TraceId, bool)> {
    if text.len() == 16 {
        let low: [u8; 8] = parse_hex(text)?;
        let mut id = [0; 16];
        id[8..].copy_from_slice(&low);
        Some((nonzero_trace_id(id)?, true))
    } else {
        Some((nonzero_trace_id(parse_hex(text)?)?, false))
    }
}

/// `{version}-{trace-id}-{parent-id}-{flags}`: version `00` is exactly 55 bytes; a later version
/// (not `ff`) may append fields after a `-`, which we ignore and re-emit as `00`.
fn traceparent(headers: &HeaderMap) -> Option<Incoming> {
    let value = single(headers, &TRACEPARENT)?;
    if value.len() < 55 {
        return None;
    }
    let version: [u8; 1] = parse_hex(&value[0..2])?;
    match version[0] {
        0xff => return None,
        0x00 if value.len() != 55 => return None,
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = nonzero_trace_id(parse_hex(&value[3..35])?)?;
    let parent = nonzero_span_id(parse_hex(&value[36..52])?)?;
    let [flags] = parse_hex::<1>(&value[53..55])?;
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled: Some(flags & FLAG_SAMPLED != 0),
        debug: false,
        random: flags & FLAG_RANDOM != 0,
        short_trace_id: false,
    })
}

/// A decision without ids (a lone B3 `0`/`1`/`d`, or `X-B3-Sampled`/`X-B3-Flags` alone): a new
/// root with the caller's decision.
fn decision_only(sampled: bool, debug: bool) -> Incoming {
    Incoming {
        trace_id: TraceId::random(),
        parent: None,
        sampled: Some(sampled || debug),
        debug,
        random: false,
        short_trace_id: false,
    }
}

/// `b3: {trace-id}-{span-id}[-{1|0|d}[-{parent-span-id}]]`, or a lone `0`, `1` or `d`.
fn b3_single(headers: &HeaderMap) -> Option<Incoming> {
    let value = single(headers, &B3)?;
    match value {
        b"0" => return Some(decision_only(false, false)),
        b"1" => return Some(decision_only(true, false)),
        b"d" => return Some(decision_only(true, true)),
        _ => {}
    }
    let mut fields = value.split(|&c| c == b'-');
    let (trace_id, short_trace_id) = b3_trace(fields.next()?)?;
    let parent = nonzero_span_id(parse_hex(fields.next()?)?)?;
    let (sampled, debug) = match fields.next() {
        None => (None, false),
        Some(b"1") => (Some(true), false),
        Some(b"0") => (Some(false), false),
        Some(b"d") => (Some(true), true),
        Some(_) => return None,
    };
    if let Some(parent_of_parent) = fields.next() {
        nonzero_span_id(parse_hex(parent_of_parent)?)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled,
        debug,
        random: false,
        short_trace_id,
    })
}

/// `X-B3-TraceId` and `X-B3-SpanId` (both required), `X-B3-Sampled` (`1`/`0`, legacy
/// `true`/`false`; absent = deferred), `X-B3-Flags: 1` (debug).
fn b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let debug = single(headers, &B3_FLAGS) == Some(&b"1"[..]);
    let sampled = match single(headers, &B3_SAMPLED) {
        None if headers.contains_key(B3_SAMPLED) => return None,
        None => None,
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        Some(_) => return None,
    };
    let (trace_id, span_id) = match (single(headers, &B3_TRACE_ID), single(headers, &B3_SPAN_ID)) {
        (Some(trace_id), Some(span_id)) => (trace_id, span_id),
        (None, None) if !headers.contains_key(B3_TRACE_ID) && !headers.contains_key(B3_SPAN_ID) => {
            return match (sampled, debug) {
                (_, true) => Some(decision_only(true, true)),
                (Some(sampled), false) => Some(decision_only(sampled, false)),
                (None, false) => None,
            };
        }
        _ => return None,
    };
    let (trace_id, short_trace_id) = b3_trace(trace_id)?;
    let parent = nonzero_span_id(parse_hex(span_id)?)?;
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled: if debug { Some(true) } else { sampled },
        debug,
        random: false,
        short_trace_id,
    })
}

#[cfg(test)]
mod tests;
