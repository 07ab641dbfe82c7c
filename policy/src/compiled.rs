//! The compiled form of the policies: what validation ([`crate::validate`]) makes of the
//! objects users write, what the engine ([`crate::engine`]) evaluates, and what the node agent
//! sends its proxies (`sigil-proxy-api` maps it to protobuf and back). Every string match is
//! parsed into a matcher, ports and CIDRs parsed, header names interned, so the engine never
//! parses or allocates while deciding.
//!
//! An object that does not validate is not dropped: it becomes an [`InvalidPolicy`], enforced
//! as a fail-closed [`StandIn`] for what it would have governed.

use std::fmt;
use std::net::IpAddr;

use crate::envelope::{Envelope, Kind};

/// A policy's identity, printed `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl PolicyName {
    pub fn of(envelope: &Envelope) -> PolicyName {
        PolicyName {
            namespace: envelope.key.namespace.clone(),
            name: envelope.key.name.clone(),
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated AuthorizationPolicy's action (CUSTOM is rejected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for AuthzAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        })
    }
}

/// A validated, compiled AuthorizationPolicy.
#[derive(Clone, Debug)]
pub struct AuthzPolicy {
    pub(crate) envelope: Envelope,
    /// The envelope's namespace and name, which decisions name.
    pub(crate) name: PolicyName,
    pub(crate) action: AuthzAction,
    /// Labels that must all match; empty means every workload in scope.
    pub(crate) selector: Vec<(String, String)>,
    /// Empty (rules absent or `[]`) matches nothing.
    pub(crate) rules: Vec<Rule>,
    pub(crate) warnings: Vec<Warning>,
}

