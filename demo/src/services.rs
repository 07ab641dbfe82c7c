//! The two toy services: the backend, a small HTTP/1.1 application counting every request that
//! reaches it, and the frontend, the client side that sends requests through its proxy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one request may take end to end.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the backend answers on `GET /api/orders`.
pub const ORDERS_BODY: &str =
    r#"{"orders":[{"id":1,"item":"espresso"},{"id":2,"item":"croissant"}],"served_by":"backend"}"#;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("binding the backend application: {0}")]
    Bind(std::io::Error),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("no answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
}

/// The requests that reached the backend application, by `METHOD path`.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<BTreeMap<String, u64>>>);

impl Seen {
    fn record(&self, key: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// How many `METHOD path` requests reached the application.
    pub fn count(&self, method: &str, path: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{method} {path}"))
            .copied()
            .unwrap_or(0)
    }
}

/// The backend application on a loopback port: `GET /api/orders` answers JSON, `POST
/// /api/orders` 201, `GET /admin` an admin page, anything else 404. It has no security of its
/// own: whatever the proxy lets through, it serves.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start() -> Result<Backend, ServiceError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ServiceError::Bind)?;
        let addr = listener.local_addr().map_err(ServiceError::Bind)?;
        let seen = Seen::default();
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let counter = counter.clone();
                        async move { Ok::<_, Infallible>(answer(&counter, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Backend { addr, seen, task })
    }
}

fn answer<B>(seen: &Seen, request: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let method = request.method().as_str();
    let path = request.uri().path();
    seen.record(format!("{method} {path}"));
    let (status, body): (u16, &'static str) = match (method, path) {
        ("GET", "/api/orders") => (200, ORDERS_BODY),
        ("POST", "/api/orders") => (201, r#"{"created":3}"#),
        (_, "/admin") => (200, "backend admin panel: every secret is here\n"),
        _ => (404, "not found\n"),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response
}

/// A response as the frontend saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// One keep-alive HTTP/1.1 connection from the frontend to `addr` (its proxy's outbound
/// listener).
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Result<Connection, ServiceError> {
        let opening = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| ServiceError::Connect { addr, source })?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            Ok(Connection { sender })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, opening)
            .await
            .map_err(|_| ServiceError::Timeout)?
    }

    /// Sends `METHOD path` (host `backend`) and reads the whole answer.
    pub async fn send(&mut self, method: &str, path: &str) -> Result<Answer, ServiceError> {
        let exchange = async {
            self.sender.ready().await?;
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "backend")
                .body(Empty::new())?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok(Answer {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ServiceError::Timeout)?
    }
}

/// One request on a new connection, closed afterwards.
pub async fn request_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<Answer, ServiceError> {
    Connection::open(addr).await?.send(method, path).await
}

/// Connects to `addr` without TLS, writes an HTTP request and returns whatever came back before
/// the connection closed (or within a few seconds): empty when the peer refused to talk.
pub async fn plaintext_attempt(addr: SocketAddr) -> Result<Vec<u8>, ServiceError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ServiceError::Connect { addr, source })?;
    // The write may fail once the proxy has closed the connection: that is a refusal too.
    let _ = stream
        .write_all(b"GET /api/orders HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.read_to_end(&mut received)).await;
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_backend_serves_orders_and_counts_what_reached_it() {
        let backend = Backend::start().await.unwrap();
        let mut connection = Connection::open(backend.addr).await.unwrap();
        let orders = connection.send("GET", "/api/orders").await.unwrap();
        assert_eq!(orders.status, 200);
        assert_eq!(orders.body, ORDERS_BODY);
        let again = connection.send("GET", "/api/orders").await.unwrap();
        assert_eq!(again.status, 200, "keep-alive");
        let admin = request_once(backend.addr, "GET", "/admin").await.unwrap();
        assert_eq!(admin.status, 200);
        assert_eq!(backend.seen.count("GET", "/api/orders"), 2);
        assert_eq!(backend.seen.count("GET", "/admin"), 1);
        assert_eq!(backend.seen.count("POST", "/api/orders"), 0);
    }

    #[tokio::test]
    async fn a_refused_plaintext_attempt_comes_back_empty() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        });
        assert!(plaintext_attempt(addr).await.unwrap().is_empty());
    }
}
