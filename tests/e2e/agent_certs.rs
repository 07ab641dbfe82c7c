//! The node agent's certificate manager against a real `sigil ca serve` process: issuance,
//! rotation at half life, sharing per identity, fan-out, forgetting, a CA outage longer than
//! half the lifetime, an outage outliving the certificate (recovery within seconds of the CA's
//! return), the trust bundle following WatchTrustBundle, and the agent's own certificate
//! renewing itself.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use sigil_agent::ca_client::{CaClient, Credential};
use sigil_agent::certs::{CertConfig, CertManager, SvidWatch};
use sigil_agent::metrics::{IdentityLabels, Metrics};
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{SpiffeId, TrustBundle};
use sigil_test_harness::*;
use tokio::sync::watch;

/// A CA (state dir, client-certificate auth, static entries for the agent) and the agent's
/// bootstrap certificate.
struct Setup {
    dir: tempfile::TempDir,
    offline: OfflineCa,
    agent: CertifiedKey,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID, DB_ID]);
    let agent = offline.issue(AGENT_ID, &dir.path().join("agent"));
    Setup {
        dir,
        offline,
        agent,
    }
}

impl Setup {
    fn start_ca_on(&self, grpc: std::net::SocketAddr, admin: std::net::SocketAddr) -> CaProcess {
        CaProcess::start_on(
            self.dir.path(),
            None,
            &[
                self.offline.serve_args(),
                ["--max-ttl", "24h", "--reload-interval", "100ms"]
                    .map(String::from)
                    .to_vec(),
            ]
            .concat(),
            grpc,
            admin,
        )
    }

    fn bundle(&self) -> TrustBundle {
        state_dir_bundle(&self.offline.state)
    }

    fn manager(
        &self,
        ca: &CaProcess,
        ttl: Duration,
    ) -> (CertManager, Arc<Metrics>, watch::Sender<Arc<CertifiedKey>>) {
        let (_bundle_tx, bundle_rx) = watch::channel(Arc::new(self.bundle()));
        let (credential_tx, credential_rx) = watch::channel(Arc::new(self.agent.clone()));
        let client = CaClient::new(
            ca.grpc.to_string(),
            "localhost".into(),
            bundle_rx,
            Credential::Certificate(credential_rx),
        );
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let manager = CertManager::spawn(
            client,
            CertConfig {
                ttl,
                max_concurrent_fetches: 8,
                own_id: Some(AGENT_ID.parse().unwrap()),
            },
            metrics.clone(),
        );
        (manager, metrics, credential_tx)
    }
}

