//! Kubelet probes under STRICT mTLS and deny-all policies. The kubelet cannot present a mesh
//! certificate, so the injector points probes at the proxy's metrics port instead
//! (`/app-health/<name>`, as Istio does), and the proxy makes the probe itself to the
//! application on loopback: an HTTP or HTTPS GET, a TCP connect, or a gRPC health check. That
//! port is not intercepted and not subject to policies, and only the configured probes can be
//! reached through it: one path (or gRPC service) on one port each, GET only.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::dial;

/// At most this long for the application's answer (the kubelet's own default is 1 s; a probe
/// configured with a longer timeout is cut here).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a probe asks the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Http,
    /// HTTPS without verifying the application's certificate, as the kubelet does.
    Https,
    /// Passes when the application accepts a TCP connection.
    Tcp,
    /// `grpc.health.v1.Health/Check` over HTTP/2 without TLS, as the kubelet's gRPC probes do;
    /// passes when the application answers SERVING.
    Grpc,
}

/// `--app-probe NAME=[http:|https:|tcp:|grpc:]PORT[/PATH][#HEADER=VALUE]...`: the probe
/// `/app-health/NAME` asks `127.0.0.1:PORT` (`[::1]:PORT` if that refuses); for `grpc:` the PATH (without its slash) is the
/// service name checked. HTTP(S) probes send each `#HEADER=VALUE` (the pod's `httpHeaders`,
/// VALUE percent-encoded), a `Host` among them replacing the default, as Istio's agent does.
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppProbe {
    pub name: String,
    pub kind: ProbeKind,
    pub port: u16,
    /// The request path (HTTP and HTTPS), or `/` and the service name (gRPC).
    pub path: String,
    /// Request headers of an HTTP(S) probe, in order.
    #[serde(serialize_with = "header_names")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Start-up logs print the configuration: header names only, as on the status page.
impl std::fmt::Debug for AppProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppProbe")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("port", &self.port)
            .field("path", &self.path)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The status page shows which headers a probe sends, not their values (they may be tokens).
fn header_names<S: serde::Serializer>(
    headers: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|(name, _)| name.as_str()))
}

pub fn parse_app_probe(s: &str) -> Result<AppProbe, String> {
    let (name, target) = s.split_once('=').ok_or_else(|| {
        format!(
            "{s:?}: expected NAME=[http:|https:|tcp:|grpc:]PORT[/PATH][#HEADER=VALUE]..., e.g. \
             web-ready=8080/healthz"
        )
    })?;
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid_name {
        return Err(format!(
            "{name:?}: a probe name is letters, digits, '-', '_' and '.'"
        ));
    }
    let (kind, target) = match target.split_once(':') {
        Some(("http", rest)) => (ProbeKind::Http, rest),
        Some(("https", rest)) => (ProbeKind::Https, rest),
        Some(("tcp", rest)) => (ProbeKind::Tcp, rest),
        Some(("grpc", rest)) => (ProbeKind::Grpc, rest),
        Some((other, _)) => {
            return Err(format!(
                "{other:?}: a probe is http:, https:, tcp: or grpc:"
            ));
        }
        None => (ProbeKind::Http, target),
    };
    let mut parts = target.split('#');
    let target = parts.next().unwrap_or_default();
    let headers = parts
        .map(|header| parse_probe_header(header, kind))
        .collect::<Result<Vec<_>, _>>()?;
    let (port, path) = match target.split_once('/') {
        Some(_) if kind == ProbeKind::Tcp => {
            return Err(format!("{s:?}: a tcp: probe has a port and no path"));
        }
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
        kind,
        port,
        path,
        headers,
    })
}

