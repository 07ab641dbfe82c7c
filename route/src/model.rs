//! The objects as users write them: Gateway API `HTTPRoute`, `GRPCRoute` and `ReferenceGrant`
//! (`gateway.networking.k8s.io`, v1.6 standard channel plus `HTTPRoute` `retry` from the
//! experimental channel) and sigil's `BackendPolicy` and `RateLimitPolicy`
//! (`sigil.dev/v1alpha1`), as serde structs for the fields sigil reads (unknown fields are
//! ignored, as the API server would prune them). Read from Kubernetes' JSON or from the policy
//! file's YAML documents.
//!
//! Defaults the CRDs apply (the API server writes them; the policy file does not have them) are
//! applied here, so both sources read the same: path match `PathPrefix /`, header and query
//! matches `Exact`, gRPC method match `Exact`, backendRef `group: ""`/`kind: Service`/`weight: 1`,
//! parentRef `group: gateway.networking.k8s.io`/`kind: Gateway`, redirect status 302, mirror
//! fraction denominator 100. Values are kept as written (durations as strings, filter types as
//! strings): [`crate::validate`] judges them, so that a bad value drops one rule with a
//! condition instead of making the whole object unreadable.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The API group of the Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The API group and version of sigil's own kinds.
pub const SIGIL_API_VERSION: &str = "sigil.dev/v1alpha1";

/// Why an object could not be read, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {namespace}/{name}: {path}: {message}")]
    Field {
        kind: String,
        namespace: String,
        name: String,
        path: String,
        message: String,
    },
    #[error("object without metadata.{0}")]
    Metadata(&'static str),
}

/// What identifies an object, and the metadata rules depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    /// For precedence ties (older first) and `observedGeneration`; absent in files.
    pub creation_timestamp: Option<k8s_openapi::jiff::Timestamp>,
    pub generation: Option<i64>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Meta {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Orders objects oldest first (objects with a creation timestamp before those without,
    /// as in a file), then by `<namespace>/<name>`: the Gateway API's tie-break between routes
    /// and GEP-713's between conflicting policies.
    pub fn age_order(&self, other: &Meta) -> std::cmp::Ordering {
        let rank = |m: &Meta| (m.creation_timestamp.is_none(), m.creation_timestamp);
        rank(self)
            .cmp(&rank(other))
            .then_with(|| self.namespace.cmp(&other.namespace))
            .then_with(|| self.name.cmp(&other.name))
    }
}

/// The metadata fields sigil reads; everything else the API server writes is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    generation: Option<i64>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// One object of a kind this crate reads.
#[derive(Clone, Debug)]
pub enum RouteObject {
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    ReferenceGrant(ReferenceGrant),
    BackendPolicy(BackendPolicyObject),
    RateLimitPolicy(RateLimitPolicyObject),
}

impl RouteObject {
    /// Reads an object from its JSON form (a Kubernetes object, or a YAML document turned into
    /// JSON). `Ok(None)` when `apiVersion`/`kind` is none of this crate's kinds.
    pub fn from_json(value: serde_json::Value) -> Result<Option<RouteObject>, ModelError> {
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind = value.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            return Ok(None);
        };
        let gateway = |versions: &[&str]| {
            api_version
                .strip_prefix(GATEWAY_GROUP)
                .and_then(|v| v.strip_prefix('/'))
                .is_some_and(|v| versions.contains(&v))
        };
        let sigil = api_version == SIGIL_API_VERSION;
        let object = match kind {
            // v1beta1 HTTPRoute is the same schema, still served by v1.6 clusters.
            "HTTPRoute" if gateway(&["v1", "v1beta1"]) => {
                let (meta, spec) = read(kind, &value)?;
                RouteObject::HttpRoute(HttpRoute { meta, spec })
            }
            "GRPCRoute" if gateway(&["v1"]) => {
                let (meta, spec) = read(kind, &value)?;
                RouteObject::GrpcRoute(GrpcRoute { meta, spec })
            }
            "ReferenceGrant" if gateway(&["v1beta1", "v1"]) => {
                let (meta, spec) = read(kind, &value)?;
                RouteObject::ReferenceGrant(ReferenceGrant { meta, spec })
            }
            "BackendPolicy" if sigil => {
                let (meta, spec) = read(kind, &value)?;
                RouteObject::BackendPolicy(BackendPolicyObject { meta, spec })
            }
            "RateLimitPolicy" if sigil => {
                let (meta, spec) = read(kind, &value)?;
                RouteObject::RateLimitPolicy(RateLimitPolicyObject { meta, spec })
            }
            _ => return Ok(None),
        };
        Ok(Some(object))
    }
}

