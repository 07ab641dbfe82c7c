//! Policy files: multi-document YAML (`---` separated) of AuthorizationPolicy and
//! PeerAuthentication objects, exactly as `kubectl apply -f` takes them. Outside Kubernetes this
//! is where policies come from. The same file may also hold the route kinds
//! ([`ROUTE_KINDS`]: Gateway API routes, sigil's traffic policies), which `sigil_route` reads and
//! this reader skips. Every error names the file, the document (counted from 1), and
//! the object's kind and `namespace/name` when known; every bad document is reported, not just
//! the first (a YAML syntax error ends the scan, since nothing after it can be trusted).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use crate::engine::PolicySet;
use crate::model::{self, Kind, Object};
use crate::validate;

/// The kinds a policy file may hold beside policies, as (API group, kind): read by
/// `sigil_route` (the agent's route feed, `sigil inspect route`), skipped by the policy readers.
pub const ROUTE_KINDS: [(&str, &str); 5] = [
    ("gateway.networking.k8s.io", "HTTPRoute"),
    ("gateway.networking.k8s.io", "GRPCRoute"),
    ("gateway.networking.k8s.io", "ReferenceGrant"),
    ("sigil.dev", "BackendPolicy"),
    ("sigil.dev", "RateLimitPolicy"),
];

/// Whether a document with this `apiVersion` (`<group>/<version>`) and `kind` is one of the
/// [`ROUTE_KINDS`], whatever its version (the route reader judges that).
pub fn is_route_kind(api_version: &str, kind: &str) -> bool {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    ROUTE_KINDS.contains(&(group, kind))
}

/// A problem with one document of a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentProblem {
    /// None when parsing text that came from no file.
    pub file: Option<PathBuf>,
    /// Counted from 1.
    pub document: usize,
    /// `AuthorizationPolicy demo/web`, or what is known of it.
    pub object: String,
    pub message: String,
}

impl fmt::Display for DocumentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(
            f,
            "document {} ({}): {}",
            self.document, self.object, self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// One line per problem.
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<DocumentProblem> },
}

/// Reads, parses and validates a policy file.
pub fn load_policy_set(path: &Path) -> Result<PolicySet, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_policy_set(&text).map_err(|e| match e {
        FileError::Invalid { mut problems } => {
            for p in &mut problems {
                p.file = Some(path.to_owned());
            }
            FileError::Invalid { problems }
        }
        read @ FileError::Read { .. } => read,
    })
}

/// Parses and validates the text of a policy file.
pub fn parse_policy_set(text: &str) -> Result<PolicySet, FileError> {
    let (objects, mut problems) = parse_objects(text);
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    for (document, object) in &objects {
        let result = match object {
            Object::AuthorizationPolicy(p) => {
                validate::authorization_policy(p).map(|p| authz.push(p))
            }
            Object::PeerAuthentication(p) => validate::peer_authentication(p).map(|p| peer.push(p)),
        };
        if let Err(e) = result {
            problems.extend(e.problems.into_iter().map(|p| DocumentProblem {
                file: None,
                document: *document,
                object: object.kind().to_string(),
                message: p.to_string(),
            }));
        }
    }
    if problems.is_empty() {
        Ok(PolicySet::new(authz, peer))
    } else {
        problems.sort_by_key(|p| p.document);
        Err(FileError::Invalid { problems })
    }
}

