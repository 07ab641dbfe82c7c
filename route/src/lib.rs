//! Traffic management with standard objects: Gateway API HTTPRoute and GRPCRoute whose parent is
//! a Service (the GAMMA mesh profile), and sigil's `BackendPolicy` (circuit breaking, retry
//! budget) and `RateLimitPolicy` (local rate limits). The objects as users write them
//! ([`model`]), their validation with the Gateway API's conditions and reasons ([`validate`],
//! shared by the agent, which sends only what is valid, and the CA, which writes the status),
//! compilation into what one client's proxy uses, producer and consumer routes resolved and
//! precedence sorted ([`compile`] into [`compiled`]), the one request matcher ([`select`]) and
//! the request transformations of filters ([`filters`]), and `sigil inspect route`
//! ([`inspect`]).
#![forbid(unsafe_code)]

pub mod compile;
pub mod compiled;
pub mod filters;
pub mod inspect;
pub mod model;
pub mod select;
pub mod validate;

pub use compiled::{
    Backend, BackendPolicy, BackendTarget, Backends, Filter, GrpcRouteTable, HttpRouteTable,
    InboundPolicy, Limit, LocalRateLimit, OutlierDetection, PortKey, PortRoutes, RetryBudget,
    RetryPolicy, RouteKind, RouteOrigin, RouteSet, RouteTable, Rule, RuleRef, ServiceRef, Timeouts,
};
pub use select::{RequestHead, RouteMatch, Selected, select_rule};
