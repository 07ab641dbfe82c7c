//! Turns the objects users write ([`crate::model`]) into the compiled policies of
//! [`crate::compiled`]. Errors name the policy and the field path
//! (`demo/allow-web: rules[0].from[0].source: use either principals or serviceAccounts, not
//! both`); every problem in a policy is reported, not just the first. Valid but surprising
//! constructs produce [`Warning`]s instead, which callers surface as status conditions.

use std::fmt;
use std::net::IpAddr;

use serde_json::Value;
use sigil_identity::SpiffeId;

use crate::compiled::{
    AuthzAction, AuthzPolicy, Cidr, Compiled, ConditionMatch, Field, InvalidPolicy, MtlsMode,
    OperationMatch, PeerAuthnPolicy, Rule, ServiceAccount, SourceMatch, StandIn, StrMatch, Warning,
};
use crate::engine::PolicySet;
use crate::envelope::{Envelope, Kind, ROOT_NAMESPACE};
use crate::model::{self, Action, MtlsModeSpec};

const SPIFFE_SCHEME: &str = "spiffe://";
/// Kubernetes limits namespace names (DNS-1123 labels) to 63 bytes.
const MAX_LABEL_LEN: usize = 63;
/// ...and service-account names (DNS-1123 subdomains) to 253.
const MAX_SUBDOMAIN_LEN: usize = 253;
const HEADER_KEY_PREFIX: &str = "request.headers[";
/// The `when` keys sigil evaluates (plus `request.headers[<name>]`).
const SUPPORTED_KEYS: &str =
    "source.ip, source.namespace, source.principal, destination.port, request.headers[<name>]";
/// Istio condition keys that exist but need something sigil does not have (JWTs, an XFF chain,
/// SNI, Envoy metadata); named separately so the error says "not supported" rather than "unknown".
const ISTIO_ONLY_KEYS: &[&str] = &[
    "request.auth.",
    "remote.ip",
    "destination.ip",
    "connection.sni",
    "experimental.",
    "source.serviceAccount",
];

/// One thing wrong with a policy: which policy, where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `namespace/name`.
    pub policy: String,
    /// Field path relative to the object's `spec` (`rules[0].to[1].operation.ports[2]`), or
    /// `metadata.*`; empty when the problem is the object as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.policy, self.message)
        } else {
            write!(f, "{}: {}: {}", self.policy, self.path, self.message)
        }
    }
}

/// Why one or more policies were rejected: every problem found, one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.problems))]
pub struct ValidationError {
    pub problems: Vec<Problem>,
}

fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collects problems and warnings for one object.
struct Checker {
    policy: String,
    problems: Vec<Problem>,
    warnings: Vec<Warning>,
}

