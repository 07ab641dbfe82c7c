use rcgen::{KeyPair, SanType};
use time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::profile::{KeyKind, LEAF_BACKDATE, leaf_params, serving_params};
use crate::test_support::{TestCa, certified, now, spiffe};

const SERVER: &str = "spiffe://example.org/ns/default/sa/server";
const CLIENT: &str = "spiffe://example.org/ns/default/sa/client";

type PeerChain = Option<Vec<CertificateDer<'static>>>;

struct Outcome {
    server: Result<PeerChain, io::Error>,
    client: Result<PeerChain, io::Error>,
}

/// Runs one handshake over an in-memory pipe, then a byte each way so that a rejection
/// sent after the client's last flight (TLS 1.3 client auth) reaches the client too.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
    server_name: &str,
) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let server = async move {
        let mut tls = acceptor.accept(server_io).await?;
        let peer = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.flush().await?;
        Ok(peer)
    };
    let client = async move {
        let mut tls = connector.connect(name, client_io).await?;
        let peer = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok(peer)
    };
    let (server, client) = tokio::join!(server, client);
    Outcome { server, client }
}

fn reason(result: &Result<PeerChain, io::Error>) -> TlsError {
    let err = result.as_ref().expect_err("handshake should have failed");
    TlsError::from_io_error(err).unwrap_or_else(|| panic!("not a TLS error: {err}"))
}

fn leaf_identity(ca: &TestCa, id: &str) -> CertifiedKey {
    let (der, key) = ca.leaf(id);
    certified(vec![der], &key)
}

fn identity_from(ca: &TestCa, params: &rcgen::CertificateParams) -> CertifiedKey {
    let key = KeyPair::generate().unwrap();
    certified(vec![ca.sign(params, &key)], &key)
}

fn mtls_server(ca: &TestCa, bundle: &TrustBundle) -> rustls::ServerConfig {
    server_config(
        &leaf_identity(ca, SERVER),
        bundle,
        ClientAuth::Required,
        &[b"h2"],
    )
    .unwrap()
}

fn client_with(identity: &CertifiedKey, bundle: &TrustBundle) -> rustls::ClientConfig {
    client_config(
        Some(identity),
        bundle,
        ExpectedServer::Spiffe(spiffe(SERVER)),
        &[b"h2"],
    )
    .unwrap()
}

#[tokio::test]
async fn mutual_tls_extracts_both_identities() {
    let ca = TestCa::root("example.org");
    let bundle = ca.bundle();
    let client = client_with(&leaf_identity(&ca, CLIENT), &bundle);
    let out = handshake(mtls_server(&ca, &bundle), client, "ignored.example").await;

    let client_chain = out.server.unwrap().expect("client certificate");
    assert_eq!(peer_spiffe_id(&client_chain, &ca.td), Ok(spiffe(CLIENT)));
    let server_chain = out.client.unwrap().expect("server certificate");
    assert_eq!(peer_spiffe_id(&server_chain, &ca.td), Ok(spiffe(SERVER)));

    // Any workload of the trust domain is accepted when no identity is pinned.
    let client = client_config(None, &bundle, ExpectedServer::AnyInTrustDomain, &[]).unwrap();
    let server = server_config(
        &leaf_identity(&ca, SERVER),
        &bundle,
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    let out = handshake(server, client, "x").await;
    assert_eq!(out.server.unwrap(), None, "no client certificate was sent");
    assert!(out.client.unwrap().is_some());
}

#[tokio::test]
async fn chains_through_an_intermediate() {
    let root = TestCa::root("example.org");
    let intermediate = root.intermediate(Some(0));
    let bundle = root.bundle();
    let with_chain = |id| {
        let (leaf, key) = intermediate.leaf(id);
        certified(vec![leaf, intermediate.der.clone()], &key)
    };
    let server = server_config(&with_chain(SERVER), &bundle, ClientAuth::Required, &[]).unwrap();
    let client = client_with(&with_chain(CLIENT), &bundle);
    let out = handshake(server, client, "x").await;
    let client_chain = out.server.unwrap().unwrap();
    assert_eq!(client_chain.len(), 2);
    assert_eq!(peer_spiffe_id(&client_chain, &root.td), Ok(spiffe(CLIENT)));
    assert_eq!(
        peer_spiffe_id(&out.client.unwrap().unwrap(), &root.td),
        Ok(spiffe(SERVER))
    );

    // Without the intermediate the leaf does not chain to the bundle.
    let (leaf, key) = intermediate.leaf(CLIENT);
    let client = client_with(&certified(vec![leaf], &key), &bundle);
    let out = handshake(mtls_server(&root, &bundle), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::UnknownIssuer);
}

#[tokio::test]
async fn rejects_a_client_from_another_ca() {
    let ca = TestCa::root("example.org");
    let stranger = TestCa::root("example.org");
    let client = client_with(&leaf_identity(&stranger, CLIENT), &ca.bundle());
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::UnknownIssuer);
    assert_eq!(
        reason(&out.client),
        TlsError::PeerAlert(AlertDescription::UnknownCA)
    );
}

