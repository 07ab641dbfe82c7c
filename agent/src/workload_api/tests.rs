//! Everything over a real Unix socket served by tonic, with the real Unix attestor reading
//! this test process's peer credentials, a real certificate manager and a real sigil CA
//! running in-process; the happy paths through the real `spiffe` client library.

use std::time::Duration;

use futures::StreamExt;
use sigil_ca::cli::{CaCommand, RotateArgs};
use sigil_identity::SpiffeId;
use sigil_identity::tls::{self, CertifiedKey, ClientAuth};
use sigil_proto::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;

use super::*;
use crate::test_support::{
    BundleSource, TestAgent, TestCa, WEB_ID, ca_command, this_uid, uid_is_web,
};

const WAIT: Duration = Duration::from_secs(15);

/// Who the Unix attestor maps this test process to.
enum Caller {
    /// Its uid → `WEB_ID`.
    Known,
    /// Its uid only when running a binary it is not: attestation fails.
    Unknown,
}

/// A CA, then an agent serving the Workload API on a Unix socket and following the CA's
/// trust bundle.
async fn start(caller: Caller, ttl: Duration) -> TestAgent {
    let uid = this_uid();
    let unix_map = match caller {
        Caller::Known => uid_is_web(uid),
        Caller::Unknown => {
            format!("workloads:\n- {{uid: {uid}, path: /usr/bin/not-this-test, id: {WEB_ID}}}\n")
        }
    };
    let ca = TestCa::started().await;
    TestAgent::serve(SocketApi::WorkloadApi, ca, ttl, &unix_map, BundleSource::Ca).await
}

impl TestAgent {
    /// Our own generated client, which sends exactly what a test asks for.
    async fn raw_client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(self.channel().await)
    }

    /// The `spiffe` crate's client, found as `SPIFFE_ENDPOINT_SOCKET` would name it.
    async fn spiffe_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(format!("unix://{}", self.socket.display()))
            .await
            .unwrap()
    }

    /// Starts a root rotation, which the CA's WatchTrustBundle streams to the agent.
    async fn rotate_root(&self) {
        ca_command(CaCommand::RotateRoot(RotateArgs {
            state_dir: Some(self.ca.state_dir()),
            namespace: "sigil-system".into(),
            secret_name: "unused-with-a-state-dir".into(),
            trust_domain: "cluster.local".into(),
            propagation: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            retire_margin: Duration::from_secs(60),
        }))
        .await;
    }
}

fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    request
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

fn ders(certs: &[spiffe::cert::Certificate]) -> Vec<CertificateDer<'static>> {
    certs
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect()
}

/// Checks an SVID the `spiffe` crate parsed: our identity, a chain that verifies against
/// `bundle`, and a key that parses and belongs to the leaf.
fn check_svid(svid: &spiffe::X509Svid, bundle: &TrustBundle) {
    assert_eq!(svid.spiffe_id().to_string(), WEB_ID);
    let chain = ders(svid.cert_chain());
    let web: SpiffeId = WEB_ID.parse().unwrap();
    assert_eq!(
        sigil_identity::profile::leaf_spiffe_id(&chain[0]).unwrap(),
        web
    );
    bundle
        .verify_chain(&chain, rustls_pki_types::UnixTime::now())
        .expect("the chain verifies against the bundle");
    let key = svid.private_key().as_bytes();
    ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key,
        &ring::rand::SystemRandom::new(),
    )
    .expect("the key is PKCS#8 P-256");
    // rustls refuses a key that does not match the leaf's public key.
    let certified = CertifiedKey {
        chain,
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into()),
    };
    tls::server_config(&certified, bundle, ClientAuth::Off, &[])
        .expect("the key belongs to the leaf");
}