impl Checker {
    fn new(meta: &model::ObjectMeta) -> Self {
        let policy = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("<no namespace>"),
            if meta.name.is_empty() {
                "<no name>"
            } else {
                &meta.name
            }
        );
        Checker {
            policy,
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            policy: self.policy.clone(),
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Checks apiVersion, kind, name and namespace.
    fn header(&mut self, api_version: &str, kind: &str, want_kind: &str, meta: &model::ObjectMeta) {
        if api_version != model::API_VERSION {
            self.error(
                "apiVersion",
                format!(
                    "{api_version:?} is not {} (an Istio policy works once its apiVersion is changed)",
                    model::API_VERSION
                ),
            );
        }
        if kind != want_kind {
            self.error("kind", format!("{kind:?} is not {want_kind}"));
        }
        if meta.name.is_empty() {
            self.error("metadata.name", "required");
        }
        match meta.namespace.as_deref() {
            None | Some("") => self.error(
                "metadata.namespace",
                format!("required ({ROOT_NAMESPACE} for mesh-wide policies)"),
            ),
            Some(ns) if !is_dns_label(ns) => self.error(
                "metadata.namespace",
                format!("{ns:?} is not a namespace name"),
            ),
            Some(_) => {}
        }
    }

    fn finish<T>(self, value: impl FnOnce(Vec<Warning>) -> T) -> Result<T, ValidationError> {
        if self.problems.is_empty() {
            Ok(value(self.warnings))
        } else {
            Err(ValidationError {
                problems: self.problems,
            })
        }
    }

    fn selector(&mut self, selector: &Option<model::WorkloadSelector>) -> Vec<(String, String)> {
        let Some(selector) = selector else {
            return Vec::new();
        };
        for (key, value) in &selector.match_labels {
            if key.is_empty() {
                self.error("selector.matchLabels", "empty label key");
            }
            if value.contains('*') {
                self.warn(
                    format!("selector.matchLabels.{key}"),
                    format!("{value:?} is compared literally; label selectors have no wildcards"),
                );
            }
        }
        selector
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Parses every value of a field and its `not*` twin with `parse`, reporting each bad value
    /// under its own index.
    fn field<T>(
        &mut self,
        path: &str,
        (name, values): (&str, &[String]),
        (not_name, not_values): (&str, &[String]),
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Field<T> {
        let mut out = Field::default();
        for (target, field, list) in [
            (&mut out.any, name, values),
            (&mut out.none, not_name, not_values),
        ] {
            for (i, value) in list.iter().enumerate() {
                let result = if value.is_empty() {
                    Err("empty value".to_owned())
                } else {
                    parse(value)
                };
                match result {
                    Ok(parsed) => target.push(parsed),
                    Err(message) => self.error(format!("{path}.{field}[{i}]"), message),
                }
            }
        }
        out
    }
}

/// Validates and compiles one AuthorizationPolicy.
pub fn authorization_policy(
    object: &model::AuthorizationPolicy,
) -> Result<AuthzPolicy, ValidationError> {
    let mut c = Checker::new(&object.metadata);
    c.header(
        &object.api_version,
        &object.kind,
        Kind::AuthorizationPolicy.name(),
        &object.metadata,
    );
    let spec = &object.spec;
    let action = match spec.action.unwrap_or(Action::Allow) {
        Action::Allow => AuthzAction::Allow,
        Action::Deny => AuthzAction::Deny,
        Action::Audit => AuthzAction::Audit,
        Action::Custom => {
            c.error(
                "action",
                "CUSTOM (external authorization) is not supported by sigil; use ALLOW, DENY or AUDIT",
            );
            AuthzAction::Allow
        }
    };
    if spec.provider.is_some() {
        c.error(
            "provider",
            "not supported by sigil (it belongs to Istio's CUSTOM action)",
        );
    }
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        let field = if spec.target_ref.is_some() {
            "targetRef"
        } else {
            "targetRefs"
        };
        c.error(field, "not supported by sigil; use selector.matchLabels");
    }
    let selector = c.selector(&spec.selector);

    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.is_empty() {
        match action {
            AuthzAction::Deny => c.error(
                "rules",
                "a DENY policy without rules never matches; add `rules: [{}]` to deny every request",
            ),
            AuthzAction::Allow => c.warn(
                "rules",
                "no rules: this ALLOW policy matches nothing, so it denies every request to the \
                 workloads it selects that no other ALLOW policy allows",
            ),
            AuthzAction::Audit => c.warn("rules", "no rules: this AUDIT policy matches nothing"),
        }
    }
    let rules = rules
        .iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(&mut c, &format!("rules[{i}]"), rule, action))
        .collect();
    let envelope = object.metadata.envelope(Kind::AuthorizationPolicy);
    c.finish(|warnings| AuthzPolicy::new(envelope, action, selector, rules, warnings))
}

fn compile_rule(c: &mut Checker, path: &str, rule: &model::Rule, action: AuthzAction) -> Rule {
    let mut from = Vec::new();
    if let Some(entries) = &rule.from {
        if entries.is_empty() {
            c.error(
                format!("{path}.from"),
                "must not be empty (omit it to match any source)",
            );
        }
        for (i, entry) in entries.iter().enumerate() {
            let path = format!("{path}.from[{i}]");
            match &entry.source {
                None => c.error(path, "source is required"),
                Some(source) => {
                    from.push(compile_source(c, &format!("{path}.source"), source, action))
                }
            }
        }
    }
    let mut to = Vec::new();
    let mut http_fields = Vec::new();
    if let Some(entries) = &rule.to {
        if entries.is_empty() {
            c.error(
                format!("{path}.to"),
                "must not be empty (omit it to match any operation)",
            );
        }
        for (i, entry) in entries.iter().enumerate() {
            let path = format!("{path}.to[{i}]");
            match &entry.operation {
                None => c.error(path, "operation is required"),
                Some(operation) => to.push(compile_operation(
                    c,
                    &format!("{path}.operation"),
                    operation,
                    &mut http_fields,
                )),
            }
        }
    }
    let mut when = Vec::new();
    for (i, condition) in rule.when.iter().flatten().enumerate() {
        let path = format!("{path}.when[{i}]");
        if let Some(compiled) = compile_condition(c, &path, condition) {
            if matches!(compiled, ConditionMatch::Header(..)) && !http_fields.contains(&"headers") {
                http_fields.push("headers");
            }
            when.push(compiled);
        }
    }
    let uses_http = !http_fields.is_empty();
    if uses_http {
        let fields = http_fields.join("/");
        let consequence = match action {
            AuthzAction::Allow => "in this ALLOW policy the rule never matches them",
            AuthzAction::Deny | AuthzAction::Audit => {
                "they are ignored there, so the rule matches every such connection its other \
                 fields match (state the ports to limit it)"
            }
        };
        c.warn(
            path,
            format!(
                "uses HTTP fields ({fields}); on non-HTTP connections they never match in ALLOW \
                 and always match in DENY: {consequence}"
            ),
        );
    }
    Rule::new(from, to, when)
}

fn compile_source(
    c: &mut Checker,
    path: &str,
    s: &model::Source,
    action: AuthzAction,
) -> SourceMatch {
    for (field, values) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        if !values.is_empty() {
            c.error(
                format!("{path}.{field}"),
                "not supported by sigil (JWT request identities need RequestAuthentication, \
                 which sigil does not have); use principals for peer identities",
            );
        }
    }
    for (field, values) in [
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !values.is_empty() {
            c.error(
                format!("{path}.{field}"),
                "not supported by sigil (it does not trust X-Forwarded-For); use ipBlocks",
            );
        }
    }
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_principals = !s.principals.is_empty() || !s.not_principals.is_empty();
    let has_namespaces = !s.namespaces.is_empty() || !s.not_namespaces.is_empty();
    if has_sa && has_principals {
        c.error(path, "use either principals or serviceAccounts, not both");
    }
    if has_sa && has_namespaces {
        c.error(path, "use either namespaces or serviceAccounts, not both");
    }
    let compiled = SourceMatch {
        principals: c.field(
            path,
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            parse_principal,
        ),
        namespaces: c.field(
            path,
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            parse_namespace,
        ),
        service_accounts: c.field(
            path,
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            parse_service_account,
        ),
        ip_blocks: c.field(
            path,
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            parse_cidr,
        ),
    };
    let lists = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.request_principals,
        &s.not_request_principals,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ];
    if lists.iter().all(|l| l.is_empty()) {
        c.error(
            path,
            "must set at least one field (omit `from` to match any source)",
        );
    }
    // Istio semantics: a peer without identity matches every not* identity field.
    let negative_only = s.principals.is_empty()
        && s.namespaces.is_empty()
        && s.service_accounts.is_empty()
        && (!s.not_principals.is_empty()
            || !s.not_namespaces.is_empty()
            || !s.not_service_accounts.is_empty());
    if action == AuthzAction::Allow && negative_only {
        c.warn(
            path,
            "not* identity fields also match plaintext peers (no identity); add \
             principals: [\"*\"] to require one",
        );
    }
    compiled
}

