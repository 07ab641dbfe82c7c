//! Following a server-streaming feed of the node agent (mesh membership, policies) for the life
//! of the process: connect to the agent socket, open the stream, hand every message on, and
//! when the agent goes away keep what was received last and reconnect with backoff.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sigil_base::backoff::Backoff;
use tonic::Streaming;
use tonic::transport::Channel;
use tracing::warn;

/// First retry after the agent went away; the agent usually restarts within seconds...
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// ...so the wait never grows past this (a local socket costs nothing to retry).
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("connecting to the agent at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent refused the stream: {0}")]
    Refused(#[source] tonic::Status),
    #[error("the stream broke: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the agent closed the stream")]
    Closed,
}

/// Follows the `feed` stream forever: `open` starts it on a fresh channel, `on_message` takes
/// each message, `reconnects` counts the losses.
pub async fn follow_forever<M, Open, Fut, OnMessage>(
    socket: PathBuf,
    feed: &'static str,
    open: Open,
    mut on_message: OnMessage,
    reconnects: Counter,
) where
    Open: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Streaming<M>>, tonic::Status>>,
    OnMessage: FnMut(M),
{
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    loop {
        let e = follow_once(&socket, &open, &mut on_message, &mut backoff).await;
        let delay = backoff.next_delay();
        warn!(
            error = %e,
            feed,
            retry_in_ms = delay.as_millis() as u64,
            "lost an agent feed; keeping what it sent last and reconnecting"
        );
        reconnects.inc();
        tokio::time::sleep(delay).await;
    }
}

async fn follow_once<M, Open, Fut, OnMessage>(
    socket: &Path,
    open: &Open,
    on_message: &mut OnMessage,
    backoff: &mut Backoff,
) -> FeedError
where
    Open: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Streaming<M>>, tonic::Status>>,
    OnMessage: FnMut(M),
{
    let channel = match sigil_base::socket_client::connect(socket).await {
        Ok(channel) => channel,
        Err(source) => {
            return FeedError::Connect {
                path: socket.display().to_string(),
                source,
            };
        }
    };
    let mut stream = match open(channel).await {
        Ok(response) => response.into_inner(),
        Err(status) => return FeedError::Refused(status),
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                backoff.reset();
                on_message(message);
            }
            Ok(None) => return FeedError::Closed,
            Err(status) => return FeedError::Stream(status),
        }
    }
}
