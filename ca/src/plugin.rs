//! Plug-in CA mode: an operator-provided intermediate (Istio's `cacerts` layout: `ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`) from a directory or a Secret. A new set is
//! accepted only after proving that a leaf it signs verifies against its roots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_identity::profile::KeyKind;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::authority::{Authority, Signer};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("reading plug-in CA files: {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading plug-in CA files: {0}")]
    Secret(#[source] kube::Error),
    #[error("{file} is missing")]
    Missing { file: &'static str },
    #[error("{file}: {reason}")]
    Invalid { file: &'static str, reason: String },
    #[error("ca-key.pem does not match the public key of ca-cert.pem")]
    KeyMismatch,
    #[error("the intermediate's chain does not reach the roots in root-cert.pem: {0}")]
    ChainDoesNotReachRoots(#[source] sigil_identity::bundle::BundleError),
    #[error("the intermediate's chain does not reach the roots in root-cert.pem: {0}")]
    ProbeKey(#[source] rcgen::Error),
    #[error("the intermediate's chain does not reach the roots in root-cert.pem: {0}")]
    ProbeId(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("the intermediate's chain does not reach the roots in root-cert.pem: {0}")]
    ProbeSign(#[source] crate::authority::AuthorityError),
}

/// Where the plug-in files come from.
#[derive(Clone)]
pub enum PluginSource {
    Dir(PathBuf),
    Secret { api: Box<Api<Secret>>, name: String },
}

/// The raw file contents, compared to detect changes.
pub type PluginFiles = BTreeMap<&'static str, Vec<u8>>;

impl PluginSource {
    pub fn describe(&self) -> String {
        match self {
            PluginSource::Dir(dir) => format!("directory {}", dir.display()),
            PluginSource::Secret { name, .. } => format!("Secret {name}"),
        }
    }

    pub async fn read(&self) -> Result<PluginFiles, PluginError> {
        let mut files = PluginFiles::new();
        match self {
            PluginSource::Dir(dir) => {
                for name in [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT] {
                    match tokio::fs::read(dir.join(name)).await {
                        Ok(bytes) => {
                            files.insert(name, bytes);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => return Err(PluginError::Read { name, source }),
                    }
                }
            }
            PluginSource::Secret { api, name } => {
                let secret = api.get(name).await.map_err(PluginError::Secret)?;
                for (key, value) in secret.data.unwrap_or_default() {
                    if let Some(known) = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]
                        .into_iter()
                        .find(|k| *k == key)
                    {
                        files.insert(known, value.0);
                    }
                }
            }
        }
        Ok(files)
    }
}

/// Validates a set of plug-in files and builds the authority they describe.
pub fn load(
    td: &TrustDomain,
    files: &PluginFiles,
    sequence: u64,
) -> Result<Authority, PluginError> {
    let ca_cert = certs(files, CA_CERT)?
        .into_iter()
        .next()
        .ok_or(PluginError::Invalid {
            file: CA_CERT,
            reason: "no certificate".into(),
        })?;
    let key_pem = std::str::from_utf8(
        files
            .get(CA_KEY)
            .ok_or(PluginError::Missing { file: CA_KEY })?,
    )
    .map_err(|_| PluginError::Invalid {
        file: CA_KEY,
        reason: "not UTF-8 PEM".into(),
    })?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PluginError::Invalid {
        file: CA_KEY,
        reason: e.to_string(),
    })?;
    let (_, parsed) =
        x509_parser::certificate::X509Certificate::from_der(&ca_cert).map_err(|e| {
            PluginError::Invalid {
                file: CA_CERT,
                reason: e.to_string(),
            }
        })?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(PluginError::KeyMismatch);
    }
    let roots = certs(files, ROOT_CERT)?;
    if roots.is_empty() {
        return Err(PluginError::Invalid {
            file: ROOT_CERT,
            reason: "no certificate".into(),
        });
    }
    let chain_above: Vec<CertificateDer<'static>> = match files.get(CERT_CHAIN) {
        Some(_) => certs(files, CERT_CHAIN)?
            .into_iter()
            .filter(|c| *c != ca_cert && !roots.contains(c))
            .collect(),
        None => Vec::new(),
    };
    let is_root = roots.contains(&ca_cert);
    let signer = Signer::new(ca_cert, key, is_root, chain_above, None).map_err(|e| {
        PluginError::Invalid {
            file: CA_CERT,
            reason: e.to_string(),
        }
    })?;
    let bundle = TrustBundle::new(td.clone(), roots, sequence);
    prove_chain(td, &signer, &bundle)?;
    let signer = Arc::new(signer);
    Ok(Authority {
        trust_domain: td.clone(),
        serving_signer: Some(signer.clone()),
        signer: Some(signer),
        bundle,
    })
}

/// Signs a throwaway leaf and verifies it against the roots: the one check that covers every way
/// a chain can be broken (wrong order, missing link, expired link, path-length limits).
fn prove_chain(td: &TrustDomain, signer: &Signer, bundle: &TrustBundle) -> Result<(), PluginError> {
    let probe_key = KeyPair::generate().map_err(PluginError::ProbeKey)?;
    let id = SpiffeId::for_service_account(td, "sigil-system", "plugin-probe")
        .map_err(PluginError::ProbeId)?;
    let now = OffsetDateTime::now_utc();
    let leaf = signer
        .sign_leaf(
            &probe_key.subject_public_key_info(),
            KeyKind::EcdsaP256,
            &id,
            std::time::Duration::from_secs(60),
            now,
        )
        .map_err(PluginError::ProbeSign)?;
    let chain: Vec<CertificateDer<'_>> = std::iter::once(leaf.leaf)
        .chain(signer.intermediates.iter().cloned())
        .collect();
    bundle
        .verify_chain(&chain, UnixTime::now())
        .map_err(PluginError::ChainDoesNotReachRoots)?;
    Ok(())
}

fn certs(
    files: &PluginFiles,
    file: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PluginError> {
    let bytes = files.get(file).ok_or(PluginError::Missing { file })?;
    let blocks = pem::parse_many(bytes).map_err(|e| PluginError::Invalid {
        file,
        reason: e.to_string(),
    })?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::Issuer;
    use sigil_identity::profile;

    /// An operator's offline root and an intermediate it signed, as plug-in files.
    pub(crate) fn plugin_files(td: &TrustDomain) -> (PluginFiles, KeyPair) {
        let now = OffsetDateTime::now_utc();
        let root_key = KeyPair::generate().unwrap();
        let root_params = profile::ca_params(
            td,
            "offline root",
            now - time::Duration::minutes(1),
            now + time::Duration::days(365),
            None,
        );
        let root = root_params.self_signed(&root_key).unwrap();
        let inter_key = KeyPair::generate().unwrap();
        let inter = profile::ca_params(
            td,
            "cluster intermediate",
            now - time::Duration::minutes(1),
            now + time::Duration::days(90),
            Some(0),
        )
        .signed_by(&inter_key, &Issuer::new(root_params, &root_key))
        .unwrap();
        let files = PluginFiles::from([
            (CA_CERT, inter.pem().into_bytes()),
            (CA_KEY, inter_key.serialize_pem().into_bytes()),
            (
                CERT_CHAIN,
                format!("{}{}", inter.pem(), root.pem()).into_bytes(),
            ),
            (ROOT_CERT, root.pem().into_bytes()),
        ]);
        (files, root_key)
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn valid_intermediate_loads_with_chain() {
        let (files, _) = plugin_files(&td());
        let authority = load(&td(), &files, 1).unwrap();
        let signer = authority.signer().unwrap();
        assert_eq!(
            signer.intermediates.len(),
            1,
            "the intermediate itself, root excluded"
        );
        assert_eq!(authority.bundle.roots.len(), 1);
    }

    #[test]
    fn chain_that_does_not_reach_the_roots_is_refused() {
        let (mut files, _) = plugin_files(&td());
        let (other, _) = plugin_files(&td());
        files.insert(ROOT_CERT, other[ROOT_CERT].clone());
        files.insert(CERT_CHAIN, other[CERT_CHAIN].clone());
        let err = load(&td(), &files, 1).err().unwrap();
        assert!(
            matches!(err, PluginError::ChainDoesNotReachRoots(_)),
            "{err}"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let (mut files, _) = plugin_files(&td());
        files.insert(
            CA_KEY,
            KeyPair::generate().unwrap().serialize_pem().into_bytes(),
        );
        assert!(matches!(
            load(&td(), &files, 1),
            Err(PluginError::KeyMismatch)
        ));
    }

    #[test]
    fn missing_and_garbage_files_are_refused() {
        let (mut files, _) = plugin_files(&td());
        files.remove(CA_KEY);
        assert!(matches!(
            load(&td(), &files, 1),
            Err(PluginError::Missing { file: CA_KEY })
        ));
        let (mut files, _) = plugin_files(&td());
        files.insert(ROOT_CERT, b"not pem".to_vec());
        assert!(matches!(
            load(&td(), &files, 1),
            Err(PluginError::Invalid {
                file: ROOT_CERT,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn secret_source_reads_the_istio_layout() {
        use k8s_openapi::ByteString;
        use kube::api::{ObjectMeta, PostParams};
        let (files, _) = plugin_files(&td());
        let server = sigil_test_apiserver::TestApiServer::start().await;
        let api: Api<Secret> = Api::namespaced(server.client(), "sigil-system");
        let mut data: BTreeMap<String, ByteString> = files
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
            .collect();
        data.insert("unrelated".into(), ByteString(b"ignored".to_vec()));
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("cacerts".into()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        api.create(&PostParams::default(), &secret).await.unwrap();
        let source = PluginSource::Secret {
            api: Box::new(api),
            name: "cacerts".into(),
        };
        assert_eq!(source.read().await.unwrap(), files);
        assert!(load(&td(), &source.read().await.unwrap(), 1).is_ok());
        let missing = PluginSource::Secret {
            api: Box::new(Api::namespaced(server.client(), "sigil-system")),
            name: "absent".into(),
        };
        assert!(matches!(missing.read().await, Err(PluginError::Secret(_))));
    }

    #[tokio::test]
    async fn dir_source_reads_the_istio_layout() {
        let (files, _) = plugin_files(&td());
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let read = PluginSource::Dir(dir.path().to_path_buf())
            .read()
            .await
            .unwrap();
        assert_eq!(read, files);
    }
}
