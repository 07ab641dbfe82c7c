//! Local validation of Kubernetes service-account JWTs against the cluster's JWKS, so the CA can
//! authenticate a caller without a TokenReview round trip per request.
//!
//! Only projected (bound) tokens are accepted: they carry an audience, an expiry and the
//! `kubernetes.io` claim naming the pod and node they are bound to. Legacy secret-based tokens
//! never expire and are refused. The signature is checked with `ring` before any claim is trusted;
//! the token's header only chooses a key from the configured set by `alg` and `kid` (`jku`, `jwk`
//! and `x5u` are ignored, so a token can never bring its own key).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Number;

/// Bearer tokens larger than this are rejected before any decoding; Kubernetes tokens are ~1 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Leeway for `exp`, `nbf` and `iat`, for clock differences between the API server and the CA.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The `sub` of every service-account token: `system:serviceaccount:<namespace>:<name>`.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// How much of an unrecognised `alg` is echoed into errors (it comes from an unverified header).
const MAX_ECHOED_ALG_CHARS: usize = 32;

/// Why a token (or a JWKS) was refused. The messages go to the CA's audit log: they never
/// contain the token, and values from unverified parts of it are truncated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unsupported JWS algorithm {0:?} (accepted: RS256, ES256, ES384)")]
    UnsupportedAlgorithm(String),
    #[error("no key in the JWKS matches the token's key id and algorithm")]
    UnknownKey,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token issuer is not the cluster's service-account issuer")]
    WrongIssuer,
    #[error("token audience does not include this CA")]
    WrongAudience,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(&'static str),
    #[error("token claims are inconsistent: {0}")]
    InconsistentClaims(String),
    #[error("legacy secret-based service-account token; only projected tokens are accepted")]
    LegacyToken,
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
}

/// The JWS algorithms Kubernetes signs service-account tokens with that `ring` can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Rs256,
    Es256,
    Es384,
}

impl Algorithm {
    fn from_header(alg: &str) -> Result<Self, JwtError> {
        match alg {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            "ES384" => Ok(Self::Es384),
            other => Err(JwtError::UnsupportedAlgorithm(
                other.chars().take(MAX_ECHOED_ALG_CHARS).collect(),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
        }
    }
}

/// A verification key; the variant fixes the one algorithm it may be used with, so a token can
/// never get an RSA key used for ECDSA or the other way round.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    Rs256 {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed SEC1 point `0x04 || x || y`, the form `ring` verifies with.
    Es256 {
        point: Vec<u8>,
    },
    Es384 {
        point: Vec<u8>,
    },
}

impl PublicKey {
    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Rs256 { .. } => Algorithm::Rs256,
            Self::Es256 { .. } => Algorithm::Es256,
            Self::Es384 { .. } => Algorithm::Es384,
        }
    }

    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        match self {
            Self::Rs256 { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Self::Es256 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Self::Es384 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct VerificationKey {
    kid: Option<String>,
    key: PublicKey,
}

/// The cluster's service-account signing keys (RFC 7517 JWK set), as served at
/// `/openid/v1/jwks` by the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<VerificationKey>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(rename = "use")]
    public_key_use: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl Jwks {
    /// Parses a JWK set. Keys that cannot verify RS256, ES256 or ES384 signatures (other key
    /// types or curves, other `alg`, `use` other than `sig`, RSA moduli outside 2048..=8192 bits)
    /// are skipped, so a set may also carry keys for other purposes; a malformed key of a
    /// supported type, or a set with no usable key at all, is an error.
    pub fn parse(json: &str) -> Result<Jwks, JwtError> {
        let raw: RawJwks = serde_json::from_str(json)
            .map_err(|e| JwtError::InvalidJwks(format!("not a JWK set: {e}")))?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (index, jwk) in raw.keys.into_iter().enumerate() {
            let kid = jwk.kid.clone();
            let key = parse_jwk(jwk).map_err(|reason| {
                JwtError::InvalidJwks(format!("key {index} (kid {kid:?}): {reason}"))
            })?;
            if let Some(key) = key {
                keys.push(VerificationKey { kid, key });
            }
        }
        if keys.is_empty() {
            return Err(JwtError::InvalidJwks(
                "no usable signature key (RS256, ES256 or ES384)".to_owned(),
            ));
        }
        Ok(Jwks { keys })
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true for a parsed set; here because `len` is.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `sig` over `message` with a key for `alg`: the one(s) named by `kid`, or, for a
    /// token without `kid`, any key of that algorithm.
    fn verify(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), JwtError> {
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| {
                k.key.algorithm() == alg && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid))
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        if candidates.any(|k| k.key.verifies(message, sig)) {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

/// `Ok(None)` for a key this module does not use; `Err` for a malformed key it would use.
fn parse_jwk(jwk: RawJwk) -> Result<Option<PublicKey>, String> {
    if jwk.public_key_use.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if jwk
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return Ok(None);
    }
    let alg = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => Algorithm::Rs256,
        ("EC", Some("P-256")) => Algorithm::Es256,
        ("EC", Some("P-384")) => Algorithm::Es384,
        ("EC", None) => return Err("EC key without crv".to_owned()),
        _ => return Ok(None),
    };
    // `alg` is optional in a JWK; when present it must be the one algorithm the key can serve.
    if jwk.alg.as_deref().is_some_and(|a| a != alg.name()) {
        return Ok(None);
    }
    match alg {
        Algorithm::Rs256 => {
            let n = strip_leading_zeros(decode_member(jwk.n.as_deref(), "n")?);
            let e = strip_leading_zeros(decode_member(jwk.e.as_deref(), "e")?);
            if e.is_empty() {
                return Err("RSA exponent is zero".to_owned());
            }
            if !(2048..=8192).contains(&bit_length(&n)) {
                return Ok(None);
            }
            Ok(Some(PublicKey::Rs256 { n, e }))
        }
        Algorithm::Es256 | Algorithm::Es384 => {
            let coordinate_len = if alg == Algorithm::Es256 { 32 } else { 48 };
            let x = decode_member(jwk.x.as_deref(), "x")?;
            let y = decode_member(jwk.y.as_deref(), "y")?;
            if x.len() != coordinate_len || y.len() != coordinate_len {
                return Err(format!(
                    "{} coordinates must be {coordinate_len} bytes each",
                    alg.name()
                ));
            }
            let mut point = Vec::with_capacity(1 + 2 * coordinate_len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(Some(if alg == Algorithm::Es256 {
                PublicKey::Es256 { point }
            } else {
                PublicKey::Es384 { point }
            }))
        }
    }
}

fn decode_member(value: Option<&str>, member: &str) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("missing {member:?}"))?;
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| format!("{member:?} is not unpadded base64url"))
}

/// RFC 7518 wants minimal big-endian integers, but some producers pad them; `ring` insists on
/// the minimal form, and the value is the same either way.
fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    bytes.drain(..zeros);
    bytes
}

