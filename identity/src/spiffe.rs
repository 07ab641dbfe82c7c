//! SPIFFE IDs and trust domains, parsed and validated exactly as the SPIFFE-ID specification
//! (`standards/SPIFFE-ID.md`) requires. Every other part of sigil receives identities as these
//! types, so an invalid ID can only enter the system through [`SpiffeId::parse`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain of a cluster that names none (Kubernetes' own default DNS domain).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME_PREFIX: &str = "spiffe://";
/// The spec caps the trust domain name at 255 bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;
/// The spec caps the whole URI at 2048 bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain: one variant per rule of the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain must be lowercase (found {0:?})")]
    UppercaseTrustDomain(char),
    #[error("trust domain may only contain [a-z0-9.-_] (found {0:?})")]
    BadTrustDomainChar(char),
    #[error("trust domain is {0} bytes, the limit is 255")]
    TrustDomainTooLong(usize),
    #[error("SPIFFE ID is {0} bytes, the limit is 2048")]
    TooLong(usize),
    #[error("SPIFFE ID path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("SPIFFE ID path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("SPIFFE ID path segments may only contain [a-zA-Z0-9.-_] (found {0:?})")]
    BadPathChar(char),
    #[error("SPIFFE ID path must not end with \"/\"")]
    TrailingSlash,
    #[error("SPIFFE ID must not have a query or fragment")]
    QueryOrFragment,
    #[error("trust domain must not have a port or userinfo")]
    PortOrUserinfo,
    #[error("SPIFFE ID must not contain percent-encoding")]
    PercentEncoded,
}

