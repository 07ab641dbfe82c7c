use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use prost::Message;
use sigil_identity::tls::CertifiedKey;
use tonic::Code;
use tonic::transport::Channel;

use super::*;
use crate::test_support::{
    BundleSource, DB_ID, TestAgent, TestCa, WEB_ID, td, this_uid, uid_is_web,
};

/// Long enough that no rotation happens during a test that checks nothing is sent.
const NO_ROTATION: Duration = Duration::from_secs(3600);
/// Renewed at half life: a new certificate about every 2 s.
const FAST_ROTATION: Duration = Duration::from_secs(4);
const QUIET: Duration = Duration::from_millis(700);

/// SDS in front of a started CA, this test process's uid attested as `web`.
async fn start(ttl: Duration) -> TestAgent {
    with_ca(TestCa::started().await, ttl, this_uid()).await
}

/// SDS in front of `ca` (started or not), `uid` attested as `web`; the trust bundle changes
/// only when a test sends one.
async fn with_ca(ca: TestCa, ttl: Duration, uid: u32) -> TestAgent {
    TestAgent::serve(
        SocketApi::Sds,
        ca,
        ttl,
        &uid_is_web(uid),
        BundleSource::Test,
    )
    .await
}

impl TestAgent {
    async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(self.channel().await)
    }

    async fn sotw(&self) -> Stream<DiscoveryRequest, DiscoveryResponse> {
        let (requests, rx) = mpsc::channel(8);
        let responses = self
            .client()
            .await
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            requests,
            responses,
        }
    }

    async fn delta(&self) -> Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
        let (requests, rx) = mpsc::channel(8);
        let responses = self
            .client()
            .await
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            requests,
            responses,
        }
    }

    /// The certificate the agent holds for `web` (the one SDS must serve).
    async fn web_svid(&self) -> Arc<Svid> {
        let mut watch = self
            .certs
            .subscribe(&WEB_ID.parse().unwrap())
            .await
            .unwrap();
        let held = tokio::time::timeout(Duration::from_secs(10), watch.wait_for(Option::is_some))
            .await
            .expect("web's certificate within 10 s")
            .unwrap()
            .clone();
        held.unwrap()
    }
}

/// One client stream, as Envoy holds it.
struct Stream<Req, Resp> {
    requests: mpsc::Sender<Req>,
    responses: Streaming<Resp>,
}

impl<Req, Resp> Stream<Req, Resp> {
    async fn send(&self, request: Req) {
        self.requests.send(request).await.unwrap();
    }

    /// The next message, or the status that ended the stream.
    async fn next(&mut self) -> Result<Resp, Status> {
        match tokio::time::timeout(Duration::from_secs(15), self.responses.message()).await {
            Err(_) => panic!("nothing received within 15 s"),
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => Err(status),
        }
    }

    async fn assert_quiet(&mut self, what: &str) {
        if let Ok(got) = tokio::time::timeout(QUIET, self.responses.message()).await {
            panic!(
                "{what}: expected nothing, got {}",
                match got {
                    Ok(Some(_)) => "a response".to_string(),
                    Ok(None) => "the end of the stream".to_string(),
                    Err(status) => format!("{status:?}"),
                }
            );
        }
    }
}

fn sotw_request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn ack(response: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    sotw_request(names, &response.version_info, &response.nonce)
}

fn nack(response: &DiscoveryResponse, names: &[&str], previous_version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(rpc::Status {
            code: Code::InvalidArgument as i32,
            message: "Failed to load certificate chain".into(),
            details: Vec::new(),
        }),
        ..sotw_request(names, previous_version, &response.nonce)
    }
}

fn unpack(resource: &Any) -> Secret {
    assert_eq!(resource.type_url, TYPE_URL);
    Secret::decode(resource.value.as_slice()).expect("a Secret")
}

fn secrets(response: &DiscoveryResponse) -> BTreeMap<String, Secret> {
    assert_eq!(response.type_url, TYPE_URL);
    response
        .resources
        .iter()
        .map(unpack)
        .map(|s| (s.name.clone(), s))
        .collect()
}

