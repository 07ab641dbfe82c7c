//! The certificate manager: one key and certificate per identity, shared by every workload on the
//! node that has it. Keys are made here and never leave the node; a certificate is renewed at half
//! its lifetime (±5 % jitter), so a CA outage of up to half the TTL goes unnoticed. Failures back
//! off exponentially per identity, but never longer than a quarter of the certificate's remaining
//! lifetime (so retries get denser towards expiry, and several land well before it) and, once it
//! has expired, than [`EXPIRED_RETRY`]; the first successful call to the CA (of any identity)
//! ends every identity's wait, so recovery follows the CA's return at once. A still-valid
//! certificate keeps being served while the CA is unreachable. A request the CA calls invalid is
//! retried only at the slowest pace: asking again will not make it valid.
//!
//! One manager task owns the set of identities; each identity has a worker task that owns its
//! certificate and publishes it on a `watch` channel. An identity lives while someone subscribes
//! to it or the node's pods want it (prefetch), and is forgotten after that.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_identity::SpiffeId;
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{csr, profile};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::ca_client::{CaClient, CaClientError};
use crate::metrics::{IdentityLabels, Metrics};
use sigil_base::backoff::{self, Backoff, jitter};

pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most signing requests in flight at once (ztunnel uses 8 too).
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 8;
/// Renew when this fraction of the lifetime has passed...
const RENEW_AT: f64 = 0.5;
/// ...give or take this fraction of it, so identities renewed together spread out.
const RENEW_JITTER: f64 = 0.05;
/// A certificate arriving with less lifetime left than this is refused (and retried with backoff).
const MIN_LIFETIME: Duration = Duration::from_secs(2);
/// The shortest wait before renewing, whatever the certificate says.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// A failed renewal waits at most this fraction of the held certificate's remaining lifetime.
const RETRY_OF_REMAINING: f64 = 0.25;
/// The longest wait between retries once there is no valid certificate (none yet, or expired):
/// workloads of this identity fail until one arrives.
pub const EXPIRED_RETRY: Duration = Duration::from_secs(2);
/// How often a worker checks whether anyone still wants its identity.
const IDLE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("making a key or CSR: {0}")]
    Key(#[source] rcgen::Error),
    #[error("making a key or CSR: {0}")]
    Csr(#[source] csr::CsrError),
    #[error("the CA returned a certificate for {got}, not {expected}")]
    WrongIdentity { expected: SpiffeId, got: String },
    #[error("the CA returned an unusable certificate: {0}")]
    BadCertificate(String),
    #[error("the CA returned an unusable certificate: {0}")]
    Unusable(#[source] profile::ProfileError),
}

impl FetchError {
    /// Whether retrying soon can help: not for a request the CA calls invalid, nor for a CA that
    /// answers with the wrong certificate (asking again gets the same answer).
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Ca(e) => e.is_retryable(),
            FetchError::Key(_) | FetchError::Csr(_) => true,
            FetchError::WrongIdentity { .. }
            | FetchError::BadCertificate(_)
            | FetchError::Unusable(_) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the certificate manager has stopped")]
pub struct ManagerGone;

/// A certificate and its key, as served to workloads.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    /// The chain and key as PEM, made once per certificate: SDS serves PEM to every stream.
    chain_pem: String,
    key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the agent received it: renewal counts from here, not from the backdated NotBefore
    /// (with a one-minute backdate, half of a short TTL's NotBefore-based lifetime is already past).
    pub received_at: SystemTime,
    /// When it will be renewed: `RENEW_AT` of the lifetime it arrived with, jittered once.
    pub renew_at: SystemTime,
    pub serial_hex: String,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    pub fn certified_key(&self) -> CertifiedKey {
        CertifiedKey {
            chain: self.chain.clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone())),
        }
    }

    /// The private key, PKCS#8 DER (for serving it to the workload that owns it).
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// The private key as a PEM "PRIVATE KEY" (PKCS#8) block.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The chain, leaf first, as PEM.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    fn renew_in(&self, now: SystemTime) -> Duration {
        self.renew_at
            .duration_since(now)
            .unwrap_or_default()
            .max(MIN_RENEW_INTERVAL)
    }

    fn is_valid(&self, now: SystemTime) -> bool {
        now < self.not_after
    }
}