#[tokio::test]
async fn rejects_a_server_from_another_ca() {
    let ca = TestCa::root("example.org");
    let stranger = TestCa::root("example.org");
    let server = mtls_server(&stranger, &ca.bundle());
    let client = client_with(&leaf_identity(&ca, CLIENT), &ca.bundle());
    let out = handshake(server, client, "x").await;
    assert_eq!(reason(&out.client), TlsError::UnknownIssuer);
}

#[tokio::test]
async fn rejects_a_foreign_trust_domain() {
    let ca = TestCa::root("example.org");
    let other = TestCa::root("other.org");
    // Both roots are trusted, but the bundle belongs to example.org.
    let bundle = TrustBundle::new(ca.td.clone(), vec![ca.der.clone(), other.der.clone()], 1);
    let foreign = "spiffe://other.org/ns/default/sa/client";
    let client = client_with(&leaf_identity(&other, foreign), &bundle);
    let out = handshake(mtls_server(&ca, &bundle), client, "x").await;
    assert_eq!(
        reason(&out.server),
        TlsError::ForeignTrustDomain {
            expected: ca.td.clone(),
            got: spiffe(foreign)
        }
    );

    let server = server_config(
        &leaf_identity(&other, "spiffe://other.org/ns/default/sa/server"),
        &bundle,
        ClientAuth::Off,
        &[],
    )
    .unwrap();
    let client = client_config(None, &bundle, ExpectedServer::AnyInTrustDomain, &[]).unwrap();
    let out = handshake(server, client, "x").await;
    assert!(matches!(
        reason(&out.client),
        TlsError::ForeignTrustDomain { .. }
    ));

    // Pinning an identity the bundle's trust domain can never vouch for is a config error.
    assert_eq!(
        client_config(None, &bundle, ExpectedServer::Spiffe(spiffe(foreign)), &[]).err(),
        Some(TlsError::ForeignTrustDomain {
            expected: ca.td.clone(),
            got: spiffe(foreign)
        })
    );
}

#[tokio::test]
async fn rejects_an_expired_leaf() {
    let ca = TestCa::root("example.org");
    let expired = leaf_params(
        &spiffe(CLIENT),
        KeyKind::EcdsaP256,
        now() - Duration::hours(2),
        now() - Duration::hours(1),
    );
    let client = client_with(&identity_from(&ca, &expired), &ca.bundle());
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::Expired);

    let not_yet = leaf_params(
        &spiffe(CLIENT),
        KeyKind::EcdsaP256,
        now() + Duration::hours(1),
        now() + Duration::hours(2),
    );
    let client = client_with(&identity_from(&ca, &not_yet), &ca.bundle());
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::NotYetValid);
}

#[tokio::test]
async fn rejects_two_uri_sans() {
    let ca = TestCa::root("example.org");
    let mut params = leaf_params(
        &spiffe(CLIENT),
        KeyKind::EcdsaP256,
        now() - LEAF_BACKDATE,
        now() + Duration::hours(1),
    );
    params
        .subject_alt_names
        .push(SanType::URI(SERVER.try_into().unwrap()));
    let client = client_with(&identity_from(&ca, &params), &ca.bundle());
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::MultipleUriSans);
}

