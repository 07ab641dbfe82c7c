//! The evaluation semantics as a table: every case names its policies (YAML, as users write
//! them), the request, the expected first line (`ALLOW ns/name`, `DENY default`, ...) and the
//! AUDIT policies expected to match.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::file::parse_policy_set;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// One rule whose `to` has an HTTP-only entry and a port entry.
const HTTP_OR_PORT: &str =
    "{rules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: [\"8080\"]}}]}]}";

/// An AuthorizationPolicy document; `spec` is flow-style YAML.
fn ap(ns_name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", ns_name, spec)
}

fn pa(ns_name: &str, spec: &str) -> String {
    doc("PeerAuthentication", ns_name, spec)
}

fn doc(kind: &str, ns_name: &str, spec: &str) -> String {
    let (ns, name) = ns_name.split_once('/').expect("ns/name");
    format!(
        "apiVersion: sigil.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

/// A request to a workload, defaulting to: workload demo with app=web, caller CLIENT over
/// mTLS from 10.1.2.3, port 8080, plain TCP.
#[derive(Clone)]
struct Req {
    namespace: &'static str,
    labels: &'static [(&'static str, &'static str)],
    peer: Option<&'static str>,
    ip: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str, &'static str)>,
    headers: &'static [(&'static str, &'static str)],
}

fn tcp() -> Req {
    Req {
        namespace: "demo",
        labels: &[("app", "web")],
        peer: Some(CLIENT),
        ip: "10.1.2.3",
        port: 8080,
        http: None,
        headers: &[],
    }
}

/// An HTTP request: method, path, host.
fn http(method: &'static str, path: &'static str, host: &'static str) -> Req {
    Req {
        http: Some((method, path, host)),
        ..tcp()
    }
}

impl Req {
    fn from(mut self, peer: &'static str) -> Self {
        self.peer = Some(peer);
        self
    }
    fn plaintext(mut self) -> Self {
        self.peer = None;
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.ip = ip;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn headers(mut self, headers: &'static [(&'static str, &'static str)]) -> Self {
        self.headers = headers;
        self
    }
    fn at_workload(
        mut self,
        namespace: &'static str,
        labels: &'static [(&'static str, &'static str)],
    ) -> Self {
        self.namespace = namespace;
        self.labels = labels;
        self
    }

    /// Evaluates against `set`: the first output line and the AUDIT matches.
    fn decide(&self, set: &PolicySet) -> (String, Vec<String>) {
        let labels: BTreeMap<String, String> = self
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let peer = self
            .peer
            .map(|id| Peer::new(&SpiffeId::parse(id).expect("test peer ID")));
        let mut headers = http::HeaderMap::new();
        for (name, value) in self.headers {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                http::HeaderValue::from_static(value),
            );
        }
        let request = Request {
            peer: peer.as_ref(),
            source_ip: self.ip.parse::<IpAddr>().expect("test IP"),
            destination_port: self.port,
            http: self.http.map(|(method, path, host)| HttpRequest {
                method,
                path,
                host,
                headers: &headers,
            }),
        };
        let workload = Workload {
            namespace: self.namespace,
            labels: &labels,
        };
        let decision = set.evaluate(&workload, &request);
        (
            decision.to_string(),
            decision.audit.iter().map(ToString::to_string).collect(),
        )
    }
}

struct Case {
    name: &'static str,
    policies: String,
    request: Req,
    want: &'static str,
    audit: &'static [&'static str],
}

fn case(name: &'static str, policies: String, request: Req, want: &'static str) -> Case {
    Case {
        name,
        policies,
        request,
        want,
        audit: &[],
    }
}

fn audited(
    name: &'static str,
    policies: String,
    request: Req,
    want: &'static str,
    audit: &'static [&'static str],
) -> Case {
    Case {
        name,
        policies,
        request,
        want,
        audit,
    }
}

/// An ALLOW policy demo/p with one rule whose `from` has one source.
fn allow_from(source: &str) -> String {
    ap(
        "demo/p",
        &format!("{{rules: [{{from: [{{source: {source}}}]}}]}}"),
    )
}

/// An ALLOW policy demo/p with one rule whose `to` has one operation.
fn allow_to(operation: &str) -> String {
    ap(
        "demo/p",
        &format!("{{rules: [{{to: [{{operation: {operation}}}]}}]}}"),
    )
}

