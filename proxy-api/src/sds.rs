//! The SDS resources the agent serves and the proxy (or Envoy) asks for.

/// The type of every SDS resource: an Envoy TLS `Secret`.
pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The caller's certificate chain and key (the name Istio's sidecars ask for).
pub const DEFAULT_CERTIFICATE: &str = "default";
/// The trust bundle, as a validation context.
pub const ROOT_CA: &str = "ROOTCA";
