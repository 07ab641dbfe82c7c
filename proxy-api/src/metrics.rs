//! The names of the proxy's request and connection metrics and of their labels: the proxy
//! registers its metrics under them, and `sigil stat` queries them (over Prometheus's API or
//! straight from a proxy's `/metrics`), so both read one spelling.
//!
//! The proxy registers each metric as [`PREFIX`]`_<name>`; the exposition adds `_total` to a
//! counter, the unit to a metric registered with one, and `_bucket`/`_sum`/`_count` to a
//! histogram's series (the `*_SERIES` constants spell the exposed names out).

/// What every proxy metric's name starts with.
pub const PREFIX: &str = "sigil_proxy";

/// Counter of HTTP and gRPC requests answered, labelled by [`DIRECTION`], [`SERVICE`],
/// [`ROUTE`], [`PEER_NAMESPACE`], [`PEER_SERVICE_ACCOUNT`], [`STATUS_CLASS`], [`STATUS_CODE`],
/// [`GRPC_STATUS`] and [`RESULT`].
pub const REQUESTS: &str = "requests";
/// [`REQUESTS`] as exposed.
pub const REQUESTS_SERIES: &str = "sigil_proxy_requests_total";

/// Histogram (seconds) from a request's head to its response's head, labelled as [`REQUESTS`]
/// less the status code, gRPC status and result.
pub const REQUEST_DURATION: &str = "request_duration";
/// The buckets of [`REQUEST_DURATION`] as exposed (each with an `le` label).
pub const REQUEST_DURATION_BUCKET_SERIES: &str = "sigil_proxy_request_duration_seconds_bucket";

/// Counter of retries of routed requests, labelled by [`SERVICE`] (the backend), [`ROUTE`] and
/// [`RETRY_OUTCOME`].
pub const RETRIES: &str = "retries";
/// [`RETRIES`] as exposed.
pub const RETRIES_SERIES: &str = "sigil_proxy_retries_total";
/// The HTTPRoute or GRPCRoute whose rule served a request, `<namespace>/<name>`; on the request
/// metrics, empty when no route applied (and inbound).
pub const ROUTE: &str = "route";
/// What became of a retry the policy named: `sent`, `budget_exhausted`, `not_retryable`,
/// `body_too_large`.
pub const RETRY_OUTCOME: &str = "outcome";

/// Counter of mirrored copies, labelled by [`SERVICE`] (the mirror) and `outcome` (`sent`,
/// `dropped`, `failed`).
pub const MIRRORED_REQUESTS: &str = "mirrored_requests";
/// [`MIRRORED_REQUESTS`] as exposed.
pub const MIRRORED_REQUESTS_SERIES: &str = "sigil_proxy_mirrored_requests_total";

/// Gauge of established connections open now, labelled by [`DIRECTION`] and `security`.
pub const CONNECTIONS_ACTIVE: &str = "connections_active";
/// [`CONNECTIONS_ACTIVE`] as exposed.
pub const CONNECTIONS_ACTIVE_SERIES: &str = "sigil_proxy_connections_active";

/// [`DIRECTION_INBOUND`] or [`DIRECTION_OUTBOUND`].
pub const DIRECTION: &str = "direction";
/// Requests and connections the proxy accepted for its own workload.
pub const DIRECTION_INBOUND: &str = "inbound";
/// Requests and connections the proxy's workload sent.
pub const DIRECTION_OUTBOUND: &str = "outbound";
/// Outbound: the destination Service, `<namespace>/<name>`; inbound, or to no meshed Service:
/// empty.
pub const SERVICE: &str = "service";
/// The namespace in the peer's verified SPIFFE ID; empty for a plaintext peer.
pub const PEER_NAMESPACE: &str = "peer_namespace";
/// The service account in the peer's verified SPIFFE ID; empty for a plaintext peer.
pub const PEER_SERVICE_ACCOUNT: &str = "peer_service_account";
/// `2xx`, `5xx`...
pub const STATUS_CLASS: &str = "status_class";
/// The class of server errors, the failures of a success rate.
pub const STATUS_CLASS_SERVER_ERROR: &str = "5xx";
/// The HTTP status code.
pub const STATUS_CODE: &str = "status_code";
/// The response's `grpc-status`; empty for a response that is not gRPC.
pub const GRPC_STATUS: &str = "grpc_status";
/// The `grpc-status` of a gRPC call that succeeded.
pub const GRPC_STATUS_OK: &str = "0";
/// How a request ended. Outbound: [`RESULT_OK`], or what the proxy answered itself and why
/// ([`RESULT_TIMEOUT`], `no_endpoints`, `upstream_failed`, `no_route`...); inbound:
/// `allowed` (passed to the application, whatever it answered), `denied`, `rate_limited`,
/// `bad_request` or `upstream_failed`.
pub const RESULT: &str = "result";
/// An answer passed on from the backend.
pub const RESULT_OK: &str = "ok";
/// A route's timeout expired (504 before the response head; after it, the response was cut).
pub const RESULT_TIMEOUT: &str = "timeout";
