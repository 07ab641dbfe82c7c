//! README.md's cluster quickstart (`## Install in a cluster`), followed as far as it can be
//! without a cluster or Docker. The test reads README.md when it runs, and each command line of
//! the section's shell block must be the next row of the `QUICKSTART` table, which says what the
//! test does for it, against a model of the cluster: the Kubernetes API test double holding what
//! each `kubectl` step applies, the real `sigil ca serve` started as the rendered CA Deployment
//! configures it (it fills in the webhook's caBundle, answers the injection webhook over HTTPS
//! and writes the policies' `Valid` condition), and the real `sigil` binary for the commands an
//! operator runs. A line the table does not have fails the test, and so does a README comment
//! that says another output than the table's, so the test keeps up with the README.
//!
//! What each step becomes:
//! 1. `docker build` / `kind load`: the Dockerfile exists, its final stage runs `/sigil`, and the
//!    tag is the image the rendered manifests run and the CA injects by default.
//! 2. `kubectl apply -k`: renders with the real kubectl's kustomize; every container of the
//!    built image runs a binary the image holds (`/sigil`, or `/sigil-proxy` for injected
//!    proxies) with arguments that binary accepts; the CA starts; `rollout status`
//!    names objects that exist in that namespace (and waits for the CA to be ready).
//! 3. `create` / `label namespace`, `apply -f`: the rendered webhook's selectors (with the
//!    API server's semantics) decide which pods are sent to the real injector, as AdmissionReviews
//!    shaped like the API server's; the returned patch is applied, and the init containers the
//!    README's `get ... -o jsonpath` prints are read from the result and compared with its
//!    expected-output comment.
//! 4. The heredoc policy passes the rendered CRD's schema and sigil's validation, the CA marks it
//!    Valid (the VALID column), and each `exec ... curl` has its README output predicted by
//!    `sigil inspect policy` with the applied policies (the app's answer, or the proxy's 403 body).
//! 5. `port-forward`, `curl` and `sigil inspect cert`: the forwarded port is the injected proxy's
//!    admin port, the paths are admin routes, and the identity in the comment is the pod's.
//!
//! Separately, every `sigil ...` command in README.md's shell blocks (found by bash itself, with
//! nothing on its PATH) is run through the real binary's argument parser (with `--help`
//! appended), and control cases prove those checks bite.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope};
use serde_json::{Value, json};
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_test_apiserver::TestApiServer;
use sigil_test_harness::manifests::{
    describe, dockerfile_instructions, kind, name, namespace, repo,
};
use sigil_test_harness::{CaProcess, sigil_exe, sigil_proxy_exe};
use sigil_test_harness::{admission, manifests};

/// The heading of the README section this test follows.
const SECTION: &str = "## Install in a cluster";
/// The shape of the AdmissionReview the API server sends (a pod created by a ReplicaSet).
const REVIEW: &str = include_str!("../fixtures/admission/web-pod.review.json");
/// How long the CA may take to do something the quickstart waits for.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Reading the README's shell blocks
// ---------------------------------------------------------------------------------------------

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("reading README.md")
}

/// A fenced code block: its info string (language) and its lines with their README line numbers.
struct Block {
    lang: String,
    fence: usize,
    lines: Vec<(usize, String)>,
}