/// The metadata and spec of one object; a missing or null `spec` is an empty one, as Kubernetes
/// stores an object written without it.
fn read<S: DeserializeOwned + Default>(kind: &str, value: &Value) -> Result<(Meta, S), ModelError> {
    let field_error = |meta: Option<&RawMeta>, path: String, message: String| {
        let get = |f: fn(&RawMeta) -> &Option<String>| {
            meta.and_then(|m| f(m).clone()).unwrap_or_default()
        };
        ModelError::Field {
            kind: kind.to_owned(),
            namespace: get(|m| &m.namespace),
            name: get(|m| &m.name),
            path,
            message,
        }
    };
    let raw: RawMeta = match value.get("metadata") {
        Some(metadata) => serde_path_to_error::deserialize(metadata).map_err(|e| {
            field_error(
                None,
                format!("metadata.{}", e.path()),
                e.into_inner().to_string(),
            )
        })?,
        None => return Err(ModelError::Metadata("name")),
    };
    let name = raw.name.clone().filter(|n| !n.is_empty());
    let name = name.ok_or(ModelError::Metadata("name"))?;
    let namespace = raw.namespace.clone().filter(|n| !n.is_empty());
    let namespace = namespace.ok_or(ModelError::Metadata("namespace"))?;
    let creation_timestamp = match &raw.creation_timestamp {
        Some(t) => Some(t.parse::<k8s_openapi::jiff::Timestamp>().map_err(|e| {
            field_error(
                Some(&raw),
                "metadata.creationTimestamp".to_owned(),
                e.to_string(),
            )
        })?),
        None => None,
    };
    let spec = match value.get("spec") {
        None | Some(Value::Null) => S::default(),
        Some(spec) => serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{path}")
            };
            field_error(Some(&raw), path, e.into_inner().to_string())
        })?,
    };
    let meta = Meta {
        namespace,
        name,
        creation_timestamp,
        generation: raw.generation,
        annotations: raw.annotations.unwrap_or_default(),
    };
    Ok((meta, spec))
}

/// Every object the agent or the CA knows, the input of [`crate::compile`] and
/// [`crate::validate`].
#[derive(Clone, Debug, Default)]
pub struct RouteObjects {
    pub http_routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
    pub reference_grants: Vec<ReferenceGrant>,
    pub backend_policies: Vec<BackendPolicyObject>,
    pub rate_limit_policies: Vec<RateLimitPolicyObject>,
}

impl FromIterator<RouteObject> for RouteObjects {
    fn from_iter<I: IntoIterator<Item = RouteObject>>(objects: I) -> RouteObjects {
        let mut all = RouteObjects::default();
        for object in objects {
            match object {
                RouteObject::HttpRoute(o) => all.http_routes.push(o),
                RouteObject::GrpcRoute(o) => all.grpc_routes.push(o),
                RouteObject::ReferenceGrant(o) => all.reference_grants.push(o),
                RouteObject::BackendPolicy(o) => all.backend_policies.push(o),
                RouteObject::RateLimitPolicy(o) => all.rate_limit_policies.push(o),
            }
        }
        all
    }
}

// ---- Gateway API: shared types (apis/v1/shared_types.go, object_reference_types.go) ----

fn core_group() -> String {
    String::new()
}
fn service_kind() -> String {
    "Service".to_owned()
}
fn gateway_group() -> String {
    GATEWAY_GROUP.to_owned()
}
fn gateway_kind() -> String {
    "Gateway".to_owned()
}

