//! HTTP awareness on inbound connections: telling HTTP/1.1 and HTTP/2 from other bytes by their
//! first bytes ([`Sniffed`]), then serving the connection as HTTP, deciding on every request (for
//! policies with HTTP fields: methods, paths, hosts, headers), answering a denied one with 403, an
//! allowed one over a local rate limit with 429 ([`crate::ratelimit`]), and forwarding the others
//! to the application, without the client's `x-forwarded-client-cert` or hop-by-hop headers, over
//! connections pooled across requests and clients ([`app_pool`]).
//! A request a peer sigil proxy carried over HTTP/2 for an HTTP/1.x client (`sigil-orig-proto`)
//! reaches the application as that HTTP/1.x request ([`app_version`]); other requests keep their
//! version. HTTP/1.1 upgrades (WebSocket) and CONNECT get an application connection of their own
//! and become tunnels. Every request is counted in the golden metrics ([`request_metrics`]).
//!
//! Before any policy sees a request it is made unambiguous ([`check`]), so that what was
//! authorized is what the application gets: the path is normalized (`sigil_policy::path`) and
//! the normalized path is forwarded; more than one Host, a Host that differs from the
//! absolute-form authority or HTTP/2 `:authority`, userinfo in either, and a method that is not
//! upper-case are answered 400. One trailing dot of the host is ignored when matching.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1 as server_h1, http2 as server_h2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_policy::path::{self, PathError, PathNormalization};
use sigil_proxy_api::ORIG_PROTO_HEADER;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

pub mod app_pool;
pub mod request_metrics;

use app_pool::{AppBody, AppResponseBody, AppUpstream, PoolError};
use request_metrics::{InboundConnection, RequestFacts, RequestMetrics, RequestTimer};
use sigil_route::select::RequestHead;

use crate::metrics::Security;
use crate::ratelimit::ConnectionLimits;
use crate::request_log;
use crate::trace::span::attr;
use crate::trace::{RequestTrace, SpanKind};

/// The body of a denied request: Envoy's, so clients and dashboards that know it keep working.
pub const DENIED_BODY: &str = "RBAC: access denied\n";
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The most of a connection's first bytes read to tell the protocol: a request line still
/// unfinished at this length is taken as HTTP/1 (a longer URL than most servers accept).
pub const SNIFF_LIMIT: usize = 8 * 1024;

/// The HTTP version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// What a connection's first bytes say about its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http(HttpVersion),
    /// Not HTTP: forwarded as bytes.
    Opaque,
    /// Could still be either: more bytes are needed (see [`Sniffed::at_end`]).
    Undecided,
}

impl Sniffed {
    /// Classifies a connection's first bytes, erring towards HTTP: what the proxy takes for
    /// opaque bytes reaches the application unparsed (a client's `x-forwarded-client-cert`
    /// too), so only bytes that cannot open an HTTP request are opaque. HTTP/1 is any request
    /// line `METHOD SP TARGET SP HTTP/`, whatever the method token (extension methods and
    /// lower-case ones, which [`check`] refuses, included), after the empty lines servers skip
    /// (RFC 9112 section 2.2); HTTP/2 is its connection preface.
    pub fn of(first: &[u8]) -> Sniffed {
        let n = first.len().min(H2_PREFACE.len());
        if n > 0 && first[..n] == H2_PREFACE[..n] {
            return if n == H2_PREFACE.len() {
                Sniffed::Http(HttpVersion::Http2)
            } else {
                Sniffed::Undecided
            };
        }
        let line = match first.iter().position(|&b| b != b'\r' && b != b'\n') {
            Some(start) => &first[start..],
            None => return Sniffed::Undecided,
        };
        let method = line.iter().take_while(|&&b| is_tchar(b)).count();
        match line.get(method) {
            None => return Sniffed::Undecided,
            Some(&b) if method > 0 && is_space(b) => {}
            Some(_) => return Sniffed::Opaque,
        }
        // The target: anything up to the next space (servers parse what they get, and some
        // take several spaces or tabs as one); a line that ends before a version is HTTP/0.9
        // at most (no headers), or a text protocol's command.
        let rest = skip_spaces(&line[method..]);
        let target = rest
            .iter()
            .take_while(|&&b| !is_space(b) && b != b'\r' && b != b'\n')
            .count();
        match rest.get(target) {
            None => return Sniffed::Undecided,
            Some(&b) if target > 0 && is_space(b) => {}
            Some(_) => return Sniffed::Opaque,
        }
        let version = skip_spaces(&rest[target..]);
        let n = version.len().min(5);
        if !version[..n].eq_ignore_ascii_case(&b"HTTP/"[..n]) {
            Sniffed::Opaque
        } else if n == 5 {
            Sniffed::Http(HttpVersion::Http1)
        } else {
            Sniffed::Undecided
        }
    }

