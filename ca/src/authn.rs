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
/// Most source addresses whose review budget is tracked at once.
const MAX_TRACKED_SOURCES: usize = 4096;
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
    review_budgets: Mutex<HashMap<IpAddr, Budget>>,
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

/// A token bucket: `REVIEWS_PER_SOURCE_BURST` reviews, refilled continuously.
#[derive(Clone, Copy, Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn refilled(self, now: Instant) -> f64 {
        let earned = now.duration_since(self.at).as_secs_f64() * REVIEWS_PER_SOURCE_PER_SECOND;
        (self.tokens + earned).min(REVIEWS_PER_SOURCE_BURST)
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
            review_budgets: Mutex::new(HashMap::new()),
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
                            Some(ip) if !self.spend_review_budget(ip, Instant::now()) => {
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

    /// Takes one TokenReview from `source`'s budget; false when it has none left.
    fn spend_review_budget(&self, source: IpAddr, now: Instant) -> bool {
        let mut budgets = self.review_budgets.lock().expect("review budget lock");
        if budgets.len() >= MAX_TRACKED_SOURCES && !budgets.contains_key(&source) {
            // Sources whose budget is full again are the same as untracked ones.
            budgets.retain(|_, b| b.refilled(now) < REVIEWS_PER_SOURCE_BURST);
            if budgets.len() >= MAX_TRACKED_SOURCES {
                // Every tracked source is spending: start over rather than grow without bound.
                budgets.clear();
            }
        }
        let budget = budgets.entry(source).or_insert(Budget {
            tokens: REVIEWS_PER_SOURCE_BURST,
            at: now,
        });
        let tokens = budget.refilled(now);
        let granted = tokens >= 1.0;
        *budget = Budget {
            tokens: if granted { tokens - 1.0 } else { tokens },
            at: now,
        };
        granted
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
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use sigil_test_apiserver::{PodSpec, TestApiServer, TokenAlg, TokenSigning, TokenSpec};

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn spec(pod: &k8s_openapi::api::core::v1::Pod) -> TokenSpec {
        TokenSpec::for_pod(pod, DEFAULT_AUDIENCE)
    }

    async fn setup(
        jwks_mode: bool,
    ) -> (
        TestApiServer,
        Authenticator,
        k8s_openapi::api::core::v1::Pod,
        Arc<Metrics>,
    ) {
        let server = TestApiServer::start().await;
        let pod = server.add_pod(&PodSpec {
            namespace: "demo".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            node: "node-a".into(),
            phase: "Running".into(),
            labels: Default::default(),
        });
        let (tx, mut rx) = watch::channel(PodIndex::default());
        tokio::spawn(crate::pods::run(server.client(), tx));
        rx.wait_for(|i| i.synced).await.unwrap();
        let validator = if jwks_mode {
            // A receiver keeps the last value after its sender is gone: a fixed JWKS.
            let (_, jwks) = watch::channel(Arc::new(Jwks::parse(&server.jwks_json()).unwrap()));
            TokenValidator::Jwks {
                jwks,
                issuer: server.issuer().to_string(),
            }
        } else {
            TokenValidator::TokenReview(server.client())
        };
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let authn = Authenticator::new(
            td(),
            vec![DEFAULT_AUDIENCE.into()],
            validator,
            Some(rx),
            metrics.clone(),
        );
        (server, authn, pod, metrics)
    }

    #[tokio::test]
    async fn token_review_identity_and_cache() {
        let (server, authn, pod, metrics) = setup(false).await;
        let token = server.issue_token(&spec(&pod));
        let caller = authn.authenticate(Some(&token), None, None).await.unwrap();
        assert_eq!(
            caller.id.to_string(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        let Credential::Token(t) = &caller.credential else {
            panic!()
        };
        assert_eq!(t.pod.as_ref().unwrap().0, "web-1");
        assert_eq!(t.node.as_deref(), Some("node-a"));
        authn.authenticate(Some(&token), None, None).await.unwrap();
        assert_eq!(
            server.token_reviews_served(),
            1,
            "second call answered from the cache"
        );
        assert_eq!(
            metrics
                .token_cache
                .get_or_create(&CacheLabels {
                    result: CacheResult::Hit
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn concurrent_calls_with_one_token_share_one_review() {
        let (server, authn, pod, metrics) = setup(false).await;
        let token = server.issue_token(&spec(&pod));
        let calls = (0..16).map(|_| authn.authenticate(Some(&token), None, None));
        for result in futures::future::join_all(calls).await {
            assert_eq!(
                result.unwrap().id.to_string(),
                "spiffe://cluster.local/ns/demo/sa/web"
            );
        }
        assert_eq!(server.token_reviews_served(), 1);
        let misses = metrics
            .token_cache
            .get_or_create(&CacheLabels {
                result: CacheResult::Miss,
            })
            .get();
        assert_eq!(misses, 1);

        // A rejected token is remembered briefly: repeating it costs the API server nothing.
        let mut unknown = spec(&pod);
        unknown.signing = TokenSigning::UnknownKey;
        let bad = server.issue_token(&unknown);
        assert!(authn.authenticate(Some(&bad), None, None).await.is_err());
        assert!(authn.authenticate(Some(&bad), None, None).await.is_err());
        assert_eq!(server.token_reviews_served(), 2);
    }

    #[test]
    fn a_review_is_trusted_as_long_as_the_api_server_caches_it_and_no_longer() {
        let now = SystemTime::now();
        let identity = |exp: Option<SystemTime>| TokenIdentity {
            namespace: "demo".into(),
            service_account: "web".into(),
            pod: None,
            node: None,
            expires_at: exp,
        };
        let hour = Reviewed::new(Ok(identity(Some(now + Duration::from_secs(3600)))), now);
        assert_eq!(hour.fresh_until, now + TOKEN_REVIEW_CACHE_TTL);
        let soon = Reviewed::new(Ok(identity(Some(now + Duration::from_secs(35)))), now);
        assert_eq!(soon.fresh_until, now + Duration::from_secs(5));
        assert_eq!(Reviewed::new(Ok(identity(None)), now).fresh_until, now);
        let rejected = Reviewed::new(Err(AuthnError::TokenReviewRejected("x".into())), now);
        assert_eq!(rejected.fresh_until, now + TOKEN_REJECTION_CACHE_TTL);
        let failed = Reviewed::new(Err(AuthnError::TokenReviewFailed("x".into())), now);
        assert_eq!(failed.fresh_until, now, "a failure to ask is not a verdict");
    }

    #[tokio::test]
    async fn each_source_has_a_token_review_budget() {
        let (server, authn, _, _) = setup(false).await;
        let attacker: IpAddr = "198.18.0.66".parse().unwrap();
        let mut limited = 0;
        for i in 0..40u64 {
            match authn
                .authenticate(
                    Some(&unsigned_token_expiring_in(3600 + i)),
                    None,
                    Some(attacker),
                )
                .await
            {
                Err(AuthnError::RateLimited(ip)) => {
                    assert_eq!(ip, attacker);
                    limited += 1;
                }
                Err(AuthnError::TokenReviewRejected(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(
            limited >= 15,
            "only {limited} of 40 made-up tokens were limited"
        );
        assert!(server.token_reviews_served() <= 25);
        // Another source still gets its reviews.
        let err = authn
            .authenticate(
                Some(&unsigned_token_expiring_in(7200)),
                None,
                Some("198.18.0.7".parse().unwrap()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::TokenReviewRejected(_)), "{err}");
    }

    #[tokio::test]
    async fn token_review_rejections() {
        let (server, authn, pod, _) = setup(false).await;
        // Refused locally, before costing the API server a TokenReview.
        let mut expired = spec(&pod);
        expired.expires_in = -600;
        let err = authn
            .authenticate(Some(&server.issue_token(&expired)), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthnError::Jwt(jwt::JwtError::Expired)),
            "{err}"
        );
        let err = authn
            .authenticate(Some("not-a-jwt"), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthnError::Jwt(jwt::JwtError::Malformed(_))),
            "{err}"
        );
        let huge = "a".repeat(jwt::MAX_TOKEN_BYTES + 1);
        let err = authn
            .authenticate(Some(&huge), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthnError::Jwt(jwt::JwtError::TooLarge)),
            "{err}"
        );
        assert_eq!(server.token_reviews_served(), 0);

        let mut wrong_aud = spec(&pod);
        wrong_aud.audiences = vec!["istio-ca".into()];
        let err = authn
            .authenticate(Some(&server.issue_token(&wrong_aud)), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::TokenReviewRejected(_)), "{err}");

        let mut unknown = spec(&pod);
        unknown.signing = TokenSigning::UnknownKey;
        let err = authn
            .authenticate(Some(&server.issue_token(&unknown)), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::TokenReviewRejected(_)), "{err}");
    }

    #[tokio::test]
    async fn cached_token_of_deleted_pod_is_refused() {
        let (server, authn, pod, _) = setup(false).await;
        let token = server.issue_token(&spec(&pod));
        authn.authenticate(Some(&token), None, None).await.unwrap();
        server.delete_pod("demo", "web-1");
        let mut pods = authn.pods.clone().unwrap();
        pods.wait_for(|i| i.get("demo", "web-1").is_none())
            .await
            .unwrap();
        let err = authn
            .authenticate(Some(&token), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::PodGone { .. }), "{err}");
    }

    #[tokio::test]
    async fn jwks_validation_and_rejections() {
        let (server, authn, pod, _) = setup(true).await;
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let mut s = spec(&pod);
            s.alg = alg;
            let caller = authn
                .authenticate(Some(&server.issue_token(&s)), None, None)
                .await
                .unwrap();
            assert_eq!(
                caller.id.to_string(),
                "spiffe://cluster.local/ns/demo/sa/web"
            );
        }
        assert_eq!(
            server.token_reviews_served(),
            0,
            "JWKS mode needs no API call per request"
        );

        let mut expired = spec(&pod);
        expired.expires_in = -600;
        let err = authn
            .authenticate(Some(&server.issue_token(&expired)), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthnError::Jwt(jwt::JwtError::Expired)),
            "{err}"
        );

        let mut wrong_aud = spec(&pod);
        wrong_aud.audiences = vec!["istio-ca".into()];
        let err = authn
            .authenticate(Some(&server.issue_token(&wrong_aud)), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AuthnError::Jwt(jwt::JwtError::WrongAudience)),
            "{err}"
        );

        let mut unknown = spec(&pod);
        unknown.signing = TokenSigning::UnknownKey;
        let err = authn
            .authenticate(Some(&server.issue_token(&unknown)), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthnError::Jwt(jwt::JwtError::BadSignature | jwt::JwtError::UnknownKey)
            ),
            "{err}"
        );

        server.delete_pod("demo", "web-1");
        let token = server.issue_token(&spec(&pod));
        let mut pods = authn.pods.clone().unwrap();
        pods.wait_for(|i| i.get("demo", "web-1").is_none())
            .await
            .unwrap();
        let err = authn
            .authenticate(Some(&token), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::PodGone { .. }), "{err}");
    }

    #[tokio::test]
    async fn client_certs_and_missing_credentials() {
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let authn = Authenticator::new(
            td(),
            vec![DEFAULT_AUDIENCE.into()],
            TokenValidator::Disabled,
            None,
            metrics,
        );
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(
            authn
                .authenticate(None, Some(&id), None)
                .await
                .unwrap()
                .credential,
            Credential::ClientCert
        );
        let foreign = SpiffeId::parse("spiffe://other.org/ns/a/sa/b").unwrap();
        assert!(matches!(
            authn.authenticate(None, Some(&foreign), None).await,
            Err(AuthnError::ForeignTrustDomain(_))
        ));
        assert!(matches!(
            authn.authenticate(None, None, None).await,
            Err(AuthnError::NoCredentials)
        ));
        assert!(matches!(
            authn.authenticate(Some("x.y.z"), None, None).await,
            Err(AuthnError::TokensDisabled)
        ));
    }

    /// A JWT-shaped token with a future `exp` and no valid signature: passes the local precheck,
    /// so only the API server could judge it.
    fn unsigned_token_expiring_in(seconds: u64) -> String {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let exp = crate::state::unix_now() + seconds;
        format!(
            "{}.{}.c2ln",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(serde_json::json!({"exp": exp}))
        )
    }

    #[tokio::test]
    async fn unreachable_api_server_is_unavailable_not_unauthenticated() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let authn = Authenticator::new(
            td(),
            vec![DEFAULT_AUDIENCE.into()],
            TokenValidator::TokenReview(client),
            None,
            metrics,
        );
        let err = authn
            .authenticate(Some(&unsigned_token_expiring_in(3600)), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::TokenReviewFailed(_)), "{err}");
        assert!(err.is_unavailable(), "the caller should retry, not give up");
    }

    #[tokio::test]
    async fn fetches_jwks_by_oidc_discovery() {
        let server = TestApiServer::start().await;
        let (issuer, jwks) = fetch_cluster_jwks(&server.client()).await.unwrap();
        assert_eq!(issuer, server.issuer());
        assert!(!jwks.is_empty());
    }
}