fn compile_operation(
    c: &mut Checker,
    path: &str,
    o: &model::Operation,
    http_fields: &mut Vec<&'static str>,
) -> OperationMatch {
    let compiled = OperationMatch {
        hosts: c.field(
            path,
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            parse_host,
        ),
        ports: c.field(
            path,
            ("ports", &o.ports),
            ("notPorts", &o.not_ports),
            parse_port,
        ),
        methods: c.field(
            path,
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            parse_method,
        ),
        paths: c.field(
            path,
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
            parse_path,
        ),
    };
    for (name, values) in [("hosts", &o.hosts), ("notHosts", &o.not_hosts)] {
        for (i, host) in values.iter().enumerate() {
            if !host.contains([':', '*']) && !host.is_empty() {
                c.warn(
                    format!("{path}.{name}[{i}]"),
                    format!(
                        "{host:?} matches only a Host header without a port; add \"{host}:*\" \
                         to match it with any port"
                    ),
                );
            }
        }
    }
    for (name, field) in [
        ("hosts", compiled.hosts.is_set()),
        ("methods", compiled.methods.is_set()),
        ("paths", compiled.paths.is_set()),
    ] {
        if field && !http_fields.contains(&name) {
            http_fields.push(name);
        }
    }
    if o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.ports.is_empty()
        && o.not_ports.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty()
    {
        c.error(
            path,
            "must set at least one field (omit `to` to match any operation)",
        );
    }
    compiled
}

