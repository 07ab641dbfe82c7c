//! Policy evaluation with Istio's semantics, so policies carry over from Istio unchanged.
//!
//! **Scope.** A policy in the root namespace [`ROOT_NAMESPACE`] applies mesh-wide: without a
//! selector to every workload, with one to matching workloads in every namespace. A policy in
//! the workload's own namespace applies when it has no selector or its selector matches.
//!
//! **Decision**, in this order (CUSTOM does not exist in sigil):
//! 1. a DENY policy matches → DENY, decided by that policy;
//! 2. AUDIT policies that match are reported; they never change the decision;
//! 3. no ALLOW policy applies to the workload → ALLOW, decided by `default`;
//! 4. an ALLOW policy matches → ALLOW, decided by that policy;
//! 5. otherwise DENY, decided by `default` (the reason counts the ALLOW policies that applied;
//!    no single policy denied, and Istio users read "default deny" here).
//!
//! When several policies match, the first in `namespace/name` order decides.
//!
//! **Matching.** Rules are OR'ed; within a rule `from`, `to` and `when` are AND'ed; entries of
//! `from` (or `to`) are OR'ed; fields within a source or operation are AND'ed; values within a
//! field are OR'ed; no `not*` value may match. Absent `rules` (or `[]`) match nothing; `[{}]`
//! matches everything. As in Istio (ztunnel's `rbac.rs`, Envoy's RBAC filter):
//! - a peer without identity (plaintext) never matches `principals`, `namespaces`,
//!   `serviceAccounts` or `source.principal`/`source.namespace` values, and always matches their
//!   `not*` forms; a SPIFFE ID not shaped `/ns/<ns>/sa/<sa>` has no namespace or service account;
//! - on a non-HTTP connection, an ALLOW rule that uses any HTTP-only field (hosts, methods,
//!   paths, their `not*` forms, `request.headers`) does not match at all (Istio drops the whole
//!   rule), while in DENY and AUDIT rules those fields are ignored, i.e. count as matching;
//! - hosts are case-insensitive and compared with the whole Host header, port included (so
//!   `example.com` does not match `example.com:8080`; write `example.com:*` for that);
//! - paths are matched without the query string; methods and header values are case-sensitive;
//!   a header sent several times is matched as its values joined with `,` (as Envoy does).
//!
//! **mTLS.** [`PolicySet::effective_mtls`] resolves PeerAuthentication as Istio does: the
//! workload-selector policy in the workload's namespace overrides the namespace-wide one, which
//! overrides the mesh-wide one in the root namespace; UNSET inherits; a port-level mode
//! overrides the workload's; among competing policies at one level the oldest (then the first
//! by name) wins; selector policies in the root namespace are ignored. Where no level sets a
//! mode, the caller's default applies (Istio's is PERMISSIVE; sigil's is [`DEFAULT_MTLS_MODE`]).
//!
//! [`PolicySet::evaluate_any_http`] answers a different question for live HTTP connections after
//! a policy change: could any request on this connection still be allowed?
//!
//! Evaluating allocates nothing unless an AUDIT policy matches or a header was sent twice.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use sigil_identity::SpiffeId;

use crate::compiled::{
    AuthzAction, AuthzPolicy, Cidr, Compiled, ConditionMatch, Field, MtlsMode, OperationMatch,
    PeerAuthnPolicy, PolicyName, Rule, ServiceAccount, SourceMatch, StrMatch,
};
use crate::envelope::ROOT_NAMESPACE;
/// sigil's mTLS mode where no PeerAuthentication sets one: the proxy's own default
/// (`--mtls-mode STRICT`), secure by default, where Istio falls back to PERMISSIVE.
pub const DEFAULT_MTLS_MODE: MtlsMode = MtlsMode::Strict;
/// What a decision with no deciding policy prints in place of `namespace/name`.
pub const DEFAULT_DECIDER: &str = "default";

