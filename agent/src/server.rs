//! `sigil agent run`: wires the CA client, the trust-bundle stream, the certificate manager, the
//! attestor (and, in Kubernetes, the watch of this node's pods that drives prefetching), the mesh
//! membership and meshed Services, the policy feed, the route feed and the socket serving SDS,
//! the SPIFFE Workload API, the membership, the meshed Services, the policies and the routes,
//! plus the admin endpoint. On SIGTERM it reports not ready at once
//! (the DaemonSet rollout waits on it), serves on for [`SHUTDOWN_GRACE`] (so nothing connecting
//! meanwhile hangs on a socket no one accepts on), then closes what is open and exits.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use sigil_base::admin;
use sigil_base::readiness::{Conditions, Readiness};
use sigil_base::shutdown::{serve_then_drain, stop_after_grace};
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::admin_api::Admin;
use crate::attest::Attestor;
use crate::attest::k8s::{self, KubernetesAttestor, NodePods};
use crate::attest::procfs::Procfs;
use crate::attest::unix::UnixAttestor;
use crate::ca_client::{CaClient, Credential};
use crate::certs::{self, CertConfig, CertManager};
use crate::config::{AgentConfig, AttestorKind};
use crate::h2_authority::H2AuthorityStream;
use crate::mesh::{self, MeshApi, MeshError, MeshFile, MeshState};
use crate::metrics::Metrics;
use crate::peer::{ConnectionSlots, Workloads};
use crate::policy_feed::{self, PolicyApi, PolicyError, PolicyFile, PolicySnapshot};
use crate::routes::{self, RouteError, RouteFile, RoutesApi};
use crate::sds::Sds;
use crate::services::ServicesApi;
use crate::workload_api::WorkloadApi;

