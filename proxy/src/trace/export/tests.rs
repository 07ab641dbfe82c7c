use std::sync::Mutex;

use http::HeaderMap;
use sigil_proto::opentelemetry::proto::collector::trace::v1::ExportTracePartialSuccess;
use sigil_proto::opentelemetry::proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use tokio::net::TcpListener;

use super::*;
use crate::trace::{SpanOutcome, TraceConfig};

/// What a test collector received: each request with its path and content type.
#[derive(Clone, Default)]
struct Received {
    requests: Arc<Mutex<Vec<(String, String, ExportTraceServiceRequest)>>>,
}

impl Received {
    fn push(&self, path: &str, content_type: &str, request: ExportTraceServiceRequest) {
        self.requests
            .lock()
            .unwrap()
            .push((path.to_owned(), content_type.to_owned(), request));
    }

    fn spans(&self) -> Vec<otlp::Span> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, request)| &request.resource_spans)
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| scope.spans.clone())
            .collect()
    }

    fn requests(&self) -> Vec<(String, String, ExportTraceServiceRequest)> {
        self.requests.lock().unwrap().clone()
    }
}

/// Polls `done` until it holds (10 s at most).
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct GrpcCollector {
    received: Received,
    reject: i64,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let content_type = request
            .metadata()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.received.push("", &content_type, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: (self.reject > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: self.reject,
                error_message: "too old".to_owned(),
            }),
        }))
    }
}

