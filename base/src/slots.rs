//! Connection slots: at most a total number of connections open at once, and at most so many of
//! them under one key (the agent socket counts by process, the CA by source address), each
//! given back when its connection ends. Optionally, a pool full of connections that have not
//! proved anything yet makes room by closing the oldest of them.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Why no slot was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Total,
    /// The key holds as many as it may.
    PerKey,
}

/// The slot pool of one listener.
pub struct ConnectionSlots<K> {
    total: Arc<Semaphore>,
    total_limit: usize,
    per_key_limit: usize,
    per_key: Mutex<HashMap<K, usize>>,
    /// Connections that may be evicted, oldest first (some may be gone or settled since).
    oldest: Mutex<VecDeque<Weak<Eviction>>>,
}

/// One connection counted against its key until dropped.
pub struct KeySlot<K: Eq + Hash + Clone> {
    slots: Arc<ConnectionSlots<K>>,
    key: K,
}

/// One open connection's slot, given back when dropped.
pub struct ConnectionSlot<K: Eq + Hash + Clone> {
    key: KeySlot<K>,
    _total: OwnedSemaphorePermit,
}

/// How to close one connection taken by [`ConnectionSlots::take_evicting`]: when every slot is
/// taken, the oldest connection not yet settled is told to close for a new one.
#[derive(Default)]
pub struct Eviction {
    notify: Notify,
    settled: AtomicBool,
}

impl Eviction {
    /// Ends when this connection is to close for a newer one.
    pub async fn evicted(&self) {
        self.notify.notified().await;
    }

    /// The connection proved itself (e.g. authenticated a call): it is no longer evicted.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::Release);
    }

    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

impl<K: Eq + Hash + Clone> ConnectionSlots<K> {
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            total: Arc::new(Semaphore::new(total)),
            total_limit: total,
            per_key_limit: per_key,
            per_key: Mutex::default(),
            oldest: Mutex::default(),
        })
    }

    pub fn total_limit(&self) -> usize {
        self.total_limit
    }

    pub fn per_key_limit(&self) -> usize {
        self.per_key_limit
    }

    /// A slot now, or why not (the total is checked first).
    pub fn try_take(self: &Arc<Self>, key: K) -> Result<ConnectionSlot<K>, Refused> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Total)?;
        let key = self.take_key(key).ok_or(Refused::PerKey)?;
        Ok(ConnectionSlot { key, _total: total })
    }

    /// Counts one more connection under `key`, if it holds fewer than its limit: the first step
    /// of [`ConnectionSlots::take_evicting`], taken before any work is spent on the connection.
    pub fn take_key(self: &Arc<Self>, key: K) -> Option<KeySlot<K>> {
        let mut counts = self.per_key.lock().expect("never poisoned");
        let count = counts.entry(key.clone()).or_default();
        if *count >= self.per_key_limit {
            return None;
        }
        *count += 1;
        Some(KeySlot {
            slots: self.clone(),
            key,
        })
    }

    /// A slot for a connection already counted under its key, and the way to evict it. With
    /// every slot taken, the oldest connection not settled is evicted and its slot awaited for
    /// up to `wait`; `None` if none came free.
    pub async fn take_evicting(
        self: &Arc<Self>,
        key: KeySlot<K>,
        wait: Duration,
    ) -> Option<(ConnectionSlot<K>, Arc<Eviction>)> {
        let total = match self.total.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if self.evict_oldest() => {
                tokio::time::timeout(wait, self.total.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        }?;
        let eviction = Arc::new(Eviction::default());
        let mut oldest = self.oldest.lock().expect("never poisoned");
        if oldest.len() >= 2 * self.total_limit.max(1) {
            oldest.retain(|e| e.upgrade().is_some_and(|e| !e.is_settled()));
        }
        oldest.push_back(Arc::downgrade(&eviction));
        Some((ConnectionSlot { key, _total: total }, eviction))
    }

    /// Tells the oldest connection not settled to close; whether there was one.
    fn evict_oldest(&self) -> bool {
        let mut oldest = self.oldest.lock().expect("never poisoned");
        while let Some(eviction) = oldest.pop_front() {
            if let Some(eviction) = eviction.upgrade()
                && !eviction.is_settled()
            {
                eviction.notify.notify_one();
                return true;
            }
        }
        false
    }
}

impl<K: Eq + Hash + Clone> KeySlot<K> {
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Eq + Hash + Clone> ConnectionSlot<K> {
    pub fn key(&self) -> &K {
        &self.key.key
    }
}

impl<K: Eq + Hash + Clone> Drop for KeySlot<K> {
    fn drop(&mut self) {
        let mut counts = self.slots.per_key.lock().expect("never poisoned");
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_then_per_key_and_given_back_on_drop() {
        let slots = ConnectionSlots::new(3, 2);
        let a1 = slots.try_take("a").unwrap();
        let _a2 = slots.try_take("a").unwrap();
        assert_eq!(slots.try_take("a").err(), Some(Refused::PerKey));
        let _b = slots.try_take("b").unwrap();
        assert_eq!(slots.try_take("c").err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(slots.try_take("a").unwrap().key(), &"a");
        assert!(slots.per_key.lock().unwrap().len() <= 2);
    }

    #[test]
    fn a_refused_key_gives_its_total_slot_back() {
        let slots = ConnectionSlots::new(2, 1);
        let _a = slots.try_take(1).unwrap();
        assert_eq!(slots.try_take(1).err(), Some(Refused::PerKey));
        assert!(
            slots.try_take(2).is_ok(),
            "the refused take held no total slot"
        );
    }

    #[test]
    fn a_key_no_longer_held_is_forgotten() {
        let slots = ConnectionSlots::new(4, 4);
        drop(slots.take_key("a").unwrap());
        assert!(slots.per_key.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_pool_evicts_its_oldest_unsettled_connection() {
        let slots = ConnectionSlots::new(2, 64);
        let wait = Duration::from_secs(1);
        let (first, first_eviction) = slots
            .take_evicting(slots.take_key(1).unwrap(), wait)
            .await
            .unwrap();
        let (second, second_eviction) = slots
            .take_evicting(slots.take_key(2).unwrap(), wait)
            .await
            .unwrap();
        first_eviction.settle();
        // The first settled: the second is the oldest to evict; it closes when told to.
        let closing = tokio::spawn(async move {
            second_eviction.evicted().await;
            drop(second);
        });
        let (third, _) = slots
            .take_evicting(slots.take_key(3).unwrap(), wait)
            .await
            .expect("the evicted connection's slot");
        closing.await.unwrap();
        assert_eq!((first.key(), third.key()), (&1, &3));
        // Nothing left to evict: refused after no wait at all.
        assert!(
            slots
                .take_evicting(slots.take_key(4).unwrap(), wait)
                .await
                .is_none()
        );
    }
}
