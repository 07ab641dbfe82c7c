//! Policy objects as the Kubernetes API serves them: the API resource of each kind, and what
//! sigil reads of a stored object (its [`Envelope`] and `spec`). The node agent, the CA and
//! `sigil inspect policy` read the cluster through these, so they read the same object.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use crate::envelope::{Envelope, GROUP, Kind, VERSION};

/// The API resource of `kind` (`<plural>.sigil.dev`, [`VERSION`]).
pub fn api_resource(kind: Kind) -> ApiResource {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, kind.name());
    ApiResource::from_gvk_with_plural(&gvk, kind.plural())
}

/// The envelope of a stored object of `kind`; None for one without a namespace or name, which
/// the namespaced resources do not have.
pub fn envelope(kind: Kind, object: &DynamicObject) -> Option<Envelope> {
    let meta = &object.metadata;
    Some(Envelope {
        // As the API server writes it (RFC 3339, whole seconds, UTC).
        creation_timestamp: meta
            .creation_timestamp
            .as_ref()
            .and_then(|time| serde_json::to_value(time).ok())
            .and_then(|time| time.as_str().map(str::to_owned)),
        uid: meta.uid.clone(),
        ..Envelope::new(kind, meta.namespace.clone()?, meta.name.clone()?)
    })
}

/// The object's `spec` (null when it has none).
pub fn spec(object: &DynamicObject) -> &Value {
    object.data.get("spec").unwrap_or(&Value::Null)
}