fn inline_bytes(source: &Option<DataSource>) -> String {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(bytes)) => {
            String::from_utf8(bytes.clone()).unwrap()
        }
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// The chain and key PEM of a `tls_certificate` secret.
fn tls_certificate(secret: &Secret) -> (String, String) {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => (
            inline_bytes(&tls.certificate_chain),
            inline_bytes(&tls.private_key),
        ),
        _ => panic!("{} is not a TLS certificate", secret.name),
    }
}

fn trusted_ca(secret: &Secret) -> String {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(context)) => inline_bytes(&context.trusted_ca),
        _ => panic!("{} is not a validation context", secret.name),
    }
}

/// Checks a certificate secret holds exactly `svid`: its chain and its PKCS#8 key, in PEM,
/// and that the leaf is `web`'s.
fn assert_serves(secret: &Secret, svid: &Svid) {
    let (chain_pem, key_pem) = tls_certificate(secret);
    let parsed = CertifiedKey::from_pem(&chain_pem, &key_pem).expect("PEM Envoy can load");
    assert_eq!(parsed.chain, svid.chain);
    let key = pem::parse(&key_pem).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    assert_eq!(key.contents(), svid.key_pkcs8());
    let leaf_id = sigil_identity::profile::leaf_spiffe_id(&parsed.chain[0]).unwrap();
    assert_eq!(leaf_id.to_string(), WEB_ID);
}

fn assert_bundle(secret: &Secret, bundle: &TrustBundle) {
    let served = TrustBundle::from_pem(td(), &trusted_ca(secret)).unwrap();
    assert_eq!(served.roots, bundle.roots);
}

fn leaf_serial(secret: &Secret) -> Vec<u8> {
    let (chain_pem, key_pem) = tls_certificate(secret);
    CertifiedKey::from_pem(&chain_pem, &key_pem).unwrap().chain[0].to_vec()
}

#[tokio::test]
async fn stream_pushes_default_and_rootca_then_stays_quiet_on_ack() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.sotw().await;
    stream
        .send(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
        .await;
    let first = stream.next().await.unwrap();
    assert!(!first.version_info.is_empty() && !first.nonce.is_empty());
    let secrets = secrets(&first);
    assert_eq!(secrets.len(), 2);
    assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
    assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
    assert_eq!(agent.streams_open(), 1);
    assert_eq!(agent.pushes(), 1);

    stream
        .send(ack(&first, &[DEFAULT_CERTIFICATE, ROOT_CA]))
        .await;
    stream.assert_quiet("after an ACK").await;
    assert_eq!(agent.pushes(), 1);

    // The client goes away: the stream task ends and the gauge follows.
    drop(stream);
    for _ in 0..100 {
        if agent.streams_open() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the streams gauge stayed at {}", agent.streams_open());
}

#[tokio::test]
async fn stream_serves_the_callers_own_spiffe_id_by_name() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.sotw().await;
    stream.send(sotw_request(&[WEB_ID], "", "")).await;
    let response = stream.next().await.unwrap();
    let secrets = secrets(&response);
    assert_eq!(secrets.keys().collect::<Vec<_>>(), [WEB_ID]);
    assert_serves(&secrets[WEB_ID], &*agent.web_svid().await);
}

#[tokio::test]
async fn stream_pushes_every_rotation_with_a_new_version_and_nonce() {
    let agent = start(FAST_ROTATION).await;
    let mut stream = agent.sotw().await;
    let names = [DEFAULT_CERTIFICATE, ROOT_CA];
    stream.send(sotw_request(&names, "", "")).await;
    let first = stream.next().await.unwrap();
    stream.send(ack(&first, &names)).await;
    let second = stream
        .next()
        .await
        .expect("the renewed certificate is pushed");
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    let (before, after) = (secrets(&first), secrets(&second));
    assert_eq!(
        after.len(),
        2,
        "state of the world: every name, changed or not"
    );
    assert_ne!(
        leaf_serial(&after[DEFAULT_CERTIFICATE]),
        leaf_serial(&before[DEFAULT_CERTIFICATE])
    );
    assert_eq!(after[ROOT_CA], before[ROOT_CA]);
    assert_serves(&after[DEFAULT_CERTIFICATE], &*agent.web_svid().await);

    // A bundle change (a root rotation reaching the agent) is pushed too.
    stream.send(ack(&second, &names)).await;
    let mut next_root = rcgen::CertificateParams::default();
    next_root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let next_root = next_root
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let mut grown = agent.ca.bundle.clone();
    grown.roots.push(next_root.der().clone());
    grown.sequence += 1;
    agent.bundle_tx.send_replace(Arc::new(grown.clone()));
    let third = loop {
        // A certificate rotation may come first.
        let response = stream.next().await.unwrap();
        if secrets(&response)[ROOT_CA] != after[ROOT_CA] {
            break response;
        }
        stream.send(ack(&response, &names)).await;
    };
    assert_bundle(&secrets(&third)[ROOT_CA], &grown);
}

