//! Read-only documents about the server: `/version`, API discovery (`/api`, `/apis`, resource
//! lists for built-in types and stored CRDs) and the service-account issuer's OIDC discovery
//! (`/.well-known/openid-configuration`, `/openid/v1/jwks`).

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State};
use serde_json::{Value, json};

use crate::{
    keys::server_keys,
    resources::{DiscoveryEntry, builtin_discovery, crd_discovery},
    rest::App,
    store::Store,
};

/// The Kubernetes version the double claims to be (k8s-openapi feature `v1_33`).
const MAJOR: &str = "1";
const MINOR: &str = "33";

pub async fn version() -> Json<Value> {
    Json(json!({
        "major": MAJOR,
        "minor": MINOR,
        "gitVersion": format!("v{MAJOR}.{MINOR}.0-sigil-test-apiserver"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }))
}

pub async fn openid_configuration(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "issuer": app.issuer,
        "jwks_uri": format!("{}/openid/v1/jwks", app.url),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

pub async fn jwks() -> Json<Value> {
    Json(server_keys().jwks())
}

fn entries(store: &Store) -> Vec<DiscoveryEntry> {
    builtin_discovery()
        .chain(store.crds().iter().flat_map(crd_discovery))
        .collect()
}

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

fn resource_list(group: &str, version: &str, entries: &[DiscoveryEntry]) -> Option<Value> {
    let mut resources = Vec::new();
    for entry in entries
        .iter()
        .filter(|e| e.group == group && e.version == version)
    {
        let verbs: &[&str] = if entry.create_only {
            &["create"]
        } else {
            &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        };
        let singular = entry.kind.to_lowercase();
        resources.push(json!({
            "name": entry.resource, "singularName": singular, "namespaced": entry.namespaced,
            "kind": entry.kind, "verbs": verbs,
        }));
        if entry.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", entry.resource), "singularName": "", "namespaced": entry.namespaced,
                "kind": entry.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    (!resources.is_empty()).then(|| {
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version(group, version),
            "resources": resources,
        })
    })
}

fn api_group(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({ "groupVersion": format!("{name}/{v}"), "version": v }))
        .collect();
    json!({ "name": name, "versions": versions, "preferredVersion": versions[0] })
}

/// The discovery document at `segments`, if that path is a discovery path.
pub fn document(store: &Store, segments: &[&str]) -> Option<Value> {
    let entries = entries(store);
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.group.is_empty()) {
        let versions = groups.entry(entry.group.clone()).or_default();
        if !versions.contains(&entry.version) {
            versions.push(entry.version.clone());
        }
    }
    match segments {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [],
        })),
        ["api", version] => resource_list("", version, &entries),
        ["apis"] => {
            let groups: Vec<Value> = groups
                .iter()
                .map(|(name, versions)| api_group(name, versions))
                .collect();
            Some(json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }))
        }
        ["apis", group] => groups.get(*group).map(|versions| {
            let mut document = api_group(group, versions);
            document["kind"] = json!("APIGroup");
            document["apiVersion"] = json!("v1");
            document
        }),
        ["apis", group, version] => resource_list(group, version, &entries),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_discovery_lists_pods_and_their_status() {
        let store = Store::new(10);
        let list = document(&store, &["api", "v1"]).unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"pods") && names.contains(&"pods/status") && names.contains(&"secrets")
        );
        assert!(document(&store, &["api", "v2"]).is_none());
        assert!(
            document(&store, &["api", "v1", "pods"]).is_none(),
            "not a discovery path"
        );
    }

    #[test]
    fn group_discovery_includes_builtin_groups() {
        let store = Store::new(10);
        let groups = document(&store, &["apis"]).unwrap();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"apps") && names.contains(&"authentication.k8s.io"));
        let tokenreviews = document(&store, &["apis", "authentication.k8s.io", "v1"]).unwrap();
        assert_eq!(tokenreviews["resources"][0]["verbs"], json!(["create"]));
    }
}
