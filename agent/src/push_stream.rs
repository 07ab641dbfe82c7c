//! The server streams of the agent socket that push a message whenever their source changes
//! (Workload API, mesh membership, policies): one way to turn such a feed into a gRPC response
//! stream, counting every push.

use std::future::Future;
use std::pin::Pin;

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use tonic::Status;

/// A gRPC server stream's type.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One open stream's source of messages.
pub trait PushFeed: Send + Sized + 'static {
    type Message: Send + 'static;
    /// Ends the stream; sent to the client as the stream's last message.
    type Error: Into<Status>;

    /// The next message to push (the first one at once).
    fn next_message(&mut self) -> impl Future<Output = Result<Self::Message, Self::Error>> + Send;

    /// Counts the messages pushed.
    fn pushes(&self) -> &Counter;
}

/// The response stream of `feed`: its messages until its first error, which ends it.
pub fn into_stream<F: PushFeed>(feed: F) -> ResponseStream<F::Message> {
    Box::pin(futures::stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        match feed.next_message().await {
            Ok(message) => {
                feed.pushes().inc();
                Some((Ok(message), Some(feed)))
            }
            Err(e) => Some((Err(e.into()), None)),
        }
    }))
}
