//! The CA as it runs in a cluster: real `sigil ca serve` processes authenticating real
//! service-account JWTs against the Kubernetes API test double, over real gRPC+TLS.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use rustls::pki_types::CertificateDer;
use sigil_identity::profile;
use sigil_identity::tls::{self, ClientAuth, ExpectedServer};
use sigil_proto::istio::v1::auth::IstioCertificateRequest;
use sigil_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use sigil_test_apiserver::{PodSpec, TestApiServer, TokenSigning, TokenSpec};
use sigil_test_harness::*;
use tonic::Code;

const AUDIENCE: &str = "sigil-ca";

struct Cluster {
    server: TestApiServer,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    web: Pod,
    agent_a: Pod,
}

/// A test API server with a web pod and a node agent on node-a, and a db pod on node-b.
async fn cluster() -> Cluster {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let web = server.add_pod(&PodSpec::new("demo", "web-1", "web", "node-a"));
    server.add_pod(&PodSpec::new("demo", "db-1", "db", "node-b"));
    let agent_a = server.add_pod(&PodSpec::new(
        "sigil-system",
        "sigil-agent-a",
        "sigil-agent",
        "node-a",
    ));
    Cluster {
        server,
        dir,
        kubeconfig,
        web,
        agent_a,
    }
}

impl Cluster {
    fn start_ca(&self, args: &[&str]) -> CaProcess {
        CaProcess::start(self.dir.path(), Some(&self.kubeconfig), args)
    }

    fn token(&self, pod: &Pod) -> String {
        self.server.issue_token(&TokenSpec::for_pod(pod, AUDIENCE))
    }

    /// The bundle the CA published in its Secret (what an operator or agent bootstraps from).
    async fn secret_bundle(&self) -> sigil_identity::TrustBundle {
        let secrets: Api<Secret> = Api::namespaced(self.server.client(), "sigil-system");
        let secret = secrets.get("sigil-ca").await.unwrap();
        let pem = &secret.data.unwrap()["root-cert.pem"];
        sigil_identity::TrustBundle::from_pem(td(), std::str::from_utf8(&pem.0).unwrap()).unwrap()
    }
}

#[tokio::test]
async fn issues_a_profile_compliant_cert_that_openssl_and_rustls_accept() {
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;

    // The CSR asks for other names; they must be ignored.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let response = client
        .sign(sign_request(csr, 3600, "", Some(&c.token(&c.web))))
        .await
        .unwrap()
        .into_inner();

    let report = profile::inspect_cert(&response.leaf).unwrap();
    assert_eq!(
        report.spiffe_id.unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(
        (report.not_after - report.not_before).whole_seconds(),
        3600 + 60,
        "NotBefore is backdated one minute, NotAfter is now + TTL"
    );
    // 16 random bytes; DER drops a leading zero byte (1 in 256), so allow 15.
    assert!(
        report.serial_hex.trim_start_matches('0').len() >= 29,
        "128 random bits: {}",
        report.serial_hex
    );
    assert!(
        response.intermediates.is_empty(),
        "self-signed mode: the root signs"
    );
    assert_eq!(
        response.trust_bundle,
        bundle.roots.iter().map(|r| r.to_vec()).collect::<Vec<_>>()
    );

    // OpenSSL, independently of our code.
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl_verify(
            c.dir.path(),
            &response.leaf,
            &[],
            &response.trust_bundle,
            purpose,
        );
        assert!(ok, "openssl verify -purpose {purpose}: {out}");
    }
    let text = openssl_text(c.dir.path(), &response.leaf);
    for expected in [
        "X509v3 Subject Alternative Name: critical",
        "URI:spiffe://cluster.local/ns/demo/sa/web",
        "X509v3 Basic Constraints: critical",
        "CA:FALSE",
        "X509v3 Key Usage: critical",
        "Digital Signature",
        "TLS Web Server Authentication, TLS Web Client Authentication",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    for forbidden in [
        "evil.example",
        "kube-system",
        "Certificate Sign",
        "CRL Sign",
        "Key Encipherment",
    ] {
        assert!(
            !text.contains(forbidden),
            "unexpected {forbidden:?} in:\n{text}"
        );
    }
    assert!(
        text.contains("Subject: \n")
            || !text.contains("Subject: C")
                && !text.contains("Subject: O")
                && !text.contains("Subject: CN"),
        "{text}"
    );

    // A real rustls/webpki mTLS handshake with the issued cert as the client certificate.
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_response = client
        .sign(sign_request(
            sigil_identity::csr::build_csr(&server_key).unwrap(),
            3600,
            "",
            Some(&c.token(&c.web)),
        ))
        .await
        .unwrap()
        .into_inner();
    let server_config = tls::server_config(
        &certified(&server_key, &server_response),
        &bundle,
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    let client_config = tls::client_config(
        Some(&certified(&key, &response)),
        &bundle,
        ExpectedServer::Spiffe("spiffe://cluster.local/ns/demo/sa/web".parse().unwrap()),
        &[],
    )
    .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let (server_side, client_side) = tokio::join!(
        acceptor.accept(a),
        connector.connect("web.demo".try_into().unwrap(), b)
    );
    client_side.expect("client handshake");
    let server_side = server_side.expect("server accepted the client certificate");
    let peer =
        tls::peer_spiffe_id(server_side.get_ref().1.peer_certificates().unwrap(), &td()).unwrap();
    assert_eq!(peer.to_string(), "spiffe://cluster.local/ns/demo/sa/web");

    let metrics = ca.metrics().await;
    assert_eq!(
        metric(&metrics, "sigil_ca_certs_issued_total{api=\"sigil\"}"),
        2.0,
        "{metrics}"
    );
    let audit = ca.audit();
    assert!(
        audit.iter().any(|r| r["granted"] == true
            && r["caller"] == "spiffe://cluster.local/ns/demo/sa/web"
            && r["serial"].is_string()),
        "{audit:?}"
    );
}

/// Asserts a refused Sign: the caller sees only `code` and `message`, the audit log the reason.
async fn assert_refused(
    result: Result<tonic::Response<sigil_proto::sigil::ca::v1::SignResponse>, tonic::Status>,
    code: Code,
    message_contains: &str,
) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(message_contains), "{status:?}");
}

