//! The policies in force for this workload: the newest set from the agent, compiled, with what
//! was rejected and whether HTTP must be parsed to decide.

use std::collections::BTreeMap;

use sigil_policy::{MtlsMode, PolicySet, Workload};
use sigil_proto::sigil::policy::v2::PolicySet as WirePolicySet;

/// The policies in force for this workload.
#[derive(Debug)]
pub struct PolicyState {
    pub version: u64,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub set: PolicySet,
    /// `namespace/name: why` of every object that is enforced as its fail-closed stand-in.
    pub rejected: Vec<String>,
    /// Whether an authorization policy for this workload looks at HTTP attributes, so that
    /// inbound HTTP must be parsed to decide.
    pub needs_http: bool,
}

impl PolicyState {
    pub fn from_wire(wire: &WirePolicySet) -> PolicyState {
        let mut rejected = Vec::new();
        let mut compiled = Vec::new();
        for entry in &wire.policies {
            match sigil_proxy_api::policy::from_wire(entry, &wire.namespace) {
                Ok(policy) => compiled.push(policy),
                Err(invalid) => {
                    rejected.push(invalid.to_string());
                    compiled.extend(invalid.stand_in());
                }
            }
        }
        let set = PolicySet::of(compiled);
        let labels: BTreeMap<String, String> = wire
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let workload = Workload {
            namespace: &wire.namespace,
            labels: &labels,
        };
        let needs_http = set
            .authorization_policies()
            .any(|p| p.applies_to(&workload) && p.uses_http());
        PolicyState {
            version: wire.version,
            namespace: wire.namespace.clone(),
            labels,
            set,
            rejected,
            needs_http,
        }
    }

    pub fn workload(&self) -> Workload<'_> {
        Workload {
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }

    /// The inbound mode for `port`: PeerAuthentication where one sets it, else `default` (the
    /// proxy's flags).
    pub fn mtls_mode(&self, port: u16, default: MtlsMode) -> MtlsMode {
        self.set
            .effective_mtls(&self.workload(), port, default)
            .mode
    }
}

#[cfg(test)]
mod tests;
