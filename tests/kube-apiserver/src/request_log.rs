//! A log of every request the double served, with the attributes the API server's authorizer
//! would have checked: who asked (the bearer token, as tests give each client its own), and the
//! request resolved the way Kubernetes' `RequestInfoFactory` resolves it for RBAC: resource
//! requests as verb (get, list, watch, create, update, patch, delete, deletecollection), API
//! group, resource, subresource, namespace and name (for list and watch, the name of a
//! `metadata.name` field selector); every other path as a non-resource request whose verb is the
//! lowercased HTTP method. Tests compare it with the project's RBAC rules.

use std::sync::{Arc, Mutex};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::Response,
};

use crate::rest::App;

/// What the authorizer sees of a resource request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceAttributes {
    pub verb: String,
    /// `""` for the core group.
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    /// e.g. `status`; empty when none.
    pub subresource: String,
    /// Empty for cluster-scoped requests and requests across all namespaces.
    pub namespace: String,
    /// Empty when the request names no object (list, watch without a `metadata.name` field
    /// selector, create by POST, deletecollection).
    pub name: String,
}

impl ResourceAttributes {
    /// `resource` or `resource/subresource`, as RBAC rules name it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// One request as served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The bearer token of the `Authorization` header, if any (the double authenticates nobody:
    /// tests give each client its own token to tell them apart).
    pub token: Option<String>,
    pub user_agent: Option<String>,
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// `None` for non-resource requests (discovery, `/version`, OIDC documents).
    pub resource: Option<ResourceAttributes>,
}

impl RequestRecord {
    /// The verb the authorizer checks first: the resource verb, or the lowercased HTTP method
    /// of a non-resource request.
    pub fn verb(&self) -> String {
        match &self.resource {
            Some(attributes) => attributes.verb.clone(),
            None => self.method.to_ascii_lowercase(),
        }
    }

    /// Every authorization the API server would have made for this request: the request's own,
    /// and for a server-side apply that created its object (201), `create` as well, checked with
    /// the object's name (the apply handler authorizes the creation separately).
    pub fn authorizations(&self) -> Vec<ResourceAttributes> {
        let Some(attributes) = &self.resource else {
            return Vec::new();
        };
        let mut checks = vec![attributes.clone()];
        if attributes.verb == "patch" && self.status == StatusCode::CREATED.as_u16() {
            checks.push(ResourceAttributes {
                verb: "create".into(),
                ..attributes.clone()
            });
        }
        checks
    }
}

/// The shared log.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<RequestRecord>>>);