fn compile_condition(
    c: &mut Checker,
    path: &str,
    condition: &model::Condition,
) -> Option<ConditionMatch> {
    let key = condition.key.as_str();
    if condition.values.is_empty() && condition.not_values.is_empty() {
        c.error(path, format!("{key:?}: set values or notValues"));
        return None;
    }
    let values = ("values", condition.values.as_slice());
    let not_values = ("notValues", condition.not_values.as_slice());
    let compiled = match key {
        "source.ip" => ConditionMatch::SourceIp(c.field(path, values, not_values, parse_cidr)),
        "source.namespace" => {
            ConditionMatch::SourceNamespace(c.field(path, values, not_values, parse_namespace))
        }
        "source.principal" => {
            ConditionMatch::SourcePrincipal(c.field(path, values, not_values, parse_principal))
        }
        "destination.port" => {
            ConditionMatch::DestinationPort(c.field(path, values, not_values, parse_port))
        }
        _ => {
            let Some(name) = key
                .strip_prefix(HEADER_KEY_PREFIX)
                .and_then(|rest| rest.strip_suffix(']'))
            else {
                let known = ISTIO_ONLY_KEYS.iter().any(|k| key.starts_with(k));
                let message = if key.is_empty() {
                    format!("key is required (one of {SUPPORTED_KEYS})")
                } else if known {
                    format!("key {key:?} is not supported by sigil (supported: {SUPPORTED_KEYS})")
                } else {
                    format!("unknown key {key:?} (supported: {SUPPORTED_KEYS})")
                };
                c.error(format!("{path}.key"), message);
                return None;
            };
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                c.error(
                    format!("{path}.key"),
                    format!("{name:?} is not an HTTP header name"),
                );
                return None;
            };
            ConditionMatch::Header(header, c.field(path, values, not_values, parse_pattern))
        }
    };
    Some(compiled)
}

/// `abc`, `abc*`, `*abc` or `*`; a `*` anywhere else would be compared literally, which is never
/// what the author meant.
fn parse_pattern(value: &str) -> Result<StrMatch, String> {
    if value == "*" {
        return Ok(StrMatch::Present);
    }
    let stars = value.matches('*').count();
    if stars == 0 {
        return Ok(StrMatch::Exact(value.into()));
    }
    if stars == 1 {
        if let Some(suffix) = value.strip_prefix('*') {
            return Ok(StrMatch::Suffix(suffix.into()));
        }
        if let Some(prefix) = value.strip_suffix('*') {
            return Ok(StrMatch::Prefix(prefix.into()));
        }
    }
    Err(format!(
        "{value:?}: `*` may appear once, at the start (suffix match) or the end (prefix match)"
    ))
}