#[tokio::test]
async fn nack_is_counted_not_answered_and_the_stream_stays_up() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.sotw().await;
    stream
        .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
        .await;
    let first = stream.next().await.unwrap();
    stream.send(nack(&first, &[DEFAULT_CERTIFICATE], "")).await;
    stream
        .assert_quiet("after a NACK the same content is not resent")
        .await;
    assert_eq!(agent.metrics.nacks.get(), 1);

    // Still up: a new set of names is answered.
    stream
        .send(sotw_request(
            &[DEFAULT_CERTIFICATE, ROOT_CA],
            "",
            &first.nonce,
        ))
        .await;
    let second = stream.next().await.unwrap();
    assert_eq!(secrets(&second).len(), 2);
    assert_eq!(agent.streams_open(), 1);
}

#[tokio::test]
async fn stale_nonces_are_ignored() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.sotw().await;
    stream
        .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
        .await;
    let first = stream.next().await.unwrap();
    stream
        .send(sotw_request(
            &[DEFAULT_CERTIFICATE, ROOT_CA],
            "",
            &first.nonce,
        ))
        .await;
    let second = stream.next().await.unwrap();

    // Requests answering the superseded response: neither their names nor their NACK count.
    stream
        .send(sotw_request(&[ROOT_CA], "", &first.nonce))
        .await;
    stream.send(nack(&first, &[ROOT_CA], "")).await;
    stream
        .send(sotw_request(&[ROOT_CA], "", "no-such-nonce"))
        .await;
    stream.assert_quiet("stale nonces").await;
    assert_eq!(agent.metrics.nacks.get(), 0);

    // The latest nonce still works.
    stream
        .send(sotw_request(
            &[ROOT_CA],
            &second.version_info,
            &second.nonce,
        ))
        .await;
    let third = stream.next().await.unwrap();
    assert_eq!(secrets(&third).keys().collect::<Vec<_>>(), [ROOT_CA]);
}

#[tokio::test]
async fn a_request_before_the_certificate_exists_is_answered_when_it_does() {
    let mut agent = with_ca(TestCa::prepare().await, NO_ROTATION, this_uid()).await;
    let mut stream = agent.sotw().await;
    stream
        .send(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
        .await;
    stream
        .assert_quiet("the CA is down: no certificate yet")
        .await;
    assert_eq!(agent.pushes(), 0);

    agent.ca.start().await;
    let first = stream
        .next()
        .await
        .expect("pushed once the certificate exists");
    let secrets = secrets(&first);
    assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
    assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
}

#[tokio::test]
async fn empty_names_get_nothing_until_names_come() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.sotw().await;
    stream.send(sotw_request(&[], "", "")).await;
    stream.assert_quiet("no names").await;
    stream.send(sotw_request(&[ROOT_CA], "", "")).await;
    let response = stream.next().await.unwrap();
    assert_bundle(&secrets(&response)[ROOT_CA], &agent.ca.bundle);
}

/// Requests that must end the stream with `code`, and nothing sent before.
async fn assert_refused(agent: &TestAgent, names: &[&str], type_url: &str, code: Code, says: &str) {
    let mut stream = agent.sotw().await;
    stream
        .send(DiscoveryRequest {
            type_url: type_url.into(),
            ..sotw_request(names, "", "")
        })
        .await;
    let status = stream.next().await.expect_err("refused");
    assert_eq!(status.code(), code, "{names:?}: {status:?}");
    assert!(status.message().contains(says), "{names:?}: {status:?}");
}