    /// The decision once no more bytes will be waited for (the client went quiet, closed, or
    /// sent [`SNIFF_LIMIT`] bytes): undecided bytes are HTTP, which the HTTP server refuses if
    /// they are not; no bytes at all is `None`, for the caller to decide.
    pub fn at_end(first: &[u8]) -> Option<Sniffed> {
        match Sniffed::of(first) {
            _ if first.is_empty() => None,
            Sniffed::Undecided if H2_PREFACE.starts_with(first) => {
                Some(Sniffed::Http(HttpVersion::Http2))
            }
            Sniffed::Undecided => Some(Sniffed::Http(HttpVersion::Http1)),
            decided => Some(decided),
        }
    }
}

/// Reads a connection's first bytes into `first` until they tell its protocol, `wait` passes,
/// the client closes or [`SNIFF_LIMIT`] bytes came: the protocol, or None if the client
/// sent nothing.
pub async fn sniff<D: AsyncRead + Unpin>(
    downstream: &mut D,
    first: &mut Vec<u8>,
    wait: Duration,
) -> std::io::Result<Option<Sniffed>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut chunk = [0u8; 1024];
    while Sniffed::of(first) == Sniffed::Undecided && first.len() < SNIFF_LIMIT {
        let room = chunk.len().min(SNIFF_LIMIT - first.len());
        match tokio::time::timeout_at(deadline, downstream.read(&mut chunk[..room])).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => first.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(Sniffed::at_end(first))
}

/// Whitespace a lenient server accepts between the parts of a request line (RFC 9112 section
/// 3: SP, and HTAB, VT and FF).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

fn skip_spaces(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().take_while(|&&b| is_space(b)).count();
    &bytes[start..]
}

/// A character of an HTTP token (RFC 9110 section 5.6.2), as methods are made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The attributes of one request that policies look at.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Decides on one request and counts what became of it (its access-log line is written when
/// its response ends: [`request_metrics`]).
pub trait Authorize: Send + Sync + 'static {
    /// The deciding policy (`namespace/name` or `default`) if the request may be forwarded;
    /// a refusal answers 403.
    fn authorize(&self, request: &RequestInfo<'_>) -> Result<String, Denied>;
    /// A request answered 400 before any policy saw it.
    fn bad_request(&self);
    /// The application could not be reached for an allowed request (answered 502).
    fn upstream_failed(&self, error: &HttpError);
}

/// A request a policy refused.
#[derive(Clone, Debug)]
pub struct Denied {
    /// `namespace/name` or `default`.
    pub policy: String,
    pub reason: String,
}

/// Why a request is answered 400 before authorization.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("more than one Host header")]
    SeveralHosts,
    #[error("the Host header is not visible ASCII")]
    HostNotText,
    #[error("the Host header {host:?} differs from the request's authority {authority:?}")]
    HostMismatch { host: String, authority: String },
    #[error("userinfo in the authority or Host")]
    Userinfo,
    #[error("the method {0:?} is not upper-case")]
    Method(String),
}

/// A request's attributes once made unambiguous.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    /// The normalized path and the untouched query: what policies see and the app receives.
    pub target: Option<String>,
    /// The host policies match: the authority (or Host), without one trailing dot.
    pub host: String,
}

