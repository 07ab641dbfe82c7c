//! Budgets per key (a source address, a caller): token buckets of `burst` tokens refilled at
//! `per_second`, one per key, in a map of bounded size. What the CA spends them on is up to its
//! callers: TokenReviews per source address (`authn`), signatures per caller (`service`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Most keys whose budget is tracked at once.
pub const MAX_TRACKED_KEYS: usize = 4096;

/// One budget per key.
#[derive(Debug)]
pub struct Budgets<K> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

/// What a key had left at `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> Budgets<K> {
    /// Budgets of `burst` at once, refilled at `per_second`.
    pub fn new(burst: f64, per_second: f64) -> Self {
        Budgets {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// How many a budget earns back per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Takes one from `key`'s budget; false (and nothing taken) when it has none left.
    pub fn spend(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("budget lock");
        if let Some(bucket) = buckets.get_mut(key) {
            return self.take(bucket, now);
        }
        if buckets.len() >= MAX_TRACKED_KEYS {
            // Keys whose budget is full again are the same as untracked ones.
            buckets.retain(|_, b| self.refilled(*b, now) < self.burst);
            if buckets.len() >= MAX_TRACKED_KEYS {
                // Every tracked key is spending: start over rather than grow without bound.
                buckets.clear();
            }
        }
        let mut bucket = Bucket {
            tokens: self.burst,
            at: now,
        };
        let granted = self.take(&mut bucket, now);
        buckets.insert(key.clone(), bucket);
        granted
    }

    /// Refills `bucket` to `now` and takes one from it if it has one.
    fn take(&self, bucket: &mut Bucket, now: Instant) -> bool {
        let tokens = self.refilled(*bucket, now);
        let granted = tokens >= 1.0;
        *bucket = Bucket {
            tokens: if granted { tokens - 1.0 } else { tokens },
            at: now,
        };
        granted
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        (bucket.tokens + earned).min(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_key_spends_its_burst_then_what_refills_and_other_keys_are_untouched() {
        let budgets = Budgets::new(3.0, 2.0);
        let start = Instant::now();
        let spent = (0..5).filter(|_| budgets.spend(&"a", start)).count();
        assert_eq!(spent, 3);
        assert!(budgets.spend(&"b", start), "another key has its own budget");
        // Half a second at 2 per second earns one.
        let later = start + Duration::from_millis(500);
        assert!(budgets.spend(&"a", later));
        assert!(!budgets.spend(&"a", later));
        // Refills stop at the burst.
        let much_later = later + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| budgets.spend(&"a", much_later)).count(),
            3
        );
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_full_budgets_first() {
        let budgets = Budgets::new(2.0, 1.0);
        let start = Instant::now();
        // One key spending, the rest full again a few seconds later.
        assert!(budgets.spend(&u32::MAX, start));
        assert!(budgets.spend(&u32::MAX, start));
        for key in 0..(MAX_TRACKED_KEYS as u32 - 1) {
            assert!(budgets.spend(&key, start));
        }
        let later = start + Duration::from_millis(1500);
        assert!(budgets.spend(&(u32::MAX - 1), later));
        let buckets = budgets.buckets.lock().unwrap();
        assert!(buckets.len() <= 2, "{} keys kept", buckets.len());
        assert!(
            buckets.contains_key(&u32::MAX),
            "a key still spending is kept"
        );
    }
}
