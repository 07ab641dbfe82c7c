//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) on the agent socket, so SPIFFE client libraries
//! (go-spiffe, the `spiffe` crate, py-spiffe) get their X.509-SVID and trust bundle from sigil.
//!
//! As the SPIFFE Workload Endpoint and Workload API standards say: every request must carry the
//! metadata `workload.spiffe.io: true` (else `InvalidArgument`, checked before anything else); the
//! caller is attested from its connection and gets exactly the identity it is entitled to (else
//! `PermissionDenied`, which clients retry); each stream message carries the whole current state,
//! the first one as soon as it exists, then one per rotation and per trust-bundle change.
//!
//! JWT-SVIDs are not issued by sigil's CA yet, so the JWT RPCs answer `Unimplemented` (what the
//! standard expects of an endpoint without a profile) rather than anything made up.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::CertificateDer;
use sigil_identity::TrustBundle;
use sigil_proto::spiffe_workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::certs::{ManagerGone, Svid, SvidWatch};
use crate::metrics::{ApiLabels, Metrics, OpenStream, SocketApi};
use crate::peer::Workloads;
use crate::push_stream::{self, PushFeed, ResponseStream};

/// The metadata key every request must carry, with the value `true`. A client that sets it knows
/// it is talking to the Workload API, which keeps a request smuggled to the socket by some other
/// protocol (SSRF) from obtaining the caller's key.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
const LABELS: ApiLabels = ApiLabels {
    api: SocketApi::WorkloadApi,
};

/// Why a request was refused or a stream ended. The caller is told the message.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("the security header `workload.spiffe.io: true` is missing")]
    MissingSecurityHeader,
    #[error("the agent is shutting down")]
    ShuttingDown(#[from] ManagerGone),
    #[error("JWT-SVIDs are not supported by this agent yet")]
    JwtUnsupported,
}

impl From<WorkloadApiError> for Status {
    fn from(e: WorkloadApiError) -> Self {
        let message = e.to_string();
        match e {
            // Clients do not retry this: the same request would fail again.
            WorkloadApiError::MissingSecurityHeader => Status::invalid_argument(message),
            // Clients retry this, and reach the agent that replaces this one.
            WorkloadApiError::ShuttingDown(_) => Status::unavailable(message),
            WorkloadApiError::JwtUnsupported => Status::unimplemented(message),
        }
    }
}

/// The `SpiffeWorkloadAPI` service over the node's workloads.
pub struct WorkloadApi {
    workloads: Workloads,
}

impl WorkloadApi {
    pub fn new(workloads: Workloads) -> Self {
        WorkloadApi { workloads }
    }

    pub fn into_service(self) -> SpiffeWorkloadApiServer<WorkloadApi> {
        SpiffeWorkloadApiServer::new(self)
    }
}

/// Refuses a request without exactly one `workload.spiffe.io: true` (SPIRE accepts no more).
fn check_security_header<T>(request: &Request<T>) -> Result<(), WorkloadApiError> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.to_str().ok() == Some("true") => Ok(()),
        _ => Err(WorkloadApiError::MissingSecurityHeader),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(&request)?;
        let workload = self.workloads.attest(&request).await?;
        let svid = self
            .workloads
            .certs
            .subscribe(&workload.id)
            .await
            .map_err(WorkloadApiError::from)?;
        info!(identity = %workload.id, "Workload API X.509-SVID stream opened");
        let feed = Feed::new(
            Some(svid),
            self.workloads.bundle.clone(),
            &self.workloads.metrics,
            x509_svid_response,
        );
        Ok(Response::new(push_stream::into_stream(feed)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        // Only attested callers learn what this node trusts, as with SPIRE.
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, "Workload API X.509 bundle stream opened");
        let feed = Feed::new(
            None,
            self.workloads.bundle.clone(),
            &self.workloads.metrics,
            |_, bundle| Some(x509_bundles_response(bundle)),
        );
        Ok(Response::new(push_stream::into_stream(feed)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(WorkloadApiError::JwtUnsupported.into())
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_security_header(&request)?;
        Err(WorkloadApiError::JwtUnsupported.into())
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(WorkloadApiError::JwtUnsupported.into())
    }
}

/// The whole state one stream follows: the caller's certificate (X.509-SVID streams only) and
/// the trust bundle. `render` turns the current state into the message to push, or `None` while
/// there is nothing to push yet (no certificate issued, or one that expired while the CA was
/// unreachable: the next message then comes with its replacement).
struct Feed<T> {
    svid: Option<SvidWatch>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    render: fn(Option<&Svid>, &TrustBundle) -> Option<T>,
    /// Whether the state has not been looked at yet: the first message goes out without waiting
    /// for a change.
    unseen: bool,
    pushes: Counter,
    _open: OpenStream,
}

impl<T: Send + 'static> Feed<T> {
    fn new(
        svid: Option<SvidWatch>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        metrics: &Metrics,
        render: fn(Option<&Svid>, &TrustBundle) -> Option<T>,
    ) -> Self {
        Feed {
            svid,
            bundle,
            render,
            unseen: true,
            pushes: metrics.pushes.get_or_create(&LABELS).clone(),
            _open: OpenStream::new(metrics, SocketApi::WorkloadApi),
        }
    }
}

impl<T: Send + 'static> PushFeed for Feed<T> {
    type Message = T;
    type Error = WorkloadApiError;

    /// The next message: at once for the first, else on the next change worth a message. Both
    /// receivers always hold the newest value, so a client that reads slowly gets the latest
    /// state, never a backlog of stale ones.
    async fn next_message(&mut self) -> Result<T, WorkloadApiError> {
        loop {
            if !self.unseen {
                let (svid, bundle) = (&mut self.svid, &mut self.bundle);
                let svid_changed = async {
                    match svid {
                        Some(svid) => svid.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = svid_changed => changed.map_err(|_| ManagerGone)?,
                    // The bundle's sender lives as long as the agent does.
                    changed = bundle.changed() => changed.map_err(|_| ManagerGone)?,
                }
            }
            self.unseen = false;
            let svid = self
                .svid
                .as_mut()
                .and_then(|svid| svid.borrow_and_update().clone());
            let bundle = self.bundle.borrow_and_update().clone();
            // An empty bundle would tell the workload to trust nothing; wait for the real one.
            if bundle.roots.is_empty() {
                continue;
            }
            if let Some(message) = (self.render)(svid.as_deref(), &bundle) {
                return Ok(message);
            }
        }
    }

    fn pushes(&self) -> &Counter {
        &self.pushes
    }
}

/// DER certificates back to back, as the Workload API carries chains and bundles.
fn concat_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// The caller's one identity (so also `svids[0]`, the default), with its own trust domain's
/// bundle. sigil does not federate, so there are no federated bundles.
fn x509_svid_response(svid: Option<&Svid>, bundle: &TrustBundle) -> Option<X509svidResponse> {
    let svid = svid?;
    Some(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: concat_der(&svid.chain),
            x509_svid_key: svid.key_pkcs8().to_vec(),
            bundle: concat_der(&bundle.roots),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    })
}

/// The bundle keyed by the trust domain's SPIFFE ID (`spiffe://cluster.local`), as the standard
/// and SPIRE key it; client libraries also accept the bare name.
fn x509_bundles_response(bundle: &TrustBundle) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(
            bundle.trust_domain.id().to_string(),
            concat_der(&bundle.roots),
        )]),
    }
}

#[cfg(test)]
mod tests;
