//! Envoy's Secret Discovery Service (SDS v3) on the agent socket: `default` (the caller's
//! certificate chain and key), `ROOTCA` (the trust bundle as a validation context) and the
//! caller's own SPIFFE ID, over StreamSecrets (state of the world), DeltaSecrets (incremental)
//! and FetchSecrets.
//!
//! The caller is attested once per stream, from its connection; which secrets it may have
//! follows from that alone, never from the names or the node in its requests. Every stream holds
//! its own receivers of the certificate and the bundle it serves, so one rotation wakes all of
//! them at once, and a request that arrives before the certificate exists is answered as soon as
//! it does (istio#22443 was a lost push in exactly that case).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::util::pack_any;
use sigil_identity::{SpiffeId, TrustBundle};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use sigil_proxy_api::sds::{DEFAULT_CERTIFICATE, ROOT_CA, TYPE_URL};

use crate::attest::Workload;
use crate::certs::{CertManager, Svid, SvidWatch};
use crate::metrics::{ApiLabels, Metrics, OpenStream, SocketApi};
use crate::peer::Workloads;

/// Largest request accepted; Envoy's are a few KiB (mostly node metadata).
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// How long FetchSecrets waits for a certificate that is still being issued.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// Responses queued per stream before the stream task waits for the client to read them.
const STREAM_BUFFER: usize = 4;
const LABELS: ApiLabels = ApiLabels {
    api: SocketApi::Sds,
};

/// Why a request was refused or a stream ended. The caller is told the message.
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    #[error(
        "unknown resource name {0:?}: this agent serves \"default\", \"ROOTCA\" and the caller's own SPIFFE ID"
    )]
    UnknownName(String),
    #[error("resource name {name:?} is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId { name: String, reason: String },
    #[error("{requested} is not this caller's identity; it may only ask for its own ({caller})")]
    NotEntitled {
        requested: SpiffeId,
        caller: SpiffeId,
    },
    #[error("type_url {0:?} is not {TYPE_URL}")]
    WrongType(String),
    #[error("no resource names requested")]
    NoNames,
    #[error("no certificate for {0} yet; retry")]
    NotReady(SpiffeId),
    #[error("the certificate manager has stopped")]
    ManagerGone,
    #[error("the trust bundle is no longer followed")]
    BundleGone,
}

impl From<SdsError> for Status {
    fn from(e: SdsError) -> Status {
        let message = e.to_string();
        match e {
            SdsError::UnknownName(_)
            | SdsError::InvalidSpiffeId { .. }
            | SdsError::WrongType(_)
            | SdsError::NoNames => Status::invalid_argument(message),
            SdsError::NotEntitled { .. } => Status::permission_denied(message),
            SdsError::NotReady(_) | SdsError::ManagerGone | SdsError::BundleGone => {
                Status::unavailable(message)
            }
        }
    }
}

/// The SDS service; one per agent socket.
pub struct Sds {
    workloads: Workloads,
}

impl Sds {
    pub fn new(workloads: Workloads) -> Self {
        Sds { workloads }
    }

