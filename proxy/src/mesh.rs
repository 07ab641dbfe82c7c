//! Mesh membership as the agent reports it (`sigil.mesh.v1.MeshDiscovery`): which destination
//! addresses are meshed workloads and which SPIFFE ID each must prove. The outbound side reads
//! it per connection; the agent re-sends the whole set on every change and the stream is
//! re-opened with backoff if it breaks, keeping the last set meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sigil_agent::backoff::Backoff;
use sigil_agent::mesh::MeshSnapshot;
use sigil_proto::sigil::mesh::v1::WatchMembersRequest;
use sigil_proto::sigil::mesh::v1::mesh_discovery_client::MeshDiscoveryClient;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;

const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("connecting to the agent at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent refused the mesh membership stream: {0}")]
    Refused(#[source] tonic::Status),
    #[error("the mesh membership stream broke: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the agent closed the mesh membership stream")]
    Closed,
}

/// Follows the agent's membership for the life of the process.
pub async fn run(
    socket: PathBuf,
    tx: watch::Sender<Option<Arc<MeshSnapshot>>>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    loop {
        let e = follow(&socket, &tx, &metrics, &mut backoff).await;
        let delay = backoff.next_delay();
        warn!(
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            "lost the agent's mesh membership stream; keeping the last membership and reconnecting"
        );
        metrics.mesh_reconnects.inc();
        tokio::time::sleep(delay).await;
    }
}

async fn follow(
    socket: &Path,
    tx: &watch::Sender<Option<Arc<MeshSnapshot>>>,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> MeshError {
    let channel = match sigil_agent::socket_client::connect(socket).await {
        Ok(channel) => channel,
        Err(source) => {
            return MeshError::Connect {
                path: socket.display().to_string(),
                source,
            };
        }
    };
    let mut stream = match MeshDiscoveryClient::new(channel)
        .watch_members(WatchMembersRequest {})
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return MeshError::Refused(status),
    };
    loop {
        let wire = match stream.message().await {
            Ok(Some(wire)) => wire,
            Ok(None) => return MeshError::Closed,
            Err(status) => return MeshError::Stream(status),
        };
        backoff.reset();
        let membership = match MeshSnapshot::from_message(&wire) {
            Ok(membership) => membership,
            // A set with a bad entry is not trusted in part: a member left out would be sent
            // plaintext. Keep the last good set until the agent sends a valid one.
            Err(e) => {
                warn!(error = %e, version = wire.version, "ignoring an invalid mesh membership from the agent; keeping the last one");
                continue;
            }
        };
        info!(
            version = membership.version,
            members = membership.members.len(),
            "mesh membership updated"
        );
        metrics.mesh_members.set(membership.members.len() as i64);
        tx.send_replace(Some(Arc::new(membership)));
    }
}