/// Checks the method, the Host and the path of a request (see the module docs).
pub fn check<B>(
    request: &Request<B>,
    normalization: PathNormalization,
) -> Result<Checked, BadRequest> {
    let method = request.method().as_str();
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(BadRequest::Method(method.to_owned()));
    }
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let host_header = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(BadRequest::SeveralHosts),
        (Some(host), None) => Some(host.to_str().map_err(|_| BadRequest::HostNotText)?),
        (None, None) => None,
    };
    let authority = request.uri().authority().map(|a| a.as_str());
    if let (Some(host), Some(authority)) = (host_header, authority)
        && !host.eq_ignore_ascii_case(authority)
    {
        return Err(BadRequest::HostMismatch {
            host: host.to_owned(),
            authority: authority.to_owned(),
        });
    }
    let host = authority.or(host_header).unwrap_or_default();
    if host.contains('@') {
        return Err(BadRequest::Userinfo);
    }
    let target = request
        .uri()
        .path_and_query()
        .map(|p| path::normalize_target(p.as_str(), normalization))
        .transpose()?;
    Ok(Checked {
        target,
        host: without_trailing_dot(host),
    })
}

/// `host.` and `host.:port` as `host` and `host:port` (the same name in DNS).
fn without_trailing_dot(host: &str) -> String {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (name, Some(port))
        }
        _ => (host, None),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    match port {
        Some(port) => format!("{name}:{port}"),
        None => name.to_owned(),
    }
}

/// Replaces the request's path and query with `target` (known valid: normalization only
/// removes and decodes characters the path already allowed).
fn set_target<B>(request: &mut Request<B>, target: &str) {
    let mut parts = request.uri().clone().into_parts();
    let Ok(path_and_query) = target.parse::<http::uri::PathAndQuery>() else {
        return;
    };
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    App(#[from] PoolError),
    #[error("no complete request head within --header-read-timeout ({0:?})")]
    HeaderTimeout(Duration),
    #[error("serving HTTP to the client: {0}")]
    Downstream(#[source] hyper::Error),
    #[error("switching protocols: {0}")]
    Upgrade(#[source] hyper::Error),
    #[error("relaying an upgraded connection: {0}")]
    Tunnel(#[source] std::io::Error),
}

type ProxyBody = Either<AppResponseBody, Full<Bytes>>;

fn denied_response() -> Response<ProxyBody> {
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

/// Why is in the log; the client learns only that its request was refused.
fn bad_request() -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"bad request\n",
    ))));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"upstream unavailable\n",
    ))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

/// How [`serve`] serves one connection.
#[derive(Clone, Debug)]
pub struct Settings {
    pub normalization: PathNormalization,
    /// HTTP/1: each request head must arrive within this; HTTP/2: the first request.
    pub header_read_timeout: Duration,
    /// The `x-forwarded-client-cert` set on allowed requests (see [`client_cert_header`]);
    /// whatever the client sent is always removed.
    pub forward_client_cert: Option<http::HeaderValue>,
    /// Where every request, answered by the application or by the proxy, is counted.
    pub metrics: RequestMetrics,
    /// The local rate limits authorized requests take a token from (`None`: none).
    pub rate_limits: Option<ConnectionLimits>,
}

/// The header an application reads the caller's verified identity from, as Envoy sets it.
pub const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// Envoy's `SANITIZE_SET` value for a peer (`URI`, its verified SPIFFE ID) calling this proxy
/// (`By`, the identity it presents): `By=spiffe://...;URI=spiffe://...`. Envoy's `Hash` (of the
/// peer's certificate) is left out: the identity is what authorization used.
pub fn client_cert_header(by: &str, peer: &str) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(&format!("By={by};URI={peer}")).ok()
}

/// The header a peer sigil proxy sets on an HTTP/1.x request it carries over HTTP/2.
const ORIG_PROTO: http::HeaderName = http::HeaderName::from_static(ORIG_PROTO_HEADER);

