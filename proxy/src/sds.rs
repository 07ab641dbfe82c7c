//! The proxy as an SDS client of the node agent: one StreamSecrets stream asking for `default`
//! (our certificate and key) and `ROOTCA` (the trust bundle), ACKing what it can use and NACKing
//! what it cannot. Every usable update becomes a new [`TlsState`] on a `watch` channel, which new
//! handshakes read; live connections keep the state they started with. When the agent goes away
//! the current state stays in use and the stream is re-opened with backoff. When the certificate
//! in use expires with no renewal in sight, that is logged at error level and counted: every
//! mTLS connection fails from then on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sigil_base::backoff::Backoff;
use sigil_identity::TrustBundle;
use sigil_identity::tls::{CertifiedKey, TlsVersions};
use sigil_proxy_api::sds::{DEFAULT_CERTIFICATE, ROOT_CA, TYPE_URL};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::feed::{self, FeedError};
use crate::metrics::Metrics;
use crate::tls::TlsState;

/// Requests queued towards the agent (ACKs are one per response).
const REQUEST_BUFFER: usize = 4;

/// Why a response could not be used: sent back to the agent as the NACK's detail.
#[derive(Debug, thiserror::Error)]
enum SecretError {
    #[error("resource of type {0}, expected a Secret")]
    WrongType(String),
    #[error("resource does not decode as a Secret: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("secret {0:?} was not asked for")]
    Unexpected(String),
    #[error("secret {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("secret {name:?}: {source}")]
    Certificate {
        name: String,
        #[source]
        source: sigil_identity::tls::TlsError,
    },
}

/// What the agent sent last, parsed; kept across reconnects.
#[derive(Default)]
struct Received {
    certificate: Option<CertifiedKey>,
    bundle_pem: Option<String>,
}

/// Follows the agent's secrets for the life of the process, publishing each usable pair of
/// certificate and bundle on `tx`.
pub async fn run(
    socket: PathBuf,
    versions: TlsVersions,
    tx: watch::Sender<Option<Arc<TlsState>>>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(report_expiry(tx.subscribe(), metrics.clone()));
    let mut backoff = Backoff::new(feed::RECONNECT_INITIAL, feed::RECONNECT_MAX);
    let mut received = Received::default();
    loop {
        let result = follow(
            &socket,
            versions,
            &mut received,
            &tx,
            &metrics,
            &mut backoff,
        )
        .await;
        metrics.sds_connected.set(0);
        let delay = backoff.next_delay();
        let holding = tx.borrow().as_ref().map(|state| state.serial.clone());
        if let Err(e) = result {
            warn!(
                error = %e,
                retry_in_ms = delay.as_millis() as u64,
                holding_serial = holding.as_deref().unwrap_or("none"),
                "lost the agent's SDS stream; keeping the current certificate and reconnecting"
            );
        }
        metrics.sds_reconnects.inc();
        tokio::time::sleep(delay).await;
    }
}

/// Logs (error) and counts each certificate in use that reaches its NotAfter before a renewal
/// replaced it: handshakes with it fail from then on, so operators must hear of it (the agent
/// could not reach the CA for over half the certificate's lifetime). Ends with `tls`.
async fn report_expiry(mut tls: watch::Receiver<Option<Arc<TlsState>>>, metrics: Arc<Metrics>) {
    let mut reported: Option<String> = None;
    loop {
        let current = tls.borrow_and_update().clone();
        let pending = current.filter(|state| reported.as_ref() != Some(&state.serial));
        let Some(state) = pending else {
            if tls.changed().await.is_err() {
                return;
            }
            continue;
        };
        let left = state
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(left) => {
                metrics.cert_expired.inc();
                error!(
                    identity = %state.id,
                    serial = %state.serial,
                    not_after = state.not_after_unix(),
                    "the certificate this proxy presents has expired and no renewal arrived: every mTLS connection fails until one does (can the node agent reach the CA?)"
                );
                reported = Some(state.serial.clone());
            }
            changed = tls.changed() => if changed.is_err() { return },
        }
    }
}

