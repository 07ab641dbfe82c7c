//! The one request matcher: which rule of a route table a request takes, by the precedence the
//! agent already sorted ([`crate::compiled::RouteTable::order`]). The proxy routes with it,
//! the inbound rate limiter scopes limits with it, and `sigil inspect route` explains with it
//! ([`explain`]: the same code, keeping the reason of each mismatch). [`RouteMatch`] is what an
//! HTTPRoute and a GRPCRoute match have in common, so that one [`select_rule`] serves both.
//!
//! Matching rules: the path is the normalized path the proxy forwards; PathPrefix is
//! element-wise and ignores a trailing `/` in the prefix (`/` matches every path); header names
//! are case-insensitive, several values of one header are joined with `,` before matching
//! (RFC 9110 §5.3, which the Gateway API defers to); a query parameter matches on its first
//! occurrence, its name and value percent-decoded first (`%20` is a space; `+` stays `+`, as
//! outside HTML forms), so that a client's choice of escaping does not change the route;
//! regexes match the whole path or value (they are built anchored, [`crate::compiled::
//! anchored_regex`]). A gRPC request's `:path` is `/<service>/<method>`, the two matched
//! separately; a path of another shape matches only a GRPCRoute match that names neither.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName, Method};
use percent_encoding::percent_decode_str;

use crate::compiled::{
    GrpcMatch, HeaderMatch, HttpMatch, PathMatch, QueryMatch, RouteTable, Rule, ValueMatch,
};

/// What of a request matching looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The normalized path, without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The rule a request takes.
#[derive(Debug)]
pub struct Selected<'t> {
    pub rule: &'t Rule,
    pub rule_index: usize,
    /// Index into the table's `order`.
    pub entry: usize,
    /// The PathPrefix that matched, for URLRewrite/RequestRedirect `ReplacePrefixMatch`.
    pub matched_prefix: Option<&'t str>,
}

/// Why a request does not match one match: the first part of it that fails, in the order
/// path (or gRPC service, method), method, headers, query parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    Path {
        path: String,
        wanted: String,
    },
    Method {
        method: String,
        wanted: String,
    },
    HeaderMissing {
        name: String,
    },
    Header {
        name: String,
        value: String,
        wanted: String,
    },
    QueryMissing {
        name: String,
    },
    Query {
        name: String,
        value: String,
        wanted: String,
    },
    /// `None`: the path is not `/<service>/<method>`.
    GrpcService {
        service: Option<String>,
        wanted: String,
    },
    GrpcMethod {
        method: Option<String>,
        wanted: String,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Path { path, wanted } => write!(f, "path {path} does not match {wanted}"),
            Mismatch::Method { method, wanted } => write!(f, "method {method} is not {wanted}"),
            Mismatch::HeaderMissing { name } => write!(f, "header {name} is missing"),
            Mismatch::Header {
                name,
                value,
                wanted,
            } => write!(f, "header {name}: {value:?} does not match {name}{wanted}"),
            Mismatch::QueryMissing { name } => write!(f, "query parameter {name} is missing"),
            Mismatch::Query {
                name,
                value,
                wanted,
            } => write!(
                f,
                "query parameter {name}={value:?} does not match {name}{wanted}"
            ),
            Mismatch::GrpcService {
                service: Some(service),
                wanted,
            } => write!(f, "service {service} does not match service{wanted}"),
            Mismatch::GrpcMethod {
                method: Some(method),
                wanted,
            } => write!(f, "method {method} does not match method{wanted}"),
            Mismatch::GrpcService {
                service: None,
                wanted,
            } => write!(f, "path is not /<service>/<method>, wanted service{wanted}"),
            Mismatch::GrpcMethod {
                method: None,
                wanted,
            } => write!(f, "path is not /<service>/<method>, wanted method{wanted}"),
        }
    }
}

/// One entry of a table's `order` and whether the request matched it.
#[derive(Debug)]
pub struct EntryVerdict {
    /// Index into the table's `order`.
    pub entry: usize,
    pub rule_index: usize,
    /// `None`: matched.
    pub mismatch: Option<Mismatch>,
}

/// An HTTPRoute or GRPCRoute match, as [`select_rule`] and [`explain`] read it.
pub trait RouteMatch {
    /// Why `request` does not match this match; `None`: it matches.
    fn mismatch(&self, request: &RequestHead<'_>) -> Option<Mismatch>;
    /// The PathPrefix this match matched, for URLRewrite/RequestRedirect `ReplacePrefixMatch`.
    fn matched_prefix(&self) -> Option<&str>;
}

impl RouteMatch for HttpMatch {
    fn mismatch(&self, request: &RequestHead<'_>) -> Option<Mismatch> {
        mismatch_http(self, request)
    }

    fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Prefix(prefix)) => Some(prefix.as_str()),
            _ => None,
        }
    }
}

/// A gRPC request's match; a GRPCRoute has no path prefix.
impl RouteMatch for GrpcMatch {
    fn mismatch(&self, request: &RequestHead<'_>) -> Option<Mismatch> {
        mismatch_grpc(self, request)
    }

    fn matched_prefix(&self) -> Option<&str> {
        None
    }
}

/// The first rule of `table` (in precedence order) that `request` matches.
pub fn select_rule<'t, M: RouteMatch>(
    table: &'t RouteTable<M>,
    request: &RequestHead<'_>,
) -> Option<Selected<'t>> {
    let (entry, (rule_index, m)) = table
        .order
        .iter()
        .enumerate()
        .find(|(_, (_, m))| m.mismatch(request).is_none())?;
    Some(Selected {
        rule: table.rules.get(*rule_index)?,
        rule_index: *rule_index,
        entry,
        matched_prefix: m.matched_prefix(),
    })
}

