//! What filters do to a request or response, as pure functions over `http` types, so that the
//! proxy applies them and `sigil inspect route` prints their result with the same code.
//!
//! The rules are the Gateway API's (`apis/v1/httproute_types.go`): a header modifier sets
//! (replacing every value), then adds (appending a value), then removes, names
//! case-insensitive; `ReplacePrefixMatch` replaces the matched prefix element-wise as the table
//! of `HTTPPathModifier.ReplacePrefixMatch` says; a redirect's port follows its scheme and is
//! left out of `Location` when it is the scheme's well-known one.

use http::HeaderMap;

use crate::compiled::{HeaderModifier, PathModifier, Redirect};

/// RequestHeaderModifier / ResponseHeaderModifier: set, then add, then remove (Gateway API).
pub fn modify_headers(modifier: &HeaderModifier, headers: &mut HeaderMap) {
    for (name, value) in &modifier.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &modifier.add {
        headers.append(name.clone(), value.clone());
    }
    for name in &modifier.remove {
        headers.remove(name);
    }
}

/// The path after a URLRewrite or redirect path modifier. `matched_prefix` is the PathPrefix the
/// request matched (`ReplacePrefixMatch` replaces it element-wise: `/foo` -> `/xyz` turns
/// `/foo/bar` into `/xyz/bar` and `/foo` into `/xyz`; a trailing `/` of either is ignored, and
/// the result is never empty nor starts with `//`). Without a matched prefix (validation keeps
/// `ReplacePrefixMatch` to PathPrefix matches) the path is left as it is.
pub fn rewrite_path(modifier: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(full) => full.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let Some(rest) = matched_prefix.and_then(|prefix| {
                path.strip_prefix(prefix.trim_end_matches('/'))
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            }) else {
                return path.to_owned();
            };
            let rewritten = format!("{}{rest}", replacement.trim_end_matches('/'));
            if rewritten.is_empty() {
                "/".to_owned()
            } else {
                rewritten
            }
        }
    }
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
///
/// `HTTPRequestRedirectFilter.Port`: without a port, a redirect that names a scheme goes to
/// that scheme's well-known port (http 80, https 443; another scheme keeps the request's port),
/// one that does not goes to the port the request was sent to (a Gateway's listener port; in
/// the mesh, the Service port). The query is kept.
pub fn redirect(
    redirect: &Redirect,
    request: &RequestUrl<'_>,
    matched_prefix: Option<&str>,
) -> RedirectTarget {
    let scheme = redirect.scheme.as_deref().unwrap_or(request.scheme);
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => port,
        (None, Some(scheme)) => well_known_port(scheme).unwrap_or(request.port),
        (None, None) => request.port,
    };
    let host = redirect.hostname.as_deref().unwrap_or(request.host);
    let path = match &redirect.path {
        Some(modifier) => rewrite_path(modifier, request.path, matched_prefix),
        None => request.path.to_owned(),
    };
    let mut location = format!("{scheme}://");
    if host.contains(':') && !host.starts_with('[') {
        location.push_str(&format!("[{host}]"));
    } else {
        location.push_str(host);
    }
    if well_known_port(scheme) != Some(port) {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(query) = request.query {
        location.push('?');
        location.push_str(query);
    }
    RedirectTarget {
        status: redirect.status,
        location,
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
