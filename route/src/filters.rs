//! What filters do to a request or response, as pure functions over `http` types, so that the
//! proxy applies them and `sigil inspect route` prints their result with the same code.

use http::HeaderMap;

use crate::compiled::{HeaderModifier, PathModifier, Redirect};

/// RequestHeaderModifier / ResponseHeaderModifier: set, then add, then remove (Gateway API).
pub fn modify_headers(modifier: &HeaderModifier, headers: &mut HeaderMap) {
    let _ = (modifier, headers);
    unimplemented!("contract: route-core helper")
}

/// The path after a URLRewrite or redirect path modifier. `matched_prefix` is the PathPrefix the
/// request matched (`ReplacePrefixMatch` replaces it element-wise: `/foo` -> `/xyz` turns
/// `/foo/bar` into `/xyz/bar` and `/foo` into `/xyz`).
pub fn rewrite_path(modifier: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    let _ = (modifier, path, matched_prefix);
    unimplemented!("contract: route-core helper")
}

/// What a request is redirected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectTarget {
    pub status: http::StatusCode,
    /// The `Location` header's value.
    pub location: String,
}

/// The request as it arrived, for a redirect: scheme (`http` in the mesh), Host without port,
/// the port it was sent to, path and query.
#[derive(Clone, Copy, Debug)]
pub struct RequestUrl<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The Location of a RequestRedirect, with the Gateway API's port rules (the port is omitted
/// when it is the scheme's default; an unset port follows the scheme when the scheme changes).
pub fn redirect(
    redirect: &Redirect,
    request: &RequestUrl<'_>,
    matched_prefix: Option<&str>,
) -> RedirectTarget {
    let _ = (redirect, request, matched_prefix);
    unimplemented!("contract: route-core helper")
}
