//! Process machinery every sigil process (CA, node agent, proxy) shares: the admin endpoint
//! ([`admin`]), what each binary does around its command ([`bootstrap`]: logging, the shutdown
//! signal, the error report), readiness ([`readiness`]) and shutdown ([`shutdown`]), retry backoff
//! ([`backoff`]), command-line values ([`flags`]), metrics labels ([`metrics`]), the process's
//! own CPU, memory and descriptors ([`process_metrics`]), connection slots ([`slots`]), the
//! agent-socket gRPC client ([`socket_client`]), a plain HTTP GET ([`http_get`]) and unused
//! loopback ports ([`ports`]). Nothing here knows about certificates, policies
//! or Kubernetes: those live in the crates above.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod bootstrap;
pub mod exposition;
pub mod flags;
pub mod http_get;
pub mod metrics;
pub mod ports;
pub mod process_metrics;
pub mod readiness;
pub mod shutdown;
pub mod slots;
pub mod socket_client;