#[tokio::test]
async fn rejects_a_ca_certificate_as_leaf() {
    let root = TestCa::root("example.org");
    let intermediate = root.intermediate(None);
    let client = client_with(&intermediate.as_identity(), &root.bundle());
    let out = handshake(mtls_server(&root, &root.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::CaAsLeaf);

    let server = server_config(&root.as_identity(), &root.bundle(), ClientAuth::Off, &[]).unwrap();
    let client =
        client_config(None, &root.bundle(), ExpectedServer::AnyInTrustDomain, &[]).unwrap();
    let out = handshake(server, client, "x").await;
    assert_eq!(reason(&out.client), TlsError::CaAsLeaf);
}

#[tokio::test]
async fn requires_a_client_certificate() {
    let ca = TestCa::root("example.org");
    let client = client_config(
        None,
        &ca.bundle(),
        ExpectedServer::Spiffe(spiffe(SERVER)),
        &[],
    )
    .unwrap();
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    assert_eq!(reason(&out.server), TlsError::NoPeerCertificate);
    assert_eq!(
        reason(&out.client),
        TlsError::PeerAlert(AlertDescription::CertificateRequired)
    );
}

#[tokio::test]
async fn rejects_the_wrong_server_identity() {
    let ca = TestCa::root("example.org");
    let expected = spiffe("spiffe://example.org/ns/default/sa/database");
    let client = client_config(
        Some(&leaf_identity(&ca, CLIENT)),
        &ca.bundle(),
        ExpectedServer::Spiffe(expected.clone()),
        &[],
    )
    .unwrap();
    let out = handshake(mtls_server(&ca, &ca.bundle()), client, "x").await;
    let err = reason(&out.client);
    assert_eq!(
        err,
        TlsError::WrongIdentity {
            expected,
            got: spiffe(SERVER)
        }
    );
    // The reason is readable in the rustls error that ends up in logs.
    let logged = out.client.unwrap_err().to_string();
    assert!(
        logged.contains(
            "peer is spiffe://example.org/ns/default/sa/server, \
                 expected spiffe://example.org/ns/default/sa/database"
        ),
        "{logged}"
    );
}

#[tokio::test]
async fn dns_name_verification_for_serving_certificates() {
    let ca = TestCa::root("example.org");
    let key = KeyPair::generate().unwrap();
    let params = serving_params(
        &spiffe("spiffe://example.org/ns/sigil-system/sa/sigil-ca"),
        &[
            "sigil-ca.sigil-system.svc".to_string(),
            "127.0.0.1".to_string(),
        ],
        now() - LEAF_BACKDATE,
        now() + Duration::hours(1),
    )
    .unwrap();
    let identity = certified(vec![ca.sign(&params, &key)], &key);
    for name in ["sigil-ca.sigil-system.svc", "127.0.0.1"] {
        let server = server_config(&identity, &ca.bundle(), ClientAuth::Off, &[]).unwrap();
        let client = client_config(None, &ca.bundle(), ExpectedServer::DnsName, &[]).unwrap();
        let out = handshake(server, client, name).await;
        assert!(out.client.is_ok(), "{name}: {:?}", out.client.err());
    }
    let server = server_config(&identity, &ca.bundle(), ClientAuth::Off, &[]).unwrap();
    let client = client_config(None, &ca.bundle(), ExpectedServer::DnsName, &[]).unwrap();
    let out = handshake(server, client, "evil.example").await;
    assert!(matches!(reason(&out.client), TlsError::BadCertificate(_)));
}

#[tokio::test]
async fn tls12_peers_are_refused() {
    let ca = TestCa::root("example.org");
    let server = mtls_server(&ca, &ca.bundle());
    assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(server.send_tls13_tickets, 0);
    let tls12_client = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            SpiffeServerVerifier::new(&ca.bundle(), None).unwrap(),
        ))
        .with_no_client_auth();
    let out = handshake(server, tls12_client, "x").await;
    assert!(
        matches!(
            reason(&out.server),
            TlsError::Rustls(rustls::Error::PeerIncompatible(_))
        ),
        "{:?}",
        out.server.err()
    );
    assert!(Arc::ptr_eq(
        mtls_server(&ca, &ca.bundle()).crypto_provider(),
        &crypto_provider()
    ));
}

#[test]
fn certified_key_from_pem_and_redacted_debug() {
    let ca = TestCa::root("example.org");
    let (leaf, key) = ca.leaf(CLIENT);
    let chain_pem = format!(
        "{}{}",
        pem::encode(&pem::Pem::new("CERTIFICATE", leaf.as_ref())),
        pem::encode(&pem::Pem::new("CERTIFICATE", ca.der.as_ref()))
    );
    let identity = CertifiedKey::from_pem(&chain_pem, &key.serialize_pem()).unwrap();
    assert_eq!(identity.chain, vec![leaf, ca.der.clone()]);
    assert_eq!(identity.key.secret_der(), key.serialized_der());
    let debug = format!("{:?}", identity.clone());
    assert!(
        debug.contains("<redacted>") && !debug.contains(&format!("{:?}", key.serialized_der()))
    );

    assert!(matches!(
        CertifiedKey::from_pem("", &key.serialize_pem()),
        Err(TlsError::Pem(_))
    ));
    assert!(matches!(
        CertifiedKey::from_pem(&chain_pem, "no key here"),
        Err(TlsError::Pem(_))
    ));
}

