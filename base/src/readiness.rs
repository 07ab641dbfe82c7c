//! Readiness: the named conditions a process reports on `/ready`, each followed from the `watch`
//! channel of the part it depends on (a loaded key, a synced index, a shutdown signal), so that
//! the CA, the node agent and the proxy each declare what they wait for instead of hand-writing
//! the loop that watches it.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

/// What `/ready` reports: named conditions, all of which must hold (e.g. the CA's
/// `key_loaded` and `pods_synced`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readiness(pub Vec<(&'static str, bool)>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|(_, holds)| *holds)
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conditions: Vec<String> = self
            .0
            .iter()
            .map(|(name, holds)| format!("{name}={holds}"))
            .collect();
        f.write_str(&conditions.join(" "))
    }
}

type Follow =
    Box<dyn FnOnce(watch::Sender<Readiness>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The conditions of one process, in the order `/ready` names them.
#[derive(Default)]
pub struct Conditions {
    initial: Vec<(&'static str, bool)>,
    follow: Vec<Follow>,
}

impl Conditions {
    pub fn new() -> Self {
        Conditions::default()
    }

    /// `name` holds while `holds` says so of `source`'s current value. A source that closes keeps
    /// its last value.
    pub fn watch<T: Send + Sync + 'static>(
        mut self,
        name: &'static str,
        mut source: watch::Receiver<T>,
        holds: impl Fn(&T) -> bool + Send + 'static,
    ) -> Self {
        let index = self.initial.len();
        self.initial
            .push((name, holds(&source.borrow_and_update())));
        self.follow.push(Box::new(move |tx| {
            Box::pin(async move {
                loop {
                    tokio::select! {
                        changed = source.changed() => if changed.is_err() { return },
                        () = tx.closed() => return,
                    }
                    let now = holds(&source.borrow_and_update());
                    tx.send_if_modified(|readiness| {
                        let held = &mut readiness.0[index].1;
                        let changed = *held != now;
                        *held = now;
                        changed
                    });
                }
            })
        }));
        self
    }

    /// `name`, which never changes (e.g. a sync that this configuration does not need).
    pub fn fixed(mut self, name: &'static str, holds: bool) -> Self {
        self.initial.push((name, holds));
        self
    }

    /// The readiness, kept current by one task per watched condition until no one reads it.
    /// Needs a Tokio runtime.
    pub fn spawn(self) -> watch::Receiver<Readiness> {
        let (tx, rx) = watch::channel(Readiness(self.initial));
        for follow in self.follow {
            tokio::spawn(follow(tx.clone()));
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn until(rx: &watch::Receiver<Readiness>, state: &str) -> bool {
        let mut rx = rx.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|r| r.to_string() == state),
        )
        .await
        .unwrap_or_else(|_| panic!("never {state}"))
        .map(|r| r.is_ready())
        .unwrap()
    }

    #[tokio::test]
    async fn follows_every_condition_in_order() {
        let (key_tx, key) = watch::channel(None::<u8>);
        let (signal_tx, signalled) = watch::channel(false);
        let ready = Conditions::new()
            .watch("key_loaded", key, Option::is_some)
            .fixed("pods_synced", true)
            .watch("not_shutting_down", signalled, |s| !*s)
            .spawn();
        assert!(
            !until(
                &ready,
                "key_loaded=false pods_synced=true not_shutting_down=true"
            )
            .await
        );
        key_tx.send_replace(Some(1));
        assert!(
            until(
                &ready,
                "key_loaded=true pods_synced=true not_shutting_down=true"
            )
            .await
        );
        signal_tx.send_replace(true);
        assert!(
            !until(
                &ready,
                "key_loaded=true pods_synced=true not_shutting_down=false"
            )
            .await
        );
    }

    #[tokio::test]
    async fn a_closed_source_keeps_its_last_value() {
        let (key_tx, key) = watch::channel(true);
        let (other_tx, other) = watch::channel(false);
        let ready = Conditions::new()
            .watch("key", key, |k| *k)
            .watch("other", other, |o| *o)
            .spawn();
        drop(key_tx);
        other_tx.send_replace(true);
        assert!(until(&ready, "key=true other=true").await);
    }

    #[test]
    fn no_conditions_is_not_ready() {
        assert!(!Readiness::default().is_ready());
    }
}
