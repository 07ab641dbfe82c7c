//! Watch Kubernetes objects, keep state from their events, publish a versioned snapshot: the one
//! loop behind the agent's mesh membership and policy feed and the CA's pod index and policy
//! status.
#![forbid(unsafe_code)]
