//! The gRPC services: `sigil.ca.v1.CertificateAuthority` (Sign, WatchTrustBundle) and Istio's
//! `IstioCertificateService/CreateCertificate`, sharing one path: authenticate, authorize, check
//! the request, sign, audit. Callers get short opaque errors; the audit log gets the reason.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use sigil_identity::csr::{self, CsrError};
use sigil_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use sigil_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use sigil_proto::sigil::ca::v1::certificate_authority_server::{
    CertificateAuthority, CertificateAuthorityServer,
};
use sigil_proto::sigil::ca::v1::{SignRequest, SignResponse, TrustBundle, WatchTrustBundleRequest};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::audit::{self, Record};
use crate::authn::{Authenticator, Caller, Credential, Principal};
use crate::authority::{Authority, AuthorityError, Issued, SharedAuthority};
use crate::authz::Authorizer;
use crate::budget::Budgets;
use crate::metrics::{Api, ApiLabels, DenyLabels, DenyReason, Metrics};
use crate::tls_server::PeerInfo;
use sigil_identity::bundle::certificate_to_pem;

/// Largest request message accepted (a CSR is at most `csr::MAX_CSR_BYTES`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The gRPC service names, as in request paths.
const SIGIL_SERVICE: &str = "sigil.ca.v1.CertificateAuthority";
const ISTIO_SERVICE: &str = "istio.v1.auth.IstioCertificateService";
/// Istio's metadata key for node-agent impersonation.
pub const ISTIO_IMPERSONATE_KEY: &str = "ImpersonatedIdentity";
/// Signing requests one caller ([`Principal`]) may make at once and per second by default:
/// SPIRE's limit per source address. A node agent renewing 250 pods' certificates at once stays
/// under it; one caller flooding the CA gets a small share of what it can sign (about 8,000 a
/// second per core, BENCHMARKS.md).
pub const SIGNS_PER_CALLER: u32 = 500;

/// Lifetimes the CA hands out.
#[derive(Clone, Copy, Debug)]
pub struct TtlPolicy {
    pub default: Duration,
    pub max: Duration,
}

/// A refusal: what the caller sees, what the metrics count, what the audit log says.
struct Refusal {
    status: Status,
    reason: DenyReason,
    detail: String,
}

impl Refusal {
    fn new(reason: DenyReason, detail: impl ToString) -> Self {
        let status = match reason {
            DenyReason::Unauthenticated => Status::unauthenticated("authentication failed"),
            DenyReason::PermissionDenied => Status::permission_denied("permission denied"),
            DenyReason::Unavailable => Status::unavailable("CA unavailable, retry later"),
            DenyReason::RateLimited => Status::resource_exhausted("too many requests, retry later"),
            DenyReason::Internal => Status::internal("internal error"),
            DenyReason::InvalidTtl | DenyReason::InvalidCsr | DenyReason::InvalidRequest => {
                // The caller's own input: say which field and what is wrong with it.
                Status::invalid_argument(detail.to_string())
            }
        };
        Refusal {
            status,
            reason,
            detail: detail.to_string(),
        }
    }
}

/// The caller of a call, authenticated from its headers before its message was read
/// (`authn_first`); handlers take it from the request's extensions.
#[derive(Clone, Debug)]
pub struct Authenticated(pub Caller);

/// A call's credentials: its metadata and connection, and its caller if `authn_first` has
/// authenticated it already.
struct Credentials<'a> {
    metadata: &'a MetadataMap,
    peer: Option<&'a PeerInfo>,
    caller: Option<Caller>,
}

/// The caller `request` was authenticated as, if it was.
fn authenticated<T>(request: &Request<T>) -> Option<Caller> {
    request
        .extensions()
        .get::<Authenticated>()
        .map(|authenticated| authenticated.0.clone())
}

/// State shared by both services.
pub struct Ca {
    authority: watch::Receiver<SharedAuthority>,
    authn: Authenticator,
    authz: Authorizer,
    ttl: TtlPolicy,
    /// Each caller's signing budget (None: no limit).
    sign_budgets: Option<Budgets<Principal>>,
    metrics: Arc<Metrics>,
}

