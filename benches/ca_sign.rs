//! CA signing benchmark (a program that prints numbers, not a test).
//!
//! Runs the real `sigil ca serve` binary against the Kubernetes API test double and measures
//! end-to-end Sign calls per second over gRPC+TLS with p50/p99 latency: TokenReview with the
//! token cache warm (one token) and cold (a new token per call), and local JWKS validation.
//! Then measures the physical limit, one ECDSA P-256 verify (the CSR) plus one sign (the leaf)
//! with ring, and prints how close the CA gets to it.
//!
//! Run: `cargo bench --bench ca_sign` (BENCH_SECONDS=5 and BENCH_CONCURRENCY=32 by default).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use sigil_proto::sigil::ca::v1::SignRequest;
use sigil_proto::sigil::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use sigil_test_apiserver::{PodSpec, TestApiServer, TokenAlg, TokenSpec};
use tokio::sync::Mutex;

use sigil_test_harness::load::env_or;
use sigil_test_harness::{cpu_seconds, free_addr, sigil_exe};

struct Ca(Child);

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy)]
enum TokenMode {
    /// The same token on every call: TokenReview answered from the CA's cache.
    Warm,
    /// A new token on every call: one TokenReview per call.
    Cold,
}

struct Outcome {
    calls: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort();
        let i = ((self.latencies.len() as f64 * p) as usize)
            .min(self.latencies.len().saturating_sub(1));
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

async fn start_ca(
    server: &TestApiServer,
    dir: &std::path::Path,
    auth: &str,
) -> (Ca, String, sigil_identity::TrustBundle) {
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let grpc = free_addr().to_string();
    let admin = free_addr().to_string();
    let child = Command::new(sigil_exe())
        .args([
            "ca",
            "serve",
            "--listen",
            &grpc,
            "--admin-addr",
            &admin,
            "--server-name",
            "localhost",
        ])
        .args(["--auth", auth, "--no-root-configmaps", "--no-webhook"])
        // The CA's own rate is measured: every call here is one caller's (one pod's token),
        // whom the default per-caller budget would hold to 500 signs per second.
        .args(["--max-signs-per-caller", "0"])
        .env("KUBECONFIG", &kubeconfig)
        // Audit records on, as in production: their cost is part of the number.
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sigil ca serve");
    let ca = Ca(child);
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(server.client(), "sigil-system");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(secret)) = secrets.get_opt("sigil-ca").await {
            let pem = secret.data.unwrap()["root-cert.pem"].0.clone();
            let bundle = sigil_identity::TrustBundle::from_pem(
                sigil_identity::TrustDomain::new("cluster.local").unwrap(),
                std::str::from_utf8(&pem).unwrap(),
            )
            .unwrap();
            if sigil_agent::ca_channel::connect(&grpc, "localhost", &bundle, None)
                .await
                .is_ok()
            {
                return (ca, grpc, bundle);
            }
        }
        assert!(Instant::now() < deadline, "CA did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_load(
    grpc: &str,
    bundle: &sigil_identity::TrustBundle,
    server: &TestApiServer,
    token_spec: &TokenSpec,
    mode: TokenMode,
    seconds: u64,
    concurrency: usize,
) -> Outcome {
    // CSRs are made up front: client-side key generation is not what is measured.
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..64)
            .map(|_| sigil_identity::csr::build_csr(&rcgen::KeyPair::generate().unwrap()).unwrap())
            .collect(),
    );
    let warm_token = server.issue_token(token_spec);
    // Cold mode: tokens minted ahead too (ES256: cheap to mint), so minting is not measured.
    let mut cold_spec = token_spec.clone();
    cold_spec.alg = TokenAlg::Es256;
    let cold_tokens: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(match mode {
        TokenMode::Warm => Vec::new(),
        TokenMode::Cold => (0..(seconds as usize * 15_000))
            .map(|_| server.issue_token(&cold_spec))
            .collect(),
    }));
    let channels: Vec<_> = futures::future::join_all(
        (0..4).map(|_| sigil_agent::ca_channel::connect(grpc, "localhost", bundle, None)),
    )
    .await
    .into_iter()
    .map(|c| c.expect("connect"))
    .collect();
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = CertificateAuthorityClient::new(channels[i % channels.len()].clone());
            let (csrs, cold_tokens, warm_token) =
                (csrs.clone(), cold_tokens.clone(), warm_token.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut n) = (Vec::new(), 0u64, i);
                while Instant::now() < stop_at {
                    let token = match mode {
                        TokenMode::Warm => warm_token.clone(),
                        TokenMode::Cold => match cold_tokens.lock().await.pop() {
                            Some(t) => t,
                            None => break,
                        },
                    };
                    let mut request = tonic::Request::new(SignRequest {
                        csr_der: csrs[n % csrs.len()].clone(),
                        ttl_seconds: 3600,
                        impersonate: String::new(),
                    });
                    request
                        .metadata_mut()
                        .insert("authorization", format!("Bearer {token}").parse().unwrap());
                    n += 1;
                    let t = Instant::now();
                    match client.sign(request).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut outcome = Outcome {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (latencies, errors) = task.await.unwrap();
        outcome.calls += latencies.len() as u64;
        outcome.errors += errors;
        outcome.latencies.extend(latencies);
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Single-core operations per second of `op`, run for about `budget`.
fn per_second(budget: Duration, mut op: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < budget {
        for _ in 0..100 {
            op();
        }
        n += 100;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn ring_limit() -> (f64, f64) {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let message = vec![0x42u8; 400]; // about the size of a TBSCertificate
    let sig = key.sign(&rng, &message).unwrap();
    let public = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );
    let sign_rate = per_second(Duration::from_secs(1), || {
        key.sign(&rng, &message).unwrap();
    });
    let verify_rate = per_second(Duration::from_secs(1), || {
        public.verify(&message, sig.as_ref()).unwrap();
    });
    (sign_rate, verify_rate)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env_or("BENCH_SECONDS", 5u64);
    let concurrency = env_or("BENCH_CONCURRENCY", 32usize);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "CA signing benchmark: {seconds}s per row, {concurrency} concurrent callers over 4 HTTP/2 connections, {cores} cores (load generator and API test double share them with the CA)"
    );

    let server = TestApiServer::start().await;
    let pod = server.add_pod(&PodSpec::new("bench", "client-1", "client", "node-a"));
    let spec = TokenSpec::for_pod(&pod, "sigil-ca");
    let dir = tempfile::tempdir().unwrap();

    println!(
        "\n{:<26} {:>9} {:>8} {:>8} {:>7} {:>9} {:>14} {:>12}",
        "mode",
        "signs/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "CA cores",
        "signs/CA-core",
        "TokenReviews"
    );
    let mut best = 0.0f64;
    for (label, auth, mode) in [
        ("tokenreview, warm cache", "tokenreview", TokenMode::Warm),
        ("tokenreview, cold cache", "tokenreview", TokenMode::Cold),
        ("jwks, new token per call", "jwks", TokenMode::Cold),
    ] {
        let (ca, grpc, bundle) = start_ca(&server, dir.path(), auth).await;
        let reviews_before = server.token_reviews_served();
        let cpu_before = cpu_seconds(ca.0.id());
        let mut outcome =
            run_load(&grpc, &bundle, &server, &spec, mode, seconds, concurrency).await;
        let ca_cores = (cpu_seconds(ca.0.id()) - cpu_before) / outcome.elapsed.as_secs_f64();
        let reviews = server.token_reviews_served() - reviews_before;
        let rate = outcome.rate();
        let per_ca_core = rate / ca_cores.max(0.01);
        best = best.max(per_ca_core);
        println!(
            "{:<26} {:>9.0} {:>8.2} {:>8.2} {:>7} {:>9.2} {:>14.0} {:>12}",
            label,
            rate,
            outcome.percentile(0.50).as_secs_f64() * 1000.0,
            outcome.percentile(0.99).as_secs_f64() * 1000.0,
            outcome.errors,
            ca_cores,
            per_ca_core,
            reviews
        );
        drop(ca);
    }

    let (sign_rate, verify_rate) = ring_limit();
    let per_core = 1.0 / (1.0 / sign_rate + 1.0 / verify_rate);
    println!(
        "\nphysical limit (ring, ECDSA P-256, one core): sign {sign_rate:.0}/s, verify {verify_rate:.0}/s"
    );
    println!(
        "=> one verify + one sign per certificate: {per_core:.0}/s per core, {:.0}/s on {cores} cores",
        per_core * cores as f64
    );
    println!(
        "best signs per CA core-second / per-core limit: {:.2} (counts the CA's own CPU only: the load generator and API double share the machine)",
        best / per_core
    );
}
