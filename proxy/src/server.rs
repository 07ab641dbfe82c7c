//! `sigil proxy run`: wires the agent feeds (SDS certificates, mesh membership, meshed
//! Services), the listeners (transparent or explicit), the admin and metrics endpoints,
//! readiness, the span exporter (with a trace collector), and the drain on SIGTERM.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use sigil_base::admin;
use sigil_base::readiness::{Conditions, Readiness};
use sigil_identity::SpiffeId;
use sigil_identity::tls::TlsVersions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::balance::Balancers;
use crate::config::ProxyConfig;
use crate::forward::{self, Shared};
use crate::inbound::{self, AppTarget};
use crate::mesh;
use crate::metrics::{Direction, Metrics};
use crate::outbound::{self, Upstream};
use crate::policy::{self, PolicyState};
use crate::pool::Pools;
use crate::ratelimit::RateLimits;
use crate::tls::TlsState;
use crate::{admin as proxy_admin, probes, routes, sds, services};
use sigil_proxy_api::METRICS_PORT;
use sigil_proxy_api::mesh::MeshSnapshot;
use sigil_proxy_api::routes::RouteTable;
use sigil_proxy_api::services::ServiceTable;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("--explicit needs --inbound-listen and/or --outbound-listen")]
    NothingToServe,
    #[error("--outbound-identity: {0}")]
    OutboundIdentity(#[source] sigil_identity::spiffe::SpiffeIdError),
    #[error("--inbound-port and --outbound-port must differ")]
    SamePorts,
    #[error("binding {what} on {addr}: {source} (is another proxy running?)")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The listeners of one mode, bound before anything is announced as ready: in transparent
/// mode one per address family and direction, in explicit mode the given addresses.
struct Listeners {
    inbound: Vec<(TcpListener, AppTarget)>,
    outbound: Vec<(TcpListener, Upstream)>,
}

/// `EAFNOSUPPORT` (Linux): no IPv6 socket can be made at all (kernel booted with
/// `ipv6.disable=1`).
const EAFNOSUPPORT: i32 = 97;

/// Whether binding an IPv6 address failed because the network namespace has no IPv6 (rather than
/// because the port is taken or not ours).
fn ipv6_unavailable(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::AddrNotAvailable || error.raw_os_error() == Some(EAFNOSUPPORT)
}

/// A listening socket on `addr`, as `TcpListener::bind` makes one (SO_REUSEADDR, backlog 1024);
/// an IPv6 one accepts IPv6 only when `v6_only`, else IPv4 too (as IPv4-mapped addresses),
/// whatever `net.ipv6.bindv6only` says.
fn listen(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { what, addr, source })
}

/// Transparent mode's listeners on `port`: `0.0.0.0` and `[::]` (IPv6 only), one socket per
/// family, so that each accepted connection's family is its socket's (the original destination
/// is asked of the right family, and no IPv4-mapped address reaches policies, mesh membership or
/// logs). IPv6 is skipped where the network namespace has none; any other failure is fatal.
fn bind_each_family(what: &'static str, port: u16) -> Result<Vec<TcpListener>, ProxyError> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut listeners = vec![listen(v4, true).map_err(|source| ProxyError::Bind {
        what,
        addr: v4,
        source,
    })?];
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match listen(v6, true) {
        Ok(listener) => listeners.push(listener),
        Err(e) if ipv6_unavailable(&e) => {
            info!(what, addr = %v6, error = %e, "no IPv6 in this network namespace: listening on IPv4 only");
        }
        Err(source) => {
            return Err(ProxyError::Bind {
                what,
                addr: v6,
                source,
            });
        }
    }
    Ok(listeners)
}

/// The metrics endpoint: the given address as given, or by default `[::]:15020` for both
/// families (the kubelet and Prometheus reach the pod at its IPv6 address in IPv6-only
/// clusters).
fn bind_metrics(given: Option<SocketAddr>) -> Result<TcpListener, ProxyError> {
    let what = "the metrics endpoint";
    match given {
        // `[::]:P` is both families; a specific IPv6 address is that address only.
        Some(addr) => listen(addr, !addr.ip().is_unspecified())
            .map_err(|source| ProxyError::Bind { what, addr, source }),
        None => bind_dual_stack(what, METRICS_PORT),
    }
}

