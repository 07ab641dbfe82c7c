//! Who is calling: a Kubernetes service-account token (checked by TokenReview, cached by token
//! hash for about as long as the API server caches its own answers, or validated locally against
//! the cluster's JWKS) or a client certificate this CA issued. TokenReviews are bounded: in
//! flight, per source address, and rejected tokens are remembered briefly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sigil_identity::{SpiffeId, TrustDomain};
use tokio::sync::{OnceCell, Semaphore, watch};

use crate::budget::Budgets;
use crate::jwt::{self, Jwks, Validation};
use crate::metrics::{CacheLabels, CacheResult, Metrics};
use crate::pods::{self, PodIndex};

/// Default audience a caller's token must carry.
pub const DEFAULT_AUDIENCE: &str = "sigil-ca";
/// Most TokenReview results kept at once.
pub const TOKEN_CACHE_CAPACITY: usize = 10_000;
/// Most TokenReview calls in flight at once.
pub const MAX_CONCURRENT_TOKEN_REVIEWS: usize = 32;
/// A cached review is dropped this long before its token expires.
pub const TOKEN_CACHE_EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// A successful TokenReview is trusted this long at most: the API server caches its own
/// authentication results for 10 s, so a token whose service account (or secret) is deleted
/// stops working here when it stops working there.
pub const TOKEN_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
/// A token the API server rejected is rejected again without asking for this long, so repeating
/// a bad token costs the API server nothing.
pub const TOKEN_REJECTION_CACHE_TTL: Duration = Duration::from_secs(5);
/// TokenReviews (cache misses) one source address may cause: this many at once...
pub const REVIEWS_PER_SOURCE_BURST: f64 = 20.0;
/// ...refilled at this rate. A node agent needs one review per token refresh; a flood of
/// made-up tokens from one address is refused before it reaches the API server.
pub const REVIEWS_PER_SOURCE_PER_SECOND: f64 = 5.0;
/// Extra keys TokenReview puts on pod-bound tokens.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuthnError {
    #[error("no bearer token and no client certificate")]
    NoCredentials,
    #[error("bearer tokens are not accepted by this CA (--auth certs)")]
    TokensDisabled,
    #[error("token rejected by TokenReview: {0}")]
    TokenReviewRejected(String),
    #[error("TokenReview call failed: {0}")]
    TokenReviewFailed(String),
    #[error("token rejected: {0}")]
    Jwt(#[from] jwt::JwtError),
    #[error("token is not a service-account token (user {0:?})")]
    NotServiceAccount(String),
    #[error("identity is not a valid SPIFFE ID: {0}")]
    BadIdentity(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("client certificate is from trust domain {0}, not ours")]
    ForeignTrustDomain(String),
    #[error("too many TokenReviews from {0}; retry later")]
    RateLimited(IpAddr),
    #[error("token is bound to pod {namespace}/{name}, which no longer exists")]
    PodGone { namespace: String, name: String },
    #[error(
        "token is bound to pod {namespace}/{name} with UID {token_uid}, but that pod now has UID {pod_uid}"
    )]
    PodUidMismatch {
        namespace: String,
        name: String,
        token_uid: String,
        pod_uid: String,
    },
}

impl AuthnError {
    /// Whether the failure is ours (API server unreachable) rather than the caller's.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AuthnError::TokenReviewFailed(_) | AuthnError::RateLimited(_)
        )
    }

    /// Whether the answer may be remembered for the token: the API server's verdict may, a
    /// failure to ask it may not.
    fn is_verdict(&self) -> bool {
        !self.is_unavailable()
    }
}

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub id: SpiffeId,
    pub credential: Credential,
}

impl Caller {
    /// Whose signing budget this caller spends: the pod of a pod-bound token (node agents are
    /// pods of one service account, and each has a budget of its own), else its SPIFFE ID.
    pub fn principal(&self) -> Principal {
        match &self.credential {
            Credential::Token(TokenIdentity {
                pod: Some((name, uid)),
                namespace,
                ..
            }) => Principal::Pod {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: uid.clone(),
            },
            _ => Principal::Id(self.id.clone()),
        }
    }
}

