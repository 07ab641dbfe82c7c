use std::process::Command;
use std::sync::OnceLock;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde_json::{Value, json};

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "sigil-ca";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn validation() -> Validation {
    Validation {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A 2048-bit RSA key from openssl (ring cannot generate RSA keys), made once per test run:
/// every `Signer::rsa()` is this same key. Asked for as PEM because OpenSSL 3.0 writes
/// `-outform DER` as PKCS#1, while the PEM `PRIVATE KEY` block is PKCS#8 in every version.
fn rsa_pkcs8() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "PEM",
            ])
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl genpkey failed");
        let pem = String::from_utf8(out.stdout).unwrap();
        let body: String = pem
            .lines()
            .skip_while(|line| *line != "-----BEGIN PRIVATE KEY-----")
            .skip(1)
            .take_while(|line| *line != "-----END PRIVATE KEY-----")
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    })
}

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
}

impl Signer {
    fn rsa() -> Self {
        Self::Rsa(RsaKeyPair::from_pkcs8(rsa_pkcs8()).unwrap())
    }

    fn ec(alg: &'static EcdsaSigningAlgorithm, name: &'static str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self::Ec(
            EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap(),
            name,
        )
    }

    fn es256() -> Self {
        Self::ec(&ECDSA_P256_SHA256_FIXED_SIGNING, "ES256")
    }

    fn es384() -> Self {
        Self::ec(&ECDSA_P384_SHA384_FIXED_SIGNING, "ES384")
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Rsa(_) => "RS256",
            Self::Ec(_, name) => name,
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Self::Rsa(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .unwrap();
                sig
            }
            Self::Ec(key, _) => key.sign(&rng, message).unwrap().as_ref().to_vec(),
        }
    }

    /// The public key as a JWK, the way the API server publishes it.
    fn jwk(&self, kid: &str) -> Value {
        match self {
            Self::Rsa(key) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
                       "n": b64(&public.n), "e": b64(&public.e)})
            }
            Self::Ec(key, name) => {
                let point = key.public_key().as_ref();
                let (x, y) = point[1..].split_at((point.len() - 1) / 2);
                let crv = if *name == "ES256" { "P-256" } else { "P-384" };
                json!({"use": "sig", "kty": "EC", "kid": kid, "alg": name, "crv": crv,
                       "x": b64(x), "y": b64(y)})
            }
        }
    }

    fn token(&self, kid: &str, claims: &Value) -> String {
        self.token_with_header(&json!({"alg": self.alg(), "kid": kid}), claims)
    }

    fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&sig))
    }
}

fn jwks_of(jwks: &[Value]) -> Jwks {
    Jwks::parse(&json!({ "keys": jwks }).to_string()).unwrap()
}

/// Claims as the API server mints them for a pod's projected token.
fn pod_claims() -> Value {
    let iat = secs(now()) - 600;
    json!({
        "aud": [AUDIENCE],
        "exp": iat + 3600,
        "iat": iat,
        "nbf": iat,
        "iss": ISSUER,
        "jti": "4b1c2f9e-8a47-4d9b-9a3e-0f5b1e3e2d11",
        "kubernetes.io": {
            "namespace": "payments",
            "node": {"name": "node-a", "uid": "node-uid-1"},
            "pod": {"name": "api-7d9f", "uid": "pod-uid-1"},
            "serviceaccount": {"name": "api", "uid": "sa-uid-1"},
            "warnafter": iat + 3000
        },
        "sub": "system:serviceaccount:payments:api"
    })
}

fn with(mut claims: Value, pointer: &str, value: Value) -> Value {
    *claims.pointer_mut(pointer).unwrap() = value;
    claims
}

fn expected_claims() -> ServiceAccountClaims {
    ServiceAccountClaims {
        namespace: "payments".to_owned(),
        service_account: "api".to_owned(),
        service_account_uid: Some("sa-uid-1".to_owned()),
        pod: Some(ObjectRef {
            name: "api-7d9f".to_owned(),
            uid: "pod-uid-1".to_owned(),
        }),
        node: Some(ObjectRef {
            name: "node-a".to_owned(),
            uid: "node-uid-1".to_owned(),
        }),
        expires_at: now() + Duration::from_secs(3000),
        audiences: vec![AUDIENCE.to_owned()],
    }
}