/// Whether `group`/`kind` name a core Service (`""` or `core`, as the Gateway API accepts).
pub fn is_core_service(group: &str, kind: &str) -> bool {
    (group.is_empty() || group == "core") && kind == "Service"
}

/// `ParentReference`: a Service (GAMMA) or someone's Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default = "gateway_group")]
    pub group: String,
    #[serde(default = "gateway_kind")]
    pub kind: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

impl ParentReference {
    pub fn is_service(&self) -> bool {
        is_core_service(&self.group, &self.kind)
    }
}

/// `BackendObjectReference`, the target of a backendRef or a mirror.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectReference {
    #[serde(default = "core_group")]
    pub group: String,
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Required when the target is a Service (a CEL rule of the CRD).
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_weight() -> i32 {
    1
}

/// `HTTPBackendRef` and `GRPCBackendRef`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(flatten)]
    pub target: BackendObjectReference,
    /// 0..=1000000; 0: this backend gets no requests.
    #[serde(default = "default_weight")]
    pub weight: i32,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

/// `HTTPHeader`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct HeaderNameValue {
    pub name: String,
    pub value: String,
}

/// `HTTPHeaderFilter`: set, then add, then remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct HeaderFilter {
    #[serde(default)]
    pub set: Vec<HeaderNameValue>,
    #[serde(default)]
    pub add: Vec<HeaderNameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

fn default_denominator() -> i32 {
    100
}

/// `Fraction`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Fraction {
    pub numerator: i32,
    #[serde(default = "default_denominator")]
    pub denominator: i32,
}

/// `HTTPRequestMirrorFilter`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorFilter {
    pub backend_ref: BackendObjectReference,
    #[serde(default)]
    pub percent: Option<i32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

/// `HTTPPathModifier`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

fn default_redirect_status() -> i32 {
    302
}

/// `HTTPRequestRedirectFilter`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectFilter {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default = "default_redirect_status")]
    pub status_code: i32,
}

/// `HTTPURLRewriteFilter`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RewriteFilter {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

/// `LocalObjectReference` of an `ExtensionRef` filter: recognised so that it can be refused.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LocalObjectReference {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// `HTTPRouteFilter`, `GRPCRouteFilter` and the filters of a backendRef: `type` names which
/// field applies. Kept as a string so that a type sigil does not implement (CORS,
/// ExternalAuth, ExtensionRef) is refused by validation for its rule alone.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub request_mirror: Option<MirrorFilter>,
    #[serde(default)]
    pub request_redirect: Option<RedirectFilter>,
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<RewriteFilter>,
    #[serde(default)]
    pub extension_ref: Option<LocalObjectReference>,
}

fn exact() -> String {
    "Exact".to_owned()
}

/// `HTTPHeaderMatch`, `HTTPQueryParamMatch` and `GRPCHeaderMatch`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValueMatchSpec {
    /// `Exact` or `RegularExpression`.
    #[serde(rename = "type", default = "exact")]
    pub type_: String,
    pub name: String,
    pub value: String,
}

// ---- HTTPRoute (apis/v1/httproute_types.go) ----

#[derive(Clone, Debug)]
pub struct HttpRoute {
    pub meta: Meta,
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Not used for Service parents (the parent is the Service's address, not a Host).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Empty: one rule matching every request with no backend (the CRD's default).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Empty: one match, PathPrefix `/` (the CRD's default).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Experimental channel in v1.6 (pruned by the standard CRDs).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: HttpPathMatch,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub method: Option<String>,
}

fn path_prefix() -> String {
    "PathPrefix".to_owned()
}
fn root() -> String {
    "/".to_owned()
}

/// `HTTPPathMatch`: `Exact`, `PathPrefix` (default) or `RegularExpression`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct HttpPathMatch {
    #[serde(rename = "type", default = "path_prefix")]
    pub type_: String,
    #[serde(default = "root")]
    pub value: String,
}

