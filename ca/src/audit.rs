//! The audit trail: one JSON line per signing decision (who asked, for which identity, granted or
//! the exact reason not, serial and expiry). Callers only ever see an opaque status; this is where
//! operators find out why. Tokens and keys are never part of a record.

use crate::metrics::{Api, DenyReason};

/// The tracing target of audit records; with JSON logs each record is one line.
pub const TARGET: &str = "sigil_audit";

#[derive(Debug, Default, PartialEq)]
pub struct Record {
    pub api: Option<Api>,
    /// The peer's address.
    pub peer: Option<String>,
    /// The authenticated caller's SPIFFE ID, if authentication got that far.
    pub caller: Option<String>,
    /// How the caller authenticated: `token` or `client-cert`.
    pub credential: Option<&'static str>,
    /// The identity asked for (the caller's own unless impersonating).
    pub requested: Option<String>,
    pub granted: bool,
    pub reason: Option<DenyReason>,
    /// The real reason for a refusal (never shown to the caller).
    pub detail: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<i64>,
    pub ttl_seconds: u64,
}

pub fn record(r: &Record) {
    tracing::info!(
        target: TARGET,
        api = r.api.map(Api::as_str),
        peer = r.peer.as_deref(),
        caller = r.caller.as_deref(),
        credential = r.credential,
        requested = r.requested.as_deref(),
        granted = r.granted,
        reason = r.reason.map(DenyReason::as_str),
        detail = r.detail.as_deref(),
        serial = r.serial.as_deref(),
        not_after = r.not_after,
        ttl_seconds = r.ttl_seconds,
        "sign decision"
    );
}
