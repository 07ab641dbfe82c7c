//! Service-account JWTs shaped like the projected, pod-bound tokens the kubelet mounts: issuing
//! them for tests, and checking signature, issuer and time claims for TokenReview with the API
//! server's rules (one minute of clock leeway) and error messages.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::keys::{server_keys, unknown_keys};

/// Clock skew tolerated on exp/nbf/iat, as go-jose's `DefaultLeeway` in the API server.
const LEEWAY_SECONDS: i64 = 60;
/// Lifetime of `TokenSpec::for_pod` tokens, and how long before its expiry an expired one was issued.
const DEFAULT_LIFETIME_SECONDS: i64 = 3600;

/// JWS algorithm of an issued token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenAlg {
    Rs256,
    Es256,
}

impl TokenAlg {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            _ => None,
        }
    }
}

/// Which key signs an issued token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSigning {
    /// The server's key, published in its JWKS: the token verifies.
    ServerKey,
    /// A key of the same type and kid format that is not in the JWKS: verification fails.
    UnknownKey,
}

/// What to put in an issued service-account token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    /// `(name, uid)` of the pod the token is bound to.
    pub pod: Option<(String, String)>,
    /// `(name, uid)` of the node; an empty uid is filled from the stored Node, as TokenRequest does.
    pub node: Option<(String, String)>,
    /// Seconds from now until `exp`; negative for an already expired token.
    pub expires_in: i64,
    /// Seconds from `iat` to `nbf`; positive for a token that is not valid yet.
    pub not_before_offset: i64,
    pub alg: TokenAlg,
    pub signing: TokenSigning,
}

impl TokenSpec {
    /// A pod-bound token for `pod`'s namespace, service account and node: RS256, valid one hour.
    pub fn for_pod(pod: &Pod, audience: &str) -> TokenSpec {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        TokenSpec {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            audiences: vec![audience.to_string()],
            pod: Some((
                meta.name.clone().unwrap_or_default(),
                meta.uid.clone().unwrap_or_default(),
            )),
            node: spec
                .and_then(|s| s.node_name.clone())
                .map(|node| (node, String::new())),
            expires_in: DEFAULT_LIFETIME_SECONDS,
            not_before_offset: 0,
            alg: TokenAlg::Rs256,
            signing: TokenSigning::ServerKey,
        }
    }
}

impl TokenSpec {
    /// A token for a service account, bound to no pod or node: RS256, valid one hour.
    pub fn for_service_account(
        namespace: &str,
        service_account: &str,
        audience: &str,
    ) -> TokenSpec {
        TokenSpec {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            audiences: vec![audience.to_string()],
            pod: None,
            node: None,
            expires_in: DEFAULT_LIFETIME_SECONDS,
            not_before_offset: 0,
            alg: TokenAlg::Rs256,
            signing: TokenSigning::ServerKey,
        }
    }
}

/// `{name, uid}` of an object a token is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The private `kubernetes.io` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    pub serviceaccount: ObjectRef,
}

/// JWT `aud` may be one string or an array; Kubernetes issues arrays and accepts both.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Audience::deserialize(deserializer)? {
        Audience::One(one) => vec![one],
        Audience::Many(many) => many,
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    #[serde(default)]
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
    pub nbf: i64,
    pub sub: String,
}

/// Why a token is rejected, worded as the API server's service-account authenticator words it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT of this issuer: the service-account authenticator does not handle it.
    #[error("invalid bearer token")]
    NotServiceAccountToken,
    #[error(
        "go-jose/go-jose: unexpected signature algorithm {0:?}; expected [\"RS256\" \"ES256\"]"
    )]
    UnsupportedAlgorithm(String),
    #[error("go-jose/go-jose: error in cryptographic primitive")]
    BadSignature,
    #[error("service account token is not valid yet")]
    NotYetValid,
    #[error("service account token has expired")]
    Expired,
    #[error("service account token is issued in the future")]
    IssuedInFuture,
    #[error("token audiences {} is invalid for the target audiences {}", go_quoted(.token), go_quoted(.requested))]
    AudienceMismatch {
        token: Vec<String>,
        requested: Vec<String>,
    },
    /// The bound pod, node or service account no longer exists.
    #[error("service account token has been invalidated")]
    Invalidated,
    #[error("pod UID ({actual}) does not match service account pod ref claim ({claim})")]
    PodUidMismatch { actual: String, claim: String },
    #[error("node UID ({actual}) does not match service account node ref claim ({claim})")]
    NodeUidMismatch { actual: String, claim: String },
    #[error("service account UID ({actual}) does not match claim ({claim})")]
    ServiceAccountUidMismatch { actual: String, claim: String },
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn b64_json(value: &impl Serialize) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JWT parts serialize"))
}

