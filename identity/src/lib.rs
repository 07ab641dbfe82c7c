//! Identity primitives shared by every sigil part: SPIFFE IDs ([`spiffe`]), the X.509-SVID
//! certificate profile ([`profile`]), CSR verification ([`csr`]), trust bundles ([`bundle`])
//! and rustls configurations that authenticate peers by SPIFFE ID ([`tls`]).
#![forbid(unsafe_code)]

pub mod bundle;
pub mod csr;
pub mod profile;
pub mod spiffe;
pub mod tls;

#[cfg(test)]
mod test_support;

pub use bundle::TrustBundle;
pub use spiffe::{SpiffeId, TrustDomain};
