//! The golden metrics of each inbound HTTP request: counted once, when its response body ends
//! (or is dropped, when the client goes away first), with the status, the gRPC status (from the
//! trailers, or the headers of a trailers-only response), the time to the response head and the
//! body bytes both ways.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::metrics::{Metrics, PeerLabels, RequestOutcome};

/// The metrics and the peer every request of one client connection is counted for.
#[derive(Clone)]
pub struct RequestMetrics {
    pub metrics: Arc<Metrics>,
    pub peer: PeerLabels,
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
        }
    }
}

/// One request from its head on: [`RequestTimer::counted`] wraps its body, and
/// [`RequestTimer::respond`] the response's, which records the request when it ends.
pub struct RequestTimer {
    metrics: RequestMetrics,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
}

impl RequestTimer {
    /// The request's body, its data bytes counted.
    pub fn counted<B>(&self, body: B) -> CountedBody<B> {
        CountedBody {
            inner: body,
            bytes: self.request_bytes.clone(),
        }
    }

    /// The response whose head is ready now: its body records the request when it ends.
    pub fn respond<B>(self, response: http::Response<B>) -> http::Response<RecordedBody<B>> {
        let status = response.status().as_u16();
        let grpc_status = grpc_status(response.headers());
        let duration = self.started.elapsed();
        response.map(|body| RecordedBody {
            inner: body,
            pending: Some(Pending {
                metrics: self.metrics,
                status,
                grpc_status,
                duration,
                request_bytes: self.request_bytes,
                response_bytes: 0,
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
    duration: Duration,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
}

impl Pending {
    fn record(self) {
        self.metrics.metrics.record_request(&RequestOutcome {
            peer: self.metrics.peer,
            status: self.status,
            grpc_status: self.grpc_status,
            result: "",
            duration: self.duration,
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes: self.response_bytes,
        });
    }
}

/// A response body that records its request when it ends or is dropped.
pub struct RecordedBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> RecordedBody<B> {
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.record();
        }
    }
}

impl<B> Drop for RecordedBody<B> {
    fn drop(&mut self) {
        self.finish();
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
                    self.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
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
        (registry, RequestMetrics { metrics, peer })
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
