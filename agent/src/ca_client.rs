//! The agent's side of the CA: a TLS channel that verifies the CA against the current trust
//! bundle, the agent's credential (its projected token, re-read on every request, or its own
//! client certificate, kept fresh by the certificate manager), `Sign` with impersonation, the
//! task that follows `WatchTrustBundle`, and the signal that the CA answered (so that everything
//! waiting out a backoff after an outage retries as soon as the CA is back).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use sigil_proto::sigil::ca::v1::{SignRequest, SignResponse, WatchTrustBundleRequest};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

use sigil_base::backoff::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the CA: {0}")]
    Connect(#[from] crate::ca_channel::ClientError),
    #[error("the CA refused: {0}")]
    Refused(#[from] tonic::Status),
    #[error("the CA answered with an empty certificate")]
    EmptyResponse,
}

impl CaClientError {
    /// Whether retrying later can help (every failure but a request the CA calls invalid).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CaClientError::Refused(s) if s.code() == tonic::Code::InvalidArgument)
    }
}

/// How the agent proves who it is to the CA.
#[derive(Clone)]
pub enum Credential {
    /// A projected service-account token (audience `sigil-ca`), re-read on every request because
    /// the kubelet rotates it.
    TokenFile(PathBuf),
    /// A certificate this CA issued to the agent (hosts without Kubernetes); the receiver always
    /// holds the newest one.
    Certificate(watch::Receiver<Arc<CertifiedKey>>),
}

/// Where the CA is and how to reach it.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    server_name: String,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    credential: Credential,
    /// Bumped on every successful call to the CA (shared by every clone).
    answered: Arc<watch::Sender<u64>>,
}

impl CaClient {
    pub fn new(
        addr: String,
        server_name: String,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        credential: Credential,
    ) -> Self {
        CaClient {
            addr,
            server_name,
            bundle,
            credential,
            answered: Arc::new(watch::channel(0).0),
        }
    }

    /// Changes whenever a call to the CA succeeded: a retry loop waiting out its backoff selects
    /// on it so that, after an outage, the first success (of any identity, or of the trust
    /// bundle stream) ends every wait at once.
    pub fn answered(&self) -> watch::Receiver<u64> {
        self.answered.subscribe()
    }

    fn record_answer(&self) {
        self.answered
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A fresh connection with the newest bundle and client certificate. Connections are cheap
    /// next to how rarely an agent signs, and a new one always uses the current trust material.
    async fn connect(&self) -> Result<CertificateAuthorityClient<Channel>, CaClientError> {
        let bundle = self.bundle.borrow().clone();
        let identity = match &self.credential {
            Credential::Certificate(current) => Some(current.borrow().clone()),
            Credential::TokenFile(_) => None,
        };
        let channel =
            crate::ca_channel::connect(&self.addr, &self.server_name, &bundle, identity.as_deref())
                .await?;
        Ok(CertificateAuthorityClient::new(channel))
    }

    fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), CaClientError> {
        if let Credential::TokenFile(path) = &self.credential {
            let token = std::fs::read_to_string(path).map_err(|source| CaClientError::Token {
                path: path.display().to_string(),
                source,
            })?;
            let value =
                format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| CaClientError::Token {
                        path: path.display().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "token is not ASCII",
                        ),
                    })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(())
    }

    /// Signs `csr_der` for `identity` (impersonated unless it is the agent's own).
    pub async fn sign(
        &self,
        csr_der: Vec<u8>,
        ttl: Duration,
        impersonate: Option<&SpiffeId>,
    ) -> Result<SignResponse, CaClientError> {
        let mut client = self.connect().await?;
        let mut request = tonic::Request::new(SignRequest {
            csr_der,
            ttl_seconds: ttl.as_secs(),
            impersonate: impersonate.map(ToString::to_string).unwrap_or_default(),
        });
        self.authorize(&mut request)?;
        let response = client.sign(request).await?.into_inner();
        if response.leaf.is_empty() {
            return Err(CaClientError::EmptyResponse);
        }
        self.record_answer();
        Ok(response)
    }

    /// Follows `WatchTrustBundle` until `tx` has no receivers left, reconnecting with backoff.
    /// A bundle is accepted only if it is for our trust domain and not empty.
    /// `contacted` turns true with the first bundle the CA sends (the agent's readiness).
    pub async fn follow_bundle(
        self,
        trust_domain: TrustDomain,
        tx: watch::Sender<Arc<TrustBundle>>,
        contacted: watch::Sender<bool>,
    ) {
        let mut backoff = Backoff::default();
        let mut answered = self.answered();
        while !tx.is_closed() {
            match self
                .stream_bundle(&trust_domain, &tx, &contacted, &mut backoff)
                .await
            {
                Ok(()) => info!("trust bundle stream ended; reconnecting"),
                Err(e) => warn!(error = %e, "trust bundle stream failed; retrying"),
            }
            // Only answers from now on count (the stream's own messages do not).
            answered.borrow_and_update();
            // A signing request that got through means the CA is back: reconnect now rather
            // than at the end of a backoff that grew during the outage.
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                changed = answered.changed() => if changed.is_ok() { backoff.reset() },
            }
        }
    }

    async fn stream_bundle(
        &self,
        trust_domain: &TrustDomain,
        tx: &watch::Sender<Arc<TrustBundle>>,
        contacted: &watch::Sender<bool>,
        backoff: &mut Backoff,
    ) -> Result<(), CaClientError> {
        let mut client = self.connect().await?;
        let mut request = tonic::Request::new(WatchTrustBundleRequest {});
        self.authorize(&mut request)?;
        let mut stream = client.watch_trust_bundle(request).await?.into_inner();
        while let Some(message) = stream.message().await? {
            backoff.reset();
            self.record_answer();
            if message.trust_domain != trust_domain.as_str() || message.roots.is_empty() {
                warn!(trust_domain = %message.trust_domain, roots = message.roots.len(), "ignoring an unusable trust bundle");
                continue;
            }
            let roots = message
                .roots
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            let bundle = TrustBundle::new(trust_domain.clone(), roots, message.sequence);
            // A bundle with a root that does not parse would make every later connection to
            // the CA fail, and the agent could never fetch a corrected one: keep the old one.
            if let Err(e) = bundle.root_store() {
                warn!(error = %e, "ignoring a trust bundle with an unusable root");
                continue;
            }
            contacted.send_replace(true);
            tx.send_if_modified(|current| {
                // An older bundle (a lagging CA replica) must not roll back a newer one.
                if bundle.sequence < current.sequence {
                    warn!(
                        sequence = bundle.sequence,
                        current = current.sequence,
                        "ignoring an older trust bundle"
                    );
                    return false;
                }
                let changed = current.roots != bundle.roots;
                if changed {
                    info!(
                        roots = bundle.roots.len(),
                        sequence = bundle.sequence,
                        "trust bundle updated"
                    );
                    *current = Arc::new(bundle);
                }
                changed
            });
        }
        Ok(())
    }
}
