//! Who is on the other end of a request on the agent socket: the connection's peer credentials
//! (SO_PEERCRED, recorded by tonic for Unix sockets) attested into a workload identity. Shared by
//! every API served on the socket, so they all decide "who is this" the same way.

use std::sync::Arc;

use sigil_identity::TrustBundle;
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::server::UdsConnectInfo;
use tracing::warn;

use crate::attest::{Attestor, Caller, Workload};
use crate::certs::CertManager;
use crate::metrics::Metrics;

/// What the socket's APIs need: attestation, certificates and the trust bundle.
#[derive(Clone)]
pub struct Workloads {
    attestor: Arc<Attestor>,
    pub certs: CertManager,
    pub bundle: watch::Receiver<Arc<TrustBundle>>,
    pub metrics: Arc<Metrics>,
}

impl Workloads {
    pub fn new(
        attestor: Arc<Attestor>,
        certs: CertManager,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Workloads {
            attestor,
            certs,
            bundle,
            metrics,
        }
    }

    /// The workload behind `request`'s connection. Callers learn only that attestation failed;
    /// the log says why.
    pub async fn attest<T>(&self, request: &tonic::Request<T>) -> Result<Workload, Status> {
        let caller = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(Caller::from)
            .ok_or_else(|| {
                self.metrics.attestation_failures.inc();
                warn!("request without peer credentials (not on the agent's Unix socket)");
                Status::permission_denied("caller could not be attested")
            })?;
        self.attestor.attest(&caller).await.map_err(|e| {
            self.metrics.attestation_failures.inc();
            warn!(pid = caller.pid, uid = caller.uid, error = %e, "attestation failed");
            Status::permission_denied("caller could not be attested")
        })
    }
}
