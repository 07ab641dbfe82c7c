//! Where a feed's objects come from, for the policy feed ([`crate::policy_feed`]) and the route
//! feed ([`crate::routes`]) alike, each with its own kinds and readers ([`ObjectKind`]):
//! - Kubernetes (`--attestor k8s`): a cluster-wide watch per kind ([`cluster_events`]). A kind
//!   whose list is 404 (its CRD is not installed) counts as synced and empty, logged once, and
//!   keeps being retried with the watcher's backoff (at most 30 s apart), so that its objects
//!   apply once the CRD appears.
//! - `--policy-file` ([`ObjectFile`]): the kinds' documents in a multi-document YAML file,
//!   re-read every [`sigil_kube_watch::POLL_INTERVAL`]; an invalid edit is logged and counted
//!   (`policy_file_reload_failures`), and the last good objects stay.
//!
//! [`ObjectSource::merged`] takes the file's objects and the cluster's over them: an object in
//! both (same kind, namespace and name) is the cluster's, and each such overlap is logged once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use sigil_kube_watch::follow::{self, Events, WatchEvent};
use sigil_kube_watch::{Listed, PolledFile};
use tracing::{error, info, warn};

/// The status of a list of a resource that is not served. Checked as a code, not as the
/// `NotFound` reason: in front of some API servers the answer is a plain-text 404.
const NOT_FOUND: u16 = 404;

/// The kinds one feed reads (each a Kubernetes resource), and how it reads their objects.
pub trait ObjectKind: Copy + Ord + fmt::Display + Send + Sync + 'static {
    /// What names an object: its kind, namespace and name.
    type Key: Clone + Ord + fmt::Display + Send + Sync;
    /// What is kept of an object.
    type Object: Clone + PartialEq + Send + Sync;
    /// Why a file's documents are invalid.
    type FileError: From<std::io::Error> + fmt::Display;

    /// Every kind, each watched in the cluster.
    const ALL: &'static [Self];
    /// What the objects are, in logs: `policy`, `route`.
    const NOUN: &'static str;

    fn api_resource(self) -> ApiResource;
    /// What names a cluster object of this kind; `None` when it has no namespace or name.
    fn cluster_key(self, object: &DynamicObject) -> Option<Self::Key>;
    /// What is kept of a cluster object of this kind; `None` when nothing can be.
    fn cluster_object(self, object: &DynamicObject) -> Option<Self::Object>;
    /// Says that this kind is not served (no CRD) and what to install: once per outage.
    fn log_not_served(self);
    /// Reads the documents of these kinds in a policy file (skipping the others); `Err` names
    /// the first invalid one.
    fn parse_file(contents: &[u8]) -> Result<Objects<Self>, Self::FileError>;
}

/// Objects by key, so in the order they are sent in.
pub type Objects<K> = BTreeMap<<K as ObjectKind>::Key, <K as ObjectKind>::Object>;

/// `--policy-file`'s documents of the kinds `K`: the last valid ones, re-read every
/// [`sigil_kube_watch::POLL_INTERVAL`].
pub struct ObjectFile<K: ObjectKind>(PolledFile<Objects<K>>);

impl<K: ObjectKind> ObjectFile<K> {
    /// Reads and checks the file at start-up, where a missing or invalid file is an error.
    pub fn load(path: &Path) -> Result<ObjectFile<K>, K::FileError> {
        PolledFile::load(path, K::parse_file).map(ObjectFile)
    }

    pub(crate) fn objects(&self) -> &Objects<K> {
        self.0.value()
    }
}

impl<K: ObjectKind> fmt::Debug for ObjectFile<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectFile")
            .field("path", &self.0.path())
            .field("objects", &self.objects().len())
            .finish()
    }
}

/// One kind in the cluster, as its watch delivered it.
#[derive(Debug)]
pub(crate) struct ClusterKind<K: ObjectKind> {
    /// Whether the last list found the resource not served (its CRD not installed).
    pub(crate) missing: bool,
    /// Synced once the initial list has completed, or found the resource not served.
    pub(crate) listed: Listed<K::Key, K::Object>,
}

impl<K: ObjectKind> Default for ClusterKind<K> {
    fn default() -> Self {
        ClusterKind {
            missing: false,
            listed: Listed::default(),
        }
    }
}

