//! The proxy's admin endpoint (--admin-addr, loopback by default): `/certs` (the certificate in
//! use and the trust bundle; `/certs/chain.pem` and `/certs/bundle.pem` as PEM for
//! `sigil inspect cert`), `/config` (the effective configuration, mesh membership and the version of the route table
//! in force with the Service ports it routes) and
//! `/ready`. Prometheus metrics are served separately on --metrics-addr.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::{Value, json};
use sigil_base::readiness::Readiness;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::tls::TlsState;
use sigil_proxy_api::mesh::MeshSnapshot;
use sigil_proxy_api::routes::RouteTable;

#[derive(Clone)]
struct AdminState {
    config: Arc<ProxyConfig>,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    mesh: watch::Receiver<Option<Arc<MeshSnapshot>>>,
    routes: watch::Receiver<Option<Arc<RouteTable>>>,
    ready: watch::Receiver<Readiness>,
}

pub async fn serve(
    listener: TcpListener,
    config: Arc<ProxyConfig>,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    mesh: watch::Receiver<Option<Arc<MeshSnapshot>>>,
    routes: watch::Receiver<Option<Arc<RouteTable>>>,
    ready: watch::Receiver<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/certs", get(certs))
        .route("/certs/chain.pem", get(chain_pem))
        .route("/certs/bundle.pem", get(bundle_pem))
        .route("/config", get(config_dump))
        .route("/ready", get(ready_handler))
        .with_state(AdminState {
            config,
            tls,
            mesh,
            routes,
            ready,
        });
    sigil_base::admin::serve_router(listener, app, shutdown).await
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The chain (leaf first) the proxy presents now, as PEM.
async fn chain_pem(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.tls.borrow().as_ref() {
        Some(tls) => (StatusCode::OK, tls.chain_pem.clone()),
        None => no_certificate_yet(),
    }
}

/// The trust bundle the proxy verifies peers against, as PEM.
async fn bundle_pem(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.tls.borrow().as_ref() {
        Some(tls) => (StatusCode::OK, tls.bundle.to_pem()),
        None => no_certificate_yet(),
    }
}

fn no_certificate_yet() -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "no certificate from the agent yet\n".to_string(),
    )
}

async fn certs(State(state): State<AdminState>) -> impl IntoResponse {
    let Some(tls) = state.tls.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "no certificate from the agent yet"})),
        );
    };
    let now = unix(SystemTime::now());
    let roots: Vec<Value> = tls
        .bundle
        .roots
        .iter()
        .map(|root| match sigil_identity::profile::inspect_cert(root) {
            Ok(report) => json!({
                "subject": report.subject,
                "serial": report.serial_hex,
                "not_after_unix": report.not_after.unix_timestamp(),
            }),
            Err(e) => json!({"error": e.to_string()}),
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({
            "identity": tls.id.to_string(),
            "serial": tls.serial,
            "not_before_unix": unix(tls.not_before),
            "not_after_unix": unix(tls.not_after),
            "expires_in_seconds": unix(tls.not_after) - now,
            "trust_domain": tls.bundle.trust_domain.as_str(),
            "roots": roots,
        })),
    )
}

async fn config_dump(State(state): State<AdminState>) -> Json<Value> {
    let mesh = state.mesh.borrow().clone();
    let members = mesh.as_ref().map(|m| {
        json!({
            "version": m.version,
            "members": m
                .members
                .iter()
                .map(|(ip, member)| json!({
                    "ip": ip.to_string(),
                    "identities": member.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "source": member.source,
                }))
                .collect::<Vec<_>>(),
        })
    });
    // The version says which update is in force; `sigil inspect route` explains the rules.
    let routes = state.routes.borrow().clone().map(|table| {
        json!({
            "version": table.version,
            "ports": table.routes.ports.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "backends": table.routes.backends.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "inbound": table.routes.inbound.keys().map(ToString::to_string).collect::<Vec<_>>(),
        })
    });
    Json(json!({
        "config": &*state.config,
        "mesh": members,
        "routes": routes,
    }))
}

async fn ready_handler(State(state): State<AdminState>) -> impl IntoResponse {
    sigil_base::admin::ready_response(&state.ready.borrow())
}
