//! The sidecar-injection webhook's front: `POST /inject` over HTTPS on `--webhook-addr` (the
//! serving certificate is issued by this CA, like the gRPC one), and the keeper of the
//! MutatingWebhookConfiguration's `caBundle`, written whenever it misses a root of the trust
//! bundle (a rotation, someone re-applying the manifest without it) and cleared of retired roots
//! once every replica has caught up.

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
use rustls_pki_types::CertificateDer;
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
use sigil_identity::bundle::certificate_to_pem;

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
/// How long a caBundle keeps roots this replica no longer has before it removes them: well past
/// the interval at which replicas reload the key material (5 s by default), so a replica with
/// the older view, still presenting a certificate from such a root, is not cut off, and
/// replicas whose views differ do not overwrite each other.
pub const SHRINK_AFTER: Duration = Duration::from_secs(30);

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

/// Keeps `caBundle` of every webhook in the MutatingWebhookConfiguration `name` trusting this
/// replica's roots. Watches just that object (a `metadata.name` field selector, so RBAC can name
/// it), and runs until the authority channel closes.
///
/// Several replicas keep the same object, and during a root rotation their views differ for up
/// to the reload interval. So a root missing from a caBundle is added at once (keeping what is
/// there: another replica may still present a certificate from it), and roots this replica no
/// longer has are removed only after [`SHRINK_AFTER`], by when every replica has caught up. Each
/// change of the bundle is then one write (or two, when replicas remove a root at the same
/// moment) instead of replicas rewriting each other's view in turn.
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
    // When extra roots, first seen now, may be removed.
    let mut shrink_at: Option<tokio::time::Instant> = None;
    loop {
        let wake_at = retry_at.into_iter().chain(shrink_at).min();
        let wake = async {
            match wake_at {
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
            _ = wake => {}
        }
        // Whatever woke us, a pending write is tried now.
        retry_at = None;
        let now = tokio::time::Instant::now();
        let Some(object) = &current else { continue };
        let roots = authority.borrow_and_update().bundle.roots.clone();
        let shrink = shrink_at.is_some_and(|at| at <= now);
        let plan = ca_bundle_patch(object, &roots, shrink);
        shrink_at = match (plan.shrink_pending, shrink_at) {
            (false, _) => None,
            (true, Some(at)) => Some(at),
            (true, None) => {
                info!(webhook_config = %name, after_s = SHRINK_AFTER.as_secs(), "the webhook caBundle holds roots this CA no longer has; removing them once every replica has caught up");
                Some(now + SHRINK_AFTER)
            }
        };
        let Some(patch) = plan.patch else { continue };
        match api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(updated) => {
                metrics.webhook_ca_bundle_writes.inc();
                info!(webhook_config = %name, removed_old_roots = shrink, "webhook caBundle updated to trust the current roots");
                current = Some(updated);
            }
            Err(e) => {
                metrics.webhook_ca_bundle_write_failures.inc();
                warn!(webhook_config = %name, error = %e, "could not update the webhook caBundle; retrying");
                retry_at = Some(now + RETRY_INTERVAL);
            }
        }
    }
}

/// What [`ca_bundle_patch`] decided.
#[derive(Debug)]
pub struct CaBundlePlan {
    /// The write to make now, if any.
    pub patch: Option<json_patch::Patch>,
    /// Some caBundle holds roots that `roots` lacks and that were left in place (no `shrink`).
    pub shrink_pending: bool,
}

