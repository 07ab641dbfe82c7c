//! A plain HTTP/1.1 GET on a new connection, enough for an admin endpoint, a `/metrics` page or
//! Prometheus's API (`sigil stat`, the demo's checks). Plaintext only: a proxy's metrics port is
//! never redirected into mTLS.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("connecting to {authority}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {authority} within {timeout:?}")]
    Timeout {
        authority: String,
        timeout: Duration,
    },
    #[error("HTTP exchange with {authority}")]
    Exchange {
        authority: String,
        #[source]
        source: hyper::Error,
    },
}

/// GETs `url` (an absolute `http://` URL with a host) on a new connection; the status and the whole
/// body, within `timeout`.
pub async fn get(
    url: &http::Uri,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), GetError> {
    let authority = url.authority().map(ToString::to_string).unwrap_or_default();
    let exchange = async {
        // The host as a socket address takes no brackets around an IPv6 literal.
        let host = url
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = url.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|source| GetError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let exchange_error = |source| GetError::Exchange {
            authority: authority.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(exchange_error)?;
        tokio::spawn(connection);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::get(path)
            .header(http::header::HOST, &authority)
            .body(Empty::<Bytes>::new())
            .expect("a GET of a parsed URL's path is a valid request");
        let response = sender.send_request(request).await.map_err(exchange_error)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(exchange_error)?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(GetError::Timeout {
                authority: authority.clone(),
                timeout,
            })
        })
}