impl RequestLog {
    pub fn push(&self, record: RequestRecord) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Middleware: serves the request, then logs it with its response status.
pub async fn record(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let (token, user_agent) = request_headers(&request);
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let response = next.run(request).await;
    app.requests.push(RequestRecord {
        token,
        user_agent,
        method: method.to_string(),
        resource: resolve(&method, &path, &query),
        path,
        query,
        status: response.status().as_u16(),
    });
    response
}

/// The bearer token and user agent of a request (a function of its own, so that no borrow of
/// the request, whose body is not `Sync`, lives across the middleware's await).
fn request_headers(request: &Request) -> (Option<String>, Option<String>) {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let token = header(header::AUTHORIZATION).and_then(|v| {
        v.strip_prefix("Bearer ")
            .map(|token| token.trim().to_string())
    });
    (token, header(header::USER_AGENT))
}

/// The value of `key` in a URL query string, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&high), Some(&low)) if hex(high).is_some() && hex(low).is_some() => {
                out.push(hex(high).unwrap_or_default() * 16 + hex(low).unwrap_or_default());
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (byte, _, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name an exact `metadata.name=` (or `==`) term of a field selector requires, as the API
/// server extracts it for list and watch authorization.
fn field_selector_name(selector: &str) -> Option<String> {
    selector.split(',').find_map(|term| {
        let term = term.trim();
        let value = term
            .strip_prefix("metadata.name==")
            .or_else(|| term.strip_prefix("metadata.name="))?;
        (!value.is_empty() && !value.contains('/') && value != "." && value != "..")
            .then(|| value.to_string())
    })
}

/// Resolves a request as Kubernetes' `RequestInfoFactory` does (without the deprecated
/// `/watch/` and `/proxy/` path prefixes, which sigil's clients do not use); `None` for a
/// non-resource request.
pub fn resolve(method: &Method, path: &str, query: &str) -> Option<ResourceAttributes> {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (api_group, api_version, mut rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let mut verb = match *method {
        Method::POST => "create",
        Method::GET | Method::HEAD => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "",
    }
    .to_string();
    let mut namespace = "";
    if rest.first() == Some(&"namespaces")
        && let Some(ns) = rest.get(1)
    {
        namespace = ns;
        // /namespaces/{ns}/{resource}/...; but /namespaces/{ns}[/status|/finalize] is the
        // namespace itself.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    let resource = rest.first().copied().unwrap_or_default();
    if resource.is_empty() {
        // /api/v1, /apis/{group}/{version}: discovery.
        return None;
    }
    let mut name = rest.get(1).copied().unwrap_or_default().to_string();
    let subresource = rest.get(2).copied().unwrap_or_default();
    if name.is_empty() && verb == "get" {
        verb = if matches!(query_value(query, "watch").as_deref(), Some("true" | "1")) {
            "watch".into()
        } else {
            "list".into()
        };
        if let Some(selected) =
            query_value(query, "fieldSelector").and_then(|s| field_selector_name(&s))
        {
            name = selected;
        }
    }
    if name.is_empty() && verb == "delete" {
        verb = "deletecollection".into();
    }
    Some(ResourceAttributes {
        verb,
        api_group: api_group.to_string(),
        api_version: api_version.to_string(),
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace: namespace.to_string(),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, path: &str, query: &str) -> Option<(String, String, String, String)> {
        resolve(&method, path, query).map(|a| {
            (
                a.verb.clone(),
                a.resource_path(),
                a.namespace,
                format!("{}|{}", a.api_group, a.name),
            )
        })
    }

    fn t(
        verb: &str,
        resource: &str,
        ns: &str,
        group_name: &str,
    ) -> Option<(String, String, String, String)> {
        Some((verb.into(), resource.into(), ns.into(), group_name.into()))
    }

    #[test]
    fn resolves_like_the_api_servers_request_info() {
        assert_eq!(
            attrs(Method::GET, "/api/v1/pods", ""),
            t("list", "pods", "", "|")
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/api/v1/pods",
                "watch=true&fieldSelector=spec.nodeName%3Dn1"
            ),
            t("watch", "pods", "", "|")
        );
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/a/secrets/s", ""),
            t("get", "secrets", "a", "|s")
        );
        assert_eq!(
            attrs(Method::POST, "/api/v1/namespaces/a/secrets", ""),
            t("create", "secrets", "a", "|")
        );
        assert_eq!(
            attrs(Method::PUT, "/api/v1/namespaces/a/secrets/s", ""),
            t("update", "secrets", "a", "|s")
        );
        assert_eq!(
            attrs(
                Method::PATCH,
                "/apis/sigil.dev/v1alpha1/namespaces/d/authorizationpolicies/p/status",
                "fieldManager=x"
            ),
            t("patch", "authorizationpolicies/status", "d", "sigil.dev|p")
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                "fieldSelector=metadata.name%3Dsigil-injector&watch=1"
            ),
            t(
                "watch",
                "mutatingwebhookconfigurations",
                "",
                "admissionregistration.k8s.io|sigil-injector"
            )
        );
        assert_eq!(
            attrs(Method::DELETE, "/api/v1/namespaces/a/pods", ""),
            t("deletecollection", "pods", "a", "|")
        );
        // The namespace itself, and its status.
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/a", ""),
            t("get", "namespaces", "a", "|a")
        );
        assert_eq!(
            attrs(Method::PUT, "/api/v1/namespaces/a/finalize", ""),
            t("update", "namespaces/finalize", "a", "|a")
        );
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces", ""),
            t("list", "namespaces", "", "|")
        );
        assert_eq!(
            attrs(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                ""
            ),
            t("create", "tokenreviews", "", "authentication.k8s.io|")
        );
        for discovery in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/sigil.dev",
            "/apis/sigil.dev/v1alpha1",
            "/version",
            "/openid/v1/jwks",
        ] {
            assert_eq!(attrs(Method::GET, discovery, ""), None, "{discovery}");
        }
    }

    #[test]
    fn apply_that_creates_is_also_a_create() {
        let record = |status| RequestRecord {
            token: None,
            user_agent: None,
            method: "PATCH".into(),
            path: "/api/v1/namespaces/a/configmaps/c".into(),
            query: "fieldManager=m".into(),
            status,
            resource: resolve(&Method::PATCH, "/api/v1/namespaces/a/configmaps/c", ""),
        };
        let verbs = |r: RequestRecord| -> Vec<(String, String)> {
            r.authorizations()
                .into_iter()
                .map(|a| (a.verb, a.name))
                .collect()
        };
        assert_eq!(verbs(record(200)), [("patch".to_string(), "c".to_string())]);
        assert_eq!(
            verbs(record(201)),
            [
                ("patch".to_string(), "c".to_string()),
                ("create".to_string(), "c".to_string())
            ]
        );
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value(
                "a=1&fieldSelector=metadata.name%3Dx%2Cb%3Dc",
                "fieldSelector"
            )
            .as_deref(),
            Some("metadata.name=x,b=c")
        );
        assert_eq!(
            field_selector_name("b=c,metadata.name=x").as_deref(),
            Some("x")
        );
        assert_eq!(field_selector_name("metadata.name!=x"), None);
        assert_eq!(query_value("watch", "watch").as_deref(), Some(""));
    }
}
