use rcgen::{KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData};

use super::*;

#[test]
fn server_names() {
    for good in ["localhost", "sigil-ca.sigil-system.svc", "127.0.0.1", "::1"] {
        assert_eq!(parse_server_name(good).unwrap(), good);
    }
    for bad in ["bad name", "", "a..b", "x_y:1"] {
        assert!(parse_server_name(bad).is_err(), "{bad:?}");
    }
    for good in [
        "sigil-ca.sigil-system.svc:15012",
        "127.0.0.1:1",
        "[::1]:15012",
    ] {
        assert_eq!(parse_host_port(good).unwrap(), good);
    }
    for bad in [
        "sigil-ca",
        "sigil-ca:0",
        "bad name:1",
        ":15012",
        "::1:15012",
    ] {
        assert!(parse_host_port(bad).is_err(), "{bad:?}");
    }
}
use crate::test_support::{
    TestCa, now, openssl, openssl_genpkey, openssl_rsa_key, openssl_text, openssl_verify, spiffe,
};

const ID: &str = "spiffe://example.org/ns/default/sa/web";

fn pubkey_der_of(genpkey_args: &[&str]) -> Vec<u8> {
    let key_pem = openssl_genpkey(genpkey_args);
    openssl(&["pkey", "-pubout", "-outform", "DER"], key_pem.as_bytes())
}

/// Issues a leaf of each key type and checks it with our inspector and with openssl.
#[test]
fn leaves_follow_the_profile() {
    let root = TestCa::root("example.org");
    let keys = [
        (KeyKind::EcdsaP256, KeyPair::generate().unwrap()),
        (
            KeyKind::EcdsaP384,
            KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
        ),
        (KeyKind::Rsa { bits: 2048 }, openssl_rsa_key(2048)),
    ];
    for (kind, key) in keys {
        assert_eq!(key_kind_of_spki(&key.subject_public_key_info()), Ok(kind));
        let not_before = now() - LEAF_BACKDATE;
        let params = leaf_params(&spiffe(ID), kind, not_before, now() + Duration::hours(1));
        let der = root.sign(&params, &key);

        let report = inspect_cert(&der).unwrap();
        assert_eq!(report.problems, Vec::<String>::new(), "{kind}");
        assert!(!report.is_ca);
        assert_eq!(report.spiffe_id, Some(spiffe(ID)));
        assert_eq!(report.key, Some(kind));
        assert_eq!(report.subject, "");
        assert_eq!(report.issuer, root_subject(&root));
        assert!(report.serial_hex.len() >= 30, "{}", report.serial_hex);
        assert_eq!(
            report.not_before.unix_timestamp(),
            not_before.unix_timestamp()
        );
        assert_eq!(leaf_spiffe_id(&der), Ok(spiffe(ID)));

        let text = openssl_text(&der);
        for want in [
            "X509v3 Subject Alternative Name: critical",
            &format!("URI:{ID}"),
            "X509v3 Basic Constraints: critical",
            "CA:FALSE",
            "X509v3 Key Usage: critical",
            "TLS Web Server Authentication, TLS Web Client Authentication",
            "X509v3 Authority Key Identifier",
        ] {
            assert!(text.contains(want), "{kind}: missing {want:?} in\n{text}");
        }
        let usages = if matches!(kind, KeyKind::Rsa { .. }) {
            "Digital Signature, Key Encipherment\n"
        } else {
            "Digital Signature\n"
        };
        assert!(text.contains(usages), "{kind}: key usage in\n{text}");
        assert!(!text.contains("Certificate Sign"), "{text}");

        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = openssl_verify(&root.der, &[], &der, purpose);
            assert!(ok, "{kind} {purpose}: {out}");
        }
    }
}

fn root_subject(root: &TestCa) -> String {
    inspect_cert(&root.der).unwrap().subject
}