pub type SvidWatch = watch::Receiver<Option<Arc<Svid>>>;

/// Settings of the certificate manager.
#[derive(Clone, Debug)]
pub struct CertConfig {
    pub ttl: Duration,
    pub max_concurrent_fetches: usize,
    /// The agent's own identity: requested without impersonation.
    pub own_id: Option<SpiffeId>,
}

enum Command {
    Subscribe(SpiffeId, oneshot::Sender<SvidWatch>),
    Want(BTreeSet<SpiffeId>),
    Idle(SpiffeId),
    List(oneshot::Sender<Vec<IdentityStatus>>),
}

/// What the manager holds for one identity (for operators: `sigil inspect agent`).
#[derive(Clone, Debug)]
pub struct IdentityStatus {
    pub id: SpiffeId,
    pub svid: Option<Arc<Svid>>,
    pub subscribers: usize,
    pub prefetched: bool,
}

/// A handle to the manager task; cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    commands: mpsc::Sender<Command>,
}

struct Worker {
    svid: Arc<watch::Sender<Option<Arc<Svid>>>>,
    /// Dropping it stops the worker.
    _stop: oneshot::Sender<()>,
}

impl CertManager {
    pub fn spawn(ca: CaClient, config: CertConfig, metrics: Arc<Metrics>) -> CertManager {
        let (commands, rx) = mpsc::channel(256);
        let manager = CertManager { commands };
        tokio::spawn(run_manager(
            ca,
            config,
            metrics,
            rx,
            manager.commands.clone(),
        ));
        manager
    }

    /// The certificate of `id`, now and after every renewal (`None` until the first one arrives,
    /// or once the held one expired with the CA unreachable). Starts fetching if needed.
    pub async fn subscribe(&self, id: &SpiffeId) -> Result<SvidWatch, ManagerGone> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Subscribe(id.clone(), tx))
            .await
            .map_err(|_| ManagerGone)?;
        rx.await.map_err(|_| ManagerGone)
    }

    /// The identities the node's workloads will need (their pods are on this node): fetched
    /// ahead of the first request, and kept while wanted even with no subscriber.
    pub async fn set_wanted(&self, ids: BTreeSet<SpiffeId>) -> Result<(), ManagerGone> {
        self.commands
            .send(Command::Want(ids))
            .await
            .map_err(|_| ManagerGone)
    }

    /// Every identity held now, in SPIFFE ID order.
    pub async fn list(&self) -> Result<Vec<IdentityStatus>, ManagerGone> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::List(tx))
            .await
            .map_err(|_| ManagerGone)?;
        rx.await.map_err(|_| ManagerGone)
    }
}

async fn run_manager(
    ca: CaClient,
    config: CertConfig,
    metrics: Arc<Metrics>,
    mut commands: mpsc::Receiver<Command>,
    handle: mpsc::Sender<Command>,
) {
    let slots = Arc::new(Semaphore::new(config.max_concurrent_fetches));
    let mut workers: HashMap<SpiffeId, Worker> = HashMap::new();
    let mut wanted: BTreeSet<SpiffeId> = BTreeSet::new();
    let spawn = |id: &SpiffeId| {
        let svid = Arc::new(watch::channel(None).0);
        let (stop_tx, stop_rx) = oneshot::channel();
        let worker = IdentityWorker {
            id: id.clone(),
            impersonate: config.own_id.as_ref() != Some(id),
            ca: ca.clone(),
            ttl: config.ttl,
            slots: slots.clone(),
            metrics: metrics.clone(),
            svid: svid.clone(),
            manager: handle.clone(),
        };
        tokio::spawn(worker.run(stop_rx));
        info!(identity = %id, "managing a new identity");
        Worker {
            svid,
            _stop: stop_tx,
        }
    };
    while let Some(command) = commands.recv().await {
        match command {
            Command::Subscribe(id, reply) => {
                let worker = workers.entry(id.clone()).or_insert_with(|| spawn(&id));
                let _ = reply.send(worker.svid.subscribe());
            }
            Command::Want(ids) => {
                for id in &ids {
                    workers.entry(id.clone()).or_insert_with(|| spawn(id));
                }
                let dropped: Vec<_> = wanted.difference(&ids).cloned().collect();
                wanted = ids;
                for id in dropped {
                    forget_if_idle(&mut workers, &wanted, &id);
                }
            }
            Command::Idle(id) => forget_if_idle(&mut workers, &wanted, &id),
            Command::List(reply) => {
                let mut list: Vec<IdentityStatus> = workers
                    .iter()
                    .map(|(id, worker)| IdentityStatus {
                        id: id.clone(),
                        svid: worker.svid.borrow().clone(),
                        subscribers: worker.svid.receiver_count(),
                        prefetched: wanted.contains(id),
                    })
                    .collect();
                list.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(list);
            }
        }
        metrics.identities.set(workers.len() as i64);
    }
}