/// One socket on `[::]:port` taking both families, or on `0.0.0.0:port` where the network
/// namespace has no IPv6.
fn bind_dual_stack(what: &'static str, port: u16) -> Result<TcpListener, ProxyError> {
    let dual = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match listen(dual, false) {
        Ok(listener) => Ok(listener),
        Err(e) if ipv6_unavailable(&e) => {
            info!(what, error = %e, "no IPv6 in this network namespace: listening on IPv4 only");
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            listen(v4, true).map_err(|source| ProxyError::Bind {
                what,
                addr: v4,
                source,
            })
        }
        Err(source) => Err(ProxyError::Bind {
            what,
            addr: dual,
            source,
        }),
    }
}

async fn bind_listeners(config: &ProxyConfig) -> Result<Listeners, ProxyError> {
    if !config.explicit {
        if config.inbound_port == config.outbound_port {
            return Err(ProxyError::SamePorts);
        }
        let inbound = bind_each_family("the inbound listener", config.inbound_port)?;
        let outbound = bind_each_family("the outbound listener", config.outbound_port)?;
        return Ok(Listeners {
            inbound: inbound
                .into_iter()
                .map(|listener| (listener, AppTarget::OriginalPort))
                .collect(),
            outbound: outbound
                .into_iter()
                .map(|listener| (listener, Upstream::OriginalDestination))
                .collect(),
        });
    }
    let inbound = match (config.inbound_listen, config.inbound_app) {
        (Some(listen), Some(app)) => vec![(
            bind("the inbound listener", listen).await?,
            AppTarget::Fixed(app),
        )],
        _ => Vec::new(),
    };
    let outbound = match (
        config.outbound_listen,
        config.outbound_upstream,
        &config.outbound_identity,
    ) {
        (Some(listen), Some(upstream), Some(identity)) => {
            let identity = SpiffeId::parse(identity).map_err(ProxyError::OutboundIdentity)?;
            vec![(
                bind("the outbound listener", listen).await?,
                Upstream::Fixed(upstream, identity),
            )]
        }
        _ => Vec::new(),
    };
    if inbound.is_empty() && outbound.is_empty() {
        return Err(ProxyError::NothingToServe);
    }
    Ok(Listeners { inbound, outbound })
}