/// How long the agent serves on after SIGTERM, not ready.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Then: how long calls in flight may take to finish (SDS and Workload API streams never end
/// on their own; their clients keep what they hold and reconnect to the next agent).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("--ca-bundle {path}: {source}")]
    BundleRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca-bundle {path}: {source}")]
    Bundle {
        path: String,
        #[source]
        source: sigil_identity::bundle::BundleError,
    },
    #[error("--client-cert/--client-key: {path}: {source}")]
    ClientCertRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--client-cert/--client-key: {0}")]
    ClientCert(#[source] sigil_identity::tls::TlsError),
    #[error("--client-cert/--client-key: {0}")]
    ClientCertId(#[source] sigil_identity::profile::ProfileError),
    #[error("--unix-map: missing")]
    NoUnixMap,
    #[error("--unix-map: {0}")]
    UnixMap(#[source] crate::attest::AttestError),
    #[error("--mesh-file {path}: {reason}")]
    MeshFile { path: String, reason: MeshError },
    #[error("--policy-file {path}: {reason}")]
    PolicyFile { path: String, reason: PolicyError },
    #[error("--policy-file {path}: {reason}")]
    RouteFile { path: String, reason: RouteError },
    #[error("--attestor k8s needs --node-name (or NODE_NAME)")]
    NoNodeName,
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("socket {path}: {reason}")]
    Socket { path: String, reason: String },
    #[error("socket {path}: {source}")]
    SocketIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the admin endpoint {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the agent socket: {0}")]
    Serve(#[from] tonic::transport::Error),
}

pub async fn run(config: AgentConfig, signalled: watch::Receiver<bool>) -> Result<(), AgentError> {
    let td = TrustDomain::new(&config.trust_domain).map_err(AgentError::TrustDomain)?;
    info!(config = ?config, "starting sigil agent");
    // Everything serves until `shutdown`: the grace period after the signal.
    let shutdown = stop_after_grace(signalled.clone(), SHUTDOWN_GRACE);
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let mesh_file = config
        .mesh_file
        .as_deref()
        .map(|path| {
            MeshFile::load(path, &td).map_err(|reason| AgentError::MeshFile {
                path: path.display().to_string(),
                reason,
            })
        })
        .transpose()?;
    let policy_file = config
        .policy_file
        .as_deref()
        .map(|path| {
            PolicyFile::load(path).map_err(|reason| AgentError::PolicyFile {
                path: path.display().to_string(),
                reason,
            })
        })
        .transpose()?;
    // The same file's routes and traffic policies, for the route feed.
    let route_file = config
        .policy_file
        .as_deref()
        .map(|path| {
            RouteFile::load(path).map_err(|reason| AgentError::RouteFile {
                path: path.display().to_string(),
                reason,
            })
        })
        .transpose()?;

    let bundle = read_bundle(&config.ca_bundle, &td)?;
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));

    // The agent's own credential, and its own identity when that is a certificate.
    let (credential, own_cert) = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| AgentError::ClientCertRead {
                    path: p.display().to_string(),
                    source,
                })
            };
            let certified = CertifiedKey::from_pem(&read(cert)?, &read(key)?)
                .map_err(AgentError::ClientCert)?;
            let own_id = sigil_identity::profile::leaf_spiffe_id(&certified.chain[0])
                .map_err(AgentError::ClientCertId)?;
            let bootstrap = Arc::new(certified);
            let (tx, rx) = watch::channel(bootstrap.clone());
            (Credential::Certificate(rx), Some((own_id, bootstrap, tx)))
        }
        _ => (Credential::TokenFile(config.token_file.clone()), None),
    };
    let ca = CaClient::new(
        config.ca_addr.clone(),
        config.ca_name.clone(),
        bundle_rx.clone(),
        credential,
    );
    let (contacted_tx, contacted_rx) = watch::channel(false);
    tokio::spawn(
        ca.clone()
            .follow_bundle(td.clone(), bundle_tx, contacted_tx),
    );
    let certs = CertManager::spawn(
        ca,
        CertConfig {
            ttl: config.cert_ttl,
            max_concurrent_fetches: config.max_concurrent_fetches,
            own_id: own_cert.as_ref().map(|(id, _, _)| id.clone()),
        },
        metrics.clone(),
    );
    if let Some((own_id, bootstrap, tx)) = own_cert {
        let manager = certs.clone();
        tokio::spawn(async move {
            if let Err(e) = certs::keep_agent_certificate(manager, own_id, bootstrap, tx).await {
                error!(error = %e, "renewing the agent's own certificate stopped");
            }
        });
    }

    // Attestation, and (Kubernetes) prefetching for the pods on this node.
    let procfs = Procfs::new(config.proc_root.clone());
    let (attestor, pods_synced, kube_client) = match config.attestor {
        AttestorKind::Unix => {
            let path = config.unix_map.as_ref().ok_or(AgentError::NoUnixMap)?;
            let attestor = UnixAttestor::load(path, procfs).map_err(AgentError::UnixMap)?;
            (Attestor::Unix(attestor), None, None)
        }
        AttestorKind::K8s => {
            let node = config.node_name.clone().ok_or(AgentError::NoNodeName)?;
            let client = kube::Client::try_default().await?;
            let (tx, rx) = watch::channel(NodePods::default());
            tokio::spawn(k8s::watch_node_pods(client.clone(), node, tx));
            tokio::spawn(prefetch(rx.clone(), td.clone(), certs.clone()));
            (
                Attestor::Kubernetes(KubernetesAttestor::new(procfs, td.clone(), rx.clone())),
                Some(rx),
                Some(client),
            )
        }
    };

    let mesh = mesh::spawn(
        td.clone(),
        mesh::Sources {
            kubernetes: kube_client.clone(),
            file: mesh_file,
        },
        metrics.clone(),
        shutdown.clone(),
    );
    let policies = policy_feed::spawn(
        policy_feed::Sources {
            kubernetes: kube_client.clone(),
            file: policy_file,
        },
        metrics.clone(),
        shutdown.clone(),
    );
    // Not a readiness condition: a proxy without routes balances over each Service as before,
    // and the Gateway API CRDs may never be installed.
    let route_state = routes::spawn(
        td.clone(),
        routes::Sources {
            kubernetes: kube_client,
            file: route_file,
        },
        mesh.clone(),
        metrics.clone(),
        shutdown.clone(),
    );

    let workloads = Workloads::new(
        Arc::new(attestor),
        certs,
        bundle_rx.clone(),
        metrics.clone(),
    );
    let listener = bind_socket(&config.socket)?;
    info!(socket = %config.socket.display(), admin = %config.admin_addr, "serving SDS, the SPIFFE Workload API, the mesh membership, the meshed Services, the policy feed and the route feed");

    let ready_rx = readiness(
        contacted_rx,
        pods_synced.clone(),
        mesh.clone(),
        policies.clone(),
        signalled,
    );
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| AgentError::Admin {
            addr: config.admin_addr,
            source,
        })?;
    let admin_shutdown = shutdown.clone();
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        if let Err(e) = admin::serve(admin_listener, registry, ready_rx, admin_shutdown).await {
            error!(error = %e, "admin server failed");
        }
    });

    let mut socket_shutdown = shutdown.clone();
    let serving = tonic::transport::Server::builder()
        .add_service(Sds::new(workloads.clone()).into_service())
        .add_service(WorkloadApi::new(workloads.clone()).into_service())
        .add_service(MeshApi::new(workloads.clone(), mesh.clone()).into_service())
        .add_service(ServicesApi::new(workloads.clone(), mesh).into_service())
        .add_service(RoutesApi::new(workloads.clone(), route_state).into_service())
        .add_service(PolicyApi::new(workloads.clone(), policies, pods_synced).into_service())
        .add_service(Admin::new(workloads).into_service())
        .serve_with_incoming_shutdown(
            // grpc-core clients' %-encoded socket path as :authority is fixed before h2 sees it.
            // Each connection's peer is recorded as it is accepted, so that a PID reused
            // before a later request on it is not attested as the process holding it then.
            UnixListenerStream::new(listener).filter_map({
                let procfs = Procfs::new(config.proc_root.clone());
                let slots = ConnectionSlots::new(
                    config.max_connections,
                    config.max_connections_per_process,
                    metrics.clone(),
                );
                move |conn| match conn {
                    Ok(stream) => H2AuthorityStream::accept(stream, &procfs, &slots).map(Ok),
                    Err(e) => Some(Err(e)),
                }
            }),
            async move {
                let _ = socket_shutdown.wait_for(|stop| *stop).await;
            },
        );
    // A graceful stop waits for open streams, and SDS / Workload API streams never end on their
    // own: once the grace period is over, give calls DRAIN_TIMEOUT, then stop anyway.
    let result = serve_then_drain(serving, shutdown, DRAIN_TIMEOUT).await;
    let _ = std::fs::remove_file(&config.socket);
    info!("agent stopped");
    result.transpose()?;
    Ok(())
}

