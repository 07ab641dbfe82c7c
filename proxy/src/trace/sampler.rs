//! Sampling: the parent's decision when there is one, else a ratio of new traces decided on the
//! trace id's randomness (so every proxy of a trace decides alike).

use super::context::TraceId;

/// `ParentBased(TraceIdRatio(ratio))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub ratio: f64,
}

/// 2^56: the trace id's low 56 bits are its randomness (W3C Trace Context level 2, and
/// OpenTelemetry's probability sampling).
const RANDOMNESS_RANGE: f64 = (1u64 << 56) as f64;

impl Sampler {
    /// The caller's decision if it made one, else the ratio on the trace id.
    pub fn decide(&self, trace_id: TraceId, parent: Option<bool>) -> bool {
        parent.unwrap_or_else(|| Sampler::ratio_decision(trace_id, self.ratio))
    }

    /// Whether a trace with no sampling decision is sampled at `ratio` (exact at 0 and 1).
    pub fn ratio_decision(trace_id: TraceId, ratio: f64) -> bool {
        // NaN samples nothing, as 0 does.
        if ratio.is_nan() || ratio <= 0.0 {
            return false;
        }
        if ratio >= 1.0 {
            return true;
        }
        let mut low = [0; 8];
        low[1..].copy_from_slice(&trace_id.0[9..]);
        let randomness = u64::from_be_bytes(low);
        // Below 2^56 the product fits in a u64; the cast truncates, so a ratio just above 0
        // samples no id rather than one.
        randomness < (ratio * RANDOMNESS_RANGE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_with_randomness(randomness: u64) -> TraceId {
        let mut id = [0xab; 16];
        id[9..].copy_from_slice(&randomness.to_be_bytes()[1..]);
        TraceId(id)
    }

    #[test]
    fn zero_and_one_are_exact() {
        for randomness in [0, 1, (1 << 55), (1 << 56) - 1] {
            let id = id_with_randomness(randomness);
            assert!(!Sampler::ratio_decision(id, 0.0));
            assert!(Sampler::ratio_decision(id, 1.0));
        }
        assert!(!Sampler::ratio_decision(id_with_randomness(0), f64::NAN));
        assert!(!Sampler::ratio_decision(id_with_randomness(0), -0.5));
        assert!(Sampler::ratio_decision(id_with_randomness(0), 2.0));
    }

    #[test]
    fn the_decision_is_the_randomness_against_the_ratio() {
        let half = 1u64 << 55;
        assert!(Sampler::ratio_decision(id_with_randomness(half - 1), 0.5));
        assert!(!Sampler::ratio_decision(id_with_randomness(half), 0.5));
        // The high byte of the low 64 bits is not randomness (64-bit B3 ids included).
        let mut id = id_with_randomness(0);
        id.0[8] = 0xff;
        assert!(Sampler::ratio_decision(id, 0.01));
    }

    #[test]
    fn the_same_trace_id_gets_the_same_decision() {
        for _ in 0..1000 {
            let id = TraceId::random();
            let first = Sampler::ratio_decision(id, 0.3);
            assert!((0..5).all(|_| Sampler::ratio_decision(id, 0.3) == first));
        }
    }

    #[test]
    fn random_ids_are_sampled_at_the_ratio() {
        for ratio in [0.01, 0.25, 0.5, 0.9] {
            let n = 100_000;
            let sampled = (0..n)
                .filter(|_| Sampler::ratio_decision(TraceId::random(), ratio))
                .count();
            let share = sampled as f64 / n as f64;
            assert!(
                (share - ratio).abs() < 0.01,
                "ratio {ratio}: sampled {share}"
            );
        }
    }

    #[test]
    fn the_parent_decides_when_it_did() {
        let sampler = Sampler { ratio: 0.0 };
        let id = id_with_randomness(0);
        assert!(sampler.decide(id, Some(true)));
        assert!(!Sampler { ratio: 1.0 }.decide(id, Some(false)));
        assert!(!sampler.decide(id, None));
        assert!(Sampler { ratio: 1.0 }.decide(id, None));
    }
}
