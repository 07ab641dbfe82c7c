//! The X.509-SVID certificate profile (a SPIFFE ID as the only URI SAN, no subject, digital
//! signature only, server and client auth; CAs constrained to the trust domain): the one place where sigil decides what its
//! leaf and CA certificates contain ([`leaf_params`], [`serving_params`], [`ca_params`]) and the
//! one place that checks a certificate against that profile ([`inspect_cert`],
//! [`leaf_spiffe_id`]).

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe::{SpiffeId, TrustDomain};

/// Leaf certificates start one minute in the past so that peers with slightly slow clocks
/// accept them at once.
pub const LEAF_BACKDATE: Duration = Duration::minutes(1);

/// Serial numbers carry this many random bytes (128 bits).
const SERIAL_BYTES: usize = 16;
/// RSA moduli outside this range are refused: below is too weak, above is a DoS vector.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("malformed certificate or key: {0}")]
    Malformed(String),
    #[error("unsupported key: {0} (accepted: ECDSA P-256, ECDSA P-384, RSA 2048..=8192)")]
    UnsupportedKey(String),
    #[error("certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("certificate has more than one URI SAN; an X.509-SVID must have exactly one")]
    MultipleUriSans,
    #[error("certificate's URI SAN is not a workload SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("certificate is a CA (basicConstraints cA=true), not a leaf")]
    IsCa,
    #[error("invalid DNS name or IP address for a SAN: {0:?}")]
    InvalidName(String),
}

/// The key types an X.509-SVID may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa { bits: usize },
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
        }
    }
}

/// Classifies a DER SubjectPublicKeyInfo, refusing every key type the profile does not allow.
pub fn key_kind_of_spki(spki_der: &[u8]) -> Result<KeyKind, ProfileError> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| ProfileError::Malformed(format!("SubjectPublicKeyInfo: {e}")))?;
    if !rest.is_empty() {
        return Err(ProfileError::Malformed(
            "trailing bytes after SubjectPublicKeyInfo".into(),
        ));
    }
    key_kind(&spki)
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, ProfileError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| ProfileError::Malformed("EC key without a named curve".into()))?;
        let point_len = spki.subject_public_key.data.len();
        // Uncompressed points only (0x04 || X || Y), as every TLS stack emits them.
        let (kind, want_len) = if curve == OID_EC_P256 {
            (KeyKind::EcdsaP256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (KeyKind::EcdsaP384, 97)
        } else if curve == OID_NIST_EC_P521 {
            return Err(ProfileError::UnsupportedKey("ECDSA P-521".into()));
        } else {
            return Err(ProfileError::UnsupportedKey(format!("EC curve {curve}")));
        };
        if point_len != want_len || spki.subject_public_key.data.first() != Some(&0x04) {
            return Err(ProfileError::Malformed(format!(
                "{kind} public key is not an uncompressed point"
            )));
        }
        Ok(kind)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa_modulus_bits(rsa.modulus),
            _ => return Err(ProfileError::Malformed("RSA public key".into())),
        };
        if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            Ok(KeyKind::Rsa { bits })
        } else {
            Err(ProfileError::UnsupportedKey(format!("RSA {bits}")))
        }
    } else if *alg == OID_SIG_ED25519 {
        Err(ProfileError::UnsupportedKey("Ed25519".into()))
    } else if *alg == OID_SIG_ED448 {
        Err(ProfileError::UnsupportedKey("Ed448".into()))
    } else {
        Err(ProfileError::UnsupportedKey(format!(
            "public key algorithm {alg}"
        )))
    }
}

/// Bit length of a big-endian modulus, ignoring DER's sign-padding zero bytes.
fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let first = modulus.iter().position(|b| *b != 0);
    match first {
        None => 0,
        Some(i) => (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize,
    }
}

/// Parameters for a workload X.509-SVID: empty subject, the SPIFFE ID as the only (critical)
/// SAN, cA=false, digitalSignature (+keyEncipherment for RSA), EKU server+client auth.
pub fn leaf_params(
    id: &SpiffeId,
    key: KeyKind,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = end_entity_params(id, not_before, not_after);
    if matches!(key, KeyKind::Rsa { .. }) {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params
}

/// Parameters for a server certificate that also carries DNS names or IP addresses (e.g. the
/// CA's own gRPC endpoint), so that clients doing ordinary hostname verification accept it.
pub fn serving_params(
    id: &SpiffeId,
    dns_names_and_ips: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, ProfileError> {
    let mut params = end_entity_params(id, not_before, not_after);
    for name in dns_names_and_ips {
        params.subject_alt_names.push(server_name_san(name)?);
    }
    Ok(params)
}

/// The SAN for a serving certificate name: an IP address, or a DNS name as TLS clients match it.
/// Configurations call this at start, so a bad name stops the process there rather than at the
/// first certificate issuance.
pub fn server_name_san(name: &str) -> Result<SanType, ProfileError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(name)
        .map_err(|_| ProfileError::InvalidName(name.to_string()))?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| {
        ProfileError::InvalidName(name.to_string())
    })?))
}

