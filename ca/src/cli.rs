//! The `sigil ca ...` and `sigil inspect cert` commands (operator tools around the CA).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use rcgen::PublicKeyData;
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_identity::profile::{self, KeyKind};
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;

use sigil_base::flags::parse_duration;
use sigil_identity::bundle::certificate_to_pem;
use sigil_identity::spiffe::DEFAULT_TRUST_DOMAIN;

use crate::config::{CaConfig, DEFAULT_MAX_TTL};
use crate::source::{bundle_pem, offline_authority};
use crate::state::{CaState, RotationTiming, unix_now};
use crate::store::{DEFAULT_SECRET_NAME, DEFAULT_SECRET_NAMESPACE, StateStore, StoreError};

/// Default time between adding a new root to the bundle and signing with it.
pub const DEFAULT_PROPAGATION: &str = "1h";
/// How many times a rotation retries after another writer changed the state.
const ROTATE_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("--id: {0}")]
    Id(String),
    #[error("--id: {0}")]
    BadId(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("--id: {0}")]
    IdRefused(#[source] crate::authority::AuthorityError),
    #[error("certificate {index}: {source}")]
    Inspect {
        index: usize,
        #[source]
        source: profile::ProfileError,
    },
    #[error("{path}: {source}")]
    Pem {
        path: String,
        #[source]
        source: pem::PemError,
    },
    #[error("{0}")]
    Key(#[source] rcgen::Error),
    #[error("{0}")]
    Bundle(#[source] sigil_identity::bundle::BundleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
    #[error("signing: {0}")]
    Sign(#[from] crate::authority::AuthorityError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the state kept changing underneath the rotation; try again")]
    Contended,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Run the CA: gRPC+TLS signing service, trust-bundle stream, metrics and readiness.
    Serve(Box<CaConfig>),
    /// Create a self-signed root in a state directory (once; an existing root is kept).
    Init(InitArgs),
    /// Issue a certificate offline from a state directory: writes cert.pem, key.pem, bundle.pem.
    Issue(IssueArgs),
    /// Start a root rotation: the new root is trusted at once, signs after --propagation, and the
    /// old root leaves the bundle once every leaf it signed has expired. Running CAs follow it.
    RotateRoot(RotateArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// SPIFFE ID to issue, e.g. spiffe://cluster.local/ns/sigil-system/sa/sigil-agent.
    #[arg(long)]
    pub id: String,
    /// Lifetime, at most the CA's default --max-ttl (7d) so root rotation can retire old roots.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub ttl: Duration,
    /// Directory to write cert.pem (leaf + intermediates), key.pem (mode 0600) and bundle.pem.
    #[arg(long)]
    pub out_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// The state directory of `sigil ca serve --state-dir`; without it, the Kubernetes Secret.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_SECRET_NAMESPACE)]
    pub namespace: String,
    #[arg(long, default_value = DEFAULT_SECRET_NAME)]
    pub secret_name: String,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Time for every agent to receive the new bundle before the new root signs.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_PROPAGATION)]
    pub propagation: Duration,
    /// The CA's --max-ttl: the old root stays trusted this long after the switch.
    #[arg(long, value_parser = parse_duration, default_value = DEFAULT_MAX_TTL)]
    pub max_ttl: Duration,
    /// Extra time the old root stays trusted after its last leaf could have expired.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub retire_margin: Duration,
}

#[derive(Args, Debug)]
pub struct InspectCertArgs {
    /// PEM file with a certificate chain (leaf first).
    pub file: PathBuf,
    /// Verify the chain against the roots in this PEM file too.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

fn trust_domain(s: &str) -> Result<TrustDomain, CliError> {
    TrustDomain::new(s).map_err(CliError::TrustDomain)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub async fn run(command: CaCommand, shutdown: watch::Receiver<bool>) -> Result<(), CliError> {
    match command {
        CaCommand::Serve(config) => Ok(crate::server::serve(*config, shutdown).await?),
        CaCommand::Init(args) => {
            let td = trust_domain(&args.trust_domain)?;
            let store = StateStore::Dir(args.state_dir.clone());
            let fresh = CaState::new_self_signed(&td, unix_now())?;
            let stored = store
                .create_if_absent(&fresh, &bundle_pem(&fresh, unix_now())?)
                .await?;
            stored.state.check_trust_domain(&td)?;
            let verb = if stored.state == fresh {
                "created"
            } else {
                "kept the existing"
            };
            println!(
                "{verb} root for trust domain {td} in {}",
                args.state_dir.display()
            );
            Ok(())
        }
        CaCommand::Issue(args) => issue(args).await,
        CaCommand::RotateRoot(args) => rotate(args).await,
    }
}

async fn issue(args: IssueArgs) -> Result<(), CliError> {
    let td = trust_domain(&args.trust_domain)?;
    let id = SpiffeId::parse(&args.id).map_err(CliError::BadId)?;
    if id.trust_domain() != &td {
        return Err(CliError::Id(format!("{id} is not in trust domain {td}")));
    }
    let max_ttl = parse_duration(DEFAULT_MAX_TTL).expect("valid default");
    if args.ttl > max_ttl {
        return Err(CliError::Input(format!(
            "--ttl {}s exceeds the maximum of {}s",
            args.ttl.as_secs(),
            max_ttl.as_secs()
        )));
    }
    let authority = offline_authority(&StateStore::Dir(args.state_dir.clone()), &td).await?;
    let signer = authority.signer()?;
    let key = crate::source::generate_key().map_err(CliError::Key)?;
    let issued = signer
        .sign_leaf(
            &key.subject_public_key_info(),
            KeyKind::EcdsaP256,
            &id,
            args.ttl,
            OffsetDateTime::now_utc(),
        )
        .map_err(|e| match e {
            // The operator's own input: name the flag.
            e @ crate::authority::AuthorityError::TrustDomainIdLeaf(_) => CliError::IdRefused(e),
            e => CliError::Sign(e),
        })?;
    std::fs::create_dir_all(&args.out_dir).map_err(io_err(&args.out_dir))?;
    let chain: String = std::iter::once(&issued.leaf)
        .chain(signer.intermediates.iter())
        .map(|c| certificate_to_pem(c))
        .collect();
    let cert_path = args.out_dir.join("cert.pem");
    std::fs::write(&cert_path, chain).map_err(io_err(&cert_path))?;
    let key_path = args.out_dir.join("key.pem");
    let mut key_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io_err(&key_path))?;
    key_file
        .write_all(key.serialize_pem().as_bytes())
        .map_err(io_err(&key_path))?;
    let bundle_path = args.out_dir.join("bundle.pem");
    std::fs::write(&bundle_path, authority.roots_pem().concat()).map_err(io_err(&bundle_path))?;
    println!(
        "issued {id} (serial {}, expires {}) into {}",
        issued.serial_hex,
        issued.not_after,
        args.out_dir.display()
    );
    Ok(())
}

async fn rotate(args: RotateArgs) -> Result<(), CliError> {
    let td = trust_domain(&args.trust_domain)?;
    let store = match &args.state_dir {
        Some(dir) => StateStore::Dir(dir.clone()),
        None => StateStore::secret(
            kube::Client::try_default().await?,
            &args.namespace,
            &args.secret_name,
        ),
    };
    for _ in 0..ROTATE_ATTEMPTS {
        let read = store.load().await?.ok_or_else(|| {
            CliError::Input(format!(
                "no CA state in {}; start the CA or run `sigil ca init`",
                store.describe()
            ))
        })?;
        read.state.check_trust_domain(&td)?;
        let mut next = read.state.clone();
        let now = unix_now();
        let timing = RotationTiming {
            propagation: args.propagation,
            max_leaf_ttl: args.max_ttl,
            retire_margin: args.retire_margin,
        };
        let plan = next.schedule_rotation(&td, now, timing)?;
        match store.replace(&read, &next, &bundle_pem(&next, now)?).await {
            Ok(()) => {
                println!(
                    "rotation scheduled in {}: new root trusted now, signs from {} (unix), old root retires at {} (unix)",
                    store.describe(),
                    plan.activate_at,
                    plan.retire_old_at
                );
                return Ok(());
            }
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CliError::Contended)
}

/// Prints what each certificate in `file` is and every way it departs from sigil's profile.
/// Returns whether everything checked out.
pub fn inspect_cert(args: &InspectCertArgs, out: &mut impl Write) -> Result<bool, CliError> {
    let chain = read_certs(&args.file)?;
    let mut ok = true;
    for (i, der) in chain.iter().enumerate() {
        let report =
            profile::inspect_cert(der).map_err(|source| CliError::Inspect { index: i, source })?;
        let _ = writeln!(
            out,
            "certificate {i}{}:",
            if i == 0 { " (leaf)" } else { "" }
        );
        let _ = writeln!(
            out,
            "  spiffe id:  {}",
            report
                .spiffe_id
                .as_ref()
                .map_or("(none)".to_string(), |id| id.to_string())
        );
        let _ = writeln!(out, "  ca:         {}", report.is_ca);
        let _ = writeln!(out, "  subject:    {}", report.subject);
        let _ = writeln!(out, "  issuer:     {}", report.issuer);
        let _ = writeln!(out, "  serial:     {}", report.serial_hex);
        let _ = writeln!(out, "  not before: {}", report.not_before);
        let _ = writeln!(out, "  not after:  {}", report.not_after);
        let _ = writeln!(
            out,
            "  key:        {}",
            report
                .key
                .map_or("(unsupported)".to_string(), |k| k.to_string())
        );
        if report.not_after < OffsetDateTime::now_utc() {
            ok = false;
            let _ = writeln!(out, "  PROBLEM: expired");
        }
        for problem in &report.problems {
            ok = false;
            let _ = writeln!(out, "  PROBLEM: {problem}");
        }
    }
    if let Some(bundle_path) = &args.bundle {
        let td = trust_domain(&args.trust_domain)?;
        let text = std::fs::read_to_string(bundle_path).map_err(io_err(bundle_path))?;
        let bundle = TrustBundle::from_pem(td, &text).map_err(CliError::Bundle)?;
        match bundle.verify_chain(&chain, UnixTime::now()) {
            Ok(()) => {
                let _ = writeln!(out, "chain: verifies against {}", bundle_path.display());
            }
            Err(reason) => {
                ok = false;
                let _ = writeln!(
                    out,
                    "chain: PROBLEM: does not verify against {}: {reason}",
                    bundle_path.display()
                );
            }
        }
    }
    Ok(ok)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CliError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let certs: Vec<_> = pem::parse_many(&bytes)
        .map_err(|source| CliError::Pem {
            path: path.display().to_string(),
            source,
        })?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(CliError::Input(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn init_issue_inspect_rotate_offline() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let (_tx, shutdown) = watch::channel(false);
        let init = || {
            CaCommand::Init(InitArgs {
                state_dir: state_dir.clone(),
                trust_domain: "cluster.local".into(),
            })
        };
        run(init(), shutdown.clone()).await.unwrap();
        let first = std::fs::read(state_dir.join("ca.json")).unwrap();
        run(init(), shutdown.clone()).await.unwrap();
        assert_eq!(
            std::fs::read(state_dir.join("ca.json")).unwrap(),
            first,
            "init keeps an existing root"
        );

        let out = dir.path().join("out");
        run(
            CaCommand::Issue(IssueArgs {
                state_dir: state_dir.clone(),
                trust_domain: "cluster.local".into(),
                id: "spiffe://cluster.local/ns/sigil-system/sa/sigil-agent".into(),
                ttl: Duration::from_secs(3600),
                out_dir: out.clone(),
            }),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let inspect = InspectCertArgs {
            file: out.join("cert.pem"),
            bundle: Some(out.join("bundle.pem")),
            trust_domain: "cluster.local".into(),
        };
        let mut text = Vec::new();
        assert!(
            inspect_cert(&inspect, &mut text).unwrap(),
            "{}",
            String::from_utf8_lossy(&text)
        );
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("spiffe://cluster.local/ns/sigil-system/sa/sigil-agent"));
        assert!(text.contains("chain: verifies"));

        // A foreign ID is refused.
        let err = run(
            CaCommand::Issue(IssueArgs {
                state_dir: state_dir.clone(),
                trust_domain: "cluster.local".into(),
                id: "spiffe://other.org/ns/a/sa/b".into(),
                ttl: Duration::from_secs(60),
                out_dir: out.clone(),
            }),
            shutdown.clone(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CliError::Id(_)));

        let rotate = || {
            CaCommand::RotateRoot(RotateArgs {
                state_dir: Some(state_dir.clone()),
                namespace: "sigil-system".into(),
                secret_name: "sigil-ca".into(),
                trust_domain: "cluster.local".into(),
                propagation: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(3600),
                retire_margin: Duration::from_secs(60),
            })
        };
        run(rotate(), shutdown.clone()).await.unwrap();
        let bundle = std::fs::read_to_string(state_dir.join("root-cert.pem")).unwrap();
        assert_eq!(
            bundle.matches("BEGIN CERTIFICATE").count(),
            2,
            "both roots trusted during rotation"
        );
        assert!(matches!(
            run(rotate(), shutdown.clone()).await,
            Err(CliError::State(
                crate::state::StateError::RotationInProgress(_)
            ))
        ));
    }

    #[test]
    fn inspect_reports_a_chain_that_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let (signer, _) = crate::authority::tests::test_root(&td);
        let (_, other_root) = crate::authority::tests::test_root(&td);
        let key = crate::source::generate_key().unwrap();
        let id = SpiffeId::for_service_account(&td, "a", "b").unwrap();
        let issued = signer
            .sign_leaf(
                &key.subject_public_key_info(),
                KeyKind::EcdsaP256,
                &id,
                Duration::from_secs(60),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        std::fs::write(
            dir.path().join("cert.pem"),
            certificate_to_pem(&issued.leaf),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bundle.pem"),
            certificate_to_pem(&other_root),
        )
        .unwrap();
        let args = InspectCertArgs {
            file: dir.path().join("cert.pem"),
            bundle: Some(dir.path().join("bundle.pem")),
            trust_domain: "cluster.local".into(),
        };
        let mut text = Vec::new();
        assert!(!inspect_cert(&args, &mut text).unwrap());
        assert!(String::from_utf8(text).unwrap().contains("does not verify"));
    }
}