/// Signs `claims` with a fresh ES256 key and validates against a JWKS holding that key.
fn validate_es256(claims: &Value) -> Result<ServiceAccountClaims, JwtError> {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    validate(&signer.token("k1", claims), &jwks, &validation(), now())
}

#[test]
fn valid_rs256_token_yields_its_claims() {
    let signer = Signer::rsa();
    let jwks = jwks_of(&[signer.jwk("rsa-1")]);
    let token = signer.token("rsa-1", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Ok(expected_claims())
    );
}

#[test]
fn valid_es256_token_yields_its_claims() {
    assert_eq!(validate_es256(&pod_claims()), Ok(expected_claims()));
}

#[test]
fn valid_es384_token_yields_its_claims() {
    let signer = Signer::es384();
    let jwks = jwks_of(&[signer.jwk("ec-384")]);
    let token = signer.token("ec-384", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Ok(expected_claims())
    );
}

#[test]
fn key_is_chosen_by_kid_among_several() {
    let (a, b, c) = (Signer::es256(), Signer::es256(), Signer::rsa());
    let jwks = jwks_of(&[a.jwk("a"), b.jwk("b"), c.jwk("c")]);
    for (signer, kid) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let token = signer.token(kid, &pod_claims());
        assert_eq!(
            validate(&token, &jwks, &validation(), now()),
            Ok(expected_claims())
        );
    }
}

#[test]
fn token_without_kid_is_tried_against_every_key_of_its_algorithm() {
    let (other, signer) = (Signer::es256(), Signer::es256());
    let jwks = jwks_of(&[other.jwk("other"), signer.jwk("mine")]);
    let header = json!({"alg": "ES256"});
    let token = signer.token_with_header(&header, &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Ok(expected_claims())
    );

    let stranger = Signer::es256().token_with_header(&header, &pod_claims());
    assert_eq!(
        validate(&stranger, &jwks, &validation(), now()),
        Err(JwtError::BadSignature)
    );
    let rsa_only = jwks_of(&[Signer::rsa().jwk("r")]);
    assert_eq!(
        validate(&token, &rsa_only, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
}

#[test]
fn pod_and_node_binding_are_optional() {
    let mut claims = pod_claims();
    let kubernetes = claims["kubernetes.io"].as_object_mut().unwrap();
    kubernetes.remove("pod");
    kubernetes.remove("node");
    kubernetes["serviceaccount"]
        .as_object_mut()
        .unwrap()
        .remove("uid");
    let got = validate_es256(&claims).unwrap();
    assert_eq!(got.pod, None);
    assert_eq!(got.node, None);
    assert_eq!(got.service_account_uid, None);
    assert_eq!(
        (got.namespace.as_str(), got.service_account.as_str()),
        ("payments", "api")
    );
}

#[test]
fn expired_beyond_skew_is_rejected() {
    let at_limit = secs(now()) - CLOCK_SKEW.as_secs();
    for exp in [at_limit, at_limit - 1, secs(now()) - 3600] {
        let claims = with(pod_claims(), "/exp", json!(exp));
        assert_eq!(validate_es256(&claims), Err(JwtError::Expired), "exp {exp}");
    }
}

#[test]
fn expiry_within_skew_is_accepted() {
    let exp = secs(now()) - CLOCK_SKEW.as_secs() + 1;
    let claims = with(pod_claims(), "/exp", json!(exp));
    let got = validate_es256(&claims).unwrap();
    assert_eq!(got.expires_at, UNIX_EPOCH + Duration::from_secs(exp));
}

#[test]
fn fractional_exp_is_a_numeric_date() {
    let claims = with(pod_claims(), "/exp", json!(secs(now()) as f64 + 30.5));
    let got = validate_es256(&claims).unwrap();
    assert_eq!(got.expires_at, now() + Duration::from_millis(30_500));
    for bad in [json!(-5), json!("1700000000"), json!(1e300)] {
        let claims = with(pod_claims(), "/exp", bad.clone());
        assert!(
            matches!(validate_es256(&claims), Err(JwtError::Malformed(_))),
            "exp {bad}"
        );
    }
}

#[test]
fn missing_exp_is_rejected() {
    let mut claims = pod_claims();
    claims.as_object_mut().unwrap().remove("exp");
    assert_eq!(validate_es256(&claims), Err(JwtError::MissingClaim("exp")));
}

#[test]
fn nbf_or_iat_in_the_future_is_rejected() {
    let beyond_skew = secs(now()) + CLOCK_SKEW.as_secs() + 1;
    for claim in ["/nbf", "/iat"] {
        let claims = with(pod_claims(), claim, json!(beyond_skew));
        assert_eq!(
            validate_es256(&claims),
            Err(JwtError::NotYetValid),
            "{claim}"
        );
    }
    let within_skew = secs(now()) + CLOCK_SKEW.as_secs();
    let claims = with(pod_claims(), "/nbf", json!(within_skew));
    let claims = with(claims, "/iat", json!(within_skew));
    assert!(validate_es256(&claims).is_ok());
}

#[test]
fn any_one_of_several_accepted_audiences_suffices() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let token = signer.token("k1", &with(pod_claims(), "/aud", json!(["istio-ca"])));
    let both = Validation {
        audiences: vec![AUDIENCE.to_owned(), "istio-ca".to_owned()],
        ..validation()
    };
    assert!(validate(&token, &jwks, &both, now()).is_ok());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::WrongAudience)
    );
}

