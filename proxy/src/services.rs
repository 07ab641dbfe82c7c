//! Meshed Services as the agent reports them (`sigil.mesh.v1.ServiceDiscovery`): each Service's
//! cluster IPs, ports with their declared protocols, and endpoints with the identity each must
//! prove. The outbound side looks a connection's original destination up here to balance it
//! over the Service's endpoints; the agent sends the full set, then only the changes, and the
//! stream is re-opened with backoff if it breaks, keeping the last table meanwhile. An agent
//! without the service (UNIMPLEMENTED) leaves the table empty: every destination then keeps the
//! connection-level path (membership and the kernel's DNAT).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sigil_identity::TrustDomain;
use sigil_proto::sigil::mesh::v1::service_discovery_client::ServiceDiscoveryClient;
use sigil_proto::sigil::mesh::v1::{ServiceUpdate, WatchServicesRequest};
use sigil_proxy_api::services::ServiceTable;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::feed;
use crate::tls::TlsState;

/// An agent without `WatchServices` (older than the proxy) is asked again this rarely: it only
/// gains the service by being replaced, and the proxy works without it meanwhile.
const OLD_AGENT_RETRY: Duration = Duration::from_secs(60);

/// Follows the agent's meshed Services for the life of the process. Updates are checked against
/// our trust domain, so following starts once the first certificate arrived.
pub async fn run(
    socket: PathBuf,
    mut tls: watch::Receiver<Option<Arc<TlsState>>>,
    tx: watch::Sender<Option<Arc<ServiceTable>>>,
    reconnects: Counter,
) {
    let trust_domain = match tls.wait_for(Option::is_some).await {
        Ok(state) => match state.as_ref() {
            Some(state) => state.bundle.trust_domain.clone(),
            None => return,
        },
        // The certificate feed is gone: the proxy is stopping.
        Err(_) => return,
    };
    follow(socket, trust_domain, tx, reconnects).await;
}

/// Follows the stream for the life of the process, checking updates against `trust_domain`.
async fn follow(
    socket: PathBuf,
    trust_domain: TrustDomain,
    tx: watch::Sender<Option<Arc<ServiceTable>>>,
    reconnects: Counter,
) {
    let open = |channel| async move {
        let opened = ServiceDiscoveryClient::new(channel)
            .watch_services(WatchServicesRequest {})
            .await;
        if let Err(status) = &opened
            && status.code() == tonic::Code::Unimplemented
        {
            info!(
                retry_in_s = OLD_AGENT_RETRY.as_secs(),
                "the agent does not publish meshed Services; outbound stays per connection"
            );
            tokio::time::sleep(OLD_AGENT_RETRY).await;
        }
        opened
    };
    let on_message = |update: ServiceUpdate| {
        let current = tx.borrow().clone().unwrap_or_default();
        match current.apply(&update, &trust_domain) {
            Ok(table) => {
                info!(
                    version = table.version,
                    reset = update.reset,
                    services = table.services().count(),
                    "meshed Services updated"
                );
                tx.send_replace(Some(Arc::new(table)));
            }
            // One bad entry refuses the whole update: a half-applied one could send requests
            // to an endpoint with the wrong identity expected.
            Err(e) => {
                warn!(error = %e, version = update.version, "ignoring an invalid Service update from the agent; keeping the last table");
            }
        }
    };
    feed::follow_forever(socket, "meshed services", open, on_message, reconnects).await;
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures::{Stream, StreamExt};
    use sigil_proto::sigil::mesh::v1::service_discovery_server::{
        ServiceDiscovery, ServiceDiscoveryServer,
    };
    use sigil_proto::sigil::mesh::v1::{Endpoint, MeshService, ServicePort};
    use sigil_proxy_api::services::ServiceKey;

    use super::*;

    /// An agent that sends `updates`, then keeps the stream open.
    struct Agent {
        updates: Vec<ServiceUpdate>,
    }

    #[tonic::async_trait]
    impl ServiceDiscovery for Agent {
        type WatchServicesStream =
            Pin<Box<dyn Stream<Item = Result<ServiceUpdate, tonic::Status>> + Send>>;

        async fn watch_services(
            &self,
            _: tonic::Request<WatchServicesRequest>,
        ) -> Result<tonic::Response<Self::WatchServicesStream>, tonic::Status> {
            let updates = futures::stream::iter(self.updates.clone().into_iter().map(Ok));
            Ok(tonic::Response::new(Box::pin(
                updates.chain(futures::stream::pending()),
            )))
        }
    }

    fn service(name: &str, endpoint_id: &str) -> MeshService {
        MeshService {
            namespace: "demo".into(),
            name: name.into(),
            cluster_ips: vec!["198.19.0.10".into()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                ..Default::default()
            }],
            endpoints: vec![Endpoint {
                ip: "198.18.0.2".into(),
                spiffe_id: endpoint_id.into(),
                ready: true,
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn updates_apply_in_order_and_a_bad_one_keeps_the_last_table() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let api = "spiffe://cluster.local/ns/demo/sa/api";
        let agent = Agent {
            updates: vec![
                ServiceUpdate {
                    version: 1,
                    reset: true,
                    upserts: vec![service("api", api)],
                    removals: vec![],
                },
                // An endpoint of another trust domain: the whole update is refused.
                ServiceUpdate {
                    version: 2,
                    reset: false,
                    upserts: vec![service("bad", "spiffe://other.example/ns/demo/sa/x")],
                    removals: vec!["demo/api".into()],
                },
                ServiceUpdate {
                    version: 3,
                    reset: false,
                    upserts: vec![service("web", api)],
                    removals: vec![],
                },
            ],
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ServiceDiscoveryServer::new(agent))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let (tx, mut rx) = watch::channel(None);
        let trust_domain = TrustDomain::new("cluster.local").unwrap();
        tokio::spawn(follow(socket, trust_domain, tx, Counter::default()));
        let table = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|table| table.as_ref().is_some_and(|t| t.version == 3)),
        )
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
        let keys: Vec<String> = table.services().map(|s| s.key.to_string()).collect();
        assert_eq!(keys, ["demo/api", "demo/web"]);
        assert!(table.get(&ServiceKey::new("demo", "bad")).is_none());
    }
}
