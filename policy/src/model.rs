//! The policy objects exactly as users write them (`sigil.dev/v1alpha1` `AuthorizationPolicy` and
//! `PeerAuthentication`), with Istio's camelCase field names so an Istio policy works with only
//! its `apiVersion` changed. These are wire types: every field is optional or defaulted as in the
//! CRD, unknown fields are errors naming the field, and nothing is checked beyond shape;
//! [`crate::validate`] turns them into the compiled form the engine evaluates.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Error as _, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::envelope::Envelope;

// Every object carries these; defined with the rest of an object's identity.
pub use crate::envelope::{API_VERSION, GROUP, Kind, VERSION};

/// Kubernetes object metadata. Only `name`, `namespace` and `creationTimestamp` mean anything to
/// sigil; the other fields the API server writes are accepted (so `kubectl get -o yaml` output
/// loads) and ignored, and anything else is an error, as with kubectl's strict field validation.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// RFC 3339, as the API server writes it; breaks ties between PeerAuthentications (oldest
    /// wins, as in Istio).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub resource_version: Option<IgnoredAny>,
    #[serde(default)]
    pub generation: Option<IgnoredAny>,
    #[serde(default)]
    pub generate_name: Option<IgnoredAny>,
    #[serde(default)]
    pub managed_fields: Option<IgnoredAny>,
    #[serde(default)]
    pub finalizers: Option<IgnoredAny>,
    #[serde(default)]
    pub owner_references: Option<IgnoredAny>,
    #[serde(default)]
    pub deletion_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    pub deletion_grace_period_seconds: Option<IgnoredAny>,
}

impl ObjectMeta {
    /// The envelope of an object of `kind` with this metadata.
    pub fn envelope(&self, kind: Kind) -> Envelope {
        Envelope {
            creation_timestamp: self.creation_timestamp.clone(),
            uid: self.uid.clone(),
            ..Envelope::new(
                kind,
                self.namespace.clone().unwrap_or_default(),
                self.name.clone(),
            )
        }
    }
}

/// `AuthorizationPolicy`: who may call the selected workloads, and how.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Written by controllers; never read.
    #[serde(default)]
    pub status: Option<IgnoredAny>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// None: every workload in the namespace (mesh-wide in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// None means ALLOW.
    #[serde(default)]
    pub action: Option<Action>,
    /// None ("rules absent") matches nothing; `[{}]` matches everything.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
    /// Istio's CUSTOM-action provider; accepted only to reject it with a clear message.
    #[serde(default)]
    pub provider: Option<IgnoredAny>,
    /// Istio's Gateway API attachment; accepted only to reject it with a clear message.
    #[serde(default)]
    pub target_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub target_refs: Option<IgnoredAny>,
}

/// `selector`: the workloads a policy applies to, by pod labels (all must match).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `action`, in Istio's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "AUDIT")]
    Audit,
    /// Istio's external authorization; sigil rejects it at validation.
    #[serde(rename = "CUSTOM")]
    Custom,
}

/// One rule: `from`, `to` and `when` must all match; absent parts match anything.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Vec<From>>,
    #[serde(default)]
    pub to: Option<Vec<To>>,
    #[serde(default)]
    pub when: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Option<Source>,
}

/// Who is calling. Fields are AND'ed, values within a field OR'ed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Istio's JWT identities; rejected at validation (sigil has no RequestAuthentication).
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Istio's X-Forwarded-For addresses; rejected at validation.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// What is being called. Fields are AND'ed, values within a field OR'ed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when`: one more attribute to match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication`: whether the selected workloads accept plaintext.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    #[serde(default)]
    pub status: Option<IgnoredAny>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Keyed by the workload's port; YAML users write the key as a number or a string.
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<PortKey, Mtls>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Option<MtlsModeSpec>,
}

/// `mtls.mode` as written; UNSET (or absent) inherits from the enclosing level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MtlsModeSpec {
    #[serde(rename = "UNSET")]
    Unset,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
}

/// A `portLevelMtls` key exactly as written (`8080` or `"8080"`); validation parses it so the
/// error can say which key is wrong.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortKey(pub String);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortKeyVisitor;
        impl Visitor<'_> for PortKeyVisitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                Ok(PortKey(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
        }
        d.deserialize_any(PortKeyVisitor)
    }
}

