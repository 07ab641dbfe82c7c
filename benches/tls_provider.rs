//! Crypto provider benchmark (a program that prints numbers, not a test): what sigil's choice of
//! rustls provider and key exchange group costs, every variant in one run.
//!
//! Variants: ring as before issue 17 (X25519 first); ring with aws-lc-rs's X25519MLKEM768 plugged
//! in for the key exchange only (sigil's provider), the same with AES-128-GCM preferred, and the
//! same with SHA-384 and HKDF from aws-lc-rs; aws-lc-rs for everything, with X25519MLKEM768 first
//! and with the classical groups only. For each, in one thread and in memory (no sockets, so only
//! the crypto and rustls differ): full mutual-TLS 1.3 handshakes per second with sigil's settings
//! (ECDSA P-256 leaves and CA, both chains verified, no resumption), the bytes each side sends
//! in the handshake, and bulk throughput over one connection with the cipher suite the variant
//! agrees (each provider's default order prefers AES-256-GCM). Then the CA's work per
//! certificate with each library: ECDSA P-256 signatures and verifications per second.
//!
//! Rounds alternate the variants (A B C D A B C D ...) so that load from other processes on a
//! shared machine falls on all of them alike; the median round is printed.
//!
//! Run: `cargo bench --bench tls_provider` (BENCH_SECONDS=2 per variant per round,
//! BENCH_ROUNDS=5).

use std::hint::black_box;
use std::io::{Read, Write};
use std::ops::DerefMut;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::crypto::{
    CryptoProvider, SupportedKxGroup, aws_lc_rs as aws_provider, ring as ring_provider,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, RootCertStore, ServerConfig, ServerConnection,
};
use sigil_test_harness::load::{self, env_or};

const SERVER_NAME: &str = "server.bench.test";
/// Plaintext per write in the bulk phase: one full TLS record.
const RECORD: usize = 16 * 1024;

/// A P-256 CA and two P-256 leaves it signed, as sigil issues them.
struct Pki {
    root: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let root = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = |san: SanType| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(Vec::new()).expect("leaf params");
            params.subject_alt_names = vec![san];
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            (
                vec![cert.der().clone()],
                PrivatePkcs8KeyDer::from(key.serialize_der()),
            )
        };
        Pki {
            root: root.der().clone(),
            server: leaf(SanType::DnsName(SERVER_NAME.try_into().expect("DNS name"))),
            client: leaf(SanType::URI(
                "spiffe://cluster.local/ns/bench/sa/client"
                    .try_into()
                    .expect("URI"),
            )),
        }
    }

    fn configs(&self, provider: &Arc<CryptoProvider>) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let mut roots = RootCertStore::empty();
        roots.add(self.root.clone()).expect("root");
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .expect("client verifier");
        let key = |k: &PrivatePkcs8KeyDer<'static>| PrivateKeyDer::from(k.clone_key());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.0.clone(), key(&self.server.1))
            .expect("server config");
        // As sigil's configs: no resumption, every handshake is a full one.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(self.client.0.clone(), key(&self.client.1))
            .expect("client config");
        client.resumption = rustls::client::Resumption::disabled();
        (Arc::new(client), Arc::new(server))
    }
}

struct Variant {
    name: &'static str,
    provider: Arc<CryptoProvider>,
}

/// The configurations sigil's proxies build (`sigil_identity::tls`), with SVIDs from sigil's
/// profile: the client expects the server's SPIFFE ID, the server requires a client SVID.
fn sigil_configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    use sigil_identity::profile::{KeyKind, ca_params, leaf_params};
    use sigil_identity::tls::{CertifiedKey, ClientAuth, ExpectedServer};
    use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};

    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = ca_params(&td, "bench root", not_before, not_after, None);
    let root = ca
        .self_signed(&ca_key)
        .expect("CA certificate")
        .der()
        .clone();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let svid = |id: &SpiffeId| {
        let key = KeyPair::generate().expect("leaf key");
        let cert = leaf_params(id, KeyKind::EcdsaP256, not_before, not_after)
            .signed_by(&key, &issuer)
            .expect("leaf certificate");
        CertifiedKey {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    };
    let server_id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/server").expect("ID");
    let client_id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/client").expect("ID");
    let bundle = TrustBundle::new(td, vec![root], 1);
    let server =
        sigil_identity::tls::server_config(&svid(&server_id), &bundle, ClientAuth::Required, &[])
            .expect("sigil server config");
    let client = sigil_identity::tls::client_config(
        Some(&svid(&client_id)),
        &bundle,
        ExpectedServer::Spiffe(server_id),
        &[],
    )
    .expect("sigil client config");
    (Arc::new(client), Arc::new(server))
}

