//! README.md's cluster quickstart (`## Install in a cluster`), followed as far as it can be
//! without a cluster or Docker. The test reads README.md when it runs and follows each command of
//! the section's shell block in order, against a model of the cluster: the Kubernetes API test
//! double holding what each `kubectl` step applies, the real `sigil ca serve` started as the
//! rendered CA Deployment configures it (it fills in the webhook's caBundle, answers the injection
//! webhook over HTTPS and writes the policies' `Valid` condition), and the real `sigil` binary for
//! the commands an operator runs. Every command line needs a recognizer here: a step this test
//! does not know fails it, so the test keeps up with the README.
//!
//! What each step becomes:
//! 1. `docker build` / `kind load`: the Dockerfile exists, its final stage runs `/sigil`, and the
//!    tag is the image the rendered manifests run and the CA injects by default.
//! 2. `kubectl apply -k`: renders with the real kubectl's kustomize; every container of the
//!    built image has its arguments accepted by the binary; the CA starts; `rollout status`
//!    names objects that exist in that namespace (and waits for the CA to be ready).
//! 3. `create` / `label namespace`, `apply -f`: the rendered webhook's selectors (with the
//!    API server's semantics) decide which pods are sent to the real injector, as AdmissionReviews
//!    shaped like the API server's; the returned patch is applied, and `get ... -o jsonpath` is
//!    evaluated on the result and compared with the README's expected-output comment.
//! 4. The heredoc policy passes the rendered CRD's schema and sigil's validation, the CA marks it
//!    Valid (the VALID column), and each `exec ... curl` has its README output predicted by
//!    `sigil inspect policy` with the applied policies (the app's answer, or the proxy's 403 body).
//! 5. `port-forward`, `curl` and `sigil inspect cert`: the forwarded port is the injected proxy's
//!    admin port, the paths are admin routes, and the identity in the comment is the pod's.
//!
//! Separately, every `sigil ...` command line in README.md's shell blocks is run through the real
//! binary's argument parser (with `--help` appended), and control cases prove those checks bite.

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
use sigil_test_harness::{CaProcess, sigil_exe};
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

/// A shell word (quotes removed) or operator.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Op(String),
}

