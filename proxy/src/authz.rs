//! Authorization in the proxy: the policy set the agent sends for this workload
//! (`sigil.policy.v1`), compiled with `sigil-policy`, and the decisions on inbound connections
//! and HTTP requests, with their metrics and log lines.
//!
//! The agent's objects are validated here again and never trusted blindly; an object that does
//! not validate fails closed: a DENY policy becomes "deny everything it selects", an ALLOW policy
//! one that matches nothing (so it still takes away the default allow), a PeerAuthentication
//! STRICT, and an AUDIT policy is dropped (it never decides).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sigil_identity::SpiffeId;
use sigil_policy::model::Object;
use sigil_policy::{Decision, HttpRequest, Peer, PolicySet, Request, Workload};
use sigil_proto::sigil::policy::v1::policy_discovery_client::PolicyDiscoveryClient;
use sigil_proto::sigil::policy::v1::{PolicySet as WirePolicySet, WatchPoliciesRequest};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::MtlsMode;
use crate::feed;
use crate::l7::{Authorize, BadRequest, HttpError, RequestInfo};
use crate::metrics::{AuthzDecision, AuthzLabels, Direction, DirectionLabels, Layer, Metrics};

/// The policies in force for this workload.
#[derive(Debug)]
pub struct PolicyState {
    pub version: u64,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub set: PolicySet,
    /// `namespace/name: why` of every object that did not validate (and was replaced).
    pub rejected: Vec<String>,
    /// Whether an authorization policy for this workload looks at HTTP attributes, so that
    /// inbound HTTP must be parsed to decide.
    pub needs_http: bool,
}

impl PolicyState {
    pub fn from_wire(wire: &WirePolicySet) -> PolicyState {
        let mut rejected = Vec::new();
        let objects: Vec<Object> = wire
            .objects_json
            .iter()
            .filter_map(|json| match compile_one(json, &wire.namespace) {
                Compiled::Valid(object) => Some(object),
                Compiled::Invalid { replacement, why } => {
                    rejected.push(why);
                    replacement
                }
            })
            .collect();
        let set = match sigil_policy::validate::policy_set(&objects) {
            Ok(set) => set,
            // Every object passed alone and the replacements are valid by construction; if the
            // set still fails, deny everything rather than run without policies.
            Err(e) => {
                rejected.push(e.to_string());
                deny_everything(&wire.namespace)
            }
        };
        let labels: BTreeMap<String, String> = wire
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let workload = Workload {
            namespace: &wire.namespace,
            labels: &labels,
        };
        let needs_http = set
            .authorization_policies()
            .any(|p| p.applies_to(&workload) && p.uses_http());
        PolicyState {
            version: wire.version,
            namespace: wire.namespace.clone(),
            labels,
            set,
            rejected,
            needs_http,
        }
    }

    pub fn workload(&self) -> Workload<'_> {
        Workload {
            namespace: &self.namespace,
            labels: &self.labels,
        }
    }

    /// The inbound mode for `port`: PeerAuthentication where one sets it, else `default` (the
    /// proxy's flags).
    pub fn mtls_mode(&self, port: u16, default: MtlsMode) -> MtlsMode {
        let default = match default {
            MtlsMode::Strict => sigil_policy::MtlsMode::Strict,
            MtlsMode::Permissive => sigil_policy::MtlsMode::Permissive,
            MtlsMode::Disable => sigil_policy::MtlsMode::Disable,
        };
        match self
            .set
            .effective_mtls(&self.workload(), port, default)
            .mode
        {
            sigil_policy::MtlsMode::Strict => MtlsMode::Strict,
            sigil_policy::MtlsMode::Permissive => MtlsMode::Permissive,
            sigil_policy::MtlsMode::Disable => MtlsMode::Disable,
        }
    }
}

/// One object from the agent, checked.
enum Compiled {
    Valid(Object),
    /// With its fail-closed replacement (None for AUDIT) and why.
    Invalid {
        replacement: Option<Object>,
        why: String,
    },
}

