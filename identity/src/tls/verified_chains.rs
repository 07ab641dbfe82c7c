//! The peer certificate chains one verifier has already verified, so that a peer's next
//! handshake costs one signature check (its CertificateVerify, which rustls always checks: the
//! proof that the peer holds the leaf's key) instead of two (that plus the chain to a root).
//!
//! A verifier lives as long as one trust bundle and one certificate of our own (the proxy builds
//! new configurations on every change), so a chain verified against roots that are gone is never
//! taken from here. A chain counts as verified only for exactly the same bytes, and only while
//! `now` is inside every presented certificate's validity; outside it, or for any chain not seen,
//! the whole verification runs again. Failures are never kept: a refused chain is refused again
//! by the full check, each time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ring::digest::{Context, SHA256};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// How many chains one verifier keeps, so that peers presenting ever new certificates cannot
/// grow it without bound (about 100 bytes each). When full, it starts over.
pub(super) const MAX_VERIFIED_CHAINS: usize = 1024;

/// SHA-256 of the presented chain, each certificate prefixed by its length.
type ChainDigest = [u8; 32];

pub(super) struct VerifiedChains {
    chains: Mutex<HashMap<ChainDigest, Validity>>,
    capacity: usize,
}

impl std::fmt::Debug for VerifiedChains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedChains")
            .field("chains", &self.lock().len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for VerifiedChains {
    fn default() -> Self {
        VerifiedChains::with_capacity(MAX_VERIFIED_CHAINS)
    }
}

impl VerifiedChains {
    fn with_capacity(capacity: usize) -> Self {
        VerifiedChains {
            chains: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// `Ok` without running `verify` if this exact chain passed it before and `now` is within
    /// the validity of each of its certificates; otherwise runs `verify` and keeps a success.
    pub(super) fn verify_once<E>(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let key = chain_digest(end_entity, intermediates);
        let now = now.as_secs();
        if self.lock().get(&key).is_some_and(|v| v.contains(now)) {
            return Ok(());
        }
        verify()?;
        // A chain whose dates do not parse was refused by `verify`; if not, it is just not kept.
        if let Some(validity) = Validity::of(end_entity, intermediates) {
            let mut chains = self.lock();
            if chains.len() >= self.capacity && !chains.contains_key(&key) {
                chains.clear();
            }
            chains.insert(key, validity);
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ChainDigest, Validity>> {
        // The map is consistent after any panic (inserts and clears are single calls).
        self.chains.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The presented certificates, leaf first.
fn certificates<'a>(
    end_entity: &'a [u8],
    intermediates: &'a [CertificateDer<'_>],
) -> impl Iterator<Item = &'a [u8]> {
    std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref()))
}

fn chain_digest(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> ChainDigest {
    let mut hash = Context::new(&SHA256);
    for der in certificates(end_entity, intermediates) {
        hash.update(&(der.len() as u64).to_be_bytes());
        hash.update(der);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(hash.finish().as_ref());
    key
}

/// The seconds (Unix time, both ends included, as webpki checks them) in which every
/// certificate of a chain is valid: the latest notBefore to the earliest notAfter.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Validity {
    not_before: u64,
    not_after: u64,
}

impl Validity {
    fn of(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<Validity> {
        let mut window = Validity {
            not_before: 0,
            not_after: u64::MAX,
        };
        for der in certificates(end_entity, intermediates) {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let validity = cert.validity();
            let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
            let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
            window.not_before = window.not_before.max(not_before);
            window.not_after = window.not_after.min(not_after);
        }
        Some(window)
    }

    fn contains(&self, now: u64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;
    use crate::test_support::TestCa;

    const PEER: &str = "spiffe://example.org/ns/default/sa/peer";

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    /// Runs `verify_once` with a check that counts its runs and answers `result`.
    fn verify_counted(
        cache: &VerifiedChains,
        chain: &[CertificateDer<'static>],
        now: UnixTime,
        runs: &Cell<u32>,
        result: Result<(), &'static str>,
    ) -> Result<(), &'static str> {
        cache.verify_once(&chain[0], &chain[1..], now, || {
            runs.set(runs.get() + 1);
            result
        })
    }

    #[test]
    fn a_chain_is_checked_once_while_its_certificates_are_valid() {
        let root = TestCa::root("example.org");
        let intermediate = root.intermediate(None);
        let (leaf, _) = intermediate.leaf(PEER);
        let chain = vec![leaf.clone(), intermediate.der.clone()];
        let window = Validity::of(&leaf, &chain[1..]).unwrap();
        let now = at(window.not_before + 60);
        let cache = VerifiedChains::default();
        let runs = Cell::new(0);

        verify_counted(&cache, &chain, now, &runs, Ok(())).unwrap();
        verify_counted(&cache, &chain, now, &runs, Ok(())).unwrap();
        assert_eq!(
            runs.get(),
            1,
            "the second handshake reuses the first's verification"
        );

        // Outside the validity, the full check runs again (and decides).
        let expired = at(window.not_after + 1);
        assert_eq!(
            verify_counted(&cache, &chain, expired, &runs, Err("expired")),
            Err("expired")
        );
        let early = at(window.not_before - 1);
        assert_eq!(
            verify_counted(&cache, &chain, early, &runs, Err("not yet valid")),
            Err("not yet valid")
        );
        assert_eq!(runs.get(), 3);

        // The same leaf with other intermediates is another chain.
        verify_counted(&cache, &chain[..1], now, &runs, Ok(())).unwrap();
        assert_eq!(runs.get(), 4);
    }

    #[test]
    fn the_window_is_where_every_certificate_is_valid() {
        let root = TestCa::root("example.org");
        let intermediate = root.intermediate(None);
        let (leaf, _) = intermediate.leaf(PEER);
        let dates = |der: &[u8]| {
            let report = crate::profile::inspect_cert(der).unwrap();
            (
                report.not_before.unix_timestamp() as u64,
                report.not_after.unix_timestamp() as u64,
            )
        };
        let (leaf_from, leaf_until) = dates(&leaf);
        let (ca_from, ca_until) = dates(&intermediate.der);
        let window = Validity::of(&leaf, std::slice::from_ref(&intermediate.der)).unwrap();
        assert_eq!(window.not_before, leaf_from.max(ca_from));
        assert_eq!(window.not_after, leaf_until.min(ca_until));
        assert_eq!(Validity::of(b"not a certificate", &[]), None);
    }

    #[test]
    fn refusals_are_not_kept() {
        let root = TestCa::root("example.org");
        let (leaf, _) = root.leaf(PEER);
        let chain = vec![leaf];
        let now = UnixTime::now();
        let cache = VerifiedChains::default();
        let runs = Cell::new(0);
        for _ in 0..3 {
            assert_eq!(
                verify_counted(&cache, &chain, now, &runs, Err("unknown issuer")),
                Err("unknown issuer")
            );
        }
        assert_eq!(runs.get(), 3);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let root = TestCa::root("example.org");
        let (leaf, _) = root.leaf(PEER);
        let cache = VerifiedChains::with_capacity(4);
        let now = UnixTime::now();
        // Distinct chains: the same leaf after ever more copies of the root as "intermediates".
        let mut chain = vec![leaf];
        for _ in 0..4 {
            cache
                .verify_once(&chain[0], &chain[1..], now, || Ok::<(), ()>(()))
                .unwrap();
            chain.push(root.der.clone());
        }
        assert_eq!(cache.len(), 4);
        cache
            .verify_once(&chain[0], &chain[1..], now, || Ok::<(), ()>(()))
            .unwrap();
        assert_eq!(cache.len(), 1, "a full cache starts over");
        assert_eq!(VerifiedChains::default().capacity, MAX_VERIFIED_CHAINS);
    }
}
