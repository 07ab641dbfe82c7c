//! Process machinery every sigil process (CA, node agent, proxy) shares. Nothing here knows
//! about certificates, policies or Kubernetes: those live in the crates above.
#![forbid(unsafe_code)]
