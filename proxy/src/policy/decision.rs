//! Decisions on one inbound connection and its HTTP requests, always against the newest
//! policies in force, with their metrics (a request's access-log line is written when its
//! response ends: `crate::l7::request_metrics`).

use std::net::IpAddr;
use std::sync::Arc;

use sigil_identity::SpiffeId;
use sigil_policy::{Decision, HttpRequest, MtlsMode, Peer, Request};
use tokio::sync::watch;
use tracing::warn;

use super::state::PolicyState;
use crate::l7::{Authorize, Denied, HttpError, RequestInfo};
use crate::metrics::{AuthzDecision, AuthzLabels, Direction, DirectionLabels, Layer, Metrics};

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
    source_ip: IpAddr,
    port: u16,
    /// How the connection arrived, and the port's mode where no PeerAuthentication sets one
    /// (the proxy's flags): re-checked against the mode after every policy change.
    transport: Transport,
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
        metrics: Arc<Metrics>,
    ) -> ConnectionAuthz {
        ConnectionAuthz {
            policies,
            peer: peer.map(Peer::new),
            source_ip,
            port,
            transport,
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
    fn authorize(&self, request: &RequestInfo<'_>) -> Result<String, Denied> {
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
            return Ok(outcome.policy);
        }
        Err(Denied {
            policy: outcome.policy,
            reason: outcome.reason,
        })
    }

    fn bad_request(&self) {
        self.metrics.http_bad_requests.inc();
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
