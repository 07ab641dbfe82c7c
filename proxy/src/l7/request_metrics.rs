//! The golden metrics of each inbound HTTP request: counted once, when its response body ends
//! (or is dropped, when the client goes away first), with the status, the gRPC status (from the
//! trailers, or the headers of a trailers-only response), the time to the response head and the
//! body bytes both ways. Its span ends and its access-log line is written at the same place
//! ([`RequestFacts`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::metrics::{Direction, Metrics, PeerLabels, RequestOutcome};
use crate::request_log::{self, RequestLine};
use crate::trace::{RequestTrace, SpanOutcome, Tracer};

/// The metrics and the peer every request of one client connection is counted for, and what
/// its requests are traced and logged with.
#[derive(Clone)]
pub struct RequestMetrics {
    pub metrics: Arc<Metrics>,
    pub peer: PeerLabels,
    pub connection: Arc<InboundConnection>,
}

/// What every request of one inbound connection is traced and logged with.
#[derive(Debug)]
pub struct InboundConnection {
    pub tracer: Tracer,
    /// --access-log-sampling with --access-log; None: only refused and failed requests logged.
    pub access_log: Option<f64>,
    /// The client (the peer's proxy, for mTLS).
    pub source: SocketAddr,
    /// The peer's verified SPIFFE ID, and this workload's.
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    /// The connection's TLS key exchange (mTLS).
    pub key_exchange: Option<&'static str>,
    /// Where allowed requests go.
    pub app: SocketAddr,
}

/// What an inbound request was and what became of it, for its span and log line at its end.
#[derive(Debug)]
pub struct RequestFacts {
    pub trace: RequestTrace,
    pub method: String,
    pub authority: String,
    /// Without the query.
    pub path: String,
    /// The deciding policy.
    pub policy: Option<String>,
    /// `allowed`, `rate_limited`, or a refusal or failure (`denied`, `bad_request`,
    /// `upstream_failed`), which are always logged.
    pub result: &'static str,
    pub detail: Option<String>,
    /// The application, once the request was sent to it.
    pub upstream: Option<SocketAddr>,
}

impl RequestFacts {
    /// Refused or failed by the proxy: logged with or without --access-log.
    fn always_logged(&self) -> bool {
        !matches!(self.result, "allowed" | "rate_limited")
    }

    /// The span's `error.type` when the proxy failed the request itself.
    fn error_type(&self) -> Option<&'static str> {
        match self.result {
            "bad_request" | "upstream_failed" => Some(self.result),
            _ => None,
        }
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// Starts counting one request received now.
    pub fn start(&self) -> RequestTimer {
        RequestTimer {
            metrics: self.clone(),
            started: Instant::now(),
            request_bytes: Arc::default(),
            facts: None,
        }
    }
}

/// One request from its head on: [`RequestTimer::counted`] wraps its body, and
/// [`RequestTimer::respond`] the response's, which records the request when it ends.
pub struct RequestTimer {
    metrics: RequestMetrics,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    facts: Option<RequestFacts>,
}

impl RequestTimer {
    /// What the connection's requests are traced and logged with.
    pub fn connection(&self) -> &Arc<InboundConnection> {
        &self.metrics.connection
    }

    /// What the request was, for its span and log line (without, neither is made).
    pub fn describe(&mut self, facts: RequestFacts) {
        self.facts = Some(facts);
    }

    /// The request's body, its data bytes counted.
    pub fn counted<B>(&self, body: B) -> CountedBody<B> {
        CountedBody {
            inner: body,
            bytes: self.request_bytes.clone(),
        }
    }

    /// The response whose head is ready now: its body records the request when it ends.
    pub fn respond<B: Body>(self, response: http::Response<B>) -> http::Response<RecordedBody<B>> {
        let status = response.status().as_u16();
        let grpc_status = grpc_status(response.headers());
        let duration = self.started.elapsed();
        response.map(|body| RecordedBody {
            inner: body,
            pending: Some(Pending {
                metrics: self.metrics,
                status,
                grpc_status,
                started: self.started,
                duration,
                request_bytes: self.request_bytes,
                response_bytes: 0,
                facts: self.facts,
            }),
        })
    }
}