/// Istio's `<td>/ns/<ns>/sa/<sa>`, or any SPIFFE ID with a path written with its `spiffe://`
/// scheme, or a pattern; matched against the peer's ID without the scheme.
fn parse_principal(value: &str) -> Result<StrMatch, String> {
    let (with_scheme, body) = match value.strip_prefix(SPIFFE_SCHEME) {
        Some(body) => (true, body),
        None => (false, value),
    };
    let matcher = parse_pattern(body)?;
    if matches!(matcher, StrMatch::Exact(_)) {
        let parsed = SpiffeId::parse(&format!("{SPIFFE_SCHEME}{body}"));
        let ok = match &parsed {
            Ok(id) if with_scheme => !id.is_trust_domain_id(),
            Ok(id) => id.service_account().is_some(),
            Err(_) => false,
        };
        if !ok {
            let hint = if !with_scheme && body.matches('/').count() == 1 {
                "; for <namespace>/<service-account> use serviceAccounts"
            } else {
                ""
            };
            let detail = match parsed {
                Err(e) => format!(" ({e})"),
                Ok(_) => String::new(),
            };
            return Err(format!(
                "{value:?} is not a principal{detail}: write \
                 <trust-domain>/ns/<namespace>/sa/<service-account> (e.g. \
                 cluster.local/ns/demo/sa/web), a spiffe:// ID, or a prefix*, *suffix or * \
                 pattern{hint}"
            ));
        }
    }
    Ok(matcher)
}

fn parse_namespace(value: &str) -> Result<StrMatch, String> {
    let matcher = parse_pattern(value)?;
    if matches!(matcher, StrMatch::Exact(_)) && !is_dns_label(value) {
        return Err(format!(
            "{value:?} is not a namespace name (lower-case letters, digits and '-')"
        ));
    }
    Ok(matcher)
}

fn parse_service_account(value: &str) -> Result<ServiceAccount, String> {
    if value.contains('*') {
        return Err(format!(
            "{value:?}: serviceAccounts match exactly; for patterns use principals or namespaces"
        ));
    }
    match value.split_once('/') {
        Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => Ok(ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
        }),
        _ => Err(format!(
            "{value:?} is not <namespace>/<service-account> (e.g. demo/web)"
        )),
    }
}

fn parse_cidr(value: &str) -> Result<Cidr, String> {
    let bad = || format!("{value:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8)");
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr, Some(len.parse::<u8>().map_err(|_| bad())?)),
        None => (value, None),
    };
    let addr = addr.parse::<IpAddr>().map_err(|_| bad())?;
    let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
    Cidr::new(addr, len).ok_or_else(bad)
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{value:?} is not a port (1-65535)")),
    }
}

fn parse_method(value: &str) -> Result<StrMatch, String> {
    let upper = value.to_ascii_uppercase();
    if upper != value {
        return Err(format!("{value:?} must be upper case ({upper})"));
    }
    parse_pattern(value)
}

fn parse_path(value: &str) -> Result<StrMatch, String> {
    if value.contains(['{', '}']) {
        return Err(format!(
            "{value:?}: path templates ({{*}}, {{**}}) are not supported by sigil; use prefix* or *suffix"
        ));
    }
    if value.contains('?') {
        return Err(format!(
            "{value:?}: paths are matched without the query string; drop the '?...'"
        ));
    }
    let matcher = parse_pattern(value)?;
    if let StrMatch::Exact(p) | StrMatch::Prefix(p) = &matcher
        && !p.starts_with('/')
    {
        return Err(format!("{value:?} must start with '/'"));
    }
    Ok(matcher)
}

fn parse_host(value: &str) -> Result<StrMatch, String> {
    parse_pattern(&value.to_ascii_lowercase())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN_LEN && s.split('.').all(is_dns_label)
}

