//! The objects as users write them: Gateway API `HTTPRoute`, `GRPCRoute` and `ReferenceGrant`
//! (`gateway.networking.k8s.io`, v1.6 standard channel plus `HTTPRoute` `retry` from the
//! experimental channel) and sigil's `BackendPolicy` and `RateLimitPolicy`
//! (`sigil.dev/v1alpha1`), as serde structs for the fields sigil reads (unknown fields are
//! ignored, as the API server would prune them). Read from Kubernetes' JSON or from the policy
//! file's YAML documents.

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
        let _ = value;
        unimplemented!("contract: route-core helper")
    }
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

// The route-core helper defines these (metadata as `Meta`, spec as serde structs).
#[derive(Clone, Debug)]
pub struct HttpRoute {
    pub meta: Meta,
}
#[derive(Clone, Debug)]
pub struct GrpcRoute {
    pub meta: Meta,
}
#[derive(Clone, Debug)]
pub struct ReferenceGrant {
    pub meta: Meta,
}
#[derive(Clone, Debug)]
pub struct BackendPolicyObject {
    pub meta: Meta,
}
#[derive(Clone, Debug)]
pub struct RateLimitPolicyObject {
    pub meta: Meta,
}