/// Splits one shell command line into words and operators, as sh would (single and double
/// quotes, backslashes); what follows a `#` at the start of a word is the trailing comment.
fn tokenize(text: &str) -> (Vec<Tok>, Option<String>) {
    fn flush(word: &mut String, in_word: &mut bool, toks: &mut Vec<Tok>) {
        if *in_word {
            toks.push(Tok::Word(std::mem::take(word)));
            *in_word = false;
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut comment = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => flush(&mut word, &mut in_word, &mut toks),
            '#' if !in_word => {
                comment = Some(chars[i + 1..].iter().collect::<String>().trim().to_string());
                break;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                assert!(i < chars.len(), "unterminated ' in: {text}");
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`'))
                    {
                        i += 1;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
                assert!(i < chars.len(), "unterminated \" in: {text}");
            }
            '\\' => {
                in_word = true;
                i += 1;
                if let Some(&next) = chars.get(i) {
                    word.push(next);
                }
            }
            '|' | '&' | ';' | '<' | '>' => {
                flush(&mut word, &mut in_word, &mut toks);
                let mut op = c.to_string();
                while let Some(&next) = chars.get(i + 1) {
                    if !matches!(
                        (op.as_str(), next),
                        ("|", '|') | ("&", '&') | (">", '>') | ("<", '<') | ("<<", '-')
                    ) {
                        break;
                    }
                    op.push(next);
                    i += 1;
                }
                toks.push(Tok::Op(op));
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
        i += 1;
    }
    flush(&mut word, &mut in_word, &mut toks);
    (toks, comment)
}

/// One command line of a shell block as the README shows it: continuation lines joined, its
/// trailing comment, the comment line right after it (an expected output), its heredoc body.
#[derive(Debug)]
struct ShellLine {
    line: usize,
    text: String,
    tokens: Vec<Tok>,
    comment: Option<String>,
    next_comment: Option<String>,
    heredoc: Option<String>,
}

fn shell_lines(lines: &[(usize, String)]) -> Vec<ShellLine> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (number, first) = &lines[i];
        let trimmed = first.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let mut text = String::new();
        while i < lines.len() {
            let line = lines[i].1.trim_end();
            i += 1;
            match line.strip_suffix('\\') {
                Some(part) => {
                    text.push_str(part.trim());
                    text.push(' ');
                }
                None => {
                    text.push_str(line.trim());
                    break;
                }
            }
        }
        let (tokens, comment) = tokenize(&text);
        let mut heredoc = None;
        if let Some(at) = tokens
            .iter()
            .position(|t| matches!(t, Tok::Op(op) if op.starts_with("<<")))
        {
            let Some(Tok::Word(delimiter)) = tokens.get(at + 1) else {
                panic!("README.md:{number}: a heredoc without a delimiter: {text}");
            };
            let mut body = String::new();
            loop {
                let Some((_, line)) = lines.get(i) else {
                    panic!("README.md:{number}: the heredoc {delimiter} is never closed");
                };
                i += 1;
                if line.trim() == delimiter {
                    break;
                }
                body.push_str(line);
                body.push('\n');
            }
            heredoc = Some(body);
        }
        let next_comment = lines
            .get(i)
            .and_then(|(_, l)| l.trim().strip_prefix('#'))
            .map(|c| c.trim().to_string());
        out.push(ShellLine {
            line: *number,
            text: text.trim().to_string(),
            tokens,
            comment,
            next_comment,
            heredoc,
        });
    }
    out
}

/// A simple command of a line: its words, where its stdout goes, whether its stdin is the
/// line's heredoc and whether it runs in the background.
#[derive(Debug, Default)]
struct Cmd {
    words: Vec<String>,
    stdout: Option<String>,
    heredoc: bool,
    background: bool,
}

fn commands(tokens: &[Tok]) -> Vec<Cmd> {
    let mut out = Vec::new();
    let mut current = Cmd::default();
    let mut tokens = tokens.iter();
    while let Some(token) = tokens.next() {
        match token {
            Tok::Word(w) => current.words.push(w.clone()),
            Tok::Op(op) if op == ">" || op == ">>" => {
                if let Some(Tok::Word(file)) = tokens.next() {
                    current.stdout = Some(file.clone());
                }
            }
            Tok::Op(op) if op.starts_with("<<") => {
                tokens.next();
                current.heredoc = true;
            }
            Tok::Op(op) if op == "<" => {
                tokens.next();
            }
            Tok::Op(op) => {
                current.background = op == "&";
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out.push(current);
    out.retain(|c| !c.words.is_empty());
    out
}

/// The arguments of a `sigil` invocation: `sigil ARGS` (after `sudo`, `env` and `VAR=value`),
/// `cargo run [...] -- ARGS`, or `... -- /sigil ARGS` (as in `kubectl exec`).
fn sigil_args(cmd: &Cmd) -> Option<Vec<String>> {
    let is_sigil = |w: &str| w == "sigil" || w.ends_with("/sigil");
    let mut words: &[String] = &cmd.words;
    while let Some(first) = words.first() {
        let assignment = first.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if first == "sudo" || first == "env" || assignment {
            words = &words[1..];
        } else {
            break;
        }
    }
    match words {
        [first, rest @ ..] if is_sigil(first) => Some(rest.to_vec()),
        [cargo, run, rest @ ..] if cargo == "cargo" && run == "run" => {
            let dash = rest.iter().position(|w| w == "--")?;
            Some(rest[dash + 1..].to_vec())
        }
        _ => {
            let dash = words.iter().position(|w| w == "--")?;
            match &words[dash + 1..] {
                [first, rest @ ..] if is_sigil(first) => Some(rest.to_vec()),
                _ => None,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary's argument parser
// ---------------------------------------------------------------------------------------------

/// Runs `sigil ARGS` with an empty environment (so no SIGIL_* variable of the test's changes what
/// it prints) and no way to reach a cluster.
fn run_sigil(args: &[String]) -> Output {
    Command::new(sigil_exe())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .stdin(Stdio::null())
        .output()
        .expect("running sigil")
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

/// The `sigil` binary's command-line interface, as its `--help` texts describe it.
#[derive(Default)]
struct Cli {
    help: Mutex<HashMap<Vec<String>, String>>,
}

impl Cli {
    /// `sigil PATH --help`.
    fn help<S: AsRef<str>>(&self, path: &[S]) -> String {
        let path: Vec<String> = path.iter().map(|s| s.as_ref().to_string()).collect();
        if let Some(text) = self.help.lock().unwrap().get(&path) {
            return text.clone();
        }
        let mut args = path.clone();
        args.push("--help".into());
        let out = run_sigil(&args);
        assert!(
            out.status.success(),
            "`sigil {}` failed: {}",
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
                    "`sigil {}` has no option {flag}",
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
        let out = run_sigil(&argv);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`sigil {}` exits with {}: {}",
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

/// A kubectl `-l` selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated) as a
/// `metav1.LabelSelector`.
fn parse_selector(text: &str) -> Value {
    let expressions: Vec<Value> = text
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                json!({"key": k, "operator": "NotIn", "values": [v]})
            } else if let Some((k, v)) = term.split_once('=') {
                json!({"key": k, "operator": "In", "values": [v.trim_start_matches('=')]})
            } else if let Some(k) = term.strip_prefix('!') {
                json!({"key": k, "operator": "DoesNotExist"})
            } else {
                json!({"key": term, "operator": "Exists"})
            }
        })
        .collect();
    json!({ "matchExpressions": expressions })
}

/// The nodes kubectl's JSONPath `expr` selects in `root`: fields, `[N]`, `[*]` and filters
/// `[?(@.path=="value")]`, with or without the enclosing braces.
fn jsonpath(root: &Value, expr: &str) -> Vec<Value> {
    let trimmed = expr.trim();
    let mut rest = trimmed
        .strip_prefix('{')
        .and_then(|e| e.strip_suffix('}'))
        .unwrap_or(trimmed);
    let mut nodes = vec![root.clone()];
    let items = |nodes: &[Value]| -> Vec<Value> {
        nodes
            .iter()
            .flat_map(|n| n.as_array().cloned().unwrap_or_default())
            .collect()
    };
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            nodes = nodes.iter().filter_map(|n| n.get(field).cloned()).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .unwrap_or_else(|| panic!("unclosed [ in {expr}"));
            let inner = &r[..end];
            rest = &r[end + 1..];
            nodes = if inner == "*" {
                items(&nodes)
            } else if let Some(condition) =
                inner.strip_prefix("?(@").and_then(|c| c.strip_suffix(')'))
            {
                let (path, literal) = condition
                    .split_once("==")
                    .unwrap_or_else(|| panic!("unsupported filter in {expr}"));
                let literal = Value::String(literal.trim().trim_matches(['"', '\'']).to_string());
                items(&nodes)
                    .into_iter()
                    .filter(|item| jsonpath(item, path.trim()) == [literal.clone()])
                    .collect()
            } else {
                let index: usize = inner
                    .parse()
                    .unwrap_or_else(|_| panic!("unsupported index [{inner}] in {expr}"));
                nodes.iter().filter_map(|n| n.get(index).cloned()).collect()
            };
        } else {
            panic!("unsupported JSONPath {expr}");
        }
    }
    nodes
}

/// What kubectl prints for the nodes of a JSONPath: strings as they are, separated by spaces.
fn jsonpath_text(nodes: &[Value]) -> String {
    nodes
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
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

/// `KIND/NAME` as kubectl takes it (`deploy/web`, `deployment/db`, `daemonset/sigil-agent`).
fn workload_ref(text: &str) -> Option<(String, String)> {
    let (kind, name) = text.split_once('/')?;
    let kind = match kind {
        "deploy" | "deployment" | "deployments" | "deployment.apps" => "Deployment",
        "ds" | "daemonset" | "daemonsets" | "daemonset.apps" => "DaemonSet",
        "sts" | "statefulset" | "statefulsets" => "StatefulSet",
        _ => return None,
    };
    Some((kind.to_string(), name.to_string()))
}

// ---------------------------------------------------------------------------------------------
// The steps of the quickstart
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Step {
    DockerBuild {
        dockerfile: String,
        tag: String,
        context: String,
    },
    KindLoad {
        image: String,
    },
    ApplyKustomize {
        dir: String,
    },
    ApplyFile {
        file: String,
        namespace: Option<String>,
    },
    ApplyHeredoc {
        body: String,
        namespace: Option<String>,
    },
    RolloutStatus {
        namespace: String,
        kind: String,
        name: String,
    },
    CreateNamespace {
        name: String,
    },
    LabelNamespace {
        name: String,
        labels: Labels,
    },
    GetJsonPath {
        namespace: String,
        selector: String,
        expr: String,
        expected: Option<String>,
    },
    GetTable {
        namespace: String,
        resource: String,
        comment: String,
    },
    ExecCurl {
        namespace: String,
        kind: String,
        name: String,
        url: String,
        expected: Option<String>,
    },
    PortForward {
        namespace: String,
        kind: String,
        name: String,
        local: u16,
        remote: u16,
    },
    CurlLocal {
        url: String,
        out: String,
    },
    InspectPolicy {
        args: Vec<String>,
        expected: Option<String>,
    },
    InspectCert {
        file: String,
        bundle: String,
        expected: Option<String>,
    },
}

/// The step a command of a quickstart line is, if this test knows how to follow it. Anything
/// unexpected (another verb, an extra flag) is unknown: the test must learn it.
fn recognize(cmd: &Cmd, line: &ShellLine) -> Option<Step> {
    let words: Vec<&str> = cmd.words.iter().map(String::as_str).collect();
    let flags_then_positionals = |rest: &[&str], with_value: &[&str]| {
        let mut flags: BTreeMap<String, String> = BTreeMap::new();
        let mut positionals = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            if with_value.contains(&rest[i]) {
                flags.insert(rest[i].to_string(), rest.get(i + 1)?.to_string());
                i += 2;
            } else if rest[i].starts_with('-') {
                return None;
            } else {
                positionals.push(rest[i].to_string());
                i += 1;
            }
        }
        Some((flags, positionals))
    };
    match words.as_slice() {
        ["docker", "build", rest @ ..] => {
            let (flags, positionals) = flags_then_positionals(rest, &["-f", "-t"])?;
            let [context] = positionals.as_slice() else {
                return None;
            };
            Some(Step::DockerBuild {
                dockerfile: flags.get("-f")?.clone(),
                tag: flags.get("-t")?.clone(),
                context: context.clone(),
            })
        }
        ["kind", "load", "docker-image", image] => Some(Step::KindLoad {
            image: image.to_string(),
        }),
        ["kubectl", rest @ ..] => {
            let mut ns = None;
            let mut args = Vec::new();
            let mut i = 0;
            while i < rest.len() {
                match rest[i] {
                    "-n" | "--namespace" => {
                        ns = Some(rest.get(i + 1)?.to_string());
                        i += 2;
                    }
                    other => {
                        match other.strip_prefix("--namespace=") {
                            Some(v) => ns = Some(v.to_string()),
                            None => args.push(other),
                        }
                        i += 1;
                    }
                }
            }
            let namespace = ns.clone().unwrap_or_else(|| "default".to_string());
            match args.as_slice() {
                ["apply", "-k", dir] => Some(Step::ApplyKustomize {
                    dir: dir.to_string(),
                }),
                ["apply", "-f", "-"] if cmd.heredoc => Some(Step::ApplyHeredoc {
                    body: line.heredoc.clone()?,
                    namespace: ns,
                }),
                ["apply", "-f", file] if *file != "-" => Some(Step::ApplyFile {
                    file: file.to_string(),
                    namespace: ns,
                }),
                ["rollout", "status", target] => {
                    let (kind, name) = workload_ref(target)?;
                    Some(Step::RolloutStatus {
                        namespace,
                        kind,
                        name,
                    })
                }
                ["create", "namespace" | "ns", name] => Some(Step::CreateNamespace {
                    name: name.to_string(),
                }),
                ["label", "namespace" | "ns", name, labels @ ..] if !labels.is_empty() => {
                    let labels = labels
                        .iter()
                        .map(|l| {
                            l.split_once('=')
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                        })
                        .collect::<Option<Labels>>()?;
                    Some(Step::LabelNamespace {
                        name: name.to_string(),
                        labels,
                    })
                }
                ["get", "pod" | "pods" | "po", rest @ ..] => {
                    let (flags, positionals) =
                        flags_then_positionals(rest, &["-l", "--selector", "-o", "--output"])?;
                    if !positionals.is_empty() {
                        return None;
                    }
                    let selector = flags.get("-l").or(flags.get("--selector"))?.clone();
                    let output = flags.get("-o").or(flags.get("--output"))?;
                    Some(Step::GetJsonPath {
                        namespace,
                        selector,
                        expr: output.strip_prefix("jsonpath=")?.to_string(),
                        expected: line.next_comment.clone(),
                    })
                }
                ["get", resource] if resource.contains('.') => Some(Step::GetTable {
                    namespace,
                    resource: resource.to_string(),
                    comment: line.comment.clone().unwrap_or_default(),
                }),
                ["exec", target, "--", "curl", curl @ ..] => {
                    let (kind, name) = workload_ref(target)?;
                    let (_, positionals) = flags_then_positionals(
                        &curl
                            .iter()
                            .copied()
                            .filter(|f| *f != "-s" && *f != "--silent")
                            .collect::<Vec<_>>(),
                        &[],
                    )?;
                    let [url] = positionals.as_slice() else {
                        return None;
                    };
                    Some(Step::ExecCurl {
                        namespace,
                        kind,
                        name,
                        url: url.clone(),
                        expected: line.comment.clone(),
                    })
                }
                ["port-forward", target, ports] if cmd.background => {
                    let (kind, name) = workload_ref(target)?;
                    let (local, remote) = ports.split_once(':').unwrap_or((ports, ports));
                    Some(Step::PortForward {
                        namespace,
                        kind,
                        name,
                        local: local.parse().ok()?,
                        remote: remote.parse().ok()?,
                    })
                }
                _ => None,
            }
        }
        ["curl", "-s", url] => Some(Step::CurlLocal {
            url: url.to_string(),
            out: cmd.stdout.clone()?,
        }),
        ["sigil", "inspect", "policy", ..] => Some(Step::InspectPolicy {
            args: cmd.words[1..].to_vec(),
            expected: line.comment.clone(),
        }),
        ["sigil", "inspect", "cert", rest @ ..] => {
            let (flags, positionals) = flags_then_positionals(rest, &["--bundle"])?;
            let [file] = positionals.as_slice() else {
                return None;
            };
            Some(Step::InspectCert {
                file: file.clone(),
                bundle: flags.get("--bundle")?.clone(),
                expected: line.comment.clone(),
            })
        }
        _ => None,
    }
}

/// The steps of the README's quickstart, in order, each with where it is and how it reads.
fn quickstart_steps(text: &str) -> Vec<(String, Step)> {
    let blocks = quickstart_blocks(text);
    assert!(
        !blocks.is_empty(),
        "README.md's section {SECTION:?} has no shell block"
    );
    let mut steps = Vec::new();
    for block in &blocks {
        for line in shell_lines(&block.lines) {
            for cmd in commands(&line.tokens) {
                let step = recognize(&cmd, &line).unwrap_or_else(|| {
                    panic!(
                        "README quickstart has a step this test does not follow: {} \
                         (README.md:{})",
                        line.text, line.line
                    )
                });
                steps.push((format!("README.md:{}: `{}`", line.line, line.text), step));
            }
        }
    }
    steps
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
            cli: Cli::default(),
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
                .find(|c| {
                    let args = manifests::args(c);
                    args.len() >= path.len() && args.iter().zip(path).all(|(a, p)| a == p)
                })
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
    /// is not in any registry), run through the image's entrypoint with arguments the binary
    /// accepts.
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
            // sigil through the image's entrypoint.
            let runs_sigil = container["command"].is_null()
                && manifests::args(container)
                    .first()
                    .is_some_and(|a| top_level.contains(a));
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
            if !(container["command"].is_null() || container["command"] == json!(["/sigil"])) {
                self.fail(format!(
                    "{what} overrides the image's entrypoint: {}",
                    container["command"]
                ));
            }
            if let Err(e) = self.cli.accepts(&manifests::args(container)) {
                self.fail(format!("{what}: the binary refuses its arguments: {e}"));
            }
        }
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
            .get(sigil_agent::mesh::TLS_MODE_LABEL)
            .map(String::as_str)
            == Some(sigil_agent::mesh::TLS_MODE_MTLS)
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

    async fn follow(&mut self, step: Step) {
        match step {
            Step::DockerBuild {
                dockerfile,
                tag,
                context,
            } => self.docker_build(&dockerfile, &tag, &context),
            Step::KindLoad { image } => {
                if !self.built.contains(&image) {
                    self.fail(format!("{image} was not built (built: {:?})", self.built));
                }
                self.loaded.insert(image);
            }
            Step::ApplyKustomize { dir } => {
                let objects = manifests::kustomize(&repo().join(dir));
                self.apply(objects, None).await;
            }
            Step::ApplyFile { file, namespace } => {
                let path = repo().join(&file);
                if !path.is_file() {
                    self.fail(format!("{file} does not exist"));
                }
                self.apply(manifests::yaml_file(&path), namespace.as_deref())
                    .await;
            }
            Step::ApplyHeredoc { body, namespace } => {
                let objects = sigil_test_apiserver::parse_manifest(&body)
                    .unwrap_or_else(|e| self.fail(format!("the heredoc is not YAML: {e}")));
                if objects.is_empty() {
                    self.fail("the heredoc has no object");
                }
                self.apply(objects, namespace.as_deref()).await;
            }
            Step::RolloutStatus {
                namespace,
                kind,
                name,
            } => {
                self.pods_of(&kind, &namespace, &name);
                let is_ca = self.ca.as_ref().is_some_and(|ca| {
                    (
                        self::kind(&ca.workload),
                        self::namespace(&ca.workload),
                        self::name(&ca.workload),
                    ) == (kind.as_str(), namespace.as_str(), name.as_str())
                });
                if is_ca {
                    // Its readiness probe is the real CA's /ready.
                    self.ca_ready().await;
                }
            }
            Step::CreateNamespace { name } => {
                if self.find("Namespace", "", &name).is_some() {
                    self.fail(format!("namespace {name} already exists"));
                }
                self.apply(vec![namespace_object(&name)], None).await;
            }
            Step::LabelNamespace { name, labels } => self.label_namespace(&name, labels).await,
            Step::GetJsonPath {
                namespace,
                selector,
                expr,
                expected,
            } => {
                let Some(expected) = expected else {
                    self.fail("no comment line with the expected output follows the query")
                };
                let pods: Api<DynamicObject> = Api::namespaced_with(
                    self.server.client(),
                    &namespace,
                    &ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                );
                let list = pods
                    .list(&ListParams::default().labels(&selector))
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
                            && selects(&parse_selector(&selector), &labels_of(&p.pod))
                    })
                    .count();
                assert_eq!(items.len(), ours, "{}: pods matching {selector}", self.at);
                let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
                let output = jsonpath_text(&jsonpath(&list, &expr));
                if output != expected {
                    self.fail(format!("prints {output:?}; the README says {expected:?}"));
                }
            }
            Step::GetTable {
                namespace,
                resource,
                comment,
            } => self.get_table(&namespace, &resource, &comment).await,
            Step::ExecCurl {
                namespace,
                kind,
                name,
                url,
                expected,
            } => self.exec_curl(&namespace, &kind, &name, &url, expected),
            Step::PortForward {
                namespace,
                kind,
                name,
                local,
                remote,
            } => {
                let pod = self.pods_of(&kind, &namespace, &name)[0];
                let spec = &self.pods[pod].pod["spec"];
                let admin = all_containers(spec)
                    .into_iter()
                    .map(manifests::args)
                    .filter(|args| args.starts_with(&["proxy".to_string(), "run".to_string()]))
                    .map(|args| {
                        self.cli
                            .effective(&["proxy", "run"], &args[2..], &[], "--admin-addr")
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
            Step::CurlLocal { url, out } => {
                let rest = url
                    .strip_prefix("http://")
                    .unwrap_or(&url)
                    .split_once(':')
                    .filter(|(host, _)| matches!(*host, "localhost" | "127.0.0.1"));
                let Some((port, path)) = rest.and_then(|(_, r)| r.split_once('/')) else {
                    self.fail(format!("{url} is not a forwarded local port"))
                };
                let path = format!("/{path}");
                let Some(&pod) = port.parse().ok().and_then(|p: u16| self.forwards.get(&p)) else {
                    self.fail(format!("nothing forwards local port {port}"))
                };
                let admin = std::fs::read_to_string(repo().join("proxy/src/admin.rs")).unwrap();
                if !admin.contains(&format!(".route(\"{path}\"")) {
                    self.fail(format!(
                        "the proxy's admin endpoint (proxy/src/admin.rs) has no route {path}"
                    ));
                }
                self.files.insert(out, (path, pod));
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
                let (chain_path, pod) = source(&file);
                let (bundle_path, bundle_pod) = source(&bundle);
                if chain_path != "/certs/chain.pem" || bundle_path != "/certs/bundle.pem" {
                    self.fail(format!(
                        "{file} holds {chain_path} and {bundle} holds {bundle_path}: the chain \
                         and the bundle are the other way round"
                    ));
                }
                assert_eq!(pod, bundle_pod, "{}: both from one pod", self.at);
                let id = self.identity(&self.pods[pod].pod).to_string();
                let expected = expected.unwrap_or_default();
                let said = expected.split(',').next().unwrap_or_default().trim();
                if said != id {
                    self.fail(format!(
                        "the certificate of that pod is {id}; the README says {said:?}"
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
        if !run.iter().any(|(i, rest)| {
            (i == "COPY" || i == "ADD") && rest.split_whitespace().last() == Some("/sigil")
        }) {
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

    async fn label_namespace(&mut self, ns: &str, labels: Labels) {
        let Some(mut object) = self.find("Namespace", "", ns).cloned() else {
            self.fail(format!("namespace {ns} does not exist"))
        };
        let before = labels_of(&object);
        for (k, v) in &labels {
            object["metadata"]["labels"][k] = json!(v);
        }
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
                "labelling namespace {ns} {labels:?} puts it under no webhook that did not \
                 already select it"
            ));
        }
    }

    async fn get_table(&self, ns: &str, resource: &str, comment: &str) {
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
        let column = |word: &str| {
            columns.iter().find(|c| {
                c["name"]
                    .as_str()
                    .unwrap_or_default()
                    .eq_ignore_ascii_case(word)
            })
        };
        // The comment names columns as kubectl prints them, in upper case (other upper-case
        // words, such as "CA", are not columns).
        let upper: Vec<&str> = comment
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase()))
            .collect();
        let mentioned: Vec<&str> = upper
            .iter()
            .copied()
            .filter(|w| column(w).is_some())
            .collect();
        if !upper.is_empty() && mentioned.is_empty() {
            self.fail(format!(
                "the comment names no column kubectl shows for {resource} ({:?})",
                columns.iter().map(|c| &c["name"]).collect::<Vec<_>>()
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
        let Some(valid) = mentioned.iter().find_map(|w| column(w)).filter(|c| {
            c["name"]
                .as_str()
                .unwrap_or_default()
                .eq_ignore_ascii_case("valid")
        }) else {
            return;
        };
        // The CA's verdict: every listed policy Valid.
        let path = valid["jsonPath"].as_str().unwrap();
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
                .map(|i| jsonpath_text(&jsonpath(i, path)))
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
    fn exec_curl(&self, ns: &str, kind_: &str, name_: &str, url: &str, expected: Option<String>) {
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
            if expected.as_deref() != Some(output.as_str()) {
                self.fail(format!(
                    "curl prints {output:?} (`sigil {}`: {decision}); the README says {expected:?}",
                    args.join(" ")
                ));
            }
        }
    }

    /// The README's own `sigil inspect policy` line reads the cluster; here it reads the applied
    /// policies. Its first output line starts as the README's comment says.
    fn readme_inspect_policy(&self, mut args: Vec<String>, expected: Option<String>) {
        // It asks about pods that exist, on a port they declare.
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1).cloned())
        };
        let ns = value("-n")
            .or(value("--namespace"))
            .unwrap_or_else(|| self.fail("no -n"));
        if let (Some(labels), Some(port)) = (value("--labels"), value("--port")) {
            let selector = parse_selector(&labels);
            let declares = self.pods.iter().any(|p| {
                namespace(&p.pod) == ns
                    && selects(&selector, &labels_of(&p.pod))
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
        if !args.iter().any(|a| a == "--policy-file") {
            args.push("--policy-file".into());
            args.push(self.policy_file().to_str().unwrap().into());
        }
        let (_, output) = self.inspect_policy(&args);
        let expected = expected.unwrap_or_default();
        let said = expected.split(',').next().unwrap_or_default().trim();
        let first = output.lines().next().unwrap_or_default();
        if said.is_empty() || !first.starts_with(said) {
            self.fail(format!(
                "prints {first:?} first; the README says {said:?}\n{output}"
            ));
        }
    }

    /// After the last step: every pod the quickstart made is one Kubernetes 1.30 and the newest
    /// version accept, and each meshed pod runs `sigil proxy init` and `sigil proxy run`.
    fn finish(&self) {
        let mut meshed = 0;
        for record in &self.pods {
            if !Self::is_meshed(&record.pod) {
                continue;
            }
            meshed += 1;
            let commands: Vec<Vec<String>> = all_containers(&record.pod["spec"])
                .into_iter()
                .map(|c| manifests::args(c).into_iter().take(2).collect())
                .collect();
            for wanted in [["proxy", "init"], ["proxy", "run"]] {
                assert!(
                    commands.contains(&wanted.map(str::to_string).to_vec()),
                    "{}: an injected pod runs no `sigil {}`: {:#}",
                    describe(&record.workload),
                    wanted.join(" "),
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
    for (at, step) in steps {
        eprintln!("following {at}");
        quickstart.at = at;
        quickstart.follow(step).await;
    }
    quickstart.at = "after the last step".into();
    quickstart.finish();
}

#[test]
fn every_sigil_command_line_in_the_readme_is_accepted_by_the_binary() {
    let cli = Cli::default();
    let mut checked = Vec::new();
    let mut refused = Vec::new();
    for block in code_blocks(&readme()).iter().filter(|b| is_shell(&b.lang)) {
        for line in shell_lines(&block.lines) {
            for cmd in commands(&line.tokens) {
                let Some(args) = sigil_args(&cmd) else {
                    continue;
                };
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
/// subcommand; extraction skips heredocs and comments; an unknown quickstart line is refused; the
/// selector and JSONPath semantics are Kubernetes'.
#[test]
fn the_checks_bite() {
    let cli = Cli::default();
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

    // Extraction: continuation lines, `sudo`, `cargo run`, comments, heredoc bodies.
    let block: Vec<(usize, String)> = [
        "# sigil made-up (a comment)",
        "cargo run --release -- demo   # about 15 s",
        "sudo sigil inspect agent \\",
        "    --socket /tmp/s.sock   # identities",
        "cat > x.yaml <<'YAML'",
        "sigil not-a-command --in-a-heredoc",
        "YAML",
        "curl -s localhost:15014/ready; sigil ca init --state-dir s | grep x",
        "kubectl -n x exec deploy/a -- /sigil ca rotate-root",
    ]
    .iter()
    .enumerate()
    .map(|(i, l)| (i + 1, l.to_string()))
    .collect();
    let found: Vec<String> = shell_lines(&block)
        .iter()
        .flat_map(|l| commands(&l.tokens))
        .filter_map(|c| sigil_args(&c))
        .map(|a| a.join(" "))
        .collect();
    assert_eq!(
        found,
        [
            "demo",
            "inspect agent --socket /tmp/s.sock",
            "ca init --state-dir s",
            "ca rotate-root"
        ]
    );

    // A quickstart line no recognizer knows, or a known one with an unknown flag, is refused.
    for unknown in [
        "kubectl delete -k deploy/",
        "kubectl apply -k deploy/ --server-side",
        "helm install sigil deploy/",
        "kubectl -n demo exec deploy/web -- curl -sk https://db/",
    ] {
        let lines = shell_lines(&[(1, unknown.to_string())]);
        let cmds = commands(&lines[0].tokens);
        assert!(
            recognize(&cmds[0], &lines[0]).is_none(),
            "{unknown} is recognized"
        );
    }
    let lines = shell_lines(&[
        (
            1,
            "kubectl -n demo get pod -l app=db -o jsonpath='{.items[0].metadata.name}'".into(),
        ),
        (2, "# db-1".into()),
    ]);
    assert!(matches!(
        recognize(&commands(&lines[0].tokens)[0], &lines[0]),
        Some(Step::GetJsonPath { expected: Some(e), expr, .. }) if e == "db-1" && expr == "{.items[0].metadata.name}"
    ));

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
    assert!(!selects(&parse_selector("app=db"), &labels));
    assert!(selects(&parse_selector("sigil.dev/inject,!app"), &labels));

    // JSONPath.
    let list = json!({"items": [{"spec": {"initContainers": [{"name": "a"}, {"name": "b"}]},
        "status": {"conditions": [{"type": "Warnings", "status": "False"}, {"type": "Valid", "status": "True"}]}}]});
    assert_eq!(
        jsonpath_text(&jsonpath(&list, "{.items[0].spec.initContainers[*].name}")),
        "a b"
    );
    assert_eq!(
        jsonpath_text(&jsonpath(
            &list["items"][0],
            r#".status.conditions[?(@.type=="Valid")].status"#
        )),
        "True"
    );
    assert_eq!(jsonpath(&list, "{.items[1].spec}"), Vec::<Value>::new());
}