/// Validates one PeerAuthentication.
pub fn peer_authentication(
    object: &model::PeerAuthentication,
) -> Result<PeerAuthnPolicy, ValidationError> {
    let mut c = Checker::new(&object.metadata);
    c.header(
        &object.api_version,
        &object.kind,
        Kind::PeerAuthentication.name(),
        &object.metadata,
    );
    let spec = &object.spec;
    let selector = c.selector(&spec.selector);
    let mode = resolve_mode(spec.mtls.as_ref());
    let mut ports = Vec::new();
    if let Some(port_level) = &spec.port_level_mtls {
        if selector.is_empty() {
            c.error(
                "portLevelMtls",
                "needs a selector: port-level mTLS applies only to selected workloads (as in Istio)",
            );
        }
        if port_level.is_empty() {
            c.error("portLevelMtls", "must list at least one port");
        }
        for (key, mtls) in port_level {
            match parse_port(&key.0) {
                Ok(port) => ports.push((port, resolve_mode(Some(mtls)))),
                Err(message) => c.error(format!("portLevelMtls.{}", key.0), message),
            }
        }
    }
    let envelope = object.metadata.envelope(Kind::PeerAuthentication);
    if envelope.key.namespace == ROOT_NAMESPACE && !selector.is_empty() {
        c.warn(
            "selector",
            format!(
                "a PeerAuthentication with a selector in the root namespace {ROOT_NAMESPACE} is \
                 ignored (as in Istio); put it in the workloads' namespace"
            ),
        );
    }
    c.finish(|warnings| PeerAuthnPolicy::new(envelope, selector, mode, ports, warnings))
}

fn resolve_mode(mtls: Option<&model::Mtls>) -> Option<MtlsMode> {
    match mtls.and_then(|m| m.mode)? {
        MtlsModeSpec::Unset => None,
        MtlsModeSpec::Strict => Some(MtlsMode::Strict),
        MtlsModeSpec::Permissive => Some(MtlsMode::Permissive),
        MtlsModeSpec::Disable => Some(MtlsMode::Disable),
    }
}

/// Validates and compiles one object of either kind.
pub fn compile(object: &model::Object) -> Result<Compiled, ValidationError> {
    match object {
        model::Object::AuthorizationPolicy(p) => {
            authorization_policy(p).map(Compiled::AuthorizationPolicy)
        }
        model::Object::PeerAuthentication(p) => {
            peer_authentication(p).map(Compiled::PeerAuthentication)
        }
    }
}

/// The object made of `envelope` and the `spec` the user wrote, compiled; or, if it does not
/// decode or validate, what is enforced in its place. This is the node agent's check of every
/// object before it goes to a proxy.
pub fn object(envelope: &Envelope, spec: &Value) -> Result<Compiled, Box<InvalidPolicy>> {
    let compiled = model::Object::from_parts(envelope, spec)
        .and_then(|object| compile(&object).map_err(|e| e.to_string()));
    compiled.map_err(|reason| {
        Box::new(InvalidPolicy {
            envelope: envelope.clone(),
            selector: string_labels(&spec["selector"]["matchLabels"]),
            stand_in: StandIn::for_object(envelope.key.kind, spec["action"].as_str()),
            reason,
        })
    })
}

/// `matchLabels` if it is a map of strings, else empty (see [`InvalidPolicy::selector`]).
fn string_labels(value: &Value) -> Vec<(String, String)> {
    let Some(labels) = value.as_object() else {
        return Vec::new();
    };
    labels
        .iter()
        .map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
        .collect::<Option<_>>()
        .unwrap_or_default()
}

/// Validates every object and builds the set; the error lists the problems of every invalid
/// object, so one run shows them all.
pub fn policy_set(objects: &[model::Object]) -> Result<PolicySet, ValidationError> {
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    let mut problems = Vec::new();
    for object in objects {
        match compile(object) {
            Ok(Compiled::AuthorizationPolicy(p)) => authz.push(p),
            Ok(Compiled::PeerAuthentication(p)) => peer.push(p),
            Err(e) => problems.extend(e.problems),
        }
    }
    if problems.is_empty() {
        Ok(PolicySet::new(authz, peer))
    } else {
        Err(ValidationError { problems })
    }
}

#[cfg(test)]
mod tests;