/// The workload being called.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// A peer identity, prepared once per connection so each decision only compares strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE ID without `spiffe://`, the form Istio principals are written in.
    principal: Box<str>,
    service_account: Option<(Box<str>, Box<str>)>,
}

impl Peer {
    pub fn new(id: &SpiffeId) -> Self {
        let uri = id.to_string();
        let principal = uri.strip_prefix("spiffe://").unwrap_or(&uri).into();
        Peer {
            principal,
            service_account: id.service_account().map(|(ns, sa)| (ns.into(), sa.into())),
        }
    }

    fn namespace(&self) -> Option<&str> {
        self.service_account.as_ref().map(|(ns, _)| &**ns)
    }
}

/// The attributes of an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The request target's path; a query string is ignored.
    pub path: &'a str,
    /// The Host header (or `:authority`), port included if the client sent one.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// One connection or request to decide on.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// None: plaintext, no peer identity.
    pub peer: Option<&'a Peer>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
    /// None: a non-HTTP connection (plain TCP, or TLS the proxy does not terminate).
    pub http: Option<HttpRequest<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        })
    }
}

/// Why a decision came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason<'s> {
    DenyMatched { policy: &'s PolicyName, rule: usize },
    NoAllowPolicy,
    AllowMatched { policy: &'s PolicyName, rule: usize },
    NoAllowMatched { allow_policies: usize },
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DenyMatched { policy, rule } => {
                write!(f, "rules[{rule}] of DENY policy {policy} matched")
            }
            Reason::NoAllowPolicy => {
                f.write_str("no DENY policy matched and no ALLOW policy applies to the workload")
            }
            Reason::AllowMatched { policy, rule } => {
                write!(f, "rules[{rule}] of ALLOW policy {policy} matched")
            }
            Reason::NoAllowMatched { allow_policies } => write!(
                f,
                "{allow_policies} ALLOW {} to the workload and none matched",
                if *allow_policies == 1 {
                    "policy applies"
                } else {
                    "policies apply"
                }
            ),
        }
    }
}

/// The outcome of one evaluation. Displays as `ALLOW ns/name`, `DENY default`, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'s> {
    pub verdict: Verdict,
    pub reason: Reason<'s>,
    /// Every AUDIT policy that matched, in `namespace/name` order.
    pub audit: Vec<&'s PolicyName>,
}

impl<'s> Decision<'s> {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The deciding policy; None means `default`.
    pub fn policy(&self) -> Option<&'s PolicyName> {
        match self.reason {
            Reason::DenyMatched { policy, .. } | Reason::AllowMatched { policy, .. } => {
                Some(policy)
            }
            Reason::NoAllowPolicy | Reason::NoAllowMatched { .. } => None,
        }
    }
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.policy() {
            Some(policy) => write!(f, "{} {policy}", self.verdict),
            None => write!(f, "{} {DEFAULT_DECIDER}", self.verdict),
        }
    }
}

/// The PeerAuthentication level a mode came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsLevel {
    /// No PeerAuthentication sets a mode: the caller's default.
    Default,
    Mesh,
    Namespace,
    Workload,
    Port,
}

impl fmt::Display for MtlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsLevel::Default => "default",
            MtlsLevel::Mesh => "mesh-wide",
            MtlsLevel::Namespace => "namespace-wide",
            MtlsLevel::Workload => "workload",
            MtlsLevel::Port => "port-level",
        })
    }
}

/// The mTLS mode in force on one port of one workload, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveMtls<'s> {
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    /// None for [`MtlsLevel::Default`].
    pub policy: Option<&'s PolicyName>,
}

/// Every policy the engine knows, grouped and ordered for evaluation.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    deny: Vec<AuthzPolicy>,
    audit: Vec<AuthzPolicy>,
    allow: Vec<AuthzPolicy>,
    /// Ordered oldest first within a namespace, so the first match at a level wins.
    peer: Vec<PeerAuthnPolicy>,
}