fn bit_length(minimal_be: &[u8]) -> usize {
    match minimal_be.first() {
        Some(&top) => minimal_be.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    }
}

/// What the CA requires of a token besides a good signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// The cluster's service-account issuer (`--service-account-issuer`), compared exactly.
    pub issuer: String,
    /// The audiences a token may be minted for (any one suffices), e.g. `sigil-ca`.
    pub audiences: Vec<String>,
}

/// The identity a validated token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountClaims {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: Option<String>,
    /// The pod the token is bound to, if any.
    pub pod: Option<ObjectRef>,
    /// The node the token is bound to (or whose pod it is bound to), if the cluster records it.
    pub node: Option<ObjectRef>,
    pub expires_at: SystemTime,
    pub audiences: Vec<String>,
}

/// A Kubernetes object a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<Number>,
    nbf: Option<Number>,
    iat: Option<Number>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
    // Secret-based tokens carry flat claims like these instead of `kubernetes.io`, and no `exp`.
    #[serde(rename = "kubernetes.io/serviceaccount/namespace")]
    legacy_namespace: Option<IgnoredAny>,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name")]
    legacy_service_account: Option<IgnoredAny>,
}

/// RFC 7519 allows `aud` to be a single string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<ServiceAccountRef>,
    pod: Option<ObjectRef>,
    node: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ServiceAccountRef {
    name: Option<String>,
    uid: Option<String>,
}

#[derive(Deserialize)]
struct ExpiryOnly {
    exp: Option<Number>,
}