impl Ca {
    /// `signs_per_caller`: the signing requests one caller may make at once and per second
    /// (0: no limit).
    pub fn new(
        authority: watch::Receiver<SharedAuthority>,
        authn: Authenticator,
        authz: Authorizer,
        ttl: TtlPolicy,
        signs_per_caller: u32,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let per_caller = f64::from(signs_per_caller);
        Arc::new(Ca {
            authority,
            authn,
            authz,
            ttl,
            sign_budgets: (signs_per_caller > 0).then(|| Budgets::new(per_caller, per_caller)),
            metrics,
        })
    }

    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, Refusal> {
        let bearer = match metadata.get("authorization") {
            None => None,
            Some(value) => {
                let value = value.to_str().map_err(|_| {
                    Refusal::new(
                        DenyReason::Unauthenticated,
                        "authorization header is not ASCII",
                    )
                })?;
                let token = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        Refusal::new(
                            DenyReason::Unauthenticated,
                            "authorization header is not a Bearer token",
                        )
                    })?;
                Some(token.trim())
            }
        };
        let peer_id = peer.and_then(|p| p.client_id.as_ref());
        let source = peer.map(|p| p.remote.ip());
        self.authn
            .authenticate(bearer, peer_id, source)
            .await
            .map_err(|e| {
                let reason = if e.is_unavailable() {
                    DenyReason::Unavailable
                } else {
                    DenyReason::Unauthenticated
                };
                Refusal::new(reason, e)
            })
    }

    /// The one signing path of both APIs.
    async fn issue(
        &self,
        api: Api,
        csr_der: Result<Vec<u8>, CsrError>,
        ttl_seconds: Result<u64, &'static str>,
        impersonate: &str,
        credentials: Credentials<'_>,
    ) -> Result<(Issued, SharedAuthority), Status> {
        let started = Instant::now();
        let mut record = Record {
            api: Some(api),
            peer: credentials.peer.map(|p| p.remote.to_string()),
            requested: (!impersonate.is_empty()).then(|| impersonate.to_string()),
            ttl_seconds: *ttl_seconds.as_ref().unwrap_or(&0),
            ..Default::default()
        };
        let result = self
            .try_issue(csr_der, ttl_seconds, impersonate, credentials, &mut record)
            .await;
        self.metrics
            .sign_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((issued, authority)) => {
                record.granted = true;
                record.serial = Some(issued.serial_hex.clone());
                record.not_after = Some(issued.not_after.unix_timestamp());
                audit::record(&record);
                self.metrics.issued.get_or_create(&ApiLabels { api }).inc();
                Ok((issued, authority))
            }
            Err(refusal) => Err(self.refuse(api, record, refusal)),
        }
    }

    /// Audits and counts a refused signing request; what the caller gets.
    fn refuse(&self, api: Api, mut record: Record, refusal: Refusal) -> Status {
        record.reason = Some(refusal.reason);
        record.detail = Some(refusal.detail);
        audit::record(&record);
        self.metrics
            .denied
            .get_or_create(&DenyLabels {
                api,
                reason: refusal.reason,
            })
            .inc();
        refusal.status
    }

    /// Authenticates a call to `path` from its headers alone. A refused signing request is
    /// audited and counted as the signing path would; other calls are logged.
    pub async fn authenticate_call(
        &self,
        path: &str,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, Status> {
        let refusal = match self.authenticate(metadata, peer).await {
            Ok(caller) => return Ok(caller),
            Err(refusal) => refusal,
        };
        let api = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((service, "Sign")) if service == SIGIL_SERVICE => Api::Sigil,
            Some((service, _)) if service == ISTIO_SERVICE => Api::Istio,
            _ => {
                tracing::info!(path, reason = %refusal.detail, "call refused before its message was read");
                return Err(refusal.status);
            }
        };
        let record = Record {
            api: Some(api),
            peer: peer.map(|p| p.remote.to_string()),
            ..Default::default()
        };
        Err(self.refuse(api, record, refusal))
    }

    async fn try_issue(
        &self,
        csr_der: Result<Vec<u8>, CsrError>,
        ttl_seconds: Result<u64, &'static str>,
        impersonate: &str,
        credentials: Credentials<'_>,
        record: &mut Record,
    ) -> Result<(Issued, SharedAuthority), Refusal> {
        let authority = self.authority.borrow().clone();
        if authority.signer.is_none() {
            return Err(Refusal::new(
                DenyReason::Unavailable,
                "no signing key loaded",
            ));
        }
        let caller = match credentials.caller {
            Some(caller) => caller,
            None => {
                self.authenticate(credentials.metadata, credentials.peer)
                    .await?
            }
        };
        record.caller = Some(caller.id.to_string());
        record.credential = Some(match caller.credential {
            Credential::Token(_) => "token",
            Credential::ClientCert => "client-cert",
        });
        // Before anything that costs the CA more than a lookup (the CSR's signature check, the
        // signature): one caller cannot take the CA's whole signing rate from everyone else.
        if let Some(budgets) = &self.sign_budgets {
            let principal = caller.principal();
            if !budgets.spend(&principal, Instant::now()) {
                return Err(Refusal::new(
                    DenyReason::RateLimited,
                    format!(
                        "more than {} signing requests per second from {principal}",
                        budgets.per_second()
                    ),
                ));
            }
        }
        let identity = self
            .authz
            .authorize(&caller, impersonate)
            .await
            .map_err(|e| Refusal::new(DenyReason::PermissionDenied, e))?;
        record.requested = Some(identity.to_string());
        let ttl = match ttl_seconds.map_err(|e| Refusal::new(DenyReason::InvalidTtl, e))? {
            0 => self.ttl.default,
            s if s > self.ttl.max.as_secs() => {
                return Err(Refusal::new(
                    DenyReason::InvalidTtl,
                    format!(
                        "ttl_seconds: {s} exceeds the maximum of {}",
                        self.ttl.max.as_secs()
                    ),
                ));
            }
            s => Duration::from_secs(s),
        };
        // A certificate renewing itself (hosts without Kubernetes) gets at most the default
        // lifetime, so a stolen one cannot stretch itself to --max-ttl at each renewal.
        let ttl = if caller.credential == Credential::ClientCert && identity == caller.id {
            ttl.min(self.ttl.default)
        } else {
            ttl
        };
        let csr = csr_der
            .and_then(|der| csr::verify_csr(&der))
            .map_err(|e| Refusal::new(DenyReason::InvalidCsr, format!("csr: {e}")))?;
        let signer = authority
            .signer()
            .map_err(|e| Refusal::new(DenyReason::Unavailable, e))?;
        let issued = signer
            .sign_leaf(
                &csr.spki_der,
                csr.key,
                &identity,
                ttl,
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| match e {
                // Reachable only through a certificate or static entry carrying that ID.
                AuthorityError::TrustDomainIdLeaf(_) => {
                    Refusal::new(DenyReason::PermissionDenied, e)
                }
                e => Refusal::new(DenyReason::Internal, e),
            })?;
        Ok((issued, authority))
    }

    async fn check_watcher(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, Status> {
        self.authenticate(metadata, peer).await.map_err(|refusal| {
            tracing::info!(reason = %refusal.detail, "WatchTrustBundle refused");
            refusal.status
        })
    }
}