/// Stops and forgets `id` if no one subscribes to it and no pod on the node wants it. Decided
/// here, in the one task that also hands out subscriptions, so none can race with it.
fn forget_if_idle(
    workers: &mut HashMap<SpiffeId, Worker>,
    wanted: &BTreeSet<SpiffeId>,
    id: &SpiffeId,
) {
    let idle = workers
        .get(id)
        .is_some_and(|w| w.svid.receiver_count() == 0);
    if idle && !wanted.contains(id) {
        workers.remove(id);
        info!(identity = %id, "forgot an identity no workload needs any more");
    }
}

/// Owns one identity's certificate.
struct IdentityWorker {
    id: SpiffeId,
    impersonate: bool,
    ca: CaClient,
    ttl: Duration,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    svid: Arc<watch::Sender<Option<Arc<Svid>>>>,
    manager: mpsc::Sender<Command>,
}

impl IdentityWorker {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let labels = IdentityLabels {
            identity: self.id.to_string(),
        };
        let mut backoff = Backoff::default();
        let mut idle_check = tokio::time::interval(IDLE_CHECK);
        let mut ca_answered = self.ca.answered();
        loop {
            // Only answers from now on end a backoff (if this fetch fails while another
            // identity's succeeds, the CA is back: retry at once).
            ca_answered.borrow_and_update();
            let (wait, failing) = match self.fetch().await {
                Ok(svid) => {
                    backoff.reset();
                    let expiry = svid
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    self.metrics
                        .cert_expiry
                        .get_or_create(&labels)
                        .set(expiry.as_secs() as i64);
                    let wait = svid.renew_in(SystemTime::now());
                    debug!(identity = %self.id, serial = %svid.serial_hex, renew_in = ?wait, "certificate issued");
                    self.svid.send_replace(Some(Arc::new(svid)));
                    (wait, false)
                }
                Err(e) => {
                    self.metrics.csr_failures.get_or_create(&labels).inc();
                    let now = SystemTime::now();
                    let still_valid = self.svid.borrow().as_ref().is_some_and(|s| s.is_valid(now));
                    if !still_valid && self.svid.borrow().is_some() {
                        self.svid.send_replace(None);
                    }
                    let remaining = self
                        .svid
                        .borrow()
                        .as_ref()
                        .and_then(|s| s.not_after.duration_since(now).ok());
                    let retryable = e.is_retryable();
                    let wait = retry_wait(&mut backoff, remaining, retryable);
                    if retryable {
                        warn!(identity = %self.id, error = %e, keeping_valid_certificate = still_valid, retry_in = ?wait, "certificate request failed");
                    } else {
                        error!(identity = %self.id, error = %e, keeping_valid_certificate = still_valid, retry_in = ?wait, "certificate request failed and asking again will not help; retrying at the slowest pace");
                    }
                    // An invalid request stays invalid when the CA is back: keep its pace.
                    (wait, retryable)
                }
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = &mut stop => {
                        self.metrics.cert_expiry.remove(&labels);
                        return;
                    }
                    changed = ca_answered.changed(), if failing => {
                        if changed.is_ok() {
                            debug!(identity = %self.id, "the CA answered again; retrying now");
                            backoff.reset();
                            break;
                        }
                    }
                    // Reported on every check while no one subscribes: the manager decides (it
                    // knows whether a pod still wants the identity), and the report is cheap.
                    _ = idle_check.tick() => {
                        if self.svid.receiver_count() == 0 {
                            let _ = self.manager.send(Command::Idle(self.id.clone())).await;
                        }
                    }
                }
            }
        }
    }

    async fn fetch(&self) -> Result<Svid, FetchError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(FetchError::Key)?;
        let csr = csr::build_csr(&key).map_err(FetchError::Csr)?;
        let started = Instant::now();
        let result = self
            .ca
            .sign(csr, self.ttl, self.impersonate.then_some(&self.id))
            .await;
        self.metrics
            .csr_duration
            .observe(started.elapsed().as_secs_f64());
        let response = result?;
        let report = profile::inspect_cert(&response.leaf).map_err(FetchError::Unusable)?;
        // Never serve a certificate for another identity than the one asked for (ztunnel checks
        // this too): a CA bug must not become a workload impersonating another.
        if report.spiffe_id.as_ref() != Some(&self.id) {
            return Err(FetchError::WrongIdentity {
                expected: self.id.clone(),
                got: report
                    .spiffe_id
                    .map_or_else(|| "(none)".to_string(), |id| id.to_string()),
            });
        }
        let spki =
            profile::subject_public_key_info(&response.leaf).map_err(FetchError::Unusable)?;
        if spki != key.subject_public_key_info() {
            return Err(FetchError::BadCertificate(
                "it is not for the key this agent generated".into(),
            ));
        }
        let (received_at, not_after): (SystemTime, SystemTime) =
            (SystemTime::now(), report.not_after.into());
        // An already expired or nearly expired certificate (clock skew, or a CA at the end of
        // its own life capping NotAfter) would be renewed at once, in a loop: fail and back off.
        let lifetime = not_after.duration_since(received_at).unwrap_or_default();
        if lifetime < MIN_LIFETIME {
            return Err(FetchError::BadCertificate(format!(
                "it is valid for only {lifetime:?} more (at least {MIN_LIFETIME:?} needed)"
            )));
        }
        let chain: Vec<CertificateDer<'static>> = std::iter::once(response.leaf)
            .chain(response.intermediates)
            .map(CertificateDer::from)
            .collect();
        let chain_pem = chain
            .iter()
            .map(|der| sigil_identity::bundle::certificate_to_pem(der))
            .collect();
        Ok(Svid {
            id: self.id.clone(),
            chain,
            chain_pem,
            key_pem: key.serialize_pem(),
            key_pkcs8: key.serialize_der(),
            not_before: report.not_before.into(),
            not_after,
            received_at,
            renew_at: renewal_time(received_at, not_after),
            serial_hex: report.serial_hex,
        })
    }
}

