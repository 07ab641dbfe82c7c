//! Pooled mutual TLS HTTP/2 connections to meshed endpoints, one pool per endpoint (address and
//! the SPIFFE ID it must prove). One connection carries many requests at once; another is opened
//! only when every open one has [`STREAMS_PER_CONNECTION`] requests in flight, up to
//! `--max-connections-per-endpoint` (past that, requests queue on the least busy connection).
//! A broken connection is dropped and a new one dialled for the next request; one without a
//! request for [`IDLE_CLOSE`] is closed.
//!
//! Requests go on their connection through [`crate::h2_client`].

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{Request, Response};
use sigil_identity::SpiffeId;
use tokio::sync::watch;

use crate::dial::{self, DialError};
use crate::h2_client::{self, ResponseBody};
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
        source: h2::Error,
    },
    #[error("sending the request to {addr}: {source}")]
    Send {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

/// A request's response head from an endpoint.
pub struct Sent {
    pub response: Response<ResponseBody>,
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
    h2: h2_client::Connection,
    state: Arc<ConnectionState>,
}

/// What a connection's requests and its task share.
struct ConnectionState {
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
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
    connection: Arc<ConnectionState>,
}

impl StreamSlot {
    /// The key exchange group of the connection the request went out on, for its log line.
    pub fn key_exchange(&self) -> &'static str {
        self.connection.key_exchange
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.connection.in_flight.fetch_sub(1, Ordering::Relaxed);
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

    /// Sends `request` to `target` over a pooled connection and waits for the response head.
    pub async fn send(
        &self,
        target: &Target,
        request: Request<RequestBody>,
    ) -> Result<Sent, PoolError> {
        let pool = {
            let mut by_target = self.by_target.lock().unwrap_or_else(|e| e.into_inner());
            // Looked up before `entry`, which would take a copy of the key (two strings of the
            // SPIFFE ID) for every request.
            match by_target.get(target) {
                Some(pool) => pool.clone(),
                None => by_target.entry(target.clone()).or_default().clone(),
            }
        };
        let send_error = |source| PoolError::Send {
            addr: target.addr,
            source,
        };
        // A connection that broke before the request went out on it (the server closed it
        // while idle, say) is passed by from then on, and the request goes out once more on
        // another.
        let mut retried = false;
        let (sender, slot, written) = loop {
            let (connection, slot) = self.checkout(&pool, target).await?;
            let written = Instant::now();
            match connection.ready().await {
                Ok(sender) => break (sender, slot, written),
                Err(error) if !retried => {
                    tracing::debug!(error = %error, addr = %target.addr, "pooled connection broke before a request went out; retrying on another");
                    retried = true;
                }
                Err(error) => return Err(send_error(error)),
            }
        };
        let response = h2_client::send(sender, request).await.map_err(send_error)?;
        Ok(Sent {
            response,
            slot,
            written,
        })
    }

    /// A connection with room for one more request (dialled if none has), counted as in use.
    async fn checkout(
        &self,
        pool: &EndpointPool,
        target: &Target,
    ) -> Result<(h2_client::Connection, StreamSlot), PoolError> {
        let mut connections = pool.connections.lock().await;
        connections.retain(|c| !c.h2.is_closed());
        let in_flight = |c: &Connection| c.state.in_flight.load(Ordering::Relaxed);
        let least_busy = connections.iter().min_by_key(|c| in_flight(c));
        let reuse = match least_busy {
            Some(c) if in_flight(c) < STREAMS_PER_CONNECTION => Some(c),
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
        chosen.state.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last_used) = chosen.state.last_used.lock() {
            *last_used = Instant::now();
        }
        let slot = StreamSlot {
            connection: chosen.state.clone(),
        };
        Ok((chosen.h2.clone(), slot))
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
        let state = Arc::new(ConnectionState {
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            key_exchange,
        });
        let idle = idle_for(state.clone(), IDLE_CLOSE);
        let h2 = h2_client::handshake(stream, target.addr, idle)
            .await
            .map_err(|source| PoolError::Handshake {
                addr: target.addr,
                source,
            })?;
        Ok(Connection { h2, state })
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
async fn idle_for(state: Arc<ConnectionState>, idle: Duration) {
    loop {
        tokio::time::sleep(idle / 4).await;
        let quiet = state
            .last_used
            .lock()
            .map_or(Duration::ZERO, |t| t.elapsed());
        if state.in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle {
            return;
        }
    }
}
