//! An index kept whole in a `watch` channel and changed in place by one watch's events, for
//! lookups on every request where copying a snapshot per change would cost too much: the CA's
//! index of the cluster's pods, the agent's of its node's pods. The initial list, and every
//! re-list after a broken watch, is built aside and swapped in whole when it completes, so a
//! lookup never sees half a list.

use std::marker::PhantomData;
use std::time::Duration;

use kube::runtime::watcher::Event;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::follow::{self, Events, Follower, WatchEvent};

/// What a watch of `O` objects keeps.
pub trait Index<O>: Default + Send + Sync + 'static {
    /// Records the object as it is now.
    fn apply(&mut self, object: &O);
    /// Forgets the object.
    fn delete(&mut self, object: &O);
    /// Marks the index as holding a complete list.
    fn set_synced(&mut self);
    /// How many objects it holds, for the log.
    fn count(&self) -> usize;
}

/// Keeps `tx`'s index current with `events` until they end (they do not: the watcher retries);
/// `what` names the objects in the log.
pub async fn keep<O: Send + 'static, I: Index<O>>(
    what: &'static str,
    events: Events<WatchEvent<O>>,
    tx: watch::Sender<I>,
) {
    let mut keeper = Keeper {
        what,
        tx,
        relisting: None,
        objects: PhantomData,
    };
    follow::follow(&mut keeper, Some(events), std::future::pending()).await;
}

/// An index's sender, and the re-list in progress.
struct Keeper<O, I> {
    what: &'static str,
    tx: watch::Sender<I>,
    relisting: Option<I>,
    objects: PhantomData<fn(O)>,
}

impl<O: Send + 'static, I: Index<O>> Follower for Keeper<O, I> {
    type Event = WatchEvent<O>;

    async fn on_event(&mut self, event: WatchEvent<O>) {
        match event {
            Ok(Event::Init) => self.relisting = Some(I::default()),
            Ok(Event::InitApply(object)) => {
                if let Some(index) = self.relisting.as_mut() {
                    index.apply(&object);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(mut index) = self.relisting.take() {
                    index.set_synced();
                    info!(count = index.count(), "{} synced", self.what);
                    self.tx.send_replace(index);
                }
            }
            Ok(Event::Apply(object)) => self.tx.send_modify(|index| index.apply(&object)),
            Ok(Event::Delete(object)) => self.tx.send_modify(|index| index.delete(&object)),
            Err(e) => warn!(error = %e, "{} watch failed; retrying", self.what),
        }
    }

    fn tick_period(&self) -> Option<Duration> {
        None
    }

    async fn on_tick(&mut self) {}
}

#[cfg(test)]
mod tests;