impl AuthzPolicy {
    /// A compiled policy from its parts (validation, or the agent's wire form of one).
    pub fn new(
        envelope: Envelope,
        action: AuthzAction,
        selector: Vec<(String, String)>,
        rules: Vec<Rule>,
        warnings: Vec<Warning>,
    ) -> AuthzPolicy {
        AuthzPolicy {
            name: PolicyName::of(&envelope),
            envelope,
            action,
            selector,
            rules,
            warnings,
        }
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn name(&self) -> &PolicyName {
        &self.name
    }

    pub fn action(&self) -> AuthzAction {
        self.action
    }

    pub fn selector(&self) -> &[(String, String)] {
        &self.selector
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Whether any rule looks at HTTP attributes (hosts, methods, paths, request headers), so
    /// deciding on HTTP traffic needs the request parsed.
    pub fn uses_http(&self) -> bool {
        self.rules.iter().any(|rule| rule.uses_http)
    }
}

/// One compiled rule: `from` entries OR'ed (empty = any source), `to` entries OR'ed (empty = any
/// operation), `when` conditions AND'ed.
#[derive(Clone, Debug)]
pub struct Rule {
    pub(crate) from: Vec<SourceMatch>,
    pub(crate) to: Vec<OperationMatch>,
    pub(crate) when: Vec<ConditionMatch>,
    /// Whether any HTTP-only field appears: such a rule never matches a non-HTTP connection in
    /// an ALLOW policy (Istio drops the whole rule there).
    pub(crate) uses_http: bool,
}

impl Rule {
    pub fn new(from: Vec<SourceMatch>, to: Vec<OperationMatch>, when: Vec<ConditionMatch>) -> Rule {
        let uses_http = to
            .iter()
            .any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
            || when.iter().any(|c| matches!(c, ConditionMatch::Header(..)));
        Rule {
            from,
            to,
            when,
            uses_http,
        }
    }

    /// `[{}]`'s one rule: matches every request.
    pub fn everything() -> Rule {
        Rule::new(Vec::new(), Vec::new(), Vec::new())
    }

    pub fn from(&self) -> &[SourceMatch] {
        &self.from
    }

    pub fn to(&self) -> &[OperationMatch] {
        &self.to
    }

    pub fn when(&self) -> &[ConditionMatch] {
        &self.when
    }
}

#[derive(Clone, Debug, Default)]
pub struct SourceMatch {
    /// Against the peer's SPIFFE ID without `spiffe://`, as Istio writes principals.
    pub principals: Field<StrMatch>,
    pub namespaces: Field<StrMatch>,
    pub service_accounts: Field<ServiceAccount>,
    pub ip_blocks: Field<Cidr>,
}

#[derive(Clone, Debug, Default)]
pub struct OperationMatch {
    /// Patterns lower-cased; matched ASCII-case-insensitively.
    pub hosts: Field<StrMatch>,
    pub ports: Field<u16>,
    pub methods: Field<StrMatch>,
    pub paths: Field<StrMatch>,
}

#[derive(Clone, Debug)]
pub enum ConditionMatch {
    SourceIp(Field<Cidr>),
    SourceNamespace(Field<StrMatch>),
    SourcePrincipal(Field<StrMatch>),
    DestinationPort(Field<u16>),
    Header(http::HeaderName, Field<StrMatch>),
}

/// A field and its `not*` twin: some `any` value must match (if there are any), and no `none`
/// value may.
#[derive(Clone, Debug)]
pub struct Field<T> {
    pub any: Vec<T>,
    pub none: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any: Vec::new(),
            none: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    pub fn is_set(&self) -> bool {
        !self.any.is_empty() || !self.none.is_empty()
    }
}

/// Istio's string match forms: `abc`, `abc*`, `*abc`, `*` (any non-empty value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: Box<str>,
    pub name: Box<str>,
}

/// An address block, stored masked so matching is one mask-and-compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Cidr {
    /// `address/prefix_len`; None for a prefix longer than the address.
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<Cidr> {
        match address {
            IpAddr::V4(ip) => {
                let shift = 32u32.checked_sub(u32::from(prefix_len))?;
                let mask = u32::MAX.checked_shl(shift).unwrap_or(0);
                Some(Cidr::V4 {
                    net: u32::from(ip) & mask,
                    mask,
                })
            }
            IpAddr::V6(ip) => {
                let shift = 128u32.checked_sub(u32::from(prefix_len))?;
                let mask = u128::MAX.checked_shl(shift).unwrap_or(0);
                Some(Cidr::V6 {
                    net: u128::from(ip) & mask,
                    mask,
                })
            }
        }
    }

    /// The network address and prefix length.
    pub fn parts(&self) -> (IpAddr, u8) {
        // A mask is leading ones, so its count is the prefix length (at most 128).
        match *self {
            Cidr::V4 { net, mask } => (IpAddr::V4(net.into()), mask.count_ones() as u8),
            Cidr::V6 { net, mask } => (IpAddr::V6(net.into()), mask.count_ones() as u8),
        }
    }
}

/// A resolved mTLS mode: PeerAuthentication's, and the proxy's `--mtls-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[value(rename_all = "UPPERCASE")]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// mTLS only; plaintext connections are refused before authorization.
    Strict,
    /// mTLS or plaintext, told apart by the first bytes; plaintext peers have no identity.
    Permissive,
    /// Plaintext only: no peer identity; the proxy forwards bytes untouched.
    Disable,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated PeerAuthentication.
#[derive(Clone, Debug)]
pub struct PeerAuthnPolicy {
    pub(crate) envelope: Envelope,
    /// The envelope's namespace and name, which decisions name.
    pub(crate) name: PolicyName,
    /// Empty: namespace-wide (mesh-wide in the root namespace).
    pub(crate) selector: Vec<(String, String)>,
    /// None: UNSET, inherit.
    pub(crate) mode: Option<MtlsMode>,
    /// Sorted by port; None: UNSET, inherit the workload-level mode.
    pub(crate) ports: Vec<(u16, Option<MtlsMode>)>,
    pub(crate) warnings: Vec<Warning>,
}

