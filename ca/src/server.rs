//! `sigil ca serve`: wires the key source, the pod index, authentication, the gRPC services, the
//! trust-bundle ConfigMaps, the policy status conditions, the injection webhook and the admin
//! endpoint together, and runs them until shutdown: on SIGTERM it reports not ready at once,
//! serves on for `--shutdown-grace` (the Service still routes new callers here until the
//! endpoint is dropped), then stops accepting and lets calls in flight finish for up to
//! [`DRAIN_TIMEOUT`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use sigil_base::admin;
use sigil_base::readiness::Conditions;
use sigil_base::shutdown::{serve_then_drain, stop_after_grace};
use sigil_identity::{SpiffeId, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::authn::{Authenticator, TokenValidator};
use crate::authn_first::AuthenticateFirstLayer;
use crate::authority::Authority;
use crate::authz::{Authorizer, StaticEntries};
use crate::config::{AuthMode, CaConfig, DEFAULT_SERVICE_NAME, JWKS_REFRESH};
use crate::inject::{InjectConfig, TraceCollector};
use crate::jwt::Jwks;
use crate::metrics::{Metrics, Port};
use crate::plugin::PluginSource;
use crate::pods::{self, PodIndex};
use crate::service::{self, Ca, TtlPolicy};
use crate::source::{self, KeySource};
use crate::store::StateStore;
use crate::tls_server;
use crate::webhook;

/// Dead peers are found by HTTP/2 pings, so their connection slots are freed.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the grace period: how long calls in flight may take to finish. Streams
/// (WatchTrustBundle) never end on their own and are closed then; their clients reconnect to
/// another replica.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams one gRPC connection may have open at once (Envoy's edge advice is 100; an agent
/// needs its `--max-concurrent-fetches`, 8 by default, and one WatchTrustBundle).
const HTTP2_MAX_STREAMS: u32 = 64;
/// What a peer may send on a stream before the CA reads it: one largest request message.
const HTTP2_STREAM_WINDOW: u32 = service::MAX_REQUEST_BYTES as u32 + 5;
/// ...and on a connection, all streams together: unread request bytes one connection can make
/// the CA hold (hyper's default is 1 MiB per stream and per connection).
const HTTP2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// Request headers of one call: a 16 KiB token with room for the rest.
const HTTP2_MAX_HEADER_LIST: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("connecting to the Kubernetes API (needed for {needed_for}): {source}")]
    Kube {
        needed_for: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("--static-entries: {0}")]
    StaticEntries(#[from] crate::authz::StaticEntriesError),
    #[error("--jwks-file {path}: {source}")]
    JwksRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--jwks-file {path}: {source}")]
    JwksParse {
        path: String,
        #[source]
        source: crate::jwt::JwtError,
    },
    #[error("--jwks-file (OIDC discovery): {0}")]
    JwksDiscovery(#[source] crate::authn::AuthnError),
    #[error("--max-ttl must be at least --default-ttl")]
    TtlOrder,
    #[error(
        "--static-entries needs --auth certs: with tokens accepted, a node could get an entry's identity by token and bypass node checks"
    )]
    StaticEntriesNeedCertsAuth,
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Why the Kubernetes API is needed with this configuration, if it is.
fn kube_needed_for(config: &CaConfig) -> Option<&'static str> {
    if config.auth == AuthMode::Tokenreview {
        Some("--auth tokenreview")
    } else if config.auth == AuthMode::Jwks && config.jwks_file.is_none() {
        Some("--auth jwks without --jwks-file (OIDC discovery)")
    } else if config.state_dir.is_none() && config.plugin_dir.is_none() {
        Some("keeping the root in a Secret (no --state-dir)")
    } else {
        None
    }
}

