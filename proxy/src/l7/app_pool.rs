//! Connections from the inbound proxy to the application, reused across requests and across
//! client connections: per application address, idle HTTP/1.1 connections (at most
//! [`MAX_IDLE_PER_APP`], each closed after [`IDLE_TIMEOUT`] unused) and one shared HTTP/2
//! connection (closed after as long without a request). A connection is opened only when an
//! allowed request needs one, so a client that never finishes a request never holds one.
//! Upgrades and CONNECT get a connection of their own ([`AppUpstream::send_dedicated`]), never
//! pooled.
//!
//! Each client connection keeps the HTTP/1.1 connection its last request used and sends its
//! next request there ([`AppUpstream`]): a client sending one request at a time then costs the
//! application one connection, as without the pool, and never races the pool for it (the
//! benchmark's closed loop measured one new application connection per 15 requests, and twice
//! the kernel time per request, when every request went back to the shared pool). The kept
//! connection joins the pool when its client connection ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1 as client_h1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::HttpVersion;
use super::request_metrics::CountedBody;
use crate::{BoxError, dial, h2_client};

/// Idle HTTP/1.1 connections kept per application address; more are closed once their response
/// is done. Many: a peer proxy multiplexes its clients' requests over one HTTP/2 connection, and
/// each of its concurrent requests needs an HTTP/1.1 connection of its own, so fewer idle than
/// concurrent requests means a new connection for the excess on every burst (Envoy keeps all
/// of them; this bounds what a burst leaves open for [`IDLE_TIMEOUT`]).
pub const MAX_IDLE_PER_APP: usize = 256;
/// An application connection unused for this long is closed (hyper's and Go's client default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A request body on its way to the application.
pub type AppBody = CountedBody<Incoming>;

/// A response body from the application: over HTTP/1.1 (hyper's client) or HTTP/2.
pub type AppResponseBody = Either<Incoming, h2_client::ResponseBody>;

/// What a request body must be to go over a pooled connection (hyper's client bounds).
pub trait PoolBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<B> PoolBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to the application: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP handshake with the application: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("HTTP/2 handshake with the application: {0}")]
    Http2Handshake(#[source] h2::Error),
    #[error("sending the request to the application: {0}")]
    Request(#[source] hyper::Error),
    #[error("sending the request to the application over HTTP/2: {0}")]
    Http2Request(#[source] h2::Error),
}

/// Every application address's pool (transparent mode: one per port the pod is reached on).
#[derive(Default)]
pub struct AppPools {
    pools: Mutex<HashMap<SocketAddr, Arc<AppPool<AppBody>>>>,
}

impl AppPools {
    /// The pool of `app` (made on first use; connects within `connect_timeout`).
    pub fn get(&self, app: SocketAddr, connect_timeout: Duration) -> Arc<AppPool<AppBody>> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(app)
            .or_insert_with(|| AppPool::new(app, connect_timeout, IDLE_TIMEOUT))
            .clone()
    }
}

/// The reusable connections to one application address, for requests with bodies of type `B`.
pub struct AppPool<B> {
    app: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Idle HTTP/1.1 connections, the most recently used last.
    http1: Mutex<Vec<(client_h1::SendRequest<B>, Instant)>>,
    /// The shared HTTP/2 connection and when it last carried a request. An async lock: the
    /// requests that arrive while it is being opened wait for it rather than open their own.
    http2: tokio::sync::Mutex<Option<(h2_client::Connection, Instant)>>,
}

impl<B: PoolBody> AppPool<B> {
    /// A pool whose idle connections a background task closes after `idle_timeout` (the task
    /// ends with the pool).
    pub fn new(app: SocketAddr, connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(AppPool {
            app,
            connect_timeout,
            idle_timeout,
            http1: Mutex::default(),
            http2: tokio::sync::Mutex::default(),
        });
        tokio::spawn(close_idle(Arc::downgrade(&pool), idle_timeout));
        pool
    }

    /// Idle HTTP/1.1 connections now.
    #[cfg(test)]
    pub(crate) fn idle_http1(&self) -> usize {
        self.http1.lock().map_or(0, |idle| idle.len())
    }

    async fn connect(&self) -> Result<TcpStream, PoolError> {
        dial::connect(self.app, self.connect_timeout)
            .await
            .map_err(PoolError::Connect)
    }

    /// An idle HTTP/1.1 connection ready for a request, if one is left.
    fn take_idle_http1(&self) -> Option<client_h1::SendRequest<B>> {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if since.elapsed() < self.idle_timeout && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Puts `sender` back once its response is done (its connection ready for the next request)
    /// if fewer than [`MAX_IDLE_PER_APP`] are idle; otherwise (or if the application closed it)
    /// it is dropped, which closes the connection.
    fn release_http1(self: &Arc<Self>, mut sender: client_h1::SendRequest<B>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.http1.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE_PER_APP {
                idle.push((sender, Instant::now()));
            }
        });
    }

    fn close_expired(&self) {
        if let Ok(mut idle) = self.http1.lock() {
            idle.retain(|(sender, since)| {
                since.elapsed() < self.idle_timeout && !sender.is_closed()
            });
        }
        if let Ok(mut shared) = self.http2.try_lock()
            && shared.as_ref().is_some_and(|(connection, used)| {
                used.elapsed() >= self.idle_timeout || connection.is_closed()
            })
        {
            // The last handle: h2 closes the connection (GOAWAY) once its streams are done.
            *shared = None;
        }
    }
}