    pub fn into_service(self) -> SecretDiscoveryServiceServer<Sds> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn sources(&self, workload: &Workload) -> Sources {
        Sources {
            caller: workload.id.clone(),
            certs: self.workloads.certs.clone(),
            svid: None,
            bundle: self.workloads.bundle.clone(),
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, pod = ?workload.pod, "SDS stream opened");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = SotwStream {
            sources: self.sources(&workload),
            names: BTreeMap::new(),
            nonces: Nonces::default(),
            sent_version: None,
            metrics: self.workloads.metrics.clone(),
        };
        tokio::spawn(serve_stream(stream, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let workload = self.workloads.attest(&request).await?;
        info!(identity = %workload.id, pod = ?workload.pod, "SDS delta stream opened");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = DeltaStream {
            sources: self.sources(&workload),
            subscribed: BTreeMap::new(),
            client_has: HashMap::new(),
            nonces: Nonces::default(),
            metrics: self.workloads.metrics.clone(),
        };
        tokio::spawn(serve_stream(stream, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let workload = self.workloads.attest(&request).await?;
        let request = request.into_inner();
        let refuse = |e: SdsError| {
            warn!(identity = %workload.id, error = %e, "SDS fetch refused");
            Status::from(e)
        };
        check_type(&request.type_url).map_err(refuse)?;
        if request.resource_names.is_empty() {
            return Err(refuse(SdsError::NoNames));
        }
        let mut sources = self.sources(&workload);
        let mut names = BTreeMap::new();
        for name in request.resource_names {
            let source = sources.want(&name).await.map_err(refuse)?;
            names.insert(name, source);
        }
        let wait = async {
            loop {
                if let Some(secrets) = sources.all(&names)? {
                    return Ok(secrets);
                }
                sources.changed().await?;
            }
        };
        let secrets = tokio::time::timeout(FETCH_WAIT, wait)
            .await
            .unwrap_or_else(|_| Err(SdsError::NotReady(workload.id.clone())))
            .map_err(refuse)?;
        debug!(identity = %workload.id, names = ?names.keys().collect::<Vec<_>>(), "SDS fetch answered");
        Ok(Response::new(DiscoveryResponse {
            version_info: combined_version(&secrets),
            resources: secrets.into_iter().map(|s| pack_any(s.secret)).collect(),
            type_url: TYPE_URL.into(),
            ..Default::default()
        }))
    }
}

/// What a resource name stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The caller's certificate (`default`, or its SPIFFE ID spelled out).
    Certificate,
    /// The trust bundle (`ROOTCA`).
    Bundle,
}

/// Decides what `name` means for a caller attested as `caller`, refusing any other identity.
fn source_of(name: &str, caller: &SpiffeId) -> Result<Source, SdsError> {
    match name {
        DEFAULT_CERTIFICATE => Ok(Source::Certificate),
        ROOT_CA => Ok(Source::Bundle),
        _ if name.starts_with("spiffe://") => {
            let requested = SpiffeId::parse(name).map_err(|e| SdsError::InvalidSpiffeId {
                name: name.into(),
                reason: e.to_string(),
            })?;
            if &requested == caller {
                Ok(Source::Certificate)
            } else {
                Err(SdsError::NotEntitled {
                    requested,
                    caller: caller.clone(),
                })
            }
        }
        _ => Err(SdsError::UnknownName(name.into())),
    }
}

/// Envoy names the type on every SDS request; other clients may leave it out.
fn check_type(type_url: &str) -> Result<(), SdsError> {
    if type_url.is_empty() || type_url == TYPE_URL {
        Ok(())
    } else {
        Err(SdsError::WrongType(type_url.into()))
    }
}

/// One secret as sent, with the version of its contents.
struct Built {
    name: String,
    version: String,
    secret: Secret,
}

/// The certificate and bundle behind one stream's (or fetch's) secrets.
struct Sources {
    caller: SpiffeId,
    certs: CertManager,
    /// Subscribed when a certificate is first asked for, so a caller that only wants `ROOTCA`
    /// does not make the agent fetch a certificate.
    svid: Option<SvidWatch>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
}

impl Sources {
    /// Checks that the caller may have `name` and starts watching what it needs.
    async fn want(&mut self, name: &str) -> Result<Source, SdsError> {
        let source = source_of(name, &self.caller)?;
        if source == Source::Certificate && self.svid.is_none() {
            let watch = self
                .certs
                .subscribe(&self.caller)
                .await
                .map_err(|_| SdsError::ManagerGone)?;
            self.svid = Some(watch);
        }
        Ok(source)
    }

    /// The secret `name` as it is now; `None` while its certificate has not been issued yet.
    fn current(&self, name: &str, source: Source) -> Result<Option<Built>, SdsError> {
        match source {
            Source::Certificate => {
                let svid = self.svid.as_ref().and_then(|w| w.borrow().clone());
                Ok(svid.map(|svid| certificate_secret(name, &svid)))
            }
            Source::Bundle => {
                let bundle = self.bundle.borrow().clone();
                Ok((!bundle.roots.is_empty()).then(|| bundle_secret(name, &bundle)))
            }
        }
    }

    /// Every secret of `names`, or `None` until all of them exist.
    fn all(&self, names: &BTreeMap<String, Source>) -> Result<Option<Vec<Built>>, SdsError> {
        let mut secrets = Vec::with_capacity(names.len());
        for (name, source) in names {
            match self.current(name, *source)? {
                Some(secret) => secrets.push(secret),
                None => return Ok(None),
            }
        }
        Ok(Some(secrets))
    }

    /// Waits until the certificate or the bundle changes. Cancel-safe.
    async fn changed(&mut self) -> Result<(), SdsError> {
        let Sources { svid, bundle, .. } = self;
        let svid = async {
            match svid.as_mut() {
                Some(watch) => watch.changed().await.map_err(|_| SdsError::ManagerGone),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = svid => changed,
            changed = bundle.changed() => changed.map_err(|_| SdsError::BundleGone),
        }
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn certificate_secret(name: &str, svid: &Svid) -> Built {
    // Envoy wants PEM; the certificate manager made it once per certificate.
    let (chain_pem, key_pem) = (svid.chain_pem().to_string(), svid.key_pem().to_string());
    Built {
        name: name.into(),
        // The chain is public and changes with every issuance (new key, new serial), so its
        // digest versions the key too without hashing the key itself.
        version: digest(svid.chain.iter().map(|c| c.as_ref())),
        secret: Secret {
            name: name.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain_pem.into_bytes()),
                private_key: inline(key_pem.into_bytes()),
                ..Default::default()
            })),
        },
    }
}

fn bundle_secret(name: &str, bundle: &TrustBundle) -> Built {
    Built {
        name: name.into(),
        version: digest(bundle.roots.iter().map(|c| c.as_ref())),
        secret: Secret {
            name: name.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(bundle.to_pem().into_bytes()),
                    ..Default::default()
                },
            )),
        },
    }
}

