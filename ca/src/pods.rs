//! An index of the cluster's pods by node and service account, kept by one watcher task and read
//! through a `watch` channel. Node-agent impersonation asks it "is a live pod with this service
//! account on this node?"; token checks ask it "does this pod still exist with this UID?".

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use sigil_kube_watch::{Index, follow, index};
use tokio::sync::watch;

/// What the CA needs to know of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub uid: String,
    pub node: Option<String>,
    pub service_account: String,
    pub phase: Option<String>,
}

impl PodEntry {
    /// Pending and Running pods hold identities; Succeeded and Failed ones no longer do (Istio's rule).
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

type PodKey = (String, String); // namespace, name
type NodeSaKey = (String, String, String); // node, namespace, service account

/// How long a check waits for the index to catch up with a pod it does not know yet (the CA's
/// watch can lag behind the pod's token or the node agent's own watch by a moment).
pub const INDEX_GRACE: Duration = Duration::from_secs(2);

#[derive(Default, Debug)]
pub struct PodIndex {
    /// Whether the initial list has completed (the CA is not ready before).
    pub synced: bool,
    pods: HashMap<PodKey, PodEntry>,
    by_node_sa: HashMap<NodeSaKey, HashSet<PodKey>>,
}

impl PodIndex {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodEntry> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    /// Whether a live pod running as `namespace/service_account` is scheduled on `node`.
    pub fn has_live_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let key = (
            node.to_string(),
            namespace.to_string(),
            service_account.to_string(),
        );
        self.by_node_sa.get(&key).is_some_and(|pods| {
            pods.iter()
                .any(|p| self.pods.get(p).is_some_and(PodEntry::is_live))
        })
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn apply(&mut self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        self.remove(&key);
        let entry = PodEntry {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_string()),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        };
        if let Some(node) = &entry.node {
            self.by_node_sa
                .entry((node.clone(), key.0.clone(), entry.service_account.clone()))
                .or_default()
                .insert(key.clone());
        }
        self.pods.insert(key, entry);
    }

    pub fn delete(&mut self, pod: &Pod) {
        if let Some(key) = pod_key(pod) {
            self.remove(&key);
        }
    }

    fn remove(&mut self, key: &PodKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if let Some(node) = old.node {
            let index_key = (node, key.0.clone(), old.service_account);
            if let Some(set) = self.by_node_sa.get_mut(&index_key) {
                set.remove(key);
                if set.is_empty() {
                    self.by_node_sa.remove(&index_key);
                }
            }
        }
    }
}

/// The pod watch's events change the index in place.
impl Index<Pod> for PodIndex {
    fn apply(&mut self, pod: &Pod) {
        PodIndex::apply(self, pod);
    }

    fn delete(&mut self, pod: &Pod) {
        PodIndex::delete(self, pod);
    }

    fn set_synced(&mut self) {
        self.synced = true;
    }

    fn count(&self) -> usize {
        PodIndex::len(self)
    }
}

/// Runs `check` against the index until it passes or `grace` has gone by, re-checking on every
/// index change; returns the last outcome.
pub async fn wait_for<T, E>(
    index: &watch::Receiver<PodIndex>,
    grace: Duration,
    check: impl Fn(&PodIndex) -> Result<T, E>,
) -> Result<T, E> {
    let mut index = index.clone();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let outcome = check(&index.borrow_and_update());
        if outcome.is_ok() {
            return outcome;
        }
        match tokio::time::timeout_at(deadline, index.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return outcome,
        }
    }
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

/// Watches every pod and keeps `tx`'s index current until the stream ends (it does not; the
/// watcher retries with backoff and re-lists when needed).
pub async fn run(client: kube::Client, tx: watch::Sender<PodIndex>) {
    let api: Api<Pod> = Api::all(client);
    let events = follow::watch(api, watcher::Config::default());
    index::keep("pod index", events, tx).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_test_apiserver::{PodSpec, TestApiServer};

    fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> PodSpec {
        PodSpec {
            phase: phase.into(),
            ..PodSpec::new(ns, name, sa, node)
        }
    }

    async fn until(rx: &mut watch::Receiver<PodIndex>, what: impl Fn(&PodIndex) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|i| what(i)))
            .await
            .expect("index never reached the expected state")
            .unwrap();
    }

    #[tokio::test]
    async fn index_follows_pods_across_nodes_and_phases() {
        let server = TestApiServer::start().await;
        server.add_pod(&pod("demo", "web-1", "web", "node-a", "Running"));
        let (tx, mut rx) = watch::channel(PodIndex::default());
        tokio::spawn(run(server.client(), tx));
        until(&mut rx, |i| i.synced).await;
        assert!(rx.borrow().has_live_pod("node-a", "demo", "web"));
        assert!(!rx.borrow().has_live_pod("node-b", "demo", "web"));

        // A check waiting for a pod the index does not know yet passes once it appears.
        let waiting = tokio::spawn({
            let rx = rx.clone();
            async move {
                wait_for(&rx, Duration::from_secs(5), |i| {
                    i.has_live_pod("node-b", "demo", "db")
                        .then_some(())
                        .ok_or(())
                })
                .await
            }
        });
        server.add_pod(&pod("demo", "db-1", "db", "node-b", "Pending"));
        assert_eq!(waiting.await.unwrap(), Ok(()));
        until(&mut rx, |i| i.has_live_pod("node-b", "demo", "db")).await;
        assert!(!rx.borrow().has_live_pod("node-b", "demo", "nobody"));

        server.set_pod_phase("demo", "web-1", "Succeeded");
        until(&mut rx, |i| !i.has_live_pod("node-a", "demo", "web")).await;

        server.delete_pod("demo", "db-1");
        until(&mut rx, |i| i.get("demo", "db-1").is_none()).await;
        assert!(!rx.borrow().has_live_pod("node-b", "demo", "db"));

        // A check that never passes gives up after its grace period with the last outcome.
        let outcome: Result<(), &str> =
            wait_for(&rx, Duration::from_millis(100), |_| Err("absent")).await;
        assert_eq!(outcome, Err("absent"));
    }
}