/// One caller, as the CA's per-caller limits count them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    Pod {
        namespace: String,
        name: String,
        uid: String,
    },
    Id(SpiffeId),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Pod {
                namespace,
                name,
                uid,
            } => write!(f, "pod {namespace}/{name} (uid {uid})"),
            Principal::Id(id) => write!(f, "{id}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Credential {
    Token(TokenIdentity),
    ClientCert,
}

/// What a service-account token says about its holder.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenIdentity {
    pub namespace: String,
    pub service_account: String,
    /// Set for pod-bound (projected) tokens: (name, uid).
    pub pod: Option<(String, String)>,
    pub node: Option<String>,
    pub expires_at: Option<SystemTime>,
}

/// How tokens are validated.
pub enum TokenValidator {
    TokenReview(kube::Client),
    Jwks {
        jwks: watch::Receiver<Arc<Jwks>>,
        issuer: String,
    },
    /// Only client certificates are accepted (no Kubernetes).
    Disabled,
}

pub struct Authenticator {
    trust_domain: TrustDomain,
    audiences: Vec<String>,
    validator: TokenValidator,
    pods: Option<watch::Receiver<PodIndex>>,
    cache: Mutex<HashMap<[u8; 32], Arc<OnceCell<Reviewed>>>>,
    /// Bounds TokenReview calls in flight, so a flood of bogus tokens cannot flood the API server.
    review_slots: Semaphore,
    /// Each source address's remaining TokenReview budget.
    review_budgets: Budgets<IpAddr>,
    metrics: Arc<Metrics>,
}

/// The API server's answer about one token, and until when it stands.
#[derive(Clone, Debug)]
struct Reviewed {
    result: Result<TokenIdentity, AuthnError>,
    fresh_until: SystemTime,
}

impl Reviewed {
    fn new(result: Result<TokenIdentity, AuthnError>, now: SystemTime) -> Self {
        let fresh_until = match &result {
            Ok(identity) => match identity.expires_at {
                Some(exp) => (now + TOKEN_REVIEW_CACHE_TTL)
                    .min(exp.checked_sub(TOKEN_CACHE_EXPIRY_MARGIN).unwrap_or(now)),
                None => now,
            },
            Err(e) if e.is_verdict() => now + TOKEN_REJECTION_CACHE_TTL,
            Err(_) => now,
        };
        Reviewed {
            result,
            fresh_until,
        }
    }
}

impl Authenticator {
    pub fn new(
        trust_domain: TrustDomain,
        audiences: Vec<String>,
        validator: TokenValidator,
        pods: Option<watch::Receiver<PodIndex>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // sigil's own audience is always accepted: the flag adds Istio's (istio-ca) or others.
        let audiences = std::iter::once(DEFAULT_AUDIENCE.to_string())
            .chain(audiences.into_iter().filter(|a| a != DEFAULT_AUDIENCE))
            .collect();
        Authenticator {
            trust_domain,
            audiences,
            validator,
            pods,
            cache: Mutex::new(HashMap::new()),
            review_slots: Semaphore::new(MAX_CONCURRENT_TOKEN_REVIEWS),
            review_budgets: Budgets::new(REVIEWS_PER_SOURCE_BURST, REVIEWS_PER_SOURCE_PER_SECOND),
            metrics,
        }
    }

