//! Pooled mutual TLS HTTP/2 connections to meshed endpoints, one pool per endpoint (address and
//! the SPIFFE ID it must prove). One connection carries many requests at once; another is opened
//! only when every open one has [`STREAMS_PER_CONNECTION`] requests in flight, up to
//! `--max-connections-per-endpoint` (past that, requests queue on the least busy connection).
//! A broken connection is dropped and a new one dialled for the next request; one without a
//! request for [`IDLE_CLOSE`] is closed.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_identity::SpiffeId;
use tokio::sync::watch;

use crate::dial::{self, DialError};
use crate::metrics::{Direction, HandshakeLabels, Metrics};
use crate::tls::{HandshakeFailure, TlsState};

/// Requests in flight on one connection before another is opened: below the concurrent-stream
/// limit servers commonly announce (100 and more), so requests rarely wait for a stream.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// A pooled connection without a request for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(90);

/// What a request body sent through the pool is.
pub type RequestBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no certificate from the agent yet")]
    NoCertificate,
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("sending the request to {addr}: {source}")]
    Send {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// A request's response head from an endpoint.
pub struct Sent {
    pub response: Response<Incoming>,
    /// The request's stream on its connection, to hold until its response body is done.
    pub slot: StreamSlot,
    /// When the request went out on a ready connection (after any dial).
    pub written: Instant,
}

/// An endpoint as a pool key: where it is and who it must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    pub id: SpiffeId,
}

/// One open connection.
struct Connection {
    sender: http2::SendRequest<RequestBody>,
    in_flight: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
    /// The key exchange group its handshake agreed on (`sigil_identity::tls::key_exchange_group`).
    key_exchange: &'static str,
}

/// The connections to one endpoint; the async lock makes concurrent requests wait for one dial
/// rather than each dialling.
#[derive(Default)]
struct EndpointPool {
    connections: tokio::sync::Mutex<Vec<Connection>>,
}

/// Every endpoint's pool.
pub struct Pools {
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    max_per_endpoint: usize,
    by_target: Mutex<HashMap<Target, Arc<EndpointPool>>>,
}

/// One request's stream on a pooled connection, counted until dropped (when its response body
/// ended).
pub struct StreamSlot {
    in_flight: Arc<AtomicUsize>,
    key_exchange: &'static str,
}

impl StreamSlot {
    /// The key exchange group of the connection the request went out on, for its log line.
    pub fn key_exchange(&self) -> &'static str {
        self.key_exchange
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pools {
    pub fn new(
        tls: watch::Receiver<Option<Arc<TlsState>>>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        max_per_endpoint: usize,
    ) -> Pools {
        Pools {
            tls,
            metrics,
            connect_timeout,
            max_per_endpoint: max_per_endpoint.max(1),
            by_target: Mutex::default(),
        }
    }

    /// Sends `request` to `target` over a pooled connection.
    pub async fn send(
        &self,
        target: &Target,
        request: Request<RequestBody>,
    ) -> Result<Sent, PoolError> {
        let pool = {
            let mut by_target = self.by_target.lock().unwrap_or_else(|e| e.into_inner());
            by_target.entry(target.clone()).or_default().clone()
        };
        // A connection that broke before the request went out on it (the server closed it
        // while idle, say) gives the request back: it is sent once more on another.
        let mut request = request;
        let mut retried = false;
        loop {
            let (mut sender, slot) = self.checkout(&pool, target).await?;
            let written = Instant::now();
            let error = match sender.ready().await {
                Ok(()) => match sender.try_send_request(request).await {
                    Ok(response) => {
                        return Ok(Sent {
                            response,
                            slot,
                            written,
                        });
                    }
                    Err(mut unsent) => match unsent.take_message() {
                        Some(unsent_request) if !retried => {
                            request = unsent_request;
                            unsent.into_error()
                        }
                        _ => {
                            return Err(PoolError::Send {
                                addr: target.addr,
                                source: unsent.into_error(),
                            });
                        }
                    },
                },
                Err(error) if !retried => error,
                Err(source) => {
                    return Err(PoolError::Send {
                        addr: target.addr,
                        source,
                    });
                }
            };
            tracing::debug!(error = %error, addr = %target.addr, "pooled connection broke before a request went out; retrying on another");
            retried = true;
        }
    }

    /// A connection with room for one more request (dialled if none has), counted as in use.
    async fn checkout(
        &self,
        pool: &EndpointPool,
        target: &Target,
    ) -> Result<(http2::SendRequest<RequestBody>, StreamSlot), PoolError> {
        let mut connections = pool.connections.lock().await;
        connections.retain(|c| !c.sender.is_closed());
        let least_busy = connections
            .iter()
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed));
        let reuse = match least_busy {
            Some(c) if c.in_flight.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION => Some(c),
            Some(c) if connections.len() >= self.max_per_endpoint => Some(c),
            _ => None,
        };
        let chosen = match reuse {
            Some(c) => c,
            None => {
                // Boxed: the handshake's future is most of this one's size, and a request that
                // finds a connection (nearly all) would otherwise carry it, copied as it moves.
                let connection = Box::pin(self.dial(target)).await?;
                connections.push(connection);
                connections.last().expect("just pushed")
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last_used) = chosen.last_used.lock() {
            *last_used = Instant::now();
        }
        let slot = StreamSlot {
            in_flight: chosen.in_flight.clone(),
            key_exchange: chosen.key_exchange,
        };
        Ok((chosen.sender.clone(), slot))
    }

    async fn dial(&self, target: &Target) -> Result<Connection, PoolError> {
        let state = self.tls.borrow().clone().ok_or(PoolError::NoCertificate)?;
        let expected = BTreeSet::from([target.id.clone()]);
        let (stream, _) = dial::mtls(target.addr, self.connect_timeout, &state, expected)
            .await
            .inspect_err(|e| {
                if let DialError::Refused { reason, .. } = e {
                    self.count_refusal(*reason);
                }
            })?;
        let key_exchange = sigil_identity::tls::key_exchange_group(stream.get_ref().1);
        // Boxed: hyper sizes every task it spawns per request (the request body's and the
        // response's) by its largest kind, the connection's, which holds this IO; the TLS stream
        // inline would add about 1 KB to each.
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(Box::new(stream)))
            .await
            .map_err(|source| PoolError::Handshake {
                addr: target.addr,
                source,
            })?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let last_used = Arc::new(Mutex::new(Instant::now()));
        let idle = idle_for(in_flight.clone(), last_used.clone(), IDLE_CLOSE);
        let addr = target.addr;
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    tracing::debug!(error = %e, %addr, "pooled connection to an endpoint ended");
                },
                // Dropping the connection closes it; its sender then reports closed.
                () = idle => tracing::debug!(%addr, "closing an idle pooled connection"),
            }
        });
        Ok(Connection {
            sender,
            in_flight,
            last_used,
            key_exchange,
        })
    }

    /// Counts a refused handshake with an endpoint (pooled or dedicated).
    pub fn count_refusal(&self, reason: HandshakeFailure) {
        self.metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: Direction::Outbound,
                reason,
            })
            .inc();
    }
}

/// Resolves once a connection had nothing in flight and no new request for `idle`.
async fn idle_for(in_flight: Arc<AtomicUsize>, last_used: Arc<Mutex<Instant>>, idle: Duration) {
    loop {
        tokio::time::sleep(idle / 4).await;
        let quiet = last_used.lock().map_or(Duration::ZERO, |t| t.elapsed());
        if in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle {
            return;
        }
    }
}
