//! Exponential backoff with jitter, for retries (against the CA, the agent socket).

use std::time::Duration;

pub const INITIAL_DELAY: Duration = Duration::from_millis(500);
/// The longest wait between retries (about 2 min, as the node-agent issue asks; ztunnel caps at 150 s).
pub const MAX_DELAY: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

/// The CA retry schedule: [`INITIAL_DELAY`] doubling up to [`MAX_DELAY`].
impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(INITIAL_DELAY, MAX_DELAY)
    }
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max` (e.g. a short cap for a local agent socket).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now (±20 % jitter so agents do not retry in lockstep after an outage),
    /// doubling the next one up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.next, 0.2);
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// `base` scaled by a random factor in [1 - spread, 1 + spread].
pub fn jitter(base: Duration, spread: f64) -> Duration {
    let mut byte = [0u8; 2];
    // Jitter needs no cryptographic quality, but ring's generator is already here and cannot fail
    // in practice; fall back to no jitter if it ever does.
    let unit = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte) {
        Ok(()) => f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    base.mul_f64(1.0 - spread + 2.0 * spread * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(
            last <= MAX_DELAY.mul_f64(1.2) && last >= MAX_DELAY.mul_f64(0.8),
            "{last:?}"
        );
        b.reset();
        let first = b.next_delay();
        assert!(first <= INITIAL_DELAY.mul_f64(1.2) && first >= INITIAL_DELAY.mul_f64(0.8));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..200 {
            let d = jitter(Duration::from_secs(100), 0.05);
            assert!(
                d >= Duration::from_secs(95) && d <= Duration::from_secs(105),
                "{d:?}"
            );
        }
    }
}
