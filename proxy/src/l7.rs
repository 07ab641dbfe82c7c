//! HTTP awareness on inbound connections, for policies with HTTP fields (methods, paths, hosts,
//! headers): telling HTTP/1.1 and HTTP/2 from other bytes by their first bytes, then serving the
//! connection as HTTP, deciding on every request, answering a denied one with 403 and forwarding
//! an allowed one to the application over one upstream connection of the same HTTP version.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client_h1, http2 as client_h2};
use hyper::server::conn::{http1 as server_h1, http2 as server_h2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The body of a denied request: Envoy's, so clients and dashboards that know it keep working.
pub const DENIED_BODY: &str = "RBAC: access denied\n";
/// The HTTP/2 connection preface's first bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes needed to tell the protocols apart.
pub const SNIFF_BYTES: usize = 8;

/// The HTTP version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

impl HttpVersion {
    /// The version the first bytes a client sent (at least [`SNIFF_BYTES`] unless it sent fewer)
    /// open, or None for anything that is not HTTP (decided on once, as a TCP connection).
    pub fn sniff(first: &[u8]) -> Option<HttpVersion> {
        const METHODS: [&[u8]; 9] = [
            b"GET ",
            b"POST ",
            b"PUT ",
            b"HEAD ",
            b"DELETE ",
            b"OPTIONS ",
            b"PATCH ",
            b"TRACE ",
            b"CONNECT ",
        ];
        let n = first.len().min(H2_PREFACE.len());
        if n >= 3 && first[..n] == H2_PREFACE[..n] {
            return Some(HttpVersion::Http2);
        }
        let is_method = METHODS.iter().any(|method| {
            let n = first.len().min(method.len());
            n >= 4 && first[..n] == method[..n]
        });
        is_method.then_some(HttpVersion::Http1)
    }
}

/// The attributes of one request that policies look at.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Decides on one request: true forwards it, false answers 403.
pub trait Authorize: Send + Sync + 'static {
    fn authorize(&self, request: &RequestInfo<'_>) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP handshake with the application: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("serving HTTP to the client: {0}")]
    Downstream(#[source] hyper::Error),
}

type ProxyBody = Either<Incoming, Full<Bytes>>;

enum Sender {
    Http1(tokio::sync::Mutex<client_h1::SendRequest<Incoming>>),
    Http2(client_h2::SendRequest<Incoming>),
}

impl Sender {
    async fn send(&self, request: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            // One request at a time on an HTTP/1.1 connection: the lock is never contended,
            // since the server side of this connection also handles one request at a time.
            Sender::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

fn denied() -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        DENIED_BODY.as_bytes(),
    ))));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"upstream unavailable\n",
    ))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

/// Serves `downstream` as `version` until either side closes, forwarding
/// allowed requests to `upstream`.
pub async fn serve<D, A>(
    downstream: D,
    upstream: TcpStream,
    version: HttpVersion,
    authorizer: Arc<A>,
) -> Result<(), HttpError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Authorize,
{
    let sender = match version {
        HttpVersion::Http2 => {
            let (sender, connection) =
                client_h2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await
                    .map_err(HttpError::Upstream)?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        }
        HttpVersion::Http1 => {
            let (sender, connection) = client_h1::handshake(TokioIo::new(upstream))
                .await
                .map_err(HttpError::Upstream)?;
            tokio::spawn(connection);
            Sender::Http1(tokio::sync::Mutex::new(sender))
        }
    };
    let sender = Arc::new(sender);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (sender, authorizer) = (sender.clone(), authorizer.clone());
        async move {
            let host = request
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    request
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or_default()
                .to_string();
            let info = RequestInfo {
                method: request.method().as_str(),
                path: request.uri().path(),
                host: &host,
                headers: request.headers(),
            };
            if !authorizer.authorize(&info) {
                return Ok::<_, Infallible>(denied());
            }
            Ok(match sender.send(request).await {
                Ok(response) => response.map(Either::Left),
                Err(_) => bad_gateway(),
            })
        }
    });
    let io = TokioIo::new(downstream);
    match version {
        HttpVersion::Http2 => server_h2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
            .map_err(HttpError::Downstream),
        HttpVersion::Http1 => server_h1::Builder::new()
            .serve_connection(io, service)
            .await
            .map_err(HttpError::Downstream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(
            HttpVersion::sniff(b"GET / HTTP/1.1\r\n"),
            Some(HttpVersion::Http1)
        );
        assert_eq!(
            HttpVersion::sniff(b"DELETE /x HTTP/1.1"),
            Some(HttpVersion::Http1)
        );
        assert_eq!(
            HttpVersion::sniff(b"OPTIONS * HTTP/1.1"),
            Some(HttpVersion::Http1)
        );
        assert_eq!(HttpVersion::sniff(H2_PREFACE), Some(HttpVersion::Http2));
        assert_eq!(HttpVersion::sniff(b"PRI * HT"), Some(HttpVersion::Http2));
        assert_eq!(HttpVersion::sniff(b"\x16\x03\x01\x02\x00"), None);
        assert_eq!(HttpVersion::sniff(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(HttpVersion::sniff(b"GETX"), None);
        assert_eq!(HttpVersion::sniff(b""), None);
    }
}
