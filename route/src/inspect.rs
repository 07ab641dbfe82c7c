//! `sigil inspect route`: which route, rule, backends and filters a given request would take,
//! and why the others were not taken, computed by the agent's and the proxy's own code.
//!
//! The route objects come from `--policy-file` (the agent's, holding HTTPRoute, GRPCRoute,
//! BackendPolicy and RateLimitPolicy documents among the policies) and the Services from
//! `--mesh-file`'s `services:`; without these two, from the cluster (through `KUBECONFIG` or the
//! in-cluster config, as `sigil inspect policy` reads it): its route objects and its Services,
//! meshed or not, as an agent computes them from Services, EndpointSlices and labelled pods.
//! The caller reads them and passes the objects and the [`Catalog`]. They go through
//! [`crate::compile`] and the client's view exactly as in the agent, then the request through
//! [`crate::select`] and [`crate::filters`] as in the proxy.
//!
//! The first line is the answer: `ROUTE <kind> <namespace>/<name> rule <n>` when a rule is
//! selected, `REDIRECT <status> <location>` when that rule redirects, `NO-ROUTE` when no route
//! applies (the proxy balances over the Service itself), `NOT-FOUND` when routes apply and no
//! rule matches (the proxy answers 404, gRPC UNIMPLEMENTED). The lines after it explain.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::{HeaderMap, Method};
use sigil_identity::SpiffeId;
use sigil_policy::path::{self, PathNormalization};

use crate::compile::{ClientScope, compile};
use crate::compiled::{
    BackendTarget, Backends, Filter, GrpcMatch, HeaderModifier, HttpMatch, PathModifier, PortKey,
    PortRoutes, RetryPolicy, RouteKind, RouteOrigin, RouteSet, RouteTable, RuleRef, ServiceRef,
    Timeouts,
};
use crate::filters::{self, RequestUrl};
use crate::model::{ModelError, ParentReference, RouteObject, RouteObjects};
use crate::select::{self, EntryVerdict, RequestHead, RouteMatch};
use crate::validate::{self, Catalog};

#[derive(Args, Debug)]
pub struct InspectRouteArgs {
    /// The client's SPIFFE ID, as its certificate carries it: the `ns` segment is the namespace
    /// whose consumer routes apply to it.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub from: SpiffeId,
    /// The Service port called, as `<service>.<namespace>:<port>`.
    #[arg(long, value_name = "SERVICE.NAMESPACE:PORT", value_parser = parse_port_key)]
    pub to: PortKey,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: Method,
    /// HTTP request target: a path, with a query string if any. It is normalized as the proxy
    /// does (see --path-normalization) before matching.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The path normalization of the calling proxy (its --path-normalization).
    #[arg(long, value_enum, default_value_t = PathNormalization::Base, ignore_case = true)]
    pub path_normalization: PathNormalization,
    /// HTTP request header, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = sigil_policy::inspect::parse_header)]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// A gRPC request: content-type application/grpc (unless --header gives one), so the
    /// GRPCRoute table is used when the Service port has one. The path is /<service>/<method>.
    #[arg(long)]
    pub grpc: bool,
    /// The Host the client sends (for redirects); default `<service>.<namespace>`.
    #[arg(long)]
    pub host: Option<String>,
    /// The agent's --policy-file: the route documents in it are read, the others skipped.
    /// Without it (and --mesh-file), the routes and Services are read from the cluster.
    #[arg(long, value_name = "FILE", requires = "mesh_file")]
    pub policy_file: Option<PathBuf>,
    /// The agent's --mesh-file: its `services:` are the Services routes attach to.
    #[arg(long, value_name = "FILE", requires = "policy_file")]
    pub mesh_file: Option<PathBuf>,
}