#[test]
fn peer_spiffe_id_checks() {
    let ca = TestCa::root("example.org");
    assert_eq!(
        peer_spiffe_id(&[], &ca.td),
        Err(TlsError::NoPeerCertificate)
    );
    assert_eq!(
        peer_spiffe_id(std::slice::from_ref(&ca.der), &ca.td),
        Err(TlsError::CaAsLeaf)
    );
    let (leaf, _) = ca.leaf(CLIENT);
    let other = TrustDomain::new("other.org").unwrap();
    assert_eq!(
        peer_spiffe_id(&[leaf], &other),
        Err(TlsError::ForeignTrustDomain {
            expected: other.clone(),
            got: spiffe(CLIENT)
        })
    );
}

/// Both verifiers keep a chain they verified, and still refuse it once a certificate in it has
/// expired, or when it is presented under a wrong identity.
#[test]
fn verified_chains_are_reused_only_while_valid() {
    let root = TestCa::root("example.org");
    let intermediate = root.intermediate(None);
    let (leaf, _) = intermediate.leaf(SERVER);
    let chain = [intermediate.der.clone()];
    let bundle = root.bundle();
    let expiry = |der: &CertificateDer<'_>| {
        crate::profile::inspect_cert(der)
            .unwrap()
            .not_after
            .unix_timestamp() as u64
    };
    let after = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        expiry(&leaf).min(expiry(&intermediate.der)) + 1,
    ));
    let name = ServerName::try_from("x").unwrap();

    let servers = SpiffeServerVerifier::new(&bundle, Some(spiffe(SERVER))).unwrap();
    for _ in 0..2 {
        servers
            .verify_server_cert(&leaf, &chain, &name, &[], UnixTime::now())
            .unwrap();
    }
    assert_eq!(
        TlsError::from(
            servers
                .verify_server_cert(&leaf, &chain, &name, &[], after)
                .unwrap_err()
        ),
        TlsError::Expired
    );
    let wrong = SpiffeServerVerifier::new(&bundle, Some(spiffe(CLIENT))).unwrap();
    wrong
        .verify_server_cert(&leaf, &chain, &name, &[], UnixTime::now())
        .unwrap_err();

    let clients = SpiffeClientVerifier::new(&bundle, true).unwrap();
    for _ in 0..2 {
        clients
            .verify_client_cert(&leaf, &chain, UnixTime::now())
            .unwrap();
    }
    assert_eq!(
        TlsError::from(
            clients
                .verify_client_cert(&leaf, &chain, after)
                .unwrap_err()
        ),
        TlsError::Expired
    );
    // A chain of another CA is still refused after a good one was kept.
    let (foreign, _) = TestCa::root("example.org").leaf(SERVER);
    assert_eq!(
        TlsError::from(
            clients
                .verify_client_cert(&foreign, &[], UnixTime::now())
                .unwrap_err()
        ),
        TlsError::UnknownIssuer
    );
}

/// One handshake between raw configs over an in-memory pipe: the group each side agreed on.
async fn agreed_groups(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<(&'static str, &'static str), io::Error> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("x").unwrap();
    let (server, client) = tokio::join!(
        TlsAcceptor::from(Arc::new(server)).accept(server_io),
        TlsConnector::from(Arc::new(client)).connect(name, client_io)
    );
    Ok((
        key_exchange_group(server?.get_ref().1),
        key_exchange_group(client?.get_ref().1),
    ))
}

/// A server presenting SERVER, requiring a client of the CA, with the groups of `provider`.
fn server_with(ca: &TestCa, provider: Arc<CryptoProvider>) -> rustls::ServerConfig {
    let identity = leaf_identity(ca, SERVER);
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .with_client_cert_verifier(Arc::new(
            SpiffeClientVerifier::new(&ca.bundle(), true).unwrap(),
        ))
        .with_single_cert(identity.chain, identity.key)
        .unwrap()
}

