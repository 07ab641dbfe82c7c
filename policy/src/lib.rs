//! sigil's authorization: the `AuthorizationPolicy` and `PeerAuthentication` objects as users
//! write them ([`model`]), their validation into a compiled form ([`validate`]), evaluation with
//! Istio's semantics ([`engine`]), loading them from YAML files ([`mod@file`]), and the
//! `sigil inspect policy` command ([`inspect`]). The node agent and the proxy share this crate:
//! the agent validates what it watches, the proxy evaluates.
#![forbid(unsafe_code)]

pub mod engine;
pub mod file;
pub mod inspect;
pub mod model;
pub mod path;
pub mod validate;

pub use engine::{
    Decision, EffectiveMtls, HttpRequest, Peer, PolicySet, Reason, Request, Verdict, Workload,
};
/// The header map [`HttpRequest`] carries, re-exported so callers need not depend on `http`.
pub use http::HeaderMap;
pub use validate::{AuthzPolicy, MtlsMode, PeerAuthnPolicy, PolicyName, ValidationError, Warning};
