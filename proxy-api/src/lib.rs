//! The contract between the node agent and the proxies it serves, typed on both sides: what the
//! agent publishes on its socket (mesh membership, policies, SDS resources) and what the CA's
//! sidecar injector must know about the proxy (its ports and uid).
#![forbid(unsafe_code)]

pub mod policy;