/// `<service>.<namespace>:<port>`, as a client names a Service.
fn parse_port_key(s: &str) -> Result<PortKey, String> {
    let wrong = || format!("{s:?}: expected <service>.<namespace>:<port>");
    let (service, port) = s.rsplit_once(':').ok_or_else(wrong)?;
    let (name, namespace) = service.split_once('.').ok_or_else(wrong)?;
    let port: u16 = port.parse().map_err(|_| wrong())?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') || port == 0 {
        return Err(wrong());
    }
    Ok(PortKey {
        service: ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        port,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {source}")]
    Yaml {
        path: PathBuf,
        document: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: document {document}: {source}")]
    Object {
        path: PathBuf,
        document: usize,
        source: Box<ModelError>,
    },
    #[error("writing the answer: {0}")]
    Output(#[from] std::io::Error),
}

/// Answers the question about the route `objects` and the Services of `catalog`, and writes
/// the answer to `out`: Ok(false) when routes apply and no rule matches (the proxy answers
/// 404), Ok(true) otherwise.
pub fn run(
    args: &InspectRouteArgs,
    objects: &RouteObjects,
    catalog: &Catalog,
    out: &mut impl Write,
) -> Result<bool, InspectError> {
    let scope = ClientScope::of(&args.from);
    let routes = compile(objects, catalog, args.from.trust_domain()).view(&scope);
    let routed = answer(&routes, catalog, &scope, args, out)?;
    for line in status_lines(objects, catalog, &scope, &args.to) {
        writeln!(out, "{line}")?;
    }
    Ok(routed)
}

/// The Gateway API status (as the CA writes it) of every route that names the Service port as
/// a parent and could apply to the client: producer routes, and consumer routes of its
/// namespace, including those that were not accepted and so are in no table.
fn status_lines(
    objects: &RouteObjects,
    catalog: &Catalog,
    scope: &ClientScope,
    key: &PortKey,
) -> Vec<String> {
    let parents: Vec<(RouteKind, &str, &str, &[ParentReference])> = objects
        .http_routes
        .iter()
        .map(|r| {
            let m = &r.meta;
            (
                RouteKind::HttpRoute,
                m.namespace.as_str(),
                m.name.as_str(),
                r.spec.parent_refs.as_slice(),
            )
        })
        .chain(objects.grpc_routes.iter().map(|r| {
            let m = &r.meta;
            (
                RouteKind::GrpcRoute,
                m.namespace.as_str(),
                m.name.as_str(),
                r.spec.parent_refs.as_slice(),
            )
        }))
        .collect();
    let names_port = |namespace: &str, parent: &ParentReference| {
        parent.is_service()
            && parent.namespace.as_deref().unwrap_or(namespace) == key.service.namespace
            && parent.name == key.service.name
            && parent.port.is_none_or(|port| port == key.port)
    };
    let mut lines = Vec::new();
    for verdict in validate::judge_routes(objects, catalog) {
        if verdict.namespace != key.service.namespace && verdict.namespace != scope.namespace {
            continue;
        }
        let Some((_, _, _, refs)) = parents.iter().find(|(kind, namespace, name, _)| {
            *kind == verdict.kind && *namespace == verdict.namespace && *name == verdict.name
        }) else {
            continue;
        };
        for parent in &verdict.parents {
            if !refs
                .get(parent.parent_index)
                .is_some_and(|r| names_port(&verdict.namespace, r))
            {
                continue;
            }
            let conditions: Vec<String> = parent
                .conditions
                .iter()
                .map(|c| {
                    let mut text =
                        format!("{}={}", c.type_, if c.status { "True" } else { "False" });
                    if c.reason != c.type_ {
                        let _ = write!(text, " ({}", c.reason);
                        if !c.message.is_empty() {
                            let _ = write!(text, ": {}", c.message);
                        }
                        text.push(')');
                    }
                    text
                })
                .collect();
            lines.push(format!(
                "status: {} {}/{} parentRefs[{}]: {}",
                verdict.kind,
                verdict.namespace,
                verdict.name,
                parent.parent_index,
                conditions.join(", ")
            ));
        }
    }
    lines
}

/// The route documents of a policy file (the other documents are policies, not read here).
pub fn read_route_documents(path: &Path) -> Result<RouteObjects, InspectError> {
    let text = std::fs::read_to_string(path).map_err(|source| InspectError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let document_error = |source| InspectError::Yaml {
            path: path.to_owned(),
            document: index + 1,
            source,
        };
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(document_error)?;
        if value.is_null() {
            continue;
        }
        let object = RouteObject::from_json(value).map_err(|source| InspectError::Object {
            path: path.to_owned(),
            document: index + 1,
            source: Box::new(source),
        })?;
        objects.extend(object);
    }
    Ok(objects.into_iter().collect())
}

/// The answer for a client holding `routes` (its view).
pub fn answer(
    routes: &RouteSet,
    catalog: &Catalog,
    scope: &ClientScope,
    args: &InspectRouteArgs,
    out: &mut impl Write,
) -> std::io::Result<bool> {
    let key = &args.to;
    let target = match path::normalize_target(&args.path, args.path_normalization) {
        Ok(target) => target,
        Err(e) => {
            writeln!(out, "BAD-REQUEST")?;
            writeln!(
                out,
                "reason: the proxy answers 400 before routing: {e} (path normalization {})",
                args.path_normalization
            )?;
            return Ok(false);
        }
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    let mut headers: HeaderMap = args.headers.iter().cloned().collect();
    if args.grpc && !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
    }
    let request = RequestHead {
        method: &args.method,
        path,
        query,
        headers: &headers,
    };
    let grpc = select::is_grpc(&headers);

    let mut explanation = String::new();
    let e = &mut explanation;
    let known = catalog.services.get(&key.service);
    let _ = writeln!(
        e,
        "service: {} port {}{}",
        key.service,
        key.port,
        match known {
            None if args.mesh_file.is_some() =>
                " (not a meshed Service in --mesh-file: routes cannot attach to it)",
            None => " (not a Service in the cluster: routes cannot attach to it)",
            Some(info) if !info.meshed =>
                " (not fully meshed: some endpoint is not a sigil workload, so routes do not apply to it)",
            Some(info) if !info.ports.iter().any(|p| p.port == key.port) =>
                " (the Service has no such port)",
            Some(_) => "",
        }
    );
    let _ = writeln!(
        e,
        "client: {} (namespace {})",
        scope.id,
        if scope.namespace.is_empty() {
            "none"
        } else {
            &scope.namespace
        }
    );
    let _ = writeln!(
        e,
        "request: {} {target} ({}){}",
        args.method,
        if grpc { "gRPC" } else { "HTTP" },
        if target != args.path {
            format!(
                ", normalized ({}) from {}",
                args.path_normalization, args.path
            )
        } else {
            String::new()
        }
    );

    let Some(port_routes) = routes.ports.get(key) else {
        writeln!(out, "NO-ROUTE")?;
        out.write_all(explanation.as_bytes())?;
        writeln!(
            out,
            "routes: none applies to this client for {key}: the proxy balances over the Service itself"
        )?;
        return Ok(true);
    };
    let _ = writeln!(e, "routes: {}", origin(port_routes, scope));
    let default_host = format!("{}.{}", key.service.name, key.service.namespace);
    let asked = Asked {
        request,
        host: args.host.as_deref().unwrap_or(&default_host),
        port: key.port,
        explanation: &explanation,
        routes,
    };

    if let (true, Some(table)) = (grpc, &port_routes.grpc) {
        let not_found = "no GRPCRoute rule matches; the proxy answers UNIMPLEMENTED";
        return write_selection(out, table, grpc_match, not_found, &asked);
    }

    let Some(table) = &port_routes.http else {
        writeln!(out, "NO-ROUTE")?;
        out.write_all(explanation.as_bytes())?;
        writeln!(
            out,
            "routes: only GRPCRoutes apply and this is not a gRPC request: the proxy balances over the Service itself"
        )?;
        return Ok(true);
    };
    let not_found = format!(
        "no HTTPRoute rule matches; the proxy answers 404{}",
        if grpc { " (gRPC: UNIMPLEMENTED)" } else { "" }
    );
    write_selection(out, table, http_match, &not_found, &asked)
}

/// The request and what [`write_selection`] says besides the table.
struct Asked<'a> {
    request: RequestHead<'a>,
    /// The Host the client sends, for redirects.
    host: &'a str,
    port: u16,
    /// The lines after the answer's.
    explanation: &'a str,
    routes: &'a RouteSet,
}

/// The answer from one table (HTTPRoute or GRPCRoute): the rule selected, what it does, and why
/// the entries before it were not taken. `not_found` says what happens when no rule matches.
fn write_selection<M: RouteMatch>(
    out: &mut impl Write,
    table: &RouteTable<M>,
    describe_match: fn(&M) -> String,
    not_found: &str,
    asked: &Asked<'_>,
) -> std::io::Result<bool> {
    let verdicts = select::explain(table, &asked.request);
    let describe = |entry: usize| {
        let (rule, m) = &table.order[entry];
        format!(
            "{} match ({})",
            rule_title(&table.rules[*rule].source),
            describe_match(m)
        )
    };
    let Some(selected) = select::select_rule(table, &asked.request) else {
        writeln!(out, "NOT-FOUND")?;
        out.write_all(asked.explanation.as_bytes())?;
        writeln!(out, "selected: nothing: {not_found}")?;
        write_not_selected(out, &verdicts, None, describe)?;
        return Ok(false);
    };
    let rule = selected.rule;
    // Only an HTTPRoute rule redirects.
    let redirect = rule.filters.iter().find_map(|filter| match filter {
        Filter::Redirect(redirect) => Some(redirect),
        _ => None,
    });
    match redirect {
        Some(redirect) => {
            let target = filters::redirect(
                redirect,
                &RequestUrl {
                    scheme: "http",
                    host: asked.host,
                    port: asked.port,
                    path: asked.request.path,
                    query: asked.request.query,
                },
                selected.matched_prefix,
            );
            writeln!(
                out,
                "REDIRECT {} {}",
                target.status.as_u16(),
                target.location
            )?;
        }
        None => writeln!(
            out,
            "ROUTE {} {}/{} rule {}",
            rule.source.kind, rule.source.namespace, rule.source.name, rule.source.rule_index
        )?,
    }
    out.write_all(asked.explanation.as_bytes())?;
    writeln!(out, "selected: {}", describe(selected.entry))?;
    write_filters(
        out,
        &rule.filters,
        asked.request.path,
        selected.matched_prefix,
    )?;
    if redirect.is_none() {
        write_backends(out, &rule.backends)?;
        writeln!(out, "  timeouts:  {}", timeouts(&rule.timeouts))?;
        writeln!(out, "  retry:     {}", retry(rule.retry.as_ref()))?;
        for line in budget_lines(asked.routes, &rule.backends) {
            writeln!(out, "  {line}")?;
        }
    }
    write_not_selected(out, &verdicts, Some(selected.entry), describe)?;
    Ok(true)
}

fn origin(routes: &PortRoutes, scope: &ClientScope) -> String {
    match routes.origin {
        RouteOrigin::Consumer => format!(
            "consumer routes of namespace {} (they replace the producer routes of {} for this client)",
            scope.namespace, routes.key.service.namespace
        ),
        RouteOrigin::Producer => format!(
            "producer routes of namespace {}",
            routes.key.service.namespace
        ),
    }
}

fn rule_title(source: &RuleRef) -> String {
    let mut title = format!(
        "{} {}/{} rule {}",
        source.kind, source.namespace, source.name, source.rule_index
    );
    if let Some(name) = &source.rule_name {
        let _ = write!(title, " {name:?}");
    }
    title
}

fn http_match(m: &HttpMatch) -> String {
    let mut parts = Vec::new();
    if let Some(path) = &m.path {
        parts.push(path.to_string());
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    parts.extend(
        m.headers
            .iter()
            .map(|h| format!("header {}{}", h.name, h.value)),
    );
    parts.extend(
        m.query
            .iter()
            .map(|q| format!("query {}{}", q.name, q.value)),
    );
    if parts.is_empty() {
        "every request".to_owned()
    } else {
        parts.join(", ")
    }
}

fn grpc_match(m: &GrpcMatch) -> String {
    let mut parts = Vec::new();
    if let Some(service) = &m.service {
        parts.push(format!("service{service}"));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method{method}"));
    }
    parts.extend(
        m.headers
            .iter()
            .map(|h| format!("header {}{}", h.name, h.value)),
    );
    if parts.is_empty() {
        "every request".to_owned()
    } else {
        parts.join(", ")
    }
}

fn header_modifier(kind: &str, modifier: &HeaderModifier) -> String {
    let mut parts = Vec::new();
    let value = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    parts.extend(
        modifier
            .set
            .iter()
            .map(|(n, v)| format!("set {n}={}", value(v))),
    );
    parts.extend(
        modifier
            .add
            .iter()
            .map(|(n, v)| format!("add {n}={}", value(v))),
    );
    parts.extend(modifier.remove.iter().map(|n| format!("remove {n}")));
    format!("{kind} {}", parts.join(", "))
}

fn path_modifier(modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(path) => format!("ReplaceFullPath {path}"),
        PathModifier::ReplacePrefixMatch(path) => format!("ReplacePrefixMatch {path}"),
    }
}

/// The rule's filters in order, with the path the backend receives.
fn write_filters(
    out: &mut impl Write,
    filters: &[Filter],
    path: &str,
    matched_prefix: Option<&str>,
) -> std::io::Result<()> {
    if filters.is_empty() {
        return writeln!(out, "  filters:   none");
    }
    let mut upstream = None;
    let described: Vec<String> = filters
        .iter()
        .map(|filter| match filter {
            Filter::RequestHeaders(m) => header_modifier("RequestHeaderModifier", m),
            Filter::ResponseHeaders(m) => header_modifier("ResponseHeaderModifier", m),
            Filter::Redirect(r) => {
                let mut text = format!("RequestRedirect {}", r.status.as_u16());
                if let Some(scheme) = &r.scheme {
                    let _ = write!(text, " scheme {scheme}");
                }
                if let Some(hostname) = &r.hostname {
                    let _ = write!(text, " hostname {hostname}");
                }
                if let Some(port) = r.port {
                    let _ = write!(text, " port {port}");
                }
                if let Some(path) = &r.path {
                    let _ = write!(text, " path {}", path_modifier(path));
                }
                text
            }
            Filter::Rewrite(r) => {
                let mut text = "URLRewrite".to_owned();
                if let Some(hostname) = &r.hostname {
                    let _ = write!(text, " hostname {hostname}");
                }
                if let Some(modifier) = &r.path {
                    let _ = write!(text, " {}", path_modifier(modifier));
                    upstream = Some(filters::rewrite_path(modifier, path, matched_prefix));
                }
                text
            }
            Filter::Mirror(m) => format!(
                "RequestMirror to {}:{} ({}/{} of requests)",
                m.backend.service, m.backend.port, m.numerator, m.denominator
            ),
        })
        .collect();
    writeln!(out, "  filters:   {}", described.join("; "))?;
    if let Some(upstream) = upstream {
        writeln!(out, "             (upstream path {upstream})")?;
    }
    Ok(())
}

fn write_backends(out: &mut impl Write, backends: &Backends) -> std::io::Result<()> {
    let total = backends.total_weight();
    if total == 0 {
        return writeln!(
            out,
            "  backends:  none: the proxy answers 500 (gRPC: UNAVAILABLE)"
        );
    }
    let described: Vec<String> = backends
        .entries
        .iter()
        .map(|entry| {
            let share = f64::from(entry.weight) * 100.0 / total as f64;
            let target = match &entry.target {
                BackendTarget::Service(backend) => format!("{}:{}", backend.service, backend.port),
                BackendTarget::Invalid(reason) => {
                    format!("invalid ({reason}: answered 500)")
                }
            };
            let mut text = format!("{target} weight {} ({share:.0}%)", entry.weight);
            for filter in &entry.filters {
                if let Filter::RequestHeaders(m) | Filter::ResponseHeaders(m) = filter {
                    let kind = if matches!(filter, Filter::RequestHeaders(_)) {
                        "RequestHeaderModifier"
                    } else {
                        "ResponseHeaderModifier"
                    };
                    let _ = write!(text, " [{}]", header_modifier(kind, m));
                }
            }
            text
        })
        .collect();
    writeln!(out, "  backends:  {}", described.join(", "))
}

fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn timeouts(timeouts: &Timeouts) -> String {
    let mut parts = Vec::new();
    if let Some(request) = timeouts.request {
        parts.push(format!("request {}", duration(request)));
    }
    if let Some(backend) = timeouts.backend_request {
        parts.push(format!("backendRequest {}", duration(backend)));
    }
    if let Some(idle) = timeouts.idle {
        parts.push(format!("idle {}", duration(idle)));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn retry(retry: Option<&RetryPolicy>) -> String {
    let Some(retry) = retry else {
        return "none".to_owned();
    };
    let mut on: Vec<String> = retry.http_codes.iter().map(ToString::to_string).collect();
    on.extend(
        retry
            .grpc_codes
            .iter()
            .map(|code| format!("grpc-status {code}")),
    );
    on.push("connection errors".to_owned());
    format!(
        "attempts {} on {}; backoff {}; {}",
        retry.attempts,
        on.join(", "),
        duration(retry.backoff),
        if retry.non_idempotent {
            "every method"
        } else {
            "non-idempotent methods only when the request never reached the endpoint"
        }
    )
}

/// The retry budget and outlier detection of each backend Service of the rule.
fn budget_lines(routes: &RouteSet, backends: &Backends) -> Vec<String> {
    let mut lines = Vec::new();
    let mut seen = Vec::new();
    for entry in &backends.entries {
        let BackendTarget::Service(backend) = &entry.target else {
            continue;
        };
        if seen.contains(&&backend.service) {
            continue;
        }
        seen.push(&backend.service);
        let Some(policy) = routes.backends.get(&backend.service) else {
            lines.push(format!(
                "policy:    {}: default retry budget, no outlier detection",
                backend.service
            ));
            continue;
        };
        let budget = &policy.retry_budget;
        let outlier = match &policy.outlier_detection {
            None => "no outlier detection".to_owned(),
            Some(o) => format!(
                "outlier detection: {} consecutive 5xx, {} consecutive gateway errors, interval {}, ejection {} to {}, at most {}% ejected",
                o.consecutive_5xx_errors,
                o.consecutive_gateway_errors,
                duration(o.interval),
                duration(o.base_ejection_time),
                duration(o.max_ejection_time),
                o.max_ejection_percent
            ),
        };
        lines.push(format!(
            "policy:    {} ({}): retry budget {}% over {} + {} per {}; {outlier}",
            backend.service,
            policy.source,
            budget.percent,
            duration(budget.interval),
            budget.min_retries,
            duration(budget.min_interval),
        ));
    }
    lines
}

/// Every entry but the selected one, in precedence order, with why it was not taken.
fn write_not_selected(
    out: &mut impl Write,
    verdicts: &[EntryVerdict],
    selected: Option<usize>,
    describe: impl Fn(usize) -> String,
) -> std::io::Result<()> {
    let others: Vec<_> = verdicts
        .iter()
        .filter(|v| Some(v.entry) != selected)
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    writeln!(out, "not selected (in precedence order):")?;
    for verdict in others {
        let why = match &verdict.mismatch {
            Some(mismatch) => mismatch.to_string(),
            None => "matches too, but a match before it in precedence order is taken".to_owned(),
        };
        writeln!(
            out,
            "  {}. {} — {why}",
            verdict.entry + 1,
            describe(verdict.entry)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
