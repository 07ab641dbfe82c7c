//! Bad peers against the bundled proxy (explicit mode, real CA + agent + proxy processes): a
//! Rust TLS client (or, outbound, a Rust TLS server) presents each kind of unacceptable
//! certificate in turn: another CA's, a foreign trust domain's, an expired one, one with two URI
//! SANs, a CA certificate, none at all, TLS 1.2 only, plaintext. Every one is refused before a
//! byte reaches the other side, with the reason in the access log's `result`, a readable
//! `detail`, and the `sigil_proxy_tls_handshake_failures_total{direction,reason}` counter.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use sigil_identity::profile::{KeyKind, LEAF_BACKDATE, ca_params, leaf_params};
use sigil_identity::tls::{
    CertifiedKey, ClientAuth, ExpectedServer, SpiffeServerVerifier, client_config, crypto_provider,
    server_config,
};
use sigil_identity::{SpiffeId, TrustBundle};
use sigil_test_harness::*;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WEB_UID: u32 = 41201;
const DB_UID: u32 = 41202;
const FOREIGN_ID: &str = "spiffe://other.example/ns/x/sa/y";

fn spiffe(id: &str) -> SpiffeId {
    SpiffeId::parse(id).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Sends a few bytes over `stream` and reads them back: `Ok` only if the echo came back.
async fn echo_on<S>(stream: &mut S) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let message = b"ping through the proxy";
    stream
        .write_all(message)
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut back = vec![0u8; message.len()];
    match tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await {
        Err(_) => Err("no answer within 5 s".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) if back == message => Ok(()),
        Ok(Ok(_)) => Err(format!("wrong echo: {back:?}")),
    }
}

/// One TLS connection with `config` to `addr`, then the echo: `Ok` only if the echo came back.
async fn tls_echo(addr: SocketAddr, config: rustls::ClientConfig) -> Result<(), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    echo_on(&mut tls).await?;
    close_cleanly(&mut tls).await;
    Ok(())
}

/// Ends a TLS stream as well-behaved peers do: close_notify, then wait for the other side's.
async fn close_cleanly<S>(tls: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tls.shutdown().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
}

/// A client presenting `identity` (or nothing) that accepts only `server` as the proxy.
fn client(
    identity: Option<&CertifiedKey>,
    bundle: &TrustBundle,
    server: &str,
) -> rustls::ClientConfig {
    client_config(
        identity,
        bundle,
        ExpectedServer::Spiffe(spiffe(server)),
        &[],
    )
    .unwrap()
}

