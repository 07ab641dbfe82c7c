//! The pool against real hyper applications on loopback: connections counted at the
//! application's accept, and closed ones seen from its side.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::server::conn::{http1 as server_h1, http2 as server_h2};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use super::*;

/// Connections accepted, and those still open, by a test application.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// An application speaking `version` that answers every request with its HTTP version after
/// `delay`; `keep_alive: false` closes each HTTP/1.1 connection after its response.
async fn app(version: HttpVersion, delay: Duration, keep_alive: bool) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let counted = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.accepted.fetch_add(1, Ordering::SeqCst);
            counted.open.fetch_add(1, Ordering::SeqCst);
            let counted = counted.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let version = format!("{:?}", request.version());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            version,
                        ))))
                    });
                let io = TokioIo::new(stream);
                let _ = match version {
                    HttpVersion::Http1 => {
                        server_h1::Builder::new()
                            .keep_alive(keep_alive)
                            .serve_connection(io, service)
                            .await
                    }
                    HttpVersion::Http2 => {
                        server_h2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    }
                };
                counted.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// One GET through `upstream` speaking `version`, as l7 sends it (HTTP/1.1 in origin form with
/// a Host, HTTP/2 with an authority): the body the application answered.
async fn get(upstream: &AppUpstream<Full<Bytes>>, version: HttpVersion) -> String {
    let request = match version {
        HttpVersion::Http1 => Request::get("/").header(http::header::HOST, "app"),
        HttpVersion::Http2 => Request::get("http://app/").version(http::Version::HTTP_2),
    };
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let response = upstream.send(request, version).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Waits until `check` holds (the pool takes a connection back on a task of its own).
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pool(app: SocketAddr, idle_timeout: Duration) -> Arc<AppPool<Full<Bytes>>> {
    AppPool::new(app, Duration::from_secs(2), idle_timeout)
}

#[tokio::test]
async fn http1_connections_are_reused_across_requests_and_client_connections() {
    let (app, counts) = app(HttpVersion::Http1, Duration::ZERO, true).await;
    let pool = pool(app, IDLE_TIMEOUT);
    for _client in 0..3 {
        let upstream = AppUpstream::new(pool.clone(), None);
        for _ in 0..5 {
            assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
            // Kept by the client connection for its next request, not in the pool.
            assert_eq!(pool.idle_http1(), 0);
        }
        drop(upstream);
        until("the connection back in the pool", || pool.idle_http1() == 1).await;
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn each_client_connection_keeps_its_own_connection_while_others_come_and_go() {
    let (app, counts) = app(HttpVersion::Http1, Duration::ZERO, true).await;
    let pool = pool(app, IDLE_TIMEOUT);
    let clients: Vec<_> = (0..3)
        .map(|_| AppUpstream::new(pool.clone(), None))
        .collect();
    for _ in 0..4 {
        for client in &clients {
            assert_eq!(get(client, HttpVersion::Http1).await, "HTTP/1.1");
        }
    }
    // One request at a time each: one application connection each, never raced for.
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(pool.idle_http1(), 0);
    drop(clients);
    until("all three back in the pool", || pool.idle_http1() == 3).await;
}

#[tokio::test]
async fn concurrent_requests_open_connections_and_at_most_the_bound_stay_idle() {
    let (app, counts) = app(HttpVersion::Http1, Duration::from_millis(100), true).await;
    let pool = pool(app, IDLE_TIMEOUT);
    let upstream = Arc::new(AppUpstream::new(pool.clone(), None));
    let requests = MAX_IDLE_PER_APP + 4;
    let answers = futures::future::join_all((0..requests).map(|_| {
        let upstream = upstream.clone();
        async move { get(&upstream, HttpVersion::Http1).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a == "HTTP/1.1"), "{answers:?}");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), requests);
    // The one the client connection kept goes to the pool as it ends, which is full by then.
    drop(upstream);
    until("the bound's worth of idle connections", || {
        counts.open.load(Ordering::SeqCst) == MAX_IDLE_PER_APP
    })
    .await;
    assert_eq!(pool.idle_http1(), MAX_IDLE_PER_APP);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (app, counts) = app(HttpVersion::Http1, Duration::ZERO, true).await;
    let pool = pool(app, Duration::from_millis(200));
    let upstream = AppUpstream::new(pool.clone(), None);
    assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
    drop(upstream);
    until("the connection back in the pool", || pool.idle_http1() == 1).await;
    until("the idle connection closed at the application", || {
        counts.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(pool.idle_http1(), 0);
    // The next client connection's request opens a new one.
    let upstream = AppUpstream::new(pool.clone(), None);
    assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_the_application_closes_is_not_reused() {
    let (app, counts) = app(HttpVersion::Http1, Duration::ZERO, false).await;
    let pool = pool(app, IDLE_TIMEOUT);
    let upstream = AppUpstream::new(pool.clone(), None);
    for _ in 0..3 {
        assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 3);
    until("no connection idle", || pool.idle_http1() == 0).await;
}

#[tokio::test]
async fn http2_requests_share_one_connection() {
    let (app, counts) = app(HttpVersion::Http2, Duration::from_millis(20), true).await;
    let pool = pool(app, IDLE_TIMEOUT);
    let clients: Vec<_> = (0..2)
        .map(|_| Arc::new(AppUpstream::new(pool.clone(), None)))
        .collect();
    let answers = futures::future::join_all((0..20).map(|i| {
        let upstream = clients[i % 2].clone();
        async move { get(&upstream, HttpVersion::Http2).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a == "HTTP/2.0"), "{answers:?}");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_the_next_request_opens_another() {
    let (app, counts) = app(HttpVersion::Http2, Duration::ZERO, true).await;
    let pool = pool(app, Duration::from_millis(200));
    let upstream = AppUpstream::new(pool.clone(), None);
    assert_eq!(get(&upstream, HttpVersion::Http2).await, "HTTP/2.0");
    until("the idle connection closed at the application", || {
        counts.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(get(&upstream, HttpVersion::Http2).await, "HTTP/2.0");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_opened_before_the_client_spoke_is_used_first() {
    let (app, counts) = app(HttpVersion::Http1, Duration::ZERO, true).await;
    let pool = pool(app, IDLE_TIMEOUT);
    let preopened = TcpStream::connect(app).await.unwrap();
    until("the application accepted it", || {
        counts.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    let upstream = AppUpstream::new(pool.clone(), Some(preopened));
    assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
    assert_eq!(get(&upstream, HttpVersion::Http1).await, "HTTP/1.1");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_application_is_a_connect_error_remembered_for_the_log() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let upstream = AppUpstream::new(pool(addr, IDLE_TIMEOUT), None);
    let request = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    let e = upstream
        .send(request, HttpVersion::Http1)
        .await
        .unwrap_err();
    assert!(matches!(e, PoolError::Connect(_)), "{e}");
    assert!(upstream.connect_failure().is_some());
}