#[test]
fn wrong_audience_is_rejected() {
    let claims = with(pod_claims(), "/aud", json!(["istio-ca", "api"]));
    assert_eq!(validate_es256(&claims), Err(JwtError::WrongAudience));
    let claims = with(pod_claims(), "/aud", json!([]));
    assert_eq!(validate_es256(&claims), Err(JwtError::WrongAudience));
    let mut claims = pod_claims();
    claims.as_object_mut().unwrap().remove("aud");
    assert_eq!(validate_es256(&claims), Err(JwtError::MissingClaim("aud")));
}

#[test]
fn audience_as_plain_string_or_among_several_is_accepted() {
    let claims = with(pod_claims(), "/aud", json!(AUDIENCE));
    assert_eq!(validate_es256(&claims).unwrap().audiences, [AUDIENCE]);
    let claims = with(pod_claims(), "/aud", json!(["api", AUDIENCE]));
    assert_eq!(
        validate_es256(&claims).unwrap().audiences,
        ["api", AUDIENCE]
    );
}

#[test]
fn wrong_issuer_is_rejected() {
    let claims = with(pod_claims(), "/iss", json!("https://evil.example.com"));
    assert_eq!(validate_es256(&claims), Err(JwtError::WrongIssuer));
    // Compared exactly: no trailing-slash or case games.
    let claims = with(pod_claims(), "/iss", json!(format!("{ISSUER}/")));
    assert_eq!(validate_es256(&claims), Err(JwtError::WrongIssuer));
}

#[test]
fn key_outside_the_jwks_with_a_known_kid_is_a_bad_signature() {
    for (trusted, impostor) in [
        (Signer::es256(), Signer::es256()),
        (Signer::es384(), Signer::es384()),
    ] {
        let jwks = jwks_of(&[trusted.jwk("k1")]);
        let token = impostor.token("k1", &pod_claims());
        assert_eq!(
            validate(&token, &jwks, &validation(), now()),
            Err(JwtError::BadSignature)
        );
    }
}

#[test]
fn rsa_key_outside_the_jwks_is_a_bad_signature() {
    // A JWKS with an RSA key whose modulus differs from the signer's.
    let signer = Signer::rsa();
    let mut jwk = signer.jwk("k1");
    let Signer::Rsa(key) = &signer else {
        unreachable!()
    };
    let mut n = RsaPublicKeyComponents::<Vec<u8>>::from(key.public()).n;
    *n.last_mut().unwrap() ^= 0x02;
    jwk["n"] = json!(b64(&n));
    let jwks = jwks_of(&[jwk]);
    let token = signer.token("k1", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn unknown_kid_is_rejected() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let token = signer.token("k2", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
}

#[test]
fn alg_none_hmac_and_others_are_unsupported() {
    let signer = Signer::rsa();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let payload = b64(pod_claims().to_string().as_bytes());

    let none_header = b64(br#"{"alg":"none","kid":"k1"}"#);
    let token = format!("{none_header}.{payload}.");
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::UnsupportedAlgorithm("none".to_owned()))
    );

    // The classic confusion attack: HMAC keyed with the published RSA public key.
    let hs_header = b64(br#"{"alg":"HS256","kid":"k1"}"#);
    let signing_input = format!("{hs_header}.{payload}");
    let Signer::Rsa(key) = &signer else {
        unreachable!()
    };
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.public().as_ref());
    let tag = ring::hmac::sign(&mac_key, signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64(tag.as_ref()));
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::UnsupportedAlgorithm("HS256".to_owned()))
    );

    for alg in ["PS256", "RS512", "ES512", "EdDSA", "rs256"] {
        let token = signer.token_with_header(&json!({"alg": alg, "kid": "k1"}), &pod_claims());
        assert_eq!(
            validate(&token, &jwks, &validation(), now()),
            Err(JwtError::UnsupportedAlgorithm(alg.to_owned()))
        );
    }
}

