//! Sampling: the parent's decision when there is one, else a ratio of new traces decided on the
//! trace id's randomness (so every proxy of a trace decides alike).

use super::context::TraceId;

/// `ParentBased(TraceIdRatio(ratio))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub ratio: f64,
}

impl Sampler {
    /// Whether a trace with no sampling decision is sampled at `ratio` (exact at 0 and 1).
    pub fn ratio_decision(trace_id: TraceId, ratio: f64) -> bool {
        let _ = (trace_id, ratio);
        unimplemented!("trace-core")
    }
}
