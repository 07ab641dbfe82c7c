//! The CA without Kubernetes: state in a directory, callers authenticated by client certificates
//! it issued, node agents scoped by static entries, plug-in intermediates, root rotation under
//! continuous load with zero failures, and the CA and an agent listening on `[::]` for both
//! address families.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_identity::TrustBundle;
use sigil_identity::profile;
use sigil_identity::tls::CertifiedKey;
use sigil_proto::sigil::ca::v1::WatchTrustBundleRequest;
use sigil_test_harness::*;
use tokio::sync::watch;
use tonic::Code;

#[tokio::test]
async fn agent_certificate_with_static_entries_and_renewal_by_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let state = offline.state.clone();
    let mut ca = CaProcess::start(dir.path(), None, &offline.serve_args());
    ca.wait_ready().await;
    let bundle = state_dir_bundle(&state);
    let agent = offline.issue(AGENT_ID, &dir.path().join("agent"));
    let mut client = ca.client(&bundle, Some(&agent)).await;

    // The agent renews its own identity with its certificate...
    let (key, csr) = key_and_csr();
    let renewed = client
        .sign(sign_request(csr, 600, "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        profile::leaf_spiffe_id(&renewed.leaf).unwrap().to_string(),
        AGENT_ID
    );
    // ...and the renewed certificate works as a credential in turn.
    let mut renewed_client = ca.client(&bundle, Some(&certified(&key, &renewed))).await;

    // It may issue exactly what its entry grants.
    let (_, csr) = key_and_csr();
    let web = renewed_client
        .sign(sign_request(csr, 0, WEB_ID, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        profile::leaf_spiffe_id(&web.leaf).unwrap().to_string(),
        WEB_ID
    );
    let (_, csr) = key_and_csr();
    let denied = renewed_client
        .sign(sign_request(
            csr,
            0,
            "spiffe://cluster.local/ns/demo/sa/db",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "permission denied",
        "callers learn nothing more"
    );

    // A workload certificate cannot impersonate, and a token is not accepted in --auth certs.
    let web_identity = offline.issue(WEB_ID, &dir.path().join("web"));
    let mut web_client = ca.client(&bundle, Some(&web_identity)).await;
    let (_, csr) = key_and_csr();
    let status = web_client
        .sign(sign_request(csr, 0, AGENT_ID, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut anonymous = ca.client(&bundle, None).await;
    let (_, csr) = key_and_csr();
    let status = anonymous
        .sign(sign_request(csr, 0, "", Some("a.b.c")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A certificate from another CA is not a credential: the TLS handshake refuses it.
    let other = OfflineCa::init(&dir.path().join("other-ca"), &[]);
    let foreign = other.issue(AGENT_ID, &dir.path().join("foreign"));
    let result = sigil_agent::ca_channel::connect(
        &ca.grpc.to_string(),
        "localhost",
        &bundle,
        Some(&foreign),
    )
    .await;
    let refused = match result {
        Err(_) => true,
        Ok(channel) => {
            let mut c = sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(channel);
            let (_, csr) = key_and_csr();
            c.sign(sign_request(csr, 0, WEB_ID, None)).await.is_err()
        }
    };
    assert!(
        refused,
        "a foreign client certificate must not get a certificate"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = ca.audit();
    assert!(
        audit.iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not grant"))),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r["credential"] == "client-cert" && r["granted"] == true)
    );
}

/// A CA pod that gets SIGTERM in a rollout is still an endpoint of the Service for about a
/// second: it used to exit at once, so calls routed to it then were refused or hung. It now
/// reports not ready at once and answers every call, on new connections too, for its grace
/// period (5 s by default), then exits by itself.
#[tokio::test]
async fn a_ca_receiving_sigterm_answers_every_call_through_its_grace_period_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let mut ca = CaProcess::start(dir.path(), None, &offline.serve_args());
    ca.wait_ready().await;
    let bundle = state_dir_bundle(&offline.state);
    let agent = offline.issue(AGENT_ID, &dir.path().join("agent"));
    let addr = ca.grpc.to_string();
    // One call on a new connection, as a caller the Service routes here makes it; a refused
    // connection is an error, a hung one a timeout.
    let call = || async {
        let attempt = async {
            let channel =
                sigil_agent::ca_channel::connect(&addr, "localhost", &bundle, Some(&agent))
                    .await
                    .map_err(|e| e.to_string())?;
            let (_key, csr) = key_and_csr();
            sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(channel)
                .sign(sign_request(csr, 600, "", None))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .unwrap_or_else(|_| Err("hung for 2 s".into()))
    };
    call().await.expect("a call before the signal");

    let status = Command::new("kill")
        .args(["-TERM", &ca.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    let mut calls = 0;
    let mut not_ready_seen = false;
    while signalled.elapsed() < Duration::from_secs(4) {
        if let Err(e) = call().await {
            panic!(
                "call {calls}, {:?} after SIGTERM, failed: {e}\n{}",
                signalled.elapsed(),
                ca.logs()
            );
        }
        calls += 1;
        not_ready_seen |= matches!(http_get(ca.admin, "/ready").await, Ok((503, _)));
    }
    assert!(
        not_ready_seen,
        "the CA reports not ready during its grace period"
    );
    println!("{calls} calls answered in the 4 s after SIGTERM");

    // Then it drains and exits by itself, well within a terminationGracePeriodSeconds of 15.
    let deadline = signalled + Duration::from_secs(12);
    let status = loop {
        if let Some(status) = ca.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the CA did not exit:\n{}",
            ca.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    assert!(ca.logs().contains("CA stopped"));
}

#[test]
fn static_entries_with_token_auth_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let entries = offline.entries.to_str().unwrap().to_string();
    let out = Command::new(sigil_exe())
        .args(["ca", "serve", "--state-dir"])
        .arg(dir.path().join("state"))
        .args([
            "--auth",
            "jwks",
            "--jwks-file",
            "/nonexistent",
            "--static-entries",
            &entries,
        ])
        .args([
            "--listen",
            &free_addr().to_string(),
            "--admin-addr",
            &free_addr().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--static-entries needs --auth certs"),
        "{stderr}"
    );
}

/// Runs `command` and returns its output if it exits within `limit`; kills it otherwise.
fn exits_within(command: &mut Command, limit: Duration) -> Option<std::process::Output> {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A configuration mistake stops the process at start, with the reason and exit code 2, instead
/// of a process that runs and never serves (a bad `--server-name` used to fail every 5 s in the
/// background, forever). The same for the agent's names of the CA, and for RUST_LOG.
#[test]
fn configuration_errors_stop_the_process_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let listen = free_addr().to_string();
    let admin = free_addr().to_string();
    let mut ca = Command::new(sigil_exe());
    ca.args(["ca", "serve", "--listen", &listen, "--admin-addr", &admin])
        .args(offline.serve_args())
        .args(["--server-name", "localhost", "--server-name", "not a name"]);
    let out = exits_within(&mut ca, Duration::from_secs(10))
        .expect("the CA must stop at start, not run without serving");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--server-name")
            && stderr.contains("\"not a name\" is neither a DNS name nor an IP address"),
        "{stderr}"
    );

    let bundle = offline.state.join("root-cert.pem");
    let unix_map = dir.path().join("unix-map.yaml");
    std::fs::write(&unix_map, "workloads: []\n").unwrap();
    for (flag, value, reason) in [
        (
            "--ca-name",
            "sigil ca",
            "neither a DNS name nor an IP address",
        ),
        ("--ca", "sigil-ca.sigil-system.svc", "is not host:port"),
    ] {
        let mut agent = Command::new(sigil_exe());
        agent
            .args(["agent", "run", "--attestor", "unix", "--ca-bundle"])
            .arg(&bundle)
            .args(["--unix-map"])
            .arg(&unix_map)
            .args(["--admin-addr", &free_addr().to_string()])
            .args(["--socket"])
            .arg(dir.path().join("agent.sock"))
            .args([flag, value]);
        let out = exits_within(&mut agent, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the agent must stop at start on {flag} {value:?}"));
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag) && stderr.contains(reason), "{stderr}");
    }

    // A RUST_LOG that does not parse, in either binary (it used to become `info` silently).
    let mut ca = Command::new(sigil_exe());
    ca.args(["ca", "serve", "--listen", &free_addr().to_string()])
        .args(["--admin-addr", &free_addr().to_string()])
        .args(offline.serve_args());
    let mut proxy = Command::new(sigil_proxy_exe());
    proxy.args(["run", "--explicit"]);
    for command in [&mut ca, &mut proxy] {
        command.env("RUST_LOG", "info,sigil_ca=loud");
        let out = exits_within(command, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{command:?} must stop at start on a bad RUST_LOG"));
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: RUST_LOG=\"info,sigil_ca=loud\" is not a log filter ("),
            "{stderr}"
        );
    }
}

/// X509-SVID: a leaf's SPIFFE ID MUST have a path; `spiffe://cluster.local` names the trust
/// domain (CA certificates carry it). No leaf is issued for it anywhere: `sigil ca issue`, a
/// static entry granting it, or a certificate carrying it that asks to renew itself through
/// Sign or CreateCertificate.
#[tokio::test]
async fn no_leaf_is_issued_for_a_trust_domain_id() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let out_dir = dir.path().join("td-leaf");
    let out = Command::new(sigil_exe())
        .args(["ca", "issue", "--state-dir"])
        .arg(&offline.state)
        .args(["--id", "spiffe://cluster.local", "--out-dir"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--id: spiffe://cluster.local is a trust-domain ID (no path)"),
        "{stderr}"
    );
    assert!(!out_dir.join("cert.pem").exists(), "nothing is written");

    // A static entry granting the trust-domain ID is a configuration error.
    let entries = dir.path().join("td-entries.yaml");
    std::fs::write(
        &entries,
        format!("agents:\n- id: {AGENT_ID}\n  may_issue: [spiffe://cluster.local]\n"),
    )
    .unwrap();
    let listen = free_addr().to_string();
    let admin = free_addr().to_string();
    let mut ca = Command::new(sigil_exe());
    ca.args([
        "ca",
        "serve",
        "--listen",
        &listen,
        "--admin-addr",
        &admin,
        "--state-dir",
    ])
    .arg(&offline.state)
    .args(["--auth", "certs", "--static-entries"])
    .arg(&entries);
    let out = exits_within(&mut ca, Duration::from_secs(10))
        .expect("the CA must refuse the entry at start");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spiffe://cluster.local is a trust-domain ID"),
        "{stderr}"
    );

    // A certificate for the trust-domain ID (made outside sigil, by the operator's intermediate)
    // renews nothing, through either API: the CA's TLS verifier already refuses it as a client
    // certificate (`Signer::sign_leaf` would refuse it next).
    let plugin = dir.path().join("cacerts");
    make_plugin(&plugin);
    let mut ca = CaProcess::start(
        dir.path(),
        None,
        &[
            "--plugin-dir",
            plugin.to_str().unwrap(),
            "--auth",
            "certs",
            "--static-entries",
            offline.entries.to_str().unwrap(),
        ],
    );
    ca.wait_ready().await;
    let bundle = TrustBundle::from_pem(
        td(),
        &std::fs::read_to_string(plugin.join("root-cert.pem")).unwrap(),
    )
    .unwrap();
    let td_leaf = operator_issued(&plugin, "spiffe://cluster.local");
    let grpc = ca.grpc.to_string();
    let connect = || sigil_agent::ca_channel::connect(&grpc, "localhost", &bundle, Some(&td_leaf));
    let signed = match connect().await {
        Err(_) => false,
        Ok(channel) => {
            let (_, csr) = key_and_csr();
            sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(channel)
                .sign(sign_request(csr, 0, "", None))
                .await
                .is_ok()
        }
    };
    assert!(!signed, "Sign renewed a trust-domain ID");
    let (key, _) = key_and_csr();
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let created = match connect().await {
        Err(_) => false,
        Ok(channel) => sigil_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient::new(channel)
            .create_certificate(sigil_proto::istio::v1::auth::IstioCertificateRequest {
                csr: csr_pem,
                validity_duration: 3600,
                metadata: None,
            })
            .await
            .is_ok(),
    };
    assert!(!created, "CreateCertificate renewed a trust-domain ID");
    assert!(
        !ca.audit().iter().any(|r| r["granted"] == true),
        "{:#?}",
        ca.audit()
    );
}

/// A certificate renewing itself (a host without Kubernetes) gets at most the CA's default
/// lifetime, however long it asks for: a stolen certificate cannot stretch itself to --max-ttl.
#[tokio::test]
async fn renewal_by_certificate_is_capped_at_the_default_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let mut args = offline.serve_args();
    args.extend(["--default-ttl", "1h", "--max-ttl", "7d"].map(String::from));
    let mut ca = CaProcess::start(dir.path(), None, &args);
    ca.wait_ready().await;
    let bundle = state_dir_bundle(&offline.state);
    let agent = offline.issue(AGENT_ID, &dir.path().join("agent"));
    let mut client = ca.client(&bundle, Some(&agent)).await;
    let (_, csr) = key_and_csr();
    let renewed = client
        .sign(sign_request(csr, 7 * 86_400, "", None))
        .await
        .unwrap()
        .into_inner();
    let report = profile::inspect_cert(&renewed.leaf).unwrap();
    assert_eq!(
        (report.not_after - report.not_before).whole_seconds(),
        3600 + 60,
        "renewed for the default hour (plus the minute of backdating), not 7 days"
    );
    // Issuing another identity by static entry keeps the requested lifetime.
    let (_, csr) = key_and_csr();
    let web = client
        .sign(sign_request(csr, 2 * 86_400, WEB_ID, None))
        .await
        .unwrap()
        .into_inner();
    let report = profile::inspect_cert(&web.leaf).unwrap();
    assert_eq!(
        (report.not_after - report.not_before).whole_seconds(),
        2 * 86_400 + 60
    );
}

#[tokio::test]
async fn sign_without_a_key_is_unavailable_and_a_bad_plugin_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    std::fs::create_dir_all(&plugin).unwrap();
    // An intermediate from one operator root, with another operator root as root-cert.pem.
    let good = dir.path().join("good");
    make_plugin(&good);
    let other = dir.path().join("other");
    make_plugin(&other);
    for name in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        std::fs::copy(good.join(name), plugin.join(name)).unwrap();
    }
    std::fs::copy(other.join("root-cert.pem"), plugin.join("root-cert.pem")).unwrap();

    let mut ca = CaProcess::start(
        dir.path(),
        None,
        &[
            "--plugin-dir",
            plugin.to_str().unwrap(),
            "--auth",
            "certs",
            "--reload-interval",
            "200ms",
        ],
    );
    // Not ready: the only key on offer does not chain to its roots.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = http_get(ca.admin, "/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("key_loaded=false"));
    assert!(
        ca.logs().contains("does not reach the roots"),
        "{}",
        ca.logs()
    );
    let metrics = ca.metrics().await;
    assert!(
        metric(&metrics, "sigil_ca_key_source_errors_total") >= 1.0,
        "{metrics}"
    );

    // Fixing the files is picked up without a restart.
    std::fs::copy(good.join("root-cert.pem"), plugin.join("root-cert.pem")).unwrap();
    ca.wait_ready().await;
    let bundle = TrustBundle::from_pem(
        td(),
        &std::fs::read_to_string(good.join("root-cert.pem")).unwrap(),
    )
    .unwrap();
    let (ok, out) = {
        // The CA's serving chain goes through the intermediate: connecting proves it.
        let channel =
            sigil_agent::ca_channel::connect(&ca.grpc.to_string(), "localhost", &bundle, None)
                .await;
        (channel.is_ok(), format!("{:?}", channel.err()))
    };
    assert!(ok, "{out}");
}

/// An operator's offline root and intermediate in Istio's cacerts layout, made with openssl.
fn make_plugin(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "[req]\ndistinguished_name=dn\n[dn]\n[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         [inter]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
         subjectAltName=URI:spiffe://cluster.local\n",
    )
    .unwrap();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "root-key.pem",
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "root-key.pem",
        "-subj",
        "/O=operator/CN=offline root",
        "-days",
        "30",
        "-config",
        "ext.cnf",
        "-extensions",
        "root",
        "-out",
        "root-cert.pem",
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ca-key.pem",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=operator/CN=cluster intermediate",
        "-config",
        "ext.cnf",
        "-out",
        "ca.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "10",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "inter",
        "-out",
        "ca-cert.pem",
    ]);
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap()
    );
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
}