#[test]
fn header_alg_must_match_the_kind_of_key_its_kid_names() {
    let (rsa, ec) = (Signer::rsa(), Signer::es256());
    let jwks = jwks_of(&[rsa.jwk("rsa"), ec.jwk("ec")]);
    let es256_at_rsa = ec.token_with_header(&json!({"alg": "ES256", "kid": "rsa"}), &pod_claims());
    assert_eq!(
        validate(&es256_at_rsa, &jwks, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
    let rs256_at_ec = rsa.token_with_header(&json!({"alg": "RS256", "kid": "ec"}), &pod_claims());
    assert_eq!(
        validate(&rs256_at_ec, &jwks, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
    let es384_at_p256 =
        Signer::es384().token_with_header(&json!({"alg": "ES384", "kid": "ec"}), &pod_claims());
    assert_eq!(
        validate(&es384_at_p256, &jwks, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
}

#[test]
fn tampered_token_is_a_bad_signature() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let token = signer.token("k1", &pod_claims());
    let parts: Vec<&str> = token.split('.').collect();

    let forged = with(
        pod_claims(),
        "/sub",
        json!("system:serviceaccount:kube-system:admin"),
    );
    let forged = with(forged, "/kubernetes.io/namespace", json!("kube-system"));
    let forged = with(forged, "/kubernetes.io/serviceaccount/name", json!("admin"));
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(forged.to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(
        validate(&tampered, &jwks, &validation(), now()),
        Err(JwtError::BadSignature)
    );

    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x01;
    let tampered = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
    assert_eq!(
        validate(&tampered, &jwks, &validation(), now()),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn truncated_or_garbage_tokens_are_malformed() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let token = signer.token("k1", &pod_claims());
    let (without_sig, _) = token.rsplit_once('.').unwrap();
    let header = token.split('.').next().unwrap();
    let cases = [
        String::new(),
        "garbage".to_owned(),
        without_sig.to_owned(),
        format!("{without_sig}."),
        format!("{token}.extra"),
        format!("{token}="),
        format!("Bearer {token}"),
        format!("{header}.!!!.AAAA"),
        format!("{}.e30.AAAA", b64(b"not json")),
        format!("{}.e30.AAAA", b64(br#"{"kid":"k1"}"#)),
        format!("{}.e30.AAAA", b64(br#"{"alg":"ES256","alg":"ES256"}"#)),
    ];
    for case in cases {
        assert!(
            matches!(
                validate(&case, &jwks, &validation(), now()),
                Err(JwtError::Malformed(_))
            ),
            "accepted or misclassified a malformed token of {} bytes",
            case.len()
        );
    }
}

#[test]
fn signed_payload_that_is_not_a_claims_object_is_malformed() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    for claims in [json!([1, 2]), json!({"exp": "soon"}), json!({"aud": 5})] {
        let token = signer.token("k1", &claims);
        assert!(
            matches!(
                validate(&token, &jwks, &validation(), now()),
                Err(JwtError::Malformed(_))
            ),
            "{claims}"
        );
    }
}

#[test]
fn critical_header_extensions_are_refused() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let header = json!({"alg": "ES256", "kid": "k1", "crit": ["exp"], "exp": 1});
    let token = signer.token_with_header(&header, &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::Malformed(
            "header has critical extensions".to_owned()
        ))
    );
}

#[test]
fn oversized_token_is_rejected_before_decoding() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let padding = "x".repeat(MAX_TOKEN_BYTES);
    let big = with(pod_claims(), "/jti", json!(padding));
    let token = signer.token("k1", &big);
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::TooLarge)
    );
    assert_eq!(unverified_expiry(&token), None);
}

#[test]
fn sub_inconsistent_with_kubernetes_claim_is_rejected() {
    let claims = with(
        pod_claims(),
        "/kubernetes.io/namespace",
        json!("kube-system"),
    );
    assert!(matches!(
        validate_es256(&claims),
        Err(JwtError::InconsistentClaims(_))
    ));
    let claims = with(
        pod_claims(),
        "/kubernetes.io/serviceaccount/name",
        json!("admin"),
    );
    assert!(matches!(
        validate_es256(&claims),
        Err(JwtError::InconsistentClaims(_))
    ));
}

#[test]
fn sub_that_is_not_a_service_account_is_rejected() {
    for sub in [
        "alice",
        "system:serviceaccount:payments",
        "system:serviceaccount::api",
        "system:serviceaccount:payments:",
        "system:serviceaccount:payments:api:extra",
        "system:node:node-a",
    ] {
        let claims = with(pod_claims(), "/sub", json!(sub));
        assert!(
            matches!(
                validate_es256(&claims),
                Err(JwtError::InconsistentClaims(_))
            ),
            "{sub}"
        );
    }
    // Refused even when `kubernetes.io` agrees with the odd subject.
    for (namespace, name) in [("", "api"), ("payments", ""), ("payments", "api:extra")] {
        let sub = format!("system:serviceaccount:{namespace}:{name}");
        let claims = with(pod_claims(), "/sub", json!(sub));
        let claims = with(claims, "/kubernetes.io/namespace", json!(namespace));
        let claims = with(claims, "/kubernetes.io/serviceaccount/name", json!(name));
        assert!(
            matches!(
                validate_es256(&claims),
                Err(JwtError::InconsistentClaims(_))
            ),
            "{sub}"
        );
    }
}

#[test]
fn missing_identity_claims_are_named() {
    let cases: [(&str, &'static str); 4] = [
        ("/sub", "sub"),
        ("/kubernetes.io", "kubernetes.io"),
        ("/kubernetes.io/namespace", "kubernetes.io.namespace"),
        (
            "/kubernetes.io/serviceaccount",
            "kubernetes.io.serviceaccount",
        ),
    ];
    for (pointer, claim) in cases {
        let mut claims = pod_claims();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        claims
            .pointer_mut(parent)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key);
        assert_eq!(validate_es256(&claims), Err(JwtError::MissingClaim(claim)));
    }
}

#[test]
fn legacy_secret_based_token_is_refused() {
    // The shape of a token from a `kubernetes.io/service-account-token` Secret.
    let legacy = json!({
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "payments",
        "kubernetes.io/serviceaccount/secret.name": "api-token-x7k2p",
        "kubernetes.io/serviceaccount/service-account.name": "api",
        "kubernetes.io/serviceaccount/service-account.uid": "sa-uid-1",
        "sub": "system:serviceaccount:payments:api"
    });
    assert_eq!(validate_es256(&legacy), Err(JwtError::LegacyToken));
    // Even dressed up with projected-token claims, the legacy claims give it away.
    let mut hybrid = pod_claims();
    hybrid["kubernetes.io/serviceaccount/namespace"] = json!("payments");
    assert_eq!(validate_es256(&hybrid), Err(JwtError::LegacyToken));
}

#[test]
fn jwks_parse_skips_keys_it_cannot_use() {
    let (rsa, p256, p384) = (Signer::rsa(), Signer::es256(), Signer::es384());
    let mut no_alg = p256.jwk("no-alg");
    no_alg.as_object_mut().unwrap().remove("alg");
    no_alg.as_object_mut().unwrap().remove("use");
    let mut enc = p256.jwk("enc");
    enc["use"] = json!("enc");
    let mut ps256 = rsa.jwk("ps256");
    ps256["alg"] = json!("PS256");
    let mut mislabelled = p256.jwk("mislabelled");
    mislabelled["alg"] = json!("ES384");
    let mut sign_only = p256.jwk("sign-only");
    sign_only["key_ops"] = json!(["sign"]);
    let mut small_n = vec![0xc3; 128];
    small_n[127] = 0x01;
    let json = json!({"keys": [
        rsa.jwk("rsa"), p256.jwk("p256"), p384.jwk("p384"), no_alg,
        enc, ps256, mislabelled, sign_only,
        {"kty": "RSA", "kid": "rsa-1024", "n": b64(&small_n), "e": "AQAB"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[7; 32])},
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
    ]});
    let jwks = Jwks::parse(&json.to_string()).unwrap();
    assert_eq!(jwks.len(), 4);
    assert!(!jwks.is_empty());
    let kids: Vec<_> = jwks
        .keys
        .iter()
        .map(|k| k.kid.as_deref().unwrap())
        .collect();
    assert_eq!(kids, ["rsa", "p256", "p384", "no-alg"]);

    // The skipped keys cannot be used even though their kid is present.
    let token = p256.token("enc", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Err(JwtError::UnknownKey)
    );
    let token = p256.token("no-alg", &pod_claims());
    assert!(validate(&token, &jwks, &validation(), now()).is_ok());
}

#[test]
fn jwks_without_usable_keys_or_with_broken_ones_is_invalid() {
    let p256 = Signer::es256();
    let mut short_x = p256.jwk("k");
    short_x["x"] = json!(b64(&[1; 31]));
    let mut padded_y = p256.jwk("k");
    padded_y["y"] = json!(format!("{}=", padded_y["y"].as_str().unwrap()));
    let mut no_crv = p256.jwk("k");
    no_crv.as_object_mut().unwrap().remove("crv");
    let cases = [
        "not json".to_owned(),
        "[]".to_owned(),
        json!({}).to_string(),
        json!({"keys": []}).to_string(),
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string(),
        json!({"keys": [short_x]}).to_string(),
        json!({"keys": [padded_y]}).to_string(),
        json!({"keys": [no_crv]}).to_string(),
        json!({"keys": [{"kty": "RSA", "kid": "r", "e": "AQAB"}]}).to_string(),
        json!({"keys": [{"kty": "RSA", "kid": "r", "n": b64(&[0xc3; 256]), "e": "AA"}]})
            .to_string(),
        json!({"keys": [{"kid": "no-kty"}]}).to_string(),
    ];
    for case in cases {
        assert!(
            matches!(Jwks::parse(&case), Err(JwtError::InvalidJwks(_))),
            "{case}"
        );
    }
}

#[test]
fn jwk_rsa_integers_with_leading_zeros_still_verify() {
    let signer = Signer::rsa();
    let Signer::Rsa(key) = &signer else {
        unreachable!()
    };
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
    let padded = |v: &[u8]| b64(&[&[0u8][..], v].concat());
    let jwk = json!({"kty": "RSA", "kid": "k1", "n": padded(&public.n), "e": padded(&public.e)});
    let jwks = jwks_of(&[jwk]);
    let token = signer.token("k1", &pod_claims());
    assert_eq!(
        validate(&token, &jwks, &validation(), now()),
        Ok(expected_claims())
    );
}

#[test]
fn unverified_expiry_reads_exp_without_a_key() {
    let token = Signer::es256().token("whatever", &pod_claims());
    assert_eq!(
        unverified_expiry(&token),
        Some(now() + Duration::from_secs(3000))
    );
    let mut no_exp = pod_claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        unverified_expiry(&Signer::es256().token("k", &no_exp)),
        None
    );
    assert_eq!(unverified_expiry("garbage"), None);
    assert_eq!(unverified_expiry("a.!!!.c"), None);
    assert_eq!(unverified_expiry(&format!("a.{}.c", b64(b"[]"))), None);
}

#[test]
fn errors_never_echo_the_token() {
    let signer = Signer::es256();
    let jwks = jwks_of(&[signer.jwk("k1")]);
    let long_alg = "A".repeat(1000);
    let token = signer.token_with_header(&json!({"alg": long_alg, "kid": "k1"}), &pod_claims());
    let err = validate(&token, &jwks, &validation(), now()).unwrap_err();
    assert_eq!(
        err,
        JwtError::UnsupportedAlgorithm("A".repeat(MAX_ECHOED_ALG_CHARS))
    );
    let good = signer.token("k1", &pod_claims());
    let (header, rest) = good.split_once('.').unwrap();
    let bad_header = format!("{}x.{rest}", &header[..header.len() - 1]);
    for (token, err) in [
        (&token, err),
        (
            &bad_header,
            validate(&bad_header, &jwks, &validation(), now()).unwrap_err(),
        ),
    ] {
        let message = err.to_string();
        for part in token.split('.') {
            assert!(!message.contains(part), "{message}");
        }
    }
}
