//! The route annotations for what the v1.6 standard CRDs have no field for (design-15.md §3.3,
//! in the style of Linkerd's `retry.linkerd.io/*` and `timeout.linkerd.io/*`). A value that does
//! not parse drops nothing: the annotation is ignored and the `Accepted` message says why.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::rules::DEFAULT_RETRY_BACKOFF;
use crate::compiled::{RetryPolicy, RouteKind, Timeouts};
use crate::model::parse_duration;

pub(crate) const IDLE: &str = "timeout.sigil.dev/idle";
pub(crate) const REQUEST: &str = "timeout.sigil.dev/request";
pub(crate) const BACKEND_REQUEST: &str = "timeout.sigil.dev/backend-request";
pub(crate) const RETRY_LIMIT: &str = "retry.sigil.dev/limit";
pub(crate) const RETRY_BACKOFF: &str = "retry.sigil.dev/backoff";
pub(crate) const RETRY_HTTP: &str = "retry.sigil.dev/http";
pub(crate) const RETRY_GRPC: &str = "retry.sigil.dev/grpc";
pub(crate) const RETRY_NON_IDEMPOTENT: &str = "retry.sigil.dev/non-idempotent";

const KNOWN: [&str; 8] = [
    IDLE,
    REQUEST,
    BACKEND_REQUEST,
    RETRY_LIMIT,
    RETRY_BACKOFF,
    RETRY_HTTP,
    RETRY_GRPC,
    RETRY_NON_IDEMPOTENT,
];

/// HTTP codes retried when the annotations turn retries on without `retry.sigil.dev/http`:
/// every 5xx, as Linkerd's `retry.linkerd.io/http` example.
const DEFAULT_HTTP_CODES: std::ops::RangeInclusive<u16> = 500..=599;
/// gRPC codes retried without `retry.sigil.dev/grpc`: UNAVAILABLE, the one status gRPC itself
/// documents as "most likely a transient condition, which can be corrected by retrying".
const DEFAULT_GRPC_CODES: [u32; 1] = [14];

/// The gRPC status codes by name (`grpc/status.proto`), as written in the annotation.
const GRPC_CODES: [(&str, u32); 16] = [
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid-argument", 3),
    ("deadline-exceeded", 4),
    ("not-found", 5),
    ("already-exists", 6),
    ("permission-denied", 7),
    ("resource-exhausted", 8),
    ("failed-precondition", 9),
    ("aborted", 10),
    ("out-of-range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data-loss", 15),
    ("unauthenticated", 16),
];

/// What a route's annotations say for every rule that has no field of its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RouteAnnotations {
    /// Request and backend-request from the annotations, idle always (no field has it).
    pub timeouts: Timeouts,
    /// On when `retry.sigil.dev/limit` or the codes annotation of the route's kind is given.
    pub retry: Option<RetryPolicy>,
    /// Also applies to an HTTPRoute rule's own `retry`, which has no such field.
    pub non_idempotent: bool,
}