#[test]
fn ca_certificates_follow_the_profile() {
    let root = TestCa::root("example.org");
    let report = inspect_cert(&root.der).unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert!(report.is_ca);
    assert_eq!(report.spiffe_id, Some(spiffe("spiffe://example.org")));
    assert_eq!(
        report.subject,
        format!("O=sigil, CN=test root {}", report.serial_hex)
    );
    assert_eq!(report.issuer, report.subject);

    // Two generations of the same CA never share a subject.
    let again = TestCa::root("example.org");
    assert_ne!(root_subject(&again), report.subject);

    let intermediate = root.intermediate(Some(0));
    let int_report = inspect_cert(&intermediate.der).unwrap();
    assert_eq!(int_report.problems, Vec::<String>::new());
    assert!(int_report.is_ca);
    assert_eq!(int_report.issuer, report.subject);

    let text = openssl_text(&intermediate.der);
    for want in [
        "X509v3 Basic Constraints: critical",
        "CA:TRUE, pathlen:0",
        "X509v3 Key Usage: critical",
        "Digital Signature, Certificate Sign, CRL Sign",
        "URI:spiffe://example.org\n",
        "X509v3 Subject Key Identifier",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let (ok, out) = openssl_verify(&root.der, &[], &intermediate.der, "any");
    assert!(ok, "{out}");

    // A leaf under the intermediate verifies through it.
    let (leaf, _) = intermediate.leaf(ID);
    let (ok, out) = openssl_verify(&root.der, &[&intermediate.der], &leaf, "sslclient");
    assert!(ok, "{out}");
    let (ok, _) = openssl_verify(&root.der, &[], &leaf, "sslclient");
    assert!(!ok, "leaf must not verify without its intermediate");

    assert_eq!(leaf_spiffe_id(&intermediate.der), Err(ProfileError::IsCa));
    assert_eq!(leaf_spiffe_id(&root.der), Err(ProfileError::IsCa));
}

#[test]
fn serving_certificates_carry_dns_and_ip_sans() {
    let root = TestCa::root("example.org");
    let key = KeyPair::generate().unwrap();
    let names = [
        "sigil-ca.sigil-system.svc".to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let params = serving_params(
        &spiffe("spiffe://example.org/ns/sigil-system/sa/sigil-ca"),
        &names,
        now() - LEAF_BACKDATE,
        now() + Duration::hours(1),
    )
    .unwrap();
    let der = root.sign(&params, &key);
    assert_eq!(inspect_cert(&der).unwrap().problems, Vec::<String>::new());
    let text = openssl_text(&der);
    for want in [
        "X509v3 Subject Alternative Name: critical",
        "URI:spiffe://example.org/ns/sigil-system/sa/sigil-ca",
        "DNS:sigil-ca.sigil-system.svc",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let (ok, out) = openssl_verify(&root.der, &[], &der, "sslserver");
    assert!(ok, "{out}");

    for bad in ["not a name", "ünicode.example", ""] {
        assert_eq!(
            serving_params(&spiffe(ID), &[bad.to_string()], now(), now()).map(|_| ()),
            Err(ProfileError::InvalidName(bad.to_string())),
        );
    }
}

#[test]
fn key_kinds() {
    let p256 = KeyPair::generate().unwrap();
    assert_eq!(
        key_kind_of_spki(&p256.subject_public_key_info()),
        Ok(KeyKind::EcdsaP256)
    );
    assert_eq!(
        key_kind_of_spki(&pubkey_der_of(&[
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072"
        ])),
        Ok(KeyKind::Rsa { bits: 3072 })
    );
    let ed25519 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    assert_eq!(
        key_kind_of_spki(&ed25519.subject_public_key_info()),
        Err(ProfileError::UnsupportedKey("Ed25519".into()))
    );
    assert_eq!(
        key_kind_of_spki(&pubkey_der_of(&["-algorithm", "ED448"])),
        Err(ProfileError::UnsupportedKey("Ed448".into()))
    );
    assert_eq!(
        key_kind_of_spki(&pubkey_der_of(&[
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024"
        ])),
        Err(ProfileError::UnsupportedKey("RSA 1024".into()))
    );
    assert_eq!(
        key_kind_of_spki(&pubkey_der_of(&[
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-521"
        ])),
        Err(ProfileError::UnsupportedKey("ECDSA P-521".into()))
    );
    assert_eq!(
        key_kind_of_spki(&pubkey_der_of(&[
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:secp256k1"
        ])),
        Err(ProfileError::UnsupportedKey("EC curve 1.3.132.0.10".into()))
    );
    assert!(matches!(
        key_kind_of_spki(b"\x30\x03\x02\x01\x00"),
        Err(ProfileError::Malformed(_))
    ));
    let mut trailing = p256.subject_public_key_info();
    trailing.push(0);
    assert!(matches!(
        key_kind_of_spki(&trailing),
        Err(ProfileError::Malformed(_))
    ));

    assert_eq!(KeyKind::EcdsaP256.to_string(), "ECDSA P-256");
    assert_eq!(KeyKind::EcdsaP384.to_string(), "ECDSA P-384");
    assert_eq!(KeyKind::Rsa { bits: 2048 }.to_string(), "RSA 2048");
}

#[test]
fn leaf_spiffe_id_rejects_non_svids() {
    let root = TestCa::root("example.org");
    let key = KeyPair::generate().unwrap();
    let valid = || {
        leaf_params(
            &spiffe(ID),
            KeyKind::EcdsaP256,
            now(),
            now() + Duration::hours(1),
        )
    };

    let mut two_uris = valid();
    two_uris.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/ns/x/sa/y".try_into().unwrap(),
    ));
    let der = root.sign(&two_uris, &key);
    assert_eq!(leaf_spiffe_id(&der), Err(ProfileError::MultipleUriSans));
    let report = inspect_cert(&der).unwrap();
    assert_eq!(report.spiffe_id, None);
    assert_eq!(
        report.problems,
        vec!["2 URI SANs: an X.509-SVID must have exactly one".to_string()]
    );

    let mut no_uri = valid();
    no_uri.subject_alt_names = vec![SanType::DnsName("web.example.org".try_into().unwrap())];
    let der = root.sign(&no_uri, &key);
    assert_eq!(leaf_spiffe_id(&der), Err(ProfileError::NoUriSan));
    assert_eq!(
        inspect_cert(&der).unwrap().problems,
        vec!["no URI SAN: an X.509-SVID needs exactly one SPIFFE ID".to_string()]
    );

    let mut not_spiffe = valid();
    not_spiffe.subject_alt_names =
        vec![SanType::URI("https://example.org/web".try_into().unwrap())];
    let der = root.sign(&not_spiffe, &key);
    assert!(matches!(
        leaf_spiffe_id(&der),
        Err(ProfileError::NotSpiffe(_))
    ));

    let mut td_only = valid();
    td_only.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    let der = root.sign(&td_only, &key);
    assert!(matches!(
        leaf_spiffe_id(&der),
        Err(ProfileError::NotSpiffe(_))
    ));
    assert_eq!(inspect_cert(&der).unwrap().problems.len(), 1);

    assert!(matches!(
        leaf_spiffe_id(b"junk"),
        Err(ProfileError::Malformed(_))
    ));
    assert!(matches!(
        inspect_cert(b"junk"),
        Err(ProfileError::Malformed(_))
    ));
}

#[test]
fn inspect_reports_every_deviation() {
    let root = TestCa::root("example.org");
    let key = KeyPair::generate().unwrap();

    // rcgen's defaults: a subject, no basicConstraints, keyUsage or EKU, a SHA-derived serial.
    let mut sloppy = CertificateParams::new(vec!["web.example.org".to_string()]).unwrap();
    sloppy
        .subject_alt_names
        .push(SanType::URI(ID.try_into().unwrap()));
    let report = inspect_cert(&root.sign(&sloppy, &key)).unwrap();
    assert_eq!(
        report.problems,
        vec![
            "basicConstraints missing (must be critical, cA=false)".to_string(),
            "keyUsage missing (must be critical digitalSignature)".to_string(),
            "extendedKeyUsage missing (must be serverAuth+clientAuth)".to_string(),
        ]
    );

    let mut wrong_usage = leaf_params(
        &spiffe(ID),
        KeyKind::EcdsaP256,
        now(),
        now() + Duration::hours(1),
    );
    wrong_usage.key_usages = vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::KeyAgreement,
    ];
    wrong_usage.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    wrong_usage.serial_number = Some(SerialNumber::from_slice(&[7]));
    let report = inspect_cert(&root.sign(&wrong_usage, &key)).unwrap();
    assert_eq!(
        report.problems,
        vec![
            "serial has only 1 bytes; it must carry 128 random bits".to_string(),
            "keyUsage lacks digitalSignature".to_string(),
            "keyUsage has keyCertSign, forbidden in a leaf".to_string(),
            "keyUsage has keyEncipherment but the key is not RSA".to_string(),
            "keyUsage has bits beyond the profile: Key Encipherment, Key Agreement, Key Cert Sign"
                .to_string(),
            "extendedKeyUsage lacks clientAuth".to_string(),
        ]
    );

    let mut bad_ca = ca_params(&root.td, "bad", now(), now() + Duration::hours(1), None);
    bad_ca.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    bad_ca.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
    let report = inspect_cert(&root.sign(&bad_ca, &key)).unwrap();
    assert!(report.is_ca);
    assert_eq!(
        report.problems,
        vec![
            format!("CA URI SAN {ID} has a path; a CA carries only spiffe://<trust-domain>"),
            "keyUsage lacks keyCertSign".to_string(),
        ]
    );

    let ed25519 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let params = leaf_params(
        &spiffe(ID),
        KeyKind::EcdsaP256,
        now(),
        now() + Duration::hours(1),
    );
    let report = inspect_cert(&root.sign(&params, &ed25519)).unwrap();
    assert_eq!(report.key, None);
    assert_eq!(
        report.problems,
        vec![ProfileError::UnsupportedKey("Ed25519".into()).to_string()]
    );
}