/// Any policy object, as loaded from a file or the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::AuthorizationPolicy(p) => &p.metadata,
            Object::PeerAuthentication(p) => &p.metadata,
        }
    }

    /// The object made of `envelope` and the `spec` the user wrote (null: an empty spec, as
    /// Kubernetes stores an object written without one), ignoring everything else a stored
    /// object carries, so that what the agent sends, what the CA reports and what `inspect`
    /// evaluates are the same object. The error is [`Object::decode`]'s.
    pub fn from_parts(envelope: &Envelope, spec: &Value) -> Result<Object, String> {
        let key = &envelope.key;
        let mut metadata = json!({ "name": key.name, "namespace": key.namespace });
        if let Some(created) = &envelope.creation_timestamp {
            metadata["creationTimestamp"] = json!(created);
        }
        if let Some(uid) = &envelope.uid {
            metadata["uid"] = json!(uid);
        }
        let spec = if spec.is_null() { &json!({}) } else { spec };
        let value = json!({
            "apiVersion": API_VERSION,
            "kind": key.kind.name(),
            "metadata": metadata,
            "spec": spec,
        });
        Object::decode(key.kind, &value)
    }

    /// Decodes one object of a known kind from any self-describing format (a YAML or JSON
    /// value, a deserializer); the error names the field path, relative to `spec` for spec
    /// fields, as validation errors do.
    pub fn decode<'de, D: Deserializer<'de>>(kind: Kind, value: D) -> Result<Object, String> {
        let result = match kind {
            Kind::AuthorizationPolicy => {
                serde_path_to_error::deserialize(value).map(Object::AuthorizationPolicy)
            }
            Kind::PeerAuthentication => {
                serde_path_to_error::deserialize(value).map(Object::PeerAuthentication)
            }
        };
        result.map_err(|e| {
            let path = e.path().to_string();
            let path = path.strip_prefix("spec.").unwrap_or(&path).to_owned();
            if path == "." {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            }
        })
    }
}

/// Picks the type by the object's `kind`, so a stream of mixed objects decodes directly.
impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Buffered as YAML, which keeps non-string map keys (`portLevelMtls: {8080: ...}`).
        let value = serde_yaml::Value::deserialize(d)?;
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .ok_or_else(|| {
                D::Error::custom("kind is required (AuthorizationPolicy or PeerAuthentication)")
            })?;
        let kind = Kind::from_name(kind).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown kind {kind:?}: expected AuthorizationPolicy or PeerAuthentication"
            ))
        })?;
        Object::decode(kind, value).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_decode_by_kind_from_json_and_yaml() {
        let json = r#"{"apiVersion": "sigil.dev/v1alpha1", "kind": "PeerAuthentication",
            "metadata": {"name": "a", "namespace": "demo"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}"#;
        let object: Object = serde_json::from_str(json).unwrap();
        assert_eq!(object.kind(), Kind::PeerAuthentication);
        assert_eq!(object.metadata().name, "a");

        let yaml = "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: demo}\nspec: {portLevelMtls: {8080: {mode: STRICT}}}\n";
        let Object::PeerAuthentication(peer) = serde_yaml::from_str::<Object>(yaml).unwrap() else {
            panic!("wrong kind");
        };
        let ports = peer.spec.port_level_mtls.unwrap();
        assert_eq!(ports.keys().collect::<Vec<_>>(), [&PortKey("8080".into())]);

        let authz = r#"{"apiVersion": "sigil.dev/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "c", "namespace": "demo"}}"#;
        assert_eq!(
            serde_json::from_str::<Object>(authz).unwrap().kind(),
            Kind::AuthorizationPolicy
        );
    }

    #[test]
    fn decode_errors_name_the_kind_or_the_field() {
        let err = |json: &str| {
            serde_json::from_str::<Object>(json)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(r#"{"apiVersion": "v1", "kind": "ConfigMap"}"#),
            "unknown kind \"ConfigMap\": expected AuthorizationPolicy or PeerAuthentication"
        );
        assert_eq!(
            err(r#"{"metadata": {}}"#),
            "kind is required (AuthorizationPolicy or PeerAuthentication)"
        );
        assert!(
            err(r#"{"apiVersion": "sigil.dev/v1alpha1", "kind": "PeerAuthentication", "metadata": {"name": "a"}, "spec": {"mtls": {"mode": "strict"}}}"#)
                .starts_with("mtls.mode: unknown variant `strict`, expected one of `UNSET`"),
        );
    }
}