    /// A bearer token wins over a client certificate when both are present: it is the more
    /// specific credential (a pod-bound token names the pod and node). `source` is the caller's
    /// address, whose TokenReview budget a cache miss spends.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        peer_id: Option<&SpiffeId>,
        source: Option<IpAddr>,
    ) -> Result<Caller, AuthnError> {
        if let Some(token) = bearer {
            let identity = self.validate_token(token, source).await?;
            self.check_pod_binding(&identity).await?;
            let id = SpiffeId::for_service_account(
                &self.trust_domain,
                &identity.namespace,
                &identity.service_account,
            )
            .map_err(AuthnError::BadIdentity)?;
            return Ok(Caller {
                id,
                credential: Credential::Token(identity),
            });
        }
        if let Some(id) = peer_id {
            if id.trust_domain() != &self.trust_domain {
                return Err(AuthnError::ForeignTrustDomain(
                    id.trust_domain().to_string(),
                ));
            }
            return Ok(Caller {
                id: id.clone(),
                credential: Credential::ClientCert,
            });
        }
        Err(AuthnError::NoCredentials)
    }

    async fn validate_token(
        &self,
        token: &str,
        source: Option<IpAddr>,
    ) -> Result<TokenIdentity, AuthnError> {
        match &self.validator {
            TokenValidator::Disabled => Err(AuthnError::TokensDisabled),
            TokenValidator::Jwks { jwks, issuer } => {
                let jwks = jwks.borrow().clone();
                let validation = Validation {
                    issuer: issuer.clone(),
                    audiences: self.audiences.clone(),
                };
                let claims = jwt::validate(token, &jwks, &validation, SystemTime::now())?;
                Ok(TokenIdentity {
                    namespace: claims.namespace,
                    service_account: claims.service_account,
                    pod: claims.pod.map(|p| (p.name, p.uid)),
                    node: claims.node.map(|n| n.name),
                    expires_at: Some(claims.expires_at),
                })
            }
            TokenValidator::TokenReview(client) => {
                precheck(token, SystemTime::now())?;
                let key = token_hash(token);
                let cell = self.cache_cell(key, SystemTime::now());
                // Concurrent calls with one token (an agent prefetching for many pods) share a
                // single TokenReview: the first runs it, the others wait for its answer.
                let reviewed = AtomicBool::new(false);
                let answer = cell
                    .get_or_init(|| async {
                        reviewed.store(true, Ordering::Relaxed);
                        let result = match source {
                            Some(ip) if !self.review_budgets.spend(&ip, Instant::now()) => {
                                Err(AuthnError::RateLimited(ip))
                            }
                            _ => {
                                let _slot =
                                    self.review_slots.acquire().await.expect("never closed");
                                self.token_review(client, token).await
                            }
                        };
                        Reviewed::new(result, SystemTime::now())
                    })
                    .await
                    .clone();
                let result_label = if reviewed.load(Ordering::Relaxed) {
                    CacheResult::Miss
                } else {
                    CacheResult::Hit
                };
                self.metrics
                    .token_cache
                    .get_or_create(&CacheLabels {
                        result: result_label,
                    })
                    .inc();
                // Failures to ask, and results without a readable expiry, are not kept.
                if answer.fresh_until <= SystemTime::now() {
                    self.forget(&key, &cell);
                }
                answer.result
            }
        }
    }

    async fn token_review(
        &self,
        client: &kube::Client,
        token: &str,
    ) -> Result<TokenIdentity, AuthnError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthnError::TokenReviewFailed(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthnError::TokenReviewRejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_string()),
            ));
        }
        if let Some(audiences) = &status.audiences
            && !audiences.iter().any(|a| self.audiences.contains(a))
        {
            return Err(AuthnError::TokenReviewRejected(format!(
                "audiences {audiences:?} not accepted"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthnError::NotServiceAccount(username));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let pod = first(EXTRA_POD_NAME).zip(first(EXTRA_POD_UID));
        Ok(TokenIdentity {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod,
            node: first(EXTRA_NODE_NAME),
            expires_at: jwt::unverified_expiry(token),
        })
    }

    /// A pod-bound token is only good while its pod exists with the same UID (checked against the
    /// pod index; TokenReview checks it too, the index also covers cached and JWKS results). A
    /// pod the index does not know yet gets `INDEX_GRACE` to appear.
    async fn check_pod_binding(&self, identity: &TokenIdentity) -> Result<(), AuthnError> {
        let (Some(pods), Some((name, uid))) = (&self.pods, &identity.pod) else {
            return Ok(());
        };
        pods::wait_for(pods, pods::INDEX_GRACE, |index| {
            Self::pod_binding(index, identity, name, uid)
        })
        .await
    }

    fn pod_binding(
        index: &PodIndex,
        identity: &TokenIdentity,
        name: &str,
        uid: &str,
    ) -> Result<(), AuthnError> {
        match index.get(&identity.namespace, name) {
            None => Err(AuthnError::PodGone {
                namespace: identity.namespace.clone(),
                name: name.to_string(),
            }),
            Some(entry) if entry.uid != uid => Err(AuthnError::PodUidMismatch {
                namespace: identity.namespace.clone(),
                name: name.to_string(),
                token_uid: uid.to_string(),
                pod_uid: entry.uid.clone(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// The cache cell for a token: its cached review if still fresh, else a new empty cell
    /// (shared with concurrent callers). Expired entries are dropped; a full cache evicts.
    fn cache_cell(&self, key: [u8; 32], now: SystemTime) -> Arc<OnceCell<Reviewed>> {
        let fresh = |cell: &OnceCell<Reviewed>| match cell.get() {
            Some(reviewed) => now < reviewed.fresh_until,
            None => true, // a review in flight
        };
        let mut cache = self.cache.lock().expect("token cache lock");
        if let Some(cell) = cache.get(&key) {
            if fresh(cell) {
                return cell.clone();
            }
            cache.remove(&key);
        }
        if cache.len() >= TOKEN_CACHE_CAPACITY {
            cache.retain(|_, cell| fresh(cell));
        }
        if cache.len() >= TOKEN_CACHE_CAPACITY {
            // Still full of live entries: drop an arbitrary tenth rather than grow without bound.
            let victims: Vec<_> = cache
                .keys()
                .take(TOKEN_CACHE_CAPACITY / 10)
                .copied()
                .collect();
            for victim in victims {
                cache.remove(&victim);
            }
        }
        cache.entry(key).or_default().clone()
    }

    /// Removes `cell` from the cache unless another call already replaced it.
    fn forget(&self, key: &[u8; 32], cell: &Arc<OnceCell<Reviewed>>) {
        let mut cache = self.cache.lock().expect("token cache lock");
        if cache
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, cell))
        {
            cache.remove(key);
        }
    }
}

/// Local checks before a token costs the API server a TokenReview: its size, and an `exp` in
/// the future (read without verifying; TokenReview verifies). Projected tokens always have one.
fn precheck(token: &str, now: SystemTime) -> Result<(), AuthnError> {
    if token.len() > jwt::MAX_TOKEN_BYTES {
        return Err(jwt::JwtError::TooLarge.into());
    }
    let expiry = jwt::unverified_expiry(token).ok_or_else(|| {
        jwt::JwtError::Malformed("not a JWT with an expiry (projected tokens have one)".into())
    })?;
    if expiry + jwt::CLOCK_SKEW <= now {
        return Err(jwt::JwtError::Expired.into());
    }
    Ok(())
}

fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Fetches the cluster's JWKS through the API server's OIDC discovery endpoints.
pub async fn fetch_cluster_jwks(client: &kube::Client) -> Result<(String, Jwks), AuthnError> {
    let get = |path: &str| {
        http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| AuthnError::TokenReviewFailed(e.to_string()))
    };
    let discovery: serde_json::Value = client
        .request(get("/.well-known/openid-configuration")?)
        .await
        .map_err(|e| AuthnError::TokenReviewFailed(format!("OIDC discovery: {e}")))?;
    let issuer = discovery["issuer"]
        .as_str()
        .ok_or_else(|| AuthnError::TokenReviewFailed("OIDC discovery has no issuer".into()))?
        .to_string();
    let text = client
        .request_text(get("/openid/v1/jwks")?)
        .await
        .map_err(|e| AuthnError::TokenReviewFailed(format!("JWKS: {e}")))?;
    Ok((issuer, Jwks::parse(&text)?))
}

#[cfg(test)]
mod tests;