impl RouteAnnotations {
    pub(crate) fn parse(
        annotations: &BTreeMap<String, String>,
        kind: RouteKind,
        notes: &mut Vec<String>,
    ) -> RouteAnnotations {
        let mut read = Reader { annotations, notes };
        for name in annotations.keys() {
            let ours =
                name.starts_with("timeout.sigil.dev/") || name.starts_with("retry.sigil.dev/");
            if ours && !KNOWN.contains(&name.as_str()) {
                read.ignore(name, "sigil reads no such annotation");
            }
        }
        let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        let idle = nonzero(read.get(IDLE, parse_duration));
        let request = read.get(REQUEST, parse_duration);
        let mut backend_request = read.get(BACKEND_REQUEST, parse_duration);
        if let (Some(r), Some(b)) = (request, backend_request)
            && !r.is_zero()
            && b > r
        {
            backend_request = None;
            read.ignore(BACKEND_REQUEST, &format!("longer than {REQUEST}"));
        }
        let limit = read.get(RETRY_LIMIT, |v| {
            v.parse::<u32>()
                .map_err(|_| format!("{v:?} is not a number of retries"))
        });
        let backoff = read.get(RETRY_BACKOFF, parse_duration);
        let (own, other) = match kind {
            RouteKind::HttpRoute => (RETRY_HTTP, RETRY_GRPC),
            RouteKind::GrpcRoute => (RETRY_GRPC, RETRY_HTTP),
        };
        if annotations.contains_key(other) {
            read.ignore(other, &format!("it is not read on a {kind}"));
        }
        let (http_codes, grpc_codes) = match kind {
            RouteKind::HttpRoute => (read.get(own, http_code_set), None),
            RouteKind::GrpcRoute => (None, read.get(own, grpc_code_set)),
        };
        let non_idempotent = read.get(RETRY_NON_IDEMPOTENT, |v| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("{v:?} is not \"true\" or \"false\"")),
        });
        let non_idempotent = non_idempotent.unwrap_or(false);
        let turned_on = limit.is_some() || http_codes.is_some() || grpc_codes.is_some();
        let attempts = limit.unwrap_or(1);
        let retry = (turned_on && attempts > 0).then(|| RetryPolicy {
            attempts,
            http_codes: match kind {
                RouteKind::HttpRoute => http_codes.unwrap_or_else(|| DEFAULT_HTTP_CODES.collect()),
                RouteKind::GrpcRoute => BTreeSet::new(),
            },
            grpc_codes: match kind {
                RouteKind::HttpRoute => BTreeSet::new(),
                RouteKind::GrpcRoute => grpc_codes.unwrap_or_else(|| DEFAULT_GRPC_CODES.into()),
            },
            backoff: backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
            non_idempotent,
        });
        RouteAnnotations {
            timeouts: Timeouts {
                request: nonzero(request),
                backend_request: nonzero(backend_request),
                idle,
            },
            retry,
            non_idempotent,
        }
    }
}

/// Reads annotations, noting each that is ignored and why.
struct Reader<'a> {
    annotations: &'a BTreeMap<String, String>,
    notes: &'a mut Vec<String>,
}

impl Reader<'_> {
    fn get<T>(&mut self, name: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let value = self.annotations.get(name)?;
        parse(value).map_err(|why| self.ignore(name, &why)).ok()
    }

    fn ignore(&mut self, name: &str, why: &str) {
        self.notes.push(format!("annotation {name} ignored: {why}"));
    }
}

/// `5xx`, `429`, `500-504`, comma-separated; every code from 400 to 599.
fn http_code_set(value: &str) -> Result<BTreeSet<u16>, String> {
    let mut codes = BTreeSet::new();
    for item in value.split(',').map(str::trim) {
        let bad = || format!("{item:?} is not a code, a range like 500-504, or 4xx/5xx");
        let range = match item {
            "4xx" => 400..=499,
            "5xx" => 500..=599,
            _ => match item.split_once('-') {
                Some((low, high)) => {
                    low.parse::<u16>().map_err(|_| bad())?
                        ..=high.parse::<u16>().map_err(|_| bad())?
                }
                None => {
                    let code = item.parse::<u16>().map_err(|_| bad())?;
                    code..=code
                }
            },
        };
        if range.is_empty() || *range.start() < 400 || *range.end() > 599 {
            return Err(format!("{item:?}: codes must be from 400 to 599"));
        }
        codes.extend(range);
    }
    Ok(codes)
}

/// gRPC status names (`unavailable`, `deadline-exceeded` or `DEADLINE_EXCEEDED`) or numbers,
/// comma-separated; OK (0) is not a failure.
fn grpc_code_set(value: &str) -> Result<BTreeSet<u32>, String> {
    let mut codes = BTreeSet::new();
    for item in value.split(',').map(str::trim) {
        let name = item.to_ascii_lowercase().replace('_', "-");
        let code = match GRPC_CODES.iter().find(|(n, _)| *n == name) {
            Some((_, code)) => *code,
            None => match item.parse::<u32>() {
                Ok(code @ 1..=16) => code,
                _ => {
                    return Err(format!(
                        "{item:?} is not a gRPC status name or number from 1 to 16"
                    ));
                }
            },
        };
        codes.insert(code);
    }
    Ok(codes)
}