pub async fn run(
    config: ProxyConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    info!(config = ?config, workers = config.worker_threads(), "starting sigil proxy");
    let config = Arc::new(config);
    let listeners = bind_listeners(&config).await?;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let versions = if config.tls12 {
        TlsVersions::Tls12And13
    } else {
        TlsVersions::Tls13
    };

    let (tls_tx, tls_rx) = watch::channel(None::<Arc<TlsState>>);
    tokio::spawn(sds::run(
        config.agent_socket.clone(),
        versions,
        tls_tx,
        metrics.clone(),
    ));
    // Explicit mode names its upstream's identity itself; only transparent mode needs to know
    // which destinations are meshed.
    let needs_mesh = !config.explicit;
    let (mesh_tx, mesh_rx) = watch::channel(None::<Arc<MeshSnapshot>>);
    if needs_mesh {
        tokio::spawn(mesh::run(
            config.agent_socket.clone(),
            mesh_tx,
            metrics.clone(),
        ));
    }

    // Meshed Services make outbound HTTP per request; without them (explicit mode, an older
    // agent) outbound stays per connection.
    let (services_tx, services_rx) = watch::channel(None::<Arc<ServiceTable>>);
    if needs_mesh {
        tokio::spawn(services::run(
            config.agent_socket.clone(),
            tls_rx.clone(),
            services_tx,
            metrics.services_reconnects.clone(),
        ));
    }

    // Routes make outbound requests follow HTTPRoute/GRPCRoute rules; without them (explicit
    // mode, an older agent) every Service is balanced as it is.
    let (routes_tx, routes_rx) = watch::channel(None::<Arc<RouteTable>>);
    if needs_mesh {
        tokio::spawn(routes::run(
            config.agent_socket.clone(),
            routes_tx,
            metrics.route_updates_rejected.clone(),
            metrics.routes_reconnects.clone(),
        ));
    }

    let (policies_tx, policies_rx) = watch::channel(None::<Arc<PolicyState>>);
    tokio::spawn(policy::feed::run(
        config.agent_socket.clone(),
        policies_tx,
        metrics.clone(),
    ));

    let (draining_tx, draining_rx) = watch::channel(false);
    let ready_rx = readiness(
        tls_rx.clone(),
        needs_mesh.then(|| mesh_rx.clone()),
        policies_rx.clone(),
        draining_rx,
    );

    let admin_listener = bind("the admin endpoint", config.admin_addr).await?;
    let metrics_listener = bind_metrics(config.metrics_addr)?;
    let (endpoints_stop_tx, endpoints_stop) = watch::channel(false);
    tokio::spawn({
        let (config, tls, mesh, routes, ready, stop) = (
            config.clone(),
            tls_rx.clone(),
            mesh_rx.clone(),
            routes_rx.clone(),
            ready_rx.clone(),
            endpoints_stop.clone(),
        );
        async move {
            if let Err(e) =
                proxy_admin::serve(admin_listener, config, tls, mesh, routes, ready, stop).await
            {
                error!(error = %e, "admin endpoint failed");
            }
        }
    });
    tokio::spawn({
        let app = admin::router(Arc::new(registry), ready_rx)
            .merge(probes::router(config.app_probes.clone()));
        async move {
            if let Err(e) = admin::serve_router(metrics_listener, app, endpoints_stop).await {
                error!(error = %e, "metrics endpoint failed");
            }
        }
    });

    // Spans leave through one exporter task; the data path only queues them. It is stopped
    // (after flushing) once the connections that make spans are gone.
    let (exporter_stop_tx, exporter_stop) = watch::channel(false);
    let (tracer, exporter) = match config.trace_config() {
        Some(trace) => {
            info!(
                collector = %trace.collector,
                protocol = ?trace.protocol,
                sampling = trace.sampling,
                "exporting spans"
            );
            let (tracer, task) = crate::trace::export::start(
                &trace,
                tls_rx.clone(),
                metrics.trace.clone(),
                exporter_stop,
            );
            (tracer, Some(task))
        }
        None => (crate::trace::Tracer::disabled(), None),
    };
    let (close_tx, close_rx) = watch::channel(false);
    let pools = Arc::new(Pools::new(
        tls_rx.clone(),
        metrics.clone(),
        config.connect_timeout,
        config.max_connections_per_endpoint as usize,
    ));
    let shared = Shared {
        config: config.clone(),
        rate_limits: Arc::new(RateLimits::new(
            routes_rx.clone(),
            services_rx.clone(),
            metrics.clone(),
        )),
        routes: routes_rx,
        balancers: Arc::new(Balancers::new(metrics.clone())),
        pools,
        retry_budgets: Arc::default(),
        app_pools: Arc::default(),
        tracer,
        services: services_rx,
        tls: tls_rx,
        mesh: mesh_rx,
        metrics,
        policies: policies_rx,
        close: close_rx,
        inbound_slots: Arc::new(tokio::sync::Semaphore::new(
            config.max_inbound_connections as usize,
        )),
    };
    tokio::spawn(
        shared
            .balancers
            .clone()
            .follow(shared.services.clone(), shared.routes.clone()),
    );
    let tracker = TaskTracker::new();
    let (inbound_stop_tx, inbound_stop) = watch::channel(false);
    let (outbound_stop_tx, outbound_stop) = watch::channel(false);
    let mut accepting = Vec::new();
    // One accept loop per listener (per family in transparent mode), all stopped together.
    for (listener, target) in listeners.inbound {
        info!(addr = %local(&listener), app = ?target, "inbound listener");
        let shared = shared.clone();
        accepting.push(tokio::spawn(forward::accept_loop(
            listener,
            Direction::Inbound,
            tracker.clone(),
            inbound_stop.clone(),
            move |stream, peer| inbound::handle(stream, peer, target, shared.clone()),
        )));
    }
    for (listener, upstream) in listeners.outbound {
        info!(addr = %local(&listener), ?upstream, "outbound listener");
        let shared = shared.clone();
        accepting.push(tokio::spawn(forward::accept_loop(
            listener,
            Direction::Outbound,
            tracker.clone(),
            outbound_stop.clone(),
            move |stream, peer| outbound::handle(stream, peer, upstream.clone(), shared.clone()),
        )));
    }

    let _ = shutdown.wait_for(|stop| *stop).await;
    // Drain: report not ready and refuse new inbound connections at once; keep outbound open so
    // the application's own shutdown calls still work; let live connections finish for up to
    // --drain-timeout, then close what is left.
    let _ = draining_tx.send(true);
    let _ = inbound_stop_tx.send(true);
    tracker.close();
    info!(
        open_connections = tracker.len(),
        drain_timeout_s = config.drain_timeout.as_secs_f64(),
        "draining"
    );
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        info!(
            open_connections = tracker.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    let _ = outbound_stop_tx.send(true);
    let _ = close_tx.send(true);
    // Closed connections write their access-log lines; this is quick.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tracker.wait()).await;
    // Their spans are queued now: the exporter sends what it can within the drain timeout.
    let _ = exporter_stop_tx.send(true);
    if let Some(exporter) = exporter
        && tokio::time::timeout(config.drain_timeout, exporter)
            .await
            .is_err()
    {
        info!("the span exporter did not finish within the drain timeout");
    }
    let _ = endpoints_stop_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    info!("proxy stopped");
    Ok(())
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// Ready once the agent's certificate, the policies (and, in transparent mode, the mesh
/// membership) arrived, and not while draining.
fn readiness(
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    mesh: Option<watch::Receiver<Option<Arc<MeshSnapshot>>>>,
    policies: watch::Receiver<Option<Arc<PolicyState>>>,
    draining: watch::Receiver<bool>,
) -> watch::Receiver<Readiness> {
    let mut conditions = Conditions::new().watch("certificate", tls, Option::is_some);
    if let Some(mesh) = mesh {
        conditions = conditions.watch("mesh_membership", mesh, Option::is_some);
    }
    conditions
        .watch("policies", policies, Option::is_some)
        .watch("not_draining", draining, |draining| !*draining)
        .spawn()
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    /// A port free on both families right now.
    fn free_port() -> u16 {
        let probe = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), false).unwrap();
        probe.local_addr().unwrap().port()
    }

    /// The peer address `listener` sees for a connection from `to`'s family to `to`.
    async fn peer_seen(listener: &TcpListener, to: SocketAddr) -> SocketAddr {
        let (_client, accepted) = tokio::join!(TcpStream::connect(to), listener.accept());
        accepted.unwrap().1
    }

    #[tokio::test]
    async fn transparent_listeners_are_one_socket_per_family_on_the_same_port() {
        let port = free_port();
        let listeners = bind_each_family("the test listener", port).unwrap();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(
            addrs,
            [
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            ]
        );
        // Each family arrives on its own socket, never as an IPv4-mapped address.
        let v4 = peer_seen(&listeners[0], SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
        assert_eq!(v4.ip(), Ipv4Addr::LOCALHOST);
        let v6 = peer_seen(&listeners[1], SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await;
        assert_eq!(v6.ip(), Ipv6Addr::LOCALHOST);
    }

    #[tokio::test]
    async fn an_ipv6_port_taken_by_another_process_is_fatal_not_skipped() {
        let port = free_port();
        let _taken = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true).unwrap();
        match bind_each_family("the test listener", port) {
            Err(ProxyError::Bind { addr, source, .. }) => {
                assert_eq!(addr, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a bind error, got {:?}", other.map(|l| l.len())),
        }
    }

    #[test]
    fn only_a_missing_ipv6_is_skipped() {
        const EADDRINUSE: i32 = 98;
        const EADDRNOTAVAIL: i32 = 99;
        const EACCES: i32 = 13;
        for (errno, skipped) in [
            (EAFNOSUPPORT, true),
            (EADDRNOTAVAIL, true),
            (EADDRINUSE, false),
            (EACCES, false),
        ] {
            let error = io::Error::from_raw_os_error(errno);
            assert_eq!(ipv6_unavailable(&error), skipped, "{error}");
        }
    }

    #[tokio::test]
    async fn the_default_metrics_socket_answers_both_families() {
        let port = free_port();
        let listener = bind_dual_stack("the test endpoint", port).unwrap();
        assert_eq!(
            listener.local_addr().unwrap(),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        );
        let v6 = peer_seen(&listener, SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await;
        assert_eq!(v6.ip(), Ipv6Addr::LOCALHOST);
        // IPv4 arrives IPv4-mapped on a dual-stack socket, which forward::canonical undoes.
        let v4 = peer_seen(&listener, SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
        assert_eq!(v4.ip(), Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(forward::canonical(v4).ip(), Ipv4Addr::LOCALHOST);
    }

    #[tokio::test]
    async fn a_given_metrics_address_is_bound_as_given() {
        let port = free_port();
        let v6_only = bind_metrics(Some(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))).unwrap();
        assert!(
            TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                .await
                .is_err(),
            "[::1] takes no IPv4"
        );
        drop(v6_only);
        let v4 = bind_metrics(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))).unwrap();
        assert_eq!(
            v4.local_addr().unwrap(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        );
    }
}