/// One stream: returns when it ends.
async fn follow(
    socket: &Path,
    versions: TlsVersions,
    received: &mut Received,
    tx: &watch::Sender<Option<Arc<TlsState>>>,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> Result<(), FeedError> {
    let channel = sigil_base::socket_client::connect(socket)
        .await
        .map_err(|source| FeedError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (requests, request_rx) = mpsc::channel(REQUEST_BUFFER);
    let _ = requests
        .send(request(String::new(), String::new(), None))
        .await;
    let mut responses = SecretDiscoveryServiceClient::new(channel)
        .stream_secrets(ReceiverStream::new(request_rx))
        .await
        .map_err(FeedError::Refused)?
        .into_inner();
    metrics.sds_connected.set(1);
    info!(socket = %socket.display(), "SDS stream to the agent open");
    let mut acked_version = String::new();
    loop {
        let response = responses
            .message()
            .await
            .map_err(FeedError::Stream)?
            .ok_or(FeedError::Closed)?;
        backoff.reset();
        match apply(&response, received) {
            Ok(()) => {
                acked_version = response.version_info.clone();
                let _ = requests
                    .send(request(acked_version.clone(), response.nonce.clone(), None))
                    .await;
                publish(received, versions, tx, metrics);
            }
            Err(e) => {
                warn!(error = %e, version = %response.version_info, "NACKing the agent's secrets; keeping the current ones");
                let _ = requests
                    .send(request(
                        acked_version.clone(),
                        response.nonce.clone(),
                        Some(e.to_string()),
                    ))
                    .await;
            }
        }
    }
}

fn request(version_info: String, nonce: String, error: Option<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info,
        node: Some(Node {
            id: "sigil-proxy".into(),
            ..Default::default()
        }),
        resource_names: vec![DEFAULT_CERTIFICATE.into(), ROOT_CA.into()],
        type_url: TYPE_URL.into(),
        response_nonce: nonce,
        error_detail: error.map(|message| RpcStatus {
            // INVALID_ARGUMENT, as Envoy reports a secret it cannot use.
            code: 3,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

/// Takes every secret of a response, or none of them if any is unusable.
fn apply(response: &DiscoveryResponse, received: &mut Received) -> Result<(), SecretError> {
    let mut certificate = None;
    let mut bundle_pem = None;
    for any in &response.resources {
        if any.type_url != TYPE_URL {
            return Err(SecretError::WrongType(any.type_url.clone()));
        }
        let secret = Secret::decode(any.value.as_slice())?;
        let invalid = |reason: String| SecretError::Invalid {
            name: secret.name.clone(),
            reason,
        };
        match (secret.name.as_str(), &secret.r#type) {
            (DEFAULT_CERTIFICATE, Some(secret::Type::TlsCertificate(tls))) => {
                let chain = data_source_text(&tls.certificate_chain).map_err(&invalid)?;
                let key = data_source_text(&tls.private_key).map_err(&invalid)?;
                let certified = CertifiedKey::from_pem(&chain, &key).map_err(|source| {
                    SecretError::Certificate {
                        name: secret.name.clone(),
                        source,
                    }
                })?;
                certificate = Some(certified);
            }
            (ROOT_CA, Some(secret::Type::ValidationContext(context))) => {
                bundle_pem = Some(data_source_text(&context.trusted_ca).map_err(&invalid)?);
            }
            (DEFAULT_CERTIFICATE | ROOT_CA, _) => {
                return Err(invalid("unexpected secret type".into()));
            }
            (other, _) => return Err(SecretError::Unexpected(other.into())),
        }
    }
    if let Some(certificate) = certificate {
        received.certificate = Some(certificate);
    }
    if let Some(pem) = bundle_pem {
        received.bundle_pem = Some(pem);
    }
    Ok(())
}

fn data_source_text(source: &Option<DataSource>) -> Result<String, String> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(bytes)) => {
            String::from_utf8(bytes.clone()).map_err(|_| "inline bytes are not PEM text".into())
        }
        Some(data_source::Specifier::InlineString(text)) => Ok(text.clone()),
        Some(_) => Err("only inline secrets are supported".into()),
        None => Err("empty data source".into()),
    }
}

/// Builds and publishes the TLS state once both halves are known. A certificate whose root is
/// not in the bundle yet (the bundle update is on its way during a root rotation) waits for it
/// with the previous state still in use.
fn publish(
    received: &Received,
    versions: TlsVersions,
    tx: &watch::Sender<Option<Arc<TlsState>>>,
    metrics: &Metrics,
) {
    let (Some(certificate), Some(bundle_pem)) = (&received.certificate, &received.bundle_pem)
    else {
        return;
    };
    let td = match sigil_identity::profile::leaf_spiffe_id(&certificate.chain[0]) {
        Ok(id) => id.trust_domain().clone(),
        Err(e) => {
            warn!(error = %e, "the agent's certificate carries no SPIFFE ID; not using it");
            return;
        }
    };
    let bundle = match TrustBundle::from_pem(td, bundle_pem) {
        Ok(bundle) => bundle,
        Err(e) => {
            warn!(error = %e, "the agent's trust bundle is unusable; not using it");
            return;
        }
    };
    let state = match TlsState::new(certificate.clone(), bundle, versions) {
        Ok(state) => TlsState {
            handshakes: metrics.handshakes.clone(),
            ..state
        },
        Err(e) => {
            warn!(error = %e, "certificate and bundle do not fit together (yet); keeping the current ones");
            return;
        }
    };
    let unchanged = tx.borrow().as_ref().is_some_and(|current| {
        current.serial == state.serial && current.bundle.roots == state.bundle.roots
    });
    if unchanged {
        return;
    }
    info!(
        identity = %state.id,
        serial = %state.serial,
        not_after = state.not_after_unix(),
        bundle_roots = state.bundle.roots.len(),
        "certificate and trust bundle in use for new connections"
    );
    metrics.cert_expiry.set(state.not_after_unix() as i64);
    metrics.cert_updates.inc();
    tx.send_replace(Some(Arc::new(state)));
}
