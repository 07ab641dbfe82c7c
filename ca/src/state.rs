//! The self-signed CA's persistent state: its root generations and the rotation schedule, and
//! what that schedule means at a given instant (which root signs, which roots are trusted).
//!
//! Every replica derives the same answer from the same state and the clock, so replicas need no
//! coordination beyond sharing the stored state (a Secret or a directory).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use sigil_identity::{TrustDomain, profile};
use time::OffsetDateTime;

/// Lifetime of a self-signed root (Istio uses 10 years too).
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default margin after the last leaf signed by a retiring root could expire (clock skew).
pub const DEFAULT_RETIRE_MARGIN: Duration = Duration::from_secs(60);

/// The timing of a root rotation.
#[derive(Clone, Copy, Debug)]
pub struct RotationTiming {
    /// Time for every agent to receive the new bundle before the new root signs.
    pub propagation: Duration,
    /// The CA's longest leaf lifetime: how long a leaf of the old root may still be in use.
    pub max_leaf_ttl: Duration,
    /// Extra time before the old root leaves the bundle.
    pub retire_margin: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("CA state is for trust domain {stored:?}, but this CA serves {configured:?}")]
    TrustDomainMismatch { stored: String, configured: String },
    #[error("CA state has no root generation")]
    Empty,
    #[error("a root rotation is already in progress: the new root activates at unix time {0}")]
    RotationInProgress(u64),
    #[error("stored root generation is unusable: {0}")]
    BadKey(#[source] rcgen::Error),
    #[error("stored root generation is unusable: {0}")]
    BadCertificate(#[source] pem::PemError),
    #[error("could not create a root: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("CA state is not valid JSON: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The stored document (`ca.json` in the state directory or the Secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaState {
    pub trust_domain: String,
    pub generations: Vec<RootGeneration>,
}

/// One root certificate and its key, with when it starts signing and when it stops being trusted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RootGeneration {
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds: when it was added (and so entered the trust bundle).
    pub added_at: u64,
    /// Unix seconds: from when it is the signing root.
    pub activate_at: u64,
    /// Unix seconds: when it leaves the trust bundle; `None` while it may still sign.
    pub retire_at: Option<u64>,
}

/// What the schedule means at one instant.
#[derive(Debug, PartialEq)]
pub struct Schedule<'a> {
    /// The generation that signs now.
    pub active: &'a RootGeneration,
    /// The generation that signs the CA's own TLS serving certificate: the oldest trusted one
    /// until halfway through the overlap, so that agents still holding only the old bundle (e.g.
    /// offline during the propagation window) can reconnect and fetch the new one.
    pub serving: &'a RootGeneration,
    /// Every generation in the trust bundle now, oldest first.
    pub trusted: Vec<&'a RootGeneration>,
    /// Increases with every change of the trusted set (the unix time of the last change).
    pub bundle_sequence: u64,
    /// The next instant at which `active` or `trusted` changes.
    pub next_change: Option<u64>,
}