/// The HTTP version to speak to the application for `request`, which arrived over `downstream`:
/// its own, unless a peer proxy carried an HTTP/1.x request over HTTP/2 (`sigil-orig-proto:
/// HTTP/1.1` or `HTTP/1.0`). Then the request becomes that HTTP/1.x request again: the header
/// removed (always: the application never sees it), the version set, the Host taken from
/// `:authority` and the target in origin form (hyper frames the body).
pub fn app_version<B>(request: &mut Request<B>, downstream: HttpVersion) -> HttpVersion {
    let Some(orig) = request.headers_mut().remove(ORIG_PROTO) else {
        return downstream;
    };
    let version = match orig.as_bytes() {
        b"HTTP/1.1" => http::Version::HTTP_11,
        b"HTTP/1.0" => http::Version::HTTP_10,
        _ => return downstream,
    };
    if downstream == HttpVersion::Http1 {
        return downstream;
    }
    *request.version_mut() = version;
    if let Some(authority) = request.uri().authority().cloned() {
        if !request.headers().contains_key(http::header::HOST)
            && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        if request.method() != http::Method::CONNECT {
            let target = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *request.uri_mut() = http::Uri::from(target);
        }
    }
    HttpVersion::Http1
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 section
/// 7.6.1; Envoy's list): those the `Connection` header names, Connection, Keep-Alive,
/// Proxy-Connection, Transfer-Encoding, Upgrade, and TE except `trailers` (the one value HTTP/2
/// allows; gRPC servers require it, and it means the same on every hop).
pub fn remove_hop_by_hop(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    let named: Vec<http::HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers.get_all(TE).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value.split(',').any(|coding| {
                let coding = coding.split(';').next().unwrap_or_default();
                coding.trim().eq_ignore_ascii_case("trailers")
            })
        })
    });
    for name in [
        CONNECTION,
        UPGRADE,
        TRANSFER_ENCODING,
        TE,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The server span's attributes from the request's head and its connection.
fn describe_server_span<B>(
    trace: &mut RequestTrace,
    request: &Request<B>,
    authority: &str,
    connection: &InboundConnection,
) {
    let Some(span) = trace.span_mut() else {
        return;
    };
    request_log::describe_head(span, request, request.uri().path(), authority);
    request_log::describe_peer(span, connection.source);
    span.set(attr::CLIENT_ADDRESS, connection.source.ip().to_string());
    let security = match connection.source_identity {
        Some(_) => Security::Mtls,
        None => Security::Plaintext,
    };
    span.set(attr::SIGIL_SECURITY, security.as_str());
    if let Some(id) = &connection.source_identity {
        span.set(attr::SIGIL_SOURCE_IDENTITY, id.as_str());
    }
    if let Some(id) = &connection.destination_identity {
        span.set(attr::SIGIL_DESTINATION_IDENTITY, id.as_str());
    }
}

/// A request that, answered with 101 (an `Upgrade`) or 2xx (CONNECT), turns its connection into
/// a tunnel: it gets an application connection of its own.
fn wants_tunnel<B>(request: &Request<B>, downstream: HttpVersion) -> bool {
    downstream == HttpVersion::Http1
        && (request.headers().contains_key(http::header::UPGRADE)
            || request.method() == http::Method::CONNECT)
}

/// What serving one client connection's requests needs.
struct Handler<A> {
    downstream: HttpVersion,
    upstream: Arc<AppUpstream<AppBody>>,
    normalization: PathNormalization,
    forward_client_cert: Option<http::HeaderValue>,
    authorizer: Arc<A>,
    rate_limits: Option<ConnectionLimits>,
    /// An HTTP/1.1 connection that switched protocols, joined once the server hands it over.
    tunnel: TunnelSlot,
}

impl<A: Authorize> Handler<A> {
    /// Checks, authorizes and forwards one request: the response for the client. What the
    /// request was goes to `timer`, for its span and log line at the response's end.
    async fn handle(
        &self,
        mut request: Request<Incoming>,
        timer: &mut RequestTimer,
    ) -> Response<ProxyBody> {
        let connection = timer.connection().clone();
        // Before the checks, so that a refused request's span and log line join its trace.
        let mut trace = request_log::begin(
            &connection.tracer,
            SpanKind::Server,
            request.headers_mut(),
            connection.access_log.is_some(),
        );
        let checked = match check(&request, self.normalization) {
            Ok(checked) => checked,
            Err(why) => {
                self.authorizer.bad_request();
                let authority = request.uri().authority().map(|a| a.as_str().to_owned());
                let host = request.headers().get(http::header::HOST);
                let host = host.map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
                let authority = authority.or(host).unwrap_or_default();
                describe_server_span(&mut trace, &request, &authority, &connection);
                timer.describe(RequestFacts {
                    trace,
                    method: request.method().as_str().to_owned(),
                    authority,
                    path: request.uri().path().to_owned(),
                    policy: None,
                    result: "bad_request",
                    detail: Some(why.to_string()),
                    upstream: None,
                });
                return bad_request();
            }
        };
        if let Some(target) = &checked.target
            && request.uri().path_and_query().map(|p| p.as_str()) != Some(target)
        {
            set_target(&mut request, target);
        }
        describe_server_span(&mut trace, &request, &checked.host, &connection);
        let mut facts = RequestFacts {
            trace,
            method: request.method().as_str().to_owned(),
            authority: checked.host.clone(),
            path: request.uri().path().to_owned(),
            policy: None,
            result: "allowed",
            detail: None,
            upstream: None,
        };
        let response = self.forward(request, &checked, &mut facts, timer).await;
        timer.describe(facts);
        response
    }

    /// Authorizes and forwards a checked request, noting in `facts` what became of it.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        checked: &Checked,
        facts: &mut RequestFacts,
        timer: &RequestTimer,
    ) -> Response<ProxyBody> {
        // Only the proxy speaks for the peer: a client's own header never reaches the app.
        request.headers_mut().remove(XFCC);
        let app_version = app_version(&mut request, self.downstream);
        let info = RequestInfo {
            method: request.method().as_str(),
            path: request.uri().path(),
            host: &checked.host,
            headers: request.headers(),
        };
        let decided = self.authorizer.authorize(&info);
        let (policy, allowed) = match &decided {
            Ok(policy) => (policy.clone(), true),
            Err(denied) => (denied.policy.clone(), false),
        };
        if let Some(span) = facts.trace.span_mut() {
            span.set(attr::SIGIL_POLICY, policy.as_str());
            span.set(attr::SIGIL_AUTHZ, if allowed { "allow" } else { "deny" });
        }
        facts.policy = Some(policy);
        if let Err(denied) = decided {
            facts.result = "denied";
            facts.detail = Some(denied.reason);
            return denied_response();
        }
        // After authorization: a denied request never takes a token.
        if let Some(limits) = &self.rate_limits {
            let head = RequestHead {
                method: request.method(),
                path: request.uri().path(),
                query: request.uri().query(),
                headers: request.headers(),
            };
            if let Some(refusal) = limits.check(&head) {
                // Why is logged at debug by the limiter.
                facts.result = "rate_limited";
                return refusal.response().map(Either::Right);
            }
        }
        if let Some(xfcc) = &self.forward_client_cert {
            request.headers_mut().insert(XFCC, xfcc.clone());
        }
        // HTTP/1.1 Upgrade (WebSocket and the like) and CONNECT: if the application switches
        // protocols, both connections are handed over and joined (see `Tunnel`).
        let client_upgrade =
            wants_tunnel(&request, self.downstream).then(|| hyper::upgrade::on(&mut request));
        if client_upgrade.is_none() {
            remove_hop_by_hop(request.headers_mut());
        }
        let method = request.method().clone();
        let request = request.map(|body| timer.counted(body));
        facts.upstream = Some(timer.connection().app);
        let sent = match client_upgrade {
            Some(_) => (self.upstream.send_dedicated(request).await)
                .map(|response| response.map(Either::Left)),
            None => self.upstream.send(request, app_version).await,
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                facts.result = "upstream_failed";
                facts.detail = Some(e.to_string());
                if matches!(
                    e,
                    PoolError::Connect(_) | PoolError::Handshake(_) | PoolError::Http2Handshake(_)
                ) {
                    self.authorizer.upstream_failed(&HttpError::App(e));
                }
                return bad_gateway();
            }
        };
        let switched = match response.status() {
            StatusCode::SWITCHING_PROTOCOLS => method != http::Method::CONNECT,
            status => method == http::Method::CONNECT && status.is_success(),
        };
        match client_upgrade {
            Some(client) if switched => {
                if let Ok(mut tunnel) = self.tunnel.lock() {
                    *tunnel = Some(Tunnel {
                        client,
                        server: hyper::upgrade::on(&mut response),
                    });
                }
            }
            _ => remove_hop_by_hop(response.headers_mut()),
        }
        *response.version_mut() = match self.downstream {
            HttpVersion::Http2 => http::Version::HTTP_2,
            HttpVersion::Http1 if app_version == HttpVersion::Http2 => http::Version::HTTP_11,
            HttpVersion::Http1 => response.version(),
        };
        response.map(Either::Left)
    }
}