pub async fn serve(config: CaConfig, signalled: watch::Receiver<bool>) -> Result<(), ServeError> {
    let td = TrustDomain::new(&config.trust_domain).map_err(ServeError::TrustDomain)?;
    if config.max_ttl < config.default_ttl {
        return Err(ServeError::TtlOrder);
    }
    // A static entry names an identity by certificate alone; where tokens are accepted, any node
    // could obtain that identity by token and then use the entry without a node check.
    if config.static_entries.is_some() && config.auth != AuthMode::Certs {
        return Err(ServeError::StaticEntriesNeedCertsAuth);
    }
    info!(config = ?config, "starting sigil CA");
    // Everything serves until `shutdown`: the grace period after the signal.
    let shutdown = stop_after_grace(signalled.clone(), config.shutdown_grace);

    let kube = match kube_needed_for(&config) {
        Some(needed_for) => Some(
            kube::Client::try_default()
                .await
                .map_err(|source| ServeError::Kube { needed_for, source })?,
        ),
        None => None,
    };

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let registry = Arc::new(registry);

    // The signing key.
    let key_source = match (
        &config.state_dir,
        &config.plugin_dir,
        &config.plugin_secret,
        &kube,
    ) {
        (Some(dir), _, _, _) => KeySource::SelfSigned(StateStore::Dir(dir.clone())),
        (None, Some(dir), _, _) => KeySource::Plugin(PluginSource::Dir(dir.clone())),
        (None, None, Some(name), Some(client)) => KeySource::Plugin(PluginSource::Secret {
            api: Box::new(kube::Api::namespaced(client.clone(), &config.namespace)),
            name: name.clone(),
        }),
        (None, None, _, Some(client)) => KeySource::SelfSigned(StateStore::secret(
            client.clone(),
            &config.namespace,
            &config.secret_name,
        )),
        (None, None, _, None) => {
            unreachable!("kube_needed_for covers keeping the root in a Secret")
        }
    };
    info!(source = %key_source.describe(), "signing key source");
    let (authority_tx, authority_rx) = watch::channel(Arc::new(Authority::empty(td.clone())));
    tokio::spawn(source::run(
        key_source,
        td.clone(),
        config.reload_interval,
        authority_tx,
        metrics.clone(),
        shutdown.clone(),
    ));

    // The pod index (Kubernetes only).
    let pods_rx = kube.as_ref().map(|client| {
        let (tx, rx) = watch::channel(PodIndex::default());
        tokio::spawn(pods::run(client.clone(), tx));
        rx
    });
    if pods_rx.is_none() && config.auth == AuthMode::Jwks {
        warn!(
            "no Kubernetes API: pod-bound tokens cannot be checked against their pod, so a token \
             outlives its pod until it expires, and node agents cannot impersonate"
        );
    }

    let validator = match config.auth {
        AuthMode::Tokenreview => {
            TokenValidator::TokenReview(kube.clone().expect("kube client for tokenreview"))
        }
        AuthMode::Certs => TokenValidator::Disabled,
        AuthMode::Jwks => {
            let (issuer, jwks) = match &config.jwks_file {
                Some(path) => (config.jwt_issuer.clone(), read_jwks_file(path)?),
                None => {
                    let client = kube.as_ref().expect("kube client for OIDC discovery");
                    crate::authn::fetch_cluster_jwks(client)
                        .await
                        .map_err(ServeError::JwksDiscovery)?
                }
            };
            let (tx, rx) = watch::channel(Arc::new(jwks));
            tokio::spawn(refresh_jwks(config.jwks_file.clone(), kube.clone(), tx));
            TokenValidator::Jwks { jwks: rx, issuer }
        }
    };
    let authn = Authenticator::new(
        td.clone(),
        config.audiences.clone(),
        validator,
        pods_rx.clone(),
        metrics.clone(),
    );
    let static_entries = match &config.static_entries {
        Some(path) => StaticEntries::load(path)?,
        None => StaticEntries::default(),
    };
    let authz = Authorizer::new(
        td.clone(),
        config
            .trusted_agents
            .iter()
            .cloned()
            .collect::<HashSet<_>>(),
        static_entries,
        pods_rx.clone(),
        config.auth != AuthMode::Certs,
    );
    let ca = Ca::new(
        authority_rx.clone(),
        authn,
        authz,
        TtlPolicy {
            default: config.default_ttl,
            max: config.max_ttl,
        },
        config.max_signs_per_caller,
        metrics.clone(),
    );

    if let (Some(client), false) = (&kube, config.no_root_configmaps) {
        tokio::spawn(crate::distribute::run(client.clone(), authority_rx.clone()));
    }
    // The policy objects' status conditions: the CA is the one sigil process that sees them all.
    if let Some(client) = &kube {
        tokio::spawn(crate::policy_status::run(client.clone(), metrics.clone()));
        // And the routes' and sigil traffic policies' status, for the same reason.
        tokio::spawn(crate::route_status::run(client.clone()));
    }

    let ready_rx = readiness(authority_rx.clone(), pods_rx, signalled);

    // TLS and gRPC.
    let serving_id = SpiffeId::for_service_account(&td, "sigil-system", "sigil-ca")
        .map_err(ServeError::TrustDomain)?;
    let mut names = vec![DEFAULT_SERVICE_NAME.to_string()];
    names.extend(config.server_names.iter().cloned());
    let (tls_tx, tls_rx) = watch::channel(None);
    tokio::spawn(tls_server::run_serving_cert(
        serving_id.clone(),
        names.clone(),
        authority_rx.clone(),
        tls_tx,
        vec![b"h2".to_vec()],
    ));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "gRPC",
            addr: config.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: "admin",
            addr: config.admin_addr,
            source,
        })?;
    info!(grpc = %config.listen, admin = %config.admin_addr, "listening");
    let admin_shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = admin::serve(admin_listener, registry, ready_rx, admin_shutdown).await {
            error!(error = %e, "admin server failed");
        }
    });

    // The injection webhook: only for a CA that serves a cluster.
    if let (Some(client), false) = (&kube, config.no_webhook) {
        let webhook_listener = TcpListener::bind(config.webhook_addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: "webhook",
                addr: config.webhook_addr,
                source,
            })?;
        info!(webhook = %config.webhook_addr, config = %config.webhook_config, "serving the injection webhook");
        let (webhook_tls_tx, webhook_tls_rx) = watch::channel(None);
        tokio::spawn(tls_server::run_serving_cert(
            serving_id,
            names,
            authority_rx.clone(),
            webhook_tls_tx,
            vec![b"http/1.1".to_vec()],
        ));
        tokio::spawn(webhook::keep_ca_bundle(
            client.clone(),
            config.webhook_config.clone(),
            authority_rx.clone(),
            metrics.clone(),
        ));
        let app = webhook::router(
            InjectConfig {
                image: config.proxy_image.clone(),
                proxy_uid: config.proxy_uid,
                excluded_namespaces: config.inject_excluded_namespaces.iter().cloned().collect(),
                trace_collector: config
                    .inject_trace_collector
                    .as_ref()
                    .map(|url| TraceCollector {
                        url: url.clone(),
                        protocol: config.inject_trace_protocol.clone(),
                    }),
            },
            metrics.clone(),
        );
        let (webhook_metrics, webhook_shutdown) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = webhook::serve(
                webhook_listener,
                webhook_tls_rx,
                app,
                webhook_metrics,
                webhook_shutdown,
            )
            .await
            {
                error!(error = %e, "webhook server failed");
            }
        });
    }

    let ca_for_layer = ca.clone();
    let (sigil_ca, istio_ca) = service::servers(ca);
    let limits = tls_server::ConnectionLimits {
        port: Port::Grpc,
        authenticated: config.max_connections,
        unauthenticated: tls_server::MAX_UNAUTHENTICATED_CONNECTIONS,
        per_source: config.max_connections_per_source,
        authenticate_within: Some(tls_server::AUTHENTICATE_WITHIN),
    };
    let mut grpc_shutdown = shutdown.clone();
    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .http2_max_header_list_size(HTTP2_MAX_HEADER_LIST)
        .layer(AuthenticateFirstLayer(ca_for_layer))
        .add_service(sigil_ca)
        .add_service(istio_ca)
        .serve_with_incoming_shutdown(
            tls_server::incoming(listener, tls_rx, metrics, limits),
            async move {
                let _ = grpc_shutdown.wait_for(|stop| *stop).await;
            },
        );
    serve_then_drain(serving, shutdown, DRAIN_TIMEOUT)
        .await
        .transpose()?;
    info!("CA stopped");
    Ok(())
}

