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
mod tests {
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc;
    use prost::Message;
    use sigil_identity::tls::CertifiedKey;
    use tonic::Code;
    use tonic::transport::Channel;

    use super::*;
    use crate::test_support::{
        BundleSource, DB_ID, TestAgent, TestCa, WEB_ID, td, this_uid, uid_is_web,
    };

    /// Long enough that no rotation happens during a test that checks nothing is sent.
    const NO_ROTATION: Duration = Duration::from_secs(3600);
    /// Renewed at half life: a new certificate about every 2 s.
    const FAST_ROTATION: Duration = Duration::from_secs(4);
    const QUIET: Duration = Duration::from_millis(700);

    /// SDS in front of a started CA, this test process's uid attested as `web`.
    async fn start(ttl: Duration) -> TestAgent {
        with_ca(TestCa::started().await, ttl, this_uid()).await
    }

    /// SDS in front of `ca` (started or not), `uid` attested as `web`; the trust bundle changes
    /// only when a test sends one.
    async fn with_ca(ca: TestCa, ttl: Duration, uid: u32) -> TestAgent {
        TestAgent::serve(
            SocketApi::Sds,
            ca,
            ttl,
            &uid_is_web(uid),
            BundleSource::Test,
        )
        .await
    }

    impl TestAgent {
        async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
            SecretDiscoveryServiceClient::new(self.channel().await)
        }

        async fn sotw(&self) -> Stream<DiscoveryRequest, DiscoveryResponse> {
            let (requests, rx) = mpsc::channel(8);
            let responses = self
                .client()
                .await
                .stream_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            Stream {
                requests,
                responses,
            }
        }