/// A TLS 1.2-only client (rustls' ring provider: ECDHE with AES-GCM and ChaCha20) presenting
/// `identity`, verifying the proxy as `server`.
fn tls12_client(
    identity: &CertifiedKey,
    bundle: &TrustBundle,
    server: &str,
) -> rustls::ClientConfig {
    let verifier = SpiffeServerVerifier::new(bundle, Some(spiffe(server))).unwrap();
    rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .unwrap()
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> CertifiedKey {
    CertifiedKey {
        chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// The mesh's own root (certificate and key, read from the CA's state directory), to sign
/// certificates a real CA would never issue.
struct OurRoot {
    cert_pem: String,
    key: KeyPair,
}

impl OurRoot {
    fn read(state_dir: &Path) -> OurRoot {
        let bytes = std::fs::read(state_dir.join(sigil_ca::store::STATE_KEY)).unwrap();
        let state = sigil_ca::state::CaState::decode(&bytes).unwrap();
        let generation = &state.generations[0];
        OurRoot {
            cert_pem: generation.cert_pem.clone(),
            key: generation.key_pair().unwrap(),
        }
    }

    /// A certificate for a fresh key, made of `params` and signed by the root.
    fn sign(&self, params: &CertificateParams) -> CertifiedKey {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).unwrap();
        let key = KeyPair::generate().unwrap();
        let der = params.signed_by(&key, &issuer).unwrap().der().clone();
        certified(vec![der], &key)
    }

    /// The root itself as a TLS identity.
    fn as_identity(&self) -> CertifiedKey {
        let der = pem::parse(&self.cert_pem).unwrap().into_contents();
        certified(vec![der.into()], &self.key)
    }

    /// A well-formed X.509-SVID for `id` whose validity is `not_before..not_after`.
    fn leaf(
        &self,
        id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> CertifiedKey {
        self.sign(&leaf_params(
            &spiffe(id),
            KeyKind::EcdsaP256,
            not_before,
            not_after,
        ))
    }

    fn valid_leaf(&self, id: &str) -> CertifiedKey {
        self.leaf(id, now() - LEAF_BACKDATE, now() + time::Duration::hours(1))
    }

    fn expired_leaf(&self, id: &str) -> CertifiedKey {
        self.leaf(
            id,
            now() - time::Duration::hours(2),
            now() - time::Duration::hours(1),
        )
    }

    /// A leaf for `id` with a second URI SAN.
    fn two_uri_leaf(&self, id: &str, second: &str) -> CertifiedKey {
        let mut params = leaf_params(
            &spiffe(id),
            KeyKind::EcdsaP256,
            now() - LEAF_BACKDATE,
            now() + time::Duration::hours(1),
        );
        params
            .subject_alt_names
            .push(SanType::URI(second.try_into().unwrap()));
        self.sign(&params)
    }

    /// An intermediate CA certificate (cA=true) of the mesh, with its own key, used as a leaf.
    fn intermediate_ca(&self) -> CertifiedKey {
        self.sign(&ca_params(
            &td(),
            "rogue intermediate",
            now() - LEAF_BACKDATE,
            now() + time::Duration::hours(1),
            Some(0),
        ))
    }
}

/// A leaf for `id` from a second, unrelated `sigil ca init` root (same trust domain name).
fn other_ca_leaf(dir: &Path, id: &str) -> CertifiedKey {
    let other = OfflineCa::init(&dir.join("other-ca"), &[]);
    other.issue(id, &dir.join("other-ca").join("leaf"))
}

/// The access-log line number `index` of `proxy`, once written.
async fn access_line(proxy: &ProxyProcess, index: usize) -> serde_json::Value {
    eventually(&format!("access-log line {}", index + 1), || async {
        proxy.access_log().len() > index
    })
    .await;
    proxy.access_log().swap_remove(index)
}

/// After `outcome` (the peer's attempt, which must have failed), the proxy's next access-log
/// line is a refusal for `reason` whose detail contains `detail`, and that reason's counter is 1.
async fn assert_refused(
    proxy: &ProxyProcess,
    direction: &str,
    line_index: usize,
    case: &str,
    outcome: Result<(), String>,
    reason: &str,
    detail: &str,
) -> serde_json::Value {
    assert!(outcome.is_err(), "{case}: the bytes were echoed back");
    let line = access_line(proxy, line_index).await;
    assert_eq!(
        line["result"],
        reason,
        "{case} (peer saw: {outcome:?}): {line}\n{}",
        proxy.logs()
    );
    assert_eq!(line["direction"], direction, "{case}: {line}");
    let logged = line["detail"].as_str().unwrap_or_default();
    assert!(
        logged.contains(detail),
        "{case}: detail {logged:?} does not contain {detail:?}"
    );
    assert_eq!(line["bytes_received"], 0, "{case}: {line}");
    assert_eq!(line["bytes_sent"], 0, "{case}: {line}");
    assert_eq!(
        proxy.metric(&failures_series(direction, reason)).await,
        1.0,
        "{case}: counter for {reason}"
    );
    println!("{case}: {reason} ({logged}); the peer saw: {outcome:?}");
    line
}

/// A DB proxy with an inbound listener in front of an echo app.
struct Inbound {
    host: MeshHost,
    proxy: ProxyProcess,
    listen: SocketAddr,
    reached: Arc<AtomicUsize>,
    bundle: TrustBundle,
}

async fn inbound(dir: &Path) -> Inbound {
    let host = MeshHost::start(dir, &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)], "1h", &[]).await;
    let (app, reached) = echo_app().await;
    let listen = free_addr();
    let flags = args(&[
        "--explicit",
        "--agent-socket",
        host.socket.to_str().unwrap(),
        "--inbound-listen",
        &listen.to_string(),
        "--inbound-app",
        &app.to_string(),
    ]);
    let proxy = spawn_proxy(dir, "proxy-db", Some(DB_UID), &flags).await;
    let bundle = state_dir_bundle(&host.offline.state);
    Inbound {
        host,
        proxy,
        listen,
        reached,
        bundle,
    }
}

#[tokio::test]
async fn inbound_strict_refuses_each_kind_of_bad_client_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = inbound(dir.path()).await;
    let root = OurRoot::read(&p.host.offline.state);
    let good = p.host.offline.issue(WEB_ID, &dir.path().join("web-cert"));
    let (proxy, bundle) = (&p.proxy, &p.bundle);

    // A well-behaved client first: the harness itself works.
    assert_eq!(
        tls_echo(p.listen, client(Some(&good), bundle, DB_ID)).await,
        Ok(())
    );
    let line = access_line(proxy, 0).await;
    assert_eq!(line["result"], "ok", "{line}");
    assert_eq!(line["security"], "mtls");
    assert_eq!(line["source_identity"], WEB_ID);
    assert_eq!(p.reached.load(Ordering::SeqCst), 1);

    let cases: Vec<(&str, Option<CertifiedKey>, &str, &str)> = vec![
        (
            "a leaf from another CA",
            Some(other_ca_leaf(dir.path(), WEB_ID)),
            "unknown_issuer",
            "unknown issuer",
        ),
        (
            "a leaf of another trust domain signed by our root",
            Some(root.valid_leaf(FOREIGN_ID)),
            "foreign_trust_domain",
            FOREIGN_ID,
        ),
        (
            "an expired leaf",
            Some(root.expired_leaf(WEB_ID)),
            "expired",
            "expired",
        ),
        (
            "a leaf with two URI SANs",
            Some(root.two_uri_leaf(WEB_ID, DB_ID)),
            "multiple_uri_sans",
            "more than one URI SAN",
        ),
        (
            "an intermediate CA certificate as the leaf",
            Some(root.intermediate_ca()),
            "ca_as_leaf",
            "CA certificate",
        ),
        (
            "no client certificate",
            None,
            "no_client_certificate",
            "no certificate",
        ),
    ];
    let mut index = 1;
    for (case, identity, reason, detail) in &cases {
        let outcome = tls_echo(p.listen, client(identity.as_ref(), bundle, DB_ID)).await;
        let line = assert_refused(proxy, "inbound", index, case, outcome, reason, detail).await;
        assert!(line["source_identity"].is_null(), "{case}: {line}");
        index += 1;
    }

    // The root itself as the leaf is a CA certificate too: counted with the intermediate.
    let outcome = tls_echo(p.listen, client(Some(&root.as_identity()), bundle, DB_ID)).await;
    assert!(outcome.is_err(), "the root as a leaf was let through");
    let line = access_line(proxy, index).await;
    assert_eq!(line["result"], "ca_as_leaf", "{line}");
    assert_eq!(
        proxy
            .metric(&failures_series("inbound", "ca_as_leaf"))
            .await,
        2.0
    );
    index += 1;

    // Plaintext to a STRICT port.
    let mut plain = TcpStream::connect(p.listen).await.unwrap();
    let outcome = echo_on(&mut plain).await;
    assert_refused(
        proxy,
        "inbound",
        index,
        "plaintext",
        outcome,
        "not_tls",
        "corrupt message",
    )
    .await;

    // Nothing but the first, good connection ever reached the app; no line says "ok" but that one.
    assert_eq!(p.reached.load(Ordering::SeqCst), 1);
    let log = proxy.access_log();
    assert_eq!(log.iter().filter(|l| l["result"] == "ok").count(), 1);
    assert_eq!(
        proxy
            .metric("sigil_proxy_connections_opened_total{direction=\"inbound\",security=\"mtls\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_tls12_only_client_is_refused_unless_the_proxy_allows_tls12() {
    let dir = tempfile::tempdir().unwrap();
    let p = inbound(dir.path()).await;
    let good = p.host.offline.issue(WEB_ID, &dir.path().join("web-cert"));

    let outcome = tls_echo(p.listen, tls12_client(&good, &p.bundle, DB_ID)).await;
    assert_refused(
        &p.proxy,
        "inbound",
        0,
        "a TLS 1.2-only client",
        outcome,
        "protocol_version",
        "peer is incompatible",
    )
    .await;
    assert_eq!(p.reached.load(Ordering::SeqCst), 0);

    // The same client against a proxy started with --tls12 gets through, with its identity.
    let (app, reached) = echo_app().await;
    let listen = free_addr();
    let tls12 = spawn_proxy(
        dir.path(),
        "proxy-db-tls12",
        Some(DB_UID),
        &args(&[
            "--explicit",
            "--agent-socket",
            p.host.socket.to_str().unwrap(),
            "--inbound-listen",
            &listen.to_string(),
            "--inbound-app",
            &app.to_string(),
            "--tls12",
        ]),
    )
    .await;
    assert_eq!(
        tls_echo(listen, tls12_client(&good, &p.bundle, DB_ID)).await,
        Ok(())
    );
    let line = access_line(&tls12, 0).await;
    assert_eq!(line["result"], "ok", "{line}");
    assert_eq!(line["security"], "mtls");
    assert_eq!(line["source_identity"], WEB_ID);
    assert_eq!(line["destination_identity"], DB_ID);
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}

/// A TLS server standing in for the upstream: each accepted connection gets the next identity
/// of `identities` (no client certificate asked), echoes if the handshake succeeds, and reports
/// the handshake's outcome.
async fn fake_upstream(
    identities: Vec<CertifiedKey>,
    bundle: TrustBundle,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, outcomes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for identity in identities {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let config = server_config(&identity, &bundle, ClientAuth::Off, &[]).unwrap();
            match TlsAcceptor::from(Arc::new(config)).accept(tcp).await {
                Ok(mut tls) => {
                    let _ = report.send(Ok(()));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 1024];
                        while let Ok(n @ 1..) = tls.read(&mut buf).await {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            let _ = tls.flush().await;
                        }
                        let _ = tls.shutdown().await;
                    });
                }
                Err(e) => {
                    let _ = report.send(Err(e.to_string()));
                }
            }
        }
    });
    (addr, outcomes)
}