/// A real OTLP/gRPC receiver on a loopback port.
async fn grpc_collector(reject: i64) -> (http::Uri, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(GrpcCollector {
                received: received.clone(),
                reject,
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}").parse().unwrap(), received)
}

/// An OTLP/HTTP receiver answering `status` (with an empty protobuf response).
async fn http_collector(status: http::StatusCode) -> (http::Uri, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let store = store.clone();
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let content_type = request.headers()[http::header::CONTENT_TYPE]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        let is_post = request.method() == http::Method::POST;
                        let body = request.into_body().collect().await?.to_bytes();
                        if is_post {
                            store.push(
                                &path,
                                &content_type,
                                ExportTraceServiceRequest::decode(body).unwrap(),
                            );
                        }
                        let answer =
                            Bytes::from(ExportTraceServiceResponse::default().encode_to_vec());
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .status(status)
                                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                                .body(Full::new(answer))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (format!("http://{addr}").parse().unwrap(), received)
}

fn config(collector: http::Uri, protocol: ExportProtocol) -> TraceConfig {
    TraceConfig {
        collector,
        protocol,
        sampling: 1.0,
        queue_size: 64,
        batch_size: 2,
        batch_timeout: Duration::from_secs(60),
        export_timeout: Duration::from_secs(5),
        service_name: None,
    }
}

struct Running {
    tracer: Tracer,
    task: JoinHandle<()>,
    metrics: TraceMetrics,
    shutdown: watch::Sender<bool>,
}

fn run(config: &TraceConfig) -> Running {
    let identity = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap();
    let (_, identity) = watch::channel(Some(identity));
    let metrics = TraceMetrics::default();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (tracer, task) = start_with_identity(config, identity, metrics.clone(), shutdown_rx);
    Running {
        tracer,
        task,
        metrics,
        shutdown,
    }
}

impl Running {
    /// Finishes `n` sampled root spans.
    fn spans(&self, n: usize) {
        for _ in 0..n {
            self.tracer
                .begin(SpanKind::Client, &mut HeaderMap::new())
                .finish(&SpanOutcome {
                    status: Some(200),
                    ..SpanOutcome::default()
                });
        }
    }

    fn dropped(&self, reason: &'static str) -> u64 {
        self.metrics
            .spans_dropped
            .get_or_create(&DropLabels { reason })
            .get()
    }

    fn exports(&self, result: &'static str) -> u64 {
        self.metrics
            .exports
            .get_or_create(&ExportLabels { result })
            .get()
    }
}

fn string_attributes(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tokio::test]
async fn a_full_batch_goes_out_over_grpc_as_otlp() {
    let (collector, received) = grpc_collector(0).await;
    let running = run(&config(collector, ExportProtocol::Grpc));
    // One root, one continuing a caller's trace.
    running.spans(1);
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let mut child = running.tracer.begin(SpanKind::Server, &mut headers);
    child
        .span_mut()
        .unwrap()
        .describe(&http::Method::GET, "/", false);
    let child_id = child.span_id().unwrap();
    child.finish(&SpanOutcome {
        status: Some(500),
        ..SpanOutcome::default()
    });

    eventually("two spans", || received.spans().len() == 2).await;
    let requests = received.requests();
    assert_eq!(requests.len(), 1, "one batch of two");
    assert_eq!(requests[0].1, "application/grpc");
    let resource_spans = &requests[0].2.resource_spans[0];
    let mut attributes = string_attributes(&resource_spans.resource.as_ref().unwrap().attributes);
    // The pod's name comes from the environment (`POD_NAME`), which the test does not own.
    attributes.retain(|(key, _)| key != "k8s.pod.name");
    let expected = [
        ("service.name", "web.demo"),
        ("k8s.namespace.name", "demo"),
        (
            "sigil.proxy.identity",
            "spiffe://cluster.local/ns/demo/sa/web",
        ),
    ]
    .map(|(key, value)| (key.to_owned(), value.to_owned()));
    assert_eq!(attributes, expected);
    let scope = &resource_spans.scope_spans[0];
    assert_eq!(scope.scope.as_ref().unwrap().name, "sigil-proxy");
    assert_eq!(scope.schema_url, SCHEMA_URL);
    let root = &scope.spans[0];
    assert_eq!(root.kind, otlp::span::SpanKind::Client as i32);
    assert!(root.parent_span_id.is_empty());
    assert_eq!(root.flags, 0x101);
    assert!(root.start_time_unix_nano > 0);
    assert!(root.end_time_unix_nano >= root.start_time_unix_nano);
    assert_eq!(
        root.status.as_ref().unwrap().code,
        otlp::status::StatusCode::Unset as i32
    );
    let child = &scope.spans[1];
    assert_eq!(child.kind, otlp::span::SpanKind::Server as i32);
    assert_eq!(child.name, "GET");
    assert_eq!(child.span_id, child_id.0);
    assert_eq!(hex(&child.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&child.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(child.flags, 0x301);
    assert_eq!(
        child.status.as_ref().unwrap().code,
        otlp::status::StatusCode::Error as i32
    );
    assert!(
        string_attributes(&child.attributes)
            .contains(&("http.response.status_code".to_owned(), "500".to_owned()))
    );
    eventually("the export counted", || {
        running.metrics.spans_exported.get() == 2
    })
    .await;
    assert_eq!(running.exports("ok"), 1);
    assert_eq!(running.metrics.queue_spans.get(), 0);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_partial_batch_goes_out_at_its_deadline() {
    let (collector, received) = grpc_collector(0).await;
    let running = run(&TraceConfig {
        batch_size: 100,
        batch_timeout: Duration::from_millis(50),
        ..config(collector, ExportProtocol::Grpc)
    });
    let started = Instant::now();
    running.spans(1);
    eventually("the span", || received.spans().len() == 1).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn spans_the_collector_rejects_are_counted() {
    let (collector, received) = grpc_collector(1).await;
    let running = run(&config(collector, ExportProtocol::Grpc));
    running.spans(2);
    eventually("the export counted", || running.exports("ok") == 1).await;
    assert_eq!(received.spans().len(), 2);
    assert_eq!(running.metrics.spans_exported.get(), 1);
    assert_eq!(running.dropped("rejected"), 1);
}

#[tokio::test]
async fn a_dead_collector_drops_batches_and_backs_off() {
    // A port nothing listens on: connections are refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let running = run(&TraceConfig {
        batch_size: 1,
        ..config(
            format!("http://{addr}").parse().unwrap(),
            ExportProtocol::Grpc,
        )
    });
    running.spans(5);
    eventually("five dropped spans", || {
        running.dropped("export_failed") == 5
    })
    .await;
    // The first failure starts a backoff: the batches due during it are dropped untried.
    assert!(running.exports("error") >= 1);
    assert!(running.exports("error") < 5, "{}", running.exports("error"));
    assert_eq!(running.metrics.spans_exported.get(), 0);
}

#[tokio::test]
async fn a_hanging_collector_times_out_and_the_queue_overflows() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let running = run(&TraceConfig {
        batch_size: 1,
        queue_size: 2,
        export_timeout: Duration::from_millis(300),
        ..config(
            format!("http://{addr}").parse().unwrap(),
            ExportProtocol::HttpProtobuf,
        )
    });
    running.spans(1);
    // The exporter took it and waits on the collector.
    eventually("the exporter to take the span", || {
        running.metrics.queue_spans.get() == 0
    })
    .await;
    // Two fit in the queue; finishing the others drops them at once.
    running.spans(5);
    assert_eq!(running.dropped("queue_full"), 3);
    assert_eq!(running.metrics.queue_spans.get(), 2);
    eventually("the three others dropped", || {
        running.dropped("export_failed") == 3
    })
    .await;
    assert_eq!(running.exports("error"), 1);
    assert_eq!(running.metrics.queue_spans.get(), 0);
}

#[tokio::test]
async fn otlp_http_posts_protobuf_to_v1_traces() {
    let (collector, received) = http_collector(http::StatusCode::OK).await;
    let running = run(&config(collector, ExportProtocol::HttpProtobuf));
    running.spans(4);
    eventually("two exports counted", || running.exports("ok") == 2).await;
    let requests = received.requests();
    assert_eq!(requests.len(), 2);
    for (path, content_type, request) in &requests {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        assert_eq!(request.resource_spans[0].scope_spans[0].spans.len(), 2);
    }
    assert_eq!(running.metrics.spans_exported.get(), 4);
}

#[tokio::test]
async fn otlp_http_error_statuses_fail_the_export() {
    let (collector, received) = http_collector(http::StatusCode::SERVICE_UNAVAILABLE).await;
    let running = run(&config(collector, ExportProtocol::HttpProtobuf));
    running.spans(2);
    eventually("the failed export", || running.exports("error") == 1).await;
    assert_eq!(received.spans().len(), 2);
    assert_eq!(running.dropped("export_failed"), 2);
    assert_eq!(running.metrics.spans_exported.get(), 0);
}

#[test]
fn the_http_path_is_v1_traces_unless_the_url_names_one() {
    let path = |url: &str| HttpClient::new(&url.parse().unwrap()).path.to_string();
    assert_eq!(path("http://collector:4318"), "/v1/traces");
    assert_eq!(path("http://collector:4318/"), "/v1/traces");
    assert_eq!(
        path("http://collector:4318/otlp/v1/traces"),
        "/otlp/v1/traces"
    );
}

#[tokio::test]
async fn shutdown_flushes_the_queue_and_later_spans_are_counted() {
    let (collector, received) = grpc_collector(0).await;
    let mut running = run(&config(collector, ExportProtocol::Grpc));
    // Five spans: two batches go out at once, the fifth waits for a deadline a minute away.
    running.spans(5);
    eventually("two batches", || received.spans().len() == 4).await;
    running.shutdown.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut running.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received.spans().len(), 5);
    assert_eq!(running.metrics.spans_exported.get(), 5);
    running.spans(1);
    assert_eq!(running.dropped("shutdown"), 1);
}

#[test]
fn the_resource_names_the_service() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
    let named =
        |service, identity, pod| string_attributes(&resource(service, identity, pod).attributes);
    assert_eq!(
        named(None, Some(&id), Some("cart-7d9f")),
        [
            ("service.name", "cart.shop"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "cart-7d9f"),
            (
                "sigil.proxy.identity",
                "spiffe://cluster.local/ns/shop/sa/cart"
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(named(Some("checkout"), Some(&id), None)[0].1, "checkout");
    assert_eq!(
        named(None, None, None),
        [(
            "service.name".to_owned(),
            "unknown_service:sigil-proxy".to_owned()
        )]
    );
}