/// Serves `downstream` until either side closes, forwarding allowed requests to the
/// application through `upstream` (connected only for the first allowed request).
pub async fn serve<D, A>(
    downstream: D,
    version: HttpVersion,
    upstream: Arc<AppUpstream<AppBody>>,
    settings: Settings,
    authorizer: Arc<A>,
) -> Result<(), HttpError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Authorize,
{
    let Settings {
        normalization,
        header_read_timeout,
        forward_client_cert,
        metrics,
        rate_limits,
    } = settings;
    let handler = Arc::new(Handler {
        downstream: version,
        upstream,
        normalization,
        forward_client_cert,
        authorizer,
        rate_limits,
        tunnel: TunnelSlot::default(),
    });
    let respond = {
        let handler = handler.clone();
        move |request: Request<Incoming>| {
            let handler = handler.clone();
            let mut timer = metrics.start();
            async move {
                let response = handler.handle(request, &mut timer).await;
                timer.respond(response)
            }
        }
    };
    serve_downstream(
        downstream,
        version,
        header_read_timeout,
        &handler.tunnel,
        respond,
    )
    .await
}

/// Where an HTTP/1.1 connection that switched protocols waits, both sides, until its server
/// hands it over.
pub type TunnelSlot = std::sync::Mutex<Option<Tunnel>>;