#[tokio::test]
async fn every_rejection_path_gets_its_own_error_and_audit_reason() {
    let c = cluster().await;
    let mut ca = c.start_ca(&["--max-ttl", "7d"]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;
    let token = c.token(&c.web);
    let (_, good_csr) = key_and_csr();

    // CSR problems.
    let mut tampered = good_csr.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    assert_refused(
        client
            .sign(sign_request(tampered, 0, "", Some(&token)))
            .await,
        Code::InvalidArgument,
        "csr",
    )
    .await;
    assert_refused(
        client
            .sign(sign_request(
                openssl_csr(c.dir.path(), &["-newkey", "rsa:1024"]),
                0,
                "",
                Some(&token),
            ))
            .await,
        Code::InvalidArgument,
        "csr",
    )
    .await;
    assert_refused(
        client
            .sign(sign_request(
                openssl_csr(c.dir.path(), &["-newkey", "ed448"]),
                0,
                "",
                Some(&token),
            ))
            .await,
        Code::InvalidArgument,
        "csr",
    )
    .await;
    assert_refused(
        client
            .sign(sign_request(b"garbage".to_vec(), 0, "", Some(&token)))
            .await,
        Code::InvalidArgument,
        "csr",
    )
    .await;
    assert_refused(
        client
            .sign(sign_request(vec![0x30; 20 * 1024], 0, "", Some(&token)))
            .await,
        Code::InvalidArgument,
        "csr",
    )
    .await;
    let oversized = client
        .sign(sign_request(vec![0x30; 200 * 1024], 0, "", Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(
        oversized.code(),
        Code::OutOfRange,
        "oversized messages are refused by the transport: {oversized:?}"
    );

    // TTL over the maximum is rejected, not clamped.
    assert_refused(
        client
            .sign(sign_request(good_csr.clone(), 8 * 86_400, "", Some(&token)))
            .await,
        Code::InvalidArgument,
        "ttl_seconds",
    )
    .await;

    // Token problems: one opaque answer, distinct audit reasons.
    let mut expired = TokenSpec::for_pod(&c.web, AUDIENCE);
    expired.expires_in = -600;
    let mut wrong_audience = TokenSpec::for_pod(&c.web, AUDIENCE);
    wrong_audience.audiences = vec!["istio-ca".into()];
    let mut unknown_key = TokenSpec::for_pod(&c.web, AUDIENCE);
    unknown_key.signing = TokenSigning::UnknownKey;
    for spec in [expired, wrong_audience, unknown_key] {
        let t = c.server.issue_token(&spec);
        assert_refused(
            client
                .sign(sign_request(good_csr.clone(), 0, "", Some(&t)))
                .await,
            Code::Unauthenticated,
            "authentication failed",
        )
        .await;
    }
    assert_refused(
        client
            .sign(sign_request(good_csr.clone(), 0, "", None))
            .await,
        Code::Unauthenticated,
        "authentication failed",
    )
    .await;

    // A token bound to a pod that was deleted.
    let gone = c
        .server
        .add_pod(&PodSpec::new("demo", "gone-1", "web", "node-a"));
    let gone_token = c.token(&gone);
    c.server.delete_pod("demo", "gone-1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_refused(
        client
            .sign(sign_request(good_csr.clone(), 0, "", Some(&gone_token)))
            .await,
        Code::Unauthenticated,
        "authentication failed",
    )
    .await;

    // Impersonation: a non-agent may not; the agent may only for pods on its node.
    assert_refused(
        client
            .sign(sign_request(
                good_csr.clone(),
                0,
                "spiffe://cluster.local/ns/demo/sa/db",
                Some(&token),
            ))
            .await,
        Code::PermissionDenied,
        "permission denied",
    )
    .await;
    let agent_token = c.token(&c.agent_a);
    assert_refused(
        client
            .sign(sign_request(
                good_csr.clone(),
                0,
                "spiffe://cluster.local/ns/demo/sa/db",
                Some(&agent_token),
            ))
            .await,
        Code::PermissionDenied,
        "permission denied",
    )
    .await;
    let granted = client
        .sign(sign_request(
            good_csr.clone(),
            0,
            "spiffe://cluster.local/ns/demo/sa/web",
            Some(&agent_token),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        profile::leaf_spiffe_id(&granted.leaf).unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );

    // The audit trail names each real reason; the metrics count them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let details: Vec<String> = ca
        .audit()
        .iter()
        .filter_map(|r| r["detail"].as_str().map(str::to_string))
        .collect();
    for reason in [
        "signature",
        "RSA",
        "ttl_seconds",
        "no bearer token and no client certificate",
        "service account token has been invalidated",
        "may not impersonate: not a trusted node agent",
        "no live pod with service account demo/db on node node-a",
    ] {
        assert!(
            details.iter().any(|d| d.contains(reason)),
            "no audit detail mentions {reason:?}: {details:#?}"
        );
    }
    assert!(
        details.iter().filter(|d| d.contains("TokenReview")).count() >= 2,
        "{details:#?}"
    );
    assert!(
        details.iter().any(|d| d.contains("token has expired")),
        "{details:#?}"
    );
    let logs = ca.logs();
    assert!(
        !logs.contains(&token) && !logs.contains(&agent_token),
        "tokens must never be logged"
    );
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_sign_denied_total{api=\"sigil\",reason=\"invalid_csr\"}"
        ),
        5.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_sign_denied_total{api=\"sigil\",reason=\"invalid_ttl\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_sign_denied_total{api=\"sigil\",reason=\"unauthenticated\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_sign_denied_total{api=\"sigil\",reason=\"permission_denied\"}"
        ),
        2.0
    );
}

/// A DER CSR made by the openssl CLI with a new key of the given kind.
fn openssl_csr(dir: &Path, newkey: &[&str]) -> Vec<u8> {
    let out = dir.join("openssl.csr");
    let status = Command::new("openssl")
        .args([
            "req", "-new", "-nodes", "-subj", "/CN=x", "-outform", "DER", "-keyout",
        ])
        .arg(dir.join("openssl.key"))
        .args(newkey)
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    std::fs::read(out).unwrap()
}

#[tokio::test]
async fn token_reviews_are_cached_and_jwks_mode_needs_no_api_call() {
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;
    let token = c.token(&c.web);
    let before = c.server.token_reviews_served();
    for _ in 0..5 {
        let (_, csr) = key_and_csr();
        client
            .sign(sign_request(csr, 0, "", Some(&token)))
            .await
            .unwrap();
    }
    assert_eq!(
        c.server.token_reviews_served() - before,
        1,
        "one TokenReview for five calls with one token"
    );
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_token_review_cache_total{result=\"hit\"}"
        ),
        4.0,
        "{metrics}"
    );
    drop(ca);

    // JWKS by OIDC discovery through the API server.
    let mut jwks_ca = c.start_ca(&["--auth", "jwks"]);
    jwks_ca.wait_ready().await;
    let mut client = jwks_ca.client(&bundle, None).await;
    let before = c.server.token_reviews_served();
    let (_, csr) = key_and_csr();
    let leaf = client
        .sign(sign_request(csr, 0, "", Some(&token)))
        .await
        .unwrap()
        .into_inner()
        .leaf;
    assert_eq!(
        profile::leaf_spiffe_id(&leaf).unwrap().to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert_eq!(c.server.token_reviews_served(), before);
    let mut expired = TokenSpec::for_pod(&c.web, AUDIENCE);
    expired.expires_in = -600;
    let (_, csr) = key_and_csr();
    let status = client
        .sign(sign_request(
            csr,
            0,
            "",
            Some(&c.server.issue_token(&expired)),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        jwks_ca
            .audit()
            .iter()
            .any(|r| r["detail"].as_str().is_some_and(|d| d.contains("expired")))
    );
}

#[tokio::test]
async fn istio_create_certificate_is_wire_compatible() {
    let c = cluster().await;
    // --audience adds istio-ca to sigil-ca, as deploy/overlays/istio-ambient runs it.
    let mut ca = c.start_ca(&["--audience", "istio-ca"]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut sigil_client = ca.client(&bundle, None).await;
    let (_, csr) = key_and_csr();
    sigil_client
        .sign(sign_request(csr, 0, "", Some(&c.token(&c.web))))
        .await
        .expect("sigil's own audience stays accepted");
    let channel =
        sigil_agent::ca_channel::connect(&ca.grpc.to_string(), "localhost", &bundle, None)
            .await
            .unwrap();
    let mut istio = IstioCertificateServiceClient::new(channel);
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/demo/sa/web".into(),
            )),
        },
    );
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: 3600,
        metadata: Some(metadata),
    });
    // Istio's agents present a token with audience istio-ca.
    let mut spec = TokenSpec::for_pod(&c.agent_a, "istio-ca");
    spec.audiences = vec!["istio-ca".into()];
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", c.server.issue_token(&spec))
            .parse()
            .unwrap(),
    );
    let chain = istio
        .create_certificate(request)
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2, "leaf, then the root(s) last");
    let leaf = pem::parse(&chain[0]).unwrap();
    assert_eq!(
        profile::leaf_spiffe_id(leaf.contents())
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    let roots: Vec<Vec<u8>> = pem::parse_many(&chain[1])
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert_eq!(
        roots,
        bundle.roots.iter().map(|r| r.to_vec()).collect::<Vec<_>>()
    );
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(&metrics, "sigil_ca_certs_issued_total{api=\"istio\"}"),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn two_replicas_started_together_share_one_root_and_publish_configmaps() {
    let c = cluster().await;
    let namespaces: Api<Namespace> = Api::all(c.server.client());
    for ns in ["demo", "sigil-system"] {
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let mut a = c.start_ca(&[]);
    let mut b = c.start_ca(&[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let bundle = c.secret_bundle().await;
    assert_eq!(bundle.roots.len(), 1);
    let created = [&a, &b]
        .iter()
        .filter(|ca| ca.logs().contains("created a new self-signed root"))
        .count();
    assert_eq!(created, 1, "exactly one replica created the root");
    let token = c.token(&c.web);
    for ca in [&a, &b] {
        let mut client = ca.client(&bundle, None).await;
        let (_, csr) = key_and_csr();
        let r = client
            .sign(sign_request(csr, 0, "", Some(&token)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.trust_bundle, vec![bundle.roots[0].to_vec()]);
        let (ok, out) = openssl_verify(c.dir.path(), &r.leaf, &[], &r.trust_bundle, "sslclient");
        assert!(ok, "{out}");
    }

    // The trust bundle ConfigMap appears in every namespace, including one created later.
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("late".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let expected = bundle.to_pem();
    for ns in ["demo", "sigil-system", "late"] {
        let cms: Api<ConfigMap> = Api::namespaced(c.server.client(), ns);
        let mut found = None;
        for _ in 0..100 {
            if let Some(cm) = cms.get_opt("sigil-ca-root").await.unwrap() {
                found = cm.data.and_then(|d| d.get("root-cert.pem").cloned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pem = found.unwrap_or_else(|| panic!("no sigil-ca-root ConfigMap in {ns}"));
        let published = sigil_identity::TrustBundle::from_pem(td(), &pem).unwrap();
        assert_eq!(published.roots, bundle.roots, "{ns}: {pem} vs {expected}");
    }
}

#[tokio::test]
async fn watch_trust_bundle_sends_the_current_bundle_at_once() {
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;
    let mut request = tonic::Request::new(sigil_proto::sigil::ca::v1::WatchTrustBundleRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", c.token(&c.agent_a)).parse().unwrap(),
    );
    let mut stream = client
        .watch_trust_bundle(request)
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(first.roots, vec![bundle.roots[0].to_vec()]);
    let roots: Vec<CertificateDer<'static>> =
        first.roots.into_iter().map(CertificateDer::from).collect();
    assert_eq!(roots, bundle.roots);

    // Without credentials the stream is refused.
    let status = client
        .watch_trust_bundle(sigil_proto::sigil::ca::v1::WatchTrustBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// Where tokens are accepted, a certificate does not renew itself: a stolen SVID and key would
/// otherwise renew forever, wherever a pod of that service account runs. The caller presents its
/// token, which names its pod and node.
#[tokio::test]
async fn renewal_by_certificate_is_refused_where_tokens_are_accepted() {
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;
    let (key, csr) = key_and_csr();
    let issued = client
        .sign(sign_request(csr, 3600, "", Some(&c.token(&c.web))))
        .await
        .unwrap()
        .into_inner();
    // The web pod is alive, on its node: only the certificate is presented.
    let mut by_cert = ca.client(&bundle, Some(&certified(&key, &issued))).await;
    let (_, csr) = key_and_csr();
    assert_refused(
        by_cert.sign(sign_request(csr, 600, "", None)).await,
        Code::PermissionDenied,
        "permission denied",
    )
    .await;
    let (_, csr) = key_and_csr();
    assert_refused(
        by_cert
            .sign(sign_request(
                csr,
                600,
                "spiffe://cluster.local/ns/demo/sa/web",
                None,
            ))
            .await,
        Code::PermissionDenied,
        "permission denied",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ca.audit().iter().any(|r| r["credential"] == "client-cert"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("by certificate refused"))),
        "{:#?}",
        ca.audit()
    );
}

/// A service account deleted (and re-created under the same name) ends its tokens here when it
/// ends them at the API server (which caches its own answers for 10 s), not when the token
/// expires: a successful TokenReview is trusted for 10 s at most.
#[tokio::test]
async fn a_deleted_service_accounts_token_stops_working_as_soon_as_the_api_server_says_so() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;
    let token = c.token(&c.web);
    let (_, csr) = key_and_csr();
    client
        .sign(sign_request(csr, 0, "", Some(&token)))
        .await
        .unwrap();

    let accounts: Api<ServiceAccount> = Api::namespaced(c.server.client(), "demo");
    accounts
        .delete("web", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let recreated = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("web".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create(&PostParams::default(), &recreated)
        .await
        .unwrap();
    let deleted = std::time::Instant::now();
    loop {
        let (_, csr) = key_and_csr();
        match client.sign(sign_request(csr, 0, "", Some(&token))).await {
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                break;
            }
            Ok(_) => assert!(
                deleted.elapsed() < Duration::from_secs(13),
                "the old service account's token still works {:?} after its deletion",
                deleted.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ca.audit().iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("TokenReview"))),
        "{:#?}",
        ca.audit()
    );
}

/// A JWT-shaped token nobody signed, expiring `exp_in` seconds from now: it passes the CA's
/// local checks, so only a TokenReview could judge it.
fn made_up_token(exp_in: u64) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + exp_in;
    format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "RS256", "kid": "made-up"})),
        b64(serde_json::json!({"exp": exp, "sub": "system:serviceaccount:demo:web"}))
    )
}

/// Made-up tokens cost the API server a TokenReview each: one source gets a bounded number of
/// them (the rest are refused as "retry later"), and a rejected token repeated costs nothing.
#[tokio::test]
async fn token_reviews_are_bounded_per_source_and_rejections_are_remembered() {
    let c = cluster().await;
    let mut ca = c.start_ca(&[]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;

    let before = c.server.token_reviews_served();
    let bad = made_up_token(3600);
    for _ in 0..5 {
        let (_, csr) = key_and_csr();
        assert_refused(
            client.sign(sign_request(csr, 0, "", Some(&bad))).await,
            Code::Unauthenticated,
            "authentication failed",
        )
        .await;
    }
    assert_eq!(
        c.server.token_reviews_served() - before,
        1,
        "a repeated rejected token is judged once"
    );

    let before = c.server.token_reviews_served();
    let started = std::time::Instant::now();
    let mut retry_later = 0;
    for i in 0..60 {
        let (_, csr) = key_and_csr();
        let status = client
            .sign(sign_request(csr, 0, "", Some(&made_up_token(4000 + i))))
            .await
            .unwrap_err();
        match status.code() {
            Code::Unavailable => retry_later += 1,
            code => assert_eq!(code, Code::Unauthenticated, "{status:?}"),
        }
    }
    let reviews = c.server.token_reviews_served() - before;
    // The per-source budget: 20 at once, 5 more per second (the first loop spent one).
    let budget = 20 + (5.0 * started.elapsed().as_secs_f64()).ceil() as u64;
    assert!(
        reviews <= budget,
        "60 made-up tokens cost {reviews} TokenReviews (budget {budget})"
    );
    assert!(retry_later >= 60 - budget, "{retry_later}");

    // A real caller from the same address is served again once the budget refills.
    let (_, csr) = key_and_csr();
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .sign(sign_request(csr, 0, "", Some(&c.token(&c.web))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ca.audit().iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("too many TokenReviews from 127.0.0.1"))),
        "{:#?}",
        ca.audit()
    );
}

/// One caller flooding the CA with signing requests (a compromised node agent, say) gets its
/// budget and "retry later" beyond it; other callers, among them another pod of the same
/// service account, are still served, and the audit log names the caller.
#[tokio::test]
async fn signing_is_bounded_per_caller_and_other_callers_are_still_served() {
    let c = cluster().await;
    let web_2 = c
        .server
        .add_pod(&PodSpec::new("demo", "web-2", "web", "node-a"));
    let mut ca = c.start_ca(&["--max-signs-per-caller", "5"]);
    ca.wait_ready().await;
    let bundle = c.secret_bundle().await;
    let mut client = ca.client(&bundle, None).await;

    let flooding = c.token(&c.web);
    let started = std::time::Instant::now();
    let (mut signed, mut retry_later) = (0, 0);
    for _ in 0..40 {
        let (_, csr) = key_and_csr();
        match client.sign(sign_request(csr, 0, "", Some(&flooding))).await {
            Ok(_) => signed += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(status.message(), "too many requests, retry later");
                retry_later += 1;
            }
        }
    }
    // 5 at once, 5 more per second.
    let budget = 5 + (5.0 * started.elapsed().as_secs_f64()).ceil() as u64;
    assert!(
        signed <= budget && retry_later >= 40 - budget,
        "{signed} signed, {retry_later} refused (budget {budget})"
    );

    // Another pod of the same service account, and an agent signing for the flooding pod's
    // identity, are callers of their own.
    let (_, csr) = key_and_csr();
    client
        .sign(sign_request(csr, 0, "", Some(&c.token(&web_2))))
        .await
        .unwrap();
    let (_, csr) = key_and_csr();
    client
        .sign(sign_request(
            csr,
            0,
            "spiffe://cluster.local/ns/demo/sa/web",
            Some(&c.token(&c.agent_a)),
        ))
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(200)).await;
    let limited: Vec<_> = ca
        .audit()
        .into_iter()
        .filter(|r| r["reason"] == "rate_limited")
        .collect();
    assert_eq!(limited.len() as u64, retry_later, "{limited:#?}");
    let detail = limited[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("more than 5 signing requests per second from pod demo/web-1 (uid "),
        "{detail}"
    );
    assert!(
        ca.metrics().await.contains(&format!(
            "sigil_ca_sign_denied_total{{api=\"sigil\",reason=\"rate_limited\"}} {retry_later}"
        )),
        "the refusals are counted"
    );
}