/// Signs a token for `spec`; `service_account_uid` and `node` come from the stored objects.
pub fn issue(
    spec: &TokenSpec,
    issuer: &str,
    service_account_uid: &str,
    node: Option<ObjectRef>,
    now: i64,
) -> String {
    let exp = now + spec.expires_in;
    // An already expired token was issued one default lifetime before it expired.
    let iat = if spec.expires_in > 0 {
        now
    } else {
        exp - DEFAULT_LIFETIME_SECONDS
    };
    let claims = Claims {
        aud: spec.audiences.clone(),
        exp,
        iat,
        iss: issuer.to_string(),
        jti: crate::store::new_uid(),
        kubernetes: KubernetesClaims {
            namespace: spec.namespace.clone(),
            node,
            pod: spec.pod.clone().map(|(name, uid)| ObjectRef { name, uid }),
            serviceaccount: ObjectRef {
                name: spec.service_account.clone(),
                uid: service_account_uid.to_string(),
            },
        },
        nbf: iat + spec.not_before_offset,
        sub: format!(
            "system:serviceaccount:{}:{}",
            spec.namespace, spec.service_account
        ),
    };
    let keys = match spec.signing {
        TokenSigning::ServerKey => server_keys(),
        TokenSigning::UnknownKey => unknown_keys(),
    };
    let key = keys.key(spec.alg);
    let header = json!({ "alg": key.alg().name(), "kid": key.kid });
    let signing_input = format!("{}.{}", b64_json(&header), b64_json(&claims));
    let signature = URL_SAFE_NO_PAD.encode(key.sign(signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

fn decode_json(part: &str) -> Result<Value, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::NotServiceAccountToken)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::NotServiceAccountToken)
}

/// Verifies signature, issuer and time claims against the server's keys at time `now`.
pub fn validate(token: &str, issuer: &str, now: i64) -> Result<Claims, TokenError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return Err(TokenError::NotServiceAccountToken);
    };
    let header = decode_json(header)?;
    let payload_json = decode_json(payload)?;
    // Like the API server, look at the (unverified) issuer first: other issuers are not ours.
    if payload_json["iss"] != issuer {
        return Err(TokenError::NotServiceAccountToken);
    }
    let alg_name = header["alg"].as_str().unwrap_or_default();
    let alg = TokenAlg::from_name(alg_name)
        .ok_or_else(|| TokenError::UnsupportedAlgorithm(alg_name.to_string()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::BadSignature)?;
    let signing_input = &token[..header_payload_len(token)];
    if !server_keys().verify(alg, signing_input.as_bytes(), &signature) {
        return Err(TokenError::BadSignature);
    }
    let claims: Claims =
        serde_json::from_value(payload_json).map_err(|_| TokenError::NotServiceAccountToken)?;
    // go-jose's order: nbf, exp, iat.
    if claims.nbf > now + LEEWAY_SECONDS {
        return Err(TokenError::NotYetValid);
    }
    if now - LEEWAY_SECONDS > claims.exp {
        return Err(TokenError::Expired);
    }
    if claims.iat > now + LEEWAY_SECONDS {
        return Err(TokenError::IssuedInFuture);
    }
    Ok(claims)
}

