//! The key exchange a sigil TLS endpoint negotiates, against real clients: the CA's gRPC API
//! (`sigil ca serve`) agrees on X25519MLKEM768 with a hybrid client (OpenSSL where the machine's
//! OpenSSL has ML-KEM, rustls always), still serves an OpenSSL 3 client restricted to X25519, and
//! with `--tls-key-exchange classical` refuses a client offering only X25519MLKEM768 while serving
//! X25519. Envoy and the sigil proxy agreeing on X25519MLKEM768 in both directions, shown by the
//! proxy's handshake metric and access log, is in proxy_envoy.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use sigil_identity::tls::{crypto_provider, key_exchange_group};
use sigil_test_harness::*;

/// `openssl s_client` to `addr` trusting `roots` (a PEM file), offering only `groups`; its
/// output, and whether the handshake completed with a verified server.
fn s_client(addr: std::net::SocketAddr, roots: &Path, groups: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-brief", "-tls1_3", "-servername", "localhost"])
        .args(["-connect", &addr.to_string(), "-groups", groups])
        .arg("-CAfile")
        .arg(roots)
        .stdin(Stdio::null())
        .output()
        .expect("running openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let connected = text.contains("Verification: OK") && text.contains("Protocol version: TLSv1.3");
    (connected, text)
}

/// Whether this machine's OpenSSL offers X25519MLKEM768 (OpenSSL 3.5 and later).
fn openssl_has_ml_kem() -> Result<(), String> {
    let version = openssl_stdout(&["version"]);
    let kems = openssl_stdout(&["list", "-kem-algorithms"]);
    if kems.contains("X25519MLKEM768") {
        Ok(())
    } else {
        Err(format!(
            "{} lists no X25519MLKEM768 in `openssl list -kem-algorithms` (ML-KEM arrived in \
             OpenSSL 3.5)",
            version.trim()
        ))
    }
}

fn openssl_stdout(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rustls client trusting `roots_pem`, offering only `groups`: the group agreed with the CA, or
/// the handshake error.
async fn rustls_to(
    addr: std::net::SocketAddr,
    roots_pem: &str,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> std::io::Result<&'static str> {
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: groups,
        ..crypto_provider().as_ref().clone()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(root_store(roots_pem.as_bytes()))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(key_exchange_group(tls.get_ref().1))
}

/// An offline CA serving with `args` added; the PEM roots, also written to a file.
async fn ca(dir: &Path, args: &[&str]) -> (CaProcess, String, std::path::PathBuf) {
    let offline = OfflineCa::init(dir, &[]);
    let mut serve = offline.serve_args();
    serve.extend(args.iter().map(|a| a.to_string()));
    let mut ca = CaProcess::start(dir, None, &serve);
    ca.wait_ready().await;
    let roots = state_dir_bundle(&offline.state).to_pem();
    let roots_file = dir.join("roots.pem");
    std::fs::write(&roots_file, &roots).unwrap();
    (ca, roots, roots_file)
}

#[tokio::test]
async fn the_ca_agrees_on_x25519mlkem768_and_still_serves_an_x25519_only_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, roots, roots_file) = ca(dir.path(), &[]).await;

    // sigil's own client configuration (the agent's) offers the hybrid group first.
    let agreed = rustls_to(ca.grpc, &roots, crypto_provider().kx_groups.clone()).await;
    assert_eq!(agreed.unwrap(), "X25519MLKEM768", "{}", ca.logs());

    let (connected, out) = s_client(ca.grpc, &roots_file, "X25519");
    assert!(
        connected,
        "OpenSSL restricted to X25519:\n{out}\n{}",
        ca.logs()
    );
    assert!(out.contains("Server Temp Key: X25519"), "{out}");

    match openssl_has_ml_kem() {
        Ok(()) => {
            let (connected, out) = s_client(ca.grpc, &roots_file, "X25519MLKEM768");
            assert!(connected, "OpenSSL offering X25519MLKEM768:\n{out}");
            assert!(out.contains("X25519MLKEM768"), "{out}");
        }
        Err(why) => {
            println!("skipped: openssl s_client -groups X25519MLKEM768 against the CA: {why}")
        }
    }
}

#[tokio::test]
async fn a_classical_ca_refuses_a_hybrid_only_client_and_serves_x25519() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, roots, roots_file) = ca(dir.path(), &["--tls-key-exchange", "classical"]).await;

    let hybrid_only = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
    let refused = rustls_to(ca.grpc, &roots, hybrid_only).await;
    let err = refused.expect_err("a classical CA and a client offering only X25519MLKEM768");
    assert!(err.to_string().contains("HandshakeFailure"), "{err}");

    // sigil's hybrid configuration falls back to X25519, and so does OpenSSL offering it.
    let agreed = rustls_to(ca.grpc, &roots, crypto_provider().kx_groups.clone()).await;
    assert_eq!(agreed.unwrap(), "X25519");
    let (connected, out) = s_client(ca.grpc, &roots_file, "X25519");
    assert!(
        connected,
        "OpenSSL restricted to X25519:\n{out}\n{}",
        ca.logs()
    );
}
