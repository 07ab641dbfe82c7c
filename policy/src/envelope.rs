//! What identifies a policy object, without Kubernetes types: its kind, namespace and name
//! ([`ObjectKey`]), and the creation time and uid the API server gives it ([`Envelope`]); the
//! constants of the policy API (group, version, the mesh-wide root namespace); and Istio's rule
//! for which of several competing PeerAuthentications wins ([`Envelope::precedence`]). The node
//! agent, the CA's status writer, `sigil inspect policy` and the proxy all use these, so they
//! agree on what an object is and which one wins.

use std::cmp::Reverse;
use std::fmt;

/// The namespace whose objects are mesh-wide: they apply to workloads in every namespace.
pub const ROOT_NAMESPACE: &str = "sigil-system";
/// The API group of sigil's policy CRDs.
pub const GROUP: &str = "sigil.dev";
/// The only served version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every policy object.
pub const API_VERSION: &str = "sigil.dev/v1alpha1";

/// The two kinds of policy object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::AuthorizationPolicy, Kind::PeerAuthentication];

    pub fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }

    /// The `kind` field's value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }

    /// The resource name in the Kubernetes API (`<plural>.sigil.dev`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What names a policy object; sorts by kind, then namespace, then name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A policy object's identity and the facts about it that decide between competing objects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Envelope {
    pub key: ObjectKey,
    /// RFC 3339 as the API server writes it (`2026-01-02T03:04:05Z`); None when not known (an
    /// object in a file written without one).
    pub creation_timestamp: Option<String>,
    /// The API server's uid; None outside a cluster.
    pub uid: Option<String>,
}

impl Envelope {
    /// An object known only by its key (no creation time or uid).
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Envelope {
        Envelope {
            key: ObjectKey {
                kind,
                namespace: namespace.into(),
                name: name.into(),
            },
            creation_timestamp: None,
            uid: None,
        }
    }

    /// Istio's order among competing PeerAuthentications at one level: the oldest wins, then the
    /// first by name. A missing creation time sorts last: an object known to be old beats one of
    /// unknown age. Timestamps compare as strings, which orders the API server's fixed format.
    pub fn precedence(&self) -> impl Ord + '_ {
        (
            Reverse(self.creation_timestamp.is_some()),
            self.creation_timestamp.as_deref(),
            self.key.name.as_str(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, created: Option<&str>) -> Envelope {
        Envelope {
            creation_timestamp: created.map(str::to_owned),
            ..Envelope::new(Kind::PeerAuthentication, "demo", name)
        }
    }

    #[test]
    fn the_oldest_then_the_first_by_name_wins_and_unknown_age_comes_last() {
        let mut competing = [
            peer("a-unknown", None),
            peer("z-old", Some("2026-01-01T00:00:00Z")),
            peer("b-new", Some("2026-06-01T00:00:00Z")),
            peer("a-old", Some("2026-01-01T00:00:00Z")),
        ];
        competing.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let names: Vec<&str> = competing.iter().map(|e| e.key.name.as_str()).collect();
        assert_eq!(names, ["a-old", "z-old", "b-new", "a-unknown"]);
    }
}