/// One `HEADER=VALUE` of an HTTP(S) probe, VALUE percent-decoded.
fn parse_probe_header(
    header: &str,
    kind: ProbeKind,
) -> Result<(http::HeaderName, http::HeaderValue), String> {
    if !matches!(kind, ProbeKind::Http | ProbeKind::Https) {
        return Err(format!(
            "{header:?}: only http: and https: probes send headers"
        ));
    }
    let (name, value) = header
        .split_once('=')
        .ok_or_else(|| format!("{header:?}: a probe header is #NAME=VALUE"))?;
    let name = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not an HTTP header name"))?;
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
    let value = http::HeaderValue::from_bytes(&decoded)
        .map_err(|_| format!("the value of probe header {name} is not a valid header value"))?;
    Ok((name, value))
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

/// One probe of the application; the status code to answer with.
async fn ask(probe: &AppProbe) -> Result<u16, String> {
    let tcp = |addr| dial::connect(addr, PROBE_TIMEOUT);
    match probe.kind {
        ProbeKind::Tcp => on_loopback(probe.port, tcp).await.map(|_| 200),
        ProbeKind::Http => {
            let (addr, stream) = on_loopback(probe.port, tcp).await?;
            http_get(probe, addr, TokioIo::new(stream)).await
        }
        ProbeKind::Https => {
            let provider = sigil_identity::tls::crypto_provider();
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(KubeletLikeVerifier(provider)))
                .with_no_client_auth();
            let (addr, stream) = on_loopback(probe.port, tcp).await?;
            let name = ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS to {addr}: {e}"))?;
            http_get(probe, addr, TokioIo::new(tls)).await
        }
        ProbeKind::Grpc => {
            let (_, channel) = on_loopback(probe.port, grpc_channel).await?;
            grpc_check(probe, channel).await
        }
    }
}

/// `connect` to the application's `port` on loopback: at 127.0.0.1, or at ::1 when nothing
/// listens on 127.0.0.1 (an application bound to `::1`, or to `[::]` with IPV6_V6ONLY, as in
/// IPv6-only pods); with the address that answered.
async fn on_loopback<T, E, F, Fut>(port: u16, connect: F) -> Result<(SocketAddr, T), String>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + 'static,
{
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match connect(v4).await {
        Ok(connected) => Ok((v4, connected)),
        Err(e) if refused(&e) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            connect(v6)
                .await
                .map(|connected| (v6, connected))
                .map_err(|e6| format!("connecting to {v4}: {e}; to {v6}: {e6}"))
        }
        Err(e) => Err(format!("connecting to {v4}: {e}")),
    }
}

/// Whether `error`, or an error it wraps, is a refused TCP connection (nothing listening).
fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// An HTTP/2 channel to the application's gRPC server at `addr`.
async fn grpc_channel(
    addr: SocketAddr,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .connect()
        .await
}

/// `grpc.health.v1.Health/Check` of the service named by the probe's path: 200 when SERVING,
/// 503 otherwise.
async fn grpc_check(probe: &AppProbe, channel: tonic::transport::Channel) -> Result<u16, String> {
    use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
    use sigil_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
    let service = probe.path.trim_start_matches('/').to_string();
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .map_err(|status| format!("health check: {}: {}", status.code(), status.message()))?;
    Ok(match response.into_inner().status() {
        ServingStatus::Serving => 200,
        _ => 503,
    })
}

