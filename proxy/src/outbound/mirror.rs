//! RequestMirror: a copy of a share of a rule's requests (decided per request, uniformly) goes
//! to the mirror backend with its Host suffixed `-shadow` (Envoy's convention, so the mirror's
//! logs tell copies apart); its answer is read and dropped. The copy never delays nor fails the
//! primary: the body is teed as the primary reads it into a buffer of at most
//! [`MAX_MIRROR_BODY_BYTES`] waiting for the mirror, and a mirror that falls further behind (or
//! a primary that breaks off) abandons the copy. Counted in
//! `sigil_proxy_mirrored_requests_total{service, outcome="sent|dropped|failed"}`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use sigil_proxy_api::routes::MAX_MIRROR_BODY_BYTES;
use sigil_route::compiled::Mirror;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::requests::ServiceCalls;
use super::route;
use crate::balance::random_below;
use crate::l7::HttpVersion;
use crate::metrics::MirrorLabels;
use crate::pool::RequestBody;

/// How long a copy may take when its rule has no request timeout.
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this request is copied (`numerator` of every `denominator`).
pub fn chosen(mirror: &Mirror) -> bool {
    let denominator = mirror.denominator.max(1) as usize;
    random_below(denominator) < mirror.numerator as usize
}

/// `api.demo:80` as `api.demo-shadow:80`.
pub fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

enum Teed {
    Frame(Frame<Bytes>),
    /// The copy cannot be whole: the mirror request is broken off.
    Abandon,
}

/// The primary request's body, each frame also queued for the mirror.
pub struct Tee {
    inner: RequestBody,
    copy: Option<mpsc::UnboundedSender<Teed>>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Tee {
    fn abandon(&mut self) {
        if let Some(copy) = self.copy.take() {
            self.dropped.store(true, Ordering::Relaxed);
            let _ = copy.send(Teed::Abandon);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                if self.queued.load(Ordering::Relaxed) + len > MAX_MIRROR_BODY_BYTES {
                    self.abandon();
                } else if let Some(copy) = &self.copy {
                    let teed = match frame.data_ref() {
                        Some(data) => Frame::data(data.clone()),
                        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
                    };
                    self.queued.fetch_add(len, Ordering::Relaxed);
                    let _ = copy.send(Teed::Frame(teed));
                }
            }
            // The whole body went: the copy ends with it.
            Poll::Ready(None) => self.copy = None,
            Poll::Ready(Some(Err(_))) => self.abandon(),
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

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end (the primary broke off): the copy is not whole.
        if !self.inner.is_end_stream() {
            self.abandon();
        }
    }
}

/// The mirror's copy of the body.
struct Copy {
    rx: mpsc::UnboundedReceiver<Teed>,
    queued: Arc<AtomicUsize>,
    abandoned: watch::Sender<bool>,
    ended: bool,
}

impl Body for Copy {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if *self.abandoned.borrow() {
            // Never ended as if whole: the sending task breaks the request off.
            return Poll::Pending;
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Teed::Frame(frame))) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                self.queued.fetch_sub(len, Ordering::Relaxed);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Teed::Abandon)) => {
                self.abandoned.send_replace(true);
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// What of the primary request a copy is made from.
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub headers: &'a HeaderMap,
    pub host: &'a str,
}