/// `namespace`: the workload's, where an object that is not even JSON denies everything (what
/// it was meant to do cannot be known, so it fails closed as a DENY would).
fn compile_one(json: &str, namespace: &str) -> Compiled {
    let value: Value = match serde_json::from_str(json) {
        Ok(value) => value,
        Err(e) => {
            return Compiled::Invalid {
                replacement: fail_closed(&json!({
                    "kind": "AuthorizationPolicy",
                    "metadata": { "name": "unparseable-policy", "namespace": namespace },
                    "spec": { "action": "DENY" },
                })),
                why: format!("{namespace}/?: an object that is not JSON: {e}"),
            };
        }
    };
    let name = format!(
        "{}/{}",
        value["metadata"]["namespace"].as_str().unwrap_or("?"),
        value["metadata"]["name"].as_str().unwrap_or("?")
    );
    let checked = serde_json::from_value::<Object>(value.clone())
        .map_err(|e| e.to_string())
        .and_then(|object| {
            let valid = match &object {
                Object::AuthorizationPolicy(p) => {
                    sigil_policy::validate::authorization_policy(p).map(|_| ())
                }
                Object::PeerAuthentication(p) => {
                    sigil_policy::validate::peer_authentication(p).map(|_| ())
                }
            };
            valid.map(|()| object).map_err(|e| e.to_string())
        });
    match checked {
        Ok(object) => Compiled::Valid(object),
        Err(why) => Compiled::Invalid {
            replacement: fail_closed(&value),
            why: format!("{name}: {why}"),
        },
    }
}

/// The fail-closed stand-in for an object that did not validate (see the module docs). The
/// selector is kept only if it is a plain map of strings; otherwise the stand-in covers the
/// whole namespace, which is the safe side for DENY and STRICT.
fn fail_closed(value: &Value) -> Option<Object> {
    let selector = value["spec"]["selector"]["matchLabels"]
        .as_object()
        .filter(|labels| labels.values().all(Value::is_string))
        .map(|labels| json!({ "matchLabels": labels }));
    let metadata = json!({
        "name": value["metadata"]["name"].as_str().unwrap_or("invalid"),
        "namespace": value["metadata"]["namespace"].as_str().unwrap_or("invalid"),
    });
    let mut spec = match (value["kind"].as_str(), value["spec"]["action"].as_str()) {
        (Some("PeerAuthentication"), _) => json!({ "mtls": { "mode": "STRICT" } }),
        (_, Some("AUDIT")) => return None,
        (_, Some("ALLOW") | None) => json!({ "action": "ALLOW" }),
        (_, _) => json!({ "action": "DENY", "rules": [{}] }),
    };
    if let Some(selector) = selector {
        spec["selector"] = selector;
    }
    let kind = if value["kind"] == "PeerAuthentication" {
        "PeerAuthentication"
    } else {
        "AuthorizationPolicy"
    };
    let replacement = json!({
        "apiVersion": sigil_policy::model::API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    });
    serde_json::from_value(replacement.clone())
        .ok()
        .filter(|object: &Object| match object {
            Object::AuthorizationPolicy(p) => {
                sigil_policy::validate::authorization_policy(p).is_ok()
            }
            Object::PeerAuthentication(p) => sigil_policy::validate::peer_authentication(p).is_ok(),
        })
        .or_else(|| {
            // Even the name is unusable: deny in the whole namespace under a name that is.
            let mut fallback = replacement;
            fallback["metadata"]["name"] = json!("invalid-policy");
            if let Some(spec) = fallback["spec"].as_object_mut() {
                spec.remove("selector");
            }
            serde_json::from_value(fallback).ok()
        })
}

/// A set that denies every connection to the workloads of `namespace`.
fn deny_everything(namespace: &str) -> PolicySet {
    let object = json!({
        "apiVersion": sigil_policy::model::API_VERSION,
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "invalid-policy-set", "namespace": namespace },
        "spec": { "action": "DENY", "rules": [{}] },
    });
    serde_json::from_value::<Object>(object)
        .ok()
        .and_then(|object| sigil_policy::validate::policy_set(&[object]).ok())
        .unwrap_or_default()
}

