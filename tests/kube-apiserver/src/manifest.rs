//! Reading YAML manifests the way kubectl does, so tests can install the project's real
//! manifests (its CRDs, say) into the test server through the `kube` client.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Why a manifest could not be read; `document` counts from 1, as an editor would.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document}: {source}")]
    Yaml {
        document: usize,
        source: serde_yaml::Error,
    },
    #[error("document {document}: {source}")]
    Json {
        document: usize,
        source: serde_json::Error,
    },
    #[error("document {document}: {reason}")]
    Document { document: usize, reason: String },
}

/// Why a YAML value has no JSON equivalent.
enum Unconvertible {
    Json(serde_json::Error),
    Other(String),
}

/// The objects of a multi-document YAML manifest, as the JSON kubectl sends: map keys become
/// strings (`8080:` is `"8080"`, as sigs.k8s.io/yaml converts them) and empty documents are
/// skipped.
pub fn parse_manifest(text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut objects = Vec::new();
    for (i, document_text) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let error = |reason: String| ManifestError::Document { document, reason };
        let yaml = serde_yaml::Value::deserialize(document_text)
            .map_err(|source| ManifestError::Yaml { document, source })?;
        let json = to_json(yaml).map_err(|e| match e {
            Unconvertible::Json(source) => ManifestError::Json { document, source },
            Unconvertible::Other(reason) => error(reason),
        })?;
        match json {
            Value::Null => {}
            object @ Value::Object(_) => objects.push(object),
            _ => return Err(error("not an object".into())),
        }
    }
    Ok(objects)
}

fn to_json(yaml: serde_yaml::Value) -> Result<Value, Unconvertible> {
    Ok(match yaml {
        serde_yaml::Value::Mapping(map) => {
            let mut object = Map::new();
            for (key, value) in map {
                let key = key_string(key).map_err(Unconvertible::Other)?;
                object.insert(key, to_json(value)?);
            }
            Value::Object(object)
        }
        serde_yaml::Value::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        serde_yaml::Value::Tagged(tagged) => {
            return Err(Unconvertible::Other(format!(
                "unsupported YAML tag {}",
                tagged.tag
            )));
        }
        scalar => serde_json::to_value(scalar).map_err(Unconvertible::Json)?,
    })
}

fn key_string(key: serde_yaml::Value) -> Result<String, String> {
    match key {
        serde_yaml::Value::String(s) => Ok(s),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        serde_yaml::Value::Null => Ok("null".into()),
        other => Err(format!("unsupported map key {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_become_json_objects_with_string_keys() {
        let text = "# preamble\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {8080: x, true: y}\n---\n---\nkind: List\nitems: [1, 2.5, null]\n";
        assert_eq!(
            parse_manifest(text).unwrap(),
            [
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"8080": "x", "true": "y"}}),
                json!({"kind": "List", "items": [1, 2.5, null]}),
            ]
        );
    }

    #[test]
    fn errors_name_the_document() {
        let err = |text| parse_manifest(text).unwrap_err().to_string();
        assert_eq!(err("a: 1\n---\n- x\n"), "document 2: not an object");
        assert!(err("a: 1\n---\nb: [\n").starts_with("document 2: "));
        assert_eq!(
            err("a: !custom 1\n"),
            "document 1: unsupported YAML tag !custom"
        );
    }
}
