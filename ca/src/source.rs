//! The task that owns the signing key: it loads (or creates) the key material, follows the root
//! rotation schedule and the plug-in files, and publishes each new `Authority` on a `watch`
//! channel. On a failed reload the last good authority stays in place.

use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use sigil_identity::{TrustBundle, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info};

use crate::authority::{Authority, SharedAuthority, Signer};
use crate::metrics::Metrics;
use crate::plugin::{self, PluginFiles, PluginSource};
use crate::state::{CaState, RootGeneration, StateError, unix_now};
use crate::store::{StateStore, StoreError};
use sigil_identity::bundle::certificate_to_pem;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Plugin(#[from] plugin::PluginError),
    #[error("stored root is unusable: {0}")]
    Authority(#[from] crate::authority::AuthorityError),
}

/// Where the signing key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// sigil's own root, created on first start and kept in the store.
    SelfSigned(StateStore),
    /// An operator's intermediate.
    Plugin(PluginSource),
}

impl KeySource {
    pub fn describe(&self) -> String {
        match self {
            KeySource::SelfSigned(store) => format!("self-signed, state in {}", store.describe()),
            KeySource::Plugin(source) => format!("plug-in intermediate from {}", source.describe()),
        }
    }
}

/// Runs until `shutdown` fires, re-reading the source every `reload_interval` and waking at each
/// scheduled rotation step.
pub async fn run(
    source: KeySource,
    td: TrustDomain,
    reload_interval: Duration,
    tx: watch::Sender<SharedAuthority>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen: Option<Fingerprint> = None;
    loop {
        let wake = match refresh(&source, &td, &mut seen, &tx).await {
            Ok(next_change) => next_change,
            Err(e) => {
                metrics.key_source_errors.inc();
                let keeping = tx.borrow().signer.is_some();
                error!(source = %source.describe(), error = %e, keeping_previous_key = keeping, "loading the CA key failed");
                None
            }
        };
        publish_gauges(&tx.borrow(), &metrics);
        let sleep = wake
            .map(|at| Duration::from_secs(at.saturating_sub(unix_now())).min(reload_interval))
            .unwrap_or(reload_interval);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What the published authority was built from; a reload that finds the same skips the rebuild.
#[derive(PartialEq)]
enum Fingerprint {
    State {
        state: CaState,
        active: usize,
        serving: usize,
        trusted: Vec<usize>,
    },
    Plugin(PluginFiles),
}

/// One pass: returns the next scheduled change, if any.
async fn refresh(
    source: &KeySource,
    td: &TrustDomain,
    seen: &mut Option<Fingerprint>,
    tx: &watch::Sender<SharedAuthority>,
) -> Result<Option<u64>, SourceError> {
    match source {
        KeySource::SelfSigned(store) => {
            let state = match load_or_create(store, td).await {
                Ok(state) => state,
                Err(e) => {
                    // The store is unreachable: keep following the schedule of the last state
                    // read, so rotation steps still happen on time, and report the failure.
                    if let Some(Fingerprint::State { state, .. }) = seen.as_ref() {
                        let state = state.clone();
                        follow_schedule(td, state, seen, tx)?;
                    }
                    return Err(e);
                }
            };
            follow_schedule(td, state, seen, tx)
        }
        KeySource::Plugin(plugin_source) => {
            let files = plugin_source.read().await?;
            if seen
                .as_ref()
                .is_some_and(|s| *s == Fingerprint::Plugin(files.clone()))
            {
                return Ok(None);
            }
            let sequence = tx
                .borrow()
                .bundle
                .sequence
                .max(unix_now().saturating_sub(1))
                + 1;
            // A set that fails is not remembered: it is retried (and reported) on every poll,
            // since some failures pass with time (an intermediate whose NotBefore is ahead).
            let authority = plugin::load(td, &files, sequence)?;
            info!(source = %plugin_source.describe(), roots = authority.bundle.roots.len(), "plug-in intermediate loaded");
            tx.send_replace(Arc::new(authority));
            *seen = Some(Fingerprint::Plugin(files));
            Ok(None)
        }
    }
}

async fn load_or_create(store: &StateStore, td: &TrustDomain) -> Result<CaState, SourceError> {
    let stored = match store.load().await? {
        Some(v) => v,
        None => {
            let fresh = CaState::new_self_signed(td, unix_now())?;
            let bundle = bundle_pem(&fresh, unix_now())?;
            let v = store.create_if_absent(&fresh, &bundle).await?;
            if v.state == fresh {
                info!(store = %store.describe(), "created a new self-signed root");
            } else {
                info!(store = %store.describe(), "another replica created the root first; using it");
            }
            v
        }
    };
    stored.state.check_trust_domain(td)?;
    Ok(stored.state)
}

/// Publishes the authority `state` means now, if that differs from what was published.
fn follow_schedule(
    td: &TrustDomain,
    state: CaState,
    seen: &mut Option<Fingerprint>,
    tx: &watch::Sender<SharedAuthority>,
) -> Result<Option<u64>, SourceError> {
    let now = unix_now();
    let schedule = state.schedule_at(now)?;
    let index = |g: &RootGeneration| {
        state
            .generations
            .iter()
            .position(|x| std::ptr::eq(x, g))
            .expect("from state")
    };
    let (active, serving) = (index(schedule.active), index(schedule.serving));
    let trusted = schedule.trusted.iter().map(|&g| index(g)).collect();
    let next_change = schedule.next_change;
    let fingerprint = Fingerprint::State {
        state,
        active,
        serving,
        trusted,
    };
    if seen.as_ref() != Some(&fingerprint) {
        let Fingerprint::State { state, .. } = &fingerprint else {
            unreachable!("built above")
        };
        let authority = self_signed_authority(td, state, now)?;
        info!(
            roots = authority.bundle.roots.len(),
            sequence = authority.bundle.sequence,
            next_change = ?next_change,
            "signing key loaded"
        );
        tx.send_replace(Arc::new(authority));
        *seen = Some(fingerprint);
    }
    Ok(next_change)
}

pub fn self_signed_authority(
    td: &TrustDomain,
    state: &CaState,
    now: u64,
) -> Result<Authority, SourceError> {
    let schedule = state.schedule_at(now)?;
    let signer_of = |generation: &RootGeneration| -> Result<Arc<Signer>, SourceError> {
        let cert = CertificateDer::from(generation.cert_der()?);
        let retire_at = generation
            .retire_at
            .and_then(|r| OffsetDateTime::from_unix_timestamp(r as i64).ok());
        let signer = Signer::new(cert, generation.key_pair()?, true, Vec::new(), retire_at)?;
        Ok(Arc::new(signer))
    };
    let signer = signer_of(schedule.active)?;
    let serving_signer = if std::ptr::eq(schedule.serving, schedule.active) {
        signer.clone()
    } else {
        signer_of(schedule.serving)?
    };
    let roots = schedule
        .trusted
        .iter()
        .map(|g| g.cert_der().map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Authority {
        trust_domain: td.clone(),
        signer: Some(signer),
        serving_signer: Some(serving_signer),
        bundle: TrustBundle::new(td.clone(), roots, schedule.bundle_sequence),
    })
}

/// The trust bundle of a state at `now`, as PEM (the public copy kept beside the state).
pub fn bundle_pem(state: &CaState, now: u64) -> Result<String, StateError> {
    let schedule = state.schedule_at(now)?;
    schedule
        .trusted
        .iter()
        .map(|g| g.cert_der().map(|d| certificate_to_pem(&d)))
        .collect()
}

/// Loads the active signing key of a state directory (offline `sigil ca issue`).
pub async fn offline_authority(
    store: &StateStore,
    td: &TrustDomain,
) -> Result<Authority, SourceError> {
    let stored = store.load().await?.ok_or_else(|| {
        StoreError::MissingKey(format!("{} (run `sigil ca init` first)", store.describe()))
    })?;
    stored.state.check_trust_domain(td)?;
    self_signed_authority(td, &stored.state, unix_now())
}

fn publish_gauges(authority: &Authority, metrics: &Metrics) {
    metrics
        .bundle_roots
        .set(authority.bundle.roots.len() as i64);
    let Some(signer) = &authority.signer else {
        return;
    };
    let expiry = signer.not_after.unix_timestamp();
    if signer.intermediates.is_empty() {
        metrics.root_expiry.set(expiry);
        metrics.intermediate_expiry.set(0);
    } else {
        metrics.intermediate_expiry.set(expiry);
        let root_expiry = authority
            .bundle
            .roots
            .iter()
            .filter_map(|r| sigil_identity::profile::inspect_cert(r).ok())
            .map(|r| r.not_after.unix_timestamp())
            .min()
            .unwrap_or(0);
        metrics.root_expiry.set(root_expiry);
    }
}

/// Generates a key for a certificate this process will hold (its serving certificate).
pub fn generate_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[tokio::test]
    async fn self_signed_source_creates_then_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::Dir(dir.path().to_path_buf());
        let (tx, mut rx) = watch::channel(Arc::new(Authority::empty(td())));
        let (_stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        tokio::spawn(run(
            KeySource::SelfSigned(store.clone()),
            td(),
            Duration::from_millis(50),
            tx,
            metrics.clone(),
            shutdown,
        ));
        rx.changed().await.unwrap();
        let first_root = rx.borrow().bundle.roots[0].clone();
        assert!(rx.borrow().signer.is_some());

        // Rotate with no propagation delay: the new root joins the bundle and signs at once.
        let read = store.load().await.unwrap().unwrap();
        let mut state = read.state.clone();
        state
            .schedule_rotation(
                &td(),
                unix_now(),
                crate::state::RotationTiming {
                    propagation: Duration::ZERO,
                    max_leaf_ttl: Duration::from_secs(3600),
                    retire_margin: Duration::from_secs(60),
                },
            )
            .unwrap();
        store.replace(&read, &state, "").await.unwrap();
        rx.changed().await.unwrap();
        let a = rx.borrow().clone();
        assert_eq!(a.bundle.roots.len(), 2);
        assert_eq!(a.bundle.roots[0], first_root);
        assert_ne!(
            a.signer().unwrap().cert(),
            &first_root,
            "the new root signs"
        );
        assert_eq!(metrics.bundle_roots.get(), 2);
    }

    #[tokio::test]
    async fn bad_plugin_update_keeps_the_previous_key() {
        let (files, _) = crate::plugin::tests::plugin_files(&td());
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let (tx, mut rx) = watch::channel(Arc::new(Authority::empty(td())));
        let (_stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        tokio::spawn(run(
            KeySource::Plugin(PluginSource::Dir(dir.path().to_path_buf())),
            td(),
            Duration::from_millis(50),
            tx,
            metrics.clone(),
            shutdown,
        ));
        rx.changed().await.unwrap();
        let loaded = rx.borrow().signer().unwrap().cert().clone();

        std::fs::write(dir.path().join(crate::plugin::CA_KEY), b"garbage").unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.key_source_errors.get() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(rx.borrow().signer().unwrap().cert(), &loaded);

        // A good new intermediate is picked up without restart.
        let (next, _) = crate::plugin::tests::plugin_files(&td());
        for (name, bytes) in &next {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(rx.borrow().signer().unwrap().cert(), &loaded);
    }
}