/// Every well-formed object with its document number, and a problem for every other document.
fn parse_objects(text: &str) -> (Vec<(usize, Object)>, Vec<DocumentProblem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    let mut seen: HashMap<(Kind, String, String), usize> = HashMap::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_number = i + 1;
        let problem = |object: String, message: String| DocumentProblem {
            file: None,
            document: document_number,
            object,
            message,
        };
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                problems.push(problem("unparsed".into(), format!("invalid YAML: {e}")));
                break;
            }
        };
        // Empty documents (a trailing `---`, comments only) are skipped, as kubectl does.
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            problems.push(problem("?".into(), "not an object".into()));
            continue;
        }
        let text_at = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, key| v.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if let (Some(api_version), Some(kind)) = (text_at(&["apiVersion"]), text_at(&["kind"]))
            && is_route_kind(&api_version, &kind)
        {
            continue;
        }
        let namespace = text_at(&["metadata", "namespace"]).unwrap_or_else(|| "?".into());
        let name = text_at(&["metadata", "name"]).unwrap_or_else(|| "?".into());
        let kind = match text_at(&["kind"]) {
            None => {
                problems.push(problem(
                    format!("{namespace}/{name}"),
                    "kind is required (AuthorizationPolicy or PeerAuthentication)".into(),
                ));
                continue;
            }
            Some(kind) => match Kind::from_name(&kind) {
                Some(kind) => kind,
                None => {
                    problems.push(problem(
                        format!("{kind} {namespace}/{name}"),
                        format!("unknown kind {kind:?}: sigil policy files hold AuthorizationPolicy and PeerAuthentication (and the route kinds HTTPRoute, GRPCRoute, ReferenceGrant, BackendPolicy, RateLimitPolicy)"),
                    ));
                    continue;
                }
            },
        };
        let label = format!("{kind} {namespace}/{name}");
        match text_at(&["apiVersion"]) {
            Some(v) if v == model::API_VERSION => {}
            other => {
                let found = other.map_or_else(|| "missing".to_owned(), |v| format!("{v:?}"));
                problems.push(problem(
                    label,
                    format!(
                        "apiVersion {found} is not {} (an Istio policy works once its apiVersion is changed)",
                        model::API_VERSION
                    ),
                ));
                continue;
            }
        }
        let key = (kind, namespace, name);
        if let Some(first) = seen.get(&key) {
            problems.push(problem(
                label,
                format!("defined twice (also document {first})"),
            ));
            continue;
        }
        seen.insert(key, document_number);
        match Object::decode(kind, value) {
            Ok(object) => objects.push((document_number, object)),
            Err(message) => problems.push(problem(label, message)),
        }
    }
    (objects, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# a comment-only preamble
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: demo
  labels: {team: web}
spec:
  selector:
    matchLabels: {app: web}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
    to:
    - operation:
        ports: ["8080"]
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: sigil-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    9090: {mode: DISABLE}
    "9091": {mode: PERMISSIVE}
---
"#;

    fn problems(text: &str) -> Vec<String> {
        match parse_policy_set(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(FileError::Invalid { problems }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn loads_every_document_and_skips_empty_ones() {
        let set = parse_policy_set(GOOD).unwrap();
        assert_eq!(set.authorization_policies().count(), 1);
        let peers: Vec<String> = set
            .peer_authentications()
            .map(|p| p.name().to_string())
            .collect();
        assert_eq!(peers, ["demo/web", "sigil-system/strict"]);
    }

    #[test]
    fn route_kinds_beside_policies_are_skipped_whatever_their_version() {
        let routes = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                      metadata: {name: web, namespace: demo}\nspec: {parentRefs: [{kind: Service, name: web}]}\n\
                      ---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
                      metadata: {name: g, namespace: demo}\n\
                      ---\napiVersion: sigil.dev/v1alpha1\nkind: RateLimitPolicy\n\
                      metadata: {name: r, namespace: demo}\n";
        let set = parse_policy_set(&format!("{GOOD}{routes}")).unwrap();
        assert_eq!(set.authorization_policies().count(), 1);
        assert_eq!(set.peer_authentications().count(), 2);
        // A kind of another group is still refused, even with a route kind's name.
        assert_eq!(
            problems(
                "apiVersion: example.com/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: demo}\n"
            ),
            [
                "document 1 (HTTPRoute demo/a): unknown kind \"HTTPRoute\": sigil policy files hold AuthorizationPolicy and PeerAuthentication (and the route kinds HTTPRoute, GRPCRoute, ReferenceGrant, BackendPolicy, RateLimitPolicy)"
            ]
        );
    }

    #[test]
    fn loads_from_a_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.yaml");
        std::fs::write(&path, GOOD).unwrap();
        assert!(load_policy_set(&path).is_ok());

        std::fs::write(
            &path,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .unwrap();
        let err = load_policy_set(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: document 1 (ConfigMap ?/x): unknown kind",
                path.display()
            )),
            "{err}"
        );

        let missing = dir.path().join("missing.yaml");
        let err = load_policy_set(&missing).unwrap_err().to_string();
        assert!(err.starts_with("reading policy file"), "{err}");
    }

    #[test]
    fn unknown_fields_are_errors_naming_document_object_and_path() {
        let text = r#"
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: demo}
spec: {rules: [{}]}
---
apiVersion: sigil.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: demo}
spec:
  rules:
  - from:
    - source:
        principal: ["cluster.local/ns/demo/sa/web"]
"#;
        let got = problems(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with(
                "document 2 (AuthorizationPolicy demo/typo): rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`"
            ),
            "{got:?}"
        );
    }

    #[test]
    fn metadata_typos_and_missing_namespaces_are_errors() {
        let got = problems(
            "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: a, namepsace: demo}\n",
        );
        assert!(
            got[0].starts_with(
                "document 1 (PeerAuthentication ?/a): metadata.namepsace: unknown field `namepsace`"
            ),
            "{got:?}"
        );
        let got = problems(
            "apiVersion: sigil.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
        );
        assert_eq!(
            got,
            [
                "document 1 (PeerAuthentication): <no namespace>/a: metadata.namespace: required (sigil-system for mesh-wide policies)"
            ]
        );
    }

    #[test]
    fn server_written_metadata_is_accepted() {
        let text = r#"
apiVersion: sigil.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: a
  namespace: demo
  uid: 0b4c8a43-1f9e-4c1e-9d43-6d0f4c8d5a10
  resourceVersion: "42"
  generation: 1
  creationTimestamp: "2026-01-01T00:00:00Z"
  managedFields: [{manager: kubectl}]
  annotations: {note: x}
spec: {mtls: {mode: STRICT}}
status: {conditions: []}
"#;
        assert!(parse_policy_set(text).is_ok());
    }

    #[test]
    fn wrong_kind_or_api_version_is_named() {
        let istio = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n";
        assert_eq!(
            problems(istio),
            [
                "document 1 (AuthorizationPolicy demo/a): apiVersion \"security.istio.io/v1\" is not sigil.dev/v1alpha1 (an Istio policy works once its apiVersion is changed)"
            ]
        );
        let no_kind = "apiVersion: sigil.dev/v1alpha1\nmetadata: {name: a, namespace: demo}\n";
        assert_eq!(
            problems(no_kind),
            ["document 1 (demo/a): kind is required (AuthorizationPolicy or PeerAuthentication)"]
        );
        assert_eq!(problems("- a\n- b\n"), ["document 1 (?): not an object"]);
    }

    #[test]
    fn duplicates_and_every_bad_document_are_reported() {
        let one = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec: {rules: [{}]}\n";
        let bad = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: demo}\nspec: {action: deny}\n";
        let text = format!("{one}---\n{one}---\n{bad}");
        let got = problems(&text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            "document 2 (AuthorizationPolicy demo/a): defined twice (also document 1)"
        );
        assert!(
            got[1].starts_with(
                "document 3 (AuthorizationPolicy demo/b): action: unknown variant `deny`, expected one of `ALLOW`"
            ),
            "{got:?}"
        );
    }

    #[test]
    fn yaml_syntax_errors_stop_the_scan() {
        let text = "apiVersion: sigil.dev/v1alpha1\nkind: [unclosed\n---\nkind: Other\n";
        let got = problems(text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("document 1 (unparsed): invalid YAML"),
            "{got:?}"
        );
    }

    #[test]
    fn validation_problems_carry_the_document() {
        let text = "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec: {rules: [{to: [{operation: {ports: [\"0\"]}}]}]}\n";
        assert_eq!(
            problems(text),
            [
                "document 1 (AuthorizationPolicy): demo/a: rules[0].to[0].operation.ports[0]: \"0\" is not a port (1-65535)"
            ]
        );
    }
}
