//! The sidecar-injection webhook's front: `POST /inject` over HTTPS on `--webhook-addr` (the
//! serving certificate is issued by this CA, like the gRPC one), and the keeper of the
//! MutatingWebhookConfiguration's `caBundle`, rewritten whenever the trust bundle changes or
//! someone re-applies the manifest without it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use base64::Engine;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::authority::SharedAuthority;
use crate::inject::{self, InjectConfig, Outcome};
use crate::metrics::{InjectLabels, InjectOutcome, Metrics};
use crate::tls_server;

pub const WEBHOOK_PATH: &str = "/inject";
/// The API server sends at most 3 MiB; anything larger is not an AdmissionReview it sent.
pub const MAX_REVIEW_BYTES: usize = 4 << 20;
/// A connection that sends no request head for this long is closed (the API server's own
/// webhook timeout is at most 30 s, and it sends at once).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most webhook connections open at once (the API servers keep a few each).
pub const MAX_CONNECTIONS: usize = 1024;
/// How soon a failed caBundle write is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct WebhookState {
    config: Arc<InjectConfig>,
    metrics: Arc<Metrics>,
}

/// `POST /inject`, answering AdmissionReviews.
pub fn router(config: InjectConfig, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(inject_handler))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(WebhookState {
            config: Arc::new(config),
            metrics,
        })
}

async fn inject_handler(
    State(state): State<WebhookState>,
    body: Bytes,
) -> axum::Json<serde_json::Value> {
    let (review, outcome, pod) = inject::review(&body, &state.config);
    let (label, reason) = match &outcome {
        Outcome::Injected => (InjectOutcome::Injected, None),
        Outcome::Skipped(why) => (InjectOutcome::Skipped, Some(*why)),
        Outcome::Denied(_) => (InjectOutcome::Denied, None),
        Outcome::Malformed(_) => (InjectOutcome::Malformed, None),
    };
    state
        .metrics
        .injections
        .get_or_create(&InjectLabels {
            outcome: label,
            reason,
        })
        .inc();
    match &outcome {
        Outcome::Injected => info!(namespace = %pod.namespace, pod = %pod.name, "sidecar injected"),
        Outcome::Skipped(why) => info!(
            namespace = %pod.namespace, pod = %pod.name, reason = why.as_str(),
            "pod admitted without injection"
        ),
        Outcome::Denied(why) => warn!(
            namespace = %pod.namespace, pod = %pod.name, reason = %why,
            "pod refused by the injector"
        ),
        Outcome::Malformed(why) => warn!(reason = %why, "malformed AdmissionReview"),
    }
    axum::Json(review)
}

/// Serves `app` over TLS with the configs on `tls` until `shutdown` flips. Every connection must
/// send a request head within [`HEADER_READ_TIMEOUT`] of connecting or of its last answer (so
/// idle or trickling clients cannot hold the [`MAX_CONNECTIONS`] slots), and at shutdown finishes
/// the request it is serving.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Option<Arc<ServerConfig>>>,
    app: Router,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut connections = tls_server::incoming(listener, tls, metrics, MAX_CONNECTIONS);
    loop {
        let connection = tokio::select! {
            next = connections.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(_)) => continue,
                None => return Ok(()),
            },
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(connection), service);
            tokio::pin!(serving);
            let stopping = async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                _ = serving.as_mut() => {}
                () = stopping => {
                    serving.as_mut().graceful_shutdown();
                    let _ = serving.await;
                }
            }
        });
    }
}

/// Keeps `caBundle` of every webhook in the MutatingWebhookConfiguration `name` equal to the
/// trust bundle. Watches just that object (a `metadata.name` field selector, so RBAC can name
/// it), and runs until the authority channel closes.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    mut authority: watch::Receiver<SharedAuthority>,
    metrics: Arc<Metrics>,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let selector = format!("metadata.name={name}");
    let mut events = watcher::watcher(api.clone(), watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut current: Option<MutatingWebhookConfiguration> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(Event::Apply(object) | Event::InitApply(object))) => current = Some(object),
                Some(Ok(Event::Delete(_))) => current = None,
                // A re-list starts: only what it lists still exists.
                Some(Ok(Event::Init)) => current = None,
                Some(Ok(Event::InitDone)) => {}
                Some(Err(e)) => warn!(webhook_config = %name, error = %e, "MutatingWebhookConfiguration watch failed; retrying"),
            },
            changed = authority.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
        retry_at = None;
        let Some(object) = &current else { continue };
        let bundle = authority.borrow_and_update().roots_pem().concat();
        let Some(patch) = ca_bundle_patch(object, bundle.as_bytes()) else {
            continue;
        };
        match api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(updated) => {
                metrics.webhook_ca_bundle_writes.inc();
                info!(webhook_config = %name, "webhook caBundle set to the current trust bundle");
                current = Some(updated);
            }
            Err(e) => {
                metrics.webhook_ca_bundle_write_failures.inc();
                warn!(webhook_config = %name, error = %e, "could not update the webhook caBundle; retrying");
                retry_at = Some(tokio::time::Instant::now() + RETRY_INTERVAL);
            }
        }
    }
}

/// The JSON patch that sets every webhook's caBundle to `bundle`, or `None` when all already
/// carry it (or there is no bundle yet). Each write is guarded by a test of the webhook's name,
/// so a concurrent reordering of the list fails the patch instead of writing the wrong entry.
pub fn ca_bundle_patch(
    object: &MutatingWebhookConfiguration,
    bundle: &[u8],
) -> Option<json_patch::Patch> {
    if bundle.is_empty() {
        return None;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    let mut ops = Vec::new();
    for (index, webhook) in object.webhooks.iter().flatten().enumerate() {
        let current = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice());
        if current == Some(bundle) {
            continue;
        }
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": encoded}));
    }
    if ops.is_empty() {
        return None;
    }
    Some(serde_json::from_value(serde_json::Value::Array(ops)).expect("valid JSON patch ops"))
}
