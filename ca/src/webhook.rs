//! The sidecar-injection webhook's front: `POST /inject` over HTTPS on `--webhook-addr` (the
//! serving certificate is issued by this CA, like the gRPC one), and the keeper of the
//! MutatingWebhookConfiguration's `caBundle`, rewritten whenever the trust bundle changes or
//! someone re-applies the manifest without it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
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
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::authority::SharedAuthority;
use crate::inject::{self, InjectConfig, Outcome};
use crate::metrics::{
    BodyRefusedLabels, BodyRefusedReason, InjectLabels, InjectOutcome, Metrics, Port,
};
use crate::tls_server::{self, ConnectionLimits};

pub const WEBHOOK_PATH: &str = "/inject";
/// The API server sends at most 3 MiB; anything larger is not an AdmissionReview it sent.
pub const MAX_REVIEW_BYTES: usize = 4 << 20;
/// A connection that sends no request head for this long is closed (the API server's own
/// webhook timeout is at most 30 s, and it sends at once).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most webhook connections open at once (the API servers keep a few each).
pub const MAX_CONNECTIONS: usize = 1024;
/// Of those, from one IP address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Request body bytes being read or answered at once, announced (Content-Length) or, for a body
/// without a length, [`MAX_REVIEW_BYTES`]: what bodies can make the webhook hold. A pod's review
/// is some 10 to 100 KiB.
pub const MAX_BODY_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Bodies over [`LARGE_BODY`] may take only this much of it, so that large bodies (which only
/// unusual pods have) cannot crowd out the API server's ordinary reviews.
pub const MAX_LARGE_BODY_BYTES_IN_FLIGHT: usize = 32 << 20;
pub const LARGE_BODY: usize = 1 << 20;
/// ...of which from one IP address (the API server's own reviews are small).
pub const MAX_BODY_BYTES_PER_SOURCE: usize = 8 << 20;
/// A body must have arrived this long after its request head (the API server's webhook timeout
/// defaults to 10 s, and it sends the body at once).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read buffer of a connection (request heads are small; hyper's default is ~400 KiB).
const MAX_READ_BUFFER: usize = 64 * 1024;
/// How soon a failed caBundle write is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct WebhookState {
    config: Arc<InjectConfig>,
    metrics: Arc<Metrics>,
    budget: Arc<BodyBudget>,
}

/// The address a request came from, set per connection by [`serve`].
#[derive(Clone, Copy, Debug)]
struct Source(IpAddr);

/// The request body bytes in flight, in all and per source address.
#[derive(Default)]
struct BodyBudget {
    in_flight: Mutex<InFlight>,
}