impl<K: ObjectKind> ClusterKind<K> {
    /// Follows one watch event; returns whether the objects may have changed.
    pub(crate) fn on_event(&mut self, kind: K, event: WatchEvent<DynamicObject>) -> bool {
        let noun = K::NOUN;
        match event {
            Ok(event) => {
                let listing_done = matches!(event, Event::InitDone);
                let changed = self.listed.apply_event(
                    event,
                    |object| kind.cluster_key(object),
                    |object| kind.cluster_object(object),
                );
                if listing_done && changed {
                    if self.missing {
                        info!(%kind, "the {noun} resource is served now");
                    }
                    info!(%kind, objects = self.listed.items.len(), "cluster {noun} objects synced");
                    self.missing = false;
                }
                changed
            }
            // The resource is not served: nothing of this kind exists. The watcher retries the
            // list, which succeeds once the CRD is installed.
            Err(e) if not_served(&e) => {
                if !self.missing {
                    kind.log_not_served();
                }
                self.missing = true;
                self.listed.set_empty_and_synced()
            }
            Err(e) => {
                warn!(%kind, error = %e, "{noun} watch failed; retrying");
                false
            }
        }
    }
}

/// Whether a watch failed because its resource is not served (its CRD is not installed): its
/// list answered 404.
fn not_served(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == NOT_FOUND)
}

/// The watches of every kind in every namespace, each event tagged with its kind. The watchers
/// retry with backoff and re-list when they must.
pub fn cluster_events<K: ObjectKind>(
    client: kube::Client,
) -> Events<(K, WatchEvent<DynamicObject>)> {
    follow::tagged(K::ALL.iter().map(|&kind| {
        let api = Api::all_with(client.clone(), &kind.api_resource());
        (kind, follow::watch(api, watcher::Config::default()))
    }))
}

/// The objects of a feed's sources, as its task keeps them.
pub struct ObjectSource<K: ObjectKind> {
    /// `Some` when the Kubernetes source is on.
    pub(crate) cluster: Option<BTreeMap<K, ClusterKind<K>>>,
    file: Option<ObjectFile<K>>,
    /// Objects in both sources already logged, so a lasting overlap is logged once.
    logged_conflicts: BTreeSet<K::Key>,
    reload_failures: Counter,
}

impl<K: ObjectKind> ObjectSource<K> {
    /// The sources: the cluster's watches when `cluster` (their events go to
    /// [`ObjectSource::on_event`]), and the file; a file that fails to reload counts in
    /// `reload_failures`.
    pub fn new(cluster: bool, file: Option<ObjectFile<K>>, reload_failures: Counter) -> Self {
        ObjectSource {
            cluster: cluster.then(|| {
                (K::ALL.iter())
                    .map(|&kind| (kind, ClusterKind::default()))
                    .collect()
            }),
            file,
            logged_conflicts: BTreeSet::new(),
            reload_failures,
        }
    }

    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Whether every kind in the cluster has been listed (or found not served).
    pub fn synced(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|kinds| kinds.values().all(|kind| kind.listed.synced))
    }

    /// Follows one watch event of `kind`; returns whether the objects may have changed.
    pub fn on_event(&mut self, kind: K, event: WatchEvent<DynamicObject>) -> bool {
        let Some(state) = self.cluster.as_mut().and_then(|c| c.get_mut(&kind)) else {
            return false;
        };
        state.on_event(kind, event)
    }

    /// Re-reads the file; returns whether it has new valid contents.
    pub async fn poll_file(&mut self) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let reloaded = file.0.poll(K::parse_file).await;
        let path = file.0.path().display();
        let noun = K::NOUN;
        match reloaded {
            Ok(false) => false,
            Ok(true) => {
                info!(%path, objects = file.objects().len(), "the {noun} objects of the policy file reloaded");
                true
            }
            Err(e) => {
                self.reload_failures.inc();
                error!(%path, error = %e, "the {noun} objects of the policy file are unreadable or invalid; keeping the last good ones");
                false
            }
        }
    }

    /// Every source's objects: the file's, then the cluster's over them; logs the overlaps not
    /// logged yet.
    pub fn merged(&mut self) -> Objects<K> {
        let mut objects = (self.file.as_ref())
            .map(|file| file.objects().clone())
            .unwrap_or_default();
        let mut conflicts = BTreeSet::new();
        for (key, object) in (self.cluster.iter())
            .flat_map(|kinds| kinds.values())
            .flat_map(|kind| &kind.listed.items)
        {
            if objects.insert(key.clone(), object.clone()).is_some() {
                conflicts.insert(key.clone());
            }
        }
        for key in conflicts.difference(&self.logged_conflicts) {
            warn!(object = %key, "a {} object is both in the cluster and in --policy-file; using the cluster's", K::NOUN);
        }
        self.logged_conflicts = conflicts;
        objects
    }
}

#[cfg(test)]
pub(crate) mod tests;
