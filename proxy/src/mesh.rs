//! Mesh membership as the agent reports it (`sigil.mesh.v1.MeshDiscovery`): which destination
//! addresses are meshed workloads and which SPIFFE ID each must prove. The outbound side reads
//! it per connection; the agent re-sends the whole set on every change and the stream is
//! re-opened with backoff if it breaks, keeping the last set meanwhile.

use std::path::PathBuf;
use std::sync::Arc;

use sigil_proto::sigil::mesh::v1::mesh_discovery_client::MeshDiscoveryClient;
use sigil_proto::sigil::mesh::v1::{MeshMembers, WatchMembersRequest};
use sigil_proxy_api::mesh::MeshSnapshot;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::feed;
use crate::metrics::Metrics;

/// Follows the agent's mesh membership for the life of the process.
pub async fn run(
    socket: PathBuf,
    tx: watch::Sender<Option<Arc<MeshSnapshot>>>,
    metrics: Arc<Metrics>,
) {
    let reconnects = metrics.mesh_reconnects.clone();
    let open = |channel| async move {
        MeshDiscoveryClient::new(channel)
            .watch_members(WatchMembersRequest {})
            .await
    };
    let on_message = |wire: MeshMembers| {
        let membership = match MeshSnapshot::from_message(&wire) {
            Ok(membership) => membership,
            // A set with a bad entry is not trusted in part: a member left out would be sent
            // plaintext. Keep the last good set until the agent sends a valid one.
            Err(e) => {
                warn!(error = %e, version = wire.version, "ignoring an invalid mesh membership from the agent; keeping the last one");
                return;
            }
        };
        info!(
            version = membership.version,
            members = membership.members.len(),
            "mesh membership updated"
        );
        metrics.mesh_members.set(membership.members.len() as i64);
        tx.send_replace(Some(Arc::new(membership)));
    };
    feed::follow_forever(socket, "mesh membership", open, on_message, reconnects).await;
}