fn bundle_message(authority: &Authority) -> TrustBundle {
    TrustBundle {
        trust_domain: authority.trust_domain.to_string(),
        roots: authority.bundle.roots.iter().map(|r| r.to_vec()).collect(),
        sequence: authority.bundle.sequence,
    }
}

pub struct SigilCa(pub Arc<Ca>);

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl CertificateAuthority for SigilCa {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = authenticated(&request);
        let (metadata, _, req) = request.into_parts();
        let (issued, authority) = self
            .0
            .issue(
                Api::Sigil,
                Ok(req.csr_der),
                Ok(req.ttl_seconds),
                &req.impersonate,
                Credentials {
                    metadata: &metadata,
                    peer: peer.as_ref(),
                    caller,
                },
            )
            .await?;
        let signer = authority
            .signer()
            .map_err(|_| Status::unavailable("CA unavailable, retry later"))?;
        Ok(Response::new(SignResponse {
            leaf: issued.leaf.to_vec(),
            intermediates: signer.intermediates.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: authority.bundle.roots.iter().map(|r| r.to_vec()).collect(),
        }))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        if authenticated(&request).is_none() {
            let peer = request.extensions().get::<PeerInfo>().cloned();
            self.0
                .check_watcher(request.metadata(), peer.as_ref())
                .await?;
        }
        let mut authority = self.0.authority.clone();
        let metrics = self.0.metrics.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            metrics.bundle_watchers.inc();
            let mut sent: Option<TrustBundle> = None;
            loop {
                let current = bundle_message(&authority.borrow_and_update());
                if !current.roots.is_empty()
                    && sent.as_ref().map(|s| &s.roots) != Some(&current.roots)
                {
                    if tx.send(Ok(current.clone())).await.is_err() {
                        break;
                    }
                    sent = Some(current);
                }
                tokio::select! {
                    changed = authority.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
            metrics.bundle_watchers.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct IstioCa(pub Arc<Ca>);

#[tonic::async_trait]
impl IstioCertificateService for IstioCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = authenticated(&request);
        let (metadata, _, req) = request.into_parts();
        let impersonate = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(ISTIO_IMPERSONATE_KEY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let ttl = u64::try_from(req.validity_duration)
            .map_err(|_| "validity_duration: must not be negative");
        let (issued, authority) = self
            .0
            .issue(
                Api::Istio,
                csr::csr_pem_to_der(&req.csr),
                ttl,
                &impersonate,
                Credentials {
                    metadata: &metadata,
                    peer: peer.as_ref(),
                    caller,
                },
            )
            .await?;
        let signer = authority
            .signer()
            .map_err(|_| Status::unavailable("CA unavailable, retry later"))?;
        // Leaf first, then intermediates, then every root in one last string (Istio's layout).
        let mut cert_chain = vec![certificate_to_pem(&issued.leaf)];
        cert_chain.extend(signer.intermediates.iter().map(|c| certificate_to_pem(c)));
        cert_chain.push(authority.roots_pem().concat());
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// Both services, with the request size limit applied.
pub fn servers(
    ca: Arc<Ca>,
) -> (
    CertificateAuthorityServer<SigilCa>,
    IstioCertificateServiceServer<IstioCa>,
) {
    (
        CertificateAuthorityServer::new(SigilCa(ca.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        IstioCertificateServiceServer::new(IstioCa(ca))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::TokenValidator;
    use crate::authz::StaticEntries;
    use prometheus_client::registry::Registry;
    use sigil_identity::TrustDomain;

    fn ca_with(authority: Authority, signs_per_caller: u32) -> (Arc<Ca>, Arc<Metrics>) {
        let td = TrustDomain::new("cluster.local").unwrap();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let (_, rx) = watch::channel(Arc::new(authority));
        let authn = Authenticator::new(
            td.clone(),
            vec!["sigil-ca".into()],
            TokenValidator::Disabled,
            None,
            metrics.clone(),
        );
        let authz = Authorizer::new(
            td,
            Default::default(),
            StaticEntries::default(),
            None,
            false,
        );
        let ttl = TtlPolicy {
            default: Duration::from_secs(3600),
            max: Duration::from_secs(7200),
        };
        (
            Ca::new(rx, authn, authz, ttl, signs_per_caller, metrics.clone()),
            metrics,
        )
    }

    fn peer(id: &str) -> PeerInfo {
        PeerInfo {
            remote: "127.0.0.1:1".parse().unwrap(),
            client_id: Some(id.parse().unwrap()),
            admission: Default::default(),
        }
    }

    #[tokio::test]
    async fn sign_without_a_key_is_unavailable() {
        let (ca, metrics) = ca_with(
            Authority::empty(TrustDomain::new("cluster.local").unwrap()),
            SIGNS_PER_CALLER,
        );
        let status = sign_as(&ca, "spiffe://cluster.local/ns/a/sa/b")
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(denied(&metrics, DenyReason::Unavailable), 1);
    }

    /// Asks `ca` for a certificate of its own identity as the client certificate `id`.
    async fn sign_as(ca: &Ca, id: &str) -> Result<(), Status> {
        let key = rcgen::KeyPair::generate().unwrap();
        let peer = peer(id);
        ca.issue(
            Api::Sigil,
            csr::build_csr(&key),
            Ok(0),
            "",
            Credentials {
                metadata: &MetadataMap::new(),
                peer: Some(&peer),
                caller: None,
            },
        )
        .await
        .map(|_| ())
    }

    /// Signing requests of the sigil API refused for `reason`.
    fn denied(metrics: &Metrics, reason: DenyReason) -> u64 {
        metrics
            .denied
            .get_or_create(&DenyLabels {
                api: Api::Sigil,
                reason,
            })
            .get()
    }

    /// An authority holding a signing key.
    fn signing_authority() -> Authority {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (signer, root) = crate::authority::tests::test_root(&td);
        let signer = Arc::new(signer);
        Authority {
            trust_domain: td.clone(),
            serving_signer: Some(signer.clone()),
            signer: Some(signer),
            bundle: sigil_identity::TrustBundle::new(td, vec![root], 1),
        }
    }

    #[tokio::test]
    async fn each_caller_has_a_signing_budget_of_its_own() {
        let (ca, metrics) = ca_with(signing_authority(), 2);
        let flooding = "spiffe://cluster.local/ns/a/sa/flood";
        assert!(sign_as(&ca, flooding).await.is_ok());
        assert!(sign_as(&ca, flooding).await.is_ok());
        let status = sign_as(&ca, flooding).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "too many requests, retry later");
        assert!(
            sign_as(&ca, "spiffe://cluster.local/ns/a/sa/other")
                .await
                .is_ok(),
            "another caller is served"
        );
        assert_eq!(denied(&metrics, DenyReason::RateLimited), 1);
    }

    #[tokio::test]
    async fn istio_request_with_negative_validity_is_rejected_not_defaulted() {
        let (ca, _) = ca_with(signing_authority(), SIGNS_PER_CALLER);
        let key = rcgen::KeyPair::generate().unwrap();
        let csr_pem = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut request = Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: -1,
            metadata: None,
        });
        request
            .extensions_mut()
            .insert(peer("spiffe://cluster.local/ns/a/sa/b"));
        let status = IstioCa(ca.clone())
            .create_certificate(request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "validity_duration: must not be negative");

        let mut request = Request::new(IstioCertificateRequest {
            csr: "not a pem".into(),
            validity_duration: 60,
            metadata: None,
        });
        request
            .extensions_mut()
            .insert(peer("spiffe://cluster.local/ns/a/sa/b"));
        let status = IstioCa(ca).create_certificate(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("csr:"), "{status:?}");
    }
}