/// Starts the copy of a request to `mirror` and returns the primary's body, teed for it.
pub fn start(
    calls: &Arc<ServiceCalls>,
    mirror: &Mirror,
    head: &Head<'_>,
    app_version: HttpVersion,
    timeout: Duration,
    body: RequestBody,
) -> RequestBody {
    let service = mirror.backend.service.to_string();
    let destination = match route::destination(calls, &mirror.backend) {
        Ok(destination) => destination,
        Err(why) => {
            debug!(why, "request not mirrored");
            count(calls, &service, "failed");
            return body;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let abandoned_copy = dropped.clone();
    let (abandoned, mut abandoned_rx) = watch::channel(false);
    let ended = body.is_end_stream();
    let copy = Copy {
        rx,
        queued: queued.clone(),
        abandoned,
        ended,
    };
    let shadow = shadow_host(head.host);
    let mut request = Request::new(copy.boxed_unsync());
    *request.method_mut() = head.method.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    if let Ok(value) = HeaderValue::from_str(&shadow) {
        request.headers_mut().insert(header::HOST, value);
    }
    *request.uri_mut() = with_authority(head.uri, &shadow);
    let calls = calls.clone();
    tokio::spawn(async move {
        let send = async {
            let answered =
                route::send_once(&calls, &destination, request, app_version, None).await?;
            // Read and dropped.
            let _ = answered.response.into_body().collect().await;
            Ok::<_, route::Failed>(())
        };
        let outcome = tokio::select! {
            sent = tokio::time::timeout(timeout, send) => match sent {
                Ok(Ok(())) => "sent",
                Ok(Err(_)) | Err(_) => "failed",
            },
            // Err: the copy's body was dropped whole once sent, which is no abandonment.
            Ok(_) = abandoned_rx.wait_for(|abandoned| *abandoned) => "dropped",
        };
        let outcome = if outcome == "failed" && abandoned_copy.load(Ordering::Relaxed) {
            "dropped"
        } else {
            outcome
        };
        count(&calls, &service, outcome);
    });
    if ended {
        return body;
    }
    Tee {
        inner: body,
        copy: Some(tx),
        queued,
        dropped,
    }
    .boxed_unsync()
}

fn count(calls: &ServiceCalls, service: &str, outcome: &'static str) {
    calls
        .metrics()
        .mirrored_requests
        .get_or_create(&MirrorLabels {
            service: service.to_owned(),
            outcome,
        })
        .inc();
}

/// `uri` with `authority` when it has one (HTTP/2); an origin-form URI stays as it is.
fn with_authority(uri: &Uri, authority: &str) -> Uri {
    if uri.authority().is_none() {
        return uri.clone();
    }
    let mut parts = uri.clone().into_parts();
    match authority.parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
        }
        Err(_) => uri.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teed(chunks: Vec<Bytes>) -> (Tee, Copy) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
            chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
        let tee = Tee {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync(),
            copy: Some(tx),
            queued: queued.clone(),
            dropped: Arc::default(),
        };
        let copy = Copy {
            rx,
            queued,
            abandoned: watch::channel(false).0,
            ended: false,
        };
        (tee, copy)
    }

    #[tokio::test]
    async fn the_primary_reads_on_when_the_mirror_falls_behind_and_the_copy_is_abandoned() {
        let half = Bytes::from(vec![b'x'; MAX_MIRROR_BODY_BYTES / 2 + 1]);
        // Nobody reads the copy: the second chunk would pass the bound.
        let (tee, copy) = teed(vec![half.clone(), half.clone(), half.clone()]);
        let dropped = tee.dropped.clone();
        let primary = tee.collect().await.unwrap().to_bytes();
        assert_eq!(primary.len(), 3 * half.len());
        assert!(dropped.load(Ordering::Relaxed));
        let mut abandoned = copy.abandoned.subscribe();
        let mut copy = copy;
        // The copy gives what it had, then stops (its request is broken off, not ended).
        let first = copy.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), half.len());
        let next = tokio::time::timeout(Duration::from_millis(100), copy.frame()).await;
        assert!(next.is_err(), "the copy must not end as if whole");
        assert!(*abandoned.borrow_and_update());

        // A mirror that keeps up gets the whole body and its end.
        let (tee, mut copy) = teed(vec![half.clone(), half.clone(), half.clone()]);
        let reading = tokio::spawn(async move {
            let mut got = 0;
            while let Some(frame) = copy.frame().await {
                got += frame.unwrap().into_data().unwrap().len();
            }
            got
        });
        let mut tee = tee;
        while let Some(frame) = tee.frame().await {
            frame.unwrap();
            // Paced: the mirror drains between chunks.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(tee);
        assert_eq!(reading.await.unwrap(), 3 * half.len());
    }

    #[test]
    fn shadow_hosts_keep_their_port() {
        assert_eq!(shadow_host("api.demo:80"), "api.demo-shadow:80");
        assert_eq!(shadow_host("api.demo"), "api.demo-shadow");
        assert_eq!(shadow_host("198.19.0.10:8080"), "198.19.0.10-shadow:8080");
        assert_eq!(shadow_host("[2001:2::1]:80"), "[2001:2::1]-shadow:80");
    }
}
