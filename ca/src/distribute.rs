//! Publishes the trust bundle as ConfigMap `sigil-ca-root` (key `root-cert.pem`) in every
//! namespace, so workloads and tools that cannot use the agent can still find the roots. New
//! namespaces get it when they appear; every namespace gets each new bundle.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::authority::SharedAuthority;

pub const CONFIGMAP_NAME: &str = "sigil-ca-root";
pub const CONFIGMAP_KEY: &str = "root-cert.pem";
/// The field manager of everything the CA applies (ConfigMaps here, policy status conditions).
pub const FIELD_MANAGER: &str = "sigil-ca";
/// How often failed publishes are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// Runs until the authority channel closes. Namespaces whose publish failed are retried every
/// `RETRY_INTERVAL` until it succeeds.
pub async fn run(client: kube::Client, mut authority: watch::Receiver<SharedAuthority>) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher::watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut pem = String::new();
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(Event::Apply(ns) | Event::InitApply(ns)) => {
                        if let Some(name) = ns.metadata.name && known.insert(name.clone()) {
                            pending.insert(name);
                        }
                    }
                    Ok(Event::Delete(ns)) => {
                        if let Some(name) = ns.metadata.name {
                            known.remove(&name);
                            pending.remove(&name);
                        }
                    }
                    Ok(Event::Init | Event::InitDone) => {}
                    Err(e) => warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
            changed = authority.changed() => {
                if changed.is_err() { return }
            }
            _ = retry.tick() => {}
        }
        let current = authority.borrow_and_update().roots_pem().concat();
        if current != pem && !current.is_empty() {
            pem = current;
            info!(
                namespaces = known.len(),
                "publishing the trust bundle to ConfigMaps"
            );
            pending.extend(known.iter().cloned());
        }
        if pem.is_empty() {
            continue;
        }
        let mut failed = BTreeSet::new();
        for ns in std::mem::take(&mut pending) {
            if !publish(&client, &ns, &pem).await {
                failed.insert(ns);
            }
        }
        pending = failed;
    }
}

/// Server-side apply: creates or updates, and two replicas writing the same content agree.
/// Returns whether it succeeded.
async fn publish(client: &kube::Client, namespace: &str, pem: &str) -> bool {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "sigil".to_string())].into()),
            ..Default::default()
        },
        data: Some([(CONFIGMAP_KEY.to_string(), pem.to_string())].into()),
        ..Default::default()
    };
    let mut cm_json = serde_json::to_value(&cm).expect("ConfigMap serializes");
    cm_json["apiVersion"] = "v1".into();
    cm_json["kind"] = "ConfigMap".into();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch(CONFIGMAP_NAME, &params, &Patch::Apply(cm_json))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            warn!(namespace, error = %e, "could not publish the trust bundle ConfigMap; will retry");
            false
        }
    }
}