#[tokio::test]
async fn plugin_intermediate_issues_chains_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    make_plugin(&plugin);
    let mut ca = CaProcess::start(
        dir.path(),
        None,
        &[
            "--plugin-dir",
            plugin.to_str().unwrap(),
            "--auth",
            "certs",
            "--static-entries",
            OfflineCa::init(dir.path(), &[WEB_ID])
                .entries
                .to_str()
                .unwrap(),
        ],
    );
    ca.wait_ready().await;
    let bundle = TrustBundle::from_pem(
        td(),
        &std::fs::read_to_string(plugin.join("root-cert.pem")).unwrap(),
    )
    .unwrap();
    // Bootstrap an agent identity: with a plug-in CA the operator signs it with the intermediate.
    let agent = operator_issued_agent(&plugin);
    let mut client = ca.client(&bundle, Some(&agent)).await;
    let (_, csr) = key_and_csr();
    let r = client
        .sign(sign_request(csr, 0, WEB_ID, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.intermediates.len(),
        1,
        "the intermediate travels with the leaf"
    );
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl_verify(
            dir.path(),
            &r.leaf,
            &r.intermediates,
            &r.trust_bundle,
            purpose,
        );
        assert!(ok, "{purpose}: {out}");
    }
    let metrics = ca.metrics().await;
    assert!(
        metric(&metrics, "sigil_ca_intermediate_expiry_timestamp_seconds") > 0.0,
        "{metrics}"
    );
}