fn read_bundle(path: &Path, td: &TrustDomain) -> Result<TrustBundle, AgentError> {
    let pem = std::fs::read_to_string(path).map_err(|source| AgentError::BundleRead {
        path: path.display().to_string(),
        source,
    })?;
    TrustBundle::from_pem(td.clone(), &pem).map_err(|source| AgentError::Bundle {
        path: path.display().to_string(),
        source,
    })
}

/// Binds the agent socket: a stale file from a crashed run is replaced, but a socket another
/// agent still answers on is not stolen. Mode 0666 so every workload on the node can connect;
/// who they are is decided by attestation, not by file permissions.
pub fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |reason: String| AgentError::Socket {
        path: path.display().to_string(),
        reason,
    };
    let io = |source: std::io::Error| AgentError::SocketIo {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
        // Workloads share this directory (a hostPath): if they could write to it, one could
        // replace the socket with its own server, or race our chmod with a symlink.
        let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(err(format!(
                "its directory {} is group- or world-writable (mode {:o}); make it 0755 and mount it read-only into pods",
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another process is serving on it; stop it first".into()));
        }
        warn!(socket = %path.display(), "replacing a stale socket file");
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

/// Keeps the certificate manager's wanted set equal to the identities of the live pods on this
/// node: fetched when a pod lands, forgotten when the last one leaves.
async fn prefetch(mut pods: watch::Receiver<NodePods>, td: TrustDomain, certs: CertManager) {
    loop {
        let wanted: BTreeSet<SpiffeId> = pods
            .borrow_and_update()
            .service_accounts()
            .into_iter()
            .filter_map(|(ns, sa)| SpiffeId::for_service_account(&td, &ns, &sa).ok())
            .collect();
        if certs.set_wanted(wanted).await.is_err() || pods.changed().await.is_err() {
            return;
        }
    }
}

/// Ready once the CA has been reached (its first trust bundle arrived), the mesh membership and
/// the policies are known (in Kubernetes: the meshed pods and the policy objects are listed, or
/// the policy CRDs found not installed) and, in Kubernetes, this node's pods are synced; not
/// after the shutdown signal.
fn readiness(
    contacted: watch::Receiver<bool>,
    pods: Option<watch::Receiver<NodePods>>,
    mesh: watch::Receiver<Arc<MeshState>>,
    policies: watch::Receiver<Arc<PolicySnapshot>>,
    signalled: watch::Receiver<bool>,
) -> watch::Receiver<Readiness> {
    let conditions = Conditions::new().watch("ca_contacted", contacted, |c| *c);
    let conditions = match pods {
        Some(pods) => conditions.watch("pods_synced", pods, |p| p.synced),
        None => conditions.fixed("pods_synced", true),
    };
    conditions
        .watch("mesh_synced", mesh, |m| m.is_synced())
        .watch("policies_synced", policies, |p| p.is_synced())
        .watch("not_shutting_down", signalled, |s| !*s)
        .spawn()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let live = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o666,
            "every workload may connect; attestation decides"
        );
        assert!(
            matches!(bind_socket(&path), Err(AgentError::Socket { .. })),
            "live socket"
        );
        drop(live); // the file stays, nobody answers: stale
        assert!(path.exists());
        bind_socket(&path).expect("a stale socket file is replaced");
    }

    #[tokio::test]
    async fn ready_once_the_ca_the_node_pods_the_mesh_membership_and_the_policies_are_in() {
        let (contacted_tx, contacted) = watch::channel(false);
        let (pods_tx, pods) = watch::channel(NodePods::default());
        let (mesh_tx, mesh) = watch::channel(Arc::new(MeshState::default()));
        let (policies_tx, policies) = watch::channel(Arc::new(PolicySnapshot::default()));
        let (signal_tx, signalled) = watch::channel(false);
        let rx = readiness(contacted, Some(pods), mesh, policies, signalled);
        let until = |state: &'static str| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    rx.wait_for(|r| r.to_string() == state),
                )
                .await
                .unwrap_or_else(|_| panic!("never {state}"))
                .map(|r| r.is_ready())
                .unwrap()
            }
        };
        assert!(
            !until("ca_contacted=false pods_synced=false mesh_synced=false policies_synced=false not_shutting_down=true")
                .await
        );
        contacted_tx.send_replace(true);
        pods_tx.send_modify(|pods| pods.synced = true);
        mesh_tx.send_replace(Arc::new(MeshState::new(1, BTreeMap::new(), [])));
        assert!(
            !until("ca_contacted=true pods_synced=true mesh_synced=true policies_synced=false not_shutting_down=true")
                .await
        );
        policies_tx.send_replace(Arc::new(PolicySnapshot {
            version: 1,
            ..PolicySnapshot::default()
        }));
        assert!(
            until("ca_contacted=true pods_synced=true mesh_synced=true policies_synced=true not_shutting_down=true").await
        );
        // SIGTERM: not ready at once, so the DaemonSet rollout does not count this pod.
        signal_tx.send_replace(true);
        assert!(
            !until("ca_contacted=true pods_synced=true mesh_synced=true policies_synced=true not_shutting_down=false").await
        );
    }

    #[test]
    fn a_writable_socket_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind_socket(&dir.path().join("agent.sock")).unwrap_err();
        assert!(err.to_string().contains("world-writable"), "{err}");
    }
}
