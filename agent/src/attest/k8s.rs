//! The Kubernetes attestor: caller's PID → its cgroup → pod UID → the pod, from a watch of the
//! pods scheduled to this node → `spiffe://<td>/ns/<namespace>/sa/<service account>`.
//!
//! Pods are looked up by UID, which the cgroup path carries and which a deleted-and-recreated
//! pod of the same name does not share. A pod the watch has not delivered yet (it was just
//! created, or the agent just started) is waited for briefly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_kube_watch::{Index, follow, index};
use tokio::sync::watch;
use tracing::Instrument;

use super::cgroup::{ContainerRef, parse_cgroup};
use super::procfs::{Process, Procfs};
use super::{AttestError, Caller, PodRef, Workload};

/// How long attestation waits for the pod watch to deliver a pod it does not know yet.
pub const POD_WAIT: Duration = Duration::from_secs(2);

/// What attestation needs to know of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub phase: Option<String>,
    /// `metadata.labels`, which policy selectors match.
    pub labels: BTreeMap<String, String>,
}

impl NodePod {
    /// Pending and Running pods hold identities; Succeeded and Failed ones no longer do.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// The pods scheduled to this node, by UID, as kept by [`watch_node_pods`].
#[derive(Clone, Debug, Default)]
pub struct NodePods {
    /// Whether the initial list has completed.
    pub synced: bool,
    pods: HashMap<String, NodePod>,
}

impl NodePods {
    pub fn get(&self, uid: &str) -> Option<&NodePod> {
        self.pods.get(uid)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// `(namespace, service account)` of every live pod: the identities this node will be asked for.
    pub fn service_accounts(&self) -> BTreeSet<(String, String)> {
        self.pods
            .values()
            .filter(|pod| pod.is_live())
            .map(|pod| (pod.namespace.clone(), pod.service_account.clone()))
            .collect()
    }

    pub fn apply(&mut self, pod: &Pod) {
        let meta = &pod.metadata;
        let (Some(uid), Some(namespace), Some(name)) = (&meta.uid, &meta.namespace, &meta.name)
        else {
            return;
        };
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".to_string());
        self.pods.insert(
            uid.clone(),
            NodePod {
                namespace: namespace.clone(),
                name: name.clone(),
                service_account,
                phase: pod.status.as_ref().and_then(|status| status.phase.clone()),
                labels: meta.labels.clone().unwrap_or_default(),
            },
        );
    }

    pub fn delete(&mut self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.pods.remove(uid);
        }
    }
}

/// The node pod watch's events change the pods in place.
impl Index<Pod> for NodePods {
    fn apply(&mut self, pod: &Pod) {
        NodePods::apply(self, pod);
    }

    fn delete(&mut self, pod: &Pod) {
        NodePods::delete(self, pod);
    }

    fn set_synced(&mut self) {
        self.synced = true;
    }

    fn count(&self) -> usize {
        NodePods::len(self)
    }
}

/// Watches the pods with `spec.nodeName=<node_name>` and keeps `tx` current. It does not return:
/// the watcher retries with backoff and re-lists when it must; a re-list is built aside and
/// swapped in whole, so lookups never see a half-listed node.
pub async fn watch_node_pods(client: kube::Client, node_name: String, tx: watch::Sender<NodePods>) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    index::keep("node pods", follow::watch(api, config), tx)
        .instrument(tracing::info_span!("node_pods", node = %node_name))
        .await;
}

#[derive(Clone, Debug)]
pub struct KubernetesAttestor {
    procfs: Procfs,
    trust_domain: TrustDomain,
    pods: watch::Receiver<NodePods>,
}

/// The caller's process and the pod its cgroup names, before the pod is looked up.
#[derive(Debug)]
struct Observed {
    process: Process,
    container: ContainerRef,
}

impl KubernetesAttestor {
    pub fn new(procfs: Procfs, trust_domain: TrustDomain, pods: watch::Receiver<NodePods>) -> Self {
        KubernetesAttestor {
            procfs,
            trust_domain,
            pods,
        }
    }

    pub async fn attest(&self, caller: &Caller) -> Result<Workload, AttestError> {
        let observed = self.observe(caller)?;
        let workload = self.identify(&observed.container).await?;
        // The pod lookup may have waited: the PID must still be the process whose cgroup was read.
        self.procfs.confirm(&observed.process)?;
        Ok(workload)
    }

    fn observe(&self, caller: &Caller) -> Result<Observed, AttestError> {
        let process = self.procfs.observe(caller)?;
        let container = parse_cgroup(&self.procfs.cgroup(caller.pid)?)
            .ok_or(AttestError::NoPodUid { pid: caller.pid })?;
        Ok(Observed { process, container })
    }

    async fn identify(&self, container: &ContainerRef) -> Result<Workload, AttestError> {
        let uid = &container.pod_uid;
        let pod = self.find_pod(uid).await?;
        if !pod.is_live() {
            return Err(AttestError::PodFinished {
                namespace: pod.namespace,
                name: pod.name,
                phase: pod.phase.unwrap_or_default(),
            });
        }
        let id = SpiffeId::for_service_account(
            &self.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )?;
        Ok(Workload {
            id,
            pod: Some(PodRef {
                namespace: pod.namespace,
                name: pod.name,
                uid: uid.clone(),
            }),
            labels: pod.labels,
        })
    }

    /// The pod with this UID, waiting up to [`POD_WAIT`] for the watch to deliver it.
    async fn find_pod(&self, uid: &str) -> Result<NodePod, AttestError> {
        let mut pods = self.pods.clone();
        let deadline = tokio::time::Instant::now() + POD_WAIT;
        loop {
            let synced = {
                let current = pods.borrow_and_update();
                if let Some(pod) = current.get(uid) {
                    return Ok(pod.clone());
                }
                current.synced
            };
            match tokio::time::timeout_at(deadline, pods.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(AttestError::PodWatchClosed { uid: uid.into() }),
                Err(_) if synced => return Err(AttestError::PodNotFound { uid: uid.into() }),
                Err(_) => return Err(AttestError::PodsNotSynced { uid: uid.into() }),
            }
        }
    }
}

#[cfg(test)]
mod tests;