/// An agent certificate signed by the operator's intermediate (how a host without
/// Kubernetes is enrolled when the CA runs on a plug-in intermediate).
fn operator_issued_agent(plugin: &Path) -> CertifiedKey {
    operator_issued(plugin, AGENT_ID)
}

/// A leaf for `id` signed by the operator's intermediate, whatever sigil would make of it.
fn operator_issued(plugin: &Path, id: &str) -> CertifiedKey {
    let key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(plugin.join("ca-cert.pem")).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(plugin.join("ca-key.pem")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let params = profile::leaf_params(
        &id.parse().unwrap(),
        profile::KeyKind::EcdsaP256,
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    let cert = params.signed_by(&key, &issuer).unwrap();
    CertifiedKey {
        chain: vec![
            cert.der().clone(),
            pem::parse(std::fs::read(plugin.join("ca-cert.pem")).unwrap())
                .unwrap()
                .into_contents()
                .into(),
        ],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// The rotation test's client: keeps calling Sign, verifies every leaf against the last bundle
/// WatchTrustBundle delivered, reconnects regularly with its newest certificate and bundle (as an
/// agent does), and counts failures.
#[tokio::test]
async fn root_rotation_under_load_has_zero_failed_signs() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let state = offline.state.clone();
    let serve_args = offline.serve_args();
    let mut ca = CaProcess::start(
        dir.path(),
        None,
        &[
            serve_args.iter().map(String::as_str).collect::<Vec<_>>(),
            vec![
                "--reload-interval",
                "100ms",
                "--default-ttl",
                "4s",
                "--max-ttl",
                "4s",
            ],
        ]
        .concat(),
    );
    ca.wait_ready().await;
    let initial = state_dir_bundle(&state);
    let old_root = initial.roots[0].clone();
    let mut identity = offline.issue(AGENT_ID, &dir.path().join("agent"));

    // Follow the bundle over WatchTrustBundle.
    let (bundle_tx, bundle_rx) = watch::channel(initial.clone());
    let mut watch_client = ca.client(&initial, Some(&identity)).await;
    let mut stream = watch_client
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(b)) = stream.message().await {
            seen.push(b.roots.len());
            bundle_tx.send_replace(bundle_from_der(&b.roots));
        }
        seen
    });

    let rotate_at = Instant::now() + Duration::from_secs(1);
    let state_arg = state.to_str().unwrap().to_string();
    let rotation = tokio::spawn(async move {
        tokio::time::sleep_until(rotate_at.into()).await;
        sigil(&[
            "ca",
            "rotate-root",
            "--state-dir",
            &state_arg,
            "--propagation",
            "2s",
            "--max-ttl",
            "4s",
            "--retire-margin",
            "1s",
        ])
    });

    // Sign continuously until the old root has left the bundle (about 1 + 2 + 4 + 1 s), plus a bit.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut signs, mut failures, mut by_new_root, mut reconnects) =
        (0u32, Vec::<String>::new(), 0u32, 0u32);
    let mut client = ca.client(&initial, Some(&identity)).await;
    let mut retired_at: Option<Instant> = None;
    let mut stale_agent_reconnected: Option<Result<(), String>> = None;
    while Instant::now() < deadline {
        if signs % 20 == 19 {
            // Reconnect with the newest certificate and bundle.
            let bundle = bundle_rx.borrow().clone();
            match sigil_agent::ca_channel::connect(
                &ca.grpc.to_string(),
                "localhost",
                &bundle,
                Some(&identity),
            )
            .await
            {
                Ok(channel) => {
                    client = sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(channel);
                    reconnects += 1;
                }
                Err(e) => failures.push(format!("reconnect: {e}")),
            }
        }
        let (key, csr) = key_and_csr();
        signs += 1;
        match client.sign(sign_request(csr, 0, "", None)).await {
            Ok(response) => {
                let r = response.into_inner();
                let bundle = bundle_rx.borrow().clone();
                if let Err(e) = verify(&r.leaf, &r.intermediates, &bundle) {
                    failures.push(format!(
                        "sign {signs}: leaf does not verify against the watched bundle: {e}"
                    ));
                }
                if bundle.roots.len() == 1 && bundle.roots[0] != old_root {
                    retired_at.get_or_insert_with(Instant::now);
                }
                if verify(
                    &r.leaf,
                    &[],
                    &TrustBundle::new(td(), vec![old_root.clone()], 0),
                )
                .is_err()
                {
                    by_new_root += 1;
                    if stale_agent_reconnected.is_none() {
                        // Just after the switch: an agent that missed the new bundle (offline
                        // during propagation) still holds only the old root. The CA keeps serving
                        // TLS with the old root until halfway through the overlap, so that agent
                        // can still connect and fetch the new bundle.
                        let stale = sigil_agent::ca_channel::connect(
                            &ca.grpc.to_string(),
                            "localhost",
                            &initial,
                            Some(&identity),
                        )
                        .await;
                        stale_agent_reconnected =
                            Some(stale.map(|_| ()).map_err(|e| e.to_string()));
                    }
                }
                identity = certified(&key, &r);
            }
            Err(status) => failures.push(format!("sign {signs}: {status:?}")),
        }
        if retired_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("{}", rotation.await.unwrap());
    drop(client);
    drop(watch_client);
    drop(ca);
    let seen = watcher.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {signs} signs failed: {failures:#?}",
        failures.len()
    );
    assert!(
        retired_at.is_some(),
        "the old root never left the bundle (bundle sizes seen: {seen:?})"
    );
    assert!(
        seen.contains(&2),
        "the bundle carried both roots during the overlap: {seen:?}"
    );
    assert!(by_new_root > 0, "the new root never signed");
    assert_eq!(
        stale_agent_reconnected,
        Some(Ok(())),
        "an agent with only the old bundle must reach the CA after the switch"
    );
    println!(
        "rotation: {signs} signs, {by_new_root} by the new root, {reconnects} reconnects, bundle sizes seen {seen:?}"
    );
    assert!(
        signs > 100 && reconnects > 5,
        "signs {signs}, reconnects {reconnects}"
    );
}

fn verify(leaf: &[u8], intermediates: &[Vec<u8>], bundle: &TrustBundle) -> Result<(), String> {
    let chain: Vec<CertificateDer<'_>> = std::iter::once(leaf)
        .chain(intermediates.iter().map(Vec::as_slice))
        .map(CertificateDer::from)
        .collect();
    bundle
        .verify_chain(&chain, UnixTime::now())
        .map_err(|e| e.to_string())
}

/// Attack: 9,999 TLS connections that never send the HTTP/2 preface used to hold every connection
/// slot for as long as they liked. Now one source (here 127.0.0.2) gets at most
/// `--max-connections-per-source` (64) connections not yet authenticated, the rest are closed
/// at once, every connection that has not authenticated a request 10 s after its handshake is
/// closed, and an agent on another address renews meanwhile.
#[tokio::test]
async fn connections_that_never_authenticate_are_capped_per_source_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let mut ca = CaProcess::start(dir.path(), None, &offline.serve_args());
    ca.wait_ready().await;
    let roots = std::fs::read(offline.state.join("root-cert.pem")).unwrap();
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();

    let mut opened = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        let tcp = tcp_from(attacker, ca.grpc).await.unwrap();
        match tls_without_client_cert(tcp, "localhost", &roots, &[b"h2"]).await {
            Ok(tls) => opened.push(tls),
            Err(_) => refused += 1,
        }
    }
    // A refused connection is closed at once (its handshake fails, or at best just finishes).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for mut tls in opened {
        if closed_within(&mut tls, Duration::from_millis(5)).await.0 {
            refused += 1;
        } else {
            held.push(tls);
        }
    }
    assert_eq!(
        (held.len(), refused),
        (64, 16),
        "one source holds at most 64 unauthenticated connections"
    );

    // An agent elsewhere still gets a connection and a certificate.
    let bundle = state_dir_bundle(&offline.state);
    let agent = offline.issue(AGENT_ID, &dir.path().join("agent"));
    let mut client = ca.client(&bundle, Some(&agent)).await;
    let (_, csr) = key_and_csr();
    client.sign(sign_request(csr, 600, "", None)).await.unwrap();

    // The held connections never authenticated anything: all closed 10 s after their handshake.
    let started = Instant::now();
    for tls in &mut held {
        let (closed, _) = closed_within(tls, Duration::from_secs(20)).await;
        assert!(closed, "an unauthenticated connection is still open");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed too early"
    );
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_connections_refused_total{port=\"grpc\",reason=\"per_source_limit\"}"
        ),
        16.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_connections_refused_total{port=\"grpc\",reason=\"not_authenticated_in_time\"}"
        ),
        64.0
    );
    // Slots are given back: the attacker's address may connect again.
    let tcp = tcp_from(attacker, ca.grpc).await.unwrap();
    let mut tls = tls_without_client_cert(tcp, "localhost", &roots, &[b"h2"])
        .await
        .unwrap();
    assert!(!closed_within(&mut tls, Duration::from_millis(200)).await.0);
}

