//! The one request matcher: which rule of a route table a request takes, by the precedence the
//! agent already sorted ([`crate::compiled::HttpRouteTable::order`]). The proxy routes with it,
//! the inbound rate limiter scopes limits with it, and `sigil inspect route` explains with it.
//!
//! Matching rules: the path is the normalized path the proxy forwards; PathPrefix is
//! element-wise and ignores a trailing `/` in the prefix; header names are case-insensitive,
//! several values of one header are joined with `,` before matching; a query parameter matches
//! on its first occurrence; regexes match the whole path or value.

use http::{HeaderMap, Method};

use crate::compiled::{GrpcMatch, GrpcRouteTable, GrpcRule, HttpMatch, HttpRouteTable, HttpRule};

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
pub struct Selected<'t, R> {
    pub rule: &'t R,
    pub rule_index: usize,
    /// Index into the table's `order`.
    pub entry: usize,
    /// The PathPrefix that matched, for URLRewrite/RequestRedirect `ReplacePrefixMatch`.
    pub matched_prefix: Option<&'t str>,
}

/// The first rule of `table` (in precedence order) that `request` matches.
pub fn select_http<'t>(
    table: &'t HttpRouteTable,
    request: &RequestHead<'_>,
) -> Option<Selected<'t, HttpRule>> {
    let _ = (table, request);
    unimplemented!("contract: route-core helper")
}

/// The first rule of `table` (in precedence order) that the gRPC `request` matches.
pub fn select_grpc<'t>(
    table: &'t GrpcRouteTable,
    request: &RequestHead<'_>,
) -> Option<Selected<'t, GrpcRule>> {
    let _ = (table, request);
    unimplemented!("contract: route-core helper")
}

/// Whether `request` matches one HTTPRoute match.
pub fn matches_http(m: &HttpMatch, request: &RequestHead<'_>) -> bool {
    let _ = (m, request);
    unimplemented!("contract: route-core helper")
}

/// Whether the gRPC `request` matches one GRPCRoute match.
pub fn matches_grpc(m: &GrpcMatch, request: &RequestHead<'_>) -> bool {
    let _ = (m, request);
    unimplemented!("contract: route-core helper")
}

/// Whether a request is gRPC: content-type `application/grpc` or `application/grpc+...`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let _ = headers;
    unimplemented!("contract: route-core helper")
}
