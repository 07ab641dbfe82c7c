//! # sigil-test-apiserver: a TEST DOUBLE of the Kubernetes API server
//!
//! No real Kubernetes API server can run where sigil's tests run, so its Kubernetes code paths are
//! tested against this in-memory stand-in. It speaks the real REST paths and JSON to the real
//! `kube` client, so code under test uses exactly the calls it makes in a cluster.
//!
//! **This is not a Kubernetes API server and must never be used as one.** It serves tests only.
//!
//! ## What it does
//! - A generic object store for any resource: `/api/v1/[namespaces/{ns}/]{plural}[/{name}]` and
//!   `/apis/{group}/{version}/...`. Built-in kinds (pods, secrets, configmaps, namespaces,
//!   serviceaccounts, nodes, apps/*, ...) are known; custom resources work once their
//!   `CustomResourceDefinition` is stored, and any other path works with the kind its objects say
//!   (or, with [`ServerOptions::serve_undefined_resources`] off, is 404 as in a real cluster).
//! - One global resourceVersion counter (like etcd); server-set `uid`, `creationTimestamp`,
//!   `generation`, `generateName`; 409 `AlreadyExists` / `Conflict` (stale resourceVersion, failed
//!   preconditions); 404 `NotFound`; 422 `Invalid` (names, labels); real `Status` bodies.
//! - list with `labelSelector`, `fieldSelector` (per-kind fields, e.g. `spec.nodeName`), `limit` /
//!   `continue` over a consistent snapshot, `resourceVersion` / `resourceVersionMatch`.
//! - watch: ADDED/MODIFIED/DELETED/BOOKMARK/ERROR lines from a bounded event history; selector
//!   transitions as ADDED/DELETED; 410 Gone (as an ERROR event) for a too-old resourceVersion;
//!   `timeoutSeconds`, `allowWatchBookmarks`, streaming lists (`sendInitialEvents`).
//! - PUT, merge patch, JSON patch, server-side apply (as create-or-merge), DELETE with
//!   preconditions and finalizers, deletecollection, the `/status` subresource, `dryRun=All`,
//!   metadata-only (`PartialObjectMetadata`) responses.
//! - TokenReview with real service-account JWT validation (RS256 and ES256 keys, JWKS and OIDC
//!   discovery), tokens issued by [`TestApiServer::issue_token`] shaped like projected pod-bound
//!   tokens, bound-object checks (service account, pod, node).
//! - A log of every request ([`TestApiServer::requests`]): who asked (the bearer token) and what,
//!   resolved as the API server's authorizer sees it (verb, group, resource, subresource,
//!   namespace, name), so tests can check the project's RBAC rules against what its code does.
//! - [`parse_manifest`]: a YAML manifest as the JSON objects kubectl would send, so tests can
//!   create the project's real manifests (its CRDs) through the `kube` client.
//!
//! ## What it does not do
//! - No authentication or authorization of its own REST API (every request is served), no RBAC,
//!   no admission (no defaulting or mutation beyond metadata, secrets' `stringData`, and pods'
//!   initial `Pending` phase), plain HTTP rather than HTTPS.
//! - No controllers: no garbage collection or cascading deletion, no namespace lifecycle
//!   (namespaces need not exist and are deleted at once), no kubelet (pods are deleted
//!   immediately and their phase changes only through [`TestApiServer::set_pod_phase`] or
//!   `/status` writes), no scheduling.
//! - No strategic merge patch (415), no managed fields or apply conflicts, no version conversion
//!   (an object is returned under whatever version the request path names), no protobuf, no CEL
//!   or OpenAPI schema validation.

#![forbid(unsafe_code)]

mod discovery;
mod jwt;
mod keys;
mod manifest;
mod request_log;
mod resources;
mod rest;
mod selector;
mod status;
mod store;
#[cfg(test)]
mod test_support;
mod tokenreview;
mod validation;
mod watch;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};

