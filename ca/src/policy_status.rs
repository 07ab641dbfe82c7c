//! Status conditions of the policy resources: the CA, the one sigil process that sees the whole
//! cluster, watches every `AuthorizationPolicy` and `PeerAuthentication` (`sigil.dev`), validates
//! each with `sigil-policy`, and tells the user the outcome in `status.conditions`, so that
//! `kubectl get sigilap` shows a policy that the proxies will not enforce as written. Node
//! agents only read these objects.
//!
//! What is validated is exactly what a proxy validates: the object as the agent forwards it
//! (`apiVersion`, `kind`, `metadata.name` and `.namespace`, `spec`), so the condition is the
//! proxies' verdict. Two conditions, in the style of Gateway API resources:
//! - `Valid`: `True` (reason `Valid`), or `False` (reason `Invalid`) with every problem in the
//!   message as `field.path: what is wrong`, joined by `; ` (an invalid object is enforced as a
//!   fail-closed stand-in).
//! - `Warnings`: `False` (reason `NoWarnings`); `True` with the warnings as the message, reason
//!   `HttpFieldsOnTcp` when a rule uses HTTP-only fields (hosts, methods, paths, headers), which
//!   do not apply to non-HTTP connections, and `Warnings` otherwise; `Unknown` (reason
//!   `Invalid`) while the object is invalid, since validation stops at the problems.
//!
//! Both carry `observedGeneration` (the `metadata.generation` judged), and keep their
//! `lastTransitionTime` until their status changes. They are written by server-side apply to the
//! `status` subresource as field manager [`FIELD_MANAGER`], owning only these two entries of the
//! `conditions` list (a map keyed by `type`), and only when they differ from the object's: the
//! write's own watch event then finds nothing to change, so there is no write loop. The apply
//! carries the `resourceVersion` judged, as a precondition: a write from an outdated view (the
//! object changed meanwhile) fails with a conflict and is dropped, since the change that outdated
//! it arrives as a watch event and is judged afresh; a stale verdict never overwrites a newer one.
//!
//! The CA may run as several replicas, each writing. They compute the same conditions from the
//! same object and apply them as the same field manager, which is idempotent: applying content
//! that is already there changes nothing (no new resourceVersion, no event). When both react to
//! the same change, the first write wins; the other's fails its precondition and is dropped, and
//! that replica then sees the written conditions equal to its own and writes nothing.
//!
//! A resource whose CRD is not installed (its list is 404) is logged once and retried by the
//! watcher (with backoff, at most 30 s apart); failed writes are counted and retried every
//! [`RETRY_INTERVAL`]. The CA's RBAC needs `get`, `list`, `watch` on both resources and `patch`
//! on their `/status`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use sigil_kube_watch::follow::{self, Events, Follower, WatchEvent};
use sigil_policy::cluster::{self, api_resource};
use sigil_policy::model::{self, Object};
use sigil_policy::validate::{self, Problem};
use sigil_policy::{Compiled, Envelope, Kind, ObjectKey, Warning};
use tracing::{debug, info, warn};

use crate::conditions::{self, SEPARATOR, STATUS_FALSE, STATUS_TRUE, STATUS_UNKNOWN, condition};
use crate::distribute::FIELD_MANAGER;
use crate::metrics::Metrics;

/// How often failed status writes are retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Condition type: whether sigil accepted the object.
pub const VALID: &str = "Valid";
/// Condition type: whether a valid object may not do what it seems to.
pub const WARNINGS: &str = "Warnings";
const REASON_VALID: &str = "Valid";
const REASON_INVALID: &str = "Invalid";
const REASON_NO_WARNINGS: &str = "NoWarnings";
const REASON_HTTP_FIELDS_ON_TCP: &str = "HttpFieldsOnTcp";
const REASON_WARNINGS: &str = "Warnings";
/// The status of a list of a resource that is not served (see the agent's policy feed for why
/// the code and not the reason), or of a write to an object since deleted.
const NOT_FOUND: u16 = 404;
/// The status of a write whose resourceVersion precondition failed.
const CONFLICT: u16 = 409;

type KindEvent = (Kind, WatchEvent<DynamicObject>);

/// Why a status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("writing the status of {object}: {source}")]
    Write {
        object: ObjectKey,
        #[source]
        source: kube::Error,
    },
}

