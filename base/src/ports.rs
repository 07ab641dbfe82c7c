//! Unused loopback ports for processes that must be told their address before they start (the
//! demo's components and the tests' children).
//!
//! Binding port 0, reading the port and closing the socket is racy: the kernel hands the same
//! ephemeral port to the next `bind(0)` or outgoing connection in this or another process, and
//! the child that was told the port then fails with "address in use". Ports here come instead
//! from a range below Linux's default ephemeral range (32768–60999), which the kernel never
//! picks on its own, through a process-wide counter, so no two callers in one process get the
//! same port; each start point depends on the process id, so concurrent processes start far
//! apart, and each port is checked free before it is handed out.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The ports handed out: below the kernel's default ephemeral range.
const FIRST: u32 = 20_000;
const END: u32 = 32_768;

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A loopback address that nobody listens on and that this process has not handed out before
/// (until the range wraps).
pub fn unused_loopback_addr() -> std::io::Result<SocketAddr> {
    let span = END - FIRST;
    // Each process starts at its own point of the range.
    let start = (std::process::id().wrapping_mul(2_654_435_761) >> 7) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    let mut last_error = None;
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(FIRST + offset).expect("the range is below 65536");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match TcpListener::bind(addr) {
            Ok(listener) => return listener.local_addr(),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_free_and_below_the_ephemeral_range() {
        let taken: Vec<_> = (0..50).map(|_| unused_loopback_addr().unwrap()).collect();
        let mut ports: Vec<_> = taken.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), taken.len());
        for addr in &taken {
            assert!(addr.ip().is_loopback());
            assert!((FIRST..END).contains(&u32::from(addr.port())));
            TcpListener::bind(addr).expect("handed out free");
        }
    }
}