impl PolicySet {
    pub fn new(authz: Vec<AuthzPolicy>, mut peer: Vec<PeerAuthnPolicy>) -> Self {
        let mut set = PolicySet::default();
        for policy in authz {
            match policy.action {
                AuthzAction::Deny => set.deny.push(policy),
                AuthzAction::Audit => set.audit.push(policy),
                AuthzAction::Allow => set.allow.push(policy),
            }
        }
        for group in [&mut set.deny, &mut set.audit, &mut set.allow] {
            group.sort_by(|a, b| a.name.cmp(&b.name));
        }
        peer.sort_by(|a, b| {
            (&a.name.namespace, a.envelope.precedence())
                .cmp(&(&b.name.namespace, b.envelope.precedence()))
        });
        set.peer = peer;
        set
    }

    /// The set of these compiled objects.
    pub fn of(objects: impl IntoIterator<Item = Compiled>) -> Self {
        let (mut authz, mut peer) = (Vec::new(), Vec::new());
        for object in objects {
            match object {
                Compiled::AuthorizationPolicy(p) => authz.push(p),
                Compiled::PeerAuthentication(p) => peer.push(p),
            }
        }
        PolicySet::new(authz, peer)
    }

    /// Every AuthorizationPolicy: DENY, then AUDIT, then ALLOW, each in `namespace/name` order.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthzPolicy> {
        self.deny.iter().chain(&self.audit).chain(&self.allow)
    }

    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthnPolicy> {
        self.peer.iter()
    }

    /// Decides on one request to `workload`.
    pub fn evaluate(&self, workload: &Workload<'_>, request: &Request<'_>) -> Decision<'_> {
        self.decide(workload, request, Unknown::Tcp)
    }

    /// For an HTTP connection whose next requests are not known yet (re-checking it after a
    /// policy change): could some request on it still be allowed? HTTP-only fields count as
    /// matching in ALLOW rules and as not matching in DENY and AUDIT rules, so this denies only
    /// when every request would be denied. `request.http` should be None.
    pub fn evaluate_any_http(
        &self,
        workload: &Workload<'_>,
        request: &Request<'_>,
    ) -> Decision<'_> {
        self.decide(workload, request, Unknown::AnyHttp)
    }

    fn decide(
        &self,
        workload: &Workload<'_>,
        request: &Request<'_>,
        unknown: Unknown,
    ) -> Decision<'_> {
        let applying = |p: &&AuthzPolicy| p.applies_to(workload);
        let mut audit = Vec::new();
        for policy in self.audit.iter().filter(applying) {
            if policy.matching_rule(request, unknown).is_some() {
                audit.push(&policy.name);
            }
        }
        for policy in self.deny.iter().filter(applying) {
            if let Some(rule) = policy.matching_rule(request, unknown) {
                return Decision {
                    verdict: Verdict::Deny,
                    reason: Reason::DenyMatched {
                        policy: &policy.name,
                        rule,
                    },
                    audit,
                };
            }
        }
        let mut allow_policies = 0;
        for policy in self.allow.iter().filter(applying) {
            allow_policies += 1;
            if let Some(rule) = policy.matching_rule(request, unknown) {
                return Decision {
                    verdict: Verdict::Allow,
                    reason: Reason::AllowMatched {
                        policy: &policy.name,
                        rule,
                    },
                    audit,
                };
            }
        }
        let (verdict, reason) = if allow_policies == 0 {
            (Verdict::Allow, Reason::NoAllowPolicy)
        } else {
            (Verdict::Deny, Reason::NoAllowMatched { allow_policies })
        };
        Decision {
            verdict,
            reason,
            audit,
        }
    }

    /// The mTLS mode for `port` of `workload`; `default` applies where no PeerAuthentication
    /// sets a mode (the proxy passes its `--mtls-mode` for that port, tools
    /// [`DEFAULT_MTLS_MODE`]).
    pub fn effective_mtls(
        &self,
        workload: &Workload<'_>,
        port: u16,
        default: MtlsMode,
    ) -> EffectiveMtls<'_> {
        let own_namespace = workload.namespace != ROOT_NAMESPACE;
        let mesh = self
            .peer
            .iter()
            .find(|p| p.name.namespace == ROOT_NAMESPACE && p.selector.is_empty());
        let namespace = self.peer.iter().find(|p| {
            own_namespace && p.name.namespace == workload.namespace && p.selector.is_empty()
        });
        let selected = self.peer.iter().find(|p| {
            own_namespace
                && p.name.namespace == workload.namespace
                && !p.selector.is_empty()
                && selector_matches(&p.selector, workload.labels)
        });
        let mut effective = EffectiveMtls {
            mode: default,
            level: MtlsLevel::Default,
            policy: None,
        };
        for (policy, level) in [
            (mesh, MtlsLevel::Mesh),
            (namespace, MtlsLevel::Namespace),
            (selected, MtlsLevel::Workload),
        ] {
            if let Some(policy) = policy
                && let Some(mode) = policy.mode
            {
                effective = EffectiveMtls {
                    mode,
                    level,
                    policy: Some(&policy.name),
                };
            }
        }
        if let Some(policy) = selected
            && let Ok(i) = policy.ports.binary_search_by_key(&port, |(p, _)| *p)
            && let (_, Some(mode)) = policy.ports[i]
        {
            effective = EffectiveMtls {
                mode,
                level: MtlsLevel::Port,
                policy: Some(&policy.name),
            };
        }
        effective
    }
}