/// Serves one client connection speaking `version`, every request answered by `respond`, until
/// either side closes. HTTP/1.1: each request head within `header_read_timeout`, and a
/// connection `respond` switched (leaving both sides in `tunnel`) is relayed as bytes from then
/// on. HTTP/2: the first request within the same time (hyper has no header timeout for HTTP/2;
/// later requests are bounded by the connection's idle timeout). No `date` header is added: the
/// response goes out as its server sent it.
pub async fn serve_downstream<D, F, Fut, B>(
    downstream: D,
    version: HttpVersion,
    header_read_timeout: Duration,
    tunnel: &TunnelSlot,
    respond: F,
) -> Result<(), HttpError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<crate::BoxError>,
{
    let seen_request = Arc::new(AtomicBool::new(false));
    let seen = seen_request.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
        // Not `async move { Ok(response.await) }`: an async block keeps the future it awaits
        // twice (the captured value and the awaited one), and hyper moves this future into a
        // task per request, so every byte of it is copied on each request.
        respond(request).map(Ok::<_, Infallible>)
    });
    let io = TokioIo::new(downstream);
    match version {
        HttpVersion::Http2 => {
            let connection = server_h2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .serve_connection(io, service);
            let first_request = async {
                tokio::time::sleep(header_read_timeout).await;
                if seen_request.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                served = connection => served.map_err(HttpError::Downstream),
                () = first_request => Err(HttpError::HeaderTimeout(header_read_timeout)),
            }
        }
        HttpVersion::Http1 => {
            server_h1::Builder::new()
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .header_read_timeout(header_read_timeout)
                .serve_connection(io, service)
                .with_upgrades()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        HttpError::HeaderTimeout(header_read_timeout)
                    } else {
                        HttpError::Downstream(e)
                    }
                })?;
            // The server hands the connection over after a switch: then it is the tunnel's.
            let switched = tunnel.lock().ok().and_then(|mut tunnel| tunnel.take());
            match switched {
                Some(tunnel) => tunnel.relay().await,
                None => Ok(()),
            }
        }
    }
}

