//! The API server's side of a mutating admission webhook, for the tests that call the real injector
//! (tests/e2e/ca_webhook.rs, tests/e2e/readme_quickstart.rs): POSTing an AdmissionReview over HTTPS
//! while trusting only the webhook's caBundle for the Service's DNS name, and applying the JSON
//! patch of the answer to the pod, as the API server does.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A TLS connection to the webhook at `addr`, trusting only `ca_bundle` (PEM) for `server_name`
/// (`<service>.<namespace>.svc`), as the API server connects to a webhook Service.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    ca_bundle: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config =
        rustls::ClientConfig::builder_with_provider(sigil_identity::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(crate::root_store(ca_bundle))
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .unwrap_or_else(|e| panic!("{server_name} is not a DNS name: {e}"));
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS to the webhook, verified against the caBundle")
}

/// POSTs `body` to `path_and_query` of the webhook at `addr` over [`connect`], with the Host
/// header `server_name:port`, as the API server calls a webhook Service. Returns the status and
/// body.
pub async fn post(
    addr: SocketAddr,
    server_name: &str,
    port: u16,
    path_and_query: &str,
    ca_bundle: &[u8],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let tls = connect(addr, server_name, ca_bundle).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::post(path_and_query)
        .header("host", format!("{server_name}:{port}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

/// The certificates of a PEM bundle.
pub fn pem_certs(pem_bytes: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    pem::parse_many(pem_bytes)
        .unwrap()
        .into_iter()
        .map(|p| rustls::pki_types::CertificateDer::from(p.into_contents()))
        .collect()
}

/// The pod after the response's JSON patch, as the API server would apply it.
pub fn apply(review: &Value, response: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(patch) = response["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    pod
}
