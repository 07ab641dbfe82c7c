//! What the tests of both feeds' sources use ([`crate::policy_feed`], [`crate::routes`]), and the
//! merging both rely on.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::Status as ApiStatus;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::metrics::Metrics;

pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// The watcher's longest backoff (30 s) and then some: how long a CRD installed late may take
/// to be noticed.
pub(crate) const CRD_RETRY_WAIT: Duration = Duration::from_secs(40);

pub(crate) fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&mut Registry::default()))
}

/// The first state `rx` holds that is `what`, within `wait`.
pub(crate) async fn until<T>(
    rx: &watch::Receiver<Arc<T>>,
    wait: Duration,
    what: impl Fn(&T) -> bool,
) -> Arc<T> {
    tokio::time::timeout(wait, rx.clone().wait_for(|state| what(state)))
        .await
        .expect("the feed never reached the expected state")
        .expect("the feed's task stopped")
        .clone()
}

/// Replaces the file as operators should (and ConfigMap volumes do): whole, never seen
/// half-written by a poll.
pub(crate) fn replace(path: &Path, contents: impl AsRef<[u8]>) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// A watch whose initial list failed with this status.
pub(crate) fn failed_list(message: &str, reason: &str, code: u16) -> WatchEvent<DynamicObject> {
    let status = ApiStatus::failure(message, reason).with_code(code);
    Err(watcher::Error::InitialListFailed(kube::Error::Api(
        status.boxed(),
    )))
}

/// A watch whose resource is not served (no CRD).
pub(crate) fn not_found() -> WatchEvent<DynamicObject> {
    failed_list(
        "the server could not find the requested resource",
        "NotFound",
        404,
    )
}

/// A CRD for the test API server that serves `kind` with any schema, with a status.
pub(crate) fn crd(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": { "name": format!("{plural}.{group}") },
        "spec": {
            "group": group,
            "names": { "plural": plural, "kind": kind },
            "scope": "Namespaced",
            "versions": [{
                "name": version, "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "subresources": { "status": {} },
            }],
        },
    }))
    .unwrap()
}