/// Every entry of `table` in precedence order, each with why `request` does not match it;
/// [`select_rule`] takes the first without a mismatch.
pub fn explain<M: RouteMatch>(
    table: &RouteTable<M>,
    request: &RequestHead<'_>,
) -> Vec<EntryVerdict> {
    table
        .order
        .iter()
        .enumerate()
        .map(|(entry, (rule_index, m))| EntryVerdict {
            entry,
            rule_index: *rule_index,
            mismatch: m.mismatch(request),
        })
        .collect()
}

/// Whether `request` matches one HTTPRoute match.
pub fn matches_http(m: &HttpMatch, request: &RequestHead<'_>) -> bool {
    mismatch_http(m, request).is_none()
}

/// Whether the gRPC `request` matches one GRPCRoute match.
pub fn matches_grpc(m: &GrpcMatch, request: &RequestHead<'_>) -> bool {
    mismatch_grpc(m, request).is_none()
}

/// Why `request` does not match `m`; `None` when it does.
pub fn mismatch_http(m: &HttpMatch, request: &RequestHead<'_>) -> Option<Mismatch> {
    if let Some(path_match) = &m.path
        && !path_matches(path_match, request.path)
    {
        return Some(Mismatch::Path {
            path: request.path.to_owned(),
            wanted: path_match.to_string(),
        });
    }
    if let Some(method) = &m.method
        && method != request.method
    {
        return Some(Mismatch::Method {
            method: request.method.to_string(),
            wanted: method.to_string(),
        });
    }
    if let Some(mismatch) = headers_mismatch(&m.headers, request.headers) {
        return Some(mismatch);
    }
    m.query
        .iter()
        .find_map(|query| query_mismatch(query, request.query))
}

/// Why the gRPC `request` does not match `m`; `None` when it does.
pub fn mismatch_grpc(m: &GrpcMatch, request: &RequestHead<'_>) -> Option<Mismatch> {
    let call = grpc_call(request.path);
    if let Some(wanted) = &m.service {
        let service = call.map(|(service, _)| service);
        if !service.is_some_and(|service| value_matches(wanted, service)) {
            return Some(Mismatch::GrpcService {
                service: service.map(str::to_owned),
                wanted: wanted.to_string(),
            });
        }
    }
    if let Some(wanted) = &m.method {
        let method = call.map(|(_, method)| method);
        if !method.is_some_and(|method| value_matches(wanted, method)) {
            return Some(Mismatch::GrpcMethod {
                method: method.map(str::to_owned),
                wanted: wanted.to_string(),
            });
        }
    }
    headers_mismatch(&m.headers, request.headers)
}

/// Whether a request is gRPC: content-type `application/grpc` or `application/grpc+...`
/// (`;` parameters allowed), compared case-insensitively as media types are.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let bytes = content_type.as_bytes();
    bytes.len() >= GRPC.len()
        && bytes[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(bytes.get(GRPC.len()), None | Some(b'+' | b';'))
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Exact(exact) => path == exact,
        PathMatch::Prefix(prefix) => {
            let prefix = prefix.trim_end_matches('/');
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        }
        PathMatch::Regex(regex) => regex.is_match(path),
    }
}

fn value_matches(m: &ValueMatch, value: &str) -> bool {
    match m {
        ValueMatch::Exact(exact) => value == exact,
        ValueMatch::Regex(regex) => regex.is_match(value),
    }
}

fn headers_mismatch(wanted: &[HeaderMatch], headers: &HeaderMap) -> Option<Mismatch> {
    wanted.iter().find_map(|m| {
        let Some(value) = header_value(headers, &m.name) else {
            return Some(Mismatch::HeaderMissing {
                name: m.name.to_string(),
            });
        };
        (!value_matches(&m.value, &value)).then(|| Mismatch::Header {
            name: m.name.to_string(),
            value: value.into_owned(),
            wanted: m.value.to_string(),
        })
    })
}

/// Every value of header `name` joined with `,`; `None` when absent. A value that is not
/// UTF-8 (obs-text) is taken lossily: it can only match a regex that accepts U+FFFD.
fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = String::from_utf8_lossy(values.next()?.as_bytes());
    let rest: Vec<_> = values.collect();
    if rest.is_empty() {
        return Some(first);
    }
    let mut joined = first.into_owned();
    for value in rest {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

fn query_mismatch(m: &QueryMatch, query: Option<&str>) -> Option<Mismatch> {
    let Some(value) = query_value(query, &m.name) else {
        return Some(Mismatch::QueryMissing {
            name: m.name.clone(),
        });
    };
    (!value_matches(&m.value, &value)).then(|| Mismatch::Query {
        name: m.name.clone(),
        value: value.into_owned(),
        wanted: m.value.to_string(),
    })
}

/// The percent-decoded value of the first parameter named `name` (decoded too) in `query`; a
/// parameter without `=` has the empty value.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| percent_decode_str(key).decode_utf8_lossy() == name)
        .map(|(_, value)| percent_decode_str(value).decode_utf8_lossy())
}

/// `(service, method)` of a gRPC `:path` `/<service>/<method>`, both non-empty.
fn grpc_call(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

#[cfg(test)]
mod tests;