impl StatusError {
    /// Whether the object changed (409: the resourceVersion precondition failed) or went away
    /// (404) since it was judged: nothing to retry.
    fn superseded(&self) -> bool {
        let StatusError::Write { source, .. } = self;
        matches!(source, kube::Error::Api(status) if [CONFLICT, NOT_FOUND].contains(&status.code))
    }
}

/// The key of a stored object (see [`cluster::envelope`]).
fn key_of(kind: Kind, object: &DynamicObject) -> Option<ObjectKey> {
    cluster::envelope(kind, object).map(|envelope| envelope.key)
}

/// What validation makes of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Every problem, as `field.path: what is wrong`.
    Invalid(Vec<String>),
    Valid {
        warnings: Vec<String>,
        /// Whether a rule uses HTTP-only fields (one of the warnings says so).
        http_fields: bool,
    },
}

/// Validates `object` as the agent does before sending it to the proxies (what it sends is
/// [`Object::from_parts`] of the same envelope and spec).
fn verdict(key: &ObjectKey, object: &DynamicObject) -> Verdict {
    let envelope = cluster::envelope(key.kind, object).unwrap_or_else(|| Envelope {
        key: key.clone(),
        creation_timestamp: None,
        uid: None,
    });
    let validated = match Object::from_parts(&envelope, cluster::spec(object)) {
        Err(reason) => return Verdict::Invalid(vec![reason]),
        Ok(object) => validate::compile(&object).map(|compiled| match compiled {
            Compiled::AuthorizationPolicy(p) => (lines(p.warnings()), p.uses_http()),
            Compiled::PeerAuthentication(p) => (lines(p.warnings()), false),
        }),
    };
    match validated {
        Ok((warnings, http_fields)) => Verdict::Valid {
            warnings,
            http_fields,
        },
        Err(error) => Verdict::Invalid(error.problems.iter().map(problem_line).collect()),
    }
}

fn lines(warnings: &[Warning]) -> Vec<String> {
    warnings.iter().map(ToString::to_string).collect()
}

/// A problem without the `namespace/name` its `Display` starts with: the condition is on the
/// object itself.
fn problem_line(problem: &Problem) -> String {
    if problem.path.is_empty() {
        problem.message.clone()
    } else {
        format!("{}: {}", problem.path, problem.message)
    }
}

/// The `Valid` and `Warnings` conditions for `verdict` on generation `generation`. A condition
/// whose status is unchanged from `current` keeps its `lastTransitionTime`; one that changed
/// gets `now`.
fn conditions(
    verdict: &Verdict,
    generation: Option<i64>,
    current: &[Condition],
    now: &Time,
) -> [Condition; 2] {
    let (valid, warnings) = match verdict {
        Verdict::Invalid(problems) => (
            (STATUS_FALSE, REASON_INVALID, problems.join(SEPARATOR)),
            (
                STATUS_UNKNOWN,
                REASON_INVALID,
                "Not checked: the policy is invalid".to_owned(),
            ),
        ),
        Verdict::Valid {
            warnings,
            http_fields,
        } => {
            let valid = (STATUS_TRUE, REASON_VALID, "The policy is valid".to_owned());
            let warnings = match (warnings.is_empty(), http_fields) {
                (true, _) => (STATUS_FALSE, REASON_NO_WARNINGS, "No warnings".to_owned()),
                (false, true) => (
                    STATUS_TRUE,
                    REASON_HTTP_FIELDS_ON_TCP,
                    warnings.join(SEPARATOR),
                ),
                (false, false) => (STATUS_TRUE, REASON_WARNINGS, warnings.join(SEPARATOR)),
            };
            (valid, warnings)
        }
    };
    let condition = |type_, verdict| condition(type_, verdict, generation, current, now);
    [condition(VALID, valid), condition(WARNINGS, warnings)]
}

/// The object's conditions (see [`conditions::parse`]).
fn current_conditions(object: &DynamicObject) -> Vec<Condition> {
    conditions::parse(object.data.pointer("/status/conditions"))
}

/// Keeps the conditions of every policy object current, until the watch streams end (they do
/// not; the watchers retry with backoff and re-list when they must).
pub async fn run(client: kube::Client, metrics: Arc<Metrics>) {
    let events = events(client.clone());
    let mut writer = StatusWriter::new(client, metrics);
    follow::follow(&mut writer, Some(events), std::future::pending()).await;
}

/// Both resources in every namespace, each event tagged with its kind.
fn events(client: kube::Client) -> Events<KindEvent> {
    follow::tagged(Kind::ALL.map(|kind| {
        let api = Api::all_with(client.clone(), &api_resource(kind));
        (kind, follow::watch(api, watcher::Config::default()))
    }))
}

