//! What the socket APIs' tests share: a real sigil CA run in-process (made with the `sigil ca`
//! commands as an operator would), and an agent in front of it (CA client, certificate manager,
//! the real Unix attestor) serving one API on a Unix socket as the agent serves it (the peer
//! recorded at accept, the :authority adapter in front of h2), with a client channel to it.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use prometheus_client::registry::Registry;
use sigil_ca::cli::{CaCommand, InitArgs, IssueArgs};
use sigil_ca::config::CaConfig;
use sigil_identity::tls::CertifiedKey;
use sigil_identity::{TrustBundle, TrustDomain};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Server};

use crate::attest::Attestor;
use crate::attest::procfs::Procfs;
use crate::attest::unix::UnixAttestor;
use crate::ca_client::{CaClient, Credential};
use crate::certs::{CertConfig, CertManager};
use crate::h2_authority::H2AuthorityStream;
use crate::mesh::{MeshApi, MeshState};
use crate::metrics::{ApiLabels, Metrics, SocketApi};
use crate::peer::{self, Workloads};
use crate::policy_feed::{PolicyApi, PolicySnapshot};
use crate::routes::{RouteState, RoutesApi};
use crate::sds::Sds;
use crate::services::ServicesApi;
use crate::workload_api::WorkloadApi;

pub(crate) const AGENT_ID: &str = "spiffe://cluster.local/ns/sigil-system/sa/sigil-agent";
pub(crate) const WEB_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
pub(crate) const DB_ID: &str = "spiffe://cluster.local/ns/demo/sa/db";

pub(crate) fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

pub(crate) fn free_addr() -> SocketAddr {
    sigil_base::ports::unused_loopback_addr().unwrap()
}

pub(crate) fn this_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A Unix attestor map giving `uid` the identity `web`.
pub(crate) fn uid_is_web(uid: u32) -> String {
    format!("workloads:\n- {{uid: {uid}, id: {WEB_ID}}}\n")
}

/// Runs a `sigil ca` command to completion.
pub(crate) async fn ca_command(command: CaCommand) {
    sigil_ca::cli::run(command, watch::channel(false).1)
        .await
        .unwrap();
}

/// `sigil ca serve`'s flags, parsed as the CLI parses them.
#[derive(Parser)]
struct CaFlags {
    #[command(flatten)]
    config: CaConfig,
}

/// A real CA (state directory, client-certificate auth, a static entry letting the agent issue
/// `web` and `db`, as `sigil ca serve --auth certs --static-entries` outside Kubernetes) and the
/// agent's bootstrap certificate.
pub(crate) struct TestCa {
    dir: TempDir,
    grpc: SocketAddr,
    admin: SocketAddr,
    pub(crate) agent: CertifiedKey,
    pub(crate) bundle: TrustBundle,
    /// Dropping it stops the CA.
    shutdown: Option<watch::Sender<bool>>,
}

impl TestCa {
    /// The CA's state and the agent's certificate, with the CA not serving yet.
    pub(crate) async fn prepare() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        ca_command(CaCommand::Init(InitArgs {
            state_dir: state.clone(),
            trust_domain: "cluster.local".into(),
        }))
        .await;
        let out = dir.path().join("agent");
        ca_command(CaCommand::Issue(IssueArgs {
            state_dir: state,
            trust_domain: "cluster.local".into(),
            id: AGENT_ID.into(),
            ttl: Duration::from_secs(3600),
            out_dir: out.clone(),
        }))
        .await;
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
        let agent = CertifiedKey::from_pem(&read("cert.pem"), &read("key.pem")).unwrap();
        let bundle = TrustBundle::from_pem(td(), &read("bundle.pem")).unwrap();
        std::fs::write(
            dir.path().join("entries.yaml"),
            format!("agents:\n- id: {AGENT_ID}\n  may_issue: [{WEB_ID}, {DB_ID}]\n"),
        )
        .unwrap();
        TestCa {
            dir,
            grpc: free_addr(),
            admin: free_addr(),
            agent,
            bundle,
            shutdown: None,
        }
    }

    /// A prepared CA, serving.
    pub(crate) async fn started() -> TestCa {
        let mut ca = TestCa::prepare().await;
        ca.start().await;
        ca
    }

    /// Where `sigil ca` keeps its keys, for commands such as a root rotation.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Serves until the test ends; returns once the CA is ready.
    pub(crate) async fn start(&mut self) {
        let (state, entries) = (self.state_dir(), self.dir.path().join("entries.yaml"));
        let flags = CaFlags::try_parse_from([
            "ca",
            "--listen",
            &self.grpc.to_string(),
            "--admin-addr",
            &self.admin.to_string(),
            "--server-name",
            "localhost",
            "--state-dir",
            state.to_str().unwrap(),
            "--auth",
            "certs",
            "--static-entries",
            entries.to_str().unwrap(),
            "--max-ttl",
            "24h",
            // Root rotations made with `ca_command` are picked up quickly.
            "--reload-interval",
            "100ms",
            "--no-root-configmaps",
        ])
        .unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if let Err(e) = sigil_ca::server::serve(flags.config, rx).await {
                panic!("the test CA failed: {e}");
            }
        });
        self.shutdown = Some(tx);
        self.wait_ready().await;
    }

    /// Waits for the CA's `/ready` to answer 200 (its key is loaded).
    async fn wait_ready(&self) {
        let admin = self.admin;
        for _ in 0..300 {
            if let Ok(mut stream) = TcpStream::connect(admin).await {
                let request =
                    format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).await.is_ok()
                    && stream.read_to_string(&mut answer).await.is_ok()
                    && answer.starts_with("HTTP/1.1 200")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the CA never became ready");
    }
}