/// A short content version: SHA-256 over the length-prefixed parts, first 8 bytes in hex.
fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    sigil_identity::profile::hex(&context.finish().as_ref()[..8])
}

/// The version of a whole state-of-the-world response: changes when any secret in it changes,
/// or when the set of names does.
fn combined_version(secrets: &[Built]) -> String {
    digest(
        secrets
            .iter()
            .flat_map(|s| [s.name.as_bytes(), s.version.as_bytes()]),
    )
}

/// The protocol-specific half of a stream; [`serve_stream`] does the waiting.
trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;

    fn sources(&mut self) -> &mut Sources;
    fn metrics(&self) -> &Metrics;
    /// Applies a request from the client.
    fn on_request(
        &mut self,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), SdsError>> + Send;
    /// The response the client is owed now, if any.
    fn next_response(&mut self) -> Result<Option<Self::Response>, SdsError>;
}

enum Event<R> {
    Request(Result<Option<R>, Status>),
    SourceChanged(Result<(), SdsError>),
    ClientGone,
}

/// Runs one stream until the client goes away or a request is refused: after every request and
/// every change of the certificate or bundle, sends whatever the client is owed.
async fn serve_stream<P: Protocol>(
    mut stream: P,
    mut requests: Streaming<P::Request>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let _open = OpenStream::new(stream.metrics(), SocketApi::Sds);
    let caller = stream.sources().caller.clone();
    let ended: Result<(), Status> = loop {
        let event = tokio::select! {
            request = requests.message() => Event::Request(request),
            changed = stream.sources().changed() => Event::SourceChanged(changed),
            () = tx.closed() => Event::ClientGone,
        };
        let applied = match event {
            Event::Request(Ok(Some(request))) => stream.on_request(request).await,
            Event::Request(Ok(None)) | Event::ClientGone => break Ok(()),
            Event::Request(Err(status)) => break Err(status),
            Event::SourceChanged(changed) => changed,
        };
        let response = match applied.and_then(|()| stream.next_response()) {
            Ok(response) => response,
            Err(e) => {
                warn!(identity = %caller, error = %e, "SDS stream refused");
                break Err(e.into());
            }
        };
        if let Some(response) = response {
            if tx.send(Ok(response)).await.is_err() {
                break Ok(());
            }
            stream.metrics().pushes.get_or_create(&LABELS).inc();
        }
    };
    match ended {
        Ok(()) => info!(identity = %caller, "SDS stream closed"),
        Err(status) => {
            debug!(identity = %caller, status = %status, "SDS stream ended");
            let _ = tx.send(Err(status)).await;
        }
    }
}

/// Where a request's `response_nonce` stands relative to the last response sent.
#[derive(Debug, PartialEq, Eq)]
enum NonceState {
    /// No nonce, or nothing sent yet: a new request.
    Fresh,
    /// The latest response's nonce: an ACK, or a NACK if `error_detail` is set.
    Latest,
    /// An older response's nonce: superseded by a response the client has not seen yet.
    Stale,
}

/// The nonces one stream has sent: the n-th response carries nonce "n", so the latest one
/// follows from the count.
#[derive(Default)]
struct Nonces {
    sent: u64,
}

impl Nonces {
    /// Where a request's `response_nonce` stands; a NACK of the latest response (its
    /// `error_detail`) is logged and counted here.
    fn on_request(
        &self,
        nonce: &str,
        error: Option<&envoy_types::pb::google::rpc::Status>,
        metrics: &Metrics,
        caller: &SpiffeId,
    ) -> NonceState {
        let state = if nonce.is_empty() || self.sent == 0 {
            NonceState::Fresh
        } else if nonce == self.sent.to_string() {
            NonceState::Latest
        } else {
            NonceState::Stale
        };
        if let (NonceState::Latest, Some(error)) = (&state, error) {
            metrics.nacks.inc();
            warn!(identity = %caller, nonce, error = %error.message, "Envoy rejected the secrets sent (NACK)");
        }
        state
    }