fn code_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match open.take() {
                Some(block) => blocks.push(block),
                None => {
                    open = Some(Block {
                        lang: info.trim().to_string(),
                        fence: i + 1,
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(block) = open.as_mut() {
            block.lines.push((i + 1, line.to_string()));
        }
    }
    assert!(
        open.is_none(),
        "README.md: the code block opened on line {} is never closed",
        open.map_or(0, |b| b.fence)
    );
    blocks
}

/// The shell blocks of the quickstart section: from its heading to the next heading of level 1
/// or 2 (outside code blocks).
fn quickstart_blocks(text: &str) -> Vec<Block> {
    let mut in_code = false;
    let mut start = None;
    let mut end = usize::MAX;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with(SECTION) {
            start = Some(i + 1);
        } else if !in_code && start.is_some() && (line.starts_with("# ") || line.starts_with("## "))
        {
            end = i + 1;
            break;
        }
    }
    let start = start.unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    code_blocks(text)
        .into_iter()
        .filter(|b| b.fence > start && b.fence < end && is_shell(&b.lang))
        .collect()
}

fn is_shell(lang: &str) -> bool {
    matches!(lang, "sh" | "bash" | "shell" | "console")
}

/// One command line of a shell block: its lines as the README shows them (`source`), as one line
/// (`text`: continuation lines joined, runs of blanks collapsed, its trailing comment kept), the
/// comment line right under it (an expected output) and its heredoc (delimiter, body).
#[derive(Debug)]
struct CommandLine {
    line: usize,
    source: String,
    text: String,
    output: Option<String>,
    heredoc: Option<(String, String)>,
}

impl CommandLine {
    /// What the line's trailing comment says (after ` #`).
    fn comment(&self) -> Option<&str> {
        self.text.split_once(" #").map(|(_, c)| c.trim())
    }
}

/// The command lines of a shell block; comment lines and blank lines are not commands.
fn command_lines(lines: &[(usize, String)]) -> Vec<CommandLine> {
    let mut out = Vec::new();
    let mut rest = lines.iter().peekable();
    while let Some((number, first)) = rest.next() {
        if first.trim().is_empty() || first.trim_start().starts_with('#') {
            continue;
        }
        let mut source = first.trim().to_string();
        let mut text = source.clone();
        while let Some(joined) = text.strip_suffix('\\') {
            let Some((_, next)) = rest.next() else { break };
            source = format!("{source}\n{next}");
            text = format!("{} {}", joined.trim_end(), next.trim());
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        // `<<'END'`, `<<"END"`, `<<END` or `<<-END`: the body runs to the line `END`.
        let heredoc = text.split_once("<<").map(|(_, after)| {
            let word = after.trim_start_matches('-').split_whitespace().next();
            let delimiter = word.unwrap_or_default().trim_matches(['\'', '"']);
            let mut body = String::new();
            loop {
                let Some((_, line)) = rest.next() else {
                    panic!("README.md:{number}: the heredoc {delimiter} is never closed");
                };
                if line.trim() == delimiter {
                    break (delimiter.to_string(), body);
                }
                body.push_str(line);
                body.push('\n');
            }
        });
        let output = rest
            .peek()
            .and_then(|(_, l)| l.trim().strip_prefix('#'))
            .map(|c| c.trim().to_string());
        out.push(CommandLine {
            line: *number,
            source,
            text,
            output,
            heredoc,
        });
    }
    out
}

/// The `sigil` invocations of a command line, as a shell runs it: bash itself splits the words
/// (quotes, pipes, `;`, `&`, redirections, heredocs), with nothing on its PATH, so that no
/// program runs and every command is one of these functions. `sigil ARGS` (also after `sudo`,
/// `env` and `VAR=value`), `cargo run [...] -- ARGS`, `.../sigil ARGS` and `... -- /sigil ARGS`
/// (as in `kubectl exec`) are invocations; any other command does nothing.
fn sigil_invocations(line: &CommandLine) -> Vec<Vec<String>> {
    const SHELL: &str = r#"
        PATH=$bin
        set -f
        sigil() { for a in "$@"; do printf '%s\0' "$a"; done >>"$log"; printf '\036' >>"$log"; }
        sudo() { "$@"; }
        env() { while [ "${1#*=}" != "$1" ]; do export "$1"; shift; done; "$@"; }
        cargo() {
            [ "$1" = run ] || return 0
            while [ $# -gt 0 ]; do a=$1; shift; [ "$a" = -- ] && { sigil "$@"; return; }; done
        }
        command_not_found_handle() {
            case "$1" in */sigil) shift; sigil "$@"; return ;; esac
            while [ $# -gt 0 ]; do
                a=$1; shift
                if [ "$a" = -- ]; then
                    case "$1" in sigil|*/sigil) shift; sigil "$@" ;; esac
                    return 0
                fi
            done
            return 0
        }
        eval "$script"
        wait
    "#;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("invocations");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let script = match &line.heredoc {
        Some((delimiter, body)) => format!("{}\n{body}{delimiter}\n", line.source),
        None => line.source.clone(),
    };
    let status = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", SHELL])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("bin", &bin)
        .env("log", &log)
        .env("script", &script)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running bash");
    assert!(
        status.code().is_some(),
        "README.md:{}: bash was killed",
        line.line
    );
    let recorded = std::fs::read(&log).unwrap_or_default();
    String::from_utf8(recorded)
        .unwrap()
        .split_terminator('\u{1e}')
        .map(|args| args.split_terminator('\0').map(str::to_string).collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The real binary's argument parser
// ---------------------------------------------------------------------------------------------

/// Runs `sigil ARGS` with an empty environment (so no SIGIL_* variable of the test's changes what
/// it prints) and no way to reach a cluster.
fn run_sigil(args: &[String]) -> Output {
    run_binary(sigil_exe(), args)
}

/// [`run_sigil`] with any of the package's binaries.
fn run_binary(program: &str, args: &[String]) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Whether a container's arguments start with the subcommand `path` (`["agent", "run"]`).
fn runs_subcommand(args: &[String], path: &[&str]) -> bool {
    args.len() >= path.len() && args.iter().zip(path).all(|(a, p)| a == p)
}

/// One option in a `--help` text.
#[derive(Debug)]
struct OptionHelp {
    names: Vec<String>,
    takes_value: bool,
    default: Option<String>,
    env: Option<String>,
}

/// The options a `--help` text lists (clap's short and long layouts).
fn help_options(help: &str) -> Vec<OptionHelp> {
    let lines: Vec<&str> = help.lines().collect();
    let is_option = |l: &str| l.starts_with("  -") || l.starts_with("      --");
    let mut options = Vec::new();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| is_option(l)) {
        let signature = line.trim().split("  ").next().unwrap_or_default();
        let end = lines[i + 1..]
            .iter()
            .position(|l| is_option(l) || (!l.is_empty() && !l.starts_with(' ')))
            .map_or(lines.len(), |p| i + 1 + p);
        let entry = lines[i..end].join("\n");
        let bracket = |tag: &str| {
            let rest = &entry[entry.find(tag)? + tag.len()..];
            Some(rest[..rest.find(']')?].to_string())
        };
        options.push(OptionHelp {
            names: signature
                .split([',', ' '])
                .filter(|w| w.starts_with('-'))
                .map(str::to_string)
                .collect(),
            takes_value: signature.contains('<'),
            default: bracket("[default: "),
            env: bracket("[env: ").map(|e| e.split('=').next().unwrap_or_default().to_string()),
        });
    }
    options
}

/// The subcommands a `--help` text lists (without `help`).
fn help_subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// A binary's command-line interface (`sigil`'s or `sigil-proxy`'s), as its `--help` texts
/// describe it.
struct Cli {
    program: &'static str,
    help: Mutex<HashMap<Vec<String>, String>>,
}

impl Cli {
    fn sigil() -> Cli {
        Cli::of(sigil_exe())
    }

    fn sigil_proxy() -> Cli {
        Cli::of(sigil_proxy_exe())
    }

    fn of(program: &'static str) -> Cli {
        Cli {
            program,
            help: Mutex::default(),
        }
    }

    /// The binary's name, as messages say it.
    fn name(&self) -> &str {
        self.program.rsplit('/').next().unwrap_or(self.program)
    }

    /// `sigil PATH --help`.
    fn help<S: AsRef<str>>(&self, path: &[S]) -> String {
        let path: Vec<String> = path.iter().map(|s| s.as_ref().to_string()).collect();
        if let Some(text) = self.help.lock().unwrap().get(&path) {
            return text.clone();
        }
        let mut args = path.clone();
        args.push("--help".into());
        let out = run_binary(self.program, &args);
        assert!(
            out.status.success(),
            "`{} {}` failed: {}",
            self.name(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        self.help.lock().unwrap().insert(path, text.clone());
        text
    }

    fn option<S: AsRef<str>>(&self, path: &[S], flag: &str) -> OptionHelp {
        help_options(&self.help(path))
            .into_iter()
            .find(|o| o.names.iter().any(|n| n == flag))
            .unwrap_or_else(|| {
                panic!(
                    "`{} {}` has no option {flag}",
                    self.name(),
                    path.iter()
                        .map(|s| s.as_ref())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
    }

    /// The command line that checks `sigil ARGS` with the parser: ARGS and `--help`. Clap checks
    /// every argument before `--help` (unknown flags, bad values, extra positionals), except that
    /// it does not check the values of options given before a subcommand (`sigil --log-format
    /// bogus demo --help` exits 0); so options found before the last subcommand are moved after
    /// it, where they are checked (they are global: they mean the same there).
    fn check_args(&self, args: &[String]) -> Vec<String> {
        let mut path: Vec<String> = Vec::new();
        let mut leading = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let subcommands = help_subcommands(&self.help(&path));
            if subcommands.is_empty() {
                break;
            }
            let arg = &args[i];
            if arg.starts_with('-') && arg != "-" && arg != "--" {
                let flag = arg.split('=').next().unwrap();
                let takes_value = !arg.contains('=')
                    && help_options(&self.help(&path))
                        .iter()
                        .any(|o| o.takes_value && o.names.iter().any(|n| n == flag));
                let n = if takes_value { 2 } else { 1 };
                leading.extend(args[i..(i + n).min(args.len())].iter().cloned());
                i += n;
            } else if subcommands.contains(arg) {
                path.push(arg.clone());
                i += 1;
            } else {
                break;
            }
        }
        path.extend(args[i..].iter().cloned());
        path.extend(leading);
        path.push("--help".into());
        path
    }

    /// Whether the binary's parser accepts `sigil ARGS`; the error says why not.
    fn accepts(&self, args: &[String]) -> Result<(), String> {
        let argv = self.check_args(args);
        let out = run_binary(self.program, &argv);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {}` exits with {}: {}",
                self.name(),
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The value `sigil PATH ARGS` uses for `flag` in environment `env`: the last one given in
    /// ARGS (`--flag V` or `--flag=V`), else its environment variable's, else its default.
    fn effective(
        &self,
        path: &[&str],
        args: &[String],
        env: &[(String, String)],
        flag: &str,
    ) -> Option<String> {
        let option = self.option(path, flag);
        let mut value = None;
        for (i, arg) in args.iter().enumerate() {
            if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                value = Some(v.to_string());
            } else if arg == flag {
                value = args.get(i + 1).cloned();
            }
        }
        value
            .or_else(|| {
                let var = option.env.as_ref()?;
                env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
            })
            .or(option.default)
    }

    /// The long option of `sigil PATH` that reads environment variable `var`.
    fn flag_for_env(&self, path: &[&str], var: &str) -> Option<String> {
        help_options(&self.help(path))
            .into_iter()
            .find(|o| o.env.as_deref() == Some(var))
            .and_then(|o| o.names.into_iter().find(|n| n.starts_with("--")))
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes semantics the quickstart relies on
// ---------------------------------------------------------------------------------------------

type Labels = BTreeMap<String, String>;

fn labels_of(object: &Value) -> Labels {
    object["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Whether a `metav1.LabelSelector` selects `labels` (no selector selects everything).
fn selects(selector: &Value, labels: &Labels) -> bool {
    let match_labels = selector["matchLabels"].as_object().into_iter().flatten();
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten();
    match_labels
        .into_iter()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        && expressions.into_iter().all(|e| {
            let value = labels.get(e["key"].as_str().unwrap_or_default());
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(&v.as_str())),
                Some("NotIn") => value.is_none_or(|v| !values.contains(&v.as_str())),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                other => panic!("unknown label selector operator {other:?} in {selector}"),
            }
        })
}

/// The containers and init containers of a pod spec.
fn all_containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|field| spec[*field].as_array().into_iter().flatten())
        .collect()
}

fn set_default(object: &mut Value, field: &str, value: Value) {
    if object.get(field).is_none_or(Value::is_null) {
        object[field] = value;
    }
}

/// The `imagePullPolicy` the API server defaults: Always for `:latest` or no tag.
fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        _ if image.contains('@') => "IfNotPresent",
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

/// The API server's defaults for a container (and its probes and ports).
fn default_container(container: &mut Value) {
    let image = container["image"].as_str().unwrap_or_default().to_string();
    set_default(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    set_default(container, "terminationMessagePolicy", json!("File"));
    set_default(
        container,
        "imagePullPolicy",
        json!(default_pull_policy(&image)),
    );
    set_default(container, "resources", json!({}));
    for port in container["ports"].as_array_mut().into_iter().flatten() {
        set_default(port, "protocol", json!("TCP"));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let Some(probe) = container.get_mut(probe).filter(|p| p.is_object()) else {
            continue;
        };
        for (field, value) in [
            ("timeoutSeconds", 1),
            ("periodSeconds", 10),
            ("successThreshold", 1),
            ("failureThreshold", 3),
        ] {
            set_default(probe, field, json!(value));
        }
        if let Some(get) = probe.get_mut("httpGet") {
            set_default(get, "scheme", json!("HTTP"));
        }
    }
}

fn default_containers(spec: &mut Value) {
    for field in ["initContainers", "containers"] {
        for container in spec[field].as_array_mut().into_iter().flatten() {
            default_container(container);
        }
    }
}

/// A pod of `workload` as the API server hands it to mutating webhooks: created by the
/// workload's controller from its template, with the API server's defaults and what its
/// built-in admission plugins add (the service-account token volume, default tolerations).
/// Returns the pod and the controller's user name.
fn pod_from_template(workload: &Value, n: usize) -> (Value, String) {
    let template = &workload["spec"]["template"];
    let hash = format!("{:x}", 0x5c4b3a29_u64 + n as u64 * 0x1111);
    let mut labels = template["metadata"]["labels"].clone();
    let (owner_kind, owner_name, generate_name, controller) = match kind(workload) {
        "Deployment" => {
            labels["pod-template-hash"] = json!(hash);
            let replica_set = format!("{}-{hash}", name(workload));
            (
                "ReplicaSet",
                replica_set.clone(),
                format!("{replica_set}-"),
                "replicaset-controller",
            )
        }
        "DaemonSet" => {
            labels["controller-revision-hash"] = json!(hash);
            labels["pod-template-generation"] = json!("1");
            (
                "DaemonSet",
                name(workload).to_string(),
                format!("{}-", name(workload)),
                "daemon-set-controller",
            )
        }
        other => panic!("{}: pods of a {other} are not modelled", describe(workload)),
    };
    let mut metadata = json!({
        "generateName": generate_name,
        "namespace": namespace(workload),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": owner_kind, "name": owner_name,
            "uid": format!("9e0b1f7c-6a4d-4e58-8c1d-{n:012x}"),
            "controller": true, "blockOwnerDeletion": true,
        }],
    });
    if template["metadata"]["annotations"].is_object() {
        metadata["annotations"] = template["metadata"]["annotations"].clone();
    }
    let mut spec = template["spec"].clone();
    let service_account = spec["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    set_default(&mut spec, "serviceAccountName", json!(service_account));
    set_default(&mut spec, "serviceAccount", json!(service_account));
    for (field, value) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("securityContext", json!({})),
        ("schedulerName", json!("default-scheduler")),
        ("priority", json!(0)),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
    ] {
        set_default(&mut spec, field, value);
    }
    // DefaultTolerationSeconds.
    let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    let mut tolerations = tolerations;
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        if !tolerations.iter().any(|t| t["key"] == key) {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
    spec["tolerations"] = json!(tolerations);
    // ServiceAccount admission: the API access token, unless the pod opts out.
    if spec["automountServiceAccountToken"] != false {
        const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
        let volume = format!("kube-api-access-{:05x}", 0x1a2b3 + n);
        let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        volumes.push(json!({
            "name": volume,
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ],
                "defaultMode": 420
            }
        }));
        spec["volumes"] = json!(volumes);
        for field in ["initContainers", "containers"] {
            for container in spec[field].as_array_mut().into_iter().flatten() {
                let mounts = container["volumeMounts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !mounts.iter().any(|m| m["mountPath"] == MOUNT) {
                    let mut mounts = mounts;
                    mounts.push(json!({"name": volume, "readOnly": true, "mountPath": MOUNT}));
                    container["volumeMounts"] = json!(mounts);
                }
            }
        }
    }
    default_containers(&mut spec);
    (
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": spec, "status": {}}),
        format!("system:serviceaccount:kube-system:{controller}"),
    )
}

/// Whether a webhook's `rules` cover the creation of a pod.
fn rules_cover_pod_create(webhook: &Value) -> bool {
    let has = |list: &Value, wanted: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .any(|v| v == wanted || v == "*")
    };
    webhook["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|rule| {
            has(&rule["operations"], "CREATE")
                && has(&rule["apiGroups"], "")
                && has(&rule["apiVersions"], "v1")
                && has(&rule["resources"], "pods")
                && rule["scope"]
                    .as_str()
                    .is_none_or(|s| s == "*" || s == "Namespaced")
        })
}

/// The labels the API server gives a namespace.
fn namespace_object(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

// ---------------------------------------------------------------------------------------------
// The steps of the quickstart
// ---------------------------------------------------------------------------------------------

/// What this test does for a command of the quickstart.
#[derive(Debug)]
enum Step {
    DockerBuild {
        dockerfile: &'static str,
        tag: &'static str,
        context: &'static str,
    },
    KindLoad {
        image: &'static str,
    },
    ApplyKustomize {
        dir: &'static str,
    },
    ApplyFile {
        file: &'static str,
    },
    /// `kubectl apply -f -` of the line's heredoc.
    ApplyHeredoc,
    RolloutStatus {
        namespace: &'static str,
        kind: &'static str,
        name: &'static str,
    },
    CreateNamespace {
        name: &'static str,
    },
    LabelNamespace {
        name: &'static str,
        label: (&'static str, &'static str),
    },
    /// `get pod -l KEY=VALUE -o jsonpath='{.items[0].spec.initContainers[*].name}'`.
    InitContainerNames {
        namespace: &'static str,
        selector: (&'static str, &'static str),
        expected: &'static str,
    },
    /// `get PLURAL.GROUP` of a sigil CRD whose VALID column the comment names.
    ValidColumn {
        namespace: &'static str,
        resource: &'static str,
    },
    ExecCurl {
        namespace: &'static str,
        kind: &'static str,
        name: &'static str,
        url: &'static str,
        expected: &'static str,
    },
    PortForward {
        namespace: &'static str,
        kind: &'static str,
        name: &'static str,
        local: u16,
        remote: u16,
    },
    CurlLocal {
        port: u16,
        path: &'static str,
        out: &'static str,
    },
    /// `sigil inspect policy ARGS`, asking about pods the quickstart made.
    InspectPolicy {
        args: &'static [&'static str],
        expected: &'static str,
    },
    InspectCert {
        file: &'static str,
        bundle: &'static str,
        expected: &'static str,
    },
}

impl Step {
    /// What the README says the command prints (in its comment), where the step checks it.
    fn expected(&self) -> Option<&'static str> {
        match self {
            Step::InitContainerNames { expected, .. }
            | Step::ExecCurl { expected, .. }
            | Step::InspectPolicy { expected, .. }
            | Step::InspectCert { expected, .. } => Some(expected),
            _ => None,
        }
    }
}

/// The quickstart, command by command: each README line (as `CommandLine::text` reads it) and
/// the step that follows it. A line of the README that is not here, in this order, fails the
/// test, so the table (and with it the test) keeps up with the README.
const QUICKSTART: &[(&str, Step)] = &[
    (
        "docker build -f deploy/Dockerfile -t sigil:0.1.0 .",
        Step::DockerBuild {
            dockerfile: "deploy/Dockerfile",
            tag: "sigil:0.1.0",
            context: ".",
        },
    ),
    (
        "kind load docker-image sigil:0.1.0 # on kind; elsewhere push it and set `images:` in an \
         overlay",
        Step::KindLoad {
            image: "sigil:0.1.0",
        },
    ),
    (
        "kubectl apply -k deploy/",
        Step::ApplyKustomize { dir: "deploy/" },
    ),
    (
        "kubectl -n sigil-system rollout status deployment/sigil-ca",
        Step::RolloutStatus {
            namespace: "sigil-system",
            kind: "Deployment",
            name: "sigil-ca",
        },
    ),
    (
        "kubectl -n sigil-system rollout status daemonset/sigil-agent",
        Step::RolloutStatus {
            namespace: "sigil-system",
            kind: "DaemonSet",
            name: "sigil-agent",
        },
    ),
    (
        "kubectl create namespace demo",
        Step::CreateNamespace { name: "demo" },
    ),
    (
        "kubectl label namespace demo sigil.dev/inject=enabled",
        Step::LabelNamespace {
            name: "demo",
            label: ("sigil.dev/inject", "enabled"),
        },
    ),
    (
        "kubectl apply -f deploy/examples/workloads.yaml # web (a curl client) and db (an HTTP \
         service)",
        Step::ApplyFile {
            file: "deploy/examples/workloads.yaml",
        },
    ),
    (
        "kubectl -n demo rollout status deployment/db",
        Step::RolloutStatus {
            namespace: "demo",
            kind: "Deployment",
            name: "db",
        },
    ),
    (
        "kubectl -n demo get pod -l app=db -o jsonpath='{.items[0].spec.initContainers[*].name}'",
        Step::InitContainerNames {
            namespace: "demo",
            selector: ("app", "db"),
            expected: "sigil-init sigil-proxy",
        },
    ),
    ("kubectl apply -f - <<'YAML'", Step::ApplyHeredoc),
    (
        "kubectl -n demo get authorizationpolicies.sigil.dev # VALID is the CA's verdict on the \
         object",
        Step::ValidColumn {
            namespace: "demo",
            resource: "authorizationpolicies.sigil.dev",
        },
    ),
    (
        "kubectl -n demo exec deploy/web -- curl -s http://db/api/orders # orders",
        Step::ExecCurl {
            namespace: "demo",
            kind: "Deployment",
            name: "web",
            url: "http://db/api/orders",
            expected: "orders",
        },
    ),
    (
        "kubectl -n demo exec deploy/web -- curl -s http://db/admin # RBAC: access denied",
        Step::ExecCurl {
            namespace: "demo",
            kind: "Deployment",
            name: "web",
            url: "http://db/admin",
            expected: "RBAC: access denied",
        },
    ),
    (
        "sigil inspect policy -n demo --labels app=db --port 5678 --method GET --path /admin \
         --from spiffe://cluster.local/ns/demo/sa/web # DENY default, and why",
        Step::InspectPolicy {
            args: &[
                "inspect",
                "policy",
                "-n",
                "demo",
                "--labels",
                "app=db",
                "--port",
                "5678",
                "--method",
                "GET",
                "--path",
                "/admin",
                "--from",
                "spiffe://cluster.local/ns/demo/sa/web",
            ],
            expected: "DENY default",
        },
    ),
    (
        "kubectl -n demo port-forward deployment/db 15000:15000 &",
        Step::PortForward {
            namespace: "demo",
            kind: "Deployment",
            name: "db",
            local: 15000,
            remote: 15000,
        },
    ),
    (
        "curl -s localhost:15000/certs/chain.pem > db.pem",
        Step::CurlLocal {
            port: 15000,
            path: "/certs/chain.pem",
            out: "db.pem",
        },
    ),
    (
        "curl -s localhost:15000/certs/bundle.pem > bundle.pem",
        Step::CurlLocal {
            port: 15000,
            path: "/certs/bundle.pem",
            out: "bundle.pem",
        },
    ),
    (
        "sigil inspect cert db.pem --bundle bundle.pem # spiffe://cluster.local/ns/demo/sa/db, \
         validity, any profile problem",
        Step::InspectCert {
            file: "db.pem",
            bundle: "bundle.pem",
            expected: "spiffe://cluster.local/ns/demo/sa/db",
        },
    ),
];

/// The README's quickstart lines, in order, each with its step: every line must be the table's
/// next one, and what a step expects the command to print must be what the README's comment
/// (after the line, or under it) says first.
fn quickstart_steps(text: &str) -> Vec<(&'static Step, CommandLine)> {
    let blocks = quickstart_blocks(text);
    assert!(
        !blocks.is_empty(),
        "README.md's section {SECTION:?} has no shell block"
    );
    let lines: Vec<CommandLine> = blocks
        .iter()
        .flat_map(|b| command_lines(&b.lines))
        .collect();
    let readme: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    let table: Vec<&str> = QUICKSTART.iter().map(|(line, _)| *line).collect();
    if let Some(i) = (0..readme.len().max(table.len())).find(|&i| readme.get(i) != table.get(i)) {
        panic!(
            "README.md's quickstart and this test's table part at command {}: the README has \
             {:?}, the table {:?} (a step this test does not follow, or one it expects)",
            i + 1,
            lines
                .get(i)
                .map(|l| format!("README.md:{}: {}", l.line, l.text)),
            table.get(i)
        );
    }
    QUICKSTART
        .iter()
        .zip(lines)
        .map(|((_, step), line)| {
            if let Some(expected) = step.expected() {
                let said = line
                    .output
                    .as_deref()
                    .or(line.comment())
                    .unwrap_or_default();
                assert!(
                    said.starts_with(expected),
                    "README.md:{}: the test expects {expected:?}; the README says {said:?}",
                    line.line
                );
            }
            (step, line)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Following the steps
// ---------------------------------------------------------------------------------------------

/// A pod the quickstart made, as the API server stored it.
struct PodRecord {
    workload: Value,
    pod: Value,
}

/// The real CA, started as the rendered Deployment runs it.
struct Ca {
    process: CaProcess,
    ready: bool,
    workload: Value,
    container: String,
    webhook_port: u16,
}

struct Quickstart {
    cli: Cli,
    /// `sigil-proxy`'s, which injected proxies run.
    proxy_cli: Cli,
    /// What the built image's final stage puts where (COPY and ADD destinations).
    image_paths: BTreeSet<String>,
    dir: tempfile::TempDir,
    server: TestApiServer,
    kubeconfig: PathBuf,
    /// Everything applied, as applied (namespaces defaulted).
    objects: Vec<Value>,
    built: BTreeSet<String>,
    loaded: BTreeSet<String>,
    ca: Option<Ca>,
    pods: Vec<PodRecord>,
    /// Local port → pod index.
    forwards: BTreeMap<u16, usize>,
    /// File written by a `curl` → (admin path, pod index).
    files: BTreeMap<String, (String, usize)>,
    /// Where the step being followed is, for messages.
    at: String,
    reviews: usize,
}

impl Quickstart {
    async fn new() -> Quickstart {
        let server = TestApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        let mut quickstart = Quickstart {
            cli: Cli::sigil(),
            proxy_cli: Cli::sigil_proxy(),
            image_paths: BTreeSet::new(),
            dir,
            server,
            kubeconfig,
            objects: Vec::new(),
            built: BTreeSet::new(),
            loaded: BTreeSet::new(),
            ca: None,
            pods: Vec::new(),
            forwards: BTreeMap::new(),
            files: BTreeMap::new(),
            at: "a fresh cluster".into(),
            reviews: 0,
        };
        // A fresh cluster's namespaces.
        let fresh = ["default", "kube-system", "kube-public", "kube-node-lease"];
        quickstart
            .apply(fresh.iter().copied().map(namespace_object).collect(), None)
            .await;
        quickstart
    }

    fn fail(&self, message: impl Display) -> ! {
        panic!("{}:\n{message}", self.at)
    }

    fn find(&self, kind_: &str, ns: &str, name_: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| kind(o) == kind_ && namespace(o) == ns && name(o) == name_)
    }

    fn namespace_labels(&self, ns: &str) -> Option<Labels> {
        self.find("Namespace", "", ns).map(labels_of)
    }

    fn mutating_webhooks(&self) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|o| kind(o) == "MutatingWebhookConfiguration")
            .flat_map(|o| o["webhooks"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The workload (Deployment, DaemonSet) whose container runs `sigil PATH ...`, and that
    /// container.
    fn running(&self, path: &[&str]) -> Option<(Value, Value)> {
        self.objects.iter().find_map(|o| {
            all_containers(&o["spec"]["template"]["spec"])
                .into_iter()
                .find(|c| runs_subcommand(&manifests::args(c), path))
                .map(|c| (o.clone(), c.clone()))
        })
    }

    fn trust_domain(&self) -> TrustDomain {
        let Some((agent, container)) = self.running(&["agent", "run"]) else {
            self.fail("no workload runs the node agent (`sigil agent run`): who issues identities?")
        };
        let args = manifests::args(&container);
        let env = manifests::container_env(&agent, &container, "node-a");
        let td = self
            .cli
            .effective(&["agent", "run"], &args[2..], &env, "--trust-domain")
            .unwrap();
        TrustDomain::new(&td).unwrap()
    }

    fn identity(&self, pod: &Value) -> SpiffeId {
        SpiffeId::for_service_account(
            &self.trust_domain(),
            namespace(pod),
            pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default"),
        )
        .unwrap()
    }

    /// Whether an image is one the quickstart builds (same repository as a built tag).
    fn is_built_repository(&self, image: &str) -> bool {
        let repository = |i: &str| i.rsplit_once(':').map_or(i, |(r, _)| r).to_string();
        self.built
            .iter()
            .any(|b| repository(b) == repository(image))
    }

    async fn resource(&self, object: &Value) -> (ApiResource, Scope) {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind(object));
        match kube::discovery::pinned_kind(&self.server.client(), &gvk).await {
            Ok((resource, capabilities)) => (resource, capabilities.scope),
            Err(e) => self.fail(format!(
                "the cluster serves no {api_version} {} (is its CRD applied first?): {e}",
                kind(object)
            )),
        }
    }

    fn api(&self, resource: &ApiResource, scope: &Scope, ns: &str) -> Api<DynamicObject> {
        match scope {
            Scope::Namespaced => Api::namespaced_with(self.server.client(), ns, resource),
            Scope::Cluster => Api::all_with(self.server.client(), resource),
        }
    }

    /// `kubectl apply` of `objects` (`-n` being `default_ns`): each namespaced object's namespace
    /// must exist, custom resources must pass their CRD's schema, and every container of the
    /// quickstart's image must run a loaded image with arguments the binary accepts. Then the
    /// CA starts if it is among them, and the workloads' controllers create their pods.
    async fn apply(&mut self, objects: Vec<Value>, default_ns: Option<&str>) {
        let mut applied = Vec::new();
        for mut object in objects {
            let (resource, scope) = self.resource(&object).await;
            if scope == Scope::Namespaced {
                let ns = object["metadata"]["namespace"]
                    .as_str()
                    .or(default_ns)
                    .unwrap_or("default")
                    .to_string();
                object["metadata"]["namespace"] = json!(ns);
                if self.find("Namespace", "", &ns).is_none() {
                    self.fail(format!(
                        "{}: namespace {ns} does not exist (yet)",
                        describe(&object)
                    ));
                }
            }
            self.check_custom_resource(&object);
            self.check_images(&object);
            let api = self.api(&resource, &scope, namespace(&object));
            api.patch(
                name(&object),
                &PatchParams::apply("kubectl").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| self.fail(format!("applying {}: {e}", describe(&object))));
            self.objects.retain(|o| {
                (kind(o), namespace(o), name(o))
                    != (kind(&object), namespace(&object), name(&object))
            });
            self.objects.push(object.clone());
            applied.push(object);
        }
        if self.ca.is_none() && self.running(&["ca", "serve"]).is_some() {
            self.start_ca();
        }
        for workload in applied
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet"))
        {
            self.create_pod(workload).await;
        }
    }

    /// A custom resource the API server would accept: its CRD's schema, no unknown fields; and
    /// for sigil's kinds, sigil's own validation (the CA would mark it Valid).
    fn check_custom_resource(&self, object: &Value) {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let crds: Vec<Value> = self
            .objects
            .iter()
            .filter(|o| kind(o) == "CustomResourceDefinition")
            .cloned()
            .collect();
        let Some(schema) = manifests::crd_schema(&crds, api_version, kind(object)) else {
            return;
        };
        let problems = manifests::custom_resource_problems(&schema, object);
        if !problems.is_empty() {
            self.fail(format!(
                "{} does not pass its CRD's schema: {problems:#?}",
                describe(object)
            ));
        }
        if api_version.starts_with(&format!("{}/", sigil_policy::model::GROUP)) {
            use sigil_policy::model::{Kind, Object};
            let kind_ = Kind::from_name(kind(object)).unwrap();
            let valid = match Object::decode(kind_, object.clone()) {
                Ok(Object::AuthorizationPolicy(p)) => {
                    sigil_policy::validate::authorization_policy(&p)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                Ok(Object::PeerAuthentication(p)) => {
                    sigil_policy::validate::peer_authentication(&p)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = valid {
                self.fail(format!("sigil refuses {}: {e}", describe(object)));
            }
        }
    }

    /// Containers of the quickstart's image: a loaded tag, pulled only if absent (a loaded image
    /// is not in any registry), run through the image's entrypoint or its `/sigil-proxy`, with
    /// arguments that binary accepts.
    fn check_images(&self, object: &Value) {
        let spec = if kind(object) == "Pod" {
            &object["spec"]
        } else {
            &object["spec"]["template"]["spec"]
        };
        let top_level = help_subcommands(&self.cli.help::<&str>(&[]));
        for container in all_containers(spec) {
            let image = container["image"].as_str().unwrap_or_default();
            // sigil's containers: of the built image's repository, or running a subcommand of
            // sigil through the image's entrypoint, or the image's proxy.
            let runs_sigil = (container["command"].is_null()
                && manifests::args(container)
                    .first()
                    .is_some_and(|a| top_level.contains(a)))
                || container["command"] == json!([sigil_ca::inject::PROXY_COMMAND]);
            if !self.is_built_repository(image) && !runs_sigil {
                continue;
            }
            let what = format!("{} container {}", describe(object), container["name"]);
            if !self.loaded.contains(image) {
                self.fail(format!(
                    "{what} runs {image}, but the quickstart built and loaded only {:?}",
                    self.loaded
                ));
            }
            let policy = container["imagePullPolicy"]
                .as_str()
                .unwrap_or_else(|| default_pull_policy(image));
            if policy == "Always" {
                self.fail(format!(
                    "{what}: imagePullPolicy Always pulls {image} from a registry, where \
                     `kind load` did not put it"
                ));
            }
            let cli = self
                .binary_of(container)
                .unwrap_or_else(|e| self.fail(format!("{what} {e}")));
            if let Err(e) = cli.accepts(&manifests::args(container)) {
                self.fail(format!("{what}: the binary refuses its arguments: {e}"));
            }
        }
    }

    /// The binary a container of the built image runs: the entrypoint `/sigil` (no `command`, or
    /// `/sigil` itself) or `/sigil-proxy`, each where the image's final stage put it.
    fn binary_of(&self, container: &Value) -> Result<&Cli, String> {
        let command = &container["command"];
        let (path, cli) = if command.is_null() || *command == json!(["/sigil"]) {
            ("/sigil", &self.cli)
        } else if *command == json!([sigil_ca::inject::PROXY_COMMAND]) {
            (sigil_ca::inject::PROXY_COMMAND, &self.proxy_cli)
        } else {
            return Err(format!(
                "overrides the image's entrypoint with {command}, which is neither /sigil nor \
                 {}",
                sigil_ca::inject::PROXY_COMMAND
            ));
        };
        if !self.image_paths.contains(path) {
            return Err(format!(
                "runs {path}, which the image's final stage does not put there ({:?})",
                self.image_paths
            ));
        }
        Ok(cli)
    }

    /// Starts the real `sigil ca serve` as the rendered Deployment runs it: its arguments and
    /// its environment (as the flags that read it), on local ports.
    fn start_ca(&mut self) {
        let (workload, container) = self.running(&["ca", "serve"]).unwrap();
        let path = ["ca", "serve"];
        let args = manifests::args(&container);
        let env = manifests::container_env(&workload, &container, "node-a");
        let webhook_addr = self
            .cli
            .effective(&path, &args[2..], &env, "--webhook-addr")
            .unwrap();
        let proxy_image = self
            .cli
            .effective(&path, &args[2..], &env, "--proxy-image")
            .unwrap();
        if !self.loaded.contains(&proxy_image) {
            self.fail(format!(
                "the CA injects proxies of image {proxy_image}, which the quickstart did not \
                 build and load ({:?})",
                self.loaded
            ));
        }
        // The test picks the listening addresses.
        let local = ["--listen", "--admin-addr", "--webhook-addr"];
        let mut own = Vec::new();
        let mut rest = args[2..].iter();
        while let Some(arg) = rest.next() {
            if local.contains(&arg.as_str()) {
                rest.next();
            } else if !local.iter().any(|f| arg.starts_with(&format!("{f}="))) {
                own.push(arg.clone());
            }
        }
        for (var, value) in &env {
            if let Some(flag) = self.cli.flag_for_env(&path, var) {
                own.push(format!("{flag}={value}"));
            }
        }
        let process = CaProcess::start(self.dir.path(), Some(&self.kubeconfig), &own);
        self.ca = Some(Ca {
            process,
            ready: false,
            workload,
            container: container["name"].as_str().unwrap().to_string(),
            webhook_port: manifests::debug_port(&webhook_addr) as u16,
        });
    }

    async fn ca_ready(&mut self) {
        let Some(ca) = self.ca.as_mut() else {
            self.fail("the CA is not running")
        };
        if !ca.ready {
            ca.process.wait_ready().await;
            ca.ready = true;
        }
    }

    /// The controller of `workload` creates a pod: the API server calls the mutating webhooks
    /// that select it (the real injector, over HTTPS), applies their patches and its defaults,
    /// and stores the pod.
    async fn create_pod(&mut self, workload: &Value) {
        let (pod, user) = pod_from_template(workload, self.pods.len());
        let ns = namespace(workload).to_string();
        let namespace_labels = self
            .namespace_labels(&ns)
            .unwrap_or_else(|| self.fail(format!("namespace {ns} does not exist")));
        let pod_labels = labels_of(&pod);
        let webhooks: Vec<Value> = self
            .mutating_webhooks()
            .into_iter()
            .filter(|w| {
                rules_cover_pod_create(w)
                    && selects(&w["namespaceSelector"], &namespace_labels)
                    && selects(&w["objectSelector"], &pod_labels)
            })
            .collect();
        let mut pod = pod;
        for webhook in &webhooks {
            pod = self.call_webhook(webhook, pod, &user).await;
        }
        default_containers(&mut pod["spec"]);
        self.check_images(&pod);
        let (resource, scope) = self.resource(&pod).await;
        let created = self
            .api(&resource, &scope, &ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(pod).unwrap(),
            )
            .await
            .unwrap_or_else(|e| {
                self.fail(format!("creating a pod of {}: {e}", describe(workload)))
            });
        self.pods.push(PodRecord {
            workload: workload.clone(),
            pod: serde_json::to_value(created).unwrap(),
        });
    }

    /// The API server's call of a mutating webhook for a pod: an AdmissionReview POSTed to the
    /// webhook's Service over TLS verified with its caBundle; returns the patched pod.
    async fn call_webhook(&mut self, webhook: &Value, pod: Value, user: &str) -> Value {
        let service = &webhook["clientConfig"]["service"];
        if !service.is_object() {
            self.fail(format!(
                "webhook {} is not called through a Service",
                webhook["name"]
            ));
        }
        let (svc_ns, svc_name) = (
            service["namespace"].as_str().unwrap(),
            service["name"].as_str().unwrap(),
        );
        let port = service["port"].as_u64().unwrap_or(443) as u16;
        let Some(svc) = self.find("Service", svc_ns, svc_name).cloned() else {
            self.fail(format!(
                "webhook {} calls Service {svc_ns}/{svc_name}, which does not exist",
                webhook["name"]
            ))
        };
        // The Service's port leads to the CA's webhook listener.
        let Some(ca) = self.ca.as_ref() else {
            self.fail("a webhook selects the pod, but no CA runs to answer it (failurePolicy)")
        };
        let ca_container = manifests::container(&ca.workload, &ca.container);
        let target = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"] == port)
            .map(|p| p.get("targetPort").cloned().unwrap_or(json!(port)))
            .unwrap_or_else(|| self.fail(format!("Service {svc_name} has no port {port}")));
        let selector = json!({"matchLabels": svc["spec"]["selector"]});
        if !selects(&selector, &labels_of(&ca.workload["spec"]["template"])) {
            self.fail(format!(
                "Service {svc_name} does not select the CA's pods {}",
                describe(&ca.workload)
            ));
        }
        let container_port = manifests::container_port(ca_container, &target);
        if container_port != Some(u64::from(ca.webhook_port)) {
            self.fail(format!(
                "Service {svc_name} port {port} → {target} → container port {container_port:?}, \
                 but the CA serves the webhook on port {}",
                ca.webhook_port
            ));
        }
        self.ca_ready().await;
        let bundle = self.ca_bundle(webhook["name"].as_str().unwrap()).await;

        self.reviews += 1;
        let mut review: Value = serde_json::from_str(REVIEW).unwrap();
        let uid = format!("5f0c8c3a-4a1e-4b0e-9f3a-{:012x}", self.reviews);
        review["request"]["uid"] = json!(uid);
        review["request"]["namespace"] = pod["metadata"]["namespace"].clone();
        review["request"]["userInfo"]["username"] = json!(user);
        review["request"]["object"] = pod;
        let path = format!(
            "{}?timeout={}s",
            service["path"].as_str().unwrap_or("/"),
            webhook["timeoutSeconds"].as_u64().unwrap_or(10)
        );
        let addr = self.ca.as_ref().unwrap().process.webhook;
        let (status, body) = admission::post(
            addr,
            &format!("{svc_name}.{svc_ns}.svc"),
            port,
            &path,
            &bundle,
            serde_json::to_vec(&review).unwrap(),
        )
        .await;
        let response: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            self.fail(format!(
                "webhook answered {status} with no AdmissionReview ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        });
        if status != 200
            || response["response"]["uid"] != json!(uid)
            || response["response"]["allowed"] != true
        {
            self.fail(format!(
                "the injector refused a pod of {}/{}: {status} {response:#}",
                review["request"]["namespace"],
                review["request"]["object"]["metadata"]["generateName"]
            ));
        }
        admission::apply(&review, &response)
    }

    /// The caBundle the CA wrote into webhook `webhook` of the stored configuration.
    async fn ca_bundle(&self, webhook: &str) -> Vec<u8> {
        let configs: Api<MutatingWebhookConfiguration> = Api::all(self.server.client());
        let deadline = Instant::now() + WAIT;
        loop {
            for config in configs.list(&ListParams::default()).await.unwrap() {
                for w in config.webhooks.into_iter().flatten() {
                    if w.name == webhook
                        && let Some(bundle) = w.client_config.ca_bundle
                    {
                        return bundle.0;
                    }
                }
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "the CA never filled in the caBundle of webhook {webhook}:\n{}",
                    self.ca.as_ref().unwrap().process.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pods_of(&self, kind_: &str, ns: &str, name_: &str) -> Vec<usize> {
        if self.find(kind_, ns, name_).is_none() {
            self.fail(format!("there is no {kind_} {ns}/{name_}"));
        }
        let pods: Vec<usize> = (0..self.pods.len())
            .filter(|&i| {
                let w = &self.pods[i].workload;
                (kind(w), namespace(w), name(w)) == (kind_, ns, name_)
            })
            .collect();
        if pods.is_empty() {
            self.fail(format!("{kind_} {ns}/{name_} has no pods"));
        }
        pods
    }

    fn is_meshed(pod: &Value) -> bool {
        labels_of(pod)
            .get(sigil_proxy_api::TLS_MODE_LABEL)
            .map(String::as_str)
            == Some(sigil_proxy_api::TLS_MODE_MTLS)
    }

    /// The applied policy objects, as a file for `sigil inspect policy --policy-file`.
    fn policy_file(&self) -> PathBuf {
        let group = format!("{}/", sigil_policy::model::GROUP);
        let text: Vec<String> = self
            .objects
            .iter()
            .filter(|o| {
                o["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&group)
            })
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        let path = self.dir.path().join("applied-policies.yaml");
        std::fs::write(&path, text.join("\n---\n")).unwrap();
        path
    }

    /// `sigil inspect policy ARGS`: the decision (true for ALLOW) and the output.
    fn inspect_policy(&self, args: &[String]) -> (bool, String) {
        let out = run_sigil(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        match out.status.code() {
            Some(0) => (true, stdout),
            Some(1) => (false, stdout),
            _ => self.fail(format!(
                "`sigil {}` failed ({}): {}{stdout}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    async fn follow(&mut self, step: &Step, line: &CommandLine) {
        match *step {
            Step::DockerBuild {
                dockerfile,
                tag,
                context,
            } => self.docker_build(dockerfile, tag, context),
            Step::KindLoad { image } => {
                if !self.built.contains(image) {
                    self.fail(format!("{image} was not built (built: {:?})", self.built));
                }
                self.loaded.insert(image.to_string());
            }
            Step::ApplyKustomize { dir } => {
                let objects = manifests::kustomize(&repo().join(dir));
                self.apply(objects, None).await;
            }
            Step::ApplyFile { file } => {
                let path = repo().join(file);
                if !path.is_file() {
                    self.fail(format!("{file} does not exist"));
                }
                self.apply(manifests::yaml_file(&path), None).await;
            }
            Step::ApplyHeredoc => {
                let Some((_, body)) = &line.heredoc else {
                    self.fail("the line has no heredoc")
                };
                let objects = sigil_test_apiserver::parse_manifest(body)
                    .unwrap_or_else(|e| self.fail(format!("the heredoc is not YAML: {e}")));
                if objects.is_empty() {
                    self.fail("the heredoc has no object");
                }
                self.apply(objects, None).await;
            }
            Step::RolloutStatus {
                namespace,
                kind,
                name,
            } => {
                self.pods_of(kind, namespace, name);
                let is_ca = self.ca.as_ref().is_some_and(|ca| {
                    (
                        self::kind(&ca.workload),
                        self::namespace(&ca.workload),
                        self::name(&ca.workload),
                    ) == (kind, namespace, name)
                });
                if is_ca {
                    // Its readiness probe is the real CA's /ready.
                    self.ca_ready().await;
                }
            }
            Step::CreateNamespace { name } => {
                if self.find("Namespace", "", name).is_some() {
                    self.fail(format!("namespace {name} already exists"));
                }
                self.apply(vec![namespace_object(name)], None).await;
            }
            Step::LabelNamespace { name, label } => self.label_namespace(name, label).await,
            Step::InitContainerNames {
                namespace,
                selector: (key, value),
                expected,
            } => {
                let pods: Api<DynamicObject> = Api::namespaced_with(
                    self.server.client(),
                    namespace,
                    &ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                );
                let list = pods
                    .list(&ListParams::default().labels(&format!("{key}={value}")))
                    .await
                    .unwrap();
                let items: Vec<Value> = list
                    .items
                    .into_iter()
                    .map(|p| serde_json::to_value(p).unwrap())
                    .collect();
                // The API server's own selector semantics and ours agree.
                let ours = self
                    .pods
                    .iter()
                    .filter(|p| {
                        self::namespace(&p.pod) == namespace
                            && labels_of(&p.pod).get(key).map(String::as_str) == Some(value)
                    })
                    .count();
                assert_eq!(
                    items.len(),
                    ours,
                    "{}: pods matching {key}={value}",
                    self.at
                );
                // `{.items[0].spec.initContainers[*].name}`, printed as kubectl prints it.
                let Some(first) = items.first() else {
                    self.fail(format!("no pod in {namespace} has {key}={value}"))
                };
                let output = first["spec"]["initContainers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["name"].as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                if output != expected {
                    self.fail(format!("prints {output:?}; the README says {expected:?}"));
                }
            }
            Step::ValidColumn {
                namespace,
                resource,
            } => self.valid_column(namespace, resource).await,
            Step::ExecCurl {
                namespace,
                kind,
                name,
                url,
                expected,
            } => self.exec_curl(namespace, kind, name, url, expected),
            Step::PortForward {
                namespace,
                kind,
                name,
                local,
                remote,
            } => {
                let pod = self.pods_of(kind, namespace, name)[0];
                let spec = &self.pods[pod].pod["spec"];
                let admin = all_containers(spec)
                    .into_iter()
                    .filter(|c| c["command"] == json!([sigil_ca::inject::PROXY_COMMAND]))
                    .map(manifests::args)
                    .filter(|args| runs_subcommand(args, &["run"]))
                    .map(|args| {
                        self.proxy_cli
                            .effective(&["run"], &args[1..], &[], "--admin-addr")
                            .unwrap()
                    })
                    .next()
                    .unwrap_or_else(|| self.fail(format!("{kind} {name}'s pod runs no proxy")));
                let (host, port) = admin.rsplit_once(':').unwrap();
                if port != remote.to_string() {
                    self.fail(format!(
                        "forwards to port {remote}, but the injected proxy's admin endpoint is \
                         {admin}"
                    ));
                }
                // kubectl port-forward connects to the port on the pod's loopback.
                if !matches!(host, "127.0.0.1" | "0.0.0.0" | "[::]" | "localhost") {
                    self.fail(format!(
                        "the proxy's admin endpoint {admin} is not on loopback"
                    ));
                }
                self.forwards.insert(local, pod);
            }
            Step::CurlLocal { port, path, out } => {
                let Some(&pod) = self.forwards.get(&port) else {
                    self.fail(format!("nothing forwards local port {port}"))
                };
                let admin = std::fs::read_to_string(repo().join("proxy/src/admin.rs")).unwrap();
                if !admin.contains(&format!(".route(\"{path}\"")) {
                    self.fail(format!(
                        "the proxy's admin endpoint (proxy/src/admin.rs) has no route {path}"
                    ));
                }
                self.files.insert(out.to_string(), (path.to_string(), pod));
            }
            Step::InspectPolicy { args, expected } => self.readme_inspect_policy(args, expected),
            Step::InspectCert {
                file,
                bundle,
                expected,
            } => {
                let source = |f: &str| {
                    self.files
                        .get(f)
                        .cloned()
                        .unwrap_or_else(|| self.fail(format!("no step wrote {f}")))
                };
                let (chain_path, pod) = source(file);
                let (bundle_path, bundle_pod) = source(bundle);
                if chain_path != "/certs/chain.pem" || bundle_path != "/certs/bundle.pem" {
                    self.fail(format!(
                        "{file} holds {chain_path} and {bundle} holds {bundle_path}: the chain \
                         and the bundle are the other way round"
                    ));
                }
                assert_eq!(pod, bundle_pod, "{}: both from one pod", self.at);
                let id = self.identity(&self.pods[pod].pod).to_string();
                if expected != id {
                    self.fail(format!(
                        "the certificate of that pod is {id}; the README says {expected:?}"
                    ));
                }
            }
        }
    }

    fn docker_build(&mut self, dockerfile: &str, tag: &str, context: &str) {
        // The README's commands run from the repository root.
        let context = repo().join(context);
        if !context.join("Cargo.toml").is_file() {
            self.fail(format!(
                "the build context {} has no Cargo.toml",
                context.display()
            ));
        }
        let path = repo().join(dockerfile);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| self.fail(format!("{}: {e}", path.display())));
        let instructions = dockerfile_instructions(&text);
        let last_stage = instructions
            .iter()
            .rposition(|(i, _)| i == "FROM")
            .unwrap_or_else(|| self.fail(format!("{dockerfile} has no FROM")));
        let run = &instructions[last_stage..];
        let entrypoint = run
            .iter()
            .rev()
            .find(|(i, _)| i == "ENTRYPOINT")
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| {
                self.fail(format!("{dockerfile}: the final stage has no ENTRYPOINT"))
            });
        let program = serde_json::from_str::<Vec<String>>(&entrypoint)
            .ok()
            .and_then(|e| e.first().cloned())
            .or_else(|| entrypoint.split_whitespace().next().map(str::to_string));
        if program.as_deref() != Some("/sigil") {
            self.fail(format!(
                "{dockerfile}: the final stage's ENTRYPOINT is {entrypoint}, not /sigil"
            ));
        }
        self.image_paths = run
            .iter()
            .filter(|(i, _)| i == "COPY" || i == "ADD")
            .filter_map(|(_, rest)| rest.split_whitespace().last().map(str::to_string))
            .collect();
        if !self.image_paths.contains("/sigil") {
            self.fail(format!(
                "{dockerfile}: the final stage puts nothing at /sigil"
            ));
        }
        // The tag is what the CA injects when nothing overrides it.
        let default_image = self
            .cli
            .effective(&["ca", "serve"], &[], &[], "--proxy-image")
            .unwrap();
        assert_eq!(
            default_image,
            sigil_ca::inject::DEFAULT_PROXY_IMAGE,
            "`sigil ca serve --help` shows the default proxy image"
        );
        if tag != default_image {
            self.fail(format!(
                "builds {tag}, but the CA injects {default_image} by default"
            ));
        }
        self.built.insert(tag.to_string());
    }

    async fn label_namespace(&mut self, ns: &str, (key, value): (&str, &str)) {
        let Some(mut object) = self.find("Namespace", "", ns).cloned() else {
            self.fail(format!("namespace {ns} does not exist"))
        };
        let before = labels_of(&object);
        object["metadata"]["labels"][key] = json!(value);
        let after = labels_of(&object);
        self.apply(vec![object], None).await;
        // Labelling is what puts the namespace under the injection webhook (as the API server
        // labels it, with its name), and only where the README says: never in the system
        // namespaces or sigil's own, however they are labelled.
        let mut newly_selecting = 0;
        for webhook in self.mutating_webhooks() {
            let selector = &webhook["namespaceSelector"];
            if selects(selector, &before) || !selects(selector, &after) {
                continue;
            }
            newly_selecting += 1;
            for system in [
                "kube-system",
                "kube-public",
                "kube-node-lease",
                "sigil-system",
            ] {
                let mut labels = after.clone();
                labels.insert("kubernetes.io/metadata.name".into(), system.into());
                if selects(selector, &labels) {
                    self.fail(format!(
                        "webhook {} would also inject into {system} labelled so",
                        webhook["name"]
                    ));
                }
            }
        }
        if newly_selecting == 0 {
            self.fail(format!(
                "labelling namespace {ns} {key}={value} puts it under no webhook that did not \
                 already select it"
            ));
        }
    }

    /// `kubectl get PLURAL.GROUP`: the CRD has a VALID column (the README's comment names it),
    /// and it shows True for every listed object once the CA has checked them.
    async fn valid_column(&self, ns: &str, resource: &str) {
        /// The column's JSONPath in the CRDs, which the CA's `Valid` condition fills.
        const VALID_PATH: &str = r#".status.conditions[?(@.type=="Valid")].status"#;
        let crd = self
            .objects
            .iter()
            .find(|o| {
                // kubectl resolves PLURAL.GROUP.
                kind(o) == "CustomResourceDefinition"
                    && format!(
                        "{}.{}",
                        o["spec"]["names"]["plural"].as_str().unwrap_or_default(),
                        o["spec"]["group"].as_str().unwrap_or_default()
                    ) == resource
            })
            .unwrap_or_else(|| self.fail(format!("no CRD {resource} was applied")));
        let version = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["storage"] == true)
            .unwrap();
        let columns = version["additionalPrinterColumns"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(valid) = columns.iter().find(|c| c["name"] == "Valid") else {
            self.fail(format!(
                "kubectl shows no VALID column for {resource} ({:?})",
                columns.iter().map(|c| &c["name"]).collect::<Vec<_>>()
            ))
        };
        if valid["jsonPath"] != VALID_PATH {
            self.fail(format!(
                "the VALID column shows {}, not the Valid condition ({VALID_PATH})",
                valid["jsonPath"]
            ));
        }
        let resource_ = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                crd["spec"]["group"].as_str().unwrap(),
                version["name"].as_str().unwrap(),
                crd["spec"]["names"]["kind"].as_str().unwrap(),
            ),
            crd["spec"]["names"]["plural"].as_str().unwrap(),
        );
        let api: Api<DynamicObject> = Api::namespaced_with(self.server.client(), ns, &resource_);
        // The CA's verdict: every listed policy Valid.
        let deadline = Instant::now() + WAIT;
        loop {
            let items: Vec<Value> = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|o| serde_json::to_value(o).unwrap())
                .collect();
            if items.is_empty() {
                self.fail(format!("kubectl -n {ns} get {resource} lists nothing"));
            }
            let shown: Vec<String> = items
                .iter()
                .map(|i| {
                    let conditions = i["status"]["conditions"].as_array().into_iter().flatten();
                    conditions
                        .filter(|c| c["type"] == "Valid")
                        .filter_map(|c| c["status"].as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            if shown.iter().all(|s| s == "True") {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "the VALID column shows {shown:?}, not True: {items:#?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kubectl exec WORKLOAD -- curl -s http://SERVICE/PATH`, predicted: through the caller's
    /// proxy (mTLS with its identity) to a pod of the Service, whose proxy decides with the
    /// applied policies (`sigil inspect policy`), then the app answers or the proxy says 403.
    fn exec_curl(&self, ns: &str, kind_: &str, name_: &str, url: &str, expected: &str) {
        let caller = &self.pods[self.pods_of(kind_, ns, name_)[0]].pod;
        let workload = self.find(kind_, ns, name_).unwrap();
        // kubectl exec runs in the default container: the app's, not sigil's.
        let default_container =
            caller["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
                .as_str()
                .or(caller["spec"]["containers"][0]["name"].as_str())
                .unwrap_or_default();
        let own: Vec<&str> = workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        if !own.contains(&default_container) {
            self.fail(format!(
                "kubectl exec would run curl in container {default_container}, not in {own:?}"
            ));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            self.fail(format!("{url}: only http:// URLs are followed"))
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = format!("/{path}");
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, p.parse::<u64>().unwrap()),
            None => (authority, 80),
        };
        let mut labels = host.split('.');
        let svc_name = labels.next().unwrap();
        let svc_ns = labels.next().unwrap_or(ns);
        let Some(svc) = self.find("Service", svc_ns, svc_name) else {
            self.fail(format!("there is no Service {svc_ns}/{svc_name}"))
        };
        let target = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"] == port)
            .map(|p| p.get("targetPort").cloned().unwrap_or(json!(port)))
            .unwrap_or_else(|| self.fail(format!("Service {svc_name} has no port {port}")));
        let selector = json!({"matchLabels": svc["spec"]["selector"]});
        let backends: Vec<&Value> = self
            .pods
            .iter()
            .map(|p| &p.pod)
            .filter(|p| namespace(p) == svc_ns && selects(&selector, &labels_of(p)))
            .collect();
        if backends.is_empty() {
            self.fail(format!("Service {svc_name} selects no pod"));
        }
        // The client's proxy originates mTLS to the Service only if it is a mesh member: every
        // pod behind it meshed, as one identity.
        let identities: BTreeSet<String> = backends
            .iter()
            .map(|p| self.identity(p).to_string())
            .collect();
        let meshed = Self::is_meshed(caller);
        if !backends.iter().all(|p| Self::is_meshed(p)) || identities.len() != 1 || !meshed {
            self.fail(format!(
                "the call is not mTLS between meshed pods (caller meshed: {meshed}, backends' \
                 identities {identities:?}): the README's outputs assume it is"
            ));
        }
        for backend in backends {
            let (container, port) = backend["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|c| manifests::container_port(c, &target).map(|p| (c, p)))
                .unwrap_or_else(|| {
                    self.fail(format!(
                        "no container of {} listens on {target}",
                        name(backend)
                    ))
                });
            let labels: Vec<String> = labels_of(backend)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let args: Vec<String> = [
                "inspect",
                "policy",
                "--policy-file",
                self.policy_file().to_str().unwrap(),
                "-n",
                svc_ns,
                "--labels",
                &labels.join(","),
                "--from",
                &self.identity(caller).to_string(),
                "--port",
                &port.to_string(),
                "--method",
                "GET",
                "--path",
                &path,
            ]
            .map(str::to_string)
            .to_vec();
            let (allowed, decision) = self.inspect_policy(&args);
            let output = if allowed {
                // The app's answer: http-echo's `-text=`.
                manifests::args(container)
                    .iter()
                    .find_map(|a| a.strip_prefix("-text=").map(str::to_string))
                    .unwrap_or_else(|| {
                        self.fail(format!(
                            "allowed ({decision}), but what does container {} answer?",
                            container["name"]
                        ))
                    })
            } else {
                sigil_proxy::l7::DENIED_BODY.trim_end().to_string()
            };
            if output != expected {
                self.fail(format!(
                    "curl prints {output:?} (`sigil {}`: {decision}); the README says {expected:?}",
                    args.join(" ")
                ));
            }
        }
    }

    /// The README's own `sigil inspect policy` line reads the cluster; here it reads the applied
    /// policies. Its first output line starts as the README's comment says.
    fn readme_inspect_policy(&self, args: &[&str], expected: &str) {
        // It asks about pods that exist, on a port they declare.
        let value = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1).copied())
        };
        let ns = value("-n")
            .or(value("--namespace"))
            .unwrap_or_else(|| self.fail("no -n"));
        if let (Some(labels), Some(port)) = (value("--labels"), value("--port")) {
            let Some((key, value)) = labels.split_once('=').filter(|_| !labels.contains(','))
            else {
                self.fail(format!("--labels {labels}: one KEY=VALUE is followed"))
            };
            let declares = self.pods.iter().any(|p| {
                namespace(&p.pod) == ns
                    && labels_of(&p.pod).get(key).map(String::as_str) == Some(value)
                    && p.pod["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| {
                            manifests::container_port(c, &json!(port.parse::<u64>().unwrap()))
                                .is_some()
                        })
            });
            if !declares {
                self.fail(format!(
                    "no pod in {ns} with labels {labels} declares port {port}"
                ));
            }
        }
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !args.iter().any(|a| a == "--policy-file") {
            args.push("--policy-file".into());
            args.push(self.policy_file().to_str().unwrap().into());
        }
        let (_, output) = self.inspect_policy(&args);
        let first = output.lines().next().unwrap_or_default();
        if !first.starts_with(expected) {
            self.fail(format!(
                "prints {first:?} first; the README says {expected:?}\n{output}"
            ));
        }
    }

    /// After the last step: every pod the quickstart made is one Kubernetes 1.30 and the newest
    /// version accept, and each meshed pod runs `/sigil proxy init` and `/sigil-proxy run`.
    fn finish(&self) {
        let mut meshed = 0;
        for record in &self.pods {
            if !Self::is_meshed(&record.pod) {
                continue;
            }
            meshed += 1;
            // What each container runs: its binary's name and its arguments.
            let commands: Vec<(&str, Vec<String>)> = all_containers(&record.pod["spec"])
                .into_iter()
                .filter_map(|c| Some((self.binary_of(c).ok()?.name(), manifests::args(c))))
                .collect();
            for (binary, subcommand) in
                [("sigil", &["proxy", "init"][..]), ("sigil-proxy", &["run"])]
            {
                assert!(
                    commands
                        .iter()
                        .any(|(name, args)| *name == binary && runs_subcommand(args, subcommand)),
                    "{}: an injected pod runs no `{binary} {}`: {:#}",
                    describe(&record.workload),
                    subcommand.join(" "),
                    record.pod
                );
            }
        }
        assert!(meshed > 0, "the quickstart meshes no pod");
        let pods: Vec<Value> = self.pods.iter().map(|p| p.pod.clone()).collect();
        let (_, problems) = manifests::kubernetes_schema_problems(&pods, &["1.30", "latest"]);
        assert!(
            problems.is_empty(),
            "pods the quickstart creates that Kubernetes refuses: {problems:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_quickstart_works_as_far_as_it_can_without_a_cluster() {
    let steps = quickstart_steps(&readme());
    let mut quickstart = Quickstart::new().await;
    for (step, line) in steps {
        quickstart.at = format!("README.md:{}: `{}`", line.line, line.text);
        eprintln!("following {}", quickstart.at);
        quickstart.follow(step, &line).await;
    }
    quickstart.at = "after the last step".into();
    quickstart.finish();
}

#[test]
fn every_sigil_command_line_in_the_readme_is_accepted_by_the_binary() {
    let cli = Cli::sigil();
    let mut checked = Vec::new();
    let mut refused = Vec::new();
    for block in code_blocks(&readme()).iter().filter(|b| is_shell(&b.lang)) {
        for line in command_lines(&block.lines) {
            for args in sigil_invocations(&line) {
                match cli.accepts(&args) {
                    Ok(()) => {
                        checked.push(format!("README.md:{}: sigil {}", line.line, args.join(" ")))
                    }
                    Err(e) => {
                        refused.push(format!("README.md:{}: {}\n  {e}", line.line, line.text))
                    }
                }
            }
        }
    }
    assert!(
        refused.is_empty(),
        "the binary refuses:\n{}",
        refused.join("\n")
    );
    // The extraction finds the README's commands (the demo, each component, the CLI tools).
    for wanted in [
        "sigil demo",
        "sigil ca serve",
        "sigil agent run",
        "sigil proxy run",
        "sigil proxy init",
        "sigil inspect policy",
        "sigil inspect cert",
    ] {
        assert!(
            checked
                .iter()
                .any(|c| c.contains(&format!("{wanted} ")) || c.ends_with(wanted)),
            "no `{wanted}` line found in README.md; found:\n{}",
            checked.join("\n")
        );
    }
    eprintln!(
        "{} sigil command lines accepted:\n{}",
        checked.len(),
        checked.join("\n")
    );
}

/// The checks above bite: the parser check refuses what clap refuses, even before a
/// subcommand; extraction skips heredocs and comments; a quickstart line the table does not
/// have, or a README comment that says otherwise than the table, is refused; the selector
/// semantics are Kubernetes'.
#[test]
fn the_checks_bite() {
    let cli = Cli::sigil();
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    for good in [
        "inspect cert db.pem --bundle bundle.pem",
        "--log-format text demo",
        "proxy init --proxy-uid 1337",
    ] {
        assert_eq!(cli.accepts(&words(good)), Ok(()), "{good}");
    }
    for bad in [
        "inspect cert db.pem --bundle bundle.pem --made-up-flag",
        "inspect cert db.pem --made-up-flag x --bundle bundle.pem",
        "--made-up-flag demo",
        "proxy init --proxy-uid not-a-number",
        "--log-format bogus demo",
        "inspect certificate db.pem",
        "inspect cert db.pem extra.pem",
    ] {
        let refused = cli.accepts(&words(bad));
        assert!(refused.is_err(), "`sigil {bad}` passes the check");
    }
    assert_eq!(
        cli.check_args(&words("--log-format text ca serve --state-dir x")),
        words("ca serve --state-dir x --log-format text --help")
    );

    // Extraction: continuation lines, `sudo`, `env`, `cargo run`, quotes, comments, heredoc
    // bodies, `;`, pipes and `&`.
    let block: Vec<(usize, String)> = [
        "# sigil made-up (a comment)",
        "cargo run --release -- demo   # about 15 s",
        "cargo test -- --not-sigil",
        "sudo sigil inspect agent \\",
        "    --socket /tmp/s.sock   # identities",
        "cat > x.yaml <<'YAML'",
        "sigil not-a-command --in-a-heredoc",
        "YAML",
        "curl -s localhost:15014/ready; sigil ca init --state-dir s | grep x",
        "kubectl -n x exec deploy/a -- /sigil ca rotate-root &",
        "env RUST_LOG=debug sigil inspect policy --path '/a b'",
    ]
    .iter()
    .enumerate()
    .map(|(i, l)| (i + 1, l.to_string()))
    .collect();
    let lines = command_lines(&block);
    let found: Vec<String> = lines
        .iter()
        .flat_map(sigil_invocations)
        .map(|a| a.join("|"))
        .collect();
    assert_eq!(
        found,
        [
            "demo",
            "inspect|agent|--socket|/tmp/s.sock",
            "ca|init|--state-dir|s",
            "ca|rotate-root",
            "inspect|policy|--path|/a b",
        ]
    );
    assert_eq!(
        lines[2].text,
        "sudo sigil inspect agent --socket /tmp/s.sock # identities"
    );
    assert_eq!(lines[2].comment(), Some("identities"));
    assert_eq!(
        lines[3].heredoc,
        Some((
            "YAML".to_string(),
            "sigil not-a-command --in-a-heredoc\n".to_string()
        ))
    );

    // A quickstart the table does not have (another step, another flag), or whose comment
    // says another output, is refused.
    let readme = readme();
    for (from, to) in [
        (
            "kubectl apply -k deploy/\n",
            "kubectl apply -k deploy/ --server-side\n",
        ),
        (
            "kubectl create namespace demo\n",
            "kubectl create namespace demo\nhelm install sigil deploy/\n",
        ),
        ("# sigil-init sigil-proxy", "# sigil-proxy"),
        (
            "curl -s http://db/admin        # RBAC: access denied",
            "curl -s http://db/admin # RBAC: access denied",
        ),
    ] {
        assert!(readme.contains(from), "README.md has no {from:?}");
        let changed = readme.replacen(from, to, 1);
        let followed = std::panic::catch_unwind(|| quickstart_steps(&changed).len());
        if from.starts_with("curl") {
            // Blanks are not part of a line's meaning.
            assert_eq!(followed.ok(), Some(QUICKSTART.len()), "{to}");
        } else {
            assert!(followed.is_err(), "a README with {to:?} is followed");
        }
    }
    let comment = "# spiffe://cluster.local/ns/demo/sa/db, validity";
    assert!(readme.contains(comment));
    let wrong_identity = readme.replacen(
        comment,
        "# spiffe://cluster.local/ns/demo/sa/web, validity",
        1,
    );
    assert!(std::panic::catch_unwind(|| quickstart_steps(&wrong_identity)).is_err());

    // Label selectors.
    let labels: Labels = [
        ("sigil.dev/inject", "enabled"),
        ("kubernetes.io/metadata.name", "demo"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    let expression = |op: &str, values: &[&str]| json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": op, "values": values}]});
    assert!(selects(&Value::Null, &labels));
    assert!(selects(
        &json!({"matchLabels": {"sigil.dev/inject": "enabled"}}),
        &labels
    ));
    assert!(!selects(
        &json!({"matchLabels": {"sigil.dev/inject": "disabled"}}),
        &labels
    ));
    assert!(selects(&expression("In", &["demo"]), &labels));
    assert!(!selects(&expression("In", &["kube-system"]), &labels));
    assert!(!selects(&expression("NotIn", &["demo"]), &labels));
    assert!(selects(
        &expression("NotIn", &["kube-system"]),
        &Labels::new()
    ));
    assert!(selects(&expression("Exists", &[]), &labels));
    assert!(!selects(&expression("DoesNotExist", &[]), &labels));
}
