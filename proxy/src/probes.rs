//! Kubelet probes under STRICT mTLS and deny-all policies. The kubelet cannot present a mesh
//! certificate, so the injector points HTTP probes at the proxy's metrics port instead
//! (`/app-health/<name>`, as Istio does), and the proxy makes the probe request itself to the
//! application on loopback. That port is not intercepted and not subject to policies, and only
//! the configured probes can be reached through it: one path on one port each, GET only.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::forward;

/// At most this long for the application's answer (the kubelet's own default is 1 s; a probe
/// configured with a longer timeout is cut here).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--app-probe NAME=PORT/PATH`: the probe `/app-health/NAME` asks `127.0.0.1:PORT/PATH`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AppProbe {
    pub name: String,
    pub port: u16,
    pub path: String,
}

pub fn parse_app_probe(s: &str) -> Result<AppProbe, String> {
    let (name, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PORT/PATH, e.g. web-ready=8080/healthz"))?;
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid_name {
        return Err(format!(
            "{name:?}: a probe name is letters, digits, '-', '_' and '.'"
        ));
    }
    let (port, path) = match target.split_once('/') {
        Some((port, path)) => (port, format!("/{path}")),
        None => (target, "/".to_string()),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(format!("{path:?} is not a request path"));
    }
    Ok(AppProbe {
        name: name.to_string(),
        port,
        path,
    })
}

/// The `/app-health/{name}` route, to merge into the metrics endpoint.
pub fn router(probes: Vec<AppProbe>) -> Router {
    Router::new()
        .route("/app-health/{name}", get(probe))
        .with_state(Arc::new(probes))
}

async fn probe(
    State(probes): State<Arc<Vec<AppProbe>>>,
    Path(name): Path<String>,
) -> (StatusCode, String) {
    let Some(probe) = probes.iter().find(|p| p.name == name) else {
        return (StatusCode::NOT_FOUND, format!("no probe named {name:?}\n"));
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask(probe)).await {
        Ok(Ok(status)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("probe {name}: application answered {status}\n"),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("probe {name}: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("probe {name}: no answer within {PROBE_TIMEOUT:?}\n"),
        ),
    }
}

/// One GET to the application; its status code.
async fn ask(probe: &AppProbe) -> Result<u16, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], probe.port));
    let stream = forward::connect(addr, PROBE_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(probe.path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "sigil-proxy-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_flags_parse_and_explain_mistakes() {
        assert_eq!(
            parse_app_probe("web-ready=8080/healthz/deep").unwrap(),
            AppProbe {
                name: "web-ready".into(),
                port: 8080,
                path: "/healthz/deep".into()
            }
        );
        assert_eq!(parse_app_probe("live=9090").unwrap().path, "/");
        for (bad, why) in [
            ("8080/healthz", "expected NAME=PORT/PATH"),
            ("=8080/x", "probe name"),
            ("a/b=8080/x", "probe name"),
            ("web=0/x", "not a port"),
            ("web=http/x", "not a port"),
            ("web=80/a b", "not a request path"),
        ] {
            let e = parse_app_probe(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
