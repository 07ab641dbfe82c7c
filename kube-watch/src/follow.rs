//! The loop of every watching task: the watches' events as they come, a periodic tick (a followed
//! file's re-read, failed writes' retry), until shutdown; and the watches themselves, each with
//! the watcher's backoff on errors and its re-lists.

use std::fmt::Debug;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::time::{Interval, MissedTickBehavior};

/// One event of a watch of `K` objects, or why the watch failed (it is retried).
pub type WatchEvent<K> = Result<Event<K>, watcher::Error>;

/// The events of one or more watches, as one stream.
pub type Events<E> = BoxStream<'static, E>;

/// The watch of `api`'s objects that `config` selects. The watcher retries with kube's default
/// backoff after an error (at most 30 s apart) and re-lists when it must; it never ends.
pub fn watch<K>(api: Api<K>, config: watcher::Config) -> Events<WatchEvent<K>>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff().boxed()
}

/// The watches of several kinds as one stream, each event tagged with its kind.
pub fn tagged<T, E>(watches: impl IntoIterator<Item = (T, Events<E>)>) -> Events<(T, E)>
where
    T: Copy + Send + 'static,
    E: Send + 'static,
{
    let tagged = watches
        .into_iter()
        .map(|(tag, events)| events.map(move |event| (tag, event)).boxed());
    futures::stream::select_all(tagged).boxed()
}

/// What a watching task does with its events and ticks; it alone owns its state.
pub trait Follower: Send {
    type Event: Send;
    /// Takes one event of the watches.
    fn on_event(&mut self, event: Self::Event) -> impl Future<Output = ()> + Send;
    /// How often [`Follower::on_tick`] runs; `None`: never.
    fn tick_period(&self) -> Option<Duration>;
    fn on_tick(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs `follower` until `shutdown` completes or the watches end (they do not: the watchers
/// retry): the events as they come (`None`: no watches), a tick every
/// [`Follower::tick_period`], the first one period from now.
pub async fn follow<F: Follower>(
    follower: &mut F,
    mut events: Option<impl Stream<Item = F::Event> + Unpin>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let period = follower.tick_period();
    let mut ticks = period.map(timer);
    loop {
        let next_event = async {
            match events.as_mut() {
                Some(events) => events.next().await,
                None => std::future::pending().await,
            }
        };
        let tick = async {
            match ticks.as_mut() {
                Some(ticks) => ticks.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            event = next_event => match event {
                Some(event) => follower.on_event(event).await,
                None => break,
            },
            _ = tick => follower.on_tick().await,
        }
    }
}

/// The timer of the ticks: the first one period from now (a followed file was just loaded), and
/// a late tick delays the next rather than bunching them up.
fn timer(period: Duration) -> Interval {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}
