//! Watch Kubernetes objects, keep state from their events, publish it: the one loop behind the
//! agent's mesh membership, policy feed and node pods and the CA's pod index and policy status.
//!
//! - [`follow`]: the loop itself ([`follow::follow`]: events, a periodic tick, shutdown) and the
//!   watches it reads ([`follow::watch`], [`follow::tagged`]).
//! - [`publish`]: a [`State`] merged from watches and a [`PolledFile`], published as versioned,
//!   immutable snapshots ([`publish::spawn`]).
//! - [`index`]: an [`Index`] kept whole in a `watch` channel and changed in place
//!   ([`index::keep`]).
//! - [`listed`]: what a watch delivered, kept by key, re-lists swapped in whole ([`Listed`]).
//! - [`polled_file`]: a file re-read every [`POLL_INTERVAL`] ([`PolledFile`]).
#![forbid(unsafe_code)]

pub mod follow;
pub mod index;
pub mod listed;
pub mod polled_file;
pub mod publish;

pub use follow::{Events, WatchEvent};
pub use index::Index;
pub use listed::Listed;
pub use polled_file::{POLL_INTERVAL, PolledFile};
pub use publish::State;
