//! A plain HTTP/1.1 GET, enough for Prometheus's API and a proxy's `/metrics` (both plaintext:
//! a proxy's metrics port is never redirected into mTLS; reach a Prometheus behind TLS through
//! `kubectl port-forward`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{url:?} is not a URL")]
    Invalid {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(
        "{url:?}: only http:// is supported (use kubectl port-forward to reach a server behind TLS)"
    )]
    NotHttp { url: String },
    #[error("{url:?} has no host")]
    NoHost { url: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
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

/// An absolute `http://` URL with a host.
pub fn parse_http_url(s: &str) -> Result<http::Uri, UrlError> {
    let url: http::Uri = s.parse().map_err(|source| UrlError::Invalid {
        url: s.to_owned(),
        source,
    })?;
    if url.scheme_str() != Some("http") {
        return Err(UrlError::NotHttp { url: s.to_owned() });
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost { url: s.to_owned() });
    }
    Ok(url)
}

/// GETs `url` (as [`parse_http_url`] accepts) on a new connection; the status and the whole
/// body, within `timeout`.
pub async fn get(
    url: &http::Uri,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), HttpError> {
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
            .map_err(|source| HttpError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let exchange_error = |source| HttpError::Exchange {
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
            Err(HttpError::Timeout {
                authority: authority.clone(),
                timeout,
            })
        })
}