/// Attack: 20 connections × 100 streams, each holding an unfinished 64 KiB message, took the CA
/// from 20 to 195 MB before any authentication. Now a call without a credential is answered
/// UNAUTHENTICATED from its headers, before its message is read.
#[tokio::test]
async fn calls_without_credentials_are_refused_before_their_message_is_read() {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let mut ca = CaProcess::start(dir.path(), None, &offline.serve_args());
    ca.wait_ready().await;
    let roots = std::fs::read(offline.state.join("root-cert.pem")).unwrap();
    let tcp = tcp_from("127.0.0.1".parse().unwrap(), ca.grpc)
        .await
        .unwrap();
    let tls = tls_without_client_cert(tcp, "localhost", &roots, &[b"h2"])
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);

    let mut unfinished = Vec::new();
    for (path, bearer) in [
        ("/sigil.ca.v1.CertificateAuthority/Sign", None),
        (
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            None,
        ),
        (
            "/sigil.ca.v1.CertificateAuthority/Sign",
            Some("Bearer eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjk5OTk5OTk5OTl9.c2ln"),
        ),
    ] {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
        // A gRPC message announced as 64 KiB, of which 16 KiB arrive; the rest never does.
        let mut start = vec![0u8, 0, 1, 0, 0];
        start.extend_from_slice(&[0u8; 16 * 1024]);
        tx.unbounded_send(Ok(Frame::data(Bytes::from(start))))
            .unwrap();
        let mut request = hyper::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(bearer) = bearer {
            request = request.header("authorization", bearer);
        }
        let request = request.body(StreamBody::new(rx)).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer while the message is unfinished"))
            .unwrap();
        assert_eq!(
            response
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap()),
            Some("16"),
            "{path}: UNAUTHENTICATED, {response:?}"
        );
        unfinished.push(tx);
    }
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sigil_ca_sign_denied_total{api=\"sigil\",reason=\"unauthenticated\"}"
        ),
        2.0
    );
}