/// One GET of `probe.path` over `io`; the status code.
async fn http_get<I>(probe: &AppProbe, addr: SocketAddr, io: I) -> Result<u16, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = hyper::Request::get(probe.path.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    let host = http::HeaderValue::try_from(addr.to_string()).map_err(|e| e.to_string())?;
    headers.insert(http::header::HOST, host);
    headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("sigil-proxy-probe"),
    );
    // The pod's own headers win, Host and User-Agent included, as with the kubelet.
    for name in probe.headers.iter().map(|(name, _)| name) {
        headers.remove(name);
    }
    for (name, value) in &probe.headers {
        headers.append(name.clone(), value.clone());
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// The kubelet's HTTPS probes skip certificate verification (the application's certificate is
/// often self-signed or for another name); so does this. The handshake signature is still
/// checked, so the answer comes from whoever holds the key of the certificate shown.
#[derive(Debug)]
struct KubeletLikeVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for KubeletLikeVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
                kind: ProbeKind::Http,
                port: 8080,
                path: "/healthz/deep".into(),
                headers: Vec::new(),
            }
        );
        let with_headers =
            parse_app_probe("web-ready=https:8443/ready#Host=app.example#X-Token=a%23b%25c d")
                .unwrap();
        assert_eq!(with_headers.path, "/ready");
        assert_eq!(
            with_headers
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
                .collect::<Vec<_>>(),
            [("host", "app.example"), ("x-token", "a#b%c d")]
        );
        assert_eq!(parse_app_probe("live=9090").unwrap().path, "/");
        let https = parse_app_probe("web-live=https:8443/livez").unwrap();
        assert_eq!(
            (https.kind, https.port, https.path.as_str()),
            (ProbeKind::Https, 8443, "/livez")
        );
        let tcp = parse_app_probe("db-live=tcp:5432").unwrap();
        assert_eq!((tcp.kind, tcp.port), (ProbeKind::Tcp, 5432));
        assert_eq!(
            parse_app_probe("web=http:80/x").unwrap().kind,
            ProbeKind::Http
        );
        for (bad, why) in [
            ("8080/healthz", "expected NAME="),
            ("web=udp:53", "http:, https:, tcp: or grpc:"),
            ("db=tcp:5432/x", "no path"),
            ("=8080/x", "probe name"),
            ("a/b=8080/x", "probe name"),
            ("web=0/x", "not a port"),
            ("web=http/x", "not a port"),
            ("web=80/a b", "not a request path"),
            ("db=tcp:5432#X=1", "only http: and https:"),
            ("web=80/x#X", "#NAME=VALUE"),
            ("web=80/x#X Y=1", "not an HTTP header name"),
            ("web=80/x#X=a%0Ab", "not a valid header value"),
        ] {
            let e = parse_app_probe(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// An HTTPS app with a self-signed certificate for another name, answering 204 to one GET.
    async fn https_app() -> u16 {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(sigil_identity::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
                .accept(tcp)
                .await
                .unwrap();
            let mut head = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut head).await;
            let answer = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
            let _ = tokio::io::AsyncWriteExt::write_all(&mut tls, answer).await;
            let _ = tokio::io::AsyncWriteExt::flush(&mut tls).await;
        });
        port
    }

    #[tokio::test]
    async fn https_probes_skip_verification_as_the_kubelet_does_and_tcp_probes_connect() {
        let port = https_app().await;
        let https = parse_app_probe(&format!("app-live=https:{port}/livez")).unwrap();
        assert_eq!(ask(&https).await, Ok(204));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_port = listener.local_addr().unwrap().port();
        let tcp = parse_app_probe(&format!("db-live=tcp:{tcp_port}")).unwrap();
        assert_eq!(ask(&tcp).await, Ok(200));
        // Nothing listening any more: the probe fails.
        drop(listener);
        let refused = ask(&tcp).await.unwrap_err();
        assert!(refused.contains("connecting to"), "{refused}");
    }

    /// An HTTP app on `listener` answering `requests` requests, each on its own connection, with
    /// the status `status(head)` gives for its lower-cased head; returns the heads.
    fn http_app(
        listener: tokio::net::TcpListener,
        requests: usize,
        status: fn(&str) -> u16,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..requests {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = vec![0u8; 4096];
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut head)
                    .await
                    .unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
                let answer = format!("HTTP/1.1 {} -\r\ncontent-length: 0\r\n\r\n", status(&head));
                let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, answer.as_bytes()).await;
                heads.push(head);
            }
            heads
        })
    }

    /// 204 when the request carries the virtual host and token the pod's probe names (as an app
    /// behind a Host-routing server would), 404 otherwise.
    #[tokio::test]
    async fn http_probes_send_the_pods_headers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = http_app(listener, 2, |head| {
            let wanted = head.contains("\r\nhost: shop.example\r\n")
                && head.contains("\r\nx-token: a#b\r\n")
                && head.matches("\r\nhost:").count() == 1;
            if wanted { 204 } else { 404 }
        });
        let with = parse_app_probe(&format!(
            "web-live={port}/healthz#Host=shop.example#X-Token=a%23b"
        ))
        .unwrap();
        assert_eq!(ask(&with).await, Ok(204));
        let without = parse_app_probe(&format!("web-live={port}/healthz")).unwrap();
        assert_eq!(ask(&without).await, Ok(404));
        let heads = app.await.unwrap();
        assert!(
            heads[1].contains(&format!("host: 127.0.0.1:{port}")),
            "{}",
            heads[1]
        );
    }

    /// A gRPC app whose health service reports "" as SERVING and "db" as NOT_SERVING.
    struct Health;

    #[tonic::async_trait]
    impl sigil_proto::grpc::health::v1::health_server::Health for Health {
        async fn check(
            &self,
            request: tonic::Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
        ) -> Result<
            tonic::Response<sigil_proto::grpc::health::v1::HealthCheckResponse>,
            tonic::Status,
        > {
            use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
            let status = match request.into_inner().service.as_str() {
                "" => ServingStatus::Serving,
                "db" => ServingStatus::NotServing,
                _ => return Err(tonic::Status::not_found("unknown service")),
            };
            Ok(tonic::Response::new(
                sigil_proto::grpc::health::v1::HealthCheckResponse {
                    status: status as i32,
                },
            ))
        }

        type WatchStream = tokio_stream::Empty<
            Result<sigil_proto::grpc::health::v1::HealthCheckResponse, tonic::Status>,
        >;

        async fn watch(
            &self,
            _request: tonic::Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not used by probes"))
        }
    }

    #[tokio::test]
    async fn grpc_probes_pass_only_when_the_service_is_serving() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    sigil_proto::grpc::health::v1::health_server::HealthServer::new(Health),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let probe = |target: &str| parse_app_probe(&format!("app-live=grpc:{target}")).unwrap();
        assert_eq!(ask(&probe(&port.to_string())).await, Ok(200));
        assert_eq!(ask(&probe(&format!("{port}/db"))).await, Ok(503));
        let unknown = ask(&probe(&format!("{port}/other"))).await.unwrap_err();
        assert!(
            unknown.contains("NotFound") || unknown.contains("not found"),
            "{unknown}"
        );
    }

    /// An application listening on ::1 only (or on `[::]` with IPV6_V6ONLY, as in an IPv6-only
    /// pod): 127.0.0.1 refuses, and every kind of probe reaches it at [::1].
    #[tokio::test]
    async fn probes_fall_back_to_ipv6_loopback_when_ipv4_loopback_refuses() {
        let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "nothing on 127.0.0.1:{port}"
        );
        let http_app = http_app(listener, 2, |_| 204);
        let tcp = parse_app_probe(&format!("db-live=tcp:{port}")).unwrap();
        assert_eq!(ask(&tcp).await, Ok(200));
        let http = parse_app_probe(&format!("web-live={port}/healthz")).unwrap();
        assert_eq!(ask(&http).await, Ok(204));
        let heads = http_app.await.unwrap();
        assert!(
            heads[1].contains(&format!("host: [::1]:{port}")),
            "{}",
            heads[1]
        );

        // gRPC too, through tonic's own connector.
        let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    sigil_proto::grpc::health::v1::health_server::HealthServer::new(Health),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let grpc = parse_app_probe(&format!("app-live=grpc:{port}")).unwrap();
        assert_eq!(ask(&grpc).await, Ok(200));

        // Neither family listening: the probe fails naming both addresses.
        let gone = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let port = gone.local_addr().unwrap().port();
        drop(gone);
        let failed = ask(&parse_app_probe(&format!("x=tcp:{port}")).unwrap())
            .await
            .unwrap_err();
        assert!(
            failed.contains(&format!("127.0.0.1:{port}"))
                && failed.contains(&format!("[::1]:{port}")),
            "{failed}"
        );
    }
}