/// A client presenting CLIENT, expecting SERVER, with the groups of `provider`.
fn client_using(ca: &TestCa, provider: Arc<CryptoProvider>) -> rustls::ClientConfig {
    let identity = leaf_identity(ca, CLIENT);
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            SpiffeServerVerifier::new(&ca.bundle(), Some(spiffe(SERVER))).unwrap(),
        ))
        .with_client_auth_cert(identity.chain, identity.key)
        .unwrap()
}

/// A provider offering only `groups`, as a peer restricted to them would.
fn offering(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: groups.to_vec(),
        ..rustls::crypto::ring::default_provider()
    })
}

#[tokio::test]
async fn sigil_configs_agree_on_the_hybrid_group_and_fall_back_to_classical_ones() {
    let ca = TestCa::root("example.org");
    // The process default: sigil's own server and client configs.
    assert_eq!(process_key_exchange(), KeyExchange::Hybrid);
    let client = client_with(&leaf_identity(&ca, CLIENT), &ca.bundle());
    assert_eq!(
        agreed_groups(mtls_server(&ca, &ca.bundle()), client)
            .await
            .unwrap(),
        ("X25519MLKEM768", "X25519MLKEM768")
    );
    // A peer without ML-KEM gets its first classical group, either way round.
    for (group, name) in [
        (rustls::crypto::ring::kx_group::X25519, "X25519"),
        (rustls::crypto::ring::kx_group::SECP256R1, "secp256r1"),
        (rustls::crypto::ring::kx_group::SECP384R1, "secp384r1"),
    ] {
        let client = client_using(&ca, offering(&[group]));
        let agreed = agreed_groups(mtls_server(&ca, &ca.bundle()), client).await;
        assert_eq!(agreed.unwrap(), (name, name));
        let server = server_with(&ca, offering(&[group]));
        let client = client_with(&leaf_identity(&ca, CLIENT), &ca.bundle());
        assert_eq!(agreed_groups(server, client).await.unwrap(), (name, name));
    }
}

#[tokio::test]
async fn classical_refuses_a_hybrid_only_peer_and_serves_a_classical_one() {
    let ca = TestCa::root("example.org");
    let classical = crypto_provider_for(KeyExchange::Classical);
    let hybrid_only = offering(&[rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768]);

    let refused = agreed_groups(
        server_with(&ca, classical.clone()),
        client_using(&ca, hybrid_only.clone()),
    )
    .await;
    let err = refused.expect_err("no group in common");
    assert!(
        matches!(
            TlsError::from_io_error(&err),
            Some(TlsError::Rustls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoKxGroupsInCommon
            ))) | Some(TlsError::PeerAlert(AlertDescription::HandshakeFailure))
        ),
        "{err}"
    );
    let refused = agreed_groups(
        server_with(&ca, hybrid_only),
        client_using(&ca, classical.clone()),
    )
    .await;
    assert!(
        refused.is_err(),
        "a classical client and a hybrid-only server"
    );

    let x25519_only = offering(&[rustls::crypto::ring::kx_group::X25519]);
    assert_eq!(
        agreed_groups(
            server_with(&ca, classical.clone()),
            client_using(&ca, x25519_only)
        )
        .await
        .unwrap(),
        ("X25519", "X25519")
    );
    // A classical sigil part and a hybrid one agree on X25519, either way round.
    assert_eq!(
        agreed_groups(
            server_with(&ca, classical.clone()),
            client_using(&ca, crypto_provider())
        )
        .await
        .unwrap(),
        ("X25519", "X25519")
    );
    assert_eq!(
        agreed_groups(mtls_server(&ca, &ca.bundle()), client_using(&ca, classical))
            .await
            .unwrap(),
        ("X25519", "X25519")
    );
}

#[test]
fn the_key_exchange_is_fixed_once_per_process() {
    // Hybrid is the default every other test of this process runs with.
    use_key_exchange(KeyExchange::Hybrid).unwrap();
    use_key_exchange(KeyExchange::Hybrid).unwrap();
    let err = use_key_exchange(KeyExchange::Classical).unwrap_err();
    assert!(err.to_string().contains("already fixed to Hybrid"), "{err}");
    assert_eq!(
        CryptoProvider::get_default().unwrap().kx_groups.len(),
        crypto_provider().kx_groups.len()
    );
    // TLS 1.2 peers (--tls12) have the same groups; rustls offers the hybrid one in TLS 1.3 only.
    assert_eq!(tls12_provider().kx_groups.len(), 4);
    assert_eq!(
        crypto_provider_for(KeyExchange::Classical).kx_groups.len(),
        3
    );
}
