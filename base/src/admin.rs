//! The admin HTTP endpoint every sigil process serves: Prometheus `/metrics`, `/ready` (every
//! named readiness condition holds) and `/healthz` (the process answers).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::readiness::Readiness;

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    ready: watch::Receiver<Readiness>,
}

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: watch::Receiver<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_router(listener, router(registry, ready), shutdown).await
}

/// `/metrics`, `/ready` and `/healthz`, for a component that adds routes of its own.
pub fn router(registry: Arc<Registry>, ready: watch::Receiver<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(AdminState { registry, ready })
}

/// Serves `app` until `shutdown` flips.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "metrics encoding failed\n".to_string(),
        ),
    }
}

async fn ready_handler(State(state): State<AdminState>) -> impl IntoResponse {
    ready_response(&state.ready.borrow())
}

/// `/ready`'s answer: 200 when every condition holds, else 503 naming the conditions.
pub fn ready_response(ready: &Readiness) -> (StatusCode, String) {
    if ready.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {ready}\n"),
        )
    }
}
