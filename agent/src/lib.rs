//! The sigil node agent: finds out who is calling (attestation from the caller's process, never
//! from what it says) and keeps one certificate per identity fresh from the CA.
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod attest;
pub mod ca_channel;
pub mod ca_client;
pub mod certs;
pub mod config;
pub mod h2_authority;
pub mod mesh;
pub mod metrics;
pub mod object_source;
pub mod peer;
pub mod policy_feed;
pub mod push_stream;
pub mod routes;
pub mod sds;
pub mod server;
pub mod services;
#[cfg(test)]
mod test_support;
pub mod workload_api;