/// A port free right now on both loopbacks.
fn dual_stack_port() -> u16 {
    std::net::TcpListener::bind("[::]:0")
        .expect("this test needs IPv6 (::1)")
        .local_addr()
        .unwrap()
        .port()
}

/// What the dual-stack overlay (deploy/overlays/dual-stack) sets: `--listen [::]:P`,
/// `--admin-addr [::]:P` are one socket for both families (Linux's default,
/// net.ipv6.bindv6only=0), so the CA signs and reports ready over 127.0.0.1 and ::1 alike, and an
/// agent dialling the CA over IPv6 and serving its admin on `[::]` answers on both too.
#[tokio::test]
async fn the_ca_and_an_agent_on_the_ipv6_wildcard_answer_over_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let offline = OfflineCa::init(dir.path(), &[WEB_ID]);
    let (grpc, admin) = (dual_stack_port(), dual_stack_port());
    let wildcard = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let mut ca = CaProcess::start_on(
        dir.path(),
        None,
        &offline.serve_args(),
        wildcard(grpc),
        wildcard(admin),
    );
    ca.wait_ready().await;
    let bundle = state_dir_bundle(&offline.state);
    let agent_cert = dir.path().join("agent-cert");
    let agent = offline.issue(AGENT_ID, &agent_cert);
    let loopbacks = [
        std::net::IpAddr::from(Ipv4Addr::LOCALHOST),
        Ipv6Addr::LOCALHOST.into(),
    ];
    for ip in loopbacks {
        let (status, body) = http_get(SocketAddr::new(ip, admin), "/ready")
            .await
            .unwrap();
        assert_eq!(status, 200, "CA /ready over {ip}: {body}");
        let channel = sigil_agent::ca_channel::connect(
            &SocketAddr::new(ip, grpc).to_string(),
            "localhost",
            &bundle,
            Some(&agent),
        )
        .await
        .unwrap_or_else(|e| panic!("connecting to the CA over {ip}: {e}"));
        let mut client = sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient::new(channel);
        let (_, csr) = key_and_csr();
        let signed = client
            .sign(sign_request(csr, 0, WEB_ID, None))
            .await
            .unwrap_or_else(|e| panic!("signing over {ip}: {e}"))
            .into_inner();
        assert_eq!(
            profile::leaf_spiffe_id(&signed.leaf).unwrap().to_string(),
            WEB_ID
        );
    }

    // An agent that reaches the CA at [::1] and serves its admin on [::].
    let map = dir.path().join("workloads.yaml");
    std::fs::write(&map, format!("workloads:\n- {{uid: 0, id: {WEB_ID}}}\n")).unwrap();
    let agent_admin = dual_stack_port();
    let args = unix_agent_args(
        SocketAddr::from((Ipv6Addr::LOCALHOST, grpc)),
        &offline,
        &agent_cert,
        &map,
        &dir.path().join("agent.sock"),
        wildcard(agent_admin),
        "1h",
    );
    let agent = spawn_agent(
        &args,
        dir.path().join("agent.log"),
        SocketAddr::from((Ipv6Addr::LOCALHOST, agent_admin)),
    )
    .await;
    let (status, body) = http_get(
        SocketAddr::from((Ipv4Addr::LOCALHOST, agent_admin)),
        "/ready",
    )
    .await
    .unwrap();
    assert_eq!(
        status,
        200,
        "agent /ready over IPv4: {body}\n{}",
        agent.logs()
    );
}