#[derive(Default)]
struct InFlight {
    total: usize,
    large: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Bytes of a body being read or answered; given back when dropped.
struct Reservation {
    budget: Arc<BodyBudget>,
    source: IpAddr,
    bytes: usize,
}

impl BodyBudget {
    fn reserve(
        self: &Arc<Self>,
        source: IpAddr,
        bytes: usize,
    ) -> Result<Reservation, BodyRefusedReason> {
        let mut in_flight = self.in_flight.lock().expect("never poisoned");
        let from_source = in_flight.per_source.get(&source).copied().unwrap_or(0);
        if from_source + bytes > MAX_BODY_BYTES_PER_SOURCE {
            return Err(BodyRefusedReason::PerSourceLimit);
        }
        let large = if bytes > LARGE_BODY { bytes } else { 0 };
        if in_flight.total + bytes > MAX_BODY_BYTES_IN_FLIGHT
            || in_flight.large + large > MAX_LARGE_BODY_BYTES_IN_FLIGHT
        {
            return Err(BodyRefusedReason::TotalLimit);
        }
        *in_flight.per_source.entry(source).or_default() += bytes;
        in_flight.total += bytes;
        in_flight.large += large;
        Ok(Reservation {
            budget: self.clone(),
            source,
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut in_flight = self.budget.in_flight.lock().expect("never poisoned");
        in_flight.total -= self.bytes;
        if self.bytes > LARGE_BODY {
            in_flight.large -= self.bytes;
        }
        if let Some(from_source) = in_flight.per_source.get_mut(&self.source) {
            *from_source -= self.bytes;
            if *from_source == 0 {
                in_flight.per_source.remove(&self.source);
            }
        }
    }
}

/// `POST /inject`, answering AdmissionReviews.
pub fn router(config: InjectConfig, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(inject_handler))
        .with_state(WebhookState {
            config: Arc::new(config),
            metrics,
            budget: Arc::default(),
        })
}

/// A refusal before or while reading a body; the connection is closed after it.
fn refuse_body(
    state: &WebhookState,
    status: StatusCode,
    reason: Option<BodyRefusedReason>,
) -> Response {
    if let Some(reason) = reason {
        state
            .metrics
            .webhook_bodies_refused
            .get_or_create(&BodyRefusedLabels { reason })
            .inc();
    }
    (status, [(header::CONNECTION, "close")]).into_response()
}

/// Reads the body within the budget and the time allowed, then answers the review.
async fn inject_handler(
    State(state): State<WebhookState>,
    Extension(Source(source)): Extension<Source>,
    request: Request,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|length| length > MAX_REVIEW_BYTES) {
        warn!(%source, length = announced, "AdmissionReview body larger than any the API server sends");
        return refuse_body(&state, StatusCode::PAYLOAD_TOO_LARGE, None);
    }
    let _reservation = match state
        .budget
        .reserve(source, announced.unwrap_or(MAX_REVIEW_BYTES))
    {
        Ok(reservation) => reservation,
        Err(reason) => {
            warn!(%source, reason = reason.as_str(), "too many AdmissionReview bytes in flight; refused before reading");
            let status = match reason {
                BodyRefusedReason::PerSourceLimit => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return refuse_body(&state, status, Some(reason));
        }
    };
    let reading = axum::body::to_bytes(request.into_body(), MAX_REVIEW_BYTES);
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, reading).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            warn!(%source, error = %e, "AdmissionReview body unreadable or too large");
            return refuse_body(&state, StatusCode::PAYLOAD_TOO_LARGE, None);
        }
        Err(_) => {
            warn!(%source, timeout = ?BODY_READ_TIMEOUT, "AdmissionReview body did not arrive in time");
            return refuse_body(
                &state,
                StatusCode::REQUEST_TIMEOUT,
                Some(BodyRefusedReason::ReadTimeout),
            );
        }
    };
    review_response(&state, &body).into_response()
}

fn review_response(state: &WebhookState, body: &Bytes) -> axum::Json<serde_json::Value> {
    let (review, outcome, pod) = inject::review(body, &state.config);
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
/// idle or trickling clients cannot hold the [`MAX_CONNECTIONS`] slots, nor one address more
/// than [`MAX_CONNECTIONS_PER_SOURCE`]), its body within [`BODY_READ_TIMEOUT`] and within the
/// bytes in flight allowed, and at shutdown finishes the request it is serving.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Option<Arc<ServerConfig>>>,
    app: Router,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limits = ConnectionLimits {
        port: Port::Webhook,
        // Nothing on this port authenticates: every connection stays in the other pool.
        authenticated: 0,
        unauthenticated: MAX_CONNECTIONS,
        per_source: MAX_CONNECTIONS_PER_SOURCE,
        authenticate_within: None,
    };
    let mut connections = tls_server::incoming(listener, tls, metrics, limits);
    loop {
        let connection = tokio::select! {
            next = connections.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(_)) => continue,
                None => return Ok(()),
            },
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let source = Source(connection.connect_info().remote.ip());
        let service =
            hyper_util::service::TowerToHyperService::new(app.clone().layer(Extension(source)));
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_READ_BUFFER)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_budget_bounds_each_source_large_bodies_and_the_total() {
        let budget = Arc::new(BodyBudget::default());
        let source = |last: u8| IpAddr::from([127, 0, 0, last]);
        let four = MAX_REVIEW_BYTES;
        // One source: two largest bodies, not a third.
        let first = budget.reserve(source(2), four).unwrap();
        let _second = budget.reserve(source(2), four).unwrap();
        assert_eq!(
            budget.reserve(source(2), 1).err(),
            Some(BodyRefusedReason::PerSourceLimit)
        );
        // Large bodies from other sources up to their 32 MiB share...
        let _others: Vec<_> = (3..9)
            .map(|last| budget.reserve(source(last), four).unwrap())
            .collect();
        assert_eq!(
            budget.reserve(source(9), four).err(),
            Some(BodyRefusedReason::TotalLimit)
        );
        // ...while ordinary reviews still fit.
        let small = budget.reserve(source(9), 64 * 1024).unwrap();
        // Bytes are given back when a body is done.
        drop(first);
        budget.reserve(source(2), four).unwrap();
        drop(small);
        assert_eq!(
            budget.in_flight.lock().unwrap().per_source.get(&source(9)),
            None
        );
    }
}