/// Follows the agent's policy feed for the life of the process.
pub async fn run(
    socket: PathBuf,
    tx: watch::Sender<Option<Arc<PolicyState>>>,
    metrics: Arc<Metrics>,
) {
    let reconnects = metrics.policy_reconnects.clone();
    let open = |channel| async move {
        PolicyDiscoveryClient::new(channel)
            .watch_policies(WatchPoliciesRequest {})
            .await
    };
    let on_message = |wire: WirePolicySet| {
        let state = PolicyState::from_wire(&wire);
        for why in &state.rejected {
            warn!(problem = %why, "a policy from the agent is invalid; enforcing its fail-closed stand-in");
        }
        info!(
            version = state.version,
            namespace = %state.namespace,
            policies = state.set.authorization_policies().count(),
            peer_authentications = state.set.peer_authentications().count(),
            rejected = state.rejected.len(),
            http = state.needs_http,
            "policies updated"
        );
        metrics.policy_updates.inc();
        metrics.policies_rejected.set(state.rejected.len() as i64);
        tx.send_replace(Some(Arc::new(state)));
    };
    feed::follow_forever(socket, "policies", open, on_message, reconnects).await;
}

/// The outcome of one decision, for logs.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub allowed: bool,
    /// `namespace/name` or `default`.
    pub policy: String,
    pub reason: String,
}

impl Outcome {
    fn of(decision: &Decision<'_>) -> Outcome {
        Outcome {
            allowed: decision.is_allowed(),
            policy: decision.policy().map_or_else(
                || sigil_policy::engine::DEFAULT_DECIDER.to_string(),
                ToString::to_string,
            ),
            reason: decision.reason.to_string(),
        }
    }
}

/// Decides on one inbound connection and its requests, always against the newest policies.
pub struct ConnectionAuthz {
    policies: watch::Receiver<Option<Arc<PolicyState>>>,
    peer: Option<Peer>,
    peer_id: Option<String>,
    source_ip: IpAddr,
    port: u16,
    /// How the connection arrived, and the port's mode where no PeerAuthentication sets one
    /// (the proxy's flags): re-checked against the mode after every policy change.
    transport: Transport,
    /// --access-log: one line per allowed HTTP request too (denied ones are always logged).
    access_log: bool,
    metrics: Arc<Metrics>,
}

/// How an inbound connection arrived, for re-checking it against the port's mTLS mode.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub mtls: bool,
    pub default_mode: MtlsMode,
}

impl ConnectionAuthz {
    pub fn new(
        policies: watch::Receiver<Option<Arc<PolicyState>>>,
        peer: Option<&SpiffeId>,
        source_ip: IpAddr,
        port: u16,
        transport: Transport,
        access_log: bool,
        metrics: Arc<Metrics>,
    ) -> ConnectionAuthz {
        ConnectionAuthz {
            policies,
            peer: peer.map(Peer::new),
            peer_id: peer.map(ToString::to_string),
            source_ip,
            port,
            transport,
            access_log,
            metrics,
        }
    }

    /// Why the port's current mode no longer accepts this connection: plaintext on a port now
    /// STRICT, mTLS on a port now DISABLE.
    fn mode_forbids(&self) -> Option<String> {
        let state = self.policies.borrow().clone()?;
        let mode = state.mtls_mode(self.port, self.transport.default_mode);
        let forbidden = match mode {
            MtlsMode::Strict => !self.transport.mtls,
            MtlsMode::Disable => self.transport.mtls,
            MtlsMode::Permissive => false,
        };
        forbidden.then(|| {
            format!(
                "{} refused after a policy change: mTLS is {} on port {}",
                if self.transport.mtls {
                    "mTLS"
                } else {
                    "plaintext"
                },
                mode.as_str(),
                self.port
            )
        })
    }

    fn request<'a>(&'a self, http: Option<HttpRequest<'a>>) -> Request<'a> {
        Request {
            peer: self.peer.as_ref(),
            source_ip: self.source_ip,
            destination_port: self.port,
            http,
        }
    }