/// The JSON patch that makes every webhook's caBundle trust `roots`: a caBundle missing one of
/// them gets them added to what it has; one holding only extra roots is set to exactly `roots`
/// if `shrink`, else left alone (and reported in [`CaBundlePlan::shrink_pending`]). No patch when
/// nothing is to change, or with no roots yet. Each write is guarded by a test of the webhook's
/// name, so a concurrent reordering of the list fails the patch instead of writing the wrong
/// entry.
pub fn ca_bundle_patch(
    object: &MutatingWebhookConfiguration,
    roots: &[CertificateDer<'_>],
    shrink: bool,
) -> CaBundlePlan {
    let mut plan = CaBundlePlan {
        patch: None,
        shrink_pending: false,
    };
    if roots.is_empty() {
        return plan;
    }
    let mut ops = Vec::new();
    for (index, webhook) in object.webhooks.iter().flatten().enumerate() {
        // What does not parse trusts nothing, and is dropped by a write.
        let held: Vec<Vec<u8>> = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .and_then(|b| pem::parse_many(&b.0).ok())
            .into_iter()
            .flatten()
            .filter(|block| block.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        let missing: Vec<&[u8]> = roots
            .iter()
            .map(|root| root.as_ref())
            .filter(|root| !held.iter().any(|h| h.as_slice() == *root))
            .collect();
        let extra = held
            .iter()
            .any(|h| !roots.iter().any(|root| root.as_ref() == h.as_slice()));
        let wanted: Vec<&[u8]> = if !extra && missing.is_empty() {
            continue;
        } else if extra && shrink {
            roots.iter().map(|root| root.as_ref()).collect()
        } else if missing.is_empty() {
            plan.shrink_pending = true;
            continue;
        } else {
            plan.shrink_pending |= extra;
            held.iter().map(Vec::as_slice).chain(missing).collect()
        };
        let pem: String = wanted.into_iter().map(certificate_to_pem).collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(pem);
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}));
        // The write holds only if the caBundle is still the one this plan was made from: another
        // replica's write in between fails it (and the watch brings that write here), so no
        // replica overwrites a root another one just added.
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{index}/clientConfig"), "value": webhook.client_config}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": encoded}));
    }
    if !ops.is_empty() {
        plan.patch = Some(
            serde_json::from_value(serde_json::Value::Array(ops)).expect("valid JSON patch ops"),
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> CertificateDer<'static> {
        rcgen::generate_simple_self_signed(vec![name.to_string()])
            .unwrap()
            .cert
            .der()
            .clone()
    }

    /// One webhook whose caBundle holds `roots` (none: no caBundle).
    fn config(roots: &[CertificateDer<'_>]) -> MutatingWebhookConfiguration {
        let pem: String = roots.iter().map(|r| certificate_to_pem(r)).collect();
        let mut value = serde_json::json!({
            "metadata": {"name": "sigil-injector"},
            "webhooks": [{"name": "inject.sigil.dev", "admissionReviewVersions": ["v1"],
                          "sideEffects": "None", "clientConfig": {}}],
        });
        if !roots.is_empty() {
            value["webhooks"][0]["clientConfig"]["caBundle"] =
                base64::engine::general_purpose::STANDARD.encode(pem).into();
        }
        serde_json::from_value(value).unwrap()
    }

    /// The roots `plan` writes, or `None` for no write.
    fn written(object: &MutatingWebhookConfiguration, plan: &CaBundlePlan) -> Option<Vec<Vec<u8>>> {
        let mut value = serde_json::to_value(object).unwrap();
        json_patch::patch(&mut value, plan.patch.as_ref()?).unwrap();
        let encoded = value["webhooks"][0]["clientConfig"]["caBundle"].as_str()?;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        Some(
            pem::parse_many(pem)
                .unwrap()
                .into_iter()
                .map(pem::Pem::into_contents)
                .collect(),
        )
    }

    #[test]
    fn a_missing_root_is_added_at_once_an_extra_one_removed_only_when_due() {
        let (old, new) = (root("old"), root("new"));
        let der = |roots: &[&CertificateDer<'_>]| -> Vec<Vec<u8>> {
            roots.iter().map(|r| r.to_vec()).collect()
        };
        // No caBundle yet (or re-applied without one): ours, at once.
        let empty = config(&[]);
        let plan = ca_bundle_patch(&empty, std::slice::from_ref(&old), false);
        assert_eq!(written(&empty, &plan), Some(der(&[&old])));
        assert!(!plan.shrink_pending);
        // Equal: nothing to write.
        let plan = ca_bundle_patch(
            &config(std::slice::from_ref(&old)),
            std::slice::from_ref(&old),
            false,
        );
        assert!(plan.patch.is_none() && !plan.shrink_pending);
        // A replica that has seen a new root adds it, keeping the one another replica uses.
        let held = config(std::slice::from_ref(&old));
        let plan = ca_bundle_patch(&held, std::slice::from_ref(&new), false);
        assert_eq!(written(&held, &plan), Some(der(&[&old, &new])));
        assert!(plan.shrink_pending);
        // A replica with the older view does not take the new root out...
        let both = config(&[old.clone(), new.clone()]);
        let plan = ca_bundle_patch(&both, std::slice::from_ref(&old), false);
        assert!(plan.patch.is_none() && plan.shrink_pending);
        // ...and once the removal is due, the retired root goes.
        let plan = ca_bundle_patch(&both, std::slice::from_ref(&new), true);
        assert_eq!(written(&both, &plan), Some(der(&[&new])));
        // No roots loaded yet: never write an empty bundle.
        let plan = ca_bundle_patch(&both, &[], true);
        assert!(plan.patch.is_none());
    }

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
