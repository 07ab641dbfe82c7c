//! Kubernetes `Status` objects: the one error type every REST operation of the double returns,
//! rendered exactly as the API server renders failures (`kind: Status`, `status: Failure`,
//! `reason`, `code`, `details`), plus the `Success` Status some deletes return.

use std::fmt;

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// A resource name qualified by its API group, as Kubernetes prints it in messages:
/// `pods`, `deployments.apps`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    /// API group; empty for the core group.
    pub group: String,
    /// Plural resource name (`pods`, `secrets`, `widgets`).
    pub resource: String,
}

impl GroupResource {
    pub fn new(group: &str, resource: &str) -> Self {
        Self {
            group: group.to_string(),
            resource: resource.to_string(),
        }
    }
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// One field-level problem of an `Invalid` (422) failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldCause {
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: &'static str,
    /// JSON path of the field, e.g. `metadata.name`.
    pub field: String,
    /// What is wrong, already prefixed as Kubernetes does (`Invalid value: "x": ...`).
    pub message: String,
}

impl FieldCause {
    pub fn invalid(field: &str, value: &str, why: &str) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }

    pub fn required(field: &str, why: &str) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message: format!("Required value: {why}"),
        }
    }
}

/// A failed API request, one variant per Kubernetes `StatusReason` the double produces.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{resource} {name:?} not found")]
    NotFound {
        resource: GroupResource,
        name: String,
    },
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        resource: GroupResource,
        name: String,
    },
    /// Optimistic-concurrency or precondition failure.
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {detail}")]
    Conflict {
        resource: GroupResource,
        name: String,
        detail: String,
    },
    /// Validation failure; `qualified_kind` is `Pod` or `Deployment.apps`.
    #[error("{qualified_kind} {name:?} is invalid: {}", render_causes(.causes))]
    Invalid {
        group: String,
        kind: String,
        qualified_kind: String,
        name: String,
        causes: Vec<FieldCause>,
    },
    #[error("{0}")]
    BadRequest(String),
    /// A path the server does not serve at all.
    #[error("the server could not find the requested resource")]
    PathNotFound,
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// HTTP 410: a resourceVersion or continue token older than the retained history.
    #[error("{0}")]
    Expired(String),
    /// HTTP 504 with a `ResourceVersionTooLarge` cause: a resourceVersion from the future.
    #[error("Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion { requested: u64, current: u64 },
    #[error("{0}")]
    Internal(String),
}

fn render_causes(causes: &[FieldCause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    match parts.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    }
}

impl ApiError {
    pub fn not_found(resource: &GroupResource, name: &str) -> Self {
        Self::NotFound {
            resource: resource.clone(),
            name: name.to_string(),
        }
    }

    /// The stale-resourceVersion conflict, worded as the API server words it.
    pub fn modified(resource: &GroupResource, name: &str) -> Self {
        Self::Conflict {
            resource: resource.clone(),
            name: name.to_string(),
            detail: "the object has been modified; please apply your changes to the latest version and try again".into(),
        }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } | Self::PathNotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Expired(_) => StatusCode::GONE,
            Self::TooLargeResourceVersion { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::PathNotFound => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Expired(_) => "Expired",
            Self::TooLargeResourceVersion { .. } => "Timeout",
            Self::Internal(_) => "InternalError",
        }
    }

    fn details(&self) -> Option<Value> {
        let named = |resource: &GroupResource, name: &str| {
            // Kubernetes puts the plural resource, not the Kind, in details.kind here.
            let mut details = json!({ "name": name, "kind": resource.resource });
            if !resource.group.is_empty() {
                details["group"] = json!(resource.group);
            }
            details
        };
        match self {
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. } => Some(named(resource, name)),
            Self::Invalid {
                group,
                kind,
                name,
                causes,
                ..
            } => {
                let causes: Vec<Value> = causes
                    .iter()
                    .map(|c| json!({ "reason": c.reason, "message": c.message, "field": c.field }))
                    .collect();
                let mut details = json!({ "name": name, "kind": kind, "causes": causes });
                if !group.is_empty() {
                    details["group"] = json!(group);
                }
                Some(details)
            }
            Self::TooLargeResourceVersion { .. } => Some(json!({
                "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
                "retryAfterSeconds": 1
            })),
            _ => None,
        }
    }

    /// The `Status` object for this failure.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        if let Some(details) = self.details() {
            status["details"] = details;
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code(), Json(self.to_status())).into_response()
    }
}

/// The `Success` Status a delete of a built-in type returns once the object is gone.
pub fn deleted_status(resource: &GroupResource, name: &str, uid: &str) -> Value {
    let mut details = json!({ "name": name, "kind": resource.resource, "uid": uid });
    if !resource.group.is_empty() {
        details["group"] = json!(resource.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_matches_api_server_wording_and_details() {
        let err = ApiError::not_found(&GroupResource::new("", "pods"), "web-0");
        let status = err.to_status();
        assert_eq!(status["message"], "pods \"web-0\" not found");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(
            status["details"],
            json!({ "name": "web-0", "kind": "pods" })
        );
    }

    #[test]
    fn group_is_qualified_in_message_and_details() {
        let err = ApiError::modified(&GroupResource::new("apps", "deployments"), "api");
        let status = err.to_status();
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .starts_with("Operation cannot be fulfilled on deployments.apps \"api\": the object has been modified")
        );
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(status["code"], 409);
        assert_eq!(status["details"]["group"], "apps");
    }

    #[test]
    fn invalid_lists_every_cause() {
        let err = ApiError::Invalid {
            group: String::new(),
            kind: "Pod".into(),
            qualified_kind: "Pod".into(),
            name: "Bad_Name".into(),
            causes: vec![
                FieldCause::invalid("metadata.name", "Bad_Name", "bad"),
                FieldCause::required("spec", "needed"),
            ],
        };
        let status = err.to_status();
        assert_eq!(
            status["message"],
            "Pod \"Bad_Name\" is invalid: [metadata.name: Invalid value: \"Bad_Name\": bad, spec: Required value: needed]"
        );
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["details"]["causes"][1]["reason"],
            "FieldValueRequired"
        );
    }

    #[test]
    fn too_large_resource_version_is_a_504_timeout() {
        let err = ApiError::TooLargeResourceVersion {
            requested: 90,
            current: 10,
        };
        assert_eq!(err.code(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(err.to_status()["reason"], "Timeout");
        assert_eq!(
            err.to_status()["details"]["causes"][0]["reason"],
            "ResourceVersionTooLarge"
        );
    }
}