/// It reconciles rather than publishes: each event is acted on at once, and failed writes are
/// retried every [`RETRY_INTERVAL`].
impl Follower for StatusWriter {
    type Event = KindEvent;

    async fn on_event(&mut self, (kind, event): KindEvent) {
        StatusWriter::on_event(self, kind, event).await;
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(RETRY_INTERVAL)
    }

    async fn on_tick(&mut self) {
        self.retry().await;
    }
}

/// The watch's consumer: judges each object and writes its conditions when they are not current.
struct StatusWriter {
    client: kube::Client,
    metrics: Arc<Metrics>,
    /// Objects whose write failed, as last seen, for the next retry.
    pending: HashMap<ObjectKey, DynamicObject>,
    /// Kinds whose CRD the last list found missing, so that is logged once.
    missing: HashSet<Kind>,
}

impl StatusWriter {
    fn new(client: kube::Client, metrics: Arc<Metrics>) -> Self {
        StatusWriter {
            client,
            metrics,
            pending: HashMap::new(),
            missing: HashSet::new(),
        }
    }

    async fn on_event(&mut self, kind: Kind, event: WatchEvent<DynamicObject>) {
        match event {
            // A re-list brings every object again: each is checked, and written only if its
            // conditions are not current.
            Ok(Event::Apply(object) | Event::InitApply(object)) => {
                self.reconcile(kind, object).await;
            }
            Ok(Event::Delete(object)) => {
                if let Some(key) = key_of(kind, &object) {
                    self.pending.remove(&key);
                }
            }
            Ok(Event::Init) => {}
            Ok(Event::InitDone) => {
                if self.missing.remove(&kind) {
                    info!(%kind, "the policy resource is served now; writing its status conditions");
                }
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == NOT_FOUND =>
            {
                if self.missing.insert(kind) {
                    warn!(%kind, resource = %format!("{}.{}", kind.plural(), model::GROUP), "the policy resource is not served (no CRD); no status conditions until it is installed");
                }
            }
            Err(e) => warn!(%kind, error = %e, "policy watch failed; retrying"),
        }
    }

    async fn reconcile(&mut self, kind: Kind, object: DynamicObject) {
        let Some(key) = key_of(kind, &object) else {
            return;
        };
        self.pending.remove(&key);
        match self.update(&key, &object).await {
            Ok(()) => {}
            // Its watch event follows, and is judged afresh.
            Err(e) if e.superseded() => debug!(error = %e, "dropped"),
            Err(e) => {
                self.metrics.policy_status_write_failures.inc();
                warn!(error = %e, "will retry");
                self.pending.insert(key, object);
            }
        }
    }

    /// Writes the object's conditions if they are not current.
    async fn update(&self, key: &ObjectKey, object: &DynamicObject) -> Result<(), StatusError> {
        let verdict = verdict(key, object);
        let current = current_conditions(object);
        let now = Time(Timestamp::now());
        let desired = conditions(&verdict, object.metadata.generation, &current, &now);
        if desired.iter().all(|condition| current.contains(condition)) {
            return Ok(());
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &api_resource(key.kind));
        // Only what this manager owns (naming other fields would take them over), and the
        // version judged, as a precondition.
        let mut apply = json!({
            "apiVersion": model::API_VERSION,
            "kind": key.kind.name(),
            "metadata": { "name": key.name, "namespace": key.namespace },
            "status": { "conditions": desired },
        });
        if let Some(version) = &object.metadata.resource_version {
            apply["metadata"]["resourceVersion"] = json!(version);
        }
        api.patch_status(
            &key.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(apply),
        )
        .await
        .map_err(|source| StatusError::Write {
            object: key.clone(),
            source,
        })?;
        self.metrics.policy_status_writes.inc();
        match &verdict {
            Verdict::Invalid(problems) => {
                info!(object = %key, problems = %problems.join(SEPARATOR), "policy is invalid")
            }
            Verdict::Valid { warnings, .. } => {
                info!(object = %key, warnings = warnings.len(), "policy is valid")
            }
        }
        Ok(())
    }

    /// Tries the failed writes again, with the objects as last seen.
    async fn retry(&mut self) {
        for (key, object) in std::mem::take(&mut self.pending) {
            self.reconcile(key.kind, object).await;
        }
    }
}

#[cfg(test)]
mod tests;