fn read_jwks_file(path: &std::path::Path) -> Result<Jwks, ServeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServeError::JwksRead {
        path: path.display().to_string(),
        source,
    })?;
    Jwks::parse(&text).map_err(|source| ServeError::JwksParse {
        path: path.display().to_string(),
        source,
    })
}

/// Re-reads the JWKS periodically so the API server's key rotation is followed.
async fn refresh_jwks(
    file: Option<std::path::PathBuf>,
    kube: Option<kube::Client>,
    tx: watch::Sender<Arc<Jwks>>,
) {
    loop {
        tokio::time::sleep(JWKS_REFRESH).await;
        let fresh = match (&file, &kube) {
            (Some(path), _) => read_jwks_file(path).map_err(|e| e.to_string()),
            (None, Some(client)) => crate::authn::fetch_cluster_jwks(client)
                .await
                .map(|(_, jwks)| jwks)
                .map_err(|e| e.to_string()),
            (None, None) => return,
        };
        match fresh {
            Ok(jwks) => {
                tx.send_replace(Arc::new(jwks));
            }
            Err(e) => warn!(error = %e, "JWKS refresh failed; keeping the previous keys"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Ready while the key is loaded, (with Kubernetes) the pod index has synced, and no shutdown
/// signal arrived.
fn readiness(
    authority: watch::Receiver<crate::authority::SharedAuthority>,
    pods: Option<watch::Receiver<PodIndex>>,
    signalled: watch::Receiver<bool>,
) -> watch::Receiver<sigil_base::readiness::Readiness> {
    let conditions = Conditions::new().watch("key_loaded", authority, |a| a.signer.is_some());
    let conditions = match pods {
        Some(pods) => conditions.watch("pods_synced", pods, |p| p.synced),
        None => conditions.fixed("pods_synced", true),
    };
    conditions
        .watch("not_shutting_down", signalled, |s| !*s)
        .spawn()
}