/// Length of `header.payload`, the JWS signing input.
fn header_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn spec(alg: TokenAlg) -> TokenSpec {
        TokenSpec {
            namespace: "prod".into(),
            service_account: "web".into(),
            audiences: vec!["sigil-ca".into()],
            pod: Some(("web-0".into(), "pod-uid".into())),
            node: None,
            expires_in: 600,
            not_before_offset: 0,
            alg,
            signing: TokenSigning::ServerKey,
        }
    }

    #[test]
    fn issued_tokens_have_kubernetes_claims_and_verify() {
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let now = unix_now();
            let node = Some(ObjectRef {
                name: "node-a".into(),
                uid: "node-uid".into(),
            });
            let token = issue(&spec(alg), ISSUER, "sa-uid", node.clone(), now);
            let header = decode_json(token.split('.').next().unwrap()).unwrap();
            assert_eq!(header["alg"], alg.name());
            assert_eq!(header["kid"], server_keys().key(alg).kid);
            let claims = validate(&token, ISSUER, now).unwrap();
            assert_eq!(claims.sub, "system:serviceaccount:prod:web");
            assert_eq!(claims.aud, ["sigil-ca"]);
            assert_eq!(claims.exp, now + 600);
            assert_eq!(claims.nbf, claims.iat);
            assert_eq!(claims.kubernetes.serviceaccount.uid, "sa-uid");
            assert_eq!(claims.kubernetes.pod.unwrap().name, "web-0");
            assert_eq!(claims.kubernetes.node, node);
            assert_eq!(claims.jti.len(), 36);
        }
    }

    #[test]
    fn time_claims_are_checked_with_one_minute_leeway() {
        let now = unix_now();
        let mut expired = spec(TokenAlg::Rs256);
        expired.expires_in = -120;
        let token = issue(&expired, ISSUER, "sa-uid", None, now);
        assert_eq!(validate(&token, ISSUER, now), Err(TokenError::Expired));

        let mut barely = spec(TokenAlg::Rs256);
        barely.expires_in = -30;
        let token = issue(&barely, ISSUER, "sa-uid", None, now);
        assert!(validate(&token, ISSUER, now).is_ok(), "within leeway");

        let mut early = spec(TokenAlg::Es256);
        early.not_before_offset = 600;
        let token = issue(&early, ISSUER, "sa-uid", None, now);
        assert_eq!(validate(&token, ISSUER, now), Err(TokenError::NotYetValid));

        // Issued an hour ahead; nbf pulled back to now so only iat is wrong.
        let mut future = spec(TokenAlg::Rs256);
        future.not_before_offset = -3600;
        let token = issue(&future, ISSUER, "sa-uid", None, now + 3600);
        assert_eq!(
            validate(&token, ISSUER, now),
            Err(TokenError::IssuedInFuture)
        );
    }

    #[test]
    fn foreign_tampered_and_malformed_tokens_are_rejected() {
        let now = unix_now();
        for alg in [TokenAlg::Rs256, TokenAlg::Es256] {
            let mut foreign = spec(alg);
            foreign.signing = TokenSigning::UnknownKey;
            let token = issue(&foreign, ISSUER, "sa-uid", None, now);
            assert_eq!(validate(&token, ISSUER, now), Err(TokenError::BadSignature));
        }
        let token = issue(&spec(TokenAlg::Rs256), ISSUER, "sa-uid", None, now);
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = decode_json(parts[1]).unwrap();
        claims["kubernetes.io"]["namespace"] = json!("kube-system");
        let tampered = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);
        assert_eq!(
            validate(&tampered, ISSUER, now),
            Err(TokenError::BadSignature)
        );

        let none_alg = format!("{}.{}.", b64_json(&json!({ "alg": "none" })), parts[1]);
        assert_eq!(
            validate(&none_alg, ISSUER, now),
            Err(TokenError::UnsupportedAlgorithm("none".into()))
        );
        assert_eq!(
            validate("not-a-jwt", ISSUER, now),
            Err(TokenError::NotServiceAccountToken)
        );
        assert_eq!(
            validate(&token, "https://other.example", now),
            Err(TokenError::NotServiceAccountToken)
        );
    }

    #[test]
    fn single_string_audience_is_accepted() {
        let claims: Claims = serde_json::from_value(json!({
            "aud": "one", "exp": 2, "iat": 1, "iss": ISSUER, "nbf": 1, "sub": "s",
            "kubernetes.io": { "namespace": "n", "serviceaccount": { "name": "a", "uid": "u" } }
        }))
        .unwrap();
        assert_eq!(claims.aud, ["one"]);
    }

    #[test]
    fn audience_error_reads_like_go() {
        let err = TokenError::AudienceMismatch {
            token: vec!["a".into(), "b".into()],
            requested: vec!["sigil-ca".into()],
        };
        assert_eq!(
            err.to_string(),
            "token audiences [\"a\" \"b\"] is invalid for the target audiences [\"sigil-ca\"]"
        );
    }
}