/// Both sides of an HTTP/1.1 connection whose server switched it to another protocol (101, or
/// 2xx to CONNECT): from then on bytes, relayed both ways until both sides are done. Inbound
/// the server is the application (an allowed request upgraded it; policy changes still close
/// it, as any connection); outbound it is the endpoint's proxy.
pub struct Tunnel {
    pub client: hyper::upgrade::OnUpgrade,
    pub server: hyper::upgrade::OnUpgrade,
}

impl Tunnel {
    pub async fn relay(self) -> Result<(), HttpError> {
        let (client, server) =
            tokio::try_join!(self.client, self.server).map_err(HttpError::Upgrade)?;
        tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(server))
            .await
            .map_err(HttpError::Tunnel)?;
        Ok(())
    }
}

#[cfg(test)]
mod serve_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(request: http::request::Builder) -> Result<Checked, BadRequest> {
        check(&request.body(()).unwrap(), PathNormalization::Base)
    }

    #[test]
    fn hosts_methods_and_paths_are_made_unambiguous() {
        let ok = checked(Request::get("/x/../a?q=/..").header("host", "Example.com.:80")).unwrap();
        assert_eq!(ok.target.as_deref(), Some("/a?q=/.."));
        assert_eq!(ok.host, "Example.com:80");
        let ok = checked(Request::get("http://a.example./").header("host", "A.example.")).unwrap();
        assert_eq!(ok.host, "a.example");
        assert_eq!(
            checked(Request::get("/").header("host", "[::1]"))
                .unwrap()
                .host,
            "[::1]"
        );
        for (request, why) in [
            (
                Request::get("/").header("host", "a").header("host", "b"),
                "more than one",
            ),
            (Request::get("http://a/").header("host", "b"), "differs"),
            (Request::get("http://u@a/"), "userinfo"),
            (Request::get("/").header("host", "u@a"), "userinfo"),
            (Request::get("/").method("delete"), "not upper-case"),
            (Request::get("/").method("Get"), "not upper-case"),
            (Request::get("/a;b"), "parameter"),
        ] {
            let e = checked(request).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        // Methods that are upper-case tokens, standard or not, pass.
        assert!(checked(Request::get("/").method("PROPFIND")).is_ok());
    }

    /// An HTTP/2 request as hyper's server hands it over.
    fn h2_request(uri: &str) -> http::request::Builder {
        Request::get(uri).version(http::Version::HTTP_2)
    }

    #[test]
    fn an_http1_request_carried_over_http2_becomes_http1_again() {
        let mut request = h2_request("http://db.demo:8080/a/b?q=1")
            .header("sigil-orig-proto", "HTTP/1.1")
            .header("x-app", "kept")
            .body(())
            .unwrap();
        assert_eq!(
            app_version(&mut request, HttpVersion::Http2),
            HttpVersion::Http1
        );
        assert_eq!(request.version(), http::Version::HTTP_11);
        assert_eq!(request.uri(), "/a/b?q=1");
        assert_eq!(request.headers()["host"], "db.demo:8080");
        assert_eq!(request.headers()["x-app"], "kept");
        assert!(!request.headers().contains_key("sigil-orig-proto"));

        // HTTP/1.0, and a Host the client had set already (check() made sure it agrees).
        let mut request = h2_request("http://db/")
            .header("sigil-orig-proto", "HTTP/1.0")
            .header("host", "db")
            .body(())
            .unwrap();
        assert_eq!(
            app_version(&mut request, HttpVersion::Http2),
            HttpVersion::Http1
        );
        assert_eq!(request.version(), http::Version::HTTP_10);
        assert_eq!(request.headers().get_all("host").iter().count(), 1);
        assert_eq!(request.uri(), "/");
    }

    #[test]
    fn requests_without_the_header_keep_their_version_and_the_header_never_reaches_the_app() {
        let mut request = h2_request("http://db/x").body(()).unwrap();
        assert_eq!(
            app_version(&mut request, HttpVersion::Http2),
            HttpVersion::Http2
        );
        assert_eq!(request.uri(), "http://db/x");
        assert!(!request.headers().contains_key("host"));
        // A value that is no HTTP/1.x version: removed, the request stays HTTP/2.
        let mut request = h2_request("http://db/x")
            .header("sigil-orig-proto", "HTTP/3")
            .body(())
            .unwrap();
        assert_eq!(
            app_version(&mut request, HttpVersion::Http2),
            HttpVersion::Http2
        );
        assert!(!request.headers().contains_key("sigil-orig-proto"));
        // On an HTTP/1.1 connection the request already is HTTP/1.x.
        let mut request = Request::get("/x")
            .header("sigil-orig-proto", "HTTP/1.0")
            .body(())
            .unwrap();
        assert_eq!(
            app_version(&mut request, HttpVersion::Http1),
            HttpVersion::Http1
        );
        assert_eq!(request.version(), http::Version::HTTP_11);
        assert!(!request.headers().contains_key("sigil-orig-proto"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_stays() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("trailer", "grpc-status"),
            ("content-type", "text/plain"),
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "te", "trailer"]);
        let mut headers = http::HeaderMap::new();
        headers.insert("te", http::HeaderValue::from_static("gzip"));
        remove_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
        headers.insert(
            "te",
            http::HeaderValue::from_static("trailers;q=1, deflate"),
        );
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers["te"], "trailers");
    }

    #[test]
    fn upgrades_and_connect_on_http1_become_tunnels() {
        let upgrade = Request::get("/ws")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(wants_tunnel(&upgrade, HttpVersion::Http1));
        let connect = Request::connect("db:443").body(()).unwrap();
        assert!(wants_tunnel(&connect, HttpVersion::Http1));
        assert!(!wants_tunnel(
            &Request::get("/").body(()).unwrap(),
            HttpVersion::Http1
        ));
        // HTTP/2 has no Upgrade; its requests go over the pool.
        assert!(!wants_tunnel(&upgrade, HttpVersion::Http2));
    }

    #[test]
    fn first_bytes_tell_the_protocol() {
        use HttpVersion::*;
        use Sniffed::*;
        for (first, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Http(Http1)),
            (b"DELETE /x HTTP/1.0", Http(Http1)),
            (b"OPTIONS * HTTP/1.1", Http(Http1)),
            // Whatever the method: an extension method, or one in lower case (then refused).
            (b"PURGE /cache HTTP/1.1", Http(Http1)),
            (b"delete /x http/1.1", Http(Http1)),
            // Servers skip empty lines before the request line.
            (b"\r\n\r\nGET / HTTP/1.1", Http(Http1)),
            // Some servers take several spaces, or tabs, as one.
            (b"GET  /\tHTTP/1.1", Http(Http1)),
            (H2_PREFACE, Http(Http2)),
            // Not yet enough to tell.
            (b"", Undecided),
            (b"\r\n", Undecided),
            (b"G", Undecided),
            (b"GET /very/long", Undecided),
            (b"GET / HT", Undecided),
            (b"PRI * HTTP/2.0\r\n", Undecided),
            // Cannot open an HTTP request.
            (b"\x16\x03\x01\x02\x00", Opaque),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Opaque),
            (b"GETX", Undecided),
            (b"GETX\r\n", Opaque),
            (b" GET / HTTP/1.1", Opaque),
            // Text protocols' commands: Redis inline, memcached.
            (b"PING\r\n", Opaque),
            (b"SET key value\r\n", Opaque),
            (b"get key\r\n", Opaque),
            (b"set key 0 0 5\r\n", Opaque),
            (b"\x00\x01", Opaque),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Opaque),
        ] {
            assert_eq!(
                Sniffed::of(first),
                want,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
        // When no more will come: what may be HTTP is HTTP.
        assert_eq!(Sniffed::at_end(b""), None);
        assert_eq!(Sniffed::at_end(b"GET /x"), Some(Http(Http1)));
        assert_eq!(Sniffed::at_end(b"\r\n"), Some(Http(Http1)));
        assert_eq!(Sniffed::at_end(b"PRI * HT"), Some(Http(Http2)));
        assert_eq!(Sniffed::at_end(b"PING\r\n"), Some(Opaque));
    }
}
