//! What the double knows about each resource: kind, scope, status subresource and selectable
//! fields, from a table of built-in types, from `CustomResourceDefinition` objects stored in the
//! double, or — for any other path — learned from the objects written to it.

use serde_json::Value;

use crate::status::GroupResource;

/// Whether objects live in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespaced,
    Cluster,
    /// Neither built in nor defined by a CRD: taken from the request path.
    FromPath,
}

/// Where the description of a resource came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    BuiltIn,
    CustomResourceDefinition,
    /// No definition: the kind is whatever objects written to it say.
    Unregistered,
}

/// Everything the store and REST layer need to know about one resource.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    pub resource: GroupResource,
    pub kind: String,
    pub list_kind: String,
    pub scope: Scope,
    pub origin: Origin,
    /// Status is written only through `/status`; main-resource writes keep the stored status.
    pub status_subresource: bool,
    /// Field-selector fields beyond `metadata.name` and `metadata.namespace`.
    extra_fields: Vec<String>,
    /// `metadata.generation` is maintained (bumped when anything but metadata/status changes).
    pub tracks_generation: bool,
    /// A delete answers with the object rather than a `Success` Status.
    pub returns_deleted_object: bool,
    /// Served by a dedicated handler (TokenReview), not by the object store.
    pub create_only: bool,
}

impl ResourceInfo {
    pub fn selectable_fields(&self) -> Vec<String> {
        let mut fields = vec![
            "metadata.name".to_string(),
            "metadata.namespace".to_string(),
        ];
        fields.extend(self.extra_fields.iter().cloned());
        fields
    }

    /// `Pod`, or `Deployment.apps` for other groups: how `Invalid` messages name the kind.
    pub fn qualified_kind(&self) -> String {
        if self.resource.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.resource.group)
        }
    }

    /// Namespaces are RFC 1123 labels; everything else here is an RFC 1123 subdomain.
    pub fn name_is_label(&self) -> bool {
        self.resource == GroupResource::new("", "namespaces")
    }
}

struct BuiltIn {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
    fields: &'static [&'static str],
    tracks_generation: bool,
    create_only: bool,
}