/// A `--server-name` flag: a DNS name or an IP address, checked as the serving certificate will
/// use it.
pub fn parse_server_name(s: &str) -> Result<String, String> {
    server_name_san(s)
        .map(|_| s.to_string())
        .map_err(|_| format!("{s:?} is neither a DNS name nor an IP address"))
}

/// A `host:port` to dial (the agent's `--ca`): a DNS name or IP address (IPv6 in brackets) and a
/// port, checked at start so a typo is not retried forever.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not host:port (e.g. sigil-ca.sigil-system.svc:15012)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad())?
            .to_string(),
        None if host.contains(':') => return Err(bad()),
        None => host.to_string(),
    };
    parse_server_name(&host).map_err(|_| bad())?;
    Ok(s.to_string())
}

fn end_entity_params(
    id: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical (RFC 5280 §4.2.1.6).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![spiffe_san(id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

/// Parameters for a CA certificate of `td`: cA=true (optionally path-length constrained),
/// keyCertSign+cRLSign+digitalSignature, SAN `spiffe://<td>`, subject `O=sigil, CN=<label>
/// <serial>` so two CA generations never share a subject (spire#4415).
pub fn ca_params(
    td: &TrustDomain,
    label: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    path_len: Option<u8>,
) -> CertificateParams {
    let serial = random_serial();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sigil");
    dn.push(
        DnType::CommonName,
        format!("{label} {}", serial_hex(&serial)),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![spiffe_san(&td.id())];
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

fn spiffe_san(id: &SpiffeId) -> SanType {
    // A parsed SpiffeId is ASCII by construction, so it is always a valid IA5String.
    SanType::URI(
        id.to_string()
            .try_into()
            .expect("SPIFFE IDs are ASCII and fit an IA5String"),
    )
}

fn random_serial() -> [u8; SERIAL_BYTES] {
    let mut serial = [0u8; SERIAL_BYTES];
    SystemRandom::new()
        .fill(&mut serial)
        .expect("the operating system's random number generator failed");
    serial
}

/// Lowercase hex of a serial's value (leading zero bytes dropped, as DER INTEGER encoding does).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[start..])
}

/// Lowercase hex of `bytes` (serials, digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a certificate contains, and how it deviates from the sigil profile.
#[derive(Debug, Clone, PartialEq)]
pub struct CertReport {
    pub spiffe_id: Option<SpiffeId>,
    pub is_ca: bool,
    pub serial_hex: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub key: Option<KeyKind>,
    /// Human-readable deviations from the leaf profile (for leaves) or the CA profile (for CAs);
    /// empty means compliant.
    pub problems: Vec<String>,
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, ProfileError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| ProfileError::Malformed(format!("certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(ProfileError::Malformed(
            "trailing bytes after certificate".into(),
        ));
    }
    Ok(cert)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, ProfileError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| ProfileError::Malformed(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Parses a certificate and lists every deviation from the profile its kind (leaf or CA)
/// must follow. Errors only if the DER cannot be parsed at all.
pub fn inspect_cert(der: &[u8]) -> Result<CertReport, ProfileError> {
    let cert = parse_cert(der)?;
    let mut problems = Vec::new();

    let bc = cert
        .basic_constraints()
        .map_err(|e| ProfileError::Malformed(format!("basicConstraints: {e}")))?;
    let is_ca = bc.as_ref().is_some_and(|bc| bc.value.ca);
    let key = match key_kind(cert.public_key()) {
        Ok(kind) => Some(kind),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };

    if cert.version().0 != 2 {
        problems.push(format!("version is v{}, must be v3", cert.version().0 + 1));
    }
    match &bc {
        None => problems.push("basicConstraints missing (must be critical, cA=false)".into()),
        Some(bc) if !bc.critical => problems.push("basicConstraints is not critical".into()),
        Some(_) => {}
    }

    let serial = cert.raw_serial();
    let serial_value = &serial[serial.iter().take_while(|b| **b == 0).count()..];
    if serial_value.len() < 8 {
        problems.push(format!(
            "serial has only {} bytes; it must carry 128 random bits",
            serial_value.len()
        ));
    }
    let validity = cert.validity();
    if validity.not_after <= validity.not_before {
        problems.push("notAfter is not after notBefore".into());
    }

    let uris = uri_sans(&cert)?;
    let spiffe_id = match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).ok(),
        _ => None,
    };
    if is_ca {
        check_ca(&cert, &uris, &mut problems)?;
    } else {
        check_leaf(&cert, &uris, key, &mut problems)?;
    }

    Ok(CertReport {
        spiffe_id,
        is_ca,
        serial_hex: serial_hex(serial),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        key,
        problems,
    })
}

fn check_leaf(
    cert: &X509Certificate<'_>,
    uris: &[&str],
    key: Option<KeyKind>,
    problems: &mut Vec<String>,
) -> Result<(), ProfileError> {
    match uris {
        [] => problems.push("no URI SAN: an X.509-SVID needs exactly one SPIFFE ID".into()),
        [uri] => match SpiffeId::parse(uri) {
            Ok(id) if id.is_trust_domain_id() => problems.push(format!(
                "URI SAN {uri} has no path; a workload SPIFFE ID needs one"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("URI SAN {uri:?} is not a SPIFFE ID: {e}")),
        },
        _ => problems.push(format!(
            "{} URI SANs: an X.509-SVID must have exactly one",
            uris.len()
        )),
    }
    check_san_criticality(cert, problems)?;

    let ku = cert
        .key_usage()
        .map_err(|e| ProfileError::Malformed(format!("keyUsage: {e}")))?;
    match ku {
        None => problems.push("keyUsage missing (must be critical digitalSignature)".into()),
        Some(ku) => {
            if !ku.critical {
                problems.push("keyUsage is not critical".into());
            }
            let ku = ku.value;
            if !ku.digital_signature() {
                problems.push("keyUsage lacks digitalSignature".into());
            }
            if ku.key_cert_sign() {
                problems.push("keyUsage has keyCertSign, forbidden in a leaf".into());
            }
            if ku.crl_sign() {
                problems.push("keyUsage has cRLSign, forbidden in a leaf".into());
            }
            let is_rsa = matches!(key, Some(KeyKind::Rsa { .. }));
            if ku.key_encipherment() && !is_rsa {
                problems.push("keyUsage has keyEncipherment but the key is not RSA".into());
            }
            if ku.non_repudiation()
                || ku.data_encipherment()
                || ku.key_agreement()
                || ku.encipher_only()
                || ku.decipher_only()
            {
                problems.push(format!("keyUsage has bits beyond the profile: {ku}"));
            }
        }
    }

    let eku = cert
        .extended_key_usage()
        .map_err(|e| ProfileError::Malformed(format!("extendedKeyUsage: {e}")))?;
    match eku {
        None => problems.push("extendedKeyUsage missing (must be serverAuth+clientAuth)".into()),
        Some(eku) => {
            if !eku.value.server_auth {
                problems.push("extendedKeyUsage lacks serverAuth".into());
            }
            if !eku.value.client_auth {
                problems.push("extendedKeyUsage lacks clientAuth".into());
            }
        }
    }
    Ok(())
}

fn check_ca(
    cert: &X509Certificate<'_>,
    uris: &[&str],
    problems: &mut Vec<String>,
) -> Result<(), ProfileError> {
    match uris {
        [] => {}
        [uri] => match SpiffeId::parse(uri) {
            Ok(id) if !id.is_trust_domain_id() => problems.push(format!(
                "CA URI SAN {uri} has a path; a CA carries only spiffe://<trust-domain>"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("CA URI SAN {uri:?} is not a SPIFFE ID: {e}")),
        },
        _ => problems.push(format!(
            "{} URI SANs: a CA may have at most one",
            uris.len()
        )),
    }
    if cert.subject().iter().next().is_none() {
        problems.push("CA subject is empty".into());
    }
    check_san_criticality(cert, problems)?;

    let ku = cert
        .key_usage()
        .map_err(|e| ProfileError::Malformed(format!("keyUsage: {e}")))?;
    match ku {
        None => problems.push("keyUsage missing (must be critical keyCertSign)".into()),
        Some(ku) => {
            if !ku.critical {
                problems.push("keyUsage is not critical".into());
            }
            if !ku.value.key_cert_sign() {
                problems.push("keyUsage lacks keyCertSign".into());
            }
        }
    }
    Ok(())
}

/// RFC 5280 §4.2.1.6: with an empty subject the SAN extension must be critical.
fn check_san_criticality(
    cert: &X509Certificate<'_>,
    problems: &mut Vec<String>,
) -> Result<(), ProfileError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| ProfileError::Malformed(format!("subjectAltName: {e}")))?;
    let subject_empty = cert.subject().iter().next().is_none();
    if subject_empty && san.is_some_and(|san| !san.critical) {
        problems.push("subject is empty but subjectAltName is not critical".into());
    }
    Ok(())
}

/// The certificate's SubjectPublicKeyInfo, DER (to check a returned certificate is for the key
/// that asked for it).
pub fn subject_public_key_info(der: &[u8]) -> Result<Vec<u8>, ProfileError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| ProfileError::Malformed(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The workload SPIFFE ID of a leaf certificate: exactly one URI SAN, parsing as a SPIFFE ID
/// with a path, in a certificate that is not a CA.
pub fn leaf_spiffe_id(der: &[u8]) -> Result<SpiffeId, ProfileError> {
    let cert = parse_cert(der)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| ProfileError::Malformed(format!("basicConstraints: {e}")))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(ProfileError::IsCa);
    }
    let uri = match uri_sans(&cert)?.as_slice() {
        [] => return Err(ProfileError::NoUriSan),
        [uri] => *uri,
        _ => return Err(ProfileError::MultipleUriSans),
    };
    let id = SpiffeId::parse(uri).map_err(|e| ProfileError::NotSpiffe(format!("{uri:?}: {e}")))?;
    if id.is_trust_domain_id() {
        return Err(ProfileError::NotSpiffe(format!(
            "{uri} has no path (that is a trust domain ID)"
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests;
