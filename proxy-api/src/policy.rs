//! Policies on the agent→proxy wire (`sigil.policy.v2`): the compiled AuthorizationPolicy and
//! PeerAuthentication of `sigil-policy` to protobuf and back, each with its envelope, and the
//! entry for an object the agent could not validate.
//!
//! Reading fails closed: an entry this proxy cannot read (a field out of range, a value newer
//! than it) becomes an [`InvalidPolicy`] whose stand-in denies what the entry would have
//! governed, as an object the agent found invalid does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sigil_policy::compiled::{
    AuthzAction, Cidr, ConditionMatch, Field, OperationMatch, Rule, ServiceAccount, SourceMatch,
    StrMatch,
};
use sigil_policy::{
    AuthzPolicy, Compiled, Envelope, InvalidPolicy, Kind, MtlsMode, ObjectKey, PeerAuthnPolicy,
    StandIn,
};
use sigil_proto::sigil::policy::v2 as wire;
use wire::condition::Condition as WireCondition;
use wire::policy::Policy as WirePolicy;
use wire::string_match::Form;

/// Why a wire entry cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the entry has no {0}")]
    Missing(&'static str),
    #[error("unknown {what} {value} (sent by a newer agent?)")]
    Unknown { what: &'static str, value: i32 },
    #[error("{0} is not a port")]
    Port(u32),
    #[error("a CIDR block of {len} address bytes and prefix /{prefix_len}")]
    Cidr { len: usize, prefix_len: u32 },
    #[error("header name {name:?}: {source}")]
    Header {
        name: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
}

/// One object as the agent sends it: compiled, or invalid with its stand-in.
pub fn to_wire(object: &Result<Compiled, Box<InvalidPolicy>>) -> wire::Policy {
    let policy = match object {
        Ok(Compiled::AuthorizationPolicy(p)) => {
            WirePolicy::AuthorizationPolicy(wire::AuthorizationPolicy {
                envelope: Some(envelope_to_wire(p.envelope())),
                action: action_to_wire(p.action()) as i32,
                selector: labels_to_wire(p.selector()),
                rules: p.rules().iter().map(rule_to_wire).collect(),
            })
        }
        Ok(Compiled::PeerAuthentication(p)) => {
            WirePolicy::PeerAuthentication(wire::PeerAuthentication {
                envelope: Some(envelope_to_wire(p.envelope())),
                selector: labels_to_wire(p.selector()),
                mode: mode_to_wire(p.mode()) as i32,
                ports: p
                    .ports()
                    .iter()
                    .map(|&(port, mode)| wire::PortMtls {
                        port: port.into(),
                        mode: mode_to_wire(mode) as i32,
                    })
                    .collect(),
            })
        }
        Err(invalid) => WirePolicy::Invalid(wire::InvalidPolicy {
            envelope: Some(envelope_to_wire(&invalid.envelope)),
            selector: labels_to_wire(&invalid.selector),
            stand_in: stand_in_to_wire(invalid.stand_in) as i32,
            reason: invalid.reason.clone(),
        }),
    };
    wire::Policy {
        policy: Some(policy),
    }
}

/// One object as the proxy enforces it. `namespace`: the workload's, where an entry without a
/// readable envelope denies everything (what it was meant to govern cannot be known).
pub fn from_wire(entry: &wire::Policy, namespace: &str) -> Result<Compiled, Box<InvalidPolicy>> {
    match &entry.policy {
        Some(WirePolicy::AuthorizationPolicy(p)) => {
            let envelope = envelope_from_wire(p.envelope.as_ref(), Kind::AuthorizationPolicy);
            let action = wire::Action::try_from(p.action).ok();
            authz_from_wire(p, envelope.clone())
                .map(Compiled::AuthorizationPolicy)
                .map_err(|e| {
                    Box::new(InvalidPolicy {
                        envelope,
                        selector: labels_from_wire(&p.selector),
                        stand_in: match action {
                            Some(wire::Action::Allow) => StandIn::AllowNothing,
                            Some(wire::Action::Audit) => StandIn::Dropped,
                            Some(wire::Action::Deny | wire::Action::Unspecified) | None => {
                                StandIn::DenySelected
                            }
                        },
                        reason: e.to_string(),
                    })
                })
        }
        Some(WirePolicy::PeerAuthentication(p)) => {
            let envelope = envelope_from_wire(p.envelope.as_ref(), Kind::PeerAuthentication);
            peer_from_wire(p, envelope.clone())
                .map(Compiled::PeerAuthentication)
                .map_err(|e| {
                    Box::new(InvalidPolicy {
                        envelope,
                        selector: labels_from_wire(&p.selector),
                        stand_in: StandIn::Strict,
                        reason: e.to_string(),
                    })
                })
        }
        Some(WirePolicy::Invalid(p)) => {
            // Any stand-in newer than this proxy is taken as the strictest one.
            let stand_in = match wire::StandIn::try_from(p.stand_in) {
                Ok(wire::StandIn::AllowNothing) => StandIn::AllowNothing,
                Ok(wire::StandIn::StrictMtls) => StandIn::Strict,
                Ok(wire::StandIn::Dropped) => StandIn::Dropped,
                Ok(wire::StandIn::DenySelected) | Err(_) => StandIn::DenySelected,
            };
            let kind = match stand_in {
                StandIn::Strict => Kind::PeerAuthentication,
                _ => Kind::AuthorizationPolicy,
            };
            Err(Box::new(InvalidPolicy {
                envelope: envelope_from_wire(p.envelope.as_ref(), kind),
                selector: labels_from_wire(&p.selector),
                stand_in,
                reason: p.reason.clone(),
            }))
        }
        None => Err(Box::new(InvalidPolicy {
            envelope: Envelope::new(Kind::AuthorizationPolicy, namespace, "unknown-policy"),
            selector: Vec::new(),
            stand_in: StandIn::DenySelected,
            reason: WireError::Missing("policy of a kind this proxy knows").to_string(),
        })),
    }
}

fn envelope_to_wire(envelope: &Envelope) -> wire::Envelope {
    wire::Envelope {
        kind: match envelope.key.kind {
            Kind::AuthorizationPolicy => wire::Kind::AuthorizationPolicy,
            Kind::PeerAuthentication => wire::Kind::PeerAuthentication,
        } as i32,
        namespace: envelope.key.namespace.clone(),
        name: envelope.key.name.clone(),
        creation_timestamp: envelope.creation_timestamp.clone().unwrap_or_default(),
        uid: envelope.uid.clone().unwrap_or_default(),
    }
}

/// `kind`: the message's, which the envelope's kind field only repeats.
fn envelope_from_wire(envelope: Option<&wire::Envelope>, kind: Kind) -> Envelope {
    let Some(envelope) = envelope else {
        return Envelope::new(kind, "", "");
    };
    let known = |s: &String| (!s.is_empty()).then(|| s.clone());
    Envelope {
        key: ObjectKey {
            kind,
            namespace: envelope.namespace.clone(),
            name: envelope.name.clone(),
        },
        creation_timestamp: known(&envelope.creation_timestamp),
        uid: known(&envelope.uid),
    }
}

fn labels_to_wire(labels: &[(String, String)]) -> HashMap<String, String> {
    labels.iter().cloned().collect()
}

fn labels_from_wire(labels: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut labels: Vec<_> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.sort();
    labels
}

fn action_to_wire(action: AuthzAction) -> wire::Action {
    match action {
        AuthzAction::Allow => wire::Action::Allow,
        AuthzAction::Deny => wire::Action::Deny,
        AuthzAction::Audit => wire::Action::Audit,
    }
}

fn mode_to_wire(mode: Option<MtlsMode>) -> wire::MtlsMode {
    match mode {
        None => wire::MtlsMode::Unset,
        Some(MtlsMode::Strict) => wire::MtlsMode::Strict,
        Some(MtlsMode::Permissive) => wire::MtlsMode::Permissive,
        Some(MtlsMode::Disable) => wire::MtlsMode::Disable,
    }
}

fn mode_from_wire(mode: i32) -> Result<Option<MtlsMode>, WireError> {
    match wire::MtlsMode::try_from(mode) {
        Ok(wire::MtlsMode::Unset) => Ok(None),
        Ok(wire::MtlsMode::Strict) => Ok(Some(MtlsMode::Strict)),
        Ok(wire::MtlsMode::Permissive) => Ok(Some(MtlsMode::Permissive)),
        Ok(wire::MtlsMode::Disable) => Ok(Some(MtlsMode::Disable)),
        Err(_) => Err(WireError::Unknown {
            what: "mTLS mode",
            value: mode,
        }),
    }
}

fn stand_in_to_wire(stand_in: StandIn) -> wire::StandIn {
    match stand_in {
        StandIn::DenySelected => wire::StandIn::DenySelected,
        StandIn::AllowNothing => wire::StandIn::AllowNothing,
        StandIn::Strict => wire::StandIn::StrictMtls,
        StandIn::Dropped => wire::StandIn::Dropped,
    }
}

fn authz_from_wire(
    p: &wire::AuthorizationPolicy,
    envelope: Envelope,
) -> Result<AuthzPolicy, WireError> {
    let action = match wire::Action::try_from(p.action) {
        Ok(wire::Action::Allow) => AuthzAction::Allow,
        Ok(wire::Action::Deny) => AuthzAction::Deny,
        Ok(wire::Action::Audit) => AuthzAction::Audit,
        Ok(wire::Action::Unspecified) | Err(_) => {
            return Err(WireError::Unknown {
                what: "action",
                value: p.action,
            });
        }
    };
    if p.envelope.is_none() {
        return Err(WireError::Missing("envelope"));
    }
    let rules = p
        .rules
        .iter()
        .map(rule_from_wire)
        .collect::<Result<_, _>>()?;
    Ok(AuthzPolicy::new(
        envelope,
        action,
        labels_from_wire(&p.selector),
        rules,
        Vec::new(),
    ))
}

fn peer_from_wire(
    p: &wire::PeerAuthentication,
    envelope: Envelope,
) -> Result<PeerAuthnPolicy, WireError> {
    if p.envelope.is_none() {
        return Err(WireError::Missing("envelope"));
    }
    let ports = p
        .ports
        .iter()
        .map(|port| Ok((port_from_wire(port.port)?, mode_from_wire(port.mode)?)))
        .collect::<Result<_, WireError>>()?;
    Ok(PeerAuthnPolicy::new(
        envelope,
        labels_from_wire(&p.selector),
        mode_from_wire(p.mode)?,
        ports,
        Vec::new(),
    ))
}

fn rule_to_wire(rule: &Rule) -> wire::Rule {
    wire::Rule {
        from: rule
            .from()
            .iter()
            .map(|s| wire::Source {
                principals: Some(strings_to_wire(&s.principals)),
                namespaces: Some(strings_to_wire(&s.namespaces)),
                service_accounts: Some(wire::ServiceAccountField {
                    any: s.service_accounts.any.iter().map(account_to_wire).collect(),
                    none: s
                        .service_accounts
                        .none
                        .iter()
                        .map(account_to_wire)
                        .collect(),
                }),
                ip_blocks: Some(cidrs_to_wire(&s.ip_blocks)),
            })
            .collect(),
        to: rule
            .to()
            .iter()
            .map(|o| wire::Operation {
                hosts: Some(strings_to_wire(&o.hosts)),
                ports: Some(ports_to_wire(&o.ports)),
                methods: Some(strings_to_wire(&o.methods)),
                paths: Some(strings_to_wire(&o.paths)),
            })
            .collect(),
        when: rule
            .when()
            .iter()
            .map(|c| wire::Condition {
                condition: Some(match c {
                    ConditionMatch::SourceIp(f) => WireCondition::SourceIp(cidrs_to_wire(f)),
                    ConditionMatch::SourceNamespace(f) => {
                        WireCondition::SourceNamespace(strings_to_wire(f))
                    }
                    ConditionMatch::SourcePrincipal(f) => {
                        WireCondition::SourcePrincipal(strings_to_wire(f))
                    }
                    ConditionMatch::DestinationPort(f) => {
                        WireCondition::DestinationPort(ports_to_wire(f))
                    }
                    ConditionMatch::Header(name, f) => {
                        WireCondition::Header(wire::HeaderCondition {
                            name: name.as_str().to_owned(),
                            values: Some(strings_to_wire(f)),
                        })
                    }
                }),
            })
            .collect(),
    }
}

fn rule_from_wire(rule: &wire::Rule) -> Result<Rule, WireError> {
    let from = rule
        .from
        .iter()
        .map(|s| {
            let accounts = s.service_accounts.clone().unwrap_or_default();
            Ok(SourceMatch {
                principals: strings_from_wire(s.principals.as_ref())?,
                namespaces: strings_from_wire(s.namespaces.as_ref())?,
                service_accounts: Field {
                    any: accounts.any.iter().map(account_from_wire).collect(),
                    none: accounts.none.iter().map(account_from_wire).collect(),
                },
                ip_blocks: cidrs_from_wire(s.ip_blocks.as_ref())?,
            })
        })
        .collect::<Result<_, WireError>>()?;
    let to = rule
        .to
        .iter()
        .map(|o| {
            Ok(OperationMatch {
                hosts: strings_from_wire(o.hosts.as_ref())?,
                ports: ports_from_wire(o.ports.as_ref())?,
                methods: strings_from_wire(o.methods.as_ref())?,
                paths: strings_from_wire(o.paths.as_ref())?,
            })
        })
        .collect::<Result<_, WireError>>()?;
    let when =
        rule.when
            .iter()
            .map(|c| {
                Ok(
                    match c
                        .condition
                        .as_ref()
                        .ok_or(WireError::Missing("condition"))?
                    {
                        WireCondition::SourceIp(f) => {
                            ConditionMatch::SourceIp(cidrs_from_wire(Some(f))?)
                        }
                        WireCondition::SourceNamespace(f) => {
                            ConditionMatch::SourceNamespace(strings_from_wire(Some(f))?)
                        }
                        WireCondition::SourcePrincipal(f) => {
                            ConditionMatch::SourcePrincipal(strings_from_wire(Some(f))?)
                        }
                        WireCondition::DestinationPort(f) => {
                            ConditionMatch::DestinationPort(ports_from_wire(Some(f))?)
                        }
                        WireCondition::Header(h) => {
                            let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(
                                |source| WireError::Header {
                                    name: h.name.clone(),
                                    source,
                                },
                            )?;
                            ConditionMatch::Header(name, strings_from_wire(h.values.as_ref())?)
                        }
                    },
                )
            })
            .collect::<Result<_, WireError>>()?;
    Ok(Rule::new(from, to, when))
}

fn strings_to_wire(field: &Field<StrMatch>) -> wire::StringField {
    let one = |m: &StrMatch| wire::StringMatch {
        form: Some(match m {
            StrMatch::Exact(s) => Form::Exact(s.to_string()),
            StrMatch::Prefix(s) => Form::Prefix(s.to_string()),
            StrMatch::Suffix(s) => Form::Suffix(s.to_string()),
            StrMatch::Present => Form::Present(wire::Present {}),
        }),
    };
    wire::StringField {
        any: field.any.iter().map(one).collect(),
        none: field.none.iter().map(one).collect(),
    }
}

fn strings_from_wire(field: Option<&wire::StringField>) -> Result<Field<StrMatch>, WireError> {
    let one = |m: &wire::StringMatch| {
        Ok(
            match m.form.as_ref().ok_or(WireError::Missing("string match"))? {
                Form::Exact(s) => StrMatch::Exact(s.as_str().into()),
                Form::Prefix(s) => StrMatch::Prefix(s.as_str().into()),
                Form::Suffix(s) => StrMatch::Suffix(s.as_str().into()),
                Form::Present(_) => StrMatch::Present,
            },
        )
    };
    let Some(field) = field else {
        return Ok(Field::default());
    };
    Ok(Field {
        any: field.any.iter().map(one).collect::<Result<_, _>>()?,
        none: field.none.iter().map(one).collect::<Result<_, _>>()?,
    })
}

fn ports_to_wire(field: &Field<u16>) -> wire::PortField {
    wire::PortField {
        any: field.any.iter().map(|&p| p.into()).collect(),
        none: field.none.iter().map(|&p| p.into()).collect(),
    }
}

fn port_from_wire(port: u32) -> Result<u16, WireError> {
    u16::try_from(port).map_err(|_| WireError::Port(port))
}

fn ports_from_wire(field: Option<&wire::PortField>) -> Result<Field<u16>, WireError> {
    let Some(field) = field else {
        return Ok(Field::default());
    };
    let ports = |ports: &[u32]| -> Result<Vec<u16>, WireError> {
        ports.iter().map(|&p| port_from_wire(p)).collect()
    };
    Ok(Field {
        any: ports(&field.any)?,
        none: ports(&field.none)?,
    })
}

fn cidrs_to_wire(field: &Field<Cidr>) -> wire::CidrField {
    let one = |cidr: &Cidr| {
        let (address, prefix_len) = cidr.parts();
        wire::Cidr {
            address: match address {
                IpAddr::V4(ip) => ip.octets().to_vec(),
                IpAddr::V6(ip) => ip.octets().to_vec(),
            },
            prefix_len: prefix_len.into(),
        }
    };
    wire::CidrField {
        any: field.any.iter().map(one).collect(),
        none: field.none.iter().map(one).collect(),
    }
}

fn cidrs_from_wire(field: Option<&wire::CidrField>) -> Result<Field<Cidr>, WireError> {
    let one = |cidr: &wire::Cidr| {
        let bad = || WireError::Cidr {
            len: cidr.address.len(),
            prefix_len: cidr.prefix_len,
        };
        let address = match cidr.address.len() {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(cidr.address.as_slice()).map_err(|_| bad())?,
            )),
            16 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(cidr.address.as_slice()).map_err(|_| bad())?,
            )),
            _ => return Err(bad()),
        };
        let prefix_len = u8::try_from(cidr.prefix_len).map_err(|_| bad())?;
        Cidr::new(address, prefix_len).ok_or_else(bad)
    };
    let Some(field) = field else {
        return Ok(Field::default());
    };
    Ok(Field {
        any: field.any.iter().map(one).collect::<Result<_, _>>()?,
        none: field.none.iter().map(one).collect::<Result<_, _>>()?,
    })
}

fn account_to_wire(account: &ServiceAccount) -> wire::ServiceAccount {
    wire::ServiceAccount {
        namespace: account.namespace.to_string(),
        name: account.name.to_string(),
    }
}

fn account_from_wire(account: &wire::ServiceAccount) -> ServiceAccount {
    ServiceAccount {
        namespace: account.namespace.as_str().into(),
        name: account.name.as_str().into(),
    }
}

#[cfg(test)]
mod tests;
