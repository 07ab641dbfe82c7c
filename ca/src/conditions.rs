//! `metav1.Condition`s as the CA writes them in every object's status (sigil's policy kinds, the
//! Gateway API routes' `status.parents[].conditions`): one message format, bounded to what a
//! condition holds, and a `lastTransitionTime` that stays while the condition's status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::Value;

pub const STATUS_TRUE: &str = "True";
pub const STATUS_FALSE: &str = "False";
pub const STATUS_UNKNOWN: &str = "Unknown";
/// Between the problems or warnings of one message.
pub const SEPARATOR: &str = "; ";
/// `metav1.Condition`'s limit on `message` (in characters; bytes are never fewer).
pub const MAX_MESSAGE_LEN: usize = 32768;
/// Ends a message cut to [`MAX_MESSAGE_LEN`].
pub const CUT: &str = " ...";

/// The condition `type_` with `status`, `reason` and `message` (cut to [`MAX_MESSAGE_LEN`]) on
/// generation `generation`. If `current` holds a condition of that type with the same status,
/// its `lastTransitionTime` is kept; otherwise the condition changed now.
pub fn condition(
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: Option<i64>,
    current: &[Condition],
    now: &Time,
) -> Condition {
    let last_transition_time = current
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: bounded(message),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status string of a boolean condition.
pub fn status_of(status: bool) -> &'static str {
    if status { STATUS_TRUE } else { STATUS_FALSE }
}

/// `message`, cut to what a condition may hold.
pub fn bounded(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    let mut end = MAX_MESSAGE_LEN - CUT.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(CUT);
    message
}

/// The conditions in `value` (a `conditions` array); entries that are not well-formed conditions
/// are skipped (if one of sigil's is malformed, it is rewritten).
pub fn parse(value: Option<&Value>) -> Vec<Condition> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| serde_json::from_value(c.clone()).ok())
        .collect()
}
