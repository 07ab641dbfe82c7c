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
    let pod = server.add_pod(&PodSpec::new("demo", "web-1", "web", "node-a"));
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