async fn close_idle<B: PoolBody>(pool: Weak<AppPool<B>>, idle_timeout: Duration) {
    let mut tick = tokio::time::interval(idle_timeout / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.close_expired(),
            None => return,
        }
    }
}

async fn handshake_http1<B: PoolBody>(
    stream: TcpStream,
) -> Result<client_h1::SendRequest<B>, PoolError> {
    let (sender, connection) = client_h1::handshake(TokioIo::new(stream))
        .await
        .map_err(PoolError::Handshake)?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn handshake_http2(
    stream: TcpStream,
    app: SocketAddr,
) -> Result<h2_client::Connection, PoolError> {
    // Closed when the pool drops its handle (`close_expired`): `until` never resolves.
    let until = std::future::pending();
    h2_client::handshake(stream, app, until)
        .await
        .map_err(PoolError::Http2Handshake)
}

/// One client connection's way to the application: through the pool, except for a connection
/// opened before the client spoke (see `inbound::forward_opaque`), which its first request uses.
pub struct AppUpstream<B: PoolBody> {
    pool: Arc<AppPool<B>>,
    preopened: Mutex<Option<TcpStream>>,
    /// The HTTP/1.1 connection this client connection's last request used (perhaps still
    /// reading its response): its next request goes there first.
    kept_http1: Mutex<Option<client_h1::SendRequest<B>>>,
    /// The last connection failure, for the client connection's log line.
    connect_failure: Mutex<Option<String>>,
}

impl<B: PoolBody> AppUpstream<B> {
    pub fn new(pool: Arc<AppPool<B>>, preopened: Option<TcpStream>) -> Self {
        AppUpstream {
            pool,
            preopened: Mutex::new(preopened),
            kept_http1: Mutex::default(),
            connect_failure: Mutex::default(),
        }
    }

    /// Why the application could not be reached, if it could not be the last time it was tried.
    pub fn connect_failure(&self) -> Option<String> {
        self.connect_failure.lock().ok().and_then(|f| f.clone())
    }

    /// The connection opened before the client spoke, else a new one.
    async fn new_connection(&self) -> Result<TcpStream, PoolError> {
        let preopened = self.preopened.lock().ok().and_then(|mut p| p.take());
        let connected = match preopened {
            Some(stream) => Ok(stream),
            None => self.pool.connect().await,
        };
        if let (Err(e), Ok(mut failure)) = (&connected, self.connect_failure.lock()) {
            *failure = Some(e.to_string());
        }
        connected
    }

    /// Sends `request` (an upgrade or CONNECT, which may turn into a tunnel) over an HTTP/1.1
    /// connection of its own, never pooled.
    pub async fn send_dedicated(
        &self,
        request: Request<B>,
    ) -> Result<Response<Incoming>, PoolError> {
        let stream = self.new_connection().await?;
        let (mut sender, connection) = client_h1::handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(connection.with_upgrades());
        sender
            .send_request(request)
            .await
            .map_err(PoolError::Request)
    }

    /// Sends `request` over a pooled connection speaking `version`.
    pub async fn send(
        &self,
        request: Request<B>,
        version: HttpVersion,
    ) -> Result<Response<AppResponseBody>, PoolError> {
        match version {
            HttpVersion::Http1 => Ok(self.send_http1(request).await?.map(Either::Left)),
            HttpVersion::Http2 => Ok(self.send_http2(request).await?.map(Either::Right)),
        }
    }

    async fn send_http1(&self, request: Request<B>) -> Result<Response<Incoming>, PoolError> {
        let mut request = request;
        // The kept connection is ready once its last response has been read (which the client
        // has by now, if it waited for it); an idle one the application closed meanwhile fails
        // before the request is written: hyper hands the request back, and it goes on the next.
        while let Some(mut sender) = self
            .take_kept_http1()
            .or_else(|| self.pool.take_idle_http1())
        {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.keep_http1(sender);
                    return Ok(response);
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(PoolError::Request(failed.into_error())),
                },
            }
        }
        // Boxed: connecting and the handshake are most of this future's size, and a request
        // that finds a kept or idle connection (nearly all) would otherwise carry them in its
        // task, copied as it moves.
        let mut sender =
            Box::pin(async { handshake_http1(self.new_connection().await?).await }).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(PoolError::Request)?;
        self.keep_http1(sender);
        Ok(response)
    }

    fn take_kept_http1(&self) -> Option<client_h1::SendRequest<B>> {
        self.kept_http1.lock().ok().and_then(|mut kept| kept.take())
    }

    /// Keeps `sender` for this client connection's next request, or gives it back to the pool
    /// if another is kept already (concurrent requests of an HTTP/2 client).
    fn keep_http1(&self, sender: client_h1::SendRequest<B>) {
        let mut kept = self.kept_http1.lock().unwrap_or_else(|e| e.into_inner());
        match kept.as_ref() {
            None => *kept = Some(sender),
            Some(_) => self.pool.release_http1(sender),
        }
    }

    async fn send_http2(
        &self,
        request: Request<B>,
    ) -> Result<Response<h2_client::ResponseBody>, PoolError> {
        let connection = {
            let mut shared = self.pool.http2.lock().await;
            match shared.as_mut() {
                Some((connection, used)) if !connection.is_closed() => {
                    *used = Instant::now();
                    connection.clone()
                }
                _ => {
                    // Boxed, as in `send_http1`.
                    let app = self.pool.app;
                    let connection = Box::pin(async {
                        handshake_http2(self.new_connection().await?, app).await
                    })
                    .await?;
                    *shared = Some((connection.clone(), Instant::now()));
                    connection
                }
            }
        };
        let sender = connection.ready().await.map_err(PoolError::Http2Request)?;
        h2_client::send(sender, request)
            .await
            .map_err(PoolError::Http2Request)
    }
}

impl<B: PoolBody> Drop for AppUpstream<B> {
    /// The kept connection goes back to the pool for other client connections (unless the
    /// runtime is going away with everything else).
    fn drop(&mut self) {
        let kept = self.kept_http1.get_mut().ok().and_then(|kept| kept.take());
        if let Some(sender) = kept
            && tokio::runtime::Handle::try_current().is_ok()
        {
            self.pool.release_http1(sender);
        }
    }
}

#[cfg(test)]
mod tests;