const fn builtin(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> BuiltIn {
    BuiltIn {
        group,
        version: "v1",
        resource,
        kind,
        namespaced,
        status_subresource: false,
        fields: &[],
        tracks_generation: false,
        create_only: false,
    }
}

const fn with_status(b: BuiltIn) -> BuiltIn {
    BuiltIn {
        status_subresource: true,
        ..b
    }
}

const fn workload(b: BuiltIn) -> BuiltIn {
    BuiltIn {
        status_subresource: true,
        tracks_generation: true,
        ..b
    }
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

const BUILT_INS: &[BuiltIn] = &[
    BuiltIn {
        fields: POD_FIELDS,
        ..with_status(builtin("", "pods", "Pod", true))
    },
    BuiltIn {
        fields: &["type"],
        ..builtin("", "secrets", "Secret", true)
    },
    builtin("", "configmaps", "ConfigMap", true),
    builtin("", "serviceaccounts", "ServiceAccount", true),
    with_status(builtin("", "services", "Service", true)),
    builtin("", "endpoints", "Endpoints", true),
    builtin("", "events", "Event", true),
    with_status(builtin(
        "",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
    )),
    BuiltIn {
        fields: &["status.phase"],
        ..with_status(builtin("", "namespaces", "Namespace", false))
    },
    BuiltIn {
        fields: &["spec.unschedulable"],
        ..with_status(builtin("", "nodes", "Node", false))
    },
    with_status(builtin("", "persistentvolumes", "PersistentVolume", false)),
    workload(builtin("apps", "deployments", "Deployment", true)),
    workload(builtin("apps", "daemonsets", "DaemonSet", true)),
    workload(builtin("apps", "statefulsets", "StatefulSet", true)),
    workload(builtin("apps", "replicasets", "ReplicaSet", true)),
    workload(builtin(
        "policy",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
    )),
    builtin("coordination.k8s.io", "leases", "Lease", true),
    builtin("discovery.k8s.io", "endpointslices", "EndpointSlice", true),
    BuiltIn {
        tracks_generation: true,
        ..builtin(
            "networking.k8s.io",
            "networkpolicies",
            "NetworkPolicy",
            true,
        )
    },
    builtin("rbac.authorization.k8s.io", "roles", "Role", true),
    builtin(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "RoleBinding",
        true,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "clusterroles",
        "ClusterRole",
        false,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    BuiltIn {
        tracks_generation: true,
        ..builtin(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            false,
        )
    },
    BuiltIn {
        tracks_generation: true,
        ..builtin(
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            false,
        )
    },
    workload(builtin(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
    )),
    BuiltIn {
        create_only: true,
        ..builtin(
            "authentication.k8s.io",
            "tokenreviews",
            "TokenReview",
            false,
        )
    },
];

fn from_builtin(b: &BuiltIn) -> ResourceInfo {
    ResourceInfo {
        resource: GroupResource::new(b.group, b.resource),
        kind: b.kind.to_string(),
        list_kind: format!("{}List", b.kind),
        scope: if b.namespaced {
            Scope::Namespaced
        } else {
            Scope::Cluster
        },
        origin: Origin::BuiltIn,
        status_subresource: b.status_subresource,
        extra_fields: b.fields.iter().map(|f| f.to_string()).collect(),
        tracks_generation: b.tracks_generation,
        // The pod registry answers deletes with the pod; other built-ins with a Status.
        returns_deleted_object: b.group.is_empty() && b.resource == "pods",
        create_only: b.create_only,
    }
}

pub fn builtin_info(resource: &GroupResource) -> Option<ResourceInfo> {
    BUILT_INS
        .iter()
        .find(|b| b.group == resource.group && b.resource == resource.resource)
        .map(from_builtin)
}

/// The `CustomResourceDefinition` resource, where definitions of custom resources are stored.
pub fn crd_resource() -> GroupResource {
    GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions")
}

/// Describes a custom resource from its stored `CustomResourceDefinition` object.
pub fn from_crd(resource: &GroupResource, crd: &Value) -> ResourceInfo {
    let spec = &crd["spec"];
    let kind = spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let list_kind = spec["names"]["listKind"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let status_subresource = versions
        .iter()
        .any(|v| v.pointer("/subresources/status").is_some());
    let extra_fields = versions
        .iter()
        .flat_map(|v| {
            v["selectableFields"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|f| {
            f["jsonPath"]
                .as_str()
                .map(|p| p.trim_start_matches('.').to_string())
        })
        .collect();
    ResourceInfo {
        resource: resource.clone(),
        kind,
        list_kind,
        scope: if spec["scope"] == "Cluster" {
            Scope::Cluster
        } else {
            Scope::Namespaced
        },
        origin: Origin::CustomResourceDefinition,
        status_subresource,
        extra_fields,
        tracks_generation: true,
        returns_deleted_object: true,
        create_only: false,
    }
}

/// Describes a resource nobody defined, using a kind learned from written objects or, before any
/// write, a guess from the plural (`widgets` -> `Widget`).
pub fn unregistered(resource: &GroupResource, learned_kind: Option<&str>) -> ResourceInfo {
    let kind = learned_kind.map(str::to_string).unwrap_or_else(|| {
        let singular = resource
            .resource
            .strip_suffix('s')
            .unwrap_or(&resource.resource);
        let mut chars = singular.chars();
        chars
            .next()
            .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
            .unwrap_or_default()
    });
    ResourceInfo {
        resource: resource.clone(),
        list_kind: format!("{kind}List"),
        kind,
        scope: Scope::FromPath,
        origin: Origin::Unregistered,
        status_subresource: false,
        extra_fields: Vec::new(),
        tracks_generation: true,
        returns_deleted_object: true,
        create_only: false,
    }
}

/// One entry of a discovery `APIResourceList`.
pub struct DiscoveryEntry {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub kind: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub create_only: bool,
}

pub fn builtin_discovery() -> impl Iterator<Item = DiscoveryEntry> {
    BUILT_INS.iter().map(|b| DiscoveryEntry {
        group: b.group.to_string(),
        version: b.version.to_string(),
        resource: b.resource.to_string(),
        kind: b.kind.to_string(),
        namespaced: b.namespaced,
        status_subresource: b.status_subresource,
        create_only: b.create_only,
    })
}

/// Discovery entries for a stored CRD, one per served version.
pub fn crd_discovery(crd: &Value) -> Vec<DiscoveryEntry> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let resource = spec["names"]["plural"].as_str().unwrap_or_default();
    let info = from_crd(&GroupResource::new(group, resource), crd);
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .filter_map(|v| v["name"].as_str())
        .map(|version| DiscoveryEntry {
            group: group.to_string(),
            version: version.to_string(),
            resource: resource.to_string(),
            kind: info.kind.clone(),
            namespaced: info.scope == Scope::Namespaced,
            status_subresource: info.status_subresource,
            create_only: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtins_know_scope_and_fields() {
        let pods = builtin_info(&GroupResource::new("", "pods")).unwrap();
        assert_eq!(pods.kind, "Pod");
        assert_eq!(pods.list_kind, "PodList");
        assert_eq!(pods.scope, Scope::Namespaced);
        assert!(
            pods.selectable_fields()
                .contains(&"spec.nodeName".to_string())
        );
        assert!(pods.returns_deleted_object);
        let ns = builtin_info(&GroupResource::new("", "namespaces")).unwrap();
        assert_eq!(ns.scope, Scope::Cluster);
        assert!(ns.name_is_label());
        let secrets = builtin_info(&GroupResource::new("", "secrets")).unwrap();
        assert!(!secrets.returns_deleted_object);
        assert!(builtin_info(&GroupResource::new("example.com", "widgets")).is_none());
    }

    #[test]
    fn crd_defines_kind_scope_status_and_fields() {
        let crd = json!({
            "spec": {
                "group": "sigil.dev",
                "names": { "plural": "policies", "kind": "Policy", "listKind": "PolicyList" },
                "scope": "Cluster",
                "versions": [
                    { "name": "v1alpha1", "served": true, "subresources": { "status": {} },
                      "selectableFields": [ { "jsonPath": ".spec.mode" } ] },
                    { "name": "v0", "served": false }
                ]
            }
        });
        let info = from_crd(&GroupResource::new("sigil.dev", "policies"), &crd);
        assert_eq!(info.kind, "Policy");
        assert_eq!(info.scope, Scope::Cluster);
        assert!(info.status_subresource);
        assert!(info.selectable_fields().contains(&"spec.mode".to_string()));
        assert_eq!(info.qualified_kind(), "Policy.sigil.dev");
        let entries = crd_discovery(&crd);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].version, "v1alpha1");
    }

    #[test]
    fn unregistered_kind_is_learned_or_guessed() {
        let gr = GroupResource::new("example.com", "widgets");
        assert_eq!(unregistered(&gr, None).kind, "Widget");
        assert_eq!(unregistered(&gr, Some("Gadget")).list_kind, "GadgetList");
    }
}