pub use jwt::{TokenAlg, TokenSigning, TokenSpec};
pub use manifest::{ManifestError, parse_manifest};
pub use request_log::{RequestRecord, ResourceAttributes};

use crate::{
    jwt::{ObjectRef, unix_now},
    rest::App,
    status::GroupResource,
    store::{ObjectKey, Preconditions, Store, WriteOptions, WriteTarget, meta_str},
};

/// The service-account token issuer, as in a default cluster.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long `shutdown` waits for open connections before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Tunables of a test server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Change events kept for watches and paginated lists; older resourceVersions get 410 Gone.
    pub history_limit: usize,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK (the API server: 1 minute).
    pub bookmark_interval: Duration,
    /// Whether resources that are neither built in nor defined by a stored
    /// `CustomResourceDefinition` are served, stored generically (the default, so tests need not
    /// define every resource they use). `false` answers them 404 `NotFound`, as an API server
    /// does for a custom resource whose CRD is not installed.
    pub serve_undefined_resources: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(60),
            serve_undefined_resources: true,
        }
    }
}

/// A pod for [`TestApiServer::add_pod`], as the scheduler and kubelet would have left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// `spec.nodeName`; empty for an unscheduled pod.
    pub node: String,
    /// `status.phase`, e.g. "Running".
    pub phase: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIP` (and `podIPs`), which the kubelet writes once the pod's sandbox has an
    /// address; `None` before.
    pub ip: Option<IpAddr>,
}

impl PodSpec {
    /// A running pod without labels.
    pub fn new(namespace: &str, name: &str, service_account: &str, node: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            node: node.into(),
            phase: "Running".into(),
            labels: BTreeMap::new(),
            ip: None,
        }
    }

    /// The same pod with the label `key: value` added.
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The same pod with `status.podIP` set.
    pub fn with_ip(self, ip: impl Into<IpAddr>) -> Self {
        Self {
            ip: Some(ip.into()),
            ..self
        }
    }
}

struct Inner {
    app: Arc<App>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    /// Asks the server to stop and ends every watch stream; returns the server task if not yet taken.
    fn stop(&self) -> Option<JoinHandle<()>> {
        if let Some(signal) = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = signal.send(());
        }
        self.app.store.end_watches();
        self.task.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Graceful shutdown finishes on its own; nobody is left to wait for it.
        drop(self.stop());
    }
}

/// A running test API server. Clones share one server, which stops when the last clone is
/// dropped or on [`TestApiServer::shutdown`].
#[derive(Clone)]
pub struct TestApiServer {
    inner: Arc<Inner>,
}

fn core(resource: &str) -> GroupResource {
    GroupResource::new("", resource)
}

impl TestApiServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port, plain HTTP.
    ///
    /// # Panics
    /// If it cannot bind, or `openssl` is missing (it generates the RSA signing key).
    pub async fn start() -> TestApiServer {
        Self::start_with(ServerOptions::default()).await
    }

    /// [`TestApiServer::start`] with non-default options.
    pub async fn start_with(options: ServerOptions) -> TestApiServer {
        // Key generation runs openssl; keep it off the async workers.
        tokio::task::spawn_blocking(keys::server_keys)
            .await
            .expect("generating the service-account signing keys");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test API server to 127.0.0.1");
        let address = listener.local_addr().expect("bound socket has an address");
        let app = Arc::new(App {
            store: Store::new(options.history_limit),
            url: format!("http://{address}"),
            issuer: ISSUER.to_string(),
            token_reviews: AtomicU64::new(0),
            bookmark_interval: options.bookmark_interval,
            serve_undefined_resources: options.serve_undefined_resources,
            requests: request_log::RequestLog::default(),
        });
        let (signal, stopped) = oneshot::channel::<()>();
        let router = rest::router(app.clone());
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(err) = served {
                tracing::warn!(%err, "test API server stopped with an error");
            }
        });
        tracing::debug!(url = %app.url, "test API server (test double) listening");
        TestApiServer {
            inner: Arc::new(Inner {
                app,
                shutdown: Mutex::new(Some(signal)),
                task: Mutex::new(Some(task)),
            }),
        }
    }

    fn app(&self) -> &App {
        &self.inner.app
    }

    fn store(&self) -> &Store {
        &self.inner.app.store
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.app().url.clone()
    }

    /// A real `kube` client for this server, default namespace "default".
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("the server URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url))
            .expect("building a kube client for the test API server")
    }

    /// Writes a kubeconfig pointing at this server (context namespace "default"), for
    /// subprocesses that use `KUBECONFIG` / `kube::Client::try_default()`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let kubeconfig = format!(
            "# Points at sigil-test-apiserver, a TEST DOUBLE of the Kubernetes API server.\n\
             apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: sigil-test\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: sigil-test\n  user: {{}}\n\
             contexts:\n\
             - name: sigil-test\n  context:\n    cluster: sigil-test\n    user: sigil-test\n    namespace: default\n\
             current-context: sigil-test\n",
            url = self.url()
        );
        std::fs::write(path, kubeconfig)
    }

    /// The service-account issuer, `https://kubernetes.default.svc.cluster.local`.
    pub fn issuer(&self) -> &str {
        &self.app().issuer
    }

    /// The public signing keys as a JWKS document (what `GET /openid/v1/jwks` serves).
    pub fn jwks_json(&self) -> String {
        keys::server_keys().jwks().to_string()
    }

    /// Returns the stored object, creating it first (as a cluster would already have it).
    fn ensure(&self, resource: &str, key: ObjectKey, template: Value) -> Value {
        let info = self.store().resolve(&core(resource));
        self.store()
            .ensure(&info, &key, template)
            .unwrap_or_else(|err| panic!("test API server cannot create {resource} {key:?}: {err}"))
    }

    fn ensure_service_account(&self, namespace: &str, name: &str) -> Value {
        self.ensure(
            "serviceaccounts",
            (namespace.into(), name.into()),
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": name } }),
        )
    }

    fn ensure_node(&self, name: &str) -> Value {
        self.ensure(
            "nodes",
            (String::new(), name.into()),
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name },
                    "status": { "conditions": [ { "type": "Ready", "status": "True" } ] } }),
        )
    }

    /// Issues a signed service-account JWT, as the TokenRequest API would. Like TokenRequest, it
    /// is for an existing service account (created here if absent) and takes the service
    /// account's uid, and the node's uid when `spec.node` leaves it empty, from the store.
    pub fn issue_token(&self, spec: &TokenSpec) -> String {
        let service_account = self.ensure_service_account(&spec.namespace, &spec.service_account);
        let node = spec.node.as_ref().map(|(name, uid)| ObjectRef {
            name: name.clone(),
            uid: if uid.is_empty() {
                meta_str(&self.ensure_node(name), "uid").to_string()
            } else {
                uid.clone()
            },
        });
        jwt::issue(
            spec,
            self.issuer(),
            meta_str(&service_account, "uid"),
            node,
            unix_now(),
        )
    }

    /// Creates a pod through the store (new resourceVersion, ADDED event) with the given status
    /// phase, creating its service account and node if absent.
    ///
    /// # Panics
    /// If the pod already exists or a name is invalid.
    pub fn add_pod(&self, pod: &PodSpec) -> Pod {
        self.ensure_service_account(&pod.namespace, &pod.service_account);
        let mut spec = json!({
            "serviceAccountName": pod.service_account,
            "containers": [ { "name": "app", "image": "registry.k8s.io/pause:3.10" } ],
        });
        if !pod.node.is_empty() {
            self.ensure_node(&pod.node);
            spec["nodeName"] = json!(pod.node);
        }
        let mut status = json!({ "phase": pod.phase });
        if let Some(ip) = pod.ip {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{ "ip": ip.to_string() }]);
        }
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": pod.name, "labels": pod.labels },
            "spec": spec,
            "status": status,
        });
        let info = self.store().resolve(&core("pods"));
        let created = self
            .store()
            .create(
                &info,
                &pod.namespace,
                object,
                WriteOptions {
                    keep_status: true,
                    ..WriteOptions::default()
                },
            )
            .unwrap_or_else(|err| panic!("add_pod {}/{}: {err}", pod.namespace, pod.name));
        serde_json::from_value(created).expect("stored pods deserialize as Pod")
    }

    /// Sets `status.phase` of a pod (MODIFIED event), as its kubelet would.
    ///
    /// # Panics
    /// If the pod does not exist.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) {
        let info = self.store().resolve(&core("pods"));
        self.store()
            .update_with(
                &info,
                &(namespace.into(), name.into()),
                WriteTarget::Status,
                WriteOptions::default(),
                |current| {
                    let mut next = current.clone();
                    next["status"]["phase"] = json!(phase);
                    Ok(next)
                },
            )
            .unwrap_or_else(|err| panic!("set_pod_phase {namespace}/{name}: {err}"));
    }

    /// Deletes a pod (DELETED event), as the kubelet does once it has stopped.
    ///
    /// # Panics
    /// If the pod does not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let info = self.store().resolve(&core("pods"));
        self.store()
            .delete(
                &info,
                &(namespace.into(), name.into()),
                &Preconditions::default(),
                false,
            )
            .unwrap_or_else(|err| panic!("delete_pod {namespace}/{name}: {err}"));
    }

    /// How many TokenReview POSTs have arrived.
    pub fn token_reviews_served(&self) -> u64 {
        self.app().token_reviews.load(Ordering::SeqCst)
    }

    /// Every request served so far, in order, with the attributes the API server's authorizer
    /// would check (see [`RequestRecord`]); tests give each client its own bearer token in its
    /// kubeconfig to tell them apart.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.app().requests.snapshot()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.app().requests.clear();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().revision()
    }

    /// Forgets the event history (like etcd compaction) and ends every open watch (like an API
    /// server restart): watchers re-watch from their last resourceVersion, get 410 Gone if that
    /// is older than now, and re-list.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Stops the server: ends watches, lets in-flight requests finish (up to 5 s), then closes.
    pub async fn shutdown(self) {
        if let Some(mut task) = self.inner.stop()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::{Api, api::PostParams};

    #[tokio::test]
    async fn client_and_kubeconfig_reach_the_server() {
        let server = TestApiServer::start().await;
        let configmaps: Api<ConfigMap> = Api::default_namespaced(server.client());
        let cm: ConfigMap =
            serde_json::from_value(json!({ "metadata": { "name": "c" }, "data": { "k": "v" } }))
                .unwrap();
        let created = configmaps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
        assert_eq!(created.metadata.namespace.as_deref(), Some("default"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        server.write_kubeconfig(&path).unwrap();
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        assert_eq!(config.default_namespace, "default");
        let via_file: Api<ConfigMap> =
            Api::default_namespaced(kube::Client::try_from(config).unwrap());
        assert_eq!(via_file.get("c").await.unwrap().data, created.data);
    }

    #[tokio::test]
    async fn add_pod_creates_its_service_account_and_node() {
        let server = TestApiServer::start().await;
        let mut spec = PodSpec::new("prod", "web-0", "web", "node-a");
        spec.labels.insert("app".into(), "web".into());
        let pod = server.add_pod(&spec);
        assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
        assert_eq!(pod.metadata.labels.unwrap()["app"], "web");
        let client = server.client();
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), "prod");
        assert!(sas.get("web").await.is_ok());
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
        assert!(nodes.get("node-a").await.is_ok());
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let server = TestApiServer::start().await;
        let secrets: Api<Secret> = Api::default_namespaced(server.client());
        assert!(secrets.list(&Default::default()).await.is_ok());
        server.clone().shutdown().await;
        assert!(secrets.list(&Default::default()).await.is_err());
    }
}
