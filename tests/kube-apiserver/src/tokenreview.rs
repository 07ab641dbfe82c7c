//! `POST /apis/authentication.k8s.io/v1/tokenreviews`: authenticates a service-account token the
//! way the API server's service-account authenticator does — signature, issuer, time claims,
//! audiences (default: the server's own), then the bound objects (service account, pod or node)
//! must still exist with the UIDs in the token — and answers with the user, groups and extras of
//! a real TokenReview. Every request is counted, so tests can check callers cache results.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};

use crate::{
    jwt::{self, TokenError, unix_now},
    rest::App,
    status::{ApiError, GroupResource},
    store::{Store, meta_str},
};

const EXTRA_PREFIX: &str = "authentication.kubernetes.io";

pub async fn create(State(app): State<Arc<App>>, body: Bytes) -> Response {
    app.token_reviews.fetch_add(1, Ordering::SeqCst);
    match review(&app, &body) {
        Ok(review) => (StatusCode::CREATED, Json(review)).into_response(),
        Err(err) => err.into_response(),
    }
}

fn review(app: &App, body: &[u8]) -> Result<TokenReview, ApiError> {
    let mut review: TokenReview = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!("the body of the request could not be decoded: {e}"))
    })?;
    let token = review.spec.token.clone().unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::BadRequest(
            "token is required for TokenReview in authentication".into(),
        ));
    }
    // Without audiences in the request, the API server's own audiences (its issuer) apply.
    let requested = review
        .spec
        .audiences
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec![app.issuer.clone()]);
    review.status = Some(
        match authenticate(&app.store, &app.issuer, &token, &requested, unix_now()) {
            Ok((user, audiences)) => TokenReviewStatus {
                authenticated: Some(true),
                user: Some(user),
                audiences: Some(audiences),
                error: None,
            },
            Err(err) => TokenReviewStatus {
                authenticated: Some(false),
                error: Some(match err {
                    TokenError::NotServiceAccountToken => err.to_string(),
                    other => format!("[invalid bearer token, {other}]"),
                }),
                ..TokenReviewStatus::default()
            },
        },
    );
    Ok(review)
}

/// Authenticates `token` for one of `requested` audiences; returns the user and the audiences
/// the token is valid for.
fn authenticate(
    store: &Store,
    issuer: &str,
    token: &str,
    requested: &[String],
    now: i64,
) -> Result<(UserInfo, Vec<String>), TokenError> {
    let claims = jwt::validate(token, issuer, now)?;
    let audiences: Vec<String> = claims
        .aud
        .iter()
        .filter(|a| requested.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return Err(TokenError::AudienceMismatch {
            token: claims.aud.clone(),
            requested: requested.to_vec(),
        });
    }
    let bound = &claims.kubernetes;
    let namespace = &bound.namespace;
    let service_account = &bound.serviceaccount;
    let lookup = |resource: &str, ns: &str, name: &str| {
        store
            .get(
                &GroupResource::new("", resource),
                &(ns.to_string(), name.to_string()),
            )
            .map_err(|_| TokenError::Invalidated)
    };
    let stored_sa = lookup("serviceaccounts", namespace, &service_account.name)?;
    let actual = meta_str(&stored_sa, "uid");
    if actual != service_account.uid {
        return Err(TokenError::ServiceAccountUidMismatch {
            actual: actual.to_string(),
            claim: service_account.uid.clone(),
        });
    }
    let mut extra = BTreeMap::new();
    if let Some(pod) = &bound.pod {
        let stored = lookup("pods", namespace, &pod.name)?;
        let actual = meta_str(&stored, "uid");
        if actual != pod.uid {
            return Err(TokenError::PodUidMismatch {
                actual: actual.to_string(),
                claim: pod.uid.clone(),
            });
        }
        extra.insert(format!("{EXTRA_PREFIX}/pod-name"), vec![pod.name.clone()]);
        extra.insert(format!("{EXTRA_PREFIX}/pod-uid"), vec![pod.uid.clone()]);
    } else if let Some(node) = &bound.node {
        // A node-bound token (no pod) is only valid while its node exists.
        let stored = lookup("nodes", "", &node.name)?;
        let actual = meta_str(&stored, "uid");
        if actual != node.uid {
            return Err(TokenError::NodeUidMismatch {
                actual: actual.to_string(),
                claim: node.uid.clone(),
            });
        }
    }
    if let Some(node) = &bound.node {
        extra.insert(format!("{EXTRA_PREFIX}/node-name"), vec![node.name.clone()]);
        extra.insert(format!("{EXTRA_PREFIX}/node-uid"), vec![node.uid.clone()]);
    }
    if !claims.jti.is_empty() {
        extra.insert(
            format!("{EXTRA_PREFIX}/credential-id"),
            vec![format!("JTI={}", claims.jti)],
        );
    }
    let user = UserInfo {
        username: Some(format!(
            "system:serviceaccount:{namespace}:{}",
            service_account.name
        )),
        uid: Some(service_account.uid.clone()),
        groups: Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".into(),
        ]),
        extra: Some(extra),
    };
    Ok((user, audiences))
}