fn variants() -> Vec<Variant> {
    let with_groups = |mut provider: CryptoProvider, groups: &[&'static dyn SupportedKxGroup]| {
        provider.kx_groups = groups.to_vec();
        Arc::new(provider)
    };
    let ring_kx = [
        ring_provider::kx_group::X25519,
        ring_provider::kx_group::SECP256R1,
        ring_provider::kx_group::SECP384R1,
    ];
    let aws_kx = [
        aws_provider::kx_group::X25519,
        aws_provider::kx_group::SECP256R1,
        aws_provider::kx_group::SECP384R1,
    ];
    // ring with aws-lc-rs's hybrid group first: sigil's provider.
    let ring_hybrid = || CryptoProvider {
        kx_groups: [&[aws_provider::kx_group::X25519MLKEM768][..], &ring_kx].concat(),
        ..ring_provider::default_provider()
    };
    vec![
        Variant {
            name: "ring, X25519 (before)",
            provider: with_groups(ring_provider::default_provider(), &ring_kx),
        },
        Variant {
            name: "ring + aws-lc-rs ML-KEM",
            provider: Arc::new(ring_hybrid()),
        },
        Variant {
            name: "ring + ML-KEM, AES-128 1st",
            provider: Arc::new(CryptoProvider {
                cipher_suites: vec![
                    ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    ring_provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                ..ring_hybrid()
            }),
        },
        Variant {
            name: "ring + ML-KEM, aws SHA-384",
            provider: Arc::new(CryptoProvider {
                cipher_suites: vec![aes256_with_aws_lc_sha384()],
                ..ring_hybrid()
            }),
        },
        Variant {
            name: "aws-lc-rs, X25519MLKEM768",
            provider: with_groups(
                aws_provider::default_provider(),
                &[&[aws_provider::kx_group::X25519MLKEM768][..], &aws_kx].concat(),
            ),
        },
        Variant {
            name: "aws-lc-rs, X25519",
            provider: with_groups(aws_provider::default_provider(), &aws_kx),
        },
    ]
}

/// TLS_AES_256_GCM_SHA384 with ring's AES-GCM and aws-lc-rs's SHA-384 and HKDF: whether the
/// transcript hash, not the cipher, is what the AES-256 suite costs in a handshake.
fn aes256_with_aws_lc_sha384() -> rustls::SupportedCipherSuite {
    let (rustls::SupportedCipherSuite::Tls13(ring), rustls::SupportedCipherSuite::Tls13(aws)) = (
        ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ) else {
        unreachable!("both are TLS 1.3 suites")
    };
    let mixed: &'static rustls::Tls13CipherSuite = Box::leak(Box::new(rustls::Tls13CipherSuite {
        common: rustls::crypto::CipherSuiteCommon {
            hash_provider: aws.common.hash_provider,
            ..ring.common
        },
        hkdf_provider: aws.hkdf_provider,
        ..*ring
    }));
    rustls::SupportedCipherSuite::Tls13(mixed)
}

/// Moves every pending TLS byte from `from` to `to` and lets `to` process them; returns how many.
fn transfer<A, B, DA, DB>(from: &mut A, to: &mut B) -> usize
where
    A: DerefMut<Target = ConnectionCommon<DA>>,
    B: DerefMut<Target = ConnectionCommon<DB>>,
{
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("handshake");
    }
    buf.len()
}

/// One full handshake: both ends, and the bytes the client and the server sent.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (ClientConnection, ServerConnection, usize, usize) {
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    let (mut client_bytes, mut server_bytes) = (0, 0);
    while c.is_handshaking() || s.is_handshaking() {
        client_bytes += transfer(&mut c, &mut s);
        server_bytes += transfer(&mut s, &mut c);
    }
    (c, s, client_bytes, server_bytes)
}