#[tokio::test]
async fn names_the_caller_may_not_have_are_refused() {
    let agent = start(NO_ROTATION).await;
    assert_refused(
        &agent,
        &[DEFAULT_CERTIFICATE, DB_ID],
        TYPE_URL,
        Code::PermissionDenied,
        "is not this caller's identity",
    )
    .await;
    assert_refused(
        &agent,
        &["spiffe://example.org/ns/demo/sa/web"],
        TYPE_URL,
        Code::PermissionDenied,
        "is not this caller's identity",
    )
    .await;
    assert_refused(
        &agent,
        &["spiffe://cluster.local/ns//sa/web"],
        TYPE_URL,
        Code::InvalidArgument,
        "not a valid SPIFFE ID",
    )
    .await;
    assert_refused(
        &agent,
        &["file-cert"],
        TYPE_URL,
        Code::InvalidArgument,
        "unknown resource name",
    )
    .await;
    assert_refused(
        &agent,
        &["ALL"],
        TYPE_URL,
        Code::InvalidArgument,
        "unknown resource name",
    )
    .await;
    assert_refused(
        &agent,
        &[DEFAULT_CERTIFICATE],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        Code::InvalidArgument,
        "type_url",
    )
    .await;

    // Refused later in a stream too, after a secret was served.
    let mut stream = agent.sotw().await;
    stream
        .send(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
        .await;
    let first = stream.next().await.unwrap();
    stream
        .send(sotw_request(
            &[DEFAULT_CERTIFICATE, DB_ID],
            "",
            &first.nonce,
        ))
        .await;
    assert_eq!(
        stream.next().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(agent.pushes(), 1, "nothing was sent for db");
}

#[tokio::test]
async fn a_caller_that_cannot_be_attested_gets_nothing() {
    // This process's uid has no entry: every API refuses it before reading a request.
    let ca = TestCa::started().await;
    let agent = with_ca(ca, NO_ROTATION, this_uid() + 1).await;
    let mut client = agent.client().await;
    let (_requests, rx) = mpsc::channel(1);
    let status = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (_requests, rx) = mpsc::channel(1);
    let status = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .fetch_secrets(sotw_request(&[ROOT_CA], "", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(agent.metrics.attestation_failures.get(), 3);
    assert_eq!(agent.streams_open(), 0);
}

fn delta_request(subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: TYPE_URL.into(),
        resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn delta_secrets(response: &DeltaDiscoveryResponse) -> BTreeMap<String, (String, Secret)> {
    assert_eq!(response.type_url, TYPE_URL);
    response
        .resources
        .iter()
        .map(|r| {
            let secret = unpack(r.resource.as_ref().expect("a resource"));
            assert_eq!(secret.name, r.name);
            (r.name.clone(), (r.version.clone(), secret))
        })
        .collect()
}

#[tokio::test]
async fn delta_sends_subscribed_secrets_then_only_what_changed() {
    let agent = start(FAST_ROTATION).await;
    let mut stream = agent.delta().await;
    stream
        .send(delta_request(&[DEFAULT_CERTIFICATE, ROOT_CA], &[], ""))
        .await;
    // Each secret is sent as soon as it exists: the bundle may come before the certificate.
    let mut sent = BTreeMap::new();
    let mut nonces = Vec::new();
    while sent.len() < 2 {
        let response = stream.next().await.unwrap();
        for (name, secret) in delta_secrets(&response) {
            assert!(sent.insert(name, secret).is_none(), "sent twice");
        }
        stream.send(delta_request(&[], &[], &response.nonce)).await;
        nonces.push(response.nonce);
    }
    assert_bundle(&sent[ROOT_CA].1, &agent.ca.bundle);
    let (chain, _) = tls_certificate(&sent[DEFAULT_CERTIFICATE].1);
    assert!(chain.starts_with("-----BEGIN CERTIFICATE-----"));

    // The certificate rotates; the bundle does not: only the certificate is sent.
    let second = stream.next().await.expect("the renewed certificate");
    assert!(!nonces.contains(&second.nonce));
    let changed = delta_secrets(&second);
    assert_eq!(changed.keys().collect::<Vec<_>>(), [DEFAULT_CERTIFICATE]);
    assert_ne!(changed[DEFAULT_CERTIFICATE].0, sent[DEFAULT_CERTIFICATE].0);
    assert_ne!(
        leaf_serial(&changed[DEFAULT_CERTIFICATE].1),
        leaf_serial(&sent[DEFAULT_CERTIFICATE].1)
    );
    assert!(second.removed_resources.is_empty());

    // A later subscription gets just the new name, at once.
    stream
        .send(delta_request(&[WEB_ID], &[], &second.nonce))
        .await;
    let third = stream.next().await.unwrap();
    assert_eq!(delta_secrets(&third).keys().collect::<Vec<_>>(), [WEB_ID]);
}

#[tokio::test]
async fn delta_acks_nacks_unsubscribes_and_refusals() {
    let agent = start(NO_ROTATION).await;
    let mut stream = agent.delta().await;
    stream.send(delta_request(&[ROOT_CA], &[], "")).await;
    let first = stream.next().await.unwrap();
    let version = delta_secrets(&first)[ROOT_CA].0.clone();
    stream.send(delta_request(&[], &[], &first.nonce)).await;
    stream.assert_quiet("after an ACK").await;

    stream
        .send(DeltaDiscoveryRequest {
            error_detail: Some(rpc::Status {
                code: Code::InvalidArgument as i32,
                message: "bad trusted_ca".into(),
                details: Vec::new(),
            }),
            ..delta_request(&[], &[], &first.nonce)
        })
        .await;
    stream.assert_quiet("after a NACK").await;
    assert_eq!(agent.metrics.nacks.get(), 1);

    // Unsubscribed then subscribed again: sent again in full.
    stream
        .send(delta_request(&[], &[ROOT_CA], &first.nonce))
        .await;
    stream.assert_quiet("after unsubscribing").await;
    stream
        .send(delta_request(&[ROOT_CA], &[], &first.nonce))
        .await;
    let again = stream.next().await.unwrap();
    assert_eq!(delta_secrets(&again)[ROOT_CA].0, version);

    stream
        .send(delta_request(&[DB_ID], &[], &again.nonce))
        .await;
    assert_eq!(
        stream.next().await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A reconnecting client that already holds the current version is not sent it again.
    let mut stream = agent.delta().await;
    stream
        .send(DeltaDiscoveryRequest {
            initial_resource_versions: [(ROOT_CA.to_string(), version.clone())].into(),
            ..delta_request(&[ROOT_CA, DEFAULT_CERTIFICATE], &[], "")
        })
        .await;
    let fresh = stream.next().await.unwrap();
    assert_eq!(
        delta_secrets(&fresh).keys().collect::<Vec<_>>(),
        [DEFAULT_CERTIFICATE]
    );
    stream.send(delta_request(&["*"], &[], &fresh.nonce)).await;
    assert_eq!(
        stream.next().await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn fetch_answers_with_the_current_secrets() {
    let agent = start(NO_ROTATION).await;
    let mut client = agent.client().await;
    let response = client
        .fetch_secrets(sotw_request(&[DEFAULT_CERTIFICATE, ROOT_CA], "", ""))
        .await
        .unwrap()
        .into_inner();
    let secrets = secrets(&response);
    assert_eq!(secrets.len(), 2);
    assert_serves(&secrets[DEFAULT_CERTIFICATE], &*agent.web_svid().await);
    assert_bundle(&secrets[ROOT_CA], &agent.ca.bundle);
    assert!(!response.version_info.is_empty());

    let refused = |names: &'static [&'static str]| {
        let mut client = client.clone();
        async move {
            client
                .fetch_secrets(sotw_request(names, "", ""))
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(refused(&[DB_ID]).await, Code::PermissionDenied);
    assert_eq!(refused(&["nope"]).await, Code::InvalidArgument);
    assert_eq!(refused(&[]).await, Code::InvalidArgument);
}

#[tokio::test]
async fn fetch_gives_up_when_no_certificate_comes() {
    tokio::time::pause();
    let agent = with_ca(TestCa::prepare().await, NO_ROTATION, this_uid()).await;
    let mut client = agent.client().await;
    let status = client
        .fetch_secrets(sotw_request(&[DEFAULT_CERTIFICATE], "", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(WEB_ID), "{status:?}");
}