    /// The nonce of the next response.
    fn next(&mut self) -> String {
        self.sent += 1;
        self.sent.to_string()
    }
}

/// StreamSecrets: every request names the full set wanted, every response carries all of it.
struct SotwStream {
    sources: Sources,
    names: BTreeMap<String, Source>,
    nonces: Nonces,
    /// The version of the last response; the same contents are never sent twice (so a NACKed
    /// response is not repeated until something changes).
    sent_version: Option<String>,
    metrics: Arc<Metrics>,
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn sources(&mut self) -> &mut Sources {
        &mut self.sources
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), SdsError> {
        check_type(&request.type_url)?;
        let nonce = &request.response_nonce;
        let state = self.nonces.on_request(
            nonce,
            request.error_detail.as_ref(),
            &self.metrics,
            &self.sources.caller,
        );
        if state == NonceState::Stale {
            // xDS: a response the client has not processed yet supersedes this request.
            debug!(identity = %self.sources.caller, nonce, "ignoring a request with a stale nonce");
            return Ok(());
        }
        let mut names = BTreeMap::new();
        for name in request.resource_names {
            let source = self.sources.want(&name).await?;
            names.insert(name, source);
        }
        self.names = names;
        Ok(())
    }

    fn next_response(&mut self) -> Result<Option<DiscoveryResponse>, SdsError> {
        // Envoy always names its SDS resources: an empty set is nothing to send yet.
        if self.names.is_empty() {
            return Ok(None);
        }
        let Some(secrets) = self.sources.all(&self.names)? else {
            return Ok(None);
        };
        let version = combined_version(&secrets);
        if self.sent_version.as_ref() == Some(&version) {
            return Ok(None);
        }
        let nonce = self.nonces.next();
        debug!(identity = %self.sources.caller, version, nonce, names = ?self.names.keys().collect::<Vec<_>>(), "pushing secrets");
        self.sent_version = Some(version.clone());
        Ok(Some(DiscoveryResponse {
            version_info: version,
            resources: secrets.into_iter().map(|s| pack_any(s.secret)).collect(),
            type_url: TYPE_URL.into(),
            nonce,
            ..Default::default()
        }))
    }
}

/// DeltaSecrets: the client subscribes and unsubscribes names; responses carry only what changed.
struct DeltaStream {
    sources: Sources,
    subscribed: BTreeMap<String, Source>,
    /// The version of each secret the client holds: sent on this stream, or declared in
    /// `initial_resource_versions` when it reconnects.
    client_has: HashMap<String, String>,
    nonces: Nonces,
    metrics: Arc<Metrics>,
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn sources(&mut self) -> &mut Sources {
        &mut self.sources
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), SdsError> {
        check_type(&request.type_url)?;
        let nonce = &request.response_nonce;
        let state = self.nonces.on_request(
            nonce,
            request.error_detail.as_ref(),
            &self.metrics,
            &self.sources.caller,
        );
        // Subscription changes are deltas, not a state a newer response supersedes: they are
        // applied whatever the nonce; only the ACK/NACK of a stale nonce is ignored.
        if state == NonceState::Stale {
            debug!(identity = %self.sources.caller, nonce, "stale nonce; applying only its subscription changes");
        }
        for name in &request.resource_names_unsubscribe {
            self.subscribed.remove(name);
            // Sent again in full if it is subscribed again.
            self.client_has.remove(name);
        }
        for name in request.resource_names_subscribe {
            let source = self.sources.want(&name).await?;
            self.subscribed.insert(name, source);
        }
        for (name, version) in request.initial_resource_versions {
            if self.subscribed.contains_key(&name) {
                self.client_has.insert(name, version);
            }
        }
        Ok(())
    }

    fn next_response(&mut self) -> Result<Option<DeltaDiscoveryResponse>, SdsError> {
        let mut changed = Vec::new();
        for (name, source) in &self.subscribed {
            if let Some(built) = self.sources.current(name, *source)?
                && self.client_has.get(name) != Some(&built.version)
            {
                changed.push(built);
            }
        }
        if changed.is_empty() {
            return Ok(None);
        }
        let nonce = self.nonces.next();
        debug!(identity = %self.sources.caller, nonce, names = ?changed.iter().map(|b| &b.name).collect::<Vec<_>>(), "pushing changed secrets");
        let resources = changed
            .into_iter()
            .map(|built| {
                self.client_has
                    .insert(built.name.clone(), built.version.clone());
                Resource {
                    name: built.name,
                    version: built.version,
                    resource: Some(pack_any(built.secret)),
                    ..Default::default()
                }
            })
            .collect();
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: nonce.clone(),
            resources,
            type_url: TYPE_URL.into(),
            nonce,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests;