/// What a request without HTTP attributes means for HTTP-only fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unknown {
    /// A non-HTTP connection: Istio's rules (see the module docs).
    Tcp,
    /// An HTTP connection, any request: the most permissive reading.
    AnyHttp,
}

fn selector_matches(selector: &[(String, String)], labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

impl AuthzPolicy {
    /// Whether this policy is in scope for `workload` (see the module docs).
    pub fn applies_to(&self, workload: &Workload<'_>) -> bool {
        (self.name.namespace == ROOT_NAMESPACE || self.name.namespace == workload.namespace)
            && selector_matches(&self.selector, workload.labels)
    }

    /// The index of the first rule matching `request`, if any.
    fn matching_rule(&self, request: &Request<'_>, unknown: Unknown) -> Option<usize> {
        self.rules
            .iter()
            .position(|rule| rule.matches(self.action, request, unknown))
    }
}

impl Rule {
    fn matches(&self, action: AuthzAction, request: &Request<'_>, unknown: Unknown) -> bool {
        // What an HTTP-only field means when the request has no HTTP attributes.
        let http_field = match (unknown, action) {
            // Istio drops the whole ALLOW rule on TCP, not just the field.
            (Unknown::Tcp, AuthzAction::Allow) if self.uses_http && request.http.is_none() => {
                return false;
            }
            (Unknown::Tcp, _) | (Unknown::AnyHttp, AuthzAction::Allow) => true,
            (Unknown::AnyHttp, AuthzAction::Deny | AuthzAction::Audit) => false,
        };
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(request)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(request, http_field)))
            && self.when.iter().all(|c| c.matches(request, http_field))
    }
}

impl<T> Field<T> {
    fn matches(&self, mut predicate: impl FnMut(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&mut predicate))
            && !self.none.iter().any(predicate)
    }
}

impl StrMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Exact(s) => value.len() == s.len() && same_bytes(value, s.as_bytes()),
            StrMatch::Prefix(s) => value
                .get(..s.len())
                .is_some_and(|head| same_bytes(head, s.as_bytes())),
            StrMatch::Suffix(s) => value
                .len()
                .checked_sub(s.len())
                .is_some_and(|start| same_bytes(&value[start..], s.as_bytes())),
            StrMatch::Present => !value.is_empty(),
        }
    }

    /// For patterns stored lower-case.
    fn matches_ignore_case(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s.as_bytes()),
            StrMatch::Prefix(s) => value
                .get(..s.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(s.as_bytes())),
            StrMatch::Suffix(s) => value
                .len()
                .checked_sub(s.len())
                .is_some_and(|start| value[start..].eq_ignore_ascii_case(s.as_bytes())),
            StrMatch::Present => !value.is_empty(),
        }
    }
}