/// How long to wait after a failed request. A retryable failure waits out the backoff, capped
/// (with jitter, so identities do not retry in lockstep) at [`RETRY_OF_REMAINING`] of the held
/// certificate's `remaining` lifetime, but no less than [`EXPIRED_RETRY`] apart, and never past
/// the expiry itself (the worker wakes then to stop serving it); with no valid certificate, at
/// most [`EXPIRED_RETRY`]. A failure retrying cannot fix waits the longest backoff.
fn retry_wait(backoff: &mut Backoff, remaining: Option<Duration>, retryable: bool) -> Duration {
    if !retryable {
        return jitter(backoff::MAX_DELAY, 0.2);
    }
    let cap = match remaining {
        Some(remaining) => remaining
            .mul_f64(RETRY_OF_REMAINING)
            .max(EXPIRED_RETRY)
            .min(remaining),
        None => EXPIRED_RETRY,
    };
    backoff.next_delay().min(jitter(cap, 0.2))
}

/// When to renew a certificate received at `received_at`: at `RENEW_AT` of the lifetime it
/// arrived with, ± `RENEW_JITTER` of it.
fn renewal_time(received_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(received_at).unwrap_or_default();
    received_at + jitter(lifetime.mul_f64(RENEW_AT), RENEW_JITTER / RENEW_AT)
}