#[tokio::test]
async fn outbound_refuses_each_kind_of_bad_server_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let host = MeshHost::start(dir.path(), &[(WEB_UID, WEB_ID), (DB_UID, DB_ID)], "1h", &[]).await;
    let root = OurRoot::read(&host.offline.state);
    let bundle = state_dir_bundle(&host.offline.state);

    // The upstream presents, connection by connection: a good DB certificate, then bad ones.
    let cases: Vec<(&str, CertifiedKey, &str, &str)> = vec![
        (
            "a server certificate from another CA",
            other_ca_leaf(dir.path(), DB_ID),
            "unknown_issuer",
            "unknown issuer",
        ),
        (
            "a server of another trust domain signed by our root",
            root.valid_leaf(FOREIGN_ID),
            "foreign_trust_domain",
            FOREIGN_ID,
        ),
        (
            "an expired server certificate",
            root.expired_leaf(DB_ID),
            "expired",
            "expired",
        ),
        (
            "a server certificate with two URI SANs",
            root.two_uri_leaf(DB_ID, WEB_ID),
            "multiple_uri_sans",
            "more than one URI SAN",
        ),
        (
            "an intermediate CA certificate as the server's leaf",
            root.intermediate_ca(),
            "ca_as_leaf",
            "CA certificate",
        ),
    ];
    let identities = std::iter::once(root.valid_leaf(DB_ID))
        .chain(cases.iter().map(|(_, identity, _, _)| identity.clone()))
        .collect();
    let (upstream, mut outcomes) = fake_upstream(identities, bundle).await;

    let listen = free_addr();
    let proxy = spawn_proxy(
        dir.path(),
        "proxy-web",
        Some(WEB_UID),
        &args(&[
            "--explicit",
            "--agent-socket",
            host.socket.to_str().unwrap(),
            "--outbound-listen",
            &listen.to_string(),
            "--outbound-upstream",
            &upstream.to_string(),
            "--outbound-identity",
            DB_ID,
        ]),
    )
    .await;

    let mut app = TcpStream::connect(listen).await.unwrap();
    assert_eq!(echo_on(&mut app).await, Ok(()), "the good upstream");
    drop(app);
    assert_eq!(outcomes.recv().await, Some(Ok(())));
    let line = access_line(&proxy, 0).await;
    assert_eq!(line["result"], "ok", "{line}");
    assert_eq!(line["destination_identity"], DB_ID);

    for (index, (case, _, reason, detail)) in cases.iter().enumerate() {
        let mut app = TcpStream::connect(listen).await.unwrap();
        let outcome = echo_on(&mut app).await;
        let line =
            assert_refused(&proxy, "outbound", index + 1, case, outcome, reason, detail).await;
        assert_eq!(line["source_identity"], WEB_ID, "{case}: {line}");
        assert!(line["destination_identity"].is_null(), "{case}: {line}");
        // The proxy aborted the handshake: the server never got a finished handshake.
        let server_saw = outcomes.recv().await.unwrap();
        assert!(
            server_saw.is_err(),
            "{case}: the server's handshake finished"
        );
        println!("  the server saw: {}", server_saw.unwrap_err());
    }
}