#[tokio::test]
async fn a_request_without_the_security_header_is_invalid_argument_before_attestation() {
    // The attestor does not know this process: the header is checked first.
    let agent = start(Caller::Unknown, Duration::from_secs(3600)).await;
    let mut client = agent.raw_client().await;
    let mut wrong_value = Request::new(X509svidRequest {});
    wrong_value
        .metadata_mut()
        .insert(SECURITY_HEADER, "false".parse().unwrap());
    let mut twice = with_header(X509svidRequest {});
    twice
        .metadata_mut()
        .append(SECURITY_HEADER, "true".parse().unwrap());
    let refusals = [
        client
            .fetch_x509svid(Request::new(X509svidRequest {}))
            .await
            .err(),
        client.fetch_x509svid(wrong_value).await.err(),
        client.fetch_x509svid(twice).await.err(),
        client
            .fetch_x509_bundles(Request::new(X509BundlesRequest {}))
            .await
            .err(),
        client
            .fetch_jwtsvid(Request::new(JwtsvidRequest::default()))
            .await
            .err(),
    ];
    for (i, refusal) in refusals.into_iter().enumerate() {
        let status = refusal.unwrap_or_else(|| panic!("request {i} was accepted"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "request {i}");
        assert_eq!(
            status.message(),
            "the security header `workload.spiffe.io: true` is missing"
        );
    }
    assert_eq!(agent.metrics.attestation_failures.get(), 0);
    assert_eq!(agent.streams_open(), 0);
}

#[tokio::test]
async fn fetch_x509_svid_sends_the_callers_svid_at_once_and_again_on_every_rotation() {
    let agent = start(Caller::Known, Duration::from_secs(4)).await;
    let client = agent.spiffe_client().await;
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = within("first X.509 context", contexts.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.svids().len(), 1, "one identity per caller");
    let svid = first.default_svid().unwrap().clone();
    check_svid(&svid, &agent.ca.bundle);
    let bundle = first
        .bundle_set()
        .get(&spiffe::TrustDomain::new("cluster.local").unwrap());
    assert_eq!(
        ders(bundle.expect("our trust domain's bundle").authorities()),
        agent.ca.bundle.roots
    );
    assert_eq!(agent.streams_open(), 1);
    assert_eq!(agent.pushes(), 1);

    // TTL 4 s: renewed at about 2 s, and pushed.
    let second = within("the rotated SVID", contexts.next())
        .await
        .unwrap()
        .unwrap();
    let rotated = second.default_svid().unwrap();
    check_svid(rotated, &agent.ca.bundle);
    assert_ne!(
        rotated.leaf().as_bytes(),
        svid.leaf().as_bytes(),
        "a new certificate"
    );
    assert_ne!(
        rotated.private_key().as_bytes(),
        svid.private_key().as_bytes(),
        "with a new key"
    );
    assert_eq!(agent.pushes(), 2);

    drop(contexts);
    within("the stream gauge to drop", async {
        while agent.streams_open() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_bundle_streams_push_the_bundle_at_once_and_again_on_every_change() {
    let agent = start(Caller::Known, Duration::from_secs(3600)).await;
    let ours = spiffe::TrustDomain::new("cluster.local").unwrap();
    let mut bundles = agent
        .spiffe_client()
        .await
        .stream_x509_bundles()
        .await
        .unwrap();
    let first = within("first bundle set", bundles.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        ders(first.get(&ours).unwrap().authorities()),
        agent.ca.bundle.roots
    );
    // Keyed by the trust domain's SPIFFE ID, as the standard says.
    let mut raw = agent.raw_client().await;
    let mut raw_bundles = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let message = within("raw bundles", raw_bundles.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        message.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://cluster.local"]
    );
    // An SVID stream, open before the change, gets it too.
    let mut svids = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let svid = within("first SVID", svids.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(svid.svids[0].bundle, concat_der(&agent.ca.bundle.roots));
    assert_eq!(agent.streams_open(), 3);

    agent.rotate_root().await;
    let grown = within("the rotated bundle set", bundles.next())
        .await
        .unwrap()
        .unwrap();
    let roots = ders(grown.get(&ours).unwrap().authorities());
    assert_eq!(roots.len(), 2, "old and new root during the overlap");
    assert_eq!(roots[0], agent.ca.bundle.roots[0]);
    let after = within("the SVID with the new bundle", svids.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.svids[0].bundle, concat_der(&roots));
    assert_eq!(
        after.svids[0].x509_svid, svid.svids[0].x509_svid,
        "the same certificate, with the new bundle"
    );
}

#[tokio::test]
async fn a_caller_the_attestor_does_not_know_is_permission_denied() {
    let agent = start(Caller::Unknown, Duration::from_secs(3600)).await;
    let mut raw = agent.raw_client().await;
    let svid = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(svid.code(), tonic::Code::PermissionDenied);
    assert_eq!(svid.message(), "caller could not be attested");
    let bundles = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(bundles.code(), tonic::Code::PermissionDenied);
    // What SPIFFE libraries make of it: denied, so retry later.
    let error = agent
        .spiffe_client()
        .await
        .fetch_x509_svid()
        .await
        .unwrap_err();
    assert!(
        matches!(error, spiffe::WorkloadApiError::PermissionDenied(_)),
        "{error:?}"
    );
    assert_eq!(agent.metrics.attestation_failures.get(), 3);
    assert_eq!(agent.streams_open(), 0);
    assert_eq!(agent.pushes(), 0);
}

#[tokio::test]
async fn jwt_svids_are_unimplemented() {
    let agent = start(Caller::Known, Duration::from_secs(3600)).await;
    let mut raw = agent.raw_client().await;
    let refusals = [
        raw.fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err(),
        raw.fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap_err(),
        raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "a.b.c".into(),
        }))
        .await
        .unwrap_err(),
    ];
    for status in refusals {
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(
            status.message(),
            "JWT-SVIDs are not supported by this agent yet"
        );
    }
}