/// Keeps the agent's own client certificate (hosts without Kubernetes) fresh: every renewal of
/// `own_id` by the manager replaces the credential the CA client presents. When the renewed
/// certificate expires with no successor (a CA outage longer than its lifetime), the CA would
/// refuse it, and renewing needs a credential the CA accepts: the agent presents `bootstrap`
/// (its `--client-cert`, usually longer-lived) again until a renewal arrives. Without that the
/// agent could never renew anything again until restarted.
pub async fn keep_agent_certificate(
    manager: CertManager,
    own_id: SpiffeId,
    bootstrap: Arc<CertifiedKey>,
    credential: watch::Sender<Arc<CertifiedKey>>,
) -> Result<(), ManagerGone> {
    let mut svid = manager.subscribe(&own_id).await?;
    loop {
        let current = svid.borrow_and_update().clone();
        match current {
            Some(current) => {
                credential.send_replace(Arc::new(current.certified_key()));
            }
            None if !Arc::ptr_eq(&credential.borrow(), &bootstrap) => {
                warn!(identity = %own_id, "the agent's own certificate expired without a renewal; presenting its --client-cert certificate again to renew it");
                credential.send_replace(bootstrap.clone());
            }
            None => {}
        }
        if svid.changed().await.is_err() {
            return Err(ManagerGone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svid(received_at: SystemTime, ttl: Duration) -> Svid {
        Svid {
            id: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
            chain: Vec::new(),
            key_pkcs8: Vec::new(),
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before: received_at - Duration::from_secs(60),
            not_after: received_at + ttl,
            received_at,
            renew_at: renewal_time(received_at, received_at + ttl),
            serial_hex: "01".into(),
        }
    }

    #[test]
    fn renews_at_half_the_lifetime_it_arrived_with() {
        let now = SystemTime::now();
        for ttl in [Duration::from_secs(4), Duration::from_secs(24 * 3600)] {
            let wait = svid(now, ttl).renew_in(now);
            assert!(
                wait >= ttl.mul_f64(0.45) && wait <= ttl.mul_f64(0.55),
                "{ttl:?}: {wait:?}"
            );
        }
        // Already past its renewal time: renew as soon as allowed (never in a tight loop).
        let old = svid(now - Duration::from_secs(10), Duration::from_secs(4));
        assert_eq!(old.renew_in(now), MIN_RENEW_INTERVAL);
        assert!(!old.is_valid(now));
    }

    #[test]
    fn a_failed_renewal_waits_at_most_a_quarter_of_the_remaining_lifetime() {
        // A backoff grown long during an outage.
        let grown = || {
            let mut b = Backoff::default();
            for _ in 0..20 {
                b.next_delay();
            }
            b
        };
        let hour = Duration::from_secs(3600);
        let wait = retry_wait(&mut grown(), Some(hour), true);
        assert!(
            wait <= hour.mul_f64(0.25 * 1.2) && wait >= Duration::from_secs(90),
            "{wait:?}"
        );
        // Near expiry: retries every few seconds, and the last one before expiry at the latest.
        let wait = retry_wait(&mut grown(), Some(Duration::from_secs(8)), true);
        assert!(wait <= EXPIRED_RETRY.mul_f64(1.2), "{wait:?}");
        let wait = retry_wait(&mut grown(), Some(Duration::from_millis(500)), true);
        assert!(wait <= Duration::from_millis(600), "{wait:?}");
        // Expired, or none yet: every few seconds however long the outage was.
        let wait = retry_wait(&mut grown(), None, true);
        assert!(wait <= EXPIRED_RETRY.mul_f64(1.2), "{wait:?}");
        // A fresh backoff still starts short.
        let wait = retry_wait(&mut Backoff::default(), Some(hour), true);
        assert!(wait <= Duration::from_millis(600), "{wait:?}");
        // A request the CA calls invalid is not hammered, even with no certificate.
        let wait = retry_wait(&mut Backoff::default(), None, false);
        assert!(wait >= backoff::MAX_DELAY.mul_f64(0.8), "{wait:?}");
    }

    #[test]
    fn only_failures_retrying_can_fix_are_retried_soon() {
        let invalid = FetchError::Ca(CaClientError::Refused(tonic::Status::invalid_argument(
            "bad csr",
        )));
        assert!(!invalid.is_retryable());
        let unavailable = FetchError::Ca(CaClientError::Refused(tonic::Status::unavailable(
            "no key loaded",
        )));
        assert!(unavailable.is_retryable());
        assert!(!FetchError::BadCertificate("short".into()).is_retryable());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let mut s = svid(SystemTime::now(), Duration::from_secs(4));
        s.key_pkcs8 = b"SECRET-KEY-BYTES".to_vec();
        assert!(!format!("{s:?}").contains("SECRET"));
    }
}