    /// The decision on the connection as a whole (no HTTP attributes). Without policies (the
    /// proxy is not ready yet) nothing is allowed.
    pub fn decide_connection(&self) -> Outcome {
        let state = self.policies.borrow().clone();
        let outcome = match &state {
            Some(state) => Outcome::of(&state.set.evaluate(&state.workload(), &self.request(None))),
            None => no_policies(),
        };
        self.count(&outcome, Layer::L4);
        outcome
    }

    /// For HTTP connections after a policy change: denied only if no request on it could be
    /// allowed any more (HTTP fields taken as matching in ALLOW and not in DENY).
    fn still_possible(&self) -> Outcome {
        match self.policies.borrow().as_ref() {
            Some(state) => Outcome::of(
                &state
                    .set
                    .evaluate_any_http(&state.workload(), &self.request(None)),
            ),
            None => no_policies(),
        }
    }

    /// Resolves when a policy change takes away this connection's permission, or its port's
    /// mTLS mode no longer accepts how it arrived: then it must be closed. `http`: the
    /// connection is served request by request.
    pub async fn revoked(&self, http: bool) -> String {
        let mut policies = self.policies.clone();
        loop {
            if policies.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(why) = self.mode_forbids() {
                return why;
            }
            let outcome = if http {
                self.still_possible()
            } else {
                self.decide_connection()
            };
            if !outcome.allowed {
                return format!(
                    "denied by {} after a policy change: {}",
                    outcome.policy, outcome.reason
                );
            }
        }
    }

    fn count(&self, outcome: &Outcome, layer: Layer) {
        self.metrics
            .authz_decisions
            .get_or_create(&AuthzLabels {
                decision: if outcome.allowed {
                    AuthzDecision::Allow
                } else {
                    AuthzDecision::Deny
                },
                policy: outcome.policy.clone(),
                layer,
            })
            .inc();
    }
}

impl Authorize for ConnectionAuthz {
    fn authorize(&self, request: &RequestInfo<'_>) -> Option<String> {
        let state = self.policies.borrow().clone();
        let outcome = match &state {
            Some(state) => Outcome::of(&state.set.evaluate(
                &state.workload(),
                &self.request(Some(HttpRequest {
                    method: request.method,
                    path: request.path,
                    host: request.host,
                    headers: request.headers,
                })),
            )),
            None => no_policies(),
        };
        self.count(&outcome, Layer::L7);
        if outcome.allowed {
            return Some(outcome.policy);
        }
        info!(
            target: "sigil_access",
            kind = "http",
            source_ip = %self.source_ip,
            source_identity = self.peer_id.as_deref(),
            port = self.port,
            method = request.method,
            path = request.path,
            host = request.host,
            result = "denied",
            status = 403,
            policy = %outcome.policy,
            detail = %outcome.reason,
        );
        None
    }

    fn served(&self, request: &RequestInfo<'_>, policy: &str, status: u16, elapsed: Duration) {
        if !self.access_log {
            return;
        }
        info!(
            target: "sigil_access",
            kind = "http",
            source_ip = %self.source_ip,
            source_identity = self.peer_id.as_deref(),
            port = self.port,
            method = request.method,
            path = request.path,
            host = request.host,
            result = "allowed",
            status,
            policy,
            duration_ms = elapsed.as_secs_f64() * 1e3,
        );
    }

    fn bad_request(&self, method: &str, target: &str, why: &BadRequest) {
        self.metrics.http_bad_requests.inc();
        info!(
            target: "sigil_access",
            kind = "http",
            source_ip = %self.source_ip,
            source_identity = self.peer_id.as_deref(),
            port = self.port,
            method,
            path = target,
            result = "bad_request",
            status = 400,
            detail = %why,
        );
    }

    fn upstream_failed(&self, error: &HttpError) {
        self.metrics
            .upstream_failures
            .get_or_create(&DirectionLabels {
                direction: Direction::Inbound,
            })
            .inc();
        warn!(
            source_ip = %self.source_ip,
            port = self.port,
            error = %error,
            "the application could not be reached for an allowed request; answered 502"
        );
    }
}

