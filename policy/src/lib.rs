//! sigil's authorization: the `AuthorizationPolicy` and `PeerAuthentication` objects as users
//! write them ([`model`]), what identifies one ([`envelope`]), their validation ([`validate`])
//! into a compiled form ([`compiled`]), evaluation with Istio's semantics ([`engine`]), loading
//! them from YAML files ([`mod@file`]) or the Kubernetes API ([`cluster`]), and the
//! `sigil inspect policy` command ([`inspect`]). The node agent validates every object it
//! watches and sends its proxies the compiled form (an object that does not validate goes as
//! an [`InvalidPolicy`], enforced fail-closed); the proxy evaluates; the CA reports each
//! object's validation in its status.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod compiled;
pub mod engine;
pub mod envelope;
pub mod file;
pub mod inspect;
pub mod model;
pub mod path;
pub mod validate;

pub use compiled::{
    AuthzPolicy, Compiled, InvalidPolicy, MtlsMode, PeerAuthnPolicy, PolicyName, StandIn, Warning,
};
pub use engine::{
    Decision, EffectiveMtls, HttpRequest, Peer, PolicySet, Reason, Request, Verdict, Workload,
};
pub use envelope::{Envelope, Kind, ObjectKey};
/// The header map [`HttpRequest`] carries, re-exported so callers need not depend on `http`.
pub use http::HeaderMap;
pub use validate::ValidationError;