impl PeerAuthnPolicy {
    /// A compiled policy from its parts (validation, or the agent's wire form of one); `ports`
    /// in any order.
    pub fn new(
        envelope: Envelope,
        selector: Vec<(String, String)>,
        mode: Option<MtlsMode>,
        mut ports: Vec<(u16, Option<MtlsMode>)>,
        warnings: Vec<Warning>,
    ) -> PeerAuthnPolicy {
        ports.sort_by_key(|(port, _)| *port);
        PeerAuthnPolicy {
            name: PolicyName::of(&envelope),
            envelope,
            selector,
            mode,
            ports,
            warnings,
        }
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn name(&self) -> &PolicyName {
        &self.name
    }

    pub fn selector(&self) -> &[(String, String)] {
        &self.selector
    }

    pub fn mode(&self) -> Option<MtlsMode> {
        self.mode
    }

    /// By port; None: UNSET.
    pub fn ports(&self) -> &[(u16, Option<MtlsMode>)] {
        &self.ports
    }

    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }
}

/// Something valid that probably does not do what its author meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// As in [`crate::validate::Problem::path`].
    pub path: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// One valid policy object, compiled.
#[derive(Clone, Debug)]
pub enum Compiled {
    AuthorizationPolicy(AuthzPolicy),
    PeerAuthentication(PeerAuthnPolicy),
}

/// What an object that failed validation is enforced as, so that it fails closed: nothing it
/// might have denied is allowed because it is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandIn {
    /// A DENY policy, or one whose action cannot be read: denies everything it selects.
    DenySelected,
    /// An ALLOW policy: matches nothing, so it still takes away the default allow.
    AllowNothing,
    /// A PeerAuthentication: STRICT for what it selects.
    Strict,
    /// An AUDIT policy: dropped, since it never decides.
    Dropped,
}

impl StandIn {
    /// For an object of `kind` whose `spec.action` reads `action` (None: absent, or not a
    /// string).
    pub fn for_object(kind: Kind, action: Option<&str>) -> StandIn {
        match (kind, action) {
            (Kind::PeerAuthentication, _) => StandIn::Strict,
            (Kind::AuthorizationPolicy, Some("AUDIT")) => StandIn::Dropped,
            (Kind::AuthorizationPolicy, Some("ALLOW") | None) => StandIn::AllowNothing,
            (Kind::AuthorizationPolicy, Some(_)) => StandIn::DenySelected,
        }
    }
}

/// An object that did not validate, and what is enforced in its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidPolicy {
    pub envelope: Envelope,
    /// `spec.selector.matchLabels` where it is a map of strings; otherwise empty, which covers
    /// the whole namespace: the safe side for DENY and STRICT.
    pub selector: Vec<(String, String)>,
    pub stand_in: StandIn,
    /// Why it is invalid.
    pub reason: String,
}

impl InvalidPolicy {
    /// The policy enforced in its place; None when it is dropped.
    pub fn stand_in(&self) -> Option<Compiled> {
        let envelope = self.envelope.clone();
        let selector = self.selector.clone();
        let authz = |action, rules| {
            Compiled::AuthorizationPolicy(AuthzPolicy::new(
                envelope.clone(),
                action,
                selector.clone(),
                rules,
                Vec::new(),
            ))
        };
        match self.stand_in {
            StandIn::DenySelected => Some(authz(AuthzAction::Deny, vec![Rule::everything()])),
            StandIn::AllowNothing => Some(authz(AuthzAction::Allow, Vec::new())),
            StandIn::Strict => Some(Compiled::PeerAuthentication(PeerAuthnPolicy::new(
                envelope.clone(),
                selector.clone(),
                Some(MtlsMode::Strict),
                Vec::new(),
                Vec::new(),
            ))),
            StandIn::Dropped => None,
        }
    }
}

impl fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}",
            self.envelope.key.namespace, self.envelope.key.name, self.reason
        )
    }
}
