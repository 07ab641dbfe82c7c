//! The sigil bundled proxy: sits beside an application, takes its certificate and trust bundle
//! from the node agent over SDS, terminates mutual TLS for inbound connections and originates it
//! for outbound connections to meshed destinations, so the application never handles TLS.
#![forbid(unsafe_code)]

/// The error of a body the proxy passes on, whatever produced it: hyper, h2, or a timeout the
/// proxy applied.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod dial;
pub mod feed;
pub mod forward;
pub mod h2_client;
pub mod inbound;
pub mod init;
pub mod l7;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod probes;
pub mod ratelimit;
pub mod request_log;
pub mod routes;
pub mod sds;
pub mod server;
pub mod services;
pub mod tls;
pub mod trace;
