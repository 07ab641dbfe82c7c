//! The agent's policy feed (`sigil.policy.v2.PolicyDiscovery` on its socket), followed for the
//! life of the process: every set received is put in force, logged and counted.

use std::path::PathBuf;
use std::sync::Arc;

use sigil_proto::sigil::policy::v2::policy_discovery_client::PolicyDiscoveryClient;
use sigil_proto::sigil::policy::v2::{PolicySet as WirePolicySet, WatchPoliciesRequest};
use tokio::sync::watch;
use tracing::{info, warn};

use super::state::PolicyState;
use crate::feed;
use crate::metrics::Metrics;

/// Follows the agent's policy feed for the life of the process. An agent that does not serve
/// `sigil.policy.v2` (an older one) refuses the stream: `tx` then keeps None, so the proxy is
/// never ready and allows nothing.
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