/// A response's `grpc-status`: a header of a trailers-only response, else a trailer.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A body whose data bytes are added to a shared count as they pass.
pub struct CountedBody<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    /// `body`, its data bytes added to `bytes` as they pass.
    pub fn new(body: B, bytes: Arc<AtomicU64>) -> CountedBody<B> {
        CountedBody { inner: body, bytes }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is known of a request until its response body ends.
struct Pending {
    metrics: RequestMetrics,
    status: u16,
    grpc_status: Option<u32>,
    started: Instant,
    duration: Duration,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    facts: Option<RequestFacts>,
}

impl Pending {
    /// Counts the request, ends its span and writes its log line; `complete`: its response
    /// body was sent to its end (else the client went away first).
    fn record(mut self, complete: bool) {
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.metrics.metrics.record_request(&RequestOutcome {
            peer: self.metrics.peer.clone(),
            status: self.status,
            grpc_status: self.grpc_status,
            result: self.facts.as_ref().map_or("", |facts| facts.result),
            duration: self.duration,
            request_bytes,
            response_bytes: self.response_bytes,
        });
        let Some(mut facts) = self.facts.take() else {
            return;
        };
        let connection = &self.metrics.connection;
        let wanted = request_log::wanted(
            &connection.tracer,
            &facts.trace,
            connection.access_log,
            facts.always_logged(),
        );
        // The line first: it names the span, which finishing hands to the exporter.
        if wanted {
            self.write_line(&facts, request_bytes);
        }
        facts.trace.finish(&SpanOutcome {
            status: Some(self.status),
            grpc_status: self.grpc_status,
            request_bytes,
            response_bytes: self.response_bytes,
            error: facts.error_type().or((!complete).then_some("cancelled")),
        });
    }

    fn write_line(&self, facts: &RequestFacts, request_bytes: u64) {
        let connection = &self.metrics.connection;
        RequestLine {
            direction: Direction::Inbound,
            trace: &facts.trace,
            source_ip: connection.source.ip(),
            source_identity: connection.source_identity.as_deref(),
            destination_identity: connection.destination_identity.as_deref(),
            method: &facts.method,
            authority: &facts.authority,
            path: &facts.path,
            route: None,
            service: None,
            status: self.status,
            grpc_status: self.grpc_status,
            result: facts.result,
            policy: facts.policy.as_deref(),
            request_bytes,
            response_bytes: self.response_bytes,
            duration: self.duration,
            total: self.started.elapsed(),
            upstream: facts.upstream,
            key_exchange: connection.key_exchange,
            detail: facts.detail.as_deref(),
        }
        .write();
    }
}

/// A response body that records its request when it ends or is dropped.
pub struct RecordedBody<B: Body> {
    inner: B,
    pending: Option<Pending>,
}

impl<B: Body> RecordedBody<B> {
    fn finish(&mut self, complete: bool) {
        if let Some(pending) = self.pending.take() {
            pending.record(complete);
        }
    }
}

impl<B: Body> Drop for RecordedBody<B> {
    fn drop(&mut self) {
        // A body with nothing to send may be dropped unpolled: that is its end.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

impl<B> Body for RecordedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(pending) = self.pending.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        pending.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && let Some(status) = grpc_status(trailers)
                    {
                        pending.grpc_status = Some(status);
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};
    use prometheus_client::registry::Registry;
    use sigil_identity::SpiffeId;

    use super::*;
    use crate::metrics::Direction;

    fn metrics() -> (Registry, RequestMetrics) {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let peer = PeerLabels::new(Direction::Inbound, None, Some(&peer));
        let connection = Arc::new(InboundConnection {
            tracer: Tracer::disabled(),
            access_log: None,
            source: "198.18.0.1:40000".parse().unwrap(),
            source_identity: None,
            destination_identity: None,
            key_exchange: None,
            app: "198.18.0.2:8080".parse().unwrap(),
        });
        (
            registry,
            RequestMetrics {
                metrics,
                peer,
                connection,
            },
        )
    }

    fn text(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    const PEER: &str = "direction=\"inbound\",service=\"\",route=\"\",peer_namespace=\"shop\",peer_service_account=\"web\"";

    #[tokio::test]
    async fn a_request_is_counted_once_with_its_bytes_and_the_grpc_status_of_its_trailers() {
        let (registry, metrics) = metrics();
        let timer = metrics.start();
        let request_body = timer.counted(Full::new(Bytes::from_static(b"12345")));
        assert_eq!(request_body.collect().await.unwrap().to_bytes().len(), 5);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"defg"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let response = timer.respond(http::Response::new(body));
        assert!(!text(&registry).contains("sigil_proxy_requests_total{"));
        let (_, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        let text = text(&registry);
        for series in [
            format!(
                "sigil_proxy_requests_total{{{PEER},status_class=\"2xx\",status_code=\"200\",grpc_status=\"14\",result=\"\"}} 1"
            ),
            format!("sigil_proxy_request_body_bytes_total{{{PEER}}} 5"),
            format!("sigil_proxy_response_body_bytes_total{{{PEER}}} 7"),
            format!("sigil_proxy_request_duration_seconds_count{{{PEER},status_class=\"2xx\"}} 1"),
        ] {
            assert!(text.contains(&series), "{series} not in\n{text}");
        }
    }

    #[tokio::test]
    async fn a_trailers_only_response_and_a_dropped_body_are_counted_too() {
        let (registry, metrics) = metrics();
        let response = http::Response::builder()
            .status(200)
            .header("grpc-status", "7")
            .body(Full::new(Bytes::new()))
            .unwrap();
        drop(metrics.start().respond(response));
        let response = http::Response::builder()
            .status(403)
            .body(Full::new(Bytes::from_static(b"RBAC: access denied\n")))
            .unwrap();
        // The client went away before reading the body: counted once all the same.
        drop(metrics.start().respond(response));
        let text = text(&registry);
        for series in [
            format!(
                "sigil_proxy_requests_total{{{PEER},status_class=\"2xx\",status_code=\"200\",grpc_status=\"7\",result=\"\"}} 1"
            ),
            format!(
                "sigil_proxy_requests_total{{{PEER},status_class=\"4xx\",status_code=\"403\",grpc_status=\"\",result=\"\"}} 1"
            ),
        ] {
            assert!(text.contains(&series), "{series} not in\n{text}");
        }
    }
}