fn handshakes_per_second(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    for_: Duration,
) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < for_ {
        black_box(handshake(client, server));
        done += 1;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Megabytes (10^6) per second from client to server over one established connection: the
/// client encrypts, the server decrypts.
fn bulk_mb_per_second(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    for_: Duration,
) -> f64 {
    let (mut c, mut s, _, _) = handshake(client, server);
    let chunk = vec![0x5a; RECORD];
    let mut sink = vec![0; RECORD];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < for_ {
        for _ in 0..64 {
            c.writer().write_all(&chunk).expect("write");
            transfer(&mut c, &mut s);
            let mut left = RECORD;
            while left > 0 {
                left -= s.reader().read(&mut sink[..left]).expect("read");
            }
            bytes += RECORD as u64;
        }
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// The median of one variant's rounds (at least one).
fn median(values: Vec<f64>) -> f64 {
    load::median(values).expect("at least one round")
}

/// ECDSA P-256 signatures and verifications per second with ring and with aws-lc-rs (the CA's
/// work per certificate: verify the CSR, sign the leaf), alternating as the handshakes do.
fn ecdsa_rates(rounds: u64, for_: Duration) -> [(&'static str, f64, f64); 2] {
    let message = [0x42u8; 200];
    let ring_rng = ring::rand::SystemRandom::new();
    let ring_pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &ring_rng,
    )
    .expect("ring key");
    let ring_key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        ring_pkcs8.as_ref(),
        &ring_rng,
    )
    .expect("ring key");
    let aws_rng = aws_lc_rs::rand::SystemRandom::new();
    let aws_key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        ring_pkcs8.as_ref(),
    )
    .expect("aws-lc-rs key");
    let ring_sig = ring_key.sign(&ring_rng, &message).expect("sign");
    use ring::signature::KeyPair as _;
    let public = ring_key.public_key().as_ref().to_vec();

    let rate = |op: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < for_ {
            for _ in 0..100 {
                op();
            }
            n += 100;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let mut samples = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for _ in 0..rounds {
        samples[0][0].push(rate(&mut || {
            black_box(ring_key.sign(&ring_rng, &message).expect("sign"));
        }));
        samples[0][1].push(rate(&mut || {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                &public,
            )
            .verify(&message, ring_sig.as_ref())
            .expect("verify");
        }));
        samples[1][0].push(rate(&mut || {
            black_box(aws_key.sign(&aws_rng, &message).expect("sign"));
        }));
        samples[1][1].push(rate(&mut || {
            aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
                &public,
            )
            .verify(&message, ring_sig.as_ref())
            .expect("verify");
        }));
    }
    let [ring_samples, aws_samples] = samples;
    let [ring_sign, ring_verify] = ring_samples;
    let [aws_sign, aws_verify] = aws_samples;
    [
        ("ring", median(ring_sign), median(ring_verify)),
        ("aws-lc-rs", median(aws_sign), median(aws_verify)),
    ]
}

fn main() {
    let for_ = Duration::from_secs(env_or("BENCH_SECONDS", 2u64));
    let rounds = env_or("BENCH_ROUNDS", 5u64).max(1);
    let pki = Pki::new();
    let mut variants: Vec<(&str, _)> = variants()
        .iter()
        .map(|v| (v.name, pki.configs(&v.provider)))
        .collect();
    variants.push(("sigil's configs", sigil_configs()));

    println!(
        "# {rounds} rounds x {}s per variant, variants alternating; median round; one thread",
        for_.as_secs()
    );
    let mut rates = vec![Vec::new(); variants.len()];
    let mut bulk = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (_, (client, server))) in variants.iter().enumerate() {
            rates[i].push(handshakes_per_second(client, server, for_));
            bulk[i].push(bulk_mb_per_second(client, server, for_ / 2));
        }
    }
    println!(
        "{:<27} {:>15} {:>24} {:>13} {:>13} {:>14} {:>10}",
        "provider, first group",
        "group agreed",
        "suite agreed",
        "handshakes/s",
        "client bytes",
        "server bytes",
        "bulk MB/s"
    );
    for (i, (name, (client, server))) in variants.iter().enumerate() {
        let (c, _, client_bytes, server_bytes) = handshake(client, server);
        let group = c
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default();
        let suite = c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        println!(
            "{:<27} {:>15} {:>24} {:>13.0} {:>13} {:>14} {:>10.0}",
            name,
            group,
            suite,
            median(rates[i].clone()),
            client_bytes,
            server_bytes,
            median(bulk[i].clone())
        );
    }
    println!(
        "\n# the CA's work per certificate (one verify of the CSR, one sign), ECDSA P-256, one core"
    );
    for (library, sign, verify) in ecdsa_rates(rounds, for_ / 2) {
        println!(
            "{library:<10} sign {sign:>8.0}/s  verify {verify:>8.0}/s  => {:>6.0} certificates/s per core",
            1.0 / (1.0 / sign + 1.0 / verify)
        );
    }
}