/// `a == b` for slices of equal length, checking the last byte first: values in one field
/// tend to share a long prefix (`cluster.local/ns/...`), so most mismatches are found without
/// a call to `memcmp`.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.last() == b.last() && a == b
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 source (dual-stack sockets) is the IPv4 address it maps.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self, ip) {
            (Cidr::V4 { net, mask }, IpAddr::V4(ip)) => u32::from(ip) & mask == *net,
            (Cidr::V6 { net, mask }, IpAddr::V6(ip)) => u128::from(ip) & mask == *net,
            _ => false,
        }
    }
}

fn principal_matches(field: &Field<StrMatch>, peer: Option<&Peer>) -> bool {
    field.matches(|m| peer.is_some_and(|p| m.matches(p.principal.as_bytes())))
}

fn namespace_matches(field: &Field<StrMatch>, peer: Option<&Peer>) -> bool {
    let namespace = peer.and_then(Peer::namespace);
    field.matches(|m| namespace.is_some_and(|ns| m.matches(ns.as_bytes())))
}

impl SourceMatch {
    fn matches(&self, request: &Request<'_>) -> bool {
        let peer = request.peer;
        principal_matches(&self.principals, peer)
            && namespace_matches(&self.namespaces, peer)
            && self.service_accounts.matches(|sa: &ServiceAccount| {
                peer.and_then(|p| p.service_account.as_ref())
                    .is_some_and(|(ns, name)| *ns == sa.namespace && *name == sa.name)
            })
            && self
                .ip_blocks
                .matches(|cidr| cidr.contains(request.source_ip))
    }
}

impl OperationMatch {
    /// `http_field`: what a set HTTP-only field counts as when the request has no HTTP.
    fn matches(&self, request: &Request<'_>, http_field: bool) -> bool {
        if !self.ports.matches(|p| *p == request.destination_port) {
            return false;
        }
        let Some(http) = &request.http else {
            return http_field
                || !(self.hosts.is_set() || self.methods.is_set() || self.paths.is_set());
        };
        let path = http.path.split_once('?').map_or(http.path, |(p, _)| p);
        self.hosts
            .matches(|m| m.matches_ignore_case(http.host.as_bytes()))
            && self.methods.matches(|m| m.matches(http.method.as_bytes()))
            && self.paths.matches(|m| m.matches(path.as_bytes()))
    }
}

impl ConditionMatch {
    /// `http_field` as for [`OperationMatch::matches`].
    fn matches(&self, request: &Request<'_>, http_field: bool) -> bool {
        match self {
            ConditionMatch::SourceIp(field) => field.matches(|c| c.contains(request.source_ip)),
            ConditionMatch::SourceNamespace(field) => namespace_matches(field, request.peer),
            ConditionMatch::SourcePrincipal(field) => principal_matches(field, request.peer),
            ConditionMatch::DestinationPort(field) => {
                field.matches(|p| *p == request.destination_port)
            }
            ConditionMatch::Header(name, field) => {
                let Some(http) = &request.http else {
                    return http_field;
                };
                let mut values = http.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => field.matches(|_| false),
                    (Some(only), None) => field.matches(|m| m.matches(only.as_bytes())),
                    (Some(first), Some(second)) => {
                        let joined = [first, second]
                            .into_iter()
                            .chain(values)
                            .map(|v| v.as_bytes())
                            .collect::<Vec<_>>()
                            .join(&b","[..]);
                        field.matches(|m| m.matches(&joined))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