        async fn delta(&self) -> Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
            let (requests, rx) = mpsc::channel(8);
            let responses = self
                .client()
                .await
                .delta_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            Stream {
                requests,
                responses,
            }
        }

        /// The certificate the agent holds for `web` (the one SDS must serve).
        async fn web_svid(&self) -> Arc<Svid> {
            let mut watch = self
                .certs
                .subscribe(&WEB_ID.parse().unwrap())
                .await
                .unwrap();
            let held =
                tokio::time::timeout(Duration::from_secs(10), watch.wait_for(Option::is_some))
                    .await
                    .expect("web's certificate within 10 s")
                    .unwrap()
                    .clone();
            held.unwrap()
        }
    }

    /// One client stream, as Envoy holds it.
    struct Stream<Req, Resp> {
        requests: mpsc::Sender<Req>,
        responses: Streaming<Resp>,
    }

    impl<Req, Resp> Stream<Req, Resp> {
        async fn send(&self, request: Req) {
            self.requests.send(request).await.unwrap();
        }

        /// The next message, or the status that ended the stream.
        async fn next(&mut self) -> Result<Resp, Status> {
            match tokio::time::timeout(Duration::from_secs(15), self.responses.message()).await {
                Err(_) => panic!("nothing received within 15 s"),
                Ok(Ok(Some(response))) => Ok(response),
                Ok(Ok(None)) => panic!("the stream ended without a status"),
                Ok(Err(status)) => Err(status),
            }
        }

        async fn assert_quiet(&mut self, what: &str) {
            if let Ok(got) = tokio::time::timeout(QUIET, self.responses.message()).await {
                panic!(
                    "{what}: expected nothing, got {}",
                    match got {
                        Ok(Some(_)) => "a response".to_string(),
                        Ok(None) => "the end of the stream".to_string(),
                        Err(status) => format!("{status:?}"),
                    }
                );
            }
        }
    }

    fn sotw_request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn ack(response: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
        sotw_request(names, &response.version_info, &response.nonce)
    }

    fn nack(
        response: &DiscoveryResponse,
        names: &[&str],
        previous_version: &str,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(rpc::Status {
                code: Code::InvalidArgument as i32,
                message: "Failed to load certificate chain".into(),
                details: Vec::new(),
            }),
            ..sotw_request(names, previous_version, &response.nonce)
        }
    }

    fn unpack(resource: &Any) -> Secret {
        assert_eq!(resource.type_url, TYPE_URL);
        Secret::decode(resource.value.as_slice()).expect("a Secret")
    }

    fn secrets(response: &DiscoveryResponse) -> BTreeMap<String, Secret> {
        assert_eq!(response.type_url, TYPE_URL);
        response
            .resources
            .iter()
            .map(unpack)
            .map(|s| (s.name.clone(), s))
            .collect()
    }

    fn inline_bytes(source: &Option<DataSource>) -> String {
        match source.as_ref().and_then(|s| s.specifier.as_ref()) {
            Some(data_source::Specifier::InlineBytes(bytes)) => {
                String::from_utf8(bytes.clone()).unwrap()
            }
            other => panic!("not inline bytes: {other:?}"),
        }
    }

    /// The chain and key PEM of a `tls_certificate` secret.
    fn tls_certificate(secret: &Secret) -> (String, String) {
        match &secret.r#type {
            Some(secret::Type::TlsCertificate(tls)) => (
                inline_bytes(&tls.certificate_chain),
                inline_bytes(&tls.private_key),
            ),
            _ => panic!("{} is not a TLS certificate", secret.name),
        }
    }

    fn trusted_ca(secret: &Secret) -> String {
        match &secret.r#type {
            Some(secret::Type::ValidationContext(context)) => inline_bytes(&context.trusted_ca),
            _ => panic!("{} is not a validation context", secret.name),
        }
    }

    /// Checks a certificate secret holds exactly `svid`: its chain and its PKCS#8 key, in PEM,
    /// and that the leaf is `web`'s.
    fn assert_serves(secret: &Secret, svid: &Svid) {
        let (chain_pem, key_pem) = tls_certificate(secret);
        let parsed = CertifiedKey::from_pem(&chain_pem, &key_pem).expect("PEM Envoy can load");
        assert_eq!(parsed.chain, svid.chain);
        let key = pem::parse(&key_pem).unwrap();
        assert_eq!(key.tag(), "PRIVATE KEY");
        assert_eq!(key.contents(), svid.key_pkcs8());
        let leaf_id = sigil_identity::profile::leaf_spiffe_id(&parsed.chain[0]).unwrap();
        assert_eq!(leaf_id.to_string(), WEB_ID);
    }

    fn assert_bundle(secret: &Secret, bundle: &TrustBundle) {
        let served = TrustBundle::from_pem(td(), &trusted_ca(secret)).unwrap();
        assert_eq!(served.roots, bundle.roots);
    }

    fn leaf_serial(secret: &Secret) -> Vec<u8> {
        let (chain_pem, key_pem) = tls_certificate(secret);
        CertifiedKey::from_pem(&chain_pem, &key_pem).unwrap().chain[0].to_vec()
    }

    #[tokio::test]
    async fn stream_pushes_default_and_rootca_then_stays_quiet_on_ack() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.sotw().await;
        stream
            .send(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
            .await;
        let first = stream.next().await.unwrap();
        assert!(!first.version_info.is_empty() && !first.nonce.is_empty());
        let secrets = secrets(&first);
        assert_eq!(secrets.len(), 2);
        assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
        assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
        assert_eq!(agent.streams_open(), 1);
        assert_eq!(agent.pushes(), 1);

        stream
            .send(ack(&first, &[DEFAULT_CERTIFICATE, ROOT_CA]))
            .await;
        stream.assert_quiet("after an ACK").await;
        assert_eq!(agent.pushes(), 1);

        // The client goes away: the stream task ends and the gauge follows.
        drop(stream);
        for _ in 0..100 {
            if agent.streams_open() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the streams gauge stayed at {}", agent.streams_open());
    }

    #[tokio::test]
    async fn stream_serves_the_callers_own_spiffe_id_by_name() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.sotw().await;
        stream.send(sotw_request(&[WEB_ID], "", "")).await;
        let response = stream.next().await.unwrap();
        let secrets = secrets(&response);
        assert_eq!(secrets.keys().collect::<Vec<_>>(), [WEB_ID]);
        assert_serves(&secrets[WEB_ID], &*agent.web_svid().await);
    }

    #[tokio::test]
    async fn stream_pushes_every_rotation_with_a_new_version_and_nonce() {
        let agent = start(FAST_ROTATION).await;
        let mut stream = agent.sotw().await;
        let names = [DEFAULT_CERTIFICATE, ROOT_CA];
        stream.send(sotw_request(&names, "", "")).await;
        let first = stream.next().await.unwrap();
        stream.send(ack(&first, &names)).await;
        let second = stream
            .next()
            .await
            .expect("the renewed certificate is pushed");
        assert_ne!(second.version_info, first.version_info);
        assert_ne!(second.nonce, first.nonce);
        let (before, after) = (secrets(&first), secrets(&second));
        assert_eq!(
            after.len(),
            2,
            "state of the world: every name, changed or not"
        );
        assert_ne!(
            leaf_serial(&after[DEFAULT_CERTIFICATE]),
            leaf_serial(&before[DEFAULT_CERTIFICATE])
        );
        assert_eq!(after[ROOT_CA], before[ROOT_CA]);
        assert_serves(&after[DEFAULT_CERTIFICATE], &*agent.web_svid().await);

        // A bundle change (a root rotation reaching the agent) is pushed too.
        stream.send(ack(&second, &names)).await;
        let mut next_root = rcgen::CertificateParams::default();
        next_root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let next_root = next_root
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let mut grown = agent.ca.bundle.clone();
        grown.roots.push(next_root.der().clone());
        grown.sequence += 1;
        agent.bundle_tx.send_replace(Arc::new(grown.clone()));
        let third = loop {
            // A certificate rotation may come first.
            let response = stream.next().await.unwrap();
            if secrets(&response)[ROOT_CA] != after[ROOT_CA] {
                break response;
            }
            stream.send(ack(&response, &names)).await;
        };
        assert_bundle(&secrets(&third)[ROOT_CA], &grown);
    }

    #[tokio::test]
    async fn nack_is_counted_not_answered_and_the_stream_stays_up() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.sotw().await;
        stream
            .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
            .await;
        let first = stream.next().await.unwrap();
        stream.send(nack(&first, &[DEFAULT_CERTIFICATE], "")).await;
        stream
            .assert_quiet("after a NACK the same content is not resent")
            .await;
        assert_eq!(agent.metrics.nacks.get(), 1);

        // Still up: a new set of names is answered.
        stream
            .send(sotw_request(
                &[DEFAULT_CERTIFICATE, ROOT_CA],
                "",
                &first.nonce,
            ))
            .await;
        let second = stream.next().await.unwrap();
        assert_eq!(secrets(&second).len(), 2);
        assert_eq!(agent.streams_open(), 1);
    }

    #[tokio::test]
    async fn stale_nonces_are_ignored() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.sotw().await;
        stream
            .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
            .await;
        let first = stream.next().await.unwrap();
        stream
            .send(sotw_request(
                &[DEFAULT_CERTIFICATE, ROOT_CA],
                "",
                &first.nonce,
            ))
            .await;
        let second = stream.next().await.unwrap();

        // Requests answering the superseded response: neither their names nor their NACK count.
        stream
            .send(sotw_request(&[ROOT_CA], "", &first.nonce))
            .await;
        stream.send(nack(&first, &[ROOT_CA], "")).await;
        stream
            .send(sotw_request(&[ROOT_CA], "", "no-such-nonce"))
            .await;
        stream.assert_quiet("stale nonces").await;
        assert_eq!(agent.metrics.nacks.get(), 0);

        // The latest nonce still works.
        stream
            .send(sotw_request(
                &[ROOT_CA],
                &second.version_info,
                &second.nonce,
            ))
            .await;
        let third = stream.next().await.unwrap();
        assert_eq!(secrets(&third).keys().collect::<Vec<_>>(), [ROOT_CA]);
    }

    #[tokio::test]
    async fn a_request_before_the_certificate_exists_is_answered_when_it_does() {
        let mut agent = with_ca(TestCa::prepare().await, NO_ROTATION, this_uid()).await;
        let mut stream = agent.sotw().await;
        stream
            .send(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
            .await;
        stream
            .assert_quiet("the CA is down: no certificate yet")
            .await;
        assert_eq!(agent.pushes(), 0);

        agent.ca.start().await;
        let first = stream
            .next()
            .await
            .expect("pushed once the certificate exists");
        let secrets = secrets(&first);
        assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
        assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
    }

    #[tokio::test]
    async fn empty_names_get_nothing_until_names_come() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.sotw().await;
        stream.send(sotw_request(&[], "", "")).await;
        stream.assert_quiet("no names").await;
        stream.send(sotw_request(&[ROOT_CA], "", "")).await;
        let response = stream.next().await.unwrap();
        assert_bundle(&secrets(&response)[ROOT_CA], &agent.ca.bundle);
    }

    /// Requests that must end the stream with `code`, and nothing sent before.
    async fn assert_refused(
        agent: &TestAgent,
        names: &[&str],
        type_url: &str,
        code: Code,
        says: &str,
    ) {
        let mut stream = agent.sotw().await;
        stream
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                ..sotw_request(names, "", "")
            })
            .await;
        let status = stream.next().await.expect_err("refused");
        assert_eq!(status.code(), code, "{names:?}: {status:?}");
        assert!(status.message().contains(says), "{names:?}: {status:?}");
    }

    #[tokio::test]
    async fn names_the_caller_may_not_have_are_refused() {
        let agent = start(NO_ROTATION).await;
        assert_refused(
            &agent,
            &[DEFAULT_CERTIFICATE, DB_ID],
            TYPE_URL,
            Code::PermissionDenied,
            "is not this caller's identity",
        )
        .await;
        assert_refused(
            &agent,
            &["spiffe://example.org/ns/demo/sa/web"],
            TYPE_URL,
            Code::PermissionDenied,
            "is not this caller's identity",
        )
        .await;
        assert_refused(
            &agent,
            &["spiffe://cluster.local/ns//sa/web"],
            TYPE_URL,
            Code::InvalidArgument,
            "not a valid SPIFFE ID",
        )
        .await;
        assert_refused(
            &agent,
            &["file-cert"],
            TYPE_URL,
            Code::InvalidArgument,
            "unknown resource name",
        )
        .await;
        assert_refused(
            &agent,
            &["ALL"],
            TYPE_URL,
            Code::InvalidArgument,
            "unknown resource name",
        )
        .await;
        assert_refused(
            &agent,
            &[DEFAULT_CERTIFICATE],
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Code::InvalidArgument,
            "type_url",
        )
        .await;

        // Refused later in a stream too, after a secret was served.
        let mut stream = agent.sotw().await;
        stream
            .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
            .await;
        let first = stream.next().await.unwrap();
        stream
            .send(sotw_request(
                &[DEFAULT_CERTIFICATE, DB_ID],
                "",
                &first.nonce,
            ))
            .await;
        assert_eq!(
            stream.next().await.unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(agent.pushes(), 1, "nothing was sent for db");
    }

    #[tokio::test]
    async fn a_caller_that_cannot_be_attested_gets_nothing() {
        // This process's uid has no entry: every API refuses it before reading a request.
        let ca = TestCa::started().await;
        let agent = with_ca(ca, NO_ROTATION, this_uid() + 1).await;
        let mut client = agent.client().await;
        let (_requests, rx) = mpsc::channel(1);
        let status = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let (_requests, rx) = mpsc::channel(1);
        let status = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = client
            .fetch_secrets(sotw_request(&[ROOT_CA], "", ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(agent.metrics.attestation_failures.get(), 3);
        assert_eq!(agent.streams_open(), 0);
    }

    fn delta_request(
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: TYPE_URL.into(),
            resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn delta_secrets(response: &DeltaDiscoveryResponse) -> BTreeMap<String, (String, Secret)> {
        assert_eq!(response.type_url, TYPE_URL);
        response
            .resources
            .iter()
            .map(|r| {
                let secret = unpack(r.resource.as_ref().expect("a resource"));
                assert_eq!(secret.name, r.name);
                (r.name.clone(), (r.version.clone(), secret))
            })
            .collect()
    }

    #[tokio::test]
    async fn delta_sends_subscribed_secrets_then_only_what_changed() {
        let agent = start(FAST_ROTATION).await;
        let mut stream = agent.delta().await;
        stream
            .send(delta_request(&[DEFAULT_CERTIFICATE, ROOT_CA], &[], ""))
            .await;
        // Each secret is sent as soon as it exists: the bundle may come before the certificate.
        let mut sent = BTreeMap::new();
        let mut nonces = Vec::new();
        while sent.len() < 2 {
            let response = stream.next().await.unwrap();
            for (name, secret) in delta_secrets(&response) {
                assert!(sent.insert(name, secret).is_none(), "sent twice");
            }
            stream.send(delta_request(&[], &[], &response.nonce)).await;
            nonces.push(response.nonce);
        }
        assert_bundle(&sent[ROOT_CA].1, &agent.ca.bundle);
        let (chain, _) = tls_certificate(&sent[DEFAULT_CERTIFICATE].1);
        assert!(chain.starts_with("-----BEGIN CERTIFICATE-----"));

        // The certificate rotates; the bundle does not: only the certificate is sent.
        let second = stream.next().await.expect("the renewed certificate");
        assert!(!nonces.contains(&second.nonce));
        let changed = delta_secrets(&second);
        assert_eq!(changed.keys().collect::<Vec<_>>(), [DEFAULT_CERTIFICATE]);
        assert_ne!(changed[DEFAULT_CERTIFICATE].0, sent[DEFAULT_CERTIFICATE].0);
        assert_ne!(
            leaf_serial(&changed[DEFAULT_CERTIFICATE].1),
            leaf_serial(&sent[DEFAULT_CERTIFICATE].1)
        );
        assert!(second.removed_resources.is_empty());

        // A later subscription gets just the new name, at once.
        stream
            .send(delta_request(&[WEB_ID], &[], &second.nonce))
            .await;
        let third = stream.next().await.unwrap();
        assert_eq!(delta_secrets(&third).keys().collect::<Vec<_>>(), [WEB_ID]);
    }

    #[tokio::test]
    async fn delta_acks_nacks_unsubscribes_and_refusals() {
        let agent = start(NO_ROTATION).await;
        let mut stream = agent.delta().await;
        stream.send(delta_request(&[ROOT_CA], &[], "")).await;
        let first = stream.next().await.unwrap();
        let version = delta_secrets(&first)[ROOT_CA].0.clone();
        stream.send(delta_request(&[], &[], &first.nonce)).await;
        stream.assert_quiet("after an ACK").await;

        stream
            .send(DeltaDiscoveryRequest {
                error_detail: Some(rpc::Status {
                    code: Code::InvalidArgument as i32,
                    message: "bad trusted_ca".into(),
                    details: Vec::new(),
                }),
                ..delta_request(&[], &[], &first.nonce)
            })
            .await;
        stream.assert_quiet("after a NACK").await;
        assert_eq!(agent.metrics.nacks.get(), 1);

        // Unsubscribed then subscribed again: sent again in full.
        stream
            .send(delta_request(&[], &[ROOT_CA], &first.nonce))
            .await;
        stream.assert_quiet("after unsubscribing").await;
        stream
            .send(delta_request(&[ROOT_CA], &[], &first.nonce))
            .await;
        let again = stream.next().await.unwrap();
        assert_eq!(delta_secrets(&again)[ROOT_CA].0, version);

        stream
            .send(delta_request(&[DB_ID], &[], &again.nonce))
            .await;
        assert_eq!(
            stream.next().await.unwrap_err().code(),
            Code::PermissionDenied
        );

        // A reconnecting client that already holds the current version is not sent it again.
        let mut stream = agent.delta().await;
        stream
            .send(DeltaDiscoveryRequest {
                initial_resource_versions: [(ROOT_CA.to_string(), version.clone())].into(),
                ..delta_request(&[ROOT_CA, DEFAULT_CERTIFICATE], &[], "")
            })
            .await;
        let fresh = stream.next().await.unwrap();
        assert_eq!(
            delta_secrets(&fresh).keys().collect::<Vec<_>>(),
            [DEFAULT_CERTIFICATE]
        );
        stream.send(delta_request(&["*"], &[], &fresh.nonce)).await;
        assert_eq!(
            stream.next().await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn fetch_answers_with_the_current_secrets() {
        let agent = start(NO_ROTATION).await;
        let mut client = agent.client().await;
        let response = client
            .fetch_secrets(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
            .await
            .unwrap()
            .into_inner();
        let secrets = secrets(&response);
        assert_eq!(secrets.len(), 2);
        assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
        assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
        assert!(!response.version_info.is_empty());

        let refused = |names: &'static [&'static str]| {
            let mut client = client.clone();
            async move {
                client
                    .fetch_secrets(sotw_request(names, "", ""))
                    .await
                    .unwrap_err()
                    .code()
            }
        };
        assert_eq!(refused(&[DB_ID]).await, Code::PermissionDenied);
        assert_eq!(refused(&["nope"]).await, Code::InvalidArgument);
        assert_eq!(refused(&[]).await, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn fetch_gives_up_when_no_certificate_comes() {
        tokio::time::pause();
        let agent = with_ca(TestCa::prepare().await, NO_ROTATION, this_uid()).await;
        let mut client = agent.client().await;
        let status = client
            .fetch_secrets(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains(WEB_ID), "{status:?}");
    }
}