/// The result of scheduling a rotation.
#[derive(Debug, PartialEq)]
pub struct RotationPlan {
    pub activate_at: u64,
    pub retire_old_at: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CaState {
    /// A fresh state with one root that signs from `now`.
    pub fn new_self_signed(td: &TrustDomain, now: u64) -> Result<Self, StateError> {
        Ok(CaState {
            trust_domain: td.as_str().to_string(),
            generations: vec![generate_root(td, now, now)?],
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let state: CaState = serde_json::from_slice(bytes)?;
        if state.generations.is_empty() {
            return Err(StateError::Empty);
        }
        Ok(state)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("CaState always serializes")
    }

    pub fn check_trust_domain(&self, td: &TrustDomain) -> Result<(), StateError> {
        if self.trust_domain != td.as_str() {
            return Err(StateError::TrustDomainMismatch {
                stored: self.trust_domain.clone(),
                configured: td.as_str().to_string(),
            });
        }
        Ok(())
    }

    /// Adds a new root now (trusted at once), makes it the signer after `propagation` (time for
    /// every agent to receive the new bundle), and retires every older root once the last leaf
    /// it could have signed has expired.
    pub fn schedule_rotation(
        &mut self,
        td: &TrustDomain,
        now: u64,
        timing: RotationTiming,
    ) -> Result<RotationPlan, StateError> {
        if let Some(pending) = self.generations.iter().find(|g| g.activate_at > now) {
            return Err(StateError::RotationInProgress(pending.activate_at));
        }
        self.generations
            .retain(|g| g.retire_at.is_none_or(|retire| retire > now));
        let activate_at = now + timing.propagation.as_secs();
        let retire_old_at =
            activate_at + timing.max_leaf_ttl.as_secs() + timing.retire_margin.as_secs();
        for generation in &mut self.generations {
            let retire = generation.retire_at.get_or_insert(retire_old_at);
            *retire = (*retire).min(retire_old_at);
        }
        self.generations.push(generate_root(td, now, activate_at)?);
        Ok(RotationPlan {
            activate_at,
            retire_old_at,
        })
    }

    pub fn schedule_at(&self, now: u64) -> Result<Schedule<'_>, StateError> {
        let trusted: Vec<&RootGeneration> = self
            .generations
            .iter()
            .filter(|g| g.retire_at.is_none_or(|retire| retire > now))
            .collect();
        let active = trusted
            .iter()
            .filter(|g| g.activate_at <= now)
            .max_by_key(|g| g.activate_at)
            .or_else(|| trusted.iter().min_by_key(|g| g.activate_at))
            .copied()
            .ok_or(StateError::Empty)?;
        let bundle_sequence = self
            .generations
            .iter()
            .flat_map(|g| [Some(g.added_at), g.retire_at.filter(|r| *r <= now)])
            .flatten()
            .max()
            .unwrap_or(0);
        let serving = trusted
            .iter()
            .find(|g| self.serving_handoff(g).is_none_or(|handoff| now < handoff))
            .copied()
            .unwrap_or(active);
        let next_change = self
            .generations
            .iter()
            .flat_map(|g| [Some(g.activate_at), g.retire_at, self.serving_handoff(g)])
            .flatten()
            .filter(|t| *t > now)
            .min();
        Ok(Schedule {
            active,
            serving,
            trusted,
            bundle_sequence,
            next_change,
        })
    }
}

impl CaState {
    /// When a retiring generation hands the serving certificate to its successor: halfway
    /// between the successor's activation and its own retirement.
    fn serving_handoff(&self, generation: &RootGeneration) -> Option<u64> {
        let retire = generation.retire_at?;
        let successor = self
            .generations
            .iter()
            .map(|g| g.activate_at)
            .filter(|a| *a > generation.activate_at)
            .min()
            .unwrap_or(retire)
            .min(retire);
        Some(successor + (retire - successor) / 2)
    }
}

impl RootGeneration {
    pub fn key_pair(&self) -> Result<KeyPair, StateError> {
        KeyPair::from_pem(&self.key_pem).map_err(StateError::BadKey)
    }

    pub fn cert_der(&self) -> Result<Vec<u8>, StateError> {
        pem::parse(&self.cert_pem)
            .map(|p| p.into_contents())
            .map_err(StateError::BadCertificate)
    }
}

fn generate_root(
    td: &TrustDomain,
    now: u64,
    activate_at: u64,
) -> Result<RootGeneration, StateError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let start =
        OffsetDateTime::from_unix_timestamp(now as i64).unwrap_or(OffsetDateTime::now_utc());
    let params = profile::ca_params(
        td,
        "sigil root",
        start - time::Duration::minutes(1),
        start + ROOT_VALIDITY,
        None,
    );
    let cert = params.self_signed(&key)?;
    Ok(RootGeneration {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        added_at: now,
        activate_at,
        retire_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn timing(propagation: u64, max_leaf_ttl: u64) -> RotationTiming {
        RotationTiming {
            propagation: Duration::from_secs(propagation),
            max_leaf_ttl: Duration::from_secs(max_leaf_ttl),
            retire_margin: DEFAULT_RETIRE_MARGIN,
        }
    }

    #[test]
    fn fresh_state_signs_with_its_only_root() {
        let state = CaState::new_self_signed(&td(), 1000).unwrap();
        let s = state.schedule_at(1000).unwrap();
        assert_eq!(s.trusted.len(), 1);
        assert_eq!(s.active, &state.generations[0]);
        assert_eq!(s.next_change, None);
        assert_eq!(s.bundle_sequence, 1000);
    }

    #[test]
    fn rotation_adds_then_switches_then_retires() {
        let mut state = CaState::new_self_signed(&td(), 1000).unwrap();
        let plan = state
            .schedule_rotation(&td(), 2000, timing(100, 500))
            .unwrap();
        assert_eq!(plan.activate_at, 2100);
        assert_eq!(
            plan.retire_old_at,
            2100 + 500 + DEFAULT_RETIRE_MARGIN.as_secs()
        );
        let (old, new) = (&state.generations[0], &state.generations[1]);

        // Added: both trusted, old still signs, sequence moved.
        let s = state.schedule_at(2000).unwrap();
        assert_eq!(s.trusted, vec![old, new]);
        assert_eq!(s.active, old);
        assert_eq!(s.serving, old);
        assert_eq!(s.bundle_sequence, 2000);
        assert_eq!(s.next_change, Some(2100));

        // Switched: new signs, both still trusted; the CA still serves TLS with the old root.
        let handoff = 2100 + (plan.retire_old_at - 2100) / 2;
        let s = state.schedule_at(2100).unwrap();
        assert_eq!(s.active, new);
        assert_eq!(s.serving, old);
        assert_eq!(s.trusted.len(), 2);
        assert_eq!(s.bundle_sequence, 2000);
        assert_eq!(s.next_change, Some(handoff));

        // Halfway through the overlap the serving certificate moves to the new root.
        let s = state.schedule_at(handoff).unwrap();
        assert_eq!(s.serving, new);
        assert_eq!(s.trusted.len(), 2);
        assert_eq!(s.next_change, Some(plan.retire_old_at));

        // Retired: only the new root.
        let s = state.schedule_at(plan.retire_old_at).unwrap();
        assert_eq!(s.trusted, vec![new]);
        assert_eq!(s.active, new);
        assert_eq!(s.serving, new);
        assert_eq!(s.bundle_sequence, plan.retire_old_at);
        assert_eq!(s.next_change, None);
    }

    #[test]
    fn second_rotation_while_one_is_pending_is_refused() {
        let mut state = CaState::new_self_signed(&td(), 1000).unwrap();
        state
            .schedule_rotation(&td(), 2000, timing(100, 500))
            .unwrap();
        let err = state
            .schedule_rotation(&td(), 2050, timing(100, 500))
            .unwrap_err();
        assert!(matches!(err, StateError::RotationInProgress(2100)));
    }

    #[test]
    fn rotation_prunes_retired_generations() {
        let mut state = CaState::new_self_signed(&td(), 1000).unwrap();
        let plan = state
            .schedule_rotation(&td(), 2000, timing(10, 10))
            .unwrap();
        state
            .schedule_rotation(&td(), plan.retire_old_at + 1, timing(10, 10))
            .unwrap();
        assert_eq!(state.generations.len(), 2);
    }

    #[test]
    fn state_round_trips_and_checks_trust_domain() {
        let state = CaState::new_self_signed(&td(), 1000).unwrap();
        let decoded = CaState::decode(&state.encode()).unwrap();
        assert_eq!(decoded, state);
        let other = TrustDomain::new("example.org").unwrap();
        assert!(matches!(
            decoded.check_trust_domain(&other),
            Err(StateError::TrustDomainMismatch { .. })
        ));
        assert!(matches!(
            CaState::decode(br#"{"trust_domain":"x","generations":[]}"#),
            Err(StateError::Empty)
        ));
        assert!(matches!(
            CaState::decode(b"nope"),
            Err(StateError::Decode(_))
        ));
    }
}