/// Waits until `rx` holds a certificate whose serial is not in `seen`; returns its serial.
async fn next_serial(rx: &mut SvidWatch, seen: &[String], within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(svid) = rx.borrow_and_update().clone()
            && !seen.contains(&svid.serial_hex)
        {
            return svid.serial_hex.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no new certificate within {within:?} (seen {seen:?})"
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

fn verifies(svid: &sigil_agent::certs::Svid, bundle: &TrustBundle) -> bool {
    bundle
        .verify_chain(&svid.chain, rustls::pki_types::UnixTime::now())
        .is_ok()
}

#[tokio::test]
async fn issues_shares_and_rotates_at_half_life() {
    let s = setup();
    let mut ca = s.start_ca_on(free_addr(), free_addr());
    ca.wait_ready().await;
    let (manager, metrics, _credential) = s.manager(&ca, Duration::from_secs(4));
    let web: SpiffeId = WEB_ID.parse().unwrap();
    let mut a = manager.subscribe(&web).await.unwrap();
    let b = manager.subscribe(&web).await.unwrap();
    let first = next_serial(&mut a, &[], Duration::from_secs(10)).await;
    let (sa, sb) = (a.borrow().clone().unwrap(), b.borrow().clone().unwrap());
    assert!(
        Arc::ptr_eq(&sa, &sb),
        "one certificate per identity, shared"
    );
    assert_eq!(sa.id, web);
    assert!(verifies(&sa, &s.bundle()));
    let lifetime = sa.not_after.duration_since(sa.not_before).unwrap();
    assert_eq!(
        lifetime,
        Duration::from_secs(4 + 60),
        "TTL 4 s, backdated one minute"
    );

    // Renewed at half of the 4 s it arrived with (±5 %): two more within ~5 s.
    let renewals_started = Instant::now();
    let second = next_serial(
        &mut a,
        std::slice::from_ref(&first),
        Duration::from_secs(10),
    )
    .await;
    let third = next_serial(
        &mut a,
        &[first.clone(), second.clone()],
        Duration::from_secs(10),
    )
    .await;
    assert_ne!(second, third);
    let took = renewals_started.elapsed();
    assert!(
        took > Duration::from_millis(3000) && took < Duration::from_millis(6000),
        "two renewals at ~2 s each took {took:?}"
    );
    let labels = IdentityLabels {
        identity: WEB_ID.into(),
    };
    assert!(metrics.cert_expiry.get_or_create(&labels).get() > 0);
    assert_eq!(metrics.identities.get(), 1);
}

#[tokio::test]
async fn a_rotation_reaches_200_subscribers() {
    let s = setup();
    let mut ca = s.start_ca_on(free_addr(), free_addr());
    ca.wait_ready().await;
    let (manager, _, _credential) = s.manager(&ca, Duration::from_secs(4));
    let web: SpiffeId = WEB_ID.parse().unwrap();
    let mut subscribers = Vec::new();
    for _ in 0..200 {
        subscribers.push(manager.subscribe(&web).await.unwrap());
    }
    let first = next_serial(&mut subscribers[0], &[], Duration::from_secs(10)).await;
    let waits = subscribers
        .iter_mut()
        .map(|rx| next_serial(rx, std::slice::from_ref(&first), Duration::from_secs(10)));
    let serials: BTreeSet<String> = futures::future::join_all(waits).await.into_iter().collect();
    assert_eq!(
        serials.len(),
        1,
        "all 200 got the same new certificate: {serials:?}"
    );
}

#[tokio::test]
async fn ca_outage_longer_than_half_the_lifetime_keeps_the_valid_cert_then_recovers() {
    let s = setup();
    let (grpc, admin) = (free_addr(), free_addr());
    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    let ttl = Duration::from_secs(8);
    let (manager, metrics, _credential) = s.manager(&ca, ttl);
    let web: SpiffeId = WEB_ID.parse().unwrap();
    let mut rx = manager.subscribe(&web).await.unwrap();
    let first = next_serial(&mut rx, &[], Duration::from_secs(10)).await;

    drop(ca); // the CA process is killed
    tokio::time::sleep(ttl.mul_f64(0.75)).await; // past the renewal point (half life)
    let held = rx
        .borrow()
        .clone()
        .expect("the still-valid certificate is kept");
    assert_eq!(held.serial_hex, first);
    assert!(held.not_after > std::time::SystemTime::now());
    let labels = IdentityLabels {
        identity: WEB_ID.into(),
    };
    let failures = metrics.csr_failures.get_or_create(&labels).get();
    assert!(failures >= 1, "failed renewals are counted");

    // The CA comes back where it was: a new certificate within one backoff period.
    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    let back = Instant::now();
    let renewed = next_serial(
        &mut rx,
        std::slice::from_ref(&first),
        Duration::from_secs(10),
    )
    .await;
    assert_ne!(renewed, first);
    println!(
        "recovered {:?} after the CA returned, after {failures} failed attempts",
        back.elapsed()
    );
}

/// An outage that outlives the certificate used to end with the agent still waiting out a
/// backoff grown during it (16 s and more), so workloads stayed without a certificate long after
/// the CA was back. Retries are at most a few seconds apart once the certificate expired.
#[tokio::test]
async fn after_an_outage_longer_than_the_lifetime_the_agent_renews_within_seconds_of_the_cas_return()
 {
    let s = setup();
    let (grpc, admin) = (free_addr(), free_addr());
    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    let ttl = Duration::from_secs(6);
    let (manager, _metrics, _credential) = s.manager(&ca, ttl);
    let (web, db): (SpiffeId, SpiffeId) = (WEB_ID.parse().unwrap(), DB_ID.parse().unwrap());
    let mut web_rx = manager.subscribe(&web).await.unwrap();
    let mut db_rx = manager.subscribe(&db).await.unwrap();
    let web_first = next_serial(&mut web_rx, &[], Duration::from_secs(10)).await;
    let db_first = next_serial(&mut db_rx, &[], Duration::from_secs(10)).await;

    drop(ca); // the CA process is killed...
    tokio::time::sleep(Duration::from_secs(22)).await; // ...for over 3 × the lifetime
    assert!(
        web_rx.borrow().is_none() && db_rx.borrow().is_none(),
        "an expired certificate is not served"
    );

    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    let back = Instant::now();
    for (rx, first) in [(&mut web_rx, web_first), (&mut db_rx, db_first)] {
        next_serial(rx, std::slice::from_ref(&first), Duration::from_secs(30)).await;
    }
    let took = back.elapsed();
    println!("both identities renewed {took:?} after the CA returned");
    assert!(
        took < Duration::from_secs(5),
        "renewed {took:?} after the CA returned"
    );
}

#[tokio::test]
async fn an_identity_is_forgotten_when_its_last_subscriber_leaves_unless_wanted() {
    let s = setup();
    let mut ca = s.start_ca_on(free_addr(), free_addr());
    ca.wait_ready().await;
    let (manager, metrics, _credential) = s.manager(&ca, Duration::from_secs(60));
    let (web, db): (SpiffeId, SpiffeId) = (WEB_ID.parse().unwrap(), DB_ID.parse().unwrap());
    let mut rx = manager.subscribe(&web).await.unwrap();
    next_serial(&mut rx, &[], Duration::from_secs(10)).await;

    // Prefetch: db is fetched before anyone asks, and kept with no subscriber.
    manager.set_wanted([db.clone()].into()).await.unwrap();
    let until = |n: i64| {
        let metrics = metrics.clone();
        async move {
            for _ in 0..100 {
                if metrics.identities.get() == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "identities never became {n} (is {})",
                metrics.identities.get()
            );
        }
    };
    until(2).await; // web and the prefetched db
    drop(rx);
    until(1).await; // web forgotten, db kept
    let mut db_rx = manager.subscribe(&db).await.unwrap();
    let db_serial = next_serial(&mut db_rx, &[], Duration::from_secs(10)).await;
    assert!(!db_serial.is_empty());
    assert_eq!(metrics.identities.get(), 1);
    drop(db_rx);
    manager.set_wanted(BTreeSet::new()).await.unwrap();
    until(0).await;
}

#[tokio::test]
async fn trust_bundle_follows_watch_trust_bundle_through_a_root_rotation() {
    let s = setup();
    let mut ca = s.start_ca_on(free_addr(), free_addr());
    ca.wait_ready().await;
    let initial = s.bundle();
    let (bundle_tx, mut bundle_rx) = watch::channel(Arc::new(initial.clone()));
    let (_credential_tx, credential_rx) = watch::channel(Arc::new(s.agent.clone()));
    let client = CaClient::new(
        ca.grpc.to_string(),
        "localhost".into(),
        bundle_rx.clone(),
        Credential::Certificate(credential_rx),
    );
    tokio::spawn(client.follow_bundle(td(), bundle_tx, watch::channel(false).0));
    sigil(&[
        "ca",
        "rotate-root",
        "--state-dir",
        s.offline.state.to_str().unwrap(),
        "--propagation",
        "1h",
    ]);
    let grown = tokio::time::timeout(
        Duration::from_secs(10),
        bundle_rx.wait_for(|b| b.roots.len() == 2),
    )
    .await
    .expect("the new root arrives over WatchTrustBundle")
    .unwrap()
    .clone();
    assert_eq!(
        grown.roots[0], initial.roots[0],
        "the old root stays during the overlap"
    );
}

/// Hosts without Kubernetes: the agent authenticates to the CA with its own certificate, renewed
/// like any other. A CA outage longer than its lifetime left the agent holding only an expired
/// credential, which the CA refuses, so nothing was renewed again until the agent was restarted
/// (seen in benches/fault.rs: every request failed from the outage until an agent restart). The
/// agent now presents its --client-cert again once its renewed certificate has expired.
#[tokio::test]
async fn after_an_outage_longer_than_its_own_certificate_the_agent_renews_with_its_client_cert() {
    let s = setup();
    let (grpc, admin) = (free_addr(), free_addr());
    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    let (manager, _, credential_tx) = s.manager(&ca, Duration::from_secs(4));
    let bootstrap = credential_tx.borrow().clone();
    let mut credential_rx = credential_tx.subscribe();
    tokio::spawn(sigil_agent::certs::keep_agent_certificate(
        manager.clone(),
        AGENT_ID.parse().unwrap(),
        bootstrap.clone(),
        credential_tx,
    ));
    tokio::time::timeout(
        Duration::from_secs(10),
        credential_rx.wait_for(|c| c.chain[0] != bootstrap.chain[0]),
    )
    .await
    .expect("the agent replaced its bootstrap certificate")
    .unwrap();
    let web: SpiffeId = WEB_ID.parse().unwrap();
    let mut web_rx = manager.subscribe(&web).await.unwrap();
    let first = next_serial(&mut web_rx, &[], Duration::from_secs(10)).await;

    drop(ca); // the CA process is killed for 2.5 × the lifetime: every certificate expires
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        web_rx.borrow().is_none(),
        "an expired certificate is not served"
    );
    let mut ca = s.start_ca_on(grpc, admin);
    ca.wait_ready().await;
    next_serial(
        &mut web_rx,
        std::slice::from_ref(&first),
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test]
async fn the_agents_own_certificate_renews_itself() {
    let s = setup();
    let mut ca = s.start_ca_on(free_addr(), free_addr());
    ca.wait_ready().await;
    let (manager, _, credential_tx) = s.manager(&ca, Duration::from_secs(4));
    let mut credential_rx = credential_tx.subscribe();
    let bootstrap = s.agent.chain[0].clone();
    let bootstrap_key = credential_tx.borrow().clone();
    tokio::spawn(sigil_agent::certs::keep_agent_certificate(
        manager.clone(),
        AGENT_ID.parse().unwrap(),
        bootstrap_key,
        credential_tx,
    ));
    tokio::time::timeout(
        Duration::from_secs(10),
        credential_rx.wait_for(|c| c.chain[0] != bootstrap),
    )
    .await
    .expect("the agent replaced its bootstrap certificate")
    .unwrap();
    let renewed = credential_rx.borrow().chain[0].clone();
    assert_eq!(
        sigil_identity::profile::leaf_spiffe_id(&renewed)
            .unwrap()
            .to_string(),
        AGENT_ID
    );
    // And the renewed one is a working credential: a pod identity can still be obtained with it.
    let mut rx = manager.subscribe(&WEB_ID.parse().unwrap()).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        credential_rx.wait_for(|c| c.chain[0] != renewed),
    )
    .await
    .expect("renewed again")
    .unwrap();
    next_serial(&mut rx, &[], Duration::from_secs(10)).await;
}