/// TokenReview end to end, through the real `kube` client.
#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use k8s_openapi::api::{
        authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
        core::v1::{Pod, ServiceAccount},
    };
    use kube::{
        Api,
        api::{DeleteParams, PostParams},
    };
    use serde_json::Value;

    use crate::{
        PodSpec, TestApiServer, TokenAlg, TokenSigning, TokenSpec,
        test_support::{expect_failure, secret},
    };

    const AUDIENCE: &str = "sigil-ca";

    async fn review(server: &TestApiServer, token: &str, audiences: &[&str]) -> TokenReviewStatus {
        let reviews: Api<TokenReview> = Api::all(server.client());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!audiences.is_empty())
                    .then(|| audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..TokenReview::default()
        };
        reviews
            .create(&PostParams::default(), &request)
            .await
            .expect("TokenReview is answered")
            .status
            .expect("TokenReview has a status")
    }

    fn rejected(status: &TokenReviewStatus) -> String {
        assert_eq!(status.authenticated, Some(false), "{status:?}");
        assert!(status.user.is_none(), "no user for a rejected token");
        status.error.clone().expect("a rejection carries an error")
    }

    fn pod_on_node(server: &TestApiServer) -> Pod {
        server.add_pod(&PodSpec::new("prod", "web-0", "web", "node-a"))
    }

    #[tokio::test]
    async fn valid_rs256_and_es256_tokens_are_authenticated_with_extras() {
        let server = TestApiServer::start().await;
        let pod = pod_on_node(&server);
        let sa: Api<ServiceAccount> = Api::namespaced(server.client(), "prod");
        let sa_uid = sa.get("web").await.unwrap().metadata.uid.unwrap();
        let pod_uid = pod.metadata.uid.clone().unwrap();
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let mut spec = TokenSpec::for_pod(&pod, AUDIENCE);
            spec.alg = alg;
            spec.audiences.push("other".into());
            let token = server.issue_token(&spec);
            let status = review(&server, &token, &[AUDIENCE]).await;
            assert_eq!(status.authenticated, Some(true), "{alg:?}: {status:?}");
            assert_eq!(status.error, None);
            assert_eq!(
                status.audiences,
                Some(vec![AUDIENCE.to_string()]),
                "only the requested audience"
            );
            let user = status.user.unwrap();
            assert_eq!(
                user.username.as_deref(),
                Some("system:serviceaccount:prod:web")
            );
            assert_eq!(user.uid.as_deref(), Some(sa_uid.as_str()));
            assert_eq!(
                user.groups.unwrap(),
                [
                    "system:serviceaccounts",
                    "system:serviceaccounts:prod",
                    "system:authenticated"
                ]
            );
            let extra = user.extra.unwrap();
            let one = |key: &str| extra[&format!("authentication.kubernetes.io/{key}")][0].clone();
            assert_eq!(one("pod-name"), "web-0");
            assert_eq!(one("pod-uid"), pod_uid);
            assert_eq!(one("node-name"), "node-a");
            assert!(!one("node-uid").is_empty());
            assert!(one("credential-id").starts_with("JTI="));
        }
        assert_eq!(server.token_reviews_served(), 2);
    }

    #[tokio::test]
    async fn default_audience_is_the_issuer() {
        let server = TestApiServer::start().await;
        let pod = pod_on_node(&server);
        let for_server = server.issue_token(&TokenSpec::for_pod(&pod, server.issuer()));
        let status = review(&server, &for_server, &[]).await;
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        assert_eq!(status.audiences, Some(vec![server.issuer().to_string()]));

        let for_ca = server.issue_token(&TokenSpec::for_pod(&pod, AUDIENCE));
        let error = rejected(&review(&server, &for_ca, &[]).await);
        assert_eq!(
            error,
            format!(
                "[invalid bearer token, token audiences [\"{AUDIENCE}\"] is invalid for the target audiences [\"{}\"]]",
                server.issuer()
            )
        );
    }

    #[tokio::test]
    async fn bad_tokens_are_rejected_with_the_reason() {
        let server = TestApiServer::start().await;
        let pod = pod_on_node(&server);
        let base = TokenSpec::for_pod(&pod, AUDIENCE);

        let mut expired = base.clone();
        expired.expires_in = -600;
        let error = rejected(&review(&server, &server.issue_token(&expired), &[AUDIENCE]).await);
        assert_eq!(
            error,
            "[invalid bearer token, service account token has expired]"
        );

        let mut early = base.clone();
        early.not_before_offset = 600;
        let error = rejected(&review(&server, &server.issue_token(&early), &[AUDIENCE]).await);
        assert_eq!(
            error,
            "[invalid bearer token, service account token is not valid yet]"
        );

        let error = rejected(&review(&server, &server.issue_token(&base), &["someone-else"]).await);
        assert!(
            error.contains("is invalid for the target audiences [\"someone-else\"]"),
            "{error}"
        );

        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let mut foreign = base.clone();
            foreign.alg = alg;
            foreign.signing = TokenSigning::UnknownKey;
            let error =
                rejected(&review(&server, &server.issue_token(&foreign), &[AUDIENCE]).await);
            assert_eq!(
                error,
                "[invalid bearer token, go-jose/go-jose: error in cryptographic primitive]"
            );
        }

        let error = rejected(&review(&server, "not-a-jwt", &[AUDIENCE]).await);
        assert_eq!(error, "invalid bearer token");
        assert_eq!(server.token_reviews_served(), 6);
    }

    #[tokio::test]
    async fn tokens_die_with_their_pod_and_service_account() {
        let server = TestApiServer::start().await;
        let pod = pod_on_node(&server);
        let token = server.issue_token(&TokenSpec::for_pod(&pod, AUDIENCE));
        assert_eq!(
            review(&server, &token, &[AUDIENCE]).await.authenticated,
            Some(true)
        );

        server.delete_pod("prod", "web-0");
        let error = rejected(&review(&server, &token, &[AUDIENCE]).await);
        assert_eq!(
            error,
            "[invalid bearer token, service account token has been invalidated]"
        );

        // A new pod under the same name has a new uid: the old token stays invalid.
        let replacement = pod_on_node(&server);
        let error = rejected(&review(&server, &token, &[AUDIENCE]).await);
        assert_eq!(
            error,
            format!(
                "[invalid bearer token, pod UID ({}) does not match service account pod ref claim ({})]",
                replacement.metadata.uid.as_deref().unwrap(),
                pod.metadata.uid.as_deref().unwrap()
            )
        );

        let fresh = server.issue_token(&TokenSpec::for_pod(&replacement, AUDIENCE));
        assert_eq!(
            review(&server, &fresh, &[AUDIENCE]).await.authenticated,
            Some(true)
        );
        let sas: Api<ServiceAccount> = Api::namespaced(server.client(), "prod");
        sas.delete("web", &DeleteParams::default()).await.unwrap();
        let error = rejected(&review(&server, &fresh, &[AUDIENCE]).await);
        assert_eq!(
            error,
            "[invalid bearer token, service account token has been invalidated]"
        );
    }

    #[tokio::test]
    async fn service_account_tokens_without_a_pod() {
        let server = TestApiServer::start().await;
        let mut spec = TokenSpec::for_service_account("sigil-system", "sigil-agent", AUDIENCE);
        spec.alg = TokenAlg::Es256;
        let status = review(&server, &server.issue_token(&spec), &[AUDIENCE]).await;
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        let extra = status.user.unwrap().extra.unwrap();
        assert!(!extra.contains_key("authentication.kubernetes.io/pod-name"));
        assert!(extra.contains_key("authentication.kubernetes.io/credential-id"));
    }

    #[tokio::test]
    async fn empty_token_is_a_bad_request() {
        let server = TestApiServer::start().await;
        let reviews: Api<TokenReview> = Api::all(server.client());
        let status = expect_failure(
            reviews
                .create(&PostParams::default(), &TokenReview::default())
                .await,
            400,
            "BadRequest",
        );
        assert_eq!(
            status.message,
            "token is required for TokenReview in authentication"
        );
        assert_eq!(server.token_reviews_served(), 1, "every POST is counted");
        // Unrelated writes are not TokenReviews.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::default_namespaced(server.client());
        secrets
            .create(&PostParams::default(), &secret("s", "v"))
            .await
            .unwrap();
        assert_eq!(server.token_reviews_served(), 1);
    }

    /// Verifies a token against the JWKS the server publishes, independently of the server's code.
    fn verify_with_jwks(jwks: &Value, token: &str) -> bool {
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(signing_input.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        let Some(key) = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == header["kid"])
        else {
            return false;
        };
        let field = |name: &str| URL_SAFE_NO_PAD.decode(key[name].as_str().unwrap()).unwrap();
        match key["kty"].as_str().unwrap() {
            "RSA" => ring::rsa::PublicKeyComponents {
                n: field("n"),
                e: field("e"),
            }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                signing_input.as_bytes(),
                &signature,
            )
            .is_ok(),
            "EC" => {
                let mut point = vec![0x04];
                point.extend(field("x"));
                point.extend(field("y"));
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    point,
                )
                .verify(signing_input.as_bytes(), &signature)
                .is_ok()
            }
            other => panic!("unexpected key type {other}"),
        }
    }

    #[tokio::test]
    async fn oidc_discovery_and_jwks_verify_issued_tokens() {
        let server = TestApiServer::start().await;
        let client = server.client();
        let get = |path: &str| http::Request::get(path).body(Vec::new()).unwrap();
        let config: Value = client
            .request(get("/.well-known/openid-configuration"))
            .await
            .unwrap();
        assert_eq!(config["issuer"], server.issuer());
        assert_eq!(
            config["jwks_uri"],
            format!("{}/openid/v1/jwks", server.url())
        );
        assert_eq!(
            config["id_token_signing_alg_values_supported"],
            serde_json::json!(["RS256", "ES256"])
        );
        let jwks: Value = client.request(get("/openid/v1/jwks")).await.unwrap();
        assert_eq!(
            jwks,
            serde_json::from_str::<Value>(&server.jwks_json()).unwrap()
        );

        let pod = pod_on_node(&server);
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let mut spec = TokenSpec::for_pod(&pod, AUDIENCE);
            spec.alg = alg;
            assert!(
                verify_with_jwks(&jwks, &server.issue_token(&spec)),
                "{alg:?}"
            );
            spec.signing = TokenSigning::UnknownKey;
            assert!(
                !verify_with_jwks(&jwks, &server.issue_token(&spec)),
                "{alg:?} unknown key"
            );
        }
        let version: Value = client.request(get("/version")).await.unwrap();
        assert_eq!(
            (version["major"].as_str(), version["minor"].as_str()),
            (Some("1"), Some("33"))
        );
    }
}
