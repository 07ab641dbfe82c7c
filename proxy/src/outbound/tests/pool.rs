//! The pool of HTTP/2 connections to endpoints on its own: request bodies that outlive their
//! response head, requests given up before their head, a slow reader's flow control, and
//! connections an endpoint closed.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::pool::{RequestBody, Target};

fn pools(ca: &Ca) -> Pools {
    let (_, tls) = watch::channel(Some(ca.state("spiffe://cluster.local/ns/demo/sa/client")));
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    Pools::new(tls, metrics, Duration::from_secs(2), 4)
}

fn target(addr: SocketAddr, n: usize) -> Target {
    Target {
        addr,
        id: id(n).parse().unwrap(),
    }
}

/// A request whose body is what is sent on the returned channel, until it is dropped.
fn streamed_request() -> (mpsc::Sender<Bytes>, Request<RequestBody>) {
    let (tx, rx) = mpsc::channel(1);
    let frames = ReceiverStream::new(rx).map(|chunk| Ok::<_, hyper::Error>(Frame::data(chunk)));
    let body = UnsyncBoxBody::new(StreamBody::new(frames));
    let request = Request::post("http://api.demo/stream").body(body).unwrap();
    (tx, request)
}

fn empty_request() -> Request<RequestBody> {
    let body = UnsyncBoxBody::new(http_body_util::Empty::new().map_err(|never| match never {}));
    Request::get("http://api.demo/").body(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_goes_on_after_its_response_head() {
    let ca = Ca::new();
    // Answers at once, echoing the request body as it comes: a bidirectional stream.
    let addr = serve_endpoint(&ca, 1, |request: Request<Incoming>| async move {
        Ok::<_, Infallible>(Response::new(request.into_body()))
    })
    .await;
    let pools = pools(&ca);
    let (tx, request) = streamed_request();
    tx.send(Bytes::from_static(b"one")).await.unwrap();
    let sent = pools.send(&target(addr, 1), request).await.unwrap();
    let mut body = sent.response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "one");
    // Sent after the head was in: only a copy outliving `send` can carry it.
    tx.send(Bytes::from_static(b"two")).await.unwrap();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, "two");
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect()).await;
    let rest = rest.expect("the echo ends with the request").unwrap();
    assert_eq!(rest.to_bytes(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_before_its_head_is_reset_at_the_endpoint() {
    let ca = Ca::new();
    let (cancelled_tx, cancelled) = mpsc::channel::<()>(1);
    // Never answers; says when hyper dropped its handler (the stream was reset).
    let addr = serve_endpoint(&ca, 1, move |_request: Request<Incoming>| {
        let cancelled = cancelled_tx.clone();
        async move {
            struct OnDrop(mpsc::Sender<()>);
            impl Drop for OnDrop {
                fn drop(&mut self) {
                    let _ = self.0.try_send(());
                }
            }
            let _on_drop = OnDrop(cancelled);
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    })
    .await;
    let pools = pools(&ca);
    let mut cancelled = cancelled;
    // The body still open, as a client that is streaming its request.
    let (tx, request) = streamed_request();
    tx.send(Bytes::from_static(b"part")).await.unwrap();
    let given_up = tokio::time::timeout(
        Duration::from_millis(200),
        pools.send(&target(addr, 1), request),
    )
    .await;
    assert!(given_up.is_err(), "no head can come");
    let reset = tokio::time::timeout(Duration::from_secs(5), cancelled.recv()).await;
    assert!(
        matches!(reset, Ok(Some(()))),
        "the endpoint saw the stream reset while the application's body was still open"
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_read_only_as_fast_as_the_endpoint_takes_it() {
    let ca = Ca::new();
    // Answers at once and never reads the request body.
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let addr = serve_endpoint(&ca, 1, move |request: Request<Incoming>| {
        let _ = held_tx.send(request);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    })
    .await;
    let pools = pools(&ca);
    // A body of up to 256 MiB, counted as the proxy reads it.
    let read = Arc::new(AtomicUsize::new(0));
    const CHUNK: usize = 64 * 1024;
    let counted = read.clone();
    let frames = tokio_stream::iter(0..4096).map(move |_| {
        counted.fetch_add(CHUNK, Ordering::Relaxed);
        Ok::<_, hyper::Error>(Frame::data(Bytes::from(vec![0u8; CHUNK])))
    });
    let request = Request::post("http://api.demo/upload")
        .body(UnsyncBoxBody::new(StreamBody::new(frames)))
        .unwrap();
    let sent = pools.send(&target(addr, 1), request).await.unwrap();
    assert_eq!(sent.response.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = read.load(Ordering::Relaxed);
    eprintln!("request body read while the endpoint took none: {taken} bytes");
    // The endpoint's windows (hyper's server: 1 MiB for the stream and the connection) and
    // a chunk waiting for them; without flow control it would be the whole body.
    assert!(taken <= 2 * 1024 * 1024, "read {taken} bytes");
    assert!(held.recv().await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_endpoint_closed_is_replaced_for_the_next_request() {
    let ca = Ca::new();
    let state = ca.state(&id(1));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    // Each connection serves what comes in its first 300 ms, then is dropped.
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let acceptor = tokio_rustls::TlsAcceptor::from(state.server.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service);
                let _ = tokio::time::timeout(Duration::from_millis(300), connection).await;
            });
        }
    });
    let pools = pools(&ca);
    for round in 0..2 {
        let sent = pools.send(&target(addr, 1), empty_request()).await;
        let sent = sent.unwrap_or_else(|e| panic!("request {round}: {e}"));
        let body = sent.response.into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "ok");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 2);
}