/// An ALLOW policy demo/p with one rule made of `when` conditions.
fn allow_when(when: &str) -> String {
    ap("demo/p", &format!("{{rules: [{{when: {when}}}]}}"))
}

fn deny(ns_name: &str, rule: &str) -> String {
    ap(ns_name, &format!("{{action: DENY, rules: [{rule}]}}"))
}

fn cases() -> Vec<Case> {
    let allow_all = |ns_name: &str| ap(ns_name, "{rules: [{}]}");
    vec![
        // --- empty cases and defaults
        case("no policies at all", String::new(), tcp(), "ALLOW default"),
        case(
            "ALLOW without rules matches nothing (allow-nothing)",
            ap("demo/p", "{}"),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW with rules: [] matches nothing",
            ap("demo/p", "{rules: []}"),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW with rules: [{}] matches everything",
            allow_all("demo/p"),
            tcp().plaintext(),
            "ALLOW demo/p",
        ),
        case(
            "DENY with rules: [{}] matches everything",
            deny("demo/d", "{}"),
            tcp(),
            "DENY demo/d",
        ),
        audited(
            "AUDIT alone never changes the decision",
            ap("demo/a", "{action: AUDIT, rules: [{}]}"),
            tcp(),
            "ALLOW default",
            &["demo/a"],
        ),
        // --- principals: every match form, not*, plaintext
        case(
            "principals exact, Istio form",
            allow_from("{principals: [cluster.local/ns/demo/sa/client]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "principals exact, other identity",
            allow_from("{principals: [cluster.local/ns/demo/sa/other]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "principals with spiffe:// scheme",
            allow_from("{principals: [\"spiffe://cluster.local/ns/demo/sa/client\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "principals prefix",
            allow_from("{principals: [\"cluster.local/ns/demo/*\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "principals suffix",
            allow_from("{principals: [\"*/sa/client\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "principals suffix, other identity",
            allow_from("{principals: [\"*/sa/client\"]}"),
            tcp().from("spiffe://cluster.local/ns/demo/sa/other-client"),
            "DENY default",
        ),
        case(
            "principals * matches any identity",
            allow_from("{principals: [\"*\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "principals * never matches plaintext",
            allow_from("{principals: [\"*\"]}"),
            tcp().plaintext(),
            "DENY default",
        ),
        case(
            "principals values are OR'ed",
            allow_from("{principals: [cluster.local/ns/x/sa/y, cluster.local/ns/demo/sa/client]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "notPrincipals listing the caller",
            allow_from("{notPrincipals: [cluster.local/ns/demo/sa/client]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "notPrincipals listing someone else",
            allow_from("{notPrincipals: [cluster.local/ns/demo/sa/other]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "notPrincipals matches plaintext (Istio)",
            allow_from("{notPrincipals: [\"*\"]}"),
            tcp().plaintext(),
            "ALLOW demo/p",
        ),
        case(
            "principals and notPrincipals together",
            allow_from(
                "{principals: [\"cluster.local/ns/demo/*\"], notPrincipals: [cluster.local/ns/demo/sa/client]}",
            ),
            tcp(),
            "DENY default",
        ),
        // --- namespaces
        case(
            "namespaces exact",
            allow_from("{namespaces: [demo]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "namespaces exact, other namespace",
            allow_from("{namespaces: [prod]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "namespaces prefix",
            allow_from("{namespaces: [\"de*\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "namespaces suffix",
            allow_from("{namespaces: [\"*mo\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "notNamespaces listing the caller's",
            allow_from("{notNamespaces: [demo]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "namespaces never match plaintext",
            allow_from("{namespaces: [\"*\"]}"),
            tcp().plaintext(),
            "DENY default",
        ),
        case(
            "notNamespaces match plaintext",
            allow_from("{notNamespaces: [demo]}"),
            tcp().plaintext(),
            "ALLOW demo/p",
        ),
        case(
            "an ID without /ns/<ns>/sa/<sa> has no namespace",
            allow_from("{namespaces: [\"*\"]}"),
            tcp().from("spiffe://cluster.local/vm/builder"),
            "DENY default",
        ),
        // --- serviceAccounts
        case(
            "serviceAccounts match",
            allow_from("{serviceAccounts: [demo/client]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "serviceAccounts, other account",
            allow_from("{serviceAccounts: [demo/other]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "serviceAccounts ignore the trust domain (ztunnel)",
            allow_from("{serviceAccounts: [demo/client]}"),
            tcp().from("spiffe://other.example/ns/demo/sa/client"),
            "ALLOW demo/p",
        ),
        case(
            "notServiceAccounts listing the caller",
            allow_from("{notServiceAccounts: [demo/client]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "notServiceAccounts match plaintext",
            allow_from("{notServiceAccounts: [demo/client]}"),
            tcp().plaintext(),
            "ALLOW demo/p",
        ),
        // --- ipBlocks
        case(
            "ipBlocks CIDR containing the caller",
            allow_from("{ipBlocks: [10.0.0.0/8]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "ipBlocks single address",
            allow_from("{ipBlocks: [10.1.2.3]}"),
            tcp().plaintext(),
            "ALLOW demo/p",
        ),
        case(
            "ipBlocks not containing the caller",
            allow_from("{ipBlocks: [192.168.0.0/16]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "notIpBlocks containing the caller",
            allow_from("{notIpBlocks: [10.1.0.0/16]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "ipBlocks IPv6",
            allow_from("{ipBlocks: [\"fd00::/8\"]}"),
            tcp().ip("fd00::1"),
            "ALLOW demo/p",
        ),
        case(
            "an IPv4-mapped IPv6 caller is its IPv4 address",
            allow_from("{ipBlocks: [10.0.0.0/8]}"),
            tcp().ip("::ffff:10.1.2.3"),
            "ALLOW demo/p",
        ),
        // --- ports
        case(
            "ports match",
            allow_to("{ports: [\"8080\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "ports, other port",
            allow_to("{ports: [\"9090\"]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "notPorts listing the port",
            allow_to("{notPorts: [\"8080\"]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "notPorts listing another port",
            allow_to("{notPorts: [\"9090\"]}"),
            tcp(),
            "ALLOW demo/p",
        ),
        // --- methods
        case(
            "methods exact",
            allow_to("{methods: [GET, HEAD]}"),
            http("GET", "/", "web"),
            "ALLOW demo/p",
        ),
        case(
            "methods, other method",
            allow_to("{methods: [GET]}"),
            http("POST", "/", "web"),
            "DENY default",
        ),
        case(
            "methods are case-sensitive",
            allow_to("{methods: [GET]}"),
            http("get", "/", "web"),
            "DENY default",
        ),
        case(
            "methods prefix",
            allow_to("{methods: [\"P*\"]}"),
            http("PUT", "/", "web"),
            "ALLOW demo/p",
        ),
        case(
            "notMethods listing another method",
            allow_to("{notMethods: [DELETE]}"),
            http("GET", "/", "web"),
            "ALLOW demo/p",
        ),
        case(
            "notMethods listing the method",
            allow_to("{notMethods: [DELETE]}"),
            http("DELETE", "/", "web"),
            "DENY default",
        ),
        // --- paths
        case(
            "paths exact",
            allow_to("{paths: [/info]}"),
            http("GET", "/info", "web"),
            "ALLOW demo/p",
        ),
        case(
            "paths exact, trailing slash differs",
            allow_to("{paths: [/info]}"),
            http("GET", "/info/", "web"),
            "DENY default",
        ),
        case(
            "paths prefix",
            allow_to("{paths: [\"/api/*\"]}"),
            http("GET", "/api/v1/users", "web"),
            "ALLOW demo/p",
        ),
        case(
            "paths suffix",
            allow_to("{paths: [\"*.css\"]}"),
            http("GET", "/static/site.css", "web"),
            "ALLOW demo/p",
        ),
        case(
            "paths * matches any path",
            allow_to("{paths: [\"*\"]}"),
            http("GET", "/anything", "web"),
            "ALLOW demo/p",
        ),
        case(
            "paths are matched without the query string",
            allow_to("{paths: [/info]}"),
            http("GET", "/info?verbose=1", "web"),
            "ALLOW demo/p",
        ),
        case(
            "notPaths listing the path",
            allow_to("{notPaths: [\"/admin*\"]}"),
            http("GET", "/admin/users", "web"),
            "DENY default",
        ),
        // --- hosts
        case(
            "hosts are case-insensitive",
            allow_to("{hosts: [Web.Demo]}"),
            http("GET", "/", "web.DEMO"),
            "ALLOW demo/p",
        ),
        case(
            "hosts exact does not match a Host with a port",
            allow_to("{hosts: [web.demo]}"),
            http("GET", "/", "web.demo:8080"),
            "DENY default",
        ),
        case(
            "hosts prefix host:* matches any port",
            allow_to("{hosts: [\"web.demo:*\"]}"),
            http("GET", "/", "web.demo:8080"),
            "ALLOW demo/p",
        ),
        case(
            "hosts suffix",
            allow_to("{hosts: [\"*.svc.cluster.local\"]}"),
            http("GET", "/", "web.demo.svc.cluster.local"),
            "ALLOW demo/p",
        ),
        case(
            "notHosts listing the host",
            allow_to("{notHosts: [\"*.internal\"]}"),
            http("GET", "/", "db.internal"),
            "DENY default",
        ),
        // --- when
        case(
            "request.headers value",
            allow_when("[{key: \"request.headers[x-tenant]\", values: [a]}]"),
            http("GET", "/", "web").headers(&[("x-tenant", "a")]),
            "ALLOW demo/p",
        ),
        case(
            "request.headers absent header",
            allow_when("[{key: \"request.headers[x-tenant]\", values: [\"*\"]}]"),
            http("GET", "/", "web"),
            "DENY default",
        ),
        case(
            "request.headers notValues match an absent header",
            allow_when("[{key: \"request.headers[x-tenant]\", notValues: [b]}]"),
            http("GET", "/", "web"),
            "ALLOW demo/p",
        ),
        case(
            "request.headers names are case-insensitive, values prefix",
            allow_when("[{key: \"request.headers[X-Tenant]\", values: [\"ab*\"]}]"),
            http("GET", "/", "web").headers(&[("x-tenant", "abc")]),
            "ALLOW demo/p",
        ),
        case(
            "request.headers sent twice are joined with a comma",
            allow_when("[{key: \"request.headers[x-tenant]\", values: [\"a,b\"]}]"),
            http("GET", "/", "web").headers(&[("x-tenant", "a"), ("x-tenant", "b")]),
            "ALLOW demo/p",
        ),
        case(
            "source.ip values",
            allow_when("[{key: source.ip, values: [10.1.0.0/16]}]"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "source.ip notValues",
            allow_when("[{key: source.ip, notValues: [10.1.2.3]}]"),
            tcp(),
            "DENY default",
        ),
        case(
            "source.namespace",
            allow_when("[{key: source.namespace, values: [demo]}]"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "source.principal",
            allow_when("[{key: source.principal, values: [\"*/sa/client\"]}]"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "source.principal never matches plaintext",
            allow_when("[{key: source.principal, values: [\"*\"]}]"),
            tcp().plaintext(),
            "DENY default",
        ),
        case(
            "destination.port",
            allow_when("[{key: destination.port, values: [\"8080\"]}]"),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "destination.port notValues",
            allow_when("[{key: destination.port, notValues: [\"8080\"]}]"),
            tcp(),
            "DENY default",
        ),
        case(
            "values and notValues both apply",
            allow_when("[{key: source.namespace, values: [\"*\"], notValues: [demo]}]"),
            tcp(),
            "DENY default",
        ),
        case(
            "when conditions are AND'ed",
            allow_when(
                "[{key: source.namespace, values: [demo]}, {key: destination.port, values: [\"9090\"]}]",
            ),
            tcp(),
            "DENY default",
        ),
        // --- HTTP-only fields on non-HTTP connections
        case(
            "ALLOW methods on TCP never match",
            allow_to("{methods: [GET]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW notMethods on TCP never match",
            allow_to("{notMethods: [DELETE]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW request.headers on TCP never match",
            allow_when("[{key: \"request.headers[x-tenant]\", notValues: [b]}]"),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW: an HTTP field drops the whole rule on TCP, other to entries too",
            ap("demo/p", HTTP_OR_PORT),
            tcp(),
            "DENY default",
        ),
        case(
            "ALLOW: the same rule over HTTP matches by its port entry",
            ap("demo/p", HTTP_OR_PORT),
            http("POST", "/", "web"),
            "ALLOW demo/p",
        ),
        case(
            "ALLOW: a later rule without HTTP fields still matches TCP",
            ap(
                "demo/p",
                "{rules: [{to: [{operation: {paths: [/x]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}",
            ),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "DENY methods on TCP always match",
            deny("demo/d", "{to: [{operation: {methods: [GET]}}]}"),
            tcp(),
            "DENY demo/d",
        ),
        case(
            "DENY: HTTP fields ignored on TCP, the port still counts (match)",
            deny(
                "demo/d",
                "{to: [{operation: {paths: [/admin], ports: [\"8080\"]}}]}",
            ),
            tcp(),
            "DENY demo/d",
        ),
        case(
            "DENY: HTTP fields ignored on TCP, the port still counts (no match)",
            deny(
                "demo/d",
                "{to: [{operation: {paths: [/admin], ports: [\"8080\"]}}]}",
            ),
            tcp().port(9090),
            "ALLOW default",
        ),
        case(
            "DENY request.headers on TCP always match",
            deny(
                "demo/d",
                "{when: [{key: \"request.headers[x-tenant]\", values: [a]}]}",
            ),
            tcp(),
            "DENY demo/d",
        ),
        case(
            "DENY methods over HTTP match only the method",
            deny("demo/d", "{to: [{operation: {methods: [POST]}}]}"),
            http("GET", "/", "web"),
            "ALLOW default",
        ),
        audited(
            "AUDIT HTTP fields on TCP always match",
            ap(
                "demo/a",
                "{action: AUDIT, rules: [{to: [{operation: {paths: [\"/secret*\"]}}]}]}",
            ),
            tcp(),
            "ALLOW default",
            &["demo/a"],
        ),
        // --- combining: OR and AND at each level
        case(
            "from entries are OR'ed",
            ap(
                "demo/p",
                "{rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/y]}}, {source: {namespaces: [demo]}}]}]}",
            ),
            tcp(),
            "ALLOW demo/p",
        ),
        case(
            "fields of a source are AND'ed",
            allow_from("{namespaces: [demo], ipBlocks: [192.168.0.0/16]}"),
            tcp(),
            "DENY default",
        ),
        case(
            "from and to are AND'ed",
            ap(
                "demo/p",
                "{rules: [{from: [{source: {namespaces: [demo]}}], to: [{operation: {ports: [\"9090\"]}}]}]}",
            ),
            tcp(),
            "DENY default",
        ),
        case(
            "fields of an operation are AND'ed",
            allow_to("{methods: [GET], paths: [/a]}"),
            http("GET", "/b", "web"),
            "DENY default",
        ),
        case(
            "rules are OR'ed",
            ap(
                "demo/p",
                "{rules: [{from: [{source: {namespaces: [prod]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}",
            ),
            tcp(),
            "ALLOW demo/p",
        ),
        // --- DENY over ALLOW, and which policy decides
        case(
            "DENY wins over a matching ALLOW",
            allow_all("demo/allow")
                + &deny("demo/deny", "{from: [{source: {namespaces: [demo]}}]}"),
            tcp(),
            "DENY demo/deny",
        ),
        case(
            "a mesh-wide DENY wins over a namespace ALLOW",
            allow_all("demo/allow") + &deny("sigil-system/deny", "{}"),
            tcp(),
            "DENY sigil-system/deny",
        ),
        case(
            "a DENY that does not match leaves the ALLOW",
            allow_all("demo/allow")
                + &deny("demo/deny", "{from: [{source: {namespaces: [prod]}}]}"),
            tcp(),
            "ALLOW demo/allow",
        ),
        case(
            "several DENY match: the first by namespace/name decides",
            deny("demo/b-deny", "{}") + &deny("demo/a-deny", "{}"),
            tcp(),
            "DENY demo/a-deny",
        ),
        case(
            "several ALLOW match: the first by namespace/name decides",
            allow_all("demo/z-allow") + &allow_all("demo/m-allow"),
            tcp(),
            "ALLOW demo/m-allow",
        ),
        case(
            "one of several ALLOW policies matches",
            ap(
                "demo/a",
                "{rules: [{from: [{source: {namespaces: [prod]}}]}]}",
            ) + &ap(
                "demo/b",
                "{rules: [{from: [{source: {namespaces: [demo]}}]}]}",
            ),
            tcp(),
            "ALLOW demo/b",
        ),
        // --- AUDIT
        audited(
            "AUDIT is reported alongside a DENY",
            ap("demo/a", "{action: AUDIT, rules: [{}]}") + &deny("demo/d", "{}"),
            tcp(),
            "DENY demo/d",
            &["demo/a"],
        ),
        audited(
            "AUDIT is reported alongside an ALLOW",
            ap("demo/a", "{action: AUDIT, rules: [{}]}") + &allow_all("demo/p"),
            tcp(),
            "ALLOW demo/p",
            &["demo/a"],
        ),
        audited(
            "an AUDIT policy is not an ALLOW policy",
            ap("demo/a", "{action: AUDIT, rules: [{}]}")
                + &ap(
                    "demo/p",
                    "{rules: [{from: [{source: {namespaces: [prod]}}]}]}",
                ),
            tcp(),
            "DENY default",
            &["demo/a"],
        ),
        audited(
            "every matching AUDIT policy is reported, in order",
            ap("sigil-system/mesh-audit", "{action: AUDIT, rules: [{}]}")
                + &ap("demo/a", "{action: AUDIT, rules: [{}]}")
                + &ap(
                    "demo/b",
                    "{action: AUDIT, rules: [{from: [{source: {namespaces: [prod]}}]}]}",
                ),
            tcp(),
            "ALLOW default",
            &["demo/a", "sigil-system/mesh-audit"],
        ),
        // --- scope: namespace, mesh-wide, selector
        case(
            "a policy in another namespace does not apply",
            ap("prod/p", "{}"),
            tcp(),
            "ALLOW default",
        ),
        case(
            "a root-namespace policy without selector applies mesh-wide",
            ap("sigil-system/p", "{}"),
            tcp(),
            "DENY default",
        ),
        case(
            "a root-namespace policy with a selector applies in every namespace",
            ap(
                "sigil-system/p",
                "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [demo]}}]}]}",
            ),
            tcp().at_workload("prod", &[("app", "web")]),
            "ALLOW sigil-system/p",
        ),
        case(
            "a root-namespace selector that does not match",
            ap("sigil-system/p", "{selector: {matchLabels: {app: db}}}"),
            tcp(),
            "ALLOW default",
        ),
        case(
            "a namespace policy whose selector matches",
            ap("demo/p", "{selector: {matchLabels: {app: web}}}"),
            tcp(),
            "DENY default",
        ),
        case(
            "a namespace policy whose selector does not match",
            ap("demo/p", "{selector: {matchLabels: {app: db}}}"),
            tcp(),
            "ALLOW default",
        ),
        case(
            "every selector label must match",
            ap(
                "demo/p",
                "{selector: {matchLabels: {app: web, version: v2}}}",
            ),
            tcp().at_workload("demo", &[("app", "web"), ("version", "v1")]),
            "ALLOW default",
        ),
        case(
            "an empty selector selects the whole namespace",
            ap("demo/p", "{selector: {}}"),
            tcp().at_workload("demo", &[]),
            "DENY default",
        ),
        case(
            "a workload in the root namespace gets root policies",
            allow_all("sigil-system/p"),
            tcp().at_workload("sigil-system", &[]),
            "ALLOW sigil-system/p",
        ),
        case(
            "a same-named policy in another namespace does not apply",
            allow_all("prod/p") + &ap("demo/p", "{}"),
            tcp(),
            "DENY default",
        ),
    ]
}

#[test]
fn semantics_table() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let set = match parse_policy_set(&case.policies) {
            Ok(set) => set,
            Err(e) => {
                failures.push(format!("{}: policies rejected: {e}", case.name));
                continue;
            }
        };
        let (got, audit) = case.request.decide(&set);
        if got != case.want || audit != case.audit {
            failures.push(format!(
                "{}: got {got:?} audit {audit:?}, want {:?} audit {:?}",
                case.name, case.want, case.audit
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decisions_explain_themselves() {
    let set = parse_policy_set(
        &(ap(
            "demo/p",
            "{rules: [{from: [{source: {namespaces: [prod]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}",
        ) + &ap("demo/q", "{rules: [{from: [{source: {namespaces: [x]}}]}]}")
            + &deny("demo/d", "{to: [{operation: {ports: [\"22\"]}}]}")),
    )
    .unwrap();
    let labels = BTreeMap::new();
    let workload = Workload {
        namespace: "demo",
        labels: &labels,
    };
    let request = |port| Request {
        peer: None,
        source_ip: IpAddr::from([10, 0, 0, 1]),
        destination_port: port,
        http: None,
    };
    let allowed = set.evaluate(&workload, &request(8080));
    assert!(allowed.is_allowed());
    assert_eq!(
        allowed.reason.to_string(),
        "rules[1] of ALLOW policy demo/p matched"
    );
    let denied = set.evaluate(&workload, &request(22));
    assert_eq!(denied.to_string(), "DENY demo/d");
    assert_eq!(
        denied.reason.to_string(),
        "rules[0] of DENY policy demo/d matched"
    );
    let unmatched = set.evaluate(&workload, &request(9090));
    assert_eq!(unmatched.policy(), None);
    assert_eq!(
        unmatched.reason.to_string(),
        "2 ALLOW policies apply to the workload and none matched"
    );
    let other = Workload {
        namespace: "prod",
        labels: &labels,
    };
    assert_eq!(
        set.evaluate(&other, &request(22)).reason.to_string(),
        "no DENY policy matched and no ALLOW policy applies to the workload"
    );
}

/// PeerAuthentication resolution: (case, policies, workload namespace and labels, port,
/// expected mode, level, deciding policy).
type Labels = &'static [(&'static str, &'static str)];
type MtlsCase = (
    &'static str,
    String,
    &'static str,
    Labels,
    u16,
    MtlsMode,
    MtlsLevel,
    Option<&'static str>,
);

#[test]
fn effective_mtls_table() {
    let web: Labels = &[("app", "web")];
    let cases: Vec<MtlsCase> = vec![
        (
            "nothing configured: the caller's default",
            String::new(),
            "demo",
            web,
            8080,
            MtlsMode::Strict,
            MtlsLevel::Default,
            None,
        ),
        (
            "mesh-wide",
            pa("sigil-system/mesh", "{mtls: {mode: PERMISSIVE}}"),
            "demo",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Mesh,
            Some("sigil-system/mesh"),
        ),
        (
            "namespace-wide overrides mesh-wide",
            pa("sigil-system/mesh", "{mtls: {mode: PERMISSIVE}}")
                + &pa("demo/ns", "{mtls: {mode: STRICT}}"),
            "demo",
            web,
            8080,
            MtlsMode::Strict,
            MtlsLevel::Namespace,
            Some("demo/ns"),
        ),
        (
            "UNSET at namespace level inherits mesh-wide",
            pa("sigil-system/mesh", "{mtls: {mode: DISABLE}}")
                + &pa("demo/ns", "{mtls: {mode: UNSET}}"),
            "demo",
            web,
            8080,
            MtlsMode::Disable,
            MtlsLevel::Mesh,
            Some("sigil-system/mesh"),
        ),
        (
            "workload selector overrides namespace-wide",
            pa("demo/ns", "{mtls: {mode: STRICT}}")
                + &pa(
                    "demo/web",
                    "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}",
                ),
            "demo",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Workload,
            Some("demo/web"),
        ),
        (
            "a selector that does not match",
            pa("demo/ns", "{mtls: {mode: PERMISSIVE}}")
                + &pa(
                    "demo/db",
                    "{selector: {matchLabels: {app: db}}, mtls: {mode: DISABLE}}",
                ),
            "demo",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Namespace,
            Some("demo/ns"),
        ),
        (
            "port-level overrides the workload mode on its port",
            pa(
                "demo/web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}",
            ),
            "demo",
            web,
            9090,
            MtlsMode::Disable,
            MtlsLevel::Port,
            Some("demo/web"),
        ),
        (
            "port-level leaves other ports alone",
            pa(
                "demo/web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}",
            ),
            "demo",
            web,
            8080,
            MtlsMode::Strict,
            MtlsLevel::Workload,
            Some("demo/web"),
        ),
        (
            "port-level UNSET inherits, down to namespace-wide",
            pa("demo/ns", "{mtls: {mode: PERMISSIVE}}")
                + &pa(
                    "demo/web",
                    "{selector: {matchLabels: {app: web}}, portLevelMtls: {\"8080\": {mode: UNSET}}}",
                ),
            "demo",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Namespace,
            Some("demo/ns"),
        ),
        (
            "a selector policy in the root namespace is ignored",
            pa(
                "sigil-system/web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
            ),
            "demo",
            web,
            8080,
            MtlsMode::Strict,
            MtlsLevel::Default,
            None,
        ),
        (
            "in the root namespace, namespace-wide is mesh-wide",
            pa("sigil-system/mesh", "{mtls: {mode: PERMISSIVE}}"),
            "sigil-system",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Mesh,
            Some("sigil-system/mesh"),
        ),
        (
            "another namespace's policy does not apply",
            pa("prod/ns", "{mtls: {mode: DISABLE}}"),
            "demo",
            web,
            8080,
            MtlsMode::Strict,
            MtlsLevel::Default,
            None,
        ),
        (
            "two namespace-wide policies: the first by name without timestamps",
            pa("demo/b", "{mtls: {mode: DISABLE}}") + &pa("demo/a", "{mtls: {mode: PERMISSIVE}}"),
            "demo",
            web,
            8080,
            MtlsMode::Permissive,
            MtlsLevel::Namespace,
            Some("demo/a"),
        ),
        (
            "two namespace-wide policies: the oldest wins",
            pa("demo/a", "{mtls: {mode: PERMISSIVE}}").replace(
                "namespace: demo}",
                "namespace: demo, creationTimestamp: \"2026-02-01T00:00:00Z\"}",
            ) + &pa("demo/b", "{mtls: {mode: DISABLE}}").replace(
                "namespace: demo}",
                "namespace: demo, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
            ),
            "demo",
            web,
            8080,
            MtlsMode::Disable,
            MtlsLevel::Namespace,
            Some("demo/b"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, policies, namespace, labels, port, mode, level, policy) in cases {
        let set = parse_policy_set(&policies).unwrap_or_else(|e| panic!("{name}: {e}"));
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let workload = Workload {
            namespace,
            labels: &labels,
        };
        let got = set.effective_mtls(&workload, port, DEFAULT_MTLS_MODE);
        let got_policy = got.policy.map(ToString::to_string);
        if (got.mode, got.level, got_policy.as_deref()) != (mode, level, policy) {
            failures.push(format!(
                "{name}: got {} {} {got_policy:?}, want {mode} {level} {policy:?}",
                got.mode, got.level
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_callers_default_fills_in_where_nothing_is_configured() {
    let set = PolicySet::default();
    let labels = BTreeMap::new();
    let workload = Workload {
        namespace: "demo",
        labels: &labels,
    };
    let got = set.effective_mtls(&workload, 80, MtlsMode::Permissive);
    assert_eq!(got.mode, MtlsMode::Permissive);
    assert_eq!(got.level, MtlsLevel::Default);
}

/// `evaluate_any_http`: (case, policies, expected first line) for an HTTP connection from
/// CLIENT on port 8080 whose requests are not known yet.
#[test]
fn any_http_request_table() {
    let cases = [
        ("no policies", String::new(), "ALLOW default"),
        (
            "an ALLOW rule with HTTP fields could match some request",
            ap(
                "demo/p",
                "{rules: [{to: [{operation: {methods: [GET], notPaths: [/admin]}}], when: [{key: \"request.headers[x]\", values: [a]}]}]}",
            ),
            "ALLOW demo/p",
        ),
        (
            "the ALLOW rule's other fields still count",
            ap(
                "demo/p",
                "{rules: [{to: [{operation: {methods: [GET], ports: [\"9090\"]}}]}]}",
            ),
            "DENY default",
        ),
        (
            "a DENY rule with HTTP fields may spare some request",
            ap("demo/p", "{rules: [{}]}")
                + &deny("demo/d", "{to: [{operation: {paths: [\"/admin*\"]}}]}"),
            "ALLOW demo/p",
        ),
        (
            "a DENY rule whose port-only entry matches denies every request",
            ap("demo/p", "{rules: [{}]}")
                + &deny(
                    "demo/d",
                    "{to: [{operation: {methods: [GET]}}, {operation: {ports: [\"8080\"]}}]}",
                ),
            "DENY demo/d",
        ),
    ];
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let workload = Workload {
        namespace: "demo",
        labels: &labels,
    };
    let peer = Peer::new(&SpiffeId::parse(CLIENT).unwrap());
    let request = Request {
        peer: Some(&peer),
        source_ip: IpAddr::from([10, 1, 2, 3]),
        destination_port: 8080,
        http: None,
    };
    for (name, policies, want) in cases {
        let set = parse_policy_set(&policies).unwrap();
        assert_eq!(
            set.evaluate_any_http(&workload, &request).to_string(),
            want,
            "{name}"
        );
    }
}
