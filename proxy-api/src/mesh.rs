//! Mesh membership as the agent publishes it and the proxy consumes it: which IP addresses
//! belong to meshed workloads and the SPIFFE IDs each one's server may present, and its
//! `sigil.mesh.v1` wire form, checked entry by entry on the way in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use sigil_identity::spiffe::SpiffeIdError;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_proto::sigil::mesh::v1::{MeshMember, MeshMembers};

/// Why a membership entry is invalid, naming it by index and field.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("members[{index}].ip {value:?} is not an IP address")]
    Ip { index: usize, value: String },
    #[error("members[{index}].id {value:?}: {reason}")]
    Id {
        index: usize,
        value: String,
        reason: SpiffeIdError,
    },
    #[error("members[{index}].id {id} has no path; a workload ID needs one")]
    NoPath { index: usize, id: SpiffeId },
    #[error("members[{index}].id {id} is not in this agent's trust domain {expected}")]
    ForeignTrustDomain {
        index: usize,
        id: SpiffeId,
        expected: TrustDomain,
    },
    #[error("members[{index}] lists no SPIFFE ID")]
    NoId { index: usize },
    #[error("members[{index}].ip {ip} is already members[{first}].ip")]
    DuplicateIp {
        index: usize,
        first: usize,
        ip: IpAddr,
    },
}

/// One meshed address's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The IDs the server there may present, any one of them; never empty. One for a pod or a
    /// mesh-file entry; those of every endpoint behind a Service's cluster IP.
    pub ids: BTreeSet<SpiffeId>,
    /// `<namespace>/<pod>`, `<namespace>/service/<name>` or `mesh-file`, for logs.
    pub source: String,
}

impl Member {
    /// A member that must prove `id`.
    pub fn single(id: SpiffeId, source: impl Into<String>) -> Member {
        Member {
            ids: BTreeSet::from([id]),
            source: source.into(),
        }
    }
}

/// The whole membership at one point in time; never changed once published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshSnapshot {
    /// 0 until every source has synced (the membership is not known yet), then one more with
    /// every published change.
    pub version: u64,
    pub members: BTreeMap<IpAddr, Member>,
}

impl MeshSnapshot {
    /// Whether every source has delivered its initial state.
    pub fn is_synced(&self) -> bool {
        self.version > 0
    }

    /// The member at `ip`, if that address is meshed.
    pub fn get(&self, ip: IpAddr) -> Option<&Member> {
        self.members.get(&ip)
    }

    /// The `WatchMembers` message the agent sends.
    pub fn to_message(&self) -> MeshMembers {
        MeshMembers {
            members: self
                .members
                .iter()
                .map(|(ip, member)| MeshMember {
                    ip: ip.to_string(),
                    spiffe_ids: member.ids.iter().map(ToString::to_string).collect(),
                    source: member.source.clone(),
                })
                .collect(),
            version: self.version,
        }
    }

    /// A `WatchMembers` message, parsed and checked (for the proxy's side of the stream): every
    /// entry valid, with at least one ID, or the whole message is refused.
    pub fn from_message(message: &MeshMembers) -> Result<MeshSnapshot, MemberError> {
        let entries = message.members.iter().map(|member| {
            let ids = member.spiffe_ids.iter().map(String::as_str);
            (member.ip.as_str(), ids)
        });
        let members = parse_entries(entries, None)?
            .into_iter()
            .zip(&message.members)
            .map(|((ip, ids), member)| {
                let source = member.source.clone();
                (ip, Member { ids, source })
            })
            .collect();
        Ok(MeshSnapshot {
            version: message.version,
            members,
        })
    }
}

/// Parses `(ip, ids)` entries in order (a `WatchMembers` message, the agent's `--mesh-file`), naming the index and field of the first invalid one: IPs
/// and workload IDs (in `trust_domain` if given), at least one ID each, no IP twice.
pub fn parse_entries<'a, I: IntoIterator<Item = &'a str>>(
    entries: impl IntoIterator<Item = (&'a str, I)>,
    trust_domain: Option<&TrustDomain>,
) -> Result<Vec<(IpAddr, BTreeSet<SpiffeId>)>, MemberError> {
    let mut first_index = HashMap::new();
    entries
        .into_iter()
        .enumerate()
        .map(|(index, (ip, ids))| {
            let ip: IpAddr = ip.parse().map_err(|_| MemberError::Ip {
                index,
                value: ip.into(),
            })?;
            let ids = ids
                .into_iter()
                .map(|id| parse_id(index, id, trust_domain))
                .collect::<Result<BTreeSet<_>, _>>()?;
            if ids.is_empty() {
                return Err(MemberError::NoId { index });
            }
            if let Some(first) = first_index.insert(ip, index) {
                return Err(MemberError::DuplicateIp { index, first, ip });
            }
            Ok((ip, ids))
        })
        .collect()
}

/// One workload ID of `members[index]`, in `trust_domain` if given.
fn parse_id(
    index: usize,
    id: &str,
    trust_domain: Option<&TrustDomain>,
) -> Result<SpiffeId, MemberError> {
    let id = SpiffeId::parse(id).map_err(|reason| MemberError::Id {
        index,
        value: id.into(),
        reason,
    })?;
    if id.is_trust_domain_id() {
        return Err(MemberError::NoPath { index, id });
    }
    if let Some(expected) = trust_domain.filter(|td| id.trust_domain() != *td) {
        let expected = expected.clone();
        return Err(MemberError::ForeignTrustDomain {
            index,
            id,
            expected,
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_snapshot_survives_its_message() {
        let snapshot = MeshSnapshot {
            version: 3,
            members: BTreeMap::from([(
                ip("fd00::3"),
                Member::single(SpiffeId::parse(WEB_ID).unwrap(), "mesh-file"),
            )]),
        };
        assert_eq!(
            MeshSnapshot::from_message(&snapshot.to_message()).unwrap(),
            snapshot
        );
    }

    #[test]
    fn a_bad_message_is_refused_by_from_message() {
        let message = |ip: &str, ids: &[&str]| MeshMembers {
            members: vec![MeshMember {
                ip: ip.into(),
                spiffe_ids: ids.iter().map(|id| id.to_string()).collect(),
                source: String::new(),
            }],
            version: 1,
        };
        assert!(matches!(
            MeshSnapshot::from_message(&message("nope", &[WEB_ID])),
            Err(MemberError::Ip { index: 0, .. })
        ));
        assert!(matches!(
            MeshSnapshot::from_message(&message("10.0.0.1", &[WEB_ID, "web"])),
            Err(MemberError::Id { index: 0, .. })
        ));
        assert!(matches!(
            MeshSnapshot::from_message(&message("10.0.0.1", &[])),
            Err(MemberError::NoId { index: 0 })
        ));
        // Several IDs: any one of them.
        let b = "spiffe://cluster.local/ns/b/sa/b";
        let parsed = MeshSnapshot::from_message(&message("10.0.0.1", &[b, WEB_ID])).unwrap();
        let ids = [WEB_ID, b].map(|id| SpiffeId::parse(id).unwrap());
        assert_eq!(
            parsed.get(ip("10.0.0.1")),
            Some(&Member {
                ids: BTreeSet::from(ids),
                source: String::new(),
            })
        );
    }
}
