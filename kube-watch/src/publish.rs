//! A state kept from watches (and optionally a followed file), published as a versioned,
//! immutable snapshot on a `watch` channel: version 0 until every source has synced, then one more
//! with every change of the published content. Used by the agent's mesh membership and policy
//! feed, whose proxies must never act on half a list.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::follow::{self, Events, Follower};
use crate::polled_file::POLL_INTERVAL;

/// What a publishing task keeps: its sources' state, merged into the content it publishes.
pub trait State: Send + 'static {
    /// An event of its watches.
    type Event: Send + 'static;
    /// What a snapshot holds besides its version; published only when it changes.
    type Content: PartialEq + Send + Sync;
    /// What is published; `Default` is the version-0 snapshot, held until every source synced.
    type Snapshot: Default + Send + Sync + 'static;

    /// Follows one event; returns whether the content may have changed.
    fn on_event(&mut self, event: Self::Event) -> bool;
    /// Whether every source has delivered its initial state (every watched kind's initial list,
    /// the file loaded).
    fn synced(&self) -> bool;
    /// Whether a file is followed; if so [`State::poll_file`] runs every [`POLL_INTERVAL`].
    fn has_file(&self) -> bool;
    /// Re-reads the followed file; returns whether the content may have changed.
    fn poll_file(&mut self) -> impl Future<Output = bool> + Send;
    /// The content, merged from every source (called once synced, after each change).
    fn content(&mut self) -> Self::Content;
    /// The version and content of a published snapshot.
    fn published(snapshot: &Self::Snapshot) -> (u64, &Self::Content);
    /// The snapshot to publish as `version`, recorded (metrics, logs) as it is made.
    fn snapshot(&self, version: u64, content: Self::Content) -> Self::Snapshot;
}

/// Starts the task that keeps `state` from `events` (`None`: no watches) and its file, and
/// publishes its snapshots on the returned receiver; it stops, logging "`name` stopped", when
/// `shutdown` turns true or its sender is dropped, which drops the snapshots' sender.
pub fn spawn<S: State>(
    name: &'static str,
    state: S,
    events: Option<Events<S::Event>>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<S::Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(S::Snapshot::default()));
    let mut publisher = Publisher { state, tx };
    tokio::spawn(async move {
        // Without watches every source is already known.
        publisher.publish();
        follow::follow(&mut publisher, events, stopped(shutdown)).await;
        info!("{name} stopped");
    });
    rx
}

/// Completes when `shutdown` turns true or its sender is dropped.
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A state and where its snapshots go.
struct Publisher<S: State> {
    state: S,
    tx: watch::Sender<Arc<S::Snapshot>>,
}

impl<S: State> Publisher<S> {
    /// Publishes the content once every source has synced, if it differs from the one published
    /// last.
    fn publish(&mut self) {
        if !self.state.synced() {
            return;
        }
        let content = self.state.content();
        let version = {
            let current = self.tx.borrow();
            let (version, published) = S::published(&current);
            if version > 0 && *published == content {
                return;
            }
            version + 1
        };
        let snapshot = self.state.snapshot(version, content);
        self.tx.send_replace(Arc::new(snapshot));
    }
}

impl<S: State> Follower for Publisher<S> {
    type Event = S::Event;

    async fn on_event(&mut self, event: S::Event) {
        if self.state.on_event(event) {
            self.publish();
        }
    }

    fn tick_period(&self) -> Option<Duration> {
        self.state.has_file().then_some(POLL_INTERVAL)
    }

    async fn on_tick(&mut self) {
        if self.state.poll_file().await {
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests;
