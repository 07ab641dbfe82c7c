//! [`serve`] in process: hyper clients on in-memory connections, a real application on loopback
//! counting the connections it accepts.

use std::sync::atomic::AtomicUsize;

use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1 as client_h1;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

use super::app_pool::AppPool;
use super::*;
use crate::metrics::{Direction, Metrics, PeerLabels};
use crate::trace::span::AttributeValue;
use crate::trace::{Sampler, SpanId, SpanKind, SpanRecord, TraceId, TraceMetrics, Tracer};
use request_metrics::InboundConnection;

struct AllowAll;

impl Authorize for AllowAll {
    fn authorize(&self, _: &RequestInfo<'_>) -> Result<String, Denied> {
        Ok("default".into())
    }
    fn bad_request(&self) {}
    fn upstream_failed(&self, _: &HttpError) {}
}

/// An HTTP/1.1 application answering `ok` to every request on a keep-alive connection, and
/// CONNECT with 200 then an echo of the tunnel's bytes; the connections it accepted.
async fn app() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    while !head.ends_with(b"\r\n\r\n") {
                        if !matches!(stream.read(&mut byte).await, Ok(1)) {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    if head.starts_with(b"CONNECT ") {
                        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        return;
                    }
                    head.clear();
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn settings(app: std::net::SocketAddr, tracer: Tracer) -> Settings {
    Settings {
        normalization: PathNormalization::Base,
        header_read_timeout: Duration::from_secs(5),
        forward_client_cert: None,
        metrics: RequestMetrics {
            metrics: Arc::new(Metrics::new(&mut Registry::default())),
            peer: PeerLabels::new(Direction::Inbound, None, None),
            connection: Arc::new(InboundConnection {
                tracer,
                access_log: None,
                source: "198.18.0.1:40000".parse().unwrap(),
                source_identity: Some(PEER_ID.into()),
                destination_identity: Some(OWN_ID.into()),
                key_exchange: None,
                app,
            }),
        },
        rate_limits: None,
    }
}

const PEER_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const OWN_ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// A client connection served by [`serve`] through `pool`: the client's HTTP/1.1 sender.
async fn client(pool: &Arc<AppPool<AppBody>>) -> client_h1::SendRequest<Empty<Bytes>> {
    // The application's address only goes into log lines, which these tests do not read.
    traced_client(pool, ([127, 0, 0, 1], 0).into(), Tracer::disabled()).await
}

/// [`client`] to the application at `app`, its requests traced by `tracer`.
async fn traced_client(
    pool: &Arc<AppPool<AppBody>>,
    app: std::net::SocketAddr,
    tracer: Tracer,
) -> client_h1::SendRequest<Empty<Bytes>> {
    let (client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
    let upstream = Arc::new(AppUpstream::new(pool.clone(), None));
    tokio::spawn(serve(
        server,
        HttpVersion::Http1,
        upstream,
        settings(app, tracer),
        Arc::new(AllowAll),
    ));
    let (sender, connection) = client_h1::handshake(TokioIo::new(client)).await.unwrap();
    tokio::spawn(connection.with_upgrades());
    sender
}

async fn get(sender: &mut client_h1::SendRequest<Empty<Bytes>>) -> String {
    let request = Request::get("/")
        .header("host", "db")
        .body(Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The caller's sampled trace context of the tracing tests.
const CALLER_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A client of a proxy whose tracer samples no root of its own (only what a caller sampled),
/// and the spans it ends.
async fn traced() -> (
    client_h1::SendRequest<Empty<Bytes>>,
    tokio::sync::mpsc::Receiver<SpanRecord>,
) {
    let (app, _) = app().await;
    let pool = AppPool::new(app, Duration::from_secs(2), app_pool::IDLE_TIMEOUT);
    let (queue, spans) = tokio::sync::mpsc::channel(8);
    let tracer = Tracer::new(Sampler { ratio: 0.0 }, queue, TraceMetrics::default());
    (traced_client(&pool, app, tracer).await, spans)
}

/// The next span ended, checked as a server span named GET continuing [`CALLER_TRACEPARENT`].
async fn server_span_of_the_callers_trace(
    spans: &mut tokio::sync::mpsc::Receiver<SpanRecord>,
) -> SpanRecord {
    let span = tokio::time::timeout(Duration::from_secs(5), spans.recv())
        .await
        .expect("a span when the response ended")
        .unwrap();
    assert_eq!(span.kind, SpanKind::Server);
    assert_eq!(span.name, "GET");
    assert_eq!(
        span.trace_id,
        TraceId(0x0af7651916cd43dd8448eb211c80319c_u128.to_be_bytes())
    );
    assert_eq!(
        span.parent,
        Some(SpanId(0xb7ad6b7169203331_u64.to_be_bytes()))
    );
    span
}

#[tokio::test]
async fn connect_gets_a_connection_of_its_own_and_becomes_a_tunnel() {
    let (app, accepted) = app().await;
    let pool = AppPool::new(app, Duration::from_secs(2), app_pool::IDLE_TIMEOUT);
    let mut plain = client(&pool).await;
    assert_eq!(get(&mut plain).await, "ok");
    // The client connection kept it until it ended.
    drop(plain);
    until("the connection back in the pool", || pool.idle_http1() == 1).await;

    let mut tunneling = client(&pool).await;
    let request = Request::connect("db:5432").body(Empty::new()).unwrap();
    let mut response = tunneling.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    // The tunnel took a new connection and left the pooled one idle...
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.idle_http1(), 1);
    // ...which the next request, from another client connection, reuses.
    let mut other = client(&pool).await;
    assert_eq!(get(&mut other).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_sampled_request_makes_a_server_span_continuing_the_callers_trace() {
    let (mut sender, mut spans) = traced().await;
    let request = Request::get("/orders/7?token=secret")
        .header("host", "db:8080")
        .header("traceparent", CALLER_TRACEPARENT)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let span = server_span_of_the_callers_trace(&mut spans).await;
    assert!(!span.error);
    let text = |v: &str| Some(AttributeValue::Str(v.into()));
    for (key, expected) in [
        ("http.request.method", text("GET")),
        ("url.path", text("/orders/7")),
        ("url.scheme", text("http")),
        ("server.address", text("db")),
        ("server.port", Some(AttributeValue::Int(8080))),
        ("network.protocol.version", text("1.1")),
        ("client.address", text("198.18.0.1")),
        ("network.peer.port", Some(AttributeValue::Int(40000))),
        ("sigil.source.identity", text(PEER_ID)),
        ("sigil.destination.identity", text(OWN_ID)),
        ("sigil.security", text("mtls")),
        ("sigil.policy", text("default")),
        ("sigil.authz", text("allow")),
    ] {
        assert_eq!(
            span.attribute(key),
            expected.as_ref(),
            "{key}: {:?}",
            span.attributes
        );
    }
    // An unsampled caller: no span, whatever the ratio.
    let request = Request::get("/")
        .header("host", "db")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203331-00",
        )
        .body(Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(get(&mut sender).await, "ok");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(spans.try_recv().is_err(), "no span of an unsampled trace");
}

#[tokio::test]
async fn a_refused_request_joins_the_callers_trace() {
    let (mut sender, mut spans) = traced().await;
    // Two Host headers: refused before the request reaches authorization or the app.
    let request = Request::get("/orders/7")
        .header("host", "db")
        .header("host", "admin")
        .header("traceparent", CALLER_TRACEPARENT)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    response.into_body().collect().await.unwrap();
    let span = server_span_of_the_callers_trace(&mut spans).await;
    assert_eq!(
        span.attribute("http.response.status_code"),
        Some(&AttributeValue::Int(400)),
        "{:?}",
        span.attributes
    );
    assert_eq!(
        span.attribute("sigil.source.identity"),
        Some(&AttributeValue::Str(PEER_ID.into())),
        "{:?}",
        span.attributes
    );
}
