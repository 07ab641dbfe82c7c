//! The sigil certificate authority: authenticates Kubernetes workloads (service-account tokens,
//! or client certificates it issued), decides which SPIFFE identity each may hold, and signs
//! X.509-SVIDs for them over gRPC+TLS, with the trust bundle streamed to node agents.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authn;
pub mod authn_first;
pub mod authority;
pub mod authz;
pub mod budget;
pub mod cli;
pub mod conditions;
pub mod config;
pub mod distribute;
pub mod inject;
pub mod jwt;
pub mod metrics;
pub mod plugin;
pub mod pods;
pub mod policy_status;
pub mod route_status;
pub mod server;
pub mod service;
pub mod source;
pub mod state;
pub mod store;
pub mod tls_server;
pub mod webhook;
