//! Authorization in the proxy: the agent's policy feed followed for the life of the process
//! ([`feed`]), the compiled policies in force for this workload ([`state`]), and the decisions on
//! inbound connections and HTTP requests, with their metrics and log lines ([`decision`]).
//!
//! The agent validates and compiles every policy (`sigil.policy.v2`); the proxy converts its
//! entries back with `sigil-proxy-api` and enforces them. An object the agent found invalid, or
//! an entry this proxy cannot read, fails closed: a DENY policy denies everything it selects, an
//! ALLOW policy matches nothing (so it still takes away the default allow), a PeerAuthentication
//! is STRICT, and an AUDIT policy is dropped (it never decides).

pub mod decision;
pub mod feed;
pub mod state;

pub use decision::{ConnectionAuthz, Outcome, Transport};
pub use state::PolicyState;
