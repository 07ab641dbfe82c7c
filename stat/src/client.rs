//! The URLs `sigil stat` reads from: plain `http://` ones, fetched with `sigil_base::http_get`
//! (reach a Prometheus behind TLS through `kubectl port-forward`).

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
