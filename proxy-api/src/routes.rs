//! Routes, backend policies and local rate limits as the agent publishes them to one client
//! (`sigil.route.v1.RouteDiscovery`): a full set first, then only the changed entries, each
//! whole; checked entry by entry on the way in, an update with one bad entry refused whole (the
//! proxy keeps its previous table and counts the refusal). The compiled types are
//! `sigil_route`'s.

use sigil_proto::sigil::route::v1 as wire;
use sigil_route::RouteSet;

/// Request bodies up to this size are kept while they are sent, so a failed attempt can be
/// retried; a longer body makes its request not retryable (Linkerd's bound).
pub const MAX_RETRY_BODY_BYTES: usize = 64 * 1024;
/// How much of a request body may wait for a slow mirror before the mirror's copy is abandoned
/// (never the primary request).
pub const MAX_MIRROR_BODY_BYTES: usize = 64 * 1024;

/// Why a `RouteUpdate` is refused, naming the entry and field.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{key}: {message}")]
    Entry { key: String, message: String },
    #[error("{0} is both upserted and removed in one update")]
    UpsertedAndRemoved(String),
}

/// The proxy's copy: the last update it accepted, as compiled types.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    pub routes: RouteSet,
}

impl RouteTable {
    /// The table after `update` (a `reset` replaces everything), or why it is refused whole.
    pub fn apply(&self, update: &wire::RouteUpdate) -> Result<RouteTable, RouteError> {
        let _ = update;
        unimplemented!("contract: route-core helper")
    }
}

/// The message that takes a client from `previous` (`None`: nothing yet, a reset) to `current`;
/// `None` when nothing changed. Entries are compared by pointer (`Arc::ptr_eq`) first.
pub fn update(
    previous: Option<&RouteSet>,
    current: &RouteSet,
    version: u64,
) -> Option<wire::RouteUpdate> {
    let _ = (previous, current, version);
    unimplemented!("contract: route-core helper")
}