fn no_policies() -> Outcome {
    Outcome {
        allowed: false,
        policy: sigil_policy::engine::DEFAULT_DECIDER.to_string(),
        reason: "no policies from the agent yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn state(objects: &[Value]) -> PolicyState {
        PolicyState::from_wire(&WirePolicySet {
            version: 1,
            namespace: "demo".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            objects_json: objects.iter().map(Value::to_string).collect(),
        })
    }

    fn authz(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": spec,
        })
    }

    fn decide(state: &PolicyState, peer: Option<&str>) -> String {
        let peer = peer.map(|id| Peer::new(&SpiffeId::parse(id).unwrap()));
        let request = Request {
            peer: peer.as_ref(),
            source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            destination_port: 8080,
            http: None,
        };
        state.set.evaluate(&state.workload(), &request).to_string()
    }

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

    #[test]
    fn invalid_objects_fail_closed() {
        // A DENY with a lowercase method (invalid) denies everything it selects.
        let s = state(&[authz(
            "bad-deny",
            json!({"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                   "rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}),
        )]);
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        assert!(s.rejected[0].contains("demo/bad-deny"), "{:?}", s.rejected);
        assert_eq!(decide(&s, Some(WEB)), "DENY demo/bad-deny");

        // An invalid ALLOW allows nothing but still takes away the default allow.
        let s = state(&[authz(
            "bad-allow",
            json!({"rules": [{"from": [{"source": {"principals": ["x"], "serviceAccounts": ["demo/web"]}}]}]}),
        )]);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(decide(&s, Some(WEB)), "DENY default");

        // An invalid AUDIT policy is dropped: it never decides.
        let s = state(&[authz(
            "bad-audit",
            json!({"action": "AUDIT", "rules": [{"unknown": 1}]}),
        )]);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(decide(&s, Some(WEB)), "ALLOW default");

        // An unknown field in a PeerAuthentication makes that scope STRICT.
        let s = state(&[json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "bad-peer", "namespace": "demo"},
            "spec": {"mtls": {"mode": "PERMISSIVE"}, "typo": true},
        })]);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.mtls_mode(8080, MtlsMode::Disable), MtlsMode::Strict);

        // Not even JSON (issue 11 item 5): it denies everything in the workload's namespace,
        // and is reported (the log line and sigil_proxy_policies_rejected come from this list).
        let s = PolicyState::from_wire(&WirePolicySet {
            version: 1,
            namespace: "demo".into(),
            labels: Default::default(),
            objects_json: vec!["{not json".into()],
        });
        assert_eq!(s.rejected.len(), 1);
        assert!(s.rejected[0].contains("not JSON"), "{:?}", s.rejected);
        assert_eq!(decide(&s, None), "DENY demo/unparseable-policy");
        assert_eq!(decide(&s, Some(WEB)), "DENY demo/unparseable-policy");
        // An object of a kind the proxy does not know stands in as an AuthorizationPolicy with
        // its action: a DENY denies everything it selects.
        let s = state(&[json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "SomethingNew",
            "metadata": {"name": "future", "namespace": "demo"},
            "spec": {"action": "DENY"},
        })]);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(decide(&s, Some(WEB)), "DENY demo/future");
    }

    #[test]
    fn valid_objects_decide_and_http_fields_are_noticed() {
        let s = state(&[authz(
            "allow-web",
            json!({"selector": {"matchLabels": {"app": "db"}},
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/web"]}}],
                              "to": [{"operation": {"paths": ["/api/*"]}}]}]}),
        )]);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert!(s.needs_http);
        // At L4 the HTTP field cannot match in an ALLOW rule.
        assert_eq!(decide(&s, Some(WEB)), "DENY default");
        let s = state(&[authz(
            "allow-web-l4",
            json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/web"]}}]}]}),
        )]);
        assert!(!s.needs_http);
        assert_eq!(decide(&s, Some(WEB)), "ALLOW demo/allow-web-l4");
        assert_eq!(decide(&s, None), "DENY default");
    }
}