/// A SPIFFE trust domain name, e.g. `cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts a bare name (`cluster.local`) or a trust-domain ID (`spiffe://cluster.local`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME_PREFIX) {
            let id = SpiffeId::parse(s)?;
            if !id.is_trust_domain_id() {
                // A path is only legal in a workload ID; reuse the closest rule.
                return Err(SpiffeIdError::BadTrustDomainChar('/'));
            }
            return Ok(id.trust_domain);
        }
        validate_trust_domain(s)?;
        Ok(TrustDomain(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>` with no path, as CA certificates carry it.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A validated SPIFFE ID, `spiffe://<trust-domain><path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg/seg...` with every segment valid.
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_BYTES {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            trust_domain: TrustDomain(td.to_owned()),
            path: path.to_owned(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`, the identity of a Kubernetes
    /// service account: what the CA issues to a pod running as that account.
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        // Each name must be exactly one segment: "a/b" would silently change the identity's shape.
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        let path = format!("/ns/{namespace}/sa/{service_account}");
        let id = SpiffeId {
            trust_domain: td.clone(),
            path,
        };
        let len = id.uri_len();
        if len > MAX_SPIFFE_ID_BYTES {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// `""` for a trust-domain ID, else `/seg/...`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service_account)` iff the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut segments = self.path.strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// True for `spiffe://<td>` (no path), the form CA certificates carry; workloads always
    /// have a path.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }

    fn uri_len(&self) -> usize {
        SCHEME_PREFIX.len() + self.trust_domain.0.len() + self.path.len()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain, self.path)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Characters that are legal in a URI but that the SPIFFE spec forbids for a specific reason;
/// naming that reason beats a generic "bad character".
fn uri_rule_violation(c: char) -> Option<SpiffeIdError> {
    match c {
        '%' => Some(SpiffeIdError::PercentEncoded),
        '?' | '#' => Some(SpiffeIdError::QueryOrFragment),
        _ => None,
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(SpiffeIdError::UppercaseTrustDomain(c)),
            ':' | '@' => return Err(SpiffeIdError::PortOrUserinfo),
            _ => return Err(uri_rule_violation(c).unwrap_or(SpiffeIdError::BadTrustDomainChar(c))),
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split item is the empty string before it.
    path.split('/').skip(1).try_for_each(validate_segment)
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    for c in segment.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            _ => return Err(uri_rule_violation(c).unwrap_or(SpiffeIdError::BadPathChar(c))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[&str] = &[
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://example.org/workload",
        "spiffe://a",
        "spiffe://trust-domain_1.example.org/a/b/c",
        "spiffe://example.org/UPPER/Case.Path",
        "spiffe://example.org/..a/a../.a./...",
        "spiffe://example.org/a-b_c.d",
        "spiffe://1.2.3.4/ns/x/sa/y",
        "spiffe://example.org/0",
    ];

    const INVALID: &[(&str, SpiffeIdError)] = &[
        ("", SpiffeIdError::Empty),
        ("http://example.org/a", SpiffeIdError::WrongScheme),
        ("SPIFFE://example.org/a", SpiffeIdError::WrongScheme),
        ("spiffe:/example.org/a", SpiffeIdError::WrongScheme),
        ("example.org/a", SpiffeIdError::WrongScheme),
        ("spiffe://", SpiffeIdError::EmptyTrustDomain),
        ("spiffe:///path", SpiffeIdError::EmptyTrustDomain),
        (
            "spiffe://Example.org/a",
            SpiffeIdError::UppercaseTrustDomain('E'),
        ),
        (
            "spiffe://exa mple.org",
            SpiffeIdError::BadTrustDomainChar(' '),
        ),
        (
            "spiffe://exa+mple.org",
            SpiffeIdError::BadTrustDomainChar('+'),
        ),
        (
            "spiffe://exämple.org",
            SpiffeIdError::BadTrustDomainChar('ä'),
        ),
        ("spiffe://example.org:8080/a", SpiffeIdError::PortOrUserinfo),
        ("spiffe://user@example.org/a", SpiffeIdError::PortOrUserinfo),
        (
            "spiffe://user:pw@example.org",
            SpiffeIdError::PortOrUserinfo,
        ),
        ("spiffe://example.org/a//b", SpiffeIdError::EmptySegment),
        ("spiffe://example.org//", SpiffeIdError::TrailingSlash),
        ("spiffe://example.org/", SpiffeIdError::TrailingSlash),
        ("spiffe://example.org/a/", SpiffeIdError::TrailingSlash),
        ("spiffe://example.org/./a", SpiffeIdError::DotSegment),
        ("spiffe://example.org/a/..", SpiffeIdError::DotSegment),
        ("spiffe://example.org/a/../b", SpiffeIdError::DotSegment),
        ("spiffe://example.org/a b", SpiffeIdError::BadPathChar(' ')),
        ("spiffe://example.org/a:b", SpiffeIdError::BadPathChar(':')),
        ("spiffe://example.org/a+b", SpiffeIdError::BadPathChar('+')),
        ("spiffe://example.org/ä", SpiffeIdError::BadPathChar('ä')),
        ("spiffe://example.org/a?x=1", SpiffeIdError::QueryOrFragment),
        (
            "spiffe://example.org/a#frag",
            SpiffeIdError::QueryOrFragment,
        ),
        ("spiffe://example.org?x=1", SpiffeIdError::QueryOrFragment),
        ("spiffe://example.org/a%20b", SpiffeIdError::PercentEncoded),
        ("spiffe://ex%41mple.org/a", SpiffeIdError::PercentEncoded),
    ];

    #[test]
    fn valid_ids_round_trip() {
        for s in VALID {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s} rejected: {e}"));
            assert_eq!(id.to_string(), *s);
            assert_eq!(s.parse::<SpiffeId>().as_ref(), Ok(&id));
        }
    }

    #[test]
    fn invalid_ids_name_the_rule() {
        for (s, want) in INVALID {
            assert_eq!(SpiffeId::parse(s).as_ref(), Err(want), "input {s:?}");
        }
    }

    #[test]
    fn length_limits() {
        let td_255 = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td_255}/x")).is_ok());
        let td_256 = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td_256}/x")),
            Err(SpiffeIdError::TrustDomainTooLong(256))
        );
        assert_eq!(
            TrustDomain::new(&td_256),
            Err(SpiffeIdError::TrustDomainTooLong(256))
        );

        let prefix = "spiffe://example.org/";
        let at_limit = format!("{prefix}{}", "p".repeat(2048 - prefix.len()));
        assert_eq!(at_limit.len(), 2048);
        assert!(SpiffeId::parse(&at_limit).is_ok());
        let over = format!("{at_limit}p");
        assert_eq!(SpiffeId::parse(&over), Err(SpiffeIdError::TooLong(2049)));

        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            SpiffeId::for_service_account(&td, &"n".repeat(2048), "sa"),
            Err(SpiffeIdError::TooLong(2078))
        );
    }

    #[test]
    fn service_account_ids() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::for_service_account(&td, "default", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.service_account(), Some(("default", "web")));
        assert_eq!(id.trust_domain(), &td);
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert!(!id.is_trust_domain_id());

        for other in [
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/default/sa",
            "spiffe://cluster.local/sa/web/ns/default",
            "spiffe://cluster.local/workload",
            "spiffe://cluster.local",
        ] {
            assert_eq!(
                SpiffeId::parse(other).unwrap().service_account(),
                None,
                "{other}"
            );
        }

        assert_eq!(
            SpiffeId::for_service_account(&td, "", "web"),
            Err(SpiffeIdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::for_service_account(&td, "a/b", "web"),
            Err(SpiffeIdError::BadPathChar('/'))
        );
        assert_eq!(
            SpiffeId::for_service_account(&td, "..", "web"),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::for_service_account(&td, "ns", "we b"),
            Err(SpiffeIdError::BadPathChar(' '))
        );
    }

    #[test]
    fn trust_domains() {
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(td.as_str(), "cluster.local");
        assert_eq!(td.to_string(), "cluster.local");
        assert_eq!(TrustDomain::new("spiffe://cluster.local"), Ok(td.clone()));
        assert_eq!(td.id().to_string(), "spiffe://cluster.local");
        assert!(td.id().is_trust_domain_id());
        assert_eq!("cluster.local".parse::<TrustDomain>(), Ok(td));

        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::EmptyTrustDomain));
        assert_eq!(
            TrustDomain::new("Cluster.local"),
            Err(SpiffeIdError::UppercaseTrustDomain('C'))
        );
        assert_eq!(
            TrustDomain::new("td:443"),
            Err(SpiffeIdError::PortOrUserinfo)
        );
        assert_eq!(
            TrustDomain::new("spiffe://td/workload"),
            Err(SpiffeIdError::BadTrustDomainChar('/'))
        );
        assert_eq!(
            TrustDomain::new("a/b"),
            Err(SpiffeIdError::BadTrustDomainChar('/'))
        );
    }

    #[test]
    fn serde_as_string() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://Bad/x\"").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");

        let td: TrustDomain = serde_json::from_str("\"cluster.local\"").unwrap();
        assert_eq!(serde_json::to_string(&td).unwrap(), "\"cluster.local\"");
    }
}
