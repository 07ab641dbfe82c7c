//! Routes, backend policies and local rate limits as the agent computes them for this workload
//! (`sigil.route.v1.RouteDiscovery`): the agent sends the full set, then only the changed
//! entries; the stream is re-opened with backoff if it breaks, keeping the last table
//! meanwhile. An update with one bad entry is refused whole and counted (the last table stays).
//! An agent without the service (UNIMPLEMENTED) means no routes: every Service is balanced as
//! it is. A new table applies to requests that arrive after it; requests in flight keep the
//! rule they started with, and no connection is touched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sigil_proto::sigil::route::v1::route_discovery_client::RouteDiscoveryClient;
use sigil_proto::sigil::route::v1::{RouteUpdate, WatchRoutesRequest};
use sigil_proxy_api::routes::RouteTable;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::feed;

/// An agent without `WatchRoutes` (older than the proxy) is asked again this rarely: it only
/// gains the service by being replaced, and the proxy works without routes meanwhile.
const OLD_AGENT_RETRY: Duration = Duration::from_secs(60);

/// Follows the agent's routes for the life of the process; `rejected` counts refused updates,
/// `reconnects` lost streams.
pub async fn run(
    socket: PathBuf,
    tx: watch::Sender<Option<Arc<RouteTable>>>,
    rejected: Counter,
    reconnects: Counter,
) {
    let open = |channel| async move {
        let opened = RouteDiscoveryClient::new(channel)
            .watch_routes(WatchRoutesRequest {})
            .await;
        if let Err(status) = &opened
            && status.code() == tonic::Code::Unimplemented
        {
            info!(
                retry_in_s = OLD_AGENT_RETRY.as_secs(),
                "the agent does not publish routes; every Service is balanced as it is"
            );
            tokio::time::sleep(OLD_AGENT_RETRY).await;
        }
        opened
    };
    let on_message = |update: RouteUpdate| {
        let current = tx.borrow().clone().unwrap_or_default();
        match current.apply(&update) {
            Ok(table) => {
                info!(
                    version = table.version,
                    reset = update.reset,
                    ports = table.routes.ports.len(),
                    backends = table.routes.backends.len(),
                    inbound = table.routes.inbound.len(),
                    "routes updated"
                );
                tx.send_replace(Some(Arc::new(table)));
            }
            // One bad entry refuses the whole update: half of a change (a backend removed, the
            // route naming it kept) could send requests where no rule says.
            Err(e) => {
                rejected.inc();
                warn!(error = %e, version = update.version, "ignoring an invalid route update from the agent; keeping the last table");
            }
        }
    };
    feed::follow_forever(socket, "routes", open, on_message, reconnects).await;
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures::{Stream, StreamExt};
    use sigil_proto::sigil::route::v1::route_discovery_server::{
        RouteDiscovery, RouteDiscoveryServer,
    };
    use sigil_proto::sigil::route::v1::{BackendPolicy, RetryBudget};

    use super::*;

    /// An agent that sends `updates`, then keeps the stream open.
    struct Agent {
        updates: Vec<RouteUpdate>,
    }

    #[tonic::async_trait]
    impl RouteDiscovery for Agent {
        type WatchRoutesStream =
            Pin<Box<dyn Stream<Item = Result<RouteUpdate, tonic::Status>> + Send>>;

        async fn watch_routes(
            &self,
            _: tonic::Request<WatchRoutesRequest>,
        ) -> Result<tonic::Response<Self::WatchRoutesStream>, tonic::Status> {
            let updates = futures::stream::iter(self.updates.clone().into_iter().map(Ok));
            Ok(tonic::Response::new(Box::pin(
                updates.chain(futures::stream::pending()),
            )))
        }
    }

    fn backend(name: &str, percent: u32) -> BackendPolicy {
        BackendPolicy {
            namespace: "demo".into(),
            name: name.into(),
            source: "default".into(),
            retry_budget: Some(RetryBudget {
                percent,
                interval_ms: 10_000,
                min_retry_count: 3,
                min_retry_interval_ms: 1_000,
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn updates_apply_in_order_and_a_bad_one_is_counted_and_keeps_the_last_table() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let agent = Agent {
            updates: vec![
                RouteUpdate {
                    version: 1,
                    reset: true,
                    backend_upserts: vec![backend("api", 20)],
                    ..Default::default()
                },
                // Upserted and removed at once: refused whole.
                RouteUpdate {
                    version: 2,
                    backend_upserts: vec![backend("web", 20)],
                    backend_removals: vec!["demo/web".into()],
                    ..Default::default()
                },
                RouteUpdate {
                    version: 3,
                    backend_upserts: vec![backend("db", 50)],
                    ..Default::default()
                },
            ],
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RouteDiscoveryServer::new(agent))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let (tx, mut rx) = watch::channel(None);
        let rejected = Counter::default();
        tokio::spawn(run(socket, tx, rejected.clone(), Counter::default()));
        let table = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|table| table.as_ref().is_some_and(|t| t.version == 3)),
        )
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
        let names: Vec<String> = table
            .routes
            .backends
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["demo/api", "demo/db"]);
        assert_eq!(rejected.get(), 1);
    }
}