/// The three parts of a compact JWS, still base64url-encoded.
struct CompactJws<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`: the bytes the signature covers.
    signing_input: &'a str,
}

impl<'a> CompactJws<'a> {
    fn split(token: &'a str) -> Result<Self, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        Ok(Self {
            header,
            payload,
            signature,
            signing_input: &token[..header.len() + 1 + payload.len()],
        })
    }
}

fn malformed(reason: &str) -> JwtError {
    JwtError::Malformed(reason.to_owned())
}

fn decode_part(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(format!("{what} is not unpadded base64url")))
}

/// Validates a service-account token: its signature against `jwks` first, then its claims
/// against `v` at time `now`, and returns the identity it proves.
pub fn validate(
    token: &str,
    jwks: &Jwks,
    v: &Validation,
    now: SystemTime,
) -> Result<ServiceAccountClaims, JwtError> {
    let jws = CompactJws::split(token)?;
    // Unverified input: parse errors are reported without echoing it.
    let header: Header = serde_json::from_slice(&decode_part(jws.header, "header")?)
        .map_err(|_| malformed("header is not a JSON object with a string \"alg\""))?;
    let alg = Algorithm::from_header(&header.alg)?;
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: extensions we do not understand must not be ignored.
        return Err(malformed("header has critical extensions"));
    }
    let payload = decode_part(jws.payload, "payload")?;
    let sig = decode_part(jws.signature, "signature")?;
    if sig.is_empty() {
        return Err(malformed("empty signature"));
    }
    jwks.verify(
        alg,
        header.kid.as_deref(),
        jws.signing_input.as_bytes(),
        &sig,
    )?;

    // Signed by the cluster from here on, so parse errors may say what was wrong.
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    check_claims(claims, v, now)
}

fn check_claims(
    claims: Claims,
    v: &Validation,
    now: SystemTime,
) -> Result<ServiceAccountClaims, JwtError> {
    if claims.legacy_namespace.is_some() || claims.legacy_service_account.is_some() {
        return Err(JwtError::LegacyToken);
    }

    let iss = claims.iss.ok_or(JwtError::MissingClaim("iss"))?;
    if iss != v.issuer {
        return Err(JwtError::WrongIssuer);
    }

    let audiences = match claims.aud.ok_or(JwtError::MissingClaim("aud"))? {
        Audience::One(aud) => vec![aud],
        Audience::Many(auds) => auds,
    };
    if !audiences.iter().any(|a| v.audiences.contains(a)) {
        return Err(JwtError::WrongAudience);
    }

    let expires_at = numeric_date(&claims.exp.ok_or(JwtError::MissingClaim("exp"))?, "exp")?;
    // Expired once `now - skew` reaches `exp` (RFC 7519 §4.1.4: valid only before `exp`).
    if now
        .checked_sub(CLOCK_SKEW)
        .is_some_and(|earliest| expires_at <= earliest)
    {
        return Err(JwtError::Expired);
    }
    let latest = now.checked_add(CLOCK_SKEW);
    for (value, name) in [(&claims.nbf, "nbf"), (&claims.iat, "iat")] {
        if let Some(value) = value {
            let at = numeric_date(value, name)?;
            if latest.is_some_and(|latest| at > latest) {
                return Err(JwtError::NotYetValid);
            }
        }
    }

    let sub = claims.sub.ok_or(JwtError::MissingClaim("sub"))?;
    let (sub_namespace, sub_service_account) = sub
        .strip_prefix(SUBJECT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| {
            JwtError::InconsistentClaims(format!(
                "sub {sub:?} is not {SUBJECT_PREFIX}<namespace>:<name>"
            ))
        })?;

    let kubernetes = claims
        .kubernetes
        .ok_or(JwtError::MissingClaim("kubernetes.io"))?;
    let namespace = kubernetes
        .namespace
        .ok_or(JwtError::MissingClaim("kubernetes.io.namespace"))?;
    let service_account = kubernetes
        .serviceaccount
        .ok_or(JwtError::MissingClaim("kubernetes.io.serviceaccount"))?;
    let service_account_name = service_account
        .name
        .ok_or(JwtError::MissingClaim("kubernetes.io.serviceaccount.name"))?;
    if namespace != sub_namespace {
        return Err(JwtError::InconsistentClaims(format!(
            "sub names namespace {sub_namespace:?} but kubernetes.io.namespace is {namespace:?}"
        )));
    }
    if service_account_name != sub_service_account {
        return Err(JwtError::InconsistentClaims(format!(
            "sub names service account {sub_service_account:?} but \
             kubernetes.io.serviceaccount.name is {service_account_name:?}"
        )));
    }

    Ok(ServiceAccountClaims {
        namespace,
        service_account: service_account_name,
        service_account_uid: service_account.uid,
        pod: kubernetes.pod,
        node: kubernetes.node,
        expires_at,
        audiences,
    })
}

/// An RFC 7519 NumericDate: seconds since the epoch, possibly fractional.
fn numeric_date(value: &Number, claim: &str) -> Result<SystemTime, JwtError> {
    let since_epoch = match value.as_u64() {
        Some(secs) => Some(Duration::from_secs(secs)),
        None => value
            .as_f64()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok()),
    };
    since_epoch
        .and_then(|d| UNIX_EPOCH.checked_add(d))
        .ok_or_else(|| JwtError::Malformed(format!("{claim} is not a valid NumericDate")))
}

/// Reads `exp` from a token WITHOUT verifying it. Use it only to bound how long a TokenReview
/// result for this token may be cached, never to decide whether the token is valid.
pub fn unverified_expiry(token: &str) -> Option<SystemTime> {
    let jws = CompactJws::split(token).ok()?;
    let payload = decode_part(jws.payload, "payload").ok()?;
    let claims: ExpiryOnly = serde_json::from_slice(&payload).ok()?;
    numeric_date(&claims.exp?, "exp").ok()
}

#[cfg(test)]
mod tests;