impl Default for HttpPathMatch {
    fn default() -> HttpPathMatch {
        HttpPathMatch {
            type_: path_prefix(),
            value: root(),
        }
    }
}

/// `HTTPRouteTimeouts`: GEP-2257 durations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// `HTTPRouteRetry` (GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<i32>,
    #[serde(default)]
    pub attempts: Option<i32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

// ---- GRPCRoute (apis/v1/grpcroute_types.go) ----

#[derive(Clone, Debug)]
pub struct GrpcRoute {
    pub meta: Meta,
    pub spec: GrpcRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Empty: every request.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
}

/// `GRPCMethodMatch`: `Exact` (default) or `RegularExpression`; at least one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default = "exact")]
    pub type_: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

// ---- ReferenceGrant (apis/v1beta1/referencegrant_types.go) ----

#[derive(Clone, Debug)]
pub struct ReferenceGrant {
    pub meta: Meta,
    pub spec: ReferenceGrantSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ReferenceGrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ReferenceGrantTo {
    pub group: String,
    pub kind: String,
    /// Absent: every object of the kind.
    #[serde(default)]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant lets a `from_kind` object in `from_namespace` refer to the core
    /// Service `service` in the grant's namespace.
    pub fn permits_service(&self, from_kind: &str, from_namespace: &str, service: &str) -> bool {
        let from = self.spec.from.iter().any(|f| {
            f.group == GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_namespace
        });
        let to = self.spec.to.iter().any(|t| {
            is_core_service(&t.group, &t.kind) && t.name.as_deref().is_none_or(|n| n == service)
        });
        from && to
    }
}

// ---- sigil.dev/v1alpha1 ----

/// GEP-713 `LocalPolicyTargetReference` (plus `sectionName`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug)]
pub struct BackendPolicyObject {
    pub meta: Meta,
    pub spec: BackendPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicySpec {
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Absent: no ejection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Absent: the defaults.
    #[serde(default)]
    pub retry_budget: Option<RetryBudgetSpec>,
}

/// Istio's DestinationRule `outlierDetection` names, plus Envoy's `maxEjectionTime` and
/// `failurePercentage`; absent fields take [`crate::compiled::OutlierDetection::default`]'s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub min_health_percent: Option<u32>,
    #[serde(default)]
    pub failure_percentage: Option<FailurePercentageSpec>,
}

/// Envoy's failure-percentage ejection; absent fields take Envoy's defaults (85, 50, 5).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailurePercentageSpec {
    #[serde(default)]
    pub threshold: Option<u32>,
    #[serde(default)]
    pub request_volume: Option<u32>,
    #[serde(default)]
    pub minimum_hosts: Option<u32>,
}

/// GEP-3388 names; absent fields take [`crate::compiled::RetryBudget::default`]'s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub min_retry_rate: Option<RetryRateSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct RetryRateSpec {
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
}

#[derive(Clone, Debug)]
pub struct RateLimitPolicyObject {
    pub meta: Meta,
    pub spec: RateLimitPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// Services (optionally one port by `sectionName`) or HTTPRoutes/GRPCRoutes in the
    /// policy's namespace.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub total: Option<LimitSpec>,
    #[serde(default)]
    pub identity: Option<LimitSpec>,
    #[serde(default)]
    pub overrides: Vec<OverrideSpec>,
}

/// `requests` per `period` (default 1s), in a bucket of `burst` (default `requests`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct LimitSpec {
    pub requests: u32,
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct OverrideSpec {
    #[serde(flatten)]
    pub limit: LimitSpec,
    #[serde(default)]
    pub clients: Vec<ClientRef>,
}

/// One client of an override: `serviceAccount: <namespace>/<name>` or `spiffeId: spiffe://...`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientRef {
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub spiffe_id: Option<String>,
}

// ---- values written as strings ----

/// A GEP-2257 duration (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`, e.g. `1h30m`, `250ms`, `0s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10s, 250ms or 1m30s (GEP-2257)");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(number).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests;