/// Where the agent's trust bundle comes from.
pub(crate) enum BundleSource {
    /// The CA's WatchTrustBundle stream, as in production.
    Ca,
    /// Only what the test sends on [`TestAgent::bundle_tx`].
    Test,
}

/// One API of the agent on a real Unix socket, with certificates from a [`TestCa`] (started or
/// not) and callers attested by the Unix attestor.
pub(crate) struct TestAgent {
    pub(crate) ca: TestCa,
    api: SocketApi,
    pub(crate) socket: PathBuf,
    _socket_dir: TempDir,
    pub(crate) certs: CertManager,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) bundle_tx: watch::Sender<Arc<TrustBundle>>,
    /// The membership and Services the mesh and services APIs serve (version 0, not synced,
    /// until a test sends one).
    pub(crate) mesh_tx: watch::Sender<Arc<MeshState>>,
    /// The policies the policy API serves (version 0, not synced, until a test sends some).
    pub(crate) policy_tx: watch::Sender<Arc<PolicySnapshot>>,
    /// The routes the route API serves (version 0, not synced, until a test sends some).
    pub(crate) route_tx: watch::Sender<Arc<RouteState>>,
    _credential: watch::Sender<Arc<CertifiedKey>>,
}

impl TestAgent {
    /// Serves `api` with certificates of `ttl`, attesting callers with `unix_map` (the Unix
    /// attestor's YAML).
    pub(crate) async fn serve(
        api: SocketApi,
        ca: TestCa,
        ttl: Duration,
        unix_map: &str,
        bundle_source: BundleSource,
    ) -> TestAgent {
        let (bundle_tx, bundle_rx) = watch::channel(Arc::new(ca.bundle.clone()));
        let (credential, credential_rx) = watch::channel(Arc::new(ca.agent.clone()));
        let client = CaClient::new(
            ca.grpc.to_string(),
            "localhost".into(),
            bundle_rx.clone(),
            Credential::Certificate(credential_rx),
        );
        if let BundleSource::Ca = bundle_source {
            tokio::spawn(client.clone().follow_bundle(
                td(),
                bundle_tx.clone(),
                watch::channel(false).0,
            ));
        }
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let certs = CertManager::spawn(
            client,
            CertConfig {
                ttl,
                max_concurrent_fetches: 8,
                own_id: Some(AGENT_ID.parse().unwrap()),
            },
            metrics.clone(),
        );
        let attestor = UnixAttestor::parse(unix_map, "test", Procfs::host()).unwrap();
        let workloads = Workloads::new(
            Arc::new(Attestor::Unix(attestor)),
            certs.clone(),
            bundle_rx,
            metrics.clone(),
        );
        let (mesh_tx, mesh_rx) = watch::channel(Arc::new(MeshState::default()));
        let (policy_tx, policy_rx) = watch::channel(Arc::new(PolicySnapshot::default()));
        let (route_tx, route_rx) = watch::channel(Arc::new(RouteState::default()));
        let routes = match api {
            SocketApi::Sds => Routes::new(Sds::new(workloads).into_service()),
            SocketApi::WorkloadApi => Routes::new(WorkloadApi::new(workloads).into_service()),
            SocketApi::Mesh => Routes::new(MeshApi::new(workloads, mesh_rx).into_service()),
            SocketApi::Services => Routes::new(ServicesApi::new(workloads, mesh_rx).into_service()),
            // Unix-attested callers: their scope needs no pods.
            SocketApi::Policy => {
                Routes::new(PolicyApi::new(workloads, policy_rx, None).into_service())
            }
            SocketApi::Routes => Routes::new(RoutesApi::new(workloads, route_rx).into_service()),
        };
        let socket_dir = tempfile::tempdir().unwrap();
        let socket = socket_dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // Accepted as the agent accepts: peer recorded, bytes through the :authority adapter.
        let slots = peer::ConnectionSlots::new(
            peer::DEFAULT_MAX_CONNECTIONS,
            peer::DEFAULT_MAX_CONNECTIONS_PER_PROCESS,
            metrics.clone(),
        );
        let accepted = UnixListenerStream::new(listener).filter_map(move |conn| match conn {
            Ok(stream) => H2AuthorityStream::accept(stream, &Procfs::host(), &slots).map(Ok),
            Err(e) => Some(Err(e)),
        });
        tokio::spawn(
            Server::builder()
                .add_routes(routes)
                .serve_with_incoming(accepted),
        );
        TestAgent {
            ca,
            api,
            socket,
            _socket_dir: socket_dir,
            certs,
            metrics,
            bundle_tx,
            mesh_tx,
            policy_tx,
            route_tx,
            _credential: credential,
        }
    }

    /// A gRPC channel over the agent's socket.
    pub(crate) async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    /// `sigil_agent_streams` for the API served.
    pub(crate) fn streams_open(&self) -> i64 {
        self.metrics.streams.get_or_create(&self.labels()).get()
    }

    /// `sigil_agent_pushes` for the API served.
    pub(crate) fn pushes(&self) -> u64 {
        self.metrics.pushes.get_or_create(&self.labels()).get()
    }

    fn labels(&self) -> ApiLabels {
        ApiLabels { api: self.api }
    }
}
